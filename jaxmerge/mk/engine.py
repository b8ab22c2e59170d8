"""Runs a mergekit-schema merge tensor by tensor (:class:`Plan`), in memory or streamed: both call
:meth:`Plan.merge_tensor` on the same inputs, so they give the same bytes."""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import os
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_dtypes
import numpy as np

from jaxmerge.mk import kernels as K
from jaxmerge.mk import params as P

__all__ = ["Plan", "np_dtype", "run"]

_NP = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16), "bfloat16": np.dtype(ml_dtypes.bfloat16),
       "float64": np.dtype(np.float64)}


def np_dtype(name: str) -> np.dtype:
  """The NumPy dtype of a dtype name.

  Args:
    name: ``"float32"``, ``"float16"``, ``"bfloat16"`` or ``"float64"``.

  Returns:
    The dtype (``ml_dtypes.bfloat16`` for ``"bfloat16"``).
  """
  return _NP[name]


def _is_float(dt: np.dtype) -> bool:
  return np.dtype(dt) in _NP.values()


def _promote(dtypes: Sequence[np.dtype]) -> np.dtype:
  """PyTorch's promotion of float dtypes: equal ones stay, bfloat16 with float16 is float32, else the widest."""
  ds = {np.dtype(d) for d in dtypes}
  if len(ds) == 1:
    return ds.pop()
  return max(ds - {_NP["bfloat16"], _NP["float16"]} | {_NP["float32"]}, key=lambda d: d.itemsize)


@dataclasses.dataclass(frozen=True)
class Plan:
  """A resolved mergekit merge: the method, its inputs in mergekit's order and the per-tensor parameters.

  Attributes:
    method: the mergekit method (:data:`jaxmerge.mk.params.METHODS`).
    inputs: the input models' references, mergekit's order (the listed models, then the base when it is not
      listed).
    base_index: the base's position in ``inputs``, or ``None``.
    resolver: the per-tensor parameters (:class:`jaxmerge.mk.params.Resolver`).
    dtype: the config's ``dtype`` (mergekit loads every tensor in it and computes in it), or ``None`` for the
      inputs' common dtype.
    compute_dtype: overrides the compute dtype (``"float32"``: jaxmerge's float32 option), or ``None``.
    out_dtype: the output dtype, or ``None`` for the kernel's result dtype (mergekit's rule).
    seed: seeds the random masks (DARE, DELLA): one generator per tensor, from the seed and the tensor's name.
    tie_rule: ``"exact"`` (mergekit's), or ``"keep_all"``: the config asks for jaxmerge's own float32 TIES, which
      keeps every magnitude tied at the trim threshold (``jaxmerge: {tie_rule: keep_all}``; run by
      ``jaxmerge merge`` on its fast engine, :mod:`jaxmerge.config`).
  """

  method: str
  inputs: tuple[str, ...]
  base_index: int | None
  resolver: P.Resolver
  dtype: str | None = None
  compute_dtype: str | None = None
  out_dtype: str | None = None
  seed: int = 0
  tie_rule: str = "exact"

  def compute_for(self, dtypes: Sequence[np.dtype]) -> np.dtype:
    """The dtype one tensor is merged in, given its inputs' dtypes."""
    name = self.compute_dtype or self.dtype
    return _NP[name] if name else _promote(dtypes)

  def out_for(self, dtypes: Sequence[np.dtype]) -> np.dtype:
    """The dtype one merged tensor is written in, given its inputs' dtypes."""
    if not all(_is_float(d) for d in dtypes):
      return np.dtype(dtypes[self.base_index or 0])
    if self.out_dtype:
      return _NP[self.out_dtype]
    # mergekit's output dtype (a compute_dtype override changes the arithmetic, not the written dtype)
    return K.result_dtype(self.method, _NP[self.dtype] if self.dtype else _promote(dtypes))

  def merge_tensor(self, name: str, arrays: Sequence[np.ndarray], t: float,
                   names: Sequence[str] | None = None, scratch: K.Scratch | None = None,
                   out: Callable[[tuple, np.dtype], np.ndarray] | None = None) -> np.ndarray:
    """Merges one tensor.

    Args:
      name: the tensor's name (for filters, the random generator and messages).
      arrays: its value in each input (``inputs`` order).
      t: its gradient position (:func:`jaxmerge.mk.params.layer_t`).
      names: the inputs' names for messages (default ``inputs``).
      scratch: work buffers reused across the tensors of a merge (:class:`jaxmerge.mk.kernels.Scratch`);
        ``None``: fresh arrays. The result is the same.
      out: ``empty(shape, dtype)`` giving the array the result is written into (default: a new array).

    Returns:
      The merged tensor in :meth:`out_for`'s dtype (a non-float tensor: the base's, or the first input's).

    Raises:
      ValueError: shapes that differ, NaN/Inf inputs, or a parameter missing or invalid for this tensor.
    """
    names = list(names or self.inputs)
    dtypes = [np.asarray(a).dtype for a in arrays]
    if not all(_is_float(d) for d in dtypes):
      return np.asarray(arrays[self.base_index or 0])
    shapes = {tuple(np.shape(a)) for a in arrays}
    if len(shapes) != 1:
      raise ValueError(f"tensor {name!r} has shapes {[tuple(np.shape(a)) for a in arrays]} in models {names}")
    cd = self.compute_for(dtypes)
    rng = np.random.default_rng([self.seed, zlib.crc32(name.encode())])
    if self.method == "task_arithmetic" and self.base_index is not None and len(arrays) > 1:
      return self._task_arithmetic(name, arrays, t, names, K.Num(cd, rng), out)
    lease = K.Lease(scratch)
    n = K.Num(cd, rng, lease)
    try:
      work = []
      for a, who in zip(arrays, names):
        x = np.asarray(a)
        w = n.empty(x.shape)  # a buffer the kernel may overwrite
        if not K.to_work(n, x, w):
          raise ValueError(f"model {who}: tensor {name!r} contains NaN or Inf values")
        work.append(w)
      shared, per = self.resolver.resolve(name, t, names)
      # 16-bit intermediates may overflow to inf as in PyTorch (silently); an output that does not fit its dtype is
      # refused when written (jaxmerge.commands.merge).
      with np.errstate(over="ignore"):
        res = _dispatch(self.method, n, work, self.base_index, shared, per, f"tensor {name!r}")
        dt = self.out_for(dtypes)
        if out is None:
          return res.astype(dt)  # a copy: the lease's buffers go back below
        into = out(res.shape, dt)
        np.copyto(into, res, casting="unsafe")
        return into
    finally:
      lease.close()


  def _task_arithmetic(self, name, arrays, t, names, n, out) -> np.ndarray:
    """Task arithmetic block by block from the inputs as stored (:func:`jaxmerge.mk.kernels.task_arithmetic_blocked`:
    :func:`jaxmerge.mk.kernels.gta`'s bytes without whole float32 copies of the inputs)."""
    arrays = [np.asarray(a) for a in arrays]
    shared, per = self.resolver.resolve(name, t, names)
    weights = [p["weight"] for i, p in enumerate(per) if i != self.base_index]
    dt = self.out_for([a.dtype for a in arrays])
    res = out(arrays[0].shape, dt) if out is not None else np.empty(arrays[0].shape, dt)
    with np.errstate(over="ignore"):
      bad = K.task_arithmetic_blocked(n, arrays, self.base_index, weights, bool(shared["normalize"]),
                                      shared["lambda"], res)
    if bad:
      raise ValueError(f"model {names[bad[0]]}: tensor {name!r} contains NaN or Inf values")
    return res


