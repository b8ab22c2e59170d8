"""Unsupervised losses of test-time adaptation and distillation, in float32, with padded classes masked.

Padded classes (heads padded to a common class count ``C_max``) are given by a boolean ``mask`` (``True`` =
real class). Masked logits are set to ``-inf`` before ``log_softmax`` and their terms are zeroed with
``where`` so that neither values nor gradients pick up NaNs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

__all__ = ["entropy", "kl_divergence", "mse"]


def _masked(logits: jax.Array, mask: jax.Array | None) -> jax.Array:
  logits = jnp.asarray(logits, jnp.float32)
  if mask is None:
    return logits
  return jnp.where(jnp.broadcast_to(mask, logits.shape), logits, -jnp.inf)


def _log_probs(logits: jax.Array, mask: jax.Array | None) -> tuple[jax.Array, jax.Array]:
  x = _masked(logits, mask)
  logp = jax.nn.log_softmax(x, axis=-1)
  valid = jnp.isfinite(logp)
  return jnp.where(valid, logp, 0.0), valid


def entropy(logits: Float[Array, "*batch C"], mask: Bool[Array, "*batch C"] | None = None) -> Float[Array, "*batch"]:
  """Shannon entropy ``-sum_c p_c log p_c`` of ``softmax(logits)`` per row (AdaMerging's objective).

  Args:
    logits: ``[..., C]`` logits (any float dtype; computed in float32).
    mask: optional boolean ``[..., C]`` (broadcastable) marking real classes; padded classes get ``-inf``.

  Returns:
    ``[...]`` entropies in nats (take the mean over the batch for a loss).

  References:
    Yang et al., "AdaMerging: Adaptive Model Merging for Multi-Task Learning", ICLR 2024.
    https://arxiv.org/abs/2310.02575
  """
  logp, valid = _log_probs(logits, mask)
  p = jnp.where(valid, jnp.exp(logp), 0.0)
  return -jnp.sum(p * logp, axis=-1)


@jax.custom_vjp
def _kl_rows(p: jax.Array, q: jax.Array, valid: jax.Array) -> jax.Array:
  return _kl_fwd(p, q, valid)[0]


def _kl_fwd(p, q, valid):
  logp = jnp.where(valid, jax.nn.log_softmax(p, axis=-1), 0.0)
  logq = jnp.where(valid, jax.nn.log_softmax(q, axis=-1), 0.0)
  pp = jnp.where(valid, jnp.exp(logp), 0.0)
  qq = jnp.where(valid, jnp.exp(logq), 0.0)
  kl = jnp.sum(pp * (logp - logq), axis=-1)
  return kl, (pp, qq, logp, logq, kl, valid)


def _kl_bwd(res, g):
  # d/dq = softmax(q) - softmax(p), both computed the same way, so that identical inputs give an exact zero
  # gradient (autodiff's form q * sum(p) - p leaves rounding noise that Adam would amplify).
  pp, qq, logp, logq, kl, valid = res
  g = g[..., None]
  dq = jnp.where(valid, g * (qq - pp), 0.0)
  dp = jnp.where(valid, g * pp * (logp - logq - kl[..., None]), 0.0)
  return dp, dq, None


_kl_rows.defvjp(_kl_fwd, _kl_bwd)


def kl_divergence(
    p_logits: Float[Array, "*batch C"],
    q_logits: Float[Array, "*batch C"],
    temperature: float = 1.0,
    mask: Bool[Array, "*batch C"] | None = None,
) -> Float[Array, "*batch"]:
  """``KL(softmax(p / T) || softmax(q / T))`` per row; ``p`` is the target (teacher), ``q`` the model.

  No ``T**2`` factor is applied (multiply by it yourself for Hinton-style distillation). The gradient with
  respect to ``q`` is ``(softmax(q / T) - softmax(p / T)) / T`` computed so that it is exactly zero when the
  two logits agree.

  Args:
    p_logits: target logits ``[..., C]``.
    q_logits: model logits ``[..., C]``.
    temperature: softmax temperature ``T > 0``.
    mask: optional boolean mask of real classes.

  Returns:
    ``[...]`` non-negative divergences in nats.
  """
  if not temperature > 0:
    raise ValueError(f"temperature must be positive, got {temperature}")
  t = jnp.float32(temperature)
  p = _masked(jnp.asarray(p_logits, jnp.float32) / t, mask)
  q = _masked(jnp.asarray(q_logits, jnp.float32) / t, mask)
  valid = jnp.isfinite(p) & jnp.isfinite(q)
  return _kl_rows(p, q, valid)


def mse(
    a: Float[Array, "*batch C"], b: Float[Array, "*batch C"], mask: Bool[Array, "*batch C"] | None = None
) -> Float[Array, "*batch"]:
  """Mean squared difference over the last axis (over the real classes when ``mask`` is given).

  Args:
    a: predictions ``[..., C]``.
    b: targets ``[..., C]``.
    mask: optional bool ``[..., C]`` (broadcastable) real-class mask.

  Returns:
    float32 ``[...]``: the mean over ``C`` (over the masked-in classes, at least one counted).
  """
  d = jnp.square(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32))
  if mask is None:
    return jnp.mean(d, axis=-1)
  m = jnp.broadcast_to(mask, d.shape)
  return jnp.sum(jnp.where(m, d, 0.0), axis=-1) / jnp.maximum(jnp.sum(m, axis=-1), 1)
