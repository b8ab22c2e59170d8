"""Cost of one AdaMerging step against one forward and backward pass of the plain model at the same batch.

Model: the offline suite's CLIP vision tower (width 64, 4 layers, 32x32 images, 8x8 patches) with random
weights, T = 8 tasks, 16 images per task (128 images per step). Reference: ``value_and_grad`` of the summed
entropy of one model's logits with respect to all its parameters, on the same 128 images. AdaMerging: the
compiled, donating optax step of :func:`jaxmerge.tta.fit.make_step` (merge of the 8 task vectors inside the
loss, entropy, gradients with respect to the coefficients, Adam update). Each configuration runs in its own
process (peak resident memory per run, inputs included); times are medians of warm steps.

    python benchmarks/bench_tta.py [--steps 20] [--out benchmarks/results/tta.md]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

T, B, C = 8, 16, 10


def _setup():
  import jax
  import jax.numpy as jnp

  from jaxmerge.models import clip

  cfg = clip.ClipConfig.tiny(vision_width=64, vision_layers=4, vision_heads=4, projection_dim=64).vision_only()
  cfg = cfg.replace(projection_dim=None)
  pre = clip.init_params(cfg, jax.random.key(0))
  keys = jax.random.split(jax.random.key(1), T)
  fts = [jax.tree.map(lambda x, k=k: x + 0.01 * jax.random.normal(k, x.shape), pre) for k in keys]
  heads = jax.random.normal(jax.random.key(2), (T, C, cfg.vision_width))
  images = jax.random.normal(jax.random.key(3), (T, B, cfg.image_size, cfg.image_size, 3))

  def forward(params, x):
    z = clip.vision_features(cfg, params, x)
    return z / jnp.linalg.norm(z, axis=-1, keepdims=True)

  return cfg, pre, fts, heads, images, forward


def _time(fn, steps):
  fn()  # compile
  fn()
  ts = []
  for _ in range(steps):
    t0 = time.perf_counter()
    fn()
    ts.append(time.perf_counter() - t0)
  return statistics.median(ts)


def run_one(which: str, steps: int) -> dict:
  import jax
  import jax.numpy as jnp

  from jaxmerge.tta import heads as H
  from jaxmerge.tta.adamerging import adamerging_adapter, entropy_loss
  from jaxmerge.tta.fit import make_step
  from jaxmerge.tta.losses import entropy
  from jaxmerge.tta.methods import adam

  cfg, pre, fts, heads, images, forward = _setup()
  if which == "plain":
    flat = images.reshape((T * B,) + images.shape[2:])

    @jax.jit
    def fwd_bwd(params):
      def loss(p):
        z = forward(p, flat).reshape(T, B, -1)
        return jnp.sum(jnp.mean(entropy(jnp.einsum("tbd,tcd->tbc", z, heads)), axis=1))
      return jax.value_and_grad(loss)(params)

    sec = _time(lambda: jax.block_until_ready(fwd_bwd(pre)), steps)
    trainable = sum(x.size for x in jax.tree.leaves(pre))
  else:
    granularity = which.split("-")[1]
    pre32, tau, passthrough = H.split_params(pre, fts)
    hs, mask = H.pad_heads(list(heads))
    frozen = {"pre": pre32, "deltas": tau, "passthrough": passthrough, "heads": hs, "mask": mask}
    adapter = adamerging_adapter(forward, pre, granularity=granularity, init_scale=0.3)
    tx = adam(1e-3)
    step = make_step(adapter, tx, entropy_loss)
    # fresh buffers: the step donates theta, and init may return one array for several leaves
    state = {"theta": jax.tree.map(lambda a: jnp.array(a, copy=True), adapter.init(jax.random.key(0), frozen))}
    state["opt"] = tx.init(state["theta"])
    trainable = sum(x.size for x in jax.tree.leaves(state["theta"]))

    def one():
      th, op, value, _ = step(state["theta"], state["opt"], frozen, images, jax.random.key(0))
      state["theta"], state["opt"] = th, op
      jax.block_until_ready(value)

    sec = _time(one, steps)
  return {"which": which, "seconds": sec, "trainable": int(trainable),
          "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2}


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--steps", type=int, default=20)
  ap.add_argument("--out", default="benchmarks/results/tta.md")
  ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.one:
    print(json.dumps(run_one(args.one, args.steps)))
    return 0
  rows = []
  for which in ("plain", "adamerging-layer", "adamerging-task"):
    out = subprocess.run([sys.executable, __file__, "--one", which, "--steps", str(args.steps)], check=True,
                         capture_output=True, text=True).stdout.strip().splitlines()[-1]
    rows.append(json.loads(out))
    print(rows[-1], flush=True)
  ref = rows[0]["seconds"]
  load = open("/proc/loadavg").read().split()[:3] if Path("/proc/loadavg").exists() else ["?"]
  lines = [
      "# Test-time adaptation: cost of one AdaMerging step", "",
      f"`python benchmarks/bench_tta.py --steps {args.steps}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}). "
      f"CLIP vision tower of the offline suite (width 64, 4 layers, 32x32 images), T = {T} tasks x {B} images "
      f"= {T * B} images per step, {C} classes per head, CPU, median of {args.steps} warm steps, each row in "
      f"its own process. The machine is shared with other jobs (load average {' '.join(load)} on 2 cores): "
      "absolute times are noisy, the ratio is measured in the same run.", "",
      "| configuration | time per step (ms) | ratio vs forward+backward | trainable parameters | peak RSS (GB) |",
      "|---|---|---|---|---|"]
  names = {"plain": "plain model: forward + backward (all weights)",
           "adamerging-layer": "AdaMerging layer-wise step (merge + forward + backward + Adam)",
           "adamerging-task": "AdaMerging task-wise step"}
  for r in rows:
    lines.append(f"| {names[r['which']]} | {1e3 * r['seconds']:.1f} | {r['seconds'] / ref:.2f}x | {r['trainable']:,} "
                 f"| {r['peak_rss_gb']:.2f} |")
  lines += ["", "Target: one AdaMerging step <= 1.5x one forward and backward pass of the plain model."]
  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  Path(args.out).write_text("\n".join(lines) + "\n")
  print("\n".join(lines))
  return 0


if __name__ == "__main__":
  sys.exit(main())
