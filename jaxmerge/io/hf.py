"""Hugging Face CLIP checkpoints <-> jaxmerge CLIP parameters (:mod:`jaxmerge.models.clip`).

::

    config, params = load_clip("openai/clip-vit-base-patch32")      # directory, file, or cached hub repo id
    save_clip_vision("merged/", config, {"vision_model": merged})   # a CLIPVisionModel directory
    save_clip("tiny/", config, params)                              # a CLIPModel directory

**Reading.** ``config.json`` (``model_type`` ``clip`` or ``clip_vision_model``) plus ``model.safetensors``,
sharded safetensors with ``model.safetensors.index.json``, or ``pytorch_model.bin`` (only when torch is
importable). A repo id that is not a local path is looked up in the Hugging Face hub cache only
(``local_files_only``: no network, so ``HF_HUB_OFFLINE=1`` works). Vision-tower keys are accepted with or
without the ``vision_model.`` prefix: transformers 4 writes ``CLIPVisionModel`` keys with it, transformers 5
(``save_pretrained`` in 5.23) without. Non-persistent ``position_ids`` buffers of old checkpoints are ignored.

**The name map is explicit** (:func:`name_map`): Linear weights ``(out, in) -> (in, out)`` kernels, the patch
convolution ``(O, I, kh, kw) -> (kh, kw, I, O)``, layer norms ``weight -> scale``, embeddings
``weight -> embedding`` (same shape). :func:`to_hf_state_dict` is its exact inverse.

**Errors** (``ValueError``): a path that is neither a directory, a file nor a cached repo; another
architecture (a BERT or ViT ``config.json``); missing, unexpected or misshapen keys (listed); a corrupt or
truncated safetensors file (named); a vision tower whose sizes differ from the pretrained model's
(``load_clip(path, like=pretrained_config)`` or :func:`check_compatible`).

**Writing** is atomic: a temporary directory beside the target, renamed into place when complete.
``save_clip_vision`` writes ``vision_model.``-prefixed keys, which transformers 4 and 5 both load into
``CLIPVisionModel`` (5.x strips the prefix on load).
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxmerge.io import paths
from jaxmerge.io.layouts import RenamedReader, renamed
from jaxmerge.models import clip as mclip
from jaxmerge.models.clip import check_compatible as check_compatible

__all__ = ["VisionTowerReader", "check_compatible", "clip_vision_layout", "from_hf_state_dict", "load_clip",
           "name_map", "read_state_dict", "resolve", "save_clip", "save_clip_vision", "to_hf_state_dict"]

_CLIP_TYPES = ("clip", "clip_vision_model")
_IGNORED_SUFFIXES = ("position_ids",)

# ------------------------------------------------------------------------------------------------------------
# The name map.


def _tower(hf: str, ours: str, layers: int, norms: tuple[str, ...]) -> list[tuple[str, str, str]]:
  m = []
  for i in range(layers):
    h, o = f"{hf}encoder.layers.{i}.", f"{ours}/encoder/layers/{i}/"
    for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
      m += [(f"{h}self_attn.{n}.weight", f"{o}self_attn/{n}/kernel", "linear"),
            (f"{h}self_attn.{n}.bias", f"{o}self_attn/{n}/bias", "same")]
    m += [(f"{h}layer_norm1.weight", f"{o}layer_norm1/scale", "same"), (f"{h}layer_norm1.bias", f"{o}layer_norm1/bias", "same")]
    for n in ("fc1", "fc2"):
      m += [(f"{h}mlp.{n}.weight", f"{o}mlp/{n}/kernel", "linear"), (f"{h}mlp.{n}.bias", f"{o}mlp/{n}/bias", "same")]
    m += [(f"{h}layer_norm2.weight", f"{o}layer_norm2/scale", "same"), (f"{h}layer_norm2.bias", f"{o}layer_norm2/bias", "same")]
  for n in norms:
    m += [(f"{hf}{n}.weight", f"{ours}/{n}/scale", "same"), (f"{hf}{n}.bias", f"{ours}/{n}/bias", "same")]
  return m


def name_map(config: mclip.ClipConfig) -> list[tuple[str, str, str]]:
  """``[(hf_name, jaxmerge_path, kind)]`` for every parameter of ``config``'s model.

  ``kind`` is ``"linear"`` (transpose), ``"conv"`` (``(O, I, kh, kw) <-> (kh, kw, I, O)``) or ``"same"``.
  jaxmerge paths are ``"/"``-joined (``"vision_model/encoder/layers/0/mlp/fc1/kernel"``); HF names are those of
  ``CLIPModel`` (a ``CLIPVisionModel`` uses the ``vision_model.`` ones).

  Args:
    config: the model's config.

  Returns:
    A list of ``(hf_name, jaxmerge_path, kind)``.
  """
  v, vo = "vision_model.", "vision_model"
  m = [(f"{v}embeddings.class_embedding", f"{vo}/embeddings/class_embedding", "same"),
       (f"{v}embeddings.patch_embedding.weight", f"{vo}/embeddings/patch_embedding/kernel", "conv"),
       (f"{v}embeddings.position_embedding.weight", f"{vo}/embeddings/position_embedding/embedding", "same")]
  m += _tower(v, vo, config.vision_layers, ("pre_layrnorm", "post_layernorm"))
  if config.projection_dim is not None:
    m.append(("visual_projection.weight", "visual_projection/kernel", "linear"))
  if config.has_text:
    t, to = "text_model.", "text_model"
    m += [(f"{t}embeddings.token_embedding.weight", f"{to}/embeddings/token_embedding/embedding", "same"),
          (f"{t}embeddings.position_embedding.weight", f"{to}/embeddings/position_embedding/embedding", "same")]
    m += _tower(t, to, config.text_layers, ("final_layer_norm",))
    m += [("text_projection.weight", "text_projection/kernel", "linear"), ("logit_scale", "logit_scale", "same")]
  return m


def _to_ours(x: np.ndarray, kind: str) -> np.ndarray:
  if kind == "linear":
    return np.ascontiguousarray(np.swapaxes(x, 0, 1))
  if kind == "conv":
    return np.ascontiguousarray(np.transpose(x, (2, 3, 1, 0)))
  return x


def _to_hf(x: np.ndarray, kind: str) -> np.ndarray:
  if kind == "linear":
    return np.ascontiguousarray(np.swapaxes(x, 0, 1))
  if kind == "conv":
    return np.ascontiguousarray(np.transpose(x, (3, 2, 0, 1)))
  return x


def _hf_shape(shape: tuple[int, ...], kind: str) -> tuple[int, ...]:
  if kind == "linear":
    return shape[::-1]
  if kind == "conv":
    return (shape[3], shape[2], shape[0], shape[1])
  return shape


@functools.lru_cache(maxsize=32)
def _our_shapes(config: mclip.ClipConfig) -> dict[str, tuple[int, ...]]:
  import jax  # noqa: PLC0415

  tree = jax.eval_shape(lambda: mclip.init_params(config, jax.random.key(0)))
  out = {}

  def walk(node, prefix):
    for k, v in node.items():
      if isinstance(v, dict):
        walk(v, f"{prefix}{k}/")
      else:
        out[f"{prefix}{k}"] = tuple(v.shape)

  walk(tree, "")
  return out


def _get(tree: Mapping, path: str) -> Any:
  node = tree
  for k in path.split("/"):
    if not isinstance(node, Mapping):
      raise KeyError(path)
    node = node[k] if k in node else node[int(k)] if k.isdigit() and int(k) in node else node[k]
  return node


def _normalize_keys(config: mclip.ClipConfig, state: Mapping[str, Any]) -> dict[str, Any]:
  """Drops ignored buffers and adds the ``vision_model.`` prefix to transformers-5 ``CLIPVisionModel`` keys."""
  out = {}
  bare = ("embeddings.", "encoder.", "pre_layrnorm.", "post_layernorm.")
  for k, x in state.items():
    if k.endswith(_IGNORED_SUFFIXES):
      continue
    if not config.has_text and k.startswith(bare):
      k = "vision_model." + k
    out[k] = x
  return out


def from_hf_state_dict(config: mclip.ClipConfig, state: Mapping[str, Any], source: str = "checkpoint") -> dict:
  """Maps a Hugging Face CLIP state dict (``{name: array}``) to jaxmerge parameters, checking names and shapes.

  Args:
    config: the model's config.
    state: ``{hf_name: array}``.
    source: the checkpoint's name, for error messages.

  Returns:
    The nested parameter dict of :mod:`jaxmerge.models.clip`.

  Raises:
    ValueError: listing missing, unexpected and misshapen keys (naming ``source``).
  """
  state = _normalize_keys(config, state)
  shapes = _our_shapes(config)
  names = name_map(config)
  out: dict = {}
  missing, wrong = [], []
  for hf, path, kind in names:
    if hf not in state:
      missing.append(hf)
      continue
    want = _hf_shape(shapes[path], kind)
    got = tuple(np.shape(state[hf]))
    if got != want:
      wrong.append(f"{hf}: {got} (expected {want})")
      continue
    node = out
    *parents, leaf = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = _to_ours(np.asarray(state[hf]), kind)
  extra = sorted(set(state) - {n for n, _, _ in names})
  if missing or wrong or extra:
    raise ValueError(f"{source} does not match the CLIP config: missing keys {missing[:20]}, misshapen keys "
                     f"{wrong[:20]}, unexpected keys {extra[:20]}"
                     + (f" ({len(missing)} missing, {len(wrong)} misshapen, {len(extra)} unexpected in all)"
                        if max(len(missing), len(wrong), len(extra)) > 20 else ""))
  return out


def to_hf_state_dict(config: mclip.ClipConfig, params: Mapping, *, vision_only: bool = False,
                     vision_prefix: str = "vision_model.") -> dict[str, np.ndarray]:
  """Inverse of :func:`from_hf_state_dict`: ``{hf_name: array}`` in PyTorch layouts (dtypes kept).

  Args:
    vision_only: keep only the vision tower (``vision_model.*``), as a ``CLIPVisionModel`` holds.
    vision_prefix: what replaces ``"vision_model."`` in vision names (``""``: transformers 5's
      ``CLIPVisionModel`` spelling).

  Returns:
    ``{hf_name: array}``.

  Raises:
    ValueError: a parameter of ``config`` is absent from ``params`` (naming its path).
  """
  out = {}
  for hf, path, kind in name_map(config):
    if not hf.startswith("vision_model."):
      if vision_only:
        continue
    else:
      hf = vision_prefix + hf[len("vision_model."):]
    try:
      x = _get(params, path)
    except (KeyError, TypeError):
      raise ValueError(f"params has no {path!r} (needed for {hf})") from None
    out[hf] = _to_hf(np.asarray(x), kind)
  return out


# ------------------------------------------------------------------------------------------------------------
# Locating and reading checkpoints.


def resolve(path: str | os.PathLike) -> pathlib.Path:
  """A local path, or the snapshot directory of a repo id in the Hugging Face hub cache (never the network).

  Args:
    path: a local path or a hub repo id.

  Returns:
    The local path.

  Raises:
    ValueError: neither exists.
  """
  p = pathlib.Path(path).expanduser()
  if p.exists():
    return p
  text = str(path)
  if text.count("/") > 1 or text.startswith((".", "/", "~")):
    raise ValueError(f"{text} does not exist")
  from huggingface_hub import snapshot_download  # noqa: PLC0415

  try:
    return pathlib.Path(snapshot_download(text, local_files_only=True))
  except Exception as e:  # noqa: BLE001 (hub raises several types for "not cached" / bad id)
    raise ValueError(f"{text} is neither a local path nor a repo in the Hugging Face cache "
                     f"({type(e).__name__}: {e})") from e


def _import_torch():
  import torch  # noqa: PLC0415

  return torch


def _read_torch(files: list[pathlib.Path]) -> dict[str, np.ndarray]:
  try:
    torch = _import_torch()
  except ImportError:
    raise ValueError(f"{files[0].parent} holds only PyTorch .bin weights and torch is not installed; install torch "
                     "or convert the checkpoint to safetensors") from None
  out = {}
  for f in files:
    try:
      sd = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
      raise ValueError(f"{f} is not a readable PyTorch checkpoint: {type(e).__name__}: {e}") from e
    for k, v in sd.items():
      out[k] = (v.float() if v.dtype == torch.bfloat16 else v).numpy()
  return out


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """All tensors of a checkpoint directory or file as ``{name: numpy array}`` (bf16 stays bf16 for safetensors).

  Order of preference in a directory: sharded safetensors (index), ``model.safetensors`` (or the only
  ``*.safetensors``), then ``pytorch_model.bin`` (sharded with ``pytorch_model.bin.index.json``; needs torch).

  Args:
    path: a checkpoint directory or weights file.

  Returns:
    ``{name: numpy array}``.

  Raises:
    ValueError: no weights, a corrupt or truncated file (named), or .bin weights without torch.
  """
  from jaxmerge.io import paths, safetensors_io  # noqa: PLC0415

  p = pathlib.Path(path)
  if p.is_dir() and not list(p.glob("*.safetensors")) and not list(p.glob("*.safetensors.index.json")):
    index = p / "pytorch_model.bin.index.json"
    if index.exists():
      try:
        files = sorted({paths.inside(p, f, f"shard listed in {index.name}")
                        for f in json.loads(index.read_text())["weight_map"].values()})
      except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"{index} is not a valid index: {e}") from e
      return _read_torch(files)
    if (p / "pytorch_model.bin").exists():
      return _read_torch([p / "pytorch_model.bin"])
  if p.is_file() and p.suffix in (".bin", ".pt", ".pth"):
    return _read_torch([p])
  reader = safetensors_io.open_checkpoint(p)
  try:
    return {k: np.asarray(reader.get(k)) for k in reader.keys()}
  finally:
    close = getattr(reader, "close", None)
    if close is not None:
      close()


def _read_config(d: pathlib.Path) -> mclip.ClipConfig:
  import transformers  # noqa: PLC0415

  from jaxmerge.io import paths  # noqa: PLC0415

  cfg_path = paths.inside(d, "config.json", "model config")
  try:
    raw = json.loads(cfg_path.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"cannot read {cfg_path}: {e}") from e
  model_type = raw.get("model_type")
  if model_type not in _CLIP_TYPES:
    arch = ", ".join(raw.get("architectures") or []) or "unknown architecture"
    raise ValueError(f"{d} holds a {model_type!r} checkpoint ({arch}), not a CLIP model (model_type 'clip' for "
                     "CLIPModel or 'clip_vision_model' for CLIPVisionModel)")
  cls = transformers.CLIPConfig if model_type == "clip" else transformers.CLIPVisionConfig
  return mclip.ClipConfig.from_hf(cls.from_dict(raw))


def load_clip(path: str | os.PathLike, *, config: mclip.ClipConfig | None = None,
              like: mclip.ClipConfig | None = None) -> tuple[mclip.ClipConfig, dict]:
  """Loads a Hugging Face ``CLIPModel`` or ``CLIPVisionModel`` as ``(config, params)``.

  Args:
    path: a model directory, a weights file inside one, or a hub repo id already in the local cache.
    config: the config to use when the checkpoint has no ``config.json`` (e.g. a bare merged safetensors
      file); a vision-only state dict is then read with ``config.vision_only()``.
    like: a reference config (the pretrained model's); the loaded vision tower must have its sizes.

  Returns:
    ``(ClipConfig, params)`` with numpy float arrays in the layout of :mod:`jaxmerge.models.clip`. A
    ``CLIPVisionModelWithProjection`` keeps its ``visual_projection``; weights without any ``text_model.`` key
    under a ``CLIPModel`` config are read as that model's vision tower (``config.vision_only()``).

  Raises:
    ValueError: see the module docstring.
  """
  p = resolve(path)
  d = p if p.is_dir() else p.parent
  if (d / "config.json").exists():
    cfg = _read_config(d)  # first: another architecture is named before its weights are read
  elif config is not None:
    cfg = config
  else:
    raise ValueError(f"{d} has no config.json; pass config= to read its weights")
  state = read_state_dict(p)
  if cfg.has_text and not any(k.startswith("text_model.") for k in state):
    cfg = cfg.vision_only()  # a vision tower saved beside a CLIPModel config (e.g. a merge of vision towers)
  if not cfg.has_text and "visual_projection.weight" in state:  # CLIPVisionModelWithProjection
    cfg = cfg.replace(projection_dim=int(np.shape(state["visual_projection.weight"])[0]))
  if like is not None:
    check_compatible(like, cfg, what=str(path))
  return cfg, from_hf_state_dict(cfg, state, source=str(p))


# ------------------------------------------------------------------------------------------------------------
# Writing.


def _write_dir(path: str | os.PathLike, hf_config: Any, tensors: dict[str, np.ndarray], architecture: str) -> pathlib.Path:
  from jaxmerge.io import safetensors_io  # noqa: PLC0415

  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
  old = None
  try:
    hf_config.architectures = [architecture]
    dtypes = {str(np.asarray(x).dtype) for x in tensors.values()}
    if len(dtypes) == 1:
      hf_config.dtype = "bfloat16" if dtypes == {"bfloat16"} else dtypes.pop()
    hf_config.save_pretrained(tmp)
    safetensors_io.save(tmp / "model.safetensors", tensors, metadata={"format": "pt"})
    if path.exists():
      old = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
      os.replace(path, old / "x")
    os.replace(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    if old is not None and (old / "x").exists() and not path.exists():
      os.replace(old / "x", path)
    raise
  finally:
    if old is not None:
      shutil.rmtree(old, ignore_errors=True)
  return path


def save_clip_vision(path: str | os.PathLike, config: mclip.ClipConfig, params: Mapping, *,
                     vision_prefix: str = "vision_model.") -> pathlib.Path:
  """Writes the vision tower as a ``CLIPVisionModel`` directory (``config.json`` + ``model.safetensors``).

  ``params`` needs only ``"vision_model"`` (a full model's other entries are ignored). Parameter dtypes are
  kept. The write is atomic: an existing ``path`` is replaced only once the new directory is complete.

  Args:
    vision_prefix: key prefix of the vision tower (``"vision_model."``: loadable by transformers 4 and 5;
      ``""``: the spelling of transformers 5's ``save_pretrained``).

  Returns:
    ``path``.
  """
  vcfg = config.vision_only()
  tensors = to_hf_state_dict(vcfg, params, vision_only=True, vision_prefix=vision_prefix)
  hf_config = vcfg.to_hf()
  if config.projection_dim is not None:
    hf_config.projection_dim = config.projection_dim
  return _write_dir(path, hf_config, tensors, "CLIPVisionModel")


def save_clip(path: str | os.PathLike, config: mclip.ClipConfig, params: Mapping) -> pathlib.Path:
  """Writes a whole model as a ``CLIPModel`` directory (``CLIPVisionModel`` if ``config.has_text`` is False),
  atomically. Returns ``path``.

  Args:
    path: the output directory.
    config: the model's config.
    params: the model's parameters.

  Returns:
    ``path``.
  """
  if not config.has_text:
    return save_clip_vision(path, config, params)
  return _write_dir(path, config.to_hf(), to_hf_state_dict(config, params), "CLIPModel")


# ------------------------------------------------------------------------------------------------------------
# The standard layout for merging: a CLIPModel base and CLIPVisionModel experts.

_VISION_PREFIX = "vision_model."
_BARE_VISION = ("embeddings.", "encoder.", "pre_layrnorm.", "post_layernorm.")


def _model_type(path: str | os.PathLike) -> str | None:
  cfg = paths.model_config(path)
  return cfg.get("model_type") if cfg is not None else None


def clip_vision_layout(base: str | os.PathLike, models: list[str | os.PathLike] | tuple) -> bool:
  """Whether ``base`` is a ``CLIPModel`` directory and every model a ``CLIPVisionModel`` one (``config.json``
  ``model_type`` ``clip`` and ``clip_vision_model``): the standard layout of the CLIP merging benchmarks, whose
  merge is a merge of vision towers.

  Args:
    base: the pretrained checkpoint (a directory or a weights file in one).
    models: the fine-tuned checkpoints.

  Returns:
    Whether the checkpoints are in that layout.

  Raises:
    ValueError: the vision towers' sizes differ from the base's (naming the model).
  """
  if _model_type(base) != "clip" or not models or any(_model_type(m) != "clip_vision_model" for m in models):
    return False
  b = pathlib.Path(base)
  bcfg = _read_config(b if b.is_dir() else b.parent)
  for m in models:
    p = pathlib.Path(m)
    check_compatible(bcfg, _read_config(p if p.is_dir() else p.parent), what=str(m))
  return True


class VisionTowerReader(RenamedReader):
  """A lazy checkpoint reader (:class:`jaxmerge.io.safetensors_io.TensorReader`) showing only a CLIP checkpoint's
  vision tower, every key spelled ``vision_model.<...>``: a ``CLIPModel``'s other tensors (text tower,
  projections, logit scale) are hidden, and a transformers-5 ``CLIPVisionModel``'s unprefixed keys
  (``embeddings.*``, ``encoder.*``, ...) get the prefix. Non-persistent ``position_ids`` buffers are hidden.

  Args:
    reader: the checkpoint's reader (``safetensors_io.open_checkpoint``).
    source: the checkpoint's name, for errors.

  Raises:
    ValueError: the checkpoint has a tensor under both spellings, or no vision-tower tensor.
  """

  def __init__(self, reader: Any, source: str = "checkpoint"):
    def name_of(k: str) -> str | None:
      if k.endswith(_IGNORED_SUFFIXES):
        return None
      return k if k.startswith(_VISION_PREFIX) else _VISION_PREFIX + k if k.startswith(_BARE_VISION) else None

    super().__init__(reader, renamed(reader, name_of, source))
    self.path = getattr(reader, "path", source)
    if not len(self):
      raise ValueError(f"{source} has no CLIP vision-tower tensors (vision_model.* or embeddings.*/encoder.*)")
