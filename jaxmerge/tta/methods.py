"""Registry entries of the methods that need data (validation-driven and test-time adaptation, and Resolving
Interference's pre-merge adaptation).

This module imports only the registry (no optax), so that ``import jaxmerge`` lists these methods. Each entry
returns a validated configuration (a ``NamedTuple``); the work is done by :func:`jaxmerge.tta.run_method`
(or the method's own function, with ``**config.run_kwargs()``; for ``"ri"``: :func:`jaxmerge.ri.disentangle`),
because these methods need a model forward, task heads and data, which a plain :class:`~jaxmerge.MergeTransform`
does not see.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

from jaxmerge.registry import choice, flag, integer, method_name, real, register

__all__ = ["AdaMergingConfig", "AdaRankConfig", "ConcreteConfig", "FisherConfig", "LocalizeStitchConfig", "RIConfig",
           "RegMeanConfig", "ScaleSearchConfig", "SurgeryConfig", "UGMConfig"]

ADAMERGING_REF = "https://arxiv.org/abs/2310.02575"
FISHER_REF = "https://arxiv.org/abs/2111.09832"
REGMEAN_REF = "https://arxiv.org/abs/2212.09849"

_GRANULARITY = ("task", "layer")
_BASES = ("task_arithmetic", "ties")
_ESTIMATORS = ("reference", "exact")
_COUNT = integer(1)  # a positive count (examples, batch size, rank, iterations)
_RATE = real(0, lo_open=True)  # a positive rate or temperature


def _positive_int(name: str, value: int) -> None:
  if int(value) != value or value < 1:
    raise ValueError(f"{name} must be a positive integer, got {value!r}")


class FisherConfig(NamedTuple):
  """Fisher merging's hyperparameters (see :func:`jaxmerge.tta.validation.fisher`)."""

  num_examples: int = 256
  batch_size: int = 32
  normalize: bool = True
  epsilon: float = 1e-6
  estimator: str = "reference"

  def run_kwargs(self) -> dict:
    """Keyword arguments of :func:`jaxmerge.tta.validation.fisher`."""
    return dict(self._asdict())


class RegMeanConfig(NamedTuple):
  """RegMean's hyperparameters (see :func:`jaxmerge.tta.validation.regmean`)."""

  alpha: float = 0.95
  num_examples: int = 256
  batch_size: int = 32

  def run_kwargs(self) -> dict:
    """Keyword arguments of :func:`jaxmerge.tta.validation.regmean`."""
    return dict(self._asdict())


class AdaMergingConfig(NamedTuple):
  """AdaMerging's hyperparameters (what ``jm.get_method("adamerging")(...)`` returns).

  Call :func:`jaxmerge.tta.adamerging` with ``**config.run_kwargs()`` to perform it.
  """

  granularity: str = "layer"
  init_scale: float = 0.3
  base: str = "task_arithmetic"
  density: float = 0.2
  learning_rate: float = 1e-3
  steps: int = 1000
  batch_size: int = 16

  def run_kwargs(self) -> dict:
    """Keyword arguments of :func:`jaxmerge.tta.adamerging` (the optimizer is Adam at ``learning_rate``)."""
    return {"granularity": self.granularity, "init_scale": self.init_scale, "base": self.base,
            "density": self.density, "optimizer": adam(self.learning_rate), "steps": self.steps}


@functools.lru_cache(maxsize=16)
def adam(learning_rate: float):
  """``optax.adam(learning_rate)``, one object per rate (so that compiled steps, cached per optimizer, are
  reused across runs)."""
  import optax  # noqa: PLC0415

  return optax.adam(learning_rate)


def check_adamerging(granularity: str, base: str) -> None:
  """Raises ``ValueError`` for an unknown AdaMerging granularity or base."""
  if granularity not in _GRANULARITY:
    raise ValueError(f"granularity must be one of {list(_GRANULARITY)}, got {granularity!r}")
  if base not in _BASES:
    raise ValueError(f"base must be one of {list(_BASES)}, got {base!r}")


@register("fisher", family="weighted_average", data="val", storage="none (Fishers are transient)",
          reference=FISHER_REF, params={"num_examples": _COUNT, "batch_size": _COUNT, "normalize": flag(),
                                        "epsilon": real(0), "estimator": choice(*_ESTIMATORS)})
