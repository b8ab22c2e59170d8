"""Reductions ``(T, ...) -> (...)`` over the task axis."""

from jaxmerge.reductions._mean import disjoint_merge as disjoint_merge
from jaxmerge.reductions._mean import elected_sign as elected_sign
from jaxmerge.reductions._mean import mean_tasks as mean_tasks
from jaxmerge.reductions._mean import sum_tasks as sum_tasks
from jaxmerge.reductions._mean import ties_merge as ties_merge
from jaxmerge.reductions._mean import weighted_sum as weighted_sum
