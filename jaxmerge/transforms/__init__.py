"""Merge steps: task-preserving transforms ``(T, ...) -> (T, ...)`` and method-specific reductions.

The generic reductions (sum, mean, disjoint merge) live in :mod:`jaxmerge.reductions` and are re-exported
here so that one import gives every building block.
"""

from jaxmerge.reductions import disjoint_merge as disjoint_merge
from jaxmerge.reductions import elected_sign as elected_sign
from jaxmerge.reductions import mean_tasks as mean_tasks
from jaxmerge.reductions import sum_tasks as sum_tasks
from jaxmerge.reductions import ties_merge as ties_merge
from jaxmerge.reductions import weighted_sum as weighted_sum
from jaxmerge.transforms._basic import ScaleCoeffs as ScaleCoeffs
from jaxmerge.transforms._basic import ScaleTasksCoeffs as ScaleTasksCoeffs
from jaxmerge.transforms._basic import identity as identity
from jaxmerge.transforms._basic import scale as scale
from jaxmerge.transforms._basic import scale_tasks as scale_tasks
from jaxmerge.transforms._masks import byom_residuals as byom_residuals
from jaxmerge.transforms._masks import consensus_mask as consensus_mask
from jaxmerge.transforms._masks import emr_modulate as emr_modulate
from jaxmerge.transforms._masks import emr_parts as emr_parts
from jaxmerge.transforms._masks import emr_rescaled as emr_rescaled
from jaxmerge.transforms._masks import emr_terms as emr_terms
from jaxmerge.transforms._masks import emr_unified as emr_unified
from jaxmerge.transforms._masks import pcb_reduce as pcb_reduce
from jaxmerge.transforms._masks import stitch as stitch
from jaxmerge.transforms._masks import tall_mask_of as tall_mask_of
from jaxmerge.transforms._masks import tall_masks as tall_masks
from jaxmerge.transforms._sparsify import drop as drop
from jaxmerge.transforms._sparsify import magprune as magprune
from jaxmerge.transforms._sparsify import outlier_mask as outlier_mask
from jaxmerge.transforms._sparsify import trim as trim
from jaxmerge.transforms._weighted import model_stock_reduce as model_stock_reduce
from jaxmerge.transforms._weighted import nan_reduce as nan_reduce
from jaxmerge.transforms._weighted import slerp_reduce as slerp_reduce
