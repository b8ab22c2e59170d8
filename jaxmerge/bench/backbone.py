"""The offline suite's shipped backbone: a tiny CLIP pretrained once, stored as package data.

Pretraining is the slowest step of the offline suite and the least reproducible across machines (thousands of
optimizer steps amplify floating-point differences between CPUs). Like the real protocol, where everybody
starts from the same OpenAI checkpoint, the suite starts from one pretrained tiny CLIP that ships with
jaxmerge: ``assets/<name>.safetensors`` (both towers, float32) and ``assets/<name>.json`` (its CLIP config, word
vocabulary, pretraining recipe and the SHA-256 of the weights file). ``experiments/pretrain_backbone.py``
rebuilds it from the recipe.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from jaxmerge.bench.cache import sha256_file
from jaxmerge.io.atomic import apply_umask, mkstemp

__all__ = ["ASSET_DIR", "backbone_info", "list_backbones", "load_backbone", "save_backbone"]

ASSET_DIR = Path(__file__).resolve().parent / "assets"


def list_backbones(root: str | os.PathLike | None = None) -> list[str]:
  """Names of the backbones in a directory.

  Args:
    root: the directory (default: the package's assets).

  Returns:
    The sorted names that have both a weights and a metadata file.
  """
  root = Path(root) if root is not None else ASSET_DIR
  return sorted(p.stem for p in root.glob("*.json") if p.with_suffix(".safetensors").exists())


def _paths(name: str, root: str | os.PathLike | None) -> tuple[Path, Path]:
  root = Path(root) if root is not None else ASSET_DIR
  meta, weights = root / f"{name}.json", root / f"{name}.safetensors"
  if not meta.exists() or not weights.exists():
    have = list_backbones(root)
    raise ValueError(f"no backbone {name!r} in {root} (expected {meta.name} and {weights.name}); available: "
                     f"{', '.join(have) or 'none'}")
  return meta, weights


def backbone_info(name: str, root: str | os.PathLike | None = None) -> dict:
  """A backbone's metadata.

  Args:
    name: the backbone's name.
    root: directory of the assets (default: the package's).

  Returns:
    ``{"name", "config" (CLIP config fields), "recipe" (pretraining settings), "vocab" (words), "sha256" (of the
    weights file), ...}``.

  Raises:
    ValueError: an unknown name or an unreadable metadata file.
  """
  meta, _ = _paths(name, root)
  try:
    return json.loads(meta.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"backbone metadata {meta} is unreadable: {e}") from e


def load_backbone(name: str, like: Any, root: str | os.PathLike | None = None) -> tuple[Any, dict]:
  """Loads a backbone's weights after checking their SHA-256 against the metadata.

  Args:
    name: the backbone's name (see :func:`list_backbones`).
    like: a pytree with the CLIP parameters' structure (e.g. ``jax.eval_shape`` of the model's init); every
      leaf's shape must match the stored tensor's.
    root: directory of the assets (default: the package's).

  Returns:
    ``(params, info)``: NumPy float32 parameters in ``like``'s structure, and :func:`backbone_info`.

  Raises:
    ValueError: a checksum mismatch (a corrupt or modified file), a missing or extra tensor, or a shape that
      differs from ``like``'s, naming the file and the tensor.
  """
  from safetensors.numpy import load_file

  from jaxmerge import tree as jtree

  info = backbone_info(name, root)
  _, weights = _paths(name, root)
  digest = sha256_file(weights)
  if digest != info.get("sha256"):
    raise ValueError(f"backbone weights {weights} fail their checksum (sha256 {digest[:16]}..., expected "
                     f"{str(info.get('sha256'))[:16]}...): the file is corrupt or was modified; reinstall jaxmerge "
                     "or rebuild it with experiments/pretrain_backbone.py")
  try:
    tensors = load_file(str(weights))
  except Exception as e:  # safetensors raises its own error types for truncated or malformed files
    raise ValueError(f"backbone weights {weights} are unreadable: {e}") from e
  expected = jtree.flatten_paths(like)
  missing = sorted(set(expected) - set(tensors))
  extra = sorted(set(tensors) - set(expected))
  if missing or extra:
    raise ValueError(f"backbone {weights} does not match the model: missing {missing[:5]}, extra {extra[:5]}")
  for p, leaf in expected.items():
    if tuple(tensors[p].shape) != tuple(np.shape(leaf)):
      raise ValueError(f"backbone {weights}: tensor {p!r} has shape {tuple(tensors[p].shape)}, the model "
                       f"expects {tuple(np.shape(leaf))}")
  return jtree.unflatten_paths(like, {p: np.asarray(tensors[p], np.float32) for p in expected}), info


def save_backbone(name: str, params: Any, *, config: dict, recipe: dict, vocab: list[str],
                  root: str | os.PathLike | None = None, extra: dict | None = None) -> Path:
  """Writes ``<root>/<name>.safetensors`` and ``<root>/<name>.json`` (each to a temporary file, renamed when
  complete; the metadata last, so a half-written backbone is never listed).

  Args:
    name: the backbone's name.
    params: the CLIP parameters (both towers).
    config: the model's configuration fields (what :class:`~jaxmerge.bench.suite.OfflineConfig` checks).
    recipe: the pretraining settings that produced it.
    vocab: the word vocabulary of its text tower.
    root: destination directory (default: the package's assets).
    extra: more metadata (timings, losses, versions).

  Returns:
    The weights file's path.
  """
  from safetensors.numpy import save_file

  from jaxmerge import tree as jtree

  root = Path(root) if root is not None else ASSET_DIR
  root.mkdir(parents=True, exist_ok=True)
  flat = {p: np.asarray(x, np.float32, order="C") for p, x in jtree.flatten_paths(params).items()}  # keeps 0-d leaves
  weights = root / f"{name}.safetensors"
  fd, tmp = mkstemp(weights)
  os.close(fd)
  try:
    save_file(flat, tmp)
    apply_umask(tmp)
    os.replace(tmp, weights)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
  meta = {"name": name, "config": config, "recipe": recipe, "vocab": list(vocab), "sha256": sha256_file(weights),
          "parameters": int(sum(x.size for x in flat.values())), **(extra or {})}
  fd, tmp = mkstemp(root / f"{name}.json")
  with os.fdopen(fd, "w") as f:
    json.dump(meta, f, indent=1)
  apply_umask(tmp)
  os.replace(tmp, root / f"{name}.json")
  return weights
