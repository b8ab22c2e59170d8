"""Time, peak memory and agreement of TSV-M, Iso-C and Iso-CTS: jaxmerge vs fusion-bench, same machine, same run.

Inputs: the 72 linear-layer matrices of the 12 CLIP ViT-B/32 vision blocks (768x768 attention projections,
3072x768 ``fc1``, 768x3072 ``fc2``; Hugging Face names, ``(out, in)``) plus their biases, as structured task
vectors (``tests/clip_shapes.make_task_vectors``: a shared low-rank part, task-specific low-rank parts, spikes,
dense noise). Every case runs in its own subprocess so that its peak resident memory (``ru_maxrss``) is its own.
fusion-bench runs its own functions (``compute_and_sum_svd_mem_reduction``, ``iso_c``, ``iso_cts``) on CPU.

The *floor* is the LAPACK work a method cannot avoid, timed in the same run: the full thin SVDs
(``torch.linalg.svd``, LAPACK ``gesdd``: the fastest SVD on this CPU, the call fusion-bench makes, same threads)
of every matrix whose complete singular triplets the exact result depends on, on one block's real matrices,
times the number of blocks; no matrix products, copies or Python bookkeeping are counted.

- TSV-M: each task matrix (``T`` per leaf: the top ``k = r/T`` cut falls inside a dense bulk of singular
  values, where only a backward-stable SVD of the matrix itself is accurate; the Gram/eigh route doubles the
  error) plus the two concatenations ``U^`` (``m x Tk``) and ``V^`` (``n x Tk``), whose condition numbers
  (about 1e4 on these inputs) rule out Gram, Cholesky or Newton-Schulz polar factors in float32.
- Iso-C: the summed matrix (polar factor and nuclear norm need every triplet).
- Iso-CTS: the summed matrix, each task's projected matrix (the ``(r - k_c) x n`` matrix ``U_perp^T Delta_t``
  when ``m <= n``, the ``m x n`` matrix ``(I - U_c U_c^T) Delta_t`` otherwise), and the two polar factors
  (``W``: ``(r - k_c) x Ts`` or ``m x Ts``; ``V*``: ``n x r``).

Times are wall-clock seconds and process CPU seconds (all threads); CPU seconds are less sensitive to other
jobs on the machine.

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
  t0, c0 = time.perf_counter(), time.process_time()
  merged = jax.block_until_ready(jm.merge(tx, pre, tvs, check_finite=False))
  first, first_cpu = time.perf_counter() - t0, time.process_time() - c0
  t0, c0 = time.perf_counter(), time.process_time()
  merged = jax.block_until_ready(jm.merge(tx, pre, tvs, check_finite=False))
  warm, warm_cpu = time.perf_counter() - t0, time.process_time() - c0
  np.savez(out, **{k: np.asarray(v) for k, v in merged.items()})
  return {"first": first, "warm": warm, "first_cpu": first_cpu, "warm_cpu": warm_cpu, "rss": _rss_gb(),
          "inputs_rss": in_gb, "load": os.getloadavg()[0]}


def run_fusion_bench(method: str, tasks: int, blocks: int, out: str) -> dict:
  import numpy as np  # noqa: PLC0415
  import torch  # noqa: PLC0415
  from fusion_bench.method.isotropic_merging.iso_utils import iso_c, iso_cts  # noqa: PLC0415
  from fusion_bench.method.task_singular_vector.utils.TSVM_utils import compute_and_sum_svd_mem_reduction  # noqa: PLC0415

  tvs = [{k: torch.from_numpy(v) for k, v in tv.items()} for tv in inputs(tasks, blocks)]
  in_gb = _rss_gb()
  t0, c0 = time.perf_counter(), time.process_time()
  import contextlib  # noqa: PLC0415
  import io  # noqa: PLC0415

  with contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
    if method == "tsv_m":
      merged = compute_and_sum_svd_mem_reduction(tvs, accelerator="cpu")
    elif method == "iso_c":
      merged = iso_c(tvs, accelerator="cpu")
    else:
      merged = iso_cts(tvs, common_space_fraction=HPARAMS["iso_cts"]["common_fraction"], accelerator="cpu")
  first, first_cpu = time.perf_counter() - t0, time.process_time() - c0
  np.savez(out, **{k: v.numpy() for k, v in merged.items()})
  return {"first": first, "warm": None, "first_cpu": first_cpu, "rss": _rss_gb(), "inputs_rss": in_gb,
          "load": os.getloadavg()[0]}


def floor_svds(method: str, xs: list, tasks: int):
  """The unavoidable SVD inputs of one matrix leaf (see the module docstring), built with torch as they are
  needed. Yields ``torch`` matrices; the caller sends back each one's ``torch.linalg.svd`` (the timed part)."""
  import torch  # noqa: PLC0415

  from jaxmerge.reductions._iso import iso_cts_sizes  # noqa: PLC0415

  m, n = xs[0].shape
  r = min(m, n)
  if method == "iso_c":
    yield sum(xs)
    return
  if method == "tsv_m":
    k = int(r * (1 / tasks))
    us, vs = [], []
    for x in xs:
      u, _, vt = yield x
      us.append(u[:, :k])
      vs.append(vt[:k].T)
    yield torch.cat(us, 1)
    yield torch.cat(vs, 1)
    return
  kc, s = iso_cts_sizes(r, tasks, HPARAMS["iso_cts"]["common_fraction"])
  u, _, vt = yield sum(xs)
  uc = u[:, :kc]
  ws, vs = [], [vt[:kc].T]
  for x in xs:
    d = u[:, kc:].T @ x if m <= n else x - uc @ (uc.T @ x)
    a, _, bt = yield d
    ws.append(a[:, :s])
    vs.append(bt[:s].T)
  yield torch.cat(ws, 1)
  yield torch.cat(vs, 1)