def _dispatch(method: str, n: K.Num, work: list, bi: int | None, shared: dict, per: list, where: str):
  base = work[bi] if bi is not None else None
  others = [w for i, w in enumerate(work) if i != bi]
  per_nb = [p for i, p in enumerate(per) if i != bi]
  if method in K.GTA:
    return K.gta(method, n, base, others, shared, per_nb, where)
  if method == "linear":
    return K.linear(n, work, [p["weight"] for p in per], shared["normalize"])
  if method == "slerp":
    return K.slerp(n, shared["t"], base, others[0])
  if method == "nuslerp":
    return K.nuslerp(n, base, others, [p["weight"] for p in per_nb], shared["nuslerp_row_wise"],
                     shared["nuslerp_flatten"])
  if method == "multislerp":
    return K.multislerp(n, base, others, [p["weight"] for p in per_nb], shared["normalize_weights"], shared["eps"],
                        where)
  if method == "karcher":
    return K.karcher(n, work, shared["max_iter"], shared["tol"])
  if method == "sce":
    return K.sce(n, base, others, shared["select_topk"])
  if method == "ram":
    return K.ram(n, base, others, shared["epsilon"])
  if method == "ramplus_tl":
    return K.ramplus_tl(n, base, others, shared["r"], shared["alpha"], shared["epsilon"])
  if method == "nearswap":
    return K.nearswap(n, base, others[0], shared["t"])
  if method == "arcee_fusion":
    return K.arcee_fusion(n, base, others[0])
  if method == "passthrough":
    s = per[0]["scale"]
    return work[0] if s is None else n.q(work[0] * n.s(s))
  if method == "model_stock":
    return K.model_stock(n, base, others, shared["filter_wise"])
  raise ValueError(f"unknown mergekit method {method!r}")


def num_layers(names: Sequence[str]) -> int:
  """The number of decoder layers among tensor names (largest layer index + 1; 0 without layers)."""
  idx = [i for i in (P.layer_index(k) for k in names) if i is not None]
  return max(idx) + 1 if idx else 0


