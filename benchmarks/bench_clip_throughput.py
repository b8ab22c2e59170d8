"""Evaluation throughput (images/s) of the CLIP vision tower: jaxmerge's Flax model vs transformers' PyTorch one.

Same random weights (a transformers ``CLIPVisionModel`` at ViT-B/32 sizes, loaded into jaxmerge through
:mod:`jaxmerge.io.hf`), same batch of preprocessed float32 images, float32 math in both (PyTorch CPU matmuls are
full float32; jaxmerge runs with ``precision="highest"``), the pooled output as result (outputs are checked to
agree). Both use every core of the machine (``torch.set_num_threads``; XLA's thread pool).

Timing: ``--rounds`` rounds, each timing one batch of every implementation back to back, in a rotating order.
On a shared machine the load drifts, so the table reports the median and best time per batch and the median
of the per-round ratios (paired, hence robust to drift). Compilation (jaxmerge's first call) is reported apart.

    python benchmarks/bench_clip_throughput.py                    # ViT-B/32, batch 32
    python benchmarks/bench_clip_throughput.py --model b16 --batch 16 --rounds 10
    python benchmarks/bench_clip_throughput.py --xla-flags=--xla_cpu_multi_thread_eigen=false

Prints a markdown table (``--write FILE`` also saves it).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]

SIZES = {  # hidden, mlp, layers, heads, patch
    "b32": (768, 3072, 12, 12, 32),
    "b16": (768, 3072, 12, 12, 16),
    "l14": (1024, 4096, 24, 16, 14),
}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", choices=sorted(SIZES), default="b32")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--rounds", type=int, default=7)
  p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
  p.add_argument("--xla-flags", default=None, help="XLA_FLAGS for the jaxmerge runs (set before importing jax)")
  p.add_argument("--write", default=None, help="also write the table to this file")
  args = p.parse_args(argv)
  if args.xla_flags:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + args.xla_flags).strip()
  sys.path.insert(0, str(ROOT))

  import jax
  import numpy as np
  import torch
  import transformers

  from jaxmerge.data.preprocess import normalize
  from jaxmerge.io import hf
  from jaxmerge.models import clip

  torch.set_num_threads(args.threads)
  hidden, mlp, layers, heads, patch = SIZES[args.model]
  tcfg = transformers.CLIPVisionConfig(hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                                       num_attention_heads=heads, image_size=224, patch_size=patch,
                                       hidden_act="quick_gelu")
  torch.manual_seed(0)
  models = {"sdpa": transformers.CLIPVisionModel(tcfg).eval()}
  ecfg = transformers.CLIPVisionConfig.from_dict(tcfg.to_dict())
  ecfg._attn_implementation = "eager"
  models["eager"] = transformers.CLIPVisionModel(ecfg).eval()
  assert models["sdpa"].config._attn_implementation == "sdpa" and models["eager"].config._attn_implementation == "eager"
  models["eager"].load_state_dict(models["sdpa"].state_dict())
  cfg = clip.ClipConfig.from_hf(tcfg)
  params = jax.device_put(hf.from_hf_state_dict(cfg, {k: v.numpy() for k, v in models["sdpa"].state_dict().items()}))

  rng = np.random.default_rng(0)
  u8 = rng.integers(0, 256, (args.batch, 224, 224, 3), dtype=np.uint8)
  x = normalize(u8)  # preprocessed float32 [B, 224, 224, 3]
  xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
  xj, uj = jax.device_put(x), jax.device_put(u8)

  encode = jax.jit(lambda p, im: clip.encode_image(cfg, p, im))
  encode_u8 = jax.jit(lambda p, im: clip.encode_image(cfg, p, normalize(im)))  # what jaxmerge's evaluation runs
  t = time.perf_counter()
  out_j = np.asarray(encode(params, xj).block_until_ready())
  compile_s = time.perf_counter() - t
  t = time.perf_counter()
  encode_u8(params, uj).block_until_ready()
  compile_u8_s = time.perf_counter() - t
  with torch.inference_mode():
    out_t = models["sdpa"](pixel_values=xt).pooler_output.numpy()
    models["eager"](pixel_values=xt)
  diff = float(np.abs(out_j - out_t).max())

  runs = {
      "transformers CLIPVisionModel (PyTorch, sdpa attention)": lambda: models["sdpa"](pixel_values=xt),
      "transformers CLIPVisionModel (PyTorch, eager attention)": lambda: models["eager"](pixel_values=xt),
      "jaxmerge (Flax NNX, jit), float32 input": lambda: encode(params, xj).block_until_ready(),
      "jaxmerge (Flax NNX, jit), uint8 input + on-device normalize": lambda: encode_u8(params, uj).block_until_ready(),
  }
  names = list(runs)
  times = {n: [] for n in names}
  with torch.inference_mode():
    for r in range(args.rounds):
      order = names[r % len(names):] + names[: r % len(names)]
      for n in order:
        t = time.perf_counter()
        runs[n]()
        times[n].append(time.perf_counter() - t)
  ref = times[names[0]]
  lines = [
      f"CLIP {args.model.upper()} vision tower, batch {args.batch}, float32, {args.rounds} rounds; "
      f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
      f"({args.threads} threads), jax {jax.__version__}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '') or '(none)'}; "
      f"load average at the end {os.getloadavg()[0]:.1f}.",
      "",
      "| implementation | median ms/batch | best ms/batch | images/s (median) | images/s (best) | speed vs PyTorch sdpa (median of paired ratios) |",
      "|---|---|---|---|---|---|",
  ]
  for n in names:
    ts = np.asarray(times[n])
    ratio = float(np.median(np.asarray(ref) / ts))
    lines.append(f"| {n} | {1e3 * np.median(ts):.0f} | {1e3 * ts.min():.0f} | {args.batch / np.median(ts):.1f} | "
                 f"{args.batch / ts.min():.1f} | {ratio:.2f}x |")
  lines += ["", f"jaxmerge compilation (first call): {compile_s:.1f} s (float input), {compile_u8_s:.1f} s (uint8 input). "
                f"Max |jaxmerge - PyTorch| on the pooled output: {diff:.2e}."]
  table = "\n".join(lines)
  print(table)
  if args.write:
    pathlib.Path(args.write).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.write).write_text(table + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