def fisher_config(num_examples: int = 256, batch_size: int = 32, normalize: bool = True, epsilon: float = 1e-6,
                  estimator: str = "reference") -> FisherConfig:
  """Fisher-weighted averaging's registry entry (FusionBench ``clip_fisher_merging.yaml`` defaults).

  Args:
    num_examples: inputs per task.
    batch_size: batch size of the Fisher pass.
    normalize: weight each model by the inverse global norm of its Fisher.
    epsilon: added to every Fisher entry.
    estimator: ``"reference"`` (squared batch gradients, as FusionBench) or ``"exact"`` (per-example
      expectation over the model's predictions).

  Returns:
    A :class:`FisherConfig`.

  References:
    Matena and Raffel, "Merging Models with Fisher-Weighted Averaging", NeurIPS 2022.
    https://arxiv.org/abs/2111.09832
  """
  _positive_int("num_examples", num_examples)
  _positive_int("batch_size", batch_size)
  if not epsilon >= 0:
    raise ValueError(f"epsilon must be >= 0, got {epsilon}")
  if estimator not in _ESTIMATORS:
    raise ValueError(f"estimator must be one of {list(_ESTIMATORS)}, got {estimator!r}")
  return FisherConfig(num_examples, batch_size, bool(normalize), float(epsilon), estimator)


@register("regmean", family="weighted_average", data="val", storage="none (Grams are transient)",
          reference=REGMEAN_REF, params={"alpha": real(0, 1), "num_examples": _COUNT, "batch_size": _COUNT})
def regmean_config(alpha: float = 0.95, num_examples: int = 256, batch_size: int = 32) -> RegMeanConfig:
  """RegMean's registry entry (FusionBench ``clip_regmean.yaml`` defaults: off-diagonal scale 0.95).

  Args:
    alpha: off-diagonal scale of the Gram matrices, in ``[0, 1]``.
    num_examples: inputs per task.
    batch_size: batch size of the capture pass.

  Returns:
    A :class:`RegMeanConfig`.

  References:
    Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language Models", ICLR 2023.
    https://arxiv.org/abs/2212.09849
  """
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"alpha must be in [0, 1], got {alpha}")
  _positive_int("num_examples", num_examples)
  _positive_int("batch_size", batch_size)
  return RegMeanConfig(float(alpha), num_examples, batch_size)


@register("adamerging", family="adaptation", data="tta", storage="none (coefficients are folded into the weights)",
          reference=ADAMERGING_REF,
          params={"granularity": choice(*_GRANULARITY), "init_scale": real(), "base": choice(*_BASES),
                  "density": real(0, 1), "learning_rate": _RATE, "steps": integer(0), "batch_size": _COUNT})
def adamerging_config(granularity: str = "layer", init_scale: float = 0.3, base: str = "task_arithmetic",
                      density: float = 0.2, learning_rate: float = 1e-3, steps: int = 1000,
                      batch_size: int = 16) -> AdaMergingConfig:
  """AdaMerging's registry entry: validated hyperparameters (FusionBench ``adamerging/clip.yaml`` defaults).

  Args:
    granularity: ``"layer"`` (one coefficient per task and leaf) or ``"task"`` (one per task).
    init_scale: initial value of every coefficient.
    base: ``"task_arithmetic"`` (AdaMerging) or ``"ties"`` (AdaMerging++).
    density: TIES trim density for AdaMerging++.
    learning_rate: Adam learning rate.
    steps: optimizer steps.
    batch_size: unlabeled examples per task per step.

  Returns:
    An :class:`AdaMergingConfig`.

  References:
    Yang et al., "AdaMerging: Adaptive Model Merging for Multi-Task Learning", ICLR 2024.
    https://arxiv.org/abs/2310.02575
  """
  check_adamerging(granularity, base)
  return AdaMergingConfig(granularity, init_scale, base, density, learning_rate, steps, batch_size)


class ScaleSearchConfig(NamedTuple):
  """Scale search's hyperparameters (see :func:`jaxmerge.tta.search.scale_search`)."""

  base: str = "task_arithmetic"
  search: str = "grid"
  lo: float = 0.0
  hi: float = 1.0
  iters: int = 12

  def grid(self) -> tuple[float, ...]:
    """The grid of ``search="grid"``: ``lo, lo + 0.05, ..., hi``."""
    n = int(round((self.hi - self.lo) / 0.05))
    return tuple(round(self.lo + 0.05 * i, 6) for i in range(n + 1))


