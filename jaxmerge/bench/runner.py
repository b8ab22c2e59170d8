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
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import jax
import numpy as np

import jaxmerge as jm

__all__ = ["MethodRunner", "PLUGIN_MODULES", "RowCache", "Suite", "aggregate_seeds", "check_adapters", "dispatch_by_name", "register_adapter", "register_runner",
           "resolve_methods", "run_suite"]


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


def _timed_data_free(suite: Suite, method: str, key: jax.Array, experts) -> tuple[Any, float, float]:
  """Merges twice with one transform: the first call compiles, the second measures the merge itself.

  Returns:
    ``(merged, seconds, compile_seconds)``: the merge's steady-state wall time, and what the first call
    spent on top of it (tracing and XLA compilation; near zero when the persistent compilation cache holds
    the program).
  """
  info = jm.method_info(method)
  tx = jm.get_method(method)()
  fn = jm.merge_per_task if info.per_task else jm.merge
  experts = experts if experts is not None else suite.experts

  def call():
    start = time.perf_counter()
    out = _block(fn(tx, suite.pretrained, experts, key=key, layout=suite.layout, names=list(suite.tasks)))
    return out, time.perf_counter() - start

  _, first = call()
  merged, second = call()
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
              progress: bool = True, strict: bool = False, row_cache: RowCache | None = None) -> dict:
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

  Returns:
    The results dict of :mod:`jaxmerge.bench.report` (without the reference comparison); with adapters, also
    ``"adapted_experts": {adapter: {task: accuracy of the adapted expert on its task}}``, and the rows carry
    the fields of the adapters' diagnostics (for RI: cross-task interference against the original and the
    adapted experts).
  """
  tasks = list(suite.tasks)
  timings = dict(getattr(suite, "timings", {}))
  t0 = time.perf_counter()
  row_cache = row_cache if not adapters else None
  base = row_cache.get("_baselines") if row_cache is not None else None
  if base is None:
    base = {"pretrained": suite.evaluate(suite.pretrained), "cross": [suite.evaluate(e) for e in suite.experts]}
    if row_cache is not None:
      row_cache.put("_baselines", base)
  pre_acc, cross = base["pretrained"], base["cross"]
  expert_acc = {t: cross[i][t] for i, t in enumerate(tasks)}
  timings["evaluate_baselines"] = time.perf_counter() - t0
  rows = [result_row("pretrained", pre_acc, expert_acc, tasks, 0.0, kind="baseline", data="none"),
          result_row("experts", expert_acc, expert_acc, tasks, 0.0, kind="baseline", data="labels (fine-tuning)",
               per_task_model=True)]
  skipped = []

  for kind in {jm.method_info(m).data for m in methods} - set(_RUNNERS):
    _load_plugins(kind)
  check_adapters(adapters)

  jobs = [(m, m, None) for m in methods]
  for a in adapters:
    jobs += [(f"{a}+{m}", m, a) for m in methods if jm.method_info(m).data == "none"]
  adapted: dict[str, list] = {}
  adapted_acc: dict[str, dict] = {}
  key = jax.random.key(seed)
  t0 = time.perf_counter()
  bar = jobs
  if progress:
    from tqdm.auto import tqdm

    bar = tqdm(jobs, desc="merging and evaluating", leave=False)
  for row_name, method, adapter in bar:
    info = jm.method_info(method)
    cached = row_cache.get(row_name) if row_cache is not None else None
    if cached is not None:
      rows.append({**cached, "cached": True})
      continue
    runner = _RUNNERS.get(info.data)
    if runner is None:
      skipped.append({"method": row_name, "reason": f"needs {info.data!r} data and no runner for it is registered"})
      continue
    try:
      extra = {}
      if adapter is not None:
        start = time.perf_counter()
        if adapter not in adapted:
          adapted[adapter] = _block(_ADAPTERS[adapter](suite, jax.random.fold_in(key, 1)))
        extra["adapt_seconds"] = time.perf_counter() - start
        if adapter not in adapted_acc:
          adapted_acc[adapter] = {t: suite.evaluate(e, [t])[t] for t, e in zip(tasks, adapted[adapter])}
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
      rows.append(result_row(row_name, acc, expert_acc, tasks, seconds, compile_seconds=compile_seconds,
                       eval_seconds=eval_seconds, kind="merge", data=info.data,
                       family=info.family, per_task_model=per_task, hparams=dict(info.hparams), **extra))
      if row_cache is not None:
        row_cache.put(row_name, rows[-1])
    except Exception as e:  # one method's failure must not lose the whole benchmark
      if strict:
        raise
      skipped.append({"method": row_name, "reason": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"})
  timings["merge_and_evaluate"] = time.perf_counter() - t0
  out = {"suite": suite.name, "tasks": tasks, "seed": seed, "rows": rows,
         "cross_eval": {"experts": tasks, "tasks": tasks, "accuracy": [[c[t] for t in tasks] for c in cross]},
         "skipped": skipped, "timings": timings}
  if adapted_acc:
    out["adapted_experts"] = adapted_acc
  return out


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
      vals = [g.get(k) for g in group]
      if all(v is not None for v in vals):
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
