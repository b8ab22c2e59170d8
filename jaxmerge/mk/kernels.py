"""mergekit 0.1.5's merge methods, one tensor at a time, on the host (NumPy), with its arithmetic.

mergekit computes in the merge's dtype (the config's ``dtype``, else the inputs' common dtype) with PyTorch, which
evaluates each bfloat16/float16 operation in float32 and rounds its result to the 16-bit type, and accumulates
reductions (sums, norms, means, variances) in float32 before rounding once. These kernels keep every
intermediate as a float32 array holding values of the compute dtype and round (:meth:`Num.q`) where PyTorch
rounds, so a 16-bit merge reproduces mergekit's result to within one unit in the last place (ties in a sort
excepted); with a float32 compute dtype rounding is the identity. ``linear`` and ``slerp`` compute in float32
whatever the dtype (as mergekit does); ``ramplus_tl`` and ``arcee_fusion`` return float32 (mergekit's type
promotion).

Each kernel takes the inputs (``base`` or ``None``, the other inputs in mergekit's order), the resolved parameters
(shared: a dict; per input: a list of dicts) and a :class:`Num`, and returns the merged work array.
"""

from __future__ import annotations

import dataclasses
import mmap
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

# The kernels (gta, linear, slerp, ..., one per mergekit method) are called by jaxmerge.mk.engine, which resolves
# their parameters; they are not a public API.
__all__ = ["GTA", "Num", "result_dtype"]

F32 = np.dtype(np.float32)
F64 = np.dtype(np.float64)


_SMALL = 1 << 16  # bytes: arrays below this size come from NumPy's allocator (reused, no fresh pages)


def _pages(nbytes: int) -> np.ndarray:
  """A fresh page-aligned ``uint8`` buffer of private anonymous memory in small pages (``MADV_NOHUGEPAGE``).

  NumPy asks for transparent huge pages on large arrays; a huge page needs 2 MiB of contiguous physical memory,
  which the kernel must compact when memory is fragmented (a machine whose page cache holds the checkpoints). On
  the 2-core VM of the benchmarks that made one streamed TIES merge take 2.5 to 9 s from run to run (reused, in
  small pages: 2.3-3.0 s). The buffers are faulted in once per merge, so small pages cost little and
  keep the time steady."""
  private = {"flags": mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS} if hasattr(mmap, "MAP_ANONYMOUS") else {}
  mem = mmap.mmap(-1, max(nbytes, 1), **private)
  if hasattr(mem, "madvise") and hasattr(mmap, "MADV_NOHUGEPAGE"):
    mem.madvise(mmap.MADV_NOHUGEPAGE)
  return np.frombuffer(mem, np.uint8)


class Scratch:
  """Work buffers reused from tensor to tensor during one merge (thread-safe).

  A merge allocates a dozen temporaries the size of each tensor. Fresh ones cost the kernel more than the
  arithmetic: every page is faulted in and zeroed, and NumPy asks for huge pages on large arrays, whose zeroing
  (and compaction when memory is fragmented) made the same merge take 2 to 9 s from run to run on one machine,
  depending on the allocator's state. Reusing buffers whose pages are already mapped removes that cost and its
  variance; the result does not change (every buffer is written before it is read).

  Buffers are handed out through a :class:`Lease` per tensor and all come back when the lease closes. A request takes
  the smallest idle buffer that fits; when none fits, a new one is allocated and idle buffers under an eighth of
  the request (left by much smaller tensors) are released, so the buffers kept are about those the largest
  tensors in flight needed at once (what the merge's peak memory held anyway).
  """

  def __init__(self) -> None:
    self._idle: list[np.ndarray] = []
    self._lock = threading.Lock()
    self.allocated = 0  # bytes of the buffers allocated so far (the rest were reused)

  def take(self, nbytes: int) -> np.ndarray:
    """An idle buffer (1-D ``uint8``, page-aligned) of at least ``nbytes``."""
    with self._lock:
      fits = [i for i, b in enumerate(self._idle) if b.size >= nbytes]
      if fits:
        return self._idle.pop(min(fits, key=lambda i: self._idle[i].size))
      # buffers of much smaller tensors (a tensor's own temporaries span 8x: bool to float64) are let go
      self._idle = [b for b in self._idle if 8 * b.size >= nbytes]
      self.allocated += nbytes
    return _pages(nbytes)[:nbytes]

  def give(self, bufs: Sequence[np.ndarray]) -> None:
    """Returns buffers taken with :meth:`take`."""
    with self._lock:
      self._idle.extend(bufs)


class Lease:
  """One tensor's work buffers from a :class:`Scratch` (or fresh arrays without one): :meth:`empty` and
  :meth:`zeros` hand out arrays, :meth:`close` returns them all. Nothing may use them after ``close``."""

  def __init__(self, scratch: Scratch | None) -> None:
    self._scratch = scratch
    self._bufs: dict[int, np.ndarray] = {}  # id of the memory owner (NumPy collapses a view's base to it): buffer

  def empty(self, shape, dtype) -> np.ndarray:
    """An uninitialized C-contiguous array."""
    dtype = np.dtype(dtype)
    shape = tuple(shape) if np.ndim(shape) else (int(shape),)
    count = int(np.prod(shape, dtype=np.int64))
    if self._scratch is None or count * dtype.itemsize < _SMALL:  # small ones: the allocator reuses them anyway
      return np.empty(shape, dtype)
    buf = self._scratch.take(count * dtype.itemsize)
    self._bufs[id(buf.base)] = buf
    return buf[:count * dtype.itemsize].view(dtype).reshape(shape)

  def zeros(self, shape, dtype) -> np.ndarray:
    out = self.empty(shape, dtype)
    out.fill(0)
    return out

  def owns(self, x: np.ndarray) -> bool:
    """Whether ``x`` is (a view of) one of this lease's buffers."""
    return x.base is not None and id(x.base) in self._bufs

  def release(self, *arrays: np.ndarray) -> None:
    """Returns the buffers of ``arrays`` (arrays from :meth:`empty`; others are ignored) before the lease closes:
    temporaries that are dead (keeps the merge's peak memory that of fresh temporaries)."""
    bufs = [self._bufs.pop(id(a.base)) for a in arrays if a.base is not None and id(a.base) in self._bufs]
    if bufs:
      self._scratch.give(bufs)

  def close(self) -> None:
    if self._scratch is not None and self._bufs:
      self._scratch.give(list(self._bufs.values()))
    self._bufs = {}


