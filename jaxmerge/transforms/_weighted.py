"""Reductions of the weighted-average family whose weights come from the task vectors themselves:
NAN, SLERP and Model Stock."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxmerge import tree as jtree
from jaxmerge.base import REDUCE, EmptyCoeffs, MergeTransform, context_of, identified
from jaxmerge.tree import task_mean, task_sum

__all__ = ["model_stock_reduce", "nan_reduce", "slerp_reduce"]


def _empty(tree):
  del tree
  return EmptyCoeffs()


def _norm(x: jax.Array) -> jax.Array:
  return jnp.sqrt(jnp.sum(jnp.square(x.reshape(x.shape[0], -1)), axis=1))


def nan_reduce(global_scale: float | None = None, norm_of: str = "task_vector") -> MergeTransform:
  """``(T, ...) -> (...)``: NAN's norm-based coefficients, per leaf.

  ``a_t = (1 / ||v_t||) / sum_s (1 / ||v_s||)`` with ``v_t`` the task vector (``norm_of="task_vector"``,
  default) or the fine-tuned weights (``"weights"``), and the result ``g * sum_t a_t tau_t`` with the global
  factor ``g = T / 2`` unless ``global_scale`` is given. Zero-norm task vectors get weight 0.

  Args:
    global_scale: the factor ``g`` (default ``T / 2``).
    norm_of: ``"task_vector"`` or ``"weights"``.

  Returns:
    A :class:`~jaxmerge.base.MergeTransform` (a reduction, ``(T, ...) -> (...)``).

  References:
    Si et al., "NAN: A Training-Free Solution to Coefficient Estimation in Model Merging", 2025.
    https://arxiv.org/abs/2505.16148
  """
  if norm_of not in ("task_vector", "weights"):
    raise ValueError(f"norm_of must be 'task_vector' or 'weights', got {norm_of!r}")

  def apply(coeffs, tree, *, key=None, ctx=None):
    del coeffs, key
    pre = jtree.flatten_paths(context_of(ctx).pretrained) if norm_of == "weights" else None

    def leaf(path, x):
      t = x.shape[0]
      g = t / 2 if global_scale is None else global_scale
      v = x + pre[path][None] if pre is not None else x
      n = _norm(v)
      inv = jnp.where(n > 0, 1.0 / jnp.where(n > 0, n, 1.0), 0.0)
      total = jnp.sum(inv)
      a = jnp.where(total > 0, inv / jnp.where(total > 0, total, 1.0), 0.0)
      return g * task_sum(x, a)

    return jtree.map_with_path(leaf, tree)

  return identified(_empty, apply, REDUCE, "nan_reduce", global_scale, norm_of)


def slerp_reduce(t: float = 0.5, dot_threshold: float = 0.9995, epsilon: float = 1e-8) -> MergeTransform:
  """``(2, ...) -> (...)``: spherical interpolation between two fine-tuned models, leaf by leaf.

  Each leaf of the two *fine-tuned weights* is flattened; if the cosine of their normalized directions
  exceeds ``dot_threshold`` in absolute value the result is linear interpolation, otherwise
  ``sin((1-t) W)/sin(W) v0 + sin(t W)/sin(W) v1`` with ``W = arccos(cos)``. Norms below ``epsilon`` skip
  normalization (FusionBench's rule). Returns the result minus the pretrained leaf.

  Args:
    t: interpolation factor (0: the first model, 1: the second).
    dot_threshold: above this absolute cosine, interpolate linearly.
    epsilon: norms below it skip normalization.

  Returns:
    A :class:`~jaxmerge.base.MergeTransform` (a reduction, ``(2, ...) -> (...)``).

  References:
    Shoemake, "Animating rotation with quaternion curves", SIGGRAPH 1985.
    https://doi.org/10.1145/325165.325242
  """

  def apply(coeffs, tree, *, key=None, ctx=None):
    del coeffs, key
    ctx = context_of(ctx)
    if ctx.pretrained is None:
      raise ValueError("slerp interpolates fine-tuned weights and needs the pretrained model (use jm.merge)")
    pre = jtree.flatten_paths(ctx.pretrained)

    def leaf(path, x):
      if x.shape[0] != 2:
        raise ValueError(f"slerp merges exactly 2 models, got {x.shape[0]} (parameter {path!r})")
      p = pre[path]
      v0, v1 = p + x[0], p + x[1]
      n0, n1 = jnp.linalg.norm(v0.ravel()), jnp.linalg.norm(v1.ravel())
      u0 = jnp.where(n0 > epsilon, v0 / jnp.where(n0 > epsilon, n0, 1.0), v0)
      u1 = jnp.where(n1 > epsilon, v1 / jnp.where(n1 > epsilon, n1, 1.0), v1)
      dot = jnp.sum(u0 * u1)
      lerp = (1 - t) * v0 + t * v1
      omega = jnp.arccos(jnp.clip(dot, -1.0, 1.0))
      so = jnp.sin(omega)
      safe = jnp.where(jnp.abs(dot) > dot_threshold, 1.0, so)
      sl = jnp.sin((1 - t) * omega) / safe * v0 + jnp.sin(t * omega) / safe * v1
      return jnp.where(jnp.abs(dot) > dot_threshold, lerp, sl) - p

    return jtree.map_with_path(leaf, tree)

  return identified(_empty, apply, REDUCE, "slerp_reduce", t, dot_threshold, epsilon)


def model_stock_reduce(average: str = "angle", clamp: bool = False, epsilon: float = 1e-8) -> MergeTransform:
  """``(T, ...) -> (...)``: Model Stock's per-leaf interpolation between the pretrained and the average model.

  Per leaf, the pairwise cosines of the task vectors give ``c`` (``average="angle"``: the cosine of the
  mean pairwise angle, FusionBench's rule; ``"cosine"``: the mean pairwise cosine, the paper's), and the
  ratio ``r = T c / ((T - 1) c + 1 + epsilon)`` gives ``r * mean_t tau_t``. ``clamp=True`` clips ``c`` to
  ``[0, 1]`` (guards the denominator). With one task ``r = 1``. Where the task vectors cancel
  (``(T - 1) c + 1 <= 1e-6``, e.g. two anti-parallel ones) the ratio is undefined and ``r = 0``: the leaf keeps
  the pretrained weights.

  Args:
    average: ``"angle"`` or ``"cosine"`` (see above).
    clamp: clip ``c`` to ``[0, 1]``.
    epsilon: added to the ratio's denominator.

  Returns:
    A :class:`~jaxmerge.base.MergeTransform` (a reduction, ``(T, ...) -> (...)``).

  References:
    Jang et al., "Model Stock: All we need is just a few fine-tuned models", ECCV 2024.
    https://arxiv.org/abs/2403.19522
  """
  if average not in ("angle", "cosine"):
    raise ValueError(f"average must be 'angle' or 'cosine', got {average!r}")

  def apply(coeffs, tree, *, key=None, ctx=None):
    del coeffs, key, ctx

    def leaf(x):
      t = x.shape[0]
      mean = task_mean(x)
      if t == 1:
        return mean
      flat = x.reshape(t, -1)
      sq = jnp.sum(flat * flat, axis=1)
      dots = jnp.dot(flat, flat.T, precision=jax.lax.Precision.HIGHEST)
      cos = jnp.clip(dots / (jnp.sqrt(sq[:, None] * sq[None, :]) + epsilon), -1.0, 1.0)
      iu = jnp.triu_indices(t, k=1)
      pairs = cos[iu]
      c = jnp.cos(jnp.mean(jnp.arccos(pairs))) if average == "angle" else jnp.mean(pairs)
      if clamp:
        c = jnp.clip(c, 0.0, 1.0)
      den = (t - 1) * c + 1
      # Task vectors that cancel (e.g. two anti-parallel ones: c = -1/(T-1)) leave the ratio undefined; the leaf
      # keeps the pretrained weights there (r = 0) instead of an infinite ratio.
      r = jnp.where(den > 1e-6, t * c / (den + epsilon), 0.0)
      return r * mean

    return jax.tree.map(leaf, tree)

  return identified(_empty, apply, REDUCE, "model_stock_reduce", average, clamp, epsilon)
