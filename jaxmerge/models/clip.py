"""CLIP (vision and text towers): Flax NNX modules inside, pure functions of a parameter dict outside.

transformers 5 ships no Flax CLIP, so jaxmerge carries its own, numerically equal to transformers' PyTorch
``CLIPModel`` (pre-LN blocks, quick-GELU or GELU, a causal text tower pooled at the end-of-text token).

**Public contract (functional).** ``params`` is a plain nested dict of arrays (what
``nnx.to_pure_dict(nnx.state(model, nnx.Param))`` returns); every function below is a pure, jit-able function of
it::

    config = ClipConfig.tiny()                       # or ClipConfig.vit_b32() / from_hf(...) / io.hf.load_clip
    params = init_params(config, jax.random.key(0))
    img = encode_image(config, params, images)       # float32 [B, H, W, 3] preprocessed -> [B, D]
    txt = encode_text(config, params, input_ids, attention_mask)                       # -> [B, D]
    lg = logits(img, txt, params["logit_scale"])     # exp(logit_scale) * cos-sim, CLIP's logits_per_image

**Parameter names mirror Hugging Face**, so the checkpoint key map (:mod:`jaxmerge.io.hf`) is mechanical::

    vision_model/embeddings/patch_embedding/kernel        (kh, kw, 3, width)     HF (width, 3, kh, kw)
    vision_model/embeddings/class_embedding               (width,)
    vision_model/embeddings/position_embedding/embedding  (num_patches + 1, width)  same as HF
    vision_model/pre_layrnorm/{scale,bias}                (HF's spelling)
    vision_model/encoder/layers/<i>/self_attn/{q,k,v,out}_proj/{kernel (in, out), bias}
    vision_model/encoder/layers/<i>/{layer_norm1,layer_norm2}/{scale,bias}
    vision_model/encoder/layers/<i>/mlp/{fc1,fc2}/{kernel (in, out), bias}
    vision_model/post_layernorm/{scale,bias}
    text_model/embeddings/{token_embedding (vocab, width), position_embedding (context, width)}/embedding
    text_model/encoder/layers/<i>/...  (as above)     text_model/final_layer_norm/{scale,bias}
    visual_projection/kernel (vision_width, D)   text_projection/kernel (text_width, D)   logit_scale ()

Layer keys ``<i>`` are **strings** ``"0"``, ``"1"``, ... (they survive orbax and JSON round trips unchanged);
integer keys are accepted on input. Dense kernels are ``(in, out)``: merge them with
``layout=jaxmerge.filters.flax_layout``. Embedding tables keep Hugging Face's ``(rows, cols)`` layout.

Math is float32 (bfloat16/float16 parameters are upcast); matrix products use ``config.precision``
(``"highest"`` by default, i.e. true float32 on every backend, as PyTorch on CPU).

References:
  Radford et al., "Learning Transferable Visual Models From Natural Language Supervision", ICML 2021.
  https://arxiv.org/abs/2103.00020
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

__all__ = [
    "CLIP",
    "ClipConfig",
    "TextTransformer",
    "VisionTransformer",
    "check_compatible",
    "encode_image",
    "encode_text",
    "init",
    "init_params",
    "param_specs",
    "logits",
    "vision_features",
]

_ACTS = ("quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh")
_VISION_FIELDS = ("image_size", "patch_size", "vision_width", "vision_layers", "vision_heads", "vision_mlp_dim",
                  "hidden_act", "layer_norm_eps")


@dataclasses.dataclass(frozen=True)
class ClipConfig:
  """Sizes of a CLIP model (any size: ViT-B/32, B/16, L/14 or a tiny test model). Hashable (a static argument).

  Attributes:
    image_size, patch_size, vision_width, vision_layers, vision_heads: the vision tower.
    vision_mlp: MLP hidden size of the vision tower (``None`` becomes ``4 * vision_width``).
    vocab_size, context_length, text_width, text_layers, text_heads, text_mlp: the text tower
      (``context_length`` is Hugging Face's ``max_position_embeddings``).
    projection_dim: joint embedding size ``D``. ``None``: a vision tower without projection (a Hugging Face
      ``CLIPVisionModel``), whose ``encode_image`` returns the pooled output.
    eos_token_id, bos_token_id, pad_token_id: text special tokens. Pooling follows transformers:
      ``eos_token_id == 2`` (the original OpenAI configs) pools at ``argmax(input_ids)``, any other value at
      the first position holding ``eos_token_id``.
    hidden_act: ``quick_gelu`` (OpenAI CLIP), ``gelu`` (exact), ``gelu_new``/``gelu_pytorch_tanh`` (tanh).
    text_hidden_act: the text tower's activation if it differs (``None``: ``hidden_act``).
    layer_norm_eps: layer-norm epsilon of both towers.
    has_text: whether the model has a text tower (and ``text_projection``, ``logit_scale``).
    logit_scale_init: initial ``logit_scale`` (``log(1 / 0.07)``).
    precision: ``jax.default_matmul_precision`` for every matrix product (``"highest"``, ``"high"``,
      ``"default"``...); it only matters on accelerators.
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
  bos_token_id: int = 0
  pad_token_id: int = 1
  hidden_act: str = "quick_gelu"
  text_hidden_act: str | None = None
  layer_norm_eps: float = 1e-5
  has_text: bool = True
  logit_scale_init: float = math.log(1 / 0.07)
  precision: str = "highest"

  def __post_init__(self):
    if self.vision_mlp is None:  # explicit sizes, so that equal models have equal configs
      object.__setattr__(self, "vision_mlp", 4 * self.vision_width)
    if self.text_mlp is None:
      object.__setattr__(self, "text_mlp", 4 * self.text_width)
    for name in ("hidden_act", "text_hidden_act"):
      act = getattr(self, name)
      if act is not None and act not in _ACTS:
        raise ValueError(f"unsupported {name} {act!r}; supported: {', '.join(_ACTS)}")
    if self.vision_width % self.vision_heads:
      raise ValueError(f"vision_width {self.vision_width} is not divisible by vision_heads {self.vision_heads}")
    if self.has_text and self.text_width % self.text_heads:
      raise ValueError(f"text_width {self.text_width} is not divisible by text_heads {self.text_heads}")
    if self.image_size % self.patch_size:
      raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")

  # ---- derived sizes
  @property
  def num_positions(self) -> int:
    """Vision tokens: patches plus the class token."""
    return (self.image_size // self.patch_size) ** 2 + 1

  @property
  def vision_mlp_dim(self) -> int:
    return self.vision_mlp

  @property
  def text_mlp_dim(self) -> int:
    return self.text_mlp

  @property
  def text_act(self) -> str:
    return self.text_hidden_act or self.hidden_act

  @property
  def embed_dim(self) -> int:
    """Size of ``encode_image``'s output: ``projection_dim``, or ``vision_width`` without projection."""
    return self.projection_dim if self.projection_dim is not None else self.vision_width

  def vision_only(self) -> "ClipConfig":
    """The config of this model's vision tower alone (a ``CLIPVisionModel``: no text, no projection; text
    fields reset to their defaults, so equal towers have equal configs)."""
    keep = {f: getattr(self, f) for f in (*_VISION_FIELDS[:-3], "vision_mlp", "hidden_act", "layer_norm_eps",
                                          "precision")}
    return ClipConfig(**keep, has_text=False, projection_dim=None)

  def replace(self, **changes) -> "ClipConfig":
    return dataclasses.replace(self, **changes)

  # ---- presets
  @classmethod
  def tiny(cls, **overrides) -> "ClipConfig":
    """A tiny CLIP for tests and the offline suite (32x32 images, 8x8 patches, width 32, 2 layers)."""
    kw = dict(image_size=32, patch_size=8, vision_width=32, vision_layers=2, vision_heads=2, vocab_size=64,
              context_length=16, text_width=32, text_layers=2, text_heads=2, projection_dim=16)
    return cls(**{**kw, **overrides})

  @classmethod
  def vit_b32(cls, **overrides) -> "ClipConfig":
    """``openai/clip-vit-base-patch32``."""
    return cls(**overrides)

  @classmethod
  def vit_b16(cls, **overrides) -> "ClipConfig":
    """``openai/clip-vit-base-patch16``."""
    return cls(**{"patch_size": 16, **overrides})

  @classmethod
  def vit_l14(cls, **overrides) -> "ClipConfig":
    """``openai/clip-vit-large-patch14``."""
    kw = dict(patch_size=14, vision_width=1024, vision_layers=24, vision_heads=16, text_width=768, text_heads=12,
              projection_dim=768)
    return cls(**{**kw, **overrides})

  # ---- Hugging Face configs
  @classmethod
  def from_hf(cls, config: Any) -> "ClipConfig":
    """From a transformers ``CLIPConfig`` (full model) or ``CLIPVisionConfig`` (vision tower only).

    Raises:
      ValueError: different layer-norm epsilons in the two towers (not supported).
    """
    vision = getattr(config, "vision_config", config)
    text = getattr(config, "text_config", None)
    kw = dict(image_size=vision.image_size, patch_size=vision.patch_size, vision_width=vision.hidden_size,
              vision_layers=vision.num_hidden_layers, vision_heads=vision.num_attention_heads,
              vision_mlp=vision.intermediate_size, hidden_act=vision.hidden_act,
              layer_norm_eps=vision.layer_norm_eps, has_text=text is not None,
              projection_dim=config.projection_dim if text is not None else None)
    if text is not None:
      if text.layer_norm_eps != vision.layer_norm_eps:
        raise ValueError(f"different layer-norm epsilons in the towers ({vision.layer_norm_eps}, "
                         f"{text.layer_norm_eps}) are not supported")
      kw.update(vocab_size=text.vocab_size, context_length=text.max_position_embeddings,
                text_width=text.hidden_size, text_layers=text.num_hidden_layers,
                text_heads=text.num_attention_heads, text_mlp=text.intermediate_size,
                eos_token_id=text.eos_token_id, bos_token_id=text.bos_token_id, pad_token_id=text.pad_token_id,
                text_hidden_act=None if text.hidden_act == vision.hidden_act else text.hidden_act,
                logit_scale_init=getattr(config, "logit_scale_init_value", math.log(1 / 0.07)))
    return cls(**kw)

  def to_hf(self):
    """A transformers ``CLIPConfig`` (``CLIPVisionConfig`` when ``has_text`` is False)."""
    import transformers  # noqa: PLC0415 (heavy, optional)

    vision = dict(hidden_size=self.vision_width, intermediate_size=self.vision_mlp_dim,
                  num_hidden_layers=self.vision_layers, num_attention_heads=self.vision_heads,
                  image_size=self.image_size, patch_size=self.patch_size, hidden_act=self.hidden_act,
                  layer_norm_eps=self.layer_norm_eps)
    if not self.has_text:
      return transformers.CLIPVisionConfig(**vision)
    text = dict(hidden_size=self.text_width, intermediate_size=self.text_mlp_dim, num_hidden_layers=self.text_layers,
                num_attention_heads=self.text_heads, vocab_size=self.vocab_size,
                max_position_embeddings=self.context_length, hidden_act=self.text_act,
                layer_norm_eps=self.layer_norm_eps, eos_token_id=self.eos_token_id, bos_token_id=self.bos_token_id,
                pad_token_id=self.pad_token_id)
    return transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=self.projection_dim,
                                   logit_scale_init_value=self.logit_scale_init)


Cfg = ClipConfig


def check_compatible(reference: ClipConfig, config: ClipConfig, *, what: str = "model") -> None:
  """Checks that ``config``'s vision tower has the shapes of ``reference``'s (so their weights can be merged
  and evaluated with ``reference``'s projection and heads).

  Args:
    reference: the pretrained model's config.
    config: the config to check.
    what: the checked model's name, for the message.

  Raises:
    ValueError: naming every differing field, e.g. a fine-tuned tower whose width differs from the pretrained.
  """
  diffs = [f"{f}: {getattr(config, f)} (expected {getattr(reference, f)})" for f in _VISION_FIELDS
           if getattr(config, f) != getattr(reference, f)]
  if diffs:
    raise ValueError(f"{what}'s vision tower is not compatible with the pretrained model: " + "; ".join(diffs))


# ------------------------------------------------------------------------------------------------------------
# NNX modules. Attribute names are Hugging Face's, so nnx.to_pure_dict gives the names documented above.


def activation(name: str):
  """The MLP activation of a CLIP config.

  Args:
    name: ``"quick_gelu"``, ``"gelu"`` (exact) or another name (the tanh approximation).

  Returns:
    The elementwise function.
  """
  if name == "quick_gelu":
    return lambda x: x * jax.nn.sigmoid(1.702 * x)
  if name == "gelu":
    return lambda x: jax.nn.gelu(x, approximate=False)
  return lambda x: jax.nn.gelu(x, approximate=True)


def _normal(std: float):
  return jax.nn.initializers.normal(stddev=std)


def _linear(i: int, o: int, rngs: nnx.Rngs, *, bias: bool = True) -> nnx.Linear:
  return nnx.Linear(i, o, use_bias=bias, kernel_init=_normal(i**-0.5), rngs=rngs)


def _layer_norm(w: int, eps: float, rngs: nnx.Rngs) -> nnx.LayerNorm:
  # Two-pass variance (as PyTorch): CLIP's residual stream reaches magnitudes where E[x^2] - E[x]^2 loses digits.
  return nnx.LayerNorm(w, epsilon=eps, use_fast_variance=False, rngs=rngs)


class Attention(nnx.Module):
  """Multi-head self-attention with HF's ``q_proj``/``k_proj``/``v_proj``/``out_proj``."""

  def __init__(self, width: int, heads: int, *, rngs: nnx.Rngs):
    self.heads = heads
    self.q_proj = _linear(width, width, rngs)
    self.k_proj = _linear(width, width, rngs)
    self.v_proj = _linear(width, width, rngs)
    self.out_proj = _linear(width, width, rngs)

  def __call__(self, x: Float[Array, "B T W"], mask: Any = None) -> Float[Array, "B T W"]:
    b, t, w = x.shape
    split = lambda y: y.reshape(b, t, self.heads, w // self.heads)  # noqa: E731
    o = jax.nn.dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)),
                                     mask=mask, implementation="xla")
    return self.out_proj(o.reshape(b, t, w))


