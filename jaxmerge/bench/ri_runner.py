"""Benchmark plug-ins for Resolving Interference (pre-merge adapter ``"ri"``) and test-time adaptation
(AdaMerging, data ``"tta"``), for :mod:`jaxmerge.bench.runner`.

Importing this module registers:

- the adapter ``"ri"`` (rows ``"ri+<method>"``): :func:`ri_experts` disentangles the suite's experts on an
  auxiliary source with :func:`jaxmerge.ri.disentangle`;
- a runner for data ``"tta"`` (``adamerging``): :func:`tta_runner`;
- a runner for data ``"aux"`` whose method ``ri`` is RI followed by task arithmetic: :func:`aux_runner`.

Runners already registered for ``"tta"``/``"aux"`` keep serving the methods these do not handle.
The suite interface used: ``suite.pretrained``, ``suite.experts``, ``suite.tasks``, ``suite.heads``,
``suite.embed`` (normalized features), ``suite.layout``, ``suite.aux(source, n)``, ``suite.batches(...)``.
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
from jaxmerge.ri import disentangle
from jaxmerge.tta.adamerging import adamerging

__all__ = ["RI_DEFAULTS", "aux_batches", "aux_runner", "ri_experts", "tta_runner"]

# RI settings for the benchmark (tiny CLIP on CPU), overridable through ri_experts(**kw). beta = 100 balances
# the disentangle term (squared differences of logits that carry CLIP's logit scale) against the KL term. It is
# of the order of jaxmerge.ri's default, auto_beta = logit_scale^2 (16.6^2 = 276 for the tiny CLIP), and is kept
# fixed here so that the benchmark rows do not move with the pretrained model's learned scale. Results:
# experiments/README.md, section "Resolving Interference" (python experiments/ri_offline.py).
RI_DEFAULTS = {"aux_source": "fractal", "n_aux": 1024, "batch_size": 32, "steps": 100, "learning_rate": 1e-4,
               "beta": 100.0, "mode": "independent", "seed": 0}
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
    **overrides: entries of :data:`RI_DEFAULTS` (``aux_source``, ``n_aux``, ``batch_size``, ``seed``) or any
      keyword of :func:`jaxmerge.ri.disentangle`.

  Returns:
    The adapted experts (a list of ``T`` vision-tower parameter trees), or ``(experts, history)`` with
    ``return_history`` (``history``: :func:`jaxmerge.ri.disentangle`'s per-step losses).

  References:
    Ramesh et al., "Resolving Interference: Disentangling Models for Improved Model Merging", 2026.
    https://arxiv.org/abs/2603.13467
  """
  cfg = {**RI_DEFAULTS, **overrides}
  source, n_aux, bs, seed = (cfg.pop(k) for k in ("aux_source", "n_aux", "batch_size", "seed"))
  batches = aux_batches(suite.aux(source, n_aux), bs, seed=seed)
  adapted, history = disentangle(suite.pretrained, list(suite.experts), _heads(suite), batches,
                                 forward_fn=suite.embed, key=key, layout=suite.layout, progress=progress, **cfg)
  return (adapted, history) if return_history else adapted



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
_runner.register_adapter("ri", functools.partial(ri_experts))
