"""``jaxmerge bench``: build or load a suite, merge with every method, evaluate, write reports.

::

    jaxmerge bench [--suite offline|clip-vit-b32-8|...] [--smoke] [--tta] [--ri] [--moe] [--methods a,b,c]
                   [--seeds 0,1,2 | --seed N] [--jobs N] [--cache DIR] [--out DIR]

With no arguments it runs the offline 8-task suite for three seeds (each seed its own data and experts, all
from the shipped pretrained backbone; built on the first run, then read from the cache), reports every
method's mean and standard deviation over the seeds, the suite's regime statistics and the survey's
conclusions, and writes ``results.json``, ``results.csv``, ``results.md`` and PNG plots to
``./jaxmerge-results``.
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
# Methods that need data which the default offline run adds to the data-free ones: the rows of FusionBench's
# ViT-B/32 table (layer-wise AdaMerging, Fisher merging, RegMean), so the run compares every method it reports.
DEFAULT_DATA_METHODS = ("adamerging", "fisher", "regmean")
# ... plus, with --tta, one method that adapts on unlabeled test inputs (and with --moe, the routed one that does).
SMOKE_TTA_METHODS = ("adamerging",)
SMOKE_TTA_MOE_METHODS = ("wemoe",)
# Jobs (threads) that fine-tune experts and compute rows at once: a model this small leaves cores idle between
# XLA's operations, and a second job fills them (about 1.25x on 2 cores); results do not depend on it.
DEFAULT_JOBS = 2


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


def build_suite(name: str, *, cache_dir=None, seed: int = 0, smoke: bool = False, progress: bool = True,
                experts: bool = True):
  """Builds the suite ``name`` (see ``SUITES``).

  Args:
    name: ``"offline"`` (built here, from the cache when it holds it) or a CLIP suite, built by the first
      importable module of ``CLIP_SUITE_PROVIDERS``.
    cache_dir: cache directory; ``None`` uses the default (:func:`jaxmerge.bench.cache.default_cache_dir`).
    seed: suite seed.
    smoke: build the reduced smoke-test variant (the offline one is named ``"offline-smoke"``).
    progress: show progress bars.
    experts: fine-tune the offline suite's missing experts (``False``: leave them to
      :func:`jaxmerge.bench.suite.finetune_missing`).

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
    return build_offline_suite(config, cache_dir, progress=progress, name="offline-smoke" if smoke else name,
                               experts=experts)
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
                 help="also run Resolving Interference (the library's defaults, jaxmerge.tta.methods.RIConfig) before "
                      "every data-free method (rows 'ri+<method>'), with cross-task interference against the original "
                      "and the adapted experts")
  p.add_argument("--moe", action="store_true",
                 help="also run the model-level merges (wemoe, smile, twin, free and the per-task models emr, "
                      "tall_mask, tsv_c, byom, byom_lora) and add the columns extra parameters and relative "
                      "latency to every row")
  p.add_argument("--methods", default=None, metavar="A,B,C",
                 help="comma-separated registry names, and model-level names with --moe (default: every method "
                      "that needs no data plus " + ", ".join(DEFAULT_DATA_METHODS) + " on the offline suite, and "
                      "every model-level method with --moe)")
  p.add_argument("--seed", type=int, default=None, help="one suite and merge seed (same as --seeds N)")
  p.add_argument("--seeds", default=None, metavar="A,B,C",
                 help="suite seeds to average over (default for the offline suite: "
                      "0,1,2; --smoke and the CLIP suites: 0)")
  p.add_argument("--recompute", action="store_true",
                 help="merge and evaluate every method again even if the cache holds its row for this exact code, "
                      "package versions, suite and seed")
  p.add_argument("--jobs", type=int, default=None, metavar="N",
                 help=f"fine-tuning jobs and rows computed at once (threads; default {DEFAULT_JOBS}); results do "
                      "not depend on it, the rows' merge times are measured while other rows run when N > 1")
  p.add_argument("--no-regime", dest="regime", action="store_false",
                 help="skip the regime statistics (task-vector norms, cosines, ranks, linearity)")
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


def _seeds(args) -> list[int]:
  if args.seed is not None and args.seeds is not None:
    raise ValueError("give --seed or --seeds, not both")
  if args.seed is not None:
    return [args.seed]
  if args.seeds is not None:
    try:
      seeds = [int(x) for x in str(args.seeds).split(",") if x.strip()]
    except ValueError as e:
      raise ValueError(f"--seeds takes comma-separated integers, got {args.seeds!r}") from e
    if not seeds or len(set(seeds)) != len(seeds):
      raise ValueError(f"--seeds needs distinct seeds, got {args.seeds!r}")
    return seeds
  if args.suite == "offline" and not args.smoke:
    from jaxmerge.bench.suite import DEFAULT_SEEDS

    return list(DEFAULT_SEEDS)
  return [0]


def _peak_rss_gb() -> float:
  import resource

  kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return kb / (1024**3 if sys.platform == "darwin" else 1024**2)