class MLP(nnx.Module):
  def __init__(self, width: int, hidden: int, act: str, *, rngs: nnx.Rngs):
    self.act = act
    self.fc1 = _linear(width, hidden, rngs)
    self.fc2 = _linear(hidden, width, rngs)

  def __call__(self, x):
    return self.fc2(activation(self.act)(self.fc1(x)))


class EncoderLayer(nnx.Module):
  """Pre-LN transformer block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

  def __init__(self, width: int, heads: int, hidden: int, act: str, eps: float, *, rngs: nnx.Rngs):
    self.self_attn = Attention(width, heads, rngs=rngs)
    self.layer_norm1 = _layer_norm(width, eps, rngs)
    self.mlp = MLP(width, hidden, act, rngs=rngs)
    self.layer_norm2 = _layer_norm(width, eps, rngs)

  def __call__(self, x, mask=None):
    x = x + self.self_attn(self.layer_norm1(x), mask)
    return x + self.mlp(self.layer_norm2(x))


class Encoder(nnx.Module):
  def __init__(self, layers: int, width: int, heads: int, hidden: int, act: str, eps: float, *, rngs: nnx.Rngs):
    self.layers = nnx.Dict({str(i): EncoderLayer(width, heads, hidden, act, eps, rngs=rngs) for i in range(layers)})

  def __call__(self, x, mask=None):
    for i in range(len(self.layers)):
      x = self.layers[str(i)](x, mask)
    return x


class PatchEmbedding(nnx.Module):
  """Non-overlapping ``p x p`` patches times a ``(p, p, 3, width)`` kernel (the HF conv, as one matmul)."""

  def __init__(self, patch: int, width: int, *, rngs: nnx.Rngs):
    self.patch = patch
    self.kernel = nnx.Param(_normal((3 * patch * patch) ** -0.5)(rngs.params(), (patch, patch, 3, width)))

  def __call__(self, images: Float[Array, "B H W 3"]) -> Float[Array, "B N W"]:
    b, h, w, c = images.shape
    p = self.patch
    x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, -1, p * p * c)
    return x @ self.kernel[...].reshape(p * p * c, -1)


class VisionEmbeddings(nnx.Module):
  def __init__(self, config: ClipConfig, *, rngs: nnx.Rngs):
    w = config.vision_width
    self.patch_embedding = PatchEmbedding(config.patch_size, w, rngs=rngs)
    self.class_embedding = nnx.Param(_normal(0.02)(rngs.params(), (w,)))
    self.position_embedding = nnx.Embed(config.num_positions, w, embedding_init=_normal(0.02), rngs=rngs)

  def __call__(self, images):
    x = self.patch_embedding(images)
    cls = jnp.broadcast_to(self.class_embedding[...].astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
    return jnp.concatenate([cls, x], axis=1) + self.position_embedding.embedding[...][None]


class VisionTransformer(nnx.Module):
  """HF ``CLIPVisionTransformer``: returns the pooled output (post-LN class token) ``[B, width]``."""

  def __init__(self, config: ClipConfig, *, rngs: nnx.Rngs):
    w, eps = config.vision_width, config.layer_norm_eps
    self.embeddings = VisionEmbeddings(config, rngs=rngs)
    self.pre_layrnorm = _layer_norm(w, eps, rngs)
    self.encoder = Encoder(config.vision_layers, w, config.vision_heads, config.vision_mlp_dim, config.hidden_act,
                           eps, rngs=rngs)
    self.post_layernorm = _layer_norm(w, eps, rngs)

  def __call__(self, images: Float[Array, "B H W 3"]) -> Float[Array, "B W"]:
    x = self.encoder(self.pre_layrnorm(self.embeddings(images)))
    return self.post_layernorm(x[:, 0])


class TextEmbeddings(nnx.Module):
  def __init__(self, config: ClipConfig, *, rngs: nnx.Rngs):
    w = config.text_width
    self.token_embedding = nnx.Embed(config.vocab_size, w, embedding_init=_normal(0.02), rngs=rngs)
    self.position_embedding = nnx.Embed(config.context_length, w, embedding_init=_normal(0.01), rngs=rngs)

  def __call__(self, input_ids):
    n = input_ids.shape[1]
    return self.token_embedding(input_ids) + self.position_embedding.embedding[...][None, :n]


class TextTransformer(nnx.Module):
  """HF ``CLIPTextTransformer``: causal (plus padding) attention, final LN, pooled at the end-of-text token."""

  def __init__(self, config: ClipConfig, *, rngs: nnx.Rngs):
    w = config.text_width
    self.eos_token_id = config.eos_token_id
    self.embeddings = TextEmbeddings(config, rngs=rngs)
    self.encoder = Encoder(config.text_layers, w, config.text_heads, config.text_mlp_dim, config.text_act,
                           config.layer_norm_eps, rngs=rngs)
    self.final_layer_norm = _layer_norm(w, config.layer_norm_eps, rngs)

  def __call__(self, input_ids: Int[Array, "B T"], attention_mask: Int[Array, "B T"] | None = None):
    b, n = input_ids.shape
    mask = jnp.tril(jnp.ones((n, n), bool))[None, None]
    if attention_mask is not None:
      mask = mask & (attention_mask[:, None, None, :] > 0)
    x = self.final_layer_norm(self.encoder(self.embeddings(input_ids), mask))
    if self.eos_token_id == 2:  # legacy OpenAI configs: the end-of-text token has the largest id
      pos = jnp.argmax(input_ids, axis=-1)
    else:  # the first end-of-text token (padding may reuse its id)
      pos = jnp.argmax((input_ids == self.eos_token_id).astype(jnp.int32), axis=-1)
    return x[jnp.arange(b), pos]


class CLIP(nnx.Module):
  """The whole model (HF ``CLIPModel``; vision tower alone when ``config.has_text`` is False).

  ``nnx.to_pure_dict(nnx.state(CLIP(config, rngs=nnx.Rngs(0)), nnx.Param))`` is a ``params`` dict for the
  functional API (with different random values than :func:`init_params`, which is faster).
  """

  def __init__(self, config: ClipConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.vision_model = VisionTransformer(config, rngs=rngs)
    if config.projection_dim is not None:
      self.visual_projection = _linear(config.vision_width, config.projection_dim, rngs, bias=False)
    if config.has_text:
      self.text_model = TextTransformer(config, rngs=rngs)
      self.text_projection = _linear(config.text_width, config.projection_dim or config.text_width, rngs, bias=False)
      self.logit_scale = nnx.Param(jnp.asarray(config.logit_scale_init, jnp.float32))

  def params(self) -> dict:
    """The parameters as the plain nested dict of the functional API."""
    return nnx.to_pure_dict(nnx.state(self, nnx.Param))

  def encode_image(self, images):
    """:func:`encode_image` with this module's parameters (jitted)."""
    return encode_image(self.config, self.params(), images)

  def encode_text(self, input_ids, attention_mask=None):
    """:func:`encode_text` with this module's parameters (jitted)."""
    return encode_text(self.config, self.params(), input_ids, attention_mask)


