"""Which files a model directory may name: nothing outside it.

A checkpoint directory names further files (the shards of an index, ``config.json``, tokenizer files, the one
``*.safetensors`` a directory holds). Each such file must lie inside the directory once every symbolic link is
resolved, and an index may only name relative paths without ``..``. The one exception is the Hugging Face cache
layout: the files of ``<repo>/snapshots/<revision>/`` are symbolic links into the same repository's
``<repo>/blobs/``, which is allowed. Paths the user passes themselves (``--base``, ``--model``, a YAML's paths)
are never restricted.
"""

from __future__ import annotations

import json
import os
import pathlib

__all__ = ["allowed_roots", "inside", "model_config"]


def allowed_roots(directory: str | os.PathLike) -> list[pathlib.Path]:
  """The resolved directories a model directory's files may lie in.

  Args:
    directory: a model directory.

  Returns:
    The directory itself (resolved) and, for a Hugging Face cache snapshot ``<repo>/snapshots/<rev>``, the
    repository's ``blobs/`` directory.
  """
  d = pathlib.Path(directory).resolve()
  roots = [d]
  if d.parent.name == "snapshots":
    roots.append(d.parent.parent / "blobs")
  return roots


def inside(directory: str | os.PathLike, name: str | os.PathLike, what: str = "file") -> pathlib.Path:
  """``directory / name``, checked to stay inside the model directory.

  Args:
    directory: the model directory.
    name: a path relative to it (e.g. a shard name from an index).
    what: how to call the file in the error message (e.g. ``"shard"``).

  Returns:
    ``directory / name`` (unresolved, as the caller would have opened it).

  Raises:
    ValueError: ``name`` is absolute, contains ``..``, or resolves (through symbolic links) outside the
      directory (and outside its Hugging Face repository's ``blobs/``), naming both.
  """
  directory = pathlib.Path(directory)
  text = os.fspath(name)
  pure = pathlib.PurePosixPath(text.replace("\\", "/"))
  if not text or pure.is_absolute() or pathlib.PurePath(text).is_absolute() or ".." in pure.parts or "\0" in text:
    raise ValueError(f"{what} {text!r} named in {directory} is not a plain relative path inside that directory; "
                     "jaxmerge reads no file outside a model's directory")
  path = directory / text
  real = path.resolve()
  if not any(real == r or r in real.parents for r in allowed_roots(directory)):
    raise ValueError(f"{what} {path} resolves to {real}, outside the model directory {directory}; jaxmerge reads "
                     "no file outside a model's directory (pass that file's path yourself to use it)")
  return path


def model_config(path: str | os.PathLike) -> dict | None:
  """The ``config.json`` of a checkpoint: inside ``path`` when it is a directory, beside it when it is a file.

  Args:
    path: a checkpoint directory or file.

  Returns:
    The parsed JSON object, or ``None`` when there is none, it cannot be read or it is not an object.
  """
  p = pathlib.Path(path)
  try:
    cfg = json.loads(((p if p.is_dir() else p.parent) / "config.json").read_text())
  except (OSError, ValueError):
    return None
  return cfg if isinstance(cfg, dict) else None
