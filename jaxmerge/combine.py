"""Composition of merge steps: ``chain``, ``named_chain``, ``partition`` and ``masked``.

These mirror optax's ``chain``, ``named_chain``, ``partition`` and ``masked``. Selections are static
(computed from paths and per-task shapes). Inside ``partition`` and ``masked`` each sub-transform sees a flat
``{path: leaf}`` dict whose keys are the leaves' original paths, so inner filters and layouts behave exactly as
they would on the whole tree.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Any, Callable

import jax

from jaxmerge import filters as jfilters
from jaxmerge import tree as jtree
from jaxmerge.base import ANY, REDUCE, TASK, MergeContext, MergeTransform, context_of, identified, identity_of
from jaxmerge.typing import Filter, Stacked

__all__ = ["chain", "masked", "named_chain", "partition"]

_CHAIN_STEPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # a chain's apply -> (step, where) pairs


def _sub_ctx(ctx: MergeContext | None, keep: list[str]) -> MergeContext:
  ctx = context_of(ctx)
  if ctx.pretrained is None:
    return ctx
  pre = jtree.flatten_paths(ctx.pretrained)
  return ctx._replace(pretrained={p: pre[p] for p in keep})


def _chain_kind(kinds: list[str]) -> str:
  reduced = False
  for k in kinds:
    if k == REDUCE:
      if reduced:
        raise ValueError("chain has two reductions: after the first one there is no task axis left")
      reduced = True
    elif k == TASK and reduced:
      raise ValueError("chain places a task-preserving step after a reduction (no task axis is left)")
  if reduced:
    return REDUCE
  return TASK if TASK in kinds else ANY


def named_chain(*named: tuple[str, MergeTransform]) -> MergeTransform:
  """Like :func:`chain`, with coefficients in a dict keyed by the step names.

  Args:
    *named: ``(name, transform)`` pairs, in order.

  Returns:
    A :class:`~jaxmerge.base.MergeTransform` with coefficients ``{name: coeffs}``.
  """
  names = [n for n, _ in named]
  if len(set(names)) != len(names):
    raise ValueError(f"named_chain step names must be unique, got {names}")
  inner = chain(*(t for _, t in named))

  def init(tree):
    return dict(zip(names, inner.init(tree)))

  def apply(coeffs, tree, *, key=None, ctx=None):
    return inner.apply(tuple(coeffs[n] for n in names), tree, key=key, ctx=ctx)

  # the same steps, keys and results as the chain: the same identity
  return identified(init, apply, inner.kind, "chain", inner.steps, needs_key=inner.needs_key, steps=inner.steps)


def chain(*transforms: MergeTransform) -> MergeTransform:
  """Runs steps one after the other; coefficients are a tuple, one entry per step.

  Step ``i`` receives ``jax.random.fold_in(key, i)`` as its key. A chain among the steps is inlined:
  ``chain(chain(a, b), c)`` draws the keys of ``chain(a, b, c)``, runs on the same backend and gives the same
  result (its coefficients stay nested). A task-preserving step after a reduction raises ``ValueError`` when the
  chain is built.

  Args:
    *transforms: the steps, in order (task-preserving steps, then at most one reduction, then steps that
      accept either arity).

  Returns:
    A :class:`~jaxmerge.base.MergeTransform` with coefficients ``(c_0, c_1, ...)``.

  >>> import jax.numpy as jnp, jaxmerge as jm
  >>> tx = jm.chain(jm.transforms.sum_tasks(), jm.transforms.scale(0.5))
  >>> float(tx.apply(tx.init(None), {"w": jnp.array([1.0, 3.0])})["w"])
  2.0
  """
  kind = _chain_kind([t.kind for t in transforms])
  # Nested chains are inlined: ``(step, where its coefficients sit)`` in order, so that chain(chain(a, b), c)
  # runs, draws its keys and is recognized by the backends exactly as chain(a, b, c).
  flat: list[tuple[MergeTransform, tuple[int, ...]]] = []
  for i, t in enumerate(transforms):
    inner = _CHAIN_STEPS.get(t.apply) if identity_of(t) is not None else None
    flat.extend([(s, (i, *where)) for s, where in inner] if inner is not None else [(t, (i,))])

  def init(tree):
    return tuple(t.init(tree) for t in transforms)

  def apply(coeffs, tree, *, key=None, ctx=None):
    if len(coeffs) != len(transforms):
      raise ValueError(f"chain of {len(transforms)} steps got {len(coeffs)} coefficient entries")
    for j, (s, where) in enumerate(flat):
      c = coeffs
      for w in where:
        c = c[w]
      k = jax.random.fold_in(key, j) if key is not None else None  # step j of the inlined chain
      tree = s.apply(c, tree, key=k, ctx=ctx)
    return tree

  _CHAIN_STEPS[apply] = tuple(flat)
  steps = tuple(s for s, _ in flat)
  return identified(init, apply, kind, "chain", steps, needs_key=any(t.needs_key for t in steps), steps=steps)


def _resolve_labels(labels: Any, flat: Mapping[str, Any]) -> dict[str, Any]:
  if callable(labels):
    return {p: labels(p, jfilters.per_task_struct(x)) for p, x in flat.items()}
  lab = jtree.flatten_paths(labels)
  missing = [p for p in flat if p not in lab]
  if missing:
    raise ValueError(f"the label tree has no label for parameters {missing[:10]}")
  return {p: lab[p] for p in flat}


def partition(
    transforms: Mapping[Any, MergeTransform],
    labels: Callable[[str, jax.ShapeDtypeStruct], Any] | Any,
) -> MergeTransform:
  """Applies a different transform to each group of leaves.

  Args:
    transforms: ``{label: transform}``. All must reduce, or none may.
    labels: a function ``(path, per-task struct) -> label`` (a :class:`~jaxmerge.typing.Filter` gives
      ``True``/``False`` labels) or a tree of labels with the stack's structure.

  Returns:
    A transform whose coefficients are ``{label: coeffs}``.
  """
  kinds = {t.kind for t in transforms.values()} - {ANY}
  if len(kinds) > 1:
    raise ValueError("partition mixes reductions and task-preserving steps; give every group the same arity")
  kind = kinds.pop() if kinds else ANY

  def groups(tree):
    flat = jtree.flatten_paths(tree)
    lab = _resolve_labels(labels, flat)
    unknown = sorted({str(v) for v in lab.values()} - {str(k) for k in transforms})
    if unknown:
      raise ValueError(f"labels {unknown} have no transform; transforms are given for {list(transforms)}")
    out = {k: {p: x for p, x in flat.items() if lab[p] == k} for k in transforms}
    return flat, out

  def init(tree):
    if tree is None:
      return {k: t.init(None) for k, t in transforms.items()}
    _, g = groups(tree)
    return {k: t.init(g[k]) for k, t in transforms.items()}

  def apply(coeffs, tree, *, key=None, ctx=None):
    flat, g = groups(tree)
    result = {}
    for k, t in transforms.items():
      if not g[k]:
        continue
      result.update(t.apply(coeffs[k], g[k], key=key, ctx=_sub_ctx(ctx, list(g[k]))))
    if isinstance(tree, dict) and list(tree) == list(flat):
      return {p: result[p] for p in flat}
    return jtree.unflatten_paths(tree, result)

  return identified(init, apply, kind, "partition", tuple(transforms.items()), labels,
                    needs_key=any(t.needs_key for t in transforms.values()))


def masked(inner: MergeTransform, where: Filter | Any, fallback: MergeTransform | None = None) -> MergeTransform:
  """Applies ``inner`` to the selected leaves only.

  Unselected leaves pass through unchanged for task-preserving steps; when ``inner`` is a reduction they are
  reduced by ``fallback`` (default: the mean over tasks).

  Args:
    inner: the transform for the selected leaves.
    where: a filter ``(path, per-task struct) -> bool`` or a tree of booleans with the stack's structure.
    fallback: the transform for the other leaves (default: identity, or the mean for reductions).

  Returns:
    A :class:`~jaxmerge.base.MergeTransform` with coefficients ``(inner coeffs, fallback coeffs)``.
  """
  if fallback is None:
    if inner.kind == REDUCE:
      from jaxmerge.transforms import mean_tasks

      fallback = mean_tasks()
    else:
      from jaxmerge.transforms import identity

      fallback = identity()
  if callable(where):
    labels = lambda p, s: bool(where(p, s))  # noqa: E731
  else:
    labels = where
  t = partition({True: inner, False: fallback}, labels)

  def init(tree):
    c = t.init(tree)
    return (c[True], c[False])

  def apply(coeffs, tree, *, key=None, ctx=None):
    return t.apply({True: coeffs[0], False: coeffs[1]}, tree, key=key, ctx=ctx)

  return identified(init, apply, t.kind, *t.identity, needs_key=t.needs_key)
