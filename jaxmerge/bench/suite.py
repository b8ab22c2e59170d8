"""The offline 8-task suite: data, a pretrained tiny CLIP, zero-shot heads and fine-tuned experts, cached.

``build_offline_suite(config, cache_dir)`` returns an :class:`OfflineSuite`, the object the benchmark runner
(and any method that needs data: TTA, RI, RegMean, ...) works with. Building it runs, in order, and caches
each result under ``<cache_dir>/offline-<config hash>/`` (see :mod:`jaxmerge.bench.cache`):

1. ``data``: the eight tasks' train/val/test splits (:mod:`jaxmerge.data.synthetic`).
2. ``pretrained``: a tiny CLIP (jaxmerge's CLIP module at a small config) trained contrastively on the
   captioned pretraining mixture; its word vocabulary is stored with it.
3. ``heads``: zero-shot heads, one per task: the normalized mean text embedding of the task's prompt
   templates filled with each class name, times the learned logit scale (CLIP's protocol). They are frozen.
4. ``expert-<task>``: the vision tower fine-tuned on each task with the frozen projection and head (AdamW).

The text tower and the visual projection never change after pretraining; only the vision tower is merged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmerge.bench import train as btrain
from jaxmerge.bench._model import TinyClip
from jaxmerge.bench.cache import Cache
from jaxmerge.bench.text import WordTokenizer
from jaxmerge.data import synthetic

__all__ = ["BACKBONE_FIELDS", "DEFAULT_BACKBONE", "DEFAULT_SEEDS", "OfflineConfig", "OfflineSuite", "build_offline_suite",
           "config_overrides", "finetune_missing"]

# Bump when generators or training change in a way the config fields do not capture.
SUITE_VERSION = 4
# The backbone the default suite starts from (jaxmerge/bench/assets/).
DEFAULT_BACKBONE = "tinyclip-w128"
# Seeds of the default run: each its own data and experts, the same backbone; results are means over them.
DEFAULT_SEEDS = (0, 1, 2)
_PIXEL_MEAN = 0.5
_PIXEL_STD = 0.25


@dataclasses.dataclass(frozen=True)
class OfflineConfig:
  """Everything that determines the suite's bytes; its hash keys the cache.

  Attributes:
    seed: data, initialization and batch-order seed.
    tasks: task names, a subset of :data:`jaxmerge.data.synthetic.TASKS`.
    sizes: (train, val, test) examples per task.
    pretrain_size: image-caption pairs in the pretraining mixture.
    pretrain_task_fraction: fraction of pretraining images drawn in the tasks' style.
    patch_size, width, layers, heads: vision tower (32x32 images).
    text_width, text_layers, text_heads, context_length: text tower.
    projection_dim: joint embedding size.
    pretrain_steps, pretrain_batch, pretrain_lr: contrastive pretraining (AdamW, warmup + cosine).
    finetune_steps, finetune_batch, finetune_lr: expert fine-tuning (warmup + cosine, clipping at 1).
    finetune_optimizer, finetune_momentum: the experts' optimizer, ``"sgd"`` (with this momentum) or
      ``"adamw"`` (see :func:`jaxmerge.bench.train.finetune_optimizer`).
    finetune_weight_decay: the experts' weight decay (decoupled for AdamW, L2 for SGD).
    weight_decay: AdamW weight decay of pretraining.
    eval_batch: evaluation batch size (fixed; the last batch is padded).
    backbone: name of a shipped pretrained backbone (:mod:`jaxmerge.bench.backbone`) to start from instead of
      pretraining; its architecture and pretraining recipe must equal the fields above (checked), so the
      config describes the same model either way. ``None`` pretrains with the fields above.
    version: :data:`SUITE_VERSION`.
  """

  seed: int = 0
  tasks: tuple[str, ...] = synthetic.TASKS
  sizes: tuple[int, int, int] = (3000, 200, 1000)
  pretrain_size: int = 32768
  pretrain_task_fraction: float = 0.1
  patch_size: int = 8
  width: int = 128
  layers: int = 4
  heads: int = 4
  text_width: int = 64
  text_layers: int = 2
  text_heads: int = 4
  context_length: int = 8
  projection_dim: int = 64
  pretrain_steps: int = 3000
  pretrain_batch: int = 128
  pretrain_lr: float = 1e-3
  finetune_steps: int = 400
  finetune_batch: int = 32
  finetune_lr: float = 3e-5
  finetune_optimizer: str = "adamw"
  finetune_momentum: float = 0.9
  finetune_weight_decay: float = 0.05
  weight_decay: float = 0.05
  eval_batch: int = 500
  backbone: str | None = DEFAULT_BACKBONE
  version: int = SUITE_VERSION

  def __post_init__(self):
    for t in self.tasks:
      synthetic.task_spec(t)  # ValueError for unknown tasks
    if len(set(self.tasks)) != len(self.tasks) or len(self.tasks) < 2:
      raise ValueError(f"the suite needs at least two distinct tasks, got {self.tasks}")

  @classmethod
  def smoke(cls, seed: int = 0) -> "OfflineConfig":
    """A reduced suite that builds, merges and evaluates in well under a minute on a laptop CPU."""
    return cls(seed=seed, sizes=(768, 64, 200), finetune_steps=60, finetune_lr=1e-4, eval_batch=200)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @property
  def hash(self) -> str:
    """The cache key: a hash of every field and, with a shipped backbone, of its weights' SHA-256."""
    d = self.to_dict()
    if self.backbone is not None:
      from jaxmerge.bench.backbone import backbone_info

      d["backbone_sha256"] = backbone_info(self.backbone).get("sha256")
    blob = json.dumps(d, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]

  def backbone_fields(self) -> dict:
    """The fields a shipped backbone fixes: architecture, pretraining recipe and the pretraining seed."""
    return {f: getattr(self, f) for f in BACKBONE_FIELDS}


