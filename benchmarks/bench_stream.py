"""Merging a Llama-style model from disk: ``jaxmerge merge`` (streaming and in memory) vs ``mergekit``, plus the
scaling of the sharded in-memory merge over 1 to 8 (fake) CPU devices.

Inputs: a random Llama-style causal LM (``LlamaForCausalLM`` names and ``config.json``, bf16, untied
embeddings; default hidden 1024, 16 layers, vocabulary 32000: 253 M parameters, 0.5 GB per model) written as a
"pretrained" model and ``--models`` (default 3) "fine-tuned" copies (pretrained + small random task vectors),
each sharded safetensors with an index. One mergekit YAML per method (``--methods``, ``all`` for every mergekit
method) and compute setting (``--compute``: ``float32`` sets ``dtype: float32, out_dtype: bfloat16`` so both
compute in float32 and write bf16; ``native`` sets no dtype, so both compute in the checkpoints' bf16) is run by
both tools on the same directories:

- ``mergekit``: ``mergekit.merge.run_merge`` (what ``mergekit-yaml`` runs) with its defaults (lazy loading,
  no GPU);
- ``jaxmerge --stream``: ``jaxmerge merge CONFIG --stream`` (tensor by tensor from memory-mapped shards);
- ``jaxmerge in memory``: ``jaxmerge merge CONFIG --no-stream``.

Every case runs in a fresh subprocess; time = wall time of the merge call (reading, computing, writing the
output, and for jaxmerge the XLA compilation: the persistent compilation cache is disabled); peak = that
process's peak resident memory (``VmHWM``) minus its resident memory just before the call (libraries
imported). Cases run in a rotating order over ``--rounds`` rounds, and the table reports medians. The merged
tensors of the tools are compared (max difference in bf16 ulps; DARE and DELLA draw other random masks than
mergekit, so their outputs differ by design). ``--baseline DIR`` also runs ``jaxmerge`` imported from another
tree (e.g. a checkout of main) on every case, interleaved with the others (rows ``@base``): a before/after
comparison under the same machine load.

The scaling part times ``jaxmerge.sharding.merge_sharded`` (TIES and Task Arithmetic) on ``8`` task vectors of
``--scaling-mparams`` million parameters each, on task meshes of 1, 2, 4 and 8 fake CPU devices
(``--xla_force_host_platform_device_count=8``): on a CPU host, fake devices share the same cores, so this shows
the sharded program's overhead and partitioning, not a speed-up from more hardware.

    python benchmarks/bench_stream.py                           # 253 M params, 3 models, ties + task_arithmetic
    python benchmarks/bench_stream.py --layers 4 --rounds 1     # quick
    python benchmarks/bench_stream.py --methods all --compute float32,native --skip-scaling --baseline ../main

Writes benchmarks/results/stream.md.
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
import json, os, pathlib, sys, time
mode, cfg, out = sys.argv[1], sys.argv[2], sys.argv[3]

def status(key):
  for line in open("/proc/self/status"):
    if line.startswith(key + ":"):
      return int(line.split()[1]) * 1024

if mode == "mergekit":
  import torch, yaml
  from mergekit.config import MergeConfiguration
  from mergekit.merge import run_merge
  from mergekit.options import MergeOptions
  d = yaml.safe_load(open(cfg))
  d.pop("jaxmerge", None)  # jaxmerge's own options
  conf = MergeConfiguration.model_validate(d)
  opts = MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True)
  run = lambda: run_merge(conf, out, options=opts)
else:
  import jax
  from jaxmerge import cli
  jax.numpy.ones(1).block_until_ready()
  flag = "--stream" if mode == "stream" else "--no-stream"
  run = lambda: cli.main(["merge", cfg, flag, "--out", out])
open("/proc/self/clear_refs", "w").write("5")
before = status("VmRSS")
t0 = time.perf_counter()
rc = run()
seconds = time.perf_counter() - t0
assert not rc, rc
print(json.dumps({"seconds": seconds, "peak": status("VmHWM") - before, "before": before}))
"""

