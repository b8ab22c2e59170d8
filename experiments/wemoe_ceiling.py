"""WEMoE's ceiling on the offline suite: the accuracy its parameterization reaches with a perfect router.

    python experiments/wemoe_ceiling.py [--smoke]

WEMoE (:func:`jaxmerge.moe.wemoe`) keeps every non-MLP leaf at task arithmetic (lambda 0.3) and mixes the MLP
task vectors with router weights ``w(x)``. The best a router can do on a single-task batch of task ``t`` is to
pick that task's expert; this script evaluates exactly that model (MLP leaves ``theta_0 + tau_t``, the rest task
arithmetic) on each task, next to the router's starting point (``w = lambda`` for every task: task arithmetic)
and to the experts. It trains nothing; it tells whether a gap between ``jaxmerge bench --moe``'s WEMoE row and
the experts comes from the router training or from the parameterization itself.
"""

from __future__ import annotations

import argparse
import re

import jax
import numpy as np

import jaxmerge as jm
from jaxmerge.bench.suite import OfflineConfig, build_offline_suite

MLP = re.compile(r"(^|/)mlp/fc[12]/")


def ceiling_model(pretrained, experts, task: int, *, init_lambda: float = 0.3, mlp_weight: float = 1.0):
  """The WEMoE model whose routers output ``mlp_weight`` for ``task`` and 0 for the other tasks.

  Args:
    pretrained: the pretrained vision tower.
    experts: the ``T`` fine-tuned towers.
    task: index of the task whose MLP task vectors are used.
    init_lambda: the task-arithmetic scale of the non-MLP leaves (WEMoE's ``init_lambda``).
    mlp_weight: the router weight of ``task`` on every MLP leaf.

  Returns:
    The parameter tree: task arithmetic on non-MLP leaves, ``theta_0 + mlp_weight * tau_task`` on MLP leaves.

  References:
    Tang et al., "Merging Multi-Task Models via Weight-Ensembling Mixture of Experts", ICML 2024.
    https://arxiv.org/abs/2402.00433
  """
  ta = jm.merge(jm.get_method("task_arithmetic")(scale=init_lambda), pretrained, list(experts))
  paths = jax.tree_util.tree_flatten_with_path(pretrained)[0]
  names = ["/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in p) for p, _ in paths]
  leaves = []
  for name, m, p, e in zip(names, jax.tree.leaves(ta), jax.tree.leaves(pretrained), jax.tree.leaves(experts[task])):
    leaves.append(p + mlp_weight * (e - p) if MLP.search(name) else m)
  return jax.tree.unflatten(jax.tree.structure(pretrained), leaves)


def main() -> None:
  """Prints a markdown table: per task and on average, TA(0.3), the WEMoE ceiling and the expert."""
  ap = argparse.ArgumentParser()
  ap.add_argument("--smoke", action="store_true")
  args = ap.parse_args()
  suite = build_offline_suite(OfflineConfig.smoke() if args.smoke else None, progress=False)
  tasks = list(suite.tasks)
  ta = suite.evaluate(jm.merge(jm.get_method("task_arithmetic")(scale=0.3), suite.pretrained, suite.experts))
  ceil = {t: suite.evaluate(ceiling_model(suite.pretrained, suite.experts, i), [t])[t] for i, t in enumerate(tasks)}
  exp = {t: suite.evaluate(e, [t])[t] for t, e in zip(tasks, suite.experts)}
  print("| model | " + " | ".join(tasks) + " | avg |")
  print("|---|" + "---|" * (len(tasks) + 1))
  for name, acc in (("task arithmetic 0.3 (WEMoE at init)", ta), ("WEMoE ceiling (oracle router)", ceil),
                    ("experts", exp)):
    print(f"| {name} | " + " | ".join(f"{100 * acc[t]:.1f}" for t in tasks) +
          f" | {100 * np.mean([acc[t] for t in tasks]):.1f} |")


if __name__ == "__main__":
  main()
