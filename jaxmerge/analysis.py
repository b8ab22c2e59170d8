"""Analysis tools for task vectors and merged models (METHODS.md section 6): Singular Task Interference (TSV),
Subspace Alignment Ratio (Iso), CART's row-space interference I(k) and reconstruction error R(k), cosine
similarity of task vectors, sign-conflict rate, and cross-task interference (re-exported from
:mod:`jaxmerge.interference`).

Inputs are task vectors: a list of pytrees or one stack with a leading task axis (use
:func:`jaxmerge.tree.task_vectors` to get them from models). Matrix metrics read each matrix leaf through a
layout (:mod:`jaxmerge.filters`; Hugging Face ``(out, in)`` by default, ``flax_layout`` for Flax kernels), so
one-sided metrics (SAR: output space; I(k): input space) give the same numbers for both layouts. Every metric
returns per-layer values (``{path: array}``, with a leading axis over the leaf's matrices) and an aggregate.
All math runs in float32; this module is not part of the core and imports matplotlib only when plotting.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from jaxmerge import filters as jfilters
from jaxmerge import linalg
from jaxmerge import tree as jtree
from jaxmerge.interference import cross_task_interference as cross_task_interference
from jaxmerge.interference import cti_report as cti_report

__all__ = [
    "cart_interference",
    "cart_interference_matrix",
    "cosine_similarity",
    "cross_task_interference",
    "cti_report",
    "plot_curves",
    "plot_heatmap",
    "sign_conflict_rate",
    "singular_task_interference",
    "singular_task_interference_matrix",
    "subspace_alignment_ratio",
    "subspace_alignment_ratio_matrix",
]

_HI = linalg.HIGHEST


def _stack(task_vectors: Any) -> Any:
  if isinstance(task_vectors, (list, tuple)):
    if not task_vectors:
      raise ValueError("no task vectors given")
    return jtree.stack(list(task_vectors))
  return task_vectors


def _per_matrix(fn: Callable[[jax.Array], Any], stack: Any, layout, where) -> dict[str, Any]:
  flat = jtree.flatten_paths(stack)
  specs = linalg.matrix_specs(flat, layout, where)
  if not specs:
    raise ValueError("no matrix leaves under this layout (see jaxmerge.filters)")
  res = jax.jit(lambda xs: linalg.map_matrices(fn, xs, specs))({p: flat[p] for p in specs})
  return {p: jax.tree.map(np.asarray, v) for p, v in res.items()}


def _svd(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  return linalg.svd(x)


# ----------------------------------------------------------------------------- Singular Task Interference


@functools.partial(jax.jit, static_argnames=("k", "norm"))
def singular_task_interference_matrix(x: Float[Array, "T m n"], k: int | None = None, norm: str = "entrywise") -> jax.Array:
  """STI of one matrix's task updates: ``|| (U^T U - I) S (V^T V - I) ||`` with ``U = [U_1^k ... U_T^k]``,
  ``V = [V_1^k ... V_T^k]`` (columns concatenated), ``S = blockdiag(S_t^k)``.

  Args:
    x: ``(T, m, n)`` task matrices.
    k: singular triplets kept per task (default ``min(m, n)``).
    norm: ``"entrywise"`` (sum of absolute values, the default of METHODS.md 6.2) or ``"induced"`` (induced
      1-norm: the largest column sum).

  Returns:
    A scalar (invariant to the signs of the singular vectors; zero for mutually orthogonal singular vectors).

  References:
    Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging", CVPR 2025.
    https://arxiv.org/abs/2412.00081
  """
  t, m, n = x.shape
  r = min(m, n)
  k = r if k is None else min(int(k), r)
  u, s, vt = jax.vmap(_svd)(x)
  uu = jnp.transpose(u[:, :, :k], (1, 0, 2)).reshape(m, t * k)
  vv = jnp.transpose(vt[:, :k, :], (2, 0, 1)).reshape(n, t * k)
  eye = jnp.eye(t * k, dtype=jnp.float32)
  a = jnp.matmul(uu.T, uu, precision=_HI) - eye
  b = jnp.matmul(vv.T, vv, precision=_HI) - eye
  prod = jnp.matmul(a * s[:, :k].reshape(1, t * k), b, precision=_HI)
  if norm == "entrywise":
    return jnp.sum(jnp.abs(prod))
  if norm == "induced":
    return jnp.max(jnp.sum(jnp.abs(prod), axis=0))
  raise ValueError(f"norm must be 'entrywise' or 'induced', got {norm!r}")


def singular_task_interference(
    task_vectors: Any,
    *,
    k: int | None = None,
    norm: str = "entrywise",
    layout=jfilters.hf_layout,
    where=None,
    reduce: str = "sum",
) -> dict[str, Any]:
  """Singular Task Interference per matrix leaf and aggregated.

  Args:
    task_vectors: a list of task-vector pytrees or a stack ``(T, ...)``.
    k: triplets per task (default: all).
    norm: see :func:`singular_task_interference_matrix`.
    layout: how leaves are read as ``(out, in)`` matrices.
    where: optional filter on the matrix leaves.
    reduce: ``"sum"`` or ``"mean"`` over the matrices for ``"total"``.

  Returns:
    ``{"per_layer": {path: float32 array (B,)}, "total": float}`` (``B`` matrices per leaf, 1 for 2-D leaves).

  References:
    Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging", CVPR 2025.
    https://arxiv.org/abs/2412.00081
  """
  per = _per_matrix(lambda x: singular_task_interference_matrix(x, k, norm), _stack(task_vectors), layout, where)
  return {"per_layer": per, "total": _reduce(per, reduce)}


def _reduce(per: Mapping[str, np.ndarray], how: str) -> float:
  vals = np.concatenate([np.ravel(v) for v in per.values()])
  if how == "sum":
    return float(vals.sum())
  if how == "mean":
    return float(vals.mean())
  raise ValueError(f"reduce must be 'sum' or 'mean', got {how!r}")


# -------------------------------------------------------------------------------- Subspace Alignment Ratio


@functools.partial(jax.jit, static_argnames=("eps",))
def subspace_alignment_ratio_matrix(x: Float[Array, "T m n"], merged: Float[Array, "m n"], eps: float = 0.05
                                    ) -> tuple[jax.Array, jax.Array]:
  """SAR of each task matrix against a merged matrix: ``||P Delta_t||_F / ||Delta_t||_F`` with ``P = U_k U_k^T``
  the projector on the merged matrix's top ``k_M`` left (output-space) singular vectors,
  ``k_M = min{k : sum_{i>k} sigma_i^2 <= eps^2 sum_i sigma_i^2}``.

  Args:
    x: the task matrices ``Delta_t``, ``(T, m, n)``.
    merged: the merged matrix, ``(m, n)``.
    eps: share of the merged matrix's Frobenius norm left outside the kept subspace (static).

  Returns:
    ``(sar (T,), k_M)``; a zero task matrix has SAR 0.

  References:
    Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and Task-Specific Subspaces",
    ICML 2025. https://arxiv.org/abs/2502.04959
  """
  u, s, _ = _svd(merged)
  e = jnp.square(s)
  total = jnp.sum(e)
  tail = total - jnp.cumsum(e)  # tail[i] = sum_{j > i+1} sigma_j^2 (1-based k = i + 1)
  k_m = 1 + jnp.sum(tail > (eps ** 2) * total)
  keep = (jnp.arange(s.shape[0]) < k_m).astype(jnp.float32)
  uk = u * keep[None, :]
  proj = jnp.einsum("mk,tmn->tkn", uk, x.astype(jnp.float32), precision=_HI)
  num = jnp.sqrt(jnp.sum(jnp.square(proj), axis=(1, 2)))
  den = jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=(1, 2)))
  return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0), k_m


def subspace_alignment_ratio(
    task_vectors: Any, merged_update: Any, *, eps: float = 0.05, layout=jfilters.hf_layout, where=None
) -> dict[str, Any]:
  """Subspace Alignment Ratio of every task against a merged update, per matrix leaf.

  Args:
    task_vectors: list or stack of task vectors.
    merged_update: the merged model minus the pretrained one (one pytree, no task axis).
    eps: energy left outside the merged subspace (0.05).
    layout, where: matrix view and selection.

  Returns:
    ``{"per_layer": {path: (B, T)}, "rank": {path: (B,)}, "per_task": (T,) mean over matrices,
    "mean": float}``.

  References:
    Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and Task-Specific Subspaces",
    ICML 2025. https://arxiv.org/abs/2502.04959
  """
  stack = _stack(task_vectors)
  flat_m = jtree.flatten_paths(merged_update)
  both = {p: jnp.concatenate([jnp.asarray(x, jnp.float32), jnp.asarray(flat_m[p], jnp.float32)[None]], axis=0)
          for p, x in jtree.flatten_paths(stack).items()}
  res = _per_matrix(lambda x: subspace_alignment_ratio_matrix(x[:-1], x[-1], eps), both, layout, where)
  per = {p: v[0] for p, v in res.items()}
  rank = {p: v[1] for p, v in res.items()}
  allv = np.concatenate([v.reshape(-1, v.shape[-1]) for v in per.values()], axis=0)
  return {"per_layer": per, "rank": rank, "per_task": allv.mean(axis=0), "mean": float(allv.mean())}


# ---------------------------------------------------------------------------------------- CART I(k), R(k)


def cart_interference_matrix(x: Float[Array, "T m n"], ks: Sequence[int], centered: bool = True
                             ) -> tuple[jax.Array, jax.Array]:
  """CART's row-space interference and reconstruction error of one matrix for several ranks.

  ``I(k) = sum_{i != j} || diag(s~_i) V_i^T V_j diag(s~_j) ||_F`` with ``V_t`` the top-``k`` right (input-space)
  singular vectors of ``Dbar_t`` and ``s~_t = s_t[:k] / ||s_t[:k]||``; ``R(k) = sum_t sum_{i > k} s_t[i]^2``.

  Args:
    x: ``(T, m, n)`` task matrices.
    ks: ranks (static).
    centered: use ``Dbar_t = Delta_t - mean_s Delta_s`` (CART) or the plain task matrices.

  Returns:
    ``(I (K,), R (K,))``.

  References:
    Choi et al., "Revisiting Weight Averaging for Model Merging", 2024. https://arxiv.org/abs/2412.12153
  """
  return _cart_interference(jnp.asarray(x), tuple(int(k) for k in ks), bool(centered))


@functools.partial(jax.jit, static_argnames=("ks", "centered"))
def _cart_interference(x: jax.Array, ks: tuple[int, ...], centered: bool) -> tuple[jax.Array, jax.Array]:
  x = x.astype(jnp.float32)
  if centered:
    x = x - jnp.mean(x, axis=0, keepdims=True)
  _, s, vt = jax.vmap(_svd)(x)
  e = jnp.square(s)
  t, r = s.shape
  offdiag = 1.0 - jnp.eye(t, dtype=jnp.float32)
  inter, recon = [], []
  for k in ks:
    k = int(k)
    if not 0 <= k <= r:
      raise ValueError(f"rank {k} out of range [0, {r}]")
    if k == 0:
      inter.append(jnp.zeros((), jnp.float32))
      recon.append(jnp.sum(e))
      continue
    norm = jnp.sqrt(jnp.sum(e[:, :k], axis=1, keepdims=True))
    st = s[:, :k] / jnp.where(norm > 0, norm, 1.0)
    w = vt[:, :k, :] * st[:, :, None]  # (T, k, n): rows diag(s~_t) V_t^T
    gram = jnp.einsum("ikn,jln->ijkl", w, w, precision=_HI)
    inter.append(jnp.sum(offdiag * jnp.sqrt(jnp.sum(jnp.square(gram), axis=(2, 3)))))
    recon.append(jnp.sum(e[:, k:]))
  return jnp.stack(inter), jnp.stack(recon)


def cart_interference(
    task_vectors: Any, ks: Sequence[int], *, centered: bool = True, layout=jfilters.hf_layout, where=None
) -> dict[str, Any]:
  """CART's I(k) and R(k) per matrix leaf (ranks clipped to each matrix's ``min(m, n)``) and summed.

  Args:
    task_vectors: list or stack of task vectors.
    ks: the ranks ``k`` (``K`` of them).
    centered: measure on the centered task matrices ``Delta_t - mean_s Delta_s`` (CART) or the plain ones
      (see :func:`cart_interference_matrix`).
    layout, where: matrix view and selection.

  Returns:
    ``{"ks": (K,), "interference": {path: (B, K)}, "reconstruction": {path: (B, K)}, "interference_total": (K,),
    "reconstruction_total": (K,)}``.

  References:
    Choi et al., "Revisiting Weight Averaging for Model Merging", 2024. https://arxiv.org/abs/2412.12153
  """
  ks = [int(k) for k in ks]

  def fn(x):
    r = min(x.shape[1:])
    return cart_interference_matrix(x, [min(k, r) for k in ks], centered)

  res = _per_matrix(fn, _stack(task_vectors), layout, where)
  inter = {p: v[0] for p, v in res.items()}
  recon = {p: v[1] for p, v in res.items()}
  tot = lambda d: np.sum(np.concatenate([v.reshape(-1, len(ks)) for v in d.values()]), axis=0)  # noqa: E731
  return {"ks": np.asarray(ks), "interference": inter, "reconstruction": recon,
          "interference_total": tot(inter), "reconstruction_total": tot(recon)}


# --------------------------------------------------------------------------------- cosine and sign conflict


def _flat_rows(stack: Any, per_leaf: bool) -> dict[str, jax.Array]:
  flat = {p: x for p, x in jtree.flatten_paths(stack).items() if jtree.is_float(x)}
  rows = {p: jnp.reshape(jnp.asarray(x, jnp.float32), (np.shape(x)[0], -1)) for p, x in flat.items()}
  if per_leaf:
    return rows
  return {"all": jnp.concatenate(list(rows.values()), axis=1)}


def cosine_similarity(task_vectors: Any, *, per_leaf: bool = False) -> Any:
  """``T x T`` cosine similarities ``<tau_i, tau_j> / (||tau_i|| ||tau_j||)`` over all float leaves
  concatenated (default) or per leaf (``{path: T x T}``). Zero task vectors get similarity 0.

  Args:
    task_vectors: list or stack of task vectors.
    per_leaf: one matrix per float leaf instead of one over the whole model.

  Returns:
    A ``(T, T)`` NumPy array, or ``{path: (T, T)}`` with ``per_leaf=True``.

  References:
    Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023. https://arxiv.org/abs/2212.04089
  """

  def cos(x):
    g = jnp.matmul(x, x.T, precision=_HI)
    nrm = jnp.sqrt(jnp.diagonal(g))
    den = nrm[:, None] * nrm[None, :]
    return np.asarray(jnp.where(den > 0, g / jnp.where(den > 0, den, 1.0), 0.0))

  rows = _flat_rows(_stack(task_vectors), per_leaf)
  out = {p: cos(x) for p, x in rows.items()}
  return out if per_leaf else out["all"]


def _trim(x: jax.Array, density: float) -> jax.Array:
  """Keeps each task's top ``density`` fraction of entries by magnitude (``|x| >= k``-th largest)."""
  n = x.shape[1]
  keep = max(1, int(n * density))
  kth = jax.lax.top_k(jnp.abs(x), keep)[0][:, -1]  # k-th largest magnitude per task
  return jnp.where(jnp.abs(x) >= kth[:, None], x, 0.0)


