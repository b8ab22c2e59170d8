"""Task-preserving sparsification steps: magnitude trimming, random drops, MAGPRUNE, outlier masks.

All steps map ``(T, ...) -> (T, ...)``. Global steps (one threshold per task over all leaves) use the exact
radix select of :mod:`jaxmerge.stats`; random steps derive one key per leaf from its path
(:func:`jaxmerge.tree.leaf_key`), so results do not depend on how the tree is split or streamed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxmerge import filters as jfilters
from jaxmerge import stats
from jaxmerge import tree as jtree
from jaxmerge.base import TASK, EmptyCoeffs, MergeTransform, context_of, identified, require_key

__all__ = ["drop", "magprune", "outlier_mask", "rows_view", "trim"]


def _empty(tree):
  del tree
  return EmptyCoeffs()


def _check_fraction(name: str, value: float, low_open: bool = False) -> None:
  ok = (0 < value <= 1) if low_open else (0 <= value <= 1)
  if not ok:
    raise ValueError(f"{name} must be in {'(0, 1]' if low_open else '[0, 1]'}, got {value}")


def _bcast(v: jax.Array, x: jax.Array) -> jax.Array:
  return v.reshape((-1,) + (1,) * (x.ndim - 1))


def trim(density: float = 0.2, scope: str = "global", count: str = "reference") -> MergeTransform:
  """``(T, ...) -> (T, ...)``: keeps each task's top-``density`` entries by magnitude, zeroes the rest.

  Args:
    density: fraction kept, in ``[0, 1]``.
    scope: ``"global"``: one threshold per task over all leaves (the TIES reference, where a model is one
      flattened vector); ``"leaf"``: one threshold per task and leaf (mergekit's per-tensor rule; leafwise,
      so it can be streamed).

    count: ``"reference"``: the threshold is the ``(N - int(N * density))``-th smallest magnitude and entries
      ``>=`` it survive (FusionBench); ``"exact"``: entries ``>=`` the ``max(1, int(N * density))``-th largest
      magnitude survive (mergekit's count). Entries tied with that magnitude all survive; mergekit's
      ``torch.topk`` keeps exactly that many, breaking ties in an implementation-defined order, so on
      checkpoints with many tied magnitudes (bf16 task vectors) the two differ at the threshold only.

  Returns:
    A :class:`~jaxmerge.base.MergeTransform` (task-preserving, ``(T, ...) -> (T, ...)``).

  References:
    Yadav et al., "TIES-Merging", NeurIPS 2023. https://arxiv.org/abs/2306.01708
  """
  _check_fraction("density", density)
  if scope not in ("global", "leaf"):
    raise ValueError(f"scope must be 'global' or 'leaf', got {scope!r}")

  def apply(coeffs, tree, *, key=None, ctx=None):
    del coeffs, key, ctx
    if density >= 1:
      return tree
    if scope == "global":
      if not jax.tree.leaves(tree):
        return tree
      thr = stats.global_thresholds(tree, density, count)
      return jax.tree.map(lambda x: jnp.where(jnp.abs(x) >= _bcast(thr, x), x, 0), tree)

    def leaf(x):
      thr = stats.leaf_thresholds(x, density, count)
      return jnp.where(jnp.abs(x) >= _bcast(thr, x), x, 0)

    return jax.tree.map(leaf, tree)

  return identified(_empty, apply, TASK, "trim", float(density), scope, count)


def drop(p: float = 0.5, rescale: bool | str = True) -> MergeTransform:
  """``(T, ...) -> (T, ...)``: DARE's random drop: zero each entry with probability ``p``, rescale the rest
  by ``1 / (1 - p)`` (``rescale=True``), or so that each task's tensor keeps its L1 norm (``rescale="l1"``,
  mergekit's rule), or not at all (``False``).

  An entry survives when ``u >= p`` with ``u ~ U[0, 1)``, so ``p = 0`` keeps everything deterministically;
  ``p = 1`` returns zeros. Needs a key.

  Args:
    p: drop probability, in ``[0, 1]``.
    rescale: ``True``, ``"l1"`` or ``False`` (see above).

  Returns:
    A :class:`~jaxmerge.base.MergeTransform` (task-preserving, ``(T, ...) -> (T, ...)``).

  References:
    Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free
    Lunch", ICML 2024. https://arxiv.org/abs/2311.03099
  """
  _check_fraction("p", p)

  def apply(coeffs, tree, *, key=None, ctx=None):
    del coeffs, ctx
    key = require_key(key, "DARE's drop")

    def leaf(path, x):
      if p >= 1:
        return jnp.zeros_like(x)
      u = jtree.leaf_uniform(key, path, x.shape)
      kept = jnp.where(u >= p, x, 0)
      if rescale == "l1":
        return _l1_rescale(x, kept)
      return kept / (1 - p) if rescale else kept

    return jtree.map_with_path(leaf, tree)

  return identified(_empty, apply, TASK, "drop", float(p), rescale, needs_key=True)


def _l1_rescale(x: jax.Array, kept: jax.Array, eps: float = 1e-7) -> jax.Array:
  """Rescales each task's ``kept`` so its L1 norm matches ``x``'s (skipped below ``eps``, as mergekit)."""
  before = jnp.sum(jnp.abs(x).reshape(x.shape[0], -1), axis=1)
  after = jnp.sum(jnp.abs(kept).reshape(x.shape[0], -1), axis=1)
  ok = (before >= eps) & (after >= eps)
  factor = jnp.where(ok, before / jnp.where(ok, after, 1.0), 1.0)
  return kept * _bcast(factor, x)


def rows_view(path: str, x: jax.Array, layout) -> tuple[jax.Array, callable]:
  """A stacked leaf as rows of its canonical ``(out, in)`` view: ``(T, R, n)`` and the inverse map.

  Matrix leaves (per the layout) give one row per output unit (a batch axis is folded into rows); other
  leaves of rank >= 1 are one row; scalars are one row of length 1.
  """
  spec = layout(path, jfilters.per_task_struct(x))
  if spec is None:
    y = x.reshape(x.shape[0], 1, -1)
    return y, lambda r: r.reshape(x.shape)
  m = jfilters.to_matrix(x, spec, batch_dims=1)  # (T, B, out, in)
  y = m.reshape(m.shape[0], -1, m.shape[-1])
  return y, lambda r: jfilters.from_matrix(r.reshape(m.shape), spec, x.shape, batch_dims=1)


def _ascending_ranks(a: jax.Array) -> jax.Array:
  """0-based ascending ranks along the last axis (stable)."""
  return jnp.argsort(jnp.argsort(a, axis=-1, stable=True), axis=-1, stable=True)


def magprune(p: float = 0.3, window: float = 0.14, rescale: bool = True) -> MergeTransform:
  """``(T, ...) -> (T, ...)``: DELLA's MAGPRUNE: drop with probabilities that fall with magnitude rank.

  Within each row of each task's canonical ``(out, in)`` view (1-D leaves are one row), entries are ranked by
  magnitude and the normalized rank ``rn in [0, 1]`` sets the keep probability
  ``q = (1 - p) - window + 2 * window * rn`` (drop probabilities span ``p +- window``: ``window`` is the
  half-width, as in the reference code). An entry survives when ``u >= 1 - q`` and is rescaled by ``1 / q``
  (``rescale=True``). With ``window = 0`` this equals :func:`drop` with the same key.

  Args:
    p: mean drop probability.
    window: half-width of the drop probabilities around ``p``.
    rescale: rescale survivors by ``1 / q``.

  Returns:
    A :class:`~jaxmerge.base.MergeTransform` (task-preserving, ``(T, ...) -> (T, ...)``).

  References:
    Deep et al., "DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based Sampling",
    2024. https://arxiv.org/abs/2406.11617
  """
  _check_fraction("p", p)
  if window < 0 or (window > 0 and not (0 < (1 - p) - window and (1 - p) + window <= 1)):
    raise ValueError(f"window must keep (1 - p) +- window inside (0, 1]; got p={p}, window={window}")

  def apply(coeffs, tree, *, key=None, ctx=None):
    del coeffs
    key = require_key(key, "DELLA's MAGPRUNE")
    ctx = context_of(ctx)

    def leaf(path, x):
      u = jtree.leaf_uniform(key, path, x.shape)
      rows, back = rows_view(path, x, ctx.layout)
      n = rows.shape[-1]
      rn = _ascending_ranks(jnp.abs(rows)).astype(jnp.float32) / max(n - 1, 1)
      q = back((1 - p) - window + 2 * window * rn)
      kept = jnp.where(u >= 1 - q, x, 0)
      return kept / q if rescale else kept

    return jtree.map_with_path(leaf, tree)

  return identified(_empty, apply, TASK, "magprune", p, window, rescale, needs_key=True)


def outlier_mask(density: float = 0.85, gamma: float = 0.006, granularity: str = "row") -> MergeTransform:
  """``(T, ...) -> (T, ...)``: Model Breadcrumbs' mask: drop the top ``gamma`` fraction by magnitude, keep
  the next ``density`` fraction, drop the rest.

  Counts are ``int(gamma * n)`` and ``int(density * n)`` per row of the canonical ``(out, in)`` view
  (``granularity="row"``, the reference) or per tensor (``"tensor"``, mergekit). Leaves with fewer than two
  entries pass through.

  Args:
    density: fraction kept after the outliers.
    gamma: fraction of largest magnitudes dropped.
    granularity: ``"row"`` or ``"tensor"``.

  Returns:
    A :class:`~jaxmerge.base.MergeTransform` (task-preserving, ``(T, ...) -> (T, ...)``).

  References:
    Davari and Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks",
    ECCV 2024. https://arxiv.org/abs/2312.06795
  """
  _check_fraction("density", density)
  _check_fraction("gamma", gamma)
  if granularity not in ("row", "tensor"):
    raise ValueError(f"granularity must be 'row' or 'tensor', got {granularity!r}")

  def apply(coeffs, tree, *, key=None, ctx=None):
    del coeffs, key
    ctx = context_of(ctx)

    def leaf(path, x):
      if x[0].size < 2:
        return x
      if granularity == "row":
        rows, back = rows_view(path, x, ctx.layout)
      else:
        rows, back = x.reshape(x.shape[0], 1, -1), (lambda r: r.reshape(x.shape))
      n = rows.shape[-1]
      n_top, n_keep = int(gamma * n), int(density * n)
      desc = n - 1 - _ascending_ranks(jnp.abs(rows))
      keep = (desc >= n_top) & (desc < n_top + n_keep)
      return jnp.where(back(keep), x, 0)

    return jtree.map_with_path(leaf, tree)

  return identified(_empty, apply, TASK, "outlier_mask", density, gamma, granularity)