# ------------------------------------------------------------------------------------------------------------
# The functional API.


def _dense(i, o, bias=True):
  d = {"kernel": ("normal", (i, o), i**-0.5)}
  if bias:
    d["bias"] = ("zeros", (o,))
  return d


def _ln(w):
  return {"scale": ("ones", (w,)), "bias": ("zeros", (w,))}


def _encoder(layers, width, mlp):
  names = ("q_proj", "k_proj", "v_proj", "out_proj")
  return {"layers": {str(i): {"self_attn": {n: _dense(width, width) for n in names}, "layer_norm1": _ln(width),
                              "mlp": {"fc1": _dense(width, mlp), "fc2": _dense(mlp, width)}, "layer_norm2": _ln(width)}
                     for i in range(layers)}}


def param_specs(config: ClipConfig) -> dict:
  """The parameter tree with ``(kind, shape, ...)`` leaves: ``("normal", shape, std)``, ``("zeros", shape)``,
  ``("ones", shape)`` or ``("const", (), value)``. Its structure is the ``params`` structure of ``config``.

  Args:
    config: the model's config.

  Returns:
    The tree of specs.
  """
  cfg = config
  w, p = cfg.vision_width, cfg.patch_size
  spec: dict = {"vision_model": {
      "embeddings": {"patch_embedding": {"kernel": ("normal", (p, p, 3, w), (3 * p * p) ** -0.5)},
                     "class_embedding": ("normal", (w,), 0.02),
                     "position_embedding": {"embedding": ("normal", (cfg.num_positions, w), 0.02)}},
      "pre_layrnorm": _ln(w),
      "encoder": _encoder(cfg.vision_layers, w, cfg.vision_mlp_dim),
      "post_layernorm": _ln(w)}}
  if cfg.projection_dim is not None:
    spec["visual_projection"] = _dense(w, cfg.projection_dim, bias=False)
  if cfg.has_text:
    t = cfg.text_width
    spec["text_model"] = {
        "embeddings": {"token_embedding": {"embedding": ("normal", (cfg.vocab_size, t), 0.02)},
                       "position_embedding": {"embedding": ("normal", (cfg.context_length, t), 0.01)}},
        "encoder": _encoder(cfg.text_layers, t, cfg.text_mlp_dim),
        "final_layer_norm": _ln(t)}
    spec["text_projection"] = _dense(t, cfg.projection_dim or t, bias=False)
    spec["logit_scale"] = ("const", (), cfg.logit_scale_init)
  return spec


