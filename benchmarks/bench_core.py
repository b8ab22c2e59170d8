"""Time and peak memory of task arithmetic, TIES, DARE and DARE on TIES: jaxmerge vs fusion-bench, same machine, same run.

Inputs are task vectors with the full CLIP ViT-B/32 vision-tower shapes (about 88M parameters per model, Hugging
Face names). Every case runs in its own subprocess so that its peak resident memory (``ru_maxrss``) is its own;
the peak includes the inputs, which are reported separately.

    python benchmarks/bench_core.py                 # T=4 both libraries, T=8 jaxmerge (fusion-bench: --fb-tasks 4,8)
    python benchmarks/bench_core.py --tasks 4 --methods ties

Writes a markdown table to benchmarks/results/core.md.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent


def clip_vit_b32_shapes() -> dict[str, tuple[int, ...]]:
  """Hugging Face CLIPVisionModel (ViT-B/32) parameter names and shapes."""
  d, mlp, layers, patch, pos = 768, 3072, 12, 32, 50
  s = {
      "vision_model.embeddings.class_embedding": (d,),
      "vision_model.embeddings.patch_embedding.weight": (d, 3, patch, patch),
      "vision_model.embeddings.position_embedding.weight": (pos, d),
      "vision_model.pre_layrnorm.weight": (d,),
      "vision_model.pre_layrnorm.bias": (d,),
      "vision_model.post_layernorm.weight": (d,),
      "vision_model.post_layernorm.bias": (d,),
  }
  for i in range(layers):
    p = f"vision_model.encoder.layers.{i}."
    for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
      s[p + f"self_attn.{n}.weight"] = (d, d)
      s[p + f"self_attn.{n}.bias"] = (d,)
    s[p + "mlp.fc1.weight"] = (mlp, d)
    s[p + "mlp.fc1.bias"] = (mlp,)
    s[p + "mlp.fc2.weight"] = (d, mlp)
    s[p + "mlp.fc2.bias"] = (d,)
    for n in ("layer_norm1", "layer_norm2"):
      s[p + f"{n}.weight"] = (d,)
      s[p + f"{n}.bias"] = (d,)
  return s


def _rss_gb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


HPARAMS = {
    "task_arithmetic": {"scale": 0.3},
    "ties": {"density": 0.2, "scale": 0.3, "disjoint": "sum"},
    "dare": {"p": 0.5, "scale": 0.3},
    "dare_ties": {"p": 0.5, "scale": 0.3, "base": "ties", "density": 0.2, "disjoint": "sum"},
}
REGISTRY = {"dare_ties": "dare"}  # bench case -> jaxmerge registry name


def run_jaxmerge(method: str, tasks: int, engine: str = "jit") -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np

  import jaxmerge as jm

  shapes = clip_vit_b32_shapes()
  key = jax.random.key(0)
  pre = {n: np.asarray(jax.random.normal(jax.random.fold_in(key, i), s, jnp.float32)) for i, (n, s) in enumerate(shapes.items())}
  fts = []
  for t in range(tasks):
    kt = jax.random.fold_in(key, 1000 + t)
    fts.append({n: pre[n] + 0.01 * np.asarray(jax.random.normal(jax.random.fold_in(kt, i), s, jnp.float32))
                for i, (n, s) in enumerate(shapes.items())})
  n_params = sum(int(np.prod(s)) for s in shapes.values())
  input_gb = (tasks + 1) * n_params * 4 / 1024**3
  base_rss = _rss_gb()
  tx = jm.get_method(REGISTRY.get(method, method))(**HPARAMS[method])
  if engine == "stream":  # tensor by tensor (jaxmerge.stream), exact multi-pass plans for global methods
    from jaxmerge import stream

    def run():
      w = stream.DictWriter()
      stream.merge_streaming(tx, pre, fts, w, method=(REGISTRY.get(method, method), HPARAMS[method]), key=jax.random.key(1), prefetch=False)
      return w
  else:
    def run():
      return jax.block_until_ready(jm.merge(tx, pre, fts, key=jax.random.key(1)))
  t0 = time.perf_counter()
  out = run()
  first = time.perf_counter() - t0
  t0 = time.perf_counter()
  out = run()
  second = time.perf_counter() - t0
  checksum = float(sum(np.abs(np.asarray(v, np.float64) - pre[k]).sum() for k, v in out.items()))
  return {"lib": "jaxmerge" if engine == "jit" else "jaxmerge-stream", "method": method, "tasks": tasks, "params": n_params, "first_s": first,
          "warm_s": second, "peak_gb": _rss_gb(), "inputs_gb": input_gb, "rss_before_gb": base_rss,
          "checksum": checksum}


def run_fusion_bench(method: str, tasks: int) -> dict:
  import copy

  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch
  from fusion_bench.method import DareTaskArithmetic, DareTiesMerging, TaskArithmeticAlgorithm, TiesMergingAlgorithm
  from fusion_bench.modelpool import BaseModelPool

  shapes = clip_vit_b32_shapes()
  key = jax.random.key(0)

  class Holder(torch.nn.Module):
    def __init__(self, sd):
      super().__init__()
      self.p = torch.nn.ParameterDict({k.replace(".", "__"): torch.nn.Parameter(torch.from_numpy(v), requires_grad=True) for k, v in sd.items()})

  pre = {n: np.asarray(jax.random.normal(jax.random.fold_in(key, i), s, jnp.float32)) for i, (n, s) in enumerate(shapes.items())}
  models = {"_pretrained_": Holder(pre)}
  for t in range(tasks):
    kt = jax.random.fold_in(key, 1000 + t)
    models[f"task{t}"] = Holder({n: pre[n] + 0.01 * np.asarray(jax.random.normal(jax.random.fold_in(kt, i), s, jnp.float32))
                                 for i, (n, s) in enumerate(shapes.items())})
  del pre
  n_params = sum(int(np.prod(s)) for s in shapes.values())
  input_gb = (tasks + 1) * n_params * 4 / 1024**3
  base_rss = _rss_gb()
  pool = BaseModelPool(models)
  hp = HPARAMS[method]
  if method == "ties":
    algo = TiesMergingAlgorithm(scaling_factor=hp["scale"], threshold=hp["density"], remove_keys=[], merge_func=hp["disjoint"])
  elif method == "task_arithmetic":
    algo = TaskArithmeticAlgorithm(scaling_factor=hp["scale"], inplace=False)
  elif method == "dare_ties":
    algo = DareTiesMerging(sparsity_ratio=hp["p"], only_on_linear_weights=False, rescale=True, scaling_factor=hp["scale"],
                           threshold=hp["density"], remove_keys=[], merge_func=hp["disjoint"])
  else:
    algo = DareTaskArithmetic(scaling_factor=hp["scale"], sparsity_ratio=hp["p"], only_on_linear_weights=False)
  torch.manual_seed(0)
  t0 = time.perf_counter()
  with torch.no_grad():
    out = algo.run(pool)
  first = time.perf_counter() - t0
  del out, copy
  return {"lib": "fusion-bench", "method": method, "tasks": tasks, "params": n_params, "first_s": first,
          "warm_s": None, "peak_gb": _rss_gb(), "inputs_gb": input_gb, "rss_before_gb": base_rss, "checksum": None}


def child(lib: str, method: str, tasks: int) -> None:
  if lib == "fusion-bench":
    r = run_fusion_bench(method, tasks)
  else:
    r = run_jaxmerge(method, tasks, "stream" if lib == "jaxmerge-stream" else "jit")
  print("RESULT " + json.dumps(r), flush=True)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--methods", default="task_arithmetic,ties,dare")
  ap.add_argument("--tasks", default="4,8", help="task counts for jaxmerge")
  ap.add_argument("--fb-tasks", default="4", help="task counts for fusion-bench (8 does not fit in 24 GB)")
  ap.add_argument("--engines", default="jit,stream",
                  help="jaxmerge engines: jit (one jitted program, jm.merge) and stream (tensor by tensor)")
  ap.add_argument("--out", default=str(HERE / "results" / "core.md"))
  ap.add_argument("--child", nargs=3, metavar=("LIB", "METHOD", "TASKS"))
  args = ap.parse_args()
  if args.child:
    child(args.child[0], args.child[1], int(args.child[2]))
    return
  rows = []
  for method in args.methods.split(","):
    libs = [{"jit": "jaxmerge", "stream": "jaxmerge-stream"}[e] for e in args.engines.split(",") if e]
    cases = [("fusion-bench", int(t)) for t in args.fb_tasks.split(",") if t] + [
        (lib, int(t)) for lib in libs for t in args.tasks.split(",")]
    for lib, t in cases:
      proc = subprocess.run([sys.executable, __file__, "--child", lib, method, str(t)], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(HERE.parent)})
      line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
      if not line:
        rows.append({"lib": lib, "method": method, "tasks": t, "error": (proc.stderr or proc.stdout)[-300:]})
        print(f"{lib} {method} T={t}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
        continue
      r = json.loads(line[0][7:])
      rows.append(r)
      print(f"{lib:12s} {method:16s} T={t}: {r['first_s']:.2f} s (warm {r['warm_s'] if r['warm_s'] is None else round(r['warm_s'], 2)}), "
            f"peak {r['peak_gb']:.2f} GB, inputs {r['inputs_gb']:.2f} GB", flush=True)
  lines = ["| method | library | tasks | time (s, first call incl. compile) | warm (s) | speed-up vs fusion-bench (first / warm) | peak RSS (GB) | inputs (GB) | peak / inputs |",
           "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    if "error" in r:
      lines.append(f"| {r['method']} | {r['lib']} | {r['tasks']} | failed | | | | | |")
      continue
    ref = next((x for x in rows if x.get("lib") == "fusion-bench" and x["method"] == r["method"] and x["tasks"] == r["tasks"] and "error" not in x), None)
    speed = (f"{ref['first_s'] / r['first_s']:.1f}x / {ref['first_s'] / r['warm_s']:.1f}x"
             if ref and r["lib"] != "fusion-bench" else "")
    warm = f"{r['warm_s']:.2f}" if r["warm_s"] is not None else ""
    lines.append(f"| {r['method']} | {r['lib']} | {r['tasks']} | {r['first_s']:.2f} | {warm} | {speed} | {r['peak_gb']:.2f} | "
                 f"{r['inputs_gb']:.2f} | {r['peak_gb'] / r['inputs_gb']:.2f} |")
  table = "\n".join(lines)
  print(table)
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(f"Measured {time.strftime('%Y-%m-%d %H:%M')} on {os.cpu_count()} CPU cores.\n\n" + table + "\n")


if __name__ == "__main__":
  main()
