"""One entry point for every registered method that needs data: :func:`run_method`.

Data is given per task (``T`` entries, in the order of the fine-tuned models and heads), each an array of inputs
``[N, ...]``, an ``(inputs, labels)`` pair, or an iterable of batches. ``"val"`` methods read the inputs (and
the labels where they use them), ``"tta"`` methods draw shuffled unlabeled batches from them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np

import jaxmerge as jm
from jaxmerge.tta import heads as H

__all__ = ["DATA_DESCRIPTION", "check_labels", "cycle_batches", "run_method"]

DATA_DESCRIPTION = {"val": "labeled validation data of every task", "aux": "unlabeled inputs of every task",
                    "tta": "unlabeled test inputs of every task"}


def _runners() -> dict:
  from jaxmerge.tta import adamerging as am  # noqa: PLC0415
  from jaxmerge.tta import validation as V  # noqa: PLC0415

  def fisher(cfg, pre, ft, fwd, heads, data, key, layout, progress, names):
    return V.fisher(pre, ft, fwd, heads, _inputs(data), names=names, **cfg.run_kwargs()), {}

  def regmean(cfg, pre, ft, fwd, heads, data, key, layout, progress, names):
    return V.regmean(pre, ft, fwd, _inputs(data), names=names, **cfg.run_kwargs()), {}

  def ugm(cfg, pre, ft, fwd, heads, data, key, layout, progress, names):
    return V.ugm(pre, ft, fwd, heads, _inputs(data), names=names, **cfg.run_kwargs()), {}

  def adamerging(cfg, pre, ft, fwd, heads, data, key, layout, progress, names):
    k_data, k_fit = jax.random.split(key)
    per_task = [cycle_batches(x, cfg.batch_size, key=jax.random.fold_in(k_data, t)) for t, x in enumerate(_inputs(data))]
    return am.adamerging(pre, ft, fwd, heads, per_task, key=k_fit, layout=layout, progress=progress,
                         **cfg.run_kwargs())

  def masked(fn):
    def run(cfg, pre, ft, fwd, heads, data, key, layout, progress, names):
      from jaxmerge.tta import masks as M  # noqa: PLC0415

      k_data, k_fit = jax.random.split(key)
      per_task = [cycle_batches(x, cfg.batch_size, key=jax.random.fold_in(k_data, t))
                  for t, x in enumerate(_inputs(data))]
      kw = {"layout": layout} if fn == "concrete" else {}
      return getattr(M, fn)(pre, ft, fwd, heads, per_task, key=k_fit, progress=progress, **kw, **cfg.run_kwargs())
    return run

  def scale_search(cfg, pre, ft, fwd, heads, data, key, layout, progress, names):
    from jaxmerge.tta import search as S  # noqa: PLC0415

    if not all(isinstance(d, tuple) for d in data):
      raise ValueError("method 'scale_search' needs labels: pass data=[(inputs, labels) per task]")
    unit = unit_merge(cfg.base, pre, ft, fwd, heads, data, key=key, layout=layout, names=names)
    score = lambda params: validation_accuracy(fwd, params, heads, data)  # noqa: E731
    out, info = S.scale_search(pre, unit, score, search=cfg.search, grid=cfg.grid(), lo=cfg.lo, hi=cfg.hi,
                               iters=cfg.iters)
    return out, info

  def localize_stitch_data(cfg, pre, ft, fwd, heads, data, key, layout, progress, names):
    from jaxmerge.tta import stitch  # noqa: PLC0415

    if not all(isinstance(d, tuple) for d in data):
      raise ValueError("method 'localize_stitch_data' needs labels: pass data=[(inputs, labels) per task]")
    return stitch.localize_stitch_data(pre, ft, fwd, heads, data, key=key, progress=progress, names=names,
                                       **cfg.run_kwargs())

  def surgery(cfg, pre, ft, fwd, heads, data, key, layout, progress, names):
    import importlib  # noqa: PLC0415

    S = importlib.import_module("jaxmerge.tta.surgery")  # (jaxmerge.tta.surgery is also the function's name)
    k_base, k_data, k_fit = jax.random.split(key, 3)
    merged, base_history = run_method(cfg.base, pre, ft, fwd, heads, data, key=k_base, layout=layout,
                                      progress=progress, names=names, return_history=True)
    per_task = [cycle_batches(x, cfg.batch_size, key=jax.random.fold_in(k_data, t)) for t, x in enumerate(_inputs(data))]
    fts = list(ft) if isinstance(ft, (list, tuple)) else [jax.tree.map(lambda x, t=t: x[t], ft) for t in range(len(heads))]
    adapters, history = S.surgery(merged, fts, fwd, per_task, key=k_fit, progress=progress, **cfg.run_kwargs())
    if base_history:
      history = {**history, "base": base_history}
    return S.SurgeryModel(merged, adapters), history

  return {"fisher": fisher, "regmean": regmean, "adamerging": adamerging, "scale_search": scale_search,
          "ugm": ugm, "concrete": masked("concrete"), "adarank": masked("adarank"),
          "localize_stitch_data": localize_stitch_data, "surgery": surgery}


def unit_merge(base: str, pretrained, finetuned, forward_fn, heads, data, *, key, layout=None, names=None):
  """``base``'s merge at unit scale (``scale=1`` when the method has a ``scale`` hyperparameter, otherwise its
  defaults); data-needing bases get ``data``."""
  info = jm.method_info(base)
  hp = {"scale": 1.0} if "scale" in info.hparams else {}
  if info.per_task:
    raise ValueError(f"scale_search needs one merged model; {base!r} keeps one model per task")
  return run_method(base, pretrained, finetuned, forward_fn, heads, data, key=key, layout=layout, names=names, **hp)


def validation_accuracy(forward_fn, params, heads, data, batch_size: int = 256) -> float:
  """Mean over tasks of the accuracy of ``argmax(forward_fn(params, x) @ head_t.T)`` on ``(x, y)`` pairs."""
  accs = []
  for h, (x, y) in zip(heads, data):
    x, y = np.asarray(x), np.asarray(y)
    correct = 0
    for i in range(0, len(x), batch_size):
      z = forward_fn(params, jax.numpy.asarray(x[i:i + batch_size]))
      correct += int(np.sum(np.asarray(jax.numpy.argmax(H.head_logits(z, jax.numpy.asarray(h)), -1)) == y[i:i + batch_size]))
    accs.append(correct / len(x))
  return float(np.mean(accs))


def _inputs(data: Sequence[Any]) -> list:
  return [d[0] if isinstance(d, tuple) else d for d in data]


def check_labels(labels: Any, num_classes: int, task: str) -> None:
  """Raises ``ValueError`` unless ``labels`` are integers in ``[0, num_classes)`` (the head's classes).

  Args:
    labels: an array-like of class labels (non-empty).
    num_classes: the number of classes of the task's head.
    task: the task's name, for the error message.

  Raises:
    ValueError: empty, non-integer or out-of-range labels.
  """
  y = np.asarray(labels)
  if y.size == 0:
    raise ValueError(f"task {task}: no labels (empty batch)")
  if not np.issubdtype(y.dtype, np.integer):
    raise ValueError(f"task {task}: labels must be integers, got dtype {y.dtype}")
  lo, hi = int(y.min()), int(y.max())
  if lo < 0 or hi >= num_classes:
    raise ValueError(f"task {task}: labels range over [{lo}, {hi}] but its head has {num_classes} classes "
                     "(label set and head do not match)")


def cycle_batches(x: Any, batch_size: int, *, key: jax.Array) -> Iterator[np.ndarray]:
  """Endless shuffled batches of ``min(batch_size, N)`` inputs from an array ``[N, ...]`` (deterministic under
  ``key``); an iterable is returned unchanged.

  Args:
    x: an array ``[N, ...]`` (anything with a ``shape``), or an iterable of batches.
    batch_size: inputs per batch (clipped to ``N``; a remainder of fewer inputs is skipped in each epoch).
    key: PRNG key seeding the shuffles.

  Returns:
    An endless iterator of ``[min(batch_size, N), ...]`` numpy batches (each epoch a new permutation), or
    ``iter(x)`` for an iterable.

  Raises:
    ValueError: an empty array.
  """
  if not hasattr(x, "shape"):
    return iter(x)
  x = np.asarray(x)
  n = len(x)
  if n == 0:
    raise ValueError("empty batch: a task has no inputs")
  b = min(batch_size, n)
  rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())

  def gen():
    while True:
      order = rng.permutation(n)
      for i in range(0, n - b + 1, b):
        yield x[order[i:i + b]]

  return gen()


def _check_data(name: str, kind: str, data: Any, heads: list, tasks: Sequence[str]) -> list:
  if data is None:
    raise ValueError(f"method {name!r} needs {DATA_DESCRIPTION.get(kind, kind + ' data')} (data={kind!r}): "
                     "pass data=[one entry per task]")
  data = list(data.values()) if isinstance(data, dict) else list(data)
  if len(data) != len(heads):
    raise ValueError(f"method {name!r}: got data for {len(data)} task(s) but {len(heads)} heads/models")
  for t, d in enumerate(data):
    x = d[0] if isinstance(d, tuple) else d
    if hasattr(x, "shape") and (np.ndim(x) == 0 or np.shape(x)[0] == 0):
      raise ValueError(f"method {name!r}: task {tasks[t]} has an empty batch (shape {np.shape(x)})")
    if isinstance(d, tuple):
      if len(d) != 2:
        raise ValueError(f"method {name!r}: task {tasks[t]}'s data must be inputs or (inputs, labels)")
      if np.shape(d[1])[:1] != np.shape(x)[:1]:
        raise ValueError(f"method {name!r}: task {tasks[t]} has {np.shape(x)[0]} inputs but "
                         f"{np.shape(d[1])[0] if np.ndim(d[1]) else 0} labels")
      check_labels(d[1], int(np.shape(heads[t])[0]), tasks[t])
  return data


def run_method(
    name: str,
    pretrained: Any,
    finetuned: Sequence[Any] | Any,
    forward_fn: Callable[[Any, jax.Array], jax.Array],
    heads: Sequence[Any],
    data: Any = None,
    *,
    key: jax.Array | None = None,
    layout: Callable[..., Any] | None = None,
    progress: bool = False,
    names: Sequence[str] | None = None,
    return_history: bool = False,
    **hparams: Any,
) -> Any:
  """Runs the registered method ``name`` with its defaults overridden by ``hparams``.

  Args:
    name: a registry name (``jm.list_methods()``); data-free methods are merged with :func:`jaxmerge.merge`.
    pretrained: pretrained parameters.
    finetuned: ``T`` fine-tuned models.
    forward_fn: ``forward_fn(params, inputs) -> features [B, D]`` (jittable).
    heads: ``T`` frozen heads ``[C_t, D]`` (``logits = features @ head.T``).
    data: ``T`` per-task entries (inputs ``[N, ...]``, ``(inputs, labels)`` or an iterable of batches).
    key: PRNG key (default ``jax.random.key(0)``).
    layout: matrix layout of the parameters (see :mod:`jaxmerge.filters`).
    progress: progress bars.
    names: task names for messages (default ``task0``, ...).
    return_history: also return the method's history (losses) as a second value.
    **hparams: hyperparameters of the method (unknown names raise ``ValueError``).

  Returns:
    The merged parameters (and the history with ``return_history``); for ``"surgery"`` a
    :class:`~jaxmerge.tta.surgery.SurgeryModel` (the base's merged parameters and the per-task adapters).

  Raises:
    ValueError: an unknown method or hyperparameter, a method that needs data called without it, empty
      batches, a number of data entries, heads and models that differ, labels outside a head's classes.

  References:
    Survey protocol (validation-driven and test-time adaptation): Yang et al., "Model Merging in LLMs, MLLMs,
    and Beyond: Methods, Theories, Applications and Opportunities", 2024. https://arxiv.org/abs/2408.07666
  """
  info = jm.method_info(name)
  key = jax.random.key(0) if key is None else key
  cfg = info.factory(**hparams)
  if info.data == "none":
    fn = jm.merge_per_task if info.per_task else jm.merge
    out = fn(cfg, pretrained, finetuned, key=key, layout=layout, names=names)
    return (out, {}) if return_history else out
  hs = list(heads.values()) if isinstance(heads, dict) else list(heads)
  if not hs:
    raise ValueError(f"method {name!r} needs one head per task, got none")
  tasks = list(names) if names is not None else [f"task{t}" for t in range(len(hs))]
  data = _check_data(name, info.data, data, hs, tasks)
  runners = _runners()
  if name not in runners:
    raise ValueError(f"method {name!r} (data {info.data!r}) has no runner in jaxmerge.tta; "
                     f"available: {', '.join(sorted(runners))}")
  H.pad_heads(hs)
  out, history = runners[name](cfg, pretrained, finetuned, forward_fn, hs, data, key, layout, progress, names)
  return (out, history) if return_history else out
