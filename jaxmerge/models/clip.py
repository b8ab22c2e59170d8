"""CLIP (vision and text towers) as pure JAX functions over a nested parameter dict.

transformers 5 ships no Flax CLIP, so jaxmerge carries its own. Parameters mirror Hugging Face names, so the
checkpoint key map is mechanical: ``vision_model/embeddings/patch_embedding/kernel`` (kh, kw, in, out),
``.../class_embedding``, ``.../position_embedding/embedding``, ``vision_model/pre_layrnorm``,
``vision_model/encoder/layers/<i>/{self_attn/{q,k,v,out}_proj, layer_norm1, mlp/{fc1,fc2}, layer_norm2}``,
``vision_model/post_layernorm``, ``visual_projection/kernel``, the same under ``text_model`` (with
``token_embedding/embedding`` and ``final_layer_norm``), ``text_projection/kernel`` and ``logit_scale``.
Dense kernels are stored ``(in, out)``: merge them with ``layout=jaxmerge.filters.flax_layout``. Layer keys
are strings ``"0"``, ``"1"``, ... Everything is a pure function of ``params`` (jit, vmap and grad apply).

References:
  Radford et al., "Learning Transferable Visual Models From Natural Language Supervision", ICML 2021.
  https://arxiv.org/abs/2103.00020
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["Cfg", "ClipConfig", "encode_image", "encode_text", "init", "logits", "vision_features"]


@dataclasses.dataclass(frozen=True)
class ClipConfig:
  """Sizes of a CLIP model (any size: ViT-B/32, B/16, L/14 or a tiny test model).

  ``vision_mlp`` / ``text_mlp`` default to ``4 * width``. ``projection_dim=None`` means a vision-only tower
  without projection (a Hugging Face ``CLIPVisionModel``): ``encode_image`` then returns the pooled output.
  """

  image_size: int = 224
  patch_size: int = 32
  vision_width: int = 768
  vision_layers: int = 12
  vision_heads: int = 12
  vision_mlp: int | None = None
  vocab_size: int = 49408
  context_length: int = 77
  text_width: int = 512
  text_layers: int = 12
  text_heads: int = 8
  text_mlp: int | None = None
  projection_dim: int | None = 512
  eos_token_id: int = 2
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  has_text: bool = True

  @property
  def num_positions(self) -> int:
    return (self.image_size // self.patch_size) ** 2 + 1

  @classmethod
  def from_hf(cls, config: Any) -> "ClipConfig":
    """From a transformers ``CLIPConfig`` (full model) or ``CLIPVisionConfig`` (vision tower only)."""
    vision = getattr(config, "vision_config", config)
    text = getattr(config, "text_config", None)
    kw = dict(
        image_size=vision.image_size, patch_size=vision.patch_size, vision_width=vision.hidden_size,
        vision_layers=vision.num_hidden_layers, vision_heads=vision.num_attention_heads,
        vision_mlp=vision.intermediate_size, hidden_act=vision.hidden_act, layer_norm_eps=vision.layer_norm_eps,
        projection_dim=getattr(config, "projection_dim", None) if text is not None else None, has_text=text is not None,
    )
    if text is not None:
      kw.update(vocab_size=text.vocab_size, context_length=text.max_position_embeddings, text_width=text.hidden_size,
                text_layers=text.num_hidden_layers, text_heads=text.num_attention_heads, text_mlp=text.intermediate_size,
                eos_token_id=text.eos_token_id)
      if text.hidden_act != vision.hidden_act:
        raise ValueError(f"different activations in the towers ({vision.hidden_act}, {text.hidden_act}) are not supported")
    return cls(**kw)


Cfg = ClipConfig


def _act(name: str):
  if name == "quick_gelu":
    return lambda x: x * jax.nn.sigmoid(1.702 * x)
  if name == "gelu":
    return lambda x: jax.nn.gelu(x, approximate=False)
  if name in ("gelu_new", "gelu_pytorch_tanh"):
    return lambda x: jax.nn.gelu(x, approximate=True)
  raise ValueError(f"unsupported activation {name!r}; supported: quick_gelu, gelu, gelu_new")


def _dense(key, i, o):
  return {"kernel": jax.random.normal(key, (i, o), jnp.float32) * i**-0.5, "bias": jnp.zeros((o,), jnp.float32)}


def _ln(w):
  return {"scale": jnp.ones((w,), jnp.float32), "bias": jnp.zeros((w,), jnp.float32)}


def _encoder(key, layers, width, mlp):
  out = {}
  for i, k in enumerate(jax.random.split(key, layers)):
    ks = jax.random.split(k, 6)
    out[str(i)] = {
        "self_attn": {n: _dense(kk, width, width) for n, kk in zip(("q_proj", "k_proj", "v_proj", "out_proj"), ks[:4])},
        "layer_norm1": _ln(width),
        "mlp": {"fc1": _dense(ks[4], width, mlp), "fc2": _dense(ks[5], mlp, width)},
        "layer_norm2": _ln(width),
    }
  return {"layers": out}


def init(cfg: ClipConfig, key: jax.Array) -> dict:
  """Random parameters for ``cfg`` (float32)."""
  k = jax.random.split(key, 10)
  w, p = cfg.vision_width, cfg.patch_size
  params: dict = {
      "vision_model": {
          "embeddings": {
              "patch_embedding": {"kernel": jax.random.normal(k[0], (p, p, 3, w)) * (3 * p * p) ** -0.5},
              "class_embedding": jax.random.normal(k[1], (w,)) * 0.02,
              "position_embedding": {"embedding": jax.random.normal(k[2], (cfg.num_positions, w)) * 0.02},
          },
          "pre_layrnorm": _ln(w),
          "encoder": _encoder(k[3], cfg.vision_layers, w, cfg.vision_mlp or 4 * w),
          "post_layernorm": _ln(w),
      }
  }
  if cfg.projection_dim is not None:
    params["visual_projection"] = {"kernel": jax.random.normal(k[4], (w, cfg.projection_dim)) * w**-0.5}
  if cfg.has_text:
    t = cfg.text_width
    params["text_model"] = {
        "embeddings": {
            "token_embedding": {"embedding": jax.random.normal(k[5], (cfg.vocab_size, t)) * 0.02},
            "position_embedding": {"embedding": jax.random.normal(k[6], (cfg.context_length, t)) * 0.01},
        },
        "encoder": _encoder(k[7], cfg.text_layers, t, cfg.text_mlp or 4 * t),
        "final_layer_norm": _ln(t),
    }
    params["text_projection"] = {"kernel": jax.random.normal(k[8], (t, cfg.projection_dim or t)) * t**-0.5}
    params["logit_scale"] = jnp.asarray(np.log(1 / 0.07), jnp.float32)
  return params


def _row(v, x):
  """``v`` reshaped to broadcast against the last axis of ``x`` (explicit: no implicit rank promotion)."""
  return v.reshape((1,) * (x.ndim - 1) + (-1,))


def _layer_norm(p, x, eps):
  mean = jnp.mean(x, -1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), -1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps) * _row(p["scale"], x) + _row(p["bias"], x)


def _linear(p, x):
  y = jnp.dot(x, p["kernel"], precision=jax.lax.Precision.HIGHEST)
  return y + _row(p["bias"], y)


def _block(p, x, heads, act, eps, mask=None):
  b, n, w = x.shape
  h = _layer_norm(p["layer_norm1"], x, eps)
  a = p["self_attn"]
  q, k, v = (_linear(a[name], h).reshape(b, n, heads, w // heads) for name in ("q_proj", "k_proj", "v_proj"))
  s = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=jax.lax.Precision.HIGHEST) * (w // heads) ** -0.5
  if mask is not None:
    s = jnp.where(mask, s, jnp.finfo(s.dtype).min)
  o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, -1), v, precision=jax.lax.Precision.HIGHEST).reshape(b, n, w)
  x = x + _linear(a["out_proj"], o)
  h = _layer_norm(p["layer_norm2"], x, eps)
  return x + _linear(p["mlp"]["fc2"], act(_linear(p["mlp"]["fc1"], h)))


def vision_features(cfg: ClipConfig, params: dict, images: jax.Array) -> jax.Array:
  """The pooled, post-layer-norm output of the vision tower ``[B, width]`` (HF ``pooler_output``).

  Args:
    images: float ``[B, H, W, 3]``, already preprocessed (CLIP mean/std), ``H = W = cfg.image_size``.
  """
  if images.ndim != 4 or images.shape[1:] != (cfg.image_size, cfg.image_size, 3):
    raise ValueError(f"images must be [B, {cfg.image_size}, {cfg.image_size}, 3], got {tuple(images.shape)}")
  vm = params["vision_model"]
  e = vm["embeddings"]
  b, p = images.shape[0], cfg.patch_size
  g = cfg.image_size // p
  x = images.astype(jnp.float32)[:, : g * p, : g * p]
  x = x.reshape(b, g, p, g, p, 3).transpose(0, 1, 3, 2, 4, 5).reshape(b, g * g, p * p * 3)
  x = jnp.dot(x, e["patch_embedding"]["kernel"].reshape(p * p * 3, -1), precision=jax.lax.Precision.HIGHEST)
  cls = jnp.broadcast_to(e["class_embedding"], (b, 1, x.shape[-1]))
  x = jnp.concatenate([cls, x], 1) + e["position_embedding"]["embedding"][None]
  x = _layer_norm(vm["pre_layrnorm"], x, cfg.layer_norm_eps)
  act = _act(cfg.hidden_act)
  for i in range(cfg.vision_layers):
    x = _block(vm["encoder"]["layers"][str(i)], x, cfg.vision_heads, act, cfg.layer_norm_eps)
  return _layer_norm(vm["post_layernorm"], x[:, 0], cfg.layer_norm_eps)


def encode_image(cfg: ClipConfig, params: dict, images: jax.Array) -> jax.Array:
  """Projected, unnormalized image embeddings ``[B, D]`` (transformers' ``get_image_features``); for a vision
  tower without projection, the pooled output."""
  pooled = vision_features(cfg, params, images)
  if "visual_projection" not in params:
    return pooled
  return jnp.dot(pooled, params["visual_projection"]["kernel"], precision=jax.lax.Precision.HIGHEST)


def encode_text(cfg: ClipConfig, params: dict, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
  """Projected text embeddings ``[B, D]`` (transformers' ``get_text_features``).

  Causal self-attention (plus the padding mask), final layer norm, and pooling at the end-of-text token: the
  first position holding ``eos_token_id``, or the highest token id when ``eos_token_id == 2`` (the original
  OpenAI configs, as in transformers).
  """
  tm = params["text_model"]
  e = tm["embeddings"]
  b, n = input_ids.shape
  x = e["token_embedding"]["embedding"][input_ids] + e["position_embedding"]["embedding"][None, :n]
  mask = jnp.tril(jnp.ones((n, n), bool))[None, None]
  if attention_mask is not None:
    mask = mask & (attention_mask[:, None, None, :] > 0)
  act = _act(cfg.hidden_act)
  for i in range(cfg.text_layers):
    x = _block(tm["encoder"]["layers"][str(i)], x, cfg.text_heads, act, cfg.layer_norm_eps, mask)
  x = _layer_norm(tm["final_layer_norm"], x, cfg.layer_norm_eps)
  if cfg.eos_token_id == 2:
    pos = jnp.argmax(input_ids, axis=-1)
  else:
    pos = jnp.argmax((input_ids == cfg.eos_token_id).astype(jnp.int32), axis=-1)
  pooled = x[jnp.arange(b), pos]
  return jnp.dot(pooled, params["text_projection"]["kernel"], precision=jax.lax.Precision.HIGHEST)


def logits(image_embeds: jax.Array, text_embeds: jax.Array, logit_scale: jax.Array) -> jax.Array:
  """``exp(logit_scale) * normalize(image) @ normalize(text).T`` (CLIP's ``logits_per_image``)."""
  i = image_embeds / jnp.linalg.norm(image_embeds, axis=-1, keepdims=True)
  t = text_embeds / jnp.linalg.norm(text_embeds, axis=-1, keepdims=True)
  return jnp.exp(logit_scale) * jnp.dot(i, t.T, precision=jax.lax.Precision.HIGHEST)
