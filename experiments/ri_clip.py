"""Resolving Interference (RI) on the real CLIP suites (ViT-B/32 on the 8 TALL tasks by default).

::

    python experiments/ri_clip.py --model b32 --suite 8 --aux hf:ILSVRC/imagenet-1k:val --cache ~/.cache/jaxmerge \\
        --out results/ri-clip-vit-b32-tall8
    python experiments/ri_clip.py --model b32 --suite 8 --aux /data/unlabeled_images --out DIR   # a local folder

What it does (issue 8, acceptance 3; the same protocol as ``experiments/ri_offline.py``):

1. loads the pretrained CLIP and the fine-tuned experts named by the YAML config of
   ``experiments/clip_suites.py`` (FusionBench's ``tanganke/clip-vit-base-patch32_<task>``), and the zero-shot
   heads built from the pretrained text tower (cached);
2. reads ``--n-aux`` unlabeled auxiliary images from ``--aux``: a local folder (``DIR/<any>/<image>``; labels
   ignored) or ``hf:<dataset id>[:split]`` (column ``image``). None of them may be task data;
3. disentangles every expert with :func:`jaxmerge.ri.disentangle` on them: features = normalized CLIP image
   embeddings (``visual_projection`` frozen), heads = zero-shot class embeddings times CLIP's logit scale,
   so the logits are the zero-shot logits. The adapted vision towers are saved as ``CLIPVisionModel``
   directories under ``OUT/ri-experts/<task>``;
4. runs ``experiments/clip_suites.py``'s evaluation twice with the config's methods: on the original experts
   (``OUT/without-ri``) and on the adapted ones (``OUT/with-ri``), and writes ``OUT/ri.md`` with the gain
   per method.

Not done here yet: the unseen-domain evaluation (the offline suite's shifted test sets).

Paper to compare with (Ramesh et al., arXiv 2603.13467): RI improves state-of-the-art merging by up to 3.8
points and generalization to unseen domains by up to 2.3 points on CLIP ViT suites.

Needs the weights and the datasets locally (Hugging Face cache) or network access, and realistically a GPU:
one RI step runs three forwards and one backward of eight ViT-B/32 towers.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

import clip_suites as cs  # noqa: E402

# RI settings (see jaxmerge.ri.disentangle): the offline benchmark's, with beta for CLIP's logit scale 100.
RI_CLIP_DEFAULTS = {"steps": 200, "learning_rate": 1e-5, "beta": None, "mode": "independent", "n_aux": 1024,
                    "batch_size": 32, "seed": 0, "task_loop": "map"}


def aux_images(spec: str, n: int, preprocess) -> np.ndarray:
  """``n`` unlabeled uint8 images ``[n, S, S, 3]`` from a folder or ``hf:<id>[:split]``."""
  from jaxmerge.data import datasets as D

  if spec.startswith("hf:"):
    parts = spec[3:].split(":")
    source = D.load_hf(parts[0], parts[1] if len(parts) > 1 else "test")
  else:
    source = D.FolderSource(spec)
  if len(source) == 0:
    raise ValueError(f"the auxiliary source {spec!r} is empty")
  images = [b["image"] for b in D.batches(source, 64, preprocess=preprocess, limit=n, num_workers=8)]
  return np.concatenate(images)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", choices=sorted(cs.CONFIGS), default="b32")
  p.add_argument("--suite", default="8", help="8, 14 or 20 (TALL8/14/20)")
  p.add_argument("--methods", default="task_arithmetic,ties,tsv_m,iso_cts")
  p.add_argument("--aux", required=True, help="unlabeled auxiliary images: a folder or hf:<dataset id>[:split]")
  p.add_argument("--n-aux", type=int, default=RI_CLIP_DEFAULTS["n_aux"])
  p.add_argument("--steps", type=int, default=RI_CLIP_DEFAULTS["steps"])
  p.add_argument("--learning-rate", type=float, default=RI_CLIP_DEFAULTS["learning_rate"])
  p.add_argument("--beta", type=float, default=RI_CLIP_DEFAULTS["beta"],
                 help="preserve weight (default: the heads' mean squared row norm, i.e. logit_scale^2)")
  p.add_argument("--mode", choices=("independent", "joint"), default=RI_CLIP_DEFAULTS["mode"])
  p.add_argument("--seed", type=int, default=RI_CLIP_DEFAULTS["seed"])
  p.add_argument("--data", default=None, help="local datasets: DIR/<task>")
  p.add_argument("--cache", default=None)
  p.add_argument("--limit", type=int, default=None)
  p.add_argument("--out", required=True)
  args = p.parse_args(argv)

  import jax
  import transformers

  import jaxmerge as jm
  from jaxmerge.bench.ri_runner import aux_batches
  from jaxmerge.data.preprocess import Preprocess
  from jaxmerge.data.tasks import TASKS, get_suite
  from jaxmerge.eval.zeroshot import ClipZeroShot, clip_embed_fn, l2_normalize
  from jaxmerge.io import hf
  from jaxmerge.ri import disentangle

  out = pathlib.Path(args.out)
  suite = f"TALL{args.suite}" if args.suite.isdigit() else args.suite
  cfg = cs.load_config(ROOT / "experiments" / "configs" / cs.CONFIGS[args.model], suite=suite, data=args.data,
                       cache=args.cache, limit=args.limit)
  methods = [m.strip() for m in args.methods.split(",") if m.strip()]
  cfg["methods"] = {m: (cfg.get("methods") or {}).get(m, {}) for m in methods}
  tasks = list(get_suite(suite))
  t0 = time.perf_counter()
  pcfg, pparams = hf.load_clip(cfg["pretrained"])
  pre_dir = hf.resolve(cfg["pretrained"])
  preprocess = Preprocess.from_pretrained(pre_dir, default_size=pcfg.image_size)
  experts = [hf.load_clip(cs._expert_path(cfg, t), like=pcfg)[1]["vision_model"] for t in tasks]
  cache = pathlib.Path(cfg["cache"]).expanduser() if cfg.get("cache") else None
  zs = ClipZeroShot(pcfg, pparams, tokenizer=transformers.CLIPTokenizer.from_pretrained(str(pre_dir)),
                    heads_cache=cache / "heads" / str(cfg.get("name", pcfg.vision_width)) if cache else None,
                    preprocess=preprocess, tasks={t: (TASKS[t].classnames, TASKS[t].templates) for t in tasks})
  scale = float(np.exp(np.asarray(pparams["logit_scale"])))
  heads = [zs.build_heads([t])[t] * scale for t in tasks]  # zero-shot logits = scale * cos
  embed = clip_embed_fn(pcfg, preprocess)
  proj = pparams["visual_projection"]

  def forward(vision, images):
    return l2_normalize(embed({"vision_model": vision, "visual_projection": proj}, images))

  aux = aux_images(args.aux, args.n_aux, preprocess)
  beta = args.beta if args.beta is not None else float(np.mean([np.mean(np.sum(h**2, -1)) for h in heads]))
  t1 = time.perf_counter()
  adapted, hist = disentangle(pparams["vision_model"], experts, heads,
                              aux_batches(aux, RI_CLIP_DEFAULTS["batch_size"], seed=args.seed), forward_fn=forward,
                              mode=args.mode, beta=beta, steps=args.steps, learning_rate=args.learning_rate,
                              task_loop=RI_CLIP_DEFAULTS["task_loop"], key=jax.random.key(args.seed),
                              layout=jm.filters.flax_layout)
  ri_seconds = time.perf_counter() - t1
  ri_dir = out / "ri-experts"
  for t, v in zip(tasks, adapted):
    hf.save_clip_vision(ri_dir / t, pcfg, {"vision_model": v})
  without = cs.run(cfg, out / "without-ri")
  with_ri = cs.run({**cfg, "experts": str(ri_dir / "{task}")}, out / "with-ri")
  rows_b = {r["method"]: r["average"] for r in without["rows"]}
  rows_w = {r["method"]: r["average"] for r in with_ri["rows"]}
  lines = [f"RI on {cfg.get('name')} {suite} (aux {args.aux}, {args.n_aux} images, {args.steps} steps, beta {beta:.4g},"
           f" RI {ri_seconds:.0f} s)", "", "| method | without RI | with RI | gain |", "|---|---|---|---|"]
  for m in rows_b:
    if m in rows_w:
      lines.append(f"| {m} | {100 * rows_b[m]:.2f} | {100 * rows_w[m]:.2f} | {100 * (rows_w[m] - rows_b[m]):+.2f} |")
  lines += ["", "Paper (Ramesh et al., 2026): up to +3.8 points over state-of-the-art merging, +2.3 on unseen domains."]
  (out / "ri.md").write_text("\n".join(lines) + "\n")
  (out / "ri.json").write_text(json.dumps({"ri_seconds": ri_seconds, "beta": beta, "args": vars(args),
                                           "history": {k: np.asarray(v).tolist() for k, v in hist.items()},
                                           "total_seconds": time.perf_counter() - t0}, indent=1))
  print("\n".join(lines))
  return 0


if __name__ == "__main__":
  sys.exit(main())
