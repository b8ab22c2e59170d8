"""Models that keep a shared part plus compressed task experts, selected by a task id or mixed by a router.

A :class:`ExpertModel` holds a base parameter tree and, per leaf, the compressed task-specific parts of ``T``
experts. Its parameters for routing weights ``w (T,)`` are ``base + sum_t w_t delta_t`` (materialized inside
the compiled program, never stored per task), and it is called like the plain model plus a task id or
per-sample routing weights. Expert kinds (per leaf, chosen by the builders below):

- ``"dense"``: ``delta_t`` stored as is ``(T, ...)`` (small vector leaves).
- ``"lowrank"``: ``delta_t = a_t @ b_t`` with ``a (T, m, k)``, ``b (T, k, n)`` (TSV-C, BYOM-LoRA, Twin).
- ``"masked"``: ``delta_t = scale_t * mask_t * vec`` with one shared ``vec`` and bit-masks (EMR, TALL).
- ``"sparse"``: ``delta_t = scale_t * where(mask_t, values_t, 0)`` (BYOM-FFT residuals, FREE experts; the
  values are held densely in memory, storage counts them as a sparse format would: values plus a bit-mask).

Builders: :func:`emr_model`, :func:`tall_model`, :func:`low_rank_model` (``tsv_c``, ``byom_lora``),
:func:`byom_model` (BYOM-FFT), :func:`twin_model`, :func:`free_model`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

import jaxmerge as jm
from jaxmerge import linalg, stats
from jaxmerge import reductions as R
from jaxmerge import transforms as T
from jaxmerge import tree as jtree
from jaxmerge.moe import math as mm

__all__ = ["ExpertModel", "byom_model", "emr_model", "free_backbone", "free_model", "low_rank_model",
           "tall_model", "train_router", "twin_model"]

HIGHEST = jax.lax.Precision.HIGHEST
Params = Any


def _stack(pretrained: Params, finetuned: Sequence[Params] | Params) -> tuple[dict, dict, Params]:
  """Flat float32 ``{path: array}`` of the pretrained model and ``{path: (T, ...)}`` task vectors."""
  if isinstance(finetuned, (list, tuple)):
    if not finetuned:
      raise ValueError("no fine-tuned models given")
    jtree.check_compatible(pretrained, list(finetuned))
    finetuned = jtree.stack(list(finetuned))
  pre = {p: jnp.asarray(x, jnp.float32) for p, x in jtree.flatten_paths(pretrained).items()}
  ft = jtree.flatten_paths(finetuned)
  if set(ft) != set(pre):
    raise ValueError(f"fine-tuned stack paths differ from the pretrained model's: {sorted(set(ft) ^ set(pre))[:5]}")
  tau = {p: jnp.asarray(ft[p], jnp.float32) - pre[p][None] for p in pre}
  return pre, tau, pretrained


@dataclasses.dataclass(frozen=True)
class ExpertModel:
  """A shared model plus ``T`` compressed experts; call it with a task id or routing weights.

  Attributes:
    apply_fn: ``apply_fn(params, images) -> outputs`` of the plain model (e.g. the suite's ``embed``).
    like: the pretrained parameter tree (structure and dtypes of the materialized parameters).
    base: ``{path: array}`` shared parameters.
    experts: ``{path: (kind, arrays)}`` (see the module docstring); leaves without experts use ``base``.
    num_tasks: ``T``.
    router: optional ``(router_params, feature_fn)``: ``feature_fn(params, images) -> [B, F]`` is evaluated
      with the shared parameters and :func:`jaxmerge.moe.math.router_logits` of it gives ``[B, T]`` logits
      (softmaxed). Used when no task id is given.
    name: method name (messages, reports).
  """

  apply_fn: Callable[..., Any]
  like: Any
  base: dict
  experts: dict
  num_tasks: int
  router: Any = None
  name: str = "model"

  def __post_init__(self):
    if self.router is not None:
      out = np.shape(self.router[0][-1]["bias"])
      if out != (self.num_tasks,):
        raise ValueError(f"{self.name}: the router has {out[-1] if out else 0} outputs for {self.num_tasks} experts")
    for p, (kind, arrs) in self.experts.items():
      lead = {np.shape(a)[0] for k, a in arrs.items() if k != "vec"}
      if p not in self.base or lead != {self.num_tasks}:
        raise ValueError(f"{self.name}: experts at {p!r} do not match the base model or {self.num_tasks} tasks")

  # ---- parameters
  def delta(self, weights: Float[Array, " T"]) -> dict:
    """``{path: sum_t weights_t delta_t}`` for every leaf with experts."""
    out = {}
    for p, (kind, arrs) in self.experts.items():
      if kind == "dense":
        out[p] = jnp.einsum("t,t...->...", weights, arrs["delta"], precision=HIGHEST)
      elif kind == "lowrank":
        out[p] = jnp.einsum("tmk,tkn->mn", arrs["a"] * weights[:, None, None], arrs["b"], precision=HIGHEST)
      elif kind == "masked":
        w = jnp.einsum("t,t...->...", weights * arrs["scale"], arrs["mask"].astype(jnp.float32), precision=HIGHEST)
        out[p] = w * arrs["vec"]
      elif kind == "sparse":
        vals = jnp.where(arrs["mask"], arrs["values"], 0.0)
        out[p] = jnp.einsum("t,t...->...", weights * arrs["scale"], vals, precision=HIGHEST)
      else:
        raise ValueError(f"{self.name}: unknown expert kind {kind!r} at {p}")
    return out

  def params(self, weights: Float[Array, " T"]) -> Params:
    """The parameters ``base + sum_t weights_t delta_t`` as a tree like the pretrained model."""
    d = self.delta(jnp.asarray(weights, jnp.float32))
    like = jtree.flatten_paths(self.like)
    flat = {p: (self.base[p] + d[p] if p in d else self.base[p]).astype(jnp.asarray(like[p]).dtype) for p in like}
    return jtree.unflatten_paths(self.like, flat)

  def task_params(self, task_id: int | jax.Array) -> Params:
    """Task ``task_id``'s model (one-hot routing). A concrete out-of-range id raises ``ValueError``; a traced
    one gives NaN parameters (there is no error inside a compiled program)."""
    return self.params(self._one_hot(task_id))

  def _one_hot(self, task_id) -> jax.Array:
    if not isinstance(task_id, jax.core.Tracer):
      tid = np.asarray(task_id)
      if tid.ndim != 0 or not np.issubdtype(tid.dtype, np.integer) or not 0 <= int(tid) < self.num_tasks:
        raise ValueError(f"{self.name}: unknown task id {task_id!r}; valid ids are 0..{self.num_tasks - 1}")
    tid = jnp.asarray(task_id)
    valid = (tid >= 0) & (tid < self.num_tasks)
    return jnp.where(valid, jax.nn.one_hot(tid, self.num_tasks, dtype=jnp.float32), jnp.nan)

  # ---- inference
  def routing(self, images) -> Float[Array, "B T"]:
    """Per-sample routing weights ``softmax(router(features(shared model, images)))``."""
    if self.router is None:
      raise ValueError(f"{self.name} has no router: call it with task_id=")
    router, feature_fn = self.router
    shared = self.params(jnp.zeros((self.num_tasks,), jnp.float32))
    return jax.nn.softmax(mm.router_logits(router, feature_fn(shared, images)), axis=-1)

  def __call__(self, images, task_id: int | jax.Array | None = None, *, weights=None, per_sample: bool = True):
    """Outputs of the model for ``images``.

    Args:
      images: the plain model's input batch.
      task_id: a task id (the task's model); ``None``: the router (or ``weights``) chooses.
      weights: routing weights ``[B, T]`` (or ``[T]`` for the batch) instead of the router's.
      per_sample: with router weights, materialize parameters per sample (exact, memory ``B x model``);
        ``False`` averages the weights over the batch (one parameter set; single-task batches).
    """
    if task_id is not None:
      return self.apply_fn(self.task_params(task_id), images)
    w = self.routing(images) if weights is None else jnp.asarray(weights, jnp.float32)
    if w.ndim == 1:
      return self.apply_fn(self.params(w), images)
    if not per_sample:
      return self.apply_fn(self.params(jnp.mean(w, axis=0)), images)
    one = lambda wb, xb: self.apply_fn(self.params(wb), xb[None])[0]  # noqa: E731
    return jax.vmap(one)(w, images)

  # ---- accounting
  def extra_params(self) -> int:
    """Numbers stored beyond one plain model: expert tensors (masks count as bits / 32, sparse values by
    their nonzero count), the shared vector that masked experts modulate (EMR's unified task vector, TALL's
    multi-task vector: the task models ``theta_0 + lambda_t m_t * vec`` need it next to ``theta_0``), and the
    router."""
    n = 0.0
    for kind, arrs in self.experts.values():
      if kind == "dense":
        n += arrs["delta"].size
      elif kind == "lowrank":
        n += arrs["a"].size + arrs["b"].size
      elif kind == "masked":
        n += arrs["vec"].size + arrs["mask"].size / 32 + arrs["scale"].size
      elif kind == "sparse":
        n += float(jnp.sum(arrs["mask"])) + arrs["mask"].size / 32 + arrs["scale"].size
    if self.router is not None:
      n += sum(x.size for x in jax.tree.leaves(self.router[0]))
    return int(round(n))


def _model(apply_fn, like, base, experts, t, name, router=None) -> ExpertModel:
  return ExpertModel(apply_fn, like, base, experts, t, router, name)


def emr_model(apply_fn, pretrained: Params, finetuned, *, rescaler: str = "reference") -> ExpertModel:
  """EMR-Merging's per-task model: ``theta_0 + lambda_t (M_t * tau_uni)`` from the unified task vector, ``T``
  bit-masks and ``T`` scalars (:func:`jaxmerge.transforms.emr_modulate`'s definition).

  Args:
    apply_fn: ``apply_fn(params, images) -> outputs`` of the plain model.
    pretrained: the pretrained parameter tree.
    finetuned: a list of ``T`` fine-tuned trees, or one stacked tree (leading task axis).
    rescaler: ``"reference"`` (per-leaf mean absolute values, summed over leaves) or ``"global"`` (over the
      whole model) for the scalars ``lambda_t``.

  Returns:
    An :class:`ExpertModel` with ``T`` experts.

  Raises:
    ValueError: an unknown ``rescaler``.

  References:
    Huang et al., "EMR-Merging: Tuning-Free High-Performance Model Merging", NeurIPS 2024.
    https://arxiv.org/abs/2405.17461
  """
  if rescaler not in ("reference", "global"):
    raise ValueError(f"rescaler must be 'reference' or 'global', got {rescaler!r}")
  pre, tau, like = _stack(pretrained, finetuned)
  uni, masks, lam = T.emr_rescaled(tau, rescaler)
  experts = {p: ("masked", {"mask": masks[p], "vec": uni[p], "scale": lam}) for p in tau}
  return _model(apply_fn, like, pre, experts, lam.shape[0], "emr")


def tall_model(apply_fn, pretrained: Params, finetuned, *, tall_lambda: float | Sequence[float] = 0.6,
               strict: bool = True) -> ExpertModel:
  """TALL masks' per-task model ``theta_0 + m_t * tau_MTL`` (``tau_MTL = sum_t tau_t``, T bit-masks).

  Args:
    apply_fn: ``apply_fn(params, images) -> outputs`` of the plain model.
    pretrained: the pretrained parameter tree.
    finetuned: a list of ``T`` fine-tuned trees, or one stacked tree (leading task axis).
    tall_lambda: ``lambda_t`` of the mask ``|tau_t| > lambda_t |tau_MTL - tau_t|``, one value or one per task.
    strict: use ``>`` (the reference code) or ``>=`` (the survey) in the mask.

  Returns:
    An :class:`ExpertModel` with ``T`` experts.

  References:
    Wang et al., "Localizing Task Information for Improved Model Merging and Compression", ICML 2024.
    https://arxiv.org/abs/2405.07813
  """
  pre, tau, like = _stack(pretrained, finetuned)
  t = next(iter(tau.values())).shape[0]
  lam = jnp.broadcast_to(jnp.asarray(tall_lambda, jnp.float32), (t,))
  experts = {}
  for p, x in tau.items():
    mtv = jtree.task_sum(x)
    experts[p] = ("masked", {"mask": T.tall_mask_of(x, mtv, lam, strict), "vec": mtv, "scale": jnp.ones((t,))})
  return _model(apply_fn, like, pre, experts, t, "tall_mask")


def _low_rank(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  u, s, vt = linalg.svd(x)
  return u[..., :k] * s[:, None, :k], vt[:, :k]


def low_rank_model(apply_fn, pretrained: Params, finetuned, *, rank_fraction: float | None = None,
                   rank: int | None = None, name: str = "tsv_c") -> ExpertModel:
  """Per-task model ``theta_0 + SVD_k(Delta_t)`` on 2-D leaves, each task's own vector leaves elsewhere:
  TSV-C (``k = int(r * rank_fraction)``, default ``1/T``) or BYOM-LoRA (a fixed ``rank``, clipped to ``r``).

  Args:
    apply_fn: ``apply_fn(params, images) -> outputs`` of the plain model.
    pretrained: the pretrained parameter tree.
    finetuned: a list of ``T`` fine-tuned trees, or one stacked tree (leading task axis).
    rank_fraction: TSV-C's fraction of each 2-D leaf's full rank ``r`` (``None``: ``1/T``).
    rank: a fixed rank instead (BYOM-LoRA); give at most one of ``rank`` and ``rank_fraction``.
    name: the model's name (``"tsv_c"``, ``"byom_lora"``).

  Returns:
    An :class:`ExpertModel` with ``T`` experts.

  Raises:
    ValueError: both ``rank`` and ``rank_fraction`` given.

  References:
    Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging", CVPR 2025.
    https://arxiv.org/abs/2412.00081 ; Jiang et al., "BYOM", 2023. https://arxiv.org/abs/2310.01886
  """
  if rank is not None and rank_fraction is not None:
    raise ValueError("give rank or rank_fraction, not both")
  pre, tau, like = _stack(pretrained, finetuned)
  t = next(iter(tau.values())).shape[0]
  experts = {}
  for p, x in tau.items():
    if x.ndim == 3:
      r = min(x.shape[1:])
      k = min(rank, r) if rank is not None else R.tsv_rank(r, t, rank_fraction)
      a, b = _low_rank(x, k)
      experts[p] = ("lowrank", {"a": a, "b": b})
    else:
      experts[p] = ("dense", {"delta": x})
  return _model(apply_fn, like, pre, experts, t, name)


def byom_model(apply_fn, pretrained: Params, finetuned, *, density: float = 0.1, scale: float = 0.3) -> ExpertModel:
  """BYOM-FFT: shared ``theta* = theta_0 + scale sum_t tau_t`` plus task ``t``'s residual ``tau_t - scale sum_s
  tau_s`` kept at its top-``density`` magnitudes over the whole model (``>=`` the reference threshold).

  Args:
    apply_fn: ``apply_fn(params, images) -> outputs`` of the plain model.
    pretrained: the pretrained parameter tree.
    finetuned: a list of ``T`` fine-tuned trees, or one stacked tree (leading task axis).
    density: fraction of each task's residual entries kept.
    scale: the shared part's task-arithmetic coefficient.

  Returns:
    An :class:`ExpertModel` with ``T`` experts.

  References:
    Jiang et al., "BYOM: Building Your Own Multi-Task Model For Free", 2023. https://arxiv.org/abs/2310.01886
  """
  pre, tau, like = _stack(pretrained, finetuned)
  paths = list(tau)
  t = tau[paths[0]].shape[0]
  # The task models of jaxmerge's byom transform (its threshold rule), stored as shared part + sparse residuals.
  models = jm.merge_per_task(jm.get_method("byom")(density=density, scale=scale), pretrained, finetuned)
  flat = [jtree.flatten_paths(m) for m in models]
  shared = {p: scale * jtree.task_sum(tau[p]) for p in paths}
  base = {p: pre[p] + shared[p] for p in paths}
  experts = {}
  for p in paths:
    resid = jnp.stack([jnp.asarray(f[p], jnp.float32) for f in flat]) - base[p][None]
    experts[p] = ("sparse", {"mask": resid != 0, "values": resid, "scale": jnp.ones((t,))})
  return _model(apply_fn, like, base, experts, t, "byom")


def twin_model(apply_fn, pretrained: Params, finetuned, *, scale: float = 0.3, rank: int | None = 8,
               router=None) -> ExpertModel:
  """Twin-Merging: shared ``theta_s = theta_0 + scale sum_t tau_t``, exclusive parts ``D_t = theta_t - theta_s``
  compressed to rank ``rank`` on 2-D leaves (``None``: full rank) and kept dense on vector leaves; a router
  (see :func:`train_router`) mixes them per input: ``theta(x) = theta_s + sum_t w_t(x) SVD_r(D_t)``.

  Args:
    apply_fn: ``apply_fn(params, images) -> outputs`` of the plain model.
    pretrained: the pretrained parameter tree.
    finetuned: a list of ``T`` fine-tuned trees, or one stacked tree (leading task axis).
    scale: the shared part's task-arithmetic coefficient.
    rank: rank of the exclusive parts on 2-D leaves (clipped to the full rank; ``None``: full rank).
    router: optional ``(router_params, feature_fn)`` (see :class:`ExpertModel`); without it, call the model
      with a task id or explicit weights.

  Returns:
    An :class:`ExpertModel` with ``T`` experts.

  References:
    Lu et al., "Twin-Merging: Dynamic Integration of Modular Expertise in Model Merging", NeurIPS 2024.
    https://arxiv.org/abs/2406.15479
  """
  pre, tau, like = _stack(pretrained, finetuned)
  base, experts = {}, {}
  for p, x in tau.items():
    shared = scale * jtree.task_sum(x)
    base[p] = pre[p] + shared
    d = x - shared[None]
    if x.ndim == 3:
      a, b = _low_rank(d, min(x.shape[1:]) if rank is None else min(rank, min(x.shape[1:])))
      experts[p] = ("lowrank", {"a": a, "b": b})
    else:
      experts[p] = ("dense", {"delta": d})
  return _model(apply_fn, like, base, experts, next(iter(tau.values())).shape[0], "twin", router)


def _energy(x: jax.Array) -> jax.Array:
  return jnp.mean(jnp.abs(x))


def free_backbone(pretrained: Params, finetuned, *, cutoff: float = 0.0) -> tuple[dict, dict, jax.Array, Any]:
  """FREE-Merging's backbone ``theta_0 + sum_t lambda_t G_t``: ``G_t`` is each task's 2-D leaves high-pass
  filtered (:func:`jaxmerge.moe.math.high_pass`; vector leaves unfiltered), ``lambda_t = E(tau_t) / sum_s
  E(tau_s)`` with ``E`` the mean absolute value over the whole model (absolute values: METHODS.md 5.2).

  Args:
    pretrained: the pretrained parameter tree.
    finetuned: a list of ``T`` fine-tuned trees, or one stacked tree (leading task axis).
    cutoff: the high-pass radius (``0`` passes everything).

  Returns:
    ``(backbone {path: array}, tau {path: (T, ...)}, lambda (T,), like)``.

  References:
    Zheng and Wang, "FREE-Merging: Fourier Transform for Efficient Model Merging", 2024.
    https://arxiv.org/abs/2411.16815
  """
  pre, tau, like = _stack(pretrained, finetuned)
  paths = list(tau)
  t = tau[paths[0]].shape[0]
  flat = jnp.concatenate([tau[p].reshape(t, -1) for p in paths], axis=1)
  energy = jnp.mean(jnp.abs(flat), axis=1)
  lam = energy / jnp.sum(energy)
  base = {}
  for p, x in tau.items():
    g = jax.vmap(lambda m: mm.high_pass(m, cutoff))(x) if x.ndim == 3 else x
    base[p] = pre[p] + jnp.einsum("t,t...->...", lam, g, precision=HIGHEST)
  return base, tau, lam, like


def free_model(apply_fn, pretrained: Params, finetuned, *, cutoff: float = 0.0, density: float | None = 0.01,
               router=None) -> ExpertModel:
  """FREE-Merging: the :func:`free_backbone` plus lightweight experts ``mu_t M(tau_t, d)`` (top-``density``
  magnitudes of each task vector over the whole model) with ``mu_t = -E(M(tau_t, d)) log(d) / (lambda_t
  E(tau_t))`` (the survey's formula), mixed by a router. ``density=None``: no experts (the backbone alone).

  Args:
    apply_fn: ``apply_fn(params, images) -> outputs`` of the plain model.
    pretrained: the pretrained parameter tree.
    finetuned: a list of ``T`` fine-tuned trees, or one stacked tree (leading task axis).
    cutoff: the backbone's high-pass radius.
    density: fraction of each task vector's entries kept in its expert, in ``(0, 1)``; ``None``: no experts.
    router: optional ``(router_params, feature_fn)`` (see :class:`ExpertModel`).

  Returns:
    An :class:`ExpertModel` with ``T`` experts.

  Raises:
    ValueError: ``density`` outside ``(0, 1)``.

  References:
    Zheng and Wang, "FREE-Merging", 2024. https://arxiv.org/abs/2411.16815
  """
  base, tau, lam, like = free_backbone(pretrained, finetuned, cutoff=cutoff)
  paths = list(tau)
  t = lam.shape[0]
  experts = {}
  if density is not None:
    if not 0 < density < 1:
      raise ValueError(f"FREE expert density must be in (0, 1), got {density}")
    flat = jnp.concatenate([tau[p].reshape(t, -1) for p in paths], axis=1)
    thr = stats.task_thresholds([flat], density)
    kept = jnp.where(jnp.abs(flat) >= thr[:, None], jnp.abs(flat), 0.0)
    mu = -jnp.mean(kept, axis=1) * np.log(density) / (lam * jnp.mean(jnp.abs(flat), axis=1))
    for p in paths:
      m = jnp.abs(tau[p]) >= thr.reshape((-1,) + (1,) * (tau[p].ndim - 1))
      experts[p] = ("sparse", {"mask": m, "values": tau[p], "scale": mu})
  return _model(apply_fn, like, base, experts, t, "free", router)


def train_router(features: Float[Array, "N F"], task_ids, *, hidden: int = 64, hidden_layers: int = 1,
                 steps: int = 300, learning_rate: float = 1e-2, batch_size: int = 64, key: jax.Array) -> list[dict]:
  """Trains a task router (cross-entropy on task labels, Twin-Merging's validation-data router) with
  :func:`jaxmerge.tta.fit`; returns parameters for :func:`jaxmerge.moe.math.router_logits`.

  Args:
    features: ``[N, F]`` router inputs (e.g. the shared model's embeddings of validation images).
    task_ids: ``[N]`` int task labels.
    hidden, hidden_layers: router size (ReLU MLP; ``hidden_layers=0`` is linear).
    steps, learning_rate, batch_size: Adam settings.
    key: PRNG key.

  Returns:
    The trained router, a list of ``{"kernel": (in, out), "bias": (out,)}`` dicts mapping ``F`` features to
    ``T = max(task_ids) + 1`` logits.

  References:
    Lu et al., "Twin-Merging", NeurIPS 2024. https://arxiv.org/abs/2406.15479
  """
  import optax  # noqa: PLC0415

  from jaxmerge.tta import Adapter, fit  # noqa: PLC0415

  x = jnp.asarray(features, jnp.float32)
  y = jnp.asarray(task_ids, jnp.int32)
  t = int(jnp.max(y)) + 1
  sizes = [x.shape[1]] + [hidden] * hidden_layers + [t]

  def init(k, frozen):
    del frozen
    ks = jax.random.split(k, len(sizes) - 1)
    return [{"kernel": jax.random.normal(kk, (a, b)) * a ** -0.5, "bias": jnp.zeros((b,))}
            for kk, a, b in zip(ks, sizes[:-1], sizes[1:])]

  def apply(theta, frozen, batch, *, key=None):
    del frozen, key
    return mm.router_logits(theta, batch[0])

  def loss(logits, batch):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]))

  rng = np.random.default_rng(0)
  n = x.shape[0]
  bs = min(batch_size, n)

  def batches():
    while True:
      idx = rng.permutation(n)
      for i in range(0, n - bs + 1, bs):
        yield x[idx[i:i + bs]], y[idx[i:i + bs]]

  theta, _ = fit(Adapter(init, apply), None, optax.adam(learning_rate), batches(), loss, key=key, steps=steps,
                 progress=False)
  return theta
