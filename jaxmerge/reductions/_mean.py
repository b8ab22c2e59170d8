"""Reductions over the task axis: sums, means, and TIES's sign election with disjoint merging."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxmerge import stats
from jaxmerge.base import REDUCE, EmptyCoeffs, MergeTransform, identified
from jaxmerge.tree import global_sum, on_mesh, task_mean, task_sum, unshared

__all__ = ["disjoint_merge", "disjoint_rows", "elect", "elected_sign", "mean_tasks", "sum_tasks", "ties_merge",
           "weighted_sum"]


def _empty(tree):
  del tree
  return EmptyCoeffs()


def sum_tasks() -> MergeTransform:
  """``(T, ...) -> (...)``: the sum of the task vectors (task arithmetic's multi-task vector).

  Returns:
    A :class:`~jaxmerge.base.MergeTransform` (a reduction, ``(T, ...) -> (...)``).

  References:
    Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023. https://arxiv.org/abs/2212.04089
  """

  def apply(coeffs, tree, *, key=None, ctx=None):
    del coeffs, key, ctx
    return jax.tree.map(task_sum, tree)

  return identified(_empty, apply, REDUCE, "sum_tasks")


def mean_tasks() -> MergeTransform:
  """``(T, ...) -> (...)``: the mean of the task vectors (simple averaging, model soups).

  Returns:
    A :class:`~jaxmerge.base.MergeTransform` (a reduction, ``(T, ...) -> (...)``).

  References:
    Wortsman et al., "Model soups", ICML 2022. https://arxiv.org/abs/2203.05482
  """

  def apply(coeffs, tree, *, key=None, ctx=None):
    del coeffs, key, ctx
    return jax.tree.map(task_mean, tree)

  return identified(_empty, apply, REDUCE, "mean_tasks")


def weighted_sum(weights) -> MergeTransform:
  """``(T, ...) -> (...)``: ``sum_t w_t tau_t`` with per-task weights ``w`` of shape ``(T,)`` (coefficients).

  Args:
    weights: a sequence of ``T`` floats; kept as traced coefficients.

  Returns:
    A :class:`~jaxmerge.base.MergeTransform` (a reduction, ``(T, ...) -> (...)``).

  References:
    Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023. https://arxiv.org/abs/2212.04089
    Yang et al., "AdaMerging: Adaptive Model Merging for Multi-Task Learning", ICLR 2024.
    https://arxiv.org/abs/2310.02575
    (task-wise coefficients).
  """
  w0 = jnp.asarray(weights, jnp.float32)

  def init(tree):
    del tree
    return {"weights": w0}

  def apply(coeffs, tree, *, key=None, ctx=None):
    del key, ctx
    w = coeffs["weights"]
    return jax.tree.map(lambda x: task_sum(x, w), tree)

  return identified(init, apply, REDUCE, "weighted_sum", weights)


def elected_sign(tree, scope: str = "global"):
  """TIES's sign election: ``sgn(sum_t tau_t)`` per entry; zeros take the majority sign.

  The majority sign is ``sgn`` of the sum of all elected signs over the whole tree (``scope="global"``, the
  reference's rule, where the model is one flattened vector) or over each leaf (``scope="leaf"``).

  Args:
    tree: a stack of task vectors ``(T, ...)``.
    scope: ``"global"`` or ``"leaf"`` (see above).

  Returns:
    A tree of ``(...)`` signs in ``{-1, 0, +1}``.

  References:
    Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023.
    https://arxiv.org/abs/2306.01708
  """
  if scope == "global":
    signs = jax.tree.map(lambda x: jnp.sign(task_sum(x)), tree)
    majority = _majority(signs)
    return jax.tree.map(lambda s: jnp.where(s == 0, majority, s), signs)
  if scope == "leaf":
    return jax.tree.map(lambda x: _with_majority(jnp.sign(task_sum(x))), tree)
  raise ValueError(f"scope must be 'global' or 'leaf', got {scope!r}")


def _disjoint(x: jax.Array, s: jax.Array, merge_func: str) -> jax.Array:
  """The disjoint merge of a stacked leaf ``(T, ...)`` under elected signs ``s``."""
  return disjoint_rows(x if on_mesh() else [x[i] for i in range(x.shape[0])], s, merge_func)


def disjoint_rows(rows: list[jax.Array] | jax.Array, s: jax.Array, merge_func: str) -> jax.Array:
  """TIES's disjoint merge of one leaf: the entries whose sign agrees with ``s``, summed, averaged over the
  agreeing nonzero entries, or the largest agreeing magnitude with sign ``s``. The one rule of every XLA backend
  (in memory, streamed, sharded).

  Args:
    rows: the leaf's ``T`` task slices (a list: XLA then fuses the whole merge into one pass over the task
      vectors), or the stacked ``(T, ...)`` leaf (under a device mesh: reductions along the task axis).
    s: the elected signs, the leaf's shape without the task axis.
    merge_func: ``"sum"``, ``"mean"`` or ``"max"``.

  Returns:
    The merged leaf.

  References:
    Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023.
    https://arxiv.org/abs/2306.01708
  """
  if not isinstance(rows, list):  # a stacked (T, ...) leaf under a device mesh: reductions along the task axis
    sel = jnp.where(jnp.where(s > 0, rows > 0, rows < 0), rows, 0)
    if merge_func == "sum":
      return jnp.sum(sel, axis=0)
    if merge_func == "mean":
      return jnp.sum(sel, axis=0) / jnp.maximum(jnp.sum((sel != 0).astype(sel.dtype), axis=0), 1)
    return jnp.max(jnp.abs(sel), axis=0) * s
  sel = [jnp.where(jnp.where(s > 0, x > 0, x < 0), x, 0) for x in rows]
  if merge_func == "sum":
    return functools.reduce(jnp.add, sel)
  if merge_func == "mean":
    count = functools.reduce(jnp.add, [(v != 0).astype(v.dtype) for v in sel])
    return functools.reduce(jnp.add, sel) / jnp.maximum(count, 1)
  return functools.reduce(jnp.maximum, [jnp.abs(v) for v in sel]) * s


def ties_merge(
    density: float = 0.2, merge_func: str = "sum", count: str = "reference", zero_sign: str = "majority"
) -> MergeTransform:
  """``(T, ...) -> (...)``: TIES with one global threshold per task, fused: trim, elect, disjoint merge.

  Equivalent to ``chain(trim(density, "global", count), disjoint_merge(merge_func, "global", zero_sign))``,
  computed on one ``(T, N)`` view of the whole model (one concatenation, one split), which compiles and runs
  faster than the two steps apart.

  Args:
    density: fraction of each task's entries kept.
    merge_func: ``"sum"``, ``"mean"`` or ``"max"`` (see :func:`disjoint_merge`).
    count: ``"reference"`` or ``"exact"`` (see :func:`jaxmerge.transforms.trim`).
    zero_sign: ``"majority"`` or ``"positive"`` (see :func:`disjoint_merge`).

  Returns:
    A :class:`~jaxmerge.base.MergeTransform` (a reduction, ``(T, ...) -> (...)``).

  References:
    Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023.
    https://arxiv.org/abs/2306.01708
  """
  if merge_func not in ("sum", "mean", "max"):
    raise ValueError(f"merge_func must be one of 'sum', 'mean', 'max'; got {merge_func!r}")
  if zero_sign not in ("majority", "positive"):
    raise ValueError(f"zero_sign must be 'majority' or 'positive', got {zero_sign!r}")

  def apply(coeffs, tree, *, key=None, ctx=None):
    del coeffs, key, ctx
    if not jax.tree.leaves(tree):
      return tree
    # Whole-model scalars (thresholds, majority sign) from one (T, N) view; everything else leaf by leaf, so
    # equal-shape leaves share one compiled kernel (see jaxmerge.tree.concat_tasks).
    thr = thr2 = None
    if density < 1:
      thr = stats.global_thresholds(tree, density, count)
      thr2 = unshared(thr)  # the second pass's thresholds (see the passes below)

    def rows(x, v):
      """The trimmed task vectors of one leaf, task by task: ``T`` arrays of the leaf's shape. Elementwise
      expressions on slices, so that XLA fuses the trim into each pass instead of storing a (T, ...) stack."""
      if on_mesh():  # one stacked array: task slices of a task-sharded leaf would move between devices
        return x if v is None else jnp.where(jnp.abs(x) >= _per_task(v, x), x, 0)
      if v is None:
        return [x[i] for i in range(x.shape[0])]
      return [jnp.where(jnp.abs(x[i]) >= v[i], x[i], 0) for i in range(x.shape[0])]

    def elect_rows(r, majority=None):
      return elect(functools.reduce(jnp.add, r) if isinstance(r, list) else jnp.sum(r, axis=0), zero_sign, majority)

    # Two passes read the task vectors: the first elects signs for the majority sign (a whole-model scalar),
    # the second trims and elects again, then merges: rereading the task vectors costs what reading a stored
    # trimmed stack would, without its T x N scratch memory.
    majority = None
    if zero_sign == "majority":
      majority = _majority(jax.tree.map(lambda x: elect_rows(rows(x, thr)), tree))

    def merge_leaf(x):
      r = rows(x, thr2)
      return disjoint_rows(r, elect_rows(r, majority), merge_func)

    return jax.tree.map(merge_leaf, tree)

  return identified(_empty, apply, REDUCE, "ties_merge", float(density), merge_func, count, zero_sign)


def elect(total: jax.Array, zero_sign: str, majority: jax.Array | None = None) -> jax.Array:
  """TIES's elected sign of one leaf from the sum of its (trimmed) task vectors (the one rule of every XLA backend).

  Args:
    total: the sum over tasks of the leaf's (trimmed) task vectors.
    zero_sign: ``"majority"``: ``sgn(total)``, zero sums take ``majority`` (left at 0 when it is ``None``);
      ``"positive"`` (mergekit): ``+1`` unless the sum is negative.
    majority: the whole model's majority sign, or ``None``.

  Returns:
    The elected signs, ``total``'s shape.

  References:
    Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023.
    https://arxiv.org/abs/2306.01708
  """
  if zero_sign == "positive":
    return jnp.where(total >= 0, 1.0, -1.0).astype(total.dtype)
  s = jnp.sign(total)
  return s if majority is None else jnp.where(s == 0, majority, s)


def _with_majority(s: jax.Array) -> jax.Array:
  return jnp.where(s == 0, jnp.sign(jnp.sum(s)), s)


def _majority(signs) -> jax.Array:
  """``sgn`` of the sum of every elected sign of the tree (the whole model's majority sign).

  Each leaf's signs are summed as integers (exact; and on CPU XLA then fuses the election into the sum
  instead of storing every task's trimmed vector for a float reduction)."""
  def count(s):
    return jnp.sum(s.astype(jnp.int32)).astype(jnp.float32) if s.size < 2**31 else jnp.sum(s)

  return jnp.sign(global_sum([count(s) for s in jax.tree.leaves(signs)]))


def _per_task(v: jax.Array, x: jax.Array) -> jax.Array:
  """A ``(T,)`` vector shaped to broadcast against a ``(T, ...)`` leaf."""
  return v.reshape((-1,) + (1,) * (x.ndim - 1))


def disjoint_merge(merge_func: str = "sum", sign_scope: str = "global", zero_sign: str = "majority") -> MergeTransform:
  """``(T, ...) -> (...)``: elect a sign per entry, keep only the entries that agree with it, and reduce.

  Args:
    merge_func: ``"sum"`` (FusionBench's default), ``"mean"`` (the paper: mean over the agreeing nonzero
      entries) or ``"max"`` (largest agreeing magnitude, with the elected sign).
    sign_scope: where zero elected signs take the majority sign from (see :func:`elected_sign`).
    zero_sign: ``"majority"`` (FusionBench: zero sums take the majority sign) or ``"positive"`` (mergekit:
      a zero sum elects ``+``, and only entries whose sign equals the elected sign count).

  Returns:
    A :class:`~jaxmerge.base.MergeTransform` (a reduction, ``(T, ...) -> (...)``).

  References:
    Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023.
    https://arxiv.org/abs/2306.01708
  """
  if merge_func not in ("sum", "mean", "max"):
    raise ValueError(f"merge_func must be one of 'sum', 'mean', 'max'; got {merge_func!r}")
  if zero_sign not in ("majority", "positive"):
    raise ValueError(f"zero_sign must be 'majority' or 'positive', got {zero_sign!r}")

  leaf = functools.partial(_disjoint, merge_func=merge_func)

  def apply(coeffs, tree, *, key=None, ctx=None):
    del coeffs, key, ctx
    if zero_sign == "positive":
      return jax.tree.map(lambda x: leaf(x, elect(task_sum(x), zero_sign)), tree)
    if sign_scope == "leaf":
      return jax.tree.map(lambda x: leaf(x, _with_majority(jnp.sign(task_sum(x)))), tree)
    if not jax.tree.leaves(tree):
      return tree
    # One global majority sign (a scalar over the whole model), then leaf by leaf.
    signs = jax.tree.map(lambda x: jnp.sign(task_sum(x)), tree)
    majority = _majority(signs)
    return jax.tree.map(lambda x, s: leaf(x, jnp.where(s == 0, majority, s)), tree, signs)

  return identified(_empty, apply, REDUCE, "disjoint_merge", merge_func, sign_scope, zero_sign)
