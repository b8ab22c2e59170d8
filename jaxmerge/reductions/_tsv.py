"""Task Singular Vectors: per-task low-rank compression (TSV-C, BYOM-LoRA) and decorrelated merging (TSV-M).

For one matrix leaf with task matrices ``Delta_t = U_t S_t V_t^T`` and ``k = int(r / T)``:

- TSV-C keeps ``U_t^k S_t^k V_t^k^T`` per task (one model per task; BYOM-LoRA is the same step with a fixed
  rank ``q``).
- TSV-M concatenates ``U^ = [U_1^k ... U_T^k]`` and ``V^ = [V_1^k ... V_T^k]``, replaces both by their
  orthogonal polar factors (Procrustes: the closest matrices with orthonormal columns), and rebuilds
  ``M = polar(U^) blockdiag(S_t^k) polar(V^)^T``.

Only the top ``k`` triplets of each task are computed (:func:`jaxmerge.linalg.thin_svd`, Gram route when
``k <= r/2``), and the two polar factors come from QDWH iterations rather than two more SVDs. FusionBench pads
``U^`` with zero columns up to ``r`` when ``T k < r``; zero columns do not change the other columns' polar
factor and multiply zero singular values, so the result is the same without the padding.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxmerge import linalg
from jaxmerge.base import REDUCE, TASK, MergeTransform
from jaxmerge.reductions._matrix import matrix_transform
from jaxmerge.typing import Filter

__all__ = ["low_rank_tasks", "tsv_merge", "tsv_merge_factors", "tsv_rank"]


def tsv_rank(r: int, num_tasks: int, rank_fraction: float | None = None) -> int:
  """``k = int(r * (1 / T))`` (FusionBench's expression, float rounding included) or ``int(r * fraction)``.

  Args:
    r: the matrix rank ``min(m, n)``.
    num_tasks: ``T``.
    rank_fraction: per-task share of ``r``; ``None`` means ``1 / T``.

  Returns:
    The per-task rank ``k`` (an int, see :func:`jaxmerge.linalg.rank_from_fraction`).

  References:
    Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging", CVPR 2025.
    https://arxiv.org/abs/2412.00081
  """
  return linalg.rank_from_fraction(r, 1 / num_tasks if rank_fraction is None else rank_fraction)


def tsv_merge_factors(f: linalg.Factors, *, method: str = "auto") -> Float[Array, "m n"]:
  """TSV-M for one matrix from its per-task factors.

  Args:
    f: ``u (T, m, k)``, ``s (T, k)``, ``vt (T, k, n)`` (e.g. one leaf of :func:`jaxmerge.linalg.decompose`).
    method: polar-factor algorithm (:func:`jaxmerge.linalg.polar`).

  Returns:
    ``polar(U^) diag(S^) polar(V^)^T``, an ``(m, n)`` matrix.

  References:
    Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging", CVPR 2025.
    https://arxiv.org/abs/2412.00081
  """
  t, m, k = f.u.shape
  n = f.vt.shape[-1]
  u_hat = jnp.transpose(f.u, (1, 0, 2)).reshape(m, t * k)
  v_hat = jnp.transpose(f.vt, (2, 0, 1)).reshape(n, t * k)
  pu = linalg.polar(u_hat, method=method)
  pv = linalg.polar(v_hat, method=method)
  return linalg.matmul(pu * f.s.reshape(1, t * k), pv.T)


def tsv_merge(
    rank_fraction: float | None = None,
    *,
    polar_method: str = "auto",
    svd_method: str = "auto",
    fallback: str = "mean",
    where: Filter | None = None,
    batch_size: int | None = 0,
) -> MergeTransform:
  """``(T, ...) -> (...)``: TSV-M on matrix leaves, ``fallback`` (default mean) on the others. Unscaled (chain
  a :func:`~jaxmerge.transforms.scale` for alpha).

  Args:
    rank_fraction: per-task rank as a fraction of ``r = min(m, n)``; default ``1/T``.
    polar_method: polar-factor algorithm (:func:`jaxmerge.linalg.polar`; ``"svd"`` is the reference's).
    svd_method: per-task truncated SVD route (:func:`jaxmerge.linalg.thin_svd`).
    fallback: vector leaves (``"mean"``, ``"task_arithmetic"``, ``"pretrained"``).
    where: restricts the matrix leaves (e.g. to exclude keys).
    batch_size: matrices processed together (:func:`jaxmerge.linalg.map_matrices`).

  Returns:
    A :class:`~jaxmerge.base.MergeTransform` (a reduction, ``(T, ...) -> (...)``).

  References:
    Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging", CVPR 2025.
    https://arxiv.org/abs/2412.00081
  """

  def kernel(coeffs, x):
    del coeffs
    k = tsv_rank(min(x.shape[1:]), x.shape[0], rank_fraction)
    f = linalg.map_tasks(lambda a: linalg.thin_svd(a, k, method=svd_method), x)
    return tsv_merge_factors(f, method=polar_method)

  return matrix_transform(kernel, kind=REDUCE, fallback=fallback, where=where, batch_size=batch_size)


def low_rank_tasks(
    rank_fraction: float | None = None,
    *,
    rank: int | None = None,
    svd_method: str = "auto",
    fallback: str = "task",
    where: Filter | None = None,
    batch_size: int | None = 0,
) -> MergeTransform:
  """``(T, ...) -> (T, ...)``: each task's matrices replaced by their best rank-``k`` approximation (TSV-C,
  BYOM-LoRA's compression); the task models are ``theta_0 + U_t^k S_t^k V_t^k^T``.

  Args:
    rank_fraction: ``k = int(r * rank_fraction)``; default ``1/T`` (TSV-C).
    rank: a fixed rank ``q`` instead (clipped to ``r``; BYOM-LoRA).
    svd_method: see :func:`jaxmerge.linalg.low_rank`.
    fallback: vector leaves: ``"task"`` (each task's own vector, FusionBench's TSV-C), ``"mean"`` or
      ``"pretrained"``.
    where: restricts the matrix leaves.
    batch_size: matrices processed together (:func:`jaxmerge.linalg.map_matrices`).

  Returns:
    A task-preserving :class:`~jaxmerge.base.MergeTransform` (``(T, ...) -> (T, ...)``; use
    :func:`jaxmerge.merge_per_task`).

  References:
    Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging", CVPR 2025.
    https://arxiv.org/abs/2412.00081
  """
  if rank is not None and rank_fraction is not None:
    raise ValueError("give rank or rank_fraction, not both")
  if rank is not None and rank < 0:
    raise ValueError(f"rank must be >= 0, got {rank}")

  def kernel(coeffs, x):
    del coeffs
    r = min(x.shape[1:])
    k = min(rank, r) if rank is not None else tsv_rank(r, x.shape[0], rank_fraction)
    return linalg.map_tasks(lambda a: linalg.low_rank(a, k, method=svd_method), x)

  return matrix_transform(kernel, kind=TASK, fallback=fallback, where=where, batch_size=batch_size)

