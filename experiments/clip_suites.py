"""The real CLIP merging suites: ViT-B/32, B/16, L/14 on the 8-, 14- and 20-task (TALL) image suites.

::

    python experiments/clip_suites.py --model b32 --suite 8 --out results/clip-vit-b32-tall8
    python experiments/clip_suites.py --config experiments/configs/clip_vit_l14.yaml --suite 20 \\
        --methods task_arithmetic,ties --cache ~/.cache/jaxmerge --out results/l14-tall20

For each run: load the pretrained ``CLIPModel`` and one fine-tuned ``CLIPVisionModel`` per task (FusionBench's
``tanganke/clip-vit-base-patch32_<task>`` etc.; hub cache or network, or local paths), build zero-shot heads
with the pretrained text tower (cached with orbax), evaluate the pretrained model and every expert on its own
task, merge the vision towers with each method,
``jm.merge(jm.get_method(m)(**hp), pretrained, experts, layout=jm.filters.flax_layout)`` (one model per task
for per-task methods), evaluate every merged model on every task, and write ``results.{json,md,csv}``.

The YAML config (``experiments/configs/clip_*.yaml``) names the checkpoints, the data, the methods and their
hyperparameters (``{}`` = the registry's defaults, FusionBench's), and the published reference numbers.
``--data DIR`` reads ``DIR/<task>`` (a ``save_to_disk`` dataset, or an image folder ``DIR/<task>/<split>/<class>/``
whose class directories are the task's class names or numbers ``0..C-1``: unknown or missing class directories
are refused, and ``results.json``'s ``data`` section records each task's source, mapping and fingerprint)
instead of the hub. With ``--cache``, zero-shot heads are kept under ``cache/heads`` keyed by the text tower's
weights, the prompts and their token ids, and preprocessed test images as uint8 ``.npy`` files under
``cache/images`` keyed by the data's content fingerprint, split, preprocessing and limit: another checkpoint or
dataset never reuses an entry, and each method's evaluation only runs the vision tower. The pretrained directory
must hold a usable CLIP tokenizer (an error names it otherwise) unless every head is already in the cache for
the same text tower and prompts. With ``--limit N`` below the batch size the evaluation batch is ``N``.

Unseen domains (optional): with ``shifts`` in the config (a list of :data:`jaxmerge.data.synthetic.SHIFTS`,
e.g. ``[noise, blur, contrast, tint]``; ``--shifts``), every row is also evaluated on a held-out shifted variant
of each task's test split, the same corruption family as the offline suite's: test image ``k`` (in the split's
order, after resizing and cropping to the model's input size) gets shift ``shifts[k mod len(shifts)]`` from
``synthetic.shift_images`` (severity 1, seed ``shift_seed * 1000003 + k``), so each image is seen once and every
model sees the same shifted images. Rows then carry ``shifted`` (accuracy per task and per shift, average);
``results.md`` gets a second table and ``results.csv`` a ``shifted_average`` column. With ``--cache`` the
shifted images are cached next to the originals (as much disk again).

Timings and memory: ``merge_seconds`` waits for the merged tower (JAX dispatches asynchronously), and every
row records the process's peak RSS while merging and evaluating (``merge_peak_rss_gb``, ``eval_peak_rss_gb``,
:class:`jaxmerge.eval.memory.PeakRSS`); ``results.json``'s ``memory`` section has the experts' size and the
process's peak. The experts are held in host memory as float32 (a ViT-B/32 vision tower is 0.35 GB); methods
that stream (:func:`jaxmerge.stream.merge_streaming`: leafwise ones and the exact multi-pass plans of TIES and
other global methods) are merged tensor by tensor from them, so a merge adds about one tower to the experts
instead of a stacked copy plus task vectors (``stream: false`` in the config merges with :func:`jaxmerge.merge`).
Measured numbers are in ``experiments/README.md``; ``experiments/clip_rehearsal.py`` rehearses the whole pipeline
at full size with local random-weight files. Methods that need data (AdaMerging, WEMoE, ...) are not run here
(see ``jaxmerge bench``).
"""