def config_overrides(items: Sequence[str]) -> dict:
  """Parses ``FIELD=JSON`` strings (the experiments' ``--set``) into :class:`OfflineConfig` overrides.

  Args:
    items: strings such as ``"finetune_lr=5e-5"`` or ``'sizes=[768, 64, 200]'``.

  Returns:
    ``{field: value}`` for :func:`dataclasses.replace` (``sizes`` and ``tasks`` as tuples).

  Raises:
    ValueError: a name that is not an :class:`OfflineConfig` field.
  """
  fields = {f.name for f in dataclasses.fields(OfflineConfig)}
  out = {}
  for item in items:
    k, _, v = item.partition("=")
    if k not in fields:
      raise ValueError(f"--set {k}: not an OfflineConfig field (fields: {', '.join(sorted(fields))})")
    out[k] = tuple(json.loads(v)) if k in ("sizes", "tasks") else json.loads(v)
  return out


# Fields that describe the pretrained model (architecture and recipe): a shipped backbone records them.
BACKBONE_FIELDS = ("pretrain_size", "pretrain_task_fraction", "patch_size", "width", "layers", "heads",
                   "text_width", "text_layers", "text_heads", "context_length", "projection_dim", "pretrain_steps",
                   "pretrain_batch", "pretrain_lr", "weight_decay")


def _preprocess(images) -> jax.Array:
  return (jnp.asarray(images).astype(jnp.float32) / 255.0 - _PIXEL_MEAN) / _PIXEL_STD


def _normalize(x: jax.Array) -> jax.Array:
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True).clip(1e-12)


