"""``jaxmerge eval``: zero-shot accuracy of a CLIP vision tower on image-classification tasks.

::

    jaxmerge eval --model DIR_OR_REPO [--pretrained DIR_OR_REPO] [--tasks a,b,c | --suite TALL8|TALL14|TALL20]
                  [--data DIR] [--split test|val|train] [--batch-size N] [--limit N] [--workers N]
                  [--heads-cache DIR] [--out results.json]

``--model`` is a Hugging Face ``CLIPModel`` or ``CLIPVisionModel`` directory or cached repo id, or the output of
``jaxmerge merge`` (its ``config.json`` is the base model's; a bare weights file is read with the pretrained
config). ``--pretrained`` gives the text tower, projection, logit scale, tokenizer and preprocessing (default:
``--model`` itself, which must then be a full ``CLIPModel``). Heads follow the standard CLIP zero-shot protocol
(:mod:`jaxmerge.eval.zeroshot`). Datasets come from the Hugging Face ids of :mod:`jaxmerge.data.tasks` (hub
cache or network), or from ``--data DIR`` where ``DIR/<task>`` is a ``save_to_disk`` dataset or an image folder
(``DIR/<task>/<split>/<class>/<image>``: class directories named after the task's classes or numbered
``0..C-1``; unknown or missing class directories are refused, and the mapping used is printed and recorded).
The pretrained directory must hold a usable CLIP tokenizer (an error names it otherwise), unless every head is
already in ``--heads-cache`` for the same text tower and prompts. With ``--limit N`` below ``--batch-size``
the batch is ``N``. Prints a markdown table; ``--out`` writes JSON.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

__all__ = ["eval_batch_size", "load_eval_model", "register", "run", "task_batches", "task_source"]


def register(subparsers) -> None:
  """Adds the ``eval`` subcommand (called by :mod:`jaxmerge.cli`).

  Args:
    subparsers: the CLI's subparsers.
  """
  p = subparsers.add_parser("eval", help="zero-shot evaluation of a CLIP vision tower on image tasks",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", required=True, help="model directory, merged checkpoint, or cached hub repo id")
  p.add_argument("--pretrained", default=None, help="pretrained CLIPModel (text tower, heads, tokenizer); "
                 "default: --model")
  group = p.add_mutually_exclusive_group()
  group.add_argument("--tasks", default=None, metavar="A,B,C", help="comma-separated task names")
  group.add_argument("--suite", default=None, help="TALL8, TALL14 or TALL20 (default: TALL8)")
  p.add_argument("--data", default=None, metavar="DIR", help="local datasets: DIR/<task> (save_to_disk or folder)")
  p.add_argument("--split", default="test", choices=("test", "val", "train"), help="split (default: test)")
  p.add_argument("--batch-size", type=int, default=64, help="images per step (default 64)")
  p.add_argument("--limit", type=int, default=None, help="evaluate only the first N images of each task")
  p.add_argument("--workers", type=int, default=4, help="image-decoding threads (default 4)")
  p.add_argument("--heads-cache", default=None, metavar="DIR", help="orbax directory caching zero-shot heads")
  p.add_argument("--out", default=None, help="write the results as JSON to this file")
  p.set_defaults(func=run)


def load_eval_model(model: str, pretrained: str | None = None):
  """``(pretrained_config, pretrained_params, vision_params, pretrained_dir)`` for ``jaxmerge eval``.

  Args:
    model: the evaluated model (a directory, file or cached hub id).
    pretrained: the pretrained ``CLIPModel`` (default: ``model`` itself).

  Returns:
    ``(pretrained_config, pretrained_params, vision_params, pretrained_dir)``.

  Raises:
    ValueError: unreadable checkpoints, a pretrained model without text tower, or incompatible towers.
  """
  from jaxmerge.io import hf  # noqa: PLC0415

  pre_path = pretrained or model
  pcfg, pparams = hf.load_clip(pre_path)
  if not pcfg.has_text:
    raise ValueError(f"{pre_path} is a vision-only model; pass --pretrained with the full CLIPModel")
  if pretrained is None or pathlib.Path(str(model)).resolve() == pathlib.Path(str(pretrained)).resolve():
    return pcfg, pparams, pparams["vision_model"], hf.resolve(pre_path)
  _, mparams = hf.load_clip(model, config=pcfg, like=pcfg)
  return pcfg, pparams, mparams["vision_model"], hf.resolve(pre_path)


def task_source(task: str, *, data: str | None, split: str):
  """The source of one task's split and a description of it.

  Args:
    task: a task name.
    data: a directory with ``data/<task>`` (a ``save_to_disk`` dataset, or an image folder
      ``data/<task>/<split>/<class>/<image>`` whose class directories are mapped to the task's classes by name
      or by number, :class:`jaxmerge.data.datasets.FolderSource`), or ``None`` for the hub.
    split: the split.

  Returns:
    ``(source, info)``: info is ``{"kind": "folder"|"dataset"|"hub", "path", "mapping" (folders),
    "images", "fingerprint"}``.
  """
  from jaxmerge.data import datasets as D  # noqa: PLC0415
  from jaxmerge.data.tasks import get_task  # noqa: PLC0415

  if data is not None:
    root = pathlib.Path(data) / task
    if not root.exists():
      raise ValueError(f"no local data for task {task!r} at {root}")
    folder = root / split if (root / split).is_dir() and not (root / "dataset_dict.json").exists() else None
    if folder is not None:
      source = D.FolderSource(folder, classnames=get_task(task).classnames)
      info = {"kind": "folder", "path": str(folder), "mapping": source.mapping}
    else:
      source, info = D.load_task(task, split, path=str(root)), {"kind": "dataset", "path": str(root)}
  else:
    source = D.load_task(task, split)
    info = {"kind": "hub", "path": get_task(task).hf_path}
  info.update(images=len(source), fingerprint=source.fingerprint())
  return source, info


def task_batches(task: str, *, data: str | None, split: str, batch_size: int, preprocess, limit=None, workers=0,
                 source=None):
  """Batches of one task from ``data/<task>`` (dataset or image folder) or its Hugging Face id.

  Args:
    task: a task name.
    data: a directory with ``data/<task>``, or ``None`` for the hub (see :func:`task_source`).
    split: the split.
    batch_size: images per batch.
    preprocess: image sizes and normalization.
    limit: evaluate only the first ``limit`` images.
    workers: image-decoding threads.
    source: the task's source if already opened (:func:`task_source`).

  Returns:
    An iterator of ``{"image", "label"}`` batches.
  """
  from jaxmerge.data import datasets as D  # noqa: PLC0415

  if source is None:
    source, _ = task_source(task, data=data, split=split)
  return D.batches(source, batch_size, preprocess=preprocess, limit=limit, num_workers=workers)


def eval_batch_size(batch_size: int, limit: int | None) -> int:
  """The padded evaluation batch: ``batch_size``, or ``limit`` when fewer images are evaluated per task (a
  64-image run is not padded to 128).

  Args:
    batch_size: the requested batch size.
    limit: images evaluated per task (``None``: all).

  Returns:
    ``min(batch_size, limit)``, or ``batch_size`` without a limit.

  Raises:
    ValueError: a batch size or limit below 1.
  """
  if batch_size < 1 or (limit is not None and limit < 1):
    raise ValueError(f"batch size and limit must be positive, got {batch_size} and {limit}")
  return min(batch_size, limit) if limit else batch_size


def _table(summary: dict) -> str:
  rows = ["| task | accuracy (%) | loss | images |", "|---|---|---|---|"]
  for t, m in summary["tasks"].items():
    rows.append(f"| {t} | {100 * m['accuracy']:.2f} | {m['loss']:.4f} | {m['count']} |")
  a = summary["average"]
  rows.append(f"| **average** | **{100 * a['accuracy']:.2f}** | {a['loss']:.4f} | |")
  return "\n".join(rows)


def run(args: argparse.Namespace) -> int:
  """Runs ``jaxmerge eval``; returns the exit status.

  Args:
    args: the parsed arguments.

  Returns:
    The exit status.
  """
  from jaxmerge.data.preprocess import Preprocess  # noqa: PLC0415
  from jaxmerge.data.tasks import TASKS, get_suite  # noqa: PLC0415
  from jaxmerge.eval.zeroshot import ClipZeroShot, load_tokenizer  # noqa: PLC0415

  tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else list(get_suite(args.suite or "TALL8"))
  unknown = [t for t in tasks if t not in TASKS]
  if unknown:
    raise ValueError(f"unknown task(s) {unknown}; known tasks: {', '.join(TASKS)}")
  start = time.perf_counter()
  batch_size = eval_batch_size(args.batch_size, args.limit)
  cfg, pparams, vision, pre_dir = load_eval_model(args.model, args.pretrained)
  tokenizer, tokenizer_error = None, None
  try:
    tokenizer = load_tokenizer(pre_dir, cfg)
  except ValueError as e:
    if args.heads_cache is None:
      raise
    tokenizer_error = str(e)
    print(f"note: {e}; using the heads cache {args.heads_cache}", file=sys.stderr)
  preprocess = Preprocess.from_pretrained(pre_dir, default_size=cfg.image_size)
  zs = ClipZeroShot(cfg, pparams, tokenizer=tokenizer, heads_cache=args.heads_cache, preprocess=preprocess,
                    batch_size=batch_size, tokenizer_error=tokenizer_error)
  data_info = {}

  def batches(t):
    source, data_info[t] = task_source(t, data=args.data, split=args.split)
    if data_info[t].get("mapping"):
      print(f"note: {t}: image folder {data_info[t]['path']}: class directories mapped {data_info[t]['mapping']}",
            file=sys.stderr)
    return task_batches(t, data=args.data, split=args.split, batch_size=batch_size, preprocess=preprocess,
                        limit=args.limit, workers=args.workers, source=source)

  summary = zs.evaluate_tasks({"vision_model": vision}, tasks, batches)
  summary.update(model=str(args.model), pretrained=str(args.pretrained or args.model), split=args.split,
                 batch_size=batch_size, data=data_info, seconds=time.perf_counter() - start)
  print(_table(summary))
  if args.out:
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1))
  return 0