from __future__ import annotations

import argparse
import csv
import json
import pathlib
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout
  sys.path.insert(0, str(ROOT))

CONFIGS = {"b32": "clip_vit_b32.yaml", "b16": "clip_vit_b16.yaml", "l14": "clip_vit_l14.yaml"}

__all__ = ["load_config", "main", "run"]


def load_config(path: str | pathlib.Path, **overrides) -> dict:
  """The YAML config at ``path`` with ``overrides`` (non-None values) applied."""
  import yaml

  cfg = yaml.safe_load(pathlib.Path(path).read_text()) or {}
  cfg.update({k: v for k, v in overrides.items() if v is not None})
  return cfg


def _expert_path(cfg: Mapping, task: str) -> str:
  experts = cfg["experts"]
  if isinstance(experts, Mapping):
    if task not in experts:
      raise ValueError(f"no expert checkpoint for task {task!r} in the config")
    return str(experts[task])
  return str(experts).format(task=task)


def _digest(*parts: Any) -> str:
  import hashlib

  return hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).hexdigest()[:24]


def _cached_images(cache: pathlib.Path | None, task: str, key: str,
                   make: Callable[[], Iterable[Mapping[str, np.ndarray]]], batch_size: int):
  """Batches of ``task``; with a cache, decoded once into ``<cache>/<task>-<key>.images.npy`` (+ labels), where
  ``key`` digests everything the images depend on (the data's content fingerprint, split, preprocessing, limit,
  shifts): another dataset or preprocessing never reads this entry."""
  if cache is None:
    yield from make()
    return
  stem = f"{task}-{key}"
  img_f, lab_f = cache / f"{stem}.images.npy", cache / f"{stem}.labels.npy"
  if not (img_f.exists() and lab_f.exists()):
    cache.mkdir(parents=True, exist_ok=True)
    images, labels = [], []
    for b in make():
      images.append(b["image"])
      labels.append(b["label"])
    tmp_i, tmp_l = img_f.with_suffix(".tmp.npy"), lab_f.with_suffix(".tmp.npy")
    np.save(tmp_i, np.concatenate(images))
    np.save(tmp_l, np.concatenate(labels))
    tmp_l.replace(lab_f)
    tmp_i.replace(img_f)
  images, labels = np.load(img_f, mmap_mode="r"), np.load(lab_f)
  for s in range(0, len(labels), batch_size):
    yield {"image": np.asarray(images[s:s + batch_size]), "label": labels[s:s + batch_size]}


def _shifted_batches(batches: Iterable[Mapping[str, np.ndarray]], shifts: Sequence[str], index: int, seed: int,
                     batch_size: int):
  """The test images ``k`` with ``k mod len(shifts) == index``, each shifted by ``shifts[index]`` with seed
  ``seed * 1000003 + k`` (independent of how ``batches`` is batched), rebatched to ``batch_size``."""
  from jaxmerge.data import synthetic

  kind, period = shifts[index], len(shifts)
  images, labels, start = [], [], 0
  for b in batches:
    imgs, labs = np.asarray(b["image"]), np.asarray(b["label"])
    for j in range(len(labs)):
      k = start + j
      if k % period == index:
        images.append(synthetic.shift_images(imgs[j:j + 1], kind, seed=(seed * 1000003 + k) & 0xFFFFFFFF)[0])
        labels.append(labs[j])
      if len(labels) == batch_size:
        yield {"image": np.stack(images), "label": np.asarray(labels, np.int32)}
        images, labels = [], []
    start += len(labs)
  if labels:
    yield {"image": np.stack(images), "label": np.asarray(labels, np.int32)}


