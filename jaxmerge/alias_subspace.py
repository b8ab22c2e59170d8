"""The subspace family of the catalogue (METHODS.md section 4): TSV-C/M, Iso-C/CTS, CART, STAR, KnOTS, WUDI
and BYOM-LoRA, each a thin composition of the steps in :mod:`jaxmerge.reductions`.

Matrix leaves are the ones the merge's layout reads as ``(out, in)`` matrices (every 2-D leaf by default, the
reference implementations' rule); the others take each method's documented fallback (``fallback=``): the mean
of the task vectors (times the method's scale, where it has one), ``"task_arithmetic"`` (the sum, times the
scale) or ``"pretrained"``.
"""

from __future__ import annotations

from collections.abc import Sequence

from jaxmerge import reductions as R
from jaxmerge import transforms as T
from jaxmerge.base import MergeTransform
from jaxmerge.combine import chain
from jaxmerge.registry import choice, flag, get_method, integer, mapping, method_info, real, register

__all__ = ["byom_lora", "cart", "iso_c", "iso_cts", "knots", "star", "tsv_c", "tsv_m", "wudi"]


REDUCE_FALLBACK = choice(*R.REDUCE_FALLBACKS)
TASK_FALLBACK = choice(*R.TASK_FALLBACKS)
RANK_FRACTION = real(0, 1, lo_open=True)


def _scaled(step: MergeTransform, scale: float | Sequence[float]) -> MergeTransform:
  """A global scale after the step, or per-task scales before it (FusionBench's list form of alpha)."""
  if isinstance(scale, (int, float)):
    return chain(step, T.scale(float(scale)))
  return chain(T.scale_tasks(list(scale)), step)


@register("tsv_m", family="subspace", reference="https://arxiv.org/abs/2412.00081",
          params={"scale": real(per_task=True), "rank_fraction": real(0, 1, lo_open=True, optional=True),
                  "fallback": REDUCE_FALLBACK})
def tsv_m(
    scale: float | Sequence[float] = 1.0, rank_fraction: float | None = None, fallback: str = "mean"
) -> MergeTransform:
  """TSV-M: per-task top-``k`` singular vectors, decorrelated by orthogonal Procrustes, summed.

  Args:
    scale: alpha (FusionBench 1.0), applied to the merged update; a list gives per-task weights applied to
      the task vectors before the SVDs (FusionBench's list form), with no global scale.
    rank_fraction: per-task rank as a share of ``min(m, n)``; default ``1/T``.
    fallback: vector leaves (``"mean"``, ``"task_arithmetic"``, ``"pretrained"``).

  Returns:
    A :class:`~jaxmerge.base.MergeTransform` that reduces the stacked task vectors to one update.

  References:
    Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging", CVPR 2025.
    https://arxiv.org/abs/2412.00081
  """
  return _scaled(R.tsv_merge(rank_fraction, fallback=fallback), scale)


@register(
    "tsv_c",
    family="subspace",
    storage="per task and matrix: rank-k factors (T k (m + n + 1) floats)",
    per_task=True,
    reference="https://arxiv.org/abs/2412.00081",
    params={"rank_fraction": real(0, 1, lo_open=True, optional=True), "fallback": TASK_FALLBACK},
)
def tsv_c(rank_fraction: float | None = None, fallback: str = "task") -> MergeTransform:
  """TSV-C: each task's model keeps its matrices' top ``k = int(r / T)`` singular triplets (use
  :func:`jaxmerge.merge_per_task`; the task id selects the model at inference).

  Args:
    rank_fraction: per-task rank as a share of ``min(m, n)``; default ``1/T``.
    fallback: vector leaves: ``"task"`` (each task's own vector, as FusionBench stores them), ``"mean"`` or
      ``"pretrained"``.

  Returns:
    A per-task :class:`~jaxmerge.base.MergeTransform` (one model per task; use
    :func:`jaxmerge.merge_per_task`).

  References:
    Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging", CVPR 2025.
    https://arxiv.org/abs/2412.00081
  """
  return R.low_rank_tasks(rank_fraction, fallback=fallback)


