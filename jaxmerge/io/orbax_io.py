"""Orbax checkpoints of parameter pytrees: atomic save and restore, and a lazy reader for streaming merges.

Orbax is the JAX ecosystem's checkpoint library (tensorstore underneath). jaxmerge uses it for its own
pytrees (merged parameters, coefficients, heads) and accepts orbax directories wherever it accepts a
safetensors checkpoint. :class:`OrbaxReader` follows :class:`jaxmerge.io.safetensors_io.TensorReader`: leaves
are named by their ``a/b/c`` path (:func:`jaxmerge.tree.path_str`; flat ``{name: array}`` dicts keep their
names), shapes and dtypes come from the checkpoint metadata, and ``get(name)`` restores that one leaf (an orbax
partial restore), so a merge can stream an orbax checkpoint tensor by tensor.

``save`` writes to a temporary directory next to the target and renames it into place, so an interrupted save
never leaves a checkpoint at the final path. orbax is imported on first use (it is heavy).
"""

from __future__ import annotations

import os
import pathlib
import shutil
from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxmerge.io import atomic as atomic_io

__all__ = ["OrbaxReader", "find_item_dir", "is_orbax_dir", "load", "nest", "restore", "save"]

_MARKERS = ("_METADATA", "manifest.ocdbt", "_CHECKPOINT_METADATA", "_sharding", "checkpoint")


def _ocp():
  import orbax.checkpoint as ocp  # noqa: PLC0415

  return ocp


def is_orbax_dir(path: str | os.PathLike) -> bool:
  """Whether ``path`` is an orbax PyTree checkpoint directory (it holds orbax's metadata files).

  Args:
    path: a directory.

  Returns:
    Whether it is an orbax checkpoint.
  """
  p = pathlib.Path(path)
  return p.is_dir() and any((p / m).exists() for m in _MARKERS[:3])


def find_item_dir(path: str | os.PathLike) -> pathlib.Path | None:
  """The orbax item directory at ``path``: the directory itself, its only item subdirectory (a
  ``CheckpointManager`` step such as ``.../10/default``), or the latest numeric step of a manager root.

  Args:
    path: a directory.

  Returns:
    The item directory, or ``None`` when ``path`` holds no orbax checkpoint.
  """
  p = pathlib.Path(path)
  if p.is_dir() and ((p / "_METADATA").exists() or (p / "manifest.ocdbt").exists()):
    return p
  subdirs = [d for d in p.iterdir() if d.is_dir() and not d.name.startswith(".")] if p.is_dir() else []
  steps = sorted((d for d in subdirs if d.name.isdigit()), key=lambda d: int(d.name))
  if steps:
    return find_item_dir(steps[-1])
  items = [d for d in subdirs if is_orbax_dir(d)]
  if len(items) == 1:
    return find_item_dir(items[0])
  return None


def _is_meta_leaf(x: Any) -> bool:
  return hasattr(x, "shape") and hasattr(x, "dtype")


def _metadata_tree(path: pathlib.Path) -> Any:
  ocp = _ocp()
  md = ocp.PyTreeCheckpointer().metadata(path)
  for attr in ("item_metadata", "tree"):
    if hasattr(md, attr):
      md = getattr(md, attr)
  if hasattr(md, "tree"):
    md = md.tree
  return md


