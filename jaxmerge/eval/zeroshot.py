"""Zero-shot classification heads and jitted, batched evaluation.

**Heads** (the standard CLIP protocol, Radford et al. 2021): for each class, the prompts
``template.format(classname)`` are embedded with the text tower (projected), each embedding is L2-normalized,
the mean over templates is L2-normalized again: ``head[c] = normalize(mean_k normalize(text(prompt_{c,k})))``,
an ``[C, D]`` float32 array. **The logit scale is not in the head**; it is applied once, at scoring time::

    logits = exp(logit_scale) * normalize(image_embeds) @ head.T        # head_logits()

(``logit_scale`` is the pretrained model's parameter, ``log(100)`` for OpenAI CLIP.) Heads are built once
from the pretrained text tower and cached with orbax (:func:`save_heads`, :func:`load_heads`,
:func:`cached_heads`), so merged models are scored without touching text.

**Evaluation** (:func:`evaluate`) runs one jitted step per batch: uint8 images in, normalization, image
embedding, logits, metric sums out. The last batch is padded to the batch size and masked, and heads are
padded to ``pad_classes`` rows (masked), so one compilation serves every batch, every task and every merged
model of the same architecture. Sums stay on the device until the end of the dataset.
:class:`ClipZeroShot` bundles this for a CLIP model and the 20 TALL tasks.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import pathlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from jaxmerge.data.preprocess import Preprocess
from jaxmerge.data.preprocess import normalize as normalize_images
from jaxmerge.eval import metrics

__all__ = ["ClipZeroShot", "build_head", "build_heads", "cached_heads", "clip_embed_fn", "evaluate",
           "head_logits", "l2_normalize", "load_heads", "load_tokenizer", "params_digest", "save_heads",
           "text_encoder", "tokenize"]

Templates = Sequence[str | Callable[[str], str]]


def l2_normalize(x: Any, axis: int = -1) -> Any:
  """``x / ||x||`` along ``axis`` (NumPy or JAX).

  Args:
    x: an array.
    axis: the normalized axis.

  Returns:
    An array like ``x``.
  """
  xp = jnp if isinstance(x, jax.Array) else np
  return x / xp.linalg.norm(x, axis=axis, keepdims=True)


def head_logits(image_embeds: Float[Array, "B D"], head: Float[Array, "C D"],
                logit_scale: Float[Array, ""] | float) -> Float[Array, "B C"]:
  """``exp(logit_scale) * normalize(image_embeds) @ head.T`` (head rows already normalized).

  Args:
    image_embeds: ``[B, D]`` image embeddings.
    head: ``[C, D]`` normalized class embeddings.
    logit_scale: the log of the scale.

  Returns:
    ``[B, C]`` logits.
  """
  img = image_embeds.astype(jnp.float32)
  img = img / jnp.linalg.norm(img, axis=-1, keepdims=True)
  return jnp.exp(jnp.asarray(logit_scale, jnp.float32)) * jnp.dot(img, head.astype(jnp.float32).T,
                                                                  precision=jax.lax.Precision.HIGHEST)


# ------------------------------------------------------------------------------------------------------------
# Text side.


def tokenize(tokenizer: Any, texts: Sequence[str], context_length: int) -> tuple[np.ndarray, np.ndarray]:
  """``(input_ids, attention_mask)``, int32 ``[N, context_length]``, with a transformers tokenizer (padded to the
  full context so every call has one shape; over-long prompts are truncated, keeping the end-of-text token).

  Args:
    tokenizer: a transformers CLIP tokenizer.
    texts: the prompts.
    context_length: the model's context length.

  Returns:
    ``(input_ids, attention_mask)``.
  """
  out = tokenizer(list(texts), padding="max_length", max_length=context_length, truncation=True,
                  return_tensors="np")
  return out["input_ids"].astype(np.int32), out["attention_mask"].astype(np.int32)


_PROBES = ("a photo of a cat.", "a photo of a dog.")


def load_tokenizer(path: str | os.PathLike, config: Any = None) -> Any:
  """The CLIP tokenizer of a model directory, checked to be usable.

  transformers builds a tokenizer even from a directory without tokenizer files (a 2-token vocabulary that
  turns every prompt into end-of-text tokens, so every zero-shot head is the same vector); this refuses it.

  Args:
    path: the pretrained model's directory.
    config: the model's :class:`jaxmerge.models.clip.ClipConfig` (token ids must be below its ``vocab_size``).

  Returns:
    A ``transformers.CLIPTokenizer``.

  Raises:
    ValueError: naming ``path``: no tokenizer files (``vocab.json`` and ``merges.txt``, or ``tokenizer.json``),
      an unreadable tokenizer, one that maps ordinary words to special or unknown tokens, or one with ids beyond
      the text tower's vocabulary.
  """
  import transformers  # noqa: PLC0415

  d = pathlib.Path(path)
  fix = (" Copy the tokenizer files of the checkpoint this model came from into the directory, or evaluate with "
         "a heads cache already holding heads built from the same text tower (jaxmerge eval --heads-cache, "
         "clip_suites.py --cache)")
  if not ((d / "tokenizer.json").is_file() or ((d / "vocab.json").is_file() and (d / "merges.txt").is_file())):
    raise ValueError(f"{d} has no CLIP tokenizer files (vocab.json and merges.txt, or tokenizer.json): "
                     "transformers would build a 2-token tokenizer and every zero-shot head would be the same." + fix)
  try:
    tok = transformers.CLIPTokenizer.from_pretrained(str(d))
  except Exception as e:  # noqa: BLE001 (transformers raises OSError/ValueError/TypeError for bad files)
    raise ValueError(f"{d}: cannot load its CLIP tokenizer ({type(e).__name__}: {e}).{fix}") from e
  special = set(tok.all_special_ids) | ({tok.unk_token_id} if tok.unk_token_id is not None else set())
  ids = [list(tok(p)["input_ids"]) for p in _PROBES]
  words = [[i for i in x if i not in special] for x in ids]
  if not all(words) or words[0] == words[1]:
    raise ValueError(f"{d}: its tokenizer ({len(tok)} tokens) is not a usable CLIP tokenizer: {_PROBES[0]!r} -> "
                     f"{ids[0]}, {_PROBES[1]!r} -> {ids[1]} (special or unknown tokens only, or the same ids).{fix}")
  vocab = getattr(config, "vocab_size", None)
  if vocab is not None and len(tok) > vocab:
    raise ValueError(f"{d}: its tokenizer has {len(tok)} tokens but the text tower's vocabulary has {vocab}: ids "
                     f"would fall outside the embedding table.{fix}")
  return tok


def params_digest(tree: Any, *extra: Any) -> str:
  """A hex digest of a parameter tree's leaves (paths, dtypes, shapes and bytes) and of ``extra`` values' reprs.

  Args:
    tree: nested dicts of arrays.
    *extra: more things the digest depends on (a config, a name).

  Returns:
    A 64-character hex string.
  """
  from jaxmerge import tree as jtree  # noqa: PLC0415

  h = hashlib.blake2b(digest_size=32)
  for x in extra:
    h.update(repr(x).encode() + b"\0")
  for k, v in sorted(jtree.flatten_paths(tree).items()):
    a = np.ascontiguousarray(np.asarray(v))
    h.update(f"{k}\0{a.dtype}\0{a.shape}\0".encode())
    h.update(a.view(np.uint8).reshape(-1) if a.size else b"")
  return h.hexdigest()


@functools.lru_cache(maxsize=16)
def _jit_encode_text(config):
  from jaxmerge.models import clip  # noqa: PLC0415

  return jax.jit(lambda p, ids, m: clip.encode_text(config, p, ids, m))


def text_encoder(config, params: Mapping, tokenizer: Any, *, batch_size: int = 256) -> Callable[[Sequence[str]], np.ndarray]:
  """A function ``texts -> float32 [N, D]`` (projected, unnormalized) for a CLIP's text tower.

  Args:
    config: the model's :class:`jaxmerge.models.clip.ClipConfig`.
    params: the model's parameters (``text_model``, ``text_projection``).
    tokenizer: a transformers CLIP tokenizer (``CLIPTokenizer.from_pretrained(model_dir)``).
    batch_size: prompts per jitted call (the last call is padded: one compilation).

  Returns:
    ``encode(texts) -> float32 [N, D]``.
  """
  fn = _jit_encode_text(config)

  def encode(texts: Sequence[str]) -> np.ndarray:
    ids, mask = tokenize(tokenizer, texts, config.context_length)
    n = len(ids)
    b = min(batch_size, max(n, 1))
    out = []
    for s in range(0, n, b):
      i, m = ids[s:s + b], mask[s:s + b]
      k = len(i)
      if k < b:  # pad with copies of the first row (discarded)
        i, m = np.concatenate([i, np.repeat(i[:1], b - k, 0)]), np.concatenate([m, np.repeat(m[:1], b - k, 0)])
      out.append(np.asarray(fn(params, i, m))[:k])
    return np.concatenate(out).astype(np.float32)

  return encode


def _prompts(classname: str, templates: Templates) -> list[str]:
  return [t(classname) if callable(t) else t.format(classname) for t in templates]


def build_head(encode_text_fn: Callable[[Sequence[str]], Any], classnames: Sequence[str],
               templates: Templates) -> np.ndarray:
  """A zero-shot head ``[C, D]``: per class, the normalized mean over templates of the normalized embeddings.

  Args:
    encode_text_fn: ``texts -> [N, D]`` projected text embeddings (e.g. :func:`text_encoder`).
    classnames: ``C`` class names.
    templates: ``K`` prompt templates, ``str.format`` strings with one ``{}`` or callables.

  Returns:
    float32 ``[C, D]`` with unit rows (no logit scale).

  Raises:
    ValueError: no classes or no templates.
  """
  if not classnames or not templates:
    raise ValueError(f"build_head needs classes and templates, got {len(classnames)} classes and "
                     f"{len(templates)} templates")
  texts = [p for c in classnames for p in _prompts(c, templates)]
  emb = np.asarray(encode_text_fn(texts), np.float32)
  if emb.ndim != 2 or emb.shape[0] != len(texts):
    raise ValueError(f"encode_text_fn returned shape {emb.shape} for {len(texts)} prompts")
  emb = l2_normalize(emb).reshape(len(classnames), len(templates), -1)
  head = l2_normalize(emb.mean(axis=1)).astype(np.float32)
  if len(classnames) > 1 and float(np.max(np.abs(head - head[:1]))) == 0.0:
    raise ValueError(f"all {len(classnames)} classes ({list(classnames[:3])}...) got the same zero-shot head: the "
                     "text encoder saw the same tokens for every prompt (an unusable tokenizer?)")
  return head


def build_heads(encode_text_fn: Callable[[Sequence[str]], Any],
                tasks: Mapping[str, tuple[Sequence[str], Templates]]) -> dict[str, np.ndarray]:
  """``{task: head}`` for ``tasks = {task: (classnames, templates)}``.

  Args:
    encode_text_fn: ``texts -> [N, D]`` text embeddings.
    tasks: ``{task: (classnames, templates)}``.

  Returns:
    ``{task: float32 [C, D]}`` normalized heads.
  """
  return {t: build_head(encode_text_fn, c, tp) for t, (c, tp) in tasks.items()}


def save_heads(path: str | os.PathLike, heads: Mapping[str, Any]) -> pathlib.Path:
  """Writes ``{task: [C, D]}`` heads as an orbax checkpoint (replacing ``path``; orbax writes atomically).

  Args:
    path: the checkpoint directory.
    heads: ``{task: [C, D]}``.

  Returns:
    ``path``.
  """
  import orbax.checkpoint as ocp  # noqa: PLC0415

  path = pathlib.Path(path).absolute()
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(path, {str(k): np.asarray(v, np.float32) for k, v in heads.items()}, force=True)
  ckpt.wait_until_finished()
  return path


def load_heads(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads heads written by :func:`save_heads`.

  Args:
    path: the checkpoint directory.

  Returns:
    ``{task: float32 [C, D]}``.

  Raises:
    ValueError: ``path`` is missing or not a heads checkpoint.
  """
  import orbax.checkpoint as ocp  # noqa: PLC0415

  path = pathlib.Path(path).absolute()
  if not path.is_dir():
    raise ValueError(f"no heads checkpoint at {path}")
  try:
    tree = ocp.StandardCheckpointer().restore(path)
  except Exception as e:  # noqa: BLE001 (orbax raises many types)
    raise ValueError(f"{path} is not a readable heads checkpoint: {type(e).__name__}: {e}") from e
  return {k: np.asarray(v, np.float32) for k, v in tree.items()}


