"""Training loops of the offline suite: contrastive pretraining of the tiny CLIP and expert fine-tuning.

Both loops compile one step function (fixed batch shapes) and feed it host-side NumPy batches drawn from a
seeded generator, so a run is a deterministic function of the suite's config.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

if TYPE_CHECKING:
  from jaxmerge.bench.suite import OfflineConfig, OfflineSuite

__all__ = ["contrastive_loss", "finetune", "finetune_optimizer", "make_finetune_step", "pretrain"]


def _normalize(x):
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True).clip(1e-12)


def contrastive_loss(image_emb: jax.Array, text_emb: jax.Array, concepts: jax.Array, logit_scale: jax.Array):
  """CLIP's symmetric InfoNCE with several positives: pairs whose captions name the same concept.

  Args:
    image_emb: Float[Array, "B D"] image embeddings.
    text_emb: Float[Array, "B D"] text embeddings of the paired captions.
    concepts: Int[Array, "B"] concept id of each caption; equal ids are positives of each other (a batch of
      synthetic captions repeats concepts, which plain InfoNCE would treat as negatives).
    logit_scale: log of the temperature's inverse (CLIP's learned ``logit_scale``), clipped at log(100).

  Returns:
    The scalar loss.
  """
  logits = _normalize(image_emb) @ _normalize(text_emb).T * jnp.exp(jnp.minimum(logit_scale, jnp.log(100.0)))
  target = (concepts[:, None] == concepts[None, :]).astype(jnp.float32)
  target = target / target.sum(axis=1, keepdims=True)
  return 0.5 * (optax.softmax_cross_entropy(logits, target).mean()
                + optax.softmax_cross_entropy(logits.T, target).mean())


def _bar(total: int, desc: str, enabled: bool):
  if not enabled:
    return None
  from tqdm.auto import tqdm

  return tqdm(total=total, desc=desc, leave=False)


def pretrain(model, config: "OfflineConfig", pre, tok, *, preprocess: Callable, progress: bool = True) -> Any:
  """Trains the tiny CLIP contrastively on the captioned pretraining mixture.

  Args:
    model: the :class:`~jaxmerge.bench._model.TinyClip` handle.
    config: the suite config (steps, batch size, learning rate, seed).
    pre: a :class:`jaxmerge.data.synthetic.Pretraining`.
    tok: the word tokenizer.
    preprocess: uint8 images -> model inputs.
    progress: show a progress bar.

  Returns:
    The trained CLIP parameters (both towers).
  """
  params = model.init(jax.random.key(config.seed))
  steps = config.pretrain_steps
  sched = optax.warmup_cosine_decay_schedule(0.0, config.pretrain_lr, max(1, steps // 20), steps,
                                             config.pretrain_lr * 0.05)
  opt = optax.adamw(sched, b2=0.98, weight_decay=config.weight_decay)
  state = opt.init(params)
  ids, mask = tok(pre.captions)

  @jax.jit
  def step(params, state, x, ids, mask, concepts):
    def loss_fn(p):
      return contrastive_loss(model.encode_image(p, preprocess(x)), model.encode_text(p, ids, mask), concepts,
                              p["logit_scale"])

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  rng = np.random.default_rng([config.seed, 1])
  bar = _bar(steps, "pretraining tiny CLIP", progress)
  n = len(pre)
  for i in range(steps):
    j = rng.integers(0, n, config.pretrain_batch)
    params, state, loss = step(params, state, pre.images[j], ids[j], mask[j], pre.concepts[j])
    if bar is not None:
      bar.update()
      if i % 25 == 0 or i == steps - 1:
        bar.set_postfix(loss=f"{float(loss):.3f}")
  if bar is not None:
    bar.close()
  return params


def finetune_optimizer(config: "OfflineConfig", schedule) -> optax.GradientTransformation:
  """The experts' optimizer: ``config.finetune_optimizer`` is ``"sgd"`` (SGD with momentum
  ``config.finetune_momentum``, L2 weight decay ``config.finetune_weight_decay``) or ``"adamw"`` (decoupled
  weight decay ``config.finetune_weight_decay``).

  Args:
    config: the suite's configuration.
    schedule: the learning-rate schedule.

  Returns:
    The optax transformation (clipping is added by the caller).

  Raises:
    ValueError: another name.
  """
  name = config.finetune_optimizer
  if name == "adamw":
    return optax.adamw(schedule, weight_decay=config.finetune_weight_decay)
  if name == "sgd":
    return optax.chain(optax.add_decayed_weights(config.finetune_weight_decay),
                       optax.sgd(schedule, momentum=config.finetune_momentum or None))
  raise ValueError(f"unknown finetune_optimizer {name!r}; valid: 'sgd', 'adamw'")


def make_finetune_step(suite: "OfflineSuite", config: "OfflineConfig"
                       ) -> tuple[Callable, optax.GradientTransformation]:
  """One jitted fine-tuning step shared by every expert (heads padded to a common class count), and its
  optimizer: ``step(vision, opt_state, images, labels, task_index) -> (vision, opt_state, loss)``.

  Args:
    suite: the suite under construction (its ``padded_logits`` scores the frozen zero-shot heads).
    config: the suite's configuration: ``finetune_steps``, ``finetune_lr``, ``finetune_optimizer``,
      ``finetune_momentum`` and ``finetune_weight_decay`` set the optimizer (linear warmup over the first 10%
      of steps and cosine decay to 5% of the peak rate, after global-norm clipping at 1).

  Returns:
    ``(step, optimizer)``: ``step`` takes uint8 ``images [B, H, W, 3]``, int ``labels [B]`` and a scalar task
    index, and returns the updated parameters, optimizer state and the mean cross-entropy; ``optimizer``
    is the optax transformation whose ``init`` gives ``opt_state``.
  """
  steps = config.finetune_steps
  sched = optax.warmup_cosine_decay_schedule(0.0, config.finetune_lr, max(1, steps // 10), steps,
                                             config.finetune_lr * 0.05)
  opt = optax.chain(optax.clip_by_global_norm(1.0), finetune_optimizer(config, sched))

  def step(vision, state, x, y, task_idx):
    def loss_fn(v):
      logits = suite.padded_logits(v, x, task_idx)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = jax.value_and_grad(loss_fn)(vision)
    updates, state = opt.update(grads, state, vision)
    return optax.apply_updates(vision, updates), state, loss

  return jax.jit(step), opt


def finetune(suite: "OfflineSuite", config: "OfflineConfig", task: str, step_and_opt) -> Any:
  """Fine-tunes the pretrained vision tower on ``task`` with its frozen zero-shot head.

  Args:
    suite: the suite under construction (pretrained tower, tasks and training data).
    config: the suite's configuration (``finetune_steps`` steps of ``finetune_batch`` examples drawn with
      replacement, seeded by ``seed`` and the task's index).
    task: the task's name.
    step_and_opt: ``(step, optimizer)`` from :func:`make_finetune_step`.

  Returns:
    The expert's vision-tower parameters.
  """
  step, opt = step_and_opt
  vision = jax.tree.map(jnp.asarray, suite.pretrained)
  state = opt.init(vision)
  train = suite.data[task].train
  t = jnp.int32(suite.tasks.index(task))
  rng = np.random.default_rng([config.seed, 2, suite.tasks.index(task)])
  for _ in range(config.finetune_steps):
    j = rng.integers(0, len(train), config.finetune_batch)
    vision, state, _ = step(vision, state, train.images[j], train.labels[j], t)
  return vision