@register("scale_search", family="weighted_average", data="val", storage="none",
          reference="https://arxiv.org/abs/2212.04089",
          params={"base": method_name(), "search": choice("grid", "golden"), "lo": real(), "hi": real(),
                  "iters": _COUNT})
def scale_search_config(base: str = "task_arithmetic", search: str = "grid", lo: float = 0.0, hi: float = 1.0,
                        iters: int = 12) -> ScaleSearchConfig:
  """A global scale chosen on labeled validation data for the merge of any registered method ``base``.

  Args:
    base: the method whose merged update is rescaled (run with ``scale=1`` when it has a ``scale``).
    search: ``"grid"`` (``lo, lo + 0.05, ..., hi``; Task Arithmetic's protocol) or ``"golden"``
      (golden-section search on ``[lo, hi]``, ``iters + 2`` evaluations).
    lo: smallest scale.
    hi: largest scale.
    iters: golden-section iterations.

  Returns:
    A :class:`ScaleSearchConfig`.

  References:
    Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023. https://arxiv.org/abs/2212.04089
  """
  if search not in ("grid", "golden"):
    raise ValueError(f"search must be 'grid' or 'golden', got {search!r}")
  if not hi > lo:
    raise ValueError(f"scale_search needs lo < hi, got [{lo}, {hi}]")
  if base == "scale_search":
    raise ValueError("scale_search cannot search its own scale (base='scale_search')")
  from jaxmerge.registry import method_info  # noqa: PLC0415

  method_info(base)  # unknown names raise with the valid ones
  return ScaleSearchConfig(base, search, float(lo), float(hi), int(iters))


class UGMConfig(NamedTuple):
  """Uncertainty-based gradient matching's hyperparameters (see :func:`jaxmerge.tta.validation.ugm`)."""

  alphas: float = 0.3
  prior_precision: float = 1.0
  relative_prior: bool = True
  num_examples: int = 256
  batch_size: int = 32
  estimator: str = "reference"

  def run_kwargs(self) -> dict:
    """Keyword arguments of :func:`jaxmerge.tta.validation.ugm`."""
    return dict(self._asdict())


@register("ugm", family="weighted_average", data="val", storage="none (Fishers are transient)",
          reference="https://arxiv.org/abs/2310.12808",
          params={"alphas": real(per_task=True), "prior_precision": real(0), "relative_prior": flag(),
                  "num_examples": _COUNT, "batch_size": _COUNT, "estimator": choice(*_ESTIMATORS)})
def ugm_config(alphas: float = 0.3, prior_precision: float = 1.0, relative_prior: bool = True,
               num_examples: int = 256, batch_size: int = 32, estimator: str = "reference") -> UGMConfig:
  """Uncertainty-based gradient matching's registry entry (no ViT default is published: alpha = TA's 0.3 and
  a prior precision equal to the mean Fisher entry).

  Args:
    alphas: ``alpha_t`` for every task.
    prior_precision: ``delta`` (relative to the mean Fisher entry with ``relative_prior``).
    relative_prior: scale ``prior_precision`` by the mean Fisher entry.
    num_examples: inputs per task for the Fishers.
    batch_size: batch size of the Fisher pass.
    estimator: ``"reference"`` or ``"exact"`` Fisher.

  Returns:
    A :class:`UGMConfig`.

  References:
    Daheim et al., "Model Merging by Uncertainty-Based Gradient Matching", ICLR 2024.
    https://arxiv.org/abs/2310.12808
  """
  if prior_precision < 0:
    raise ValueError(f"prior_precision must be >= 0, got {prior_precision}")
  if estimator not in _ESTIMATORS:
    raise ValueError(f"estimator must be one of {list(_ESTIMATORS)}, got {estimator!r}")
  _positive_int("num_examples", num_examples)
  _positive_int("batch_size", batch_size)
  return UGMConfig(alphas, float(prior_precision), bool(relative_prior), num_examples, batch_size, estimator)