def sign_conflict_rate(task_vectors: Any, *, density: float | None = None, per_leaf: bool = False) -> dict[str, Any]:
  """Sign conflicts between task vectors.

  ``rate = #{p : some tau_t[p] > 0 and some tau_s[p] < 0} / #{p : at least two tau_t[p] != 0}`` and the
  pairwise ``c_ij = #{p : tau_i[p] tau_j[p] < 0} / #{p : tau_i[p] != 0 and tau_j[p] != 0}`` (0 when the
  denominator is 0).

  Args:
    task_vectors: list or stack of task vectors.
    density: trim each task vector to its top ``density`` fraction by magnitude first (TIES's trim, per
      task over all leaves, or per leaf with ``per_leaf``); ``None`` keeps everything.
    per_leaf: also return per-leaf values.

  Returns:
    ``{"rate": float, "pairwise": (T, T)}``, plus ``"per_layer": {path: {"rate", "pairwise"}}`` with
    ``per_leaf``.

  References:
    Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023.
    https://arxiv.org/abs/2306.01708
  """

  def stats(x):
    if density is not None:
      x = _trim(x, density)
    pos = (x > 0).astype(jnp.float32)
    neg = (x < 0).astype(jnp.float32)
    nz = pos + neg
    multi = jnp.sum(nz, axis=0) >= 2
    conflict = jnp.logical_and(jnp.any(x > 0, axis=0), jnp.any(x < 0, axis=0))
    both = jnp.matmul(nz, nz.T, precision=_HI)
    opp = jnp.matmul(pos, neg.T, precision=_HI) + jnp.matmul(neg, pos.T, precision=_HI)
    pair = jnp.where(both > 0, opp / jnp.where(both > 0, both, 1.0), 0.0)
    rate = jnp.sum(conflict) / jnp.maximum(jnp.sum(multi), 1)
    return {"rate": float(rate), "pairwise": np.asarray(pair)}

  stack = _stack(task_vectors)
  out = stats(_flat_rows(stack, False)["all"])
  if per_leaf:
    out["per_layer"] = {p: stats(x) for p, x in _flat_rows(stack, True).items()}
  return out