@dataclasses.dataclass(frozen=True)
class Num:
  """The compute dtype and its rounding.

  Attributes:
    dtype: the compute dtype (a NumPy dtype; bfloat16 is ``ml_dtypes.bfloat16``).
    rng: the random generator of the tensor (DARE's and DELLA's masks), or ``None``.
    lease: the tensor's work buffers (:class:`Lease`); ``None``: fresh arrays.
  """

  dtype: np.dtype
  rng: np.random.Generator | None = None
  lease: Any = dataclasses.field(default=None, compare=False)

  def empty(self, shape, dtype=None) -> np.ndarray:
    """A temporary (uninitialized; a work array by default) from the tensor's :class:`Lease`."""
    dtype = self.work if dtype is None else dtype
    return self.lease.empty(shape, dtype) if self.lease is not None else np.empty(shape, dtype)

  def zeros(self, shape, dtype=None) -> np.ndarray:
    out = self.empty(shape, dtype)
    out.fill(0)
    return out

  def release(self, *arrays: np.ndarray) -> None:
    """Gives dead temporaries' buffers back to the lease's scratch (:meth:`Lease.release`)."""
    if self.lease is not None:
      self.lease.release(*arrays)

  def own(self, x: np.ndarray) -> np.ndarray:
    """``x`` when it is a writable temporary (an array that owns its data, or one of the lease's buffers), else a
    copy (in-place steps write into it)."""
    if x.flags.writeable and (x.flags.owndata or (self.lease is not None and self.lease.owns(x))):
      return x
    out = self.empty(x.shape, x.dtype)
    np.copyto(out, x)
    return out

  @property
  def work(self) -> np.dtype:
    """The dtype of the work arrays: float64 for float64, else float32."""
    return F64 if self.dtype == F64 else F32

  @property
  def low(self) -> bool:
    """Whether the compute dtype is a 16-bit float (results are rounded after each operation)."""
    return self.dtype.itemsize < 4

  def q(self, x) -> np.ndarray:
    """``x`` rounded to the compute dtype, as a work array (PyTorch's rounding of one operation's result)."""
    x = np.asarray(x, dtype=self.work)
    if not self.low:
      return x
    if self.dtype.name == "bfloat16" and x.ndim:
      return round_bf16_(x.copy())
    return x.astype(self.dtype).astype(self.work)

  def q_(self, x: np.ndarray) -> np.ndarray:
    """:meth:`q` in place, for a work array that nothing else refers to (a temporary)."""
    if not self.low:
      return x
    if self.dtype.name == "bfloat16" and x.ndim and x.dtype == F32 and x.flags.writeable and x.flags.c_contiguous:
      return round_bf16_(x)
    return self.q(x)

  def s(self, v: float) -> np.ndarray:
    """A Python scalar as PyTorch's operations see it: in float32 (float64 for float64 tensors)."""
    return np.asarray(v, dtype=self.work)

  def sum(self, x, axis=None, keepdims=False) -> np.ndarray:
    """A sum accumulated in the work dtype and rounded once."""
    return self.q(np.sum(np.asarray(x, self.work), axis=axis, keepdims=keepdims, dtype=self.work))

  def norm(self, x, axis=None, keepdims=False) -> np.ndarray:
    """The 2-norm over all entries (``axis=None``) or the last axis, in PyTorch's order (:func:`torch_norm`),
    rounded to the compute dtype."""
    if axis not in (None, -1):
      raise ValueError(f"norm over axis {axis}: only the whole array or the last axis")
    return self.q(torch_norm(x, self, last_axis=axis == -1, keepdims=keepdims))

  def mean(self, x, axis=None, keepdims=False) -> np.ndarray:
    return self.q(np.mean(np.asarray(x, self.work), axis=axis, keepdims=keepdims, dtype=self.work))


# PyTorch (2.x, CPU) computes a float32/bfloat16/float16 2-norm over a contiguous last axis (torch.norm,
# torch.linalg.vector_norm) in 8 float32 lanes: lane j sums the squares of entries j, j + 8, j + 16, ... in order,
# the lanes are then added in order, then the tail (entries past the last full block of 8 float32 or 16 16-bit
# values) one by one. This sequential float32 sum is far from exact on large tensors (1e-5 relative on 1e6
# entries), and mergekit's karcher, multislerp and model_stock branch on norms, so they are reproduced bit for bit.
_TORCH_NORM_LANES = 8


