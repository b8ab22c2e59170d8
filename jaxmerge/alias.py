"""The method catalogue: each method is a thin composition of steps (optax's ``alias.py`` pattern).

Defaults reproduce the reference implementations (FusionBench for CLIP ViT-B/32 unless noted); where the
survey and the reference code disagree, the reference is the default and the other reading is an option.
"""

from __future__ import annotations

from collections.abc import Sequence

from jaxmerge import reductions as R
from jaxmerge import transforms as T
from jaxmerge.base import MergeTransform
from jaxmerge.combine import chain
from jaxmerge.registry import choice, flag, integer, real, register

__all__ = [
    "breadcrumbs",
    "byom",
    "consensus",
    "dare",
    "della",
    "emr",
    "localize_stitch",
    "model_stock",
    "nan",
    "pcb",
    "simple_average",
    "slerp",
    "tall_mask",
    "task_arithmetic",
    "ties",
]

_BASES = ("task_arithmetic", "ties")

# Shared hyperparameter declarations (jaxmerge.registry): a lambda may be any finite number (negative ones negate
# the task vectors); fractions are in [0, 1].
SCALE = real()
DENSITY = real(0, 1)
DISJOINT = choice("sum", "mean", "max")
SCOPE = choice("global", "leaf")
TALL_LAMBDA = real(per_task=True)


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
  if value not in choices:
    raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


@register("simple_average", family="weighted_average", reference="https://arxiv.org/abs/2203.05482")
def simple_average() -> MergeTransform:
  """Model soup: ``theta_0 + mean_t tau_t``.

  Returns:
    A :class:`~jaxmerge.base.MergeTransform` that reduces the stacked task vectors to one update.

  References:
    Wortsman et al., "Model soups", ICML 2022. https://arxiv.org/abs/2203.05482
  """
  return R.mean_tasks()


@register("task_arithmetic", family="weighted_average", reference="https://arxiv.org/abs/2212.04089",
          params={"scale": SCALE})
def task_arithmetic(scale: float = 0.3) -> MergeTransform:
  """``theta_0 + scale * sum_t tau_t``.

  Args:
    scale: lambda (FusionBench default 0.3); a coefficient, so sweeps do not recompile.

  Returns:
    A :class:`~jaxmerge.base.MergeTransform` that reduces the stacked task vectors to one update.

  References:
    Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023. https://arxiv.org/abs/2212.04089
  """
  return chain(R.sum_tasks(), T.scale(scale))


@register("nan", family="weighted_average", reference="https://arxiv.org/abs/2505.16148",
          params={"global_scale": real(optional=True), "norm_of": choice("task_vector", "weights")})
def nan(global_scale: float | None = None, norm_of: str = "task_vector") -> MergeTransform:
  """NAN: per-leaf coefficients inversely proportional to the task vectors' norms, times ``T/2``.

  Args:
    global_scale: the global factor (default ``T / 2``).
    norm_of: ``"task_vector"`` (default) or ``"weights"`` (norm of the fine-tuned weights).

  Returns:
    A :class:`~jaxmerge.base.MergeTransform` that reduces the stacked task vectors to one update.

  References:
    "NAN: A Training-Free Solution to Coefficient Estimation in Model Merging", 2025.
    https://arxiv.org/abs/2505.16148
  """
  return T.nan_reduce(global_scale, norm_of)


@register("slerp", family="weighted_average", reference="https://dl.acm.org/doi/10.1145/325165.325242",
          params={"t": real(0, 1), "dot_threshold": real(0, 1), "epsilon": real(0)})
def slerp(t: float = 0.5, dot_threshold: float = 0.9995, epsilon: float = 1e-8) -> MergeTransform:
  """Spherical interpolation of two fine-tuned models, per leaf (FusionBench defaults).

  Args:
    t: interpolation factor, from the first (0) to the second (1) fine-tuned model.
    dot_threshold: above this absolute cosine the two leaves are treated as colinear and interpolated linearly.
    epsilon: norms below it skip normalization.

  Returns:
    A :class:`~jaxmerge.base.MergeTransform` that reduces the two stacked task vectors to one update.

  References:
    Shoemake, "Animating Rotation with Quaternion Curves", SIGGRAPH 1985.
    https://dl.acm.org/doi/10.1145/325165.325242
  """
  return T.slerp_reduce(t, dot_threshold, epsilon)


@register("model_stock", family="weighted_average", reference="https://arxiv.org/abs/2403.19522",
          params={"average": choice("angle", "cosine"), "clamp": flag()})
