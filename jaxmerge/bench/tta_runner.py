"""Benchmark plug-in for the methods that need data: ``"val"`` (fisher, regmean, ugm, scale_search,
localize_stitch_data) and ``"tta"`` (adamerging, concrete, adarank, surgery), for :mod:`jaxmerge.bench.runner`.

Importing this module registers a runner for each of the two data classes that handles these methods by name
and passes every other method to the runner registered before it (e.g. :mod:`jaxmerge.bench.ri_runner`'s).
Validation methods read each task's ``val`` split; test-time adaptation draws shuffled unlabeled batches of
each task's ``test`` inputs. Representation Surgery returns a :class:`SurgeryRow` (the base's merged weights
and the trained adapters), which the runner evaluates through the adapters with the task id. Each run's cost (wall time, process peak memory, trainable parameters) is kept in
:data:`COSTS` and written, with the loss curve of adaptations (PNG), under :data:`PLOT_DIR`
(``$JAXMERGE_TTA_OUT``, default ``jaxmerge-results/tta``).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jaxmerge as jm
from jaxmerge import tree as jtree
from jaxmerge.bench import runner as _runner
from jaxmerge.tta import api
from jaxmerge.tta import search as S
from jaxmerge.tta import validation as V
from jaxmerge.tta.adamerging import adamerging

__all__ = ["COSTS", "HISTORIES", "PLOT_DIR", "SurgeryRow", "TTA_STEPS", "tta_runner", "val_runner"]

# Adaptation steps on the offline suite (the references' 1000-2000 at batch 16 are for CLIP ViTs on GPUs);
# $JAXMERGE_TTA_STEPS overrides it.
TTA_STEPS = int(os.environ.get("JAXMERGE_TTA_STEPS", "200"))
PLOT_DIR = Path(os.environ.get("JAXMERGE_TTA_OUT", "jaxmerge-results/tta"))
COSTS: dict[str, dict] = {}
HISTORIES: dict[str, dict] = {}


def _heads(suite) -> list:
  return [np.asarray(suite.heads[t], np.float32) for t in suite.tasks]


def _val(suite, task: str, n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  d = suite.data[task].val
  return (d.images, d.labels) if n is None else (d.images[:n], d.labels[:n])


def _peak_rss_gb() -> float:
  kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return kb / (1024**3 if sys.platform == "darwin" else 1024**2)


def _num_float(tree: Any) -> int:
  return int(sum(np.size(x) for x in jtree.flatten_paths(tree).values() if jtree.is_float(x)))


def _record(method: str, start: float, trainable: int, history: dict | None = None, **extra) -> None:
  COSTS[method] = {"seconds": time.perf_counter() - start, "peak_rss_gb": _peak_rss_gb(), "trainable": trainable,
                   **extra}
  if history is not None:
    HISTORIES[method] = history
  try:
    PLOT_DIR.mkdir(parents=True, exist_ok=True)
    (PLOT_DIR / "costs.json").write_text(json.dumps(COSTS, indent=1))
    if history is not None and len(history.get("loss", ())):
      _plot(method, history)
  except OSError:  # reporting must not fail a run
    pass


def _plot(method: str, history: dict) -> None:
  try:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
  except ImportError:
    return
  fig, ax = plt.subplots(figsize=(5, 3.2))
  loss = np.asarray(history["loss"])
  ax.plot(np.arange(len(loss)), loss, lw=1)
  ax.set_xlabel("step")
  ax.set_ylabel(history.get("ylabel", "loss"))
  ax.set_title(method)
  fig.tight_layout()
  fig.savefig(PLOT_DIR / f"{method}_loss.png", dpi=110)
  plt.close(fig)


def _fisher(suite, method, hparams, key):
  start = time.perf_counter()
  cfg = jm.get_method(method)(**hparams)
  data = [_val(suite, t)[0] for t in suite.tasks]
  merged = V.fisher(suite.pretrained, list(suite.experts), suite.embed, _heads(suite), data, **cfg.run_kwargs())
  _record(method, start, 0, statistics=_num_float(suite.pretrained) * len(suite.tasks))
  return merged


def _regmean(suite, method, hparams, key):
  start = time.perf_counter()
  cfg = jm.get_method(method)(**hparams)
  data = [_val(suite, t)[0] for t in suite.tasks]
  merged = V.regmean(suite.pretrained, list(suite.experts), suite.embed, data, **cfg.run_kwargs())
  _record(method, start, 0)
  return merged


def _ugm(suite, method, hparams, key):
  start = time.perf_counter()
  cfg = jm.get_method(method)(**hparams)
  data = [_val(suite, t)[0] for t in suite.tasks]
  merged = V.ugm(suite.pretrained, list(suite.experts), suite.embed, _heads(suite), data, **cfg.run_kwargs())
  _record(method, start, 0, statistics=_num_float(suite.pretrained) * len(suite.tasks))
  return merged


def _score(suite):
  return lambda params: float(np.mean(list(suite.evaluate(params, split="val").values())))


def _scale_search(suite, method, hparams, key):
  start = time.perf_counter()
  cfg = jm.get_method(method)(**hparams)
  info = jm.method_info(cfg.base)
  if info.data == "none":
    hp = {"scale": 1.0} if "scale" in info.hparams else {}
    unit = jm.merge(jm.get_method(cfg.base)(**hp), suite.pretrained, list(suite.experts), key=key,
                    layout=suite.layout, names=list(suite.tasks))
  else:
    runner = _RUNNERS_BY_NAME.get(cfg.base)
    if runner is None:
      raise ValueError(f"scale_search cannot run base {cfg.base!r} on this suite")
    unit = runner(suite, cfg.base, {"scale": 1.0} if "scale" in info.hparams else {}, key)
  merged, out = S.scale_search(suite.pretrained, unit, _score(suite), search=cfg.search, grid=cfg.grid(),
                               lo=cfg.lo, hi=cfg.hi, iters=cfg.iters)
  hist = {"loss": out["history"][:, 1], "scales": out["history"][:, 0], "ylabel": "validation accuracy"}
  _record(method, start, 1, hist, scale=out["scale"], base=cfg.base)
  return merged


def _adamerging(suite, method, hparams, key):
  start = time.perf_counter()
  cfg = jm.get_method(method)(**{"steps": TTA_STEPS, **hparams})
  k_data, k_fit = jax.random.split(key)
  per_task = [api.cycle_batches(suite.unlabeled(t, "test"), cfg.batch_size, key=jax.random.fold_in(k_data, i))
              for i, t in enumerate(suite.tasks)]
  merged, history = adamerging(suite.pretrained, list(suite.experts), suite.embed, _heads(suite), per_task,
                               key=k_fit, layout=suite.layout, progress=False, **cfg.run_kwargs())
  trainable = int(sum(np.size(c) for c in jax.tree.leaves(history["coeffs"])))
  name = method if not hparams else method + "(" + ",".join(f"{k}={v}" for k, v in sorted(hparams.items())) + ")"
  _record(name, start, trainable, {"loss": history["loss"], "ylabel": "entropy (sum over tasks)"})
  return merged


def _masked(fn_name: str, default_steps: int):
  def run(suite, method, hparams, key):
    from jaxmerge.tta import masks as M  # noqa: PLC0415

    start = time.perf_counter()
    cfg = jm.get_method(method)(**{"steps": default_steps, **hparams})
    k_data, k_fit = jax.random.split(key)
    per_task = [api.cycle_batches(suite.unlabeled(t, "test"), cfg.batch_size, key=jax.random.fold_in(k_data, i))
                for i, t in enumerate(suite.tasks)]
    kw = {"layout": suite.layout} if fn_name == "concrete" else {}
    merged, history = getattr(M, fn_name)(suite.pretrained, list(suite.experts), suite.embed, _heads(suite), per_task,
                                          key=k_fit, progress=False, **kw, **cfg.run_kwargs())
    n_float = _num_float(suite.pretrained)
    if fn_name == "concrete":
      trainable = n_float
    else:
      t = history["theta"]
      trainable = int(sum(np.size(x) for x in jax.tree.leaves(t)))
    _record(method, start, trainable, {"loss": history["loss"], "ylabel": "entropy (sum over tasks)"},
            **{k: v for k, v in history.items() if k in ("kept_fraction", "mask_density")})
    return merged

  return run


def _localize_stitch_data(suite, method, hparams, key):
  from jaxmerge.tta import stitch  # noqa: PLC0415

  start = time.perf_counter()
  cfg = jm.get_method(method)(**hparams)
  data = [_val(suite, t) for t in suite.tasks]
  merged, history = stitch.localize_stitch_data(suite.pretrained, list(suite.experts), suite.embed, _heads(suite),
                                                data, key=key, names=list(suite.tasks), **cfg.run_kwargs())
  hist = {"loss": history["loss"].sum(axis=0) if history["loss"].size else np.zeros(0),
          "ylabel": "cross-entropy + L1 (sum over tasks)"}
  _record(method, start, _num_float(suite.pretrained) * len(suite.tasks), hist,
          density=[round(float(d), 5) for d in history["density"]], overlap=round(history["overlap"], 4))
  return merged


class SurgeryRow:
  """A merged model with Representation Surgery adapters, as a bench result: the runner calls
  :meth:`evaluate_on` instead of evaluating parameters (the adapters change the forward; the task id is used).

  Attributes:
    merged: the base method's merged parameters.
    adapters: ``{"down": [T, r, D], "up": [T, D, r]}``.
    per_task: ``True`` (task-specific adapters).
  """

  per_task = True

  def __init__(self, merged: Any, adapters: dict):
    self.merged, self.adapters = merged, adapters

  def logits(self, suite, images: np.ndarray, task: int) -> jax.Array:
    """Task ``task``'s logits ``apply_surgery(adapters, task, suite.embed(merged, images)) @ head.T``.

    Args:
      suite: the suite whose forward and heads are used.
      images: a batch of uint8 images of task ``task``.
      task: the task index.

    Returns:
      float32 logits ``[B, C_task]``.
    """
    return _surgery_logits(suite)(self.merged, self.adapters, jnp.asarray(images), task)[:, :suite.heads[
        suite.tasks[task]].shape[0]]

  def evaluate_on(self, suite, split: str = "test") -> dict[str, float]:
    """Accuracy per task through the adapters (each task's images scored with its own adapter and head).

    Args:
      suite: a built suite.
      split: the data split.

    Returns:
      ``{task: accuracy}``.
    """
    acc = {}
    bs = int(getattr(getattr(suite, "config", None), "eval_batch", 256))
    fn = _surgery_logits(suite)
    for i, t in enumerate(suite.tasks):
      d = getattr(suite.data[t], split)
      correct = 0
      for j in range(0, len(d.labels), bs):
        x = d.images[j:j + bs]
        pad = bs - len(x)
        if pad:  # one compiled shape
          x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
        pred = np.asarray(jnp.argmax(fn(self.merged, self.adapters, jnp.asarray(x), i), axis=-1))[: bs - pad]
        correct += int(np.sum(pred == d.labels[j:j + bs]))
      acc[t] = correct / len(d.labels)
    return acc


_SURGERY_FNS: dict = {}


def _surgery_logits(suite):
  fn = _SURGERY_FNS.get(id(suite))
  if fn is None or fn[0] is not suite:
    from jaxmerge.tta import heads as H  # noqa: PLC0415
    from jaxmerge.tta.surgery import apply_surgery  # noqa: PLC0415

    heads, valid = H.pad_heads([suite.heads[t] for t in suite.tasks])

    @jax.jit
    def logits(merged, adapters, images, task):
      z = apply_surgery(adapters, task, suite.embed(merged, images))
      return jnp.where(valid[task], H.head_logits(z, heads[task]), -jnp.inf)

    fn = (suite, logits)
    _SURGERY_FNS.clear()  # one suite at a time
    _SURGERY_FNS[id(suite)] = fn
  return fn[1]


def _features(suite, params, images: np.ndarray, batch: int = 256) -> np.ndarray:
  cached = _EMBED.get(id(suite))
  if cached is None or cached[0] is not suite:
    _EMBED.clear()  # one suite at a time
    cached = _EMBED[id(suite)] = (suite, jax.jit(suite.embed))
  fwd = cached[1]
  return np.concatenate([np.asarray(fwd(params, jnp.asarray(images[i:i + batch])), np.float32)
                         for i in range(0, len(images), batch)])


_EMBED: dict = {}


def _surgery(suite, method, hparams, key):
  from jaxmerge.tta.surgery import surgery_from_features  # noqa: PLC0415

  start = time.perf_counter()
  cfg = jm.get_method(method)(**{"steps": TTA_STEPS, **hparams})
  k_base, k_fit = jax.random.split(key)
  info = jm.method_info(cfg.base)
  if info.data == "none":
    merged = jm.merge(jm.get_method(cfg.base)(), suite.pretrained, list(suite.experts), key=k_base,
                      layout=suite.layout, names=list(suite.tasks))
  else:
    base_runner = _RUNNERS_BY_NAME.get(cfg.base)
    if base_runner is None:
      raise ValueError(f"surgery cannot run base {cfg.base!r} on this suite")
    merged = base_runner(suite, cfg.base, {}, k_base)
  base_seconds = time.perf_counter() - start
  # The models are frozen: their features of the unlabeled test inputs are computed once, then the adapters
  # train on batches of them (the same objective as forward passes inside every step).
  inputs = [suite.unlabeled(t, "test") for t in suite.tasks]
  zm = [_features(suite, merged, x) for x in inputs]
  ze = [_features(suite, e, x) for e, x in zip(suite.experts, inputs)]
  adapters, history = surgery_from_features(zm, ze, key=k_fit, batch_size=cfg.batch_size, **cfg.run_kwargs())
  row = SurgeryRow(merged, jax.block_until_ready(adapters))
  trainable = int(sum(np.size(x) for x in jax.tree.leaves(adapters)))
  name = method if not hparams else method + "(" + ",".join(f"{k}={v}" for k, v in sorted(hparams.items())) + ")"
  _record(name, start, trainable, {"loss": history["loss"], "ylabel": "L1 feature distance (sum over tasks)"},
          base=cfg.base, base_seconds=round(base_seconds, 2), steps=cfg.steps)
  return row


_RUNNERS_BY_NAME = {"concrete": _masked("concrete", TTA_STEPS), "adarank": _masked("adarank", TTA_STEPS),
                    "fisher": _fisher, "regmean": _regmean, "ugm": _ugm, "scale_search": _scale_search,
                    "adamerging": _adamerging, "localize_stitch_data": _localize_stitch_data, "surgery": _surgery}


def _dispatch(kind: str):
  mine = {n: f for n, f in _RUNNERS_BY_NAME.items() if jm.method_info(n).data == kind}
  return _runner.dispatch_by_name(kind, mine)


val_runner = _dispatch("val")
tta_runner = _dispatch("tta")
_runner.register_runner("val", val_runner)
_runner.register_runner("tta", tta_runner)