def torch_norm(x, n: Num, last_axis: bool = False, keepdims: bool = False) -> np.ndarray:
  """``torch.linalg.vector_norm(x)`` (or ``dim=-1``) of ``x``, a work array holding values of ``n.dtype``, with
  PyTorch's summation order, unrounded (float32; float64 tensors: NumPy's sum, PyTorch's order is not modelled).

  Args:
    x: the array.
    n: the arithmetic (its dtype sets the block size: 8 float32 or 16 16-bit values).
    last_axis: reduce the last axis only (else every entry).
    keepdims: keep the reduced axis (size 1).

  Returns:
    The norms, in the work dtype.
  """
  x = np.asarray(x, n.work)
  if n.work != F32:
    return np.sqrt(np.sum(x * x, axis=-1 if last_axis else None, keepdims=keepdims, dtype=n.work))
  lead = x.shape[:-1] if last_axis else ()
  rows = x.reshape(-1, x.shape[-1] if x.ndim else 1) if last_axis else x.reshape(1, -1)
  cols = rows.shape[1]
  block = _TORCH_NORM_LANES * (2 if n.low else 1)
  full = cols - cols % block
  lanes = np.zeros((rows.shape[0], _TORCH_NORM_LANES), F32)
  if full:
    body = rows[:, :full]
    # reducing the middle axis adds the blocks one after another, as PyTorch's lanes do
    np.sum(np.square(body).reshape(rows.shape[0], -1, _TORCH_NORM_LANES), axis=1, dtype=F32, out=lanes)
  acc = lanes[:, 0].copy()
  for j in range(1, _TORCH_NORM_LANES):
    acc += lanes[:, j]
  for j in range(full, cols):
    acc += np.square(rows[:, j])
  out = np.sqrt(acc)
  if last_axis:
    out = out.reshape(lead + ((1,) if keepdims else ()))
  else:
    out = out.reshape((1,) * x.ndim if keepdims else ())
  return out


_ROUND_BLOCK = 1 << 15


def round_bf16_(x: np.ndarray) -> np.ndarray:
  """Rounds a C-contiguous float32 array to bfloat16 values in place (round to nearest even on the bit pattern,
  as ``astype(bfloat16)``), and returns it. Values past bfloat16's range become inf; NaN stays NaN (the quiet NaNs
  arithmetic produces; the inputs are checked finite). The array is processed in blocks of 32768 entries that
  stay in the CPU cache across the five passes (4 to 8 times faster than whole-array passes).

  Args:
    x: the array (float32, C-contiguous).

  Returns:
    ``x``.
  """
  u = x.reshape(-1).view(np.uint32)
  tmp = np.empty(min(_ROUND_BLOCK, u.size), np.uint32)
  mask = np.uint32(0xFFFF0000)
  for i in range(0, u.size, _ROUND_BLOCK):
    c = u[i:i + _ROUND_BLOCK]
    t = tmp[:c.size]
    np.right_shift(c, 16, out=t)
    np.bitwise_and(t, 1, out=t)
    np.add(t, 0x7FFF, out=t)
    np.add(c, t, out=c)
    np.bitwise_and(c, mask, out=c)
  return x


# ----------------------------------------------------------------------------------------------------------
# Generalized task arithmetic: task_arithmetic, ties, dare_*, breadcrumbs*, della*.


def _rescaled(n: Num, tensor: np.ndarray, mask: np.ndarray, rescale: bool, eps: float = 1e-7,
              inplace: bool = False) -> np.ndarray:
  """``tensor * mask``, rescaled to ``tensor``'s L1 norm with ``rescale`` (mergekit's ``rescaled_masked_tensor``);
  ``inplace``: written into ``tensor`` (a temporary)."""
  before = n.sum(np.abs(tensor)) if rescale else None
  masked = n.q_(np.multiply(tensor, mask, out=tensor if inplace else None, dtype=n.work))
  if not rescale:
    return masked
  after = n.sum(np.abs(masked))
  if before < eps or after < eps:
    return masked
  return n.q_(np.multiply(masked, n.q(before / after), out=masked))


def _top_order(w: np.ndarray, descending: bool) -> np.ndarray:
  """The sort order of mergekit's ``torch.argsort``/``torch.sort`` on CPU: equal values keep index order."""
  return np.argsort(-w if descending else w, kind="stable")


def magnitude(n: Num, d: np.ndarray, density: float, rescale: bool, inplace: bool = False) -> np.ndarray:
  """TIES's trim: exactly ``max(1, int(density * size))`` largest magnitudes (equal ones in index order);
  ``inplace``: written into ``d`` (a temporary)."""
  if density >= 1:
    return d
  if density <= 0 or d.size == 0:
    return np.zeros_like(d)
  k = max(1, int(density * d.size))
  mags = np.abs(d.reshape(-1), out=n.empty(d.size, d.dtype))
  keep = top_k_mask(mags, k, n)
  n.release(mags)
  out = _rescaled(n, d, keep.reshape(d.shape), rescale, inplace=inplace)
  n.release(keep)
  return out


def top_k_mask(w: np.ndarray, k: int, n: Num | None = None) -> np.ndarray:
  """The ``k`` largest entries of ``w`` (1-D), equal values taken in index order (a stable descending sort's
  first ``k``), in linear time: everything above the ``k``-th largest value, then the first entries equal to it.
  With ``n``, the temporaries and the mask are ``n``'s buffers."""
  if k >= w.size:
    return np.ones(w.size, bool)
  empty = n.empty if n is not None else np.empty
  part = empty(w.shape, w.dtype)
  np.copyto(part, w)
  part.partition(w.size - k)
  kth = part[w.size - k]
  mask = np.greater(w, kth, out=part.view(bool)[:w.size])  # part is dead: its buffer holds the mask
  tied = np.equal(w, kth, out=empty(w.shape, bool))
  ties = np.flatnonzero(tied)[:k - int(np.count_nonzero(mask))]
  if n is not None:
    n.release(tied)
  mask[ties] = True
  return mask


