"""Output tokenizers and embedding rows for mergekit configs (``tokenizer_source``, ``tokenizer:``,
``chat_template``), with mergekit's rules.

:func:`build` makes the output tokenizer (with ``transformers``, which must be installed for these settings):

- ``base``: the base model's tokenizer (or the first model's without a base), its tokens with ids at or above
  the model's ``vocab_size`` (``config.json``) removed;
- ``union``: that tokenizer plus every token of every model's tokenizer below its ``vocab_size``: plain tokens
  first, then added tokens (models in the config's order, the first definition of an added token wins);
- a model path: that model's tokenizer as it is;

then the tokens of the ``tokens:`` block that are missing. For every model it records where each output token
is in the model's own vocabulary (``-1`` when it is not).

:class:`VocabularyGroup` gives, for the models merged together (mergekit's order: the listed models, then the
base), readers whose embedding-like tensors (:func:`jaxmerge.io.llm.is_vocab_param`) have the output
vocabulary's rows: a model's own row for each token it has; otherwise, and for ``force``-d tokens, a default
row: the configured source (a model's row for the token, a model's row by id or token, zeros), else the one
model that has the token, else the base model's row, else the mean of the models that have it. Rows added by
``pad_to_multiple_of`` are the mean of the real rows. The models then merge as usual.

:func:`save` writes the tokenizer (with the chat template) through ``transformers``' ``save_pretrained``, as
mergekit does.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import pathlib
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxmerge.io import llm, paths

__all__ = ["TokenizerInfo", "VocabularyGroup", "build", "load_tokenizer", "save", "template_for"]


def _transformers():
  try:
    import transformers  # noqa: PLC0415
  except ImportError as e:
    raise ValueError("tokenizer_source, tokenizer and chat_template need transformers (pip install transformers)"
                     ) from e
  return transformers


def _config_vocab_size(path: str) -> int | None:
  cfg = paths.model_config(path)
  if cfg is None:
    return None
  for c in (cfg, cfg.get("text_config") or {}):
    if isinstance(c, dict) and isinstance(c.get("vocab_size"), int):
      return int(c["vocab_size"])
  return None


def load_tokenizer(path: str, *, fast: bool = True):
  """``transformers.AutoTokenizer.from_pretrained(path)``, with a ``ValueError`` naming the model.

  Args:
    path: a model directory.
    fast: ask for a fast tokenizer.

  Returns:
    The tokenizer.

  Raises:
    ValueError: no tokenizer could be loaded from ``path``.
  """
  tf = _transformers()
  p = pathlib.Path(path)
  try:
    return tf.AutoTokenizer.from_pretrained(str(p if p.is_dir() else p.parent), use_fast=fast)
  except Exception as e:  # noqa: BLE001 (transformers raises many types for a missing or broken tokenizer)
    raise ValueError(f"cannot load the tokenizer of model {path}: {type(e).__name__}: {e}") from e


def _stripped(path: str):
  """The tokenizer of ``path`` without the tokens whose ids are at or above the model's vocab_size."""
  tf = _transformers()
  tok = load_tokenizer(path)
  size = _config_vocab_size(path) or len(tok.get_vocab())
  unused = {t for t, i in tok.get_vocab().items() if i >= size}
  if not unused:
    return tok
  if not tok.is_fast:
    raise ValueError(f"model {path}: its tokenizer has tokens beyond vocab_size {size} and is not a fast tokenizer; "
                     "it cannot be used to build the output tokenizer")
  data = json.loads(tok._tokenizer.to_str())
  if data["model"]["type"] != "BPE":
    raise ValueError(f"model {path}: its tokenizer ({data['model']['type']}) has tokens beyond vocab_size {size}; "
                     "only BPE tokenizers can be trimmed")
  data["added_tokens"] = [e for e in data.get("added_tokens", []) if e["id"] < size]
  for t in unused:
    data["model"]["vocab"].pop(t, None)

  def keep(m):
    parts = m.split(" ") if isinstance(m, str) else list(m)
    return not any(p in unused for p in parts)

  data["model"]["merges"] = [m for m in data["model"].get("merges", []) if keep(m)]
  import tokenizers  # noqa: PLC0415

  tok._tokenizer = tokenizers.Tokenizer.from_str(json.dumps(data))
  del tf
  return tok


