"""Resolving Interference (RI) on the offline suite (version 4): the RI.md experiments of issue 20 (acceptance 3).

::

    python experiments/ri_offline.py run --cache ~/.cache/jaxmerge --work /tmp/ri-work --study main
    python experiments/ri_offline.py run --cache ~/.cache/jaxmerge --work /tmp/ri-work --study sources
    python experiments/ri_offline.py run --cache ~/.cache/jaxmerge --work /tmp/ri-work --study sensitivity
    python experiments/ri_offline.py report                                     # tables + PNG plots

``run`` loads the suite of each suite seed (``--seeds``, default 0 1 2: each seed its own data, heads and
experts, the suites ``jaxmerge bench --seeds 0,1,2`` builds; from ``--cache``) and, for each run of the study:

- ``main``: the merges without RI (baseline: accuracy, shifted accuracy, CTI, merge-scale curve, merge cost),
  RI in independent mode and RI in joint mode on the ``fractal`` source, each followed by every merge of
  :data:`METHODS` (registry defaults) with the same measurements;
- ``sources``: RI (independent) on every other source of ``jaxmerge.data.synthetic.AUX_SOURCES``: accuracy,
  shifted accuracy and CTI;
- ``sensitivity``: RI (independent, fractal) with one of its own hyperparameters moved around the default
  (:data:`SENSITIVITY`: beta, steps, learning rate, number of auxiliary images): accuracy only.

Every RI run uses the library's defaults (``jaxmerge.tta.methods.RIConfig``, via
``jaxmerge.bench.ri_runner.RI_DEFAULTS``) except the field the run names, and the benchmark's seeding: the
auxiliary images are ``suite.aux(source, num_aux)`` (drawn from the suite seed), the batches are shuffled with
``RI_DEFAULTS["seed"]`` and the PRNG key is ``fold_in(key(suite seed), 1)``. The independent ``fractal`` run of
suite seed ``s`` is therefore exactly what ``jaxmerge bench --ri --seeds s`` computes. The adapted experts are
kept in ``--work`` (one ``.npz`` per run; not in the suite cache) so a run is computed once.

Measurements: test accuracy per task; accuracy on the held-out shifted test sets (``synthetic.shift_images``:
noise, blur, contrast, tint; test image ``k`` of a task gets shift ``k mod 4``, shift seed = suite seed);
accuracy against the merge scale (task arithmetic, TIES, TSV-M and Iso-CTS are linear in their ``scale``
hyperparameter, ``theta_0 + scale * Delta``, which the baseline checks with a second merge; WUDI has no scale,
so its curve scales the merged task vector, multiplier 1 = the WUDI merge); the cross-task interference
(:func:`jaxmerge.interference.cti_report` on 200 unlabeled test images per task) against the original experts
(``cti_vs_original_experts``) and, for RI merges, against the adapted experts (``cti_vs_adapted_experts``), each
with the accuracy drop against the same experts and its Spearman correlation; RI's wall time and peak resident
memory added, next to each merge's (baseline: first call, with compilation, and a second, steady-state call).

Results go to ``experiments/results/ri_v4/runs/s<seed>-<run>.json``; ``report`` aggregates them (mean and
sample standard deviation over the suite seeds, per-seed values) into ``experiments/results/ri_v4/tables.md``,
``summary.json``, ``gains.csv`` and PNG plots. Times are wall times on the machine that ran them.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import resource
import sys
import threading
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

OUT = ROOT / "experiments" / "results" / "ri_v4"
METHODS = ("task_arithmetic", "ties", "tsv_m", "iso_cts", "wudi")
NAMES = {"task_arithmetic": "task arithmetic", "ties": "TIES", "tsv_m": "TSV-M", "iso_cts": "Iso-CTS",
         "wudi": "WUDI"}
# Merge-scale grids (the method's own scale; WUDI: a multiplier of its merged task vector).
SCALES = {"task_arithmetic": (0.1, 0.2, 0.3, 0.5, 0.7, 1.0), "ties": (0.1, 0.2, 0.3, 0.5, 0.7, 1.0),
          "tsv_m": (0.25, 0.5, 0.75, 1.0, 1.5, 2.0), "iso_cts": (0.25, 0.5, 0.75, 1.0, 1.5, 2.0),
          "wudi": (0.25, 0.5, 0.75, 1.0, 1.5, 2.0)}
CTI_IMAGES = 200
# RI's own hyperparameters around the default (RIConfig): beta as a multiple of auto_beta (the default, x1).
SENSITIVITY = {"beta": ("0.25x", "4x"), "steps": (100, 400), "learning_rate": (3e-6, 3e-5), "num_aux": (256, 4096)}
SMOKE: dict = {}  # --smoke: the reduced suite and 5 RI steps, results under a temporary directory


# ---- helpers ---------------------------------------------------------------------------------------------------


class PeakRSS:
  """Samples this process's resident memory every 20 ms; ``peak - start`` is what a block added."""

  def __enter__(self):
    self.start = self.peak = _rss()
    self._stop = threading.Event()
    self._t = threading.Thread(target=self._run, daemon=True)
    self._t.start()
    return self

  def _run(self):
    while not self._stop.wait(0.02):
      self.peak = max(self.peak, _rss())

  def __exit__(self, *exc):
    self._stop.set()
    self._t.join()
    self.peak = max(self.peak, _rss())

  @property
  def added_mb(self) -> float:
    return (self.peak - self.start) / 2**20


