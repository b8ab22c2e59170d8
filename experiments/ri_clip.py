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
   (``OUT/without-ri``) and on the adapted ones (``OUT/with-ri``);
5. generalization to unseen domains (issue 8, acceptance 2 (d)): both evaluations also run every merged model
   (and the pretrained model and the experts) on held-out shifted variants of each task's test split, the
   offline experiment's shift family (:func:`jaxmerge.data.synthetic.shift_images`, severity 1): ``noise``
   (Gaussian pixel noise, sigma 0.1), ``blur`` (3x3 box blur), ``contrast`` (halved around the image mean) and
   ``tint`` (random per-image channel gains in 1 +- 0.35). They are applied to the real test images after
   loading, resizing and cropping; test image ``k`` gets shift ``k mod 4`` (``--shifts`` chooses the list,
   ``--shifts none`` skips this part);
6. writes ``OUT/ri.md`` (in-domain and unseen-domain tables: accuracy without and with RI and the gain per
   method, the unseen-domain gain also per shift) and ``OUT/ri.json`` (the same numbers per task, RI's
   settings, loss history and time).

Paper to compare with (Ramesh et al., "Resolving Interference (RI): Disentangling Models for Improved Model
Merging", arXiv 2603.13467, Findings): RI improves state-of-the-art merging by up to 3.8 points and
generalization to unseen domains by up to 2.3 points on CLIP ViT suites. The paper's unseen domains are its
own; the shifts here are the offline suite's corruption family, so compare the sign and size of the gain.

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

SHIFTS = ("noise", "blur", "contrast", "tint")  # jaxmerge.data.synthetic.SHIFTS (checked in main)

from jaxmerge.tta.methods import RIConfig  # noqa: E402

# RI settings: the library's defaults (jaxmerge.tta.methods.RIConfig, also the offline benchmark's; beta None =
# auto_beta, logit_scale^2 for CLIP heads), plus the seed and one expert at a time (task_loop "map": the same
# result as "vmap" with T times less activation memory, for ViT towers).
RI_CLIP_DEFAULTS = {**RIConfig()._asdict(), "seed": 0, "task_loop": "map"}


def aux_images(spec: str, n: int, preprocess, *, workers: int = 8) -> np.ndarray:
  """``n`` unlabeled uint8 images ``[n, S, S, 3]`` from a folder or ``hf:<id>[:split]``.

  Args:
    spec: an image folder (``DIR/<any>/<image>``) or ``hf:<dataset id>[:split]`` (column ``image``).
    n: at most this many images.
    preprocess: resizing and cropping (``S = preprocess.crop``).
    workers: decoding threads.

  Returns:
    uint8 ``[n, S, S, 3]``.
  """
  from jaxmerge.data import datasets as D

  if spec.startswith("hf:"):
    parts = spec[3:].split(":")
    source = D.load_hf(parts[0], parts[1] if len(parts) > 1 else "test")
  else:
    source = D.FolderSource(spec)
  if len(source) == 0:
    raise ValueError(f"the auxiliary source {spec!r} is empty")
  images = [b["image"] for b in D.batches(source, 64, preprocess=preprocess, limit=n, num_workers=workers)]
  return np.concatenate(images)


def ri_report(without: dict, with_ri: dict, shifts) -> tuple[list[str], dict]:
  """The markdown tables and the JSON summary of the two ``clip_suites.run`` results.

  Args:
    without: ``clip_suites.run``'s results on the original experts.
    with_ri: the same on the RI-adapted experts.
    shifts: the shift names of the unseen-domain evaluation (empty: none was run).

  Returns:
    ``(lines, summary)``: markdown lines (in-domain table, then the unseen-domain table when ``shifts``) and
    ``{"tasks", "shifts", "rows": {row: {"without_ri": ..., "with_ri": ...}}}`` with, per side, ``average``,
    ``accuracy`` per task and (with ``shifts``) ``shifted`` (``average``, ``accuracy`` per task, ``per_shift``).
  """
  tasks = list(without["tasks"])
  b_rows = {r["method"]: r for r in without["rows"]}
  w_rows = {r["method"]: r for r in with_ri["rows"]}
  keep = ("average", "accuracy", "shifted")
  rows = {m: {"without_ri": {k: b_rows[m][k] for k in keep if k in b_rows[m]},
              "with_ri": {k: w_rows[m][k] for k in keep if k in w_rows[m]}} for m in b_rows if m in w_rows}
  merged = [m for m in rows if m not in ("pretrained", "experts")]
  lines = ["In-domain: average accuracy (%) over the tasks' test sets.", "",
           "| method | without RI | with RI | gain |", "|---|---|---|---|"]
  for m in merged:
    b, w = rows[m]["without_ri"]["average"], rows[m]["with_ri"]["average"]
    lines.append(f"| {m} | {100 * b:.2f} | {100 * w:.2f} | {100 * (w - b):+.2f} |")
  lines.append(f"| pretrained / experts (no RI) | {100 * rows['pretrained']['without_ri']['average']:.2f} / "
               f"{100 * rows['experts']['without_ri']['average']:.2f} | | |")
  if shifts:
    lines += ["", f"Unseen domains: average accuracy (%) on the shifted test sets (test image k gets shift k mod "
              f"{len(shifts)} of: {', '.join(shifts)}; severity 1).", "",
              "| method | without RI | with RI | gain | " + " | ".join(f"gain on {k}" for k in shifts) + " |",
              "|---|---|---|---|" + "---|" * len(shifts)]
    for m in merged:
      b, w = rows[m]["without_ri"]["shifted"], rows[m]["with_ri"]["shifted"]
      per = [100 * np.mean([w["per_shift"][t][k] - b["per_shift"][t][k] for t in tasks]) for k in shifts]
      lines.append(f"| {m} | {100 * b['average']:.2f} | {100 * w['average']:.2f} | "
                   f"{100 * (w['average'] - b['average']):+.2f} | " + " | ".join(f"{g:+.2f}" for g in per) + " |")
    lines.append(f"| pretrained / experts (no RI) | {100 * rows['pretrained']['without_ri']['shifted']['average']:.2f}"
                 f" / {100 * rows['experts']['without_ri']['shifted']['average']:.2f} | | | |" + " |" * len(shifts))
  lines += ["", "Paper (Ramesh et al., arXiv 2603.13467, Findings): up to +3.8 points over state-of-the-art merging, "
            "up to +2.3 on unseen domains (its own unseen domains; the shifts here are the offline suite's)."]
  return lines, {"tasks": tasks, "shifts": list(shifts), "rows": rows}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  src = p.add_mutually_exclusive_group()
  src.add_argument("--model", choices=sorted(cs.CONFIGS), default="b32")
  src.add_argument("--config", default=None, help="a YAML config (default: the --model's)")
  p.add_argument("--pretrained", default=None, help="override the config's pretrained checkpoint")
  p.add_argument("--experts", default=None, help="override the config's experts (a format string with {task})")
  p.add_argument("--suite", default="8", help="8, 14 or 20 (TALL8/14/20) or comma-separated tasks")
  p.add_argument("--methods", default="task_arithmetic,ties,tsv_m,iso_cts")
  p.add_argument("--aux", required=True, help="unlabeled auxiliary images: a folder or hf:<dataset id>[:split]")
  p.add_argument("--n-aux", type=int, default=RI_CLIP_DEFAULTS["num_aux"])
  p.add_argument("--aux-batch-size", type=int, default=RI_CLIP_DEFAULTS["batch_size"])
  p.add_argument("--steps", type=int, default=RI_CLIP_DEFAULTS["steps"])
  p.add_argument("--learning-rate", type=float, default=RI_CLIP_DEFAULTS["learning_rate"])
  p.add_argument("--beta", type=float, default=RI_CLIP_DEFAULTS["beta"],
                 help="preserve weight (default: the heads' mean squared row norm, i.e. logit_scale^2)")
  p.add_argument("--mode", choices=("independent", "joint"), default=RI_CLIP_DEFAULTS["mode"])
  p.add_argument("--seed", type=int, default=RI_CLIP_DEFAULTS["seed"])
  p.add_argument("--data", default=None, help="local datasets: DIR/<task>")
  p.add_argument("--cache", default=None)
  p.add_argument("--limit", type=int, default=None)
  p.add_argument("--batch-size", type=int, default=None, help="evaluation batch size (default: the config's)")
  p.add_argument("--workers", type=int, default=None, help="image decoding threads (default: the config's)")
  p.add_argument("--shifts", default=",".join(SHIFTS),
                 help="unseen domains: comma-separated jaxmerge.data.synthetic.SHIFTS, or 'none'")
  p.add_argument("--shift-seed", type=int, default=0)
  p.add_argument("--out", required=True)
  args = p.parse_args(argv)

  import jax

  import jaxmerge as jm
  from jaxmerge.bench.ri_runner import aux_batches
  from jaxmerge.data.preprocess import Preprocess
  from jaxmerge.data.tasks import TASKS, get_suite
  from jaxmerge.eval.zeroshot import ClipZeroShot, clip_embed_fn, l2_normalize, load_tokenizer
  from jaxmerge.io import hf
  from jaxmerge.ri import disentangle

  from jaxmerge.data import synthetic

  if tuple(SHIFTS) != tuple(synthetic.SHIFTS):
    raise AssertionError(f"ri_clip.SHIFTS {SHIFTS} is out of date with jaxmerge.data.synthetic.SHIFTS")
  out = pathlib.Path(args.out)
  shifts = [] if args.shifts.strip().lower() == "none" else [k.strip() for k in args.shifts.split(",") if k.strip()]
  suite = (args.suite.split(",") if "," in args.suite or not (args.suite.isdigit() or args.suite.startswith("TALL"))
           else f"TALL{args.suite}" if args.suite.isdigit() else args.suite)
  cfg = cs.load_config(args.config or ROOT / "experiments" / "configs" / cs.CONFIGS[args.model], suite=suite,
                       data=args.data, cache=args.cache, limit=args.limit, pretrained=args.pretrained,
                       experts=args.experts, batch_size=args.batch_size, workers=args.workers)
  cfg.update(shifts=shifts, shift_seed=args.shift_seed)
  methods = [m.strip() for m in args.methods.split(",") if m.strip()]
  cfg["methods"] = {m: (cfg.get("methods") or {}).get(m, {}) for m in methods}
  tasks = list(suite) if isinstance(suite, list) else list(get_suite(suite))
  t0 = time.perf_counter()
  pcfg, pparams = hf.load_clip(cfg["pretrained"])
  pre_dir = hf.resolve(cfg["pretrained"])
  preprocess = Preprocess.from_pretrained(pre_dir, default_size=pcfg.image_size)
  experts = [hf.load_clip(cs._expert_path(cfg, t), like=pcfg)[1]["vision_model"] for t in tasks]
  cache = pathlib.Path(cfg["cache"]).expanduser() if cfg.get("cache") else None
  zs = ClipZeroShot(pcfg, pparams, tokenizer=load_tokenizer(pre_dir, pcfg),
                    heads_cache=cache / "heads" if cache else None,
                    preprocess=preprocess, tasks={t: (TASKS[t].classnames, TASKS[t].templates) for t in tasks})
  scale = float(np.exp(np.asarray(pparams["logit_scale"])))
  heads = [zs.build_heads([t])[t] * scale for t in tasks]  # zero-shot logits = scale * cos
  embed = clip_embed_fn(pcfg, preprocess)
  proj = pparams["visual_projection"]

  def forward(vision, images):
    return l2_normalize(embed({"vision_model": vision, "visual_projection": proj}, images))

  aux = aux_images(args.aux, args.n_aux, preprocess, workers=int(cfg.get("workers", 8)))
  # auto_beta, written out so the report can print it; joint mode has no preserve term, hence no beta.
  beta = args.beta if args.beta is not None else float(np.mean([np.mean(np.sum(h**2, -1)) for h in heads]))
  if args.mode == "joint":
    if args.beta is not None:
      raise SystemExit("--beta has no effect in joint mode (its loss has no preserve term)")
    beta = None
  t1 = time.perf_counter()
  adapted, hist = disentangle(pparams["vision_model"], experts, heads,
                              aux_batches(aux, args.aux_batch_size, seed=args.seed), forward_fn=forward,
                              mode=args.mode, beta=beta, steps=args.steps, learning_rate=args.learning_rate,
                              task_loop=RI_CLIP_DEFAULTS["task_loop"], key=jax.random.key(args.seed),
                              layout=jm.filters.flax_layout)
  ri_seconds = time.perf_counter() - t1
  ri_dir = out / "ri-experts"
  for t, v in zip(tasks, adapted):
    hf.save_clip_vision(ri_dir / t, pcfg, {"vision_model": v})
  without = cs.run(cfg, out / "without-ri")
  with_ri = cs.run({**cfg, "experts": str(ri_dir / "{task}")}, out / "with-ri")
  lines, summary = ri_report(without, with_ri, shifts)
  head = (f"RI on {cfg.get('name')} {suite} (aux {args.aux}, {args.n_aux} images, {args.steps} steps, beta "
          f"{'none (joint)' if beta is None else f'{beta:.4g}'},"
          f" RI {ri_seconds:.0f} s)")
  lines = [head, ""] + lines
  (out / "ri.md").write_text("\n".join(lines) + "\n")
  (out / "ri.json").write_text(json.dumps({**summary, "ri_seconds": ri_seconds, "beta": beta, "args": vars(args),
                                           "history": {k: np.asarray(v).tolist() for k, v in hist.items()},
                                           "total_seconds": time.perf_counter() - t0}, indent=1))
  print("\n".join(lines))
  return 0


if __name__ == "__main__":
  sys.exit(main())
