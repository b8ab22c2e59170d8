"""A full-size rehearsal of the real CLIP pipeline with local files only: what a user with local checkpoints runs.

::

    python experiments/clip_rehearsal.py --work /tmp/rehearsal                  # ViT-B/32 size (2.7 GB experts)
    python experiments/clip_rehearsal.py --work /tmp/rehearsal-small --layers 2 --limit 16   # a quick check

It writes, under ``--work``:

- ``pretrained/``: a random-weight ``CLIPModel`` with ViT-B/32's configuration (151M parameters; transformers'
  ``CLIPConfig`` defaults), saved with ``save_pretrained``, plus a ``CLIPTokenizer`` over a small local
  vocabulary (no network: OpenAI's BPE vocabulary is not downloaded) and a ``preprocessor_config.json``;
- ``experts/<task>/``: one ``CLIPVisionModel`` per TALL8 task (the pretrained tower plus Gaussian noise, a
  stand-in for fine-tuning), alternately with transformers 5's unprefixed keys (``save_pretrained``) and with
  ``vision_model.``-prefixed keys (:func:`jaxmerge.io.hf.save_clip_vision`);
- ``data/<task>``: ``--limit`` test images per task with the task's real class count, six tasks as
  ``save_to_disk`` datasets and two as image folders (eurosat with directories named after its classes,
  gtsrb with numbered directories), JPEG and PNG, modes RGB/L/RGBA/P, sizes from 28x28 to 1024x768.

Then it runs ``experiments/clip_suites.py`` (``--methods``; heads and images cached under ``work/cache``), merges
the standard layout with ``jaxmerge merge`` (``CLIPModel`` base, ``CLIPVisionModel`` experts) in memory and
streamed, checks that both outputs are bit-identical and equal the float64 task-arithmetic tower, and that
``jaxmerge eval`` of the merged directory reproduces the suite's row. ``results/rehearsal.json`` records every step's
wall time and the process's peak RSS (each ``jaxmerge merge`` runs in its own process, so its peak is its own).
``--merge-memory ties,tsv_m`` only measures merges: each method streamed (the suite's engine) and in memory
(:func:`jaxmerge.merge`), each in a fresh process, with its peak RSS over the experts' size.
``--layers N`` builds both towers with N layers instead of 12 (same widths, image size and patch size): a
reduced-size run for small machines. The accuracies mean nothing (random weights); what is rehearsed is that
every step runs, agrees with the others, and how long and how much memory it takes.
"""

from __future__ import annotations

import argparse
import io
import json
import pathlib
import resource
import shutil
import string
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout
  sys.path.insert(0, str(ROOT))

FOLDER_TASKS = {"eurosat": "by name", "gtsrb": "by number"}
MODES = ("RGB", "L", "RGBA", "P")
SIZES = ((28, 28), (1024, 768), (224, 224), (300, 200), (64, 96), (500, 375))


def _tokenizer(save_dir: pathlib.Path):
  """A CLIPTokenizer over lower-case letters, digits and punctuation (every prompt tokenizes, character-wise)."""
  import transformers

  chars = sorted(set(string.ascii_lowercase + string.digits + ".,:;!?'\"-()&/"))
  vocab = {c: i for i, c in enumerate(chars)}
  vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
  vocab["<|startoftext|>"] = len(vocab)
  vocab["<|endoftext|>"] = len(vocab)
  tok = transformers.CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
  tok.save_pretrained(str(save_dir))
  return tok


def build_models(work: pathlib.Path, tasks, layers: int, noise: float, seed: int) -> tuple[pathlib.Path, dict]:
  """The pretrained CLIPModel directory and ``{task: expert directory}``."""
  import torch
  import transformers

  from jaxmerge.io import hf

  torch.manual_seed(seed)
  pre = work / "pretrained"
  tok = _tokenizer(pre)
  cfg = transformers.CLIPConfig()  # ViT-B/32's sizes
  cfg.vision_config.num_hidden_layers = cfg.text_config.num_hidden_layers = layers
  # pooling reads the end-of-text token: the config's ids must be the tokenizer's
  cfg.text_config.eos_token_id, cfg.text_config.bos_token_id = tok.eos_token_id, tok.bos_token_id
  cfg.text_config.pad_token_id = tok.pad_token_id
  model = transformers.CLIPModel(cfg).eval()
  model.save_pretrained(pre)
  transformers.CLIPImageProcessorPil(size={"shortest_edge": 224},
                                     crop_size={"height": 224, "width": 224}).save_pretrained(pre)
  experts = {}
  for i, t in enumerate(tasks):
    d = work / "experts" / t
    vision = transformers.CLIPVisionModel(cfg.vision_config).eval()
    vision.load_state_dict(model.vision_model.state_dict(), strict=False)
    with torch.no_grad():
      for p in vision.parameters():
        p.add_(noise * torch.randn_like(p))
    vision.save_pretrained(d)  # transformers 5: keys without "vision_model."
    if i % 2:  # the other spelling: rewrite with the prefix
      vcfg, params = hf.load_clip(d)
      shutil.rmtree(d)
      hf.save_clip_vision(d, vcfg, params)
    experts[t] = d
    del vision
  return pre, experts