def _rss() -> int:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * resource.getpagesize()


def _block(tree):
  import jax

  jax.tree.map(lambda x: x.block_until_ready() if hasattr(x, "block_until_ready") else x, tree)
  return tree


def _mean_pct(acc: dict) -> float:
  return 100 * float(np.mean(list(acc.values())))


def load_suite(seed: int, cache):
  from jaxmerge.bench.command import _enable_compilation_cache, build_suite

  _enable_compilation_cache(cache)
  return build_suite("offline", cache_dir=cache, seed=seed, progress=False, smoke=bool(SMOKE))


def shifted_test(suite) -> dict:
  """Per task: (images, labels, shift index) of the held-out shifted test set (shift seed = suite seed)."""
  from jaxmerge.data import synthetic

  out = {}
  for t in suite.tasks:
    d = suite.data[t].test
    kinds = np.arange(len(d.labels)) % len(synthetic.SHIFTS)
    images = np.empty_like(d.images)
    for k, kind in enumerate(synthetic.SHIFTS):
      images[kinds == k] = synthetic.shift_images(d.images[kinds == k], kind, seed=suite.config.seed)
    out[t] = (images, d.labels, kinds)
  return out


def evaluate_shifted(suite, params, shifted: dict) -> dict:
  """Accuracy per task on the shifted test set, overall and per shift kind."""
  from jaxmerge.data import synthetic

  acc, per_kind = {}, {}
  for i, t in enumerate(suite.tasks):
    images, labels, kinds = shifted[t]
    correct = suite._correct(params, images, labels, np.full(len(labels), i, np.int32))
    acc[t] = float(correct.mean())
    per_kind[t] = {kind: float(correct[kinds == k].mean()) for k, kind in enumerate(synthetic.SHIFTS)}
  return {"accuracy": acc, "per_shift": per_kind}


def merge_timed(suite, method: str, experts, *, scale=None, twice: bool = False) -> tuple:
  """``(merged, cost)``: the merge with its registry defaults (``scale`` overrides), and its wall time and peak
  memory added; with ``twice``, a first call (compilation included) and a steady-state second call."""
  import jax

  import jaxmerge as jm

  tx = jm.get_method(method)(**({} if scale is None else {"scale": scale}))
  call = lambda: _block(jm.merge(tx, suite.pretrained, experts, key=jax.random.key(0), layout=suite.layout))  # noqa: E731
  cost = {}
  if twice:
    t = time.perf_counter()
    call()
    cost["first_call_seconds"] = time.perf_counter() - t
  with PeakRSS() as mem:
    t = time.perf_counter()
    merged = call()
    cost["seconds"] = time.perf_counter() - t
  cost["peak_added_mb"] = mem.added_mb
  return merged, cost


def _delta(suite, merged):
  import jax
  import jax.numpy as jnp

  return jax.tree.map(lambda m, p: jnp.asarray(m, jnp.float32) - jnp.asarray(p, jnp.float32), merged,
                      suite.pretrained)


def _at(suite, delta, mult: float):
  import jax
  import jax.numpy as jnp

  return jax.tree.map(lambda p, d: jnp.asarray(p, jnp.float32) + mult * d, suite.pretrained, delta)


def linearity_error(suite, method: str, experts, merged) -> float:
  """Max deviation of the merge at scale 1 from ``theta_0 + (1 / default) (merged - theta_0)``, relative to the
  largest weight (a check that the scale curve may be read off one merge)."""
  import jax
  import jax.numpy as jnp

  import jaxmerge as jm

  default = jm.method_info(method).hparams["scale"]
  unit, _ = merge_timed(suite, method, experts, scale=1.0)
  rebuilt = _at(suite, _delta(suite, merged), 1.0 / default)
  err = max(float(jnp.max(jnp.abs(a - jnp.asarray(b, jnp.float32))))
            for a, b in zip(jax.tree.leaves(rebuilt), jax.tree.leaves(unit)))
  size = max(float(jnp.max(jnp.abs(jnp.asarray(b, jnp.float32)))) for b in jax.tree.leaves(unit))
  rel = err / max(size, 1.0)
  if rel > 1e-4:
    raise AssertionError(f"{method} is not linear in its scale (max deviation {err:.3g}, relative {rel:.3g})")
  return rel


