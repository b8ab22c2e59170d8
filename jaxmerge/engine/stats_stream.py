"""Exact order statistics over a model that arrives one tensor at a time (two histogram passes).

Global steps (TIES's per-task threshold over the whole model, Localize-and-Stitch, BYOM, PCB) need the
``k``-th smallest of ``N`` values spread over every tensor of every checkpoint. :mod:`jaxmerge.stats` finds it
with a two-level radix select over 32-bit keys that order like the floats; the same select works on a stream
because its histograms are sums over tensors:

1. pass 1: add each tensor's 65,536-bucket histogram of the keys' high 16 bits (per task row);
   :meth:`KthSmallest.finish_high` then knows the bucket of every requested rank and the rank inside it;
2. pass 2: add each tensor's histogram of the low 16 bits of the keys that fall in that bucket;
   :meth:`KthSmallest.finish_low` returns the exact values, equal to ``sort(concat(values))[k - 1]``.

Histograms are computed on device by jitted functions (one compile per tensor shape) and accumulated on the host
in int64, so ``N`` may exceed ``2**31``. Memory: ``T * 65,536`` counts for pass 1 and ``T * R * 65,537`` for
pass 2 (``R`` ranks per task).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["KthSmallest", "float_keys", "high_histogram", "keys_to_float", "low_histogram"]

_B = 1 << 16


def float_keys(x: jax.Array) -> jax.Array:
  """uint32 keys that order like the float32 values of ``x`` (flattened).

  Args:
    x: an array of any shape (cast to float32).

  Returns:
    A 1-D uint32 array of ``x.size`` keys, monotone in the float values (negative floats bit-inverted,
    non-negative ones with the sign bit set).
  """
  b = jax.lax.bitcast_convert_type(x.astype(jnp.float32).ravel(), jnp.uint32)
  neg = (b >> 31) == 1
  return jnp.where(neg, ~b, b | jnp.uint32(0x80000000))


def keys_to_float(k: np.ndarray) -> np.ndarray:
  """Inverse of :func:`float_keys` (NumPy, for the host side).

  Args:
    k: uint32 keys (any shape).

  Returns:
    The float32 values, in ``k``'s shape.
  """
  k = np.asarray(k, np.uint32)
  pos = (k >> 31) == 1
  b = np.where(pos, k & np.uint32(0x7FFFFFFF), ~k).astype(np.uint32)
  return b.view(np.float32)


def _rows(x: jax.Array | Sequence[jax.Array]) -> list[jax.Array]:
  """Each task's entries, flattened: the rows of a ``(T, ...)`` array, or the given per-task arrays."""
  if isinstance(x, (list, tuple)):
    return [r.ravel() for r in x]
  return [x[i].ravel() for i in range(x.shape[0])]


def high_histogram(x: jax.Array | Sequence[jax.Array]) -> jax.Array:
  """Pass-1 histogram ``(T, 65536)`` int32 of the high 16 bits of each task row's keys (jit-compatible).

  Args:
    x: one tensor with a leading task axis, ``(T, ...)``, or its ``T`` task slices as a sequence (faster on CPU
      when they are elementwise expressions of separate inputs: XLA then never stores the ``(T, ...)`` stack).

  Returns:
    The ``(T, 65536)`` int32 counts.
  """
  return jnp.stack([jnp.bincount((float_keys(r) >> 16).astype(jnp.int32), length=_B) for r in _rows(x)])


def low_histogram(x: jax.Array | Sequence[jax.Array], hi: jax.Array) -> jax.Array:
  """Pass-2 histogram ``(T, R, 65536)`` int32 of the low 16 bits of the keys whose high bits equal ``hi[t, r]``
  (``hi`` from :meth:`KthSmallest.buckets`; jit-compatible).

  Args:
    x: one tensor with a leading task axis, ``(T, ...)``, or its ``T`` task slices (see :func:`high_histogram`).
    hi: ``(T, R)`` int32 high-16-bit buckets, one per task and requested rank.

  Returns:
    The ``(T, R, 65536)`` int32 counts.
  """
  out = []
  for i, row in enumerate(_rows(x)):
    q = float_keys(row)
    top = (q >> 16).astype(jnp.int32)
    low = (q & jnp.uint32(0xFFFF)).astype(jnp.int32)
    out.append(jnp.stack([jnp.bincount(jnp.where(top == hi[i, j], low, _B), length=_B + 1)[:_B]
                          for j in range(hi.shape[1])]))
  return jnp.stack(out)


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
    return keys_to_float(keys)