class ConcreteConfig(NamedTuple):
  """Concrete subspace learning's hyperparameters (see :func:`jaxmerge.tta.masks.concrete`)."""

  base: str = "task_arithmetic"
  scale: float = 0.3
  temperature: float = 0.5
  learning_rate: float = 1e-3
  steps: int = 2000
  adamerging_steps: int = 1000
  batch_size: int = 16
  mask_type: str = "continuous"

  def run_kwargs(self) -> dict:
    """Keyword arguments of :func:`jaxmerge.tta.masks.concrete`."""
    return {"base": self.base, "scale": self.scale, "temperature": self.temperature,
            "optimizer": adam(self.learning_rate), "steps": self.steps, "adamerging_steps": self.adamerging_steps,
            "mask_type": self.mask_type}


@register("concrete", family="sparsification", data="tta", storage="none (mask baked into the weights)",
          reference="https://arxiv.org/abs/2312.06173",
          params={"base": choice("task_arithmetic", "adamerging"), "scale": real(), "temperature": _RATE,
                  "learning_rate": _RATE, "steps": integer(0), "adamerging_steps": integer(0), "batch_size": _COUNT,
                  "mask_type": choice("continuous", "discrete")})
def concrete_config(base: str = "task_arithmetic", scale: float = 0.3, temperature: float = 0.5,
                    learning_rate: float = 1e-3, steps: int = 2000, adamerging_steps: int = 1000, batch_size: int = 16,
                    mask_type: str = "continuous") -> ConcreteConfig:
  """Concrete TA / Concrete AdaMerging's registry entry (FusionBench ``concrete_subspace`` defaults).

  Args:
    base: ``"task_arithmetic"`` or ``"adamerging"``.
    scale: task-arithmetic coefficient (AdaMerging's initial coefficient).
    temperature: Concrete temperature.
    learning_rate: Adam learning rate.
    steps: mask steps.
    adamerging_steps: AdaMerging steps after the mask (``base="adamerging"``).
    batch_size: unlabeled examples per task per step.
    mask_type: ``"continuous"`` or ``"discrete"`` mask baked in.

  Returns:
    A :class:`ConcreteConfig`.

  References:
    Tang et al., "Concrete Subspace Learning based Interference Elimination for Multi-task Model Fusion", 2023.
    https://arxiv.org/abs/2312.06173
  """
  if base not in ("task_arithmetic", "adamerging"):
    raise ValueError(f"base must be 'task_arithmetic' or 'adamerging', got {base!r}")
  if mask_type not in ("continuous", "discrete"):
    raise ValueError(f"mask_type must be 'continuous' or 'discrete', got {mask_type!r}")
  if not temperature > 0:
    raise ValueError(f"temperature must be positive, got {temperature}")
  _positive_int("batch_size", batch_size)
  return ConcreteConfig(base, float(scale), float(temperature), float(learning_rate), int(steps),
                        int(adamerging_steps), int(batch_size), mask_type)


class AdaRankConfig(NamedTuple):
  """AdaRank's hyperparameters (see :func:`jaxmerge.tta.masks.adarank`)."""

  init_scale: float = 0.3
  temperature: float = 10.0
  learning_rate: float = 1e-3
  steps: int = 1000
  batch_size: int = 16

  def run_kwargs(self) -> dict:
    """Keyword arguments of :func:`jaxmerge.tta.masks.adarank`."""
    return {"init_scale": self.init_scale, "temperature": self.temperature, "optimizer": adam(self.learning_rate),
            "steps": self.steps}


@register("adarank", family="subspace", data="tta", storage="none (masks baked into the weights)",
          reference="https://arxiv.org/abs/2503.22178",
          params={"init_scale": real(), "temperature": _RATE, "learning_rate": _RATE, "steps": integer(0),
                  "batch_size": _COUNT})
