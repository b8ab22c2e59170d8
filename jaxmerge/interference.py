"""Cross-task interference (CTI): how far a merged model's representation drifts from each expert's.

For task ``i`` with inputs ``x ~ D_i`` (no labels needed)::

    CTI_i (feature) = E_x [ || z(x; theta_M) - z(x; theta_i) ||^2 / || z(x; theta_i) ||^2 ]
    CTI_i (head)    = E_x || h_i(z(x; theta_M)) - h_i(z(x; theta_i)) ||

The ratio is taken per example, then averaged. With linear heads ``h_i(z) = z @ W_i.T``. This follows the
definition of Resolving Interference (Ramesh et al., arXiv 2603.13467); the lead re-exports it from
``jaxmerge.analysis``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["cross_task_interference"]


@functools.lru_cache(maxsize=16)
def _per_example(forward_fn: Callable[..., Any]) -> Callable[..., Any]:
  @jax.jit
  def run(merged, expert, head, x):
    zm = forward_fn(merged, x).astype(jnp.float32)
    ze = forward_fn(expert, x).astype(jnp.float32)
    diff = zm - ze
    ratio = jnp.sum(jnp.square(diff), axis=-1) / jnp.maximum(jnp.sum(jnp.square(ze), axis=-1), 1e-30)
    head_dist = jnp.linalg.norm(jnp.einsum("bd,cd->bc", diff, head.astype(jnp.float32),
                                           precision=jax.lax.Precision.HIGHEST), axis=-1)
    return ratio, head_dist

  return run


def _batches(inputs: Any) -> list:
  if hasattr(inputs, "shape"):
    return [inputs]
  return list(inputs)


def cross_task_interference(
    forward_fn: Callable[[Any, jax.Array], jax.Array],
    merged_params: Any,
    expert_params_list: Sequence[Any],
    task_batches: Sequence[Any],
    heads: Sequence[Any] | None = None,
) -> dict[str, Any]:
  """Per-task cross-task interference of a merged model against its experts.

  Args:
    forward_fn: ``forward_fn(params, inputs [B, ...]) -> features [B, D]``.
    merged_params: the merged model's parameters.
    expert_params_list: the ``T`` experts' parameters, in task order.
    task_batches: per task, its unlabeled inputs: one array ``[N, ...]`` or a sequence of batches.
    heads: optional ``T`` linear heads ``[C_t, D]`` (a sequence or ``{task: head}`` in task order) for the
      head-space version.

  Returns:
    ``{"feature": float64 [T], "feature_mean": float, "head": float64 [T] or None, "head_mean": float or
    None}`` (means over tasks of the per-task values).

  Raises:
    ValueError: the numbers of experts, task inputs and heads differ.

  References:
    Ramesh et al., "Resolving Interference: Disentangling Models for Improved Model Merging", 2026.
    https://arxiv.org/abs/2603.13467
  """
  t = len(expert_params_list)
  if len(task_batches) != t:
    raise ValueError(f"got {len(task_batches)} task input sets for {t} experts")
  hs = None
  if heads is not None:
    hs = list(heads.values()) if isinstance(heads, dict) else list(heads)
    if len(hs) != t:
      raise ValueError(f"got {len(hs)} heads for {t} experts")
  run = _per_example(forward_fn)
  feature, head = np.zeros(t), np.zeros(t)
  for i in range(t):
    h = jnp.asarray(hs[i]) if hs is not None else jnp.zeros((1, 1), jnp.float32)
    ratios, dists = [], []
    for x in _batches(task_batches[i]):
      if hs is None:
        zdim = jax.eval_shape(forward_fn, merged_params, jnp.asarray(x)).shape[-1]
        h = jnp.zeros((1, zdim), jnp.float32)
      r, d = run(merged_params, expert_params_list[i], h, jnp.asarray(x))
      ratios.append(np.asarray(r, np.float64))
      dists.append(np.asarray(d, np.float64))
    if not ratios or not sum(len(r) for r in ratios):
      raise ValueError(f"task {i} has no inputs")
    feature[i] = np.concatenate(ratios).mean()
    head[i] = np.concatenate(dists).mean()
  out = {"feature": feature, "feature_mean": float(feature.mean()), "head": None, "head_mean": None}
  if hs is not None:
    out["head"], out["head_mean"] = head, float(head.mean())
  return out