def cached_heads(path: str | os.PathLike | None, encode_text_fn: Callable[[Sequence[str]], Any] | None,
                 tasks: Mapping[str, tuple[Sequence[str], Templates]]) -> dict[str, np.ndarray]:
  """Heads of ``tasks`` from the cache at ``path`` when present with the right class counts, else built with
  ``encode_text_fn`` and written back (all cached heads kept).

  Args:
    path: the orbax cache directory (``None``: no cache).
    encode_text_fn: ``texts -> [N, D]`` (needed only for heads not in the cache).
    tasks: ``{task: (classnames, templates)}``.

  Returns:
    ``{task: float32 [C, D]}``.

  Raises:
    ValueError: heads must be built but ``encode_text_fn`` is None.
  """
  cache = {}
  if path is not None and pathlib.Path(path).is_dir():
    try:
      cache = load_heads(path)
    except ValueError:
      cache = {}
  todo = {t: v for t, v in tasks.items() if t not in cache or cache[t].shape[0] != len(v[0])}
  if todo:
    if encode_text_fn is None:
      raise ValueError(f"heads for {sorted(todo)} are not cached and no text encoder was given")
    cache.update(build_heads(encode_text_fn, todo))
    if path is not None:
      save_heads(path, cache)
  return {t: cache[t] for t in tasks}


