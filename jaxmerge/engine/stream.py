"""Streaming merges: checkpoints in, merged checkpoint out, one tensor at a time.

A model larger than memory (an LLM, or a ViT-L stack of 20 tasks) never has to be held whole. For each
parameter, :func:`merge_leafwise` reads the pretrained tensor and the ``T`` fine-tuned tensors from lazy
readers (:class:`jaxmerge.io.safetensors_io.TensorReader`), runs the merge on that one leaf in a jitted
function, and hands the result to a writer (:class:`jaxmerge.io.safetensors_io.ShardedWriter` writes it to its
place in a sharded safetensors checkpoint). Peak memory is a few tensors times ``T`` (the next leaf is read
while the current one is merged).

- **Same results as in memory.** The leaf function is exactly :func:`jaxmerge.merge`'s program restricted to
  one leaf: float32 task vectors, the transform with the leaf's own path and matrix layout, the result cast to
  the output dtype. Random steps draw from keys derived from each leaf's path (:func:`jaxmerge.tree.leaf_key`),
  so DARE or DELLA masks are the ones an in-memory merge draws.
- **One compile per distinct leaf program.** Each leaf is traced with its real path (a partition or filter may
  depend on it) and lowered; the compiled executable is cached by the lowered program's text, so leaves that
  differ only by name (every layer of a transformer) share one compile: one per distinct (shape, dtype, label).
  Programs that cannot read the path (by-leaf transforms, :data:`jaxmerge.engine.xla.BY_LEAF`, such as task
  arithmetic or mergekit's per-tensor TIES, and every step of the multi-pass plans) are traced and lowered once
  per argument type, not once per tensor; for leafwise ones every program is compiled ahead, in background
  threads, while the first tensors are read.
  Random methods fold the path into the key as a number; with ``jaxmerge.tree.traced_leaf_ids`` (a proposed hook)
  that number is an argument and they compile once per shape too; without it they compile once per leaf.
- **The host keeps the cores busy.** Reading, merging and writing overlap: the next tensor is read (its
  checkpoints in parallel) while the current one merges, the merged tensor is fetched and written by a
  background thread while the next one merges (JAX dispatches asynchronously), and the writer flushes its
  files to disk behind the merge. Reads go into recycled 64-byte aligned buffers, which JAX's CPU backend uses
  in place: each tensor is copied once, from the file, and fresh pages (whose page faults cost more than the
  copy) are only taken for the first tensors of each shape. The NaN/Inf check is one scalar per tensor (the
  sum of ``x * 0`` over every input), computed behind an optimization barrier so that XLA does not fuse it
  into the merge's loop (which made the leaf program 5x slower); only when it fires are the inputs checked on
  the host, to name the offending model.
- **Global methods in two passes.** Transforms that are not leafwise need statistics over the whole model
  (TIES's per-task magnitude threshold, Localize-and-Stitch's, BYOM's, EMR's rescalers). :func:`merge_streaming`
  runs them exactly: first passes accumulate the statistics tensor by tensor (exact order statistics with
  :class:`jaxmerge.stats.KthSmallest`), the last pass applies them. :func:`streamable_methods` lists
  what can stream; anything else raises ``ValueError`` naming it.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import hashlib
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxmerge import filters as jfilters
from jaxmerge import transforms as T
from jaxmerge import tree as jtree
from jaxmerge.base import REDUCE, MergeTransform, identity_of, steps_of
from jaxmerge.combine import chain
from jaxmerge.engine import host, native
from jaxmerge.engine.xla import accepts, leaf_apply, merge_leaf, runs_by_leaf
from jaxmerge.reductions import disjoint_rows, elect
from jaxmerge.registry import list_methods, method_info
from jaxmerge.stats import KthSmallest, high_histogram, low_histogram

__all__ = ["LEAFWISE", "DictReader", "DictWriter", "StreamResult", "is_float_dtype", "is_reader", "leafwise",
           "merge_leafwise", "merge_streaming", "method_plan", "plan_of", "streamable_methods", "two_pass_methods"]

Layout = Callable[[str, jax.ShapeDtypeStruct], Any]


class DictReader:
  """A :class:`~jaxmerge.io.safetensors_io.TensorReader` over an in-memory ``{name: array}`` dict (or pytree)."""

  def __init__(self, params: Any, path: str = "<memory>"):
    self._d = {k: np.asarray(v) for k, v in jtree.flatten_paths(params).items()}
    self.path = path

  def keys(self):
    return self._d.keys()

  def __iter__(self):
    return iter(self._d)

  def __contains__(self, name: object) -> bool:
    return name in self._d

  def __len__(self) -> int:
    return len(self._d)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._d[name].shape)

  def dtype(self, name: str) -> np.dtype:
    return self._d[name].dtype

  def get(self, name: str) -> np.ndarray:
    return self._d[name]


class DictWriter(dict):
  """A writer that keeps the merged tensors in a dict (``write(name, array)``)."""

  def write(self, name: str, array: Any) -> None:
    self[name] = np.asarray(array)


class StreamResult(NamedTuple):
  """What a streaming merge did.

  Attributes:
    tensors: tensors written (per output model).
    programs: distinct compiled leaf programs it ran (one per distinct shape, dtype and label per pass).
    compiles: how many of them were compiled now (the others came from the process-wide cache).
    passes: passes over the inputs.
    seconds: wall time.
    lowerings: leaf programs traced and lowered (once per argument type and step for programs that do not read
      the leaf's path: flat transforms and the multi-pass plans; once per tensor otherwise).
  """

  tensors: int
  programs: int
  compiles: int
  passes: int
  seconds: float
  lowerings: int = 0


# ----------------------------------------------------------------------------------------------------------
# Reading, compiling, writing.


def _path_id(path: str) -> np.ndarray:
  return np.uint32(jtree.leaf_id(path))


_PROGRAMS: "collections.OrderedDict[bytes, Any]" = collections.OrderedDict()
_MAX_PROGRAMS = 512


class _Compiler:
  """Compiles leaf programs, caching executables by the text of the lowered program (see the module docstring).

  The cache is shared by every streaming merge in the process (least recently used programs are dropped past
  512), so repeated merges of the same architecture compile nothing.
  """

  def __init__(self):
    self.programs: set[bytes] = set()
    self.compiles = 0
    self.lowerings = 0
    self._known: dict[tuple[Any, str], tuple[bytes, Any]] = {}
    self._lock = threading.Lock()
    self._warming: dict[tuple[Any, str], concurrent.futures.Future] = {}

  @staticmethod
  def _sig(args: tuple) -> str:
    # The calling convention (argument tree and types, unused arguments included) is part of the key.
    return repr((jax.tree.structure(args), [(tuple(x.shape) if hasattr(x, "shape") else np.shape(x),
                                             str(getattr(x, "dtype", type(x)))) for x in jax.tree.leaves(args)]))

  def _build(self, fn: Callable[..., Any], args: tuple, sig: str) -> tuple[bytes, Any]:
    lowered = jax.jit(fn).lower(*args)
    digest = hashlib.sha1((sig + lowered.as_text()).encode()).digest()
    with self._lock:
      self.lowerings += 1
      exe = _PROGRAMS.get(digest)
      if exe is not None:
        _PROGRAMS.move_to_end(digest)
    if exe is None:
      exe = lowered.compile()
      with self._lock:
        _PROGRAMS[digest] = exe
        self.compiles += 1
        while len(_PROGRAMS) > _MAX_PROGRAMS:
          _PROGRAMS.popitem(last=False)
    return digest, exe

  def warm(self, fn: Callable[..., Any], *args: Any, same_as: Any) -> None:
    """Starts compiling ``fn`` for ``args`` (arrays or ``jax.ShapeDtypeStruct``) in a background thread, so
    that compilation overlaps reading and merging; a later call with the same token and argument types uses it.
    """
    key = (same_as, self._sig(args))
    with self._lock:
      if key in self._known or key in self._warming:
        return
      self._warming[key] = host.pool("compile", 2).submit(self._build, fn, args, key[1])

  def close(self) -> None:
    """Drops the background compilations that have not started and waits for the running ones."""
    with self._lock:
      warming, self._warming = list(self._warming.values()), {}
    concurrent.futures.wait([f for f in warming if not f.cancel()])

  def __call__(self, fn: Callable[..., Any], *args: Any, same_as: Any = None) -> Any:
    """Runs ``fn(*args)`` compiled.

    ``same_as``: a hashable token the caller guarantees determines ``fn``'s program up to the arguments' types
    (e.g. a plan step whose program never reads the leaf's path). Calls with the same token and argument types
    skip tracing and lowering (tracing and lowering are most of a streaming merge's time otherwise: tens of ms
    per tensor and pass); without it, every call is lowered and the executable is looked up by its text.
    """
    sig = self._sig(args)
    if same_as is not None:
      key = (same_as, sig)
      with self._lock:
        warming = self._warming.pop(key, None)
      if warming is not None:
        self._known[key] = warming.result()
      hit = self._known.get(key)
      if hit is not None and hit[0] in _PROGRAMS:
        self.programs.add(hit[0])
        return hit[1](*args)
    digest, exe = self._build(fn, args, sig)
    self.programs.add(digest)
    if same_as is not None:
      self._known[(same_as, sig)] = (digest, exe)
    return exe(*args)


def is_float_dtype(dt: Any) -> bool:
  """Whether ``dt`` is a floating dtype (bfloat16 included): the tensors that are merged; others are copied.

  Args:
    dt: a dtype.

  Returns:
    ``True`` for floating dtypes.
  """
  return jnp.issubdtype(jnp.dtype(dt), jnp.floating)


class _Inputs:
  """Aligned readers, the parameter order, and a prefetching iterator over ``(name, pre, [ft...])``."""

  def __init__(self, pretrained: Any, models: Sequence[Any], names: Sequence[str] | None, prefetch: bool):
    pre = pretrained if is_reader(pretrained) else DictReader(pretrained)
    fts = [m if is_reader(m) else DictReader(m, f"model {i}") for i, m in enumerate(models)]
    self.pre, self.models = pre, fts
    self.names = list(names) if names is not None else [str(m.path) for m in fts]
    keys = list(pre.keys())
    for label, m in zip(self.names, fts):  # (checkpoints are aligned by jaxmerge.stream, with jaxmerge.io.llm)
      bad = set(m.keys()) ^ set(keys) or [k for k in keys if tuple(m.shape(k)) != tuple(pre.shape(k))]
      if bad:
        raise ValueError(f"{label} does not match the pretrained model's parameters or shapes: {sorted(bad)[:10]}")
    self.order = list(self.pre.keys())
    self.floats = [k for k in self.order if is_float_dtype(self.pre.dtype(k))]
    self.prefetch = prefetch
    self.passes = 0
    self._lock = threading.Lock()
    self._free: dict[tuple[str, tuple[int, ...]], list[np.ndarray]] = {}
    self._lent: dict[int, tuple[tuple[str, tuple[int, ...]], weakref.ref]] = {}

  def _get(self, reader: Any, name: str) -> np.ndarray:
    """``reader.get(name)``, into a recycled buffer of the same shape and dtype when one is free (fresh pages
    cost more than the copy itself: page faults make a read into new memory several times slower)."""
    if not getattr(reader, "reads_into", False):
      return reader.get(name)
    key = (np.dtype(reader.dtype(name)).str, tuple(reader.shape(name)))
    with self._lock:
      free = self._free.get(key)
      buf = free.pop() if free else None
    x = reader.get(name, out=buf) if buf is not None else reader.get(name)
    if isinstance(x, np.ndarray) and (x.dtype.str, x.shape) == key and x.ctypes.data % 64 == 0:
      with self._lock:  # (a weak reference: a dead array's id may be reused by an array that is not ours)
        self._lent[id(x)] = (key, weakref.ref(x))
    return x

  def recycle(self, *arrays: Any) -> None:
    """Gives buffers returned by :meth:`tensors` back for later reads. The caller guarantees that nothing uses
    them any more (their merged result has been fetched)."""
    with self._lock:
      for a in arrays:
        lent = self._lent.pop(id(a), None)
        if lent is not None and lent[1]() is a:
          free = self._free.setdefault(lent[0], [])
          if len(free) < 2 * (1 + len(self.models)):
            free.append(a)

  def read(self, name: str, pool: concurrent.futures.Executor | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
    """The pretrained tensor and the models' tensors ``name`` (read concurrently when given a ``pool``)."""
    readers = (self.pre, *self.models)
    if pool is None:
      got = [self._get(r, name) for r in readers]
    else:
      got = [f.result() for f in [pool.submit(self._get, r, name) for r in readers]]
    return got[0], got[1:]

  def tensors(self, names: Sequence[str] | None = None) -> Iterator[tuple[str, np.ndarray, list[np.ndarray]]]:
    """One pass over the float tensors, reading the next one in the background (its checkpoints in parallel)."""
    names = list(self.floats if names is None else names)
    self.passes += 1
    if not self.prefetch or len(names) < 2:
      for n in names:
        yield (n, *self.read(n))
      return
    pool, readers = host.pool("prefetch", 1), host.pool("read", 4)
    nxt = pool.submit(self.read, names[0], readers)
    try:
      for i, n in enumerate(names):
        pre, fts = nxt.result()
        if i + 1 < len(names):
          nxt = pool.submit(self.read, names[i + 1], readers)
        yield n, pre, fts
        del pre, fts
    finally:
      nxt.cancel() or concurrent.futures.wait([nxt])

  def total(self) -> int:
    return sum(int(np.prod(self.pre.shape(k), dtype=np.int64)) for k in self.floats)


def is_reader(x: Any) -> bool:
  """Whether ``x`` is a lazy reader rather than an in-memory pytree.

  Args:
    x: a model: a pytree, or a reader.

  Returns:
    ``True`` when ``x`` has callable ``shape`` and ``dtype`` methods and a ``get`` method.
  """
  return callable(getattr(x, "shape", None)) and callable(getattr(x, "dtype", None)) and hasattr(x, "get")


def _out_dtype_fn(out_dtype: Any, pre: Any) -> Callable[[str], np.dtype]:
  if callable(out_dtype) and not isinstance(out_dtype, (type, np.dtype)):
    return out_dtype
  if out_dtype is not None:
    dt = jnp.dtype(out_dtype)
    return lambda name: dt if is_float_dtype(pre.dtype(name)) else pre.dtype(name)
  if hasattr(pre, "out_dtype"):
    return pre.out_dtype
  return pre.dtype


def _writers(writer: Any, per_task: bool, t: int) -> list[Any]:
  if per_task:
    ws = list(writer)
    if len(ws) != t:
      raise ValueError(f"a per-task merge of {t} tasks needs {t} writers, got {len(ws)}")
    return ws
  return [writer]


def _write(ws: list[Any], name: str, out: Any, per_task: bool) -> None:
  out = np.asarray(jax.device_get(out))
  if per_task:
    for i, w in enumerate(ws):
      w.write(name, out[i])
  else:
    ws[0].write(name, out)


def _check_flags(flags: Any, name: str, names: Sequence[str], pre: Any, fts: Sequence[Any]) -> None:
  """Raises if the probe of :func:`_finite_flags` is NaN, naming the offending models (checked on the host,
  only then)."""
  if not np.isnan(np.asarray(jax.device_get(flags))).any():
    return
  bad = [who for who, x in zip(["pretrained model", *names], (pre, *fts))
         if not np.isfinite(np.asarray(x, np.float32)).all()]
  raise ValueError(f"{', '.join(bad) or 'an input'}: parameter {name!r} contains NaN or Inf values")


def _finite_flags(pre: jax.Array, fts: Sequence[jax.Array]) -> jax.Array:
  """NaN iff some input entry of the tensor is NaN or Inf (:func:`jaxmerge.tree.finite_probe`)."""
  return jtree.finite_probe((pre, *fts))


def _no_flags() -> jax.Array:
  return jnp.zeros((), jnp.float32)


def _overlapped(items: Iterable[Any], dispatch: Callable[[Any], Any], finish: Callable[[Any, Any], None]) -> None:
  """``finish(item, dispatch(item))`` for every item, with each ``finish`` called after the next item's
  ``dispatch``: JAX runs a dispatched program asynchronously, so the host work on one tensor's result (checks,
  the device-to-host copy, writing) overlaps the next tensor's computation."""
  prev = None
  for item in items:
    result = dispatch(item)
    if prev is not None:
      finish(*prev)
    prev = (item, result)
    del result
  if prev is not None:
    finish(*prev)


class _WriteBehind:
  """Writes merged tensors in one background thread (the device-to-host copy and the file write overlap the next
  tensors' reading and computing), with at most ``depth`` tensors waiting; a write's error is raised by the
  next :meth:`write` or on leaving the ``with`` block (which waits for every pending write)."""

  def __init__(self, ws: list[Any], depth: int = 2):
    self.ws, self.depth = ws, depth
    self.pool = host.pool("write", 1)
    self.pending: collections.deque[concurrent.futures.Future] = collections.deque()

  def write(self, name: str, out: Any, per_task: bool) -> None:
    while len(self.pending) >= self.depth:
      self.pending.popleft().result()
    self.pending.append(self.pool.submit(_write, self.ws, name, out, per_task))

  def __enter__(self) -> _WriteBehind:
    return self

  def __exit__(self, *exc: Any) -> None:
    first = None
    while self.pending:  # wait for every write; the first error is raised unless one is already propagating
      e = self.pending.popleft().exception()
      first = first or e
    if first is not None and exc[0] is None:
      raise first


def _write_pass(inp: _Inputs, ws: list[Any], dispatch: Callable[..., Any], per_task: bool, check_finite: bool,
                names: Sequence[str] | None = None, extra: Callable[..., None] | None = None) -> None:
  """One pass that merges and writes tensors: ``dispatch(name, pre, fts) -> (out, flags, *rest)`` runs a
  tensor's program; then, one tensor later (:func:`_overlapped`), its NaN/Inf probe is checked, ``extra(name,
  *rest)`` receives any further outputs, its read buffers are recycled and ``out`` is written in the background
  (:class:`_WriteBehind`)."""

  def finish(item, result):
    name, pre, fts = item
    out, flags, *rest = result
    if check_finite:
      _check_flags(flags, name, inp.names, pre, fts)
    if extra is not None:
      extra(name, *rest)
    jax.block_until_ready(out)  # the inputs are free once the program has run
    inp.recycle(pre, *fts)
    behind.write(name, out, per_task)

  with _WriteBehind(ws) as behind:
    _overlapped(inp.tensors(names), lambda item: dispatch(*item), finish)


def _copy_non_float(inp: _Inputs, ws: list[Any]) -> None:
  for name in inp.order:
    if name not in inp.floats:
      x = inp.pre.get(name)
      for w in ws:
        w.write(name, x)


# ----------------------------------------------------------------------------------------------------------
# Leafwise transforms.

_LEAFWISE_FACTORIES = (
    "per_task", "across_tasks", "per_leaf", "identity", "scale", "scale_tasks", "sum_tasks", "mean_tasks",
    "weighted_sum", "drop", "magprune", "outlier_mask", "tall_masks", "consensus_mask", "emr_unified", "nan_reduce",
    "slerp_reduce", "model_stock_reduce", "matrix_transform",
)

# This backend's table: the steps whose result for a leaf depends on that leaf alone (streamed in one pass,
# tensor by tensor). {factory: rule on its identity}; a step without an identity (a user's own) is not in it.
LEAFWISE: dict[str, Callable[[tuple], bool]] = {
    **{name: (lambda i: True) for name in _LEAFWISE_FACTORIES},
    "trim": lambda i: i[2] == "leaf",  # (density, scope, count)
    "disjoint_merge": lambda i: i[2] == "leaf" or i[3] == "positive",  # (merge_func, sign_scope, zero_sign)
    "knots_merge": lambda i: leafwise(i[1]),  # (base, ...): leafwise around a leafwise base
    "partition": lambda i: all(leafwise(t) for _, t in i[1]),  # ((label, step), ...), labels
}


def leafwise(tx: MergeTransform) -> bool:
  """Whether each leaf's result of ``tx`` depends on that leaf alone (:data:`LEAFWISE`, chains read through),
  so that it streams in one pass.

  Args:
    tx: a merge step.

  Returns:
    ``False`` for a step the table does not hold (a user's own ``MergeTransform``: its ``apply`` may read the
    whole model); :func:`jaxmerge.per_leaf`, :func:`jaxmerge.per_task` and :func:`jaxmerge.across_tasks` steps
    are leafwise by construction.
  """
  return accepts(LEAFWISE, tx)


def merge_leafwise(
    tx: MergeTransform,
    pretrained: Any,
    models: Sequence[Any],
    writer: Any,
    *,
    key: jax.Array | None = None,
    coeffs: Any = None,
    layout: Layout | None = None,
    names: Sequence[str] | None = None,
    per_task: bool | None = None,
    out_dtype: Any = None,
    check_finite: bool = True,
    prefetch: bool = True,
) -> StreamResult:
  """Merges checkpoints tensor by tensor with a *leafwise* transform.

  Args:
    tx: a :func:`leafwise` transform (each leaf's result depends on that leaf alone).
    pretrained: a lazy reader (``keys``, ``shape``, ``dtype``, ``get``) or an in-memory pytree.
    models: one reader or pytree per task.
    writer: ``writer.write(name, array)`` receives each merged tensor; for per-task transforms, a sequence of
      ``T`` writers (one model per task).
    key: PRNG key for stochastic transforms (the same masks as :func:`jaxmerge.merge` with this key).
    coeffs: coefficients passed to every leaf instead of ``tx.init`` (they must not depend on the tree's
      structure, e.g. a global scale).
    layout: matrix layout (default :func:`jaxmerge.filters.hf_layout`).
    names: model names for error messages (default: the readers' paths).
    per_task: whether ``tx`` keeps the task axis (default: ``tx.kind != "reduce"``).
    out_dtype: output dtype for floating tensors (default: the pretrained dtypes).
    check_finite: reject NaN/Inf inputs (checked tensor by tensor; the error names model and parameter).
    prefetch: read the next tensor while merging the current one.

  Returns:
    A :class:`StreamResult`.

  Raises:
    ValueError: a non-leafwise transform (use :func:`merge_streaming`), mismatched checkpoints, NaN/Inf, or a
      stochastic transform without a key.
  """
  if not leafwise(tx):
    raise ValueError("this transform is not leafwise (it needs statistics over the whole model); use "
                     f"jaxmerge.stream.merge_streaming, which streams {', '.join(two_pass_methods())} in two passes")
  if tx.needs_key and key is None:
    raise ValueError("this merge is stochastic and needs a PRNG key: pass key=jax.random.key(seed)")
  t0 = time.perf_counter()
  inp = _Inputs(pretrained, models, names, prefetch)
  per_task = tx.kind != REDUCE if per_task is None else per_task
  ws = _writers(writer, per_task, len(inp.models))
  layout = layout or jfilters.hf_layout
  odt = _out_dtype_fn(out_dtype, inp.pre)
  comp = _Compiler()
  key = key if key is not None else jax.random.key(0)

  def make(path: str, dt: np.dtype):
    def leaf(pre, fts, coeffs, key, pid):
      res = merge_leaf(tx, layout, per_task, path, pre, fts, coeffs, key, pid).astype(dt)
      return res, (_finite_flags(pre, fts) if check_finite else _no_flags())

    return leaf

  def dispatch(name, pre, fts):
    dt = np.dtype(odt(name))
    # A by-shape transform's leaf program never reads the path (no per-leaf keys, labels or layouts).
    same = ("leaf", str(dt)) if by_leaf else None
    return comp(make(name, dt), pre, tuple(fts), coeffs, key, _path_id(name), same_as=same)

  by_leaf = runs_by_leaf(tx)
  if by_leaf:  # one program per argument type: compile them all in the background while the merge starts
    for name in inp.floats:
      dt = np.dtype(odt(name))
      spec = [jax.ShapeDtypeStruct(tuple(r.shape(name)), np.dtype(r.dtype(name))) for r in (inp.pre, *inp.models)]
      comp.warm(make(name, dt), spec[0], tuple(spec[1:]), coeffs, key, _path_id(name), same_as=("leaf", str(dt)))
  try:
    _write_pass(inp, ws, dispatch, per_task, check_finite)
  finally:
    comp.close()
  _copy_non_float(inp, ws)
  return StreamResult(len(inp.order), len(comp.programs), comp.compiles, inp.passes, time.perf_counter() - t0,
                      comp.lowerings)


# ----------------------------------------------------------------------------------------------------------
# Two-pass plans for global methods.


class _Plan(NamedTuple):
  """How a registered non-leafwise method streams.

  Attributes:
    run: ``run(inp, ws, key, layout, odt, check_finite, comp) -> None``.
    per_task: whether it writes one model per task.
  """

  run: Callable[..., None]
  per_task: bool


def _hp(name: str, hparams: Mapping[str, Any]) -> dict:
  info = method_info(name)
  unknown = sorted(set(hparams) - set(info.hparams))
  if unknown:
    raise ValueError(f"unknown hyperparameter(s) {unknown} for method {name!r}; valid: {sorted(info.hparams)}")
  return {**info.hparams, **hparams}


def _ranks_reference(n: int, density: float) -> int:
  """FusionBench's count rule: the threshold is the ``(n - int(n d))``-th smallest (0 -> keep everything)."""
  return n - int(n * density)


def _distinct_specs(inp: _Inputs) -> dict[str, tuple[jax.ShapeDtypeStruct, tuple[jax.ShapeDtypeStruct, ...]]]:
  """One float tensor per distinct argument type (shapes and dtypes of the pretrained and fine-tuned tensors),
  as ``{name: (pretrained spec, fine-tuned specs)}``: what the programs of a path-free plan step compile for."""
  out, seen = {}, set()
  for name in inp.floats:
    specs = [jax.ShapeDtypeStruct(tuple(r.shape(name)), np.dtype(r.dtype(name))) for r in (inp.pre, *inp.models)]
    sig = tuple((x.shape, str(x.dtype)) for x in specs)
    if sig not in seen:
      seen.add(sig)
      out[name] = (specs[0], tuple(specs[1:]))
  return out


def _thresholds(inp: _Inputs, comp: _Compiler, values: Callable[[str], Callable[..., jax.Array]],
                ranks: np.ndarray, args: Callable[[str], tuple], path_free: bool = True) -> np.ndarray:
  """Exact per-task ``ranks``-th smallest of ``values(name)(pre, fts, *args(name))`` over every tensor: two
  passes, each tensor's histogram computed inside its leaf program (:mod:`jaxmerge.stats`).
  ``path_free``: ``values(name)``'s program does not depend on ``name`` (one trace per argument type)."""
  sel = KthSmallest(ranks, inp.total())
  token = object() if path_free else None

  def count(name: str) -> int:
    return int(np.prod(inp.pre.shape(name), dtype=np.int64))

  def high_fn(f):
    return lambda pre, fts, *a: high_histogram(f(pre, fts, *a))

  def low_fn(f):
    return lambda pre, fts, hi, *a: low_histogram(f(pre, fts, *a), hi)

  if path_free:  # both passes' programs, one per argument type, compile in the background from the start
    hi_spec = jax.ShapeDtypeStruct(sel.ranks.shape, np.int32)
    for name, (pre, fts) in _distinct_specs(inp).items():
      comp.warm(high_fn(values(name)), pre, fts, *args(name), same_as=(token, "high"))
      comp.warm(low_fn(values(name)), pre, fts, hi_spec, *args(name), same_as=(token, "low"))

  def high(item):
    name, pre, fts = item
    return comp(high_fn(values(name)), pre, tuple(fts), *args(name), same_as=token and (token, "high"))

  # Each histogram is fetched after the next tensor's program is dispatched (see _overlapped).
  _overlapped(inp.tensors(), high, lambda item, h: sel.add_high(h, count(item[0])))
  sel.finish_high()
  hi = sel.buckets

  def low(item):
    name, pre, fts = item
    return comp(low_fn(values(name)), pre, tuple(fts), hi, *args(name), same_as=token and (token, "low"))

  _overlapped(inp.tensors(), low, lambda item, h: sel.add_low(h, count(item[0])))
  return sel.finish_low()


def _prefixed(prefix: MergeTransform | None, path: str, pre, fts, key, pid, layout) -> tuple[jax.Array, list]:
  """Float32 pretrained leaf and each task's vector after the leafwise steps that precede the global one, as
  ``T`` separate arrays: without a prefix, elementwise expressions of each model's tensor that XLA fuses into
  every pass, instead of a stored ``(T, ...)`` stack (2-3x slower on CPU for a large tensor)."""
  if prefix is None:
    pre32 = pre.astype(jnp.float32)
    return pre32, [m.astype(jnp.float32) - pre32 for m in fts]
  k = jax.random.fold_in(key, 0) if prefix.needs_key else None  # the prefix is step 0 of the method's chain
  pre32, d = leaf_apply(prefix, layout, path, pre, fts, None, k, pid)
  return pre32, [d[i] for i in range(d.shape[0])]


def _ties_plan(prefix: MergeTransform | None, density: float, disjoint: str, count: str, zero_sign: str,
               scale: float) -> Callable[..., None]:
  """Exact streaming of ``chain(prefix, ties_merge(...), scale(scale))`` (global TIES and the DARE / Consensus
  variants built on it)."""
  def run(inp: _Inputs, ws, key, layout, odt, check_finite, comp) -> None:
    n = inp.total()
    t = len(inp.models)
    trim = density < 1
    if trim:
      if count == "reference":
        rank = _ranks_reference(n, density)
        trim = rank > 0
      else:
        rank = n - max(1, int(density * n)) + 1
    args = lambda name: (key, _path_id(name))  # noqa: E731

    def absval(path):
      def f(pre, fts, key, pid):
        return [jnp.abs(r) for r in _prefixed(prefix, path, pre, fts, key, pid, layout)[1]]
      return f

    # Without a prefix (or with a flat one) no step reads the leaf's path: one trace per argument type.
    path_free = prefix is None or runs_by_leaf(prefix)
    token = object() if path_free else None

    def trimmed(path, pre, fts, key, pid, thr):
      pre32, rows = _prefixed(prefix, path, pre, fts, key, pid, layout)
      if trim:
        rows = [jnp.where(jnp.abs(r) >= thr[i], r, 0) for i, r in enumerate(rows)]
      return pre32, rows

    # The majority sign (FusionBench: the sign of the sum of elected signs over the whole model) only matters
    # where the trimmed task vectors sum to exactly zero with some entry nonzero. The apply pass assumes +1,
    # accumulates the true sum, and notes such leaves; the rare leaves whose majority turns out different are
    # merged and written again.
    def apply(path, dt):
      def f(pre, fts, key, pid, thr, maj):
        pre32, rows = trimmed(path, pre, fts, key, pid, thr)
        tot = functools.reduce(jnp.add, rows)
        sg = jnp.sign(tot)
        s = elect(tot, zero_sign, maj.astype(tot.dtype))
        out = disjoint_rows(rows, s, disjoint) * jnp.asarray(scale, jnp.float32)
        flags = _finite_flags(pre, fts) if check_finite else _no_flags()
        ambiguous = jnp.any((sg == 0) & functools.reduce(jnp.logical_or, [r != 0 for r in rows]))
        return (pre32 + out).astype(dt), flags, jnp.sum(sg.astype(jnp.int32)), ambiguous
      return f

    def merge_leaf(name, pre, fts, maj):
      dt = np.dtype(odt(name))
      return comp(apply(name, dt), pre, tuple(fts), key, _path_id(name), thr, np.float32(maj),
                  same_as=token and (token, str(dt)))

    if path_free:  # the merge pass's programs compile in the background while the thresholds are computed
      thr_spec = jax.ShapeDtypeStruct((t,), np.float32)
      for name, (pre, fts) in _distinct_specs(inp).items():
        dt = np.dtype(odt(name))
        comp.warm(apply(name, dt), pre, fts, key, _path_id(name), thr_spec, np.float32(1.0),
                  same_as=(token, str(dt)))
    thr = (_thresholds(inp, comp, absval, np.full((t,), rank), args, path_free)[:, 0] if trim
           else np.zeros((t,), np.float32))

    total, ambiguous = 0, []

    def signs(name, ssum, amb):
      nonlocal total
      total += int(ssum)
      if bool(amb):
        ambiguous.append(name)

    _write_pass(inp, ws, lambda name, pre, fts: merge_leaf(name, pre, fts, 1.0), False, check_finite, extra=signs)
    majority = float(np.sign(total))
    if zero_sign == "majority" and majority != 1.0 and ambiguous:
      for name, pre, fts in inp.tensors(ambiguous):
        _write(ws, name, merge_leaf(name, pre, fts, majority)[0], False)

  return run


def _stitch_plan(density: float) -> Callable[..., None]:
  """Exact streaming of Localize-and-Stitch (data-free): per-task thresholds first, then the stitch."""

  def run(inp: _Inputs, ws, key, layout, odt, check_finite, comp) -> None:
    n = inp.total()
    t = len(inp.models)
    k = int(n * density)
    mode = "zero" if k <= 0 else ("all" if density >= 1 else "thr")
    thr = np.zeros((t,), np.float32)
    if mode == "thr":
      def absval(path):
        return lambda pre, fts: [jnp.abs(r) for r in _prefixed(None, path, pre, fts, None, None, None)[1]]
      thr = _thresholds(inp, comp, absval, np.full((t,), n - k + 1), lambda name: ())[:, 0]

    def apply(path, dt):
      def f(pre, fts, thr):
        pre32, x = jtree.leaf_task_vectors(pre, fts)
        if mode == "zero":
          out = jnp.zeros(x.shape[1:], x.dtype)
        else:
          if mode == "all":
            m = (x != 0).astype(x.dtype)
          else:
            m = ((jnp.abs(x) > thr.reshape((-1,) + (1,) * (x.ndim - 1))) & (x != 0)).astype(x.dtype)
          out = jtree.task_sum(m * x) / jnp.maximum(jtree.task_sum(m), 1.0)
        return (pre32 + out).astype(dt), (_finite_flags(pre, fts) if check_finite else _no_flags())
      return f

    token = object()  # the apply program never reads the path
    _write_pass(inp, ws, lambda name, pre, fts: comp(apply(name, np.dtype(odt(name))), pre, tuple(fts), thr,
                                                     same_as=(token, str(np.dtype(odt(name))))),
                False, check_finite)

  return run


def _byom_plan(density: float, scale: float) -> Callable[..., None]:
  """Exact streaming of BYOM-FFT: thresholds of the residuals first, then each task's model."""

  def resid(pre, fts):
    pre32, x = jtree.leaf_task_vectors(pre, fts)
    shared = scale * jtree.task_sum(x)
    return pre32, shared, x - shared[None]

  def run(inp: _Inputs, ws, key, layout, odt, check_finite, comp) -> None:
    n = inp.total()
    t = len(inp.models)
    rank = _ranks_reference(n, density)
    thr = np.zeros((t,), np.float32)
    if rank > 0:
      thr = _thresholds(inp, comp, lambda path: (lambda pre, fts: jnp.abs(resid(pre, fts)[2])),
                        np.full((t,), rank), lambda name: ())[:, 0]

    def apply(path, dt):
      def f(pre, fts, thr):
        pre32, shared, r = resid(pre, fts)
        out = shared[None] + jnp.where(jnp.abs(r) >= thr.reshape((-1,) + (1,) * (r.ndim - 1)), r, 0)
        return (pre32[None] + out).astype(dt), (_finite_flags(pre, fts) if check_finite else _no_flags())
      return f

    token = object()  # the apply program never reads the path
    _write_pass(inp, ws, lambda name, pre, fts: comp(apply(name, np.dtype(odt(name))), pre, tuple(fts), thr,
                                                     same_as=(token, str(np.dtype(odt(name))))),
                True, check_finite)

  return run


def _emr_plan(rescaler: str) -> Callable[..., None]:
  """Exact streaming of EMR-Merging: the rescalers' sums over leaves first, then each task's model."""
  def parts(pre, fts):
    pre32, x = jtree.leaf_task_vectors(pre, fts)
    uni, masks = T.emr_parts({"x": x})
    return pre32, x, uni["x"], masks["x"]

  def stats(pre, fts):
    _, x, uni, m = parts(pre, fts)
    return T.emr_terms(x, uni, m, rescaler)

  def run(inp: _Inputs, ws, key, layout, odt, check_finite, comp) -> None:
    per_leaf = {}
    for name, pre, fts in inp.tensors():
      a, b = comp(stats, pre, tuple(fts), same_as=stats)
      per_leaf[name] = (np.asarray(a), np.asarray(b))
    # The in-memory merge sums the per-leaf terms in the flattened tree's order (dict keys sorted).
    order = jtree.paths({k: 0 for k in per_leaf})
    a = b = 0
    for k in order:
      a = a + per_leaf[k][0]
      b = b + per_leaf[k][1]
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
      lam = np.where(b > 0, a / np.where(b > 0, b, 1.0), 0.0).astype(np.float32)

    def apply(path, dt):
      def f(pre, fts, lam):
        pre32, _, uni, m = parts(pre, fts)
        out = jnp.where(m, uni[None], 0) * lam.reshape((-1,) + (1,) * (m.ndim - 1))
        return (pre32[None] + out).astype(dt), (_finite_flags(pre, fts) if check_finite else _no_flags())
      return f

    token = object()  # the apply program never reads the path
    _write_pass(inp, ws, lambda name, pre, fts: comp(apply(name, np.dtype(odt(name))), pre, tuple(fts), lam,
                                                     same_as=(token, str(np.dtype(odt(name))))),
                True, check_finite)

  return run


def method_plan(name: str, hparams: Mapping[str, Any]) -> _Plan | None:
  """The multi-pass plan of a registered method with these hyperparameters (:func:`plan_of` of the step the
  registry builds).

  Args:
    name: the registry name.
    hparams: its hyperparameters (missing ones take the defaults).

  Returns:
    The plan, or ``None`` when the method has none.
  """
  return plan_of(method_info(name).factory(**_hp(name, hparams)))


def plan_of(tx: MergeTransform) -> _Plan | None:
  """This backend's table of global steps, read from the steps' identities: global TIES however it is spelled
  (the registry's ``ties``, a nested chain, ``trim`` and ``disjoint_merge`` composed by hand:
  :func:`jaxmerge.engine.native.normalized`), after an optional leafwise task-preserving step (DARE's drop,
  Consensus's mask, a :func:`jaxmerge.per_leaf` step) and before an optional scale; Localize-and-Stitch's
  ``stitch``, BYOM's ``byom_residuals`` and EMR's ``emr_modulate``.

  Args:
    tx: a merge step.

  Returns:
    The plan, or ``None`` for any other step.
  """
  ident = identity_of(tx)
  name = ident[0] if ident is not None else None
  if name == "stitch":
    return _Plan(_stitch_plan(ident[1]), False)
  if name == "byom_residuals":
    return _Plan(_byom_plan(ident[1], ident[2]), True)
  if name == "emr_modulate":
    return _Plan(_emr_plan(ident[1]), True)
  sp, prefix = native.spec(tx), None
  if sp is None or sp.drop is not None:
    steps = steps_of(tx)
    if len(steps) < 2 or not leafwise(steps[0]) or steps[0].reduces:
      return None
    sp, prefix = native.spec(chain(*steps[1:])), steps[0]  # the prefix is the chain's step 0 (fold_in(key, 0))
  if sp is None or sp.op != "ties" or sp.drop is not None:
    return None
  density, merge_func, count, zero_sign = sp.ties
  return _Plan(_ties_plan(prefix, density, merge_func, count, zero_sign, sp.scale), False)


def two_pass_methods() -> list[str]:
  """Registered methods whose default (global) form streams in several exact passes.

  Returns:
    The method names (with the base noted where only one base streams), sorted.
  """
  return ["byom", "consensus (base=ties)", "dare (base=ties)", "emr", "localize_stitch", "ties"]


def streamable_methods() -> list[str]:
  """Registered data-free methods that stream with their default hyperparameters (leafwise or two-pass).

  Returns:
    The registry names, in :func:`jaxmerge.registry.list_methods` order.
  """
  out = []
  for name in list_methods():
    info = method_info(name)
    if info.data != "none":
      continue
    try:
      tx = info.factory()
    except Exception:  # noqa: BLE001 (a method that needs hyperparameters cannot be judged here)
      continue
    if leafwise(tx) or method_plan(name, {}) is not None:
      out.append(name)
  return out


def merge_streaming(
    tx: MergeTransform,
    pretrained: Any,
    models: Sequence[Any],
    writer: Any,
    *,
    method: tuple[str, Mapping[str, Any]] | None = None,
    key: jax.Array | None = None,
    coeffs: Any = None,
    layout: Layout | None = None,
    names: Sequence[str] | None = None,
    per_task: bool | None = None,
    out_dtype: Any = None,
    check_finite: bool = True,
    prefetch: bool = True,
) -> StreamResult:
  """Streams any merge that can be streamed: leafwise transforms in one pass (:func:`merge_leafwise`), the global
  steps of :func:`plan_of` (recognized by their identities, however they are composed) in exact multi-pass plans.

  Args:
    tx: the transform.
    method: the registry name and hyperparameters ``tx`` was built from, named in the error message (the plan is
      read from ``tx`` itself).
    Other arguments: as :func:`merge_leafwise` (``coeffs`` applies to leafwise transforms only).

  Returns:
    A :class:`StreamResult` (tensors written, programs, compiles, passes over the inputs, seconds).

  Raises:
    ValueError: a transform that neither is leafwise nor has a plan (the message lists what streams).
  """
  if leafwise(tx):
    return merge_leafwise(tx, pretrained, models, writer, key=key, coeffs=coeffs, layout=layout, names=names,
                          per_task=per_task, out_dtype=out_dtype, check_finite=check_finite, prefetch=prefetch)
  plan = plan_of(tx)
  if plan is None:
    what = f"method {method[0]!r} with {dict(method[1])}" if method is not None else "this transform"
    raise ValueError(f"{what} cannot be streamed: it is not leafwise and has no multi-pass plan. Streamable "
                     f"methods (default hyperparameters): {', '.join(streamable_methods())}; leafwise variants such "
                     "as ties(scope='leaf') stream too")
  if coeffs is not None:
    raise ValueError("coeffs are not supported by the multi-pass streaming plans")
  if tx.needs_key and key is None:
    raise ValueError("this merge is stochastic and needs a PRNG key: pass key=jax.random.key(seed)")
  t0 = time.perf_counter()
  inp = _Inputs(pretrained, models, names, prefetch)
  ws = _writers(writer, plan.per_task, len(inp.models))
  comp = _Compiler()
  key = key if key is not None else jax.random.key(0)
  try:
    plan.run(inp, ws, key, layout or jfilters.hf_layout, _out_dtype_fn(out_dtype, inp.pre), check_finite, comp)
  finally:
    comp.close()
  _copy_non_float(inp, ws)
  return StreamResult(len(inp.order), len(comp.programs), comp.compiles, inp.passes, time.perf_counter() - t0,
                      comp.lowerings)
