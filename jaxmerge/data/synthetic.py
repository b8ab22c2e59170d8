"""Deterministic, offline image generators for jaxmerge's 8-task benchmark suite.

The real merging benchmarks (CLIP ViT-B/32 on Cars, DTD, EuroSAT, GTSRB, MNIST, RESISC45, SUN397, SVHN) need
gigabytes of downloads and a GPU. This module builds a small stand-in that runs on a laptop CPU without
network access: eight classification tasks on 32x32 RGB images, each with its own input statistics, label
space, class names and prompt templates, plus a captioned pretraining mixture (for a tiny CLIP) and several
unlabeled auxiliary sources (for methods such as Resolving Interference that adapt experts on data that is not
the tasks' data).

One task uses real images: scikit-learn's handwritten digits (``sklearn.datasets.load_digits``, shipped with
scikit-learn), upsampled from 8x8. The other seven are procedural. Each mirrors, loosely, one member of the
real suite: textures (DTD), shapes, colours, digits on clutter (SVHN), counting, orientation and composed
scenes (SUN397).

Everything is NumPy, vectorized over the batch, and a pure function of ``(seed, task, split, size)``: the same
arguments always give the same bytes. Images are ``uint8 [N, 32, 32, 3]`` and labels ``int32 [N]``.

Pretraining images come from the same families as the tasks but from a shifted *domain* (other backgrounds,
sizes, contrast and noise; clean printed digits instead of handwritten or cluttered ones), with captions built
from the images' attributes. A model pretrained on them knows the concepts but not the tasks' exact image
statistics, which is the situation of CLIP in front of the real suite.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from collections.abc import Callable, Sequence

import numpy as np

__all__ = [
  "AUX_SOURCES",
  "IMAGE_SIZE",
  "TASKS",
  "Split",
  "TaskData",
  "TaskSpec",
  "make_aux",
  "make_pretraining",
  "Pretraining",
  "make_task",
  "SHIFTS",
  "shift_images",
  "task_spec",
]

IMAGE_SIZE = 32

# --------------------------------------------------------------------------------------------------------------
# Small vectorized drawing kit. Coordinates are in [0, 1] (x to the right, y downwards), arrays broadcast as
# (N, 1, 1) parameters against (H, W) grids.
# --------------------------------------------------------------------------------------------------------------


def _grid(size: int = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
  c = (np.arange(size, dtype=np.float32) + 0.5) / size
  return np.broadcast_to(c[None, :], (size, size))[None], np.broadcast_to(c[:, None], (size, size))[None]


def _col(x: np.ndarray) -> np.ndarray:
  """(N,) -> (N, 1, 1) for broadcasting against images."""
  return np.asarray(x, np.float32).reshape(-1, 1, 1)


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Vectorized HSV -> RGB; h in degrees, s and v in [0, 1]. Returns (..., 3) float32."""
  h = np.mod(np.asarray(h, np.float32), 360.0) / 60.0
  s = np.asarray(s, np.float32)
  v = np.asarray(v, np.float32)
  c = v * s
  x = c * (1 - np.abs(np.mod(h, 2.0) - 1))
  m = v - c
  z = np.zeros_like(c)
  i = np.floor(h).astype(np.int32) % 6
  r = np.choose(i, [c, x, z, z, x, c])
  g = np.choose(i, [x, c, c, x, z, z])
  b = np.choose(i, [z, z, x, c, c, x])
  return np.stack([r + m, g + m, b + m], -1).astype(np.float32)


def _random_colors(rng: np.random.Generator, n: int, *, s=(0.5, 1.0), v=(0.5, 1.0)) -> np.ndarray:
  return _hsv_to_rgb(rng.uniform(0, 360, n), rng.uniform(*s, n), rng.uniform(*v, n))


def _paint(img: np.ndarray, mask: np.ndarray, color: np.ndarray) -> np.ndarray:
  """Alpha-composite ``color`` [N, 3] (or [N, H, W, 3]) over ``img`` [N, H, W, 3] where ``mask`` [N, H, W]."""
  m = mask.astype(np.float32)[..., None]
  c = color if color.ndim == 4 else color[:, None, None, :]
  return img * (1 - m) + c * m


def _rotate(x, y, cx, cy, theta):
  dx, dy = x - cx, y - cy
  c, s = np.cos(theta), np.sin(theta)
  return c * dx + s * dy, -s * dx + c * dy


def _interp_matrix(n_in: int, size: int, *, corners: bool) -> np.ndarray:
  """[size, n_in] linear-interpolation weights; ``corners``: the grid spans the image (value-noise lattice)."""
  if corners:
    t = (np.arange(size, dtype=np.float32) + 0.5) / size * (n_in - 1)
  else:
    t = np.clip((np.arange(size, dtype=np.float32) + 0.5) * n_in / size - 0.5, 0, n_in - 1)
  i0 = np.floor(t).astype(np.int32)
  i1 = np.minimum(i0 + 1, n_in - 1)
  w = np.zeros((size, n_in), np.float32)
  np.add.at(w, (np.arange(size), i0), 1 - (t - i0))
  np.add.at(w, (np.arange(size), i1), t - i0)
  return w


def _smooth_noise(rng: np.random.Generator, n: int, cells: int, size: int = IMAGE_SIZE, channels: int = 1):
  """Value noise: a random ``cells x cells`` grid bilinearly upsampled to ``size``. Returns [n, size, size, ch]."""
  g = rng.standard_normal((n, channels, cells + 1, cells + 1), dtype=np.float32)
  w = _interp_matrix(cells + 1, size, corners=True)
  return np.moveaxis(w @ g @ w.T, 1, -1)


def _fbm(rng: np.random.Generator, n: int, octaves=(2, 4, 8, 16), decay: float = 0.6, channels: int = 1):
  out = np.zeros((n, IMAGE_SIZE, IMAGE_SIZE, channels), np.float32)
  amp = 1.0
  for cells in octaves:
    out += amp * _smooth_noise(rng, n, cells, channels=channels)
    amp *= decay
  return out / np.std(out, axis=(1, 2, 3), keepdims=True).clip(1e-6)


