"""The core abstraction: a merge step is a pair of pure functions over pytrees (optax's shape).

``MergeTransform.init(stack)`` returns the step's tunable coefficients (``EmptyCoeffs()`` if none) and
``MergeTransform.apply(coeffs, stack, *, key=None, ctx=None)`` maps a stack of task vectors to either a
stack (a *task-preserving* step: ``(T, ...) -> (T, ...)``) or one tree (a *reduction*:
``(T, ...) -> (...)``). Static hyperparameters (density, rank, selections) live in the factory's closure;
what one might sweep or learn (scales, logits) is in the coefficients, so a sweep recompiles nothing.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from jaxmerge import filters as jfilters
from jaxmerge import tree as jtree
from jaxmerge.typing import Coeffs, Params, Path, PRNGKey, Stacked

__all__ = [
    "EmptyCoeffs",
    "MergeContext",
    "MergeTransform",
    "across_tasks",
    "context_of",
    "per_leaf",
    "per_task",
    "require_key",
]

TASK = "task"
REDUCE = "reduce"
ANY = "any"


class EmptyCoeffs(NamedTuple):
  """Coefficients of a step with nothing to tune (cf. ``optax.EmptyState``)."""


class MergeContext(NamedTuple):
  """What a step may need besides the task vectors.

  Attributes:
    pretrained: the pretrained leaves (float32, no task axis), same structure as the stack; ``None`` when a
      transform is applied outside :func:`jaxmerge.merge`.
    layout: how a leaf is viewed as an ``(out, in)`` matrix (see :mod:`jaxmerge.filters`).
  """

  pretrained: Params | None = None
  layout: Callable[[Path, jax.ShapeDtypeStruct], Any] = jfilters.hf_layout


def context_of(ctx: MergeContext | None) -> MergeContext:
  """The merge context ``ctx``, or an empty :class:`MergeContext` when it is ``None``.

  Args:
    ctx: a context or ``None``.

  Returns:
    A :class:`MergeContext`.
  """
  return ctx if ctx is not None else MergeContext()


class MergeTransform(NamedTuple):
  """A merge step.

  Attributes:
    init: ``init(stack) -> coeffs``: default coefficients.
    apply: ``apply(coeffs, stack, *, key=None, ctx=None) -> tree``.
    kind: ``"task"`` (task-preserving), ``"reduce"`` (removes the task axis) or ``"any"`` (works on both,
      e.g. a global scale).
    needs_key: whether ``apply`` requires a PRNG key.
    leafwise: whether each leaf's result depends on that leaf alone (such steps can be streamed).
    flat: whether the result is unchanged when every leaf is concatenated into one flat vector (elementwise
      math plus whole-model statistics; no per-leaf keys, coefficients, paths or shapes). :func:`jaxmerge.merge`
      then runs the step on one ``(T, N)`` array, whose compile time does not grow with the number of leaves.
    path_free: whether ``apply`` reads a leaf's path only through its random key (:func:`jaxmerge.tree.leaf_key`;
      no labels, layouts or per-leaf coefficients): two leaves of the same shape and dtype then get the same
      program (the engines pass the leaf's id as an argument, :func:`jaxmerge.tree.traced_leaf_ids`), so a
      leaf-by-leaf merge traces and compiles it once per shape (implied by ``flat``; see :attr:`by_shape`).
    steps: a chain's steps (:func:`jaxmerge.chain`), ``()`` otherwise. :func:`jaxmerge.merge` runs a chain of
      leafwise by-shape steps followed by ``flat`` ones (DARE on TIES) as per-leaf programs, then one program on
      the ``(T, N)`` view.
    kernel: a hashable description of the step for :mod:`jaxmerge.engine.native` (``("ties", density, merge_func, count,
      zero_sign)``, ``("sum",)``, ``("mean",)``, ``("drop", p, rescale)``, ``("scale", value)``), ``()`` otherwise:
      :func:`jaxmerge.merge` runs a chain it recognizes (:func:`jaxmerge.engine.native.spec`) as one native CPU call
      (same results).
  """

  init: Callable[[Stacked], Coeffs]
  apply: Callable[..., Any]
  kind: str = TASK
  needs_key: bool = False
  leafwise: bool = True
  flat: bool = False
  path_free: bool = False
  steps: tuple = ()
  kernel: tuple = ()

  @property
  def vouched(self) -> bool:
    """Whether the engine may act on the hints ``flat`` and ``path_free``: only for steps whose ``apply`` is
    jaxmerge's own code (a library factory, :func:`per_task`, :func:`across_tasks`, or a chain of such steps),
    never for :func:`per_leaf` steps (they receive the path). A user's ``apply`` flagged by hand runs on the
    whole-model program, which reads every path as it is: slower, never wrong."""
    fn = self.apply
    return getattr(fn, "__module__", "").startswith("jaxmerge.") and not getattr(fn, "reads_path", False)

  @property
  def runs_flat(self) -> bool:
    """``flat``, when :attr:`vouched`."""
    return self.flat and self.vouched

  @property
  def by_shape(self) -> bool:
    """Whether the step's program for a leaf depends only on the leaf's shape and dtype (``flat`` or
    ``path_free``, when :attr:`vouched`)."""
    return (self.flat or self.path_free) and self.vouched

  @property
  def reduces(self) -> bool:
    return self.kind == REDUCE


def require_key(key: PRNGKey | None, what: str) -> PRNGKey:
  """Raises a clear error when a stochastic step gets no key.

  Args:
    key: the key a stochastic step received.
    what: the step's name, for the message.

  Returns:
    ``key``.

  Raises:
    ValueError: ``key`` is ``None``.
  """
  if key is None:
    raise ValueError(f"{what} is stochastic and needs a PRNG key: pass key=jax.random.key(seed)")
  return key


def _empty_init(tree: Stacked) -> EmptyCoeffs:
  del tree
  return EmptyCoeffs()


def per_task(fn: Callable[[jax.Array], jax.Array]) -> MergeTransform:
  """Lifts ``fn`` on one task's leaf to a task-preserving step with ``vmap`` over the task axis.

  Args:
    fn: ``fn(x)`` on one task's leaf ``(...)``, returning a leaf of the same shape.

  Returns:
    A :class:`~jaxmerge.base.MergeTransform` (task-preserving, ``(T, ...) -> (T, ...)``).

  >>> import jax.numpy as jnp
  >>> t = per_task(lambda x: x * 2)
  >>> t.apply(t.init(None), {"w": jnp.ones((2, 3))})["w"].tolist()
  [[2.0, 2.0, 2.0], [2.0, 2.0, 2.0]]
  """

  def apply(coeffs, tree, *, key=None, ctx=None):
    del coeffs, key, ctx
    return jax.tree.map(jax.vmap(fn), tree)

  return MergeTransform(_empty_init, apply, TASK, path_free=True)


def across_tasks(fn: Callable[[jax.Array], jax.Array]) -> MergeTransform:
  """A reduction from ``fn`` on one leaf's whole ``(T, ...)`` slice to a ``(...)`` leaf.

  Args:
    fn: ``fn(x)`` maps one leaf's stacked ``(T, ...)`` array to a ``(...)`` array.

  Returns:
    A :class:`~jaxmerge.base.MergeTransform` (a reduction, ``(T, ...) -> (...)``).
  """

  def apply(coeffs, tree, *, key=None, ctx=None):
    del coeffs, key, ctx
    return jax.tree.map(fn, tree)

  return MergeTransform(_empty_init, apply, REDUCE, path_free=True)


def per_leaf(
    fn: Callable[..., jax.Array],
    *,
    kind: str = TASK,
    needs_key: bool = False,
    init: Callable[[Stacked], Coeffs] | None = None,
) -> MergeTransform:
  """A leafwise step from ``fn(path, x, *, coeffs, key, spec, pretrained) -> y``.

  ``x`` is one stacked leaf ``(T, ...)``; ``key`` is that leaf's own key (derived from the path, see
  :func:`jaxmerge.tree.leaf_key`) or ``None``; ``spec`` is the leaf's :class:`~jaxmerge.filters.MatrixSpec`
  under the merge's layout (``None`` for non-matrix leaves); ``pretrained`` is the pretrained leaf or ``None``.

  Args:
    fn: the leaf function (see above).
    kind: ``"task"`` (task-preserving), ``"reduce"`` (removes the task axis) or ``"any"``.
    needs_key: the step is random and needs a PRNG key.
    init: ``init(stacked) -> coeffs`` (default: no coefficients).

  Returns:
    A leafwise :class:`~jaxmerge.base.MergeTransform`.
  """

  def apply(coeffs, tree, *, key=None, ctx=None):
    ctx = context_of(ctx)
    pre = jtree.flatten_paths(ctx.pretrained) if ctx.pretrained is not None else {}

    def leaf(path, x):
      k = jtree.leaf_key(key, path) if key is not None else None
      spec = ctx.layout(path, jfilters.per_task_struct(x))
      return fn(path, x, coeffs=coeffs, key=k, spec=spec, pretrained=pre.get(path))

    return jtree.map_with_path(leaf, tree)

  apply.reads_path = True  # fn receives the path: never path-free, whatever the flags say
  return MergeTransform(init or _empty_init, apply, kind, needs_key, True)


def scalar(x: Any) -> jax.Array:
  """A float32 array from a Python number (coefficients are arrays, so sweeps do not retrace)."""
  return jnp.asarray(x, dtype=jnp.float32)