class OfflineSuite:
  """The built suite: what merging methods consume and how merged models are scored.

  Attributes:
    name: ``"offline"`` (``"offline-smoke"`` for the smoke config).
    config: the :class:`OfflineConfig`.
    tasks: task names, in order.
    specs: ``{task: TaskSpec}`` (class names, templates).
    data: ``{task: TaskData}`` (train/val/test splits, uint8 images).
    model: the :class:`~jaxmerge.bench._model.TinyClip` handle.
    clip_params: the pretrained CLIP (both towers).
    heads: ``{task: float32 [C, D]}``, frozen zero-shot heads (logit scale included).
    pretrained: the pretrained vision tower (what methods merge).
    experts: fine-tuned vision towers, in task order.
    layout: ``jaxmerge.filters.flax_layout`` (kernels are stored (in, out)).
    timings: seconds spent building or loading each part.
  """

  def __init__(self, *, name, config, data, model, clip_params, heads, experts, layout, timings):
    self.name = name
    self.config = config
    self.tasks = tuple(config.tasks)
    self.data = data
    self.specs = {t: data[t].spec for t in self.tasks}
    self.model = model
    self.clip_params = clip_params
    self.heads = heads
    self.pretrained = model.vision(clip_params)
    self.experts = experts
    self.layout = layout
    self.timings = timings
    self._cache = None  # the suite's cache entry (set by build_offline_suite)
    self._max_classes = max(h.shape[0] for h in heads.values())
    # Heads padded to a common class count so that one compiled function serves every task.
    stacked = np.zeros((len(self.tasks), self._max_classes, heads[self.tasks[0]].shape[1]), np.float32)
    valid = np.zeros((len(self.tasks), self._max_classes), bool)
    for i, t in enumerate(self.tasks):
      stacked[i, : heads[t].shape[0]] = heads[t]
      valid[i, : heads[t].shape[0]] = True
    self._heads_stacked = jnp.asarray(stacked)
    self._heads_valid = jnp.asarray(valid)
    self._predict = jax.jit(self._predict_impl)

  # ---- model functions (pure, jittable) ----------------------------------------------------------------------

  preprocess = staticmethod(_preprocess)

  def embed(self, vision_params, images: jax.Array) -> jax.Array:
    """Normalized image embeddings [B, D] of uint8 or preprocessed float images [B, 32, 32, 3]."""
    if images.dtype == jnp.uint8:
      images = _preprocess(images)
    params = self.model.with_vision(self.clip_params, vision_params)
    return _normalize(self.model.encode_image(params, images))

  def logits(self, vision_params, task: str, images: jax.Array) -> jax.Array:
    """Zero-shot-head logits [B, C] of ``task`` for uint8 or preprocessed images (differentiable)."""
    return self.embed(vision_params, images) @ jnp.asarray(self.heads[task]).T

  def padded_logits(self, vision_params, images: jax.Array, task_idx: jax.Array) -> jax.Array:
    """Logits [B, C_max] with heads padded to the largest class count (padded classes get -1e9), so that one
    compiled function serves every task. ``task_idx``: a scalar (one task for the batch) or int [B] (example
    ``b`` is scored with the head of task ``self.tasks[task_idx[b]]``)."""
    z = self.embed(vision_params, images)
    if jnp.ndim(task_idx) == 0:  # one task for the whole batch
      return jnp.where(self._heads_valid[task_idx], z @ self._heads_stacked[task_idx].T, -1e9)
    logits = jnp.einsum("bd,bcd->bc", z, self._heads_stacked[task_idx])
    return jnp.where(self._heads_valid[task_idx], logits, -1e9)

  def _predict_impl(self, vision_params, images, task_idx):
    return jnp.argmax(self.padded_logits(vision_params, images, task_idx), axis=-1)

  # ---- evaluation -------------------------------------------------------------------------------------------

  def _correct(self, vision_params, images: np.ndarray, labels: np.ndarray, task_idx: np.ndarray) -> np.ndarray:
    bs = self.config.eval_batch
    out = []
    for i in range(0, len(labels), bs):
      x, t = images[i:i + bs], task_idx[i:i + bs]
      pad = bs - len(t)
      if pad:
        x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
        t = np.concatenate([t, np.zeros(pad, t.dtype)])
      out.append((self._predict(vision_params, x, t), bs - pad))  # dispatched, not awaited
    return np.concatenate([np.asarray(o)[:k] for o, k in out]) == labels if out else np.zeros(0, bool)

  def evaluate(self, vision_params, tasks: Sequence[str] | None = None, split: str = "test") -> dict[str, float]:
    """Accuracy of one vision tower on each task's ``split`` (all tasks by default).

    Returns:
      ``{task: accuracy in [0, 1]}``.
    """
    tasks = list(tasks or self.tasks)
    parts = [getattr(self.data[t], split) for t in tasks]
    images = np.concatenate([p.images for p in parts])
    labels = np.concatenate([p.labels for p in parts])
    idx = np.concatenate([np.full(len(p), self.tasks.index(t), np.int32) for t, p in zip(tasks, parts)])
    correct = self._correct(vision_params, images, labels, idx)
    out, start = {}, 0
    for t, p in zip(tasks, parts):
      out[t] = float(correct[start:start + len(p)].mean())
      start += len(p)
    return out

  # ---- data for methods that need it (TTA, RI, RegMean, Fisher, ...) ----------------------------------------

  def batches(self, task: str, split: str = "train", batch_size: int = 16, *, seed: int = 0,
              labels: bool = False, repeat: bool = True) -> Iterator[Any]:
    """Fixed-size shuffled batches of a task's split: uint8 images [B, 32, 32, 3] (and int32 labels)."""
    d = getattr(self.data[task], split)
    rng = np.random.default_rng([self.config.seed, seed, self.tasks.index(task)])
    while True:
      order = rng.permutation(len(d))
      for i in range(0, len(d) - batch_size + 1, batch_size):
        j = order[i:i + batch_size]
        yield (d.images[j], d.labels[j]) if labels else d.images[j]
      if not repeat:
        return

  def unlabeled(self, task: str, split: str = "test") -> np.ndarray:
    """A task's unlabeled images (TTA methods adapt on the test inputs, as in the literature)."""
    return getattr(self.data[task], split).images

  def aux(self, source: str, n: int = 1024) -> np.ndarray:
    """Unlabeled auxiliary images that are none of the tasks' (for RI): see :func:`synthetic.make_aux`."""
    return synthetic.make_aux(source, seed=self.config.seed, n=n)

  aux_sources = synthetic.AUX_SOURCES


