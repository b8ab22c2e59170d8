"""Layer stacking (mergekit's ``slices``, the "frankenmerge"): which input tensors make each output tensor.

A transformer checkpoint keeps its blocks under one numbered prefix (``model.layers.<i>.``,
``transformer.h.<i>.``, ``gpt_neox.layers.<i>.``, ...). An output slice takes layers ``[start, end)`` of each
of its sources and merges them (a ``passthrough`` slice copies its one source); the output layers are numbered
from 0 across the slices, in order. As in mergekit, the tensors before the blocks (embeddings) are merged from
the first slice's sources and the tensors after them (final norm, output head) from the last slice's, and
``config.json``'s layer count becomes the total.

:func:`plan` returns one :class:`Group` per slice: the slice's :class:`~jaxmerge.config.MergeSpec` and a
:class:`RenamedReader` per model that shows the model's tensors under their output names, so that every
engine (in memory, streamed) merges a slice like a whole model.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from jaxmerge.io.layouts import RenamedReader

__all__ = ["Group", "RenamedReader", "layer_of", "num_layers", "plan"]

_LAYER = re.compile(r"^(?P<prefix>(?:.*\.)?(?:layers|h|layer|blocks|block)\.)(?P<index>\d+)\.(?P<rest>.+)$")
_PRE = re.compile(r"(^|.*\.)(embed_tokens|wte|wpe|word_embeddings|embed_in|tok_embeddings|embed_positions|"
                  r"position_embeddings|token_type_embeddings|shared|emb_ln|embeddings)(\..*)?$")


def layer_of(name: str) -> tuple[str, int, str] | None:
  """``(prefix, index, rest)`` of a tensor inside a numbered block, or ``None``.

  Args:
    name: a tensor name, e.g. ``"model.layers.3.mlp.up_proj.weight"``.

  Returns:
    ``("model.layers.", 3, "mlp.up_proj.weight")``, or ``None`` outside the blocks.
  """
  m = _LAYER.match(name)
  return (m["prefix"], int(m["index"]), m["rest"]) if m else None


def num_layers(reader, label: str) -> tuple[str | None, int]:
  """The block prefix and number of blocks of a checkpoint.

  Args:
    reader: the checkpoint reader.
    label: the model's name for errors.

  Returns:
    ``(prefix, count)``; ``(None, 0)`` without numbered blocks.

  Raises:
    ValueError: several block stacks (a multimodal model: mergekit needs ``modules`` for those).
  """
  stacks: dict[str, int] = {}
  for k in reader.keys():
    lo = layer_of(k)
    if lo:
      stacks[lo[0]] = max(stacks.get(lo[0], 0), lo[1] + 1)
  if len(stacks) > 1:
    raise ValueError(f"model {label} has several layer stacks ({sorted(stacks)}); slices need a model with one")
  return next(iter(stacks.items())) if stacks else (None, 0)


@dataclasses.dataclass
class Group:
  """Tensors merged together with one spec.

  Attributes:
    spec: the :class:`~jaxmerge.config.MergeSpec` (its ``base`` and ``models``).
    base: the base model's reader (output names).
    models: the other models' readers (output names), in ``spec.models`` order.
  """

  spec: Any
  base: Any
  models: list


def plan(spec, open_reader: Callable[[str], Any]) -> tuple[list[Group], int]:
  """The groups of a sliced merge (module docstring).

  Args:
    spec: a :class:`~jaxmerge.config.MergeSpec` with ``slices``.
    open_reader: ``open_reader(path, slice index)``: the reader of a model in a slice (possibly
      vocabulary-aligned), called once per model and slice.

  Returns:
    ``(groups, total number of output layers)``.

  Raises:
    ValueError: a layer range beyond a model's layers, a model without numbered blocks, or slices whose
      models name their blocks differently.
  """
  groups = []
  offset = 0
  prefixes = set()
  last = len(spec.slices) - 1
  for si, s in enumerate(spec.slices):
    readers = {p: open_reader(p, si) for p, _, _ in s.ranges}
    maps: dict[str, dict[str, str]] = {}
    for p, a, b in s.ranges:
      prefix, count = num_layers(readers[p], p)
      if prefix is None:
        raise ValueError(f"slices[{si}]: model {p} has no numbered layers (model.layers.<i>. etc.) to slice")
      if b > count:
        raise ValueError(f"slices[{si}]: layer_range [{a}, {b}] of model {p} is beyond its {count} layers")
      prefixes.add(prefix)
      m = {}
      for k in readers[p].keys():
        lo = layer_of(k)
        if lo is None:
          is_pre = _PRE.match(k) is not None
          if (is_pre and si == 0) or (not is_pre and si == last):
            m[k] = k
        elif a <= lo[1] < b:
          m[f"{prefix}{offset + lo[1] - a}.{lo[2]}"] = k
      maps[p] = m
    if len(prefixes) > 1:
      raise ValueError(f"the sliced models name their layers differently ({sorted(prefixes)}); they cannot be stacked")
    offset += s.num_layers
    sub = s.spec
    # The underlying readers are closed by their owner (several slices share one).
    base = RenamedReader(readers[sub.base], maps[sub.base], owns=False)
    models = [RenamedReader(readers[m], maps[m], owns=False) for m in sub.models]
    groups.append(Group(spec=sub, base=base, models=models))
  return groups, offset
