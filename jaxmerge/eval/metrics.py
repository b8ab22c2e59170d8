"""Classification metrics over padded batches: per-batch sums (jit-able), finalization, task summaries.

A batch carries a ``mask`` (``False`` on padding rows); sums count only real rows, so padded last batches
change nothing. Metrics: top-1 accuracy and mean cross-entropy (natural log). A suite's summary is the
**unweighted** mean over tasks (every task counts once, whatever its size), as in the merging literature.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

__all__ = ["batch_sums", "finalize", "summarize"]


def batch_sums(logits: Float[Array, "B C"], labels: Int[Array, "B"], mask: Bool[Array, "B"]) -> dict[str, Array]:
  """``{"correct", "loss", "count"}`` summed over the real rows of one batch (float32 scalars).

  ``correct`` counts ``argmax(logits) == label`` (ties go to the lowest class index); ``loss`` sums
  ``-log_softmax(logits)[label]``.

  Args:
    logits: ``[B, C]``.
    labels: int ``[B]``.
    mask: ``[B]``, True for real rows (padding rows are ignored).

  Returns:
    ``{"correct", "loss", "count"}``.
  """
  logits = logits.astype(jnp.float32)
  m = mask.astype(jnp.float32)
  pred = jnp.argmax(logits, axis=-1)
  nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), labels[:, None].astype(jnp.int32), axis=-1)[:, 0]
  return {"correct": jnp.sum((pred == labels) * m), "loss": jnp.sum(jnp.where(mask, nll, 0.0)), "count": jnp.sum(m)}


def finalize(sums: Mapping[str, Array]) -> dict[str, float]:
  """``{"accuracy", "loss", "count"}`` from accumulated :func:`batch_sums` (one host transfer).

  Args:
    sums: accumulated :func:`batch_sums`.

  Returns:
    ``{"accuracy", "loss", "count"}``.

  Raises:
    ValueError: no examples were evaluated.
  """
  s = {k: float(v) for k, v in jax.device_get(dict(sums)).items()}
  if s["count"] <= 0:
    raise ValueError("no examples were evaluated (empty dataset?)")
  return {"accuracy": s["correct"] / s["count"], "loss": s["loss"] / s["count"], "count": int(s["count"])}


def summarize(per_task: Mapping[str, Mapping[str, float]]) -> dict:
  """``{"tasks": per_task, "average": {"accuracy", "loss"}}`` with the unweighted mean over tasks.

  Args:
    per_task: ``{task: {"accuracy", "loss", ...}}``.

  Returns:
    ``{"tasks", "average"}``.
  """
  if not per_task:
    raise ValueError("no tasks to summarize")
  avg = {k: float(np.mean([m[k] for m in per_task.values()])) for k in ("accuracy", "loss")}
  return {"tasks": {t: dict(m) for t, m in per_task.items()}, "average": avg}