def magnitude_outliers(n: Num, d: np.ndarray, density: float, gamma: float, rescale: bool) -> np.ndarray:
  """Breadcrumbs: drop the ``gamma`` largest magnitudes, keep the next ``int(density * size)``."""
  if density >= 1:
    return d
  size = d.size
  target = int(density * size)
  top = int(gamma * size)
  bottom = max(0, size - target - top)
  order = _top_order(np.abs(d).reshape(-1), False)
  mask = np.zeros(size, n.work)
  mask[order[bottom:bottom + target]] = 1
  return _rescaled(n, d, mask.reshape(d.shape), rescale)


def _random_num(n: Num) -> Num:
  """mergekit draws DARE/DELLA masks in bfloat16 for bfloat16 tensors and in float32 otherwise (float16 too)."""
  return n if n.dtype.itemsize != 2 or n.dtype.name == "bfloat16" else Num(F32, n.rng)


def bernoulli(n: Num, d: np.ndarray, density: float, rescale: bool) -> np.ndarray:
  """DARE: keep each entry with probability ``density``; ``rescale``: restore the tensor's L1 norm."""
  if density >= 1:
    return d
  w = _random_num(n)
  mask = (n.rng.random(d.shape, dtype=np.float32) < np.float32(w.q(density))).astype(n.work)
  return n.q(_rescaled(w, d, mask, rescale))


def della_magprune(n: Num, d: np.ndarray, density: float, epsilon: float, rescale: bool, where: str) -> np.ndarray:
  """DELLA's MAGPRUNE: keep probabilities from ``density - epsilon`` to ``density + epsilon`` by magnitude rank
  within each row (1-D tensors are one row)."""
  if density >= 1:
    return d
  if density <= 0:
    return np.zeros_like(d)
  if density + epsilon >= 1 or density - epsilon <= 0:
    raise ValueError(f"{where}: della needs density +/- epsilon in (0, 1), got density {density} and epsilon "
                     f"{epsilon}")
  w = _random_num(n)
  shape = d.shape
  x = d.reshape(1, -1) if d.ndim < 2 else d
  ranks = w.q(np.argsort(np.argsort(np.abs(x), axis=1, kind="stable"), axis=1, kind="stable") + 1)
  lo, hi = ranks.min(axis=1, keepdims=True), ranks.max(axis=1, keepdims=True)
  rank_norm = np.clip(w.q(w.q(ranks - lo) / w.q(hi - lo)), 0, 1)
  probs = w.q(w.s(density - epsilon) + w.q(w.q(rank_norm * 2) * w.s(epsilon)))
  mask = (n.rng.random(x.shape, dtype=np.float32) < probs).astype(n.work)
  return n.q(_rescaled(w, x, mask, rescale)).reshape(shape)


def sign_mask(n: Num, deltas: np.ndarray) -> np.ndarray:
  """TIES's election (``sum``): entries whose sign equals the sign of the column sum (a zero sum elects ``+``);
  zero entries are never kept."""
  majority = np.where(n.sum(deltas, axis=0) >= 0, 1.0, -1.0)
  return np.sign(deltas) == majority


GTA = {  # method: (consensus, sparsification, default normalize, default rescale)
    "task_arithmetic": (False, None, False, False),
    "ties": (True, "magnitude", True, False),
    "dare_ties": (True, "random", False, True),
    "dare_linear": (False, "random", False, True),
    "breadcrumbs": (False, "magnitude_outliers", False, False),
    "breadcrumbs_ties": (True, "magnitude_outliers", False, False),
    "della": (True, "della_magprune", True, True),
    "della_linear": (False, "della_magprune", False, True),
}


def finite(x: np.ndarray) -> bool:
  """Whether every entry is finite: two reductions (NaN propagates through max) instead of a boolean array."""
  return bool(np.isfinite(np.max(x)) and np.isfinite(np.min(x))) if x.size else True


def to_work(n: Num, x: np.ndarray, into: np.ndarray) -> bool:
  """Writes ``x`` (an input as stored) into the work array ``into`` as mergekit loads it: rounded to the compute
  dtype (one rounding at most: straight to the work dtype when that is exact), and says whether it is finite (the
  check runs on the 16-bit values widened, which NumPy reduces faster)."""
  np.copyto(into, x if x.dtype == n.dtype or n.dtype == n.work else x.astype(n.dtype), casting="unsafe")
  return finite(into if x.dtype.itemsize <= 2 else x)


_BLOCK = 1 << 16  # entries: a block's few float32 temporaries stay in the CPU's L2 cache


