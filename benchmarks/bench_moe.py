"""Model-level merges on the offline 8-task suite: accuracy, extra parameters and relative latency.

    python benchmarks/bench_moe.py [--methods wemoe,smile,...] [--smoke] [--wemoe-steps N]

Writes ``benchmarks/results/bench_moe.md`` (and ``.json``): the pretrained/experts/task-arithmetic baselines
from :func:`jaxmerge.bench.runner.run_suite` and one row per model-level method from
:func:`jaxmerge.bench.moe_runner.run_moe`. Latency is the warm forward time of a 100-image batch relative to one
plain vision tower, measured in the same process (the shared machine is loaded by other jobs: ratios, not
absolute times, are meaningful). Peak resident memory of the process is reported.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import resource
import time

from jaxmerge.bench import moe_runner, runner
from jaxmerge.bench.suite import OfflineConfig, build_offline_suite


def _report(suite, args, base, rows, skipped, total) -> list[str]:
  peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
  lines = [f"# Model-level merges on the {suite.name} suite ({len(suite.tasks)} tasks)", "",
           f"`python benchmarks/bench_moe.py{' --smoke' if args.smoke else ''}`; {total:.0f} s, peak RSS "
           f"{peak_gb:.2f} GB; shared 2-core machine loaded by other jobs (latency ratios measured in one process).",
           "", "| method | data | avg acc | normalized | extra params | extra / tower | rel. latency | notes |",
           "|---|---|---|---|---|---|---|---|"]
  for r in base["rows"]:
    lines.append(f"| {r['method']} | {r.get('data', '')} | {100 * r['average']:.1f} | "
                 f"{100 * r['normalized_average']:.1f} | 0 | 0 | 1.00 | |")
  for r in rows:
    lines.append(f"| {r['method']} | {r['data']} | {100 * r['average']:.1f} | {100 * r['normalized_average']:.1f} | "
                 f"{r['extra_params']:,} | {r['extra_params_ratio']:.2f} | {r['relative_latency']:.2f} | {r['notes']} |")
  for s in skipped:
    lines.append(f"| {s['method']} | skipped: {s['reason']} | | | | | | |")
  return lines


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--methods", default=",".join(moe_runner.MOE_METHODS))
  ap.add_argument("--smoke", action="store_true")
  ap.add_argument("--wemoe-steps", type=int, default=None)
  ap.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "bench_moe.md"))
  args = ap.parse_args()
  if args.wemoe_steps is not None:
    moe_runner.SETTINGS["wemoe"]["steps"] = args.wemoe_steps
  suite = build_offline_suite(OfflineConfig.smoke() if args.smoke else None, progress=False)
  t0 = time.perf_counter()
  base = runner.run_suite(suite, ["task_arithmetic"], progress=False)
  expert_acc = next(r for r in base["rows"] if r["method"] == "experts")["accuracy"]
  rows, skipped = [], []
  for m in [m for m in args.methods.split(",") if m]:  # one method at a time: the report grows as rows land
    r, s = moe_runner.run_moe(suite, [m], expert_acc=expert_acc)
    rows += r
    skipped += s
    lines = _report(suite, args, base, rows, skipped, time.perf_counter() - t0)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"baselines": base["rows"], "rows": rows, "skipped": skipped},
                                                   indent=1, default=str))
  print("\n".join(lines))


if __name__ == "__main__":
  main()
