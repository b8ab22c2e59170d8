"""How far each method's average moves over the offline suite's seeds, for the default suite or a variant of it.

Builds (or reads from the cache) the suite of each seed with the given :class:`~jaxmerge.bench.suite.OfflineConfig`
overrides, fine-tunes the missing experts, runs the methods exactly as ``jaxmerge bench`` does
(:func:`jaxmerge.bench.runner.run_suites`: same keys, same data, so the default suite's rows equal the bench's),
and prints each row's average per seed, its mean, its range (max - min) and its mean difference to task
arithmetic. How suite version 4's learning rate was chosen (``experiments/README.md``, "Why this regime")::

    python experiments/seed_spread.py --set finetune_lr=1e-4   # version 3's experts
    python experiments/seed_spread.py --set finetune_lr=5e-5
    python experiments/seed_spread.py                          # the default suite (version 4: 3e-5)

Values of ``--set`` are JSON. Everything is cached under ``--cache`` (default ``$JAXMERGE_CACHE``).
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np

from jaxmerge.bench import runner
from jaxmerge.bench import suite as S
from jaxmerge.bench.regime import regime_stats

DEFAULT_METHODS = ("simple_average,task_arithmetic,ties,tsv_m,iso_c,iso_cts,cart,wudi,nan,della,dare,knots,pcb,star,"
                   "breadcrumbs,localize_stitch,consensus,model_stock,adamerging")


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--set", nargs="*", default=[], metavar="FIELD=JSON", help="OfflineConfig overrides")
  p.add_argument("--methods", default=DEFAULT_METHODS)
  p.add_argument("--seeds", default=",".join(str(s) for s in S.DEFAULT_SEEDS))
  p.add_argument("--cache", default=None)
  p.add_argument("--jobs", type=int, default=2)
  args = p.parse_args(argv)
  try:
    overrides = S.config_overrides(args.set)
  except ValueError as e:
    raise SystemExit(str(e)) from None
  seeds = [int(s) for s in args.seeds.split(",")]
  t0 = time.perf_counter()
  suites = [S.build_offline_suite(dataclasses.replace(S.OfflineConfig(seed=s), **overrides), args.cache,
                                  progress=False, experts=False) for s in seeds]
  S.finetune_missing(suites, jobs=args.jobs, progress=False)
  st = regime_stats(suites[0], linearity=False)
  print(f"seed {seeds[0]}: ||tau||/||theta0|| {100 * np.mean(list(st['relative_norm'].values())):.2f}%, "
        f"mean |cos| {st['mean_abs_cosine']:.3f}, effective rank / width {st['mean_effective_rank']:.3f}")
  results = runner.run_suites(suites, [m for m in args.methods.split(",") if m], seeds=seeds, progress=False,
                              jobs=args.jobs, cross_eval=[False] * len(seeds))
  avg: dict[str, list[float]] = {}
  for res in results:
    for row in res["rows"]:
      avg.setdefault(row["method"], []).append(100 * row["average"])
  ta = np.mean(avg["task_arithmetic"]) if "task_arithmetic" in avg else None
  print(f"({time.perf_counter() - t0:.0f} s)\n")
  print("| method | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | range |" + (" mean - TA |" if ta else ""))
  print("|---" * (len(seeds) + 3 + bool(ta)) + "|")
  for name, v in sorted(avg.items(), key=lambda kv: -np.mean(kv[1])):
    v = np.asarray(v)
    line = f"| {name} | " + " | ".join(f"{x:.1f}" for x in v) + f" | {v.mean():.1f} | {np.ptp(v):.1f} |"
    print(line + (f" {v.mean() - ta:+.1f} |" if ta else ""))


if __name__ == "__main__":
  main()
