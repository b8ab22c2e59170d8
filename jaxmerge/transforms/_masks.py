"""Mask-based methods: TALL masks and Consensus, EMR, Localize-and-Stitch (data-free), BYOM-FFT and PCB.

Methods that keep one model per task (TALL, EMR, BYOM) are *task-preserving* transforms whose output
``(T, ...)`` is each task's reconstructed task vector; :func:`jaxmerge.merge_per_task` turns them into ``T``
models. Their compressed storage (masks, scalars, sparse residuals) is what the per-task output is computed
from.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jaxmerge import stats
from jaxmerge.base import REDUCE, TASK, EmptyCoeffs, MergeTransform, identified
from jaxmerge.tree import concat_tasks, task_max, task_sum

__all__ = [
    "byom_residuals",
    "consensus_mask",
    "emr_modulate",
    "emr_parts",
    "emr_rescaled",
    "emr_terms",
    "emr_unified",
    "pcb_reduce",
    "stitch",
    "tall_masks",
]


def _empty(tree):
  del tree
  return EmptyCoeffs()


def _bcast(v: jax.Array, x: jax.Array) -> jax.Array:
  return v.reshape((-1,) + (1,) * (x.ndim - 1))


def _lambdas(tall_lambda: float | Sequence[float], t: int) -> jax.Array:
  lam = jnp.asarray(tall_lambda, jnp.float32)
  if lam.ndim == 1 and lam.shape[0] != t:
    raise ValueError(f"tall_lambda has {lam.shape[0]} entries for {t} tasks")
  return jnp.broadcast_to(lam, (t,))


def tall_mask_of(x: jax.Array, mtv: jax.Array, lam: jax.Array, strict: bool) -> jax.Array:
  """TALL mask ``|tau_t| > lambda_t |tau_MTL - tau_t|`` (``>=`` with ``strict=False``) for a stacked leaf.

  Args:
    x: the leaf's task vectors ``(T, ...)``.
    mtv: the multi-task vector (their sum), the leaf's shape.
    lam: ``lambda_t``, ``(T,)``.
    strict: ``>`` (else ``>=``).

  Returns:
    The boolean masks ``(T, ...)``.

  References:
    Wang et al., "Localizing Task Information for Improved Model Merging and Compression", ICML 2024.
    https://arxiv.org/abs/2405.07813
  """
  lhs, rhs = jnp.abs(x), _bcast(lam, x) * jnp.abs(mtv[None] - x)
  return lhs > rhs if strict else lhs >= rhs


def tall_masks(tall_lambda: float | Sequence[float] = 0.6, strict: bool = True) -> MergeTransform:
  """``(T, ...) -> (T, ...)``: each task's TALL reconstruction ``m_t * tau_MTL`` with ``tau_MTL = sum_t tau_t``.

  Args:
    tall_lambda: ``lambda_t``, one value or one per task.
    strict: use ``>`` (the reference code) or ``>=`` (the survey) in the mask.

  Returns:
    A :class:`~jaxmerge.base.MergeTransform` (task-preserving, ``(T, ...) -> (T, ...)``).

  References:
    Wang et al., "Localizing Task Information for Improved Model Merging and Compression", ICML 2024.
    https://arxiv.org/abs/2405.07813
  """

  def apply(coeffs, tree, *, key=None, ctx=None):
    del coeffs, key, ctx

    def leaf(x):
      mtv = task_sum(x)
      m = tall_mask_of(x, mtv, _lambdas(tall_lambda, x.shape[0]), strict)
      return jnp.where(m, mtv[None], 0)

    return jax.tree.map(leaf, tree)

  return identified(_empty, apply, TASK, "tall_masks", tall_lambda, strict)


def consensus_mask(k: int = 2, tall_lambda: float | Sequence[float] = 0.6, strict: bool = True) -> MergeTransform:
  """``(T, ...) -> (T, ...)``: zeroes the entries that fewer than ``k`` tasks' TALL masks claim.

  The TALL masks are computed against ``tau_MTL = sum_t tau_t``; the output keeps every task's entries where
  ``sum_t m_t >= k`` (so ``k = 0`` changes nothing), ready for any reduction (TA's sum, TIES).

  Args:
    k: minimum number of tasks whose TALL mask must claim an entry.
    tall_lambda: TALL's ``lambda_t``, one value or one per task.
    strict: ``>`` (the reference code) or ``>=`` in the TALL mask.

  Returns:
    A :class:`~jaxmerge.base.MergeTransform` (task-preserving, ``(T, ...) -> (T, ...)``).

  References:
    Wang et al., "Localizing Task Information for Improved Model Merging and Compression", ICML 2024.
    https://arxiv.org/abs/2405.07813
  """

  def apply(coeffs, tree, *, key=None, ctx=None):
    del coeffs, key, ctx

    def leaf(x):
      if k > x.shape[0]:
        raise ValueError(f"consensus needs k <= the number of tasks ({x.shape[0]}), got k={k}: no entry could be "
                         "kept, the result would be the pretrained model")
      mtv = task_sum(x)
      m = tall_mask_of(x, mtv, _lambdas(tall_lambda, x.shape[0]), strict)
      keep = task_sum(m.astype(jnp.int32)) >= k
      return jnp.where(keep[None], x, 0)

    return jax.tree.map(leaf, tree)

  return identified(_empty, apply, TASK, "consensus_mask", k, tall_lambda, strict)


def emr_parts(tree):
  """EMR's unified task vector and per-task sign masks (the rule of the in-memory and streamed merges).

  Args:
    tree: a stack of task vectors ``(T, ...)``.

  Returns:
    ``(unified tree (...), masks tree (T, ...) of booleans)``.

  References:
    Huang et al., "EMR-Merging: Tuning-Free High-Performance Model Merging", NeurIPS 2024.
    https://arxiv.org/abs/2405.17461
  """
  flags = jax.tree.map(lambda x: jnp.where(task_sum(x) > 0, 1.0, -1.0).astype(x.dtype), tree)
  masks = jax.tree.map(lambda x, f: x * f[None] > 0, tree, flags)
  uni = jax.tree.map(lambda x, m, f: task_max(jnp.where(m, jnp.abs(x), 0)) * f, tree, masks, flags)
  return uni, masks


def emr_terms(x, uni, mask, rescaler: str):
  """One leaf's contributions ``(A_t, B_t)`` to EMR's rescalers; ``lambda_t = sum A_t / sum B_t`` over leaves.

  Args:
    x: the leaf's task vectors ``(T, ...)``.
    uni: its unified vector (:func:`emr_parts`).
    mask: its masks ``(T, ...)``.
    rescaler: ``"reference"`` (per-task means of ``|tau_t|`` and ``|M_t * tau_uni|``) or ``"global"`` (sums).

  Returns:
    ``(A, B)``, each ``(T,)``.

  References:
    Huang et al., "EMR-Merging: Tuning-Free High-Performance Model Merging", NeurIPS 2024.
    https://arxiv.org/abs/2405.17461
  """
  def red(v):
    a = jnp.abs(v.reshape(v.shape[0], -1))
    return jnp.mean(a, axis=1) if rescaler == "reference" else jnp.sum(a, axis=1)

  return red(x), red(jnp.where(mask, uni[None], 0))


def emr_rescaled(tree, rescaler: str):
  """EMR's unified vector, masks and per-task rescalers.

  Args:
    tree: a stack of task vectors ``(T, ...)``.
    rescaler: as :func:`emr_terms`.

  Returns:
    ``(unified, masks, lambda (T,))``, ``lambda`` 0 where ``B_t = 0``.

  References:
    Huang et al., "EMR-Merging: Tuning-Free High-Performance Model Merging", NeurIPS 2024.
    https://arxiv.org/abs/2405.17461
  """
  uni, masks = emr_parts(tree)
  terms = [emr_terms(x, u, m, rescaler)
           for x, u, m in zip(jax.tree.leaves(tree), jax.tree.leaves(uni), jax.tree.leaves(masks))]
  a = sum(t[0] for t in terms)
  b = sum(t[1] for t in terms)
  return uni, masks, jnp.where(b > 0, a / jnp.where(b > 0, b, 1.0), 0.0)


def emr_unified() -> MergeTransform:
  """``(T, ...) -> (...)``: EMR's unified task vector ``sgn * max_{agreeing t} |tau_t|`` (zero sums count as
  negative, the reference rule).

  Returns:
    A :class:`~jaxmerge.base.MergeTransform` (a reduction, ``(T, ...) -> (...)``).

  References:
    Huang et al., "EMR-Merging: Tuning-Free High-Performance Model Merging", NeurIPS 2024.
    https://arxiv.org/abs/2405.17461
  """

  def apply(coeffs, tree, *, key=None, ctx=None):
    del coeffs, key, ctx
    return emr_parts(tree)[0]

  return identified(_empty, apply, REDUCE, "emr_unified")


def emr_modulate(rescaler: str = "reference") -> MergeTransform:
  """``(T, ...) -> (T, ...)``: each task's EMR model ``lambda_t (M_t * tau_uni)``.

  ``M_t = (tau_t * tau_uni > 0)``; ``lambda_t = A_t / B_t`` with ``A_t`` the mean absolute value of
  ``tau_t`` and ``B_t`` that of ``M_t * tau_uni``, summed over leaves of per-leaf means
  (``rescaler="reference"``) or taken over the whole model (``"global"``, the survey's formula).

  Args:
    rescaler: ``"reference"`` or ``"global"`` (see above).

  Returns:
    A :class:`~jaxmerge.base.MergeTransform` (task-preserving, ``(T, ...) -> (T, ...)``).

  References:
    Huang et al., "EMR-Merging: Tuning-Free High-Performance Model Merging", NeurIPS 2024.
    https://arxiv.org/abs/2405.17461
  """
  if rescaler not in ("reference", "global"):
    raise ValueError(f"rescaler must be 'reference' or 'global', got {rescaler!r}")

  def apply(coeffs, tree, *, key=None, ctx=None):
    del coeffs, key, ctx
    uni, masks, lam = emr_rescaled(tree, rescaler)
    return jax.tree.map(lambda m, u: jnp.where(m, u[None], 0) * _bcast(lam, m), masks, uni)

  return identified(_empty, apply, TASK, "emr_modulate", rescaler)


def stitch(density: float = 0.1) -> MergeTransform:
  """``(T, ...) -> (...)``: Localize-and-Stitch, data-free: each task keeps the entries whose magnitude is
  strictly above its ``k``-th largest over the whole model (``k = int(N * density)``; exact zeros are never
  kept; ``density >= 1`` keeps every nonzero entry), and overlapping entries are averaged over the tasks that
  claim them (the reference code's rule).

  Args:
    density: fraction of each task's entries kept.

  Returns:
    A :class:`~jaxmerge.base.MergeTransform` (a reduction, ``(T, ...) -> (...)``).

  References:
    He et al., "Localize-and-Stitch: Efficient Model Merging via Sparse Task Arithmetic", TMLR 2025.
    https://arxiv.org/abs/2408.13656
  """

  def apply(coeffs, tree, *, key=None, ctx=None):
    del coeffs, key, ctx
    if not jax.tree.leaves(tree):
      return tree
    n = sum(int(x[0].size) for x in jax.tree.leaves(tree))
    k = int(n * density)
    if k <= 0:
      return jax.tree.map(lambda x: jnp.zeros(x.shape[1:], x.dtype), tree)
    if density >= 1:  # an all-ones mask: every nonzero entry
      def mask(x):
        return (x != 0).astype(x.dtype)
    else:
      # Whole-model thresholds from one (T, N) view, then leaf by leaf (see jaxmerge.tree.concat_tasks).
      a = jnp.abs(concat_tasks(tree))
      thr = jnp.stack([stats.kth_smallest([a[i]], n - k + 1) for i in range(a.shape[0])])

      def mask(x):
        return ((jnp.abs(x) > thr.reshape((-1,) + (1,) * (x.ndim - 1))) & (x != 0)).astype(x.dtype)

    def leaf(x):
      m = mask(x)
      return task_sum(m * x) / jnp.maximum(task_sum(m), 1.0)

    return jax.tree.map(leaf, tree)

  return identified(_empty, apply, REDUCE, "stitch", density)


def byom_residuals(density: float = 0.1, scale: float = 0.3) -> MergeTransform:
  """``(T, ...) -> (T, ...)``: BYOM-FFT's task models: the shared ``scale * sum_t tau_t`` plus each task's
  residual ``tau_t - shared`` trimmed to its top-``density`` magnitudes over the whole model.

  Args:
    density: fraction of each residual kept (over the whole model).
    scale: factor of the shared task vector sum.

  Returns:
    A :class:`~jaxmerge.base.MergeTransform` (task-preserving, ``(T, ...) -> (T, ...)``).

  References:
    Jiang et al., "BYOM: Building Your Own Multi-Task Model For Free", 2023. https://arxiv.org/abs/2310.01886
  """

  def apply(coeffs, tree, *, key=None, ctx=None):
    del coeffs, key, ctx
    if not jax.tree.leaves(tree):
      return tree
    def resid(x):
      return x - scale * task_sum(x)[None]

    thr = stats.task_thresholds([concat_tasks(jax.tree.map(resid, tree))], density)

    def leaf(x):
      shared = scale * task_sum(x)
      r = x - shared[None]
      return shared[None] + jnp.where(jnp.abs(r) >= thr.reshape((-1,) + (1,) * (x.ndim - 1)), r, 0)

    return jax.tree.map(leaf, tree)

  return identified(_empty, apply, TASK, "byom_residuals", density, scale)


def _minmax(v: jax.Array, lo: jax.Array, hi: jax.Array) -> jax.Array:
  """``(v - lo) / (hi - lo)``, and 0 where ``hi == lo`` (no spread, e.g. an expert equal to the base: PCB's
  reference divides by zero there and returns NaN)."""
  spread = hi > lo
  return jnp.where(spread, (v - lo) / jnp.where(spread, hi - lo, 1), 0)


def pcb_reduce(
    ratio: float = 0.05,
    scales: float | Sequence[float] = 1.2,
    clamp_ratio: float = 0.01,
    inter: str = "signed_minmax",
) -> MergeTransform:
  """``(T, ...) -> (...)``: PCB-Merging's competition-balanced merge (reference vision code form).

  Over each task's flattened vector ``x_t`` (length ``d``): magnitudes are clamped to their order statistics
  ``[int(d * c), int(d * (1 - c)) - 1]`` (``c = clamp_ratio``) giving ``A_t`` and the clamped vector
  ``x'_t = sgn(x_t) A_t``; intra-balancing ``exp(T * minmax(A_t)^2)``; inter-balancing
  ``tanh(x_t * sum_s sgn(x_s) minmax(A_s))`` (``inter="signed_minmax"``, the vision code) or
  ``tanh(x_t * sum_s x_s)`` (``"raw"``, the generic helper); their product is clamped from below at its
  ``int(d (1 - ratio))``-th order statistic and min-max normalized, so only about the top ``ratio`` keep a
  nonzero score ``b_t``; the result is ``sum_t lambda_t b_t x'_t / max(sum_t b_t, 1e-12)``. A min-max without
  spread (a task vector of zeros, an expert equal to the base, a constant one) gives 0 instead of the
  reference's NaN: such a task contributes nothing.

  Args:
    ratio: fraction of entries kept with a nonzero score.
    scales: ``lambda_t``, one value or one per task.
    clamp_ratio: ``c``, the fraction clamped at each end of the magnitude order.
    inter: ``"signed_minmax"`` or ``"raw"`` inter-balancing.

  Returns:
    A :class:`~jaxmerge.base.MergeTransform` (a reduction, ``(T, ...) -> (...)``).

  References:
    Du et al., "Parameter Competition Balancing for Model Merging", NeurIPS 2024.
    https://arxiv.org/abs/2410.02396
  """
  if inter not in ("signed_minmax", "raw"):
    raise ValueError(f"inter must be 'signed_minmax' or 'raw', got {inter!r}")

  def apply(coeffs, tree, *, key=None, ctx=None):
    del coeffs, key, ctx
    leaves, treedef = jax.tree.flatten(tree)
    if not leaves:
      return tree
    t = leaves[0].shape[0]
    lam = _lambdas(scales, t)
    d = sum(int(x[0].size) for x in leaves)

    def per_task_stat(vals, index):
      return jax.vmap(lambda *xs: stats.order_statistic(list(xs), index))(*vals)

    def row_min(vals):
      return jnp.min(jnp.stack([jnp.min(v.reshape(t, -1), axis=1) for v in vals]), axis=0)

    def row_max(vals):
      return jnp.max(jnp.stack([jnp.max(v.reshape(t, -1), axis=1) for v in vals]), axis=0)

    absv = [jnp.abs(x) for x in leaves]
    lo = per_task_stat(absv, int(d * clamp_ratio))
    hi = per_task_stat(absv, int(d * (1 - clamp_ratio)) - 1)
    a = [jnp.clip(v, _bcast(lo, v), _bcast(hi, v)) for v in absv]
    amin, amax = row_min(a), row_max(a)
    norm_a = [_minmax(v, _bcast(amin, v), _bcast(amax, v)) for v in a]
    if inter == "signed_minmax":
      mix = [task_sum(jnp.sign(x) * na) for x, na in zip(leaves, norm_a)]
    else:
      mix = [task_sum(x) for x in leaves]
    score = [jnp.exp(t * na**2) * jnp.tanh(x * m[None]) for na, x, m in zip(norm_a, leaves, mix)]
    s_lo = per_task_stat(score, int(d * (1 - ratio)))
    s_hi = row_max(score)
    out = []
    for av, x, s in zip(a, leaves, score):
      lo_b, hi_b = _bcast(s_lo, s), _bcast(s_hi, s)
      b = _minmax(jnp.clip(s, lo_b, hi_b), lo_b, hi_b)
      tv = jnp.sign(x) * av * _bcast(lam, x)
      out.append(task_sum(tv * b) / jnp.maximum(task_sum(b), 1e-12))
    return jax.tree.unflatten(treedef, out)

  return identified(_empty, apply, REDUCE, "pcb_reduce", ratio, scales, clamp_ratio, inter)