_SCALING = r"""
import json, os, sys, time
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
import jax, numpy as np
import jaxmerge as jm
from jaxmerge import sharding as S
jax.config.update("jax_enable_compilation_cache", False)
mparams, rounds = float(sys.argv[1]), int(sys.argv[2])
T, cols = 8, 1024
rows = max(8, int(mparams * 1e6 / cols / 8) // 8 * 8)
rng = np.random.default_rng(0)
pre = {f"model.layers.{i}.mlp.down_proj.weight": rng.standard_normal((rows, cols), dtype=np.float32) for i in range(8)}
fts = [{k: v + 0.01 * rng.standard_normal(v.shape, dtype=np.float32) for k, v in pre.items()} for _ in range(T)]
res = {"params_per_model": 8 * rows * cols, "tasks": T, "rows": []}
for method in ("task_arithmetic", "ties"):
  tx = jm.get_method(method)()
  want = np.asarray(jm.merge(tx, pre, fts)[next(iter(pre))])
  for n in (1, 2, 4, 8):
    mesh = S.task_mesh(T, devices=jax.devices()[:n])
    pre_s = S.shard_params(pre, mesh)
    ft_s = S.stack_sharded(fts, mesh)
    merger = S.make_sharded_merger(tx, mesh, pre_s, ft_s)
    t0 = time.perf_counter()
    out = merger(pre_s, ft_s)
    jax.block_until_ready(out)
    first = time.perf_counter() - t0
    times = []
    for _ in range(rounds):
      t0 = time.perf_counter()
      jax.block_until_ready(merger(pre_s, ft_s))
      times.append(time.perf_counter() - t0)
    err = float(np.abs(np.asarray(out[next(iter(pre))]) - want).max())
    res["rows"].append({"method": method, "devices": n, "first": first, "median": float(np.median(times)),
                        "best": float(min(times)), "max_abs_diff": err,
                        "tasks_per_device": ft_s[next(iter(pre))].addressable_shards[0].data.shape[0]})
    print(json.dumps(res["rows"][-1]), file=sys.stderr, flush=True)
print(json.dumps(res))
"""


def llama_config(hidden: int, layers: int, vocab: int) -> dict:
  inter = int(hidden * 2.75) // 64 * 64
  heads = max(1, hidden // 64)
  return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
          "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
          "num_key_value_heads": max(1, heads // 2), "vocab_size": vocab, "max_position_embeddings": 2048,
          "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "hidden_act": "silu"}


def llama_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
  h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
  kv = h * cfg["num_key_value_heads"] // cfg["num_attention_heads"]
  shapes = {"model.embed_tokens.weight": (v, h)}
  for n in range(cfg["num_hidden_layers"]):
    p = f"model.layers.{n}."
    shapes.update({p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                   p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                   p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                   p + "mlp.down_proj.weight": (h, i), p + "input_layernorm.weight": (h,),
                   p + "post_attention_layernorm.weight": (h,)})
  shapes.update({"model.norm.weight": (h,), "lm_head.weight": (v, h)})
  return shapes


def make_checkpoints(root: pathlib.Path, cfg: dict, models: int, shard_mb: int) -> int:
  """Writes base/ and ft<i>/ (bf16 sharded safetensors + config.json). Returns the parameter count."""
  import ml_dtypes
  import numpy as np

  sys.path.insert(0, str(ROOT))
  from jaxmerge.io import safetensors_io as S

  shapes = llama_shapes(cfg)
  bf16 = np.dtype(ml_dtypes.bfloat16)
  for who in ["base"] + [f"ft{i}" for i in range(models)]:
    specs = {k: (s, bf16) for k, s in shapes.items()}
    with S.ShardedWriter(root / who, specs, max_shard_bytes=shard_mb << 20, overwrite=True,
                         metadata={"format": "pt"}) as w:
      for j, (k, s) in enumerate(shapes.items()):
        x = np.random.default_rng(j).standard_normal(s, dtype=np.float32) * 0.02
        if len(s) == 1:
          x += 1.0
        if who != "base":
          x += np.random.default_rng((j, int(who[2:]))).standard_normal(s, dtype=np.float32) * 0.002
        w.write(k, x.astype(bf16))
    (root / who / "config.json").write_text(json.dumps(cfg))
  return sum(int(np.prod(s)) for s in shapes.values())


# Each method's per-model parameters, global parameters, whether it takes base_model, and how many fine-tuned
# models it merges (None: all of them).
METHODS = {
    "task_arithmetic": ({"weight": 1.0}, {"lambda": 0.5}, True, None),
    "linear": ({"weight": 1.0}, {}, False, None),
    "ties": ({"weight": 1.0, "density": 0.5}, {}, True, None),
    "dare_ties": ({"weight": 1.0, "density": 0.5}, {}, True, None),
    "dare_linear": ({"weight": 1.0, "density": 0.5}, {}, True, None),
    "breadcrumbs_ties": ({"weight": 1.0, "density": 0.5, "gamma": 0.01}, {}, True, None),
    "della": ({"weight": 1.0, "density": 0.5, "epsilon": 0.1}, {}, True, None),
    "slerp": ({}, {"t": 0.3}, True, 1),
    "nuslerp": ({"weight": 1.0}, {}, True, 2),
    "multislerp": ({"weight": 1.0}, {}, True, None),
    "karcher": ({}, {}, False, None),
    "sce": ({}, {"select_topk": 0.5}, True, None),
    "ram": ({}, {}, True, None),
    "ramplus_tl": ({}, {}, True, None),
    "nearswap": ({}, {"t": 0.001}, True, 1),
    "arcee_fusion": ({}, {}, True, 1),
    "model_stock": ({}, {}, True, None),
    "passthrough": ({"scale": 0.5}, {}, False, 1),
}


# Layer stacking (mergekit's ``slices``) over the checkpoints' ``layers``: a passthrough "frankenmerge" (all of
# ft0's layers, then the second half of ft1's: 1.5 x layers) and a linear merge of ft0 and ft1 slice by slice with
# other weights per slice.
SLICES = ("slices_passthrough", "slices_linear")


def _slices_yaml(method: str, root: pathlib.Path, layers: int) -> dict:
  half = max(1, layers // 2)
  if method == "slices_passthrough":
    return {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(root / "ft0"), "layer_range": [0, layers]}]},
        {"sources": [{"model": str(root / "ft1"), "layer_range": [layers - half, layers]}]}]}
  return {"merge_method": "linear", "slices": [
      {"sources": [{"model": str(root / f"ft{i}"), "layer_range": [a, b], "parameters": {"weight": w}}
                   for i, w in ((0, wa), (1, 1 - wa))]}
      for (a, b), wa in (((0, half), 0.7), ((half, layers), 0.3)) if a < b]}