def _union(base_tok, toks: Mapping[str, Any]):
  tf = _transformers()
  plain: dict[str, None] = {}
  added: dict[str, Any] = {}
  for path, tok in toks.items():
    size = _config_vocab_size(path) or tok.vocab_size
    special = {info.content for info in tok.added_tokens_decoder.values()}
    for t, i in tok.get_vocab().items():
      if i < size and t not in special:
        plain.setdefault(t)
    for i, info in tok.added_tokens_decoder.items():
      if i < size:
        added.setdefault(info.content, info)
  with tempfile.TemporaryDirectory() as d:  # a copy of the base tokenizer, which stays unchanged
    base_tok.save_pretrained(d)
    out = tf.AutoTokenizer.from_pretrained(d, use_fast=True)
  base_vocab = base_tok.get_vocab()
  for t in plain:
    if t not in added and t not in base_vocab:
      out.add_tokens(t)
  for info in added.values():
    out.add_tokens(info)
  return out


@dataclasses.dataclass
class TokenizerInfo:
  """The output tokenizer and each model's position of every output token.

  Attributes:
    tokenizer: the ``transformers`` tokenizer to save.
    vocab: ``{token: output id}``.
    rows: the number of embedding rows (``len(vocab)`` padded to ``pad_to_multiple_of``).
    perms: ``{model path: int array}``, the model's id of each output id (``-1``: the model lacks the token).
    vocabs: ``{model path: {token: id}}``, each model's own vocabulary.
    tokens: ``{token: TokenSpec}`` of the ``tokens:`` block.
    base: the config's base model (``None`` without one).
  """

  tokenizer: Any
  vocab: dict[str, int]
  rows: int
  perms: dict[str, np.ndarray]
  vocabs: dict[str, dict[str, int]]
  tokens: dict[str, Any]
  base: str | None