def curve(suite, method: str, merged) -> dict:
  """``{scale: {task: accuracy}}`` over :data:`SCALES` (the default point is ``merged`` itself)."""
  import jaxmerge as jm

  default = jm.method_info(method).hparams.get("scale", 1.0)
  delta = _delta(suite, merged)
  return {str(s): suite.evaluate(_at(suite, delta, s / default)) for s in SCALES[method]}


def expert_accuracy(suite, experts) -> dict:
  return {t: suite.evaluate(e, [t])[t] for t, e in zip(suite.tasks, experts)}


def cti(suite, merged, merged_acc: dict, original_acc: dict, adapted=None, adapted_acc: dict | None = None) -> dict:
  """:func:`jaxmerge.interference.cti_report`: ``cti_vs_original_experts`` and (with ``adapted``)
  ``cti_vs_adapted_experts``, each with the accuracy drop against the same experts and its correlation."""
  from jaxmerge.bench.ri_runner import _heads
  from jaxmerge.interference import cti_report

  tasks = list(suite.tasks)
  inputs = [np.asarray(suite.unlabeled(t, "test"))[:CTI_IMAGES] for t in tasks]
  return cti_report(suite.embed, merged, list(suite.experts), inputs, _heads(suite),
                    adapted_experts=None if adapted is None else list(adapted),
                    merged_accuracy=[merged_acc[t] for t in tasks],
                    original_accuracy=[original_acc[t] for t in tasks],
                    adapted_accuracy=None if adapted_acc is None else [adapted_acc[t] for t in tasks])


# ---- RI runs ---------------------------------------------------------------------------------------------------


def run_name(mode: str, source: str, override: tuple | None = None) -> str:
  name = f"{mode}-{source}"
  return name if override is None else f"{name}-{override[0]}={override[1]}"


def ri_config(suite, mode: str, source: str, override: tuple | None = None) -> dict:
  """The run's RI settings: the library's defaults (``RI_DEFAULTS``) with ``mode``, ``source`` and one
  ``(field, value)`` override (``beta`` as ``"<k>x"``: ``k`` times ``auto_beta`` of the suite's heads)."""
  from jaxmerge.bench import ri_runner
  from jaxmerge.ri import auto_beta

  cfg = {**ri_runner.RI_DEFAULTS, "mode": mode, "aux_source": source, **SMOKE}
  if override is not None:
    field, value = override
    if field == "beta" and isinstance(value, str):
      value = float(value.rstrip("x")) * auto_beta(ri_runner._heads(suite))
    cfg[field] = value
  return cfg


def ri_adapted(suite, work: pathlib.Path, mode: str, source: str, override: tuple | None = None) -> tuple:
  """``(adapted experts, meta)`` for one RI run of this suite, read from ``work`` or computed (then saved)."""
  import jax

  from jaxmerge import tree as jtree
  from jaxmerge.bench import ri_runner
  from jaxmerge.ri import disentangle

  cfg = ri_config(suite, mode, source, override)
  path = work / f"offline-{suite.config.hash}" / f"{run_name(mode, source, override)}.npz"
  like = [jax.tree.map(np.asarray, e) for e in suite.experts]
  if path.exists():
    z = np.load(path, allow_pickle=False)
    meta = json.loads(str(z["__meta__"]))
    if meta["config"] == json.loads(json.dumps(cfg)):
      flat = [jtree.flatten_paths(e) for e in like]
      return [jtree.unflatten_paths(like[i], {p: z[f"{i}/{p}"] for p in flat[i]}) for i in range(len(like))], meta
  run_cfg = dict(cfg)
  source_, num_aux, bs, shuffle = (run_cfg.pop(k) for k in ("aux_source", "num_aux", "batch_size", "seed"))
  key = jax.random.fold_in(jax.random.key(suite.config.seed), 1)  # as jaxmerge.bench.runner.run_suite
  batches = ri_runner.aux_batches(suite.aux(source_, num_aux), bs, seed=shuffle)
  with PeakRSS() as mem:
    t = time.perf_counter()
    experts, hist = disentangle(suite.pretrained, list(suite.experts), ri_runner._heads(suite), batches,
                                forward_fn=suite.embed, key=key, layout=suite.layout, progress=False, **run_cfg)
    _block(experts)
    seconds = time.perf_counter() - t
  experts = [jax.tree.map(np.asarray, e) for e in experts]
  hist = {k: np.asarray(v) for k, v in hist.items()}
  meta = {"config": cfg, "seconds": seconds, "peak_added_mb": mem.added_mb,
          "loss_first_last": {k: [float(np.mean(v[0])), float(np.mean(v[-1]))] for k, v in hist.items()},
          "history": {k: v.tolist() for k, v in hist.items() if v.ndim == 1}}
  arrays = {f"{i}/{p}": x for i, e in enumerate(experts) for p, x in jtree.flatten_paths(e).items()}
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.stem + ".tmp.npz")
  np.savez(tmp, __meta__=np.array(json.dumps(meta)), **arrays)
  tmp.replace(path)
  return experts, meta


