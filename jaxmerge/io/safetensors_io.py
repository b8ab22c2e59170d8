"""Safetensors checkpoints: lazy reading with clear errors, and atomic (optionally streamed) writing.

The format is an 8-byte little-endian header length, a JSON header ``{name: {dtype, shape, data_offsets}}``
and the raw little-endian tensor bytes. The header is parsed here (not by ``safetensors.numpy``) so that
bfloat16 works with every ``safetensors`` version (NumPy has no bfloat16; ``ml_dtypes``, which JAX ships, gives
one) and so that corrupt or truncated files raise ``ValueError`` naming the file: a header length past the end
of the file, a header that is not JSON, or tensor offsets past the end of the data.

Reading is lazy. ``open_checkpoint(path)`` returns a :class:`TensorReader` over one file, a directory with a
``*.safetensors.index.json`` and its shards, or an orbax directory: ``keys()``, ``shape(name)``,
``dtype(name)`` and ``get(name)`` read one tensor at a time. ``reader[name]`` is a zero-copy memory-mapped view
(what :func:`load` returns); ``reader.get(name)`` reads the bytes into a fresh array with ``pread``, so memory is
released as soon as the caller drops it (what streaming merges use: mapped pages would stay resident).

Writing never leaves a partial checkpoint: files go to a temporary name in the target directory, are fsynced
and renamed into place (with the permissions the user's umask gives new files). A temporary is never a valid
checkpoint: a streamed shard's header length stays zero until the shard is complete, and the index is written
last; temporaries left by a killed run are removed by the next write into the same directory
(:mod:`jaxmerge.io.atomic`). :class:`ShardedWriter` knows every tensor's shape and dtype up front, plans the shards,
writes each header first and then each tensor at its offset as it arrives (in any order), so a merged model
larger than memory can be written tensor by tensor.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import mmap
import os
import pathlib
import re
import shutil
import stat
import struct
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import ml_dtypes
import numpy as np

from jaxmerge.engine.host import aligned_empty as aligned_empty
from jaxmerge.io import atomic as atomic_io
from jaxmerge.io.paths import inside

__all__ = [
    "DEFAULT_MAX_SHARD_BYTES",
    "SafetensorsReader",
    "ShardedReader",
    "ShardedWriter",
    "TensorReader",
    "load",
    "open_checkpoint",
    "parse_size",
    "save",
    "save_sharded",
]

_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U8": np.dtype("u1"), "BOOL": np.dtype("?"), "U16": np.dtype("<u2"), "U32": np.dtype("<u4"), "U64": np.dtype("<u8"),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
WRITEBACK_BYTES = 64 << 20  # a writer flushes each file in the background every this many bytes
INDEX_NAME = "model.safetensors.index.json"
_MISSING = object()


@runtime_checkable
class TensorReader(Protocol):
  """What streaming merges need from a checkpoint: names, shapes and dtypes without reading data, and one
  tensor at a time."""

  path: pathlib.Path

  def keys(self) -> Any: ...

  def shape(self, name: str) -> tuple[int, ...]: ...

  def dtype(self, name: str) -> np.dtype: ...

  def get(self, name: str) -> np.ndarray: ...

  def __contains__(self, name: object) -> bool: ...

  def __len__(self) -> int: ...


class SafetensorsReader(Mapping):
  """A lazy view of one safetensors file.

  ``reader[name]`` is a read-only memory-mapped view; ``reader.get(name)`` a fresh array read from disk.

  Raises:
    ValueError: the file is missing, not a safetensors file, corrupt or truncated (the message names it).
  """

  def __init__(self, path: str | os.PathLike):
    self.path = pathlib.Path(path)
    try:
      # O_NONBLOCK: a FIFO or a device opens at once instead of blocking, and is then refused below.
      fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
      raise ValueError(f"cannot open checkpoint {self.path}: {e.strerror}") from e
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
      os.close(fd)
      kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "not a regular file"
      raise ValueError(f"checkpoint {self.path} is {kind}; a safetensors checkpoint is a regular file")
    self._file = os.fdopen(fd, "rb")
    try:
      self._parse()
    except BaseException:
      self._file.close()
      raise
    self._mmap = None

  def _parse(self) -> None:
    size = os.fstat(self._file.fileno()).st_size
    if size < 8:
      raise ValueError(f"{self.path} is not a safetensors file: truncated before the header ({size} bytes)")
    first = self._file.read(8)
    (n,) = struct.unpack("<Q", first)
    if n > min(size - 8, _MAX_HEADER) and (first[:4] == b"PK\x03\x04" or first[:1] == b"\x80"):
      raise ValueError(f"{self.path} is not a safetensors file: it looks like a PyTorch (zip or pickle) checkpoint, "
                       "which jaxmerge does not load (pickles can run code); convert it to safetensors first")
    if n > min(size - 8, _MAX_HEADER):
      raise ValueError(f"{self.path} is corrupt or truncated: header length {n} exceeds the file ({size} bytes); "
                       "is it a safetensors file?")
    try:
      header = json.loads(self._file.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ValueError(f"{self.path} is corrupt: its header is not valid JSON ({e})") from e
    except RecursionError:
      raise ValueError(f"{self.path} is corrupt: its header nests too deeply to be a safetensors header") from None
    if not isinstance(header, dict):
      raise ValueError(f"{self.path} is corrupt: the header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    self.metadata = meta if isinstance(meta, dict) else {}
    self._start = 8 + n
    data_size = size - self._start
    self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
    for name, info in header.items():
      try:
        dtype = _DTYPES[info["dtype"]]
        if not isinstance(info["shape"], list) or not isinstance(info["data_offsets"], list):
          raise TypeError("shape and data_offsets must be lists")
        if not all(type(d) is int for d in (*info["shape"], *info["data_offsets"])):
          raise TypeError("shape and data_offsets must hold integers")
        shape = tuple(info["shape"])
        begin, end = info["data_offsets"]
      except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{self.path} is corrupt: bad header entry for tensor {name!r} ({e!r})") from e
      if any(d < 0 for d in shape) or begin < 0:
        raise ValueError(f"{self.path} is corrupt: tensor {name!r} has a negative shape or offset")
      # Python integers: a shape like [2**32, 2**32] must not wrap around to a small size.
      if end > data_size or begin > end or end - begin != math.prod(shape) * dtype.itemsize:
        raise ValueError(
            f"{self.path} is corrupt or truncated: tensor {name!r} ({info['dtype']} {list(shape)}) spans bytes "
            f"{begin}..{end} but the data section has {data_size} bytes"
        )
      self._entries[name] = (dtype, shape, begin, end)

  def _view(self) -> mmap.mmap:
    if self._mmap is None:
      self._mmap = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
    return self._mmap

  def _entry(self, name: str):
    try:
      return self._entries[name]
    except KeyError:
      raise KeyError(f"{self.path} has no tensor {name!r}") from None

  def __getitem__(self, name: str) -> np.ndarray:
    dtype, shape, begin, end = self._entry(name)
    if end == begin:
      return np.zeros(shape, dtype)
    return np.frombuffer(self._view(), dtype=dtype, count=(end - begin) // dtype.itemsize,
                         offset=self._start + begin).reshape(shape)

  reads_into = True  # get() accepts out=

  def get(self, name: str, default: Any = _MISSING, *, out: np.ndarray | None = None) -> np.ndarray:
    """Reads tensor ``name`` into a new 64-byte aligned array, or into ``out`` when it is a C-contiguous array
    of the tensor's shape and dtype (``pread``; no mapping stays behind)."""
    if name not in self._entries and default is not _MISSING:
      return default
    dtype, shape, begin, end = self._entry(name)
    if out is None or out.shape != shape or out.dtype != dtype or not out.flags.c_contiguous \
        or not out.flags.writeable:
      out = aligned_empty(shape, dtype)
    buf = memoryview(out.reshape(-1).view(np.uint8)) if out.size else memoryview(b"")
    pos, fd = 0, self._file.fileno()
    while pos < end - begin:
      got = os.preadv(fd, [buf[pos:]], self._start + begin + pos)
      if got <= 0:
        raise ValueError(f"{self.path} is truncated: tensor {name!r} could not be read")
      pos += got
    return out

  def __iter__(self) -> Iterator[str]:
    return iter(self._entries)

  def __len__(self) -> int:
    return len(self._entries)

  def __contains__(self, name: object) -> bool:
    return name in self._entries

  def shape(self, name: str) -> tuple[int, ...]:
    return self._entry(name)[1]

  def dtype(self, name: str) -> np.dtype:
    return self._entry(name)[0]

  def nbytes(self, name: str) -> int:
    _, _, begin, end = self._entry(name)
    return end - begin

  def offset(self, name: str) -> int:
    return self._entry(name)[2]

  def close(self) -> None:
    if self._mmap is not None:
      try:
        self._mmap.close()
      except BufferError:  # views handed out by __getitem__ are still alive; the mapping goes with them
        pass
      self._mmap = None
    self._file.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def __repr__(self) -> str:
    return f"SafetensorsReader({str(self.path)!r}, {len(self)} tensors)"


