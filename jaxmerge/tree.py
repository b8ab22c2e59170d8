"""Tree utilities: paths, stacks of task vectors, casting and input validation.

Every merge works on *stacks*: the same pytree as one model with a leading task axis ``T`` on each leaf
(equinox's ensembles, big_vision's scan layout). These helpers build them, name their leaves with
``a/b/c`` path strings, and check that a set of models can be merged at all, with errors that name the
offending model and path.
"""

from __future__ import annotations

import contextlib
import threading
import zlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxmerge.typing import Params, Path, PRNGKey, Stacked

__all__ = [
    "apply_delta",
    "cast_like",
    "check_compatible",
    "check_finite",
    "concat_tasks",
    "fence",
    "unshared",
    "finite_probe",
    "global_sum",
    "flatten_paths",
    "is_float",
    "leaf_id",
    "leaf_key",
    "leaf_uniform",
    "map_with_path",
    "num_tasks",
    "on_mesh",
    "path_str",
    "paths",
    "stack",
    "task_max",
    "task_mean",
    "task_sum",
    "task_vectors",
    "traced_leaf_ids",
    "unflatten_paths",
    "unstack",
]


def _key_str(k: Any) -> str:
  if isinstance(k, jax.tree_util.DictKey):
    return str(k.key)
  if isinstance(k, jax.tree_util.SequenceKey):
    return str(k.idx)
  if isinstance(k, jax.tree_util.GetAttrKey):
    return str(k.name)
  if isinstance(k, jax.tree_util.FlattenedIndexKey):
    return str(k.key)
  return str(k)


def path_str(keypath: Sequence[Any]) -> Path:
  """Turns a JAX key path into a ``a/b/c`` string (flat-dict keys are kept verbatim).

  Args:
    keypath: a JAX key path.

  Returns:
    The path string.

  >>> import jax
  >>> [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path({"a": {"b": 1}, "c": [2]})[0]]
  ['a/b', 'c/0']
  """
  return "/".join(_key_str(k) for k in keypath)


