"""The core abstraction: a merge step is a pair of pure functions over pytrees (optax's shape).

``MergeTransform.init(stack)`` returns the step's tunable coefficients (``EmptyCoeffs()`` if none) and
``MergeTransform.apply(coeffs, stack, *, key=None, ctx=None)`` maps a stack of task vectors to either a
stack (a *task-preserving* step: ``(T, ...) -> (T, ...)``) or one tree (a *reduction*:
``(T, ...) -> (...)``). Static hyperparameters (density, rank, selections) live in the factory's closure;
what one might sweep or learn (scales, logits) is in the coefficients, so a sweep recompiles nothing.
"""

from __future__ import annotations

import warnings
import weakref
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
    "identified",
    "identity_of",
    "per_leaf",
    "per_task",
    "require_key",
    "steps_of",
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


class _Fields(NamedTuple):
  init: Callable[[Stacked], Coeffs]
  apply: Callable[..., Any]
  kind: str = TASK
  needs_key: bool = False
  steps: tuple = ()
  identity: tuple | None = None


_HINTS = ("leafwise", "flat", "path_free", "steps", "kernel")  # the positional order of the old engine hints


class MergeTransform(_Fields):
  """A merge step: what it computes, nothing about how it runs.

  Attributes:
    init: ``init(stack) -> coeffs``: default coefficients.
    apply: ``apply(coeffs, stack, *, key=None, ctx=None) -> tree``.
    kind: ``"task"`` (task-preserving), ``"reduce"`` (removes the task axis) or ``"any"`` (works on both,
      e.g. a global scale).
    needs_key: whether ``apply`` requires a PRNG key.
    steps: a chain's steps, nested chains inlined (:func:`jaxmerge.chain`), ``()`` otherwise.
    identity: ``(factory name, static hyperparameters...)`` for a step built by one of jaxmerge's factories
      (``("scale", 0.3)``, ``("drop", 0.9, True)``, ``("ties_merge", 0.2, "sum", "reference", "majority")``),
      ``None`` for a step whose ``apply`` is the user's own code. The engine's backends each own a table of
      the identities they run (:mod:`jaxmerge.engine`); they read an identity only through
      :func:`identity_of`, which accepts it only on the ``init`` and ``apply`` the factory registered with it.
      A step no backend recognizes runs on the whole-model program: slower, never wrong.

  The engine hints of earlier versions (``leafwise``, ``flat``, ``path_free``, ``kernel``) are accepted, with a
  ``DeprecationWarning``, and ignored.
  """

  __slots__ = ()

  def __new__(cls, init, apply, kind=TASK, needs_key=False, steps=(), identity=None, *old, **hints):
    if isinstance(steps, bool) or old:  # the old positional order: (..., leafwise, flat, path_free, steps, kernel)
      old = (steps, identity, *old)
      hints = {**dict(zip(_HINTS, old)), **hints}
      steps, identity = hints.pop("steps", ()), None
    unknown = sorted(set(hints) - set(_HINTS))
    if unknown:
      raise TypeError(f"MergeTransform got unexpected keyword arguments {unknown}")
    if hints:
      warnings.warn(f"MergeTransform's engine hints {sorted(hints)} are deprecated and ignored: the engine "
                    "recognizes jaxmerge's own steps by their identity and runs any other step on the whole-model "
                    "program", DeprecationWarning, stacklevel=2)
    return super().__new__(cls, init, apply, kind, needs_key, tuple(steps), identity)

  @property
  def reduces(self) -> bool:
    return self.kind == REDUCE


class _ById:
  """An unhashable hyperparameter (a tree of labels) inside an identity: equal only to itself."""

  __slots__ = ("value",)

  def __init__(self, value):
    self.value = value

  def __hash__(self):
    return id(self.value)

  def __eq__(self, other):
    return isinstance(other, _ById) and other.value is self.value


def _static(v: Any) -> Any:
  try:
    hash(v)
    return v
  except TypeError:
    return tuple(v) if isinstance(v, list) and all(_hashable(x) for x in v) else _ById(v)


def _hashable(v: Any) -> bool:
  try:
    hash(v)
    return True
  except TypeError:
    return False


_REGISTERED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # apply -> (init, identity)


def identified(init: Callable[[Stacked], Coeffs], apply: Callable[..., Any], kind: str, name: str, *hparams: Any,
               needs_key: bool = False, steps: tuple = ()) -> MergeTransform:
  """A step built by one of jaxmerge's factories, with the identity ``(name, *hparams)`` that the engine's
  backends recognize (:func:`identity_of`). For the library's own factories: an identity promises that
  ``apply`` computes exactly what the factory ``name`` with these static hyperparameters computes.

  Args:
    init: the step's ``init``.
    apply: the step's ``apply`` (a function the factory has just created).
    kind: ``"task"``, ``"reduce"`` or ``"any"``.
    name: the factory's name.
    *hparams: its static hyperparameters (unhashable ones are compared by object).
    needs_key: whether ``apply`` requires a PRNG key.
    steps: a chain's steps.

  Returns:
    A :class:`MergeTransform` with that identity.
  """
  ident = (name, *(_static(v) for v in hparams))
  _REGISTERED[apply] = (init, ident)
  return MergeTransform(init, apply, kind, needs_key, steps, ident)


def identity_of(step: MergeTransform) -> tuple | None:
  """The identity of ``step`` when one of jaxmerge's factories set it on this very ``init`` and ``apply``;
  ``None`` for a user's step, and for an identity copied onto other functions (``_replace``).

  Args:
    step: a merge step.

  Returns:
    ``(factory name, static hyperparameters...)`` or ``None``.
  """
  ident = step.identity
  if ident is None:
    return None
  try:
    reg = _REGISTERED.get(step.apply)
  except TypeError:  # an unhashable callable
    return None
  return ident if reg is not None and reg[0] is step.init and reg[1] is ident else None


def steps_of(step: MergeTransform) -> tuple:
  """The steps a chain runs, nested chains inlined, when jaxmerge's :func:`~jaxmerge.chain` built it;
  ``(step,)`` for anything else.

  Args:
    step: a merge step.

  Returns:
    A tuple of steps.
  """
  ident = identity_of(step)
  return ident[1] if ident is not None and ident[0] == "chain" else (step,)


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

  return identified(_empty_init, apply, TASK, "per_task", fn)


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

  return identified(_empty_init, apply, REDUCE, "across_tasks", fn)


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

  return identified(init or _empty_init, apply, kind, "per_leaf", fn, kind, needs_key, needs_key=needs_key)


def scalar(x: Any) -> jax.Array:
  """A float32 array from a Python number (coefficients are arrays, so sweeps do not retrace)."""
  return jnp.asarray(x, dtype=jnp.float32)