def model_stock(average: str = "angle", clamp: bool = False) -> MergeTransform:
  """Model Stock: per-leaf interpolation between the pretrained and the average fine-tuned model.

  Args:
    average: ``"angle"`` (mean pairwise angle, FusionBench) or ``"cosine"`` (mean pairwise cosine).
    clamp: clip the cosine to ``[0, 1]``.

  Returns:
    A :class:`~jaxmerge.base.MergeTransform` that reduces the stacked task vectors to one update.

  References:
    Jang et al., "Model Stock: All we need is just a few fine-tuned models", ECCV 2024.
    https://arxiv.org/abs/2403.19522
  """
  return T.model_stock_reduce(average, clamp)


def _ties_core(
    density: float, disjoint: str, scope: str, count: str = "reference", zero_sign: str = "majority"
) -> list[MergeTransform]:
  _check_choice("disjoint", disjoint, ("sum", "mean", "max"))
  _check_choice("scope", scope, ("global", "leaf"))
  if scope == "global":
    return [R.ties_merge(density, disjoint, count, zero_sign)]
  return [T.trim(density, scope, count), R.disjoint_merge(disjoint, scope, zero_sign)]


@register("ties", family="sparsification", reference="https://arxiv.org/abs/2306.01708",
          params={"density": DENSITY, "scale": SCALE, "disjoint": DISJOINT, "scope": SCOPE,
                  "count": choice("reference", "exact"), "zero_sign": choice("majority", "positive")})
def ties(
    density: float = 0.2,
    scale: float = 0.3,
    disjoint: str = "sum",
    scope: str = "global",
    count: str = "reference",
    zero_sign: str = "majority",
) -> MergeTransform:
  """TIES-Merging: trim, elect sign, disjoint merge, scale.

  Args:
    density: fraction of each task vector kept by magnitude.
    scale: lambda (FusionBench 0.3 with disjoint sum; the paper uses disjoint mean and lambda ~1).
    disjoint: ``"sum"`` (FusionBench), ``"mean"`` (paper) or ``"max"``.
    scope: ``"global"`` (one threshold per task over the whole model, the reference) or ``"leaf"``
      (per tensor, as mergekit).
    count: ``"reference"`` (FusionBench keeps ``int(N d) + 1`` entries and ties) or ``"exact"`` (mergekit:
      exactly ``max(1, int(N d))``).
    zero_sign: ``"majority"`` (FusionBench) or ``"positive"`` (mergekit) sign election for zero sums.

  mergekit's ``ties`` (with weights 1 and ``normalize: true``) is ``scope="leaf", count="exact",
  zero_sign="positive", disjoint="mean"`` with ``scale`` = its ``lambda``.

  Returns:
    A :class:`~jaxmerge.base.MergeTransform` that reduces the stacked task vectors to one update.

  References:
    Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023.
    https://arxiv.org/abs/2306.01708
  """
  return chain(*_ties_core(density, disjoint, scope, count, zero_sign), T.scale(scale))


def _base_reduction(base: str, density: float, disjoint: str, scope: str) -> list[MergeTransform]:
  _check_choice("base", base, _BASES)
  if base == "ties":
    return _ties_core(density, disjoint, scope)
  return [R.sum_tasks()]


@register("dare", family="sparsification", reference="https://arxiv.org/abs/2311.03099",
          params={"p": real(0, 1), "rescale": choice(True, False, "l1"), "base": choice(*_BASES),
                  "scale": SCALE, "density": DENSITY, "disjoint": DISJOINT, "scope": SCOPE})
def dare(
    p: float = 0.5,
    rescale: bool | str = True,
    base: str = "task_arithmetic",
    scale: float = 0.3,
    density: float = 0.2,
    disjoint: str = "sum",
    scope: str = "global",
) -> MergeTransform:
  """DARE: random drop with rescale, then task arithmetic or TIES (``base``). Needs a key.

  Args:
    p: drop probability.
    rescale: ``True`` divides survivors by ``1 - p``; ``"l1"`` restores each tensor's L1 norm (mergekit);
      ``False`` keeps them as they are.
    base: ``"task_arithmetic"`` or ``"ties"`` (then ``density``, ``disjoint``, ``scope`` are TIES's).
    scale: the base method's lambda.
    density, disjoint, scope: TIES's knobs (see :func:`ties`), used when ``base="ties"``.

  Returns:
    A stochastic :class:`~jaxmerge.base.MergeTransform` (``needs_key``) that reduces the stacked task vectors
    to one update.

  References:
    Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free Lunch",
    ICML 2024. https://arxiv.org/abs/2311.03099
  """
  return chain(T.drop(p, rescale), *_base_reduction(base, density, disjoint, scope), T.scale(scale))


