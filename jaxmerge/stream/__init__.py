"""Streaming merges of checkpoints: checkpoints in, merged checkpoint out, one tensor at a time.

The public face of the engine's streamed placement (:mod:`jaxmerge.engine.stream`, where the design is described):
the checkpoints (lazy readers such as :class:`jaxmerge.io.safetensors_io.TensorReader`, or in-memory pytrees) are
first aligned by :func:`jaxmerge.io.llm.align` (the vocabulary policy ``"error"``; tied embeddings, mixed dtypes),
which the engine does not import, then merged tensor by tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from jaxmerge.base import MergeTransform
from jaxmerge.engine import stream as engine_stream
from jaxmerge.engine.stream import DictReader as DictReader
from jaxmerge.engine.stream import DictWriter as DictWriter
from jaxmerge.engine.stream import StreamResult as StreamResult
from jaxmerge.engine.stream import is_float_dtype as is_float_dtype
from jaxmerge.engine.stream import leafwise as leafwise
from jaxmerge.engine.stream import method_plan as method_plan
from jaxmerge.engine.stream import streamable_methods as streamable_methods
from jaxmerge.engine.stream import two_pass_methods as two_pass_methods
from jaxmerge.io import llm

__all__ = ["DictReader", "DictWriter", "StreamResult", "aligned", "is_float_dtype", "leafwise", "merge_leafwise", "merge_streaming",
           "method_plan", "streamable_methods", "two_pass_methods"]


def aligned(pretrained: Any, models: Sequence[Any], names: Sequence[str] | None = None) -> tuple[Any, list[Any]]:
  """Reader views of the checkpoints that agree on names and shapes (:func:`jaxmerge.io.llm.align`, policy
  ``"error"``); views that :func:`jaxmerge.io.llm.align` already made are returned as they are.

  Args:
    pretrained: a lazy reader (``keys``, ``shape``, ``dtype``, ``get``) or an in-memory pytree.
    models: one reader or pytree per task.
    names: model names for error messages (default: the readers' paths).

  Returns:
    ``(pretrained view, model views)``.

  Raises:
    ValueError: checkpoints that cannot be merged (naming the model and the parameter).
  """
  def reader(x: Any, label: str) -> Any:
    return x if engine_stream.is_reader(x) else DictReader(x, label)

  pre = reader(pretrained, "<memory>")
  fts = [reader(m, f"model {i}") for i, m in enumerate(models)]
  if isinstance(pre, llm.AlignedReader) and all(isinstance(m, llm.AlignedReader) for m in fts):
    return pre, fts
  return llm.align(pre, fts, policy="error", names=names)


def merge_leafwise(tx: MergeTransform, pretrained: Any, models: Sequence[Any], writer: Any, *,
                   names: Sequence[str] | None = None, **options: Any) -> StreamResult:
  """:func:`jaxmerge.engine.stream.merge_leafwise` (same arguments) on the :func:`aligned` checkpoints.

  Args:
    tx, pretrained, models, writer, names, options: as :func:`jaxmerge.engine.stream.merge_leafwise`.

  Returns:
    A :class:`StreamResult`.
  """
  pre, fts = aligned(pretrained, models, names)
  return engine_stream.merge_leafwise(tx, pre, fts, writer, names=names, **options)


def merge_streaming(tx: MergeTransform, pretrained: Any, models: Sequence[Any], writer: Any, *,
                    names: Sequence[str] | None = None, **options: Any) -> StreamResult:
  """:func:`jaxmerge.engine.stream.merge_streaming` (same arguments) on the :func:`aligned` checkpoints: leafwise
  transforms in one pass, global TIES (however it is spelled) and the registry's multi-pass methods in exact passes.

  Args:
    tx, pretrained, models, writer, names, options: as :func:`jaxmerge.engine.stream.merge_streaming`.

  Returns:
    A :class:`StreamResult`.
  """
  pre, fts = aligned(pretrained, models, names)
  return engine_stream.merge_streaming(tx, pre, fts, writer, names=names, **options)
