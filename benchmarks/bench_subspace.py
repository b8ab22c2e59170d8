"""Time, peak memory and agreement of TSV-M, Iso-C and Iso-CTS: jaxmerge vs fusion-bench, same machine, same run.

Inputs: the 72 linear-layer matrices of the 12 CLIP ViT-B/32 vision blocks (768x768 attention projections,
3072x768 ``fc1``, 768x3072 ``fc2``; Hugging Face names, ``(out, in)``) plus their biases, as structured task
vectors (``tests/clip_shapes.make_task_vectors``: a shared low-rank part, task-specific low-rank parts, spikes,
dense noise). Every case runs in its own subprocess so that its peak resident memory (``ru_maxrss``) is its own.
fusion-bench runs its own functions (``compute_and_sum_svd_mem_reduction``, ``iso_c``, ``iso_cts``) on CPU.

The *floor* is the LAPACK work a method cannot avoid, timed on the same matrices: one symmetric eigensolver
call on the ``768 x 768`` Gram matrix of every matrix it must factor (TSV-M: each task matrix; Iso-C: the sum;
Iso-CTS: the sum and each projected task matrix), with the Gram products included.

    python benchmarks/bench_subspace.py                        # T=4 and 8 for jaxmerge, fusion-bench at T=4
    python benchmarks/bench_subspace.py --tasks 4 --fb-tasks 4 --methods iso_c --blocks 2

Writes a markdown table to benchmarks/results/subspace.md.
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
ROOT = HERE.parent
HPARAMS = {"tsv_m": {"scale": 1.0}, "iso_c": {"scale": 1.0}, "iso_cts": {"scale": 1.0, "common_fraction": 0.8}}
FLOOR_FACTORIZATIONS = {"tsv_m": lambda t: t, "iso_c": lambda t: 1, "iso_cts": lambda t: 1 + t}


def shapes(blocks: int) -> dict[str, tuple[int, ...]]:
  d, mlp = 768, 3072
  s = {}
  for i in range(blocks):
    p = f"vision_model.encoder.layers.{i}."
    for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
      s[p + f"self_attn.{n}.weight"] = (d, d)
      s[p + f"self_attn.{n}.bias"] = (d,)
    s[p + "mlp.fc1.weight"] = (mlp, d)
    s[p + "mlp.fc1.bias"] = (mlp,)
    s[p + "mlp.fc2.weight"] = (d, mlp)
    s[p + "mlp.fc2.bias"] = (d,)
  return s


def inputs(tasks: int, blocks: int):
  """Task vectors as NumPy float32 dicts (deterministic); the pretrained model is zero (only updates matter)."""
  sys.path.insert(0, str(ROOT))
  from tests.clip_shapes import make_task_vectors  # noqa: PLC0415

  return make_task_vectors(shapes(blocks), tasks, seed=0, rank=8, spikes=0.001)


def _rss_gb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def run_jaxmerge(method: str, tasks: int, blocks: int, out: str) -> dict:
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  import jaxmerge as jm  # noqa: PLC0415

  tvs = inputs(tasks, blocks)
  pre = {k: np.zeros_like(v) for k, v in tvs[0].items()}
  in_gb = _rss_gb()
  tx = jm.get_method(method)(**HPARAMS[method])
  t0 = time.perf_counter()
  merged = jax.block_until_ready(jm.merge(tx, pre, tvs, check_finite=False))
  first = time.perf_counter() - t0
  t0 = time.perf_counter()
  merged = jax.block_until_ready(jm.merge(tx, pre, tvs, check_finite=False))
  warm = time.perf_counter() - t0
  np.savez(out, **{k: np.asarray(v) for k, v in merged.items()})
  return {"first": first, "warm": warm, "rss": _rss_gb(), "inputs_rss": in_gb}


def run_fusion_bench(method: str, tasks: int, blocks: int, out: str) -> dict:
  import numpy as np  # noqa: PLC0415
  import torch  # noqa: PLC0415
  from fusion_bench.method.isotropic_merging.iso_utils import iso_c, iso_cts  # noqa: PLC0415
  from fusion_bench.method.task_singular_vector.utils.TSVM_utils import compute_and_sum_svd_mem_reduction  # noqa: PLC0415

  tvs = [{k: torch.from_numpy(v) for k, v in tv.items()} for tv in inputs(tasks, blocks)]
  in_gb = _rss_gb()
  t0 = time.perf_counter()
  import contextlib  # noqa: PLC0415
  import io  # noqa: PLC0415

  with contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
    if method == "tsv_m":
      merged = compute_and_sum_svd_mem_reduction(tvs, accelerator="cpu")
    elif method == "iso_c":
      merged = iso_c(tvs, accelerator="cpu")
    else:
      merged = iso_cts(tvs, common_space_fraction=HPARAMS["iso_cts"]["common_fraction"], accelerator="cpu")
  first = time.perf_counter() - t0
  np.savez(out, **{k: v.numpy() for k, v in merged.items()})
  return {"first": first, "warm": None, "rss": _rss_gb(), "inputs_rss": in_gb}


def run_floor(method: str, tasks: int, blocks: int, out: str) -> dict:
  """The unavoidable LAPACK work: Gram products plus ``syevd`` on every matrix the method must factor."""
  import numpy as np  # noqa: PLC0415

  tvs = inputs(min(tasks, 2), 1)
  mats = [v for k, v in tvs[0].items() if v.ndim == 2]
  t0 = time.perf_counter()
  for x in mats:
    g = x.T @ x if x.shape[0] >= x.shape[1] else x @ x.T
    np.linalg.eigh(g.astype(np.float32))
  per_block = time.perf_counter() - t0
  return {"first": per_block * blocks * FLOOR_FACTORIZATIONS[method](tasks), "warm": None, "rss": _rss_gb(),
          "inputs_rss": 0.0}


def child(lib: str, method: str, tasks: int, blocks: int, out: str) -> None:
  fn = {"jaxmerge": run_jaxmerge, "fusion_bench": run_fusion_bench, "floor": run_floor}[lib]
  print("RESULT " + json.dumps(fn(method, tasks, blocks, out)))


def _run(lib, method, tasks, blocks, out, timeout):
  cmd = [sys.executable, __file__, "--child", lib, method, str(tasks), str(blocks), out]
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  try:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
  except subprocess.TimeoutExpired:
    return {"error": f"timeout after {timeout} s"}
  line = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
  if not line:
    return {"error": res.stderr[-400:]}
  return json.loads(line[-1][7:])


def rel_err(a_path: str, b_path: str) -> float:
  import numpy as np  # noqa: PLC0415

  a, b = np.load(a_path), np.load(b_path)
  num = sum(float(np.sum((a[k].astype(np.float64) - b[k]) ** 2)) for k in b.files)
  den = sum(float(np.sum(b[k].astype(np.float64) ** 2)) for k in b.files)
  worst = max(float(np.linalg.norm(a[k].astype(np.float64) - b[k]) / max(np.linalg.norm(b[k]), 1e-30)) for k in b.files)
  return (num / den) ** 0.5, worst


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--methods", default="tsv_m,iso_c,iso_cts")
  ap.add_argument("--tasks", default="4,8")
  ap.add_argument("--fb-tasks", default="4")
  ap.add_argument("--blocks", type=int, default=12)
  ap.add_argument("--timeout", type=int, default=3600)
  ap.add_argument("--out", default=str(HERE / "results" / "subspace.md"))
  ap.add_argument("--child", nargs=5)
  a = ap.parse_args()
  if a.child:
    lib, method, tasks, blocks, out = a.child
    child(lib, method, int(tasks), int(blocks), out)
    return
  tmp = pathlib.Path(os.environ.get("TMPDIR", "/tmp")) / "bench_subspace"
  tmp.mkdir(parents=True, exist_ok=True)
  tasks = [int(t) for t in a.tasks.split(",")]
  fb_tasks = {int(t) for t in a.fb_tasks.split(",") if t}
  rows = []
  for method in a.methods.split(","):
    for t in tasks:
      jm_out, fb_out = str(tmp / f"jm_{method}_{t}.npz"), str(tmp / f"fb_{method}_{t}.npz")
      jm_res = _run("jaxmerge", method, t, a.blocks, jm_out, a.timeout)
      fb_res = _run("fusion_bench", method, t, a.blocks, fb_out, a.timeout) if t in fb_tasks else None
      floor = _run("floor", method, t, a.blocks, "", a.timeout)
      err = rel_err(jm_out, fb_out) if fb_res and "error" not in fb_res and "error" not in jm_res else None
      row = dict(method=method, tasks=t, jm=jm_res, fb=fb_res, floor=floor, err=err)
      print(json.dumps(row), flush=True)
      rows.append(row)
  write(rows, a)


def write(rows, a) -> None:
  import platform  # noqa: PLC0415

  load = os.getloadavg()
  lines = [
      "# Subspace merging: jaxmerge vs fusion-bench",
      "",
      f"`python benchmarks/bench_subspace.py --tasks {a.tasks} --fb-tasks {a.fb_tasks} --blocks {a.blocks}` on "
      f"{platform.machine()} with {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
      f"load average at the end {load[0]:.1f} (the machine is shared with other jobs: absolute times are "
      "inflated, ratios measured in the same run are the meaningful numbers).",
      "",
      f"Inputs: {a.blocks} ViT-B/32 blocks (768x768 q/k/v/out, 3072x768 fc1, 768x3072 fc2, biases), structured "
      "task vectors. Time of one merge in seconds (jaxmerge: first call incl. compilation, then warm); floor = "
      "Gram products + `eigh` of every matrix the method must factor; rel. err = relative Frobenius error of the "
      "whole merged update vs fusion-bench (and the worst leaf).",
      "",
      "| method | tasks | fusion-bench (s) | jaxmerge first (s) | jaxmerge warm (s) | speed-up first / warm | "
      "floor (s) | peak RSS fb / jm (GB) | rel. err (whole / worst leaf) |",
      "|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    jm, fb, fl = r["jm"], r["fb"], r["floor"]
    if "error" in jm:
      lines.append(f"| {r['method']} | {r['tasks']} | | error: {jm['error'][:80]} | | | | | |")
      continue
    fbt = "" if not fb else (fb.get("error", "")[:60] if "error" in fb else f"{fb['first']:.1f}")
    sp = "" if not fb or "error" in fb else f"{fb['first'] / jm['first']:.1f}x / {fb['first'] / jm['warm']:.1f}x"
    rss = f"{fb['rss']:.2f} / {jm['rss']:.2f}" if fb and "error" not in fb else f"- / {jm['rss']:.2f}"
    err = "" if r["err"] is None else f"{r['err'][0]:.1e} / {r['err'][1]:.1e}"
    lines.append(f"| {r['method']} | {r['tasks']} | {fbt} | {jm['first']:.1f} | {jm['warm']:.1f} | {sp} | "
                 f"{fl.get('first', float('nan')):.1f} | {rss} | {err} |")
  pathlib.Path(a.out).parent.mkdir(parents=True, exist_ok=True)
  pathlib.Path(a.out).write_text("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