@register("breadcrumbs", family="sparsification", reference="https://arxiv.org/abs/2312.06795",
          params={"density": DENSITY, "gamma": real(0, 1), "scale": SCALE, "granularity": choice("row", "tensor")})
def breadcrumbs(density: float = 0.85, gamma: float = 0.006, scale: float = 0.2, granularity: str = "row") -> MergeTransform:
  """Model Breadcrumbs: drop the top ``gamma`` and keep the next ``density`` fraction of each row, sum, scale.

  Args:
    density: kept fraction (after the top outliers).
    gamma: top fraction dropped as outliers.
    scale: lambda.
    granularity: ``"row"`` (rows of the ``(out, in)`` view, the reference) or ``"tensor"`` (mergekit).

  Returns:
    A :class:`~jaxmerge.base.MergeTransform` that reduces the stacked task vectors to one update.

  References:
    Davari and Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks", ECCV 2024.
    https://arxiv.org/abs/2312.06795
  """
  return chain(T.outlier_mask(density, gamma, granularity), R.sum_tasks(), T.scale(scale))


@register("della", family="sparsification", reference="https://arxiv.org/abs/2406.11617",
          params={"p": real(0, 1, hi_open=True), "window": real(0, 1), "scale": SCALE, "rescale": flag()})
def della(p: float = 0.3, window: float = 0.14, scale: float = 1.1, rescale: bool = True) -> MergeTransform:
  """DELLA: MAGPRUNE (magnitude-ranked drop with per-entry rescale), sign election, disjoint mean, scale.

  Args:
    p: mean drop probability.
    window: half-width of the drop probabilities around ``p`` (the reference's ``epsilon``).
    scale: lambda.
    rescale: rescale survivors by their keep probability.

  Returns:
    A stochastic :class:`~jaxmerge.base.MergeTransform` (``needs_key``) that reduces the stacked task vectors
    to one update.

  References:
    Deep et al., "DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based Sampling", 2024.
    https://arxiv.org/abs/2406.11617
  """
  return chain(T.magprune(p, window, rescale), R.disjoint_merge("mean", "leaf"), T.scale(scale))


@register("pcb", family="sparsification", reference="https://arxiv.org/abs/2410.02396",
          params={"ratio": real(0, 1, lo_open=True), "scale": real(per_task=True),
                  "clamp_ratio": real(0, 0.5, hi_open=True), "inter": choice("signed_minmax", "raw")})
def pcb(
    ratio: float = 0.05, scale: float | Sequence[float] = 1.2, clamp_ratio: float = 0.01, inter: str = "signed_minmax"
) -> MergeTransform:
  """PCB-Merging (reference vision code): competition-balanced scores, keep the top ``ratio``, weighted merge.

  Args:
    ratio: fraction of entries that keep a nonzero score per task.
    scale: lambda_t, one value or one per task (1.2 in the reference ViT-B/32 script).
    clamp_ratio: magnitudes are clamped to their ``[clamp_ratio, 1 - clamp_ratio]`` order statistics.
    inter: ``"signed_minmax"`` (vision code) or ``"raw"`` (generic helper) inter-balancing.

  Returns:
    A :class:`~jaxmerge.base.MergeTransform` that reduces the stacked task vectors to one update.

  References:
    Du et al., "Parameter Competition Balancing for Model Merging", NeurIPS 2024.
    https://arxiv.org/abs/2410.02396
  """
  return T.pcb_reduce(ratio, scale, clamp_ratio, inter)


@register(
    "tall_mask",
    family="sparsification",
    storage="T bit-masks + the multi-task vector",
    per_task=True,
    reference="https://arxiv.org/abs/2405.07813",
    params={"tall_lambda": TALL_LAMBDA, "strict": flag()},
)
def tall_mask(tall_lambda: float | Sequence[float] = 0.6, strict: bool = True) -> MergeTransform:
  """TALL masks: each task's model is ``theta_0 + m_t * sum_s tau_s`` (needs the task id).

  Args:
    tall_lambda: lambda_t (FusionBench 0.6).
    strict: ``>`` (reference) or ``>=`` (survey) in the mask.

  Returns:
    A per-task :class:`~jaxmerge.base.MergeTransform` (one model per task; use
    :func:`jaxmerge.merge_per_task`).

  References:
    Wang et al., "Localizing Task Information for Improved Model Merging and Compression", ICML 2024.
    https://arxiv.org/abs/2405.07813
  """
  return T.tall_masks(tall_lambda, strict)


