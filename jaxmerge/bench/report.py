"""Benchmark reports: ``results.json`` (the schema below), ``results.csv``, ``results.md`` and PNG plots.

``results.json``::

    {"suite": str, "tasks": [str, ...], "seed": int, "command": str,
     "rows": [{"method": str, "accuracy": {task: float in [0, 1]}, "average": float,
               "normalized": {task: float}, "normalized_average": float, "seconds": float,
               "compile_seconds": float | null, "kind": "baseline" | "merge" | "model-level", "data": str,
               "per_task_model": bool, "hparams": {...},
               # with --moe, every row:
               "extra_params": int | null, "extra_params_ratio": float | null, "relative_latency": float | null,
               "latency_measured": bool}, ...],
     "cross_eval": {"experts": [task, ...], "tasks": [task, ...], "accuracy": [[float, ...], ...]},
     "skipped": [{"method": str, "reason": str}, ...], "timings": {step: seconds}, "reference": {...}, ...}

Rows start with ``pretrained`` and ``experts`` (each expert on its own task). ``normalized`` is accuracy
divided by the expert's accuracy on the same task. ``seconds`` is the merge's wall time once compiled
(zero for the baselines) and ``compile_seconds`` what its first call spent on tracing and compilation. ``cross_eval.accuracy[i][j]`` is expert ``i`` on task ``j``.

Model-level rows (``jaxmerge bench --moe``, :mod:`jaxmerge.bench.moe_runner`) have ``kind == "model-level"`` and
``seconds`` = build time (router training included). ``extra_params`` counts the numbers stored beyond one plain
vision tower (``extra_params_ratio``: in towers) and ``relative_latency`` is a batch's warm forward time over
the plain tower's; both are measured for model-level rows and stated for the others (0 and 1.0 for plain
weights, ``T - 1`` towers for the experts, ``null`` where not known).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["CONCLUSIONS", "FUSIONBENCH_VIT_B32", "STABILITY_LIMIT", "TIMING_KEYS", "check_conclusions", "check_stability",
           "compare_with_reference",
           "jsonable", "write_reports"]

# FusionBench's published CLIP ViT-B/32 8-task averages (%), for rank comparison: every method of its table
# that jaxmerge implements under the same name and defaults (layer-wise AdaMerging is ``adamerging``).
FUSIONBENCH_VIT_B32 = {
  "pretrained": 48.2,
  "experts": 90.3,
  "simple_average": 66.5,
  "fisher": 70.6,
  "regmean": 82.4,
  "task_arithmetic": 68.0,
  "ties": 72.2,
  "adamerging": 82.6,
  "wudi": 84.5,
  "iso_c": 82.8,
  "iso_cts": 82.7,
  "tsv_m": 83.1,
  "wemoe": 89.2,  # model-level (jaxmerge bench --moe); the issue's figure for WEMoE on ViT-B/32
}

# The survey's conclusions from its ViT-B/32 8-task table, as pairwise claims ``(claim, better, worse)``:
# test-time adaptation beats validation-free weighting, task arithmetic beats averaging, sparsification beats
# task arithmetic, the subspace methods score highest among single merged models, WUDI beats task arithmetic.
CONCLUSIONS = (
  ("layer-wise AdaMerging > task arithmetic", "adamerging", "task_arithmetic"),
  ("task arithmetic > simple averaging", "task_arithmetic", "simple_average"),
  ("TIES > task arithmetic", "ties", "task_arithmetic"),
  ("TSV-M > TIES", "tsv_m", "ties"),
  ("Iso-C > TIES", "iso_c", "ties"),
  ("Iso-CTS > TIES", "iso_cts", "ties"),
  ("CART > TIES", "cart", "ties"),
  ("WUDI > task arithmetic", "wudi", "task_arithmetic"),
)
# Per-task methods (one model per task) count as "close to the experts" at this normalized accuracy or more.
PER_TASK_CLOSE = 0.9

# The largest range (max - min over seeds, [0, 1] units) a data-free method's average may have: the benchmark's
# stability target (a ranking read off the mean would otherwise depend on the seed).
STABILITY_LIMIT = 0.02

# Row keys that hold wall times: excluded when comparing two runs for determinism.
TIMING_KEYS = ("seconds", "compile_seconds", "eval_seconds", "adapt_seconds")


def _kendall_tau(a: Sequence[float], b: Sequence[float]) -> float:
  n = len(a)
  s = 0
  pairs = 0
  for i in range(n):
    for j in range(i + 1, n):
      s += np.sign(a[i] - a[j]) * np.sign(b[i] - b[j])
      pairs += 1
  return float(s / pairs) if pairs else float("nan")


def compare_with_reference(rows: Sequence[dict], reference: dict[str, float] = FUSIONBENCH_VIT_B32) -> dict:
  """Ranks the methods present both here and in ``reference`` by average accuracy.

  Args:
    rows: result rows (``{"method": name, "average": accuracy in [0, 1], ...}``).
    reference: average accuracy in percent per method name (default: FusionBench's CLIP ViT-B/32 8-task
      table).

  Returns:
    ``{"methods": [...], "ours": [...], "reference": [...], "ours_rank": [...], "reference_rank": [...],
    "kendall_tau": float}`` (ranks: 1 = best).
  """
  ours = {r["method"]: r["average"] for r in rows}
  common = [m for m in reference if m in ours]
  a = [100 * ours[m] for m in common]
  b = [reference[m] for m in common]
  rank = lambda v: [1 + sorted(v, reverse=True).index(x) for x in v]
  return {"methods": common, "ours": a, "reference": b, "ours_rank": rank(a), "reference_rank": rank(b),
          "kendall_tau": _kendall_tau(a, b)}


def check_conclusions(rows: Sequence[dict]) -> list[dict]:
  """Checks the survey's conclusions (:data:`CONCLUSIONS`) on result rows.

  Args:
    rows: result rows (``method``, ``average`` and, for several seeds, ``average_std``).

  Returns:
    One dict per claim whose two methods were run: ``{"claim", "better", "worse", "margin" (difference of the
    averages, in [0, 1] units), "std" (the larger of the two rows' std over seeds, 0 for one seed), "holds"
    (margin > 0)}``, then one per per-task method: ``{"claim": "<method> close to the experts", "normalized",
    "holds" (normalized >= PER_TASK_CLOSE)}``.
  """
  by = {r["method"]: r for r in rows}
  out = []
  for claim, better, worse in CONCLUSIONS:
    if better in by and worse in by:
      margin = by[better]["average"] - by[worse]["average"]
      std = max(by[better].get("average_std", 0.0), by[worse].get("average_std", 0.0))
      out.append({"claim": claim, "better": better, "worse": worse, "margin": margin, "std": std,
                  "holds": bool(margin > 0)})
  for r in rows:
    if r.get("per_task_model") and r["method"] != "experts" and r.get("kind") == "merge":
      out.append({"claim": f"{r['method']} (one model per task) close to the experts",
                  "normalized": r["normalized_average"], "holds": bool(r["normalized_average"] >= PER_TASK_CLOSE)})
  return out


def check_stability(rows: Sequence[dict], limit: float = STABILITY_LIMIT) -> list[dict]:
  """How far each row's average moves over the seeds.

  Args:
    rows: aggregated result rows with ``average_per_seed`` (rows run on one seed are left out).
    limit: the largest range a data-free row (``data == "none"``) may have, in [0, 1] units.

  Returns:
    One dict per row, largest range first: ``{"method", "data", "per_seed", "range" (max - min), "holds"
    (``range <= limit``; ``None`` for rows that need data, which the target does not cover)}``.
  """
  out = []
  for r in rows:
    v = r.get("average_per_seed") or ()
    if len(v) < 2:
      continue
    spread = float(max(v) - min(v))
    data_free = r.get("data") == "none"
    out.append({"method": r["method"], "data": r.get("data"), "per_seed": list(v), "range": spread,
                "holds": bool(spread <= limit + 1e-12) if data_free else None})
  return sorted(out, key=lambda c: -c["range"])


def _pct(x: float) -> str:
  return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def _has_storage(results: dict) -> bool:
  return any("extra_params" in r for r in results["rows"])


def _storage_cells(r: dict) -> list[str]:
  if r.get("extra_params") is None:
    return ["—", "—", "—" if r.get("relative_latency") is None else f"{r['relative_latency']:.2f}"]
  lat = f"{r['relative_latency']:.2f}" + ("" if r.get("latency_measured") else "*")
  return [f"{r['extra_params']:,}", f"{r['extra_params_ratio']:.2f}", lat]


def _markdown(results: dict) -> str:
  tasks = results["tasks"]
  storage = _has_storage(results)
  out = [f"# jaxmerge bench: {results['suite']}", ""]
  if results.get("command"):
    out += [f"Command: `{results['command']}`", ""]
  seeds = results.get("seeds") or ()
  if len(seeds) > 1:
    out += [f"Mean over {len(seeds)} suites (seeds {', '.join(map(str, seeds))}: each its own data and experts, "
            "the same shipped backbone); *avg* ± the sample standard deviation of the average over seeds.", ""]
  out += ["Accuracy (%) on each task's test split; *norm.* = merged / expert accuracy, averaged over tasks; "
          "*merge s* = merge wall time once compiled (*+compile s*: extra time of the first call).", ""]
  if storage:
    out += ["*extra params* = numbers stored beyond one plain vision tower (*/tower*: in towers; masks count 1/32 "
            "per entry); *rel. latency* = warm forward time of a 100-image batch over the plain tower's, measured in "
            "the same process for model-level rows (* = by construction: the plain network with other weights). "
            "For model-level rows (‡) *merge s* is the build time, router training included.", ""]
  head = ["method", *tasks, "avg", "norm.", "merge s", "+compile s"] + (
      ["extra params", "/tower", "rel. latency"] if storage else [])
  out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in results["rows"]:
    name = r["method"] + (" †" if r.get("per_task_model") else "") + (" ‡" if r["kind"] == "model-level" else "")
    avg = f"**{_pct(r['average'])}**" + (f" ± {100 * r['average_std']:.1f}" if len(results.get("seeds") or ()) > 1
                                         else "")
    cells = [name, *[_pct(r["accuracy"][t]) for t in tasks], avg,
             _pct(r["normalized_average"]), f"{r['seconds']:.2f}" if r["kind"] in ("merge", "model-level") else "",
             f"{r['compile_seconds']:.1f}" if r.get("compile_seconds") is not None else ""]
    if storage:
      cells += _storage_cells(r)
    out.append("| " + " | ".join(cells) + " |")
  if any(r.get("per_task_model") for r in results["rows"]):
    out += ["", "† one model per task (needs the task id at inference)."]
  if any(r["kind"] == "model-level" for r in results["rows"]):
    out += ["", "‡ model-level merge (`jaxmerge bench --moe`): a routed or task-indexed model, not one set of "
            "weights."]
  n_cached = sum(1 for r in results["rows"] if r.get("cached"))
  if n_cached:
    out += ["", f"{n_cached} rows were read from the cache (the same code, package versions, suite and seed "
            "computed them before; `--recompute` merges and evaluates again)."]
  if results.get("skipped"):
    out += ["", "Skipped: " + "; ".join(f"`{s['method']}` ({s['reason']})" for s in results["skipped"])]
  out += _cti_section(results)
  ce = results.get("cross_eval")
  if ce:
    out += ["", "## Experts' cross-evaluation (row: expert, column: task, accuracy %)", ""]
    out += ["| expert \\ task | " + " | ".join(ce["tasks"]) + " |", "|" + "---|" * (len(ce["tasks"]) + 1)]
    for e, row in zip(ce["experts"], ce["accuracy"]):
      out.append(f"| {e} | " + " | ".join(_pct(x) for x in row) + " |")
  ref = results.get("reference")
  if ref and ref.get("methods"):
    out += ["", "## Ranking against FusionBench's CLIP ViT-B/32 8-task table", "",
            "| method | here (avg %) | rank | FusionBench (avg %) | rank |", "|---|---|---|---|---|"]
    for m, a, ra, b, rb in zip(ref["methods"], ref["ours"], ref["ours_rank"], ref["reference"],
                               ref["reference_rank"]):
      out.append(f"| {m} | {a:.1f} | {ra} | {b:.1f} | {rb} |")
    out += ["", f"Kendall's tau between the two rankings ({len(ref['methods'])} methods): {ref['kendall_tau']:.2f}."]
  concl = results.get("conclusions")
  if concl:
    out += ["", "## The survey's conclusions on this run", "", "| claim | measured | holds |", "|---|---|---|"]
    for c in concl:
      if "margin" in c:
        spread = f" (std over seeds up to {100 * c['std']:.1f})" if c.get("std") else ""
        measured = f"{100 * c['margin']:+.1f} points{spread}"
      else:
        measured = f"{100 * c['normalized']:.1f}% of the experts' accuracy"
      out.append(f"| {c['claim']} | {measured} | {'yes' if c['holds'] else '**no**'} |")
  stab = results.get("stability")
  if stab:
    free = [c for c in stab if c["holds"] is not None]
    worst = free[0] if free else None
    out += ["", "## Stability across seeds", ""]
    if worst:
      bad = [c["method"] for c in free if not c["holds"]]
      out += [f"Largest range (max - min over the seeds) of a data-free method's average: {worst['method']} "
              f"{100 * worst['range']:.1f} points (target: at most {100 * STABILITY_LIMIT:.0f}); "
              + (f"**over the target: {', '.join(bad)}**." if bad else "every data-free method within it."), ""]
    out += ["| method | data | average per seed | range |", "|---|---|---|---|"]
    for c in stab:
      flag = " **(over)**" if c["holds"] is False else ""
      out.append(f"| {c['method']} | {c['data']} | {', '.join(_pct(x) for x in c['per_seed'])} | "
                 f"{100 * c['range']:.1f}{flag} |")
  if results.get("regime"):
    from jaxmerge.bench.regime import regime_markdown

    tsv_c = next((r for r in results["rows"] if r["method"] == "tsv_c"), None)
    out += [""] + regime_markdown(results["regime"], tsv_c["normalized_average"] if tsv_c else None)
  if results.get("versions"):
    v = results["versions"]
    out += ["", "## Environment", "", "Packages: " + ", ".join(f"{k} {x}" for k, x in v.get("installed", {}).items())
            + "."]
    if v.get("differs"):
      out += ["", "**Installed versions differ from the pinned ones** (`constraints.txt`): " + "; ".join(
        f"{k} {a} (pinned {b})" for k, (a, b) in v["differs"].items()) + ". Numbers may differ from the "
        "documented table by more than its spread."]
  if results.get("timings"):
    out += ["", "Timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in results["timings"].items())]
  return "\n".join(out) + "\n"


def _num(x, fmt: str) -> str:
  return "—" if x is None or x != x else format(x, fmt)


def _cti_section(results: dict) -> list[str]:
  """Cross-task interference of the rows that carry it (``jaxmerge bench --ri``): against the original experts
  and, for ``ri+<method>`` rows, against the RI-adapted experts, each with its Spearman correlation over tasks
  to the accuracy drop against the same experts."""
  rows = [r for r in results["rows"] if "cti_vs_original_experts" in r]
  if not rows:
    return []
  out = ["", "## Cross-task interference (CTI)", "",
         "Mean over tasks of the head-space CTI `E||h_i(z_merged) - h_i(z_expert_i)||` / feature CTI "
         "`E||z_merged - z_expert_i||^2 / ||z_expert_i||^2` on unlabeled test images, measured against the "
         "**original** experts and, for RI rows, against the **RI-adapted** experts the row was merged from. "
         "*rho* = Spearman correlation over tasks of the CTI (head / feature) with the merged model's accuracy "
         "drop against the same experts.", "",
         "| method | CTI vs original experts (head / feature) | rho vs drop from original experts | "
         "CTI vs adapted experts (head / feature) | rho vs drop from adapted experts |", "|---|---|---|---|---|"]

  def cells(b):
    if b is None:
      return ["", ""]
    rho = b.get("spearman_with_accuracy_drop") or {}
    return [f"{_num(b['head_mean'], '.3g')} / {_num(b['feature_mean'], '.3g')}",
            f"{_num(rho.get('head'), '.2f')} / {_num(rho.get('feature'), '.2f')}" if rho else ""]

  for r in rows:
    out.append(f"| {r['method']} | " + " | ".join(cells(r["cti_vs_original_experts"]) +
                                                  cells(r.get("cti_vs_adapted_experts"))) + " |")
  for name, acc in (results.get("adapted_experts") or {}).items():
    tasks = results["tasks"]
    ce = results.get("cross_eval")
    orig = {t: ce["accuracy"][i][i] for i, t in enumerate(ce["tasks"])} if ce else {}
    line = f"Adapted experts (`{name}`) on their own task: {_pct(float(np.mean([acc[t] for t in tasks])))}%"
    if orig:
      line += f" (original experts {_pct(float(np.mean([orig[t] for t in tasks])))}%)"
    out += ["", line + "."]
  return out


def _csv(results: dict, path: Path) -> None:
  tasks = results["tasks"]
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["method", *tasks, "average", "average_std", "normalized_average", "seconds", "compile_seconds", "kind", "data",
                "extra_params", "extra_params_ratio", "relative_latency"])
    opt = lambda r, k, fmt: "" if r.get(k) is None else format(r[k], fmt)
    for r in results["rows"]:
      w.writerow([r["method"], *[f"{r['accuracy'][t]:.6f}" for t in tasks], f"{r['average']:.6f}",
                  f"{r.get('average_std', 0.0):.6f}",
                  f"{r['normalized_average']:.6f}", f"{r['seconds']:.4f}",
                  "" if r.get("compile_seconds") is None else f"{r['compile_seconds']:.4f}", r["kind"], r.get("data", ""),
                  opt(r, "extra_params", "d"), opt(r, "extra_params_ratio", ".4f"), opt(r, "relative_latency", ".4f")])


def _plots(results: dict, out: Path) -> list[str]:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  files = []
  rows = results["rows"]
  names = [r["method"] for r in rows]
  avgs = [100 * r["average"] for r in rows]
  fig, ax = plt.subplots(figsize=(7, 0.35 * len(rows) + 1.2))
  palette = {"baseline": "#999999", "model-level": "#d6792b"}
  colors = [palette.get(r["kind"], "#3b75af") for r in rows]
  errs = [100 * r.get("average_std", 0.0) for r in rows]
  ax.barh(range(len(rows)), avgs, color=colors, xerr=errs if any(errs) else None, ecolor="#333333", capsize=2)
  ax.set_yticks(range(len(rows)), names)
  ax.invert_yaxis()
  ax.set_xlabel("average accuracy (%)")
  ax.set_xlim(0, 140 if any(r["kind"] == "model-level" for r in rows) else 100)
  for i, (v, r) in enumerate(zip(avgs, rows)):
    label = f"{v:.1f}"
    if r["kind"] == "model-level" and r.get("extra_params_ratio") is not None:
      label += f"  (+{r['extra_params_ratio']:.2f} towers, {r['relative_latency']:.1f}x latency)"
    ax.text(v + 0.5 + 100 * r.get("average_std", 0.0), i, label, va="center", fontsize=8)
  ax.set_title(f"{results['suite']}: average accuracy over {len(results['tasks'])} tasks")
  fig.tight_layout()
  fig.savefig(out / "accuracy.png", dpi=110)
  plt.close(fig)
  files.append("accuracy.png")

  tasks = results["tasks"]
  mat = np.array([[100 * r["accuracy"][t] for t in tasks] for r in rows])
  fig, ax = plt.subplots(figsize=(1.0 * len(tasks) + 3, 0.35 * len(rows) + 1.5))
  im = ax.imshow(mat, vmin=0, vmax=100, cmap="viridis", aspect="auto")
  ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
  ax.set_yticks(range(len(rows)), names)
  for i in range(mat.shape[0]):
    for j in range(mat.shape[1]):
      ax.text(j, i, f"{mat[i, j]:.0f}", ha="center", va="center", fontsize=7,
              color="white" if mat[i, j] < 60 else "black")
  fig.colorbar(im, ax=ax, label="accuracy (%)")
  ax.set_title("per-task accuracy")
  fig.tight_layout()
  fig.savefig(out / "per_task.png", dpi=110)
  plt.close(fig)
  files.append("per_task.png")

  ce = results.get("cross_eval")
  if ce:
    m = 100 * np.asarray(ce["accuracy"])
    fig, ax = plt.subplots(figsize=(0.8 * len(ce["tasks"]) + 2.5, 0.6 * len(ce["experts"]) + 1.5))
    im = ax.imshow(m, vmin=0, vmax=100, cmap="magma")
    ax.set_xticks(range(len(ce["tasks"])), ce["tasks"], rotation=30, ha="right")
    ax.set_yticks(range(len(ce["experts"])), [f"expert: {e}" for e in ce["experts"]])
    for i in range(m.shape[0]):
      for j in range(m.shape[1]):
        ax.text(j, i, f"{m[i, j]:.0f}", ha="center", va="center", fontsize=7,
                color="white" if m[i, j] < 60 else "black")
    fig.colorbar(im, ax=ax, label="accuracy (%)")
    ax.set_title("experts' cross-evaluation")
    fig.tight_layout()
    fig.savefig(out / "cross_eval.png", dpi=110)
    plt.close(fig)
    files.append("cross_eval.png")
  return files


def jsonable(x: Any) -> Any:
  """``x`` with NumPy scalars and arrays turned into Python values (other objects: their ``repr``).

  Args:
    x: a results value.

  Returns:
    A JSON-serializable value.
  """
  if isinstance(x, dict):
    return {str(k): jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [jsonable(v) for v in x]
  if isinstance(x, (np.floating, np.integer, np.bool_)):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  if isinstance(x, (str, int, float, bool)) or x is None:
    return x
  return repr(x)


def write_reports(results: dict, out_dir: str | Path, *, plots: bool = True) -> list[Path]:
  """Writes ``results.json``, ``results.csv``, ``results.md`` and (``plots``) the PNG charts.

  Args:
    results: the runner's results dict (schema in the module docstring).
    out_dir: output directory (created).
    plots: also draw ``accuracy.png``, ``per_task.png`` and ``cross_eval.png``.

  Returns:
    The written files.
  """
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  results = dict(results)
  results["reference"] = compare_with_reference(results["rows"])
  results["conclusions"] = check_conclusions(results["rows"])
  results["stability"] = check_stability(results["rows"])
  results = jsonable(results)
  (out / "results.json").write_text(json.dumps(results, indent=1))
  _csv(results, out / "results.csv")
  (out / "results.md").write_text(_markdown(results))
  files = [out / "results.json", out / "results.csv", out / "results.md"]
  if plots:
    files += [out / f for f in _plots(results, out)]
  return files
