"""A checksummed, crash-safe cache of benchmark artifacts (checkpoints with orbax, arrays with NumPy).

Every entry is a directory ``<root>/<name>/`` holding the payload and a ``manifest.json`` with the SHA-256 of
each payload file. An entry is written under a temporary name in the same directory and renamed into place
only when complete, so an interrupted run never leaves a half-written checkpoint that a later run would trust.
Reading verifies the checksums first: a corrupt or truncated entry is reported, deleted and rebuilt by the
caller, never silently reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Cache", "CorruptEntryWarning", "default_cache_dir", "sha256_file"]

_MANIFEST = "manifest.json"
_TMP_PREFIX = ".tmp-"


class CorruptEntryWarning(UserWarning):
  """A cache entry failed its checksum and is being rebuilt."""


def default_cache_dir() -> Path:
  """The default cache directory.

  Returns:
    ``$JAXMERGE_CACHE`` (user-expanded) if set, else ``~/.cache/jaxmerge``; the directory is not created.
  """
  env = os.environ.get("JAXMERGE_CACHE")
  return Path(env).expanduser() if env else Path.home() / ".cache" / "jaxmerge"


def sha256_file(path: Path) -> str:
  """The SHA-256 hex digest of a file, read in 1 MiB chunks.

  Args:
    path: the file.

  Returns:
    The hex digest.
  """
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def _payload_files(d: Path) -> list[Path]:
  return sorted(p for p in d.rglob("*") if p.is_file() and p.name != _MANIFEST)


class Cache:
  """Entries under one directory; names are plain strings without slashes.

  Args:
    root: the directory (created on first write).
  """

  def __init__(self, root: str | os.PathLike):
    self.root = Path(root)

  def path(self, name: str) -> Path:
    if not name or "/" in name or name.startswith("."):
      raise ValueError(f"invalid cache entry name {name!r}")
    return self.root / name

  # ---- generic entries -------------------------------------------------------------------------------------

  def _verify(self, name: str) -> Path | None:
    """Returns the entry's directory if it exists and every checksum matches; deletes it if corrupt."""
    d = self.path(name)
    if not d.is_dir():
      return None
    problem = None
    try:
      manifest = json.loads((d / _MANIFEST).read_text())
      files = manifest["files"]
      present = {str(p.relative_to(d)) for p in _payload_files(d)}
      if present != set(files):
        problem = f"files differ from the manifest ({sorted(present ^ set(files))[:5]})"
      else:
        for rel, digest in files.items():
          if sha256_file(d / rel) != digest:
            problem = f"checksum mismatch in {rel}"
            break
    except (OSError, ValueError, KeyError, TypeError) as e:
      problem = f"unreadable manifest ({e})"
    if problem is None:
      return d
    warnings.warn(f"cache entry {d} is corrupt ({problem}); deleting it and rebuilding", CorruptEntryWarning,
                  stacklevel=3)
    shutil.rmtree(d, ignore_errors=True)
    return None

  def meta(self, name: str) -> dict | None:
    """The metadata stored with a valid entry, or ``None``."""
    d = self._verify(name)
    return None if d is None else json.loads((d / _MANIFEST).read_text()).get("meta", {})

  def has(self, name: str) -> bool:
    return self._verify(name) is not None

  def _write(self, name: str, write_payload, meta: dict | None) -> Path:
    final = self.path(name)
    self.root.mkdir(parents=True, exist_ok=True)
    tmp = self.root / f"{_TMP_PREFIX}{name}-{uuid.uuid4().hex[:8]}"
    try:
      tmp.mkdir()
      write_payload(tmp)
      files = {str(p.relative_to(tmp)): sha256_file(p) for p in _payload_files(tmp)}
      (tmp / _MANIFEST).write_text(json.dumps({"files": files, "meta": meta or {}}, indent=1, sort_keys=True))
      if final.exists():
        trash = self.root / f"{_TMP_PREFIX}old-{name}-{uuid.uuid4().hex[:8]}"
        os.rename(final, trash)
        shutil.rmtree(trash, ignore_errors=True)
      os.rename(tmp, final)
    finally:
      if tmp.exists():
        shutil.rmtree(tmp, ignore_errors=True)
    return final

  def clean_tmp(self) -> None:
    """Removes leftovers of interrupted writes."""
    if self.root.is_dir():
      for p in self.root.iterdir():
        if p.name.startswith(_TMP_PREFIX):
          shutil.rmtree(p, ignore_errors=True)

  # ---- typed payloads --------------------------------------------------------------------------------------

  def save_arrays(self, name: str, arrays: dict[str, np.ndarray], meta: dict | None = None) -> None:
    """Stores a flat dict of NumPy arrays (``np.save`` per array, no pickling)."""
    def write(d: Path):
      for k, v in arrays.items():
        if "/" in k:
          raise ValueError(f"array name {k!r} must not contain '/'")
        np.save(d / f"{k}.npy", np.asarray(v), allow_pickle=False)
    self._write(name, write, meta)

  def load_arrays(self, name: str) -> dict[str, np.ndarray] | None:
    d = self._verify(name)
    if d is None:
      return None
    return {p.stem: np.load(p, allow_pickle=False) for p in sorted(d.glob("*.npy"))}

  def save_tree(self, name: str, tree: Any, meta: dict | None = None) -> None:
    """Stores a pytree of arrays as an orbax checkpoint."""
    import orbax.checkpoint as ocp

    def write(d: Path):
      with ocp.PyTreeCheckpointer() as ckptr:
        ckptr.save((d / "tree").absolute(), tree)
    self._write(name, write, meta)

  def load_tree(self, name: str, like: Any) -> Any | None:
    """Restores a pytree saved by :meth:`save_tree`; ``like`` gives structure, shapes and dtypes.

    A checkpoint whose structure or shapes differ from ``like`` counts as corrupt (deleted, ``None``).
    """
    import jax
    import orbax.checkpoint as ocp

    d = self._verify(name)
    if d is None:
      return None
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype
                                                           if not hasattr(x, "dtype") else x.dtype), like)
    try:
      with ocp.PyTreeCheckpointer() as ckptr:
        restored = ckptr.restore((d / "tree").absolute(),
                                 args=ocp.args.PyTreeRestore(
                                   item=abstract,
                                   restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                                             abstract)))
      ok = jax.tree.structure(restored) == jax.tree.structure(abstract) and all(
        np.shape(a) == b.shape for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(abstract)))
    except Exception as e:  # orbax raises many types on damaged checkpoints
      ok, restored = False, None
      warnings.warn(f"cache entry {d} could not be restored ({type(e).__name__}: {e}); rebuilding",
                    CorruptEntryWarning, stacklevel=2)
    if not ok:
      shutil.rmtree(d, ignore_errors=True)
      return None
    return restored