def evaluate_experts(suite, experts, shifted, original_acc: dict, *, level: str, baseline: bool) -> dict:
  """Every merge of :data:`METHODS` from ``experts``: accuracy, and (``level``) shifted accuracy, CTI, curves.

  ``level``: ``"light"`` (accuracy), ``"medium"`` (+ shifted accuracy and CTI) or ``"full"`` (+ scale curves).
  """
  out = {}
  adapted_acc = None if baseline else expert_accuracy(suite, experts)
  for m in METHODS:
    merged, cost = merge_timed(suite, m, experts, twice=baseline)
    acc = suite.evaluate(merged)
    r = {"accuracy": acc, "merge_cost": cost}
    if level != "light":
      r["shifted"] = evaluate_shifted(suite, merged, shifted)
      r.update(cti(suite, merged, acc, original_acc, None if baseline else experts, adapted_acc))
    if level == "full":
      if baseline and m != "wudi":
        r["linearity_relative_error"] = linearity_error(suite, m, experts, merged)
      r["curve"] = curve(suite, m, merged)
    out[m] = r
    print(f"    {m}: {_mean_pct(acc):.2f}" + (f" (shifted {_mean_pct(r['shifted']['accuracy']):.2f})"
                                              if "shifted" in r else ""), flush=True)
  return {"methods": out, "adapted_experts_accuracy": adapted_acc}


def study_runs(study: str) -> list:
  """The ``(mode, source, override)`` RI runs of a study (``main`` also has the baseline, ``None``)."""
  from jaxmerge.data import synthetic

  if study == "main":
    return [None, ("independent", "fractal", None), ("joint", "fractal", None)]
  if study == "sources":
    return [("independent", s, None) for s in synthetic.AUX_SOURCES if s != "fractal"]
  if study == "sensitivity":
    return [("independent", "fractal", (f, v)) for f, vs in SENSITIVITY.items() for v in vs]
  raise ValueError(f"unknown study {study!r}; valid: main, sources, sensitivity")


def run(seeds, studies, cache, work: pathlib.Path, *, only: list | None = None) -> None:
  """Runs the ``studies`` for every suite seed; ``only``: just these run names, in this order."""
  level_of = {"main": "full", "sources": "medium", "sensitivity": "light"}
  (OUT / "runs").mkdir(parents=True, exist_ok=True)
  for seed in seeds:
    suite = None
    for study in studies:
      specs = study_runs(study)
      if only is not None:
        by_name = {("baseline" if s is None else run_name(*s)): s for s in specs}
        specs = [by_name[n] for n in only if n in by_name]
      for spec in specs:
        name = "baseline" if spec is None else run_name(*spec)
        path = OUT / "runs" / f"s{seed}-{name}.json"
        if path.exists():
          continue
        if suite is None:
          suite = load_suite(seed, cache)
          shifted = shifted_test(suite)
          original_acc = expert_accuracy(suite, suite.experts)
        print(f"suite seed {seed}: {name}", flush=True)
        t0 = time.perf_counter()
        if spec is None:
          res = {"suite_seed": seed, "cache_key": suite.config.hash, "tasks": list(suite.tasks), "run": name,
                 "pretrained": suite.evaluate(suite.pretrained),
                 "pretrained_shifted": evaluate_shifted(suite, suite.pretrained, shifted)["accuracy"],
                 "experts": original_acc,
                 "experts_shifted": {t: evaluate_shifted(suite, e, shifted)["accuracy"][t]
                                     for t, e in zip(suite.tasks, suite.experts)},
                 **evaluate_experts(suite, suite.experts, shifted, original_acc, level="full", baseline=True)}
        else:
          experts, meta = ri_adapted(suite, work, *spec)
          print(f"  RI: {meta['seconds']:.0f} s, {meta['peak_added_mb']:.0f} MB", flush=True)
          level = "full" if spec == ("independent", "fractal", None) else level_of[study]
          res = {"suite_seed": seed, "cache_key": suite.config.hash, "tasks": list(suite.tasks), "run": name,
                 "study": study, "ri": meta,
                 **evaluate_experts(suite, experts, shifted, original_acc, level=level, baseline=False)}
        res["wall_seconds"] = time.perf_counter() - t0
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(res, indent=1))
        tmp.replace(path)
        print(f"  done in {res['wall_seconds']:.0f} s", flush=True)


# ---- report ----------------------------------------------------------------------------------------------------