def run_floor(method: str, tasks: int, blocks: int, out: str) -> dict:
  """The unavoidable LAPACK work: ``torch.linalg.svd`` of every matrix listed in the module docstring, on one
  block's matrices, times ``blocks``."""
  import torch  # noqa: PLC0415

  tvs = inputs(tasks, 1)
  keys = [k for k, v in tvs[0].items() if v.ndim == 2]
  wall = cpu = 0.0
  count = 0
  with torch.no_grad():
    for key in keys:
      gen = floor_svds(method, [torch.from_numpy(tv[key]) for tv in tvs], tasks)
      res = None
      while True:
        try:
          a = gen.send(res)
        except StopIteration:
          break
        t0, c0 = time.perf_counter(), time.process_time()
        res = torch.linalg.svd(a, full_matrices=False)
        wall += time.perf_counter() - t0
        cpu += time.process_time() - c0
        count += 1
  return {"first": wall * blocks, "first_cpu": cpu * blocks, "svds": count * blocks, "warm": None,
          "rss": _rss_gb(), "inputs_rss": 0.0, "load": os.getloadavg()[0]}


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
      write(rows, a)  # after every row, so that a partial run leaves its table


def _fmt(res: dict | None, key: str) -> str:
  if not res or "error" in res or res.get(key) is None:
    return ""
  return f"{res[key]:.1f}"


def write(rows, a) -> None:
  """Writes the markdown table of ``rows`` (one per method and task count) to ``a.out``."""
  import platform  # noqa: PLC0415

  lines = [
      "# Subspace merging: jaxmerge vs fusion-bench",
      "",
      f"`python benchmarks/bench_subspace.py --tasks {a.tasks} --fb-tasks {a.fb_tasks} --blocks {a.blocks}` on "
      f"{platform.machine()} with {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. "
      "The machine is shared with other jobs: the 1-minute load average at the end of each case is in the last "
      "column; CPU seconds (all threads of the process) are less sensitive to the load than wall seconds.",
      "",
      f"Inputs: {a.blocks} ViT-B/32 blocks (768x768 q/k/v/out, 3072x768 fc1, 768x3072 fc2, biases), structured "
      "task vectors. Seconds for one merge, wall / CPU (jaxmerge: first call incl. compilation, then warm); "
      "floor = LAPACK SVDs the method cannot avoid (module docstring of the script); rel. err = relative "
      "Frobenius error of the whole merged update vs fusion-bench (and the worst leaf).",
      "",
      "| method | tasks | fusion-bench wall / CPU | jaxmerge first wall / CPU | jaxmerge warm wall / CPU | "
      "speed-up warm (wall) | floor wall / CPU (SVDs) | peak RSS fb / jm (GB) | rel. err (whole / worst) | "
      "load fb / jm |",
      "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    jm, fb, fl = r["jm"], r["fb"], r["floor"]
    if "error" in jm:
      lines.append(f"| {r['method']} | {r['tasks']} | | error: {jm['error'][:80]} | | | | | | |")
      continue
    ok_fb = bool(fb) and "error" not in fb
    fbt = (f"{_fmt(fb, 'first')} / {_fmt(fb, 'first_cpu')}" if ok_fb else
           (fb.get("error", "")[:60] if fb else "not run"))
    sp = f"{fb['first'] / jm['warm']:.2f}x" if ok_fb else ""
    flt = f"{_fmt(fl, 'first')} / {_fmt(fl, 'first_cpu')} ({fl.get('svds', '')})" if "error" not in fl else "error"
    rss = f"{fb['rss']:.2f} / {jm['rss']:.2f}" if ok_fb else f"- / {jm['rss']:.2f}"
    err = "" if r["err"] is None else f"{r['err'][0]:.1e} / {r['err'][1]:.1e}"
    load = f"{fb['load']:.1f} / {jm['load']:.1f}" if ok_fb else f"- / {jm['load']:.1f}"
    lines.append(f"| {r['method']} | {r['tasks']} | {fbt} | {_fmt(jm, 'first')} / {_fmt(jm, 'first_cpu')} | "
                 f"{_fmt(jm, 'warm')} / {_fmt(jm, 'warm_cpu')} | {sp} | {flt} | {rss} | {err} | {load} |")
  pathlib.Path(a.out).parent.mkdir(parents=True, exist_ok=True)
  pathlib.Path(a.out).write_text("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
