"""Test-time adaptation of masks: Concrete subspace learning (Concrete TA / Concrete AdaMerging) and AdaRank.

Both train a small pytree by entropy minimization on unlabeled test batches of every task (the shared objective
of :mod:`jaxmerge.tta.adamerging`), with the merge built inside the loss and the large arrays (pretrained
weights, task vectors, singular factors) passed as frozen arguments of one compiled optax step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmerge import linalg
from jaxmerge import tree as jtree
from jaxmerge.tta import heads as H
from jaxmerge.tta.adamerging import adamerging, entropy_loss
from jaxmerge.tta.adapter import Adapter
from jaxmerge.tta.fit import fit

__all__ = ["adarank", "adarank_adapter", "concrete", "concrete_adapter", "concrete_mask"]

_U_EPS = 1e-6


def _scores(forward_fn, params, frozen, batch):
  images = jnp.asarray(batch)
  t, b = images.shape[:2]
  z = forward_fn(params, images.reshape((t * b,) + images.shape[2:])).astype(jnp.float32)
  z = z.reshape(t, b, z.shape[-1])
  logits = jnp.einsum("tbd,tcd->tbc", z, frozen["heads"], precision=jax.lax.Precision.HIGHEST)
  return logits, frozen["mask"]


def concrete_mask(logits: dict, temperature: float, key: jax.Array | None) -> dict:
  """Concrete (relaxed Bernoulli) sample ``sigmoid((log(u / (1 - u)) + x) / temperature)`` per entry, or the
  mean mask ``sigmoid(x)`` when ``key`` is ``None``; ``u`` is clipped to ``(1e-6, 1 - 1e-6)``.

  Args:
    logits: ``{path: array}`` mask logits ``x``.
    temperature: the Concrete temperature (positive).
    key: PRNG key for the uniform noise (one independent draw per leaf), or ``None`` for the mean mask.

  Returns:
    ``{path: array}`` masks in ``(0, 1)``, each of its logits' shape.

  References:
    Maddison et al., "The Concrete Distribution", ICLR 2017. https://arxiv.org/abs/1611.00712
  """
  if key is None:
    return {p: jax.nn.sigmoid(x) for p, x in logits.items()}
  out = {}
  for i, (p, x) in enumerate(sorted(logits.items())):
    u = jnp.clip(jax.random.uniform(jax.random.fold_in(key, i), x.shape), _U_EPS, 1 - _U_EPS)
    out[p] = jax.nn.sigmoid((jnp.log(u) - jnp.log1p(-u) + x) / temperature)
  return out


def _masked_tau(tau: dict, mask: dict) -> dict:
  """``tau_t * m / mean(m)`` per leaf (the reference's per-leaf rescale)."""
  return {p: tau[p] * (mask[p] / jnp.mean(mask[p]))[None] for p in tau}


def concrete_adapter(forward_fn: Callable[[Any, jax.Array], jax.Array], pretrained_like: Any, *,
                     scale: float = 0.3, temperature: float = 0.5) -> Adapter:
  """The :class:`Adapter` of Concrete TA: ``theta = {path: mask logits}`` (one mask shared by the tasks, init 0),
  merged model ``theta_0 + scale sum_t tau_t m / mean(m)`` with a fresh Concrete sample ``m`` per step
  (the mean mask ``sigmoid(x)`` when no key is given).

  Args:
    forward_fn: ``forward_fn(params, images [B, ...]) -> features [B, D]`` (jit-compatible).
    pretrained_like: the pretrained pytree or its :class:`~jaxmerge.tta.heads.Structure`.
    scale: the task-arithmetic coefficient.
    temperature: the Concrete temperature.

  Returns:
    The (cached) :class:`Adapter`; its ``apply`` returns ``(logits [T, B, C_max], mask [T, C_max])`` for a
    stacked batch ``[T, B, ...]``, over ``frozen = {"pre", "deltas", "passthrough", "heads", "mask"}``.

  References:
    Tang et al., "Concrete Subspace Learning based Interference Elimination for Multi-task Model Fusion", 2023.
    https://arxiv.org/abs/2312.06173
  """
  return _concrete_adapter(forward_fn, H.structure_of(pretrained_like), float(scale), float(temperature))


@functools.lru_cache(maxsize=16)
def _concrete_adapter(forward_fn, structure, scale, temperature) -> Adapter:
  def init(key, frozen):
    del key
    return {p: jnp.zeros_like(x) for p, x in frozen["pre"].items()}

  def apply(theta, frozen, batch, *, key=None):
    tau = _masked_tau(frozen["deltas"], concrete_mask(theta, temperature, key))
    flat = {p: frozen["pre"][p] + scale * jnp.sum(tau[p], axis=0) for p in frozen["pre"]}
    return _scores(forward_fn, H.assemble(structure, flat, frozen["passthrough"]), frozen, batch)

  return Adapter(init, apply)


def _frozen(pretrained, finetuned, heads):
  pre32, tau, passthrough = H.split_params(pretrained, finetuned)
  num_tasks = next(iter(tau.values())).shape[0]
  hs, mask = H.pad_heads(heads)
  if hs.shape[0] != num_tasks:
    raise ValueError(f"got {hs.shape[0]} heads for {num_tasks} fine-tuned models")
  return {"pre": pre32, "deltas": tau, "passthrough": passthrough, "heads": hs, "mask": mask}, num_tasks


def _bake(flat: dict, pretrained: Any, passthrough: dict) -> Any:
  dtypes = {p: x.dtype for p, x in jtree.flatten_paths(pretrained).items()}
  return H.assemble(pretrained, {p: x.astype(dtypes[p]) for p, x in flat.items()}, passthrough)


def concrete(
    pretrained: Any,
    finetuned: Sequence[Any] | Any,
    forward_fn: Callable[[Any, jax.Array], jax.Array],
    heads: Sequence[Any],
    unlabeled_batches: Any,
    *,
    base: str = "task_arithmetic",
    scale: float = 0.3,
    temperature: float = 0.5,
    optimizer: Any = None,
    steps: int = 2000,
    adamerging_steps: int = 1000,
    mask_type: str = "continuous",
    key: jax.Array,
    layout: Callable[..., Any] | None = None,
    progress: bool = True,
) -> tuple[Any, dict]:
  """Concrete subspace learning: a shared mask over every parameter, trained by entropy minimization.

  Args:
    pretrained: pretrained parameters.
    finetuned: ``T`` fine-tuned models.
    forward_fn: ``forward_fn(params, images) -> features [B, D]``.
    heads: ``T`` frozen heads ``[C_t, D]``.
    unlabeled_batches: stacked ``[T, B, ...]`` batches or ``T`` per-task iterables (``steps`` batches, plus
      ``adamerging_steps`` for Concrete AdaMerging).
    base: ``"task_arithmetic"`` (Concrete TA) or ``"adamerging"`` (then layer-wise AdaMerging on the masked
      task vectors, initial coefficient ``scale``).
    scale: task-arithmetic coefficient (0.3).
    temperature: Concrete temperature (0.5).
    optimizer: optax optimizer over the logits (default Adam 1e-3).
    steps: mask steps (2000 for Concrete TA in the reference; 1000 for Concrete AdaMerging).
    adamerging_steps: AdaMerging steps after the mask (Concrete AdaMerging).
    mask_type: the mask baked in: ``"continuous"`` (``sigmoid(x)``) or ``"discrete"`` (``sigmoid(x) > 0.5``).
    key: PRNG key.
    layout: matrix layout (for AdaMerging's merge context).
    progress: progress bars.

  Returns:
    ``(merged, history)`` with ``history = {"loss": [steps], "mask_density": fraction of mask > 0.5, ...}``.
    With zero steps the continuous mask is constant (0.5), so the result is task arithmetic at ``scale``.

  References:
    Tang et al., "Concrete Subspace Learning based Interference Elimination for Multi-task Model Fusion", 2023.
    https://arxiv.org/abs/2312.06173
  """
  from jaxmerge.tta.methods import adam  # noqa: PLC0415

  if base not in ("task_arithmetic", "adamerging"):
    raise ValueError(f"base must be 'task_arithmetic' or 'adamerging', got {base!r}")
  if mask_type not in ("continuous", "discrete"):
    raise ValueError(f"mask_type must be 'continuous' or 'discrete', got {mask_type!r}")
  if not temperature > 0:
    raise ValueError(f"temperature must be positive, got {temperature}")
  frozen, num_tasks = _frozen(pretrained, finetuned, heads)
  adapter = concrete_adapter(forward_fn, pretrained, scale=scale, temperature=temperature)
  tx = optimizer if optimizer is not None else adam(1e-3)
  batches = H.task_batches(unlabeled_batches, num_tasks)
  k_fit, k_ada = jax.random.split(key)
  theta, history = fit(adapter, frozen, tx, batches, entropy_loss, key=k_fit, steps=steps, progress=progress,
                       desc="Concrete mask")
  probs = concrete_mask(theta, temperature, None)
  mask = probs if mask_type == "continuous" else {p: (x > 0.5).astype(jnp.float32) for p, x in probs.items()}
  tau = _masked_tau(frozen["deltas"], mask)
  total = sum(int(x.size) for x in probs.values())
  history["mask_density"] = float(sum(float(jnp.sum(x > 0.5)) for x in probs.values()) / total)
  if base == "task_arithmetic":
    flat = {p: frozen["pre"][p] + scale * jnp.sum(tau[p], axis=0) for p in frozen["pre"]}
    return _bake(flat, pretrained, frozen["passthrough"]), history
  masked_models = {p: frozen["pre"][p][None] + tau[p] for p in frozen["pre"]}
  stacked = jtree.unflatten_paths(pretrained, {**{p: jnp.broadcast_to(x[None], (num_tasks,) + x.shape)
                                                  for p, x in frozen["passthrough"].items()}, **masked_models})
  merged, h2 = adamerging(pretrained, stacked, forward_fn, heads, batches, granularity="layer", init_scale=scale,
                          optimizer=tx, steps=adamerging_steps, key=k_ada, layout=layout, progress=progress)
  history["adamerging_loss"] = h2["loss"]
  history["coeffs"] = h2["coeffs"]
  return merged, history


# ---- AdaRank --------------------------------------------------------------------------------------------------


def _is_matrix(x) -> bool:
  return x.ndim == 3 and min(x.shape[1:]) > 1  # [T, m, n]


def adarank_factors(tau: dict) -> dict:
  """Thin SVDs ``{path: Factors u [T, m, r], s [T, r], vt [T, r, n]}`` of every matrix task vector
  (:func:`jaxmerge.linalg.thin_svd`, computed once)."""
  out = {}
  for p, x in tau.items():
    if _is_matrix(x):
      fs = [linalg.thin_svd(x[t]) for t in range(x.shape[0])]
      out[p] = linalg.Factors(*(jnp.stack(a) for a in zip(*fs)))
  return out


def _ste_mask(z: jax.Array, temperature: float) -> jax.Array:
  s = jax.nn.sigmoid(z / temperature)
  hard = (s > 0.5).astype(s.dtype)
  return hard + (s - jax.lax.stop_gradient(s))  # exactly binary in the forward pass


def adarank_adapter(forward_fn: Callable[[Any, jax.Array], jax.Array], pretrained_like: Any, *,
                    init_scale: float = 0.3, temperature: float = 10.0, init_logit: float = 1.0) -> Adapter:
  """The :class:`Adapter` of AdaRank over ``frozen = {"pre", "deltas", "factors", "passthrough", "heads",
  "mask"}``: ``theta = {"coef": {path: [T]}, "mask": {path: [T, r]}}``; a matrix leaf is
  ``theta_0 + sum_t coef_t U_t diag(B_t * S_t) V_t^T`` with ``B_t = round(sigmoid(z_t / temperature))`` in the
  forward pass and the sigmoid's gradient in the backward pass (straight-through); other leaves
  ``theta_0 + sum_t coef_t tau_t``. Initially every component is kept (``z = init_logit > 0``).

  Args:
    forward_fn: ``forward_fn(params, images [B, ...]) -> features [B, D]`` (jit-compatible).
    pretrained_like: the pretrained pytree or its :class:`~jaxmerge.tta.heads.Structure`.
    init_scale: initial coefficient ``coef_t`` of every leaf.
    temperature: the sigmoid temperature of the rank mask.
    init_logit: initial mask logit ``z`` of every singular component.

  Returns:
    The (cached) :class:`Adapter`; its ``apply`` returns ``(logits [T, B, C_max], mask [T, C_max])`` for a
    stacked batch ``[T, B, ...]``.

  References:
    Lee et al., "AdaRank: Adaptive Rank Pruning for Enhanced Multi-Task Model Merging", 2025.
    https://arxiv.org/abs/2503.22178
  """
  return _adarank_adapter(forward_fn, H.structure_of(pretrained_like), float(init_scale), float(temperature),
                          float(init_logit))[0]


@functools.lru_cache(maxsize=16)
def _adarank_adapter(forward_fn, structure, init_scale, temperature, init_logit) -> Adapter:
  def init(key, frozen):
    del key
    t = next(iter(frozen["deltas"].values())).shape[0]
    return {"coef": {p: jnp.full((t,), init_scale, jnp.float32) for p in frozen["pre"]},
            "mask": {p: jnp.full(f.s.shape, init_logit, jnp.float32) for p, f in frozen["factors"].items()}}

  def merged(theta, frozen):
    flat = {}
    for p, pre in frozen["pre"].items():
      c = theta["coef"][p]
      if p in frozen["factors"]:
        f = frozen["factors"][p]
        b = _ste_mask(theta["mask"][p], temperature)
        s = c[:, None] * b * f.s  # [T, r]
        flat[p] = pre + jnp.einsum("tmr,tr,trn->mn", f.u, s, f.vt, precision=jax.lax.Precision.HIGHEST)
      else:
        flat[p] = pre + jnp.tensordot(c, frozen["deltas"][p], axes=1, precision=jax.lax.Precision.HIGHEST)
    return flat

  def apply(theta, frozen, batch, *, key=None):
    del key
    return _scores(forward_fn, H.assemble(structure, merged(theta, frozen), frozen["passthrough"]), frozen, batch)

  return Adapter(init, apply), merged


def adarank(
    pretrained: Any,
    finetuned: Sequence[Any] | Any,
    forward_fn: Callable[[Any, jax.Array], jax.Array],
    heads: Sequence[Any],
    unlabeled_batches: Any,
    *,
    init_scale: float = 0.3,
    temperature: float = 10.0,
    optimizer: Any = None,
    steps: int = 1000,
    key: jax.Array,
    progress: bool = True,
) -> tuple[Any, dict]:
  """AdaRank on task arithmetic: binary keep/prune masks over the singular components of every matrix task
  vector and layer-wise coefficients, learned by entropy minimization with straight-through gradients.

  Args:
    pretrained: pretrained parameters.
    finetuned: ``T`` fine-tuned models.
    forward_fn: ``forward_fn(params, images) -> features [B, D]``.
    heads: ``T`` frozen heads ``[C_t, D]``.
    unlabeled_batches: stacked ``[T, B, ...]`` batches or ``T`` per-task iterables.
    init_scale: initial coefficient (0.3: with zero steps the result is task arithmetic at this scale).
    temperature: mask temperature (10, the reference's).
    optimizer: optax optimizer (default Adam 1e-3).
    steps: optimizer steps.
    key: PRNG key.
    progress: progress bar.

  Returns:
    ``(merged, history)`` with the loss curve and ``"kept_fraction"`` (kept components / all components).

  References:
    Lee et al., "AdaRank: Adaptive Rank Pruning for Enhanced Multi-Task Model Merging", 2025.
    https://arxiv.org/abs/2503.22178
  """
  from jaxmerge.tta.methods import adam  # noqa: PLC0415

  if not temperature > 0:
    raise ValueError(f"temperature must be positive, got {temperature}")
  frozen, num_tasks = _frozen(pretrained, finetuned, heads)
  frozen["factors"] = adarank_factors(frozen["deltas"])
  adapter, merged_fn = adarank_adapter_and_merge(forward_fn, pretrained, init_scale, temperature)
  tx = optimizer if optimizer is not None else adam(1e-3)
  theta, history = fit(adapter, frozen, tx, H.task_batches(unlabeled_batches, num_tasks), entropy_loss, key=key,
                       steps=steps, progress=progress, desc="AdaRank")
  flat = jax.jit(merged_fn)(theta, frozen)
  kept = sum(float(jnp.sum(theta["mask"][p] > 0)) for p in theta["mask"])
  total = sum(int(theta["mask"][p].size) for p in theta["mask"])
  history["kept_fraction"] = kept / max(total, 1)
  history["theta"] = jax.device_get(theta)
  return _bake(flat, pretrained, frozen["passthrough"]), history


def adarank_adapter_and_merge(forward_fn, pretrained_like, init_scale=0.3, temperature=10.0, init_logit=1.0):
  """``(adapter, merged_flat(theta, frozen))`` of :func:`adarank_adapter` (cached per arguments)."""
  return _adarank_adapter(forward_fn, H.structure_of(pretrained_like), float(init_scale), float(temperature),
                          float(init_logit))
