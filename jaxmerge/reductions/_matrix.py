"""Shared plumbing of the subspace methods: matrix leaves go through a one-matrix kernel, vector leaves through
a documented fallback.

A leaf is a matrix when the merge's layout (:mod:`jaxmerge.filters`; Hugging Face ``(out, in)`` by default)
gives it a :class:`~jaxmerge.filters.MatrixSpec` and the optional ``where`` filter selects it. Kernels see the
canonical ``(T, out, in)`` float32 view of one matrix; :func:`jaxmerge.linalg.map_matrices` runs one compiled
kernel per group of equal-shape matrices.

Vector leaves (biases, norms, class token, the 4-D patch embedding, excluded keys) follow METHODS.md's
fallback, named by a string:

- reductions: ``"mean"`` (``mean_t tau_t``, the reference implementations' rule), ``"task_arithmetic"``
  (``sum_t tau_t``) or ``"pretrained"`` (zero update). A method's global scale, if it has one, multiplies the
  fallback too (it is a ``scale`` step chained after the reduction).
- task-preserving steps: ``"task"`` (each task keeps its own vector), ``"mean"`` (every task gets the mean) or
  ``"pretrained"``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxmerge import linalg
from jaxmerge import tree as jtree
from jaxmerge.base import REDUCE, TASK, EmptyCoeffs, MergeTransform, context_of, identified
from jaxmerge.tree import task_mean, task_sum
from jaxmerge.typing import Filter

__all__ = ["REDUCE_FALLBACKS", "TASK_FALLBACKS", "matrix_transform", "vector_fallback"]

REDUCE_FALLBACKS = ("mean", "task_arithmetic", "pretrained")
TASK_FALLBACKS = ("task", "mean", "pretrained")


def vector_fallback(name: str, kind: str = REDUCE) -> Callable[[jax.Array], jax.Array]:
  """The leaf function of a named fallback (see the module docstring).

  Args:
    name: the fallback's name (:data:`REDUCE_FALLBACKS` or :data:`TASK_FALLBACKS`, depending on ``kind``).
    kind: ``"reduce"`` or ``"task"``.

  Returns:
    ``fn(x) -> leaf`` on one stacked ``(T, ...)`` leaf: ``(...)`` for reductions, ``(T, ...)`` float32 for
    task-preserving steps.

  Raises:
    ValueError: an unknown name.
  """
  if kind == REDUCE:
    table = {
        "mean": task_mean,
        "task_arithmetic": task_sum,
        "pretrained": lambda x: jnp.zeros(x.shape[1:], jnp.float32),
    }
  else:
    table = {
        "task": lambda x: x.astype(jnp.float32),
        "mean": lambda x: jnp.broadcast_to(task_mean(x.astype(jnp.float32))[None], x.shape),
        "pretrained": lambda x: jnp.zeros(x.shape, jnp.float32),
    }
  if name not in table:
    raise ValueError(f"fallback must be one of {sorted(table)}, got {name!r}")
  return table[name]


def _empty(tree):
  del tree
  return EmptyCoeffs()


def matrix_transform(
    kernel: Callable[[Any, jax.Array], jax.Array],
    *,
    kind: str = REDUCE,
    fallback: str | Callable[[Any, jax.Array], jax.Array] = "mean",
    where: Filter | None = None,
    init: Callable[[Any], Any] | None = None,
    batch_size: int | None = 0,
    combine: Callable[[jax.Array], jax.Array] | None = None,
) -> MergeTransform:
  """A transform from a one-matrix kernel.

  Args:
    kernel: ``kernel(coeffs, x)`` with ``x`` one matrix's ``(T, out, in)`` float32 slice; returns ``(out, in)``
      (``kind="reduce"``) or ``(T, out, in)`` (``kind="task"``). ``coeffs`` are the step's coefficients
      (traced; closed over inside the per-group loop).
    kind: ``"reduce"`` or ``"task"``.
    fallback: a fallback name (module docstring) or ``fn(coeffs, x) -> leaf`` for vector leaves.
    where: optional filter restricting the matrix leaves (others take the fallback).
    init: default coefficients (``EmptyCoeffs`` when omitted).
    batch_size: see :func:`jaxmerge.linalg.map_matrices`.
    combine: for a reduction whose kernel only needs a combination of the tasks (Iso-C: their sum), that
      combination, ``(T, ...) float32 -> (...)``, applied to each matrix leaf before the kernel, which then sees
      a ``(1, out, in)`` slice: the ``T`` task matrices are never gathered (XLA fuses the combination with the
      task-vector subtraction), which divides the kernel's input memory by ``T``.

  Returns:
    A :class:`~jaxmerge.base.MergeTransform` of the given ``kind``; each matrix leaf comes back in its own
    shape (through :func:`jaxmerge.linalg.to_leaf`).

  References:
    Per-matrix (subspace-based) merging as surveyed in Yang et al., "Model Merging in LLMs, MLLMs, and
    Beyond: Methods, Theories, Applications and Opportunities", 2024. https://arxiv.org/abs/2408.07666
    Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging", CVPR 2025.
    https://arxiv.org/abs/2412.00081
  """
  if kind not in (REDUCE, TASK):
    raise ValueError(f"kind must be {REDUCE!r} or {TASK!r}, got {kind!r}")
  if combine is not None and kind != REDUCE:
    raise ValueError("combine applies to reductions only")
  if isinstance(fallback, str):
    leaf_fallback = vector_fallback(fallback, kind)
    vec = lambda coeffs, x: leaf_fallback(x)  # noqa: E731
  else:
    vec = fallback

  def apply(coeffs, tree, *, key=None, ctx=None):
    del key
    ctx = context_of(ctx)
    flat = jtree.flatten_paths(tree)
    specs = linalg.matrix_specs(flat, ctx.layout, where)
    inputs = flat
    if combine is not None:
      inputs = {p: combine(flat[p].astype(jnp.float32))[None] for p in specs}
    res = linalg.map_matrices(lambda x: kernel(coeffs, x), inputs, specs, batch_size=batch_size)
    out = {}
    for p, x in flat.items():
      if p in res:
        out[p] = linalg.to_leaf(res[p], specs[p], tuple(x.shape[1:]), tasks=kind == TASK)
      else:
        out[p] = vec(coeffs, x.astype(jnp.float32))
    return jtree.unflatten_paths(tree, out)

  return identified(init or _empty, apply, kind, "matrix_transform", kernel, kind, fallback, where, batch_size, combine)