def _resize_bilinear(x: np.ndarray, size: int) -> np.ndarray:
  """Bilinear resize of [N, h, w, C] to [N, size, size, C] (align-corners=False)."""
  wy = _interp_matrix(x.shape[1], size, corners=False)
  wx = _interp_matrix(x.shape[2], size, corners=False)
  out = wy @ np.moveaxis(x.astype(np.float32), -1, 1) @ wx.T
  return np.moveaxis(out, 1, -1)


def _crop_resize(rng: np.random.Generator, x: np.ndarray, scale=(0.3, 0.8)) -> np.ndarray:
  """Random square crops (area fraction in ``scale``) of [N, S, S, C] images, resized back to S (bilinear)."""
  n, s = x.shape[0], x.shape[1]
  side = np.sqrt(rng.uniform(*scale, n)) * s
  y0 = rng.uniform(0, 1, n) * (s - side)
  x0 = rng.uniform(0, 1, n) * (s - side)
  t = (np.arange(s, dtype=np.float32) + 0.5) / s
  ys = np.clip(y0[:, None] + t[None] * side[:, None] - 0.5, 0, s - 1)
  xs = np.clip(x0[:, None] + t[None] * side[:, None] - 0.5, 0, s - 1)
  yi, xi = np.floor(ys).astype(np.int32), np.floor(xs).astype(np.int32)
  yj, xj = np.minimum(yi + 1, s - 1), np.minimum(xi + 1, s - 1)
  fy, fx = (ys - yi)[:, :, None, None], (xs - xi)[:, None, :, None]
  b = np.arange(n)[:, None, None]
  get = lambda a, c: x[b, a[:, :, None], c[:, None, :]].astype(np.float32)
  top = get(yi, xi) * (1 - fx) + get(yi, xj) * fx
  bot = get(yj, xi) * (1 - fx) + get(yj, xj) * fx
  return top * (1 - fy) + bot * fy


def _to_uint8(x: np.ndarray) -> np.ndarray:
  return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)


def _noise(rng: np.random.Generator, img: np.ndarray, sigma) -> np.ndarray:
  sigma = _col(np.broadcast_to(sigma, img.shape[:1]))[..., None]
  return img + sigma * rng.standard_normal(img.shape, dtype=np.float32)


# --------------------------------------------------------------------------------------------------------------
# Shapes (shared by the shapes, colours and scene tasks).
# --------------------------------------------------------------------------------------------------------------

SHAPES = ("circle", "hourglass", "triangle", "arrow", "cross", "ring", "star", "crescent")


