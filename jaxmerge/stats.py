"""Exact order statistics over many leaves, without sorting.

TIES, Localize-and-Stitch, PCB and BYOM keep the top fraction of a task vector's magnitudes *over the whole
model* (tens of millions of entries). Sorting that on a CPU is slow (``jnp.sort`` of 88M floats takes ~40 s
here). Float32 values order like suitably flipped bit patterns read as unsigned integers, so the exact k-th smallest
value is found by a two-level radix select: a 65,536-bucket histogram of the high 16 bits, then a
65,536-bucket histogram of the low 16 bits inside the one bucket that holds the answer. Two passes over the
data, exact, jit-compatible, no host round-trip.

The same select works on a model that arrives tensor by tensor (streamed or sharded merges), because its
histograms are sums over tensors: :func:`high_histogram` and :func:`low_histogram` compute one tensor's counts
(fused into its leaf program), and :class:`KthSmallest` adds them on the host in int64 and finds the ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxmerge import tree as jtree

__all__ = ["KthSmallest", "from_keys", "global_thresholds", "high_histogram", "kth_smallest", "kth_smallest_rows",
           "leaf_thresholds", "low_histogram", "order_keys", "order_statistic", "task_thresholds", "threshold_rank", "use_cpu_kernel"]

_B = 1 << 16

_SORT_BELOW = 1 << 16  # small inputs: a sort compiles and runs faster than two histogram passes


def order_keys(x: jax.Array) -> jax.Array:
  """uint32 keys that order like the float32 values of ``x``, flattened (negative floats flip all bits, others the
  sign bit).

  Args:
    x: an array of any shape (cast to float32).

  Returns:
    A 1-D uint32 array of ``x.size`` keys, monotone in the values.
  """
  b = jax.lax.bitcast_convert_type(x.astype(jnp.float32).ravel(), jnp.uint32)
  neg = (b >> 31) == 1
  return jnp.where(neg, ~b, b | jnp.uint32(0x80000000))


def from_keys(k: jax.Array) -> jax.Array:
  """Inverse of :func:`order_keys` (elementwise; keys of any shape).

  Args:
    k: uint32 keys.

  Returns:
    The float32 values, in ``k``'s shape.
  """
  pos = (k >> 31) == 1
  b = jnp.where(pos, k & jnp.uint32(0x7FFFFFFF), ~k)
  return jax.lax.bitcast_convert_type(b, jnp.float32)


def kth_smallest(values: Sequence[jax.Array], k: jax.Array | int) -> jax.Array:
  """The exact ``k``-th smallest (1-indexed) entry of the concatenation of float arrays.

  Args:
    values: arrays of finite floats (any shapes and signs), treated as one flat vector.
    k: rank in ``1..N`` (``N`` the total size); may be traced.

  Returns:
    A float32 scalar, equal to ``sort(concat(values))[k - 1]``.
  """
  n = sum(int(v.size) for v in values)
  if n <= _SORT_BELOW:
    flat = jnp.concatenate([v.astype(jnp.float32).ravel() for v in values])
    return jnp.sort(flat)[jnp.asarray(k, jnp.int32) - 1]
  keys = [order_keys(v) for v in values]
  k = jnp.asarray(k, jnp.int32)
  hist = sum(jnp.bincount((q >> 16).astype(jnp.int32), length=1 << 16) for q in keys)
  cum = jnp.cumsum(hist)
  hi = jnp.searchsorted(cum, k, side="left").astype(jnp.int32)
  k_lo = k - (cum[hi] - hist[hi])
  lo_hist = sum(
      jnp.bincount(
          jnp.where((q >> 16).astype(jnp.int32) == hi, (q & jnp.uint32(0xFFFF)).astype(jnp.int32), 1 << 16),
          length=(1 << 16) + 1,
      )
      for q in keys
  )
  lo = jnp.searchsorted(jnp.cumsum(lo_hist[: 1 << 16]), k_lo, side="left").astype(jnp.int32)
  key = (hi.astype(jnp.uint32) << 16) | lo.astype(jnp.uint32)
  return from_keys(key)


def kth_smallest_rows(values: Sequence[jax.Array], k: int) -> jax.Array:
  """Each task's exact ``k``-th smallest entry over ``values``, arrays with a leading task axis ``(T, ...)``.

  The radix select of :func:`kth_smallest`, batched over the task axis and one array at a time: each array's
  histograms wait for the previous array's (an exact ``+ 0 * count`` dependency), so XLA never holds every
  array's keys at once. Under a device mesh, each device histograms its own tasks' entries.

  Args:
    values: arrays of finite floats with the same leading task size ``T``.
    k: rank in ``1..N`` (``N`` the entries per task over all arrays).

  Returns:
    ``(T,)`` float32, row ``t`` equal to ``sort(concat(values[:][t]))[k - 1]``.
  """
  rows = [v.astype(jnp.float32).reshape(v.shape[0], -1) for v in values]

  def total(hist):
    """``sum`` over arrays of ``hist(array)``, one array after another."""
    out = None
    for x in rows:
      if out is not None:
        x = x + out[0, 0].astype(jnp.float32) * 0
      out = hist(x) if out is None else out + hist(x)
    return out

  def rank_in(hist, kk):  # per task: the bucket holding rank kk, and kk's rank inside it
    cum = jnp.cumsum(hist, axis=1)
    b = jax.vmap(lambda c, r: jnp.searchsorted(c, r, side="left"))(cum, kk).astype(jnp.int32)
    before = jnp.take_along_axis(cum, b[:, None], axis=1)[:, 0] - jnp.take_along_axis(hist, b[:, None], axis=1)[:, 0]
    return b, kk - before

  hi, k_lo = rank_in(total(high_histogram), jnp.full((rows[0].shape[0],), k, jnp.int32))
  lo, _ = rank_in(total(lambda x: low_histogram(x, hi[:, None])[:, 0]), k_lo)
  return from_keys((hi.astype(jnp.uint32) << 16) | lo.astype(jnp.uint32))


def threshold_rank(n: int, density: float, count: str = "reference") -> int:
  """The rank of TIES's magnitude threshold: the one rule of the XLA programs, the streamed and sharded
  passes and the native kernel.

  Args:
    n: entries per task.
    density: fraction kept.
    count: ``"reference"`` (FusionBench: the ``(N - int(N d))``-th smallest, so ``int(N d) + 1`` entries survive
      without ties) or ``"exact"`` (mergekit: ``max(1, int(N d))`` entries survive).

  Returns:
    ``k`` (1-indexed, ascending): the threshold is the ``k``-th smallest magnitude and entries ``>=`` it are
    kept; ``0`` keeps everything.
  """
  if count == "reference":
    return max(0, n - int(n * density))
  if count == "exact":
    return max(0, n - max(1, int(density * n)) + 1)
  raise ValueError(f"count must be 'reference' or 'exact', got {count!r}")


_CPU_KERNEL: dict[str, tuple] = {}


def use_cpu_kernel(select: Callable[[Sequence[jax.Array], int], jax.Array] | None,
                   fits: Callable[[int, int], bool] | None = None) -> None:
  """Registers a CPU kernel for :func:`task_thresholds` (the engine registers its native one,
  :func:`jaxmerge.engine.native.ties_thresholds`, when it is available); ``None`` removes it.

  Args:
    select: ``select(leaves, k) -> (T,)``: each task's exact ``k``-th smallest magnitude over ``(T, ...)`` leaves,
      usable inside ``jax.jit`` on the CPU.
    fits: ``fits(T, N) -> bool``: whether ``select`` takes ``T`` tasks of ``N`` entries.
  """
  if select is None:
    _CPU_KERNEL.pop("select", None)
  else:
    _CPU_KERNEL["select"] = (select, fits or (lambda t, n: True))


def task_thresholds(leaves: list[jax.Array], density: float, count: str = "reference",
                    use_native: bool = False) -> jax.Array:
  """Per-task magnitude thresholds ``(T,)`` keeping the top ``density`` of each task over all ``leaves``.

  ``count="reference"`` is FusionBench's rule (keep ``>=`` the ``(N - int(N d))``-th smallest, i.e.
  ``int(N d) + 1`` entries without ties); ``"exact"`` keeps ``max(1, int(N d))`` entries (mergekit).

  ``use_native=True`` computes them on the CPU with one call of the registered CPU kernel (:func:`use_cpu_kernel`,
  the native one of :mod:`jaxmerge.engine.native`; same values). Only for
  leaves that are program inputs or exactly rounded expressions of them (``ft - pre``): the custom call needs
  its operand stored, and XLA may fuse an expression such as ``x - c * y`` into an FMA in one place and not in
  another, so the thresholds and the masks compared against them would see different roundings.

  Args:
    leaves: ``(T, ...)`` arrays (the same ``T``), one task's entries over all of them ranked together.
    density: the fraction of each task's entries kept, in ``[0, 1]``.
    count: ``"reference"`` or ``"exact"`` (above).
    use_native: use the registered CPU kernel where it runs (above).

  Returns:
    The ``(T,)`` float32 thresholds (zeros when everything is kept).
  """
  t = leaves[0].shape[0]
  n = sum(int(x[0].size) for x in leaves)
  k = threshold_rank(n, density, count)
  if k <= 0:  # everything is kept
    return jnp.zeros((t,), jnp.float32)
  kernel = _CPU_KERNEL.get("select")
  if use_native and kernel is not None and kernel[1](t, n):
    # On the CPU, one kernel call for every task; the XLA radix select elsewhere.
    return jax.lax.platform_dependent(cpu=lambda: kernel[0](leaves, k),
                                      default=lambda: _xla_thresholds(leaves, k))
  return _xla_thresholds(leaves, k)


def leaf_thresholds(x: jax.Array, density: float, count: str = "reference") -> jax.Array:
  """Per-task magnitude thresholds ``(T,)`` over one stacked leaf ``x`` (:func:`task_thresholds`; the native CPU
  select where it runs).

  Args:
    x: a ``(T, ...)`` leaf.
    density: fraction kept, in ``[0, 1]``.
    count: ``"reference"`` or ``"exact"``.

  Returns:
    The ``(T,)`` float32 thresholds (zeros when everything is kept).
  """
  return task_thresholds([x], density, count, use_native=True)


def global_thresholds(tree, density: float, count: str = "reference") -> jax.Array:
  """Per-task magnitude thresholds ``(T,)`` over every leaf of the stack ``tree`` (:func:`task_thresholds`).

  On one device, from one ``(T, N)`` view (:func:`jaxmerge.tree.concat_tasks`; the native CPU select where it
  runs). Under a device mesh, leaf by leaf with the task axis batched (:func:`_mesh_thresholds`): concatenating
  leaves sharded differently, or a custom call, would gather the whole stack on every device.

  Args:
    tree: a stack ``(T, ...)`` with at least one leaf.
    density: fraction kept, in ``[0, 1]``.
    count: ``"reference"`` or ``"exact"`` (see :func:`trim`).

  Returns:
    The ``(T,)`` float32 thresholds (zeros when everything is kept).
  """
  leaves = jax.tree.leaves(tree)
  if jtree.on_mesh():
    t = leaves[0].shape[0]
    k = threshold_rank(sum(int(x[0].size) for x in leaves), density, count)
    return jnp.zeros((t,), jnp.float32) if k <= 0 else _mesh_thresholds(leaves, k)
  return task_thresholds([jtree.concat_tasks(tree)], density, count, use_native=True)


def _mesh_thresholds(leaves: list[jax.Array], k: int) -> jax.Array:
  """Each task's ``k``-th smallest magnitude over ``leaves`` (:func:`kth_smallest_rows`: the radix
  select batched over the task axis, leaf after leaf)."""
  return kth_smallest_rows([jnp.abs(x) for x in leaves], k)


def _xla_thresholds(leaves: list[jax.Array], k: int) -> jax.Array:
  """Each task's ``k``-th smallest magnitude over ``leaves`` by the XLA radix select."""
  # A Python loop over tasks (not vmap): independent histogram scatters, which XLA:CPU runs two at a time. Task
  # i waits for task i - 2 (its magnitudes add 0 * that threshold, exact for finite thresholds): otherwise XLA
  # schedules every task's histogram indices (one int32 per entry) at once, T x N of scratch memory.
  thrs: list[jax.Array] = []
  for i in range(leaves[0].shape[0]):
    after = thrs[i - 2] * 0 if i >= 2 else None
    thrs.append(kth_smallest([jnp.abs(x[i]) if after is None else jnp.abs(x[i]) + after for x in leaves], k))
  return jtree.fence(jnp.stack(thrs))


