"""Host memory and threads shared by the engine's backends: aligned buffers that JAX's CPU backend adopts without
a copy, process-wide thread pools, and the process's umask (for files the engine writes)."""

from __future__ import annotations

import concurrent.futures
import ctypes
import functools
import os
import threading
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

__all__ = ["aligned_empty", "host_backed", "pool", "trim_heap", "umask"]


def aligned_empty(shape: tuple[int, ...], dtype: Any = np.float32) -> np.ndarray:
  """An uninitialized host array whose data starts on a 64-byte boundary, which JAX's CPU backend adopts
  without a copy (``jax.device_put`` or a jitted call on it does not duplicate the bytes).

  Args:
    shape: the array's shape.
    dtype: its dtype.

  Returns:
    The array (C-contiguous).
  """
  dt = np.dtype(dtype)
  n = int(np.prod(shape, dtype=np.int64))
  raw = np.empty(n * dt.itemsize + 64, np.uint8)
  start = -raw.ctypes.data % 64
  return raw[start:start + n * dt.itemsize].view(dt).reshape(shape)


_POOLS: dict[str, concurrent.futures.ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def pool(name: str, workers: int) -> concurrent.futures.ThreadPoolExecutor:
  """A process-wide thread pool (prefetch, read, write, compile, flat fill), created once and reused by every
  merge: no threads (and thread stacks) are started per merge or per pass.

  Args:
    name: the pool's name (its threads are named ``jaxmerge-<name>``).
    workers: its number of threads (used when the pool is created).

  Returns:
    The executor.
  """
  with _POOLS_LOCK:
    p = _POOLS.get(name)
    if p is None:
      p = _POOLS[name] = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix=f"jaxmerge-{name}")
    return p


def umask() -> int:
  """The process's umask (read from ``/proc`` where it can be, so that it is never changed, even briefly).

  Returns:
    The umask, e.g. ``0o022``.
  """
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  except (OSError, ValueError):
    pass
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def host_backed(leaves: Sequence[Any]) -> bool:
  """Whether a merge of these leaves may gather them in host buffers for the CPU backend.

  Args:
    leaves: the merge's input arrays (JAX or NumPy).

  Returns:
    ``True`` when every JAX array lives on a CPU device, and NumPy inputs only when the CPU is the default
    backend (elsewhere they would be moved to the accelerator).
  """
  if any(isinstance(x, jax.Array) and any(d.platform != "cpu" for d in x.devices()) for x in leaves):
    return False
  return jax.default_backend() == "cpu" or all(isinstance(x, jax.Array) for x in leaves)


@functools.cache
def _libc_trim() -> Any:
  try:
    return ctypes.CDLL("libc.so.6").malloc_trim
  except (OSError, AttributeError):
    return None


def trim_heap() -> None:
  """Returns the C heap's free pages to the system (glibc's ``malloc_trim``; nothing elsewhere).

  JAX's CPU devices allocate from several threads, hence several glibc arenas: a buffer freed in one arena is not
  reused by an allocation in another, and the process's resident memory keeps the freed pages. A merge that frees
  its inputs as it builds its result (:func:`jaxmerge.engine.mesh.by_leaf`) calls this so that the result's pages
  replace the inputs' instead of adding to them.

  Returns:
    ``None``.
  """
  trim = _libc_trim()
  if trim is not None:
    trim(0)
