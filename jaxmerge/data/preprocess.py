"""CLIP image preprocessing, equal to transformers' ``CLIPImageProcessor`` (NumPy and PIL, no torch).

The processor's steps, split where the host/device boundary is cheapest:

1. **On the host, per image** (:func:`resize_and_crop`, uint8 in, uint8 out): convert to RGB (grayscale
   replicated; transparency composited onto white, as transformers 5 does), resize the shortest side to
   ``size`` with PIL's bicubic filter (the long side becomes ``int(size * long / short)``), centre-crop
   ``crop_size`` (zero padding if the image is smaller, as transformers does).
2. **On the device, per batch** (:func:`normalize`, uint8 ``[..., 3]`` -> float32): rescale by ``1/255`` and
   normalize with CLIP's mean and std. Works on NumPy arrays (bit-equal to the processor) and JAX arrays
   (inside jit; float32 rounding may differ in the last bit).

Batches therefore travel as ``uint8[B, S, S, 3]`` (4x smaller than float32), and :func:`preprocess` composes both
steps for one-off use.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import pathlib
from typing import Any

import numpy as np

__all__ = ["OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "Preprocess", "decode_image", "normalize", "preprocess",
           "resize_and_crop", "to_rgb"]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class Preprocess:
  """CLIP preprocessing settings (defaults: OpenAI CLIP at 224 pixels).

  Attributes:
    size: target of the shortest side after resizing.
    crop_size: side of the centre crop (``None``: ``size``).
    mean, std: per-channel normalization (after rescaling to [0, 1]).
  """

  size: int = 224
  crop_size: int | None = None
  mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
  std: tuple[float, float, float] = OPENAI_CLIP_STD

  @property
  def crop(self) -> int:
    return self.crop_size or self.size

  @classmethod
  def from_pretrained(cls, path: str | os.PathLike, default_size: int | None = None) -> "Preprocess":
    """From a model directory's ``preprocessor_config.json`` (defaults when it has none)."""
    f = pathlib.Path(path) / "preprocessor_config.json"
    if not f.exists():
      return cls(size=default_size or 224)
    raw = json.loads(f.read_text())
    size = raw.get("size", 224)
    size = size.get("shortest_edge", size.get("height", 224)) if isinstance(size, dict) else int(size)
    crop = raw.get("crop_size", size)
    crop = crop.get("height", size) if isinstance(crop, dict) else int(crop)
    return cls(size=int(size), crop_size=int(crop), mean=tuple(raw.get("image_mean", OPENAI_CLIP_MEAN)),
               std=tuple(raw.get("image_std", OPENAI_CLIP_STD)))

  def __call__(self, images: Any) -> np.ndarray:
    return preprocess(images, self)


def decode_image(data: bytes | str | os.PathLike, name: str | None = None):
  """Opens and fully decodes an image (bytes or a file path) with PIL.

  Args:
    data: the encoded image bytes, or a file path.
    name: how errors name the image (default: the path, or ``"<bytes>"``).

  Returns:
    The decoded ``PIL.Image.Image`` (in its own mode; see :func:`to_rgb`).

  Raises:
    ValueError: the data is not a decodable image (naming ``name`` or the path).
  """
  from PIL import Image  # noqa: PLC0415

  label = name or (str(data) if not isinstance(data, (bytes, bytearray)) else "<bytes>")
  try:
    img = Image.open(io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data)
    img.load()
  except Exception as e:  # noqa: BLE001 (PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...)
    raise ValueError(f"cannot decode image {label}: {type(e).__name__}: {e}") from e
  return img


def to_rgb(image: Any, name: str | None = None) -> np.ndarray:
  """An RGB ``uint8[H, W, 3]`` array from a PIL image or a uint8 array (``[H, W]``, ``[H, W, 1|3|4]``).

  Grayscale is replicated; an alpha channel (or a palette transparency) is composited onto white, as
  transformers' ``convert_to_rgb``.

  Args:
    image: a PIL image (any mode), or a uint8 array ``[H, W]``, ``[H, W, 1]``, ``[H, W, 3]`` or ``[H, W, 4]``.
    name: how errors name the image.

  Returns:
    A uint8 ``[H, W, 3]`` array (the input itself when it already is one).

  Raises:
    ValueError: an array that is not uint8 or has another shape (naming ``name``).
  """
  from PIL import Image  # noqa: PLC0415

  if isinstance(image, Image.Image):
    if "A" in image.getbands() or image.info.get("transparency") is not None:
      rgba = image.convert("RGBA")
      white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
      return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    return np.asarray(image.convert("RGB"))
  x = np.asarray(image)
  label = f" {name}" if name else ""
  if x.dtype != np.uint8:
    raise ValueError(f"image{label} must be uint8, got {x.dtype}")
  if x.ndim == 2:
    x = x[..., None]
  if x.ndim != 3 or x.shape[-1] not in (1, 3, 4):
    raise ValueError(f"image{label} must be [H, W] or [H, W, 1|3|4], got shape {x.shape}")
  if x.shape[-1] == 1:
    return np.repeat(x, 3, axis=-1)
  if x.shape[-1] == 4:
    alpha = x[..., 3:4] / 255
    return np.round(alpha * x[..., :3] + (1 - alpha) * 255).astype(np.uint8)
  return x