class ShardedReader(Mapping):
  """A lazy view over the shards listed in a ``*.safetensors.index.json`` (the Hugging Face layout).

  ``keys()`` are ordered shard by shard and, inside a shard, by file offset, so a pass over them reads each
  file front to back.
  """

  def __init__(self, index: str | os.PathLike):
    index = pathlib.Path(index)
    self.path = index.parent
    self.index_path = index
    try:
      raw = json.loads(index.read_text())
      if not isinstance(raw, dict):
        raise TypeError("the index is not a JSON object")
      weight_map = raw["weight_map"]
      if not isinstance(weight_map, dict):
        raise TypeError("weight_map is not an object")
      if not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise TypeError("weight_map must map tensor names to shard file names")
    except (OSError, KeyError, TypeError, UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ValueError(f"{index} is not a valid safetensors index: {e}") from e
    except RecursionError:
      raise ValueError(f"{index} is not a valid safetensors index: it nests too deeply") from None
    self.metadata = raw.get("metadata") or {}
    self._readers: dict[str, SafetensorsReader] = {}
    try:
      for f in sorted(set(weight_map.values())):
        shard = inside(index.parent, f, f"shard listed in {index.name}")
        if not shard.exists():
          raise ValueError(f"{index} lists shard {f}, which does not exist in {index.parent}")
        self._readers[f] = SafetensorsReader(shard)
    except BaseException:
      self.close()
      raise
    listed = {}
    for name, f in weight_map.items():
      if name not in self._readers[f]:
        self.close()
        raise ValueError(f"{index}: tensor {name!r} is listed in shard {f} but that shard does not contain it")
      listed[name] = f
    order = sorted(listed, key=lambda n: (listed[n], self._readers[listed[n]].offset(n)))
    self._map = {n: self._readers[listed[n]] for n in order}

  def __getitem__(self, name: str) -> np.ndarray:
    return self._reader(name)[name]

  def _reader(self, name: str) -> SafetensorsReader:
    try:
      return self._map[name]
    except KeyError:
      raise KeyError(f"{self.index_path} has no tensor {name!r}") from None

  reads_into = True

  def get(self, name: str, default: Any = _MISSING, *, out: np.ndarray | None = None) -> np.ndarray:
    """Reads tensor ``name`` from its shard (see :meth:`SafetensorsReader.get`)."""
    if name not in self._map and default is not _MISSING:
      return default
    return self._reader(name).get(name, out=out)

  def __iter__(self) -> Iterator[str]:
    return iter(self._map)

  def __len__(self) -> int:
    return len(self._map)

  def __contains__(self, name: object) -> bool:
    return name in self._map

  def shape(self, name: str) -> tuple[int, ...]:
    return self._reader(name).shape(name)

  def dtype(self, name: str) -> np.dtype:
    return self._reader(name).dtype(name)

  def file_of(self, name: str) -> pathlib.Path:
    return self._reader(name).path

  def close(self) -> None:
    for r in self._readers.values():
      r.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def __repr__(self) -> str:
    return f"ShardedReader({str(self.index_path)!r}, {len(self)} tensors in {len(self._readers)} shards)"


def open_checkpoint(path: str | os.PathLike) -> TensorReader:
  """A lazy reader for a checkpoint.

  Args:
    path: a ``.safetensors`` file; a directory holding ``model.safetensors`` (a Hugging Face directory), or
      shards with a ``*.safetensors.index.json``; or an orbax checkpoint directory (see
      :mod:`jaxmerge.io.orbax_io`).

  Returns:
    A :class:`TensorReader`.

  Raises:
    ValueError: a missing path, a directory without a checkpoint, or a corrupt file (naming it).
  """
  p = pathlib.Path(path)
  if p.is_dir():
    indexes = sorted(p.glob("*.safetensors.index.json"))
    if indexes:
      preferred = [i for i in indexes if i.name == INDEX_NAME]
      return ShardedReader(inside(p, (preferred or indexes)[0].name, "index"))
    files = sorted(p.glob("*.safetensors"))
    if len(files) == 1:
      return SafetensorsReader(inside(p, files[0].name, "checkpoint file"))
    if len(files) > 1:
      if (p / "model.safetensors").exists():
        return SafetensorsReader(inside(p, "model.safetensors", "checkpoint file"))
      raise ValueError(f"directory {p} has several safetensors files and no index: {[f.name for f in files]}")
    from jaxmerge.io import orbax_io  # noqa: PLC0415 (orbax is heavy: import on use)

    item = orbax_io.find_item_dir(p)
    if item is not None:
      for f in item.rglob("*"):  # every file orbax may open stays inside the checkpoint directory
        if f.is_symlink():
          inside(p, f.relative_to(p), "orbax checkpoint file")
      return orbax_io.OrbaxReader(item)
    if any(p.glob("*.bin")) or any(p.glob("*.pt")):
      raise ValueError(f"directory {p} holds PyTorch .bin/.pt weights only; convert them to safetensors first")
    raise ValueError(f"no safetensors or orbax checkpoint in directory {p}")
  if not p.exists():
    raise ValueError(f"checkpoint {p} does not exist")
  return SafetensorsReader(p)


def load(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a whole checkpoint into a flat ``{name: array}`` dict (safetensors arrays are memory-mapped views).

  Args:
    path: a checkpoint (see :func:`open_checkpoint`).

  Returns:
    ``{name: array}``.
  """
  ckpt = open_checkpoint(path)
  if isinstance(ckpt, (SafetensorsReader, ShardedReader)):
    return {k: ckpt[k] for k in ckpt}
  return {k: ckpt.get(k) for k in ckpt.keys()}


# ----------------------------------------------------------------------------------------------------------
# Writing.


def _dtype_name(name: str, dtype: Any) -> str:
  dt = np.dtype(dtype)
  if dt not in _NAMES:
    raise ValueError(f"tensor {name!r} has dtype {dt}, which safetensors cannot store")
  return _NAMES[dt]


def _header_bytes(specs: Sequence[tuple[str, tuple[int, ...], Any]], metadata: Mapping[str, Any] | None) -> tuple[
    bytes, dict[str, tuple[int, int]]]:
  header: dict[str, Any] = {}
  if metadata:
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
  spans, offset = {}, 0
  for name, shape, dtype in specs:
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    header[name] = {"dtype": _dtype_name(name, dtype), "shape": [int(d) for d in shape],
                    "data_offsets": [offset, offset + nbytes]}
    spans[name] = (offset, nbytes)
    offset += nbytes
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)
  return struct.pack("<Q", len(raw)) + raw, spans


def _as_host(name: str, x: Any) -> np.ndarray:
  a = np.asarray(x)
  if a.dtype.byteorder == ">":
    a = a.astype(a.dtype.newbyteorder("<"))
  _dtype_name(name, a.dtype)
  return a if a.flags.c_contiguous else a.copy(order="C")  # (np.ascontiguousarray would make scalars 1-D)


_SYNCER: list[concurrent.futures.ThreadPoolExecutor] = []
_SYNCER_LOCK = threading.Lock()


def _syncer() -> concurrent.futures.ThreadPoolExecutor:
  """The one background thread (shared by every writer in the process) that flushes files to disk."""
  with _SYNCER_LOCK:
    if not _SYNCER:
      _SYNCER.append(concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jaxmerge-fsync"))
    return _SYNCER[0]


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
  pos = 0
  while pos < len(data):
    pos += os.pwrite(fd, data[pos:], offset + pos)


def _fsync_dir(path: pathlib.Path) -> None:
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def save(path: str | os.PathLike, tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> None:
  """Writes ``tensors`` to one safetensors file atomically (temporary file, fsync, rename).

  Args:
    path: the output file.
    tensors: ``{name: array}``.
    metadata: string metadata for the header.
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  arrays = {k: _as_host(k, v) for k, v in tensors.items()}
  head, spans = _header_bytes([(k, a.shape, a.dtype) for k, a in arrays.items()], metadata)
  fd, tmp = atomic_io.mkstemp(path)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(head)
      for a in arrays.values():
        if a.nbytes:
          f.write(memoryview(a.reshape(-1).view(np.uint8)))
      f.flush()
      os.fsync(f.fileno())
    atomic_io.apply_umask(tmp)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMGT]?i?B?)?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
  """``"5GB"`` / ``"500MiB"`` / ``1024`` -> bytes (decimal for kB/MB/GB, binary for KiB/MiB/GiB).

  Args:
    text: a size with an optional unit, or a number of bytes.

  Returns:
    The size in bytes.
  """
  if isinstance(text, int):
    return text
  m = _SIZE.match(str(text))
  if not m:
    raise ValueError(f"cannot read the size {text!r}; write e.g. 5GB, 500MiB or a number of bytes")
  value, unit = float(m.group(1)), (m.group(2) or "").upper()
  base = 1024 if "I" in unit else 1000
  power = {"": 0, "B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[:1] if unit else ""]
  return int(value * base**power)


def _plan_shards(specs: Mapping[str, tuple[tuple[int, ...], np.dtype]], max_shard_bytes: int) -> list[list[str]]:
  """Groups tensor names, in order, into shards of at most ``max_shard_bytes`` of data each."""
  if max_shard_bytes <= 0:
    raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
  groups, cur, size = [], [], 0
  for name, (shape, dt) in specs.items():
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dt).itemsize
    if cur and size + nbytes > max_shard_bytes:
      groups.append(cur)
      cur, size = [], 0
    cur.append(name)
    size += nbytes
  groups.append(cur)
  return groups


