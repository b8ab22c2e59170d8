"""Methods that need data: validation-driven merges (Fisher, RegMean) and test-time adaptation (AdaMerging),
with a small trainable pytree ``theta`` fitted with optax over a large frozen one.

``import jaxmerge`` imports this package to register its methods (:mod:`jaxmerge.tta.methods`); optax is
imported only when an adaptation runs. :func:`run_method` runs any data-needing method by name.
"""

from jaxmerge.tta.adapter import Adapter as Adapter
from jaxmerge.tta.methods import AdaMergingConfig as AdaMergingConfig
from jaxmerge.tta.methods import FisherConfig as FisherConfig
from jaxmerge.tta.methods import LocalizeStitchConfig as LocalizeStitchConfig
from jaxmerge.tta.methods import RegMeanConfig as RegMeanConfig
from jaxmerge.tta.methods import SurgeryConfig as SurgeryConfig
from jaxmerge.tta.adamerging import adamerging as adamerging
from jaxmerge.tta.adamerging import adamerging_adapter as adamerging_adapter
from jaxmerge.tta.adamerging import ties_masked as ties_masked
from jaxmerge.tta.api import check_labels as check_labels
from jaxmerge.tta.api import run_method as run_method
from jaxmerge.tta.capture import linear_grams as linear_grams
from jaxmerge.tta.fit import fit as fit
from jaxmerge.tta.fit import make_step as make_step
from jaxmerge.tta.heads import head_logits as head_logits
from jaxmerge.tta.heads import pad_heads as pad_heads
from jaxmerge.tta.losses import entropy as entropy
from jaxmerge.tta.losses import kl_divergence as kl_divergence
from jaxmerge.tta.losses import mse as mse
from jaxmerge.tta.validation import fisher as fisher
from jaxmerge.tta.validation import fisher_information as fisher_information
from jaxmerge.tta.validation import regmean as regmean
from jaxmerge.tta.validation import ugm as ugm
from jaxmerge.tta.masks import adarank as adarank
from jaxmerge.tta.masks import concrete as concrete
from jaxmerge.tta.stitch import localize_stitch_data as localize_stitch_data
from jaxmerge.tta.surgery import SurgeryModel as SurgeryModel
from jaxmerge.tta.surgery import apply_surgery as apply_surgery
from jaxmerge.tta.surgery import surgery as surgery
from jaxmerge.tta.surgery import surgery_from_features as surgery_from_features
