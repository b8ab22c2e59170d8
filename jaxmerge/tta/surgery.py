"""Representation Surgery: per-task bottleneck adapters that remove the merged model's representation bias.

Task ``t``'s feature is ``h_t = h_M - W_up^t ReLU(W_down^t h_M)`` with ``h_M = forward_fn(merged, x)``; the
adapters are trained so that ``h_t`` matches the fine-tuned model's feature ``forward_fn(theta_t, x)`` (L1, as
the reference) on unlabeled test inputs of every task. The merged weights are untouched; inference needs the
task id. ``W_up`` starts at zero, so an untrained surgery is the identity.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from jaxmerge.tta import heads as H
from jaxmerge.tta.adapter import Adapter
from jaxmerge.tta.fit import fit

__all__ = ["SurgeryModel", "apply_surgery", "feature_adapter", "l1_loss", "surgery", "surgery_adapter",
           "surgery_from_features"]


class SurgeryModel(NamedTuple):
  """A merged model with Representation Surgery adapters (what ``run_method("surgery", ...)`` returns).

  Attributes:
    merged: the merged parameters (untouched by the surgery).
    adapters: ``{"down": [T, r, D], "up": [T, D, r]}`` (see :func:`apply_surgery`).
  """

  merged: Any
  adapters: dict

  def features(self, forward_fn: Callable[[Any, jax.Array], jax.Array], inputs: jax.Array,
               task: int) -> jax.Array:
    """Task ``task``'s corrected features ``apply_surgery(adapters, task, forward_fn(merged, inputs))``.

    Args:
      forward_fn: ``forward_fn(params, inputs) -> features [B, D]``.
      inputs: a batch of inputs of task ``task``.
      task: the task id.

    Returns:
      float32 features ``[B, D]``.
    """
    return apply_surgery(self.adapters, task, forward_fn(self.merged, inputs))

  @property
  def num_trainable(self) -> int:
    """The number of trained adapter parameters (``2 T r D``)."""
    return int(sum(np.size(x) for x in jax.tree.leaves(self.adapters)))


def apply_surgery(adapters: dict, task: int, features: Float[Array, "B D"]) -> Float[Array, "B D"]:
  """``h - W_up ReLU(W_down h)`` with task ``task``'s adapter (``adapters = {"down": [T, r, D], "up": [T, D, r]}``).

  Args:
    adapters: the trained adapters of :func:`surgery`.
    task: the task id ``t`` (an index into the leading axis).
    features: the merged model's features ``[B, D]``.

  Returns:
    float32 corrected features ``[B, D]``.

  References:
    Yang et al., "Representation Surgery for Multi-Task Model Merging", ICML 2024.
    https://arxiv.org/abs/2402.02705
  """
  h = jnp.asarray(features, jnp.float32)
  hp = jax.lax.Precision.HIGHEST
  mid = jax.nn.relu(jnp.einsum("rd,bd->br", adapters["down"][task], h, precision=hp))
  return h - jnp.einsum("dr,br->bd", adapters["up"][task], mid, precision=hp)


def _surgery_all(adapters: dict, z: jax.Array) -> jax.Array:
  hp = jax.lax.Precision.HIGHEST
  mid = jax.nn.relu(jnp.einsum("trd,tbd->tbr", adapters["down"], z, precision=hp))
  return z - jnp.einsum("tdr,tbr->tbd", adapters["up"], mid, precision=hp)


def surgery_adapter(forward_fn: Callable[[Any, jax.Array], jax.Array], *, rank: int = 16) -> Adapter:
  """The :class:`Adapter` over ``frozen = {"merged": params, "experts": stacked params [T, ...]}``:
  ``apply`` returns ``(surgery features [T, B, D], expert features [T, B, D])`` for a batch ``[T, B, ...]``.
  ``init`` draws ``W_down ~ N(0, 1/D)`` and sets ``W_up = 0``.

  ``frozen`` also holds ``"dim"``, a ``[D]`` array whose length gives the feature size (see :func:`surgery`).

  Args:
    forward_fn: ``forward_fn(params, images [B, ...]) -> features [B, D]`` (jit-compatible).
    rank: the bottleneck size ``r``.

  Returns:
    The (cached) :class:`Adapter`; ``theta = {"down": [T, r, D], "up": [T, D, r]}``.

  References:
    Yang et al., "Representation Surgery for Multi-Task Model Merging", ICML 2024.
    https://arxiv.org/abs/2402.02705
  """
  return _surgery_adapter(forward_fn, int(rank))


@functools.lru_cache(maxsize=16)
def _surgery_adapter(forward_fn, rank) -> Adapter:
  def features(frozen, batch):
    x = jnp.asarray(batch)
    t, b = x.shape[:2]
    z = forward_fn(frozen["merged"], x.reshape((t * b,) + x.shape[2:])).astype(jnp.float32)
    return z.reshape(t, b, z.shape[-1])

  def init(key, frozen):
    t = jax.tree.leaves(frozen["experts"])[0].shape[0]
    d = frozen["dim"].shape[0]
    return {"down": jax.random.normal(key, (t, rank, d), jnp.float32) / jnp.sqrt(d),
            "up": jnp.zeros((t, d, rank), jnp.float32)}

  def apply(theta, frozen, batch, *, key=None):
    del key
    z = features(frozen, batch)
    target = jax.vmap(lambda p, x: forward_fn(p, x).astype(jnp.float32))(frozen["experts"], jnp.asarray(batch))
    return _surgery_all(theta, z), jax.lax.stop_gradient(target)

  return Adapter(init, apply)


def feature_adapter(*, rank: int = 16) -> Adapter:
  """:func:`surgery_adapter` on precomputed features: a batch is ``(merged features [T, B, D], expert features
  [T, B, D])`` and ``frozen = {"num_tasks": [T], "dim": [D]}`` (arrays whose lengths give the sizes).

  The models are frozen and deterministic, so training on features computed once equals training with the
  forward passes inside the step (same initialization: ``W_down ~ N(0, 1/D)``, ``W_up = 0``).

  Args:
    rank: the bottleneck size ``r``.

  Returns:
    The (cached) :class:`Adapter`; ``apply`` returns ``(surgery features [T, B, D], expert features)``.

  References:
    Yang et al., "Representation Surgery for Multi-Task Model Merging", ICML 2024.
    https://arxiv.org/abs/2402.02705
  """
  return _feature_adapter(int(rank))


@functools.lru_cache(maxsize=16)
def _feature_adapter(rank) -> Adapter:
  def init(key, frozen):
    t, d = frozen["num_tasks"].shape[0], frozen["dim"].shape[0]
    return {"down": jax.random.normal(key, (t, rank, d), jnp.float32) / jnp.sqrt(d),
            "up": jnp.zeros((t, d, rank), jnp.float32)}

  def apply(theta, frozen, batch, *, key=None):
    del frozen, key
    z, target = batch
    return _surgery_all(theta, jnp.asarray(z, jnp.float32)), jnp.asarray(target, jnp.float32)

  return Adapter(init, apply)


def l1_loss(out, batch) -> jax.Array:
  """``sum_t mean_b ||h_t - target_t||_1`` (the reference's L1 objective, summed over tasks).

  Args:
    out: ``(h [T, B, D], target [T, B, D])``, the output of :func:`surgery_adapter`'s ``apply``.
    batch: unused (the loss signature of :func:`jaxmerge.tta.fit`).

  Returns:
    The scalar loss.

  References:
    Yang et al., "Representation Surgery for Multi-Task Model Merging", ICML 2024.
    https://arxiv.org/abs/2402.02705
  """
  del batch
  h, target = out
  return jnp.sum(jnp.mean(jnp.sum(jnp.abs(h - target), axis=-1), axis=1))


def surgery(
    merged: Any,
    finetuned: Sequence[Any],
    forward_fn: Callable[[Any, jax.Array], jax.Array],
    unlabeled_batches: Any,
    *,
    rank: int = 16,
    optimizer: Any = None,
    steps: int = 1000,
    key: jax.Array,
    progress: bool = True,
) -> tuple[dict, dict]:
  """Trains Representation Surgery adapters on top of a merged model.

  Args:
    merged: the merged parameters (e.g. AdaMerging's), left untouched.
    finetuned: the ``T`` fine-tuned models (their features are the targets).
    forward_fn: ``forward_fn(params, images) -> features [B, D]``.
    unlabeled_batches: stacked ``[T, B, ...]`` batches or ``T`` per-task iterables.
    rank: bottleneck size (16).
    optimizer: optax optimizer (default Adam 1e-3).
    steps: optimizer steps (1000 in the reference).
    key: PRNG key (initialization of ``W_down``).
    progress: progress bar.

  Returns:
    ``(adapters, history)``: ``{"down": [T, r, D], "up": [T, D, r]}`` for :func:`apply_surgery`, and the L1
    loss curve.

  References:
    Yang et al., "Representation Surgery for Multi-Task Model Merging", ICML 2024.
    https://arxiv.org/abs/2402.02705
  """
  from jaxmerge.tta.methods import adam  # noqa: PLC0415

  if rank < 1:
    raise ValueError(f"rank must be >= 1, got {rank}")
  fts = list(finetuned)
  if not fts:
    raise ValueError("surgery needs the fine-tuned models (their features are the targets)")
  experts = jax.tree.map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *fts)
  batches = H.task_batches(unlabeled_batches, len(fts))
  first = next(iter(batches), None)
  if first is None or jnp.shape(first)[1] == 0:
    raise ValueError("surgery needs unlabeled inputs of every task (got no batch, or an empty one)")
  dim = jax.eval_shape(lambda p, x: forward_fn(p, x), merged, jnp.asarray(first)[0]).shape[-1]
  frozen = {"merged": merged, "experts": experts, "dim": jnp.zeros((dim,), jnp.float32)}
  tx = optimizer if optimizer is not None else adam(1e-3)
  return fit(surgery_adapter(forward_fn, rank=rank), frozen, tx, itertools.chain([first], batches), l1_loss,
             key=key, steps=steps, progress=progress, desc="Surgery")


def _feature_batches(merged_features: list, expert_features: list, batch_size: int, key: jax.Array):
  b = min([batch_size] + [len(z) for z in merged_features])
  rngs = [np.random.default_rng(np.asarray(jax.random.key_data(jax.random.fold_in(key, t))).ravel().tolist())
          for t in range(len(merged_features))]

  def indices(t):
    n = len(merged_features[t])
    while True:
      order = rngs[t].permutation(n)
      for i in range(0, n - b + 1, b):
        yield order[i:i + b]

  its = [indices(t) for t in range(len(merged_features))]
  while True:
    idx = [next(i) for i in its]
    yield (np.stack([z[j] for z, j in zip(merged_features, idx)]),
           np.stack([z[j] for z, j in zip(expert_features, idx)]))


def surgery_from_features(
    merged_features: Any,
    expert_features: Any,
    *,
    rank: int = 16,
    optimizer: Any = None,
    steps: int = 1000,
    batch_size: int = 16,
    key: jax.Array,
    progress: bool = False,
) -> tuple[dict, dict]:
  """Trains Representation Surgery adapters on features computed once: ``merged_features[t]`` are the merged
  model's features of task ``t``'s unlabeled inputs and ``expert_features[t]`` the fine-tuned model ``t``'s on
  the same inputs. Each step draws ``min(batch_size, min_t N_t)`` shuffled rows per task (each task's epochs run
  over its own rows; deterministic under ``key``).

  Args:
    merged_features: ``T`` arrays ``[N_t, D]`` (or one ``[T, N, D]`` array) of merged-model features.
    expert_features: the expert features (the targets), of the same shapes.
    rank: bottleneck size (16).
    optimizer: optax optimizer (default Adam 1e-3).
    steps: optimizer steps (1000 in the reference).
    batch_size: rows per task per step (16).
    key: PRNG key (split into the shuffles and :func:`jaxmerge.tta.fit`'s key).
    progress: progress bar.

  Returns:
    ``(adapters, history)`` as :func:`surgery`.

  Raises:
    ValueError: feature arrays of different shapes or not ``[N_t, D]``, a task without rows, or ``rank < 1``.

  References:
    Yang et al., "Representation Surgery for Multi-Task Model Merging", ICML 2024.
    https://arxiv.org/abs/2402.02705
  """
  from jaxmerge.tta.methods import adam  # noqa: PLC0415

  if rank < 1:
    raise ValueError(f"rank must be >= 1, got {rank}")
  zm = [np.asarray(z, np.float32) for z in merged_features]
  ze = [np.asarray(z, np.float32) for z in expert_features]
  shapes = [z.shape for z in zm]
  if not zm or len(zm) != len(ze) or shapes != [z.shape for z in ze] or any(len(s) != 2 for s in shapes) or \
      len({s[1] for s in shapes}) != 1:
    raise ValueError(f"merged and expert features must be T matching [N_t, D] arrays, got {shapes} and "
                     f"{[z.shape for z in ze]}")
  if any(s[0] == 0 for s in shapes):
    raise ValueError(f"surgery needs unlabeled inputs of every task (a task has no feature rows: {shapes})")
  k_data, k_fit = jax.random.split(key)
  frozen = {"num_tasks": jnp.zeros((len(zm),), jnp.float32), "dim": jnp.zeros((shapes[0][1],), jnp.float32)}
  tx = optimizer if optimizer is not None else adam(1e-3)
  return fit(feature_adapter(rank=rank), frozen, tx, _feature_batches(zm, ze, batch_size, k_data), l1_loss,
             key=k_fit, steps=steps, progress=progress, desc="Surgery")