def _merge(method: str, hparams: Mapping, pretrained, experts: Sequence, seed: int, stream: bool = True):
  """One merged vision tower, or a list of T (per-task methods), computed to the end (timings block on it).

  With ``stream`` (the default), methods that stream (:func:`jaxmerge.stream.merge_streaming`: leafwise ones
  and the exact multi-pass plans of global ones) are merged tensor by tensor from the experts held in memory,
  so the merge needs the experts plus one merged tower plus a few tensors times T, not a stacked copy of every
  expert and its task vectors; the result is :func:`jaxmerge.merge`'s. Other methods merge in memory.
  """
  import jax

  import jaxmerge as jm
  from jaxmerge import stream as jstream
  from jaxmerge import tree as jtree

  info = jm.method_info(method)
  if info.data != "none":
    raise ValueError(f"method {method!r} needs data ({info.data}); this script runs data-free methods only")
  hp = dict(hparams or {})
  tx = jm.get_method(method)(**hp)
  key = jax.random.key(seed) if getattr(tx, "needs_key", False) else None
  if stream and (jstream.leafwise(tx) or jstream.method_plan(method, hp) is not None):
    writers = [jstream.DictWriter() for _ in experts] if info.per_task else jstream.DictWriter()
    jstream.merge_streaming(tx, jstream.DictReader(pretrained), [jstream.DictReader(e) for e in experts], writers,
                            method=(method, hp), key=key, layout=jm.filters.flax_layout, per_task=info.per_task)
    out = [jtree.unflatten_paths(pretrained, w) for w in (writers if info.per_task else [writers])]
    return out if info.per_task else out[0]
  merge = jm.merge_per_task if info.per_task else jm.merge
  return jax.block_until_ready(merge(tx, pretrained, list(experts), key=key, layout=jm.filters.flax_layout))


def _nbytes(tree: Any) -> int:
  from jaxmerge import tree as jtree

  return int(sum(np.asarray(v).nbytes for v in jtree.flatten_paths(tree).values()))


