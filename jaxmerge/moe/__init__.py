"""Model-level merges (survey family D): methods that change the model function instead of producing one set
of weights.

Imported explicitly (``import jaxmerge.moe``): it needs flax.

- :mod:`jaxmerge.moe.math`: pure per-layer math (SMILE routing and experts, WEMoE gates and weight-ensembled
  MLPs, FREE's frequency filter), no flax.
- :mod:`jaxmerge.moe.layers`: NNX layers (:class:`SmileLinear`, :class:`WEMoEMLP`), the :func:`upcycle`
  surgery, routers as :class:`RouterParam` and experts as :class:`Expert` variables, orbax save/restore and
  the router adapter for :func:`jaxmerge.tta.fit`.
- :mod:`jaxmerge.moe.pertask`: shared model plus compressed task experts, chosen by task id or a router
  (EMR, TALL masks, TSV-C, BYOM-FFT/LoRA, Twin-Merging, FREE-Merging).
"""

from jaxmerge.moe import math as math
from jaxmerge.moe.layers import Expert as Expert
from jaxmerge.moe.layers import RouterParam as RouterParam
from jaxmerge.moe.layers import SmileLinear as SmileLinear
from jaxmerge.moe.layers import WEMoEMLP as WEMoEMLP
from jaxmerge.moe.layers import count_params as count_params
from jaxmerge.moe.layers import load_state as load_state
from jaxmerge.moe.layers import router_adapter as router_adapter
from jaxmerge.moe.layers import save_state as save_state
from jaxmerge.moe.layers import smile as smile
from jaxmerge.moe.layers import upcycle as upcycle
from jaxmerge.moe.layers import vision_module as vision_module
from jaxmerge.moe.layers import wemoe as wemoe
from jaxmerge.moe.pertask import ExpertModel as ExpertModel
from jaxmerge.moe.pertask import byom_model as byom_model
from jaxmerge.moe.pertask import emr_model as emr_model
from jaxmerge.moe.pertask import free_backbone as free_backbone
from jaxmerge.moe.pertask import free_model as free_model
from jaxmerge.moe.pertask import low_rank_model as low_rank_model
from jaxmerge.moe.pertask import tall_model as tall_model
from jaxmerge.moe.pertask import train_router as train_router
from jaxmerge.moe.pertask import twin_model as twin_model
