"""Reductions ``(T, ...) -> (...)`` over the task axis."""

from jaxmerge.reductions._mean import disjoint_merge as disjoint_merge
from jaxmerge.reductions._mean import disjoint_rows as disjoint_rows
from jaxmerge.reductions._mean import elect as elect
from jaxmerge.reductions._mean import elected_sign as elected_sign
from jaxmerge.reductions._mean import mean_tasks as mean_tasks
from jaxmerge.reductions._mean import sum_tasks as sum_tasks
from jaxmerge.reductions._mean import ties_merge as ties_merge
from jaxmerge.reductions._mean import weighted_sum as weighted_sum
from jaxmerge.reductions._cart import CartCoeffs as CartCoeffs
from jaxmerge.reductions._cart import cart_merge as cart_merge
from jaxmerge.reductions._iso import iso_c_merge as iso_c_merge
from jaxmerge.reductions._iso import iso_cts_matrix as iso_cts_matrix
from jaxmerge.reductions._iso import iso_cts_merge as iso_cts_merge
from jaxmerge.reductions._knots import knots_align as knots_align
from jaxmerge.reductions._knots import knots_merge as knots_merge
from jaxmerge.reductions._matrix import REDUCE_FALLBACKS as REDUCE_FALLBACKS
from jaxmerge.reductions._matrix import TASK_FALLBACKS as TASK_FALLBACKS
from jaxmerge.reductions._matrix import matrix_transform as matrix_transform
from jaxmerge.reductions._star import star_matrix as star_matrix
from jaxmerge.reductions._star import star_merge as star_merge
from jaxmerge.reductions._tsv import low_rank_tasks as low_rank_tasks
from jaxmerge.reductions._tsv import tsv_merge as tsv_merge
from jaxmerge.reductions._tsv import tsv_merge_factors as tsv_merge_factors
from jaxmerge.reductions._tsv import tsv_rank as tsv_rank
from jaxmerge.reductions._wudi import wudi_loss as wudi_loss
from jaxmerge.reductions._wudi import wudi_merge as wudi_merge