def run(args: argparse.Namespace) -> int:
  """Runs ``jaxmerge bench``: builds the suite for each seed, merges and evaluates the methods, writes the
  reports (means and standard deviations over seeds) to ``args.out`` and prints ``results.md``.

  Args:
    args: the parsed options of the ``bench`` subcommand (see :func:`register`).

  Returns:
    The exit status, 0.

  Raises:
    ValueError: an unknown suite, method or adapter, bad seeds, or an unreachable suite.
  """
  from jaxmerge.bench.report import write_reports
  from jaxmerge.bench.runner import aggregate_seeds, check_adapters, run_suites

  if args.suite not in SUITES:
    raise ValueError(f"unknown suite {args.suite!r}; valid suites: {', '.join(SUITES)}")
  seeds = _seeds(args)
  moe = getattr(args, "moe", False)
  methods, moe_methods = _resolve(args.methods, tta=args.tta, moe=moe)
  _enable_compilation_cache(args.cache)
  if args.smoke and args.methods is None:
    methods, moe_methods = smoke_selection(methods, moe_methods, tta=args.tta)
  if args.methods is None and not args.smoke and args.suite == "offline" and not moe:
    methods += [m for m in DEFAULT_DATA_METHODS if m not in methods]
  adapters = ("ri",) if args.ri else ()
  check_adapters(adapters)  # fail before spending minutes on the suite
  start = time.perf_counter()
  jobs = max(1, int(getattr(args, "jobs", None) or DEFAULT_JOBS))
  t0 = time.perf_counter()
  if args.suite == "offline":
    from jaxmerge.bench.suite import finetune_missing

    # Every seed's suite is prepared first, then all their missing experts are fine-tuned together.
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(jobs) as pool:
      suites = list(pool.map(lambda s: build_suite(args.suite, cache_dir=args.cache, seed=s, smoke=args.smoke,
                                                   progress=False, experts=False), seeds))
    finetune_missing(suites, jobs=jobs, progress=args.progress)
  else:
    suites = [build_suite(args.suite, cache_dir=args.cache, seed=s, smoke=args.smoke, progress=args.progress)
              for s in seeds]
  build_seconds = time.perf_counter() - t0
  row_caches = []
  for seed, suite in zip(seeds, suites):
    row_cache = None
    if args.suite == "offline" and not getattr(args, "recompute", False) and hasattr(suite, "config"):
      from jaxmerge.bench.cache import default_cache_dir
      from jaxmerge.bench.runner import RowCache

      root = Path(args.cache or default_cache_dir()) / f"offline-{suite.config.hash}" / "rows"
      row_cache = RowCache(root, seed=seed)
    row_caches.append(row_cache)
  # The experts' full cross-evaluation (a plot of the report) is measured on the first seed; the others
  # evaluate each expert on its own task, which is all the rows need.
  per_seed = run_suites(suites, methods, seeds=seeds, adapters=adapters, progress=args.progress,
                        row_caches=row_caches, cross_eval=[i == 0 for i in range(len(seeds))], jobs=jobs)
  regimes = []
  for i, (seed, suite, results) in enumerate(zip(seeds, suites, per_seed)):
    if moe:
      from jaxmerge.bench.moe_runner import add_moe_rows

      add_moe_rows(results, suite, moe_methods, seed=seed, progress=args.progress)
    if getattr(args, "regime", True) and hasattr(suite, "experts") and args.suite == "offline":
      from jaxmerge.bench.regime import regime_stats

      t0 = time.perf_counter()
      stats = row_caches[i].get("_regime") if row_caches[i] is not None else None
      if stats is None:
        rows = {r["method"]: r["accuracy"] for r in results["rows"]}
        # The linearity probe runs on the first seed, reusing the pretrained (alpha 0) and expert (alpha 1)
        # accuracies already measured.
        stats = regime_stats(suite, linearity=i == 0, known={0.0: rows["pretrained"], 1.0: rows["experts"]})
        if row_caches[i] is not None:
          row_caches[i].put("_regime", stats)
      regimes.append(stats)
      results["timings"]["regime"] = time.perf_counter() - t0
    results["timings"]["build_or_load_suite"] = build_seconds / len(seeds)
  config = getattr(suites[-1], "config", None)
  del suites
  results = aggregate_seeds(per_seed) if len(per_seed) > 1 else {**per_seed[0], "seeds": seeds}
  if regimes:
    results["regime"] = regimes
  results["command"] = "jaxmerge " + " ".join(shlex.quote(a) for a in getattr(args, "argv", sys.argv[1:]))
  results["timings"] = {**results["timings"], "total": time.perf_counter() - start}
  results["peak_rss_gb"] = _peak_rss_gb()
  if config is not None and hasattr(config, "to_dict"):
    results["suite_config"] = config.to_dict()
    results["cache_key"] = getattr(config, "hash", None)
  from jaxmerge.bench.versions import check_versions

  results["versions"] = check_versions()
  files = write_reports(results, args.out, plots=args.plots)
  print((Path(args.out) / "results.md").read_text())
  print("wrote " + ", ".join(str(f) for f in files))
  return 0