def task_arithmetic_blocked(n: Num, inputs: Sequence[np.ndarray], bi: int, weights: Sequence[float],
                            normalize: bool, lam: float, out: np.ndarray) -> list[int]:
  """mergekit's ``task_arithmetic`` (:func:`gta` without sparsification or election), computed block by block
  straight from the inputs as stored, into ``out``.

  Every entry goes through the operations of :func:`gta` in the same order and with the same roundings (the
  conversion to the compute dtype, ``m - base``, the weight, the sum in input order, the division, ``lambda``,
  ``+ base``), so the bytes are :func:`gta`'s; but the work arrays are blocks that stay in the cache instead of
  whole float32 copies of every input, which makes a 16-bit merge several times less memory traffic.

  Args:
    n: the arithmetic.
    inputs: every input tensor in the plan's order (any float dtype, one shape), the base at ``bi``.
    bi: the base's index.
    weights: the other inputs' weights, in order.
    normalize: divide by the sum of the weights.
    lam: ``lambda``.
    out: receives the result (the inputs' shape; its dtype is the written one).

  Returns:
    The indices of the inputs holding NaN or Inf (empty when all are finite; ``out`` is then incomplete).
  """
  flat = [np.asarray(x).reshape(-1) for x in inputs]
  order = [i for i in range(len(flat)) if i != bi]
  w = n.q(list(weights))
  divisor = n.sum(w)
  if abs(divisor) < 1e-8:
    divisor = n.s(1)
  size = out.size
  o = out.reshape(-1)
  block = max(1, min(_BLOCK, size))
  base_b, tmp_b, acc_b = (np.empty(block, n.work) for _ in range(3))
  bad: set[int] = set()

  def load(i: int, s: int, e: int, into: np.ndarray) -> np.ndarray:
    if not to_work(n, flat[i][s:e], into):
      bad.add(i)
    return into

  for s in range(0, size, block):
    e = min(s + block, size)
    base = load(bi, s, e, base_b[:e - s])
    acc = acc_b[:e - s]
    for j, (i, wi) in enumerate(zip(order, w)):
      d = n.q_(np.subtract(load(i, s, e, tmp_b[:e - s]), base, out=tmp_b[:e - s]))
      if wi != 1:
        d = n.q_(np.multiply(d, wi, out=d))
      if j == 0:
        np.copyto(acc, d)
      else:
        np.add(acc, d, out=acc)
    acc = n.q_(acc)
    if normalize:
      acc = n.q_(np.divide(acc, divisor, out=acc))
    if lam != 1:
      acc = n.q_(np.multiply(acc, n.s(lam), out=acc))
    acc = n.q_(np.add(acc, base, out=acc))
    np.copyto(o[s:e], acc, casting="unsafe")
  return sorted(bad)


def gta(method: str, n: Num, base: np.ndarray, models: Sequence[np.ndarray], shared: dict, per: Sequence[dict],
        where: str = "") -> np.ndarray:
  """mergekit's generalized task arithmetic: sparsify each task vector, weight, elect (TIES methods), sum, divide
  by the (kept) weights with ``normalize``, times ``lambda``, plus the base.

  The models' work arrays are overwritten (their task vectors are computed in place); the base is not.
  """
  consensus, sparsify, _, _ = GTA[method]
  if not models:
    return base
  rescale = bool(shared["rescale"])
  weights = n.q([p["weight"] for p in per])  # mergekit: a tensor of the compute dtype
  deltas = []
  for m, p, w in zip(models, per, weights):
    d = n.own(m)
    np.subtract(d, base, out=d)
    d = n.q_(d)
    if sparsify == "magnitude":
      d = magnitude(n, d, p["density"], rescale, inplace=True)
    elif sparsify == "magnitude_outliers":
      d = magnitude_outliers(n, d, p["density"], p["gamma"], rescale)
    elif sparsify == "random":
      d = bernoulli(n, d, p["density"], rescale)
    elif sparsify == "della_magprune":
      d = della_magprune(n, d, p["density"], p["epsilon"], rescale, where)
    if w != 1:
      d = n.q_(np.multiply(d, w, out=n.own(d)))
    deltas.append(d)
  # Sums accumulate in the work dtype in input order and round once (PyTorch's reduction of a 16-bit stack).
  shape = deltas[0].shape
  if consensus:
    total = n.empty(shape)
    np.copyto(total, deltas[0])
    for d in deltas[1:]:
      np.add(total, d, out=total)
    positive = np.greater_equal(total, 0, out=n.empty(shape, bool))  # the elected sign (a zero sum elects +)
    mixed = total  # the sum is no longer needed: its buffer accumulates the kept entries
    mixed.fill(0)
    divisor = n.zeros(shape)
    keep, nonzero, weighted = n.empty(shape, bool), n.empty(shape, bool), None
    for d, w in zip(deltas, weights):
      np.greater(d, 0, out=keep)
      np.equal(keep, positive, out=keep)
      keep &= np.not_equal(d, 0, out=nonzero)
      np.add(mixed, np.multiply(d, keep, out=d), out=mixed)
      if w == 1:
        np.add(divisor, keep, out=divisor)
      else:
        weighted = n.empty(shape) if weighted is None else weighted
        np.add(divisor, np.multiply(keep, w, out=weighted, dtype=n.work), out=divisor)
    mixed = n.q_(mixed)
    divisor = n.q_(divisor)
    divisor += np.equal(divisor, 0, out=keep)
  else:
    mixed = n.empty(shape)
    if len(deltas) == 1:
      np.copyto(mixed, deltas[0])
    else:
      np.add(deltas[0], deltas[1], out=mixed)
    for d in deltas[2:]:
      np.add(mixed, d, out=mixed)
    mixed = n.q_(mixed)
    divisor = n.sum(weights)
    if abs(divisor) < 1e-8:
      divisor = n.s(1)
  if shared["normalize"]:
    mixed = n.q_(np.divide(mixed, divisor, out=n.own(mixed)))
  if shared["lambda"] != 1:
    mixed = n.q_(np.multiply(mixed, n.s(shared["lambda"]), out=n.own(mixed)))
  return n.q_(np.add(mixed, base, out=mixed))


# ----------------------------------------------------------------------------------------------------------
# Interpolations.