def _is_spec(x: Any) -> bool:
  return isinstance(x, tuple) and len(x) >= 2 and isinstance(x[0], str)


def _init_params(config: ClipConfig, key: jax.Array) -> dict:
  """Random float32 parameters for ``config`` as a nested dict (the layout documented in the module).

  Dense kernels ``N(0, 1/fan_in)``, the patch kernel ``N(0, 1/(3 p^2))``, embeddings ``N(0, 0.02^2)`` (text
  positions ``0.01``), zero biases, layer norms at identity, ``logit_scale = config.logit_scale_init``.
  Deterministic in ``key``: one normal draw sliced into the leaves (fast to compile).

  Args:
    config: the model's config.
    key: PRNG key.

  Returns:
    The nested parameter dict.
  """
  spec = param_specs(config)
  leaves, treedef = jax.tree.flatten(spec, is_leaf=_is_spec)
  sizes = [int(np.prod(s[1])) if s[0] == "normal" else 0 for s in leaves]
  z = jax.random.normal(key, (sum(sizes),), jnp.float32)
  out, offset = [], 0
  for s, n in zip(leaves, sizes):
    kind, shape = s[0], s[1]
    if kind == "normal":
      out.append(z[offset:offset + n].reshape(shape) * s[2])
    elif kind == "const":
      out.append(jnp.asarray(s[2], jnp.float32))
    else:
      out.append((jnp.ones if kind == "ones" else jnp.zeros)(shape, jnp.float32))
    offset += n
  return jax.tree.unflatten(treedef, out)