# ---- building --------------------------------------------------------------------------------------------------


def _model_for(config: OfflineConfig, vocab_size: int, eos: int) -> TinyClip:
  return TinyClip(image_size=synthetic.IMAGE_SIZE, patch_size=config.patch_size, width=config.width,
                  layers=config.layers, heads=config.heads, vocab_size=vocab_size,
                  context_length=config.context_length, text_width=config.text_width,
                  text_layers=config.text_layers, text_heads=config.text_heads,
                  projection_dim=config.projection_dim, eos_token_id=eos)


def _load_or_make_data(config: OfflineConfig, cache: Cache) -> dict[str, synthetic.TaskData]:
  arrays = cache.load_arrays("data")
  if arrays is None:
    arrays = {}
    for t in config.tasks:
      d = synthetic.make_task(t, seed=config.seed, sizes=config.sizes)
      for split in ("train", "val", "test"):
        s = getattr(d, split)
        arrays[f"{t}.{split}.images"] = s.images
        arrays[f"{t}.{split}.labels"] = s.labels
    cache.save_arrays("data", arrays)
  return {t: synthetic.TaskData(synthetic.task_spec(t), *[
    synthetic.Split(arrays[f"{t}.{s}.images"], arrays[f"{t}.{s}.labels"]) for s in ("train", "val", "test")])
    for t in config.tasks}


def _prompts(specs) -> list[str]:
  return [tm.format(c) for s in specs for tm in s.templates for c in s.classnames]


def _zero_shot_heads(model: TinyClip, params, tok: WordTokenizer, specs) -> dict[str, np.ndarray]:
  """CLIP's zero-shot heads: per class, the normalized mean of the normalized prompt embeddings."""
  enc = jax.jit(model.encode_text)
  scale = float(jnp.exp(params["logit_scale"]))
  heads = {}
  for s in specs:
    prompts = [tm.format(c) for c in s.classnames for tm in s.templates]
    ids, mask = tok(prompts)
    z = np.asarray(_normalize(enc(params, ids, mask))).reshape(len(s.classnames), len(s.templates), -1)
    heads[s.name] = np.asarray(_normalize(jnp.asarray(z.mean(1)))) * scale
  return heads


def _shipped_backbone(config: OfflineConfig):
  """Loads the shipped backbone named by ``config.backbone`` after checking that it is the model ``config``
  describes."""
  from jaxmerge.bench.backbone import backbone_info, load_backbone

  info = backbone_info(config.backbone)
  recorded = info.get("recipe", {})
  differ = {f: (getattr(config, f), recorded.get(f)) for f in BACKBONE_FIELDS if recorded.get(f) != getattr(config, f)}
  if differ:
    raise ValueError(f"the shipped backbone {config.backbone!r} was built with other settings than the config's: "
                     + ", ".join(f"{f}={b!r} (config: {a!r})" for f, (a, b) in differ.items())
                     + "; use backbone=None to pretrain with the config's settings")
  tok = WordTokenizer(tuple(info["vocab"]), config.context_length)
  model = _model_for(config, len(tok.vocab), tok.eos_id)
  params, _ = load_backbone(config.backbone, jax.eval_shape(model.init, jax.random.key(0)))
  return params, tok, model


