"""Language-model checkpoints: tied embeddings, vocabulary-size mismatches, dtype mismatches, model files.

Hugging Face causal LMs (Llama, Mistral, Qwen, Gemma, GPT-2, GPT-NeoX, Phi naming) merge like any flat
``{name: array}`` checkpoint; three things need a policy first, and :func:`align` applies it lazily, returning
reader views (:class:`jaxmerge.io.safetensors_io.TensorReader`) with identical names and shapes, so the same
code serves in-memory and streaming merges:

- **Tied embeddings.** A model with ``tie_word_embeddings`` stores no ``lm_head.weight``: its output projection
  *is* the input embedding. When the pretrained model has an ``lm_head.weight`` and a fine-tuned model ties it,
  that model's ``lm_head.weight`` is read from its embedding (exact). The reverse (a tied pretrained model and an
  untied fine-tuned one) would untie the merged model and raises ``ValueError``.
- **Vocabulary sizes** (added tokens, padded vocabularies) differ only along the vocabulary axis of the
  embedding-like parameters (``embed_tokens``, ``lm_head``, ``wte``, ``word_embeddings``, ``embed_in``,
  ``embed_out``, ``shared``, ``tok_embeddings``; axis 0 of HF tensors, the last axis of Flax ``kernel`` s).
  ``vocab_policy``:

  - ``"error"`` (default): a ``ValueError`` naming the model and the parameter.
  - ``"truncate"``: every model, the pretrained one included, keeps the first ``V_min`` rows (the smallest
    vocabulary); tokens beyond it are dropped from the merged model.
  - ``"pad_base"``: the merged model keeps the pretrained vocabulary ``V_base``. A fine-tuned model with fewer
    rows is completed with the pretrained rows (its task vector is zero there); one with more rows is cut to
    ``V_base`` (its added tokens are dropped). Rows are aligned by token id, so the fine-tuned vocabularies must
    extend the pretrained one (as when tokens are appended).

  Any other shape mismatch raises ``ValueError`` naming the model and the parameter (mergekit silently truncates
  or drops mismatched tensors; jaxmerge does not).
- **dtypes.** When a parameter's floating dtypes differ between models (a bf16 base and a float32
  fine-tune), every model's copy is read as float32 (no precision is lost in the task vector) and
  :meth:`AlignedReader.out_dtype` keeps the pretrained dtype for the output. Non-floating tensors must agree.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
from collections.abc import Sequence
from typing import Callable

import ml_dtypes
import numpy as np

from jaxmerge.io.paths import inside
from jaxmerge.io.safetensors_io import TensorReader

__all__ = [
    "AlignedReader", "VOCAB_POLICIES", "align", "check_architectures", "copy_model_files", "is_vocab_param", "np_dtype", "vocab_axis", "vocab_size_of",
]

VOCAB_POLICIES = ("error", "truncate", "pad_base")
_VOCAB = re.compile(
    r"(^|.*[./])(embed_tokens|lm_head|wte|word_embeddings|embed_in|embed_out|shared|tok_embeddings|"
    r"token_embedding|output)([./](weight|bias|kernel|embedding))?$")
_HEADS = ("lm_head.weight", "embed_out.weight", "output.weight")
_EMBEDS = re.compile(r"(^|.*[./])(embed_tokens|wte|word_embeddings|embed_in|tok_embeddings|shared)\.weight$")
_MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                "chat_template.jinja")


def is_vocab_param(name: str) -> bool:
  """Whether ``name`` is an embedding-like parameter with a vocabulary axis.

  Args:
    name: a parameter name.

  Returns:
    Whether it has a vocabulary axis.
  """
  return _VOCAB.fullmatch(name) is not None


def vocab_axis(name: str, ndim: int) -> int:
  """The vocabulary axis: 0 for Hugging Face tensors, the last axis of a Flax ``kernel``.

  Args:
    name: the parameter name.
    ndim: its rank.

  Returns:
    The axis index.
  """
  return ndim - 1 if re.search(r"[./]kernel$", name) else 0


def np_dtype(value: str | np.dtype) -> np.dtype:
  """A NumPy dtype from a name, ``"bfloat16"`` included (via ``ml_dtypes``).

  Args:
    value: a dtype or its name.

  Returns:
    The NumPy dtype.
  """
  if isinstance(value, str) and value.lower() in ("bfloat16", "bf16"):
    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(value)


def _is_float(dtype: np.dtype) -> bool:
  return np.issubdtype(dtype, np.floating) or str(dtype) == "bfloat16"


def _rows(x: np.ndarray, axis: int, n: int) -> np.ndarray:
  idx = [slice(None)] * x.ndim
  idx[axis] = slice(0, n)
  return x[tuple(idx)]


class AlignedReader:
  """A view of a checkpoint with the names, shapes and dtypes agreed by :func:`align`.

  Args:
    reader: the underlying checkpoint.
    names: the parameters in order.
    shapes: ``{name: shape}`` after the vocabulary policy.
    dtypes: ``{name: dtype}`` read (float32 where models disagree).
    out_dtypes: ``{name: dtype}`` the merged output should have (the pretrained dtypes).
    sources: ``{name: name in reader}`` (a tied model's ``lm_head.weight`` reads its embedding).
    fill: ``fill(name) -> array`` giving the pretrained tensor, for rows a model lacks (``pad_base``).
  """

  def __init__(self, reader: TensorReader, names: Sequence[str], shapes: dict, dtypes: dict, out_dtypes: dict,
               sources: dict | None = None, fill: Callable[[str], np.ndarray] | None = None):
    self.reader = reader
    self.path = reader.path
    self._names = list(names)
    self._shapes, self._dtypes, self._out = shapes, dtypes, out_dtypes
    self._sources = sources or {}
    self._fill = fill

  def keys(self):
    return list(self._names)

  def __iter__(self):
    return iter(self._names)

  def __contains__(self, name: object) -> bool:
    return name in self._shapes

  def __len__(self) -> int:
    return len(self._names)

  def shape(self, name: str) -> tuple[int, ...]:
    return self._shapes[name]

  def dtype(self, name: str) -> np.dtype:
    return self._dtypes[name]

  def out_dtype(self, name: str) -> np.dtype:
    return self._out[name]

  @property
  def reads_into(self) -> bool:
    """Whether :meth:`get` can read into a caller's buffer (``out=``), as the wrapped reader can."""
    return bool(getattr(self.reader, "reads_into", False))

  def get(self, name: str, *, out: np.ndarray | None = None) -> np.ndarray:
    """The aligned tensor ``name``; ``out``, a buffer of its shape and dtype, is filled when the wrapped reader
    can read into it and no resizing or cast is needed (otherwise a new array is returned)."""
    src = self._sources.get(name, name)
    direct = (out is not None and self.reads_into and tuple(self.reader.shape(src)) == tuple(self._shapes[name])
              and np.dtype(self.reader.dtype(src)) == np.dtype(self._dtypes[name]))
    x = self.reader.get(src, out=out) if direct else self.reader.get(src)
    target = self._shapes[name]
    if x.shape != target:
      ax = vocab_axis(name, x.ndim)
      if x.shape[ax] >= target[ax]:
        x = np.ascontiguousarray(_rows(x, ax, target[ax]))
      else:  # pad_base: complete with the pretrained rows
        base = self._fill(name)
        dt = self._dtypes[name]
        rest = np.take(base, np.arange(x.shape[ax], target[ax]), axis=ax)
        x = np.concatenate([x.astype(dt), rest.astype(dt)], axis=ax)
    if x.dtype != self._dtypes[name]:
      x = x.astype(self._dtypes[name])
    return x

  def close(self) -> None:
    if hasattr(self.reader, "close"):
      self.reader.close()

  def __repr__(self) -> str:
    return f"AlignedReader({self.reader!r})"


def _tied_source(name: str, reader: TensorReader, shape: tuple[int, ...]) -> str | None:
  """The embedding a tied model's output head ``name`` reads from, if there is exactly one candidate."""
  if name.split("/")[-1] not in _HEADS and name not in _HEADS:
    return None
  cands = [k for k in reader.keys() if _EMBEDS.fullmatch(k) and len(reader.shape(k)) == len(shape)]
  return cands[0] if len(cands) == 1 else None


def align(
    base: TensorReader,
    models: Sequence[TensorReader],
    *,
    policy: str = "error",
    names: Sequence[str] | None = None,
    base_name: str = "pretrained model",
    out_dtype: str | np.dtype | None = None,
) -> tuple[AlignedReader, list[AlignedReader]]:
  """Checks that ``models`` can be merged into ``base`` and returns views that agree on names and shapes.

  Args:
    base: the pretrained checkpoint.
    models: the fine-tuned checkpoints.
    policy: the vocabulary policy (module docstring).
    names: model names for messages (default: their paths).
    base_name: how to name the pretrained model in messages.
    out_dtype: dtype of the merged floating tensors (default: the pretrained dtypes). Where it differs from the
      pretrained dtype, every model's tensor is read as float32, so the result is rounded once.

  Returns:
    ``(base_view, model_views)``.

  Raises:
    ValueError: missing or extra parameters, shapes that differ (outside the vocabulary policy), non-floating
      dtypes that differ, an untied fine-tune of a tied model, or an empty model list; the message names the
      model and the parameter.
  """
  if policy not in VOCAB_POLICIES:
    raise ValueError(f"vocab_policy must be one of {VOCAB_POLICIES}, got {policy!r}")
  if not models:
    raise ValueError("no fine-tuned models given: the task list is empty")
  names = [str(n) for n in names] if names is not None else [str(m.path) for m in models]
  order = list(base.keys())
  bshape = {k: tuple(base.shape(k)) for k in order}
  bdtype = {k: np.dtype(base.dtype(k)) for k in order}
  sources: list[dict] = []
  for label, m in zip(names, models):
    keys = set(m.keys())
    src = {}
    missing = [k for k in order if k not in keys]
    for k in list(missing):
      s = _tied_source(k, m, bshape[k])
      if s is not None:
        src[k] = s
        missing.remove(k)
    extra = [k for k in m.keys() if k not in bshape]
    untied = [k for k in extra if k in _HEADS or k.split("/")[-1] in _HEADS]
    if untied and _tied_source(untied[0], base, tuple(m.shape(untied[0]))):
      raise ValueError(f"{label}: has its own {untied[0]!r} but the {base_name} ties it to its input embedding "
                       "(tie_word_embeddings); merging would untie the embeddings: merge models with the same tying")
    if missing or extra:
      raise ValueError(f"{label} does not match the {base_name}'s parameters: missing {missing[:10]}"
                       f"{' ...' if len(missing) > 10 else ''}, extra {extra[:10]}{' ...' if len(extra) > 10 else ''}")
    sources.append(src)

  shapes = dict(bshape)
  read_dtype = dict(bdtype)
  for k in order:
    ms = [tuple(m.shape(src.get(k, k))) for m, src in zip(models, sources)]
    mismatched = [(label, s) for label, s in zip(names, ms) if s != bshape[k]]
    for label, m, src in zip(names, models, sources):
      dt = np.dtype(m.dtype(src.get(k, k)))
      if dt != bdtype[k]:
        if not (_is_float(dt) and _is_float(bdtype[k])):
          raise ValueError(f"{label}: parameter {k!r} has dtype {dt}, the {base_name} has {bdtype[k]}")
        read_dtype[k] = np.dtype(np.float32)
    if not mismatched:
      continue
    label, s = mismatched[0]
    nd = len(bshape[k])
    ax = vocab_axis(k, nd) if nd else 0
    other_axes_agree = all(len(x) == nd and all(a == b for i, (a, b) in enumerate(zip(x, bshape[k])) if i != ax)
                           for _, x in mismatched)
    if not (is_vocab_param(k) and nd and other_axes_agree):
      raise ValueError(f"{label}: parameter {k!r} has shape {s}, the {base_name} has {bshape[k]}")
    if policy == "error":
      raise ValueError(f"{label}: parameter {k!r} has shape {s}, the {base_name} has {bshape[k]}: the vocabulary "
                       "sizes differ; choose vocab_policy 'truncate' (smallest vocabulary) or 'pad_base' (the "
                       "pretrained vocabulary)")
    rows = [x[ax] for x in ms] + [bshape[k][ax]]
    target = min(rows) if policy == "truncate" else bshape[k][ax]
    shapes[k] = tuple(target if i == ax else d for i, d in enumerate(bshape[k]))

  out_dtypes = dict(bdtype)
  if out_dtype is not None:
    odt = np_dtype(out_dtype)
    for k in order:
      if _is_float(bdtype[k]):
        out_dtypes[k] = odt
        if odt != bdtype[k]:
          read_dtype[k] = np.dtype(np.float32)
  base_view = AlignedReader(base, order, shapes, read_dtype, out_dtypes)
  fill = base.get
  views = [AlignedReader(m, order, shapes, read_dtype, out_dtypes, src, fill) for m, src in zip(models, sources)]
  return base_view, views


def _architecture(path: pathlib.Path) -> tuple[str | None, tuple[str, ...]] | None:
  """``(model_type, architectures)`` from the ``config.json`` of a checkpoint directory (None without one)."""
  cfg_path = path / "config.json"
  if not cfg_path.is_file():
    return None
  inside(path, "config.json", "model config")
  try:
    cfg = json.loads(cfg_path.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"{cfg_path}: cannot read the model config: {e}") from e
  if not isinstance(cfg, dict):
    raise ValueError(f"{cfg_path}: the model config is not a JSON object")
  archs = cfg.get("architectures") or ()
  return cfg.get("model_type"), tuple(archs) if isinstance(archs, (list, tuple)) else (str(archs),)


def check_architectures(base: str | os.PathLike, models: Sequence[str | os.PathLike],
                        names: Sequence[str] | None = None) -> None:
  """Checks that the Hugging Face checkpoints to merge declare the same architecture.

  Each checkpoint directory with a ``config.json`` is compared with the pretrained one on ``model_type`` and
  ``architectures`` (e.g. a ``MistralForCausalLM`` fine-tune of a ``LlamaForCausalLM`` base, or a
  ``CLIPVisionModel`` next to a ``BertModel``); checkpoints without a config are checked by their tensor names
  only (:func:`align`). Merging models of different architectures is rarely intended even when tensor names
  happen to agree, so this raises rather than warns.

  Args:
    base: the pretrained checkpoint's path.
    models: the fine-tuned checkpoints' paths.
    names: model names for messages (default: the paths).

  Raises:
    ValueError: naming the model, both architectures and both config files.

  References:
    Wolf et al., "Transformers: State-of-the-Art Natural Language Processing", EMNLP 2020 (``config.json``).
  """
  base = pathlib.Path(base)
  want = _architecture(base)
  if want is None:
    return
  names = [str(n) for n in names] if names is not None else [str(m) for m in models]
  for label, m in zip(names, models):
    got = _architecture(pathlib.Path(m))
    if got is None:
      continue
    for what, a, b in (("model_type", got[0], want[0]), ("architectures", got[1], want[1])):
      if a and b and a != b:
        raise ValueError(f"{label}: {what} {a!r} differs from the pretrained model's {b!r} ({base}); checkpoints "
                         "of different architectures cannot be merged")


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")
NUM_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


def copy_model_files(base_dir: str | os.PathLike, out_dir: str | os.PathLike, *, vocab_size: int | None = None,
                     dtype: str | None = None, num_layers: int | None = None,
                     tokenizer_files: bool = True) -> list[str]:
  """Copies a Hugging Face directory's config and tokenizer files next to merged weights.

  ``config.json`` gets ``vocab_size`` (when the vocabulary policy or tokenizer changed it), the layer count
  (``num_layers``, after layer stacking: ``num_hidden_layers``, or ``n_layer``/``num_layers``/``n_layers``,
  whichever the config has) and ``dtype`` (the output dtype, the key transformers 5 reads and writes; a
  ``torch_dtype`` key, its older spelling, is dropped as ``save_pretrained`` does). Returns the copied file names.
  Nothing happens when ``base_dir`` is not a directory.

  Args:
    base_dir: the base model's Hugging Face directory.
    out_dir: the merged model's directory.
    vocab_size: the merged vocabulary size, written to ``config.json``.
    dtype: the output dtype name, written as ``dtype``.
    num_layers: the merged model's number of layers, written to ``config.json``.
    tokenizer_files: copy the tokenizer files too (``False`` when the tokenizer is written separately).

  Returns:
    The copied file names.

  Raises:
    ValueError: one of these files is a symbolic link out of ``base_dir`` (see :mod:`jaxmerge.io.paths`), or
      ``num_layers`` is given and ``config.json`` has no layer-count key.
  """
  base_dir, out_dir = pathlib.Path(base_dir), pathlib.Path(out_dir)
  if not base_dir.is_dir():
    return []
  copied = []
  for f in _MODEL_FILES:
    src = base_dir / f
    if not src.is_file() or (not tokenizer_files and f in _TOKENIZER_FILES):
      continue
    inside(base_dir, f, "model file")
    if f == "config.json":
      try:
        cfg = json.loads(src.read_text())
      except (OSError, json.JSONDecodeError):
        shutil.copyfile(src, out_dir / f)
        copied.append(f)
        continue
      if vocab_size is not None and "vocab_size" in cfg:
        cfg["vocab_size"] = int(vocab_size)
      if num_layers is not None:
        keys = [k for k in NUM_LAYER_KEYS if isinstance(cfg.get(k), int)]
        if not keys:
          raise ValueError(f"{src}: no layer-count key ({', '.join(NUM_LAYER_KEYS)}) to set to {num_layers}")
        cfg[keys[0]] = int(num_layers)
      if dtype is not None:
        cfg.pop("torch_dtype", None)
        cfg["dtype"] = dtype
      (out_dir / f).write_text(json.dumps(cfg, indent=2))
    else:
      shutil.copyfile(src, out_dir / f)
    copied.append(f)
  return copied


def vocab_size_of(view: AlignedReader) -> int | None:
  """The merged vocabulary size (rows of the first embedding-like parameter), if any.

  Args:
    view: the aligned checkpoint reader.

  Returns:
    The vocabulary size, or ``None`` without embedding-like parameters.
  """
  for k in view.keys():
    if _EMBEDS.fullmatch(k) or k in _HEADS:
      shape = view.shape(k)
      return int(shape[vocab_axis(k, len(shape))]) if shape else None
  return None
