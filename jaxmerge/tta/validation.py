"""Merges that need data from every task: Fisher-weighted averaging and RegMean.

Both read each fine-tuned model on its own task's inputs (``batches[t]``: an array ``[N, ...]`` or an iterable of
``[B, ...]`` batches). The model interface is the one of :mod:`jaxmerge.tta.heads`:
``forward_fn(params, inputs) -> features [B, D]`` and one frozen head ``[C_t, D]`` per task.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmerge import tree as jtree
from jaxmerge.tta import heads as H
from jaxmerge.tta.capture import linear_grams

__all__ = ["fisher", "fisher_information", "regmean", "task_inputs", "ugm"]

_ESTIMATORS = ("reference", "exact")


def task_inputs(batches: Any, num_tasks: int, num_examples: int, batch_size: int, *, what: str) -> list[list]:
  """Per task, the first ``num_examples`` inputs as a list of batches of at most ``batch_size``.

  ``batches[t]`` is an array ``[N, ...]`` (split into batches, the last one possibly smaller) or an iterable of
  batches (whole batches are read until ``num_examples`` inputs are reached, as the references' loaders do).
  ``(inputs, labels)`` tuples are accepted (labels are ignored).

  Args:
    batches: ``T`` per-task entries (a sequence, or a dict's values in order), each an array ``[N, ...]``, an
      iterable of batches, or an ``(inputs, labels)`` tuple of either.
    num_tasks: the expected number of tasks ``T``.
    num_examples: inputs to take per task (``>= 1``).
    batch_size: batch size when splitting an array (``>= 1``); an iterable's batches are kept whole.
    what: the method's name, for error messages.

  Returns:
    ``T`` lists of numpy input batches ``[b, ...]`` (an iterable's last batch may overshoot ``num_examples``).

  Raises:
    ValueError: no data, a different number of tasks, a task with no input, or bad sizes.
  """
  if batches is None:
    raise ValueError(f"{what} needs inputs of every task (got none)")
  if num_examples < 1 or batch_size < 1:
    raise ValueError(f"{what}: num_examples and batch_size must be >= 1, got {num_examples} and {batch_size}")
  if isinstance(batches, dict):
    batches = list(batches.values())
  batches = list(batches)
  if len(batches) != num_tasks:
    raise ValueError(f"{what} needs inputs for each of the {num_tasks} models, got {len(batches)} task(s)")
  out = []
  for t, b in enumerate(batches):
    if isinstance(b, tuple) and len(b) == 2 and hasattr(b[0], "shape"):
      b = b[0]
    chunks = []
    if hasattr(b, "shape"):
      x = np.asarray(b)[:num_examples]
      chunks = [x[i:i + batch_size] for i in range(0, len(x), batch_size)]
    else:
      seen = 0
      for item in b:
        if seen >= num_examples:
          break
        x = np.asarray(item[0] if isinstance(item, tuple) else item)
        if x.shape[0] == 0:
          continue
        chunks.append(x)
        seen += x.shape[0]
    if not chunks or sum(c.shape[0] for c in chunks) == 0:
      raise ValueError(f"{what}: task {t} has no inputs (empty batches)")
    out.append(chunks)
  return out


def _selected(paths, exclude: Sequence[str]) -> list[str]:
  pats = [re.compile(p) for p in exclude]
  return [p for p in paths if not any(r.match(p) for r in pats)]


def _model(pre32: dict, tau: dict, t: int) -> dict:
  return {p: pre32[p] + tau[p][t] for p in pre32}


def _head_check(heads, num_tasks: int) -> list[jax.Array]:
  hs = list(heads.values()) if isinstance(heads, dict) else list(heads)
  if len(hs) != num_tasks:
    raise ValueError(f"got {len(hs)} heads for {num_tasks} fine-tuned models")
  H.pad_heads(hs)  # validates shapes
  return [jnp.asarray(h, jnp.float32) for h in hs]


def fisher_information(
    forward_fn: Callable[[Any, jax.Array], jax.Array],
    params: Any,
    head: jax.Array,
    batches: Sequence[np.ndarray],
    *,
    estimator: str = "reference",
) -> tuple[dict, int]:
  """Diagonal Fisher of a classifier ``softmax(forward_fn(params, x) @ head.T)`` under its own predictions.

  Args:
    forward_fn: ``forward_fn(params, inputs) -> features [B, D]``.
    params: parameters (any pytree); the Fisher has one entry per float entry.
    head: ``[C, D]`` frozen head.
    batches: input batches.
    estimator: ``"reference"``: per batch, the square of the gradient of
      ``sum_b sum_c sqrt(p_bc) log p_bc`` (``p`` held constant), summed over batches (FusionBench and MergeLM;
      it depends on the batch size). ``"exact"``: per example, ``sum_c p_c (d log p_c)^2``, the expectation
      over the model's predictive distribution (one backward pass per example and class).

  Returns:
    ``({path: F (float32, shape of the leaf)}, number of examples)``: the *sums* over examples (divide by
    the count for the mean).

  References:
    Matena and Raffel, "Merging Models with Fisher-Weighted Averaging", NeurIPS 2022.
    https://arxiv.org/abs/2111.09832
  """
  if estimator not in _ESTIMATORS:
    raise ValueError(f"estimator must be one of {list(_ESTIMATORS)}, got {estimator!r}")
  flat = {p: jnp.asarray(x, jnp.float32) for p, x in jtree.flatten_paths(params).items() if jtree.is_float(x)}
  rest = {p: x for p, x in jtree.flatten_paths(params).items() if p not in flat}
  step = _fisher_step(forward_fn, H.structure_of(params), estimator)
  total = {p: jnp.zeros_like(x) for p, x in flat.items()}
  n = 0
  for x in batches:
    total = step(total, flat, rest, jnp.asarray(head, jnp.float32), jnp.asarray(x))
    n += int(x.shape[0])
  return total, n


_STEPS: dict = {}


def _fisher_step(forward_fn, structure, estimator):
  key = (forward_fn, structure, estimator)
  if key in _STEPS:
    return _STEPS[key]

  def logp_fn(flat, rest, head, x):
    params = H.assemble(structure, flat, rest)
    z = forward_fn(params, x).astype(jnp.float32)
    return jax.nn.log_softmax(H.head_logits(z, head), axis=-1)

  @jax.jit
  def step(total, flat, rest, head, x):
    if estimator == "reference":
      def objective(flat):
        logp = logp_fn(flat, rest, head, x)
        return jnp.sum(jnp.sqrt(jax.lax.stop_gradient(jnp.exp(logp))) * logp)

      g = jax.grad(objective)(flat)
      return {p: total[p] + jnp.square(g[p]) for p in total}

    def one(carry, xi):
      logp = logp_fn(flat, rest, head, xi[None])[0]
      probs = jnp.exp(logp)

      def per_class(acc, c):
        g = jax.grad(lambda f: logp_fn(f, rest, head, xi[None])[0, c])(flat)
        return {p: acc[p] + probs[c] * jnp.square(g[p]) for p in acc}, None

      acc, _ = jax.lax.scan(per_class, carry, jnp.arange(probs.shape[0]))
      return acc, None

    total, _ = jax.lax.scan(one, total, x)
    return total

  _STEPS[key] = step
  return step


def fisher(
    pretrained: Any,
    finetuned: Sequence[Any] | Any,
    forward_fn: Callable[[Any, jax.Array], jax.Array],
    heads: Sequence[Any],
    batches: Any,
    *,
    num_examples: int = 256,
    batch_size: int = 32,
    normalize: bool = True,
    epsilon: float = 1e-6,
    estimator: str = "reference",
    weights: Sequence[float] | None = None,
    exclude: Sequence[str] = (),
    names: Sequence[str] | None = None,
) -> Any:
  """Fisher-weighted averaging: ``theta[j] = sum_t w_t (F_t[j] + eps) theta_t[j] / sum_t w_t (F_t[j] + eps)``.

  Model ``t``'s Fisher is computed on task ``t``'s inputs with head ``t`` (labels are not needed: the Fisher is
  taken under the model's own predictions). With ``normalize``, ``w_t`` is proportional to
  ``1 / (||F_t|| + eps)`` (global L2 norm over the merged leaves), as in FusionBench.

  Args:
    pretrained: pretrained parameters (excluded leaves and non-float leaves are taken from it).
    finetuned: ``T`` fine-tuned models (list) or one stacked pytree.
    forward_fn: ``forward_fn(params, inputs) -> features [B, D]`` (jittable).
    heads: ``T`` frozen heads ``[C_t, D]``.
    batches: per task, an input array ``[N, ...]`` or an iterable of batches.
    num_examples: inputs per task (256, FusionBench's CLIP config).
    batch_size: batch size of the Fisher pass (32; the ``"reference"`` estimator depends on it).
    normalize: weight each model by the inverse norm of its Fisher.
    epsilon: added to every Fisher entry (and to the norms).
    estimator: ``"reference"`` or ``"exact"`` (see :func:`fisher_information`).
    weights: optional model weights (default ``1/T`` each).
    exclude: regular expressions (``re.match`` on ``"/"``-joined paths) of leaves left at their pretrained value.
    names: model names for error messages.

  Returns:
    The merged parameters (``pretrained``'s structure and dtypes).

  Raises:
    ValueError: missing or empty data, a head count different from the model count, bad hyperparameters.

  References:
    Matena and Raffel, "Merging Models with Fisher-Weighted Averaging", NeurIPS 2022.
    https://arxiv.org/abs/2111.09832
  """
  if not epsilon >= 0:
    raise ValueError(f"epsilon must be >= 0, got {epsilon}")
  pre32, tau, passthrough = H.split_params(pretrained, finetuned, names=names)
  num_tasks = next(iter(tau.values())).shape[0]
  hs = _head_check(heads, num_tasks)
  data = task_inputs(batches, num_tasks, num_examples, batch_size, what="fisher")
  w = np.full(num_tasks, 1.0 / num_tasks) if weights is None else np.asarray(weights, np.float64)
  if w.shape != (num_tasks,):
    raise ValueError(f"weights must have one entry per model ({num_tasks}), got shape {w.shape}")
  st = H.structure_of(pretrained)
  merged_paths = _selected(list(pre32), exclude)
  fishers = []
  for t in range(num_tasks):
    model = H.assemble(st, _model(pre32, tau, t), passthrough)
    total, n = fisher_information(forward_fn, model, hs[t], data[t], estimator=estimator)
    fishers.append({p: total[p] / n for p in merged_paths})
  merged = _fisher_merge(pre32, tau, fishers, jnp.asarray(w, jnp.float32), normalize, float(epsilon))
  return _finish(pretrained, pre32, merged, passthrough)


@functools.partial(jax.jit, static_argnums=(4, 5))
def _fisher_merge(pre32, tau, fishers, w, normalize, eps):
  coef = w
  if normalize:
    norms = jnp.stack([jnp.sqrt(sum(jnp.sum(jnp.square(f[p])) for p in f)) for f in fishers])
    inv = 1.0 / (norms + eps)
    coef = coef * inv / jnp.sum(inv)
  out = {}
  for p in fishers[0]:
    f = jnp.stack([fi[p] for fi in fishers]) + eps
    c = coef.reshape((-1,) + (1,) * (f.ndim - 1))
    theta = pre32[p][None] + tau[p]
    out[p] = jnp.sum(c * f * theta, axis=0) / jnp.sum(c * f, axis=0)
  return out


def _finish(pretrained, pre32, merged: dict, passthrough: dict) -> Any:
  dtypes = {p: x.dtype for p, x in jtree.flatten_paths(pretrained).items()}
  flat = {p: merged.get(p, pre32[p]).astype(dtypes[p]) for p in pre32}
  return H.assemble(pretrained, flat, passthrough)


def regmean(
    pretrained: Any,
    finetuned: Sequence[Any] | Any,
    forward_fn: Callable[[Any, jax.Array], Any],
    batches: Any,
    *,
    alpha: float = 0.95,
    num_examples: int = 256,
    batch_size: int = 32,
    exclude: Sequence[str] = (),
    names: Sequence[str] | None = None,
) -> Any:
  """RegMean: each linear map merged to the least-squares fit of every model's outputs on its own inputs.

  For a linear leaf with input Grams ``G_t`` (per-row means of ``X_t^T X_t``, recorded from model ``t`` on task
  ``t``'s inputs by :func:`jaxmerge.tta.capture.linear_grams`), ``G~_t = alpha G_t + (1 - alpha) diag(G_t)``
  and, in the ``(in, out)`` view, ``W = (sum_t G~_t)^{-1} sum_t G~_t W_t`` (a linear solve). Every other float
  leaf (biases, norms, embeddings, convolutions) is the simple average of the fine-tuned models, as in the
  reference. The pretrained model only supplies excluded and non-float leaves.

  Args:
    pretrained: pretrained parameters.
    finetuned: ``T`` fine-tuned models (list) or one stacked pytree.
    forward_fn: ``forward_fn(params, inputs)`` (jittable; only the linear maps' inputs are used).
    batches: per task, an input array ``[N, ...]`` or an iterable of batches.
    alpha: off-diagonal scale (FusionBench's CLIP ``reduce_non_diagonal_ratio`` 0.95; the paper uses 0.9).
    num_examples: inputs per task (256).
    batch_size: batch size of the capture pass (32).
    exclude: regular expressions (``re.match`` on ``"/"``-joined paths) of leaves left at their pretrained value.
    names: model names for error messages.

  Returns:
    The merged parameters (``pretrained``'s structure and dtypes).

  Raises:
    ValueError: missing or empty data, ``alpha`` outside ``[0, 1]``, or a forward pass without linear maps.

  References:
    Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language Models", ICLR 2023.
    https://arxiv.org/abs/2212.09849
  """
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"alpha must be in [0, 1], got {alpha}")
  pre32, tau, passthrough = H.split_params(pretrained, finetuned, names=names)
  num_tasks = next(iter(tau.values())).shape[0]
  data = task_inputs(batches, num_tasks, num_examples, batch_size, what="regmean")
  st = H.structure_of(pretrained)
  merged_paths = _selected(list(pre32), exclude)
  grams, in_axis = [], None
  for t in range(num_tasks):
    model = H.assemble(st, _model(pre32, tau, t), passthrough)
    sums, rows = None, None
    for x in data[t]:
      cap = linear_grams(forward_fn, model, jnp.asarray(x))
      in_axis = cap.in_axis
      sums = cap.grams if sums is None else {p: sums[p] + cap.grams[p] for p in sums}
      rows = cap.rows if rows is None else {p: rows[p] + cap.rows[p] for p in rows}
    grams.append({p: sums[p] / rows[p] for p in sums if p in merged_paths})
  if not grams[0]:
    raise ValueError("regmean found no linear map (a 2-D parameter used in a matmul) in the forward pass")
  axes = {p: in_axis[p] for p in grams[0]}
  merged = _regmean_merge(pre32, tau, grams, float(alpha), tuple(sorted(axes.items())), tuple(merged_paths))
  return _finish(pretrained, pre32, merged, passthrough)


@functools.partial(jax.jit, static_argnums=(3, 4, 5))
def _regmean_merge(pre32, tau, grams, alpha, axes, merged_paths):
  axes = dict(axes)
  out = {}
  for p in merged_paths:
    theta = pre32[p][None] + tau[p]
    if p not in axes:
      out[p] = jnp.mean(theta, axis=0)
      continue
    g = jnp.stack([gi[p] for gi in grams])  # [T, in, in]
    eye = jnp.eye(g.shape[-1], dtype=bool)
    g = jnp.where(eye, g, alpha * g)
    w = jnp.moveaxis(theta, 1 + axes[p], 1)  # [T, in, out]
    rhs = jnp.einsum("tij,tjo->io", g, w, precision=jax.lax.Precision.HIGHEST)
    sol = jnp.linalg.solve(jnp.sum(g, axis=0), rhs)
    out[p] = jnp.moveaxis(sol, 0, axes[p])
  return out


def ugm(
    pretrained: Any,
    finetuned: Sequence[Any] | Any,
    forward_fn: Callable[[Any, jax.Array], jax.Array],
    heads: Sequence[Any],
    batches: Any,
    *,
    alphas: float | Sequence[float] = 0.3,
    prior_precision: float = 1.0,
    relative_prior: bool = True,
    num_examples: int = 256,
    batch_size: int = 32,
    estimator: str = "reference",
    names: Sequence[str] | None = None,
) -> Any:
  """Uncertainty-based gradient matching with diagonal Fishers (an uncertainty-weighted task arithmetic):
  ``theta[j] = theta_0[j] + sum_t alpha_t (delta + F_t[j]) tau_t[j] / (delta + sum_s alpha_s F_s[j])``.

  Args:
    pretrained: pretrained parameters.
    finetuned: ``T`` fine-tuned models.
    forward_fn: ``forward_fn(params, inputs) -> features [B, D]``.
    heads: ``T`` frozen heads ``[C_t, D]``.
    batches: per task, inputs ``[N, ...]`` or an iterable of batches.
    alphas: ``alpha_t`` (one value for every task, or ``T`` values; default TA's 0.3).
    prior_precision: ``delta`` (``H_0 = delta I``); with ``relative_prior`` it is multiplied by the mean
      Fisher entry over all models and leaves, so that it is on the Fishers' scale.
    relative_prior: see ``prior_precision``.
    num_examples: inputs per task for the Fishers.
    batch_size: batch size of the Fisher pass.
    estimator: Fisher estimator (see :func:`fisher_information`).
    names: model names for error messages.

  Returns:
    The merged parameters. Where ``delta`` and every Fisher are 0 the alpha-weighted mean of the task vectors
    is used (the limit of Fisher averaging).

  References:
    Daheim et al., "Model Merging by Uncertainty-Based Gradient Matching", ICLR 2024.
    https://arxiv.org/abs/2310.12808
  """
  if prior_precision < 0:
    raise ValueError(f"prior_precision must be >= 0, got {prior_precision}")
  pre32, tau, passthrough = H.split_params(pretrained, finetuned, names=names)
  num_tasks = next(iter(tau.values())).shape[0]
  hs = _head_check(heads, num_tasks)
  a = np.broadcast_to(np.asarray(alphas, np.float64), (num_tasks,)) if np.ndim(alphas) == 0 else np.asarray(alphas)
  if a.shape != (num_tasks,):
    raise ValueError(f"alphas must be a scalar or have one entry per model ({num_tasks}), got shape {a.shape}")
  data = task_inputs(batches, num_tasks, num_examples, batch_size, what="ugm")
  st = H.structure_of(pretrained)
  fishers = []
  for t in range(num_tasks):
    model = H.assemble(st, _model(pre32, tau, t), passthrough)
    total, n = fisher_information(forward_fn, model, hs[t], data[t], estimator=estimator)
    fishers.append({p: total[p] / n for p in pre32})
  merged = _ugm_merge(pre32, tau, fishers, jnp.asarray(a, jnp.float32), float(prior_precision), bool(relative_prior))
  return _finish(pretrained, pre32, merged, passthrough)


@functools.partial(jax.jit, static_argnums=(4, 5))
def _ugm_merge(pre32, tau, fishers, alphas, prior, relative):
  delta = jnp.float32(prior)
  if relative:
    total = sum(jnp.sum(f[p]) for f in fishers for p in f)
    count = sum(f[p].size for f in fishers for p in f)
    delta = delta * total / count
  out = {}
  for p in pre32:
    f = jnp.stack([fi[p] for fi in fishers])
    a = alphas.reshape((-1,) + (1,) * (f.ndim - 1))
    num = jnp.sum(a * (delta + f) * tau[p], axis=0)
    den = delta + jnp.sum(a * f, axis=0)
    fallback = jnp.sum(a * tau[p], axis=0) / jnp.sum(alphas)
    out[p] = pre32[p] + jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), fallback)
  return out
