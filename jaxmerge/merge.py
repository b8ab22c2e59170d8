"""Entry points: ``merge`` (one model), ``merge_per_task`` (one model per task) and ``make_merger``.

``merge`` validates structure, shapes and dtypes on the host (errors name the model and path), then runs one
jitted function: task vectors in float32, the transform, the result added to the pretrained weights and cast
back to their dtypes. NaN/Inf weights are rejected before the merge by a small jitted check (one flag per leaf
and model, compiled once per model structure), with an error naming the model and path. Non-floating leaves (integer buffers, step counters) are
copied from the pretrained model and never merged.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxmerge import filters as jfilters
from jaxmerge import native
from jaxmerge import sharding as jsharding
from jaxmerge import tree as jtree
from jaxmerge.base import REDUCE, MergeContext, MergeTransform
from jaxmerge.io.safetensors_io import aligned_empty
from jaxmerge.typing import Coeffs, Params, PRNGKey, Stacked

__all__ = ["BACKENDS", "make_merger", "merge", "merge_per_task", "prepare", "route"]

Layout = Callable[[str, jax.ShapeDtypeStruct], Any]


def _as_list(finetuned: Sequence[Params] | Stacked) -> tuple[list[Params] | None, Stacked | None]:
  if isinstance(finetuned, (list, tuple)):
    return list(finetuned), None
  return None, finetuned


def _as_array(x: Any) -> Any:
  """A JAX array, or a NumPy array as it is: the programs take both, and the native kernels read NumPy memory in
  place (``jnp.asarray`` would copy every leaf)."""
  return x if isinstance(x, np.ndarray) else jnp.asarray(x)


def prepare(
    pretrained: Params,
    finetuned: Sequence[Params] | Stacked,
    *,
    names: Sequence[str] | None = None,
    check_finite: bool = True,
) -> tuple[dict, dict, dict]:
  """Validates inputs and splits them by path into float leaves and copied leaves.

  Args:
    pretrained: any pytree of arrays.
    finetuned: a list of ``T`` pytrees, or one stack (leading task axis).
    names: model names used in error messages.
    check_finite: reject NaN/Inf weights.

  Returns:
    ``(pre_float, ft_float, passthrough)``: a flat ``{path: array}`` dict of the pretrained float leaves; the
    fine-tuned float leaves, either a tuple of such dicts (one per model, when a list was given) or one dict of
    stacked leaves; and a dict of the non-float pretrained leaves.
  """
  models, stacked = _as_list(finetuned)
  pre = jtree.flatten_paths(pretrained)
  if not pre:
    raise ValueError("the pretrained model has no parameters")
  if models is not None:
    jtree.check_compatible(pretrained, models, names)
    flats = [jtree.flatten_paths(m) for m in models]
    # Kept as a tuple of per-model dicts: the stack is formed inside the jitted merge, where XLA fuses it into
    # its consumers instead of materializing a second copy of every model.
    ft = tuple({p: f[p] for p, x in pre.items() if jtree.is_float(x)} for f in flats)
  else:
    st = jtree.flatten_paths(stacked)
    missing = [p for p in pre if p not in st]
    extra = [p for p in st if p not in pre]
    if missing or extra:
      raise ValueError(f"the stacked fine-tuned models do not match the pretrained structure: "
                       f"missing {missing[:10]}, extra {extra[:10]}")
    sizes = {np.shape(x)[0] if np.ndim(x) else None for x in st.values()}
    if len(sizes) != 1 or None in sizes:
      raise ValueError(f"stacked leaves need one leading task axis of equal size, got sizes {sizes}")
    if sizes == {0}:
      raise ValueError("no fine-tuned models given: the task axis is empty")
    for p, x in pre.items():
      if tuple(np.shape(st[p]))[1:] != tuple(np.shape(x)):
        raise ValueError(f"stacked parameter {p!r} has shape {tuple(np.shape(st[p]))}, expected (T, "
                         f"{', '.join(map(str, np.shape(x)))})")
    ft = {p: _as_array(st[p]) for p, x in pre.items() if jtree.is_float(x)}
    for p, x in ft.items():
      if not jtree.is_float(x):
        raise ValueError(f"parameter {p!r} is floating in the pretrained model but has dtype {x.dtype} in a "
                         "fine-tuned model")
  pre_float = {p: _as_array(x) for p, x in pre.items() if jtree.is_float(x)}
  passthrough = {p: x for p, x in pre.items() if not jtree.is_float(x)}
  if check_finite:
    _raise_nonfinite(pre_float, ft, _nonfinite_flags(pre_float, ft), names)
  return pre_float, ft, passthrough


def _has_nonfinite(x: jax.Array, axis: Any = None) -> jax.Array:
  """Whether ``x`` holds a NaN or Inf (along ``axis``), as one float reduction: ``sum(x * 0)`` is 0 for finite
  entries and NaN otherwise (a vectorized sum, several times faster on CPU than ``all(isfinite(x))``)."""
  return jnp.logical_not(jnp.isfinite(jnp.sum(x.astype(jnp.float32) * 0.0, axis=axis)))


@jax.jit
def _nonfinite(tree: dict) -> dict:
  """One NaN/Inf flag per leaf (per task row for stacked leaves)."""
  return {p: _has_nonfinite(x) for p, x in tree.items()}


@jax.jit
def _nonfinite_rows(tree: dict) -> dict:
  return {p: _has_nonfinite(x.reshape(x.shape[0], -1), axis=1) for p, x in tree.items()}


def _nonfinite_flags(pre: dict, ft: Any) -> dict:
  """Flags for the pretrained leaves and, per fine-tuned model, ``(T,)`` flags per leaf. One compiled check is
  shared by every model of the same structure."""
  if isinstance(ft, tuple):
    per_model = [_nonfinite(m) for m in ft]
    ft_flags = {p: jnp.stack([f[p] for f in per_model]) for p in pre}
  else:
    ft_flags = _nonfinite_rows(ft)
  return {"pre": _nonfinite(pre), "ft": ft_flags}


def _raise_nonfinite(pre: dict, ft: Any, flags: dict, names: Sequence[str] | None) -> None:
  flags = jax.device_get(flags)
  for p, f in flags["pre"].items():
    if f:
      raise ValueError(f"pretrained model: parameter {p!r} contains NaN or Inf values")
  for p, f in flags["ft"].items():
    rows = np.flatnonzero(np.asarray(f))
    if rows.size:
      labels = list(names) if names else [f"model {i}" for i in range(len(f))]
      raise ValueError(f"{', '.join(labels[i] for i in rows)}: parameter {p!r} contains NaN or Inf values")


def _task_vectors(pre: jax.Array, ft: Any, p: str) -> jax.Array:
  """The ``(T, ...)`` float32 task vectors of leaf ``p`` (models as a tuple of dicts, or one stack)."""
  if isinstance(ft, tuple):
    return jtree.leaf_task_vectors(pre, [m[p] for m in ft])[1]
  return ft[p].astype(jnp.float32) - pre.astype(jnp.float32)[None]


@functools.lru_cache(maxsize=128)
def _compiled(tx: MergeTransform, layout: Layout, per_task: bool) -> Callable[..., Any]:
  def run(pre, ft, coeffs, key):
    deltas = {p: _task_vectors(pre[p], ft, p) for p in pre}
    pre32 = {p: x.astype(jnp.float32) for p, x in pre.items()}
    if coeffs is None:
      coeffs = tx.init(deltas)
    out = tx.apply(coeffs, deltas, key=key, ctx=MergeContext(pretrained=pre32, layout=layout))
    if per_task:
      return {p: (pre32[p][None] + out[p]).astype(pre[p].dtype) for p in pre}
    return {p: (pre32[p] + out[p]).astype(pre[p].dtype) for p in pre}

  return jax.jit(run)


def _flat_dtype(pre: dict, ft: Any) -> Any:
  """The one float dtype of every leaf (pretrained and fine-tuned), or ``None`` when they differ."""
  dtypes = {x.dtype for x in pre.values()}
  models = ft if isinstance(ft, tuple) else (ft,)
  dtypes |= {x.dtype for m in models for x in m.values()}
  return dtypes.pop() if len(dtypes) == 1 else None


@functools.lru_cache(maxsize=128)
def _flat_program(tx: MergeTransform, layout: Layout, per_task: bool) -> Callable[..., Any]:
  """``(pre32 (N,), deltas (T, N), coeffs, key, dtype) -> merged`` for a ``flat`` transform on the flat view."""

  # The task vectors are donated where the output has their shape (per-task merges); a reduction's output
  # cannot reuse them.
  @functools.partial(jax.jit, donate_argnums=(1,) if per_task else (), static_argnums=(4,))
  def run(pre32, deltas, coeffs, key, dtype):
    deltas = {"flat": deltas}
    if coeffs is None:
      coeffs = tx.init(deltas)
    out = tx.apply(coeffs, deltas, key=key, ctx=MergeContext(pretrained={"flat": pre32}, layout=layout))["flat"]
    return ((pre32[None] if per_task else pre32) + out).astype(dtype)

  return run


@functools.lru_cache(maxsize=128)
def _compiled_flat(tx: MergeTransform, layout: Layout, per_task: bool, paths: tuple[str, ...]) -> Callable[..., Any]:
  """The merge of a ``flat`` transform on one ``(T, N)`` array of every leaf, concatenated in ``paths`` order.

  Two programs: the first concatenates the task vectors once (and flags NaN/Inf per model in the same pass);
  the second runs the transform on that buffer, which it receives donated so that its intermediates can
  reuse it. Fusing a 200-way concatenation into every pass of the transform instead recomputes it in each
  (several times slower on CPU). Splitting the result back into leaves is left to :func:`_split_flat`: inside
  XLA each leaf would be a slice with its own offset, hence its own compiled kernel.
  """

  @jax.jit
  def gather(pre, ft):
    pre32 = jnp.concatenate([pre[p].astype(jnp.float32).ravel() for p in paths])
    if isinstance(ft, tuple):
      deltas = jnp.stack([jnp.concatenate([m[p].astype(jnp.float32).ravel() for p in paths]) - pre32 for m in ft])
    else:
      t = ft[paths[0]].shape[0]
      deltas = jnp.concatenate([ft[p].astype(jnp.float32).reshape(t, -1) for p in paths], axis=1) - pre32[None]
    # Any NaN/Inf in a model (one flag per model, pretrained last; a non-finite pretrained entry makes every
    # task vector's entry non-finite too); the caller names the leaf on failure.
    bad = jnp.concatenate([_has_nonfinite(deltas, axis=1), _has_nonfinite(pre32)[None]])
    return pre32, deltas, bad

  run = _flat_program(tx, layout, per_task)

  @jax.jit
  def flags(pre32, deltas):
    return jnp.concatenate([_has_nonfinite(deltas, axis=1), _has_nonfinite(pre32)[None]])

  def merged(pre, ft, coeffs, key):
    host = _host_flat(pre, ft, paths)
    if host is not None:
      pre32, deltas = host
      bad = flags(pre32, deltas)
    else:
      pre32, deltas, bad = gather(pre, ft)
    return run(pre32, deltas, coeffs, key, pre[paths[0]].dtype), bad

  return merged


_PARALLEL_FILL = 1 << 22  # entries: below this, one thread fills the flat buffers


def _host_backed(leaves: Sequence[Any]) -> bool:
  """Whether a merge of these leaves may gather them in host buffers for the CPU backend: every JAX array lives
  on a CPU device, and NumPy inputs only when the CPU is the default backend."""
  if any(isinstance(x, jax.Array) and any(d.platform != "cpu" for d in x.devices()) for x in leaves):
    return False
  return jax.default_backend() == "cpu" or all(isinstance(x, jax.Array) for x in leaves)


def _host_flat(pre: dict, ft: Any, paths: tuple[str, ...]) -> tuple[jax.Array, jax.Array] | None:
  """On the CPU backend, the flat pretrained vector ``(N,)`` and task vectors ``(T, N)`` written straight into
  host buffers that the backend adopts without a copy: one subtraction per leaf and task at memory speed,
  instead of an XLA concatenation of every leaf (several times slower on CPU). ``None`` elsewhere (other
  backends, non-float32 leaves), where the XLA path is used."""
  models = ft if isinstance(ft, tuple) else None
  leaves = list(pre.values()) + ([x for m in models for x in m.values()] if models else list(ft.values()))
  if any(x.dtype != jnp.float32 for x in leaves) or not _host_backed(leaves):
    return None
  sizes = [int(np.prod(pre[p].shape, dtype=np.int64)) for p in paths]
  offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
  t = len(models) if models else int(ft[paths[0]].shape[0])
  pre_flat = aligned_empty((int(offsets[-1]),))
  deltas = aligned_empty((t, int(offsets[-1])))

  def fill(lo: int, hi: int) -> None:
    for j in range(lo, hi):
      p, off, n = paths[j], int(offsets[j]), sizes[j]
      base = np.asarray(pre[p]).reshape(-1)
      pre_flat[off:off + n] = base
      for i in range(t):
        row = np.asarray(models[i][p]).reshape(-1) if models else np.asarray(ft[p][i]).reshape(-1)
        np.subtract(row, base, out=deltas[i, off:off + n])

  # Two halves of the leaves (by size) on two threads: NumPy releases the GIL, and first-touch page faults
  # and memory bandwidth both scale with the cores.
  mid = int(np.searchsorted(offsets, offsets[-1] // 2))
  if 0 < mid < len(paths) and offsets[-1] >= _PARALLEL_FILL:
    from jaxmerge.stream import _pool  # noqa: PLC0415 (stream imports this module)

    other = _pool("flat-fill", 1).submit(fill, mid, len(paths))
    fill(0, mid)
    other.result()
  else:
    fill(0, len(paths))
  device = jax.devices("cpu")[0]
  return jax.device_put(pre_flat, device), jax.device_put(deltas, device)


def _split_flat(y: jax.Array, shapes: dict[str, tuple[int, ...]]) -> dict[str, jax.Array]:
  """Splits a ``(..., N)`` result into ``{path: (..., *shape)}`` leaves.

  On the CPU the leaves are views of ``y``'s buffer (no copy where a leaf's offset is 64-byte aligned, a copy
  otherwise); on accelerators, one jitted split program per structure.
  """
  lead = y.shape[:-1]
  if all(d.platform == "cpu" for d in y.devices()):
    host = np.asarray(y)
    out, off = {}, 0
    for p, shape in shapes.items():
      n = int(np.prod(shape, dtype=np.int64))
      out[p] = jax.device_put(host[..., off:off + n].reshape(lead + shape), next(iter(y.devices())))
      off += n
    return out
  return _jitted_split(tuple(shapes.items()))(y)


@functools.lru_cache(maxsize=32)
def _jitted_split(shapes: tuple[tuple[str, tuple[int, ...]], ...]) -> Callable[[jax.Array], dict]:
  def split(y):
    out, off = {}, 0
    for p, shape in shapes:
      n = int(np.prod(shape, dtype=np.int64))
      out[p] = y[..., off:off + n].reshape(y.shape[:-1] + shape)
      off += n
    return out

  return jax.jit(split)


def _flat_ok(tx: MergeTransform, coeffs: Any, pre: dict, ft: Any) -> bool:
  return tx.runs_flat and coeffs is None and len(pre) > 1 and _flat_dtype(pre, ft) is not None


@functools.lru_cache(maxsize=128)
def _leaf_then_flat(tx: MergeTransform) -> tuple[MergeTransform, MergeTransform] | None:
  """``(prefix, rest)`` for a chain whose first steps are leafwise, by-shape and task-preserving (DARE's drop)
  and whose other steps are ``flat`` and need no key (global TIES, a scale): the prefix then runs leaf by leaf,
  one program per leaf shape, and the rest on the ``(T, N)`` view, instead of one whole-model program whose
  compilation grows with the number of leaves (71 s for DARE on TIES over a ViT-B/32 at 4 tasks). ``None``
  otherwise."""
  from jaxmerge.combine import chain  # noqa: PLC0415 (combine imports this module's users)

  steps = tx.steps
  if tx.leafwise or tx.runs_flat:  # leaf by leaf, or wholly on the flat view
    return None
  k = 0
  while k < len(steps) and not steps[k].runs_flat and steps[k].leafwise and steps[k].by_shape and not steps[k].reduces:
    k += 1
  rest = steps[k:]
  if k == 0 or not rest or not all(s.runs_flat and not s.needs_key for s in rest):
    return None
  # The prefix keeps the chain's keys: step i of a chain gets fold_in(key, i), in the sub-chain too.
  return chain(*steps[:k]), chain(*rest)


@functools.lru_cache(maxsize=128)
def _compiled_prefix(prefix: MergeTransform, layout: Layout, check_finite: bool) -> Callable[..., Any]:
  """One leaf's task vectors after the leafwise prefix: ``(pre, fts, key, leaf_id) -> ((T, n) float32, bad)``."""

  def run(pre, fts, key, pid):
    d = leaf_apply(prefix, layout, "leaf", pre, fts, None, key, pid)[1]
    bad = jnp.isnan(jtree.finite_probe((pre, *fts))) if check_finite else jnp.zeros((), bool)
    return d.reshape(d.shape[0], -1), bad

  return jax.jit(run)


@functools.cache
def _jitted_concat() -> Callable[..., Any]:
  return jax.jit(lambda pre, ds: (jnp.concatenate([x.astype(jnp.float32).ravel() for x in pre]),
                                  jnp.concatenate(ds, axis=1)))


def _run_leaf_then_flat(prefix: MergeTransform, rest: MergeTransform, layout: Layout, per_task: bool, pre: dict,
                        ft: tuple, key: Any, check_finite: bool) -> tuple[jax.Array, jax.Array]:
  """The prefix leaf by leaf into one ``(T, N)`` buffer (on the CPU a host buffer written leaf by leaf, as
  :func:`_host_flat`), then ``rest`` on it. Returns the flat merged vector and the per-leaf NaN/Inf flags."""
  paths = tuple(pre)
  prog = _compiled_prefix(prefix, layout, check_finite)
  sizes = [int(np.prod(pre[p].shape, dtype=np.int64)) for p in paths]
  t, n = len(ft), int(sum(sizes))
  bad = []
  if _host_backed([*pre.values(), *(m[p] for m in ft for p in paths)]):
    pre_flat, deltas = aligned_empty((n,)), aligned_empty((t, n))
    pending, off = None, 0

    def copy(item):
      o, m, p, y = item
      deltas[:, o:o + m] = np.asarray(y)
      pre_flat[o:o + m] = np.asarray(pre[p], np.float32).reshape(-1)

    for p, m in zip(paths, sizes):
      y, b = prog(pre[p], tuple(f[p] for f in ft), key, np.uint32(jtree.leaf_id(p)))
      bad.append(b)
      if pending is not None:  # copy the previous leaf while this one's program runs
        copy(pending)
      pending, off = (off, m, p, y), off + m
    copy(pending)
    device = jax.devices("cpu")[0]
    sp = native.spec(rest) if not per_task else None
    if sp is not None and sp.op == "ties" and sp.drop is None and native.fits(t, n) and native.available():
      # The rest is global TIES: one native call on the host buffer (no flat XLA program to compile or run).
      y = native.ties_rows(deltas, pre_flat, sp)[0]
      return jax.device_put(y.astype(pre[paths[0]].dtype, copy=False), device), jnp.stack(bad)
    pre32, flat = jax.device_put(pre_flat, device), jax.device_put(deltas, device)
  else:
    ds = []
    for p in paths:
      y, b = prog(pre[p], tuple(f[p] for f in ft), key, np.uint32(jtree.leaf_id(p)))
      ds.append(y)
      bad.append(b)
    pre32, flat = _jitted_concat()(tuple(pre[p] for p in paths), tuple(ds))
  y = _flat_program(rest, layout, per_task)(pre32, flat, None, None, pre[paths[0]].dtype)
  return y, jnp.stack(bad)


BACKENDS = ("native", "leaf", "leaf_then_flat", "flat", "xla_whole", "mesh")


def _plan(tx: MergeTransform, per_task: bool, pre: dict, ft: Any, coeffs: Any, key: Any) -> tuple[str, Any]:
  """The planner: ``(backend, detail)`` for this merge, the fastest backend that can prove it runs it exactly.

  ``"mesh"`` (inputs sharded over a device mesh, detail: the mesh); ``"native"`` (global TIES, task arithmetic,
  simple averaging and DARE on them, recognized by their steps' identities, :func:`jaxmerge.native.spec`, as one
  call of the CPU kernels; detail: the spec); ``"leaf"`` (leafwise ``by_shape`` transforms leaf by leaf, one
  compiled program per leaf shape); ``"leaf_then_flat"`` (a leafwise by-shape prefix, then ``flat`` steps on the
  ``(T, N)`` view; detail: ``(prefix, rest)``); ``"flat"`` (``flat`` transforms on one ``(T, N)`` view);
  ``"xla_whole"`` (everything else: the whole-model program, slower, never wrong)."""
  models = ft if isinstance(ft, tuple) else (ft,)
  mesh = jsharding.mesh_of([*pre.values(), *(x for m in models for x in m.values())])
  if mesh is not None:
    return "mesh", mesh
  sp = _native_spec(tx, pre, ft, key) if coeffs is None and not per_task else None
  if sp is not None:
    return "native", sp
  if tx.leafwise and tx.by_shape and coeffs is None and len(pre) > 1:
    return "leaf", None
  split = _leaf_then_flat(tx) if coeffs is None and len(pre) > 1 and isinstance(ft, tuple) else None
  if split is not None and _flat_dtype(pre, ft) is not None:
    return "leaf_then_flat", split
  if _flat_ok(tx, coeffs, pre, ft):
    return "flat", None
  return "xla_whole", None


def _forced(backend: str, tx: MergeTransform, per_task: bool, pre: dict, ft: Any, coeffs: Any,
            key: Any) -> tuple[str, Any]:
  """``(backend, detail)`` for a backend the caller names; ``ValueError`` when it cannot run this merge."""
  if backend not in BACKENDS:
    raise ValueError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)} (or None: the planner's choice)")
  if backend == "xla_whole":
    return backend, None
  auto = _plan(tx, per_task, pre, ft, coeffs, key)
  if auto[0] == backend:
    return auto
  ok = {"leaf": lambda: tx.leafwise and tx.by_shape and coeffs is None and auto[0] != "mesh",
        "flat": lambda: _flat_ok(tx, coeffs, pre, ft) and auto[0] != "mesh"}
  if backend in ok and ok[backend]():
    return backend, None
  if backend == "leaf_then_flat" and auto[0] != "mesh" and coeffs is None and isinstance(ft, tuple):
    split = _leaf_then_flat(tx)
    if split is not None and _flat_dtype(pre, ft) is not None:
      return backend, split
  raise ValueError(f"backend {backend!r} cannot run this merge (the planner chose {auto[0]!r}): see "
                   "jaxmerge.merge.route for what each backend accepts")


def _run(tx: MergeTransform, layout: Layout, per_task: bool, pretrained: Params, finetuned: Any, coeffs: Any,
         key: Any, names: Sequence[str] | None, check_finite: bool, backend: str | None = None) -> tuple[dict, dict]:
  """Validates the inputs, plans the merge (:func:`_plan`, or the named ``backend``) and runs it. The NaN/Inf
  check rides along in the fast backends. Returns the merged float leaves and the copied non-float ones."""
  pre, ft, passthrough = prepare(pretrained, finetuned, names=names, check_finite=False)
  route, detail = (_forced(backend, tx, per_task, pre, ft, coeffs, key) if backend is not None
                   else _plan(tx, per_task, pre, ft, coeffs, key))
  if route == "mesh":
    return _run_on_mesh(tx, layout, per_task, pre, ft, coeffs, key, names, check_finite, detail), passthrough
  if route == "native":
    return _run_native(detail, pre, ft, names, check_finite, key), passthrough
  if route == "leaf":
    # Leaf by leaf, one compiled program per leaf shape: no copy of the inputs (task arithmetic, DARE, per-tensor
    # TIES). The NaN/Inf probe rides along in each leaf's program.
    prog = _compiled_leaf(tx, layout, per_task, check_finite)

    def rows(p):  # the leaf's T fine-tuned values (rows of a stacked leaf are sliced inside the program)
      return tuple(m[p] for m in ft) if isinstance(ft, tuple) else ft[p]

    res = {p: prog(x, rows(p), key, np.uint32(jtree.leaf_id(p))) for p, x in pre.items()}
    if check_finite and bool(jnp.any(jnp.stack([bad for _, bad in res.values()]))):
      _raise_nonfinite(pre, ft, _nonfinite_flags(pre, ft), names)  # names the model and leaf
    return {p: y for p, (y, _) in res.items()}, passthrough
  if route == "leaf_then_flat":
    y, bad = _run_leaf_then_flat(*detail, layout, per_task, pre, ft, key, check_finite)
    if check_finite and bool(jnp.any(bad)):
      _raise_nonfinite(pre, ft, _nonfinite_flags(pre, ft), names)  # names the model and leaf
    return _split_flat(y, {p: tuple(pre[p].shape) for p in pre}), passthrough
  if route == "flat":
    paths = tuple(pre)
    y, bad = _compiled_flat(tx, layout, per_task, paths)(pre, ft, coeffs, key)
    if check_finite and bool(jnp.any(bad)):
      _raise_nonfinite(pre, ft, _nonfinite_flags(pre, ft), names)  # names the model and leaf
    return _split_flat(y, {p: tuple(pre[p].shape) for p in paths}), passthrough
  if check_finite:
    _raise_nonfinite(pre, ft, _nonfinite_flags(pre, ft), names)
  return _compiled(tx, layout, per_task)(pre, ft, coeffs, key), passthrough


def route(tx: MergeTransform, pretrained: Params, finetuned: Sequence[Params] | Stacked, *,
          key: PRNGKey | None = None, coeffs: Coeffs | None = None, per_task: bool = False) -> str:
  """The backend :func:`merge` (``per_task=True``: :func:`merge_per_task`) would run these inputs on.

  One of :data:`BACKENDS`: ``"native"`` (one call of the CPU kernels: global TIES, task arithmetic, simple
  averaging and DARE on either, recognized by their steps, however the chain is spelled), ``"leaf"`` (leafwise
  path-free steps, one compiled program per leaf shape), ``"leaf_then_flat"`` (a leafwise prefix leaf by leaf,
  then flat steps on one ``(T, N)`` view), ``"flat"`` (one ``(T, N)`` program), ``"mesh"`` (inputs sharded over
  a device mesh) or ``"xla_whole"`` (the whole-model program, which runs every transform). Pass one of them as
  ``merge(..., backend=...)`` to force it (``ValueError`` when it cannot run the merge).

  Args:
    tx: the transform.
    pretrained: a pytree of arrays.
    finetuned: a list of ``T`` pytrees or one stack.
    key: the PRNG key the merge would get.
    coeffs: the coefficients the merge would get.
    per_task: plan :func:`merge_per_task` instead.

  Returns:
    The backend's name.
  """
  pre, ft, _ = prepare(pretrained, finetuned, check_finite=False)
  return _plan(tx, per_task, pre, ft, coeffs, key)[0]


def _run_on_mesh(tx: MergeTransform, layout: Layout, per_task: bool, pre: dict, ft: Any, coeffs: Any, key: Any,
                 names: Sequence[str] | None, check_finite: bool, mesh: Any) -> dict:
  """The sharded placement: inputs sharded over a mesh run under that mesh with automatic axis types (the same
  buffers, retyped: :func:`jaxmerge.sharding.auto_axes`), leafwise ``by_shape`` transforms leaf by leaf and
  everything else as the whole-model program, whose task-axis reductions then reduce along the axis
  (:func:`jaxmerge.tree.on_mesh`). Outputs come back on the inputs' mesh."""
  auto = jsharding.auto_axes(mesh)
  pre = {p: jsharding.on_mesh(x, auto) for p, x in pre.items()}
  ft = (tuple({p: jsharding.on_mesh(x, auto) for p, x in m.items()} for m in ft) if isinstance(ft, tuple)
        else {p: jsharding.on_mesh(x, auto) for p, x in ft.items()})
  with jax.set_mesh(auto):
    if check_finite:
      _raise_nonfinite(pre, ft, _nonfinite_flags(pre, ft), names)
    if tx.leafwise and tx.by_shape and coeffs is None and len(pre) > 1:
      prog = _compiled_leaf(tx, layout, per_task, False)
      rows = (lambda p: tuple(m[p] for m in ft)) if isinstance(ft, tuple) else (lambda p: ft[p])
      out = {p: prog(x, rows(p), key, np.uint32(jtree.leaf_id(p)))[0] for p, x in pre.items()}
    else:
      out = _compiled(tx, layout, per_task)(pre, ft, coeffs, key)
  return {p: jsharding.on_mesh(y, mesh) for p, y in out.items()}


def _native_spec(tx: MergeTransform, pre: dict, ft: Any, key: Any) -> Any:
  """The native kernels' spec for this merge (:func:`jaxmerge.native.spec`), or ``None`` when the transform, the
  leaves (all float32 or all bfloat16, each on one CPU device or in NumPy) or the machine (no C compiler,
  ``JAXMERGE_NATIVE=0``) do not allow it."""
  sp = native.spec(tx)
  if sp is None or not pre or (sp.drop is not None and key is None):
    return None
  paths = tuple(pre)
  stacked = not isinstance(ft, tuple)
  models = (ft,) if stacked else ft
  leaves = [*pre.values(), *(m[p] for m in models for p in paths)]
  dtypes = {np.dtype(x.dtype) for x in leaves}
  if len(dtypes) != 1 or dtypes.pop() not in native.DTYPES or not _host_backed(leaves):
    return None
  if any(isinstance(x, jax.Array) and len(x.devices()) != 1 for x in leaves):  # sharded: the XLA programs
    return None
  tasks = int(ft[paths[0]].shape[0]) if stacked else len(ft)
  sizes = [int(np.size(pre[p])) for p in paths]
  if not native.fits(tasks, sum(sizes), sp, sizes) or not native.available():
    return None
  return sp


def _run_native(sp: Any, pre: dict, ft: Any, names: Sequence[str] | None, check_finite: bool, key: Any) -> dict:
  """Global TIES, task arithmetic, simple averaging and DARE on either as one call of the native CPU kernels
  (:mod:`jaxmerge.native`): the same result as the XLA programs, without a flat copy of the task vectors or a
  compilation."""
  paths = tuple(pre)
  stacked = not isinstance(ft, tuple)
  # DARE's drop is the chain's first step: its key is fold_in(key, 0), as jaxmerge.chain gives it.
  keys = native.dare_keys(jax.random.fold_in(key, 0), paths) if sp.drop is not None else None
  fts = [ft[p] for p in paths] if stacked else [[m[p] for p in paths] for m in ft]
  out, _, bad = native.run(sp, [pre[p] for p in paths], fts, keys=keys, stacked=stacked)
  if check_finite and bool(jnp.any(bad)):
    _raise_nonfinite(pre, ft, _nonfinite_flags(pre, ft), names)  # names the model and leaf
  return dict(zip(paths, out))


def _check_tx(tx: MergeTransform, key: PRNGKey | None, per_task: bool) -> None:
  if not isinstance(tx, MergeTransform):
    raise ValueError(f"expected a MergeTransform (e.g. jm.get_method('ties')()), got {type(tx).__name__}")
  if tx.needs_key and key is None:
    raise ValueError("this merge is stochastic and needs a PRNG key: pass key=jax.random.key(seed)")
  if per_task and tx.kind == REDUCE:
    raise ValueError("merge_per_task needs a task-preserving transform; this one reduces over tasks (use merge)")
  if not per_task and tx.kind != REDUCE:
    raise ValueError(
        "this transform keeps the task axis (one model per task, e.g. emr, tall_mask, byom): use "
        "jm.merge_per_task, or end the chain with a reduction"
    )


def _assemble(pretrained: Params, merged: dict, passthrough: dict, per_task: bool) -> Any:
  if per_task:
    t = next(iter(merged.values())).shape[0]
    return [
        jtree.unflatten_paths(pretrained, {**{p: x[i] for p, x in merged.items()}, **passthrough}) for i in range(t)
    ]
  return jtree.unflatten_paths(pretrained, {**merged, **passthrough})


def leaf_apply(tx: MergeTransform, layout: Layout, path: str, pre: jax.Array, fts: Sequence[jax.Array],
               coeffs: Any, key: Any, pid: Any) -> tuple[jax.Array, jax.Array]:
  """Inside a leaf program: the float32 pretrained leaf and ``tx`` applied to the leaf's ``(T, ...)`` task vectors
  (``coeffs=None``: ``tx.init``). Shared by every leaf program of both engines.

  ``pid`` is the leaf's id (:func:`jaxmerge.tree.leaf_id` of ``path``), usually a traced argument: the leaf's
  random key then folds it in as a value (:func:`jaxmerge.tree.traced_leaf_ids`), so a ``by_shape`` transform's
  program serves every leaf of the same shape."""
  with jtree.traced_leaf_ids({path: pid}):
    pre32, d = jtree.leaf_task_vectors(pre, fts)
    tree = {path: d}
    c = tx.init(tree) if coeffs is None else coeffs
    return pre32, tx.apply(c, tree, key=key, ctx=MergeContext(pretrained={path: pre32}, layout=layout))[path]


def merge_leaf(tx: MergeTransform, layout: Layout, per_task: bool, path: str, pre: jax.Array,
               fts: Sequence[jax.Array], coeffs: Any, key: Any, pid: Any) -> jax.Array:
  """One leaf's merge inside a leaf program: :func:`leaf_apply` plus the pretrained leaf; float32."""
  pre32, out = leaf_apply(tx, layout, path, pre, fts, coeffs, key, pid)
  return (pre32[None] if per_task else pre32) + out


@functools.lru_cache(maxsize=128)
def _compiled_leaf(tx: MergeTransform, layout: Layout, per_task: bool, check_finite: bool) -> Callable[..., Any]:
  """One leaf's merge for a leafwise ``by_shape`` transform: ``(pre, fts, key, leaf_id) -> (leaf, bad)``, ``fts``
  the leaf's ``T`` fine-tuned values, ``bad`` a scalar NaN/Inf probe of the leaf's inputs (``False`` without
  ``check_finite``).

  The leaf's id is an argument and the path a placeholder (a ``by_shape`` step reads the path only through its
  key), so every leaf of a shape and dtype shares one compiled program: a whole-model program grows with the
  number of leaves (DARE's random draws made it a 26 s compilation for a ViT-B/32), this one with the number of
  distinct shapes."""

  def run(pre, fts, key, pid):
    y = merge_leaf(tx, layout, per_task, "leaf", pre, fts, None, key, pid).astype(pre.dtype)
    return y, (jnp.isnan(jtree.finite_probe((pre, *fts))) if check_finite else jnp.zeros((), bool))

  return jax.jit(run)


def merge(
    tx: MergeTransform,
    pretrained: Params,
    finetuned: Sequence[Params] | Stacked,
    *,
    key: PRNGKey | None = None,
    coeffs: Coeffs | None = None,
    layout: Layout | None = None,
    names: Sequence[str] | None = None,
    check_finite: bool = True,
    backend: str | None = None,
) -> Params:
  """Merges fine-tuned models into one model.

  Args:
    tx: a reducing :class:`~jaxmerge.base.MergeTransform` (e.g. ``jm.get_method("ties")()``).
    pretrained: any pytree of arrays.
    finetuned: a list of ``T`` pytrees with the same structure, or one stack (leading task axis).
    key: PRNG key for stochastic methods (DARE, DELLA).
    coeffs: coefficients to use instead of ``tx.init(...)`` (sweeps and learned values: no recompilation).
    layout: how 2-D leaves are read as ``(out, in)`` matrices; default
      :func:`jaxmerge.filters.hf_layout`, use :func:`jaxmerge.filters.flax_layout` for Flax models.
    names: model names used in error messages.
    check_finite: reject NaN/Inf weights before merging.
    backend: run on this backend (one of :data:`BACKENDS`, see :func:`route`) instead of the planner's choice;
      ``"xla_whole"`` runs any transform. ``ValueError`` when the backend cannot run the merge.

  Returns:
    The merged parameters, with ``pretrained``'s structure and dtypes.

  Raises:
    ValueError: mismatched structure, shapes or dtypes (naming model and path), empty task list, NaN/Inf,
      a stochastic method without a key, or a per-task method (use :func:`merge_per_task`).

  >>> import jax.numpy as jnp, jaxmerge as jm
  >>> pre = {"w": jnp.zeros(2)}
  >>> fts = [{"w": jnp.array([1.0, 0.0])}, {"w": jnp.array([0.0, 3.0])}]
  >>> jm.merge(jm.get_method("task_arithmetic")(scale=0.5), pre, fts)["w"].tolist()
  [0.5, 1.5]
  """
  _check_tx(tx, key, per_task=False)
  merged, passthrough = _run(tx, layout or jfilters.hf_layout, False, pretrained, finetuned, coeffs, key, names,
                             check_finite, backend)
  return _assemble(pretrained, merged, passthrough, False)


def merge_per_task(
    tx: MergeTransform,
    pretrained: Params,
    finetuned: Sequence[Params] | Stacked,
    *,
    key: PRNGKey | None = None,
    coeffs: Coeffs | None = None,
    layout: Layout | None = None,
    names: Sequence[str] | None = None,
    check_finite: bool = True,
    backend: str | None = None,
) -> list[Params]:
  """Builds one model per task with a task-preserving transform (EMR, TALL masks, BYOM, TSV-C).

  Same arguments as :func:`merge`; returns a list of ``T`` parameter pytrees, model ``t`` for task ``t``.

  Args:
    tx: a task-preserving :class:`~jaxmerge.base.MergeTransform`.
    pretrained: any pytree of arrays.
    finetuned: a list of ``T`` pytrees, or one stack (leading task axis).
    key: PRNG key for stochastic methods.
    coeffs: coefficients to use instead of ``tx.init(...)``.
    layout: matrix layout (default :func:`jaxmerge.filters.hf_layout`).
    names: model names used in error messages.
    check_finite: reject NaN/Inf weights before merging.
    backend: as :func:`merge`.

  Returns:
    A list of ``T`` pytrees with ``pretrained``'s structure and dtypes.
  """
  _check_tx(tx, key, per_task=True)
  merged, passthrough = _run(tx, layout or jfilters.hf_layout, True, pretrained, finetuned, coeffs, key, names,
                             check_finite, backend)
  return _assemble(pretrained, merged, passthrough, True)


def make_merger(tx: MergeTransform, layout: Layout | None = None) -> Callable[..., Params]:
  """A jitted ``(pretrained, stacked, coeffs=None, key=None) -> merged`` for flat float ``{path: array}``
  dicts, without host-side validation (for loops and sweeps; validate once with :func:`prepare`).

  Args:
    tx: a reducing transform.
    layout: matrix layout (default :func:`jaxmerge.filters.hf_layout`).

  Returns:
    ``merger(pretrained, stacked, coeffs=None, key=None) -> merged`` (a flat dict of float leaves).
  """
  _check_tx(tx, jax.random.key(0) if tx.needs_key else None, per_task=False)
  fn = _compiled(tx, layout or jfilters.hf_layout, False)

  def merger(pretrained, stacked, coeffs=None, key=None):
    return fn(pretrained, stacked, coeffs, key)

  return merger
