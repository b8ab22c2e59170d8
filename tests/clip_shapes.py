"""Structured random weights with Hugging Face CLIP vision parameter names and shapes.

Test fixture for parity and reference tests: a tiny "pretrained" CLIP vision tower plus ``T`` "fine-tuned"
copies whose task vectors are structured rather than i.i.d. noise, so that merge methods are exercised away
from degenerate cases:

- a component shared by all tasks (each task scales it by a positive factor, so signs mostly agree across
  tasks, as after fine-tuning one pretrained model on related tasks);
- a task-specific low-rank component on every matrix leaf (2-D leaves, and the 4-D patch embedding viewed as
  ``(out, in * kh * kw)``);
- a few large task-specific spikes (sparse outliers, as Breadcrumbs and TIES assume);
- dense small noise;
- a per-(task, leaf) magnitude factor, so global (whole-model) and per-leaf thresholds select differently.

Everything is float32 NumPy and deterministic given ``seed``. Names follow ``transformers``'
``CLIPVisionModel`` checkpoints: ``vision_model.embeddings.patch_embedding.weight`` ``(O, C, kh, kw)``,
``vision_model.embeddings.position_embedding.weight`` ``(P, D)``, ``vision_model.embeddings.class_embedding``
``(D,)``, ``vision_model.pre_layrnorm.*`` (sic, HF spelling), per layer ``self_attn.{q,k,v,out}_proj``,
``layer_norm1``, ``mlp.fc1`` ``(M, D)``, ``mlp.fc2`` ``(D, M)``, ``layer_norm2``, and
``vision_model.post_layernorm.*``. Linear weights are ``(out, in)`` as in PyTorch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["ClipShapes", "clip_vision_shapes", "make_models", "make_task_vectors", "matrix_keys"]


@dataclass(frozen=True)
class ClipShapes:
  """Sizes of the synthetic CLIP vision tower (tiny by default)."""

  width: int = 32
  layers: int = 2
  mlp: int = 64
  patch: int = 4
  image: int = 8
  channels: int = 3
  prefix: str = "vision_model."

  @property
  def positions(self) -> int:
    return (self.image // self.patch) ** 2 + 1


def clip_vision_shapes(cfg: ClipShapes = ClipShapes()) -> dict[str, tuple[int, ...]]:
  """Ordered ``{name: shape}`` of a HF ``CLIPVisionModel`` state dict (floating parameters only)."""
  d, m, p = cfg.width, cfg.mlp, cfg.prefix
  shapes: dict[str, tuple[int, ...]] = {
      f"{p}embeddings.class_embedding": (d,),
      f"{p}embeddings.patch_embedding.weight": (d, cfg.channels, cfg.patch, cfg.patch),
      f"{p}embeddings.position_embedding.weight": (cfg.positions, d),
      f"{p}pre_layrnorm.weight": (d,),
      f"{p}pre_layrnorm.bias": (d,),
  }
  for i in range(cfg.layers):
    q = f"{p}encoder.layers.{i}."
    for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
      shapes[f"{q}self_attn.{proj}.weight"] = (d, d)
      shapes[f"{q}self_attn.{proj}.bias"] = (d,)
    shapes[f"{q}layer_norm1.weight"] = (d,)
    shapes[f"{q}layer_norm1.bias"] = (d,)
    shapes[f"{q}mlp.fc1.weight"] = (m, d)
    shapes[f"{q}mlp.fc1.bias"] = (m,)
    shapes[f"{q}mlp.fc2.weight"] = (d, m)
    shapes[f"{q}mlp.fc2.bias"] = (d,)
    shapes[f"{q}layer_norm2.weight"] = (d,)
    shapes[f"{q}layer_norm2.bias"] = (d,)
  shapes[f"{p}post_layernorm.weight"] = (d,)
  shapes[f"{p}post_layernorm.bias"] = (d,)
  return shapes


def matrix_keys(shapes: dict[str, tuple[int, ...]]) -> list[str]:
  """Names of the leaves that are 2-D in the PyTorch checkpoint (the reference 'matrix leaf' rule)."""
  return [k for k, s in shapes.items() if len(s) == 2]


def _pretrained_leaf(rng: np.random.Generator, name: str, shape: tuple[int, ...]) -> np.ndarray:
  if "layernorm" in name or "layer_norm" in name or "layrnorm" in name:
    if name.endswith("weight"):
      return 1.0 + 0.05 * rng.standard_normal(shape)
    return 0.02 * rng.standard_normal(shape)
  if name.endswith("bias"):
    return 0.01 * rng.standard_normal(shape)
  if "class_embedding" in name:
    return 0.5 * rng.standard_normal(shape)
  fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
  return rng.standard_normal(shape) / np.sqrt(fan_in)


def _structured(rng: np.random.Generator, shape: tuple[int, ...], rank: int, spikes: float) -> np.ndarray:
  """One task's specific component: low rank (matrices) + sparse spikes + dense noise, unit-ish scale."""
  n = int(np.prod(shape))
  out = np.zeros(n)
  if len(shape) >= 2:
    rows, cols = shape[0], n // shape[0]
    r = min(rank, rows, cols)
    u = rng.standard_normal((rows, r))
    v = rng.standard_normal((r, cols))
    out += (u @ v).reshape(-1) / np.sqrt(r)
  else:
    out += rng.standard_normal(n)
  k = max(1, int(round(spikes * n)))
  idx = rng.choice(n, size=k, replace=False)
  out[idx] += rng.choice([-1.0, 1.0], size=k) * rng.uniform(4.0, 8.0, size=k)
  out += 0.3 * rng.standard_normal(n)
  return out.reshape(shape)