def linear(n: Num, tensors: Sequence[np.ndarray], weights: Sequence[float], normalize: bool) -> np.ndarray:
  """Weighted sum in float32 (float64 for float64 tensors), divided by the sum of the weights with ``normalize``."""
  dt = n.work
  w = np.asarray(weights, dt)
  out = np.zeros(tensors[0].shape, dt)
  for x, c in zip(tensors, w):
    out = _fma(x, c, out)
  if normalize:
    out = out / np.sum(w, dtype=dt)
  return n.q(out)


def _fma(x: np.ndarray, c, acc: np.ndarray) -> np.ndarray:
  """``acc + x * c`` with one rounding, as PyTorch's ``addcmul_`` computes it on CPU (a fused multiply-add): in
  float64 and rounded to float32 (the float32 product is exact in float64; float64 work arrays: unfused)."""
  if acc.dtype != F32:
    return acc + x.astype(acc.dtype) * c
  return (acc.astype(F64) + x.astype(F64) * F64.type(c)).astype(F32)


_SLERP_CHUNK = 1 << 20


def slerp(n: Num, t: float, v0: np.ndarray, v1: np.ndarray, dot_threshold: float = 0.9995,
          eps: float = 1e-8) -> np.ndarray:
  """SLERP of two whole tensors in float32 (linear when they are nearly collinear), rounded to the dtype."""
  dt = n.work
  a, b = v0.reshape(-1).astype(dt), v1.reshape(-1).astype(dt)
  t = dt.type(t)
  if not a.size:
    return v0
  # mergekit: norms of chunks of 2**20 entries (PyTorch's order), then the norm of the chunk norms
  f = Num(dt)
  chunks = range(0, a.size, _SLERP_CHUNK)
  na = torch_norm(np.array([torch_norm(a[i:i + _SLERP_CHUNK], f) for i in chunks], dt), f)
  nb = torch_norm(np.array([torch_norm(b[i:i + _SLERP_CHUNK], f) for i in chunks], dt), f)
  na = na if na > eps else dt.type(1)
  nb = nb if nb > eps else dt.type(1)
  dot = dt.type(0)
  for i in chunks:
    dot = dot + np.sum((a[i:i + _SLERP_CHUNK] / na) * (b[i:i + _SLERP_CHUNK] / nb), dtype=dt)
  dot = np.clip(dot, -1, 1)
  if abs(dot) > dot_threshold:
    ca, cb = 1 - t, t
  else:
    theta = np.arccos(dot)
    st = np.sin(theta)
    ca, cb = np.sin((1 - t) * theta) / st, np.sin(t * theta) / st
  return n.q(ca * a + cb * b).reshape(v0.shape)


def nuslerp_pair(n: Num, t: float, v0: np.ndarray, v1: np.ndarray, row_wise: bool, flatten: bool,
                 eps: float = 1e-8) -> np.ndarray:
  """NuSLERP of two tensors in the compute dtype: flattened (default), or along rows/columns."""
  shape = v0.shape
  if flatten:
    v0, v1 = v0.reshape(-1), v1.reshape(-1)
  elif row_wise:
    v0, v1 = np.swapaxes(v0, 0, -1), np.swapaxes(v1, 0, -1)

  def unit(x):
    return n.q(x / n.q(np.maximum(n.norm(x, axis=-1, keepdims=True), n.s(1e-7))))

  cos = np.clip(n.sum(n.q(unit(v0) * unit(v1)), axis=-1, keepdims=True), -1, 1)
  colinear = n.q(1 - n.q(np.square(cos))) <= eps**2
  theta = n.q(np.arccos(np.where(colinear, 0, cos)))
  st = n.q(np.sin(theta))
  with np.errstate(divide="ignore", invalid="ignore"):
    res = n.q(n.q(n.q(n.q(np.sin(n.q(n.s(1 - t) * theta))) * v0) + n.q(n.q(np.sin(n.q(n.s(t) * theta))) * v1)) / st)
  res = np.where(colinear, n.q(n.q(n.s(1 - t) * v0) + n.q(n.s(t) * v1)), res)
  if row_wise and not flatten:
    res = np.swapaxes(res, 0, -1)
  return res.reshape(shape)


def nuslerp(n: Num, base: np.ndarray | None, models: Sequence[np.ndarray], weights: Sequence[float],
            row_wise: bool, flatten: bool) -> np.ndarray:
  total = sum(weights)
  t = 0.5 if abs(total) < 1e-6 else weights[1] / total
  if base is not None:
    return n.q(base + nuslerp_pair(n, t, n.q(models[0] - base), n.q(models[1] - base), row_wise, flatten))
  return nuslerp_pair(n, t, models[0], models[1], row_wise, flatten)