# ------------------------------------------------------------------------------------------------------------
# Evaluation.


@functools.partial(jax.jit, static_argnums=0)
def _step(embed_fn, params, head, class_mask, logit_scale, images, labels, mask):
  logits = head_logits(embed_fn(params, images), head, logit_scale)
  logits = jnp.where(class_mask[None, :], logits, jnp.finfo(jnp.float32).min)
  return metrics.batch_sums(logits, labels, mask)


def _pad_head(head: Any, pad_classes: int | None) -> tuple[jax.Array, jax.Array]:
  head = np.asarray(head, np.float32)
  c = head.shape[0]
  n = max(pad_classes or c, c)
  padded = np.zeros((n, head.shape[1]), np.float32)
  padded[:c] = head
  return jnp.asarray(padded), jnp.asarray(np.arange(n) < c)


def evaluate(embed_fn: Callable[[Any, jax.Array], jax.Array], params: Any, head: Any,
             batches: Iterable[Mapping[str, Any]], *, logit_scale: Any = 0.0, batch_size: int | None = None,
             pad_classes: int | None = None) -> dict[str, float]:
  """Top-1 accuracy and mean cross-entropy of zero-shot classification over ``batches``.

  Args:
    embed_fn: ``(params, images) -> [B, D]`` image embeddings of raw uint8 ``[B, H, W, 3]`` images (e.g.
      :func:`clip_embed_fn`). It is a static argument of the jitted step: reuse the same function object
      (``clip_embed_fn`` is cached) so that calls share one compilation.
    params: the model's parameters (a traced argument: any merged model reuses the compilation).
    head: ``[C, D]`` normalized class embeddings.
    batches: dicts with ``"image"`` ``[b, H, W, 3]`` and ``"label"`` ``[b]``, ``b <= batch_size``.
    logit_scale: ``logits = exp(logit_scale) * cos`` (the model's ``params["logit_scale"]``).
    batch_size: the padded batch size (default: the first batch's size).
    pad_classes: rows to pad the head to (default ``C``); use the largest ``C`` of a suite to compile once.

  Returns:
    ``{"accuracy", "loss", "count"}``.

  Raises:
    ValueError: a batch larger than ``batch_size``, labels outside ``[0, C)``, or no data.
  """
  head_p, class_mask = _pad_head(head, pad_classes)
  c = int(np.asarray(head).shape[0])
  scale = jnp.asarray(logit_scale, jnp.float32)
  total = None
  for batch in batches:
    images, labels = np.asarray(batch["image"]), np.asarray(batch["label"]).astype(np.int32)
    b = len(labels)
    batch_size = batch_size or b
    if b > batch_size or len(images) != b:
      raise ValueError(f"a batch has {len(images)} images and {b} labels; batch_size is {batch_size}")
    if b and (labels.min() < 0 or labels.max() >= c):
      raise ValueError(f"labels must be in [0, {c}), got [{labels.min()}, {labels.max()}]")
    mask = np.arange(batch_size) < b
    if b < batch_size:
      images = np.concatenate([images, np.zeros((batch_size - b, *images.shape[1:]), images.dtype)])
      labels = np.concatenate([labels, np.zeros(batch_size - b, np.int32)])
    sums = _step(embed_fn, params, head_p, class_mask, scale, images, labels, mask)
    total = sums if total is None else jax.tree.map(jnp.add, total, sums)
  if total is None:
    raise ValueError("no batches to evaluate")
  return metrics.finalize(total)