@register("consensus", family="sparsification", reference="https://arxiv.org/abs/2405.07813",
          params={"k": integer(0), "tall_lambda": TALL_LAMBDA, "base": choice(*_BASES), "scale": SCALE,
                  "density": DENSITY, "disjoint": DISJOINT, "scope": SCOPE, "strict": flag()})
def consensus(
    k: int = 2,
    tall_lambda: float | Sequence[float] = 0.6,
    base: str = "task_arithmetic",
    scale: float = 0.3,
    density: float = 0.2,
    disjoint: str = "sum",
    scope: str = "global",
    strict: bool = True,
) -> MergeTransform:
  """Consensus merging: drop the entries fewer than ``k`` tasks' TALL masks claim, then TA or TIES.

  Args:
    k: minimum number of tasks that must claim an entry.
    tall_lambda: lambda_t of the TALL masks.
    base: ``"task_arithmetic"`` or ``"ties"`` (with ``density``, ``disjoint``, ``scope``).
    scale: the base method's lambda.
    density, disjoint, scope: TIES's knobs (see :func:`ties`), used when ``base="ties"``.
    strict: ``>`` (reference) or ``>=`` (survey) in the TALL masks.

  Returns:
    A :class:`~jaxmerge.base.MergeTransform` that reduces the stacked task vectors to one update.

  References:
    Wang et al., "Localizing Task Information for Improved Model Merging and Compression", ICML 2024.
    https://arxiv.org/abs/2405.07813
  """
  return chain(T.consensus_mask(k, tall_lambda, strict), *_base_reduction(base, density, disjoint, scope), T.scale(scale))


@register(
    "emr",
    family="sparsification",
    storage="unified task vector + T bit-masks + T scalars",
    per_task=True,
    reference="https://arxiv.org/abs/2405.17461",
    params={"rescaler": choice("reference", "global")},
)
def emr(rescaler: str = "reference") -> MergeTransform:
  """EMR-Merging: each task's model is ``theta_0 + lambda_t (M_t * tau_uni)`` (needs the task id).

  Args:
    rescaler: ``"reference"`` (sum of per-leaf mean magnitudes) or ``"global"`` (the survey's global sums).

  Returns:
    A per-task :class:`~jaxmerge.base.MergeTransform` (one model per task; use
    :func:`jaxmerge.merge_per_task`).

  References:
    Huang et al., "EMR-Merging: Tuning-Free High-Performance Model Merging", NeurIPS 2024.
    https://arxiv.org/abs/2405.17461
  """
  return T.emr_modulate(rescaler)


@register("localize_stitch", family="sparsification", reference="https://arxiv.org/abs/2408.13656",
          params={"density": DENSITY})
def localize_stitch(density: float = 0.1) -> MergeTransform:
  """Localize-and-Stitch, data-free: top-``density`` masks per task, stitched with overlap averaging.

  Args:
    density: fraction of each task vector's entries kept (by magnitude, over the whole model) in its mask.

  Returns:
    A :class:`~jaxmerge.base.MergeTransform` that reduces the stacked task vectors to one update.

  References:
    He et al., "Localize-and-Stitch: Efficient Model Merging via Sparse Task Arithmetic", 2024.
    https://arxiv.org/abs/2408.13656
  """
  return T.stitch(density)


@register(
    "byom",
    family="sparsification",
    storage="T sparse residuals (density of a model each)",
    per_task=True,
    reference="https://arxiv.org/abs/2310.01886",
    params={"density": DENSITY, "scale": SCALE},
)
def byom(density: float = 0.1, scale: float = 0.3) -> MergeTransform:
  """BYOM-FFT: shared task-arithmetic model plus each task's top-``density`` residual (needs the task id).

  Args:
    density: fraction of each task's residual ``tau_t - shared`` kept by magnitude (over the whole model).
    scale: factor of the shared task-vector sum ``scale * sum_t tau_t``.

  Returns:
    A per-task :class:`~jaxmerge.base.MergeTransform` (one model per task; use
    :func:`jaxmerge.merge_per_task`).

  References:
    Jiang et al., "BYOM: Building Your Own Multi-Task Model For Free", 2023. https://arxiv.org/abs/2310.01886
  """
  return T.byom_residuals(density, scale)