def multislerp(n: Num, base: np.ndarray | None, models: Sequence[np.ndarray], weights: Sequence[float],
               normalize_weights: bool, eps: float, where: str = "") -> np.ndarray:
  """Barycentric interpolation on the hypersphere (tangent space at the weighted mean of the unit vectors)."""
  if len(models) == 1:
    return models[0]
  x = np.stack(models)
  if base is not None:
    x = n.q(x - base)
  flat = x.reshape(len(models), -1)
  w = n.q(weights)
  if normalize_weights:
    w = n.q(w / n.sum(w))
  norms = n.norm(flat, axis=-1, keepdims=True)
  units = n.q(flat / n.q(norms + n.s(eps)))
  mean = n.sum(n.q(units * w[:, None]), axis=0)
  mean_norm = n.norm(mean)
  if mean_norm < eps:
    if len(models) == 2:
      res = n.q(n.q(x[0] * w[0]) + n.q(x[1] * w[1]))
      return n.q(res + base) if base is not None else res
    raise ValueError(f"{where}: multislerp: the weighted sum of the unit task vectors is zero (antipodal inputs "
                     "with balancing weights); use different weights")
  mean = n.q(mean / mean_norm)
  dots = n.sum(n.q(units * mean), axis=-1, keepdims=True)
  tangents = n.q(units - n.q(dots * mean))
  tr = n.sum(n.q(tangents * w[:, None]), axis=0)
  tn = n.q(n.norm(tr) + n.s(eps))
  res = n.q(n.q(mean * n.q(np.cos(tn))) + n.q(tr * n.q(n.q(np.sin(tn)) / tn)))
  avg = n.sum(n.q(norms[:, 0] * w))
  res = n.q(res * avg).reshape(x.shape[1:])
  return n.q(res + base) if base is not None else res


def karcher(n: Num, tensors: Sequence[np.ndarray], max_iter: int, tol: float) -> np.ndarray:
  """The weighted Karcher mean on the unit sphere (equal weights), scaled by the mean norm."""
  if len(tensors) == 1:
    return tensors[0]
  dt = n.work
  alphas = [1.0 / len(tensors)] * len(tensors)
  f = Num(F32 if dt == F32 else F64)  # mergekit's norms: of the tensors converted to float32
  norms = [torch_norm(t, f) for t in tensors]
  units = [np.zeros_like(t) if nm == 0 else n.q(t / nm) for t, nm in zip(tensors, norms)]
  valid = [i for i, nm in enumerate(norms) if nm > tol]
  if not valid:
    return n.q(sum(t * 0 for t in tensors))
  total = sum(alphas[i] for i in valid)
  coef = [alphas[i] / total for i in valid]
  units_v = [units[i] for i in valid]
  mean = np.zeros_like(units_v[0])
  for a, u in zip(coef, units_v):
    mean = n.q(mean + n.q(n.s(a) * u))
  mn = torch_norm(mean, f)
  mean = units_v[0].copy() if mn < tol else n.q(mean / mn)
  for _ in range(max_iter):
    tangent = np.zeros_like(mean)
    for a, u in zip(coef, units_v):
      dot = np.clip(n.sum(mean.reshape(-1) * u.reshape(-1)), -1.0, 1.0)
      theta = n.q(np.arccos(dot))
      if theta < tol:
        continue
      c = n.q(n.s(a) * n.q(theta / n.q(np.sin(theta))))
      tangent = n.q(tangent + n.q(c * n.q(u - n.q(dot * mean))))
    tn = torch_norm(tangent, f)
    if tn < tol:
      break
    # a 0-d tensor as the first factor is converted to the compute dtype by PyTorch (as the second, it is not)
    mean = n.q(n.q(n.q(np.cos(tn)) * mean) + n.q(n.q(np.sin(tn)) * n.q(tangent / tn)))
    un = torch_norm(mean, f)
    if un > tol:
      mean = n.q(mean / un)
  scale = dt.type(0)
  for a, nm in zip(alphas, norms):
    scale = scale + dt.type(a) * nm
  return n.q(n.q(scale) * mean)


# ----------------------------------------------------------------------------------------------------------
# Other task-vector methods.


def sce(n: Num, base: np.ndarray, models: Sequence[np.ndarray], select_topk: float) -> np.ndarray:
  """SCE: keep the ``select_topk`` share of entries with the largest variance across tasks, elect signs, weight
  each task vector by its mean square, disjoint weighted mean."""
  if not models:
    return base
  tvs = np.stack([n.q(m - base) for m in models])
  if select_topk < 1:
    tvs = n.q(tvs * _sce_mask(n, tvs, select_topk)[None])
  erase = sign_mask(n, tvs)
  w = n.mean(n.q(np.square(tvs)).reshape(len(models), -1), axis=1)
  ws = float(n.sum(w))
  w = n.q(np.ones_like(w) / len(models)) if abs(ws) < 1e-6 else n.q(w / n.s(ws))
  w = w.reshape((len(models),) + (1,) * base.ndim)
  erased = n.q(w * erase)
  merged = n.sum(n.q(tvs * erased), axis=0)
  final = n.q(merged / n.q(np.maximum(n.sum(erased, axis=0), n.s(1e-6))))
  return n.q(base + final)


def _sce_mask(n: Num, tvs: np.ndarray, density: float) -> np.ndarray:
  if density <= 0:
    return np.zeros(tvs.shape[1:], n.work)
  if density >= 1:
    return np.ones(tvs.shape[1:], n.work)
  var = n.q(np.var(tvs.astype(n.work), axis=0, dtype=n.work))
  k = int(int(np.count_nonzero(var)) * density)
  mask = np.zeros(var.size, n.work)
  if k:
    mask[top_k_mask(np.abs(var).reshape(-1), k)] = 1
  return mask.reshape(var.shape)


def _ram_vectors(n: Num, base: np.ndarray, models: Sequence[np.ndarray], epsilon: float):
  tv = np.stack([n.q(m - base) for m in models]).reshape(len(models), -1)
  nonzero = np.abs(tv) > n.q(epsilon)  # PyTorch compares a 16-bit tensor with the scalar rounded to its dtype
  counts = nonzero.sum(axis=0, keepdims=True)
  return tv, nonzero, counts, counts > 1, counts == 1


