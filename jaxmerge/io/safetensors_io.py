"""Safetensors checkpoints: lazy, memory-mapped reading with clear errors, and atomic writing.

The format is an 8-byte little-endian header length, a JSON header ``{name: {dtype, shape, data_offsets}}``
and the raw little-endian tensor bytes. Reading memory-maps the file and returns NumPy views (bfloat16 via
``ml_dtypes``, which JAX ships), so a tensor is only read from disk when it is used. Corrupt or truncated files
raise ``ValueError`` naming the file. Writing goes to a temporary file in the target directory, is fsynced, and
is renamed into place, so a crash never leaves a partial checkpoint.
"""

from __future__ import annotations

import json
import mmap
import os
import pathlib
import struct
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any

import ml_dtypes
import numpy as np

__all__ = ["SafetensorsReader", "load", "open_checkpoint", "save", "save_sharded"]

_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U8": np.dtype("u1"), "BOOL": np.dtype("?"), "U16": np.dtype("<u2"), "U32": np.dtype("<u4"), "U64": np.dtype("<u8"),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsReader(Mapping):
  """A lazy ``{name: np.ndarray}`` view of one safetensors file (memory-mapped)."""

  def __init__(self, path: str | os.PathLike):
    self.path = pathlib.Path(path)
    try:
      self._file = open(self.path, "rb")
    except OSError as e:
      raise ValueError(f"cannot open checkpoint {self.path}: {e}") from e
    size = os.fstat(self._file.fileno()).st_size
    if size < 8:
      raise ValueError(f"{self.path} is not a safetensors file: truncated before the header ({size} bytes)")
    (n,) = struct.unpack("<Q", self._file.read(8))
    if n > min(size - 8, _MAX_HEADER):
      raise ValueError(f"{self.path} is corrupt or truncated: header length {n} exceeds the file ({size} bytes)")
    try:
      header = json.loads(self._file.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ValueError(f"{self.path} is corrupt: its header is not valid JSON ({e})") from e
    if not isinstance(header, dict):
      raise ValueError(f"{self.path} is corrupt: the header is not a JSON object")
    self.metadata = header.pop("__metadata__", None) or {}
    self._start = 8 + n
    data_size = size - self._start
    self._entries = {}
    for name, info in header.items():
      try:
        dtype = _DTYPES[info["dtype"]]
        shape = tuple(int(d) for d in info["shape"])
        begin, end = (int(o) for o in info["data_offsets"])
      except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{self.path} is corrupt: bad header entry for tensor {name!r} ({e})") from e
      if end > data_size or begin > end or end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
        raise ValueError(
            f"{self.path} is corrupt or truncated: tensor {name!r} ({info['dtype']} {list(shape)}) spans bytes "
            f"{begin}..{end} but the data section has {data_size} bytes"
        )
      self._entries[name] = (dtype, shape, begin, end)
    self._mmap = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if size > 0 else None

  def __getitem__(self, name: str) -> np.ndarray:
    dtype, shape, begin, end = self._entries[name]
    return np.frombuffer(self._mmap, dtype=dtype, count=(end - begin) // dtype.itemsize,
                         offset=self._start + begin).reshape(shape)

  def __iter__(self) -> Iterator[str]:
    return iter(self._entries)

  def __len__(self) -> int:
    return len(self._entries)

  def shape(self, name: str) -> tuple[int, ...]:
    return self._entries[name][1]

  def dtype(self, name: str) -> np.dtype:
    return self._entries[name][0]


class _Sharded(Mapping):
  """A lazy view over the shards listed in a ``*.safetensors.index.json``."""

  def __init__(self, index: pathlib.Path):
    try:
      weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, KeyError, json.JSONDecodeError) as e:
      raise ValueError(f"{index} is not a valid safetensors index: {e}") from e
    self._readers = {f: SafetensorsReader(index.parent / f) for f in sorted(set(weight_map.values()))}
    self._map = {}
    for name, f in weight_map.items():
      if name not in self._readers[f]:
        raise ValueError(f"{index}: tensor {name!r} is listed in shard {f} but that shard does not contain it")
      self._map[name] = self._readers[f]

  def __getitem__(self, name):
    return self._map[name][name]

  def __iter__(self):
    return iter(self._map)

  def __len__(self):
    return len(self._map)


def open_checkpoint(path: str | os.PathLike) -> Mapping[str, np.ndarray]:
  """A lazy ``{name: array}`` mapping for a safetensors file, or a directory holding ``model.safetensors`` or
  a sharded checkpoint with a ``*.safetensors.index.json``."""
  p = pathlib.Path(path)
  if p.is_dir():
    indexes = sorted(p.glob("*.safetensors.index.json"))
    if indexes:
      return _Sharded(indexes[0])
    files = sorted(p.glob("*.safetensors"))
    if len(files) == 1:
      return SafetensorsReader(files[0])
    if not files:
      raise ValueError(f"no safetensors checkpoint in directory {p}")
    raise ValueError(f"directory {p} has several safetensors files and no index: {[f.name for f in files]}")
  if not p.exists():
    raise ValueError(f"checkpoint {p} does not exist")
  return SafetensorsReader(p)


def load(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a whole checkpoint into a flat ``{name: array}`` dict (arrays are memory-mapped views)."""
  ckpt = open_checkpoint(path)
  return {k: ckpt[k] for k in ckpt}


def _encode(tensors: Mapping[str, Any], metadata: Mapping[str, str] | None) -> tuple[bytes, list[np.ndarray]]:
  header: dict[str, Any] = {}
  if metadata:
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
  arrays, offset = [], 0
  for name, x in tensors.items():
    a = np.ascontiguousarray(np.asarray(x))
    if a.dtype not in _NAMES:
      raise ValueError(f"tensor {name!r} has dtype {a.dtype}, which safetensors cannot store")
    header[name] = {"dtype": _NAMES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
    offset += a.nbytes
    arrays.append(a)
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)
  return raw, arrays


def save(path: str | os.PathLike, tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> None:
  """Writes ``tensors`` to ``path`` atomically (temporary file, fsync, rename)."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  raw, arrays = _encode(tensors, metadata)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(struct.pack("<Q", len(raw)))
      f.write(raw)
      for a in arrays:
        f.write(a.tobytes())
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def save_sharded(directory: str | os.PathLike, tensors: Mapping[str, Any], *, max_shard_bytes: int = 2 << 30,
                 metadata: Mapping[str, str] | None = None) -> None:
  """Writes a checkpoint directory: one ``model.safetensors``, or shards plus ``model.safetensors.index.json``
  when larger than ``max_shard_bytes``. Written to a temporary directory and renamed, so it appears whole."""
  directory = pathlib.Path(directory)
  directory.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
  try:
    shards, cur, size = [], {}, 0
    for name, x in tensors.items():
      nbytes = np.asarray(x).nbytes
      if cur and size + nbytes > max_shard_bytes:
        shards.append(cur)
        cur, size = {}, 0
      cur[name] = x
      size += nbytes
    shards.append(cur)
    if len(shards) == 1:
      save(tmp / "model.safetensors", shards[0], metadata)
    else:
      weight_map = {}
      for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save(tmp / fname, shard, metadata)
        weight_map.update({k: fname for k in shard})
      total = sum(np.asarray(x).nbytes for x in tensors.values())
      (tmp / "model.safetensors.index.json").write_text(
          json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    if directory.exists():
      old = directory.with_name(f".{directory.name}.old")
      os.replace(directory, old)
      os.replace(tmp, directory)
      import shutil

      shutil.rmtree(old, ignore_errors=True)
    else:
      os.replace(tmp, directory)
  except BaseException:
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    raise