def _image(rng: np.random.Generator, k: int):
  from PIL import Image

  w, h = SIZES[k % len(SIZES)]
  mode = MODES[k % len(MODES)]
  if mode == "L":
    return Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L")
  img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
  if mode == "RGBA":
    return img.convert("RGBA")
  return img.convert("P") if mode == "P" else img


def _encode(img, k: int) -> tuple[bytes, str]:
  buf = io.BytesIO()
  if k % 3 == 0 and img.mode in ("RGB", "L"):
    img.save(buf, format="JPEG")
    return buf.getvalue(), "jpg"
  img.save(buf, format="PNG")
  return buf.getvalue(), "png"


def build_data(work: pathlib.Path, tasks, limit: int, seed: int) -> pathlib.Path:
  """``work/data/<task>``: ``limit`` test images per task (save_to_disk, or image folders for FOLDER_TASKS)."""
  import datasets

  from jaxmerge.data.tasks import TASKS

  root = work / "data"
  for ti, t in enumerate(tasks):
    rng = np.random.default_rng(seed * 1000 + ti)
    classes = list(TASKS[t].classnames)
    labels = [int(rng.integers(0, len(classes))) for _ in range(limit)]
    if t in FOLDER_TASKS:
      base = root / t / "test"
      for c, name in enumerate(classes):  # every class has a directory (possibly empty)
        (base / (name if FOLDER_TASKS[t] == "by name" else str(c))).mkdir(parents=True, exist_ok=True)
      for k, y in enumerate(labels):
        data, ext = _encode(_image(rng, k), k)
        d = base / (classes[y] if FOLDER_TASKS[t] == "by name" else str(y))
        (d / f"{k}.{ext}").write_bytes(data)
      continue
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=classes)})
    images = [{"bytes": _encode(_image(rng, k), k)[0], "path": f"{k}.img"} for k in range(limit)]
    test = datasets.Dataset.from_dict({"image": images, "label": labels}, features=feats)
    datasets.DatasetDict({"test": test}).save_to_disk(str(root / t))
  return root