@register(
    "byom_lora",
    family="subspace",
    storage="per task and matrix: rank-q factors",
    per_task=True,
    reference="https://arxiv.org/abs/2310.01886",
    params={"rank": integer(1), "fallback": TASK_FALLBACK},
)
def byom_lora(rank: int = 4, fallback: str = "task") -> MergeTransform:
  """BYOM-LoRA: each task's model is ``theta_0 + SVD_q(Delta_t)`` on matrix leaves (LoRA-adapted layers; use
  :func:`jaxmerge.merge_per_task`). The paper gives no fixed ``q`` for ViT-B/32 (default 4, unverified).

  Args:
    rank: the rank ``q`` kept per task and matrix (clipped to ``min(m, n)``).
    fallback: vector leaves: ``"task"`` (each task's own vector), ``"mean"`` or ``"pretrained"``.

  Returns:
    A per-task :class:`~jaxmerge.base.MergeTransform` (one model per task; use
    :func:`jaxmerge.merge_per_task`).

  References:
    Jiang et al., "BYOM: Building Your Own Multi-Task Model For Free", 2023. https://arxiv.org/abs/2310.01886
  """
  return R.low_rank_tasks(rank=rank, fallback=fallback)


@register("iso_c", family="subspace", reference="https://arxiv.org/abs/2502.04959",
          params={"scale": real(), "fallback": REDUCE_FALLBACK})
def iso_c(scale: float = 1.0, fallback: str = "mean") -> MergeTransform:
  """Iso-C: ``alpha * mean(sigma) U V^T`` of the summed task matrices (flat spectrum, same nuclear norm).

  Args:
    scale: alpha (FusionBench config 1.0; its ViT-B/32 8-task example uses 1.5).
    fallback: vector leaves (mean times alpha by default).

  Returns:
    A :class:`~jaxmerge.base.MergeTransform` that reduces the stacked task vectors to one update.

  References:
    Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and Task-Specific Subspaces",
    ICML 2025. https://arxiv.org/abs/2502.04959
  """
  return chain(R.iso_c_merge(fallback=fallback), T.scale(scale))


@register("iso_cts", family="subspace", reference="https://arxiv.org/abs/2502.04959",
          params={"scale": real(), "common_fraction": real(0, 1), "fallback": REDUCE_FALLBACK})
def iso_cts(scale: float = 1.0, common_fraction: float = 0.8, fallback: str = "mean") -> MergeTransform:
  """Iso-CTS: common subspace of the summed task matrices plus task-specific directions from the orthogonal
  complement (output side), orthogonalized, with a flat spectrum.

  Args:
    scale: alpha.
    common_fraction: share of the rank kept for the common subspace (0.8).
    fallback: vector leaves (mean times alpha by default).

  Returns:
    A :class:`~jaxmerge.base.MergeTransform` that reduces the stacked task vectors to one update.

  References:
    Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and Task-Specific Subspaces",
    ICML 2025. https://arxiv.org/abs/2502.04959
  """
  return chain(R.iso_cts_merge(common_fraction, fallback=fallback), T.scale(scale))


@register("cart", family="subspace", reference="https://arxiv.org/abs/2412.12153",
          params={"rank_fraction": RANK_FRACTION, "scale": real(), "rank": integer(0, optional=True),
                  "fallback": REDUCE_FALLBACK})
def cart(rank_fraction: float = 0.08, scale: float = 1.0, rank: int | None = None, fallback: str = "mean") -> MergeTransform:
  """CART: ``theta_avg + lambda sum_t SVD_k(theta_t - theta_avg)`` with ``k = max(1, int(rho r))``.

  Args:
    rank_fraction: rho (paper ~8%).
    scale: lambda (a coefficient; tune on validation data, AdaRank's CART config uses 2.3 with rho 0.16).
    rank: fixed rank instead of ``rank_fraction``.
    fallback: vector leaves (``"mean"``: ``theta_avg``, CART's own result).

  Returns:
    A :class:`~jaxmerge.base.MergeTransform` that reduces the stacked task vectors to one update.

  References:
    Choi et al., "Revisiting Weight Averaging for Model Merging", 2024. https://arxiv.org/abs/2412.12153
  """
  return R.cart_merge(rank_fraction, scale, rank=rank, fallback=fallback)


@register("star", family="subspace", reference="https://arxiv.org/abs/2502.10339",
          params={"eta": real(0, 100, lo_open=True), "fallback": REDUCE_FALLBACK})