def paths(tree: Any) -> list[Path]:
  """The path string of every leaf of ``tree``, in flattening order.

  Args:
    tree: any pytree.

  Returns:
    A list of path strings.
  """
  return [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def map_with_path(fn: Callable[..., Any], tree: Any, *rest: Any) -> Any:
  """``jax.tree.map`` whose function also receives the leaf's path string first.

  Args:
    fn: ``fn(path, leaf, *rest_leaves)``.
    tree: the tree whose paths are passed.
    *rest: trees with the same structure.

  Returns:
    The mapped tree.
  """
  return jax.tree_util.tree_map_with_path(lambda p, *xs: fn(path_str(p), *xs), tree, *rest)


def flatten_paths(tree: Any) -> dict[Path, Any]:
  """A flat ``{path: leaf}`` dict in flattening order; raises on duplicate path strings.

  Args:
    tree: any pytree.

  Returns:
    ``{path: leaf}``.
  """
  out: dict[Path, Any] = {}
  for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    s = path_str(p)
    if s in out:
      raise ValueError(f"two leaves share the path {s!r}; use keys without '/' to keep paths unique")
    out[s] = leaf
  return out


def unflatten_paths(like: Any, flat: Mapping[Path, Any]) -> Any:
  """Inverse of :func:`flatten_paths`: rebuilds ``like``'s structure from a ``{path: leaf}`` dict.

  Args:
    like: a pytree whose structure is rebuilt.
    flat: ``{path: leaf}`` with every path of ``like``.

  Returns:
    A pytree with ``like``'s structure and ``flat``'s leaves.
  """
  treedef = jax.tree_util.tree_structure(like)
  return jax.tree_util.tree_unflatten(treedef, [flat[p] for p in paths(like)])


def is_float(x: Any) -> bool:
  """True for arrays of a floating dtype (the leaves that are merged; others are copied).

  Args:
    x: any leaf.

  Returns:
    Whether ``x`` has a floating dtype.
  """
  return jnp.issubdtype(jnp.result_type(x), jnp.floating)


def num_tasks(stacked: Stacked) -> int:
  """The size ``T`` of the leading task axis (all leaves must agree).

  Args:
    stacked: a stack of models.

  Returns:
    ``T``.
  """
  sizes = {np.shape(x)[0] for x in jax.tree.leaves(stacked)}
  if len(sizes) != 1:
    raise ValueError(f"leaves disagree on the task axis size: {sorted(sizes)}")
  return sizes.pop()


def stack(models: Sequence[Params]) -> Stacked:
  """Stacks ``T`` models with the same structure into one pytree with a leading task axis.

  Args:
    models: ``T`` pytrees with the same structure, shapes and dtypes.

  Returns:
    One pytree whose leaves are ``(T, ...)``.
  """
  if len(models) == 0:
    raise ValueError("cannot stack an empty list of models")
  return jax.tree.map(lambda *xs: jnp.stack(xs), *models)


def unstack(stacked: Stacked) -> list[Params]:
  """Splits a stack back into a list of ``T`` models.

  Args:
    stacked: a pytree whose leaves are ``(T, ...)``.

  Returns:
    A list of ``T`` pytrees.
  """
  t = num_tasks(stacked)
  return [jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(t)]


def task_vectors(pretrained: Params, finetuned: Stacked, dtype: Any = jnp.float32) -> Stacked:
  """``finetuned - pretrained[None]`` leaf by leaf, computed in ``dtype``.

  Args:
    pretrained: the pretrained parameters.
    finetuned: a stack ``(T, ...)`` with the same structure.
    dtype: the dtype of the result.

  Returns:
    A stack of task vectors ``(T, ...)``.
  """
  return jax.tree.map(lambda f, p: f.astype(dtype) - p.astype(dtype)[None], finetuned, pretrained)


def cast_like(tree: Any, like: Any) -> Any:
  """Casts every leaf of ``tree`` to the dtype of the matching leaf of ``like``.

  Args:
    tree: any pytree of arrays.
    like: a pytree with the same structure.

  Returns:
    ``tree`` with ``like``'s dtypes.
  """
  return jax.tree.map(lambda x, y: jnp.asarray(x).astype(jnp.result_type(y)), tree, like)


def apply_delta(pretrained: Params, delta: Params) -> Params:
  """``pretrained + delta`` in float32, cast back to the pretrained dtypes (cf. ``optax.apply_updates``).

  Args:
    pretrained: the pretrained parameters.
    delta: a tree of the same structure (e.g. a merged task vector).

  Returns:
    ``pretrained + delta`` with ``pretrained``'s dtypes.
  """
  return jax.tree.map(
      lambda p, d: (p.astype(jnp.float32) + d.astype(jnp.float32)).astype(p.dtype), pretrained, delta
  )


_UNROLL = 64


def leaf_task_vectors(pretrained: jax.Array, models: Sequence[jax.Array]) -> tuple[jax.Array, jax.Array]:
  """One leaf's float32 pretrained value and ``(T, ...)`` float32 task vectors ``models[t] - pretrained`` (from
  separate per-model leaves; :func:`task_vectors` takes a stack).

  Each model is subtracted before the rows are stacked: XLA then reads each task's row straight from its model
  instead of materializing the float32 stack first (6x faster on CPU for task arithmetic).

  Args:
    pretrained: one leaf ``(...)``.
    models: ``T`` leaves of the same shape.

  Returns:
    ``(pretrained32, stack)``.
  """
  base = pretrained.astype(jnp.float32)
  return base, jnp.stack([m.astype(jnp.float32) - base for m in models])


def on_mesh() -> bool:
  """Whether the program is traced under a device mesh (``jax.set_mesh``: the engine's sharded placement).

  Reductions over the task axis then reduce along the axis, which XLA partitions into local sums and one
  all-reduce; unrolled over task slices (the fast form on one device), each slice of a task-sharded array is
  moved between devices, several full-size buffers per device.

  Returns:
    ``True`` inside ``jax.set_mesh(...)``.
  """
  return not jax.sharding.get_abstract_mesh().empty


def task_sum(x: jax.Array, weights: jax.Array | None = None) -> jax.Array:
  """``sum_t w_t x[t]`` over the leading task axis.

  For up to 64 tasks this is an unrolled chain of elementwise adds: XLA fuses it with its producers, and on CPU
  it is ~30x faster than ``jnp.sum(x, axis=0)``, which reduces over the major dimension. Under a device mesh
  (:func:`on_mesh`) it is the axis reduction.

  Args:
    x: ``(T, ...)``.
    weights: ``(T,)`` weights (default: all ones).

  Returns:
    ``(...)``.
  """
  t = x.shape[0]
  if t > _UNROLL or on_mesh():
    return jnp.sum(x, axis=0) if weights is None else jnp.tensordot(weights.astype(x.dtype), x, axes=1)
  out = x[0] if weights is None else weights[0].astype(x.dtype) * x[0]
  for i in range(1, t):
    out = out + (x[i] if weights is None else weights[i].astype(x.dtype) * x[i])
  return out


def task_max(x: jax.Array) -> jax.Array:
  """``max_t x[t]`` over the leading task axis (unrolled like :func:`task_sum`).

  Args:
    x: ``(T, ...)``.

  Returns:
    ``(...)``.
  """
  if x.shape[0] > _UNROLL or on_mesh():
    return jnp.max(x, axis=0)
  out = x[0]
  for i in range(1, x.shape[0]):
    out = jnp.maximum(out, x[i])
  return out


def task_mean(x: jax.Array) -> jax.Array:
  """``mean_t x[t]`` over the leading task axis.

  Args:
    x: ``(T, ...)``.

  Returns:
    ``(...)``.
  """
  return task_sum(x) / x.shape[0]


def fence(x: jax.Array) -> jax.Array:
  """Returns a small array unchanged, as a value XLA computes once and does not copy into its consumers.

  Whole-model scalars (thresholds, majority signs) are cheap elementwise functions of a few reductions, so
  XLA's fusion duplicates their computation into every per-leaf kernel that reads them, which makes each of
  those kernels distinct: one compile per leaf (~30 ms each on CPU) instead of one per leaf shape. A sort
  keyed by position is the identity but is never fused or simplified away (``optimization_barrier`` is
  removed before fusion on CPU).

  Args:
    x: a small array (the sort costs ``O(n log n)``).

  Returns:
    ``x``, bit for bit.
  """
  flat = x.reshape(-1)
  _, out = jax.lax.sort((jnp.arange(flat.shape[0], dtype=jnp.int32), flat), num_keys=1)
  return out.reshape(x.shape)


def unshared(x: jax.Array) -> jax.Array:
  """A second copy of a small array that XLA treats as a value of its own.

  Two passes over the model that read the same whole-model scalars (TIES's thresholds: once to elect the
  majority sign, once to trim and merge) would otherwise let XLA merge their identical per-leaf expressions
  into one stored ``(T, ...)`` intermediate; reading this copy in the second pass keeps each pass fused
  without that scratch memory. Same values, bit for bit (:func:`fence` of the stacked pair).

  Args:
    x: a small array.

  Returns:
    ``x``'s values, as a distinct value.
  """
  return fence(jnp.stack([x, x]))[1]


def global_sum(parts: Sequence[jax.Array]) -> jax.Array:
  """The float32 sum of per-leaf scalars, computed once (see :func:`fence`) in sorted order.

  Args:
    parts: float scalars.

  Returns:
    Their sum.
  """
  v = jnp.stack([jnp.asarray(p, jnp.float32) for p in parts])
  return fence(jnp.sum(jax.lax.sort(v)))


def concat_tasks(tree: Any) -> jax.Array:
  """Concatenates every leaf of a stack into one ``(T, N)`` array, for whole-model statistics only.

  Global steps (one magnitude threshold per task over the whole model) compute their few scalars on this view
  (one histogram over one array instead of one per leaf) and then apply them leaf by leaf. Splitting a
  ``(T, N)`` result back into leaves would cost XLA one distinct compiled kernel per leaf (each slice offset is a
  different program: ~30 ms of compile time per leaf on CPU), whereas per-leaf steps of equal shape share one.

  Args:
    tree: a stack ``(T, ...)`` with at least one leaf.

  Returns:
    The ``(T, N)`` array (leaves in ``jax.tree.leaves`` order, each flattened row-major).
  """
  leaves = jax.tree.leaves(tree)
  if not leaves:
    raise ValueError("cannot flatten an empty tree")
  t = leaves[0].shape[0]
  return jnp.concatenate([leaf.reshape(t, -1) for leaf in leaves], axis=1) if len(leaves) > 1 else leaves[0].reshape(t, -1)


def finite_probe(xs: Sequence[jax.Array]) -> jax.Array:
  """A float32 scalar that is NaN iff some entry of ``xs`` (arrays of one shape) is NaN or Inf.

  ``sum(x * 0)`` over every input, one fused reduction behind an optimization barrier: fused into a merge's
  own loop instead (a multi-output fusion), XLA:CPU runs the merge ~5x slower. The host names the offending
  model only when the probe fires.

  Args:
    xs: float arrays of the same shape (a leaf of the pretrained and of each fine-tuned model).

  Returns:
    ``0.0``, or NaN when an input entry is not finite.
  """
  xs = jax.lax.optimization_barrier(tuple(xs))
  probe = xs[0].astype(jnp.float32) * 0.0
  for x in xs[1:]:
    probe = probe + x.astype(jnp.float32) * 0.0
  return jnp.sum(probe)


_LEAF_IDS = threading.local()


def leaf_id(path: Path) -> int:
  """The 31-bit id of a leaf path (its CRC-32), folded into the merge's key by :func:`leaf_key`.

  Args:
    path: the leaf's path string.

  Returns:
    A nonnegative int below ``2**31``.
  """
  return zlib.crc32(path.encode()) & 0x7FFFFFFF


@contextlib.contextmanager
def traced_leaf_ids(ids: Mapping[Path, Any]) -> Iterator[None]:
  """While tracing inside this context, :func:`leaf_key` folds in ``ids[path]`` (a traced uint32 scalar that
  equals :func:`leaf_id` of the path) instead of the id as a constant.

  A leaf program whose only dependence on the path is its key then serves every leaf of the same shape: the
  engines pass each leaf's id as an argument and compile one program per shape (a constant id would make every
  leaf's program distinct). The draws are the same either way.

  Args:
    ids: ``{path: traced uint32 id}``.

  Yields:
    Nothing; the mapping is active (for this thread) until the block ends.
  """
  prev = getattr(_LEAF_IDS, "ids", None)
  _LEAF_IDS.ids = {**(prev or {}), **ids}
  try:
    yield
  finally:
    _LEAF_IDS.ids = prev


def leaf_key(key: PRNGKey, path: Path) -> PRNGKey:
  """A key for one leaf, derived from its path (not its position), so that a streamed merge, a partition
  or a whole-tree merge all draw the same random numbers for the same leaf.

  Args:
    key: the merge's PRNG key.
    path: the leaf's path string.

  Returns:
    The leaf's PRNG key: ``fold_in(key, leaf_id(path))`` (see :func:`traced_leaf_ids`).
  """
  ids = getattr(_LEAF_IDS, "ids", None)
  data = ids.get(path) if ids else None
  return jax.random.fold_in(key, leaf_id(path) if data is None else data)


def _mix32(x: jax.Array) -> jax.Array:
  """A 32-bit integer hash (the ``lowbias32`` finalizer: xor-shift, multiply, xor-shift, multiply, xor-shift),
  a bijection of ``uint32``."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x21F0AAAD)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x735A2D97)
  return x ^ (x >> 15)


def leaf_uniform(key: PRNGKey, path: Path, shape: tuple[int, ...]) -> jax.Array:
  """``U[0, 1)`` float32 draws for one leaf, from the leaf's own key (:func:`leaf_key`).

  A counter-based generator: entry ``i`` (row-major position in ``shape``) gets three keyed rounds of a 32-bit
  integer hash of ``i`` (96 key bits, drawn from the leaf's key with JAX's own generator), and its top 23 bits
  become the float. Pure elementwise integer math, so XLA fuses it into the consumer: on CPU it draws about 5
  billion numbers a second, against 0.1 billion for XLA's Philox (``rbg``) and threefry, which made the random
  draws 75% of a DARE merge. Deterministic under the key, and the same for a leaf however the tree is split,
  partitioned or streamed; uniformity and independence are tested (``tests/test_core.py``).

  Args:
    key: the merge's PRNG key.
    path: the leaf's path string.
    shape: the shape of the draws (fewer than ``2**32`` entries).

  Returns:
    float32 ``U[0, 1)`` draws of ``shape``, multiples of ``2**-23``.

  Raises:
    ValueError: ``shape`` has ``2**32`` entries or more.

  References:
    Salmon, Moraes, Dror and Shaw, "Parallel random numbers: as easy as 1, 2, 3", SC 2011 (counter-based
    generators). https://doi.org/10.1145/2063384.2063405
    Wellons, "Hash Prospector" (the lowbias32 constants), 2018. https://github.com/skeeto/hash-prospector
  """
  n = int(np.prod(shape, dtype=np.int64))
  if n >= 2**32:
    raise ValueError(f"leaf_uniform: {n} entries in shape {tuple(shape)}; at most 2**32 - 1 per leaf")
  k = jax.random.bits(leaf_key(key, path), (3,), jnp.uint32)
  i = jax.lax.iota(jnp.uint32, max(n, 1))[:n].reshape(shape)
  b = _mix32(_mix32(_mix32(i ^ k[0]) + k[1]) ^ k[2])
  return jax.lax.bitcast_convert_type((b >> 9) | jnp.uint32(0x3F800000), jnp.float32) - 1.0


def _describe(x: Any) -> str:
  return f"shape {tuple(np.shape(x))} and dtype {jnp.result_type(x)}"


def check_compatible(pretrained: Params, models: Sequence[Params], names: Sequence[str] | None = None) -> None:
  """Raises ``ValueError`` naming the model and path where ``models`` differ from ``pretrained``.

  Checks tree structure (missing or extra paths), shapes and dtypes.

  Args:
    pretrained: the reference tree.
    models: the trees to check.
    names: model names for the messages (default ``model 0``, ``model 1``, ...).
  """
  if len(models) == 0:
    raise ValueError("no fine-tuned models given: the task list is empty")
  names = list(names) if names is not None else [f"model {i}" for i in range(len(models))]
  ref = flatten_paths(pretrained)
  _check_arrays("the pretrained model", ref)
  for name, model in zip(names, models):
    got = flatten_paths(model)
    _check_arrays(name, got)
    missing = [p for p in ref if p not in got]
    extra = [p for p in got if p not in ref]
    if missing or extra:
      raise ValueError(
          f"{name} does not match the pretrained model's structure: missing paths {missing[:10]}"
          f"{' ...' if len(missing) > 10 else ''}, extra paths {extra[:10]}{' ...' if len(extra) > 10 else ''}"
      )
    for p, x in ref.items():
      y = got[p]
      if np.shape(x) != np.shape(y):
        raise ValueError(f"{name}: parameter {p!r} has {_describe(y)}, the pretrained model has {_describe(x)}")
      if jnp.result_type(x) != jnp.result_type(y):
        raise ValueError(f"{name}: parameter {p!r} has {_describe(y)}, the pretrained model has {_describe(x)}")


def _check_arrays(name: str, flat: dict) -> None:
  """Raises ``ValueError`` naming the model and path of a leaf that is not an array (a Python number, a list)."""
  for p, x in flat.items():
    if not (hasattr(x, "dtype") and hasattr(x, "shape")):
      raise ValueError(f"{name}: parameter {p!r} is a {type(x).__name__}, not an array; parameters must be "
                       "arrays (wrap scalars with numpy.asarray or jax.numpy.asarray)")


@jax.jit
def _nonfinite(tree: Any) -> Any:
  return jax.tree.map(lambda x: jnp.logical_not(jnp.all(jnp.isfinite(x))), tree)


def check_finite(tree: Any, name: str = "model", stacked_names: Sequence[str] | None = None) -> None:
  """Raises ``ValueError`` naming the model and path of the first leaf that holds NaN or Inf.

  This runs *before* a merge (one small device-to-host transfer of a boolean per leaf), never inside it.
  With ``stacked_names`` the tree is a stack and the message names the task whose slice is bad.

  Args:
    tree: any pytree of arrays.
    name: the model name for the message.
    stacked_names: task names when ``tree`` is a stack.
  """
  floats = {p: x for p, x in flatten_paths(tree).items() if is_float(x)}
  bad = jax.device_get(_nonfinite(floats))
  for p, flag in bad.items():
    if flag:
      who = name
      if stacked_names is not None:
        rows = np.asarray(jax.device_get(jnp.any(~jnp.isfinite(floats[p]).reshape(floats[p].shape[0], -1), axis=1)))
        who = ", ".join(stacked_names[i] for i in np.flatnonzero(rows))
      raise ValueError(f"{who}: parameter {p!r} contains NaN or Inf values")
