"""Where the offline suite's spread over seeds comes from: each data-free method's average per seed, its range,
and its paired difference to task arithmetic on the same experts; with ``--wudi-steps``, WUDI at several Adam
step counts (the registry default is the reference's 300).

::

    python experiments/seed_spread.py --methods task_arithmetic,wudi,nan,della --wudi-steps 300,1000

Reads (or builds) the default suite's experts for each seed from the cache, like ``jaxmerge bench``.
"""

from __future__ import annotations

import argparse

import jax
import numpy as np

import jaxmerge as jm
from jaxmerge.bench.command import build_suite
from jaxmerge.bench.suite import DEFAULT_SEEDS


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--methods", default="task_arithmetic,wudi,nan,della")
  p.add_argument("--seeds", default=",".join(str(s) for s in DEFAULT_SEEDS))
  p.add_argument("--wudi-steps", default="", help="comma-separated WUDI step counts to add as rows")
  p.add_argument("--cache", default=None)
  args = p.parse_args(argv)
  seeds = [int(s) for s in args.seeds.split(",")]
  rows = [(m, m, {}) for m in args.methods.split(",") if m]
  rows += [(f"wudi (steps={n})", "wudi", {"steps": int(n)}) for n in args.wudi_steps.split(",") if n]
  avg = {name: [] for name, _, _ in rows}
  for seed in seeds:
    suite = build_suite("offline", cache_dir=args.cache, seed=seed, progress=False)
    for name, method, hp in rows:
      merged = jm.merge(jm.get_method(method)(**hp), suite.pretrained, suite.experts, key=jax.random.key(seed),
                        layout=suite.layout)
      avg[name].append(100 * float(np.mean(list(suite.evaluate(merged).values()))))
  ta = avg.get("task_arithmetic")
  print("| method | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std | range |"
        + (" paired difference to TA, range |" if ta else ""))
  print("|---" * (len(seeds) + 3 + bool(ta)) + "|")
  for name, v in avg.items():
    v = np.asarray(v)
    line = (f"| {name} | " + " | ".join(f"{x:.1f}" for x in v) + f" | {v.mean():.1f} ± {v.std(ddof=1):.1f} | "
            f"{v.max() - v.min():.1f} |")
    if ta:
      d = v - np.asarray(ta)
      line += f" {np.ptp(d):.1f} |"
    print(line)


if __name__ == "__main__":
  main()
