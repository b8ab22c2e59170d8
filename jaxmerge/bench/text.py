"""A word-level tokenizer for the offline suite's tiny CLIP text tower.

The captions and prompts of the synthetic suite use a few dozen words, so a closed word vocabulary replaces
CLIP's BPE. Ids follow CLIP's conventions where they matter to the model: every sequence is
``<bos> words... <eos>`` padded with ``<pad>``, and ``<eos>`` has the largest id, so that both EOS-pooling rules
of Hugging Face's CLIP text model (first ``eos_token_id`` position, or legacy ``argmax(input_ids)``) pick it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import numpy as np

__all__ = ["WordTokenizer"]

PAD, BOS, UNK, EOS = "<pad>", "<bos>", "<unk>", "<eos>"


@dataclasses.dataclass(frozen=True)
class WordTokenizer:
  """Closed-vocabulary word tokenizer.

  Attributes:
    vocab: the words; ``vocab[0] == "<pad>"`` and ``vocab[-1] == "<eos>"``.
    context_length: padded sequence length (including ``<bos>`` and ``<eos>``).
  """

  vocab: tuple[str, ...]
  context_length: int

  @classmethod
  def build(cls, texts: Iterable[str], context_length: int) -> "WordTokenizer":
    """Builds the vocabulary (sorted, so it depends only on the set of words) from ``texts``."""
    words = sorted({w for t in texts for w in t.split()} - {PAD, BOS, UNK, EOS})
    return cls((PAD, BOS, UNK, *words, EOS), context_length)

  @property
  def pad_id(self) -> int:
    return 0

  @property
  def bos_id(self) -> int:
    return 1

  @property
  def eos_id(self) -> int:
    return len(self.vocab) - 1

  def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Tokenizes ``texts``.

    Returns:
      ``(input_ids, attention_mask)``, int32 [len(texts), context_length] each. Over-long texts are cut so
      that ``<eos>`` always fits.
    """
    index = {w: i for i, w in enumerate(self.vocab)}
    ids = np.zeros((len(texts), self.context_length), np.int32)
    mask = np.zeros_like(ids)
    for i, t in enumerate(texts):
      toks = [self.bos_id] + [index.get(w, 2) for w in t.split()][: self.context_length - 2] + [self.eos_id]
      ids[i, : len(toks)] = toks
      mask[i, : len(toks)] = 1
    return ids, mask