def _ms(xs, digits: int = 1) -> str:
  xs = np.asarray(xs, float)
  if len(xs) == 1:
    return f"{xs[0]:.{digits}f}"
  return f"{xs.mean():.{digits}f} ± {xs.std(ddof=1):.{digits}f}"


def _signed(xs, digits: int = 1) -> str:
  xs = np.asarray(xs, float)
  s = f"{xs.mean():+.{digits}f}"
  if len(xs) > 1:
    s += f" ± {xs.std(ddof=1):.{digits}f}"
  return s + " (" + ", ".join(f"{x:+.{digits}f}" for x in xs) + ")"


def load_runs(out: pathlib.Path = None) -> dict:
  """``{run name: {suite seed: result}}`` of every JSON file in ``<out>/runs``."""
  out = out or OUT
  runs: dict = {}
  for p in sorted((out / "runs").glob("s*-*.json")):
    r = json.loads(p.read_text())
    runs.setdefault(r["run"], {})[r["suite_seed"]] = r
  return runs


def gains(runs: dict, name: str, method: str, key=lambda r, m: _mean_pct(r["methods"][m]["accuracy"]),
          seeds=None) -> tuple:
  """``(seeds, plain values, RI values)`` over the suite seeds that have both the baseline and run ``name``
  (and are in ``seeds``, if given)."""
  base, ri = runs.get("baseline", {}), runs.get(name, {})
  seeds = sorted(set(base) & set(ri) & (set(base) if seeds is None else set(seeds)))
  return seeds, np.array([key(base[s], method) for s in seeds]), np.array([key(ri[s], method) for s in seeds])


