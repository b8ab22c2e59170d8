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
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxmerge.tta import heads as H
from jaxmerge.tta.adapter import Adapter
from jaxmerge.tta.fit import fit

__all__ = ["apply_surgery", "l1_loss", "surgery", "surgery_adapter"]


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
