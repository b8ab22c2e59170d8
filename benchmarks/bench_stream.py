"""Peak memory and time of streaming merges (jaxmerge.stream) vs in-memory merges (jaxmerge.merge).

A synthetic LLM-like checkpoint is written to disk: a pretrained model and ``T`` fine-tuned models, bf16,
Llama-style names, ``--tensor-mb`` MiB per tensor, sharded safetensors with an index (``--shard-mb``). Every
case runs in its own subprocess so that its peak resident memory (``VmHWM``) is its own:

- ``stream``: ``jaxmerge.stream.merge_streaming`` from the lazy readers to a ``ShardedWriter`` (the
  ``jaxmerge merge --stream`` path);
- ``memory``: the whole checkpoints read into memory, ``jaxmerge.merge``, then ``save_sharded`` (the
  ``jaxmerge merge --no-stream`` path), run only where it fits (``--memory-gb``, the largest model size for
  which it is attempted).

    python benchmarks/bench_stream.py                         # 8 tasks x 1 GB and 8 x 128 MB (bf16)
    python benchmarks/bench_stream.py --sizes-gb 0.25 --tasks 4 --methods ties

Writes a markdown table to benchmarks/results/stream.md. Times include reading inputs and writing the merged
checkpoint (page cache warm after the first case of a size) and XLA compilation.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent

_CHILD = r"""
import json, pathlib, sys, time
import numpy as np
import jax
import jaxmerge as jm
from jaxmerge import stream
from jaxmerge.io import safetensors_io as S

root, mode, method, tasks, out = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
hp = json.loads(sys.argv[6])

def status(key):
  for line in open("/proc/self/status"):
    if line.startswith(key + ":"):
      return int(line.split()[1]) * 1024

tx = jm.get_method(method)(**hp)
key = jax.random.key(0)
jax.numpy.ones(1).block_until_ready()
base_rss = status("VmRSS")
t0 = time.perf_counter()
pre = S.open_checkpoint(root / "base")
models = [S.open_checkpoint(root / f"ft{i}") for i in range(tasks)]
extra = {}
if mode == "stream":
  w = S.ShardedWriter(root / out, {k: (pre.shape(k), pre.dtype(k)) for k in pre.keys()}, max_shard_bytes=1 << 30)
  res = stream.merge_streaming(tx, pre, models, w, method=(method, hp), key=key)
  w.close()
  extra = {"passes": res.passes, "programs": res.programs}
