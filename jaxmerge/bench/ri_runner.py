"""Benchmark plug-ins for Resolving Interference (pre-merge adapter ``"ri"``) and test-time adaptation
(AdaMerging, data ``"tta"``), for :mod:`jaxmerge.bench.runner`.

Importing this module registers:

- the adapter ``"ri"`` (rows ``"ri+<method>"``): :func:`ri_experts` disentangles the suite's experts on an
  auxiliary source with :func:`jaxmerge.ri.disentangle`; its diagnostics (:func:`ri_diagnostics`) add the
  cross-task interference against the original experts to every data-free row, and against the adapted
  experts as well to the ``"ri+<method>"`` rows, each with its correlation to the accuracy drop;
- a runner for data ``"tta"`` (``adamerging``): :func:`tta_runner`;
- a runner for data ``"aux"`` whose method ``ri`` is RI followed by task arithmetic: :func:`aux_runner`.

Runners already registered for ``"tta"``/``"aux"`` keep serving the methods these do not handle.
The suite interface used: ``suite.pretrained``, ``suite.experts``, ``suite.tasks``, ``suite.heads``,
``suite.embed`` (normalized features), ``suite.layout``, ``suite.aux(source, n)``, ``suite.batches(...)``,
``suite.unlabeled(task)`` (CTI's task inputs).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
import optax

import jaxmerge as jm
from jaxmerge.bench import runner as _runner
from jaxmerge.interference import cti_report
from jaxmerge.ri import disentangle
from jaxmerge.tta.adamerging import adamerging
from jaxmerge.tta.methods import RIConfig

__all__ = ["CTI_IMAGES", "RI_DEFAULTS", "aux_batches", "aux_runner", "ri_diagnostics", "ri_experts", "tta_runner"]

# RI settings of the benchmark (jaxmerge bench --ri, experiments/ri_offline.py, the RI notebook): the library's
# defaults (the fields of jaxmerge.tta.methods.RIConfig, the one place to change them), plus the benchmark's
# auxiliary source and shuffling seed. Overridable through ri_experts(**kw). Results: experiments/README.md,
# section "Resolving Interference".
RI_DEFAULTS = {"aux_source": "fractal", "seed": 0, **RIConfig()._asdict()}
CTI_IMAGES = 200  # unlabeled test images per task for the cross-task interference of the "ri" rows
TTA_STEPS = 200  # AdaMerging steps in the benchmark (the reference's 1000 at batch 16 is for CLIP ViTs on GPU)


def aux_batches(images: np.ndarray, batch_size: int, *, seed: int = 0) -> Iterator[np.ndarray]:
  """Endless shuffled fixed-size batches of unlabeled auxiliary images (deterministic under ``seed``).

  Each pass over the images is a fresh permutation; the remainder of a pass that does not fill a batch is
  dropped.

  Args:
    images: ``[N, ...]`` auxiliary images (e.g. uint8 ``[N, H, W, 3]``).
    batch_size: images per batch ``B`` (at most ``N``).
    seed: seeds the shuffling.

  Yields:
    ``[B, ...]`` batches of ``images``, without end.

  Raises:
    ValueError: fewer than ``batch_size`` images (raised at the first ``next``).
  """
  if len(images) < batch_size:
    raise ValueError(f"{len(images)} auxiliary images are fewer than one batch of {batch_size}")
  rng = np.random.default_rng(seed)
  while True:
    order = rng.permutation(len(images))
    for i in range(0, len(images) - batch_size + 1, batch_size):
      yield images[order[i:i + batch_size]]


def _heads(suite) -> list:
  return [np.asarray(suite.heads[t], np.float32) for t in suite.tasks]


def ri_experts(suite, key: jax.Array, *, return_history: bool = False, progress: bool = False, **overrides) -> Any:
  """The suite's experts after RI (a list of ``T`` vision towers): the runner's ``"ri"`` adapter.

  Args:
    suite: a built suite.
    key: PRNG key.
    return_history: also return RI's loss history.
    progress: tqdm bar over RI steps.
    **overrides: entries of :data:`RI_DEFAULTS` (``aux_source``, ``num_aux``, ``batch_size``, ``seed``) or any
      keyword of :func:`jaxmerge.ri.disentangle`.

  Returns:
    The adapted experts (a list of ``T`` vision-tower parameter trees), or ``(experts, history)`` with
    ``return_history`` (``history``: :func:`jaxmerge.ri.disentangle`'s per-step losses).

  References:
    Ramesh et al., "Resolving Interference: Disentangling Models for Improved Model Merging", 2026.
    https://arxiv.org/abs/2603.13467
  """
  cfg = {**RI_DEFAULTS, **overrides}
  source, num_aux, bs, seed = (cfg.pop(k) for k in ("aux_source", "num_aux", "batch_size", "seed"))
  batches = aux_batches(suite.aux(source, num_aux), bs, seed=seed)
  adapted, history = disentangle(suite.pretrained, list(suite.experts), _heads(suite), batches,
                                 forward_fn=suite.embed, key=key, layout=suite.layout, progress=progress, **cfg)
  return (adapted, history) if return_history else adapted


def ri_diagnostics(suite, merged, adapted, merged_acc: dict, expert_acc: dict, adapted_acc: dict | None) -> dict:
  """The runner's diagnostics for RI: :func:`jaxmerge.interference.cti_report` on the first
  :data:`CTI_IMAGES` unlabeled test images of each task.

  Args:
    suite: a built suite (with ``unlabeled(task)``).
    merged: the merged parameters of the row.
    adapted: the RI-adapted experts the row was merged from, or ``None`` for a row merged from the originals.
    merged_acc: the merged model's ``{task: accuracy}``.
    expert_acc: each original expert's accuracy on its task.
    adapted_acc: each adapted expert's accuracy on its task (``None`` with ``adapted=None``).

  Returns:
    ``{"cti_vs_original_experts": ...}`` (and ``"cti_vs_adapted_experts": ...`` with ``adapted``): CTI per
    task and its mean (feature and head-space), the accuracy drop against the same experts (fractions, not
    points) and the Spearman correlation over tasks of each CTI with that drop.

  References:
    Ramesh et al., "Resolving Interference: Disentangling Models for Improved Model Merging", 2026.
    https://arxiv.org/abs/2603.13467
  """
  tasks = list(suite.tasks)
  inputs = [np.asarray(suite.unlabeled(t, "test"))[:CTI_IMAGES] for t in tasks]
  return cti_report(suite.embed, merged, list(suite.experts), inputs, _heads(suite), adapted_experts=adapted,
                    merged_accuracy=[merged_acc[t] for t in tasks], original_accuracy=[expert_acc[t] for t in tasks],
                    adapted_accuracy=None if adapted_acc is None else [adapted_acc[t] for t in tasks])


def _adamerging(suite, method, hparams, key):
  cfg = jm.get_method(method)(**{"steps": TTA_STEPS, **hparams})
  per_task = [suite.batches(t, "test", batch_size=cfg.batch_size, seed=1) for t in suite.tasks]
  merged, _ = adamerging(suite.pretrained, list(suite.experts), suite.embed, _heads(suite), per_task,
                         granularity=cfg.granularity, init_scale=cfg.init_scale, base=cfg.base, density=cfg.density,
                         optimizer=optax.adam(cfg.learning_rate), steps=cfg.steps, key=key, layout=suite.layout,
                         progress=False)
  return merged


def _ri_then_ta(suite, method, hparams, key):
  jm.get_method(method)(**hparams)  # validates the hyperparameters
  experts = ri_experts(suite, key, **hparams)  # RI_DEFAULTS for everything not given
  return jm.merge(jm.get_method("task_arithmetic")(), suite.pretrained, experts, layout=suite.layout)


tta_runner = _runner.dispatch_by_name("tta", {"adamerging": _adamerging})
aux_runner = _runner.dispatch_by_name("aux", {"ri": _ri_then_ta})

_runner.register_runner("tta", tta_runner)
_runner.register_runner("aux", aux_runner)
_runner.register_adapter("ri", functools.partial(ri_experts), diagnostics=ri_diagnostics)