def _shape_mask(kind: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Mask of shape ``SHAPES[kind]`` in local coordinates scaled so that the shape fits the unit disc."""
  r = np.sqrt(u * u + v * v)
  name = SHAPES[kind]
  if name == "circle":
    return r <= 0.9
  if name == "hourglass":  # two triangles meeting at their tips
    return (np.abs(v) >= np.abs(u) * 0.9) & (np.maximum(np.abs(u), np.abs(v)) <= 0.8)
  if name == "triangle":
    m = np.ones_like(u, bool)
    for a in (np.pi / 2, np.pi / 2 + 2 * np.pi / 3, np.pi / 2 + 4 * np.pi / 3):
      m &= (u * np.cos(a) + v * np.sin(a)) <= 0.48
    return m
  if name == "arrow":  # pointing right
    shaft = (u >= -0.9) & (u <= 0.1) & (np.abs(v) <= 0.22)
    head = (u >= 0.1) & (np.abs(v) <= 0.8 * (0.9 - u))
    return shaft | head
  if name == "cross":
    return ((np.abs(u) <= 0.28) & (np.abs(v) <= 0.9)) | ((np.abs(v) <= 0.28) & (np.abs(u) <= 0.9))
  if name == "ring":
    return (r <= 0.95) & (r >= 0.55)
  if name == "star":
    phi = np.arctan2(v, u)
    return r <= 0.42 + 0.5 * np.maximum(np.cos(5 * phi / 2) ** 8, 0) + 0.12
  if name == "crescent":
    return (r <= 0.9) & (np.sqrt((u - 0.45) ** 2 + v * v) > 0.7)
  raise AssertionError(name)


def _draw_shapes(img, kinds, cx, cy, radius, theta, color):
  """Draws one shape per image: ``kinds`` [N] indices into ``SHAPES``, other parameters [N] (color [N, 3])."""
  x, y = _grid()
  u, v = _rotate(x, y, _col(cx), _col(cy), _col(theta))
  u, v = u / _col(radius), v / _col(radius)
  mask = np.zeros(img.shape[:3], bool)
  for k in np.unique(kinds):
    sel = kinds == k
    mask[sel] = _shape_mask(int(k), u[sel], v[sel])
  return _paint(img, mask, color)


# --------------------------------------------------------------------------------------------------------------
# Task generators. Each takes (rng, labels, domain) and returns float images [N, 32, 32, 3] in about [0, 1].
# ``domain`` is "benchmark" (the task's images), "task" (the task's style without its sensor shift; a part of
# the pretraining mixture) or "pretrain" (the shifted pretraining style).
# --------------------------------------------------------------------------------------------------------------

COLORS = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink")
_COLOR_HUES = np.array([0, 30, 58, 120, 183, 228, 272, 320], np.float32)


def _gen_shapes(rng, labels, domain, colors=None):
  """``colors``: optional indices into ``COLORS`` for the shapes (pretraining captions name them)."""
  n = len(labels)
  if domain != "pretrain":
    bg = _hsv_to_rgb(rng.uniform(0, 360, n), rng.uniform(0, 0.3, n), rng.uniform(0.1, 0.5, n))
    img = bg[:, None, None, :] + 0.1 * _fbm(rng, n, channels=1)
    radius = rng.uniform(0.36, 0.42, n)
    color = _random_colors(rng, n, s=(0.4, 1.0), v=(0.6, 1.0))
  else:
    img = np.ones((n, IMAGE_SIZE, IMAGE_SIZE, 3), np.float32) * _col(rng.uniform(0.85, 1.0, n))[..., None]
    radius = rng.uniform(0.3, 0.45, n)
    color = _random_colors(rng, n, s=(0.6, 1.0), v=(0.3, 0.8))
  if colors is not None:
    color = _color_of(rng, colors)
  c = 0.5 + rng.uniform(-0.04, 0.04, (2, n))
  img = _draw_shapes(img, labels, c[0], c[1], radius, np.deg2rad(rng.uniform(-8, 8, n)), color)
  return _noise(rng, img, 0.04 if domain != "pretrain" else 0.01)


def _color_of(rng, labels, jitter=8.0):
  hue = _COLOR_HUES[labels] + rng.uniform(-jitter, jitter, len(labels))
  sat = np.where(COLORS.index("pink") == labels, rng.uniform(0.35, 0.55, len(labels)),
                 rng.uniform(0.75, 1.0, len(labels)))
  return _hsv_to_rgb(hue, sat, rng.uniform(0.75, 1.0, len(labels)))


def _gen_colors(rng, labels, domain):
  n = len(labels)
  gray = rng.uniform(0.2, 0.6, n) if domain != "pretrain" else rng.uniform(0.9, 1.0, n)
  img = np.repeat(_col(gray)[..., None], 3, -1) + 0.12 * (domain != "pretrain") * _fbm(rng, n)
  # Two grey distractors, then the coloured object.
  for _ in range(2 if domain != "pretrain" else 0):
    r = rng.uniform(0.08, 0.15, n)
    c = rng.uniform(0.1, 0.9, (2, n))
    g = rng.uniform(0.0, 1.0, n)
    img = _draw_shapes(img, rng.integers(0, len(SHAPES), n), c[0], c[1], r, rng.uniform(0, 6.3, n),
                       np.stack([g, g, g], -1))
  radius = rng.uniform(0.15, 0.3, n) if domain != "pretrain" else rng.uniform(0.3, 0.42, n)
  c = rng.uniform(radius, 1 - radius, (2, n))
  img = _draw_shapes(img, rng.integers(0, len(SHAPES), n), c[0], c[1], radius, rng.uniform(0, 6.3, n),
                     _color_of(rng, labels))
  return _noise(rng, img, 0.05 if domain != "pretrain" else 0.01)


TEXTURES = ("striped", "checkered", "dotted", "grid", "rings", "zigzag", "blotchy", "speckled")


def _gen_textures(rng, labels, domain):
  n = len(labels)
  x, y = _grid()
  theta = _col(rng.uniform(0, np.pi, n))
  freq = _col(rng.uniform(3.0, 6.0, n) if domain != "pretrain" else rng.uniform(2.0, 3.5, n))
  u, v = _rotate(x, y, 0.5, 0.5, theta)
  u = u * freq + _col(rng.uniform(0, 1, n))
  v = v * freq + _col(rng.uniform(0, 1, n))
  fu, fv = u - np.floor(u), v - np.floor(v)
  pattern = np.zeros((n, IMAGE_SIZE, IMAGE_SIZE), bool)
  makers = {
    "striped": lambda s: fu[s] < 0.5,
    "checkered": lambda s: (fu[s] < 0.5) ^ (fv[s] < 0.5),
    "dotted": lambda s: (fu[s] - 0.5) ** 2 + (fv[s] - 0.5) ** 2 < 0.09,
    "grid": lambda s: (np.abs(fu[s] - 0.5) > 0.36) | (np.abs(fv[s] - 0.5) > 0.36),
    "rings": lambda s: np.mod(np.sqrt(((x - _col(cxy[0][s])) ** 2 + (y - _col(cxy[1][s])) ** 2))
                              * freq[s] * 1.6, 1.0) < 0.5,
    "zigzag": lambda s: np.mod(v[s] + 0.5 * np.abs(np.mod(u[s] * 0.8, 1.0) - 0.5) * 2, 1.0) < 0.5,
    "blotchy": lambda s: _smooth_noise(rng, int(s.sum()), 4)[..., 0] > 0,
    "speckled": lambda s: rng.uniform(0, 1, (int(s.sum()), IMAGE_SIZE, IMAGE_SIZE)) < 0.3,
  }
  cxy = rng.uniform(0.0, 1.0, (2, n))
  for k in np.unique(labels):
    s = labels == k
    pattern[s] = makers[TEXTURES[int(k)]](s)
  if domain != "pretrain":
    c1 = _random_colors(rng, n, s=(0.2, 0.9), v=(0.5, 1.0))
    c2 = c1 * rng.uniform(0.2, 0.55, (n, 1)).astype(np.float32)
  else:
    c1 = np.ones((n, 3), np.float32) * rng.uniform(0.85, 1.0, (n, 1)).astype(np.float32)
    c2 = np.zeros((n, 3), np.float32) + rng.uniform(0.0, 0.2, (n, 1)).astype(np.float32)
  img = _paint(np.broadcast_to(c2[:, None, None, :], (n, IMAGE_SIZE, IMAGE_SIZE, 3)), pattern, c1)
  return _noise(rng, img, 0.06 if domain != "pretrain" else 0.02)


COUNTS = ("one", "two", "three", "four", "five", "six")


def _gen_counting(rng, labels, domain):
  """``labels + 1`` dots, one per distinct cell of a 4x4 grid, so that dots never overlap."""
  n = len(labels)
  cells = np.argsort(rng.uniform(0, 1, (n, 16)), axis=1)
  if domain != "pretrain":
    img = np.repeat(_col(rng.uniform(0.0, 0.35, n))[..., None], 3, -1) + 0.1 * _fbm(rng, n)
  else:
    img = np.ones((n, IMAGE_SIZE, IMAGE_SIZE, 3), np.float32) * _col(rng.uniform(0.85, 1.0, n))[..., None]
  x, y = _grid()
  same = _random_colors(rng, n, s=(0.5, 1.0), v=(0.7, 1.0))
  for j in range(len(COUNTS)):
    active = labels >= j
    cell = cells[:, j]
    r = rng.uniform(0.05, 0.08, n) if domain != "pretrain" else rng.uniform(0.07, 0.09, n)
    slack = np.maximum(0.125 - r - 0.035, 0)  # dots stay one pixel inside their cell: they never touch
    cx = (cell % 4 + 0.5) / 4 + rng.uniform(-1, 1, n) * slack
    cy = (cell // 4 + 0.5) / 4 + rng.uniform(-1, 1, n) * slack
    mask = ((x - _col(cx)) ** 2 + (y - _col(cy)) ** 2 <= _col(r) ** 2) & _col(active).astype(bool)
    color = _random_colors(rng, n, s=(0.5, 1.0), v=(0.7, 1.0)) if domain != "pretrain" else same * 0.2
    img = _paint(img, mask, color)
  return _noise(rng, img, 0.05 if domain != "pretrain" else 0.01)


ORIENTATIONS = ("flat", "gently rising", "steeply rising", "upright", "steeply falling", "gently falling")


def _gen_orientation(rng, labels, domain):
  n = len(labels)
  # The benchmark's camera is tilted by half a class (15 degrees): a shift the pretraining never sees.
  tilt = 15.0 if domain == "benchmark" else 0.0
  angle = -labels.astype(np.float32) * np.pi / len(ORIENTATIONS) + np.deg2rad(rng.uniform(-6, 6, n) - tilt)
  x, y = _grid()
  if domain != "pretrain":
    value = rng.uniform(0.25, 0.75, n)
    img = _fbm(rng, n, channels=1) * 0.1 + _hsv_to_rgb(rng.uniform(0, 360, n), rng.uniform(0, 0.6, n), value)[
      :, None, None]
    half = rng.uniform(0.22, 0.4, n)
    width = rng.uniform(0.035, 0.06, n)
    color = _hsv_to_rgb(rng.uniform(0, 360, n), rng.uniform(0.0, 1.0, n),
                        np.where(value > 0.5, rng.uniform(0.0, 0.2, n), rng.uniform(0.85, 1.0, n)))
  else:
    img = np.ones((n, IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)
    half = rng.uniform(0.35, 0.45, n)
    width = rng.uniform(0.05, 0.08, n)
    color = np.zeros((n, 3), np.float32)
  c = 0.5 + rng.uniform(-0.15, 0.15, (2, n))
  u, v = _rotate(x, y, _col(c[0]), _col(c[1]), _col(angle))
  img = _paint(img, (np.abs(u) <= _col(half)) & (np.abs(v) <= _col(width)), color)
  return _noise(rng, img, 0.05 if domain != "pretrain" else 0.01)


DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

_FONT = np.array([[[c == "#" for c in row] for row in glyph.split()] for glyph in (
  ".###. #...# #..## #.#.# ##..# #...# .###.",
  "..#.. .##.. ..#.. ..#.. ..#.. ..#.. .###.",
  ".###. #...# ....# ...#. ..#.. .#... #####",
  "##### ...#. ..#.. ...#. ....# #...# .###.",
  "...#. ..##. .#.#. #..#. ##### ...#. ...#.",
  "##### #.... ####. ....# ....# #...# .###.",
  "..##. .#... #.... ####. #...# #...# .###.",
  "##### ....# ...#. ..#.. .#... .#... .#...",
  ".###. #...# #...# .###. #...# #...# .###.",
  ".###. #...# #...# .#### ....# ...#. .##..",
)])  # [10, 7, 5]


def _glyph_mask(digits, x0, y0, height, shear):
  """Mask of 5x7 font glyphs ``digits`` [N] with top-left (x0, y0), ``height`` and italic ``shear`` ([N] each)."""
  x, y = _grid()
  width = _col(height) * 5 / 7
  gy = (y - _col(y0)) / _col(height) * 7
  gx = (x - _col(x0) - _col(shear) * (_col(y0) + _col(height) - y)) / width * 5
  inside = (gx >= 0) & (gx < 5) & (gy >= 0) & (gy < 7)
  gxi, gyi = np.clip(gx, 0, 4).astype(np.int32), np.clip(gy, 0, 6).astype(np.int32)
  return inside & _FONT[np.asarray(digits)[:, None, None], gyi, gxi]


def _gen_clutter_digits(rng, labels, domain):
  n = len(labels)
  if domain != "pretrain":
    value = rng.uniform(0.15, 0.9, n)
    base = _hsv_to_rgb(rng.uniform(0, 360, n), rng.uniform(0.2, 0.8, n), value)
    img = _fbm(rng, n, channels=1) * 0.08 + base[:, None, None]
    x, y = _grid()
    for _ in range(3):  # clutter: faint rectangles in the background's colour family
      c = rng.uniform(0, 1, (4, n))
      m = (np.abs(x - _col(c[0])) < _col(c[2] * 0.3)) & (np.abs(y - _col(c[1])) < _col(c[3] * 0.3))
      img = _paint(img, m, base * rng.uniform(0.75, 1.25, (n, 1)).astype(np.float32))
    height = rng.uniform(0.62, 0.72, n)
    shear = np.zeros(n, np.float32)
    # Ink contrasts with the background: dark on light, light on dark.
    ink_v = np.where(value > 0.55, rng.uniform(0.0, 0.3, n), rng.uniform(0.8, 1.0, n))
    fg = _hsv_to_rgb(rng.uniform(0, 360, n), rng.uniform(0.0, 0.9, n), ink_v)
    # Neighbouring digits cut by the image border, as in house-number crops.
    for side in (-1, 1):
      nx = 0.5 - height * 5 / 14 + side * height * 0.95
      img = _paint(img, _glyph_mask(rng.integers(0, 10, n), nx, 0.5 - height / 2, height, shear), fg)
    y0 = 0.5 - height / 2 + rng.uniform(-0.03, 0.03, n)
    x0 = 0.5 - height * 5 / 14 + rng.uniform(-0.03, 0.03, n)
  else:
    img = np.ones((n, IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)
    height = rng.uniform(0.55, 0.8, n)
    shear = np.zeros(n, np.float32)
    fg = np.zeros((n, 3), np.float32)
    y0 = 0.5 - height / 2 + rng.uniform(-0.05, 0.05, n)
    x0 = 0.5 - height * 5 / 14 + rng.uniform(-0.05, 0.05, n)
  img = _paint(img, _glyph_mask(labels, x0, y0, height, shear), fg)
  return _noise(rng, img, 0.06 if domain != "pretrain" else 0.01)


SCENES = ("beach", "forest", "desert", "mountains", "city", "night city", "ocean", "meadow")


def _scene_objects(rng, img, name, horizon, sky, ground):
  """Draws the objects of scene ``name`` on ``img`` [k, H, W, 3] (all images of one class)."""
  k = img.shape[0]
  x, y = _grid()
  if name == "beach":
    band = (y >= horizon) & (y < horizon + _col(rng.uniform(0.12, 0.22, k)))
    img = _paint(img, band, _hsv_to_rgb(rng.uniform(190, 215, k), rng.uniform(0.6, 1, k), rng.uniform(0.5, 0.8, k)))
  elif name == "ocean":
    phase = _col(rng.uniform(0, 6.3, k))
    waves = (y >= horizon) & (np.mod((y - horizon) * 40 + 2 * np.sin(x * 9 + phase), 4) < 0.8)
    img = _paint(img, waves, ground * 0.6 + 0.4)
    boat = (np.abs(x - _col(rng.uniform(0.2, 0.8, k))) < 0.08) & (np.abs(y - horizon + 0.02) < 0.025)
    img = _paint(img, boat & _col(rng.uniform(0, 1, k) < 0.5).astype(bool), np.full((k, 3), 0.3, np.float32))
  elif name == "night city":
    stars = (rng.uniform(0, 1, (k, IMAGE_SIZE, IMAGE_SIZE)) < 0.03) & (y < horizon)
    img = _paint(img, stars, np.ones((k, 3), np.float32))
  for _ in range(6):
    cx = _col(rng.uniform(0, 1, k))
    if name == "forest":
      w, h = _col(rng.uniform(0.04, 0.09, k)), _col(rng.uniform(0.15, 0.3, k))
      base = horizon + _col(rng.uniform(0.0, 0.15, k))
      tree = (np.abs(x - cx) < w * (y - (base - h)) / h) & (y < base)
      img = _paint(img, tree, ground * 0.45)
    elif name == "mountains":
      w, h = _col(rng.uniform(0.15, 0.3, k)), _col(rng.uniform(0.2, 0.35, k))
      mountain = (np.abs(x - cx) < w * (y - (horizon - h)) / h) & (y < horizon + 0.01)
      img = _paint(img, mountain, 0.45 + 0.1 * sky)
      img = _paint(img, mountain & (y < horizon - h * 0.6), ground)
    elif name in ("city", "night city"):
      w, h = _col(rng.uniform(0.04, 0.08, k)), _col(rng.uniform(0.15, 0.4, k))
      building = (np.abs(x - cx) < w) & (y > horizon - h) & (y < horizon + 0.02)
      night = name == "night city"
      img = _paint(img, building, np.full((k, 3), 0.12, np.float32) if night else ground * 1.3)
      windows = building & (np.mod(x * 40, 2.5) < 1.0) & (np.mod(y * 40, 3.0) < 1.2)
      img = _paint(img, windows, np.broadcast_to(np.array([1.0, 0.85, 0.3] if night else [0.75] * 3, np.float32),
                                                 (k, 3)))
    elif name == "meadow":
      flowers = (rng.uniform(0, 1, (k, IMAGE_SIZE, IMAGE_SIZE)) < 0.02) & (y > horizon + 0.05)
      img = _paint(img, flowers, _random_colors(rng, k, s=(0.7, 1), v=(0.8, 1)))
      break
    else:
      break
  return img


def _gen_scenes(rng, labels, domain):
  """Landscapes composed of a sky, a ground and scene-specific objects (trees, buildings, waves, ...)."""
  n = len(labels)
  x, y = _grid()
  img = np.zeros((n, IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)
  day_sky = (200, 220, 0.3, 0.7, 0.75, 1.0)
  palettes = {  # name: (sky hsv ranges, ground hsv ranges)
    "beach": (day_sky, (35, 50, 0.3, 0.6, 0.75, 0.95)),
    "forest": (day_sky, (85, 130, 0.5, 0.9, 0.4, 0.75)),
    "desert": ((30, 50, 0.1, 0.3, 0.85, 1.0), (30, 45, 0.4, 0.7, 0.7, 0.9)),
    "mountains": (day_sky, (190, 220, 0.0, 0.1, 0.85, 1.0)),
    "city": (day_sky, (0, 360, 0.0, 0.1, 0.25, 0.45)),
    "night city": ((220, 250, 0.5, 0.9, 0.05, 0.2), (0, 360, 0.0, 0.1, 0.1, 0.25)),
    "ocean": (day_sky, (200, 230, 0.6, 1.0, 0.35, 0.6)),
    "meadow": (day_sky, (70, 110, 0.4, 0.8, 0.5, 0.8)),
  }
  hsv = lambda r, k: _hsv_to_rgb(rng.uniform(*r[0:2], k), rng.uniform(*r[2:4], k), rng.uniform(*r[4:6], k))
  for c in np.unique(labels):
    s = labels == c
    k = int(s.sum())
    name = SCENES[int(c)]
    sky, ground = hsv(palettes[name][0], k), hsv(palettes[name][1], k)
    horizon = _col(rng.uniform(0.35, 0.6, k))
    if name == "desert":
      horizon = horizon + 0.04 * np.sin(x * _col(rng.uniform(6, 12, k)) + _col(rng.uniform(0, 6.3, k)))
    sub = np.where((y < horizon)[..., None], sky[:, None, None], ground[:, None, None])
    if name != "night city":  # a sun on half of the day scenes
      sun = ((x - _col(rng.uniform(0.1, 0.9, k))) ** 2 + (y - _col(rng.uniform(0.08, 0.2, k))) ** 2 < 0.006)
      sun &= _col(rng.uniform(0, 1, k) < 0.5).astype(bool)
      img_sun = np.broadcast_to(np.array([1.0, 0.9, 0.3], np.float32), (k, 3))
      sub = _paint(sub, sun, img_sun)
    img[s] = _scene_objects(rng, sub, name, horizon, sky, ground)
  if domain == "pretrain":  # flat, cartoon-like colours
    img = np.round(img * 3) / 3
  return _noise(rng, img, 0.04 if domain != "pretrain" else 0.01)


# --------------------------------------------------------------------------------------------------------------
# Real images: scikit-learn's handwritten digits.
# --------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
  from sklearn.datasets import load_digits  # ships with scikit-learn; no download

  d = load_digits()
  return (d.images.astype(np.float32) / 16.0), d.target.astype(np.int32)


def _sklearn_digit_images(images8: np.ndarray) -> np.ndarray:
  """8x8 grey digits -> 32x32 RGB, white ink on black, bilinearly upsampled with a 2-pixel margin."""
  padded = np.pad(images8, ((0, 0), (1, 1), (1, 1)))
  big = _resize_bilinear(padded[..., None], IMAGE_SIZE)[..., 0]
  return np.repeat(big[..., None], 3, -1)


# --------------------------------------------------------------------------------------------------------------
# Public API.
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """Static description of a task: names and prompts for zero-shot heads.

  Attributes:
    name: task name (a key of ``TASKS``).
    classnames: one name per label, as used in prompts.
    templates: prompt templates with one ``{}`` for the class name.
    description: one line on what the images show and which real dataset the task stands for.
  """

  name: str
  classnames: tuple[str, ...]
  templates: tuple[str, ...]
  description: str

  @property
  def num_classes(self) -> int:
    return len(self.classnames)


@dataclasses.dataclass(frozen=True)
class Split:
  """One split of a task. ``images``: uint8 [N, 32, 32, 3]; ``labels``: int32 [N]."""

  images: np.ndarray
  labels: np.ndarray

  def __len__(self) -> int:
    return int(self.labels.shape[0])


@dataclasses.dataclass(frozen=True)
class TaskData:
  """A task with its train/val/test splits."""

  spec: TaskSpec
  train: Split
  val: Split
  test: Split


_Gen = Callable[[np.random.Generator, np.ndarray, str], np.ndarray]

# name -> (spec, generator or None for the real-image task). Order is the suite's task order.
_TASKS: dict[str, tuple[TaskSpec, _Gen | None]] = {
  "digits": (TaskSpec("digits", DIGITS, ("a handwritten digit {}", "a scan of the number {}"),
                      "scikit-learn's 8x8 handwritten digits, upsampled (real images; stands for MNIST)"), None),
  "textures": (TaskSpec("textures", TEXTURES, ("a {} texture", "a close-up of a {} pattern"),
                        "two-colour periodic and noise textures at random orientation and scale (DTD)"),
               _gen_textures),
  "shapes": (TaskSpec("shapes", SHAPES, ("a drawing of a {}", "a {} shape"),
                      "one upright shape of random colour and size on a noisy background"), _gen_shapes),
  "colors": (TaskSpec("colors", COLORS, ("something {}", "a {} object"),
                      "the colour of one object among grey distractors, under warm light"), _gen_colors),
  "house_digits": (TaskSpec("house_digits", DIGITS, ("a house number {}", "the number {} on a sign"),
                            "printed digits in random colours on clutter, neighbours cut by the border (SVHN)"),
                   _gen_clutter_digits),
  "counting": (TaskSpec("counting", COUNTS, ("{} dots", "a picture of {} dots"),
                        "one to six non-overlapping coloured dots (CLEVR-count)"), _gen_counting),
  "orientation": (TaskSpec("orientation", ORIENTATIONS, ("a {} bar", "a line that is {}"),
                           "the orientation of one bar, six 30-degree bins, seen by a camera tilted 15 degrees"), _gen_orientation),
  "scenes": (TaskSpec("scenes", SCENES, ("a picture of a {}", "a photo of the {}"),
                      "landscapes composed of sky, ground and objects, in false colour (SUN397, EuroSAT)"), _gen_scenes),
}

TASKS: tuple[str, ...] = tuple(_TASKS)

# Fixed "sensor" transforms applied to a task's images only, never to pretraining images: the benchmark
# photographs concepts the pretraining knows through a camera it never saw (false-colour remote sensing,
# tinted indoor light), which makes zero-shot transfer imperfect while fine-tuning undoes it easily.
_TASK_SHIFT: dict[str, Callable[[np.ndarray], np.ndarray]] = {
  "scenes": lambda img: img[..., [2, 0, 1]],  # false colour
  "colors": lambda img: img * np.array([1.0, 0.85, 0.6], np.float32),  # warm illuminant
}
_SPLITS = ("train", "val", "test")


def task_spec(name: str) -> TaskSpec:
  """Returns the static description of task ``name``.

  Args:
    name: a task name (one of ``TASKS``).

  Returns:
    The task's :class:`TaskSpec`.

  Raises:
    ValueError: if ``name`` is not one of ``TASKS``.
  """
  if name not in _TASKS:
    raise ValueError(f"unknown synthetic task {name!r}; valid tasks: {', '.join(TASKS)}")
  return _TASKS[name][0]


def _rng(seed: int, *parts: str | int) -> np.random.Generator:
  words = [int(seed) & 0xFFFFFFFF] + [zlib.crc32(str(p).encode()) for p in parts]
  return np.random.default_rng(np.random.SeedSequence(words))


def _balanced_labels(rng: np.random.Generator, n: int, num_classes: int) -> np.ndarray:
  labels = np.arange(n, dtype=np.int32) % num_classes
  return rng.permutation(labels).astype(np.int32)


def make_task(name: str, *, seed: int = 0, sizes: Sequence[int] = (4000, 200, 500)) -> TaskData:
  """Generates task ``name`` deterministically.

  Args:
    name: one of ``TASKS``.
    seed: suite seed; each (task, split) pair draws from its own stream, so splits never share images and
      changing one size leaves the other splits unchanged.
    sizes: ``(train, val, test)`` sizes. For ``digits`` (1797 real images) the test and val sets are held out
      first and the train split takes what is left (capped at the requested size).

  Returns:
    The task's spec and its three splits, images uint8 [N, 32, 32, 3], labels int32 [N], classes balanced.

  Raises:
    ValueError: for an unknown task or negative sizes.
  """
  spec = task_spec(name)
  if len(sizes) != 3 or min(sizes) < 0:
    raise ValueError(f"sizes must be three non-negative (train, val, test) counts, got {sizes!r}")
  gen = _TASKS[name][1]
  splits = {}
  if gen is None:
    images8, targets = _sklearn_digits()
    order = _rng(seed, name, "permutation").permutation(len(targets))
    n_train, n_val, n_test = sizes
    if n_val + n_test > len(targets) - 100:
      raise ValueError(f"digits has {len(targets)} images; val+test={n_val + n_test} leaves too few to train")
    test, val, train = np.split(order, [n_test, n_test + n_val])
    for split, idx in zip(_SPLITS, (train[:n_train], val, test)):
      idx = np.sort(idx)
      splits[split] = Split(_to_uint8(_sklearn_digit_images(images8[idx])), targets[idx])
  else:
    for split, n in zip(_SPLITS, sizes):
      rng = _rng(seed, name, split)
      labels = _balanced_labels(rng, n, spec.num_classes)
      images = gen(rng, labels, "benchmark") if n else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)
      images = _TASK_SHIFT.get(name, lambda x: x)(images)
      splits[split] = Split(_to_uint8(images), labels)
  return TaskData(spec, **splits)


# Pretraining captions: family -> (class names, caption templates). Templates differ from the tasks' prompts
# in wording, as web captions differ from benchmark prompts; some captions name two attributes.
_PRETRAIN_FAMILIES = ("textures", "shapes", "colors", "house_digits", "counting", "orientation", "scenes")
_CAPTIONS = {
  "textures": ("{} pattern", "a {} texture", "fabric with a {} print"),
  "shapes": ("a {color} {shape}", "a {shape}", "a {shape} drawn in {color}"),
  "colors": ("a {} thing", "something {}", "{} colour"),
  "house_digits": ("the number {}", "the digit {}", "a printed {}"),
  "counting": ("{} dots", "{} round dots", "exactly {} dots"),
  "orientation": ("a {} bar", "a {} line", "a {} stick"),
  "scenes": ("a {}", "a photo of a {}", "a view of a {}"),
}


@dataclasses.dataclass(frozen=True)
class Pretraining:
  """The captioned pretraining mixture.

  Attributes:
    images: uint8 [N, 32, 32, 3].
    captions: N strings.
    concepts: int32 [N], the index in ``concept_names`` of what the caption says: captions that word the same
      concept differently ("a red thing", "something red") share it, so that a contrastive loss can treat them
      as positives of each other.
    concept_names: ``family:attributes`` strings.
  """

  images: np.ndarray
  captions: list[str]
  concepts: np.ndarray
  concept_names: tuple[str, ...]

  def __len__(self) -> int:
    return int(self.concepts.shape[0])


def make_pretraining(*, seed: int = 0, n: int = 16384, task_fraction: float = 0.3) -> Pretraining:
  """Generates the captioned pretraining mixture (the tiny CLIP's "web data").

  Images come from the procedural families in a shifted domain (see the module docstring); the
  handwritten-digit task has no counterpart (printed digits only), so zero-shot transfer to it is a real
  domain shift, like CLIP's on MNIST.

  Args:
    seed: suite seed.
    n: number of image-caption pairs, split evenly over the families.
    task_fraction: fraction of images drawn in the tasks' own style (the rest in the shifted style), as web
      data holds a few images that look like any benchmark's.

  Returns:
    A :class:`Pretraining` in a shuffled order.
  """
  rng = _rng(seed, "pretrain")
  fams = np.arange(n) % len(_PRETRAIN_FAMILIES)
  images = np.zeros((n, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
  captions: list[str] = [""] * n
  concepts: list[str] = [""] * n
  for f, fam in enumerate(_PRETRAIN_FAMILIES):
    idx = np.flatnonzero(fams == f)
    spec, gen = _TASKS[fam]
    labels = rng.integers(0, spec.num_classes, len(idx)).astype(np.int32)
    colors = rng.integers(0, len(COLORS), len(idx))
    task_like = rng.uniform(0, 1, len(idx)) < task_fraction
    img = np.zeros((len(idx), IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)
    for domain, sel in (("task", task_like), ("pretrain", ~task_like)):
      if not sel.any():
        continue
      if fam == "shapes":  # captions name shape and colour
        img[sel] = _gen_shapes(rng, labels[sel], domain, colors=colors[sel])
      else:
        img[sel] = gen(rng, labels[sel], domain)
    images[idx] = _to_uint8(img)
    tmpl = _CAPTIONS[fam]
    which = rng.integers(0, len(tmpl), len(idx))
    for j, (lab, t) in enumerate(zip(labels, which)):
      if fam == "shapes":
        captions[idx[j]] = tmpl[t].format(color=COLORS[colors[j]], shape=SHAPES[lab])
        concepts[idx[j]] = f"{fam}:{SHAPES[lab]}"
      else:
        captions[idx[j]] = tmpl[t].format(spec.classnames[lab])
        concepts[idx[j]] = f"{fam}:{spec.classnames[lab]}"
  order = rng.permutation(n)
  names, ids = np.unique(np.array(concepts)[order], return_inverse=True)
  return Pretraining(images[order], [captions[i] for i in order], ids.astype(np.int32), tuple(names.tolist()))


def _aux_fractal(rng, n):
  """Procedural noise: fractional Brownian motion with random per-image colour maps."""
  base = _fbm(rng, n, octaves=(2, 4, 8, 16, 32), decay=rng.uniform(0.4, 0.8), channels=1)
  mix = _random_colors(rng, n * 2).reshape(n, 2, 3)
  t = 1 / (1 + np.exp(-base * _col(rng.uniform(1, 4, n))[..., None]))
  return mix[:, None, None, 0] * (1 - t) + mix[:, None, None, 1] * t


def _aux_mondrian(rng, n):
  """Another domain: rectangles and lines in flat colours (no shapes, digits, dots or scenes)."""
  img = np.broadcast_to(_random_colors(rng, n, s=(0, 0.3))[:, None, None], (n, IMAGE_SIZE, IMAGE_SIZE, 3))
  x, y = _grid()
  for _ in range(6):
    c = rng.uniform(0, 1, (4, n))
    m = (np.abs(x - _col(c[0])) < _col(c[2] * 0.3)) & (np.abs(y - _col(c[1])) < _col(c[3] * 0.3))
    img = _paint(img, m, _random_colors(rng, n))
  for _ in range(3):
    c = rng.uniform(0, 1, (2, n))
    vertical = _col(rng.uniform(0, 1, n) < 0.5).astype(bool)
    m = np.where(vertical, np.abs(x - _col(c[0])) < 0.02, np.abs(y - _col(c[1])) < 0.02)
    img = _paint(img, m, np.zeros((n, 3), np.float32))
  return img


def _aux_crops(rng, n, seed):
  """Augmented pretraining images: random resized crops, flips and colour jitter."""
  images = make_pretraining(seed=seed + 7919, n=n).images
  out = _crop_resize(rng, images.astype(np.float32) / 255.0)
  flip = rng.uniform(0, 1, n) < 0.5
  out[flip] = out[flip, :, ::-1]
  return out * rng.uniform(0.7, 1.3, (n, 1, 1, 3)).astype(np.float32)


AUX_SOURCES = ("fractal", "mondrian", "crops")


def make_aux(source: str, *, seed: int = 0, n: int = 1024) -> np.ndarray:
  """Generates unlabeled auxiliary images (for RI and other methods that adapt on non-task data).

  Args:
    source: ``"fractal"`` (procedural fBm noise), ``"mondrian"`` (rectangles and lines, another domain) or
      ``"crops"`` (augmented crops of fresh pretraining images).
    seed: suite seed.
    n: number of images.

  Returns:
    uint8 [n, 32, 32, 3].

  Raises:
    ValueError: for an unknown source.
  """
  if source not in AUX_SOURCES:
    raise ValueError(f"unknown auxiliary source {source!r}; valid sources: {', '.join(AUX_SOURCES)}")
  rng = _rng(seed, "aux", source)
  if source == "fractal":
    return _to_uint8(_aux_fractal(rng, n))
  if source == "mondrian":
    return _to_uint8(_aux_mondrian(rng, n))
  return _to_uint8(_aux_crops(rng, n, seed))


# --------------------------------------------------------------------------------------------------------------
# Held-out domain shifts of test images (unseen domains: no expert, pretraining or auxiliary image has them).
# --------------------------------------------------------------------------------------------------------------

SHIFTS = ("noise", "blur", "contrast", "tint")


def _box_blur(x: np.ndarray, radius: int) -> np.ndarray:
  k = 2 * radius + 1
  pad = np.pad(x, ((0, 0), (radius, radius), (radius, radius), (0, 0)), mode="edge")
  out = np.zeros_like(x)
  for dy in range(k):
    for dx in range(k):
      out += pad[:, dy:dy + x.shape[1], dx:dx + x.shape[2]]
  return out / (k * k)


def shift_images(images: np.ndarray, kind: str, *, seed: int = 0, severity: float = 1.0) -> np.ndarray:
  """Applies a held-out domain shift to uint8 test images (for generalization to unseen domains).

  The shifts are corruption-style (in the spirit of ImageNet-C): ``"noise"`` (Gaussian pixel noise, sigma
  0.1 x severity), ``"blur"`` (box blur of radius ``max(1, round(severity))``), ``"contrast"`` (contrast scaled
  by ``1 - 0.5 x severity`` around each image's mean) and ``"tint"`` (a random per-image colour cast, channel
  gains in ``1 +- 0.35 x severity``). Labels are unchanged. Deterministic in ``(images, kind, seed,
  severity)``; ``severity=0`` returns the images unchanged.

  Args:
    images: uint8 [N, H, W, 3].
    kind: one of :data:`SHIFTS`.
    seed: seed of the random shifts (noise, tint).
    severity: strength, ``>= 0``.

  Returns:
    uint8 [N, H, W, 3].

  Raises:
    ValueError: an unknown kind, a negative severity or images that are not uint8 [N, H, W, 3].
  """
  if kind not in SHIFTS:
    raise ValueError(f"unknown shift {kind!r}; valid shifts: {', '.join(SHIFTS)}")
  if severity < 0:
    raise ValueError(f"severity must be >= 0, got {severity}")
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"images must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}")
  if severity == 0:
    return images.copy()
  x = images.astype(np.float32) / 255.0
  rng = _rng(seed, "shift", kind)
  if kind == "noise":
    x = x + 0.1 * severity * rng.standard_normal(x.shape, dtype=np.float32)
  elif kind == "blur":
    x = _box_blur(x, max(1, int(round(severity))))
  elif kind == "contrast":
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    x = mean + (1.0 - 0.5 * min(severity, 1.9)) * (x - mean)
  else:
    x = x * rng.uniform(1 - 0.35 * severity, 1 + 0.35 * severity, (len(x), 1, 1, 3)).astype(np.float32)
  return _to_uint8(x)