def build_offline_suite(config: OfflineConfig | None = None, cache_dir: str | Path | None = None, *,
                        progress: bool = True, name: str = "offline", experts: bool = True) -> OfflineSuite:
  """Builds (or loads from the cache) the offline suite.

  Args:
    config: the suite's :class:`OfflineConfig` (default: the full 8-task suite).
    cache_dir: cache root (default :func:`jaxmerge.bench.cache.default_cache_dir`). Entries live under
      ``<cache_dir>/offline-<config.hash>/``; corrupt entries are detected by checksum and rebuilt.
    progress: show tqdm progress bars on the long steps.
    name: the suite's display name.
    experts: fine-tune the experts the cache lacks; with ``False`` they are ``None`` in ``suite.experts``,
      for :func:`finetune_missing` to train several suites' experts together.

  Returns:
    The :class:`OfflineSuite`.
  """
  from jaxmerge import filters
  from jaxmerge.bench.cache import default_cache_dir

  config = config or OfflineConfig()
  root = Path(cache_dir or default_cache_dir()) / f"offline-{config.hash}"
  cache = Cache(root)
  cache.clean_tmp()
  root.mkdir(parents=True, exist_ok=True)
  (root / "config.json").write_text(json.dumps(config.to_dict(), indent=1, sort_keys=True))
  timings = {}

  t0 = time.perf_counter()
  data = _load_or_make_data(config, cache)
  specs = [data[t].spec for t in config.tasks]
  timings["data"] = time.perf_counter() - t0

  # Pretrained CLIP and its vocabulary.
  t0 = time.perf_counter()
  meta = cache.meta("pretrained")
  params = None
  if config.backbone is not None:
    params, tok, model = _shipped_backbone(config)
  elif meta is not None:
    tok = WordTokenizer(tuple(meta["vocab"]), config.context_length)
    model = _model_for(config, len(tok.vocab), tok.eos_id)
    params = cache.load_tree("pretrained", jax.eval_shape(model.init, jax.random.key(0)))
  if params is None:
    pre = synthetic.make_pretraining(seed=config.seed, n=config.pretrain_size,
                                     task_fraction=config.pretrain_task_fraction)
    tok = WordTokenizer.build([*pre.captions, *_prompts(specs)], config.context_length)
    model = _model_for(config, len(tok.vocab), tok.eos_id)
    params = btrain.pretrain(model, config, pre, tok, preprocess=_preprocess, progress=progress)
    params = jax.tree.map(np.asarray, params)
    cache.save_tree("pretrained", params, meta={"vocab": list(tok.vocab)})
  timings["pretrain"] = time.perf_counter() - t0

  t0 = time.perf_counter()
  heads = cache.load_arrays("heads")
  if heads is None or set(heads) != set(config.tasks):
    heads = _zero_shot_heads(model, params, tok, specs)
    cache.save_arrays("heads", heads)
  timings["heads"] = time.perf_counter() - t0

  suite = OfflineSuite(name=name, config=config, data=data, model=model, clip_params=params, heads=heads,
                       experts=[], layout=filters.flax_layout, timings=timings)

  t0 = time.perf_counter()
  like = jax.tree.map(np.asarray, suite.pretrained)
  suite.experts = [cache.load_tree(f"expert-{t}", like) for t in config.tasks]
  suite._cache = cache
  timings["experts"] = time.perf_counter() - t0
  if experts:
    finetune_missing([suite], progress=progress)
  return suite


def finetune_missing(suites: Sequence[OfflineSuite], *, jobs: int = 1, progress: bool = True) -> None:
  """Fine-tunes the experts that ``suites`` lack (built with ``experts=False``) and stores them in each suite's
  cache, ``jobs`` at a time.

  Each expert is a deterministic function of its suite's config and task, so the order and the number of
  concurrent jobs do not change the result: concurrent jobs only fill the cores that one small model's
  training leaves idle (two jobs on two cores: about 1.25x the throughput of one).

  Args:
    suites: suites from :func:`build_offline_suite`; experts missing from ``suite.experts`` are ``None``.
    jobs: fine-tuning jobs run at once (threads sharing the compiled step).
    progress: show a progress bar over the experts.
  """
  todo = [(s, t) for s in suites if isinstance(s, OfflineSuite) for t, e in zip(s.config.tasks, s.experts)
          if e is None]
  if not todo:
    return
  steps = {id(s): btrain.make_finetune_step(s, s.config) for s, _ in todo}

  def one(item):
    s, t = item
    e = jax.tree.map(np.asarray, btrain.finetune(s, s.config, t, steps[id(s)]))
    s._cache.save_tree(f"expert-{t}", e, meta={"task": t})
    s.experts[s.config.tasks.index(t)] = e

  bar = _bar(len(todo), "fine-tuning experts", progress)
  start = time.perf_counter()
  with ThreadPoolExecutor(max(1, jobs)) as pool:
    for _ in pool.map(one, todo):
      if bar is not None:
        bar.update()
  if bar is not None:
    bar.close()
  trained = {id(s): s for s, _ in todo}.values()
  for s in trained:  # the wall time, shared by the suites trained together
    s.timings["experts"] = s.timings.get("experts", 0.0) + (time.perf_counter() - start) / len(trained)


def _bar(total: int, desc: str, enabled: bool):
  if not enabled:
    return None
  from tqdm.auto import tqdm

  return tqdm(total=total, desc=desc, leave=False)