def mergekit_yaml(method: str, root: pathlib.Path, models: int, compute: str, layers: int = 2) -> dict:
  """The mergekit YAML of one case; ``compute="float32"``: ``dtype: float32, out_dtype: bfloat16`` (both tools
  compute in float32), ``"native"``: no dtype (mergekit computes in the checkpoints' bf16). ``layers``: the
  checkpoints' layer count (for the ``slices_*`` cases)."""
  if method in SLICES:
    cfg = _slices_yaml(method, root, layers)
    if compute == "float32":
      cfg.update({"dtype": "float32", "out_dtype": "bfloat16"})
    return cfg
  per, glob, with_base, count = METHODS[method]
  n = models if count is None else count
  cfg = {"merge_method": method,
         "models": [{"model": str(root / f"ft{i}"), **({"parameters": dict(per)} if per else {})} for i in range(n)]}
  if compute in ("float32", "keep_all"):
    cfg.update({"dtype": "float32", "out_dtype": "bfloat16"})
  if compute == "keep_all":  # ties only: jaxmerge's fast TIES (every magnitude tied at the threshold kept)
    cfg["jaxmerge"] = {"tie_rule": "keep_all"}
  if with_base:
    cfg["base_model"] = str(root / "base")
  if glob:
    cfg["parameters"] = dict(glob)
  return cfg


def run_case(mode: str, cfg_path: pathlib.Path, out: pathlib.Path, baseline: str | None = None) -> dict:
  """Runs one case in a fresh process; modes ending in ``@base`` import jaxmerge from ``baseline``."""
  shutil.rmtree(out, ignore_errors=True)
  tree = baseline if mode.endswith("@base") else str(ROOT)
  env = {**os.environ, "PYTHONPATH": tree, "JAX_PLATFORMS": "cpu", "JAXMERGE_NO_XLA_CACHE": "1",
         "XLA_FLAGS": ""}
  # cwd: ``python -c`` puts the working directory first on sys.path, ahead of PYTHONPATH
  proc = subprocess.run([sys.executable, "-c", _CHILD, mode.split("@")[0], str(cfg_path), str(out)], env=env,
                        capture_output=True, text=True, cwd=tree)
  if proc.returncode != 0:
    return {"error": (proc.stderr.strip().splitlines() or ["killed"])[-1][:300], "rc": proc.returncode}
  return json.loads(proc.stdout.strip().splitlines()[-1])