def run(cfg: Mapping, out: str | pathlib.Path, *, progress: bool = True) -> dict:
  """Runs one suite as configured by ``cfg`` (see the module docstring) and writes the reports to ``out``.

  Returns:
    The results dict written to ``out/results.json``.
  """
  from jaxmerge.data.preprocess import Preprocess
  from jaxmerge.data.tasks import TASKS, get_suite
  from jaxmerge.eval.command import eval_batch_size, task_batches, task_source
  from jaxmerge.eval.memory import PeakRSS, rss_bytes
  from jaxmerge.eval.zeroshot import ClipZeroShot, load_tokenizer
  from jaxmerge.io import hf

  log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if progress else (lambda *a: None)
  t0 = time.perf_counter()
  suite = cfg.get("suite", "TALL8")
  tasks = list(suite) if isinstance(suite, (list, tuple)) else list(get_suite(suite))
  unknown = [t for t in tasks if t not in TASKS]
  if unknown:
    raise ValueError(f"unknown task(s) {unknown}; known tasks: {', '.join(TASKS)}")
  cache = pathlib.Path(cfg["cache"]).expanduser() if cfg.get("cache") else None
  limit, split = cfg.get("limit"), cfg.get("split", "test")
  batch_size = eval_batch_size(int(cfg.get("batch_size", 128)), limit)
  shifts, shift_seed = list(cfg.get("shifts") or []), int(cfg.get("shift_seed", 0))
  if shifts:
    from jaxmerge.data import synthetic

    bad = [k for k in shifts if k not in synthetic.SHIFTS]
    if bad or len(set(shifts)) != len(shifts):
      raise ValueError(f"the config's shifts {shifts} must be distinct names from: {', '.join(synthetic.SHIFTS)}"
                       + (f" (unknown: {bad})" if bad else ""))

  log(f"loading {cfg['pretrained']}")
  with PeakRSS() as load_mem:
    pcfg, pparams = hf.load_clip(cfg["pretrained"])
    pre_dir = hf.resolve(cfg["pretrained"])
    tokenizer, tokenizer_error = None, None
    try:
      tokenizer = load_tokenizer(pre_dir, pcfg)
    except ValueError as e:
      if cache is None:
        raise
      tokenizer_error = str(e)
      log(f"note: {e}; using the heads cache {cache / 'heads'}")
    preprocess = Preprocess.from_pretrained(pre_dir, default_size=pcfg.image_size)
    experts = []
    for t in tasks:
      log(f"loading expert {_expert_path(cfg, t)}")
      experts.append(hf.load_clip(_expert_path(cfg, t), like=pcfg)[1]["vision_model"])
  zs = ClipZeroShot(pcfg, pparams, tokenizer=tokenizer, heads_cache=cache / "heads" if cache else None,
                    tokenizer_error=tokenizer_error, preprocess=preprocess, batch_size=batch_size,
                    tasks={t: (TASKS[t].classnames, TASKS[t].templates) for t in tasks})
  zs.build_heads(tasks)
  timings = {"load": time.perf_counter() - t0}
  memory = {"experts_gb": sum(_nbytes(e) for e in experts) / 1e9, "pretrained_gb": _nbytes(pparams) / 1e9,
            "vision_tower_gb": _nbytes(pparams["vision_model"]) / 1e9, "load_peak_rss_gb": load_mem.peak_bytes / 1e9,
            "rss_after_load_gb": rss_bytes() / 1e9, "rss_method": load_mem.method}

  sources, data_info = {}, {}
  for task in tasks:
    sources[task], data_info[task] = task_source(task, data=cfg.get("data"), split=split)
    if data_info[task].get("mapping"):
      log(f"{task}: image folder {data_info[task]['path']}: class directories mapped {data_info[task]['mapping']}")
  image_keys = {t: _digest(data_info[t]["fingerprint"], split, preprocess, limit) for t in tasks}

  def batches(task):
    make = lambda: task_batches(task, data=cfg.get("data"), split=split, batch_size=batch_size,  # noqa: E731
                                preprocess=preprocess, limit=limit, workers=int(cfg.get("workers", 4)),
                                source=sources[task])
    return _cached_images(cache / "images" if cache else None, task, image_keys[task], make, batch_size)

  def shifted_batches(task, index):
    make = lambda: _shifted_batches(batches(task), shifts, index, shift_seed, batch_size)  # noqa: E731
    key = _digest(image_keys[task], "shift", shifts, index, shift_seed)
    name = f"{task}-shift-{shifts[index]}{index}of{len(shifts)}-seed{shift_seed}"
    return _cached_images(cache / "images" if cache else None, name, key, make, batch_size)

  def evaluate_shifted(per_task: Sequence) -> dict:
    acc, per_shift, loss = {}, {}, {}
    for task, m in per_task:
      res = {}
      for i, kind in enumerate(shifts):
        try:
          res[kind] = zs.evaluate(m, task, shifted_batches(task, i))
        except ValueError as e:
          if "no batches" not in str(e):
            raise
          raise ValueError(f"task {task!r} has too few test images for {len(shifts)} shifts (shift {kind!r} got "
                           "none); lower the number of shifts or raise the limit") from None
      n = sum(v["count"] for v in res.values())
      acc[task] = float(sum(v["accuracy"] * v["count"] for v in res.values()) / n)
      loss[task] = float(sum(v["loss"] * v["count"] for v in res.values()) / n)
      per_shift[task] = {k: v["accuracy"] for k, v in res.items()}
    return {"accuracy": acc, "loss": loss, "per_shift": per_shift, "average": float(np.mean(list(acc.values())))}

  def evaluate(models: Any, row: str) -> dict:
    t = time.perf_counter()
    per_task = list(zip(tasks, models)) if isinstance(models, list) else [(task, models) for task in tasks]
    with PeakRSS() as mem:
      acc = {task: zs.evaluate(m, task, batches(task)) for task, m in per_task}  # a list: one model per task
    r = {"method": row, "accuracy": {k: v["accuracy"] for k, v in acc.items()},
         "loss": {k: v["loss"] for k, v in acc.items()},
         "average": float(np.mean([v["accuracy"] for v in acc.values()])), "eval_seconds": time.perf_counter() - t,
         "eval_peak_rss_gb": mem.peak_bytes / 1e9}
    if shifts:
      t = time.perf_counter()
      r["shifted"] = evaluate_shifted(per_task)
      r["shifted_eval_seconds"] = time.perf_counter() - t
    log(f"{row}: {100 * r['average']:.2f}" + (f" (shifted {100 * r['shifted']['average']:.2f})" if shifts else ""))
    return r

  pre_vision = pparams["vision_model"]
  rows = [evaluate(pre_vision, "pretrained"), evaluate(experts, "experts")]
  skipped = {}
  import jaxmerge as jm

  for method, hp in (cfg.get("methods") or {}).items():
    if method not in jm.list_methods():
      skipped[method] = "not registered in this jaxmerge"
      log(f"skipping {method}: {skipped[method]}")
      continue
    if jm.method_info(method).data != "none":
      skipped[method] = f"needs data ({jm.method_info(method).data})"
      log(f"skipping {method}: {skipped[method]}")
      continue
    t = time.perf_counter()
    with PeakRSS() as mem:
      merged = _merge(method, hp, pre_vision, experts, int(cfg.get("seed", 0)), stream=bool(cfg.get("stream", True)))
    merge_s = time.perf_counter() - t
    row = evaluate(merged, method)
    row.update(merge_seconds=merge_s, merge_peak_rss_gb=mem.peak_bytes / 1e9, merge_start_rss_gb=mem.start_bytes / 1e9,
               hparams=dict(hp or {}), per_task=isinstance(merged, list))
    log(f"{method}: merged in {merge_s:.1f} s, peak RSS {mem.peak_bytes / 1e9:.2f} GB "
        f"(from {mem.start_bytes / 1e9:.2f} GB; experts {memory['experts_gb']:.2f} GB)")
    del merged
    rows.append(row)
  suite_name = suite if isinstance(suite, str) else None
  ref = ((cfg.get("reference") or {}).get(suite_name) or {}) if suite_name and not limit else {}
  results = {"name": cfg.get("name"), "pretrained": str(cfg["pretrained"]), "tasks": tasks, "split": split,
             "limit": limit, "batch_size": batch_size, "shifts": shifts,
             "shift_seed": shift_seed if shifts else None, "data": data_info,
             "rows": rows, "skipped": skipped, "reference": ref,
             "reference_source": cfg.get("reference_source") if ref else None,
             "memory": {**memory, "process_peak_rss_gb": max(
                 [_max_rss_gb(), memory["load_peak_rss_gb"]]
                 + [r.get(k, 0.0) for r in rows for k in ("merge_peak_rss_gb", "eval_peak_rss_gb")])},
             "timings": {**timings, "total": time.perf_counter() - t0}}
  _write(results, pathlib.Path(out))
  return results