def ram(n: Num, base: np.ndarray, models: Sequence[np.ndarray], epsilon: float) -> np.ndarray:
  """RAM: entries changed by one model are taken whole, entries changed by several are averaged over them."""
  if not models:
    return base
  tv, nonzero, counts, overlap, unique = _ram_vectors(n, base, models, epsilon)
  z = n.q(tv * nonzero)
  parts = n.q(n.q(z * unique) + n.q(n.q(z * overlap) / np.maximum(counts, 1)))
  return n.q(base + n.sum(parts, axis=0).reshape(base.shape))


def ramplus_tl(n: Num, base: np.ndarray, models: Sequence[np.ndarray], r: float, alpha: float,
               epsilon: float) -> np.ndarray:
  """RAM+ (tensor-local): RAM with each model's unique entries scaled by ``1 + r * clip(shared/unique, 0,
  alpha)``. Returns float32 (mergekit promotes the 16-bit inputs)."""
  if not models:
    return base
  f = np.promote_types(n.work, F32)
  tv, nonzero, counts, overlap, unique = _ram_vectors(n, base, models, epsilon)
  shared_c = (nonzero & overlap).sum(axis=1).astype(F32)
  unique_c = np.maximum((nonzero & unique).sum(axis=1).astype(F32), F32.type(epsilon))
  lam = (1 + F32.type(r) * np.clip(shared_c / unique_c, 0, F32.type(alpha))).astype(F32)
  z = n.q(tv * nonzero)
  parts = n.q(z * unique).astype(f) * lam[:, None] + n.q(n.q(z * overlap) / np.maximum(counts, 1)).astype(f)
  return (base.astype(f) + np.sum(parts, axis=0, dtype=f).reshape(base.shape)).astype(f)


def nearswap(n: Num, a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
  """NearSwap: move the base ``a`` towards ``b`` where they are within ``t`` of each other."""
  diff = np.abs(n.q(a - b))
  w = np.clip(n.q(n.s(t) * n.q(1 / n.q(np.maximum(diff, n.s(1e-6))))), 0, 1)  # scalar / x: x's reciprocal times t
  return n.q(n.q(w * b) + n.q(n.q(1 - w) * a))


def _softmax(n: Num, x: np.ndarray) -> np.ndarray:
  x = x.astype(n.work)
  e = np.exp(x - x.max(axis=-1, keepdims=True))
  return n.q(e / e.sum(axis=-1, keepdims=True, dtype=n.work))


def arcee_fusion(n: Num, a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Arcee Fusion: take ``b``'s change where its importance (``|b - a|`` times the row's softmax KL divergence)
  is at least ``median + 1.5 IQR``. Quantiles are exact (mergekit samples 1,000,000 entries of larger tensors).
  Returns float32 (mergekit's promotion of the float32 mask)."""
  f = np.promote_types(n.work, F32)
  diff = np.abs(n.q(b - a))
  p = n.q(_softmax(n, b) + n.s(1e-8))
  q = n.q(_softmax(n, a) + n.s(1e-8))
  kl = n.sum(n.q(p * n.q(np.log(n.q(p / q)))), axis=-1, keepdims=True)
  importance = n.q(diff * kl)
  srt = np.sort(importance.reshape(-1))
  idx = (np.asarray([0.25, 0.5, 0.75], F32) * F32.type(srt.size - 1)).astype(np.int64)
  q1, med, q3 = srt[idx]
  threshold = n.q(med + n.q(n.s(1.5) * n.q(q3 - q1)))
  mask = (importance >= threshold).astype(F32)
  return (a.astype(f) + n.q(b - a).astype(f) * mask).astype(f)


def model_stock(n: Num, base: np.ndarray, models: Sequence[np.ndarray], filter_wise: bool) -> np.ndarray:
  """Model Stock: interpolate between the base and the models' average by the mean pairwise cosine of the task
  vectors (per tensor, or per row with ``filter_wise``)."""
  shape = base.shape
  if filter_wise:
    w0 = base[None] if base.ndim == 1 else base
    ws = [m[None] if m.ndim == 1 else m for m in models]
  else:
    w0, ws = base.reshape(-1), [m.reshape(-1) for m in models]
  offsets = [n.q(w - w0) for w in ws]
  cos = []
  for i, a in enumerate(offsets):
    for b in offsets[i + 1:]:
      prod = n.q(n.norm(a, axis=-1) * n.norm(b, axis=-1))
      cos.append(np.clip(n.q(n.sum(n.q(a * b), axis=-1) / n.q(np.maximum(prod, n.s(1e-6)))), -1, 1))
  c = n.mean(np.stack(cos), axis=0)[..., None]
  count = len(ws)
  den = n.q(1 + n.q((count - 1) * c))
  singular = np.abs(den) < 1e-6
  with np.errstate(divide="ignore", invalid="ignore"):
    t = np.where(singular, 0, n.q(n.q(count * c) / np.where(singular, 1, den)))
  avg = ws[0]
  for w in ws[1:]:
    avg = n.q(avg + w)
  avg = n.q(avg / count)
  return n.q(n.q(t * avg) + n.q(n.q(1 - t) * w0)).reshape(shape)


def result_dtype(method: str, compute: np.dtype) -> np.dtype:
  """The dtype mergekit's kernel returns for inputs of dtype ``compute``.

  Args:
    method: the mergekit method.
    compute: the compute dtype.

  Returns:
    ``compute``, or float32 (float64 for float64) for ``ramplus_tl`` and ``arcee_fusion``.
  """
  if method in ("ramplus_tl", "arcee_fusion"):
    return np.promote_types(np.dtype(np.float64) if compute == F64 else F32, F32)
  return compute