class OrbaxReader:
  """A lazy ``{path: array}`` view of an orbax PyTree checkpoint (see the module docstring)."""

  def __init__(self, path: str | os.PathLike):
    import jax  # noqa: PLC0415

    from jaxmerge import tree as jtree  # noqa: PLC0415

    self.path = pathlib.Path(path)
    try:
      tree = _metadata_tree(self.path)
    except Exception as e:  # orbax raises many types for unreadable metadata
      raise ValueError(f"{self.path} is not a readable orbax checkpoint: {e}") from e
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_meta_leaf)
    self._entries: dict[str, tuple[tuple[Any, ...], tuple[int, ...], np.dtype]] = {}
    for keypath, leaf in flat:
      name = jtree.path_str(keypath)
      if name in self._entries:
        raise ValueError(f"{self.path}: two leaves share the path {name!r}")
      shape = tuple(int(d) for d in (getattr(leaf, "shape", None) or ()))
      self._entries[name] = (tuple(keypath), shape, np.dtype(getattr(leaf, "dtype", np.float32)))
    self._all: dict[str, np.ndarray] | None = None
    self.metadata: dict = {}

  def keys(self):
    return self._entries.keys()

  def __iter__(self):
    return iter(self._entries)

  def __contains__(self, name: object) -> bool:
    return name in self._entries

  def __len__(self) -> int:
    return len(self._entries)

  def _entry(self, name: str):
    try:
      return self._entries[name]
    except KeyError:
      raise KeyError(f"{self.path} has no tensor {name!r}") from None

  def shape(self, name: str) -> tuple[int, ...]:
    return self._entry(name)[1]

  def dtype(self, name: str) -> np.dtype:
    return self._entry(name)[2]

  def get(self, name: str) -> np.ndarray:
    """Restores leaf ``name`` alone (partial restore); falls back to one full restore for non-dict trees."""
    import jax  # noqa: PLC0415

    keypath, shape, dtype = self._entry(name)
    if self._all is not None:
      return self._all[name]
    if all(isinstance(k, jax.tree_util.DictKey) for k in keypath):
      ocp = _ocp()
      item: dict = {}
      args: dict = {}
      node_i, node_a = item, args
      for k in keypath[:-1]:
        node_i = node_i.setdefault(k.key, {})
        node_a = node_a.setdefault(k.key, {})
      node_i[keypath[-1].key] = np.zeros(shape, dtype)
      node_a[keypath[-1].key] = ocp.RestoreArgs(restore_type=np.ndarray)
      try:
        out = ocp.PyTreeCheckpointer().restore(
            self.path, args=ocp.args.PyTreeRestore(item=item, restore_args=args, partial_restore=True))
      except Exception as e:  # noqa: BLE001
        raise ValueError(f"{self.path}: cannot restore {name!r}: {e}") from e
      for k in keypath:
        out = out[k.key]
      return np.asarray(out)
    self._all = load(self.path)
    return self._all[name]

  def close(self) -> None:
    self._all = None

  def __repr__(self) -> str:
    return f"OrbaxReader({str(self.path)!r}, {len(self)} tensors)"


def restore(path: str | os.PathLike) -> Any:
  """Restores a whole PyTree checkpoint as NumPy arrays (nested containers as saved).

  Args:
    path: an orbax checkpoint directory.

  Returns:
    The saved pytree with NumPy leaves.
  """
  p = find_item_dir(path)
  if p is None:
    raise ValueError(f"{path} is not an orbax checkpoint directory")
  try:
    return _ocp().PyTreeCheckpointer().restore(p)
  except Exception as e:  # noqa: BLE001
    raise ValueError(f"cannot restore orbax checkpoint {p}: {e}") from e


def load(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Restores a checkpoint into a flat ``{path: array}`` dict.

  Args:
    path: an orbax checkpoint directory.

  Returns:
    ``{path: array}``.
  """
  from jaxmerge import tree as jtree  # noqa: PLC0415

  return {k: np.asarray(v) for k, v in jtree.flatten_paths(restore(path)).items()}


def nest(flat: Mapping[str, Any]) -> dict:
  """``{"a/b": x, "c": y}`` -> ``{"a": {"b": x}, "c": y}``: the inverse of :func:`jaxmerge.tree.flatten_paths`
  for nested dicts (names without ``/``, such as Hugging Face names, stay flat keys).

  Args:
    flat: ``{path: value}``.

  Returns:
    The nested dict.

  Raises:
    ValueError: two names that would collide in orbax's storage (orbax joins nested keys with ``.``).
  """
  out: dict = {}
  storage: dict[str, str] = {}
  for name, x in flat.items():
    parts = name.split("/")
    joined = ".".join(parts)
    if joined in storage:
      raise ValueError(f"parameters {storage[joined]!r} and {name!r} would share the orbax name {joined!r}")
    storage[joined] = name
    node = out
    for p in parts[:-1]:
      node = node.setdefault(p, {})
      if not isinstance(node, dict):
        raise ValueError(f"parameter {name!r} is nested under a leaf")
    node[parts[-1]] = x
  return out


def save(path: str | os.PathLike, params: Any, *, overwrite: bool = False) -> pathlib.Path:
  """Saves a pytree of arrays as an orbax checkpoint at ``path``, atomically.

  Args:
    path: the checkpoint directory to create.
    params: any pytree of arrays (a flat ``{name: array}`` dict is nested by ``/``, see :func:`nest`).
    overwrite: replace an existing checkpoint.

  Returns:
    ``path``.
  """
  path = pathlib.Path(path).absolute()  # orbax needs an absolute path
  if path.exists() and not overwrite:
    raise ValueError(f"output {path} already exists")
  if isinstance(params, Mapping) and all(isinstance(k, str) and not isinstance(v, Mapping) for k, v in params.items()):
    params = nest(params)
  path.parent.mkdir(parents=True, exist_ok=True)
  atomic_io.remove_stale(path.parent)
  tmp = atomic_io.mkdtemp(path)
  try:
    _ocp().PyTreeCheckpointer().save(tmp / "item", params)
    atomic_io.apply_umask(tmp / "item")
    if path.exists():
      old = tmp / "old"
      os.replace(path, old)
    os.replace(tmp / "item", path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  shutil.rmtree(tmp, ignore_errors=True)
  return path