init_params = jax.jit(_init_params, static_argnums=0)


def init(config: ClipConfig, key: jax.Array) -> dict:
  """Random parameters drawn as jaxmerge 0.1's ``clip.init`` did (one eager draw per leaf, same key splits).

  Kept bit-identical so that caches and results built with it (the offline suite) reproduce. Same
  distributions as :func:`init_params`, different values; prefer :func:`init_params` (much faster to run).

  Args:
    config: the model's config.
    key: PRNG key.

  Returns:
    The nested parameter dict.
  """
  cfg = config
  k = jax.random.split(key, 10)
  normal = lambda kk, shape, std: jax.random.normal(kk, shape) * std  # noqa: E731

  def dense(kd, a, b):
    return {"kernel": normal(kd, (a, b), a**-0.5), "bias": jnp.zeros((b,), jnp.float32)}

  def encoder(kk, layers, width, mlp):
    out = {}
    for i, kl in enumerate(jax.random.split(kk, layers)):
      ks = jax.random.split(kl, 6)
      out[str(i)] = {"self_attn": {n: dense(kd, width, width) for n, kd in zip(("q_proj", "k_proj", "v_proj", "out_proj"), ks[:4])},
                     "layer_norm1": _ln_value(width), "mlp": {"fc1": dense(ks[4], width, mlp), "fc2": dense(ks[5], mlp, width)},
                     "layer_norm2": _ln_value(width)}
    return {"layers": out}

  w, p = cfg.vision_width, cfg.patch_size
  params: dict = {"vision_model": {
      "embeddings": {"patch_embedding": {"kernel": normal(k[0], (p, p, 3, w), (3 * p * p) ** -0.5)},
                     "class_embedding": normal(k[1], (w,), 0.02),
                     "position_embedding": {"embedding": normal(k[2], (cfg.num_positions, w), 0.02)}},
      "pre_layrnorm": _ln_value(w), "encoder": encoder(k[3], cfg.vision_layers, w, cfg.vision_mlp_dim),
      "post_layernorm": _ln_value(w)}}
  if cfg.projection_dim is not None:
    params["visual_projection"] = {"kernel": normal(k[4], (w, cfg.projection_dim), w**-0.5)}
  if cfg.has_text:
    t = cfg.text_width
    params["text_model"] = {
        "embeddings": {"token_embedding": {"embedding": normal(k[5], (cfg.vocab_size, t), 0.02)},
                       "position_embedding": {"embedding": normal(k[6], (cfg.context_length, t), 0.01)}},
        "encoder": encoder(k[7], cfg.text_layers, t, cfg.text_mlp_dim), "final_layer_norm": _ln_value(t)}
    params["text_projection"] = {"kernel": normal(k[8], (t, cfg.projection_dim or t), t**-0.5)}
    params["logit_scale"] = jnp.asarray(cfg.logit_scale_init, jnp.float32)
  return params


