"""AdaMerging (task-wise and layer-wise) and AdaMerging++: task-arithmetic coefficients learned by entropy
minimization on unlabeled test inputs.

``theta`` is the coefficient table of :func:`jaxmerge.transforms.scale_tasks` (``(T,)`` task-wise, or one
``(T,)`` per leaf layer-wise), and the merged model ``theta_0 + sum_t lambda_t Phi(tau_t)`` is built inside
the loss by ``chain(scale_tasks, sum_tasks)``, so gradients flow through the merge. ``Phi`` is the identity
(AdaMerging) or TIES's trim and sign mask (AdaMerging++), precomputed once outside the loop.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxmerge import filters as jfilters
from jaxmerge import reductions as R
from jaxmerge import transforms as T
from jaxmerge import tree as jtree
from jaxmerge.base import EmptyCoeffs, MergeContext
from jaxmerge.combine import chain
from jaxmerge.tta import heads as H
from jaxmerge.tta.adapter import Adapter
from jaxmerge.tta.fit import fit
from jaxmerge.tta.losses import entropy
from jaxmerge.tta.methods import AdaMergingConfig, adamerging_config, check_adamerging

__all__ = ["AdaMergingConfig", "adamerging", "adamerging_adapter", "adamerging_config", "ties_masked"]

REFERENCE = "https://arxiv.org/abs/2310.02575"
_check = check_adamerging


def ties_masked(tau: dict, density: float = 0.2) -> dict:
  """AdaMerging++'s ``Phi``: each task vector trimmed to its top-``density`` entries (one global threshold
  per task), then only the entries agreeing with TIES's elected sign kept. ``(T, ...) -> (T, ...)``.

  Args:
    tau: flat ``{path: (T, ...)}`` task vectors.
    density: fraction of each task vector's entries kept by the trim.

  Returns:
    ``{path: (T, ...)}`` trimmed, sign-masked task vectors (zeros elsewhere).

  References:
    Yang et al., "AdaMerging: Adaptive Model Merging for Multi-Task Learning", ICLR 2024.
    https://arxiv.org/abs/2310.02575
  """
  tr = T.trim(density, "global")
  trimmed = tr.apply(tr.init(tau), tau)
  sign = R.elected_sign(trimmed, "global")
  return jax.tree.map(lambda x, s: jnp.where(jnp.where(s[None] > 0, x > 0, x < 0), x, 0.0), trimmed, sign)


def adamerging_adapter(forward_fn: Callable[[Any, jax.Array], jax.Array], pretrained_like: Any, *,
                       granularity: str = "layer", init_scale: float = 0.3,
                       layout: Callable[..., Any] | None = None, remat: bool = False) -> Adapter:
  """The :class:`Adapter` of AdaMerging over ``frozen = {"pre", "deltas", "passthrough", "heads", "mask"}``.

  ``apply`` returns ``(logits [T, B, C_max], mask [T, C_max])`` for a stacked batch ``[T, B, ...]`` (task
  ``t``'s inputs scored with head ``t``). ``pretrained_like`` (a pytree or
  :class:`~jaxmerge.tta.heads.Structure`) gives the tree structure ``forward_fn`` expects. Adapters are cached
  per arguments, so repeated runs on one model structure compile their step once. ``remat=True`` wraps the
  merge in ``jax.checkpoint`` (the merged weights are recomputed in the backward pass instead of stored).

  Args:
    forward_fn: ``forward_fn(params, images [B, ...]) -> features [B, D]`` (jit-compatible).
    pretrained_like: the pretrained pytree or its :class:`~jaxmerge.tta.heads.Structure`.
    granularity: ``"layer"`` (per-leaf ``(T,)`` coefficients) or ``"task"`` (one ``(T,)`` table).
    init_scale: initial coefficient.
    layout: matrix layout passed to the merge context (default :func:`jaxmerge.filters.hf_layout`).
    remat: recompute the merged weights in the backward pass.

  Returns:
    The (cached) :class:`Adapter`.

  Raises:
    ValueError: an unknown ``granularity``.

  References:
    Yang et al., "AdaMerging: Adaptive Model Merging for Multi-Task Learning", ICLR 2024.
    https://arxiv.org/abs/2310.02575
  """
  return _adamerging_adapter(forward_fn, H.structure_of(pretrained_like), granularity, init_scale, layout, remat)


@functools.lru_cache(maxsize=32)
def _adamerging_adapter(forward_fn, pretrained_like, granularity, init_scale, layout, remat) -> Adapter:
  _check(granularity, "task_arithmetic")
  merge_tx = chain(T.scale_tasks(init_scale, per_leaf=granularity == "layer"), R.sum_tasks())
  layout = layout or jfilters.hf_layout

  def init(key, frozen):
    del key
    return merge_tx.init(frozen["deltas"])[0]

  def merged_params(theta, frozen):
    delta = merge_tx.apply((theta, EmptyCoeffs()), frozen["deltas"],
                           ctx=MergeContext(pretrained=frozen["pre"], layout=layout))
    flat = {p: frozen["pre"][p] + delta[p] for p in frozen["pre"]}
    return H.assemble(pretrained_like, flat, frozen["passthrough"])

  merge_fn = jax.checkpoint(merged_params) if remat else merged_params

  def apply(theta, frozen, batch, *, key=None):
    del key
    params = merge_fn(theta, frozen)
    images = jnp.asarray(batch)
    t, b = images.shape[:2]
    z = forward_fn(params, images.reshape((t * b,) + images.shape[2:])).astype(jnp.float32)
    z = z.reshape(t, b, z.shape[-1])
    logits = jnp.einsum("tbd,tcd->tbc", z, frozen["heads"], precision=jax.lax.Precision.HIGHEST)
    return logits, frozen["mask"]

  return Adapter(init, apply)


@functools.lru_cache(maxsize=8)
def _adam(learning_rate: float) -> optax.GradientTransformation:
  import optax  # noqa: PLC0415

  return optax.adam(learning_rate)


def entropy_loss(out, batch) -> jax.Array:
  """``sum_t mean_b H(softmax(logits[t, b]))`` over real classes (the shared TTA objective)."""
  del batch
  logits, mask = out
  return jnp.sum(jnp.mean(entropy(logits, mask[:, None, :]), axis=1))


def adamerging(
    pretrained: Any,
    finetuned: Sequence[Any] | Any,
    forward_fn: Callable[[Any, jax.Array], jax.Array],
    heads: Sequence[Any],
    unlabeled_batches: Any,
    *,
    granularity: str = "layer",
    init_scale: float = 0.3,
    base: str = "task_arithmetic",
    density: float = 0.2,
    optimizer: optax.GradientTransformation | None = None,
    steps: int = 1000,
    key: jax.Array,
    layout: Callable[..., Any] | None = None,
    remat: bool = False,
    progress: bool = True,
) -> tuple[Any, dict]:
  """Runs AdaMerging and returns the merged model.

  Args:
    pretrained: pretrained parameters (any pytree).
    finetuned: ``T`` fine-tuned models (list) or one stacked pytree.
    forward_fn: ``forward_fn(params, images [B, ...]) -> features [B, D]`` (jit-compatible).
    heads: ``T`` frozen heads ``[C_t, D]``; ``logits = features @ head.T``.
    unlabeled_batches: an iterable of stacked ``[T, B, ...]`` batches, or ``T`` per-task iterables of
      ``[B, ...]`` batches (zipped), yielding at least ``steps`` batches.
    granularity: ``"layer"`` (per-leaf ``(T,)`` coefficients) or ``"task"`` (``(T,)``).
    init_scale: initial coefficient (0.3; with ``steps=0`` the result is task arithmetic at this scale).
    base: ``"task_arithmetic"`` (AdaMerging) or ``"ties"`` (AdaMerging++: TIES-trimmed, sign-masked task
      vectors, precomputed once).
    density: AdaMerging++'s trim density.
    optimizer: optax optimizer over the coefficients (default ``optax.adam(1e-3)``, the reference's).
    steps: optimizer steps.
    key: PRNG key.
    layout: matrix layout passed to the merge context (see :mod:`jaxmerge.filters`).
    remat: recompute the merged weights in the backward pass (``jax.checkpoint``; for large models).
    progress: tqdm progress bar.

  Returns:
    ``(merged, history)``: parameters like ``pretrained`` (its dtypes), and ``{"loss": [steps], "coeffs":
    the learned coefficients}``.

  References:
    Yang et al., "AdaMerging: Adaptive Model Merging for Multi-Task Learning", ICLR 2024.
    https://arxiv.org/abs/2310.02575
  """
  _check(granularity, base)
  pre32, tau, passthrough = H.split_params(pretrained, finetuned)
  num_tasks = next(iter(tau.values())).shape[0]
  hs, mask = H.pad_heads(heads)
  if hs.shape[0] != num_tasks:
    raise ValueError(f"got {hs.shape[0]} heads for {num_tasks} fine-tuned models")
  if base == "ties":
    tau = jax.jit(ties_masked, static_argnums=1)(tau, density)
  frozen = {"pre": pre32, "deltas": tau, "passthrough": passthrough, "heads": hs, "mask": mask}
  adapter = adamerging_adapter(forward_fn, pretrained, granularity=granularity, init_scale=init_scale,
                               layout=layout, remat=remat)
  tx = optimizer if optimizer is not None else _adam(1e-3)
  theta, history = fit(adapter, frozen, tx, H.task_batches(unlabeled_batches, num_tasks), entropy_loss,
                       key=key, steps=steps, progress=progress, desc="AdaMerging")
  merged = _bake(theta, frozen, pretrained)
  history["coeffs"] = jax.tree.map(np.asarray, jax.device_get(theta))
  return merged, history


def _bake(theta: Any, frozen: dict, pretrained: Any) -> Any:
  """The merged parameters at ``theta`` (the same ``chain(scale_tasks, sum_tasks)`` as in the loss), cast to
  the pretrained dtypes."""
  merge_tx = chain(T.scale_tasks(), R.sum_tasks())

  @jax.jit
  def run(theta, frozen):
    delta = merge_tx.apply((theta, EmptyCoeffs()), frozen["deltas"])
    return {p: frozen["pre"][p] + delta[p] for p in frozen["pre"]}

  flat = run(theta, frozen)
  dtypes = {p: x.dtype for p, x in jtree.flatten_paths(pretrained).items()}
  flat = {p: x.astype(dtypes[p]) for p, x in flat.items()}
  return H.assemble(pretrained, flat, frozen["passthrough"])
