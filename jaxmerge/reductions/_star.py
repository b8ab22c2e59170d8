"""STAR: spectral truncation and rescale.

Each task matrix keeps the fewest top singular directions that carry ``eta`` percent of its nuclear norm, the
kept singular values are rescaled so that the nuclear norm is unchanged, and the results are averaged:
``theta_M = theta_0 + (1/T) sum_t U_{k_t} diag(sigma' ) V_{k_t}^T``. The kept rank ``k_t`` depends on the values,
so the full spectrum is computed and masked (shapes stay static under ``jit``).
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxmerge import linalg
from jaxmerge.base import REDUCE, MergeTransform
from jaxmerge.reductions._matrix import matrix_transform
from jaxmerge.tree import task_mean
from jaxmerge.typing import Filter

__all__ = ["star_matrix", "star_merge"]

_RATIO_TOL = 1e-6  # relative slack on the cumulative-share test (float32 cumsums at eta = 100)


def star_matrix(x: Float[Array, "m n"], eta: float = 40.0) -> Float[Array, "m n"]:
  """STAR's truncate-and-rescale of one task matrix (a zero matrix stays zero).

  ``k = min{k : sum_{i<=k} sigma_i >= (eta / 100) sum_i sigma_i}`` (tested with a ``1e-6`` relative slack),
  ``sigma'_i = sigma_i sum_j sigma_j / sum_{j<=k} sigma_j`` for ``i <= k``.

  Args:
    x: one task matrix, ``(m, n)``.
    eta: percentage of the nuclear norm the kept singular values must reach.

  Returns:
    The rank-``k`` float32 ``(m, n)`` matrix with the same nuclear norm as ``x``.

  References:
    Lee et al., "STAR: Spectral Truncation and Rescale for Model Merging", NAACL 2025.
    https://arxiv.org/abs/2502.10339
  """
  u, s, vt = linalg.svd(x)
  total = jnp.sum(s)
  share = jnp.cumsum(s) / jnp.where(total > 0, total, 1.0)
  k = jnp.sum(share < (eta / 100.0) * (1.0 - _RATIO_TOL)) + 1  # first index reaching the share, 1-based
  keep = jnp.arange(s.shape[0]) < k
  kept = jnp.sum(jnp.where(keep, s, 0.0))
  s_new = jnp.where(keep, s * (total / jnp.where(kept > 0, kept, 1.0)), 0.0)
  return linalg.matmul(u * s_new[None, :], vt)


def star_merge(
    eta: float = 40.0, *, fallback: str = "mean", where: Filter | None = None, batch_size: int | None = 0
) -> MergeTransform:
  """``(T, ...) -> (...)``: the mean of the STAR-processed task matrices; vector leaves by ``fallback``.

  Args:
    eta: percentage of each task matrix's nuclear norm kept (paper 40); 100 gives the simple average.
    fallback: vector leaves (``"mean"`` recommended by METHODS.md; the survey does not specify).
    where: restricts the matrix leaves.
    batch_size: matrices processed together (:func:`jaxmerge.linalg.map_matrices`).

  Returns:
    A :class:`~jaxmerge.base.MergeTransform` (a reduction, ``(T, ...) -> (...)``).

  References:
    Lee et al., "STAR: Spectral Truncation and Rescale for Model Merging", NAACL 2025.
    https://arxiv.org/abs/2502.10339
  """
  if not 0.0 < eta <= 100.0:
    raise ValueError(f"eta must be in (0, 100], got {eta}")

  def kernel(coeffs, x):
    del coeffs
    return task_mean(linalg.map_tasks(lambda a: star_matrix(a, eta), x))

  return matrix_transform(kernel, kind=REDUCE, fallback=fallback, where=where, batch_size=batch_size)