def _ln_value(w):
  return {"scale": jnp.ones((w,), jnp.float32), "bias": jnp.zeros((w,), jnp.float32)}


@functools.lru_cache(maxsize=64)
def _skeleton(kind: str, config: ClipConfig):
  """(graphdef, {path: shape}) of one tower, built abstractly once per config."""
  cls = {"vision": VisionTransformer, "text": TextTransformer}[kind]
  graphdef, state = nnx.split(nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0))))
  shapes = {p: tuple(v.shape) for p, v in _flat(_canonical(nnx.to_pure_dict(state))).items()}
  return graphdef, shapes


def _canonical(tree: Any) -> Any:
  """Nested dict with string keys (integer layer keys, as from an ``nnx.List``, become strings)."""
  if isinstance(tree, dict) or (hasattr(tree, "keys") and hasattr(tree, "__getitem__") and not hasattr(tree, "shape")):
    return {str(k): _canonical(tree[k]) for k in tree.keys()}
  return tree


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    p = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flat(v, p + "/"))
    else:
      out[p] = v
  return out


def _bind(kind: str, config: ClipConfig, params: Any, name: str) -> nnx.Module:
  """The tower module ``kind`` with ``params`` (validated: missing, extra or misshapen leaves raise)."""
  graphdef, shapes = _skeleton(kind, config)
  if not isinstance(params, dict) and not hasattr(params, "keys"):
    raise ValueError(f"params[{name!r}] must be a nested dict of arrays, got {type(params).__name__}")
  flat = _flat(_canonical(params))
  missing = sorted(set(shapes) - set(flat))
  extra = sorted(set(flat) - set(shapes))
  wrong = [f"{p}: {tuple(np.shape(flat[p]))} (expected {s})" for p, s in shapes.items()
           if p in flat and tuple(np.shape(flat[p])) != s]
  if missing or extra or wrong:
    raise ValueError(f"params[{name!r}] do not match the config: missing {missing[:10]}, unexpected {extra[:10]}, "
                     f"misshapen {wrong[:10]}")
  tree: dict = {}
  for p, x in flat.items():
    node = tree
    *parents, leaf = p.split("/")
    for q in parents:
      node = node.setdefault(q, {})
    node[leaf] = jnp.asarray(x).astype(jnp.float32)
  return nnx.merge(graphdef, tree)


