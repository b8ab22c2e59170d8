"""Localize-and-Stitch, data-driven: a sparse mask per task learned on a few labeled examples, then stitched.

Localize: for task ``t``, real mask logits ``S_t`` (one per parameter entry) start at ``+b`` on the data-free
top-``density`` entries of ``|tau_t|`` and ``-b`` elsewhere; the relaxed model
``theta_0 + sigmoid(S_t) * tau_t`` is trained with optax on labeled batches of task ``t`` against the
cross-entropy of its frozen head plus ``l1_strength * mean(sigmoid(S_t))`` (an L1 penalty on the soft mask,
normalized by the number of entries); the logits are then binarized, either to the target density (the
top-``density`` logits, by the data-free rule) or by rounding ``sigmoid(S_t)`` at 0.5 (the reference's rule).
Stitch: ``theta_0 + sum_t gamma_t * tau_t / max(1, sum_s gamma_s)``: entries claimed by several tasks are
averaged over them.

With zero steps the masks are the data-free ones, so the result equals :func:`jaxmerge.alias.localize_stitch`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmerge import stats
from jaxmerge import tree as jtree
from jaxmerge.tta import heads as H
from jaxmerge.tta.adapter import Adapter
from jaxmerge.tta.fit import fit

__all__ = ["BINARIZE", "binarize_masks", "localize_adapter", "localize_loss", "localize_stitch_data", "stitch",
           "topk_masks"]

BINARIZE = ("topk", "round")


def _flat(tree: dict, paths: Sequence[str]) -> jax.Array:
  return jnp.concatenate([jnp.ravel(tree[p]) for p in paths])


def _unflat(flat: jax.Array, like: dict, paths: Sequence[str]) -> dict:
  out, start = {}, 0
  for p in paths:
    n = int(np.size(like[p]))
    out[p] = flat[start:start + n].reshape(np.shape(like[p]))
    start += n
  return out


@functools.partial(jax.jit, static_argnums=(2,))
def _topk_flat(scores: jax.Array, nonzero: jax.Array, density: float) -> jax.Array:
  n = scores.shape[0]
  k = int(n * density)
  if k <= 0:
    return jnp.zeros((n,), bool)
  if density >= 1:
    return nonzero
  s = jnp.where(nonzero, scores, -jnp.inf)
  # The k-th largest entry; -inf entries are ordered with a finite stand-in below every real score.
  finite = jnp.where(jnp.isfinite(s), s, jnp.min(jnp.where(jnp.isfinite(s), s, jnp.inf)) - 1.0)
  thr = stats.kth_smallest([finite], n - k + 1)
  return (finite > thr) & nonzero


def topk_masks(scores: dict, nonzero: dict, density: float) -> dict:
  """One task's binary mask: the entries whose score is strictly above the ``k``-th largest over the whole model
  (``k = int(N * density)``), among the entries where ``nonzero`` holds (``density >= 1``: all of those).

  With ``scores = |tau|`` and ``nonzero = tau != 0`` this is the data-free Localize-and-Stitch mask
  (:func:`jaxmerge.transforms.stitch`).

  Args:
    scores: ``{path: array}`` scores (one task).
    nonzero: ``{path: bool array}`` eligible entries (``tau != 0``: a zero entry is never claimed).
    density: fraction of all entries kept.

  Returns:
    ``{path: bool array}`` masks.

  References:
    He et al., "Localize-and-Stitch: Efficient Model Merging via Sparse Task Arithmetic", 2024.
    https://arxiv.org/abs/2408.13656
  """
  paths = sorted(scores)
  m = _topk_flat(_flat(scores, paths), _flat(nonzero, paths), float(density))
  return _unflat(m, scores, paths)


def binarize_masks(logits: dict, tau_t: dict, density: float, rule: str = "topk") -> dict:
  """Binary masks from trained logits: ``"topk"`` keeps the top-``density`` logits (the data-free rule, see
  :func:`topk_masks`), ``"round"`` keeps ``sigmoid(S) > 0.5`` (the reference's rounding); entries where the task
  vector is zero are never kept.

  Args:
    logits: ``{path: array}`` mask logits ``S_t`` of one task.
    tau_t: ``{path: array}`` the task's vector.
    density: the target density (``"topk"``).
    rule: ``"topk"`` or ``"round"``.

  Returns:
    ``{path: bool array}`` masks.

  Raises:
    ValueError: an unknown rule.

  References:
    He et al., "Localize-and-Stitch: Efficient Model Merging via Sparse Task Arithmetic", 2024.
    https://arxiv.org/abs/2408.13656
  """
  if rule not in BINARIZE:
    raise ValueError(f"binarize must be one of {list(BINARIZE)}, got {rule!r}")
  nonzero = {p: tau_t[p] != 0 for p in tau_t}
  if rule == "round":
    return {p: (logits[p] > 0) & nonzero[p] for p in logits}
  return topk_masks(logits, nonzero, density)


@jax.jit
def stitch(pre32: dict, tau: dict, masks: dict) -> dict:
  """``theta_0 + sum_t gamma_t tau_t / max(1, sum_s gamma_s)`` per entry (overlaps averaged over the tasks
  that claim them).

  Args:
    pre32: ``{path: array}`` pretrained float leaves.
    tau: ``{path: [T, ...]}`` task vectors.
    masks: ``{path: [T, ...]}`` binary masks (bool or 0/1).

  Returns:
    ``{path: array}`` stitched float32 leaves.

  References:
    He et al., "Localize-and-Stitch: Efficient Model Merging via Sparse Task Arithmetic", 2024.
    https://arxiv.org/abs/2408.13656
  """
  out = {}
  for p, x in pre32.items():
    m = masks[p].astype(jnp.float32)
    count = jnp.maximum(jtree.task_sum(m), 1.0)
    out[p] = x.astype(jnp.float32) + jtree.task_sum(m * tau[p]) / count
  return out


def localize_adapter(forward_fn: Callable[[Any, jax.Array], jax.Array], pretrained_like: Any) -> Adapter:
  """The :class:`Adapter` of one task's localization: ``theta = {path: mask logits S}``, model
  ``theta_0 + sigmoid(S) * tau`` over ``frozen = {"pre", "tau", "passthrough", "head", "valid"}`` (one task's
  vector, its head ``[C_max, D]`` and real-class mask ``[C_max]``). ``init`` is all zeros: pass the starting
  logits to :func:`jaxmerge.tta.fit` as ``theta``.

  Args:
    forward_fn: ``forward_fn(params, inputs [B, ...]) -> features [B, D]`` (jit-compatible).
    pretrained_like: the pretrained pytree or its :class:`~jaxmerge.tta.heads.Structure`.

  Returns:
    The (cached) :class:`Adapter`; its ``apply`` returns ``(logits [B, C_max], valid [C_max], soft mask)`` for a
    batch ``(inputs, labels)``.

  References:
    He et al., "Localize-and-Stitch: Efficient Model Merging via Sparse Task Arithmetic", 2024.
    https://arxiv.org/abs/2408.13656
  """
  return _localize_adapter(forward_fn, H.structure_of(pretrained_like))


@functools.lru_cache(maxsize=16)
def _localize_adapter(forward_fn, structure) -> Adapter:
  def init(key, frozen):
    del key
    return {p: jnp.zeros_like(x) for p, x in frozen["pre"].items()}

  def apply(theta, frozen, batch, *, key=None):
    del key
    soft = {p: jax.nn.sigmoid(s) for p, s in theta.items()}
    flat = {p: frozen["pre"][p] + soft[p] * frozen["tau"][p] for p in frozen["pre"]}
    z = forward_fn(H.assemble(structure, flat, frozen["passthrough"]), jnp.asarray(batch[0]))
    return H.head_logits(z, frozen["head"]), frozen["valid"], soft

  return Adapter(init, apply)


def localize_loss(l1_strength: float) -> Callable[..., Any]:
  """The localization objective ``CE(logits, labels) + l1_strength * mean(sigmoid(S))`` (mean over every
  entry of the model), with the cross-entropy and the soft density as auxiliary values.

  Args:
    l1_strength: weight of the L1 penalty on the soft mask (it is non-negative, so its L1 norm is its sum).

  Returns:
    The (cached) loss ``loss(out, batch) -> (scalar, {"ce", "soft_density"})`` for :func:`jaxmerge.tta.fit`
    with ``has_aux=True``.

  References:
    He et al., "Localize-and-Stitch: Efficient Model Merging via Sparse Task Arithmetic", 2024.
    https://arxiv.org/abs/2408.13656
  """
  return _localize_loss(float(l1_strength))


@functools.lru_cache(maxsize=16)
def _localize_loss(l1_strength):
  def loss(out, batch):
    logits, valid, soft = out
    logp = jax.nn.log_softmax(jnp.where(valid[None], logits, -1e30), axis=-1)
    y = jnp.asarray(batch[1], jnp.int32)
    ce = -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=-1))
    total = sum(jnp.sum(s) for s in soft.values())
    density = total / sum(s.size for s in soft.values())
    return ce + l1_strength * density, {"ce": ce, "soft_density": density}

  return loss


def _labeled_batches(x: np.ndarray, y: np.ndarray, batch_size: int, key: jax.Array) -> Iterator[tuple]:
  n = len(x)
  b = min(batch_size, n)
  rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())
  while True:
    order = rng.permutation(n)
    for i in range(0, n - b + 1, b):
      j = order[i:i + b]
      yield x[j], y[j]


def localize_stitch_data(
    pretrained: Any,
    finetuned: Sequence[Any] | Any,
    forward_fn: Callable[[Any, jax.Array], jax.Array],
    heads: Sequence[Any],
    data: Sequence[tuple[Any, Any]],
    *,
    density: float = 0.01,
    sigmoid_bias: float = 5.0,
    l1_strength: float = 1.0,
    optimizer: Any = None,
    steps: int = 20,
    num_examples: int = 64,
    batch_size: int = 64,
    binarize: str = "topk",
    key: jax.Array,
    progress: bool = False,
    names: Sequence[str] | None = None,
) -> tuple[Any, dict]:
  """Localize-and-Stitch with masks learned on a few labeled examples of each task.

  Args:
    pretrained: pretrained parameters.
    finetuned: ``T`` fine-tuned models (list) or one stacked pytree.
    forward_fn: ``forward_fn(params, inputs) -> features [B, D]`` (jittable).
    heads: ``T`` frozen heads ``[C_t, D]``.
    data: ``T`` pairs ``(inputs [N, ...], labels [N])``; the first ``num_examples`` of each are used.
    density: fraction of each task vector's entries in the initial mask and, with ``binarize="topk"``, in the
      final one.
    sigmoid_bias: initial logit magnitude ``b`` (``+b`` inside the initial mask, ``-b`` outside).
    l1_strength: weight of ``mean(sigmoid(S))`` in the loss.
    optimizer: optax optimizer over the logits (default Adam 0.5: with ``sigmoid_bias`` 5, 20 steps let an
      entry cross from ``-b`` to ``+b``).
    steps: optimizer steps per task (``0``: the data-free masks).
    num_examples: labeled examples per task (64, the reference's shots).
    batch_size: examples per step (a step with ``batch_size >= num_examples`` is one full-batch epoch).
    binarize: ``"topk"`` (the top-``density`` logits) or ``"round"`` (``sigmoid(S) > 0.5``).
    key: PRNG key (shuffles of each task's examples).
    progress: progress bars.
    names: model names for error messages.

  Returns:
    ``(merged, history)`` with ``history = {"loss": [T, steps], "ce": [T, steps], "soft_density": [T, steps],
    "density": [T] (final binary mask densities), "overlap": fraction of kept entries claimed by several
    tasks}``.

  Raises:
    ValueError: bad hyperparameters, missing labels, or a number of heads or data entries different from the
      number of models.

  References:
    He et al., "Localize-and-Stitch: Efficient Model Merging via Sparse Task Arithmetic", 2024.
    https://arxiv.org/abs/2408.13656
  """
  from jaxmerge.tta.methods import adam  # noqa: PLC0415

  if not 0.0 <= density <= 1.0:
    raise ValueError(f"density must be in [0, 1], got {density}")
  if binarize not in BINARIZE:
    raise ValueError(f"binarize must be one of {list(BINARIZE)}, got {binarize!r}")
  if not sigmoid_bias > 0:
    raise ValueError(f"sigmoid_bias must be positive, got {sigmoid_bias}")
  if l1_strength < 0:
    raise ValueError(f"l1_strength must be >= 0, got {l1_strength}")
  if steps < 0 or num_examples < 1 or batch_size < 1:
    raise ValueError(f"steps must be >= 0 and num_examples, batch_size >= 1, got {steps}, {num_examples}, "
                     f"{batch_size}")
  pre32, tau, passthrough = H.split_params(pretrained, finetuned, names=names)
  num_tasks = next(iter(tau.values())).shape[0]
  hs, valid = H.pad_heads(heads)
  if hs.shape[0] != num_tasks:
    raise ValueError(f"got {hs.shape[0]} heads for {num_tasks} fine-tuned models")
  data = list(data)
  if len(data) != num_tasks:
    raise ValueError(f"localize_stitch_data needs labeled data for each of the {num_tasks} models, got {len(data)}")
  tasks = list(names) if names is not None else [f"task{t}" for t in range(num_tasks)]
  for t, d in enumerate(data):
    if not (isinstance(d, tuple) and len(d) == 2):
      raise ValueError(f"localize_stitch_data needs labels: task {tasks[t]}'s data must be (inputs, labels)")
    if np.shape(d[0])[0] == 0:
      raise ValueError(f"localize_stitch_data: task {tasks[t]} has no examples (empty batch)")
  tx = optimizer if optimizer is not None else adam(0.5)
  adapter = localize_adapter(forward_fn, pretrained)
  loss = localize_loss(l1_strength)
  masks, hist = [], {"loss": [], "ce": [], "soft_density": []}
  for t in range(num_tasks):
    tau_t = {p: x[t] for p, x in tau.items()}
    init = topk_masks({p: jnp.abs(x) for p, x in tau_t.items()}, {p: x != 0 for p, x in tau_t.items()}, density)
    theta0 = {p: jnp.where(m, sigmoid_bias, -sigmoid_bias).astype(jnp.float32) for p, m in init.items()}
    frozen = {"pre": pre32, "tau": tau_t, "passthrough": passthrough, "head": hs[t], "valid": valid[t]}
    x, y = np.asarray(data[t][0])[:num_examples], np.asarray(data[t][1])[:num_examples]
    batches = _labeled_batches(x, y, batch_size, jax.random.fold_in(key, t))
    theta, h = fit(adapter, frozen, tx, batches, loss, key=jax.random.fold_in(key, num_tasks + t), steps=steps,
                   progress=progress, has_aux=True, theta=theta0, desc=f"Localize {tasks[t]}")
    for k in hist:
      hist[k].append(np.asarray(h.get(k, np.zeros(0)), np.float32))
    masks.append(binarize_masks(theta, tau_t, density, binarize))
  stacked = {p: jnp.stack([m[p] for m in masks]) for p in pre32}
  flat = stitch(pre32, tau, stacked)
  n = sum(int(x.size) for x in pre32.values())
  history = {k: np.stack(v) for k, v in hist.items()}
  history["density"] = np.array([sum(float(jnp.sum(m[p])) for p in m) / n for m in masks], np.float32)
  counts = sum(jnp.sum(jnp.sum(stacked[p].astype(jnp.int32), axis=0) > 1) for p in stacked)
  kept = sum(jnp.sum(jnp.any(stacked[p], axis=0)) for p in stacked)
  history["overlap"] = float(counts) / max(float(kept), 1.0)
  dtypes = {p: x.dtype for p, x in jtree.flatten_paths(pretrained).items()}
  merged = H.assemble(pretrained, {p: x.astype(dtypes[p]) for p, x in flat.items()}, passthrough)
  return merged, history