def _workers() -> int:
  """Tensors merged at once: the usable cores (at most 4); ``JAXMERGE_MK_THREADS`` overrides."""
  env = os.environ.get("JAXMERGE_MK_THREADS")
  if env:
    return max(1, int(env))
  try:
    cores = len(os.sched_getaffinity(0))
  except (AttributeError, OSError):
    cores = os.cpu_count() or 1
  return max(1, min(4, cores))


def run(plan: Plan, keys: Sequence[str], read: Callable[[int, str], Any], write: Callable[[str, np.ndarray], None],
        names: Sequence[str] | None = None, sizes: Mapping[str, int] | None = None,
        workers: int | None = None, t_of: Callable[[str], float] | None = None, buffers: bool = False) -> None:
  """Merges every tensor of ``keys``, reading each input's tensor with ``read(input, key)`` and passing the
  result to ``write(key, array)`` in the order of ``keys``.

  Up to ``workers`` tensors are merged at once on threads (NumPy releases the GIL in its loops), as long as the
  tensors in flight hold no more entries together than the largest tensor: the memory in flight stays about
  what merging the largest tensor alone takes. Each tensor's result does not depend on the others (the random
  masks are seeded by the tensor's name), so the output is the same for any number of workers.

  Args:
    plan: the plan.
    keys: the tensor names (the base's).
    read: ``(input index, key) -> array`` (called from worker threads); with ``buffers``,
      ``(input index, key, empty) -> array``, where ``empty(shape, dtype)`` is a buffer reused from tensor to
      tensor that ``read`` may read into.
    write: receives each merged tensor (called from the calling thread, in order); with ``buffers`` the array is
      a reused buffer, valid until ``write`` returns (``write`` copies it, e.g. to a file).
    names: the inputs' names for messages.
    sizes: each key's number of entries (bounds the memory in flight); default: no bound but ``workers``.
    workers: threads (default: the usable cores, at most 4).
    t_of: each tensor's position for layer gradients (default: :func:`jaxmerge.mk.params.layer_t` over the
      layers among ``keys``, a whole-model merge; a slice passes its own).
    buffers: the tensors' inputs and results live in buffers reused from tensor to tensor (no fresh pages per
      tensor): ``read`` takes the ``empty`` argument and ``write`` keeps nothing it receives.
  """
  if t_of is None:
    layers = num_layers(keys)
    t_of = lambda k: P.layer_t(k, layers)  # noqa: E731

  scratch = K.Scratch()  # work buffers reused from tensor to tensor (released with this call)

  def merge(k: str) -> tuple[np.ndarray, K.Lease]:
    """The merged tensor ``k`` and the lease holding its inputs and result (closed once it is written)."""
    if not buffers:
      arrays = [read(i, k) for i in range(len(plan.inputs))]
      return plan.merge_tensor(k, arrays, t_of(k), names, scratch), K.Lease(None)
    lease = K.Lease(scratch)
    try:
      arrays = [read(i, k, lease.empty) for i in range(len(plan.inputs))]
      return plan.merge_tensor(k, arrays, t_of(k), names, scratch, out=lease.empty), lease
    except BaseException:
      lease.close()
      raise

  def emit(k: str, result: tuple[np.ndarray, K.Lease]) -> None:
    try:
      write(k, result[0])
    finally:
      result[1].close()

  workers = workers or _workers()
  if workers == 1 or len(keys) < 2:
    for k in keys:
      emit(k, merge(k))
    return
  size = (lambda k: int(sizes[k])) if sizes is not None else (lambda k: 0)
  budget = max((size(k) for k in keys), default=0)
  pending: collections.deque = collections.deque()
  held = 0
  with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="jaxmerge-mk") as pool:
    try:
      for k in keys:
        while pending and (len(pending) >= workers or held + size(k) > budget):
          done, fut, n = pending.popleft()
          emit(done, fut.result())
          held -= n
        pending.append((k, pool.submit(merge, k), size(k)))
        held += size(k)
      while pending:
        done, fut, n = pending.popleft()
        emit(done, fut.result())
        held -= n
    except BaseException:
      for _, fut, _ in pending:
        fut.cancel()
      raise


def merge_arrays(plan: Plan, tensors: Mapping[str, Mapping[str, Any]]) -> dict[str, np.ndarray]:
  """In-memory merge of ``{input reference: {name: array}}`` (every input has the base's names).

  Args:
    plan: the plan.
    tensors: each input's tensors, keyed by the references in ``plan.inputs``.

  Returns:
    ``{name: merged array}``.
  """
  first = tensors[plan.inputs[plan.base_index or 0]]
  out: dict[str, np.ndarray] = {}
  run(plan, list(first), lambda i, k: tensors[plan.inputs[i]][k], out.__setitem__)
  return out
