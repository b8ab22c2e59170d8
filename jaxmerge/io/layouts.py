"""Tensor-name layouts: a checkpoint's tensors under the names its transformers 5 model gives its parameters.

transformers 5 still saves some architectures under their older checkpoint names and renames the tensors when it
loads them (its ``conversion_mapping``). mergekit 0.1.5 reads such checkpoints through that renaming and writes
its output under the model's names. :data:`RENAMES` holds, per ``model_type`` of ``config.json``, the prefix
renames of transformers 5 for the architectures that mergekit merges this way (those without an architecture
definition of its own, whose tensors it names as transformers 5's model does):

- ``llava``: ``language_model.lm_head.*`` -> ``lm_head.*``, ``language_model.model.*`` ->
  ``model.language_model.*`` (transformers' ``llava`` renames followed by its ``LlavaModel`` one),
  ``language_model.*`` -> ``model.language_model.*``, ``vision_tower.*`` -> ``model.vision_tower.*``,
  ``multi_modal_projector.*`` -> ``model.multi_modal_projector.*``.

Names that no rule matches (already in the model's layout) are kept, so a checkpoint in either layout reads the
same. transformers 5 loads both layouts. ``jaxmerge merge`` reads a mergekit-schema config's checkpoints through
:func:`open_checkpoint` with ``"transformers"`` names (``jaxmerge: {tensor_names: checkpoint}`` keeps the
checkpoints' names); jaxmerge's own schema keeps the checkpoints' names.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from jaxmerge.io import paths

__all__ = ["RENAMES", "TENSOR_NAMES", "RenamedReader", "model_type", "open_checkpoint", "rename", "renamed",
           "renames_for"]

TENSOR_NAMES = ("checkpoint", "transformers")

RENAMES: dict[str, tuple[tuple[str, str], ...]] = {
    "llava": (("language_model.lm_head.", "lm_head."), ("language_model.model.", "model.language_model."),
              ("language_model.", "model.language_model."), ("vision_tower.", "model.vision_tower."),
              ("multi_modal_projector.", "model.multi_modal_projector.")),
}


def model_type(path: str | os.PathLike) -> str | None:
  """The ``model_type`` of a checkpoint's ``config.json`` (its directory's, or the directory holding the file).

  Args:
    path: a checkpoint directory or file.

  Returns:
    The model type, or ``None`` without a readable config.
  """
  cfg = paths.model_config(path)
  return cfg.get("model_type") if cfg is not None else None


def renames_for(path: str | os.PathLike) -> tuple[tuple[str, str], ...]:
  """The prefix renames of a checkpoint's architecture (by its ``config.json`` ``model_type``).

  Args:
    path: a checkpoint directory or file.

  Returns:
    ``(old prefix, new prefix)`` pairs, first match wins; empty when the checkpoint's names are its model's.
  """
  return RENAMES.get(model_type(path) or "", ())


def rename(name: str, rules: Sequence[tuple[str, str]]) -> str:
  """``name`` under the first rule whose prefix it starts with (unchanged when none does).

  Args:
    name: a tensor name.
    rules: ``(old prefix, new prefix)`` pairs.

  Returns:
    The renamed tensor name.
  """
  for old, new in rules:
    if name.startswith(old):
      return new + name[len(old):]
  return name


def renamed(reader: Any, name_of: Callable[[str], str | None], source: str = "checkpoint") -> dict[str, str]:
  """``{new name: name in reader}`` for every tensor of ``reader`` that ``name_of`` keeps, in the reader's order.

  Args:
    reader: a checkpoint reader.
    name_of: a tensor's new name, or ``None`` to hide it.
    source: the checkpoint's name, for errors.

  Returns:
    The mapping (for :class:`RenamedReader`).

  Raises:
    ValueError: two tensors of the checkpoint get the same new name (it holds both spellings).
  """
  out: dict[str, str] = {}
  for k in reader.keys():
    name = name_of(k)
    if name is None:
      continue
    if name in out:
      raise ValueError(f"{source} holds {name!r} twice: as {out[name]!r} and as {k!r}")
    out[name] = k
  return out


class RenamedReader:
  """A checkpoint reader (:class:`jaxmerge.io.safetensors_io.TensorReader`) showing some of its tensors under other
  names; tensors are read lazily from the wrapped reader.

  Args:
    reader: the checkpoint's reader.
    names: ``{name shown: name in reader}``, in the order shown (:func:`renamed` builds it from a rename rule).
    owns: whether :meth:`close` closes ``reader`` (``False`` when several views share one reader).
  """

  def __init__(self, reader: Any, names: Mapping[str, str], *, owns: bool = True):
    self.reader, self.path = reader, getattr(reader, "path", None)
    self._src = dict(names)
    self._owns = owns

  @property
  def reads_into(self) -> bool:
    return bool(getattr(self.reader, "reads_into", False))

  def keys(self):
    return self._src.keys()

  def __iter__(self):
    return iter(self._src)

  def __contains__(self, name: object) -> bool:
    return name in self._src

  def __len__(self) -> int:
    return len(self._src)

  def source(self, name: str) -> str:
    """The checkpoint's own name of a tensor.

    Args:
      name: the tensor's name as shown.

    Returns:
      Its name in the checkpoint.
    """
    return self._src[name]

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self.reader.shape(self._src[name]))

  def dtype(self, name: str) -> np.dtype:
    return np.dtype(self.reader.dtype(self._src[name]))

  def get(self, name: str, *, out: np.ndarray | None = None) -> np.ndarray:
    if out is not None and self.reads_into:
      return self.reader.get(self._src[name], out=out)
    return self.reader.get(self._src[name])

  def close(self) -> None:
    if self._owns and hasattr(self.reader, "close"):
      self.reader.close()

  def __repr__(self) -> str:
    return f"{type(self).__name__}({self.reader!r})"


def open_checkpoint(path: str | os.PathLike, tensor_names: str = "checkpoint"):
  """Opens a checkpoint (:func:`jaxmerge.io.safetensors_io.open_checkpoint`) with its own tensor names, or with
  its transformers 5 model's (:data:`RENAMES`).

  Args:
    path: the checkpoint.
    tensor_names: ``"checkpoint"`` or ``"transformers"``.

  Returns:
    A lazy reader.

  Raises:
    ValueError: an unknown ``tensor_names``, or a checkpoint holding a tensor under both names.
  """
  from jaxmerge.io import safetensors_io as S  # noqa: PLC0415

  if tensor_names not in TENSOR_NAMES:
    raise ValueError(f"tensor_names must be one of {', '.join(TENSOR_NAMES)}, got {tensor_names!r}")
  reader = S.open_checkpoint(path)
  rules = renames_for(path) if tensor_names == "transformers" else ()
  if not rules:
    return reader
  try:
    return RenamedReader(reader, renamed(reader, lambda k: rename(k, rules), str(path)))
  except BaseException:
    reader.close()
    raise
