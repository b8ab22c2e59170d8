"""Resolving Interference (RI): disentangle experts on unlabeled auxiliary data before merging.

RI adapts every expert's task vector so that it leaves the *other* tasks' head spaces as the pretrained
model had them (functional orthogonality), while distilling its own task's function. The result is a new
stack of experts; any merge method of the library is applied to it afterwards.

The paper's code was not public when this was written: the formulation below is derived from the paper's
definitions (Ramesh et al., arXiv 2603.13467), and every choice it leaves open is a named argument.

Independent mode (default). For expert ``i`` with ``tau'_i`` initialized at ``tau_i`` and ``x ~ D_aux``::

    L_i = 1/(T-1) sum_{j != i} E_x || h_j(z(x; theta_0 + tau'_i)) - h_j(z(x; theta_0)) ||^2      (disentangle)
        + beta * E_x D( h_i(z(x; theta_i)), h_i(z(x; theta_0 + tau'_i)) )                        (preserve)

with linear heads ``h_j(z) = W_j z`` and ``D`` the KL divergence between temperature softmaxes (target
first: ``KL(softmax(h_i(z(x; theta_i)) / T) || softmax(h_i(z(x; theta'_i)) / T))``, the distillation direction,
with the expert as the teacher; no ``T^2`` factor) or the mean squared logit difference over the task's
classes. Joint mode learns all ``tau'`` at once so that the merged model ``merge(tau')`` (task arithmetic by
default) matches every expert in its own head space::

    L = sum_i E_x D( h_i(z(x; theta_i)), h_i(z(x; theta_0 + merge(tau'))) )

Defaults: the field defaults of :class:`~jaxmerge.tta.methods.RIConfig` (the registry entry ``"ri"``, which
``import jaxmerge`` registers without importing this module), read by :func:`disentangle`'s signature and by the
benchmark (``jaxmerge bench --ri``), the experiment scripts and the RI notebook.

References:
  Ramesh, Stoica, Iyer, Choshen, Hoffman, "Resolving Interference: Disentangling Models for Improved Model
  Merging", 2026. https://arxiv.org/abs/2603.13467
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxmerge import filters as jfilters
from jaxmerge import tree as jtree
from jaxmerge.base import MergeContext, MergeTransform
from jaxmerge.engine.merge import prepare
from jaxmerge.tta import heads as H
from jaxmerge.tta.adapter import Adapter
from jaxmerge.tta.fit import fit
from jaxmerge.tta.losses import kl_divergence, mse
from jaxmerge.tta.methods import RIConfig, ri_config
from jaxmerge.tta.methods import check_ri as _check
from jaxmerge.tta.methods import check_ri_beta as _check_beta

__all__ = ["RIConfig", "auto_beta", "disentangle", "ri_adapter", "ri_config"]

REFERENCE = "https://arxiv.org/abs/2603.13467"
# RI's defaults: the field defaults of RIConfig (jaxmerge/tta/methods.py), shared with the registry entry "ri",
# the benchmark and the experiments. Change them there.
_RI = RIConfig()


def _divergence(preserve: str, temperature: float) -> Callable[..., jax.Array]:
  if preserve == "kl":
    return lambda target, model, mask: kl_divergence(target, model, temperature, mask)
  return lambda target, model, mask: mse(model, target, mask)


def ri_adapter(
    forward_fn: Callable[[Any, jax.Array], jax.Array],
    pretrained_like: Any,
    *,
    mode: str = _RI.mode,
    beta: float = 1.0,
    temperature: float = _RI.temperature,
    preserve: str = _RI.preserve,
    merge: MergeTransform | None = None,
    merge_scale: float = _RI.merge_scale,
    task_loop: str = _RI.task_loop,
    layout: Callable[..., Any] | None = None,
) -> Adapter:
  """RI as an :class:`~jaxmerge.tta.Adapter`; ``apply`` returns ``(loss, metrics)`` for an aux batch.

  ``frozen = {"pre", "ft", "passthrough", "heads", "mask"}``: flat pretrained and stacked fine-tuned float
  leaves in their storage dtypes (bf16 is fine), non-float leaves, padded heads ``[T, C_max, D]`` and their
  class mask. ``theta`` is the float32 task-vector stack ``tau'`` (flat ``{path: [T, ...]}``). All math is
  float32. See :func:`disentangle` for the arguments. Adapters are cached per arguments (``pretrained_like``
  is reduced to its hashable :class:`~jaxmerge.tta.heads.Structure`), so repeated runs compile once.

  Args:
    forward_fn: ``forward_fn(params, inputs) -> features [B, D]``.
    pretrained_like: a pytree with the pretrained model's structure (only its structure is used).
    mode: ``"independent"`` or ``"joint"``.
    beta: weight of the preserve term (independent mode); a number (:func:`disentangle` resolves ``None``
      with :func:`auto_beta` before calling this).
    temperature: softmax temperature of the KL preserve term.
    preserve: ``"kl"`` or ``"mse"``.
    merge: joint mode's differentiable merge, a reducing :class:`~jaxmerge.base.MergeTransform` (default:
      task arithmetic at ``merge_scale``).
    merge_scale: task arithmetic's lambda for joint mode's default merge.
    task_loop: ``"vmap"`` or ``"map"`` (independent mode's loop over experts).
    layout: parameter layout for the merge (default :func:`jaxmerge.filters.hf_layout`).

  Returns:
    The :class:`~jaxmerge.tta.Adapter`.

  Raises:
    ValueError: an invalid hyperparameter, ``beta=None``, or a ``merge`` that is not a reducing transform.

  References:
    Ramesh et al., "Resolving Interference: Disentangling Models for Improved Model Merging", 2026.
    https://arxiv.org/abs/2603.13467
  """
  return _ri_adapter(forward_fn, H.structure_of(pretrained_like), mode, beta, temperature, preserve, merge,
                     merge_scale, task_loop, layout)


@functools.lru_cache(maxsize=32)
def _ri_adapter(forward_fn, pretrained_like, mode, beta, temperature, preserve, merge, merge_scale, task_loop,
                layout) -> Adapter:
  _check(mode, preserve, task_loop, beta, temperature)
  if beta is None:
    raise ValueError("ri_adapter needs a numeric beta (disentangle's default is auto_beta(heads))")
  div = _divergence(preserve, temperature)
  layout = layout or jfilters.hf_layout
  if merge is None:
    from jaxmerge.alias import task_arithmetic

    merge = task_arithmetic(scale=merge_scale)
  if not isinstance(merge, MergeTransform) or not merge.reduces:
    raise ValueError("merge must be a reducing MergeTransform (e.g. jm.get_method('task_arithmetic')())")

  def tau0(frozen):
    return {p: x.astype(jnp.float32) - frozen["pre"][p].astype(jnp.float32)[None] for p, x in frozen["ft"].items()}

  def init(key, frozen):
    del key
    return tau0(frozen)

  def features(frozen, delta, x):
    flat = {p: frozen["pre"][p].astype(jnp.float32) + delta[p] for p in frozen["pre"]}
    return forward_fn(H.assemble(pretrained_like, flat, frozen["passthrough"]), x).astype(jnp.float32)

  def expert_logits(frozen, x):
    """``h_i(z(x; theta_i))`` for every expert: ``[T, B, C_max]`` (no gradient)."""
    t0 = tau0(frozen)
    z = jax.lax.map(lambda d: features(frozen, d, x), t0)
    return jax.lax.stop_gradient(jnp.einsum("tbd,tcd->tbc", z, frozen["heads"], precision=_HI))

  def independent(theta, frozen, x):
    heads, mask = frozen["heads"], frozen["mask"]
    num_tasks = heads.shape[0]

    def one(args):
      delta, delta0, i = args
      # The references (pretrained features, the expert's own logits) are computed next to the adapted forward,
      # with the same batching, so that at initialization they agree bit for bit where they should: an expert
      # with nothing to fix gets an exact zero gradient (Adam would otherwise amplify rounding noise).
      z0 = jax.lax.stop_gradient(features(frozen, jax.tree.map(lambda d: d * 0.0, delta0), x))  # batched like z
      target_i = jax.lax.stop_gradient(jnp.einsum("bd,cd->bc", features(frozen, delta0, x), heads[i], precision=_HI))
      z = features(frozen, delta, x)
      proj = jnp.einsum("bd,tcd->tbc", z - z0, heads, precision=_HI)
      per_head = jnp.mean(jnp.sum(jnp.square(proj), axis=-1), axis=-1)  # [T]
      dis = jnp.sum(jnp.where(jnp.arange(num_tasks) != i, per_head, 0.0)) / max(num_tasks - 1, 1)
      logits_i = jnp.einsum("bd,cd->bc", z, heads[i], precision=_HI)
      pres = jnp.mean(div(target_i, logits_i, mask[i][None]))
      return dis, pres

    args = (theta, tau0(frozen), jnp.arange(num_tasks))
    dis, pres = jax.vmap(one)(args) if task_loop == "vmap" else jax.lax.map(one, args)
    loss = jnp.sum(dis + beta * pres)
    return loss, {"disentangle": jnp.mean(dis), "preserve": jnp.mean(pres), "disentangle_tasks": dis,
                  "preserve_tasks": pres}

  def joint(theta, frozen, x, key):
    heads, mask = frozen["heads"], frozen["mask"]
    target = expert_logits(frozen, x)
    pre32 = {p: v.astype(jnp.float32) for p, v in frozen["pre"].items()}
    delta = merge.apply(merge.init(theta), theta, key=key, ctx=MergeContext(pretrained=pre32, layout=layout))
    z = features(frozen, delta, x)
    logits = jnp.einsum("bd,tcd->tbc", z, heads, precision=_HI)
    pres = jnp.mean(div(target, logits, mask[:, None, :]), axis=1)  # [T]
    return jnp.sum(pres), {"preserve": jnp.mean(pres), "preserve_tasks": pres}

  def apply(theta, frozen, batch, *, key=None):
    x = jnp.asarray(batch)
    if mode == "independent":
      return independent(theta, frozen, x)
    return joint(theta, frozen, x, key)

  return Adapter(init, apply)


_HI = jax.lax.Precision.HIGHEST


@functools.lru_cache(maxsize=8)
def _adamw(learning_rate: float, weight_decay: float) -> optax.GradientTransformation:
  return optax.adamw(learning_rate, weight_decay=weight_decay)


def _loss(out, batch):
  del batch
  return out


def disentangle(
    pretrained: Any,
    finetuned: Sequence[Any] | Any,
    heads: Sequence[Any] | Any,
    aux_batches: Any,
    *,
    forward_fn: Callable[[Any, jax.Array], jax.Array],
    mode: str = _RI.mode,
    beta: float | None = _RI.beta,
    steps: int = _RI.steps,
    optimizer: optax.GradientTransformation | None = None,
    learning_rate: float = _RI.learning_rate,
    weight_decay: float = _RI.weight_decay,
    temperature: float = _RI.temperature,
    preserve: str = _RI.preserve,
    merge: MergeTransform | None = None,
    merge_scale: float = _RI.merge_scale,
    task_loop: str = _RI.task_loop,
    key: jax.Array,
    layout: Callable[..., Any] | None = None,
    progress: bool = True,
) -> tuple[Any, dict[str, np.ndarray]]:
  """Resolving Interference: adapts the experts' task vectors on unlabeled auxiliary data.

  The formulation is derived from the paper's definitions (its code was not public); see the module
  docstring for the two objectives. Only the task vectors ``tau'`` are trained (float32, with optax); the
  pretrained weights, the original experts and the heads are frozen.

  Args:
    pretrained: pretrained parameters ``theta_0`` (any pytree; float32, bf16 or fp16 leaves).
    finetuned: ``T`` experts (a list) or one stacked pytree (leading task axis).
    heads: ``T`` frozen linear heads ``[C_t, D]`` (a sequence or ``{task: head}`` in task order);
      ``h_j(z) = z @ W_j.T``. On the offline suite: ``[suite.heads[t] for t in suite.tasks]``.
    aux_batches: an iterable of unlabeled auxiliary input batches ``[B, ...]`` (no task data, no labels),
      yielding at least ``steps`` batches; every expert sees the same batch at a step.
    forward_fn: ``forward_fn(params, inputs) -> features [B, D]`` (jit- and vmap-compatible), e.g.
      ``suite.embed``.
    mode: ``"independent"`` (each expert disentangled on its own, the paper's default) or ``"joint"`` (all
      ``tau'`` at once through the differentiable ``merge``).
    beta: weight of the preserve term (independent mode). ``None`` (default): the heads' mean squared row
      norm, ``mean_j mean_c ||W_j[c]||^2``. The disentangle term is a squared logit difference, so it scales
      with the square of the heads' norm, while the KL preserve term does not: CLIP zero-shot heads carry the
      logit scale ``s`` (100 for OpenAI CLIP, 16.6 for the offline suite's tiny CLIP), and a fixed
      ``beta = 1`` would let the disentangle term dominate by ``s^2``. ``beta = s^2`` measures the disentangle
      term in unit-norm-head (cosine) units instead, so one default serves every logit scale; it is 1 for
      unit-norm heads. Pass a number to set it directly. Joint mode has no preserve term: a ``beta`` given
      there raises ``ValueError`` (it would be ignored).
    steps: optimizer steps (a few hundred).
    optimizer: optax optimizer over ``tau'``; default ``optax.adamw(learning_rate, weight_decay=
      weight_decay)``. Independent experts share one optimizer over the summed loss, which equals separate
      optimization for elementwise optimizers (Adam, AdamW, SGD) but not for global-norm clipping.
    learning_rate: default optimizer's learning rate.
    weight_decay: default optimizer's decoupled weight decay on ``tau'`` (0: plain Adam; > 0 pulls the
      task vectors toward the pretrained model).
    temperature: softmax temperature of the KL preserve term.
    preserve: ``"kl"`` (``KL(softmax(expert/T) || softmax(adapted/T))``) or ``"mse"`` (mean squared logit
      difference over the task's classes).
    merge: joint mode's differentiable merge (a reducing :class:`~jaxmerge.base.MergeTransform`); default
      task arithmetic at ``merge_scale``.
    merge_scale: task arithmetic's lambda for joint mode's default merge.
    task_loop: independent mode's loop over experts: ``"vmap"`` (all experts in one batched program, fastest)
      or ``"map"`` (``lax.map``: one expert at a time, ``T`` times less activation memory, same result).
      Per step and expert, independent mode runs three forwards (adapted, expert, pretrained; the references
      are recomputed next to the adapted forward so that an expert with nothing to fix gets an exact zero
      gradient) and one backward.
    key: PRNG key (keyword-only); the run is deterministic under it and the batch order.
    layout: matrix layout for the merge context (see :mod:`jaxmerge.filters`).
    progress: tqdm progress bar.

  Returns:
    ``(adapted, history)``: the adapted experts ``theta_0 + tau'_i`` in ``finetuned``'s form (a list of
    pytrees or a stacked pytree) and dtypes; ``history`` has ``"loss"`` per step, ``"preserve"`` and (in
    independent mode) ``"disentangle"`` means over tasks, and their per-task values
    (``"preserve_tasks"``, ``"disentangle_tasks"``: ``[steps, T]``), evaluated before each update.

  Raises:
    ValueError: bad choices (a ``beta`` in joint mode among them), zero experts, a head count or feature size that does not match the experts, an
      empty auxiliary source (or batch), or incompatible models.

  References:
    Ramesh et al., "Resolving Interference: Disentangling Models for Improved Model Merging", 2026.
    https://arxiv.org/abs/2603.13467
  """
  _check(mode, preserve, task_loop, beta, temperature)
  _check_beta(mode, beta)
  as_list = isinstance(finetuned, (list, tuple))
  if as_list and not finetuned:
    raise ValueError("RI needs at least one expert: the task list is empty (0 tasks)")
  pre, ft, passthrough = prepare(pretrained, finetuned)
  if as_list:
    ft = H.stack_models(ft)
  num_tasks = next(iter(ft.values())).shape[0]
  if num_tasks == 0:
    raise ValueError("RI needs at least one expert: the stacked experts have a task axis of size 0")
  hs, mask = H.pad_heads(heads)
  if hs.shape[0] != num_tasks:
    raise ValueError(f"got {hs.shape[0]} heads for {num_tasks} experts")
  aux_batches = _check_aux(aux_batches, forward_fn, pretrained, hs.shape[-1], steps)
  if beta is None:
    beta = auto_beta(hs, mask)
  frozen = {"pre": pre, "ft": ft, "passthrough": passthrough, "heads": hs, "mask": mask}
  adapter = ri_adapter(forward_fn, pretrained, mode=mode, beta=beta, temperature=temperature, preserve=preserve,
                       merge=merge, merge_scale=merge_scale, task_loop=task_loop, layout=layout)
  tx = optimizer if optimizer is not None else _adamw(learning_rate, weight_decay)
  theta, history = fit(adapter, frozen, tx, aux_batches, _loss, key=key, steps=steps, progress=progress,
                       has_aux=True, desc=f"RI ({mode})")
  adapted = _bake(theta, frozen)
  stacked = jtree.unflatten_paths(pretrained, {**adapted, **_stack_passthrough(passthrough, num_tasks)})
  if as_list:
    return jtree.unstack(stacked), history
  return stacked, history


def auto_beta(heads: Any, mask: Any = None) -> float:
  """RI's default preserve weight: the heads' mean squared row norm ``mean_j mean_c ||W_j[c]||^2``.

  For CLIP zero-shot heads (unit class embeddings times the logit scale ``s``) this is ``s^2``: it puts the
  squared-logit disentangle term in unit-head units against the KL preserve term (see :func:`disentangle`).

  Args:
    heads: padded heads ``[T, C_max, D]`` (with ``mask``) or a sequence of ``[C_t, D]`` heads.
    mask: ``bool [T, C_max]`` real classes of padded heads.

  Returns:
    The weight (a Python float).

  References:
    Ramesh et al., "Resolving Interference: Disentangling Models for Improved Model Merging", 2026.
    https://arxiv.org/abs/2603.13467
  """
  if mask is None:
    heads, mask = H.pad_heads(heads)
  sq = np.sum(np.square(np.asarray(heads, np.float64)), axis=-1)
  m = np.asarray(mask, bool)
  return float(np.mean([sq[t][m[t]].mean() for t in range(sq.shape[0])]))


def _check_aux(aux_batches: Any, forward_fn: Callable[..., Any], pretrained: Any, head_dim: int,
               steps: int) -> Any:
  """Peeks at the first auxiliary batch: raises for an empty source or features that do not fit the heads."""
  if steps == 0:
    return aux_batches
  it = iter(aux_batches)
  first = next(it, None)
  if first is None:
    raise ValueError("the auxiliary source is empty: aux_batches yielded no batch (RI needs unlabeled inputs)")
  if not np.shape(first) or np.shape(first)[0] == 0:
    raise ValueError(f"the auxiliary source yielded an empty batch of shape {np.shape(first)}")
  feat = jax.eval_shape(forward_fn, pretrained, jnp.asarray(first))
  if len(feat.shape) != 2 or feat.shape[-1] != head_dim:
    raise ValueError(f"the heads are [C, {head_dim}] but forward_fn gives features of shape {feat.shape} "
                     "(expected [B, D] with D the heads' feature size)")
  return itertools.chain([first], it)


@jax.jit
def _bake(theta: dict, frozen: dict) -> dict:
  return {p: (frozen["pre"][p].astype(jnp.float32)[None] + theta[p]).astype(frozen["ft"][p].dtype)
          for p in frozen["pre"]}


def _stack_passthrough(passthrough: dict, num_tasks: int) -> dict:
  return {p: jnp.broadcast_to(jnp.asarray(x), (num_tasks,) + jnp.shape(x)) for p, x in passthrough.items()}
