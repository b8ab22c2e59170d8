"""Merge every selected method on a suite, evaluate it on every task, and collect the results.

The runner knows nothing about how a method uses data. A *method runner* turns ``(suite, method, key)`` into
merged parameters; the built-in one handles every registered method that needs no data (``data == "none"``)
with :func:`jaxmerge.merge` or :func:`jaxmerge.merge_per_task`. Methods that need data plug in with
:func:`register_runner` for their data class (``"val"``, ``"aux"``, ``"tta"``): the runner receives the suite
object, which exposes the pretrained model and experts, pure jittable model functions (``suite.embed``,
``suite.logits``) and the data (``suite.batches``, ``suite.unlabeled``, ``suite.aux``). Pre-merge adaptations
such as Resolving Interference plug in with :func:`register_adapter`: an adapter returns new experts, and
every data-free method is then merged again from them (rows ``"<adapter>+<method>"``).

A plug-in module registers itself at import; the runner imports the modules listed in ``PLUGIN_MODULES``
for the data classes or adapters that a run asks for.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Protocol

import jax
import numpy as np

import jaxmerge as jm

__all__ = ["MethodRunner", "PLUGIN_MODULES", "RowCache", "Suite", "aggregate_seeds", "check_adapters", "dispatch_by_name", "register_adapter", "register_runner",
           "release_memory", "resolve_methods", "run_suite", "run_suites"]


class Suite(Protocol):
  """What the runner and method runners need from a suite (the offline suite and the CLIP suites)."""

  name: str
  tasks: tuple[str, ...]
  pretrained: Any
  experts: list[Any]
  layout: Callable[..., Any]
  timings: dict[str, float]

  def evaluate(self, params: Any, tasks: Sequence[str] | None = None, split: str = "test") -> dict[str, float]:
    ...


# A method runner: (suite, method name, hyperparameters, PRNG key) -> merged params, a list of T params
# (one per task) for per-task methods, or an object with ``evaluate_on(suite) -> {task: accuracy}`` and a
# ``per_task`` attribute for a model that is not a parameter tree (Representation Surgery's adapters).
MethodRunner = Callable[[Suite, str, dict, jax.Array], Any]
# An adapter: (suite, PRNG key) -> adapted experts (list of T params), e.g. Resolving Interference.
Adapter = Callable[[Suite, jax.Array], list]
# An adapter's diagnostics: (suite, merged params, adapted experts or None, merged accuracy, original experts'
# accuracy, adapted experts' accuracy or None) -> extra fields of the row (e.g. RI's cross-task interference).
Diagnostics = Callable[[Suite, Any, "list | None", dict, dict, "dict | None"], dict]

_RUNNERS: dict[str, MethodRunner] = {}
_ADAPTERS: dict[str, Adapter] = {}
_DIAGNOSTICS: dict[str, Diagnostics] = {}

# Modules imported on demand; each registers its runner or adapter when imported.
PLUGIN_MODULES: dict[str, tuple[str, ...]] = {
  "tta": ("jaxmerge.bench.ri_runner", "jaxmerge.bench.tta_runner"),
  "val": ("jaxmerge.bench.ri_runner", "jaxmerge.bench.tta_runner"),
  "aux": ("jaxmerge.bench.ri_runner",),
  "ri": ("jaxmerge.bench.ri_runner",),
}


def register_runner(data: str, runner: MethodRunner) -> None:
  """Registers the runner of every method whose ``jm.method_info(name).data == data``.

  Args:
    data: the data class it serves (``"val"``, ``"aux"``, ``"tta"``; ``"none"`` is the built-in runner);
      replaces a runner already registered for it.
    runner: ``runner(suite, method, hparams, key)`` returning the merged parameters, or a list of ``T``
      parameter trees (one per task) for per-task methods.
  """
  _RUNNERS[data] = runner


def dispatch_by_name(kind: str, mine: dict[str, MethodRunner]) -> MethodRunner:
  """A runner for data class ``kind`` that serves the methods in ``mine`` by name and hands every other method
  to the runner registered for ``kind`` before it (so several plug-in modules can share a data class).

  Args:
    kind: the data class (``"val"``, ``"aux"``, ``"tta"``).
    mine: method name -> runner for the methods the caller implements.

  Returns:
    A method runner, to pass to :func:`register_runner`.
  """
  previous = _RUNNERS.get(kind)

  def run(suite, method, hparams, key):
    """Runs ``method`` with the runner that implements it (this plug-in's, else the one registered before).

    Args:
      suite: a built suite.
      method: registry name.
      hparams: hyperparameters overriding the method's defaults.
      key: PRNG key.

    Returns:
      The merged parameters (a list of ``T`` parameter trees for per-task methods).

    Raises:
      ValueError: a method that neither this runner nor the previous one handles.
    """
    if method in mine:
      return mine[method](suite, method, hparams, key)
    if previous is not None:
      return previous(suite, method, hparams, key)
    raise ValueError(f"no benchmark runner for method {method!r} (data {kind!r})")

  return run


def register_adapter(name: str, adapter: Adapter, *, diagnostics: Diagnostics | None = None) -> None:
  """Registers a pre-merge adaptation.

  Args:
    name: the adapter's name, used in row names (``"<name>+<method>"``, e.g. ``"ri"``) and in
      ``run_suite(adapters=...)``.
    adapter: ``adapter(suite, key)`` returning the adapted experts (a list of ``T`` parameter trees).
    diagnostics: optional ``diagnostics(suite, merged, adapted, merged_acc, expert_acc, adapted_acc)``
      returning extra fields for a row that holds one merged parameter tree: called for every
      ``"<name>+<method>"`` row with the adapted experts and their own-task accuracies, and for the plain
      ``"<method>"`` rows of the same run with ``adapted = adapted_acc = None`` (the values before the
      adaptation). Accuracies are ``{task: accuracy}``.
  """
  _ADAPTERS[name] = adapter
  if diagnostics is None:
    _DIAGNOSTICS.pop(name, None)
  else:
    _DIAGNOSTICS[name] = diagnostics


def _load_plugins(kind: str) -> None:
  for mod in PLUGIN_MODULES.get(kind, ()):
    try:
      importlib.import_module(mod)
    except ModuleNotFoundError as e:
      if e.name is None or not mod.startswith(e.name):
        raise


def check_adapters(adapters: Sequence[str]) -> None:
  """Imports the plug-ins of ``adapters`` and raises ``ValueError`` for any that is not registered.

  Args:
    adapters: adapter names (e.g. ``("ri",)``); their modules are looked up in ``PLUGIN_MODULES``.

  Raises:
    ValueError: an adapter that no module registers (the message lists the registered ones).
  """
  for a in adapters:
    if a not in _ADAPTERS:
      _load_plugins(a)
    if a not in _ADAPTERS:
      raise ValueError(f"no adapter {a!r} is registered (looked in {', '.join(PLUGIN_MODULES.get(a, ())) or 'no module'}"
                       f"); available: {', '.join(sorted(_ADAPTERS)) or 'none'}")


def _merge_data_free(suite: Suite, method: str, hparams: dict, key: jax.Array, experts=None) -> Any:
  info = jm.method_info(method)
  tx = jm.get_method(method)(**hparams)
  fn = jm.merge_per_task if info.per_task else jm.merge
  return fn(tx, suite.pretrained, experts if experts is not None else suite.experts, key=key,
            layout=suite.layout, names=list(suite.tasks))


register_runner("none", _merge_data_free)


def resolve_methods(spec: str | Sequence[str] | None, *, tta: bool = False) -> list[str]:
  """The methods a run merges.

  Args:
    spec: comma-separated names or a list; ``None`` or ``"all"`` selects every registered method that needs
      no data (plus those needing TTA data when ``tta``).
    tta: include methods with ``data == "tta"`` in the default selection.

  Returns:
    The registry names to run, in the order given (duplicates dropped), or in registry order for the default
    selection.

  Raises:
    ValueError: an unknown method (the message lists the valid ones).
  """
  registered = jm.list_methods()
  if spec is None or spec == "all" or spec == ["all"]:
    kinds = {"none", "tta"} if tta else {"none"}
    return [m for m in registered if jm.method_info(m).data in kinds]
  names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
  unknown = [n for n in names if n not in registered]
  if unknown:
    raise ValueError(f"unknown method(s) {', '.join(map(repr, unknown))}; valid methods: {', '.join(registered)}")
  if not names:
    raise ValueError("--methods selected no method")
  return list(dict.fromkeys(names))


def result_row(method: str, acc: dict, expert_acc: dict | None, tasks, seconds: float, **extra) -> dict:
  """One row of ``results.json``.

  Args:
    method: the row's name.
    acc: ``{task: accuracy}``.
    expert_acc: the experts' accuracies (for normalized accuracy), or ``None``.
    tasks: the task order.
    seconds: the time the method took.
    extra: further fields of the row.

  Returns:
    The row (accuracy, average, normalized accuracy, seconds and ``extra``).
  """
  avg = float(np.mean([acc[t] for t in tasks]))
  norm = {t: (acc[t] / expert_acc[t] if expert_acc and expert_acc[t] > 0 else float("nan")) for t in tasks}
  return {"method": method, "accuracy": {t: float(acc[t]) for t in tasks}, "average": avg,
          "normalized": norm, "normalized_average": float(np.mean(list(norm.values()))), "seconds": seconds,
          **extra}


def _block(tree):
  jax.tree.map(lambda x: x.block_until_ready() if hasattr(x, "block_until_ready") else x, tree)
  return tree


_WARM: set = set()  # (method, program signature) pairs this process has compiled
_WARM_LOCK = threading.Lock()


def _signature(suite: Suite, method: str, experts) -> tuple:
  leaves = jax.tree.leaves(suite.pretrained)
  return (method, len(experts), str(jax.tree.structure(suite.pretrained)),
          tuple((np.shape(x), str(getattr(x, "dtype", type(x)))) for x in leaves))


def _timed_data_free(suite: Suite, method: str, key: jax.Array, experts) -> tuple[Any, float, float | None]:
  """Merges with one transform and times it. The first merge of a program this process has not compiled runs
  twice: the first call compiles, the second measures the merge itself; a program compiled before (another
  seed's suite of the same shapes) runs once.

  Returns:
    ``(merged, seconds, compile_seconds)``: the merge's steady-state wall time, and what the first call
    spent on top of it (tracing and XLA compilation; near zero when the persistent compilation cache holds
    the program; ``None`` when the program was already compiled).
  """
  info = jm.method_info(method)
  tx = jm.get_method(method)()
  fn = jm.merge_per_task if info.per_task else jm.merge
  experts = experts if experts is not None else suite.experts

  def call():
    start = time.perf_counter()
    out = _block(fn(tx, suite.pretrained, experts, key=key, layout=suite.layout, names=list(suite.tasks)))
    return out, time.perf_counter() - start

  sig = _signature(suite, method, experts)
  with _WARM_LOCK:
    warm = sig in _WARM
  merged, first = call()
  if warm:
    return merged, first, None
  merged, second = call()
  with _WARM_LOCK:
    _WARM.add(sig)
  return merged, second, max(first - second, 0.0)


def _evaluate_merged(suite: Suite, merged: Any) -> tuple[dict, bool]:
  if callable(getattr(merged, "evaluate_on", None)):  # a model that is not one parameter tree (e.g. Surgery's)
    return merged.evaluate_on(suite), bool(getattr(merged, "per_task", False))
  if isinstance(merged, (list, tuple)):
    if len(merged) != len(suite.tasks):
      raise ValueError(f"a per-task method returned {len(merged)} models for {len(suite.tasks)} tasks")
    return {t: suite.evaluate(m, [t])[t] for t, m in zip(suite.tasks, merged)}, True
  return suite.evaluate(merged), False


class RowCache:
  """Result rows stored on disk, keyed by what produces them, so that rerunning an unchanged benchmark reads
  its rows instead of merging and evaluating again.

  An entry is ``<root>/<salt>/<name>.json``; ``salt`` hashes everything a row depends on besides the suite and
  the method: jaxmerge's source files, the versions of the numerics packages, the seed. The suite itself is
  keyed by the cache directory (``offline-<config hash>``), which covers its data, backbone and experts.
  Entries are written to a temporary file and renamed; an unreadable entry is recomputed.

  Args:
    root: the directory (created on first write).
    seed: the run's seed (rows of different seeds never share an entry).
  """

  def __init__(self, root, *, seed: int):
    from jaxmerge.bench.versions import check_versions

    pkg = Path(jm.__file__).resolve().parent
    h = hashlib.sha256()
    for f in sorted(pkg.rglob("*")):
      if f.suffix in (".py", ".c") and f.is_file():
        h.update(str(f.relative_to(pkg)).encode())
        h.update(f.read_bytes())
    h.update(json.dumps(check_versions()["installed"], sort_keys=True).encode())
    h.update(str(seed).encode())
    self.dir = Path(root) / h.hexdigest()[:16]

  def get(self, name: str):
    try:
      return json.loads((self.dir / f"{name}.json").read_text())
    except (OSError, ValueError):
      return None

  def put(self, name: str, value) -> None:
    from jaxmerge.bench.report import jsonable
    from jaxmerge.io.atomic import mkstemp

    self.dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = mkstemp(self.dir / f"{name}.json")
    with os.fdopen(fd, "w") as f:
      json.dump(jsonable(value), f)
    os.replace(tmp, self.dir / f"{name}.json")


def run_suite(suite: Suite, methods: Sequence[str], *, seed: int = 0, adapters: Sequence[str] = (),
              progress: bool = True, strict: bool = False, row_cache: RowCache | None = None,
              cross_eval: bool = True, jobs: int = 1) -> dict:
  """Evaluates the baselines and every method on ``suite``.

  Args:
    suite: a built suite (e.g. :func:`jaxmerge.bench.suite.build_offline_suite`).
    methods: registry names (see :func:`resolve_methods`); each is built with its default hyperparameters.
    seed: seeds the PRNG key passed to every merge (stochastic methods: DARE, DELLA, ...).
    adapters: pre-merge adaptations to run as well (e.g. ``("ri",)``); their rows are
      ``"<adapter>+<method>"`` for every data-free method in ``methods``.
    progress: show a progress bar over methods.
    strict: re-raise a method's error instead of recording it under ``"skipped"``.
    row_cache: a :class:`RowCache`: rows found there are read instead of computed (their ``cached`` field is
      true), computed rows are stored; only used for runs without adapters.
    cross_eval: evaluate every expert on every task (``cross_eval`` in the results); otherwise each expert
      on its own task only.
    jobs: rows computed at once (threads; see :func:`run_suites`).

  Returns:
    The results dict of :mod:`jaxmerge.bench.report` (without the reference comparison); with adapters, also
    ``"adapted_experts": {adapter: {task: accuracy of the adapted expert on its task}}``, and the rows carry
    the fields of the adapters' diagnostics (for RI: cross-task interference against the original and the
    adapted experts).
  """
  return run_suites([suite], methods, seeds=[seed], adapters=adapters, progress=progress, strict=strict,
                    row_caches=[row_cache], cross_eval=[cross_eval], jobs=jobs)[0]


def release_memory() -> None:
  """Frees what finished merges leave behind: JAX's compiled programs (``jax.clear_caches``), unreachable
  Python objects, and the C heap's free pages (glibc's ``malloc_trim``, where available)."""
  import ctypes
  import gc

  jax.clear_caches()
  with _WARM_LOCK:
    _WARM.clear()
  gc.collect()
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):
    pass


def _baselines(suite: Suite, row_cache: RowCache | None, cross_eval: bool) -> dict:
  """The pretrained model on every task and the experts on theirs (``cross_eval``: on every task)."""
  base = row_cache.get("_baselines") if row_cache is not None else None
  if base is not None and (base.get("full_cross", True) or not cross_eval):
    return base
  tasks = list(suite.tasks)
  cross = ([suite.evaluate(e) for e in suite.experts] if cross_eval
           else [suite.evaluate(e, [t]) for t, e in zip(tasks, suite.experts)])
  base = {"pretrained": suite.evaluate(suite.pretrained), "cross": cross, "full_cross": bool(cross_eval)}
  if row_cache is not None:
    row_cache.put("_baselines", base)
  return base


def run_suites(suites: Sequence[Suite], methods: Sequence[str], *, seeds: Sequence[int],
               adapters: Sequence[str] = (), progress: bool = True, strict: bool = False,
               row_caches: Sequence[RowCache | None] | None = None, cross_eval: Sequence[bool] | None = None,
               jobs: int = 1, group_methods: int = 4, free_memory: bool = True) -> list[dict]:
  """:func:`run_suite` on several suites (one per seed), their rows computed ``jobs`` at a time.

  Every row is a deterministic function of its suite, method and seed, so ``jobs`` changes wall times, not
  results. Jobs are threads sharing one process (its compiled programs and the suites' data): on a small
  model one job leaves cores idle between XLA's operations, and a second fills them. Methods that need data
  (the longest rows) start first. With ``jobs > 1`` the rows' ``seconds`` are measured while other rows run.

  Args:
    suites: the built suites.
    methods: registry names.
    seeds: one PRNG seed per suite.
    adapters, progress, strict: as in :func:`run_suite`.
    row_caches: one :class:`RowCache` (or ``None``) per suite.
    cross_eval: per suite, whether to cross-evaluate the experts (default: all).
    jobs: rows computed at once.
    group_methods: methods whose rows (all suites) run between two releases of compiled programs.
    free_memory: release the compiled programs (:func:`release_memory`) after each group, which bounds the
      memory of a run over many methods (each method's programs would otherwise stay; the persistent
      compilation cache makes a later recompilation cheap).

  Returns:
    One results dict per suite, in :func:`run_suite`'s format.
  """
  n = len(suites)
  if len(seeds) != n:
    raise ValueError(f"run_suites got {n} suites and {len(seeds)} seeds")
  row_caches = list(row_caches) if row_caches is not None else [None] * n
  cross_eval = list(cross_eval) if cross_eval is not None else [True] * n
  for kind in {jm.method_info(m).data for m in methods} - set(_RUNNERS):
    _load_plugins(kind)
  check_adapters(adapters)
  row_caches = [rc if not adapters else None for rc in row_caches]
  pool = ThreadPoolExecutor(max(1, jobs))
  try:
    # Phase 1: each suite's baselines and adapted experts.
    t0 = time.perf_counter()
    bases = list(pool.map(lambda i: _baselines(suites[i], row_caches[i], cross_eval[i]), range(n)))
    base_seconds = (time.perf_counter() - t0) / n
    adapted: list[dict[str, list]] = [{} for _ in range(n)]
    adapted_acc: list[dict[str, dict]] = [{} for _ in range(n)]
    adapt_seconds: list[dict[str, float]] = [{} for _ in range(n)]
    keys = [jax.random.key(s) for s in seeds]

    def adapt(i, a):
      start = time.perf_counter()
      adapted[i][a] = _block(_ADAPTERS[a](suites[i], jax.random.fold_in(keys[i], 1)))
      adapt_seconds[i][a] = time.perf_counter() - start
      adapted_acc[i][a] = {t: suites[i].evaluate(e, [t])[t] for t, e in zip(suites[i].tasks, adapted[i][a])}

    list(pool.map(lambda ia: adapt(*ia), [(i, a) for i in range(n) for a in adapters]))

    # Phase 2: the rows, method by method (every seed's row of a method shares its compiled programs), methods
    # that need data first (the longest rows); after each group of methods their programs are freed.
    jobs_list = [(i, m, m, None) for m in methods for i in range(n)]
    for a in adapters:
      jobs_list += [(i, f"{a}+{m}", m, a) for m in methods if jm.method_info(m).data == "none" for i in range(n)]
    order = sorted(range(len(jobs_list)), key=lambda j: (jm.method_info(jobs_list[j][2]).data == "none", j))
    per_group = max(1, group_methods) * n
    groups = [order[k:k + per_group] for k in range(0, len(order), per_group)]
    t0 = time.perf_counter()
    outs = [None] * len(jobs_list)
    bar = None
    if progress:
      from tqdm.auto import tqdm

      bar = tqdm(total=len(jobs_list), desc="merging and evaluating", leave=False)
    for g, group in enumerate(groups):
      futures = {pool.submit(_one_row, suites[i], row, method, adapter, keys[i], bases[i], adapted[i],
                             adapted_acc[i], adapt_seconds[i], adapters, strict, row_caches[i]): j
                 for j in group for i, row, method, adapter in [jobs_list[j]]}
      for f in as_completed(futures):
        outs[futures[f]] = f.result()
        if bar is not None:
          bar.update()
      if free_memory and g < len(groups) - 1:
        release_memory()
    if bar is not None:
      bar.close()
    row_seconds = (time.perf_counter() - t0) / n
  finally:
    pool.shutdown(wait=True)
  results = []
  for i, suite in enumerate(suites):
    tasks = list(suite.tasks)
    pre_acc, cross = bases[i]["pretrained"], bases[i]["cross"]
    expert_acc = {t: cross[k][t] for k, t in enumerate(tasks)}
    rows = [result_row("pretrained", pre_acc, expert_acc, tasks, 0.0, kind="baseline", data="none"),
            result_row("experts", expert_acc, expert_acc, tasks, 0.0, kind="baseline", data="labels (fine-tuning)",
                       per_task_model=True)]
    skipped = []
    for j, (k, _, _, _) in enumerate(jobs_list):
      if k != i:
        continue
      kind, value = outs[j]
      (rows if kind == "row" else skipped).append(value)
    timings = {**dict(getattr(suite, "timings", {})), "evaluate_baselines": base_seconds,
               "merge_and_evaluate": row_seconds}
    out = {"suite": suite.name, "tasks": tasks, "seed": seeds[i], "rows": rows, "skipped": skipped,
           "timings": timings, "jobs": max(1, jobs)}
    if bases[i].get("full_cross", True):
      out["cross_eval"] = {"experts": tasks, "tasks": tasks, "accuracy": [[c[t] for t in tasks] for c in cross]}
    if adapted_acc[i]:
      out["adapted_experts"] = adapted_acc[i]
    results.append(out)
  return results


def _one_row(suite, row_name, method, adapter, key, base, adapted, adapted_acc, adapt_seconds, adapters, strict,
             row_cache) -> tuple[str, dict]:
  """One row of :func:`run_suites`: ``("row", row)`` or ``("skipped", {"method", "reason"})``."""
  tasks = list(suite.tasks)
  expert_acc = {t: base["cross"][k][t] for k, t in enumerate(tasks)}
  info = jm.method_info(method)
  cached = row_cache.get(row_name) if row_cache is not None else None
  if cached is not None:
    return "row", {**cached, "cached": True}
  runner = _RUNNERS.get(info.data)
  if runner is None:
    return "skipped", {"method": row_name, "reason": f"needs {info.data!r} data and no runner for it is registered"}
  try:
    extra = {}
    if adapter is not None:
      extra["adapt_seconds"] = adapt_seconds[adapter]
      merged, seconds, compile_seconds = _timed_data_free(suite, method, key, adapted[adapter])
    elif info.data == "none" and runner is _merge_data_free:
      merged, seconds, compile_seconds = _timed_data_free(suite, method, key, None)
    else:
      start = time.perf_counter()
      merged = _block(runner(suite, method, {}, key))
      seconds, compile_seconds = time.perf_counter() - start, None
    start = time.perf_counter()
    acc, per_task = _evaluate_merged(suite, merged)
    eval_seconds = time.perf_counter() - start
    extra.update(_diagnose(suite, merged, per_task, acc, expert_acc, adapter, adapted, adapted_acc,
                           adapters if adapter is None and info.data == "none" else (), strict))
    row = result_row(row_name, acc, expert_acc, tasks, seconds, compile_seconds=compile_seconds,
                     eval_seconds=eval_seconds, kind="merge", data=info.data, family=info.family,
                     per_task_model=per_task, hparams=dict(info.hparams), **extra)
    if row_cache is not None:
      row_cache.put(row_name, row)
    return "row", row
  except Exception as e:  # one method's failure must not lose the whole benchmark
    if strict:
      raise
    return "skipped", {"method": row_name, "reason": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}


def _diagnose(suite, merged, per_task: bool, acc: dict, expert_acc: dict, adapter: str | None, adapted: dict,
              adapted_acc: dict, before_for: Sequence[str], strict: bool) -> dict:
  """The diagnostics' row fields: the row's adapter's (with its adapted experts), or, for a plain data-free row,
  every requested adapter's ``before`` values; a diagnostic's error is recorded in the row, not raised."""
  if per_task or callable(getattr(merged, "evaluate_on", None)):
    return {}  # diagnostics read one merged parameter tree
  calls = [(adapter, adapted[adapter], adapted_acc[adapter])] if adapter is not None else [
      (a, None, None) for a in before_for]
  extra = {}
  for name, experts, experts_acc in calls:
    fn = _DIAGNOSTICS.get(name)
    if fn is None:
      continue
    try:
      extra.update(fn(suite, merged, experts, acc, expert_acc, experts_acc))
    except Exception as e:  # a diagnostic's failure must not lose the row
      if strict:
        raise
      extra[f"{name}_diagnostics_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
  return extra


def aggregate_seeds(per_seed: Sequence[dict]) -> dict:
  """Combines :func:`run_suite` results of suites built with different seeds into one results dict.

  Each row keeps its fields from the first seed, with the accuracies (per task, average, normalized) replaced
  by their means over the seeds, plus ``average_std`` (sample standard deviation of the row's average over
  seeds; 0 for one seed) and ``average_per_seed``. Wall times are means; the experts' cross-evaluation is
  the mean matrix. A row missing from a seed's results (a method that failed there) is dropped and listed
  under ``"skipped"``.

  Args:
    per_seed: results of :func:`run_suite`, one per seed, on the same tasks and methods.

  Returns:
    A results dict in :func:`run_suite`'s format, with ``"seeds"`` (the seeds) and ``"per_seed"`` (each seed's
    rows, without per-task numbers).

  Raises:
    ValueError: no results, or results on different tasks.
  """
  if not per_seed:
    raise ValueError("aggregate_seeds needs at least one result")
  tasks = list(per_seed[0]["tasks"])
  for r in per_seed[1:]:
    if list(r["tasks"]) != tasks:
      raise ValueError(f"results on different tasks: {tasks} vs {list(r['tasks'])}")
  by_seed = [{row["method"]: row for row in r["rows"]} for r in per_seed]
  rows, skipped = [], []
  for row in per_seed[0]["rows"]:
    name = row["method"]
    group = [b.get(name) for b in by_seed]
    if any(g is None for g in group):
      skipped.append({"method": name, "reason": "failed on some seeds"})
      continue
    out = dict(row)
    out["accuracy"] = {t: float(np.mean([g["accuracy"][t] for g in group])) for t in tasks}
    out["normalized"] = {t: float(np.mean([g["normalized"][t] for g in group])) for t in tasks}
    avgs = [float(g["average"]) for g in group]
    out["average"] = float(np.mean(avgs))
    out["average_std"] = float(np.std(avgs, ddof=1)) if len(avgs) > 1 else 0.0
    out["average_per_seed"] = avgs
    out["normalized_average"] = float(np.mean([g["normalized_average"] for g in group]))
    for k in ("seconds", "eval_seconds", "adapt_seconds", "compile_seconds", "peak_rss_gb"):
      vals = [g.get(k) for g in group if g.get(k) is not None]
      if vals:  # compile_seconds: only the seeds that compiled the program have one
        out[k] = float(np.mean(vals))
    rows.append(out)
  seen = {s["method"] for s in skipped}
  for r in per_seed:
    for s in r.get("skipped", []):
      if s["method"] not in seen:
        skipped.append(s)
        seen.add(s["method"])
  timings: dict[str, float] = {}
  for r in per_seed:
    for k, v in r.get("timings", {}).items():
      timings[k] = timings.get(k, 0.0) + float(v)
  out = {k: v for k, v in per_seed[0].items() if k not in ("rows", "skipped", "timings", "cross_eval", "seed")}
  ce = [r["cross_eval"] for r in per_seed if r.get("cross_eval")]
  if ce:
    out["cross_eval"] = {**ce[0], "accuracy": np.mean([c["accuracy"] for c in ce], axis=0).tolist()}
  out.update(rows=rows, skipped=skipped, timings=timings, seeds=[r.get("seed") for r in per_seed],
             per_seed=[{"seed": r.get("seed"), "rows": [{"method": x["method"], "average": x["average"]}
                                                       for x in r["rows"]]} for r in per_seed])
  return out