def _max_rss_gb() -> float:
  import resource

  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024) / 1e9


def _markdown(results: Mapping) -> str:
  tasks, ref = results["tasks"], results.get("reference") or {}
  head = "| method | " + " | ".join(tasks) + " | avg | reference avg |"
  lines = [head, "|" + "---|" * (len(tasks) + 3)]
  for r in results["rows"]:
    accs = " | ".join(f"{100 * r['accuracy'][t]:.1f}" for t in tasks)
    rv = ref.get(r["method"])
    lines.append(f"| {r['method']}{' †' if r.get('per_task') else ''} | {accs} | **{100 * r['average']:.1f}** | "
                 f"{'' if rv is None else rv} |")
  lines.append("")
  lines.append("† one model per task. Accuracy in %, unweighted mean over tasks." +
               (f" Reference: {results['reference_source']}." if results.get("reference_source") else ""))
  merged = [r for r in results["rows"] if "merge_seconds" in r]
  if merged:
    mem = results.get("memory") or {}
    lines += ["", f"Merge cost (experts in memory: {mem.get('experts_gb', 0):.2f} GB; peak RSS is the whole "
              "process's, experts included):", "", "| method | merge (s) | merge peak RSS (GB) | eval (s) |",
              "|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['merge_seconds']:.1f} | {r.get('merge_peak_rss_gb', 0):.2f} | "
              f"{r['eval_seconds']:.1f} |" for r in merged]
  shifts = results.get("shifts") or []
  if shifts:
    lines += ["", f"Unseen domains: accuracy (%) on the shifted test sets (test image k gets shift k mod "
              f"{len(shifts)} of: {', '.join(shifts)}; severity 1, shift seed {results.get('shift_seed')}).", "",
              "| method | " + " | ".join(tasks) + " | avg | " + " | ".join(f"avg {k}" for k in shifts) + " |",
              "|" + "---|" * (len(tasks) + 2 + len(shifts))]
    for r in results["rows"]:
      sh = r["shifted"]
      kinds = " | ".join(f"{100 * np.mean([sh['per_shift'][t][k] for t in tasks]):.1f}" for k in shifts)
      lines.append(f"| {r['method']}{' †' if r.get('per_task') else ''} | "
                   + " | ".join(f"{100 * sh['accuracy'][t]:.1f}" for t in tasks)
                   + f" | **{100 * sh['average']:.1f}** | {kinds} |")
  return "\n".join(lines)


