"""Native CPU kernels, called from XLA programs through the XLA FFI.

XLA:CPU runs TIES's exact per-task threshold (two radix-histogram passes, a scatter per entry) near 4-5 ns per
entry on one core, and jaxmerge's whole-model programs need one concatenated ``(T, N)`` copy of the task vectors.
:func:`run` instead runs the whole global TIES merge in one call of a small C kernel (``kernels.c``) that reads
each model's leaves where they lie, on every core: the same exact thresholds, the XLA programs' float32 operation
order (equal results up to the rounding of the final multiply-add, which XLA fuses in some programs and not in
others), and no copy of the task vectors. It does the same for task arithmetic and simple averaging, and
for DARE's drop in front of any of the three (the counter-based draws of :func:`jaxmerge.tree.leaf_uniform`,
hashed in the kernel under the keys of :func:`dare_keys`): no compilation, one pass over the inputs. The leaves
may be float32 or bfloat16 (read as they are, float32 math, results rounded to bfloat16 as XLA's convert).

The kernel is compiled on first use with the machine's C compiler (``$CC``, else ``cc``/``gcc``/``clang``) against
the XLA FFI headers that ship with jaxlib, and cached under ``$JAXMERGE_CACHE/native`` (default
``~/.cache/jaxmerge/native``), keyed by the source, jaxlib's version and the compiler. The library is compiled in a
private temporary directory and renamed into place next to its SHA-256; it is loaded only from a directory owned
by the user and not writable by others, only when it is a regular file of the user's that nobody else can write
and only when its content still has that hash. Anything else (a planted, truncated or foreign file, a shared
cache directory) is rebuilt, in a private temporary directory when the cache directory itself is unsafe, with a
warning. Without a compiler, or with
``JAXMERGE_NATIVE=0``, :func:`available` is ``False`` and :func:`jaxmerge.merge` keeps its XLA programs (the
same results, slower on CPU). Only the CPU platform is served; accelerators always use the XLA programs.
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from jaxmerge import stats
from jaxmerge import tree as jtree
from jaxmerge.base import identity_of, steps_of
from jaxmerge.engine.host import aligned_empty, umask

__all__ = ["Spec", "available", "build", "dare_keys", "fits", "run", "spec", "ties_thresholds", "ties_rows"]

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("kernels.c")
_TARGET = "jaxmerge_ties"
_OPS = {"ties": 0, "sum": 1, "mean": 2}
_MERGE = {"sum": 0, "mean": 1, "max": 2}
_ZERO_SIGN = {"majority": 0, "positive": 1}
_MAX_TASKS = 1024
_MAX_LINEAR_TASKS = 64  # jaxmerge.tree.task_sum's unrolled adds (a reduce beyond): the kernel sums in the same order
_lock = threading.Lock()
_state: dict[str, Any] = {}


def _cache_dir() -> Path:
  root = os.environ.get("JAXMERGE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "jaxmerge")
  return Path(os.path.expanduser(root)) / "native"


def _unsafe(path: Path, want_dir: bool) -> str | None:
  """Why ``path`` may not be trusted (``None`` when it is the user's own, not writable by group or others, and a
  real directory or regular file as asked; a symbolic link is refused)."""
  try:
    st = os.lstat(path)
  except OSError as e:
    return f"cannot stat it ({e.strerror})"
  if stat.S_ISLNK(st.st_mode):
    return "it is a symbolic link"
  if want_dir != stat.S_ISDIR(st.st_mode) or (not want_dir and not stat.S_ISREG(st.st_mode)):
    return "it is not a directory" if want_dir else "it is not a regular file"
  if hasattr(os, "getuid") and st.st_uid != os.getuid():
    return f"it is owned by uid {st.st_uid}, not by this user ({os.getuid()})"
  if st.st_mode & 0o022:
    return f"it is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
  return None


def _digest(path: Path) -> str:
  return hashlib.sha256(path.read_bytes()).hexdigest()


def _cached(out: Path) -> str | None:
  """Why the cached library ``out`` may not be loaded (``None`` when it may): see :func:`_unsafe`, and its
  content must have the SHA-256 recorded beside it when it was built."""
  why = _unsafe(out, want_dir=False)
  if why:
    return why
  side = out.with_name(out.name + ".sha256")
  why = _unsafe(side, want_dir=False)
  if why:
    return f"its recorded hash {side.name}: {why}"
  try:
    if side.read_text().strip() != _digest(out):
      return "its content does not match the hash recorded when it was built (truncated or replaced)"
  except OSError as e:
    return f"cannot read it ({e.strerror})"
  return None


def _compiler() -> str | None:
  cc = os.environ.get("CC")
  if cc:
    return cc
  for name in ("cc", "gcc", "clang"):
    path = shutil.which(name)
    if path:
      return path
  return None


def build(force: bool = False) -> Path:
  """Compiles ``kernels.c`` into a shared library (or finds it in the cache) and returns its path.

  The library is compiled in a private temporary directory and renamed into place (after it, its SHA-256 in
  ``<name>.sha256``), so concurrent processes never load a partial one. A cached library is returned only from a
  directory of the user's that others cannot write, and only when its content matches the recorded hash; else
  it is rebuilt with a warning (in a private temporary directory, removed at exit, when the cache directory
  itself is not safe).

  Args:
    force: rebuild even when a cached library exists.

  Returns:
    The path of the shared library.

  Raises:
    RuntimeError: no C compiler, or the compilation failed (with the compiler's output).
  """
  cc = _compiler()
  if cc is None:
    raise RuntimeError("no C compiler found (set $CC, or install cc/gcc/clang)")
  flags = ["-O3", "-std=c11", "-fPIC", "-shared", "-pthread", "-ffp-contract=off", f"-I{jax.ffi.include_dir()}"]
  # Keyed by everything that shapes the library, so a cache shared across machines or environments never
  # serves a stale or foreign build.
  ident = [_SOURCE.read_bytes(), jaxlib.__version__.encode(), cc.encode(), platform.machine().encode(),
           " ".join(flags).encode()]
  key = hashlib.sha256(b"\0".join(ident)).hexdigest()[:16]
  name = f"jaxmerge_kernels_{key}.so"
  cache = _cache_dir()
  try:
    cache.mkdir(mode=0o700, parents=True, exist_ok=True)
  except OSError:
    pass
  why = _unsafe(cache, want_dir=True)
  if why:
    log.warning("not using the native kernel cache %s (%s); building in a private temporary directory", cache, why)
    cache = Path(tempfile.mkdtemp(prefix="jaxmerge-native-"))
    atexit.register(shutil.rmtree, cache, True)
  out = cache / name
  if not force and (out.exists() or out.is_symlink()):
    why = _cached(out)
    if why is None:
      return out
    log.warning("not loading the cached native kernels %s (%s); rebuilding them", out, why)
  work = Path(tempfile.mkdtemp(prefix=".build-", dir=cache))  # private (0700): nobody can swap the file in it
  tmp = str(work / name)
  cmd = [cc, *flags, str(_SOURCE), "-o", tmp, "-lm"]
  try:
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
      # Without the C library's ifunc support (musl), the AVX2 copies of the hashing loops cannot be dispatched:
      # build the plain loops instead.
      plain = subprocess.run([cc, *flags, "-DJAXMERGE_NO_CLONES", str(_SOURCE), "-o", tmp, "-lm"],
                             capture_output=True, text=True, check=False)
      if plain.returncode == 0:
        res = plain
    if res.returncode != 0:
      raise RuntimeError(f"compiling {_SOURCE.name} failed ({' '.join(cmd)}):\n{res.stderr.strip()}")
    os.chmod(tmp, 0o755 & ~umask())
    side = work / (name + ".sha256")
    side.write_text(_digest(Path(tmp)) + "\n")
    os.chmod(side, 0o644 & ~umask())  # (never group-writable, which the check above would refuse)
    os.replace(tmp, out)  # atomic: a concurrent process sees the old file or the new one, never a partial one
    os.replace(side, out.with_name(name + ".sha256"))
  finally:
    shutil.rmtree(work, ignore_errors=True)
  return out


def available() -> bool:
  """Whether the native CPU kernels are built and registered with XLA.

  The first call builds (or loads from the cache) and registers them; when that fails (no C compiler), the
  reason is logged once as a warning and the XLA programs are used.

  Returns:
    ``False`` when ``JAXMERGE_NATIVE=0`` or the kernels could not be built, else ``True``.
  """
  if os.environ.get("JAXMERGE_NATIVE", "1").lower() in ("0", "false", "off", "no"):
    return False
  with _lock:
    if "ok" not in _state:
      try:
        lib = ctypes.CDLL(str(build()))
        jax.ffi.register_ffi_target(_TARGET, jax.ffi.pycapsule(lib.jaxmerge_ties), platform="cpu")
        host = lib.jaxmerge_host
        host.restype = ctypes.c_int
        host.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                         ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                         ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_float, ctypes.c_int64,
                         ctypes.c_float, ctypes.c_void_p, ctypes.c_void_p]
        _state["host"] = host
        _state["lib"] = lib  # keeps the library loaded
        _state["ok"] = True
      except (OSError, RuntimeError, AttributeError) as e:
        log.warning("jaxmerge native CPU kernels unavailable, using the XLA programs: %s", e)
        _state["ok"] = False
    return bool(_state["ok"])


class Spec(NamedTuple):
  """A merge the native kernels run in one call (:func:`spec`).

  Attributes:
    op: ``"ties"`` (global TIES), ``"sum"`` (task arithmetic) or ``"mean"`` (simple averaging).
    scale: the factor applied to the merged task vector (1 without a scale step).
    drop: ``(p, rescale)`` of DARE's drop, the chain's first step (its key is ``fold_in(key, 0)``), or ``None``.
    ties: ``(density, merge_func, count, zero_sign)`` for ``op="ties"``, else ``None``.
  """

  op: str
  scale: float
  drop: tuple[float, bool] | None = None
  ties: tuple[float, str, str, str] | None = None


def _kernel(ident: tuple | None) -> tuple:
  """This backend's table: a step's identity as what the kernels run, ``()`` when they do not run it. ``("drop",
  p, rescale)`` with a ``1 / (1 - p)`` rescale or none and ``p < 1``; ``("scale", v)``; ``("sum",)``;
  ``("mean",)``; ``("ties", density, merge_func, count, zero_sign)``; ``("trim", density, "global", count)`` and
  ``("disjoint", merge_func, sign_scope, zero_sign)`` (TIES when composed, :func:`normalized`)."""
  name = ident[0] if ident else None
  if name == "drop":
    return ("drop", ident[1], bool(ident[2])) if ident[2] in (True, False) and ident[1] < 1 else ()
  if name == "scale":
    return ident
  if name in ("sum_tasks", "mean_tasks"):
    return (name[:-6],)
  if name == "ties_merge":
    return ("ties", *ident[1:])
  if name == "trim" and ident[2] == "global":
    return ident
  if name == "disjoint_merge":
    return ("disjoint", *ident[1:])
  return ()


def normalized(tx: Any) -> list[tuple]:
  """What the kernels run of ``tx``'s steps (:func:`_kernel` of their identities, nested chains inlined:
  :func:`jaxmerge.chain`), with the catalogue's compositions read as the fused steps they equal:
  ``trim(d, "global", count)`` followed by ``disjoint_merge(f, "global", z)`` (or ``zero_sign="positive"``, whose
  scope does not matter) is ``ties_merge(d, f, count, z)``. A step the kernels do not run is ``()``.

  Args:
    tx: a merge transform.

  Returns:
    The list of kernel steps, in order.
  """
  out: list[tuple] = []
  # One level: a chain's steps are its inlined steps, and step i draws fold_in(key, i) (a named chain inside a
  # chain is one step, with its own keys: not recognized).
  for k in (_kernel(identity_of(s)) for s in steps_of(tx)):
    prev = out[-1] if out else ()
    if (k[:1] == ("disjoint",) and prev[:1] == ("trim",) and prev[2] == "global"
        and (k[2] == "global" or k[3] == "positive")):
      out[-1] = ("ties", prev[1], k[1], prev[3], k[3])
    else:
      out.append(k)
  return out


def spec(tx: Any) -> Spec | None:
  """Recognizes the merges the native kernels run: an optional DARE drop (:func:`jaxmerge.transforms.drop`
  with ``rescale`` ``True`` or ``False``) as the first step, then global TIES
  (:func:`jaxmerge.reductions.ties_merge`), a sum (:func:`jaxmerge.reductions.sum_tasks`) or a mean
  (:func:`jaxmerge.reductions.mean_tasks`), then at most one :func:`jaxmerge.transforms.scale`: TIES, task
  arithmetic, simple averaging and DARE on TIES or task arithmetic as the registry builds them.

  Args:
    tx: a merge transform.

  Returns:
    A :class:`Spec`, or ``None`` for any other transform.
  """
  kernels = normalized(tx)
  drop = None
  if kernels and kernels[0][:1] == ("drop",):
    drop = (kernels[0][1], kernels[0][2])
    kernels = kernels[1:]
  if not kernels or kernels[0][:1] not in (("ties",), ("sum",), ("mean",)) or len(kernels) > 2:
    return None
  scale = 1.0
  if len(kernels) == 2:
    if kernels[1][:1] != ("scale",):
      return None
    scale = kernels[1][1]
  op = kernels[0][0]
  return Spec(op, scale, drop, tuple(kernels[0][1:]) if op == "ties" else None)


def _threads() -> int:
  try:
    return max(1, min(64, len(os.sched_getaffinity(0))))
  except AttributeError:  # not Linux
    return max(1, min(64, os.cpu_count() or 1))


def fits(tasks: int, n: int, sp: Spec | None = None, sizes: Sequence[int] = ()) -> bool:
  """Whether the kernels take this merge: 1 to 1024 task vectors of fewer than 2**32 entries each for TIES (its
  per-thread histogram counters are 32-bit); at most 64 for task arithmetic and averaging (the XLA programs' sum
  order); with DARE's drop, fewer than 2**32 draws per leaf (``tasks * size``) and ``p < 1``.

  Args:
    tasks: the number of task vectors.
    n: the entries of one task vector (of the whole model).
    sp: the merge (default: TIES without a drop).
    sizes: the entries of each leaf (for the drop's limit).

  Returns:
    ``True`` when :func:`run` accepts the merge.
  """
  limit = _MAX_LINEAR_TASKS if sp is not None and sp.op != "ties" else _MAX_TASKS
  if not (1 <= tasks <= limit and 0 < n < 2**32):
    return False
  if sp is not None and sp.drop is not None:
    return sp.drop[0] < 1 and all(tasks * int(m) < 2**32 for m in sizes)
  return True


def _check(tasks: int, n: int, sp: Spec | None = None, sizes: Sequence[int] = ()) -> None:
  if not fits(tasks, n, sp, sizes):
    what = "TIES" if sp is None or sp.op == "ties" else sp.op
    limit = _MAX_LINEAR_TASKS if sp is not None and sp.op != "ties" else _MAX_TASKS
    raise ValueError(f"the native {what} kernel takes 1..{limit} task vectors of 1..2**32 - 1 entries (with a "
                     f"drop: p < 1 and under 2**32 draws per leaf), got {tasks} of {n}")


def _host_view(x: Any, dtype: Any = np.float32) -> np.ndarray:
  """A C-contiguous NumPy view of a NumPy array or a CPU-resident JAX array (no copy for either when it already
  has ``dtype``)."""
  return np.asarray(x, dtype=dtype, order="C")  # (np.ascontiguousarray would turn a 0-d leaf into shape (1,))


DTYPES = (np.dtype(np.float32), np.dtype(jnp.bfloat16))
"""The leaf dtypes the kernels read and write (float32 math either way; bfloat16 results rounded to nearest
even, as XLA's convert)."""


def _pointers(arrays: Sequence[np.ndarray]) -> Any:
  return (ctypes.c_void_p * max(1, len(arrays)))(*[a.ctypes.data for a in arrays])


def run(sp: Spec, pre: Sequence[Any], fts: Sequence[Sequence[Any]] | Sequence[Any], *,
        keys: Any = None, stacked: bool = False) -> tuple[list[jax.Array], np.ndarray, np.ndarray]:
  """One native call of the merge ``sp`` (:func:`spec`) on the CPU, reading the leaves where they lie (NumPy
  arrays, or JAX arrays on a CPU device: no copy of the inputs): ``pre + scale * op(drop(ft - pre))``.

  Args:
    sp: the merge (TIES, task arithmetic or simple averaging, optionally on DARE's drop).
    pre: the pretrained leaves (float32 or bfloat16, one dtype for all: the fine-tuned leaves are read in it;
      float32 math either way, results in that dtype).
    fts: the fine-tuned models, each a sequence of leaves in ``pre``'s order; or, with ``stacked=True``, one
      ``(T, *shape)`` leaf per pretrained leaf.
    keys: with a drop, the ``(len(pre), 3)`` uint32 keys of its draws (:func:`dare_keys`).
    stacked: the layout of ``fts``.

  Returns:
    ``(merged leaves as CPU JAX arrays, TIES's thresholds (T,) (zeros for the other merges), non-finite flags
    (T + 1,))``: a flag marks a model (the pretrained one last) holding NaN/Inf, in which case the merged values
    are meaningless.

  Raises:
    ValueError: the merge does not fit the kernels (see :func:`fits`), or a drop without its keys.
  """
  if not available():
    raise RuntimeError("the native CPU kernels are unavailable (see jaxmerge.engine.native.available)")
  tasks = int(np.shape(fts[0])[0]) if stacked else len(fts)
  dtype = np.dtype(np.asarray(pre[0]).dtype) if len(pre) else np.dtype(np.float32)
  if dtype not in DTYPES:
    dtype = np.dtype(np.float32)  # other inputs are converted (a copy)
  pre_np = [_host_view(x, dtype) for x in pre]
  _check(tasks, sum(x.size for x in pre_np), sp, [x.size for x in pre_np])
  if sp.drop is not None:
    if keys is None:
      raise ValueError("DARE's drop needs its keys (jaxmerge.engine.native.dare_keys)")
    keys = np.ascontiguousarray(keys, np.uint32)
    if keys.shape != (len(pre_np), 3):
      raise ValueError(f"keys must be ({len(pre_np)}, 3) uint32, got {keys.shape}")
  if stacked:
    rows_np = [_host_view(x, dtype) for x in fts]
    lens = [x.size for x in pre_np]
    row_ptrs = [r.ctypes.data + dtype.itemsize * t * n for r, n in zip(rows_np, lens) for t in range(tasks)]
  else:
    rows_np = [_host_view(m[i], dtype) for i in range(len(pre_np)) for m in fts]
    row_ptrs = [r.ctypes.data for r in rows_np]
  outs = [aligned_empty(x.shape, dtype) for x in pre_np]
  thr, bad = _host_call(sp, pre_np, None, row_ptrs, outs, tasks, keys)
  device = jax.devices("cpu")[0]
  return [jax.device_put(o, device) for o in outs], thr, bad


def _host_call(sp: Spec, pre: list[np.ndarray] | None, base: list[np.ndarray] | None, row_ptrs: list[int],
               outs: list[np.ndarray], tasks: int, keys: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
  lens = [o.size for o in outs]
  bf16 = outs[0].dtype == np.dtype(jnp.bfloat16)
  thr = np.zeros((tasks,), np.float32)
  bad = np.zeros((tasks + 1,), np.int32)
  density, merge_func, count, zero_sign = sp.ties or (1.0, "sum", "reference", "majority")
  k = stats.threshold_rank(sum(lens), density, count) if sp.op == "ties" else 0
  p, mul = 0.0, 0.0
  if sp.drop is not None:
    # As the XLA programs: u >= float32(p); survivors times float32(1 / float32(1 - p)) (XLA's simplifier turns
    # the division by the constant 1 - p into this product).
    p = float(np.float32(sp.drop[0]))
    mul = float(np.float32(1.0 / float(np.float32(1 - sp.drop[0])))) if sp.drop[1] else 0.0
  rc = _state["host"](
      _OPS[sp.op], int(bf16), len(outs), tasks, _pointers(pre) if pre is not None else None,
      _pointers(base) if base is not None else None, (ctypes.c_void_p * max(1, len(row_ptrs)))(*row_ptrs),
      _pointers(outs), (ctypes.c_int64 * max(1, len(lens)))(*lens), k, _ZERO_SIGN[zero_sign], _MERGE[merge_func],
      keys.ctypes.data if sp.drop is not None else None, p, mul, _threads(), float(sp.scale), thr.ctypes.data,
      bad.ctypes.data)
  if rc == -1:
    raise MemoryError("jaxmerge native kernel: out of memory")
  if rc != 0:
    raise RuntimeError(f"jaxmerge native kernel: rejected its arguments (code {rc}; op {sp.op}, {tasks} tasks)")
  return thr, bad


def dare_keys(key: Any, paths: Sequence[str]) -> np.ndarray:
  """The keys of DARE's draws for each leaf, as the XLA programs derive them: the 96 key bits
  :func:`jaxmerge.tree.leaf_uniform` takes from :func:`jaxmerge.tree.leaf_key` of the drop step's key.

  Args:
    key: the drop step's PRNG key (a chain's step ``i`` gets ``fold_in(key, i)``).
    paths: the leaves' path strings.

  Returns:
    ``(len(paths), 3)`` uint32 keys.
  """
  ids = np.asarray([jtree.leaf_id(p) for p in paths], np.uint32)
  return np.asarray(_keys_program()(key, ids))


@functools.cache
def _keys_program() -> Any:
  return jax.jit(lambda key, ids: jax.vmap(
      lambda i: jax.random.bits(jax.random.fold_in(key, i), (3,), jnp.uint32))(ids))


def ties_rows(deltas: np.ndarray, base: np.ndarray, sp: Spec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Global TIES (``sp``, without a drop) on task vectors already in memory:
  ``base + scale * disjoint_merge(trim(deltas))``.

  Args:
    deltas: the ``(T, N)`` float32 task vectors (DARE's dropped ones with an L1 rescale, in :func:`jaxmerge.merge`).
    base: the ``(N,)`` float32 weights the merged task vector is added to.
    sp: the merge, a :class:`Spec` with ``op="ties"`` and no drop.

  Returns:
    ``(merged (N,), thresholds (T,), non-finite flags (T + 1,))`` as NumPy arrays (the last flag is unused).
  """
  if not available():
    raise RuntimeError("the native CPU kernels are unavailable (see jaxmerge.engine.native.available)")
  if sp.op != "ties" or sp.drop is not None:
    raise ValueError(f"ties_rows runs TIES without a drop, got {sp}")
  deltas = np.ascontiguousarray(deltas, np.float32)
  base = np.ascontiguousarray(base, np.float32).reshape(-1)
  if deltas.ndim != 2 or deltas.shape[1] != base.size:
    raise ValueError(f"deltas must be (T, {base.size}), got {deltas.shape}")
  tasks = deltas.shape[0]
  _check(tasks, base.size)
  out = aligned_empty(base.shape)
  rows = [deltas.ctypes.data + 4 * t * base.size for t in range(tasks)]
  thr, bad = _host_call(sp, None, [base], rows, [out], tasks)
  return out, thr, bad


def ties_thresholds(leaves: Sequence[jax.Array], k: int) -> jax.Array:
  """Per-task ``k``-th smallest magnitude over ``(T, ...)`` leaves as one XLA custom call (CPU only; callers
  choose it with :func:`jax.lax.platform_dependent`). Carries no gradient.

  Args:
    leaves: arrays with a leading task axis (any float dtype; compared in float32).
    k: the rank, ``1..N`` with ``N`` the entries per task.

  Returns:
    The ``(T,)`` float32 thresholds.
  """
  tasks = int(leaves[0].shape[0])
  _check(tasks, sum(int(np.prod(x.shape[1:], dtype=np.int64)) for x in leaves))
  # Thresholds carry no gradient (the XLA radix select's bit manipulations have none either).
  leaves = [jax.lax.stop_gradient(x.astype(jnp.float32)) for x in leaves]
  outs = [jax.ShapeDtypeStruct((tasks,), jnp.float32), jax.ShapeDtypeStruct((tasks + 1,), jnp.int32)]
  return jax.ffi.ffi_call(_TARGET, outs, vmap_method="sequential")(
      *leaves, tasks=np.int64(tasks), has_pre=np.int64(0), stacked=np.int64(1), k=np.int64(k), merge=np.int64(-1),
      zero_sign=np.int64(0), threads=np.int64(_threads()))[0]


# The per-task thresholds inside XLA programs (jaxmerge.stats.task_thresholds) use this kernel on the CPU.
stats.use_cpu_kernel(ties_thresholds, lambda tasks, n: fits(tasks, n) and available())
