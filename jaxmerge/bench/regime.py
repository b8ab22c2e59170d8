"""The suite's *regime*: how its task vectors compare with those of CLIP ViT-B/32 fine-tuned on 8 tasks.

Merging methods are built on assumptions about task vectors ``tau_t = theta_t - theta_0``: they are small next
to the pretrained weights, nearly orthogonal to each other, their per-layer matrices are low-rank next to the
width, and the model is close to linear along each of them. :func:`regime_stats` measures these on a built
suite, and :data:`CLIP_VIT_B32` holds what papers report for the real benchmark, so a report can show both
side by side.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxmerge import tree as jtree

__all__ = ["CLIP_VIT_B32", "LINEARITY_ALPHAS", "regime_stats", "regime_markdown"]

# Scales alpha of the single-task linearity probe: accuracy of theta_0 + alpha tau_t on task t.
LINEARITY_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5)

# What papers report for CLIP task vectors on the 8-task benchmark, with the source of each number. No paper we
# found reports ||tau|| / ||theta_0|| for these checkpoints.
CLIP_VIT_B32: dict[str, dict[str, Any]] = {
  "relative_norm": {"value": "not reported", "source": ""},
  "mean_abs_cosine": {
    "value": "about 0.045 (pairs 0.02-0.19; MNIST-SVHN highest)",
    "source": "ViT-B/16, Iso-C, Marczak et al. 2025, arXiv 2502.04959, Fig. 2a; Task Arithmetic, Ilharco et al. "
              "2023, Fig. 5, shows the same picture"},
  "effective_rank": {
    "value": "low: keeping 3% of each task matrix's singular components costs 1.5 points (ViT-B/32, 20 tasks); "
             "keeping 1/T of them (12.5% at 8 tasks) retains over 99% of the accuracy",
    "source": "TSV, Gargiulo et al. 2025, arXiv 2412.00081, Fig. 2 and Table 3"},
  "low_rank_retention": {
    "value": "over 99% (92.62 vs 92.83)",
    "source": "TSV, arXiv 2412.00081, Table 3 (ViT-B/32, 8 tasks, rank 1/T)"},
  "linearity": {
    "value": "alpha=0: 48.3, alpha=1: 90.5 (8-task average; merged models use alpha 0.3 per task vector)",
    "source": "Iso-C, arXiv 2502.04959, Table 4; Task Arithmetic, arXiv 2212.04089"},
}


def _energy_rank(s: np.ndarray, energy: float) -> int:
  """The number of leading singular values holding ``energy`` of the squared spectrum."""
  e = np.cumsum(np.asarray(s, np.float64) ** 2)
  if e[-1] <= 0:
    return 0
  return int(np.searchsorted(e / e[-1], energy - 1e-12) + 1)


def _matrix_leaves(flat: dict) -> list:
  """Paths of the 2-D weight matrices (attention and MLP kernels, as in the references' ``ndim == 2`` rule,
  without embedding tables, which are not linear maps)."""
  return [p for p, x in flat.items() if np.ndim(x) == 2 and "embedding" not in p]


def regime_stats(suite, *, energy: float = 0.9, alphas: Sequence[float] = LINEARITY_ALPHAS,
                 linearity: bool = True, known: dict[float, dict[str, float]] | None = None) -> dict:
  """Task-vector statistics of a built suite.

  Args:
    suite: a built suite (``pretrained``, ``experts``, ``tasks``, ``evaluate``).
    energy: the energy fraction that defines a matrix's effective rank.
    alphas: scales of the single-task linearity probe.
    linearity: run the probe (``len(alphas) x T`` single-task evaluations).
    known: accuracies already measured, ``{alpha: {task: accuracy}}`` (alpha 0 is the pretrained model, 1 the
      expert): the probe reads them instead of evaluating again.

  Returns:
    ``{"relative_norm": {task: ||tau_t|| / ||theta_0||}, "cosine": [[...]] (T x T), "mean_abs_cosine": float,
    "effective_rank": {layer path: mean over tasks of rank90 / min(m, n)}, "mean_effective_rank": float,
    "width": int, "energy": energy, "linearity": {"alphas": [...], "accuracy": {task: [...]}}}``; norms and
    cosines over every floating-point leaf of the merged tower, in float64.
  """
  pre = jtree.flatten_paths(suite.pretrained)
  keys = [p for p, x in pre.items() if jtree.is_float(x)]
  pre64 = {p: np.asarray(pre[p], np.float64) for p in keys}
  taus = []
  for e in suite.experts:
    fe = jtree.flatten_paths(e)
    taus.append({p: np.asarray(fe[p], np.float64) - pre64[p] for p in keys})
  flat = np.stack([np.concatenate([t[p].ravel() for p in keys]) for t in taus])
  norm0 = float(np.sqrt(sum(float(np.sum(v * v)) for v in pre64.values())))
  norms = np.linalg.norm(flat, axis=1)
  cos = flat @ flat.T / np.maximum(np.outer(norms, norms), 1e-300)
  n = len(taus)
  off = cos[~np.eye(n, dtype=bool)]
  ranks: dict[str, float] = {}
  widths = []
  for p in _matrix_leaves(pre64):
    per_task = []
    for t in taus:
      s = np.linalg.svd(t[p], compute_uv=False)
      per_task.append(_energy_rank(s, energy) / min(t[p].shape))
    ranks[p] = float(np.mean(per_task))
    widths.append(min(pre64[p].shape))
  out = {
    "relative_norm": {t: float(v / norm0) for t, v in zip(suite.tasks, norms)},
    "cosine": cos.tolist(),
    "mean_abs_cosine": float(np.mean(np.abs(off))) if n > 1 else float("nan"),
    "max_abs_cosine": float(np.max(np.abs(off))) if n > 1 else float("nan"),
    "effective_rank": ranks,
    "mean_effective_rank": float(np.mean(list(ranks.values()))) if ranks else float("nan"),
    "width": int(min(widths)) if widths else 0,
    "energy": energy,
  }
  if linearity:
    acc: dict[str, list[float]] = {t: [] for t in suite.tasks}
    for i, t in enumerate(suite.tasks):
      for a in alphas:
        if known and float(a) in known and t in known[float(a)]:
          acc[t].append(float(known[float(a)][t]))
          continue
        model = jtree.unflatten_paths(suite.pretrained, {
          p: (np.asarray(pre[p]) + a * taus[i][p]).astype(np.asarray(pre[p]).dtype) if p in taus[i] else pre[p]
          for p in pre})
        acc[t].append(float(suite.evaluate(model, [t])[t]))
    out["linearity"] = {"alphas": [float(a) for a in alphas], "accuracy": acc}
  return out


def _fmt(x: float, pct: bool = False) -> str:
  if x is None or (isinstance(x, float) and np.isnan(x)):
    return "—"
  return f"{100 * x:.2f}%" if pct else f"{x:.3f}"


def regime_markdown(stats: dict | Sequence[dict], low_rank_retention: float | None = None) -> list[str]:
  """The regime section of ``results.md``: the suite's statistics (mean and spread over seeds when several
  suites are given) next to what papers report for CLIP ViT-B/32 (:data:`CLIP_VIT_B32`).

  Args:
    stats: :func:`regime_stats` of one suite, or a list of them (one per seed).
    low_rank_retention: the TSV-C row's normalized accuracy, if it was run (each expert truncated to rank
      1/T of every matrix).

  Returns:
    Markdown lines.
  """
  runs = [stats] if isinstance(stats, dict) else list(stats)
  if not runs:
    return []

  def agg(values: list[float], pct: bool = False) -> str:
    v = np.asarray(values, float)
    if len(v) == 1:
      return _fmt(float(v[0]), pct)
    return f"{_fmt(float(v.mean()), pct)} ± {_fmt(float(v.std(ddof=1)), pct)}"

  rel = [float(np.mean(list(r["relative_norm"].values()))) for r in runs]
  rel_lo = [float(np.min(list(r["relative_norm"].values()))) for r in runs]
  rel_hi = [float(np.max(list(r["relative_norm"].values()))) for r in runs]
  ref = CLIP_VIT_B32
  cite = lambda k: ref.get(k, {}).get("value", "not reported") + (
    f" ({ref[k]['source']})" if ref.get(k, {}).get("source") else "")
  out = ["## Regime: this suite's task vectors next to CLIP ViT-B/32's", "",
         "| statistic | this suite" + (f" (mean ± std over {len(runs)} seeds)" if len(runs) > 1 else "") +
         " | CLIP ViT-B/32, 8 tasks (reported) |", "|---|---|---|",
         f"| ‖τ_t‖ / ‖θ_0‖ (mean over tasks; min – max) | {agg(rel, True)} ({_fmt(min(rel_lo), True)} – "
         f"{_fmt(max(rel_hi), True)}) | {cite('relative_norm')} |",
         f"| mean \\|cos(τ_s, τ_t)\\| over task pairs | {agg([r['mean_abs_cosine'] for r in runs])} | "
         f"{cite('mean_abs_cosine')} |",
         f"| effective rank of a task matrix ({int(100 * runs[0]['energy'])}% of the energy) / its width "
         f"(mean over layers and tasks; width {runs[0]['width']}) | {agg([r['mean_effective_rank'] for r in runs])} "
         f"| {cite('effective_rank')} |"]
  if low_rank_retention is not None:
    out.append(f"| accuracy kept by each task's rank-1/T truncation (TSV-C row, normalized) | "
               f"{100 * low_rank_retention:.1f}% | {cite('low_rank_retention')} |")
  lin = [r["linearity"] for r in runs if "linearity" in r]
  if lin:
    alphas = lin[0]["alphas"]
    mean_curve = np.mean([[np.mean([acc[t][j] for t in acc]) for j in range(len(alphas))]
                          for acc in (x["accuracy"] for x in lin)], axis=0)
    curve = ", ".join(f"α={a:g}: {100 * v:.1f}" for a, v in zip(alphas, mean_curve))
    which = "" if len(lin) == len(runs) else f" (first {len(lin)} of {len(runs)} seeds)"
    out.append(f"| single-task linearity{which}: accuracy (%) of θ_0 + α τ_t on task t, mean over tasks | {curve} | "
               f"{cite('linearity')} |")
  return out