def order_statistic(values: Sequence[jax.Array], index: int) -> jax.Array:
  """``sort(concat(values))[index]`` (0-indexed, negative indices count from the end).

  Args:
    values: arrays of any shapes (concatenated flat).
    index: the rank to return.

  Returns:
    A scalar.
  """
  n = sum(int(v.size) for v in values)
  if not -n <= index < n:
    raise ValueError(f"order statistic {index} out of range for {n} values")
  return kth_smallest(values, (index % n) + 1)


def high_histogram(x: jax.Array | Sequence[jax.Array]) -> jax.Array:
  """Pass-1 histogram ``(T, 65536)`` int32 of the high 16 bits of each task row's keys (jit-compatible).

  Args:
    x: one tensor with a leading task axis, ``(T, ...)``, or its ``T`` task slices as a sequence (faster on CPU
      when they are elementwise expressions of separate inputs: XLA then never stores the ``(T, ...)`` stack).

  Returns:
    The ``(T, 65536)`` int32 counts.
  """
  def one(r):
    return jnp.bincount((order_keys(r) >> 16).astype(jnp.int32), length=_B)

  if isinstance(x, (list, tuple)):
    return jnp.stack([one(r) for r in x])
  return jax.vmap(one)(x.reshape(x.shape[0], -1))  # (batched over tasks: each device's own rows on a mesh)