def compare(a: pathlib.Path, b: pathlib.Path) -> dict:
  """Max |a - b| over all tensors, in bf16 ulps of b, and the share of differing entries."""
  import numpy as np

  sys.path.insert(0, str(ROOT))
  from jaxmerge.io import safetensors_io as S

  ra, rb = S.open_checkpoint(a), S.open_checkpoint(b)
  if set(ra.keys()) != set(rb.keys()):
    return {"same_names": False}
  worst, differ, total = 0.0, 0, 0
  for k in rb.keys():
    x, y = np.asarray(ra.get(k), np.float32), np.asarray(rb.get(k), np.float32)
    ulp = np.abs(y) * 2.0**-7 + 1e-30
    worst = max(worst, float((np.abs(x - y) / ulp).max()))
    differ += int((x != y).sum())
    total += x.size
  return {"same_names": True, "max_ulps": worst, "differ": differ / total}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--hidden", type=int, default=1024)
  ap.add_argument("--layers", type=int, default=16)
  ap.add_argument("--vocab", type=int, default=32000)
  ap.add_argument("--models", type=int, default=3, help="fine-tuned models")
  ap.add_argument("--methods", default="task_arithmetic,ties",
                  help=f"comma-separated, or 'all': {','.join((*METHODS, *SLICES))}")
  ap.add_argument("--compute", default="float32",
                  help="comma-separated: float32 (dtype: float32, out_dtype: bfloat16 in the YAML), native "
                       "(no dtype: mergekit computes in bf16), keep_all (ties only: float32 plus jaxmerge's "
                       "tie_rule: keep_all, which mergekit's run does not see)")
  ap.add_argument("--baseline", default=None,
                  help="another jaxmerge tree (e.g. a checkout of main) also run on every case, interleaved")
  ap.add_argument("--rounds", type=int, default=2)
  ap.add_argument("--shard-mb", type=int, default=200)
  ap.add_argument("--scaling-mparams", type=float, default=16.0, help="M params per model in the scaling part")
  ap.add_argument("--scaling-rounds", type=int, default=3)
  ap.add_argument("--skip-scaling", action="store_true")
  ap.add_argument("--dir", default=None, help="scratch directory (default: a temporary one)")
  ap.add_argument("--out", default=str(HERE / "results" / "stream.md"))
  args = ap.parse_args()

  scratch = pathlib.Path(args.dir or tempfile.mkdtemp(prefix="jaxmerge-bench-stream-"))
  cfg = llama_config(args.hidden, args.layers, args.vocab)
  modes = ["mergekit", "stream", "memory"] + (["stream@base", "memory@base"] if args.baseline else [])
  methods = [*METHODS, *SLICES] if args.methods == "all" else args.methods.split(",")
  cases = [(m, c) for c in args.compute.split(",") for m in methods if c != "keep_all" or m == "ties"]
  results = {}
  try:
    t0 = time.perf_counter()
    nparams = make_checkpoints(scratch, cfg, args.models, args.shard_mb)
    print(f"wrote {args.models + 1} x {nparams / 1e6:.0f} M params (bf16, {2 * nparams / 1e9:.2f} GB each) in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    for method, compute in cases:
      case = f"{method}/{compute}"
      path = scratch / f"{method}_{compute}.yaml"
      path.write_text(json.dumps(mergekit_yaml(method, scratch, args.models, compute, args.layers)))
      for r in range(args.rounds):
        order = modes[r % len(modes):] + modes[: r % len(modes)]
        for mode in order:
          res = run_case(mode, path, scratch / f"out_{mode}", args.baseline)
          res["load"] = os.getloadavg()[0]
          print(case, mode, json.dumps(res), flush=True)
          results.setdefault((case, mode), []).append(res)
      diffs = {m: compare(scratch / f"out_{m}", scratch / "out_mergekit")
               for m in modes[1:] if (scratch / f"out_{m}").exists() and (scratch / "out_mergekit").exists()}
      results[(case, "diff")] = diffs
      print(case, "diff", json.dumps(diffs), flush=True)
      for mode in modes:
        shutil.rmtree(scratch / f"out_{mode}", ignore_errors=True)
  finally:
    if not args.dir:
      shutil.rmtree(scratch, ignore_errors=True)

  scaling = None
  if not args.skip_scaling:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    proc = subprocess.run([sys.executable, "-c", _SCALING, str(args.scaling_mparams), str(args.scaling_rounds)],
                          env=env, capture_output=True, text=True)
    scaling = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {"error": proc.stderr[-500:]}

  import numpy as np

  def med(xs, key):
    return float(np.median([x[key] for x in xs]))

  lines = [
      "# Merging from disk: jaxmerge vs mergekit, and sharded scaling",
      "",
      f"`python benchmarks/bench_stream.py --hidden {args.hidden} --layers {args.layers} --vocab {args.vocab} "
      f"--models {args.models} --methods {args.methods} --compute {args.compute} --rounds {args.rounds}"
      f"{' --baseline ' + args.baseline if args.baseline else ''}` on {platform.machine()}, "
      f"{os.cpu_count()} CPU cores, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. **The machine was shared "
      "with other jobs** (load average during the cases below), so absolute times are noisy; every case ran "
      f"{args.rounds} times in a rotating order and the table shows medians.",
      "",
      f"Model: random Llama-style causal LM, hidden {cfg['hidden_size']}, intermediate {cfg['intermediate_size']}, "
      f"{cfg['num_hidden_layers']} layers, vocabulary {cfg['vocab_size']}, untied: **{nparams / 1e6:.0f} M "
      f"parameters**, bf16 ({2 * nparams / 1e9:.2f} GB per model), a pretrained model and {args.models} fine-tuned "
      f"ones, sharded safetensors ({args.shard_mb} MiB shards). The same mergekit YAML for both tools: compute "
      "`float32` sets `dtype: float32, out_dtype: bfloat16` (both compute in float32), `native` sets no dtype "
      "(mergekit computes in bf16, and so does jaxmerge by default). Time: the merge call, including reading, "
      "writing and (jaxmerge) XLA compilation without a persistent cache. Peak: increase of the process's peak RSS "
      "during the call." + (f" `@base` rows: the same commands with jaxmerge imported from `{args.baseline}`."
                            if args.baseline else ""),
      "",
      "| method / compute | tool | time (s) | peak RSS (GB) | speed vs mergekit | memory vs mergekit | load avg | output vs mergekit |",
      "|---|---|---|---|---|---|---|---|",
  ]
  for method in [f"{m}/{c}" for m, c in cases]:
    ref = results.get((method, "mergekit"), [])
    ok_ref = [x for x in ref if "error" not in x]
    for mode in modes:
      xs = results.get((method, mode), [])
      ok = [x for x in xs if "error" not in x]
      name = {"mergekit": "mergekit 0.1.5 `run_merge`", "stream": "`jaxmerge merge --stream`",
              "memory": "`jaxmerge merge --no-stream`", "stream@base": "`jaxmerge merge --stream` @base",
              "memory@base": "`jaxmerge merge --no-stream` @base"}[mode]
      if not ok:
        lines.append(f"| {method} | {name} | failed: {xs[0].get('error') if xs else 'not run'} | | | | | |")
        continue
      t, p = med(ok, "seconds"), med(ok, "peak")
      speed = f"{med(ok_ref, 'seconds') / t:.2f}x" if ok_ref else "-"
      memr = f"{p / med(ok_ref, 'peak'):.2f}x" if ok_ref else "-"
      d = results.get((method, "diff"), {}).get(mode)
      dtext = "-" if mode == "mergekit" else (
          "names differ" if d and not d["same_names"] else
          f"max {d['max_ulps']:.1f} bf16 ulp, {100 * d['differ']:.3f}% entries differ" if d else "-")
      lines.append(f"| {method} | {name} | {t:.1f} | {p / 1e9:.2f} | {speed} | {memr} | "
                   f"{med(ok, 'load'):.1f} | {dtext} |")
  if scaling and "rows" in scaling:
    lines += [
        "",
        f"## Sharded merge: 1 to 8 fake CPU devices",
        "",
        f"`jaxmerge.sharding.make_sharded_merger` on {scaling['tasks']} task vectors of "
        f"{scaling['params_per_model'] / 1e6:.1f} M float32 parameters (8 matrices), stack sharded along the task "
        f"axis over a task mesh of N devices ({scaling['tasks']}/N tasks per device); inputs placed on the mesh "
        f"before timing; median and best of {args.scaling_rounds} calls after the first (compiling) one. The fake "
        "devices share the same 2 cores, so this measures the partitioned program (collectives included), not "
        "added hardware; max |sharded - unsharded| shows the results agree.",
        "",
        "| method | devices | tasks per device | first call (s, compile) | median (s) | best (s) | vs 1 device (median) | max abs diff vs jm.merge |",
        "|---|---|---|---|---|---|---|---|",
    ]
    base = {}
    for r in scaling["rows"]:
      if r["devices"] == 1:
        base[r["method"]] = r["median"]
      lines.append(f"| {r['method']} | {r['devices']} | {r['tasks_per_device']} | {r['first']:.2f} | {r['median']:.3f} | "
                   f"{r['best']:.3f} | {base[r['method']] / r['median']:.2f}x | {r['max_abs_diff']:.1e} |")
  elif scaling:
    lines += ["", f"Scaling part failed: {scaling['error']}"]
  text = "\n".join(lines) + "\n"
  pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  pathlib.Path(args.out).write_text(text)
  print(text)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
