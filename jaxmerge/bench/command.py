"""``jaxmerge bench``: build or load a suite, merge with every method, evaluate, write reports.

::

    jaxmerge bench [--suite offline|clip-vit-b32-8|...] [--smoke] [--tta] [--ri] [--moe] [--methods a,b,c]
                   [--seed N] [--cache DIR] [--out DIR]

With no arguments it runs the offline 8-task suite (built on the first run, then read from the cache) and
writes ``results.json``, ``results.csv``, ``results.md`` and PNG plots to ``./jaxmerge-results``.
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys
import time
from pathlib import Path

__all__ = ["CLIP_SUITES", "SUITES", "build_suite", "register", "run"]

CLIP_SUITES = tuple(f"clip-vit-{arch}-{n}" for arch in ("b32", "b16", "l14") for n in (8, 14, 20))
SUITES = ("offline", *CLIP_SUITES)
# Modules that may provide the real CLIP suites: each exposes build_suite(name, *, cache_dir, seed, smoke,
# progress) returning an object with the runner's Suite interface.
CLIP_SUITE_PROVIDERS = ("jaxmerge.data.clip_suites", "jaxmerge.bench.clip_suites")
# --smoke without --methods: a few representative methods (compilation dominates a smoke run's time).
SMOKE_METHODS = ("simple_average", "task_arithmetic", "ties")
# ... plus, with --tta, one method that adapts on unlabeled test inputs (and with --moe, the routed one that does).
SMOKE_TTA_METHODS = ("adamerging",)
SMOKE_TTA_MOE_METHODS = ("wemoe",)


def smoke_selection(methods: list[str], moe_methods: list[str], *, tta: bool) -> tuple[list[str], list[str]]:
  """The methods ``--smoke`` runs without ``--methods``: the representative few of each selected kind, so that
  ``--tta`` and ``--moe`` still run at least one method of theirs.

  Args:
    methods: the registry methods the flags select.
    moe_methods: the model-level methods the flags select.
    tta: ``--tta`` was given.

  Returns:
    ``(methods, moe_methods)`` reduced to the smoke selection.
  """
  from jaxmerge.bench.moe_runner import SMOKE_MOE_METHODS  # noqa: PLC0415

  keep = SMOKE_METHODS + (SMOKE_TTA_METHODS if tta else ())
  keep_moe = SMOKE_MOE_METHODS + (SMOKE_TTA_MOE_METHODS if tta else ())
  return [m for m in methods if m in keep], [m for m in moe_methods if m in keep_moe]


def build_suite(name: str, *, cache_dir=None, seed: int = 0, smoke: bool = False, progress: bool = True):
  """Builds the suite ``name`` (see ``SUITES``).

  Args:
    name: ``"offline"`` (built here, from the cache when it holds it) or a CLIP suite, built by the first
      importable module of ``CLIP_SUITE_PROVIDERS``.
    cache_dir: cache directory; ``None`` uses the default (:func:`jaxmerge.bench.cache.default_cache_dir`).
    seed: suite seed.
    smoke: build the reduced smoke-test variant (the offline one is named ``"offline-smoke"``).
    progress: show progress bars.

  Returns:
    The built suite (it implements :class:`jaxmerge.bench.runner.Suite`).

  Raises:
    ValueError: an unknown suite name (listing the valid ones), or a CLIP suite whose weights or data are not
      reachable.
  """
  if name not in SUITES:
    raise ValueError(f"unknown suite {name!r}; valid suites: {', '.join(SUITES)}")
  if name == "offline":
    from jaxmerge.bench.suite import OfflineConfig, build_offline_suite

    config = OfflineConfig.smoke(seed) if smoke else OfflineConfig(seed=seed)
    return build_offline_suite(config, cache_dir, progress=progress, name="offline-smoke" if smoke else name)
  errors = []
  for mod_name in CLIP_SUITE_PROVIDERS:
    try:
      mod = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
      errors.append(f"{mod_name}: {e}")
      continue
    try:
      return mod.build_suite(name, cache_dir=cache_dir, seed=seed, smoke=smoke, progress=progress)
    except (OSError, ImportError, ConnectionError) as e:
      raise ValueError(f"suite {name!r} is not reachable: {type(e).__name__}: {e}. It needs the CLIP weights "
                       "and the task datasets locally (Hugging Face cache) or network access.") from e
  raise ValueError(f"suite {name!r} needs the CLIP weights and its 8+ datasets, and no provider of the real "
                   f"CLIP suites is installed ({'; '.join(errors)}). Run the offline suite instead: "
                   "jaxmerge bench --suite offline")


def _enable_compilation_cache(cache_dir) -> None:
  """Keeps compiled XLA programs under ``<cache>/xla`` so that reruns skip compilation (merges of a ViT
  compile in seconds each and run in a fraction of that). A cache configured by the user is left alone."""
  import os

  import jax

  from jaxmerge.bench.cache import default_cache_dir

  if jax.config.jax_compilation_cache_dir or os.environ.get("JAXMERGE_NO_XLA_CACHE"):
    return
  path = Path(cache_dir or default_cache_dir()) / "xla"
  path.mkdir(parents=True, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", str(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def register(subparsers) -> None:
  """Adds the ``bench`` subcommand (called by :mod:`jaxmerge.cli`).

  Args:
    subparsers: the ``argparse`` sub-parsers action of the ``jaxmerge`` parser; the new parser's ``func``
      default is :func:`run`.
  """
  p = subparsers.add_parser(
    "bench", help="benchmark every merging method on a suite (default: the offline 8-task suite)",
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--suite", default="offline", metavar="NAME",
                 help=f"suite to run: {', '.join(SUITES)} (default: offline)")
  p.add_argument("--smoke", action="store_true",
                 help=f"a reduced suite that runs in under a minute (methods: {', '.join(SMOKE_METHODS)}, "
                      f"with --tta also {', '.join(SMOKE_TTA_METHODS)}, unless --methods is given)")
  p.add_argument("--tta", action="store_true", help="also run methods that adapt on unlabeled test inputs")
  p.add_argument("--ri", action="store_true",
                 help="also run Resolving Interference before every data-free method (rows 'ri+<method>')")
  p.add_argument("--moe", action="store_true",
                 help="also run the model-level merges (wemoe, smile, twin, free and the per-task models emr, "
                      "tall_mask, tsv_c, byom, byom_lora) and add the columns extra parameters and relative "
                      "latency to every row")
  p.add_argument("--methods", default=None, metavar="A,B,C",
                 help="comma-separated registry names, and model-level names with --moe (default: every method "
                      "that needs no data, and every model-level method with --moe)")
  p.add_argument("--seed", type=int, default=0, help="suite and merge seed (default: 0)")
  p.add_argument("--cache", default=None, metavar="DIR",
                 help="cache directory (default: $JAXMERGE_CACHE or ~/.cache/jaxmerge)")
  p.add_argument("--out", default="jaxmerge-results", metavar="DIR",
                 help="output directory (default: ./jaxmerge-results)")
  p.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
  p.add_argument("--no-plots", dest="plots", action="store_false", help="skip the PNG plots")
  p.set_defaults(func=run)


def _resolve(spec, *, tta: bool, moe: bool) -> tuple[list[str], list[str]]:
  """``(registry methods, model-level methods)`` of a run; model-level names need ``--moe``."""
  import jaxmerge as jm
  from jaxmerge.bench import moe_runner
  from jaxmerge.bench.runner import resolve_methods

  if moe:
    return moe_runner.resolve_methods(spec, tta=tta)
  if spec is not None and spec != "all":
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec)]
    only_moe = [n for n in names if n in moe_runner.MOE_METHODS and n not in jm.list_methods()]
    if only_moe:
      raise ValueError(f"{', '.join(map(repr, only_moe))} are model-level methods: add --moe "
                       f"(model-level methods: {', '.join(moe_runner.MOE_METHODS)})")
  return resolve_methods(spec, tta=tta), []


def run(args: argparse.Namespace) -> int:
  """Runs ``jaxmerge bench``: builds the suite, merges and evaluates the methods, writes the reports to
  ``args.out`` and prints ``results.md``.

  Args:
    args: the parsed options of the ``bench`` subcommand (see :func:`register`).

  Returns:
    The exit status, 0.

  Raises:
    ValueError: an unknown suite, method or adapter, or an unreachable suite.
  """
  from jaxmerge.bench.report import write_reports
  from jaxmerge.bench.runner import check_adapters, run_suite

  if args.suite not in SUITES:
    raise ValueError(f"unknown suite {args.suite!r}; valid suites: {', '.join(SUITES)}")
  moe = getattr(args, "moe", False)
  methods, moe_methods = _resolve(args.methods, tta=args.tta, moe=moe)
  _enable_compilation_cache(args.cache)
  if args.smoke and args.methods is None:
    methods, moe_methods = smoke_selection(methods, moe_methods, tta=args.tta)
  adapters = ("ri",) if args.ri else ()
  check_adapters(adapters)  # fail before spending minutes on the suite
  start = time.perf_counter()
  suite = build_suite(args.suite, cache_dir=args.cache, seed=args.seed, smoke=args.smoke,
                      progress=args.progress)
  build_seconds = time.perf_counter() - start
  results = run_suite(suite, methods, seed=args.seed, adapters=adapters, progress=args.progress)
  if moe:
    from jaxmerge.bench.moe_runner import add_moe_rows

    add_moe_rows(results, suite, moe_methods, seed=args.seed, progress=args.progress)
  results["command"] = "jaxmerge " + " ".join(shlex.quote(a) for a in getattr(args, "argv", sys.argv[1:]))
  results["timings"] = {"build_or_load_suite": build_seconds, **results["timings"],
                        "total": time.perf_counter() - start}
  config = getattr(suite, "config", None)
  if config is not None and hasattr(config, "to_dict"):
    results["suite_config"] = config.to_dict()
    results["cache_key"] = getattr(config, "hash", None)
  files = write_reports(results, args.out, plots=args.plots)
  print((Path(args.out) / "results.md").read_text())
  print("wrote " + ", ".join(str(f) for f in files))
  return 0