def build(tspec, models: Sequence[str], base: str | None) -> TokenizerInfo:
  """Builds the output tokenizer and the vocabulary permutations (module docstring).

  Args:
    tspec: the :class:`jaxmerge.config.TokenizerSpec`.
    models: every model the config references, in the config's order.
    base: the config's base model, or ``None``.

  Returns:
    The :class:`TokenizerInfo`.

  Raises:
    ValueError: a tokenizer that cannot be loaded (base or source), or a token of the output vocabulary that a
      model has at an id beyond its vocab_size.
  """
  donor = base or models[0]
  base_tok = _stripped(donor)
  toks = {donor: base_tok}
  for m in models:
    if m not in toks:
      try:
        toks[m] = load_tokenizer(m)
      except ValueError:
        pass  # mergekit assumes the base model's tokenizer
  if tspec.source == "base":
    out = base_tok
  elif tspec.source == "union":
    out = _union(base_tok, toks)
  else:
    out = load_tokenizer(tspec.source)
  have = set(out.get_vocab())
  for t in tspec.tokens:
    if t.token not in have:
      out.add_tokens(t.token)
      have.add(t.token)
  vocab = out.get_vocab()
  rows = len(vocab)
  pad = tspec.pad_to_multiple_of
  if pad and rows % pad:
    rows = (rows // pad + 1) * pad
  perms = {}
  for m in dict.fromkeys([donor, *models]):
    own = (toks.get(m) or base_tok).get_vocab()
    size = _config_vocab_size(m) or len(own)
    p = np.full(len(vocab), -1, np.int64)
    for t, i in vocab.items():
      j = own.get(t)
      if j is None:
        continue
      if j >= size:
        raise ValueError(f"model {m}: token {t!r} of the output vocabulary has id {j}, beyond the model's "
                         f"vocab_size {size} (an unused padding id?)")
      p[i] = j
    perms[m] = p
  return TokenizerInfo(tokenizer=out, vocab=dict(vocab), rows=rows, perms=perms,
                       vocabs={m: dict(t.get_vocab()) for m, t in toks.items()},
                       tokens={t.token: t for t in tspec.tokens}, base=base)


class VocabularyGroup:
  """Readers of the models merged together whose vocabulary tensors have the output vocabulary's rows.

  Args:
    info: the :class:`TokenizerInfo`.
    readers: ``{model path: reader}`` in mergekit's order for this group (the listed models, then the base).
  """

  def __init__(self, info: TokenizerInfo, readers: Mapping[str, Any]):
    self.info = info
    self.readers = dict(readers)
    self.order = list(readers)
    self._views: collections.Counter = collections.Counter()
    self._cache: dict[str, tuple[dict[str, np.ndarray], collections.Counter]] = {}

  def view(self, path: str) -> _VocabView:
    """The reader of model ``path`` (one of this group's); several views of one model may exist."""
    self._views[path] += 1
    return _VocabView(self, path)

  def is_vocab(self, reader, name: str) -> bool:
    """Whether ``name`` has a vocabulary axis (axis 0) to re-index."""
    shape = tuple(reader.shape(name))
    return llm.is_vocab_param(name) and len(shape) >= 1 and llm.vocab_axis(name, len(shape)) == 0

  def shape(self, reader, name: str) -> tuple[int, ...]:
    """The shape of ``name`` after re-indexing."""
    shape = tuple(reader.shape(name))
    return (self.info.rows, *shape[1:]) if self.is_vocab(reader, name) else shape

  def rows_of(self, path: str, name: str) -> np.ndarray:
    """Model ``path``'s tensor ``name`` with the output vocabulary's rows (float32). The group's tensors are
    computed together and kept until every view has read its own (a streamed merge holds one at a time)."""
    if name not in self._cache:
      self._cache[name] = (self._compute(name), collections.Counter(self._views))
    rows, left = self._cache[name]
    x = rows[path]
    left[path] -= 1
    if all(v <= 0 for v in left.values()):
      del self._cache[name]
    return x

  def _compute(self, name: str) -> dict[str, np.ndarray]:
    info = self.info
    models = [m for m in self.order if name in self.readers[m]]
    tensors = {m: np.asarray(self.readers[m].get(name), np.float32) for m in models}
    inner = {t.shape[1:] for t in tensors.values()}
    if len(inner) > 1:
      raise ValueError(f"parameter {name!r}: the models' shapes beyond the vocabulary axis differ "
                       f"({ {m: t.shape for m, t in tensors.items()} })")
    perms = {m: info.perms[m] for m in models}
    cfgs = dict(info.tokens)
    average: set[str] = set()
    for tok, i in info.vocab.items():  # mergekit's sources for tokens some models lack
      if tok in cfgs:
        continue
      present = [m for m in models if perms[m][i] >= 0]
      if len(present) == 1:
        cfgs[tok] = ("model", present[0])
      elif not present:
        cfgs[tok] = ("zero", None)
      elif info.base in models and perms[info.base][i] >= 0:
        cfgs[tok] = ("model", info.base)
      else:
        average.add(tok)
    row_shape = next(iter(tensors.values())).shape[1:]
    defaults = {}
    for tok, i in info.vocab.items():
      c = cfgs.get(tok)
      forced = getattr(c, "force", False)
      if not forced and all(perms[m][i] >= 0 for m in models):
        continue
      if tok in average:
        present = [m for m in models if perms[m][i] >= 0]
        acc = np.zeros(row_shape, np.float32)
        for m in present:
          acc = acc + tensors[m][perms[m][i]]
        defaults[tok] = acc / np.float32(len(present))
      elif c is not None:
        defaults[tok] = self._default(name, tok, i, c, tensors, perms, row_shape)
    out = {}
    for m in models:
      p = perms[m]
      new = np.zeros((info.rows, *row_shape), np.float32)
      for tok, i in info.vocab.items():
        forced = getattr(cfgs.get(tok), "force", False)
        if p[i] >= 0 and not forced:
          new[i] = tensors[m][p[i]]
        elif tok in defaults:
          new[i] = defaults[tok]
      n = len(info.vocab)
      if info.rows > n:
        new[n:] = new[:n].mean(axis=0)
      out[m] = new
    return out

  def _default(self, name, tok, i, c, tensors, perms, row_shape) -> np.ndarray:
    kind, model = (c if isinstance(c, tuple) else (c.kind, c.model))
    if kind == "zero":
      return np.zeros(row_shape, np.float32)
    if kind == "default":
      raise ValueError(f"token {tok!r} of the tokenizer block has no source, and not every model has it: give it a "
                       "source (a model, {kind: zero} or {kind: model_token, ...})")
    if model not in tensors:
      raise ValueError(f"token {tok!r} takes its embedding from model {model}, which is not merged into "
                       f"{name!r} (models: {list(tensors)})")
    if kind == "model_token":
      tid = c.token_id
      if tid is None:
        vocab = self.info.vocabs.get(model) or {}
        if c.source_token not in vocab:
          raise ValueError(f"token {tok!r}: token {c.source_token!r} is not in model {model}'s vocabulary")
        tid = vocab[c.source_token]
      if not 0 <= tid < tensors[model].shape[0]:
        raise ValueError(f"token {tok!r}: token id {tid} is out of range for model {model} ({name!r} has "
                         f"{tensors[model].shape[0]} rows)")
      return tensors[model][tid]
    j = perms[model][i]
    if j < 0:
      raise ValueError(f"token {tok!r} takes its embedding from model {model}, whose vocabulary lacks it")
    return tensors[model][j]


class _VocabView:
  """One model's reader in a :class:`VocabularyGroup` (vocabulary tensors re-indexed, the rest as stored)."""

  def __init__(self, group: VocabularyGroup, path: str):
    self._g, self._path = group, path
    self.reader = group.readers[path]
    self.path = getattr(self.reader, "path", path)

  def keys(self):
    return list(self.reader.keys())

  def __iter__(self):
    return iter(self.reader.keys())

  def __contains__(self, name: object) -> bool:
    return name in self.reader

  def __len__(self) -> int:
    return len(self.reader)

  def shape(self, name: str) -> tuple[int, ...]:
    return self._g.shape(self.reader, name)

  def dtype(self, name: str) -> np.dtype:
    return np.dtype(self.reader.dtype(name))

  def get(self, name: str, *, out: np.ndarray | None = None) -> np.ndarray:
    del out
    if self._g.is_vocab(self.reader, name):
      return self._g.rows_of(self._path, name).astype(self.dtype(name))
    return self.reader.get(name)

  def close(self) -> None:
    pass


def template_for(value: str | None, models: Sequence[str]) -> str | None:
  """The chat template text of a ``chat_template`` setting (``"auto"``: the most common template among the
  models' tokenizers, ``None`` when none has one).

  Args:
    value: the setting (``None``: no template).
    models: the referenced models (for ``"auto"``).

  Returns:
    The Jinja text, or ``None``.
  """
  from jaxmerge import config  # noqa: PLC0415

  if value is None:
    return None
  text = config.chat_template_text(value)
  if text is not None:
    return text
  found = []
  for m in models:
    try:
      t = load_tokenizer(m).chat_template
    except ValueError:
      continue
    if isinstance(t, dict):
      t = t.get("default")
    if t:
      found.append(t.strip())
  return collections.Counter(found).most_common(1)[0][0] if found else None


def save(tokenizer, out_dir: str | pathlib.Path, chat_template: str | None = None) -> None:
  """Writes ``tokenizer`` (with ``chat_template`` when given) with ``save_pretrained``, as mergekit does.

  Args:
    tokenizer: a ``transformers`` tokenizer.
    out_dir: the output directory.
    chat_template: the Jinja template text, or ``None`` to keep the tokenizer's.
  """
  if chat_template:
    tokenizer.chat_template = chat_template
  tokenizer.save_pretrained(str(out_dir))