def _cli(args: list[str], log) -> tuple[float, float]:
  """Runs ``jaxmerge ARGS`` in its own process; ``(seconds, peak RSS GB)``."""
  code = ("import sys; from jaxmerge import cli; rc = cli.main(sys.argv[1:]); "  # VmHWM: ru_maxrss survives exec
          "hwm = [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')]; "
          "print('PEAK_RSS_KB', *hwm, file=sys.stderr); sys.exit(rc)")
  t = time.perf_counter()
  p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                     env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
  seconds = time.perf_counter() - t
  if p.returncode:
    raise RuntimeError(f"jaxmerge {' '.join(args)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
  kb = [int(line.split()[1]) for line in p.stderr.splitlines() if line.startswith("PEAK_RSS_KB")]
  log(p.stdout.strip().splitlines()[-1] if p.stdout.strip() else "")
  return seconds, (kb[-1] * 1024 / 1e9 if kb else float("nan"))


_MERGE_MEMORY = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
import clip_suites as cs
from jaxmerge.eval.memory import PeakRSS, rss_bytes
from jaxmerge.io import hf
pre, experts, method, engine = sys.argv[2], json.loads(sys.argv[3]), sys.argv[4], sys.argv[5]
pcfg, pp = hf.load_clip(pre)
tower = pp["vision_model"]
del pp
before = rss_bytes()
exs = [hf.load_clip(e, like=pcfg)[1]["vision_model"] for e in experts]
after = rss_bytes()
size = sum(x.nbytes for e in exs for x in __import__("jax").tree.leaves(e))
hp = {"scale": 0.3} if method == "task_arithmetic" else {}
t = time.perf_counter()
with PeakRSS() as m:
  merged = cs._merge(method, hp, tower, exs, 0, stream=engine == "stream")
print(json.dumps({"seconds": time.perf_counter() - t, "experts_gb": size / 1e9, "rss_before_experts_gb": before / 1e9,
                  "rss_after_experts_gb": after / 1e9, "merge_peak_rss_gb": m.peak_bytes / 1e9,
                  "peak_over_experts": (m.peak_bytes - before) / size, "rss_method": m.method}))
"""


def merge_memory(pre: pathlib.Path, experts: dict, methods, log) -> dict:
  """Per method and engine (``stream``: the suite's default; ``memory``: :func:`jaxmerge.merge`), in a fresh
  process: the merge's wall time and peak RSS, and ``peak_over_experts`` = (peak RSS during the merge - RSS before
  the experts were loaded) / the experts' float32 size, i.e. experts + everything the merge adds, in experts."""
  out = {}
  for method in methods:
    for engine in ("stream", "memory"):
      p = subprocess.run([sys.executable, "-c", _MERGE_MEMORY, str(ROOT / "experiments"), str(pre),
                          json.dumps([str(experts[t]) for t in experts]), method, engine],
                         capture_output=True, text=True, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
      if p.returncode:
        raise RuntimeError(f"merge-memory run {method}/{engine} failed:\n{p.stderr[-3000:]}")
      out[f"{method}/{engine}"] = json.loads(p.stdout.strip().splitlines()[-1])
      log(f"{method} ({engine}): {out[f'{method}/{engine}']}")
  return out


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--work", required=True, help="working directory (models, data, cache, results)")
  p.add_argument("--layers", type=int, default=12, help="layers of each tower (12 = ViT-B/32)")
  p.add_argument("--limit", type=int, default=64, help="test images per task")
  p.add_argument("--methods", default="task_arithmetic,ties,tsv_m,iso_c", help="comma-separated methods")
  p.add_argument("--noise", type=float, default=1e-3, help="std of the experts' Gaussian 'fine-tuning'")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--workers", type=int, default=2)
  p.add_argument("--keep", action="store_true", help="reuse models and data already in --work")
  p.add_argument("--merge-memory", default=None, metavar="METHODS",
                 help="only measure each method's merge (streamed and in memory, each in a fresh process) on the "
                      "models in --work (built first if missing); writes work/merge_memory.json")
  p.add_argument("--in-memory", action="store_true",
                 help="the suite merges in memory (jaxmerge.merge) instead of streaming (to compare memory)")
  args = p.parse_args(argv)

  import clip_suites as cs  # experiments/ is on sys.path when run as a script

  from jaxmerge.data.tasks import get_suite
  from jaxmerge.io import hf

  log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
  work = pathlib.Path(args.work)
  tasks = list(get_suite("TALL8"))
  steps: dict[str, dict] = {}
  t = time.perf_counter()
  if not (args.keep and (work / "pretrained").is_dir()):
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    pre, experts = build_models(work, tasks, args.layers, args.noise, args.seed)
    build_data(work, tasks, args.limit, args.seed)
  else:
    pre, experts = work / "pretrained", {t: work / "experts" / t for t in tasks}
  steps["build"] = {"seconds": time.perf_counter() - t}
  expert_bytes = sum(f.stat().st_size for d in experts.values() for f in d.glob("*.safetensors"))
  log(f"built in {steps['build']['seconds']:.0f} s; experts on disk {expert_bytes / 1e9:.2f} GB")

  if args.merge_memory:
    mm = merge_memory(pre, experts, [m.strip() for m in args.merge_memory.split(",") if m.strip()], log)
    (work / "merge_memory.json").write_text(json.dumps(mm, indent=1))
    print(json.dumps(mm, indent=1))
    return 0
  methods = [m.strip() for m in args.methods.split(",") if m.strip()]
  cfg = {"name": f"rehearsal-vit-b32-{args.layers}l", "pretrained": str(pre),
         "experts": {k: str(v) for k, v in experts.items()}, "suite": "TALL8", "data": str(work / "data"),
         "cache": str(work / "cache"), "limit": args.limit, "batch_size": 128, "workers": args.workers,
         "methods": {m: ({"scale": 0.3} if m == "task_arithmetic" else {}) for m in methods},
         "stream": not args.in_memory}
  results_dir = work / ("results-in-memory" if args.in_memory else "results")
  shutil.rmtree(results_dir, ignore_errors=True)
  t = time.perf_counter()
  res = cs.run(cfg, results_dir)
  steps["suite"] = {"seconds": time.perf_counter() - t, "peak_rss_gb": res["memory"]["process_peak_rss_gb"]}
  mappings = {k: v.get("mapping") for k, v in res["data"].items() if v.get("mapping")}
  if mappings != FOLDER_TASKS:
    raise AssertionError(f"image-folder mappings {mappings}, expected {FOLDER_TASKS}")

  checks = {}
  if "task_arithmetic" in methods:
    merged = {}
    for mode in ("--no-stream", "--stream"):
      out = work / f"merged{mode.replace('--', '-')}"
      shutil.rmtree(out, ignore_errors=True)
      argv_ = ["merge", "--method", "task_arithmetic", "--hparam", "scale=0.3", "--base", str(pre),
               *[a for t_ in tasks for a in ("--model", str(experts[t_]))], "--out", str(out), mode]
      seconds, peak = _cli(argv_, log)
      steps[f"jaxmerge merge {mode}"] = {"seconds": seconds, "peak_rss_gb": peak}
      merged[mode] = out
    from jaxmerge.io import safetensors_io as S

    a, b = S.load(merged["--no-stream"] / "model.safetensors"), S.load(merged["--stream"] / "model.safetensors")
    checks["stream_equals_in_memory"] = all(np.array_equal(a[k], b[k]) for k in a) and a.keys() == b.keys()
    pcfg, pp = hf.load_clip(pre)
    _, tower = hf.load_clip(merged["--stream"], like=pcfg)
    exs = [hf.load_clip(experts[t_], like=pcfg)[1]["vision_model"] for t_ in tasks]
    import jax

    want = jax.tree.map(lambda p_, *xs: (np.float64(p_) + 0.3 * sum(np.float64(x) - p_ for x in xs)),
                        pp["vision_model"], *exs)
    checks["merge_vs_float64_max_abs_diff"] = float(max(
        np.max(np.abs(np.float64(x) - w)) for x, w in zip(jax.tree.leaves(tower["vision_model"]), jax.tree.leaves(want))))
    del exs, want
    t = time.perf_counter()
    eval_out = work / "eval.json"
    seconds, peak = _cli(["eval", "--model", str(merged["--stream"]), "--pretrained", str(pre), "--suite", "TALL8",
                          "--data", str(work / "data"), "--limit", str(args.limit), "--batch-size", "128",
                          "--heads-cache", str(work / "cache" / "heads"), "--workers", str(args.workers),
                          "--out", str(eval_out)], log)
    steps["jaxmerge eval"] = {"seconds": seconds, "peak_rss_gb": peak}
    ev = json.loads(eval_out.read_text())
    row = next(r for r in res["rows"] if r["method"] == "task_arithmetic")
    checks["eval_vs_suite_max_loss_diff"] = float(max(abs(ev["tasks"][t_]["loss"] - row["loss"][t_]) for t_ in tasks))
    checks["eval_vs_suite_same_accuracy"] = all(
        round(ev["tasks"][t_]["accuracy"] * args.limit) == round(row["accuracy"][t_] * args.limit) for t_ in tasks)

  report = {"layers": args.layers, "limit": args.limit, "suite_merge": "in memory" if args.in_memory else "streamed", "experts_on_disk_gb": expert_bytes / 1e9,
            "experts_in_memory_gb": res["memory"]["experts_gb"], "steps": steps, "checks": checks,
            "mappings": mappings, "suite_memory": res["memory"], "suite_timings": res["timings"],
            "methods": {r["method"]: {k: r.get(k) for k in ("merge_seconds", "merge_peak_rss_gb",
                                                              "merge_start_rss_gb", "eval_seconds",
                                                              "eval_peak_rss_gb")} for r in res["rows"]},
            "process_peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9}
  (results_dir / "rehearsal.json").write_text(json.dumps(report, indent=1))
  print(json.dumps(report, indent=1))
  bad = [k for k, v in checks.items() if v is False]
  if bad:
    raise AssertionError(f"rehearsal checks failed: {bad}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