def _shard_name(i: int, n: int) -> str:
  return "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def _write_index(root: pathlib.Path, weight_map: Mapping[str, str], total: int) -> None:
  index = root / INDEX_NAME
  with open(index, "w") as f:
    json.dump({"metadata": {"total_size": int(total)}, "weight_map": dict(weight_map)}, f, indent=1)
    f.flush()
    os.fsync(f.fileno())


class ShardedWriter:
  """Writes one checkpoint directory tensor by tensor: ``model.safetensors``, or numbered shards and
  ``model.safetensors.index.json`` when the total exceeds ``max_shard_bytes``.

  The shapes and dtypes of every tensor are declared up front (``specs``), so each shard's header is written
  first and each tensor goes straight to its offset when :meth:`write` receives it (in any order). Only
  :meth:`close` makes the directory appear: everything is written under a temporary sibling directory, fsynced
  and renamed (``atomic=False`` writes in place and leaves atomicity to the caller, e.g. for several
  directories under one temporary root).

  Args:
    directory: the output directory (must not exist unless ``overwrite``).
    specs: ``{name: (shape, dtype)}`` in the order the tensors should be laid out.
    max_shard_bytes: the largest data size of one shard file (a single larger tensor gets its own shard).
    metadata: string metadata stored in every shard's header.
    atomic: write under a temporary directory and rename on close.
    overwrite: replace an existing directory on close.

  Example::

    with ShardedWriter(out, {"w": ((2, 2), np.float32)}) as w:
      w.write("w", np.eye(2, dtype=np.float32))
  """

  def __init__(
      self,
      directory: str | os.PathLike,
      specs: Mapping[str, tuple[Sequence[int], Any]],
      *,
      max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
      metadata: Mapping[str, str] | None = None,
      atomic: bool = True,
      overwrite: bool = False,
  ):
    self.directory = pathlib.Path(directory)
    self.atomic, self.overwrite = atomic, overwrite
    if self.directory.exists() and not overwrite and atomic:
      raise ValueError(f"output {self.directory} already exists")
    self._specs = {k: (tuple(int(d) for d in s), np.dtype(dt)) for k, (s, dt) in specs.items()}
    if not self._specs:
      raise ValueError("a checkpoint needs at least one tensor")
    for k, (_, dt) in self._specs.items():
      _dtype_name(k, dt)
    groups = _plan_shards(self._specs, max_shard_bytes)
    self.directory.parent.mkdir(parents=True, exist_ok=True)
    if atomic:
      atomic_io.remove_stale(self.directory.parent)
      self._root = atomic_io.mkdtemp(self.directory)
    else:
      self.directory.mkdir(parents=True, exist_ok=True)
      self._root = self.directory
    self._files: list[tuple[pathlib.Path, int]] = []
    self._lengths: list[bytes] = []  # each shard's header length, written by close() (zero until then)
    self._where: dict[str, tuple[int, int, int]] = {}
    self._written: set[str] = set()
    self._closed = False
    self._dirty: list[int] = []  # bytes written since the last flush, per shard
    self._syncs: dict[int, concurrent.futures.Future] = {}
    try:
      for i, names in enumerate(groups):
        fname = _shard_name(i, len(groups))
        head, spans = _header_bytes([(n, *self._specs[n]) for n in names], metadata)
        fd = os.open(self._root / fname, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        self._files.append((self._root / fname, fd))
        # A zero header length until close(): an interrupted shard never reads as a valid (zero-filled) file.
        _pwrite_all(fd, memoryview(b"\0" * 8 + head[8:]), 0)
        self._lengths.append(head[:8])
        os.ftruncate(fd, len(head) + sum(n for _, n in spans.values()))
        self._dirty.append(0)
        for n, (off, nbytes) in spans.items():
          self._where[n] = (len(self._files) - 1, len(head) + off, nbytes)
    except BaseException:
      self.abort()
      raise

  @property
  def names(self) -> list[str]:
    return list(self._specs)

  def write(self, name: str, array: Any) -> None:
    """Writes one declared tensor (its shape and dtype must match the declaration)."""
    if self._closed:
      raise ValueError(f"writer for {self.directory} is closed")
    if name not in self._specs:
      raise ValueError(f"tensor {name!r} was not declared for {self.directory}")
    a = _as_host(name, array)
    shape, dt = self._specs[name]
    if a.shape != shape or a.dtype != dt:
      raise ValueError(f"tensor {name!r} has shape {a.shape} and dtype {a.dtype}; {shape} and {dt} were declared")
    i, off, nbytes = self._where[name]
    if nbytes:
      _pwrite_all(self._files[i][1], memoryview(a.reshape(-1).view(np.uint8)), off)
    self._written.add(name)
    self._dirty[i] += nbytes
    if self._dirty[i] >= WRITEBACK_BYTES and (i not in self._syncs or self._syncs[i].done()):
      # Write-behind: flush what this file has so far in a background thread while writing goes on, so that
      # close() (which still fsyncs every file) has little left to do.
      self._dirty[i] = 0
      self._syncs[i] = _syncer().submit(getattr(os, "fdatasync", os.fsync), self._files[i][1])

  def _wait_syncs(self) -> None:
    syncs, self._syncs = self._syncs, {}
    for f in syncs.values():
      f.exception()  # (close() fsyncs again and reports errors)

  def close(self) -> pathlib.Path:
    """Checks that every tensor was written, fsyncs, writes the index and renames the directory into place."""
    if self._closed:
      return self.directory
    missing = [n for n in self._specs if n not in self._written]
    if missing:
      self.abort()
      raise ValueError(f"{len(missing)} declared tensors were never written to {self.directory}: {missing[:5]}")
    try:
      self._wait_syncs()
      for (_, fd), length in zip(self._files, self._lengths):
        os.fsync(fd)  # the data is on disk before the header length that makes the shard valid
        _pwrite_all(fd, memoryview(length), 0)
        os.fsync(fd)
        os.close(fd)
      self._files_closed = True
      if len(self._files) > 1:
        total = sum(nbytes for _, _, nbytes in self._where.values())
        _write_index(self._root, {n: self._files[i][0].name for n, (i, _, _) in self._where.items()}, total)
      _fsync_dir(self._root)
      if self.atomic:
        atomic_io.apply_umask(self._root)
        _replace_dir(self._root, self.directory, self.overwrite)
      self._closed = True
      return self.directory
    except BaseException:
      self.abort()
      raise

  def abort(self) -> None:
    """Removes everything written so far (nothing appears at ``directory`` when ``atomic``)."""
    if self._closed:
      return
    self._closed = True
    self._wait_syncs()
    if not getattr(self, "_files_closed", False):
      for _, fd in self._files:
        try:
          os.close(fd)
        except OSError:
          pass
    if self.atomic:
      shutil.rmtree(self._root, ignore_errors=True)
    else:
      for p, _ in self._files:
        p.unlink(missing_ok=True)
      (self._root / INDEX_NAME).unlink(missing_ok=True)

  def __enter__(self):
    return self

  def __exit__(self, exc_type, exc, tb):
    if exc_type is None:
      self.close()
    else:
      self.abort()


def _replace_dir(tmp: pathlib.Path, final: pathlib.Path, overwrite: bool) -> None:
  if final.exists():
    if not overwrite:
      raise ValueError(f"output {final} already exists")
    old = atomic_io.mkdtemp(final, suffix=".old")
    os.replace(final, old / final.name)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
  else:
    os.replace(tmp, final)
  _fsync_dir(final.parent)


def save_sharded(directory: str | os.PathLike, tensors: Mapping[str, Any], *,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, metadata: Mapping[str, str] | None = None) -> None:
  """Writes a checkpoint directory from in-memory tensors: one ``model.safetensors``, or shards plus
  ``model.safetensors.index.json`` when larger than ``max_shard_bytes``. Each file is written with :func:`save`
  inside a temporary directory that is renamed when complete, so the directory appears whole (an existing one
  is replaced).

  Args:
    directory: the output directory.
    tensors: ``{name: array}``.
    max_shard_bytes: the largest data size of one shard file.
    metadata: string metadata for every shard's header.
  """
  directory = pathlib.Path(directory)
  arrays = {k: _as_host(k, v) for k, v in tensors.items()}
  groups = _plan_shards({k: (a.shape, a.dtype) for k, a in arrays.items()}, max_shard_bytes)
  directory.parent.mkdir(parents=True, exist_ok=True)
  atomic_io.remove_stale(directory.parent)
  tmp = atomic_io.mkdtemp(directory)
  try:
    weight_map = {}
    for i, names in enumerate(groups):
      fname = _shard_name(i, len(groups))
      save(tmp / fname, {n: arrays[n] for n in names}, metadata)
      weight_map.update({n: fname for n in names})
    if len(groups) > 1:
      _write_index(tmp, weight_map, sum(a.nbytes for a in arrays.values()))
    atomic_io.apply_umask(tmp)
    _replace_dir(tmp, directory, overwrite=True)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