def _write(results: Mapping, out: pathlib.Path) -> None:
  out.mkdir(parents=True, exist_ok=True)
  (out / "results.json").write_text(json.dumps(results, indent=1))
  (out / "results.md").write_text(_markdown(results) + "\n")
  with open(out / "results.csv", "w", newline="") as f:
    w = csv.writer(f)
    shifted = bool(results.get("shifts"))
    w.writerow(["method", *results["tasks"], "average", *(["shifted_average"] if shifted else [])])
    for r in results["rows"]:
      w.writerow([r["method"], *(f"{r['accuracy'][t]:.6f}" for t in results["tasks"]), f"{r['average']:.6f}",
                  *([f"{r['shifted']['average']:.6f}"] if shifted else [])])


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  src = p.add_mutually_exclusive_group()
  src.add_argument("--model", choices=sorted(CONFIGS), default=None, help="a config in experiments/configs")
  src.add_argument("--config", default=None, help="a YAML config")
  p.add_argument("--suite", default=None, help="8, 14, 20 (TALL8/14/20) or comma-separated tasks")
  p.add_argument("--methods", default=None, help="comma-separated subset of the config's methods")
  p.add_argument("--data", default=None, help="local datasets: DIR/<task>")
  p.add_argument("--pretrained", default=None, help="override the pretrained checkpoint")
  p.add_argument("--experts", default=None, help="override the experts (a format string with {task})")
  p.add_argument("--cache", default=None, help="cache directory (heads, preprocessed images)")
  p.add_argument("--limit", type=int, default=None, help="first N test images per task (smoke runs)")
  p.add_argument("--batch-size", type=int, default=None)
  p.add_argument("--split", default=None, choices=("test", "val"))
  p.add_argument("--shifts", default=None,
                 help="also evaluate on shifted test sets: comma-separated synthetic.SHIFTS (noise,blur,contrast,tint)")
  p.add_argument("--shift-seed", type=int, default=None)
  p.add_argument("--out", required=True, help="output directory")
  args = p.parse_args(argv)
  path = args.config or ROOT / "experiments" / "configs" / CONFIGS[args.model or "b32"]
  suite = args.suite
  if suite is not None:
    suite = suite.split(",") if "," in suite or not (suite.isdigit() or suite.startswith("TALL")) else (
        f"TALL{suite}" if suite.isdigit() else suite)
  cfg = load_config(path, suite=suite, data=args.data, pretrained=args.pretrained, experts=args.experts,
                    cache=args.cache, limit=args.limit, batch_size=args.batch_size, split=args.split,
                    shifts=[k.strip() for k in args.shifts.split(",") if k.strip()] if args.shifts else None,
                    shift_seed=args.shift_seed)
  if args.methods:
    wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
    cfg["methods"] = {m: (cfg.get("methods") or {}).get(m, {}) for m in wanted}
  results = run(cfg, args.out)
  print(_markdown(results))
  return 0


if __name__ == "__main__":
  sys.exit(main())