def _resized_shape(h: int, w: int, size: int) -> tuple[int, int]:
  short, long = (w, h) if w <= h else (h, w)
  new_long = int(size * long / short)
  return (new_long, size) if w <= h else (size, new_long)


def resize_and_crop(image: Any, config: Preprocess = Preprocess(), name: str | None = None) -> np.ndarray:
  """One image -> ``uint8[crop, crop, 3]``: RGB, shortest side to ``config.size`` (PIL bicubic), centre crop.

  Args:
    image: a PIL image or a uint8 array (see :func:`to_rgb`).
    config: sizes.
    name: how errors name the image.

  Returns:
    A contiguous uint8 ``[crop, crop, 3]`` array (``crop = config.crop``); an image smaller than the crop is
    centred on black.
  """
  from PIL import Image  # noqa: PLC0415

  x = to_rgb(image, name)
  h, w = x.shape[:2]
  nh, nw = _resized_shape(h, w, config.size)
  x = np.asarray(Image.fromarray(x).resize((nw, nh), resample=Image.Resampling.BICUBIC))
  c = config.crop
  top, left = (nh - c) // 2, (nw - c) // 2
  if top >= 0 and left >= 0:
    return np.ascontiguousarray(x[top:top + c, left:left + c])
  ph, pw = max(c, nh), max(c, nw)  # smaller than the crop: centre on a zero canvas, then crop
  canvas = np.zeros((ph, pw, 3), np.uint8)
  t0, l0 = math.ceil((ph - nh) / 2), math.ceil((pw - nw) / 2)
  canvas[t0:t0 + nh, l0:l0 + nw] = x
  top, left = top + t0, left + l0
  return np.ascontiguousarray(canvas[max(0, top):top + c, max(0, left):left + c])


def normalize(images: Any, config: Preprocess = Preprocess()) -> Any:
  """uint8 ``[..., 3]`` -> float32 ``(x / 255 - mean) / std`` (NumPy in, NumPy out; JAX in, JAX out).

  NumPy inputs follow the processor's arithmetic exactly (rescale in float64, cast, normalize in float32).

  Args:
    images: uint8 images ``[..., 3]`` (channels last), a NumPy or JAX array.
    config: the normalization's ``mean`` and ``std``.

  Returns:
    float32 images of the same shape, of the input's array type.
  """
  if isinstance(images, np.ndarray):
    x = (images.astype(np.float64) * (1 / 255)).astype(np.float32)
    return (x - np.asarray(config.mean, np.float32)) / np.asarray(config.std, np.float32)
  import jax.numpy as jnp  # noqa: PLC0415

  x = jnp.asarray(images).astype(jnp.float32) / 255.0
  shape = (1,) * (x.ndim - 1) + (3,)
  mean = jnp.asarray(config.mean, jnp.float32).reshape(shape)
  std = jnp.asarray(config.std, jnp.float32).reshape(shape)
  return (x - mean) / std


def preprocess(images: Any, config: Preprocess = Preprocess()) -> np.ndarray:
  """Images (a list of PIL images / uint8 arrays, or one uint8 ``[B, H, W, C]`` batch) -> float32
  ``[B, crop, crop, 3]``: ``CLIPImageProcessor(...)(images).pixel_values`` in channels-last order.

  Args:
    images: a sequence of PIL images or uint8 arrays (any sizes; see :func:`to_rgb`), or one uint8
      ``[B, H, W, C]`` array.
    config: sizes and normalization.

  Returns:
    float32 ``[B, crop, crop, 3]`` (``crop = config.crop``), resized, centre-cropped and normalized.
  """
  if isinstance(images, np.ndarray) and images.ndim == 4:
    images = list(images)
  return normalize(np.stack([resize_and_crop(im, config, name=f"#{i}") for i, im in enumerate(images)]), config)
