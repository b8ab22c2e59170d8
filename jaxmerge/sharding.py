"""Sharded merges: device meshes, partition specs from path rules, and merges that run on a mesh.

A stack of task vectors shards naturally along its task axis: ``NamedSharding(mesh, P("task"))`` puts each
task on its own devices, per-task steps (trim, drop, per-task SVD) run locally, and reductions over tasks
become collectives that XLA places. For large models with few tasks, matrix axes shard too, with
big_vision-style rule tables over path strings (first full match wins)::

    rules = [(r".*mlp/fc[12]\\.weight", P("task", None, "model")), (r".*", P("task"))]

Specs in a rule table describe *stacked* leaves ``(T, ...)``; the pretrained and merged leaves use the same
spec without its first entry. Elementwise methods (task arithmetic, TIES, DARE, ...) are exact with matrix
axes sharded; SVD-based steps should call :func:`batch_sharded` on their ``(T, m, n)`` input so the SVD sees
whole matrices (XLA would otherwise gather them, which is correct but slow).

:func:`merge_sharded` is :func:`jaxmerge.merge` on a mesh: inputs placed by the rules, outputs in the declared
shardings, results equal to the unsharded merge. Leafwise methods (task arithmetic, DARE) run one leaf program at
a time and global TIES in exact histogram passes leaf by leaf, so the temporaries are one leaf's; other methods
run the whole-model program, with no host round-trip inside it. :func:`make_sharded_merger` returns that jitted
program itself, for sweeps. Meshes with explicit axis types (``jax.make_mesh``'s default) run with automatic
ones (:func:`auto_axes`: the same devices and buffers), and results come back on the given mesh.

The task axis size must divide ``T``: padding the stack with zero task vectors would change every method that
counts tasks (means, Model Stock, NAN's ``T/2``, TIES's election), so jaxmerge does not pad. :func:`task_mesh`
picks the largest device count that divides ``T``; an explicit mesh that does not divide it raises
``ValueError``. The module imports only jax and numpy.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxmerge import filters as jfilters
from jaxmerge import tree as jtree
from jaxmerge.base import REDUCE, MergeTransform
from jaxmerge.engine.host import trim_heap
from jaxmerge.engine.merge import check_tx, prepare
from jaxmerge.engine.mesh import auto_axes, by_leaf, mesh_of, on_mesh
from jaxmerge.engine.xla import nonfinite_flags, raise_nonfinite, whole_program
from jaxmerge.typing import Coeffs, Params, PRNGKey, Stacked

__all__ = [
    "MODEL",
    "TASK",
    "auto_axes",
    "batch_sharded",
    "make_sharded_merger",
    "merge_sharded",
    "mesh",
    "mesh_of",
    "on_mesh",
    "shard_params",
    "shard_stack",
    "shardings_from_rules",
    "specs_from_rules",
    "stack_sharded",
    "task_mesh",
    "unstacked_spec",
]


TASK = "task"


MODEL = "model"


Rules = Sequence[tuple[str, P]]


Layout = Callable[[str, jax.ShapeDtypeStruct], Any]


def _auto_mesh(shape: tuple[int, ...], names: tuple[str, ...], devices: Sequence[Any] | None) -> Mesh:
  devices = list(devices if devices is not None else jax.devices())
  size = int(np.prod(shape))
  if size > len(devices):
    raise ValueError(f"a mesh of shape {shape} needs {size} devices, only {len(devices)} are available")
  return Mesh(np.asarray(devices[:size]).reshape(shape), names)


def task_mesh(num_tasks: int | None = None, *, devices: Sequence[Any] | None = None) -> Mesh:
  """A 1-D mesh with axis ``"task"``.

  Args:
    num_tasks: ``T``; the mesh uses the largest number of devices that divides it (all devices when ``None``).
    devices: the devices to use (default ``jax.devices()``).

  Returns:
    A ``Mesh`` of shape ``(n,)`` over the first ``n`` devices.
  """
  n = len(devices if devices is not None else jax.devices())
  if num_tasks is not None:
    if num_tasks < 1:
      raise ValueError(f"num_tasks must be positive, got {num_tasks}")
    n = max(d for d in range(1, min(n, num_tasks) + 1) if num_tasks % d == 0)
  return _auto_mesh((n,), (TASK,), devices)


def mesh(task: int, model: int = 1, *, devices: Sequence[Any] | None = None) -> Mesh:
  """A 2-D ``("task", "model")`` mesh of ``task * model`` devices (``model`` shards matrix axes).

  Args:
    task: size of the ``"task"`` axis.
    model: size of the ``"model"`` axis.
    devices: the devices to use (default ``jax.devices()``; the first ``task * model`` are taken).

  Returns:
    A ``Mesh`` of shape ``(task, model)``.

  Raises:
    ValueError: fewer than ``task * model`` devices.
  """
  return _auto_mesh((task, model), (TASK, MODEL), devices)


def unstacked_spec(spec: P) -> P:
  """The spec of a pretrained or merged leaf from the spec of its stacked leaf (drops the task entry).

  Args:
    spec: the ``PartitionSpec`` of a stacked ``(T, ...)`` leaf.

  Returns:
    ``spec`` without its first entry.
  """
  return P(*tuple(spec)[1:])


def _rule_spec(compiled: list[tuple[re.Pattern, P]], path: str, default: P) -> P:
  for r, spec in compiled:
    if r.fullmatch(path):
      return spec
  return default


def specs_from_rules(rules: Rules | None, tree: Any, *, stacked: bool = True) -> Any:
  """A tree of ``PartitionSpec`` for ``tree`` from ``[(regex, spec), ...]`` (first full match wins).

  Specs are written for stacked leaves; with ``stacked=False`` (a model) the task entry is dropped. Leaves no
  rule matches get ``P("task")`` (stacked) or ``P()`` (replicated). A spec longer than the leaf's rank raises
  ``ValueError`` naming the path.

  Args:
    rules: ``[(regex, PartitionSpec for the stacked leaf), ...]``, matched against each leaf's path; ``None``
      for no rules.
    tree: a stack (``stacked=True``) or one model, whose leaves' ranks are checked.
    stacked: whether ``tree``'s leaves have a leading task axis.

  Returns:
    A tree of ``PartitionSpec`` with ``tree``'s structure.
  """
  compiled = [(re.compile(r), s) for r, s in (rules or ())]

  def leaf(path: str, x: Any) -> P:
    spec = _rule_spec(compiled, path, P(TASK))
    if not stacked:
      spec = unstacked_spec(spec)
    if len(spec) > np.ndim(x):
      raise ValueError(f"partition spec {spec} has more entries than parameter {path!r} has axes "
                       f"(shape {tuple(np.shape(x))})")
    return spec

  return jtree.map_with_path(leaf, tree)


def _check_divisible(m: Mesh, path: str, shape: tuple[int, ...], spec: P, stacked: bool) -> None:
  for i, (dim, axes) in enumerate(zip(shape, spec)):
    if axes is None:
      continue
    names = axes if isinstance(axes, tuple) else (axes,)
    size = int(np.prod([m.shape[a] for a in names]))
    if dim % size == 0:
      continue
    where = f"parameter {path!r} of shape {shape} cannot be sharded as {spec} on mesh {dict(m.shape)}"
    if stacked and i == 0:
      raise ValueError(f"{where}: the number of tasks ({dim}) is not divisible by {size}. jaxmerge does not pad "
                       "the task axis (zero task vectors would change every method that counts tasks); use "
                       "jaxmerge.sharding.task_mesh(T), which picks a mesh size that divides T")
    raise ValueError(f"{where}: axis {i} (size {dim}) is not divisible by {size}")


def shardings_from_rules(m: Mesh, rules: Rules | None, tree: Any, *, stacked: bool = True) -> Any:
  """``NamedSharding`` s for ``tree`` (see :func:`specs_from_rules`), checking that each sharded axis divides
  evenly over the mesh.

  Args:
    m: the mesh.
    rules: ``[(regex, PartitionSpec for the stacked leaf), ...]`` or ``None``.
    tree: a stack (``stacked=True``) or one model (arrays or ``ShapeDtypeStruct`` s).
    stacked: whether ``tree``'s leaves have a leading task axis.

  Returns:
    A tree of ``NamedSharding`` on ``m`` with ``tree``'s structure.

  Raises:
    ValueError: a spec longer than its leaf's rank, or a sharded axis (the task axis included) not divisible by
      its mesh axes' size.
  """
  specs = specs_from_rules(rules, tree, stacked=stacked)

  def leaf(x: Any, spec: P, path: str) -> NamedSharding:
    _check_divisible(m, path, tuple(np.shape(x)), spec, stacked)
    return NamedSharding(m, spec)

  return jax.tree.map(leaf, tree, specs, jtree.map_with_path(lambda p, x: p, tree))


def shard_stack(stacked: Stacked, m: Mesh, rules: Rules | None = None) -> Stacked:
  """Places a stack (leading task axis) on ``m`` by the rules (default ``P("task")``).

  Args:
    stacked: a pytree of ``(T, ...)`` arrays.
    m: the mesh.
    rules: ``[(regex, PartitionSpec for the stacked leaf), ...]`` (see :func:`specs_from_rules`).

  Returns:
    The same stack, each leaf a ``jax.Array`` sharded on ``m``.
  """
  return jax.tree.map(jax.device_put, stacked, shardings_from_rules(m, rules, stacked))


def shard_params(params: Params, m: Mesh, rules: Rules | None = None) -> Params:
  """Places a model on ``m`` with the rules' specs minus their task entry (default: replicated).

  Args:
    params: one model (no task axis).
    m: the mesh.
    rules: ``[(regex, PartitionSpec for the stacked leaf), ...]`` (see :func:`specs_from_rules`).

  Returns:
    The same model, each leaf a ``jax.Array`` sharded (or replicated) on ``m``.
  """
  return jax.tree.map(jax.device_put, params, shardings_from_rules(m, rules, params, stacked=False))


def stack_sharded(models: Sequence[Params], m: Mesh, rules: Rules | None = None) -> Stacked:
  """Stacks ``T`` models straight into sharded arrays: each device receives only its own tasks' slices
  (``jax.make_array_from_callback``), so no full stack is ever built on one host buffer or device.

  Args:
    models: ``T`` models with the same structure and shapes.
    m: the mesh.
    rules: ``[(regex, PartitionSpec for the stacked leaf), ...]`` (see :func:`specs_from_rules`).

  Returns:
    A stack with ``models[0]``'s structure, each leaf a sharded ``(T, ...)`` ``jax.Array``.

  Raises:
    ValueError: an empty ``models``, or a spec that does not fit the mesh.
  """
  if not models:
    raise ValueError("no fine-tuned models given: the task list is empty")
  flats = [jtree.flatten_paths(x) for x in models]
  first = flats[0]
  like = {p: jax.ShapeDtypeStruct((len(models),) + tuple(np.shape(x)), jnp.result_type(x)) for p, x in first.items()}
  shard = shardings_from_rules(m, rules, like)
  out = {}
  for p, s in like.items():
    def cb(index, p=p):
      tasks = range(*index[0].indices(len(models)))
      return np.stack([np.asarray(flats[i][p])[index[1:]] for i in tasks])
    out[p] = jax.make_array_from_callback(s.shape, shard[p], cb)
  return jtree.unflatten_paths(models[0], out)


def batch_sharded(x: jax.Array) -> jax.Array:
  """Inside a merge on a mesh, constrains a ``(T, ...)`` array to be sharded along the task axis only, so an
  SVD sees whole matrices; a no-op when no mesh with a ``"task"`` axis is active (plain :func:`jaxmerge.merge`).

  Args:
    x: a ``(T, ...)`` array.

  Returns:
    ``x``, with a ``P("task", None, ...)`` sharding constraint (``P()``, replicated, when the task axis's size
    does not divide ``T``), or unchanged without a task mesh.
  """
  am = jax.sharding.get_abstract_mesh()
  if am.empty or TASK not in am.axis_names:
    return x
  t = x.shape[0]
  spec = P(TASK, *([None] * (x.ndim - 1))) if t % am.shape[TASK] == 0 else P()
  return jax.lax.with_sharding_constraint(x, spec)


def make_sharded_merger(
    tx: MergeTransform,
    m: Mesh,
    pretrained: Params,
    stacked: Stacked,
    *,
    rules: Rules | None = None,
    layout: Layout | None = None,
    per_task: bool | None = None,
) -> Callable[..., Any]:
  """A jitted ``(pretrained, stacked, coeffs=None, key=None) -> merged`` on ``m`` for flat float dicts.

  ``pretrained`` and ``stacked`` (flat ``{path: array}`` dicts of floating leaves, e.g. from
  :func:`jaxmerge.merge.prepare`) fix the output shardings: the rules' specs without the task entry for a merged
  model, the stacked specs for per-task outputs. No validation happens inside (validate once, then sweep).
  With the inputs already on the mesh (:func:`shard_params`, :func:`stack_sharded`, and a key replicated with
  ``NamedSharding(mesh, P())``), a call moves no data between host and devices.

  Args:
    tx: the transform.
    m: the mesh.
    pretrained: flat ``{path: array}`` dict of the pretrained floating leaves.
    stacked: flat ``{path: (T, ...) array}`` dict of the stacked fine-tuned (or task-vector) leaves, as
      :func:`jaxmerge.merge.prepare` gives them.
    rules: ``[(regex, PartitionSpec for the stacked leaf), ...]`` (see :func:`specs_from_rules`).
    layout: matrix layout (default :func:`jaxmerge.filters.hf_layout`).
    per_task: one model per task (default: when ``tx`` is task-preserving).

  Returns:
    ``merger(pretrained, stacked, coeffs=None, key=None) -> merged``, run under ``m``: a flat dict of merged
    leaves, or of ``(T, ...)`` leaves when ``per_task``.
  """
  per_task = tx.kind != REDUCE if per_task is None else per_task
  inner = whole_program(tx, layout or jfilters.hf_layout, per_task)
  auto = auto_axes(m)  # explicit axes: the same devices, XLA places the collectives (see auto_axes)
  out_like = stacked if per_task else pretrained
  out = shardings_from_rules(auto, rules, out_like, stacked=per_task)
  back = shardings_from_rules(m, rules, out_like, stacked=per_task)
  fns = {}

  def merger(pre, ft, coeffs=None, key=None, *, donate=False):
    # donate=True: the pretrained (per-task: stacked) buffers may become the output's (merge_sharded's copies).
    fn = fns.get(donate)
    if fn is None:
      fn = fns[donate] = jax.jit(lambda pre, ft, coeffs, key: inner(pre, ft, coeffs, key), out_shardings=out,
                                 donate_argnums=((1,) if per_task else (0,)) if donate else ())
    retype = functools.partial(jax.tree.map, lambda x: on_mesh(x, auto))
    with jax.set_mesh(auto):
      res = fn(retype(pre), retype(ft), coeffs, key)
    return res if auto is m else jax.tree.map(on_mesh, res, jax.tree.map(lambda s: s.mesh, back))

  return merger


def _check_finite(pre: dict, ft: Any, names: Sequence[str] | None) -> None:
  """The NaN/Inf check of the inputs; inputs already on a mesh are checked under it with automatic axis types (the
  per-model reductions of the check raise ``ShardingTypeError`` on explicit axes)."""
  models = ft if isinstance(ft, tuple) else (ft,)
  src = mesh_of([*pre.values(), *(x for m in models for x in m.values())])
  if src is None:
    raise_nonfinite(pre, ft, nonfinite_flags(pre, ft), names)
    return
  auto = auto_axes(src)

  def retype(d: dict) -> dict:
    return {p: on_mesh(x, auto) for p, x in d.items()}

  with jax.set_mesh(auto):
    pre_a, ft_a = retype(pre), (tuple(retype(m) for m in ft) if isinstance(ft, tuple) else retype(ft))
    raise_nonfinite(pre_a, ft_a, nonfinite_flags(pre_a, ft_a), names)


def merge_sharded(
    tx: MergeTransform,
    pretrained: Params,
    finetuned: Sequence[Params] | Stacked,
    *,
    mesh: Mesh | None = None,
    rules: Rules | None = None,
    key: PRNGKey | None = None,
    coeffs: Coeffs | None = None,
    layout: Layout | None = None,
    names: Sequence[str] | None = None,
    check_finite: bool = True,
    per_task: bool | None = None,
) -> Params | list[Params]:
  """:func:`jaxmerge.merge` (or :func:`jaxmerge.merge_per_task`) on a device mesh.

  Args:
    tx: the transform.
    pretrained: a pytree of arrays.
    finetuned: a list of ``T`` pytrees or one stack.
    mesh: the mesh (default :func:`task_mesh` for ``T``).
    rules: ``[(regex, PartitionSpec for the stacked leaf), ...]`` (default ``P("task")`` everywhere).
    key, coeffs, layout, names, check_finite: as :func:`jaxmerge.merge`.
    per_task: keep one model per task (default: when ``tx`` is task-preserving).

  Returns:
    The merged model with ``pretrained``'s structure and dtypes, each floating leaf sharded as its rule says
    (minus the task entry), or a list of ``T`` such models for per-task transforms (then stacked internally and
    sharded along ``"task"``).

  Raises:
    ValueError: as :func:`jaxmerge.merge`, plus a mesh whose task axis does not divide ``T`` or a matrix axis
      that does not divide its mesh axis (naming the parameter).
  """
  per_task = tx.kind != REDUCE if per_task is None else per_task
  check_tx(tx, key, per_task)
  pre, ft, passthrough = prepare(pretrained, finetuned, names=names, check_finite=False)
  if check_finite:
    _check_finite(pre, ft, names)
  t = len(ft) if isinstance(ft, tuple) else jtree.num_tasks(ft)
  m = mesh if mesh is not None else task_mesh(t)
  if isinstance(ft, tuple):
    ft_s = stack_sharded(list(ft), m, rules)
    jax.block_until_ready(ft_s)
    trim_heap()  # the host slices the stack was built from
  else:
    ft_s = shard_stack(ft, m, rules)
  merged = None
  if coeffs is None:  # leaf by leaf where a plan exists: one leaf's temporaries at a time, not the model's
    auto = auto_axes(m)
    outs = shardings_from_rules(auto, rules, ft_s if per_task else pre, stacked=per_task)
    retype = functools.partial(jax.tree.map, lambda x: on_mesh(x, auto))
    with jax.set_mesh(auto):
      # The pretrained leaves are placed one at a time (replicated over the task axis, the placed model would be
      # one copy per task device), and the stacked copies made above are freed as the result is built.
      merged = by_leaf(tx, layout or jfilters.hf_layout, per_task, pre, retype(ft_s), outs, key,
                       pre_shardings=shardings_from_rules(auto, rules, pre, stacked=False),
                       consume=isinstance(ft, tuple))
    if merged is not None and auto is not m:
      merged = {p: on_mesh(x, m) for p, x in merged.items()}
  if merged is None:
    pre_s = shard_params(pre, m, rules)
    merger = make_sharded_merger(tx, m, pre_s, ft_s, rules=rules, layout=layout, per_task=per_task)
    merged = merger(pre_s, ft_s, coeffs, key, donate=True)  # the copies are ours: the output may reuse them
    del pre_s
  del ft_s
  if per_task:
    return [jtree.unflatten_paths(pretrained, {**{p: x[i] for p, x in merged.items()}, **passthrough})
            for i in range(t)]
  return jtree.unflatten_paths(pretrained, {**merged, **passthrough})
