"""Isotropic merging: Iso-C (flat spectrum of the summed task matrix) and Iso-CTS (common plus task-specific
subspaces, then a flat spectrum).

Iso-C replaces the spectrum of ``Delta_TA = sum_t Delta_t`` by its mean singular value: ``sigma_bar U V^T``. Only
the orthogonal polar factor ``U V^T`` and the nuclear norm are needed, so no singular vectors are computed:
QDWH gives ``Q = U V^T`` and ``trace(Q^T Delta_TA)`` the nuclear norm.

Iso-CTS keeps the top ``k_c`` left/right singular vectors of ``Delta_TA`` (common subspace) and, for every
task, the top ``s`` triplets of ``D_t = (I - U_c U_c^T) Delta_t`` (projection on the *output* side, so the
layout matters), orthogonalizes the concatenated bases and flattens the spectrum. Two exact shortcuts:

- the task-specific left vectors are orthogonal to ``U_c``, so ``polar([U_c | W]) = [U_c | polar(W)]``: only a
  ``(r - k_c)``-column polar factor is computed on the left;
- when ``out <= in``, the complement of ``U_c`` is spanned by the remaining left singular vectors ``U_perp``,
  so ``D_t = U_perp (U_perp^T Delta_t)`` and the per-task SVDs run on ``(r - k_c) x in`` matrices.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxmerge import linalg
from jaxmerge.base import REDUCE, MergeTransform
from jaxmerge.reductions._matrix import matrix_transform
from jaxmerge.tree import task_sum
from jaxmerge.typing import Filter

__all__ = ["iso_c_merge", "iso_cts_merge", "iso_cts_matrix", "iso_cts_sizes"]


def iso_c_merge(
    *, method: str = "auto", fallback: str = "mean", where: Filter | None = None, batch_size: int | None = 0
) -> MergeTransform:
  """``(T, ...) -> (...)``: Iso-C on matrix leaves (unscaled; chain a scale for alpha).

  Args:
    method: polar-factor algorithm (:func:`jaxmerge.linalg.polar`).
    fallback: vector leaves (``"mean"``, ``"task_arithmetic"``, ``"pretrained"``).
    where: restricts the matrix leaves.
    batch_size: matrices processed together (:func:`jaxmerge.linalg.map_matrices`).

  Returns:
    A :class:`~jaxmerge.base.MergeTransform` (a reduction, ``(T, ...) -> (...)``).

  References:
    Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and Task-Specific Subspaces",
    ICML 2025. https://arxiv.org/abs/2502.04959
  """

  def kernel(coeffs, x):
    del coeffs
    return linalg.flatten_spectrum(task_sum(x), method=method)

  return matrix_transform(kernel, kind=REDUCE, fallback=fallback, where=where, batch_size=batch_size,
                          combine=task_sum)


def iso_cts_sizes(r: int, num_tasks: int, common_fraction: float) -> tuple[int, int]:
  """``(k_c, s)``: common rank and per-task rank, adjusted so that ``r - k_c = T s`` (FusionBench's rule:
  ``k_c = r - round((r - int(r f)) / T) T``; when that rounding would exceed ``r`` it rounds down).

  Args:
    r: the matrix rank ``min(m, n)``.
    num_tasks: ``T``.
    common_fraction: share ``f`` of the rank given to the common subspace.

  Returns:
    ``(k_c, s)``: two ints with ``k_c + T s = r``.

  References:
    Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and Task-Specific Subspaces",
    ICML 2025. https://arxiv.org/abs/2502.04959
  """
  kc = int(r * common_fraction)
  ts = round((r - kc) / num_tasks) * num_tasks
  if ts > r:
    ts -= num_tasks
  return r - ts, ts // num_tasks


def iso_cts_matrix(x: Float[Array, "T m n"], common_fraction: float = 0.8, *, method: str = "auto") -> Float[Array, "m n"]:
  """Iso-CTS for one matrix (unscaled): ``sigma_bar polar([U_c | U_ts]) polar([V_c | V_ts])^T``.

  Args:
    x: the task matrices, ``(T, m, n)`` (canonical ``(out, in)`` view).
    common_fraction: share of the rank given to the common subspace (see :func:`iso_cts_sizes`).
    method: polar-factor algorithm (:func:`jaxmerge.linalg.polar`).

  Returns:
    The merged ``(m, n)`` matrix; Iso-C's flat spectrum of ``sum_t x_t`` when the per-task rank ``s`` is 0.

  References:
    Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and Task-Specific Subspaces",
    ICML 2025. https://arxiv.org/abs/2502.04959
  """
  t, m, n = x.shape
  r = min(m, n)
  kc, s = iso_cts_sizes(r, t, common_fraction)
  delta = task_sum(x)
  if s == 0:
    return linalg.flatten_spectrum(delta, method=method)
  u, sv, vt = linalg.svd(delta)
  uc, sc, vc = u[:, :kc], sv[:kc], vt[:kc]
  hi = linalg.HIGHEST
  if m <= n:
    up = u[:, kc:]  # (m, r - kc): the complement of U_c
    z = jnp.einsum("mp,tmn->tpn", up, x, precision=hi)
    f = linalg.map_tasks(lambda a: linalg.thin_svd(a, s), z)
    a = jnp.transpose(f.u, (1, 0, 2)).reshape(r - kc, t * s)
    pw = linalg.matmul(up, linalg.polar(a, method=method))
  else:
    proj = jnp.einsum("mk,tmn->tkn", uc, x, precision=hi)
    d = x - jnp.einsum("mk,tkn->tmn", uc, proj, precision=hi)
    f = linalg.map_tasks(lambda a: linalg.thin_svd(a, s), d)
    w = jnp.transpose(f.u, (1, 0, 2)).reshape(m, t * s)
    pw = linalg.polar(linalg.project_out(w, uc), method=method)
  v_star = jnp.concatenate([vc.T, jnp.transpose(f.vt, (2, 0, 1)).reshape(n, t * s)], axis=1)
  pv = linalg.polar(v_star, method=method)
  sigma_bar = (jnp.sum(sc) + jnp.sum(f.s)) / r
  return sigma_bar * (linalg.matmul(uc, pv[:, :kc].T) + linalg.matmul(pw, pv[:, kc:].T))


def iso_cts_merge(
    common_fraction: float = 0.8,
    *,
    method: str = "auto",
    fallback: str = "mean",
    where: Filter | None = None,
    batch_size: int | None = 0,
) -> MergeTransform:
  """``(T, ...) -> (...)``: Iso-CTS on matrix leaves (unscaled; chain a scale for alpha).

  Args:
    common_fraction: share ``f`` of the rank given to the common subspace (FusionBench 0.8); ``f = 1`` is Iso-C.
    method: polar-factor algorithm.
    fallback: vector leaves.
    where: restricts the matrix leaves.
    batch_size: matrices processed together (:func:`jaxmerge.linalg.map_matrices`).

  Returns:
    A :class:`~jaxmerge.base.MergeTransform` (a reduction, ``(T, ...) -> (...)``).

  References:
    Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and Task-Specific Subspaces",
    ICML 2025. https://arxiv.org/abs/2502.04959
  """
  if not 0.0 <= common_fraction <= 1.0:
    raise ValueError(f"common_fraction must be in [0, 1], got {common_fraction}")

  def kernel(coeffs, x):
    del coeffs
    return iso_cts_matrix(x, common_fraction, method=method)

  return matrix_transform(kernel, kind=REDUCE, fallback=fallback, where=where, batch_size=batch_size)
