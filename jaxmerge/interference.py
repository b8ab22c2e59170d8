"""Cross-task interference (CTI): how far a merged model's representation drifts from each expert's.

For task ``i`` with inputs ``x ~ D_i`` (no labels needed)::

    CTI_i (feature) = E_x [ || z(x; theta_M) - z(x; theta_i) ||^2 / || z(x; theta_i) ||^2 ]
    CTI_i (head)    = E_x || h_i(z(x; theta_M)) - h_i(z(x; theta_i)) ||

The ratio is taken per example, then averaged. With linear heads ``h_i(z) = z @ W_i.T``. This follows the
definition of Resolving Interference (Ramesh et al., arXiv 2603.13467); ``jaxmerge.analysis`` re-exports it.

After a pre-merge adaptation such as RI the experts ``theta_i`` are ambiguous: the *original* experts (whose
function the user wants to keep) or the *adapted* ones (the merge's actual constituents). :func:`cti_report`
measures CTI against both, under names that say which (``cti_vs_original_experts``,
``cti_vs_adapted_experts``), each next to the merged model's accuracy drop against the same experts and the
rank correlation of the two over tasks (:func:`spearman`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["cross_task_interference", "cti_report", "spearman"]


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


def _ranks(x: np.ndarray) -> np.ndarray:
  """Ranks 1..n of ``x`` with ties given their average rank."""
  order = np.argsort(x, kind="stable")
  ranks = np.empty(len(x))
  ranks[order] = np.arange(1, len(x) + 1)
  for v in np.unique(x):
    tie = x == v
    ranks[tie] = ranks[tie].mean()
  return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
  """Spearman's rank correlation of two equally long sequences (ties get their average rank).

  Args:
    x: ``n`` values (e.g. CTI per task).
    y: ``n`` values (e.g. accuracy drop per task).

  Returns:
    The Pearson correlation of the ranks, in ``[-1, 1]``; ``nan`` when ``n < 2`` or either sequence is
    constant (the correlation is undefined).

  Raises:
    ValueError: sequences of different lengths or with non-finite values.

  References:
    Spearman, "The Proof and Measurement of Association between Two Things", American Journal of Psychology
    1904. doi:10.2307/1412159
  """
  x, y = np.asarray(x, np.float64).ravel(), np.asarray(y, np.float64).ravel()
  if x.shape != y.shape:
    raise ValueError(f"spearman needs sequences of equal length, got {len(x)} and {len(y)}")
  if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
    raise ValueError("spearman got non-finite values")
  if len(x) < 2 or np.all(x == x[0]) or np.all(y == y[0]):
    return float("nan")
  rx, ry = _ranks(x) - (len(x) + 1) / 2, _ranks(y) - (len(y) + 1) / 2
  return float(np.sum(rx * ry) / np.sqrt(np.sum(rx * rx) * np.sum(ry * ry)))


def _accuracies(name: str, acc: Any, t: int) -> np.ndarray:
  values = list(acc.values()) if isinstance(acc, dict) else list(acc)
  if len(values) != t:
    raise ValueError(f"{name} has {len(values)} accuracies for {t} tasks")
  return np.asarray(values, np.float64)


def _block(cti: dict, reference: str, drop: np.ndarray | None) -> dict:
  out = {"reference": reference, "feature": cti["feature"].tolist(), "feature_mean": cti["feature_mean"],
         "head": None if cti["head"] is None else cti["head"].tolist(), "head_mean": cti["head_mean"]}
  if drop is not None:
    out["accuracy_drop"] = drop.tolist()
    out["spearman_with_accuracy_drop"] = {
        "feature": spearman(cti["feature"], drop),
        "head": None if cti["head"] is None else spearman(cti["head"], drop)}
  return out


def cti_report(
    forward_fn: Callable[[Any, jax.Array], jax.Array],
    merged_params: Any,
    original_experts: Sequence[Any],
    task_batches: Sequence[Any],
    heads: Sequence[Any] | None = None,
    *,
    adapted_experts: Sequence[Any] | None = None,
    merged_accuracy: Any = None,
    original_accuracy: Any = None,
    adapted_accuracy: Any = None,
) -> dict[str, Any]:
  """Cross-task interference of a merged model against the original and (if given) the adapted experts.

  Each block holds the per-task CTI against one set of experts (:func:`cross_task_interference`), and, when
  the accuracies are given, the merged model's accuracy drop per task against the same experts
  (``expert_accuracy[i] - merged_accuracy[i]`` on task ``i``, in the accuracies' units) and the Spearman
  correlation over tasks of each CTI with that drop.

  Args:
    forward_fn: ``forward_fn(params, inputs [B, ...]) -> features [B, D]``.
    merged_params: the merged model's parameters.
    original_experts: the ``T`` experts before any adaptation, in task order.
    task_batches: per task, its unlabeled inputs (one array ``[N, ...]`` or a sequence of batches).
    heads: optional ``T`` linear heads ``[C_t, D]`` for the head-space CTI.
    adapted_experts: the ``T`` adapted experts (e.g. RI's) that ``merged_params`` was merged from, if any.
    merged_accuracy: the merged model's accuracy per task (``{task: acc}`` in task order, or ``T`` values).
    original_accuracy: each original expert's accuracy on its own task (same form).
    adapted_accuracy: each adapted expert's accuracy on its own task (same form).

  Returns:
    ``{"cti_vs_original_experts": block}`` plus ``"cti_vs_adapted_experts": block`` with ``adapted_experts``.
    A block is ``{"reference": "original experts" | "adapted experts", "feature": [T], "feature_mean",
    "head": [T] | None, "head_mean"}``; with ``merged_accuracy`` and that block's expert accuracies it also
    has ``"accuracy_drop": [T]`` and ``"spearman_with_accuracy_drop": {"feature": r, "head": r | None}``
    (``nan`` where undefined). The adapted block also has ``"spearman_with_accuracy_drop_vs_original_experts"``
    when ``original_accuracy`` is given (CTI against the adapted experts against what the merge loses relative
    to the original ones).

  Raises:
    ValueError: numbers of experts, task inputs, heads or accuracies that differ.

  References:
    Ramesh et al., "Resolving Interference: Disentangling Models for Improved Model Merging", 2026.
    https://arxiv.org/abs/2603.13467
  """
  t = len(original_experts)
  if adapted_experts is not None and len(adapted_experts) != t:
    raise ValueError(f"got {len(adapted_experts)} adapted experts for {t} original experts")
  merged = None if merged_accuracy is None else _accuracies("merged_accuracy", merged_accuracy, t)
  drop_orig = drop_adapt = None
  if merged is not None and original_accuracy is not None:
    drop_orig = _accuracies("original_accuracy", original_accuracy, t) - merged
  if merged is not None and adapted_accuracy is not None:
    drop_adapt = _accuracies("adapted_accuracy", adapted_accuracy, t) - merged
  out = {"cti_vs_original_experts": _block(
      cross_task_interference(forward_fn, merged_params, original_experts, task_batches, heads),
      "original experts", drop_orig)}
  if adapted_experts is not None:
    cti = cross_task_interference(forward_fn, merged_params, adapted_experts, task_batches, heads)
    block = _block(cti, "adapted experts", drop_adapt)
    if drop_orig is not None:
      block["spearman_with_accuracy_drop_vs_original_experts"] = {
          "feature": spearman(cti["feature"], drop_orig),
          "head": None if cti["head"] is None else spearman(cti["head"], drop_orig)}
    out["cti_vs_adapted_experts"] = block
  return out