def star(eta: float = 40.0, fallback: str = "mean") -> MergeTransform:
  """STAR: keep the top singular directions holding ``eta`` % of each task matrix's nuclear norm, rescale
  them to the full nuclear norm, average (no global scale).

  Args:
    eta: percentage of each task matrix's nuclear norm kept (paper 40).
    fallback: vector leaves (``"mean"`` by default).

  Returns:
    A :class:`~jaxmerge.base.MergeTransform` that reduces the stacked task vectors to one update.

  References:
    Lee et al., "STAR: Spectral Truncation and Rescale for Model Merging", NAACL 2025.
    https://arxiv.org/abs/2502.10339
  """
  return R.star_merge(eta, fallback=fallback)


@register("wudi", family="subspace", reference="https://arxiv.org/abs/2503.08099",
          params={"steps": integer(0), "learning_rate": real(0, lo_open=True), "fallback": REDUCE_FALLBACK})
def wudi(steps: int = 300, learning_rate: float = 1e-5, fallback: str = "mean") -> MergeTransform:
  """WUDI: per matrix, ``steps`` Adam steps on ``sum_t ||(tau_M - tau_t) tau_t^T||^2 / ||tau_t||^2`` from
  ``sum_t tau_t`` (FusionBench's config uses 400 steps); vector leaves get the mean; no global scale.

  Args:
    steps: Adam iterations per matrix (300).
    learning_rate: Adam step size (1e-5).
    fallback: vector leaves (``"mean"``, the reference's).

  Returns:
    A :class:`~jaxmerge.base.MergeTransform` that reduces the stacked task vectors to one update.

  References:
    Cheng et al., "Whoever Started the Interference Should End It: Guiding Data-Free Model Merging via Task
    Vectors", ICML 2025. https://arxiv.org/abs/2503.08099
  """
  return R.wudi_merge(steps, learning_rate, fallback=fallback)


_KNOTS_KNOBS = ("scale", "density", "disjoint", "p")


@register("knots", family="subspace", reference="https://arxiv.org/abs/2410.19735",
          params={"base": choice("task_arithmetic", "ties", "dare", "simple_average", "breadcrumbs", "della",
                                 "localize_stitch", "consensus", "nan", "model_stock", "pcb", "slerp"),
                  "scale": real(optional=True), "density": real(0, 1, optional=True),
                  "disjoint": choice("sum", "mean", "max", optional=True), "p": real(0, 1, optional=True),
                  "base_hparams": mapping(), "eps": real(0), "scaled": flag()})
def knots(
    base: str = "task_arithmetic",
    scale: float | None = None,
    density: float | None = None,
    disjoint: str | None = None,
    p: float | None = None,
    base_hparams: dict | None = None,
    eps: float = 1e-4,
    scaled: bool = False,
) -> MergeTransform:
  """KnOTS: joint SVD of the task updates of each matrix, then the ``base`` merger on the aligned ``V_t``.

  Args:
    base: a reducing registry method (``"task_arithmetic"``, ``"ties"``, ``"dare"``, ``"simple_average"``,
      ...). Stochastic bases need a key at merge time.
    scale, density, disjoint, p: the base's knobs of those names (``None``: the base's default).
    base_hparams: any other hyperparameters of the base.
    eps: numerical-rank threshold on the joint singular values (FusionBench's 1e-4).
    scaled: rank magnitudes on ``diag(S) V_t^T`` instead of ``V_t^T``.

  Returns:
    A :class:`~jaxmerge.base.MergeTransform` that reduces the stacked task vectors to one update.

  Raises:
    ValueError: a subspace or per-task base, or a knob the base does not have.

  References:
    Stoica et al., "Model merging with SVD to tie the KnOTS", ICLR 2025. https://arxiv.org/abs/2410.19735
  """
  info = method_info(base)
  if info.family == "subspace" or info.per_task:
    raise ValueError(f"KnOTS needs an elementwise reducing base merger, got {base!r}")
  hp = dict(base_hparams or {})
  for name, value in zip(_KNOTS_KNOBS, (scale, density, disjoint, p)):
    if value is not None:
      if name not in info.hparams:
        raise ValueError(f"base {base!r} has no hyperparameter {name!r}; valid: {sorted(info.hparams)}")
      hp[name] = value
  return R.knots_merge(get_method(base)(**hp), eps=eps, scaled=scaled)