def report() -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  from jaxmerge.data import synthetic
  from jaxmerge.interference import spearman

  from jaxmerge.bench.suite import SUITE_VERSION

  runs = load_runs()
  base = runs["baseline"]
  seeds = sorted(base)
  tasks = base[seeds[0]]["tasks"]
  summary: dict = {"seeds": seeds, "gain": {}, "shifted_gain": {}, "sources": {}, "curves": {}, "sensitivity": {},
                   "cost": {}, "cti": {}}
  csv = ["run,method,suite_seed,plain,with_ri,gain"]
  L = [f"Suite seeds: {', '.join(map(str, seeds))} (suite version {SUITE_VERSION}; each seed its own data, heads and experts). "
       "Values: mean ± sample std over the suite seeds, per-seed values in parentheses. Accuracy in %.", ""]
  pre = [_mean_pct(base[s]["pretrained"]) for s in seeds]
  exp = [_mean_pct(base[s]["experts"]) for s in seeds]
  L += [f"Pretrained (zero-shot) {_ms(pre)}; experts (each on its task) {_ms(exp)}.", ""]

  # (a) gain table, independent and joint.
  L += ["#### (a) Average accuracy with and without RI (fractal auxiliary images, library defaults)", "",
        "| method | plain | RI independent | gain independent | RI joint | gain joint |", "|---|---|---|---|---|---|"]
  for m in METHODS:
    row = [NAMES[m]]
    for name in ("independent-fractal", "joint-fractal"):
      ss, b, w = gains(runs, name, m)
      if name == "independent-fractal":
        row.append(_ms(b) if len(ss) else "—")
      if not len(ss):
        row += ["—", "—"]
        continue
      row += [_ms(w), _signed(w - b)]
      summary["gain"].setdefault(name, {})[m] = {"seeds": ss, "plain": b.tolist(), "ri": w.tolist(),
                                                  "gain_mean": float((w - b).mean())}
      csv += [f"{name},{m},{s},{bb:.4f},{ww:.4f},{ww - bb:.4f}" for s, bb, ww in zip(ss, b, w)]
    L.append("| " + " | ".join(row) + " |")
  for name in ("independent-fractal", "joint-fractal"):
    if name in runs:
      ad = [_mean_pct(r["adapted_experts_accuracy"]) for r in runs[name].values()]
      L += ["", f"Adapted experts ({name}) on their own task: {_ms(ad)} (original {_ms(exp)})."]

  # (b) auxiliary sources.
  L += ["", "#### (b) Auxiliary sources: gain of RI (independent) per source, points", "",
        "| source | seeds | " + " | ".join(NAMES[m] for m in METHODS) + " | mean over methods |",
        "|---|---|" + "---|" * len(METHODS) + "---|"]
  for src in synthetic.AUX_SOURCES:
    name = f"independent-{src}"
    if name not in runs:
      continue
    cells, means = [], []
    for m in METHODS:
      ss, b, w = gains(runs, name, m)
      cells.append(_signed(w - b))
      means.append(w - b)
      summary["sources"].setdefault(src, {})[m] = (w - b).tolist()
      if src != "fractal":
        csv += [f"{name},{m},{s},{bb:.4f},{ww:.4f},{ww - bb:.4f}" for s, bb, ww in zip(ss, b, w)]
    L.append(f"| {src} | {' '.join(map(str, ss))} | " + " | ".join(cells) + f" | {_signed(np.mean(means, 0))} |")

  # (c) unseen domains.
  shift_runs = [n for n in ("independent-fractal", "joint-fractal") + tuple(
    f"independent-{s}" for s in synthetic.AUX_SOURCES if s != "fractal") if n in runs]
  pre_s = [_mean_pct(base[s]["pretrained_shifted"]) for s in seeds]
  exp_s = [_mean_pct(base[s]["experts_shifted"]) for s in seeds]
  L += ["", "#### (c) Unseen domains: average accuracy on the held-out shifted test sets", "",
        f"Shifts {', '.join(synthetic.SHIFTS)} (severity 1; a quarter of each task's 1000 test images each). "
        f"Pretrained {_ms(pre_s)}, experts {_ms(exp_s)}.", "",
        "| method | plain | " + " | ".join(f"gain {n}" for n in shift_runs) + " |",
        "|---|---|" + "---|" * len(shift_runs)]
  shifted_acc = lambda r, m: _mean_pct(r["methods"][m]["shifted"]["accuracy"])  # noqa: E731
  for m in METHODS:
    cells = []
    for n in shift_runs:
      ss, b, w = gains(runs, n, m, shifted_acc)
      cells.append(_signed(w - b))
      summary["shifted_gain"].setdefault(n, {})[m] = (w - b).tolist()
    L.append(f"| {NAMES[m]} | {_ms([shifted_acc(base[s], m) for s in seeds])} | " + " | ".join(cells) + " |")
  if "independent-fractal" in runs:
    L += ["", "Gain per shift (independent, fractal):", "",
          "| method | " + " | ".join(synthetic.SHIFTS) + " |", "|---|" + "---|" * len(synthetic.SHIFTS)]
    for m in METHODS:
      cells = []
      for k in synthetic.SHIFTS:
        per = lambda r, m, k=k: 100 * np.mean([r["methods"][m]["shifted"]["per_shift"][t][k] for t in tasks])  # noqa: E731
        _, b, w = gains(runs, "independent-fractal", m, per)
        cells.append(_signed(w - b))
      L.append(f"| {NAMES[m]} | " + " | ".join(cells) + " |")

  # (d) merge-scale curves.
  curve_runs = [n for n in ("independent-fractal", "joint-fractal")
                if n in runs and all("curve" in r["methods"]["task_arithmetic"] for r in runs[n].values())]
  if curve_runs:
    L += ["", "#### (d) Sensitivity to the merge scale: average accuracy over the scale grid (mean over seeds)", "",
          "Range = max − min of the seed-mean curve; per-seed ranges in parentheses. WUDI has no scale: its "
          "multiplier scales the merged task vector (1 = the WUDI merge).", "",
          "| method | scales | plain | " + " | ".join(f"RI {n.split('-')[0]}" for n in curve_runs) + " |",
          "|---|---|---|" + "---|" * len(curve_runs)]
    fig, axes = plt.subplots(1, len(METHODS), figsize=(3.6 * len(METHODS), 3.2))
    for ax, m in zip(axes, METHODS):
      xs = SCALES[m]
      cb = np.array([[_mean_pct(base[s]["methods"][m]["curve"][str(x)]) for x in xs] for s in seeds])
      ax.plot(xs, cb.mean(0), "o-", label="plain")
      cells = {"plain": cb}
      for n in curve_runs:
        cw = np.array([[_mean_pct(runs[n][s]["methods"][m]["curve"][str(x)]) for x in xs] for s in sorted(runs[n])])
        cells[n] = cw
        ax.errorbar(xs, cw.mean(0), yerr=cw.std(0, ddof=1) if len(cw) > 1 else None, fmt="s-", capsize=3,
                    label=f"RI {n.split('-')[0]}")
      ax.set_title(NAMES[m])
      ax.set_xlabel("scale" if m != "wudi" else "multiplier of the merged task vector")
      ax.set_ylabel("avg accuracy (%)")
      ax.grid(alpha=0.3)
      for label, c in cells.items():
        mean = c.mean(0)
        summary["curves"].setdefault(label, {})[m] = {"scales": list(xs), "mean": mean.tolist(),
                                                      "range": float(mean.max() - mean.min()),
                                                      "per_seed_range": (c.max(1) - c.min(1)).tolist(),
                                                      "best": float(mean.max())}
      L.append(f"| {NAMES[m]} | {' / '.join(map(str, xs))} | " + " | ".join(
        " / ".join(f"{v:.1f}" for v in c.mean(0)) for c in cells.values()) + " |")
      L.append("| | range (best) | " + " | ".join(
        f"**{c.mean(0).max() - c.mean(0).min():.1f}** ({', '.join(f'{x:.1f}' for x in c.max(1) - c.min(1))}; "
        f"best {c.mean(0).max():.1f})" for c in cells.values()) + " |")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(OUT / "scale_curves.png", dpi=110)
    plt.close(fig)

  # (e) RI's own hyperparameters.
  sens = [(f, v) for f, vs in SENSITIVITY.items() for v in vs]
  if any(run_name("independent", "fractal", o) in runs for o in sens):
    from jaxmerge.tta.methods import RIConfig

    d = RIConfig()
    defaults = {"beta": "1x (auto_beta)", "steps": d.steps, "learning_rate": d.learning_rate, "num_aux": d.num_aux}
    L += ["", "#### (e) Sensitivity to RI's own hyperparameters: gain over the plain merge (points)", "",
          "One field moved from the library default, the others at their defaults (independent, fractal). "
          "beta as a multiple of `auto_beta` (the default).", "",
          "| field | value | seeds | " + " | ".join(NAMES[m] for m in METHODS) + " | mean | RI seconds |",
          "|---|---|---|" + "---|" * len(METHODS) + "---|---|"]
    for field in SENSITIVITY:
      values = [(defaults[field], "independent-fractal")] + [
        (v, run_name("independent", "fractal", (field, v))) for v in SENSITIVITY[field]]
      # The default on the seeds the moved values ran on, so that every row of a field compares the same suites.
      field_seeds = set().union(*[set(runs.get(n, {})) for _, n in values[1:]])
      for v, n in sorted(values, key=lambda x: float(str(x[0]).split("x")[0])):
        if n not in runs or not field_seeds:
          continue
        cells, g_all = [], []
        for m in METHODS:
          ss, b, w = gains(runs, n, m, seeds=field_seeds)
          cells.append(_signed(w - b))
          g_all.append(w - b)
          summary["sensitivity"].setdefault(field, {}).setdefault(str(v), {})[m] = (w - b).tolist()
          if n != "independent-fractal":
            csv += [f"{n},{m},{s},{bb:.4f},{ww:.4f},{ww - bb:.4f}" for s, bb, ww in zip(ss, b, w)]
        secs = [runs[n][s]["ri"]["seconds"] for s in ss]
        L.append(f"| {field} | {v}{' (default)' if n == 'independent-fractal' else ''} | "
                 f"{' '.join(map(str, ss))} | " + " | ".join(cells) + f" | {_signed(np.mean(g_all, 0))} | "
                 f"{_ms(secs, 0)} |")

  # (f) cost.
  ri_runs = [r for n, rs in runs.items() if n != "baseline" for r in rs.values()]
  if ri_runs:
    def span(xs, digits=0):  # the minimum is the run least slowed by other jobs on a shared machine
      xs = np.asarray(xs, float)
      return f"{_ms(xs, digits)} [{xs.min():.{digits}f}, {xs.max():.{digits}f}]"

    L += ["", "#### (f) Cost: RI against the merges (wall time, peak resident memory added)", "",
          "Mean ± std [min, max] over runs. Every number was measured while other jobs loaded the shared 2-core "
          "machine, so the minimum is the better estimate of the cost itself. RI includes tracing and compilation "
          "(the persistent XLA cache serves repeated shapes). Merges: every merge of every run (a single call from "
          "the warm XLA cache; the baseline's steady-state second call).", "",
          "| step | runs | wall time (s) | peak memory added (MB) |", "|---|---|---|---|"]
    for mode in ("independent", "joint"):
      rs = [r for r in ri_runs if r["ri"]["config"]["mode"] == mode and r["ri"]["config"]["steps"] == 200]
      if rs:
        c = rs[0]["ri"]["config"]
        L.append(f"| RI {mode}, 8 experts, {c['steps']} steps of {c['batch_size']} auxiliary images | {len(rs)} | "
                 f"{span([r['ri']['seconds'] for r in rs])} | {span([r['ri']['peak_added_mb'] for r in rs])} |")
        summary["cost"][f"ri_{mode}"] = {"seconds": [r["ri"]["seconds"] for r in rs],
                                         "peak_added_mb": [r["ri"]["peak_added_mb"] for r in rs]}
    for m in METHODS:
      cs = [r["methods"][m]["merge_cost"] for rs in runs.values() for r in rs.values()]
      L.append(f"| {NAMES[m]} merge | {len(cs)} | {span([c['seconds'] for c in cs], 2)} | "
               f"{span([c['peak_added_mb'] for c in cs])} |")
      summary["cost"][m] = {"seconds": [c["seconds"] for c in cs], "peak_added_mb": [c["peak_added_mb"] for c in cs]}

  # (g) CTI both ways.
  if "independent-fractal" in runs:
    L += ["", "#### (g) Cross-task interference, both ways, and its correlation with the accuracy drop", "",
          "Head-space CTI `E||h_i(z_M) - h_i(z_i)||` and feature CTI `E||z_M - z_i||^2 / ||z_i||^2` on 200 "
          "unlabeled test images per task, mean over tasks and seeds. **CTI vs original experts** "
          "(`cti_vs_original_experts`): `z_i` = the original expert `i`, drop = original expert − merged. "
          "**CTI vs adapted experts** (`cti_vs_adapted_experts`, RI merges only): `z_i` = the RI-adapted expert "
          "the merge was built from, drop = adapted expert − merged. rho = Spearman correlation over the 8 tasks "
          "of the CTI with the drop against the same experts (mean over seeds).", "",
          "| merge | CTI vs original experts: head / feature | rho head / feature | CTI vs adapted experts: head "
          "/ feature | rho head / feature |", "|---|---|---|---|---|"]
    fig, axes = plt.subplots(1, len(METHODS), figsize=(3.6 * len(METHODS), 3.4))
    pooled = {"plain, vs original": ([], []), "RI, vs original": ([], []), "RI, vs adapted": ([], [])}
    for ax, m in zip(axes, METHODS):
      for label, rs in (("plain", base), ("RI independent", runs["independent-fractal"]),
                        ("RI joint", runs.get("joint-fractal", {}))):
        if not rs:
          continue
        cells = []
        for which in ("original", "adapted"):
          blocks = [r["methods"][m].get(f"cti_vs_{which}_experts") for r in rs.values()]
          if any(b is None for b in blocks):
            cells += ["—", "—"]
            continue
          h = np.mean([b["head_mean"] for b in blocks])
          f = np.mean([b["feature_mean"] for b in blocks])
          rh = np.nanmean([b["spearman_with_accuracy_drop"]["head"] for b in blocks])
          rf = np.nanmean([b["spearman_with_accuracy_drop"]["feature"] for b in blocks])
          cells += [f"{h:.3g} / {f:.3g}", f"{rh:.2f} / {rf:.2f}"]
          summary["cti"].setdefault(label, {}).setdefault(m, {})[which] = {
            "head_mean": float(h), "feature_mean": float(f), "rho_head": float(rh), "rho_feature": float(rf)}
          if label != "RI joint":
            key = f"{'plain' if label == 'plain' else 'RI'}, vs {which}"
            for b in blocks:
              pooled[key][0].extend(b["head"])
              pooled[key][1].extend(100 * np.asarray(b["accuracy_drop"]))
            ax.scatter([x for b in blocks for x in b["head"]],
                       [100 * x for b in blocks for x in b["accuracy_drop"]], s=10,
                       marker={"plain, vs original": "o", "RI, vs original": "^", "RI, vs adapted": "x"}[key],
                       label=key)
        L.append(f"| {label} + {NAMES[m]} | " + " | ".join(cells) + " |")
      ax.set_title(NAMES[m])
      ax.set_xlabel("head-space CTI")
      ax.set_ylabel("accuracy drop vs the same experts (points)")
      ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(OUT / "cti_vs_drop.png", dpi=110)
    plt.close(fig)
    pooled_rho = {k: spearman(*v) for k, v in pooled.items() if v[0]}
    summary["cti"]["pooled_spearman_head"] = pooled_rho
    L += ["", "Pooled over methods, tasks and seeds (head-space CTI against the drop, independent RI): " + ", ".join(
      f"{k} rho = {v:.2f} (n = {len(pooled[k][0])})" for k, v in pooled_rho.items()) + "."]

  (OUT / "tables.md").write_text("\n".join(L) + "\n")
  (OUT / "gains.csv").write_text("\n".join(csv) + "\n")
  (OUT / "summary.json").write_text(json.dumps(summary, indent=1))
  print("\n".join(L))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--smoke", action="store_true", help="reduced suite and 5 RI steps, results in a temp dir")
  sub = p.add_subparsers(dest="cmd", required=True)
  r = sub.add_parser("run")
  r.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="suite seeds")
  r.add_argument("--study", nargs="+", default=["main"], choices=["main", "sources", "sensitivity"])
  r.add_argument("--only", nargs="+", default=None,
                 help="run only these run names, in this order (e.g. independent-fractal-steps=400)")
  r.add_argument("--cache", default=None, help="the suite cache (jaxmerge bench's --cache)")
  r.add_argument("--work", required=True, help="directory for the adapted experts (kept apart from the cache)")
  sub.add_parser("report")
  args = p.parse_args(argv)
  if args.smoke:
    import tempfile

    global OUT
    SMOKE["steps"] = 5
    OUT = pathlib.Path(tempfile.gettempdir()) / "ri_offline_smoke"
  if args.cmd == "run":
    run(args.seeds, args.study, args.cache, pathlib.Path(args.work), only=args.only)
  else:
    report()
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