@functools.lru_cache(maxsize=16)
def clip_embed_fn(config, preprocess: Preprocess = Preprocess()) -> Callable[[Any, jax.Array], jax.Array]:
  """``(params, uint8 images) -> encode_image(config, params, normalize(images))`` (cached per config).

  Args:
    config: the model's :class:`jaxmerge.models.clip.ClipConfig`.
    preprocess: image sizes and normalization.

  Returns:
    ``embed(params, uint8 [B, H, W, 3]) -> [B, D]``.
  """
  from jaxmerge.models import clip  # noqa: PLC0415

  if preprocess.crop != config.image_size:
    raise ValueError(f"preprocessing crops {preprocess.crop} pixels but the model takes {config.image_size}")

  def embed(params, images):
    return clip.encode_image(config, params, normalize_images(jnp.asarray(images), preprocess))

  return embed


class ClipZeroShot:
  """Zero-shot evaluation of CLIP vision towers with heads from a pretrained CLIP's text tower.

  Args:
    config: the pretrained model's config (with text tower and projection).
    params: the pretrained parameters (their ``visual_projection`` and ``logit_scale`` are used for every
      evaluated vision tower; ``text_model`` only to build heads).
    tokenizer: a transformers CLIP tokenizer (needed only for heads that are not given or cached).
    tasks: ``{task: (classnames, templates)}`` (default: the 20 TALL tasks).
    heads: precomputed ``{task: [C, D]}`` heads.
    heads_cache: an orbax directory of heads. Each entry is keyed by its content, ``<task>__<key>`` where the
      key digests the text tower's weights and config (:func:`params_digest` of ``text_model`` and
      ``text_projection``), the task's prompts (class names and templates) and their token ids; a cache holding
      heads of other weights, prompts or tokenizers is never used for these. Without a tokenizer, an entry with
      the same weights and prompts is used whatever tokenizer built it (the way to evaluate with a checkpoint
      directory that lacks tokenizer files).
    tokenizer_error: why there is no tokenizer (raised, with the missing tasks, when a head must be built).
    preprocess: image sizes and normalization (default: OpenAI CLIP's at ``config.image_size``).
    batch_size: images per jitted step.
  """

  def __init__(self, config, params: Mapping, *, tokenizer: Any = None,
               tasks: Mapping[str, tuple[Sequence[str], Templates]] | None = None,
               heads: Mapping[str, Any] | None = None, heads_cache: str | os.PathLike | None = None,
               tokenizer_error: str | None = None, preprocess: Preprocess | None = None, batch_size: int = 64):
    if config.projection_dim is None or not config.has_text:
      raise ValueError("zero-shot evaluation needs the pretrained CLIPModel (text tower and projections), got a "
                       "vision-only config")
    if tasks is None:
      from jaxmerge.data.tasks import TASKS  # noqa: PLC0415

      tasks = {t: (s.classnames, s.templates) for t, s in TASKS.items()}
    self.config, self.params, self.tokenizer = config, params, tokenizer
    self.tasks = dict(tasks)
    self.heads = {k: np.asarray(v, np.float32) for k, v in (heads or {}).items()}
    self.heads_cache, self.tokenizer_error, self._text_digest = heads_cache, tokenizer_error, None
    self.preprocess = preprocess or Preprocess(size=config.image_size)
    self.batch_size = batch_size
    self.embed_fn = clip_embed_fn(config, self.preprocess)
    self.pad_classes = max([len(c) for c, _ in self.tasks.values()] + [h.shape[0] for h in self.heads.values()])

  @property
  def known_tasks(self) -> list[str]:
    return sorted(set(self.tasks) | set(self.heads))

  def check_tasks(self, tasks: Sequence[str]) -> None:
    """Raises ``ValueError`` listing the known tasks if any of ``tasks`` is unknown."""
    unknown = [t for t in tasks if t not in self.tasks and t not in self.heads]
    if unknown:
      raise ValueError(f"unknown task(s) {unknown}; known tasks: {', '.join(self.known_tasks)}")

  def build_heads(self, tasks: Sequence[str]) -> dict[str, np.ndarray]:
    """Heads of ``tasks`` (given, cached, or built with the text tower and cached)."""
    self.check_tasks(tasks)
    todo = {t: self.tasks[t] for t in tasks if t not in self.heads}
    if not todo:
      return {t: self.heads[t] for t in tasks}
    if self.heads_cache is None and self.tokenizer is None:
      raise ValueError(f"heads for {sorted(todo)} must be built and there is no tokenizer"
                       + (f": {self.tokenizer_error}" if self.tokenizer_error else ""))
    if self.heads_cache is None:
      self.heads.update(build_heads(text_encoder(self.config, self.params, self.tokenizer), todo))
      return {t: self.heads[t] for t in tasks}
    keys = {t: self.cache_key(t) for t in todo}
    cache = {}
    if pathlib.Path(self.heads_cache).is_dir():
      try:
        cache = load_heads(self.heads_cache)
      except ValueError:
        cache = {}
    build = {}
    for t, key in keys.items():
      found = sorted(k for k in cache if k.startswith(f"{t}__{key}") and cache[k].shape[0] == len(todo[t][0]))
      if found:
        self.heads[t] = cache[found[0]]
      else:
        build[t] = todo[t]
    if build:
      if self.tokenizer is None:
        raise ValueError(f"heads for {sorted(build)} are not in the heads cache {self.heads_cache} for this text "
                         "tower's weights and prompts, and there is no tokenizer to build them"
                         + (f": {self.tokenizer_error}" if self.tokenizer_error else ""))
      built = build_heads(text_encoder(self.config, self.params, self.tokenizer), build)
      for t, h in built.items():
        self.heads[t] = cache[f"{t}__{keys[t]}"] = h
      save_heads(self.heads_cache, cache)
    return {t: self.heads[t] for t in tasks}

  def cache_key(self, task: str) -> str:
    """The heads-cache key of ``task`` (without the ``<task>__`` prefix): 16 hex digits of the text tower's
    digest, 16 of the prompts', then (with a tokenizer) 16 of the prompts' token ids."""
    if self._text_digest is None:
      text = {k: self.params[k] for k in ("text_model", "text_projection") if k in self.params}
      self._text_digest = params_digest(text, self.config)
    classnames, templates = self.tasks[task]
    prompts = [p for c in classnames for p in _prompts(c, templates)]
    spec = hashlib.sha256(json.dumps([len(classnames), prompts]).encode()).hexdigest()
    key = self._text_digest[:16] + spec[:16]
    if self.tokenizer is not None:
      ids, mask = tokenize(self.tokenizer, prompts, self.config.context_length)
      key += hashlib.sha256(ids.tobytes() + mask.tobytes()).hexdigest()[:16]
    return key

  def full_params(self, model: Mapping) -> dict:
    """``model`` (full params, or a ``vision_model`` subtree) with the pretrained projection and scale."""
    vision = model["vision_model"] if "vision_model" in model else model
    return {"vision_model": vision, "visual_projection": self.params["visual_projection"]}

  def evaluate(self, model: Mapping, task: str, batches: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """Metrics of ``model`` (a vision tower or full params) on one task."""
    head = self.build_heads([task])[task]
    return evaluate(self.embed_fn, self.full_params(model), head, batches, logit_scale=self.params["logit_scale"],
                    batch_size=self.batch_size, pad_classes=self.pad_classes)

  def evaluate_tasks(self, model: Mapping, tasks: Sequence[str],
                     batches_fn: Callable[[str], Iterable[Mapping[str, Any]]]) -> dict:
    """``metrics.summarize`` over ``tasks``; ``batches_fn(task)`` gives each task's batches."""
    self.check_tasks(tasks)
    self.build_heads(tasks)
    return metrics.summarize({t: self.evaluate(model, t, batches_fn(t)) for t in tasks})