# ------------------------------------------------------------------------------------------------ plotting


def plot_heatmap(matrix: Any, path: str, *, labels: Sequence[str] | None = None, title: str = "",
                 cmap: str = "viridis", annotate: bool = True) -> str:
  """Writes a PNG heat map of a 2-D array (e.g. :func:`cosine_similarity`, pairwise sign conflicts, per-layer
  metrics stacked as ``(layers, tasks)``). Returns ``path``.

  Args:
    matrix: a 2-D array ``(rows, cols)``.
    path: the PNG file to write.
    labels: tick labels (the first ``cols`` on the x axis, the first ``rows`` on the y axis).
    title: the plot title.
    cmap: a matplotlib colormap name.
    annotate: print each value in its cell (only for at most 400 cells).

  Returns:
    ``path``.

  Raises:
    ValueError: ``matrix`` is not 2-D.

  References:
    Task-vector similarity maps as in Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023.
    https://arxiv.org/abs/2212.04089
    Hunter, "Matplotlib: A 2D Graphics Environment", Computing in Science & Engineering 9(3), 2007.
    https://doi.org/10.1109/MCSE.2007.55
  """
  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  m = np.asarray(matrix, np.float64)
  if m.ndim != 2:
    raise ValueError(f"plot_heatmap needs a 2-D array, got shape {m.shape}")
  fig, ax = plt.subplots(figsize=(1.0 + 0.5 * m.shape[1], 1.0 + 0.5 * m.shape[0]), dpi=100)
  im = ax.imshow(m, cmap=cmap)
  fig.colorbar(im, ax=ax)
  if labels is not None:
    ax.set_xticks(range(m.shape[1]), labels[: m.shape[1]], rotation=45, ha="right")
    ax.set_yticks(range(m.shape[0]), labels[: m.shape[0]])
  if annotate and m.size <= 400:
    for (i, j), v in np.ndenumerate(m):
      ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w")
  ax.set_title(title)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path


def plot_curves(x: Sequence[float], curves: Mapping[str, Sequence[float]], path: str, *, xlabel: str = "",
                ylabel: str = "", title: str = "", logy: bool = False) -> str:
  """Writes a PNG line plot of several curves over ``x`` (e.g. I(k) and R(k) against k). Returns ``path``.

  Args:
    x: the ``N`` x values.
    curves: ``{legend label: N y values}``.
    path: the PNG file to write.
    xlabel, ylabel, title: axis labels and title.
    logy: logarithmic y axis.

  Returns:
    ``path``.

  Raises:
    ValueError: a curve whose length differs from ``len(x)``.

  References:
    Hunter, "Matplotlib: A 2D Graphics Environment", Computing in Science & Engineering 9(3), 2007.
    https://doi.org/10.1109/MCSE.2007.55
  """
  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
  for name, ys in curves.items():
    if len(ys) != len(x):
      raise ValueError(f"curve {name!r} has {len(ys)} points for {len(x)} x values")
    ax.plot(list(x), list(ys), marker="o", label=name)
  if logy:
    ax.set_yscale("log")
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path