def adarank_config(init_scale: float = 0.3, temperature: float = 10.0, learning_rate: float = 1e-3,
                   steps: int = 1000, batch_size: int = 16) -> AdaRankConfig:
  """AdaRank's registry entry on task arithmetic (reference config: coefficient 0.3, every component kept
  initially, mask temperature 10, batch 16; its 10000 steps are for GPUs, 1000 here).

  Args:
    init_scale: initial layer-wise coefficient.
    temperature: mask temperature.
    learning_rate: Adam learning rate.
    steps: optimizer steps.
    batch_size: unlabeled examples per task per step.

  Returns:
    An :class:`AdaRankConfig`.

  References:
    Lee et al., "AdaRank: Adaptive Rank Pruning for Enhanced Multi-Task Model Merging", 2025.
    https://arxiv.org/abs/2503.22178
  """
  if not temperature > 0:
    raise ValueError(f"temperature must be positive, got {temperature}")
  _positive_int("batch_size", batch_size)
  return AdaRankConfig(float(init_scale), float(temperature), float(learning_rate), int(steps), int(batch_size))


class LocalizeStitchConfig(NamedTuple):
  """Data-driven Localize-and-Stitch's hyperparameters (see :func:`jaxmerge.tta.stitch.localize_stitch_data`)."""

  density: float = 0.01
  sigmoid_bias: float = 5.0
  l1_strength: float = 1.0
  learning_rate: float = 0.5
  steps: int = 20
  num_examples: int = 64
  batch_size: int = 64
  binarize: str = "topk"

  def run_kwargs(self) -> dict:
    """Keyword arguments of :func:`jaxmerge.tta.stitch.localize_stitch_data` (Adam at ``learning_rate``)."""
    kw = self._asdict()
    kw["optimizer"] = adam(kw.pop("learning_rate"))
    return kw


@register("localize_stitch_data", family="sparsification", data="val", storage="none (masks optional)",
          reference="https://arxiv.org/abs/2408.13656",
          params={"density": real(0, 1), "sigmoid_bias": _RATE, "l1_strength": real(0), "learning_rate": _RATE,
                  "steps": integer(0), "num_examples": _COUNT, "batch_size": _COUNT,
                  "binarize": choice("topk", "round")})
def localize_stitch_data_config(density: float = 0.01, sigmoid_bias: float = 5.0, l1_strength: float = 1.0,
                                learning_rate: float = 0.5, steps: int = 20, num_examples: int = 64,
                                batch_size: int = 64, binarize: str = "topk") -> LocalizeStitchConfig:
  """Localize-and-Stitch with masks learned on few-shot labeled validation data (the data-free variant is
  ``localize_stitch``). The reference (64 shots, bias 5, L1 strength 1, 10 full-batch epochs of plain gradient
  descent at a learning rate of 1e7) is re-expressed with Adam on the logits and a normalized L1 term; Adam moves
  a logit by at most about ``learning_rate`` per step, so ``steps * learning_rate`` must exceed ``2 *
  sigmoid_bias`` for an entry to cross from outside the initial mask to inside (20 full-batch steps at 0.5).

  Args:
    density: fraction of each task vector in the initial (top-magnitude) mask and in the final mask
      (``binarize="topk"``); the paper reports about 1% for learned masks.
    sigmoid_bias: initial logit magnitude (``+b`` inside the initial mask, ``-b`` outside).
    l1_strength: weight of ``mean(sigmoid(S))`` (the soft mask's density) in the loss.
    learning_rate: Adam learning rate on the logits.
    steps: optimizer steps per task (``0``: the data-free masks).
    num_examples: labeled examples per task (shots).
    batch_size: examples per step.
    binarize: ``"topk"`` (the top-``density`` logits) or ``"round"`` (``sigmoid > 0.5``, the reference's).

  Returns:
    A :class:`LocalizeStitchConfig`.

  References:
    He et al., "Localize-and-Stitch: Efficient Model Merging via Sparse Task Arithmetic", 2024.
    https://arxiv.org/abs/2408.13656
  """
  if not 0.0 <= density <= 1.0:
    raise ValueError(f"density must be in [0, 1], got {density}")
  if binarize not in ("topk", "round"):
    raise ValueError(f"binarize must be 'topk' or 'round', got {binarize!r}")
  if not sigmoid_bias > 0:
    raise ValueError(f"sigmoid_bias must be positive, got {sigmoid_bias}")
  if l1_strength < 0:
    raise ValueError(f"l1_strength must be >= 0, got {l1_strength}")
  if int(steps) != steps or steps < 0:
    raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
  _positive_int("num_examples", num_examples)
  _positive_int("batch_size", batch_size)
  return LocalizeStitchConfig(float(density), float(sigmoid_bias), float(l1_strength), float(learning_rate),
                              int(steps), int(num_examples), int(batch_size), binarize)


