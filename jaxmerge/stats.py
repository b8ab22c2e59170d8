"""Exact order statistics over many leaves, without sorting.

TIES, Localize-and-Stitch, PCB and BYOM keep the top fraction of a task vector's magnitudes *over the whole
model* (tens of millions of entries). Sorting that on a CPU is slow (``jnp.sort`` of 88M floats takes ~40 s
here). Float32 values order like suitably flipped bit patterns read as unsigned integers, so the exact k-th smallest
value is found by a two-level radix select: a 65,536-bucket histogram of the high 16 bits, then a
65,536-bucket histogram of the low 16 bits inside the one bucket that holds the answer. Two passes over the
data, exact, jit-compatible, no host round-trip.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

__all__ = ["kth_smallest", "kth_smallest_rows", "order_statistic", "top_fraction_threshold"]



_SORT_BELOW = 1 << 16  # small inputs: a sort compiles and runs faster than two histogram passes


def _order_keys(x: jax.Array) -> jax.Array:
  """uint32 keys that order like the float32 values (negative floats flip all bits, others the sign bit)."""
  b = jax.lax.bitcast_convert_type(x.astype(jnp.float32).ravel(), jnp.uint32)
  neg = (b >> 31) == 1
  return jnp.where(neg, ~b, b | jnp.uint32(0x80000000))


def _from_keys(k: jax.Array) -> jax.Array:
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
  keys = [_order_keys(v) for v in values]
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
  return _from_keys(key)


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

  def hists(bucket, length):
    """``sum`` over arrays of the per-task histograms of ``bucket(keys, task)``, one array after another."""
    total = None
    for x in rows:
      if total is not None:
        x = x + total[0, 0].astype(jnp.float32) * 0
      h = jax.vmap(lambda r, t: jnp.bincount(bucket(_order_keys(r), t), length=length))(x, jnp.arange(x.shape[0]))
      total = h if total is None else total + h
    return total

  def rank_in(hist, kk):  # per task: the bucket holding rank kk, and kk's rank inside it
    cum = jnp.cumsum(hist, axis=1)
    b = jax.vmap(lambda c, r: jnp.searchsorted(c, r, side="left"))(cum, kk).astype(jnp.int32)
    before = jnp.take_along_axis(cum, b[:, None], axis=1)[:, 0] - jnp.take_along_axis(hist, b[:, None], axis=1)[:, 0]
    return b, kk - before

  kk = jnp.full((rows[0].shape[0],), k, jnp.int32)
  hi, k_lo = rank_in(hists(lambda q, t: (q >> 16).astype(jnp.int32), 1 << 16), kk)
  low = hists(lambda q, t: jnp.where((q >> 16).astype(jnp.int32) == hi[t], (q & jnp.uint32(0xFFFF)).astype(jnp.int32),
                                     1 << 16), (1 << 16) + 1)
  lo, _ = rank_in(low[:, : 1 << 16], k_lo)
  return _from_keys((hi.astype(jnp.uint32) << 16) | lo.astype(jnp.uint32))


def top_fraction_threshold(magnitudes: Sequence[jax.Array], density: float) -> jax.Array:
  """The magnitude threshold that keeps the top ``density`` fraction (FusionBench/TIES rule).

  With ``N`` entries, the threshold is the ``(N - int(N * density))``-th smallest value and entries
  ``>= threshold`` are kept (ties at the threshold are all kept, so slightly more than ``density`` may
  survive). ``density >= 1`` keeps everything (threshold 0).

  Args:
    magnitudes: arrays of nonnegative values (concatenated flat).
    density: fraction kept.

  Returns:
    The scalar threshold.
  """
  n = sum(int(m.size) for m in magnitudes)
  k = n - int(n * density)
  if k <= 0:
    return jnp.zeros((), jnp.float32)
  return kth_smallest(magnitudes, k)


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