def low_histogram(x: jax.Array | Sequence[jax.Array], hi: jax.Array) -> jax.Array:
  """Pass-2 histogram ``(T, R, 65536)`` int32 of the low 16 bits of the keys whose high bits equal ``hi[t, r]``
  (``hi`` from :meth:`KthSmallest.buckets`; jit-compatible).

  Args:
    x: one tensor with a leading task axis, ``(T, ...)``, or its ``T`` task slices (see :func:`high_histogram`).
    hi: ``(T, R)`` int32 high-16-bit buckets, one per task and requested rank.

  Returns:
    The ``(T, R, 65536)`` int32 counts.
  """
  def one(r, h):
    q = order_keys(r)
    top, low = (q >> 16).astype(jnp.int32), (q & jnp.uint32(0xFFFF)).astype(jnp.int32)
    return jnp.stack([jnp.bincount(jnp.where(top == h[j], low, _B), length=_B + 1)[:_B] for j in range(h.shape[0])])

  if isinstance(x, (list, tuple)):
    return jnp.stack([one(r, hi[i]) for i, r in enumerate(x)])
  return jax.vmap(one)(x.reshape(x.shape[0], -1), hi)


_high = jax.jit(high_histogram)
_low = jax.jit(low_histogram)


class KthSmallest:
  """Exact ``k``-th smallest values per task row of a stacked model streamed tensor by tensor.

  Args:
    ranks: ``(T, R)`` 1-indexed ranks per task (or ``(T,)`` for one rank each), in ``1..N``.
    total: ``N``, the number of values per task over the whole model (checked at the end of each pass).

  Example (the TIES threshold of each task over two tensors)::

    sel = KthSmallest(ranks, total)
    for x in tensors: sel.update_high(jnp.abs(x))     # pass 1
    sel.finish_high()
    for x in tensors: sel.update_low(jnp.abs(x))      # pass 2
    thresholds = sel.finish_low()[:, 0]
  """

  def __init__(self, ranks: np.ndarray | Sequence[int], total: int):
    r = np.asarray(ranks, np.int64)
    if r.ndim == 1:
      r = r[:, None]
    if r.ndim != 2:
      raise ValueError(f"ranks must have shape (T,) or (T, R), got {r.shape}")
    if total <= 0 or (r < 1).any() or (r > total).any():
      raise ValueError(f"ranks must be in 1..{total}, got {r.ravel().tolist()[:8]}")
    self.ranks, self.total = r, int(total)
    self._hist = np.zeros((r.shape[0], _B), np.int64)
    self._seen = 0
    self._hi: np.ndarray | None = None
    self._klo: np.ndarray | None = None
    self._lo_hist: np.ndarray | None = None

  @property
  def num_tasks(self) -> int:
    return self.ranks.shape[0]

  def _check(self, x: jax.Array) -> None:
    if x.shape[0] != self.num_tasks:
      raise ValueError(f"expected a leading task axis of {self.num_tasks}, got shape {x.shape}")

  def update_high(self, x: jax.Array) -> None:
    """Pass 1: adds one ``(T, ...)`` tensor."""
    self._check(x)
    self.add_high(_high(x) if x[0].size else None, int(np.prod(x.shape[1:], dtype=np.int64)))

  def add_high(self, hist: jax.Array | None, count: int) -> None:
    """Pass 1: adds a :func:`high_histogram` computed elsewhere (e.g. fused into a leaf's program) over
    ``count`` values per task."""
    if hist is not None:
      self._hist += np.asarray(jax.device_get(hist), np.int64)
    self._seen += int(count)

  def finish_high(self) -> None:
    if self._seen != self.total:
      raise ValueError(f"pass 1 saw {self._seen} values per task, expected {self.total}")
    cum = np.cumsum(self._hist, axis=1)
    hi = np.stack([np.searchsorted(cum[t], self.ranks[t], side="left") for t in range(self.num_tasks)])
    before = np.take_along_axis(cum, hi, axis=1) - np.take_along_axis(self._hist, hi, axis=1)
    self._hi, self._klo = hi.astype(np.int32), self.ranks - before
    self._lo_hist = np.zeros(self.ranks.shape + (_B,), np.int64)
    self._seen = 0

  @property
  def buckets(self) -> np.ndarray:
    """``(T, R)`` int32 high-16-bit buckets of the requested ranks (after :meth:`finish_high`)."""
    if self._hi is None:
      raise ValueError("call finish_high() after pass 1 before pass 2")
    return self._hi

  def update_low(self, x: jax.Array) -> None:
    """Pass 2: adds one ``(T, ...)`` tensor (the same tensors as pass 1, in any order)."""
    self._check(x)
    hi = jnp.asarray(self.buckets)
    self.add_low(_low(x, hi) if x[0].size else None, int(np.prod(x.shape[1:], dtype=np.int64)))

  def add_low(self, hist: jax.Array | None, count: int) -> None:
    """Pass 2: adds a :func:`low_histogram` computed elsewhere over ``count`` values per task."""
    self.buckets  # noqa: B018 (raises before pass 1 is finished)
    if hist is not None:
      self._lo_hist += np.asarray(jax.device_get(hist), np.int64)
    self._seen += int(count)

  def finish_low(self) -> np.ndarray:
    """The ``(T, R)`` float32 values."""
    if self._seen != self.total:
      raise ValueError(f"pass 2 saw {self._seen} values per task, expected {self.total}")
    cum = np.cumsum(self._lo_hist, axis=-1)
    lo = np.empty(self.ranks.shape, np.int64)
    for t in range(self.ranks.shape[0]):
      for j in range(self.ranks.shape[1]):
        lo[t, j] = np.searchsorted(cum[t, j], self._klo[t, j], side="left")
    keys = (self._hi.astype(np.uint32) << np.uint32(16)) | lo.astype(np.uint32)
    return np.asarray(from_keys(jnp.asarray(keys)))
