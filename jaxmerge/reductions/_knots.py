"""KnOTS: align task updates by one joint SVD, then merge in the shared coordinates with any merger.

For a matrix leaf, the task updates are concatenated along the input axis, ``[Delta_1, ..., Delta_T] =
U S [V_1; ...; V_T]^T`` (one thin SVD; the output basis ``U`` and the scales ``S`` are shared), the per-task
input factors ``V_t^T`` (``k x in``) are merged by the wrapped merger exactly as if they were the task vectors,
and the leaf becomes ``U S V_M^T``. With a linear merger (task arithmetic) this equals the merger on the raw
updates; with TIES or DARE the trimming and sign election act in the aligned coordinates.

Components with ``S <= eps`` (the numerical rank; FusionBench's ``subspace_alignment`` uses ``1e-4``) are
zeroed instead of removed, so shapes stay static: their rows of ``V_t^T`` are zero, which the merger sees as
zero entries.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxmerge import filters as jfilters
from jaxmerge import linalg
from jaxmerge import tree as jtree
from jaxmerge.base import REDUCE, MergeContext, MergeTransform, context_of, identified
from jaxmerge.typing import Filter

__all__ = ["knots_align", "knots_merge"]

_ROWS = jfilters.MatrixSpec(in_axes=(-1,), out_axes=(-2,))


def knots_align(x: jax.Array, eps: float = 1e-4) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Joint SVD of one matrix's task updates.

  Args:
    x: ``(T, m, n)`` task matrices in the ``(out, in)`` view.
    eps: singular values ``<= eps`` are dropped (zeroed).

  Returns:
    ``u (m, k)``, ``s (k,)``, ``vt (T, k, n)`` with ``k = min(m, T n)`` and ``x[t] = u diag(s) vt[t]``.

  References:
    Stoica et al., "Model merging with SVD to tie the KnOTS", ICLR 2025. https://arxiv.org/abs/2410.19735
  """
  t, m, n = x.shape
  cat = jnp.transpose(x.astype(jnp.float32), (1, 0, 2)).reshape(m, t * n)
  u, s, vt = linalg.svd(cat)
  keep = s > eps
  u, s, vt = jnp.where(keep[None, :], u, 0.0), jnp.where(keep, s, 0.0), jnp.where(keep[:, None], vt, 0.0)
  return u, s, jnp.transpose(vt.reshape(-1, t, n), (1, 0, 2))


def knots_merge(
    base: MergeTransform,
    *,
    eps: float = 1e-4,
    scaled: bool = False,
    where: Filter | None = None,
    batch_size: int | None = 0,
) -> MergeTransform:
  """``(T, ...) -> (...)``: KnOTS around a reducing merger.

  Args:
    base: the merger applied in the aligned coordinates (e.g. ``jm.get_method("ties")()``). It sees a tree
      whose matrix leaves are the stacked ``V_t^T`` (``(T, k, in)``, read row by row: rows are components) and
      whose other leaves are the task vectors themselves, so its global scale and its fallback apply as usual.
    eps: numerical-rank threshold on the joint singular values.
    scaled: merge ``diag(S) V_t^T`` instead of ``V_t^T`` (magnitudes ranked on the scaled rows).
    where: restricts the matrix leaves (KnOTS targets LoRA-adapted layers).
    batch_size: matrices processed together (:func:`jaxmerge.linalg.map_matrices`).

  Returns:
    A :class:`~jaxmerge.base.MergeTransform` (a reduction, ``(T, ...) -> (...)``) wrapping ``base``.

  References:
    Stoica et al., "Model merging with SVD to tie the KnOTS", ICLR 2025. https://arxiv.org/abs/2410.19735
  """
  if base.kind != REDUCE:
    raise ValueError("the KnOTS base merger must reduce over tasks (e.g. task_arithmetic, ties, dare)")

  def apply(coeffs, tree, *, key=None, ctx=None):
    ctx = context_of(ctx)
    flat = jtree.flatten_paths(tree)
    specs = linalg.matrix_specs(flat, ctx.layout, where)
    aligned = linalg.map_matrices(lambda x: knots_align(x, eps), flat, specs, batch_size=batch_size)
    inner = {}
    for p, x in flat.items():
      if p not in aligned:
        inner[p] = x
        continue
      _, s, v = aligned[p]  # (B, k), (B, T, k, n)
      if scaled:
        v = v * s[:, None, :, None]
      v = jnp.moveaxis(v, 1, 0)
      inner[p] = v.reshape((v.shape[0],) + linalg.batch_shape(x, specs[p]) + v.shape[2:])

    def layout(path, struct):
      return _ROWS if path in aligned else ctx.layout(path, struct)

    merged = base.apply(coeffs, inner, key=key, ctx=MergeContext(pretrained=None, layout=layout))
    out = {}
    for p, x in flat.items():
      if p not in aligned:
        out[p] = merged[p]
        continue
      u, s, _ = aligned[p]
      vm = merged[p].reshape((u.shape[0],) + merged[p].shape[-2:])
      us = u if scaled else u * s[:, None, :]
      out[p] = linalg.to_leaf(linalg.matmul(us, vm), specs[p], tuple(x.shape[1:]))
    return jtree.unflatten_paths(tree, out)

  return identified(base.init, apply, REDUCE, "knots_merge", base, eps, scaled, where, batch_size,
                    needs_key=base.needs_key)
