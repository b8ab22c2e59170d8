"""Hugging Face CLIP checkpoints <-> jaxmerge CLIP parameters.

``load_clip(path)`` reads a ``CLIPModel`` or ``CLIPVisionModel`` directory (``config.json`` plus
``model.safetensors`` or sharded safetensors with an index; keys with or without the ``vision_model.`` prefix)
into ``(ClipConfig, params)``; ``save_clip_vision(path, config, params)`` writes the vision tower back to a
directory that ``transformers.CLIPVisionModel.from_pretrained`` loads. The name map is explicit: Linear weights
are transposed ``(out, in) -> (in, out)``, the patch convolution ``(O, I, kh, kw) -> (kh, kw, I, O)``, layer
norms ``weight -> scale``. Missing, extra or misshapen keys raise ``ValueError`` listing them.
transformers is used only to parse and write ``config.json``.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile

import numpy as np

from jaxmerge.io import safetensors_io
from jaxmerge.models import clip as mclip

__all__ = ["from_hf_state_dict", "load_clip", "save_clip_vision", "to_hf_state_dict"]


def _tower_map(prefix: str, ours: str, layers: int, final_ln: str) -> list[tuple[str, tuple[str, ...], str]]:
  """(hf name, our path, kind) for one tower; kind in linear|bias|ln_w|ln_b|raw|conv."""
  m = []
  for i in range(layers):
    hp, op = f"{prefix}encoder.layers.{i}.", (ours, "encoder", "layers", str(i))
    for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
      m.append((hp + f"self_attn.{n}.weight", op + ("self_attn", n, "kernel"), "linear"))
      m.append((hp + f"self_attn.{n}.bias", op + ("self_attn", n, "bias"), "raw"))
    for n in ("fc1", "fc2"):
      m.append((hp + f"mlp.{n}.weight", op + ("mlp", n, "kernel"), "linear"))
      m.append((hp + f"mlp.{n}.bias", op + ("mlp", n, "bias"), "raw"))
    for n in ("layer_norm1", "layer_norm2"):
      m.append((hp + f"{n}.weight", op + (n, "scale"), "raw"))
      m.append((hp + f"{n}.bias", op + (n, "bias"), "raw"))
  for n in final_ln:
    m.append((prefix + f"{n}.weight", (ours, n, "scale"), "raw"))
    m.append((prefix + f"{n}.bias", (ours, n, "bias"), "raw"))
  return m


def _name_map(cfg: mclip.ClipConfig) -> list[tuple[str, tuple[str, ...], str]]:
  v = "vision_model."
  m = [
      (v + "embeddings.class_embedding", ("vision_model", "embeddings", "class_embedding"), "raw"),
      (v + "embeddings.patch_embedding.weight", ("vision_model", "embeddings", "patch_embedding", "kernel"), "conv"),
      (v + "embeddings.position_embedding.weight", ("vision_model", "embeddings", "position_embedding", "embedding"), "raw"),
  ]
  m += _tower_map(v, "vision_model", cfg.vision_layers, ("pre_layrnorm", "post_layernorm"))
  if cfg.projection_dim is not None and cfg.has_text:
    m.append(("visual_projection.weight", ("visual_projection", "kernel"), "linear"))
  if cfg.has_text:
    t = "text_model."
    m += [
        (t + "embeddings.token_embedding.weight", ("text_model", "embeddings", "token_embedding", "embedding"), "raw"),
        (t + "embeddings.position_embedding.weight", ("text_model", "embeddings", "position_embedding", "embedding"), "raw"),
    ]
    m += _tower_map(t, "text_model", cfg.text_layers, ("final_layer_norm",))
    m += [("text_projection.weight", ("text_projection", "kernel"), "linear"), ("logit_scale", ("logit_scale",), "raw")]
  return m


def _to_ours(x: np.ndarray, kind: str) -> np.ndarray:
  if kind == "linear":
    return np.ascontiguousarray(x.T)
  if kind == "conv":
    return np.ascontiguousarray(x.transpose(2, 3, 1, 0))
  return x


def _to_hf(x: np.ndarray, kind: str) -> np.ndarray:
  if kind == "linear":
    return np.ascontiguousarray(x.T)
  if kind == "conv":
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1))
  return x


def _expected_shape(cfg: mclip.ClipConfig, params_shape: tuple[int, ...], kind: str) -> tuple[int, ...]:
  if kind == "linear":
    return params_shape[::-1]
  if kind == "conv":
    return (params_shape[3], params_shape[2], params_shape[0], params_shape[1])
  return params_shape


def from_hf_state_dict(cfg: mclip.ClipConfig, state: dict[str, np.ndarray], source: str = "checkpoint") -> dict:
  """Maps a Hugging Face CLIP state dict to jaxmerge parameters, checking names and shapes."""
  import jax

  # transformers 4 saves CLIPVisionModel keys with a "vision_model." prefix; accept both spellings.
  if not cfg.has_text and not any(k.startswith("vision_model.") for k in state):
    state = {"vision_model." + k: v for k, v in state.items()}
  state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
  shapes = jax.eval_shape(lambda: mclip.init(cfg, jax.random.key(0)))
  out: dict = {}
  missing, wrong = [], []
  names = _name_map(cfg)
  for hf, path, kind in names:
    ref = shapes
    for p in path:
      ref = ref[p]
    if hf not in state:
      missing.append(hf)
      continue
    want = _expected_shape(cfg, ref.shape, kind)
    if tuple(state[hf].shape) != tuple(want):
      wrong.append(f"{hf}: {tuple(state[hf].shape)} (expected {tuple(want)})")
      continue
    node = out
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = _to_ours(np.asarray(state[hf]), kind)
  extra = sorted(set(state) - {n for n, _, _ in names})
  if missing or wrong or extra:
    raise ValueError(f"{source} does not match the CLIP config: missing keys {missing[:20]}, misshapen keys "
                     f"{wrong[:20]}, unexpected keys {extra[:20]}")
  return out


def to_hf_state_dict(cfg: mclip.ClipConfig, params: dict, vision_only: bool = False) -> dict[str, np.ndarray]:
  """Inverse of :func:`from_hf_state_dict` (``vision_only`` keeps the ``vision_model.`` keys)."""
  out = {}
  for hf, path, kind in _name_map(cfg):
    if vision_only and not hf.startswith("vision_model."):
      continue
    node = params
    for p in path:
      node = node[p]
    out[hf] = _to_hf(np.asarray(node), kind)
  return out


def _resolve(path: str | os.PathLike) -> pathlib.Path:
  p = pathlib.Path(path)
  if p.exists():
    return p
  # A hub repo id: look in the local Hugging Face cache only (no network).
  from huggingface_hub import snapshot_download

  try:
    return pathlib.Path(snapshot_download(str(path), local_files_only=True))
  except Exception as e:  # noqa: BLE001
    raise ValueError(f"{path} is neither a local directory nor a repo in the Hugging Face cache ({e})") from e


def load_clip(path: str | os.PathLike) -> tuple[mclip.ClipConfig, dict]:
  """Loads a Hugging Face ``CLIPModel`` or ``CLIPVisionModel`` directory (local, or a repo id already in the hub
  cache) as ``(config, params)``."""
  import transformers

  d = _resolve(path)
  cfg_path = d / "config.json"
  if not cfg_path.exists():
    raise ValueError(f"{d} has no config.json")
  raw = json.loads(cfg_path.read_text())
  model_type = raw.get("model_type")
  if model_type == "clip":
    hf_cfg = transformers.CLIPConfig.from_pretrained(d)
  elif model_type == "clip_vision_model":
    hf_cfg = transformers.CLIPVisionConfig.from_pretrained(d)
  else:
    raise ValueError(f"{d} holds a {model_type!r} checkpoint, not a CLIP model (model_type 'clip' or "
                     "'clip_vision_model')")
  cfg = mclip.ClipConfig.from_hf(hf_cfg)
  state = safetensors_io.load(d)
  return cfg, from_hf_state_dict(cfg, state, source=str(d))


def save_clip_vision(path: str | os.PathLike, config: mclip.ClipConfig, params: dict) -> None:
  """Writes the vision tower as a ``CLIPVisionModel`` directory (config.json + model.safetensors), atomically."""
  import transformers

  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  vcfg = transformers.CLIPVisionConfig(
      hidden_size=config.vision_width, intermediate_size=config.vision_mlp or 4 * config.vision_width,
      num_hidden_layers=config.vision_layers, num_attention_heads=config.vision_heads, image_size=config.image_size,
      patch_size=config.patch_size, hidden_act=config.hidden_act, layer_norm_eps=config.layer_norm_eps,
  )
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
  try:
    vcfg.save_pretrained(tmp)
    safetensors_io.save(tmp / "model.safetensors", to_hf_state_dict(config, params, vision_only=True),
                        metadata={"format": "pt"})
    if path.exists():
      shutil.rmtree(path)
    os.replace(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