class SurgeryConfig(NamedTuple):
  """Representation Surgery's hyperparameters (see :func:`jaxmerge.tta.surgery.surgery`)."""

  base: str = "task_arithmetic"
  rank: int = 16
  learning_rate: float = 1e-3
  steps: int = 1000
  batch_size: int = 16

  def run_kwargs(self) -> dict:
    """Keyword arguments of :func:`jaxmerge.tta.surgery.surgery` (Adam at ``learning_rate``)."""
    return {"rank": self.rank, "optimizer": adam(self.learning_rate), "steps": self.steps}


@register("surgery", family="moe", data="tta", per_task=True,
          storage="per task: a rank-r bottleneck adapter on the features (2 r D floats)",
          reference="https://arxiv.org/abs/2402.02705",
          params={"base": method_name(), "rank": _COUNT, "learning_rate": _RATE, "steps": integer(0),
                  "batch_size": _COUNT})
def surgery_config(base: str = "task_arithmetic", rank: int = 16, learning_rate: float = 1e-3, steps: int = 1000,
                   batch_size: int = 16) -> SurgeryConfig:
  """Representation Surgery's registry entry: per-task adapters on the features of the merged model of ``base``
  (run with its defaults), trained on unlabeled test inputs to match each expert's features (L1); inference
  needs the task id (FusionBench ``surgery`` defaults: rank 16, Adam 1e-3, 1000 steps; its base is AdaMerging).

  Args:
    base: a registered method that yields one merged model (``task_arithmetic`` by default).
    rank: bottleneck size of each adapter.
    learning_rate: Adam learning rate.
    steps: optimizer steps.
    batch_size: unlabeled examples per task per step.

  Returns:
    A :class:`SurgeryConfig`.

  References:
    Yang et al., "Representation Surgery for Multi-Task Model Merging", ICML 2024.
    https://arxiv.org/abs/2402.02705
  """
  from jaxmerge.registry import method_info  # noqa: PLC0415

  if base == "surgery":
    raise ValueError("surgery's base cannot be 'surgery'")
  if method_info(base).per_task:
    raise ValueError(f"surgery needs one merged model; base {base!r} keeps one model per task")
  _positive_int("rank", rank)
  _positive_int("batch_size", batch_size)
  if int(steps) != steps or steps < 0:
    raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
  return SurgeryConfig(base, int(rank), float(learning_rate), int(steps), int(batch_size))


# ---- Resolving Interference ------------------------------------------------------------------------------------

RI_REF = "https://arxiv.org/abs/2603.13467"
RI_MODES = ("independent", "joint")
RI_PRESERVE = ("kl", "mse")
RI_LOOPS = ("vmap", "map")


class RIConfig(NamedTuple):
  """Resolving Interference's hyperparameters (what ``jm.get_method("ri")(...)`` returns).

  The field defaults below are RI's defaults, the single place they are set: :func:`jaxmerge.ri.disentangle`,
  the registry entry ``"ri"``, the benchmark (``jaxmerge bench --ri``, :mod:`jaxmerge.bench.ri_runner`), the
  experiment scripts and the RI notebook read them from here (``RIConfig()``). RI is a pre-merge
  adaptation that needs a model forward, heads and auxiliary data: call :func:`jaxmerge.ri.disentangle` with
  ``**config.run_kwargs()`` on ``num_aux`` auxiliary images in batches of ``batch_size``.
  """

  mode: str = "independent"
  beta: float | None = None
  steps: int = 200
  learning_rate: float = 1e-5
  weight_decay: float = 0.0
  temperature: float = 1.0
  preserve: str = "kl"
  merge_scale: float = 0.3
  task_loop: str = "vmap"
  num_aux: int = 1024
  batch_size: int = 32

  def run_kwargs(self) -> dict:
    """Keyword arguments of :func:`jaxmerge.ri.disentangle` (all fields but ``num_aux`` and ``batch_size``,
    which size the auxiliary data the caller batches)."""
    kw = dict(self._asdict())
    del kw["num_aux"], kw["batch_size"]
    return kw