else:
  base = {k: pre.get(k) for k in pre.keys()}
  fts = [{k: m.get(k) for k in base} for m in models]
  merged = jm.merge(tx, base, fts, key=key)
  S.save_sharded(root / out, {k: np.asarray(v) for k, v in merged.items()}, max_shard_bytes=1 << 30)
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "peak": status("VmHWM"), "base_rss": base_rss, **extra}))
"""

HPARAMS = {"task_arithmetic": {"scale": 0.3}, "ties": {"density": 0.2, "scale": 0.3}, "dare": {"p": 0.5}}


def make_checkpoints(root: pathlib.Path, tasks: int, model_bytes: int, tensor_mb: int, shard_mb: int) -> dict:
  """Writes base/ and ft<i>/ (bf16, Llama-style names) with the given total size per model."""
  import ml_dtypes
  import numpy as np

  sys.path.insert(0, str(ROOT))
  from jaxmerge.io import safetensors_io as S

  cols = 4096
  rows = max(1, tensor_mb * 2**20 // (2 * cols))
  n = max(1, model_bytes // (rows * cols * 2))
  names = [f"model.layers.{i // 4}.mlp.{['gate', 'up', 'down', 'o'][i % 4]}_proj.weight" for i in range(n)]
  rng = np.random.default_rng(0)
  noise = rng.standard_normal((rows, cols), dtype=np.float32) * 0.01
  for who in ["base"] + [f"ft{i}" for i in range(tasks)]:
    specs = {k: ((rows, cols), np.dtype(ml_dtypes.bfloat16)) for k in names}
    with S.ShardedWriter(root / who, specs, max_shard_bytes=shard_mb * 2**20, overwrite=True) as w:
      for j, k in enumerate(names):
        b = np.random.default_rng(j).standard_normal((rows, cols), dtype=np.float32)
        if who != "base":
          b += np.roll(noise, 7 * j + 13 * int(who[2:]), axis=1)
        w.write(k, b.astype(ml_dtypes.bfloat16))
  return {"tensors": n, "shape": (rows, cols), "model_bytes": n * rows * cols * 2}


def run_case(root: pathlib.Path, mode: str, method: str, tasks: int) -> dict:
  out = f"out_{mode}_{method}"
  shutil.rmtree(root / out, ignore_errors=True)
  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-c", _CHILD, str(root), mode, method, str(tasks), out,
                         json.dumps(HPARAMS[method])], env=env, capture_output=True, text=True)
  shutil.rmtree(root / out, ignore_errors=True)
  if proc.returncode != 0:
    return {"error": (proc.stderr.strip().splitlines() or ["killed"])[-1][:200], "rc": proc.returncode}
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--tasks", type=int, default=8)
  ap.add_argument("--sizes-gb", default="0.125,1", help="model sizes (GB of bf16 per model), comma separated")
  ap.add_argument("--memory-gb", type=float, default=0.125, help="run the in-memory merge up to this model size")
  ap.add_argument("--methods", default="task_arithmetic,ties,dare")
  ap.add_argument("--tensor-mb", type=int, default=32)
  ap.add_argument("--shard-mb", type=int, default=256)
  ap.add_argument("--dir", default=None, help="scratch directory (default: a temporary one)")
  ap.add_argument("--out", default=str(HERE / "results" / "stream.md"))
  args = ap.parse_args()

  scratch = pathlib.Path(args.dir or tempfile.mkdtemp(prefix="jaxmerge-bench-stream-"))
  rows = []
  try:
    for size in [float(s) for s in args.sizes_gb.split(",")]:
      root = scratch / f"{size}gb"
      root.mkdir(parents=True, exist_ok=True)
      t0 = time.perf_counter()
      info = make_checkpoints(root, args.tasks, int(size * 1e9), args.tensor_mb, args.shard_mb)
      print(f"wrote {args.tasks + 1} x {info['model_bytes'] / 1e9:.2f} GB ({info['tensors']} tensors of "
            f"{info['shape']}) in {time.perf_counter() - t0:.0f} s", flush=True)
      for method in args.methods.split(","):
        modes = ["stream"] + (["memory"] if size <= args.memory_gb else [])
        for mode in modes:
          r = run_case(root, mode, method, args.tasks)
          r.update(size=size, method=method, mode=mode, model_bytes=info["model_bytes"])
          print(json.dumps(r), flush=True)
          rows.append(r)
      shutil.rmtree(root, ignore_errors=True)
  finally:
    if not args.dir:
      shutil.rmtree(scratch, ignore_errors=True)

  lines = [
      "# Streaming vs in-memory merges",
      "",
      f"`python benchmarks/bench_stream.py --tasks {args.tasks} --sizes-gb {args.sizes_gb} --methods {args.methods}`",
      f"on {platform.machine()} with {os.cpu_count()} CPU cores (JAX CPU backend), {time.strftime('%Y-%m-%d')}.",
      "",
      f"Inputs: a pretrained model and {args.tasks} fine-tuned models, bf16, Llama-style names, "
      f"{args.tensor_mb} MiB tensors, sharded safetensors ({args.shard_mb} MiB shards) with an index. Inputs on disk "
      f"total (T + 1) x model size. Peak = the process's peak resident memory (VmHWM) minus its resident memory "
      "after importing JAX; time includes reading the inputs, XLA compilation and writing the merged checkpoint.",
      "",
      "| model size | method | mode | passes | time (s) | peak memory (GB) | inputs on disk (GB) |",
      "|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    inputs = (args.tasks + 1) * r["model_bytes"] / 1e9
    if "error" in r:
      lines.append(f"| {r['model_bytes'] / 1e9:.2f} GB | {r['method']} | {r['mode']} | - | failed: {r['error']} | - | "
                   f"{inputs:.1f} |")
      continue
    lines.append(f"| {r['model_bytes'] / 1e9:.2f} GB | {r['method']} | {r['mode']} | {r.get('passes', 1)} | "
                 f"{r['seconds']:.1f} | {(r['peak'] - r['base_rss']) / 1e9:.2f} | {inputs:.1f} |")
  lines += ["", "In-memory merges are run only for the smaller size: at 1 GB per model they would hold the "
            f"{args.tasks + 1} checkpoints plus their float32 task vectors "
            f"(about {(args.tasks + 1) * 1 + args.tasks * 2} GB), more than this machine can spare."]
  pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  pathlib.Path(args.out).write_text("\n".join(lines) + "\n")
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
