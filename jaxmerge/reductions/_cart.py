"""CART: centered arithmetic with rank-reduced task vectors.

``theta_M = theta_avg + lambda sum_t SVD_k(theta_t - theta_avg)`` on matrix leaves, ``k = max(1, int(rho r))``.
Weight averaging is task arithmetic around the average; keeping only the top singular directions of the
centered task matrices removes the interference between them. Vector leaves get ``theta_avg`` (their centered
vectors sum to zero), which is why the scale is a coefficient of this step rather than a chained ``scale``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxmerge import linalg
from jaxmerge.base import REDUCE, MergeTransform
from jaxmerge.reductions._matrix import matrix_transform, vector_fallback
from jaxmerge.tree import task_mean, task_sum
from jaxmerge.typing import Filter

__all__ = ["CartCoeffs", "cart_merge", "cart_rank"]


class CartCoeffs(NamedTuple):
  scale: jax.Array


def cart_rank(r: int, rank_fraction: float, rank: int | None = None) -> int:
  """``max(1, int(rho r))`` (the reference), or ``rank`` clipped to ``[0, r]`` when given.

  Args:
    r: the matrix rank ``min(m, n)``.
    rank_fraction: rho, the kept share of ``r``.
    rank: a fixed rank that overrides ``rank_fraction``.

  Returns:
    The rank ``k`` (an int in ``[0, r]``; at least 1 from ``rank_fraction`` when ``r >= 1``).

  References:
    Choi et al., "Revisiting Weight Averaging for Model Merging", 2024. https://arxiv.org/abs/2412.12153
  """
  if rank is not None:
    return max(0, min(int(rank), r))
  return min(r, max(1, int(r * rank_fraction)))


def cart_merge(
    rank_fraction: float = 0.08,
    scale: float = 1.0,
    *,
    rank: int | None = None,
    svd_method: str = "auto",
    fallback: str = "mean",
    where: Filter | None = None,
    batch_size: int | None = 0,
) -> MergeTransform:
  """``(T, ...) -> (...)``: ``mean_t tau_t + lambda sum_t SVD_k(tau_t - mean_s tau_s)`` on matrix leaves.

  Args:
    rank_fraction: rho, the kept share of ``r = min(m, n)`` (paper ~8%; AdaRank's CART base uses 16%).
    scale: lambda (a coefficient: ``CartCoeffs.scale``), tuned on validation data (AdaRank's config: 2.3).
    rank: a fixed rank instead of ``rank_fraction`` (``0`` and ``r`` both give the simple average).
    svd_method: see :func:`jaxmerge.linalg.low_rank`.
    fallback: vector leaves: ``"mean"`` (``theta_avg``, CART's own result), ``"task_arithmetic"``
      (``lambda sum_t tau_t``) or ``"pretrained"``.
    where: restricts the matrix leaves (the reference uses attention and MLP weights only).
    batch_size: matrices processed together (:func:`jaxmerge.linalg.map_matrices`).

  Returns:
    A :class:`~jaxmerge.base.MergeTransform` (a reduction, ``(T, ...) -> (...)``) with coefficients
    :class:`CartCoeffs`.

  References:
    Choi et al., "Revisiting Weight Averaging for Model Merging", 2024. https://arxiv.org/abs/2412.12153
  """
  if rank_fraction < 0:
    raise ValueError(f"rank_fraction must be >= 0, got {rank_fraction}")
  base = vector_fallback(fallback)

  def init(tree):
    del tree
    return CartCoeffs(jnp.asarray(scale, jnp.float32))

  def kernel(coeffs, x):
    k = cart_rank(min(x.shape[1:]), rank_fraction, rank)
    avg = task_mean(x)
    low = linalg.map_tasks(lambda a: linalg.low_rank(a, k, method=svd_method), x - avg[None])
    return avg + coeffs.scale * task_sum(low)

  def vec(coeffs, x):
    y = base(x)
    return coeffs.scale * y if fallback == "task_arithmetic" else y

  return matrix_transform(kernel, kind=REDUCE, fallback=vec, where=where, init=init, batch_size=batch_size)