def check_ri(mode: str, preserve: str, task_loop: str, beta: float | None, temperature: float) -> None:
  """Raises ``ValueError`` for an unknown RI ``mode``, ``preserve`` or ``task_loop``, a negative ``beta`` or a
  non-positive ``temperature``."""
  if mode not in RI_MODES:
    raise ValueError(f"mode must be one of {list(RI_MODES)}, got {mode!r}")
  if preserve not in RI_PRESERVE:
    raise ValueError(f"preserve must be one of {list(RI_PRESERVE)}, got {preserve!r}")
  if task_loop not in RI_LOOPS:
    raise ValueError(f"task_loop must be one of {list(RI_LOOPS)}, got {task_loop!r}")
  if beta is not None and beta < 0:
    raise ValueError(f"beta must be >= 0, got {beta}")
  if not temperature > 0:
    raise ValueError(f"temperature must be positive, got {temperature}")


def check_ri_beta(mode: str, beta: float | None) -> None:
  """Raises ``ValueError`` for a ``beta`` given in joint mode: beta weights independent mode's preserve term, and
  joint mode's loss (``sum_i D(h_i(merged), h_i(expert_i))``) has no such term, so the value would be ignored."""
  if mode == "joint" and beta is not None:
    raise ValueError(f"beta={beta} has no effect in joint mode (its loss has no preserve term to weight); leave "
                     "beta=None, or use mode='independent'")


_RI = RIConfig()  # RI's defaults, read by the signature below (and by jaxmerge.ri.disentangle's)


@register("ri", family="adaptation", data="aux", storage="none (a pre-merge adaptation of the experts)",
          reference=RI_REF,
          params={"mode": choice("independent", "joint"), "beta": real(0, optional=True), "steps": integer(0),
                  "learning_rate": real(0, lo_open=True), "weight_decay": real(0),
                  "temperature": real(0, lo_open=True), "preserve": choice("kl", "mse"), "merge_scale": real(),
                  "task_loop": choice("vmap", "map"), "num_aux": integer(1), "batch_size": integer(1)})
def ri_config(mode: str = _RI.mode, beta: float | None = _RI.beta, steps: int = _RI.steps,
              learning_rate: float = _RI.learning_rate, weight_decay: float = _RI.weight_decay,
              temperature: float = _RI.temperature, preserve: str = _RI.preserve, merge_scale: float = _RI.merge_scale,
              task_loop: str = _RI.task_loop, num_aux: int = _RI.num_aux, batch_size: int = _RI.batch_size) -> RIConfig:
  """Resolving Interference's registry entry: validated hyperparameters (see :func:`jaxmerge.ri.disentangle`).

  Args:
    mode: ``"independent"`` or ``"joint"``.
    beta: weight of the preserve term (``None``: :func:`jaxmerge.ri.auto_beta`, the heads' mean squared row
      norm); independent mode only.
    steps: optimizer steps.
    learning_rate: the default AdamW's learning rate.
    weight_decay: the default AdamW's decoupled weight decay on ``tau'``.
    temperature: softmax temperature of the KL preserve term.
    preserve: ``"kl"`` or ``"mse"``.
    merge_scale: task arithmetic's lambda for joint mode's default merge.
    task_loop: ``"vmap"`` or ``"map"`` (independent mode's loop over experts).
    num_aux: unlabeled auxiliary images.
    batch_size: auxiliary images per step.

  Returns:
    The :class:`RIConfig`.

  Raises:
    ValueError: an unknown ``mode``, ``preserve`` or ``task_loop``, a negative ``beta`` (or any ``beta`` in
      joint mode), a non-positive ``temperature``, a negative ``steps`` or a non-positive ``num_aux`` or
      ``batch_size``.

  References:
    Ramesh et al., "Resolving Interference: Disentangling Models for Improved Model Merging", 2026.
    https://arxiv.org/abs/2603.13467
  """
  check_ri(mode, preserve, task_loop, beta, temperature)
  check_ri_beta(mode, beta)
  if int(steps) != steps or steps < 0:
    raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
  _positive_int("num_aux", num_aux)
  _positive_int("batch_size", batch_size)
  return RIConfig(mode, beta, int(steps), learning_rate, weight_decay, temperature, preserve, merge_scale, task_loop,
                  int(num_aux), int(batch_size))
