"""Test-time adaptation: a small trainable pytree ``theta`` fitted with optax over a large frozen one.

Imported explicitly (``import jaxmerge.tta``), not by ``import jaxmerge``: it needs optax. Importing it
registers ``adamerging`` in the method registry.
"""

from jaxmerge.tta.adapter import Adapter as Adapter
from jaxmerge.tta.adamerging import AdaMergingConfig as AdaMergingConfig
from jaxmerge.tta.adamerging import adamerging as adamerging
from jaxmerge.tta.adamerging import adamerging_adapter as adamerging_adapter
from jaxmerge.tta.adamerging import ties_masked as ties_masked
from jaxmerge.tta.fit import fit as fit
from jaxmerge.tta.fit import make_step as make_step
from jaxmerge.tta.heads import head_logits as head_logits
from jaxmerge.tta.heads import pad_heads as pad_heads
from jaxmerge.tta.losses import entropy as entropy
from jaxmerge.tta.losses import kl_divergence as kl_divergence
from jaxmerge.tta.losses import mse as mse
