"""Before/after comparison of two checkouts on the same machine: ``bench_core.py`` and ``bench_subspace.py`` run
from each tree in turn (interleaved over ``--rounds`` rounds, so that both see the same machine load), then one
table of medians.

    python benchmarks/compare.py --before ../jaxmerge-main --after . --rounds 3
    python benchmarks/compare.py --before ../old --after . --suites core --out /tmp/cmp

Each run is the tree's own benchmark script with the tree first on ``PYTHONPATH`` (``--tasks 4 --fb-tasks 4``;
core with ``--engines jit``, subspace with ``--blocks 2``), its markdown table kept under ``--out``. The summary
gives, per method and tree, the medians over rounds of fusion-bench's time, jaxmerge's first-call and warm times,
and the speed-ups (fusion-bench's time over jaxmerge's, in the same run), plus each round's warm speed-up so the
spread shows. jaxmerge's own times are the steadier comparison: fusion-bench's time varies between runs too.
For ``bench_stream.py`` use its own ``--baseline DIR`` (interleaved in one run).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import subprocess
import sys
import time

SUITES = {
    "core": ["benchmarks/bench_core.py", "--tasks", "4", "--fb-tasks", "4", "--engines", "jit"],
    "subspace": ["benchmarks/bench_subspace.py", "--tasks", "4", "--fb-tasks", "4", "--blocks", "2", "--timeout",
                 "900"],
}


def parse(path: pathlib.Path, suite: str) -> dict[str, tuple[float, float, float]]:
  """``{method: (fusion-bench s, jaxmerge first s, jaxmerge warm s)}`` at 4 tasks from a results table."""
  fb, jm = {}, {}
  for line in path.read_text().splitlines():
    c = [x.strip() for x in line.strip().strip("|").split("|")]
    if suite == "core" and len(c) >= 9 and c[2] == "4" and c[1] in ("jaxmerge", "fusion-bench"):
      if c[1] == "fusion-bench":
        fb[c[0]] = float(c[3])
      elif c[4]:
        jm[c[0]] = (float(c[3]), float(c[4]))
    elif suite == "subspace" and len(c) >= 10 and c[1] == "4":
      wall = lambda s: float(s.split("/")[0])  # noqa: E731
      fb[c[0]], jm[c[0]] = wall(c[2]), (wall(c[3]), wall(c[4]))
  return {m: (fb[m], *jm[m]) for m in jm if m in fb}


def summary(runs: dict[tuple[str, str], list[dict]]) -> str:
  lines = []
  for suite in dict.fromkeys(s for s, _ in runs):
    lines += [f"\n### {suite}: medians over rounds (wall seconds, 4 tasks)\n",
              "| method | tree | fusion-bench | jaxmerge first | jaxmerge warm | speed-up first | speed-up warm | "
              "warm speed-up per round |", "|---|---|---|---|---|---|---|---|"]
    for tree in ("before", "after"):
      rounds = runs.get((suite, tree), [])
      for m in sorted({m for r in rounds for m in r}):
        v = [r[m] for r in rounds if m in r]
        med = [statistics.median(x[i] for x in v) for i in range(3)]
        first = statistics.median(x[0] / x[1] for x in v)
        warm = statistics.median(x[0] / x[2] for x in v)
        per = ", ".join(f"{x[0] / x[2]:.2f}" for x in v)
        lines.append(f"| {m} | {tree} | {med[0]:.2f} | {med[1]:.2f} | {med[2]:.2f} | {first:.2f}x | {warm:.2f}x | "
                     f"{per} |")
  return "\n".join(lines)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--before", required=True, help="the checkout before the change")
  ap.add_argument("--after", default=str(pathlib.Path(__file__).resolve().parents[1]), help="default: this tree")
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--suites", default="core,subspace")
  ap.add_argument("--out", default="benchmarks/results/compare", help="directory for each run's table")
  args = ap.parse_args()
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  trees = {"before": pathlib.Path(args.before).resolve(), "after": pathlib.Path(args.after).resolve()}
  runs: dict[tuple[str, str], list[dict]] = {}
  for r in range(1, args.rounds + 1):
    for suite in args.suites.split(","):
      for tree, root in trees.items():
        table = out / f"{suite}_{tree}_{r}.md"
        load = os.getloadavg()[0]
        print(f"round {r} {suite} {tree} ({root}), load {load:.2f}", flush=True)
        start = time.perf_counter()
        env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        cmd = [sys.executable, *SUITES[suite], "--out", str(table)]
        with open(table.with_suffix(".log"), "w") as log:
          subprocess.run(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
        print(f"  {time.perf_counter() - start:.0f} s", flush=True)
        runs.setdefault((suite, tree), []).append(parse(table, suite))
  text = (f"`python benchmarks/compare.py --before {args.before} --after {args.after} --rounds {args.rounds} "
          f"--suites {args.suites}`\n" + summary(runs) + "\n")
  (out / "summary.md").write_text(text)
  print(text)


if __name__ == "__main__":
  main()