def _kernel(params: Any, name: str, shape: tuple[int, int]) -> jax.Array:
  try:
    k = params[name]["kernel"]
  except (KeyError, TypeError):
    raise ValueError(f"params has no {name}/kernel (the config has projection_dim={shape[1]}; "
                     "use config.vision_only() for a tower without projection)") from None
  if tuple(np.shape(k)) != shape:
    raise ValueError(f"params[{name!r}]['kernel'] has shape {tuple(np.shape(k))}, expected {shape}")
  return jnp.asarray(k).astype(jnp.float32)


def _vision_features(config: ClipConfig, params: dict, images: Float[Array, "B H W 3"]) -> Float[Array, "B W"]:
  """The pooled, post-layer-norm class token of the vision tower ``[B, vision_width]`` (HF ``pooler_output``).

  Args:
    config: the model's :class:`ClipConfig`.
    params: a dict with ``"vision_model"`` (other entries are ignored).
    images: float ``[B, H, W, 3]``, already preprocessed (CLIP mean/std), ``H = W = config.image_size``.

  Returns:
    ``[B, vision_width]`` pooled features.

  Raises:
    ValueError: images of the wrong shape, or vision parameters that do not match ``config``.
  """
  if images.ndim != 4 or tuple(images.shape[1:]) != (config.image_size, config.image_size, 3):
    raise ValueError(f"images must be [B, {config.image_size}, {config.image_size}, 3], got {tuple(images.shape)}")
  if "vision_model" not in params:
    raise ValueError("params has no 'vision_model'")
  model = _bind("vision", config, params["vision_model"], "vision_model")
  with jax.default_matmul_precision(config.precision):
    return model(jnp.asarray(images).astype(jnp.float32))