def make_task_vectors(
    shapes: dict[str, tuple[int, ...]],
    num_tasks: int,
    *,
    seed: int = 0,
    rank: int = 2,
    spikes: float = 0.02,
    shared: float = 0.7,
    scale: float = 1e-2,
) -> list[dict[str, np.ndarray]]:
  """``num_tasks`` structured task vectors (float32) for the given shapes.

  Args:
    shapes: ``{name: shape}``.
    num_tasks: T.
    seed: everything is a deterministic function of the seed.
    rank: rank of each task's low-rank component on matrix leaves.
    spikes: fraction of entries that get a large task-specific outlier.
    shared: weight of the component common to all tasks (sign agreement); 0 gives independent tasks.
    scale: overall magnitude of the task vectors.
  """
  rng = np.random.default_rng([seed, 1])
  common = {k: _structured(rng, s, rank, spikes / 2) for k, s in shapes.items()}
  out = []
  for _ in range(num_tasks):
    tv = {}
    for k, s in shapes.items():
      leaf_factor = np.exp(rng.uniform(-1.0, 1.0))  # per (task, leaf) magnitude: 0.37x .. 2.7x
      alpha = rng.uniform(0.5, 1.5)
      x = shared * alpha * common[k] + (1.0 - shared) * _structured(rng, s, rank, spikes)
      tv[k] = (scale * leaf_factor * x).astype(np.float32)
    out.append(tv)
  return out


def make_models(
    num_tasks: int = 3,
    *,
    seed: int = 0,
    cfg: ClipShapes = ClipShapes(),
    rank: int = 2,
    spikes: float = 0.02,
    shared: float = 0.7,
    scale: float = 1e-2,
    int_buffer: bool = False,
) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
  """A synthetic pretrained CLIP vision tower and ``num_tasks`` fine-tuned copies.

  Args:
    num_tasks: T.
    seed: deterministic seed.
    cfg: sizes (tiny by default: width 32, 2 layers, MLP 64, 4x4 patches on 8x8 images).
    rank, spikes, shared, scale: structure of the task vectors (see :func:`make_task_vectors`).
    int_buffer: also add the integer buffer ``vision_model.embeddings.position_ids`` ``(1, P)`` int64 (identical
      in every model), to test that non-float leaves are copied.

  Returns:
    ``(pretrained, finetuned)``: a flat ``{name: float32 array}`` dict and a list of ``num_tasks`` such dicts
    with ``finetuned[t] = pretrained + tau_t`` (computed in float32).
  """
  shapes = clip_vision_shapes(cfg)
  rng = np.random.default_rng([seed, 0])
  pre = {k: _pretrained_leaf(rng, k, s).astype(np.float32) for k, s in shapes.items()}
  tvs = make_task_vectors(shapes, num_tasks, seed=seed, rank=rank, spikes=spikes, shared=shared, scale=scale)
  fts = [{k: (pre[k] + tv[k]).astype(np.float32) for k in shapes} for tv in tvs]
  if int_buffer:
    ids = np.arange(cfg.positions, dtype=np.int64)[None]
    pre[f"{cfg.prefix}embeddings.position_ids"] = ids
    for ft in fts:
      ft[f"{cfg.prefix}embeddings.position_ids"] = ids.copy()
  return pre, fts