def _encode_image(config: ClipConfig, params: dict, images: Float[Array, "B H W 3"]) -> Float[Array, "B D"]:
  """Projected, unnormalized image embeddings ``[B, D]`` (transformers' ``get_image_features``).

  For a vision tower without projection (``config.projection_dim is None``, a ``CLIPVisionModel``) this is
  the pooled output ``[B, vision_width]``.

  Args:
    config: the model's :class:`ClipConfig`.
    params: ``{"vision_model": ..., "visual_projection": ...}`` (the text tower may be absent).
    images: float32 ``[B, H, W, 3]`` preprocessed as CLIP expects (:mod:`jaxmerge.data.preprocess`).

  Returns:
    float32 ``[B, D]`` image embeddings.
  """
  pooled = _vision_features(config, params, images)
  if config.projection_dim is None:
    return pooled
  k = _kernel(params, "visual_projection", (config.vision_width, config.projection_dim))
  with jax.default_matmul_precision(config.precision):
    return pooled @ k


def _encode_text(config: ClipConfig, params: dict, input_ids: Int[Array, "B T"],
                attention_mask: Int[Array, "B T"] | None = None) -> Float[Array, "B D"]:
  """Projected, unnormalized text embeddings ``[B, D]`` (transformers' ``get_text_features``).

  Causal self-attention (plus the padding mask), final layer norm, pooling at the end-of-text token (see
  :class:`ClipConfig`'s ``eos_token_id``), then ``text_projection``.

  Args:
    input_ids: int ``[B, T]`` with ``T <= config.context_length`` (pad after the end-of-text token).
    attention_mask: ``[B, T]``, 1 for real tokens (``None``: all real).

  Returns:
    float32 ``[B, D]`` text embeddings.

  Raises:
    ValueError: a config or params without a text tower, or sequences longer than ``context_length``.
  """
  if not config.has_text or "text_model" not in params:
    raise ValueError("encode_text needs a model with a text tower (config.has_text and params['text_model'])")
  if input_ids.ndim != 2 or input_ids.shape[1] > config.context_length:
    raise ValueError(f"input_ids must be [B, T] with T <= {config.context_length}, got {tuple(input_ids.shape)}")
  model = _bind("text", config, params["text_model"], "text_model")
  k = _kernel(params, "text_projection", (config.text_width, config.projection_dim or config.text_width))
  ids = jnp.asarray(input_ids).astype(jnp.int32)
  mask = None if attention_mask is None else jnp.asarray(attention_mask)
  with jax.default_matmul_precision(config.precision):
    return model(ids, mask) @ k


# Always jitted (static config): eager calls compile once per shape instead of dispatching op by op, and calls
# inside an outer jit/grad are inlined. Shape and parameter errors are raised while tracing.
vision_features = jax.jit(_vision_features, static_argnums=0)
encode_image = jax.jit(_encode_image, static_argnums=0)
encode_text = jax.jit(_encode_text, static_argnums=0)


def logits(image_embeds: Float[Array, "B D"], text_embeds: Float[Array, "C D"],
           logit_scale: Float[Array, ""]) -> Float[Array, "B C"]:
  """``exp(logit_scale) * normalize(image) @ normalize(text).T`` (CLIP's ``logits_per_image``).

  Args:
    image_embeds: ``[B, D]`` image embeddings.
    text_embeds: ``[C, D]`` text embeddings.
    logit_scale: the log of the scale.

  Returns:
    ``[B, C]`` logits.
  """
  i = image_embeds / jnp.linalg.norm(image_embeds, axis=-1, keepdims=True)
  t = text_embeds / jnp.linalg.norm(text_embeds, axis=-1, keepdims=True)
  return jnp.exp(logit_scale) * jnp.dot(i, t.T, precision=jax.lax.Precision.HIGHEST)
