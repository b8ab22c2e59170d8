"""Resolving Interference (RI) on the offline 8-task suite: the experiments of issue 8, acceptance 2.

::

    python experiments/ri_offline.py run --seeds 0 --sources fractal            # one RI run + all its metrics
    python experiments/ri_offline.py run --seeds 0 1 2 --sources fractal mondrian crops
    python experiments/ri_offline.py report                                     # tables + PNG plots

``run`` loads the offline suite (``jaxmerge bench``'s, from the cache), and for every ``(seed, source)``:

1. disentangles the eight experts with RI (:func:`jaxmerge.bench.ri_runner.ri_experts`, the settings of
   ``jaxmerge bench --ri``: the library's defaults, ``jaxmerge.tta.methods.RIConfig``) on auxiliary images of
   ``source``. Seed ``s`` draws the auxiliary images with
   ``make_aux(source, seed=suite_seed + 1000 s)``, orders the batches with seed ``s`` and uses the PRNG key
   ``fold_in(key(s), 1)``; seed 0 is exactly what ``jaxmerge bench --ri`` runs. The adapted experts are cached
   under ``<cache>/offline-<hash>/ri/`` so each ``(seed, source)`` is computed once;
2. merges with task arithmetic, TIES, TSV-M and Iso-CTS (registry defaults) from the original and from the
   adapted experts and evaluates them on the test sets (a);
3. on the held-out shifted test sets (``synthetic.shift_images``: noise, blur, contrast, tint; test image
   ``k`` of a task gets shift ``k mod 4``) (d);
4. sweeps the merge scale (c): these four merges are linear in their scale (``theta_0 + lambda Delta``), which
   the script checks at the default scale, so a curve needs one merge and one evaluation per point;
5. computes the cross-task interference per task (feature and head versions, on 200 unlabeled test images
   per task) for every merge, with and without RI, with :func:`jaxmerge.interference.cti_report`: against the
   *original* experts (``cti_vs_original_experts``, whose function the merge should keep) and, for RI merges,
   against the *adapted* experts they were merged from (``cti_vs_adapted_experts``), each with the accuracy
   drop against the same experts and its Spearman correlation over tasks (e);
6. records RI's wall time and peak memory against each merge's (f).

Results go to ``experiments/results/ri/runs/<seed>-<source>.json`` (one file per RI run, plus
``baseline-<suite seed>.json`` for the merges without RI); ``report`` aggregates whatever runs exist (mean and
standard deviation over seeds) into ``experiments/results/ri/tables.md`` and PNG plots. The machine this was
written on is a shared 2-core CPU: times are wall times under load from other jobs.
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

OUT = ROOT / "experiments" / "results" / "ri"
METHODS = ("task_arithmetic", "ties", "tsv_m", "iso_cts")
SCALES = {"task_arithmetic": (0.1, 0.2, 0.3, 0.5, 0.7, 1.0), "ties": (0.1, 0.2, 0.3, 0.5, 0.7, 1.0),
          "tsv_m": (0.25, 0.5, 0.75, 1.0, 1.5, 2.0), "iso_cts": (0.25, 0.5, 0.75, 1.0, 1.5, 2.0)}
CTI_IMAGES = 200
CURVE_SEEDS = (0,)  # scale curves with RI for these seeds only (CPU budget of the shared machine)


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


SMOKE = {}  # --smoke: the reduced suite, 5 RI steps, results under a temporary directory (checks the script)


def load_suite(seed: int):
  from jaxmerge.bench.command import _enable_compilation_cache, build_suite

  _enable_compilation_cache(None)
  return build_suite("offline", seed=seed, progress=False, smoke=bool(SMOKE))


def shifted_test(suite, seed: int) -> dict:
  """Per task: (images, labels, shift index) of the held-out shifted test set."""
  from jaxmerge.data import synthetic

  out = {}
  for t in suite.tasks:
    d = suite.data[t].test
    kinds = np.arange(len(d.labels)) % len(synthetic.SHIFTS)
    images = np.empty_like(d.images)
    for k, kind in enumerate(synthetic.SHIFTS):
      images[kinds == k] = synthetic.shift_images(d.images[kinds == k], kind, seed=seed)
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


def merge_timed(suite, method: str, experts, *, scale=None):
  """(merged, steady-state seconds, first-call seconds, peak MB added by the steady-state merge)."""
  import jax

  import jaxmerge as jm

  tx = jm.get_method(method)(**({} if scale is None else {"scale": scale}))
  call = lambda: _block(jm.merge(tx, suite.pretrained, experts, key=jax.random.key(0), layout=suite.layout))  # noqa: E731
  t = time.perf_counter()
  call()
  first = time.perf_counter() - t
  with PeakRSS() as mem:
    t = time.perf_counter()
    merged = call()
    steady = time.perf_counter() - t
  return merged, steady, first, mem.added_mb


def linear_direction(suite, method: str, experts, merged_default):
  """``Delta`` with ``merge(scale) = theta_0 + scale Delta``; checks linearity against the default-scale merge."""
  import jax
  import jax.numpy as jnp

  import jaxmerge as jm

  default = jm.method_info(method).hparams["scale"]
  unit, _, _, _ = merge_timed(suite, method, experts, scale=1.0)
  delta = jax.tree.map(lambda u, p: jnp.asarray(u, jnp.float32) - jnp.asarray(p, jnp.float32), unit, suite.pretrained)
  rebuilt = jax.tree.map(lambda p, d: jnp.asarray(p, jnp.float32) + default * d, suite.pretrained, delta)
  err = max(float(jnp.max(jnp.abs(a - jnp.asarray(b, jnp.float32))))
            for a, b in zip(jax.tree.leaves(rebuilt), jax.tree.leaves(merged_default)))
  scale_of = max(float(jnp.max(jnp.abs(jnp.asarray(b, jnp.float32)))) for b in jax.tree.leaves(merged_default))
  if err > 1e-4 * max(scale_of, 1.0):
    raise AssertionError(f"{method} is not linear in its scale (max deviation {err:.3g})")
  return delta, err


def at_scale(suite, delta, scale: float):
  import jax
  import jax.numpy as jnp

  return jax.tree.map(lambda p, d: jnp.asarray(p, jnp.float32) + scale * d, suite.pretrained, delta)


def cti(suite, merged, merged_acc: dict, adapted=None, adapted_acc: dict | None = None) -> dict:
  """:func:`jaxmerge.interference.cti_report`: ``cti_vs_original_experts`` and (with ``adapted``)
  ``cti_vs_adapted_experts``, each with the accuracy drop against the same experts and its correlation."""
  from jaxmerge.interference import cti_report

  tasks = list(suite.tasks)
  inputs = [suite.data[t].test.images[:CTI_IMAGES] for t in tasks]
  return cti_report(suite.embed, merged, list(suite.experts), inputs, [suite.heads[t] for t in tasks],
                    adapted_experts=None if adapted is None else list(adapted),
                    merged_accuracy=[merged_acc[t] for t in tasks], original_accuracy=expert_accuracy(suite),
                    adapted_accuracy=None if adapted_acc is None else [adapted_acc[t] for t in tasks])


_EXPERT_ACC: dict = {}


def expert_accuracy(suite) -> list:
  """Each original expert's test accuracy on its own task (computed once per suite)."""
  if suite.config.hash not in _EXPERT_ACC:
    _EXPERT_ACC[suite.config.hash] = [suite.evaluate(e, [t])[t] for t, e in zip(suite.tasks, suite.experts)]
  return _EXPERT_ACC[suite.config.hash]


def ri_cache_path(suite, seed: int, source: str, cfg: dict) -> pathlib.Path:
  import hashlib

  from jaxmerge.bench.cache import default_cache_dir

  h = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:10]
  return pathlib.Path(default_cache_dir()) / f"offline-{suite.config.hash}" / "ri" / f"{seed}-{source}-{h}.npz"


def ri_adapted(suite, seed: int, source: str, beta="default"):
  """RI-adapted experts for ``(seed, source)``, from the cache or computed (then cached). ``beta``:
  ``"default"`` (``RI_DEFAULTS``, the library's default), ``None`` (``auto_beta``) or a number."""
  import jax

  from jaxmerge import tree as jtree
  from jaxmerge.bench import ri_runner
  from jaxmerge.data import synthetic

  cfg = {**ri_runner.RI_DEFAULTS, "aux_source": source, "seed": seed, **SMOKE}
  if beta != "default":
    cfg["beta"] = beta
  path = ri_cache_path(suite, seed, source, cfg)
  like = [jax.tree.map(np.asarray, e) for e in suite.experts]
  if path.exists():
    z = np.load(path, allow_pickle=False)
    meta = json.loads(str(z["__meta__"]))
    flat = [jtree.flatten_paths(e) for e in like]
    experts = [jtree.unflatten_paths(like[i], {p: z[f"{i}/{p}"] for p in flat[i]}) for i in range(len(like))]
    return experts, meta
  key = jax.random.fold_in(jax.random.key(seed), 1)
  aux = synthetic.make_aux(source, seed=suite.config.seed + 1000 * seed, n=cfg["num_aux"])
  run_cfg = {k: v for k, v in cfg.items() if k not in ("aux_source", "num_aux", "batch_size", "seed")}
  batches = ri_runner.aux_batches(aux, cfg["batch_size"], seed=seed)
  from jaxmerge.ri import disentangle

  rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  with PeakRSS() as mem:
    t = time.perf_counter()
    experts, hist = disentangle(suite.pretrained, list(suite.experts), ri_runner._heads(suite), batches,
                                forward_fn=suite.embed, key=key, layout=suite.layout, progress=False, **run_cfg)
    _block(experts)
    seconds = time.perf_counter() - t
  experts = [jax.tree.map(np.asarray, e) for e in experts]
  meta = {"config": cfg, "seconds": seconds, "peak_added_mb": mem.added_mb,
          "maxrss_before_mb": rss0 / 1024, "maxrss_after_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
          "history": {k: np.asarray(v).tolist() for k, v in hist.items()}}
  arrays = {f"{i}/{p}": x for i, e in enumerate(experts) for p, x in jtree.flatten_paths(e).items()}
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(".tmp.npz")
  np.savez(tmp, __meta__=np.array(json.dumps(meta)), **arrays)
  tmp.replace(path)
  return experts, meta


def method_block(suite, experts, shifted, *, curves: bool) -> dict:
  """Accuracy (test, shifted), scale curves, CTI and merge cost of every method from ``experts``."""
  out = {}
  adapted_acc = None if experts is suite.experts else {t: suite.evaluate(e, [t])[t]
                                                        for t, e in zip(suite.tasks, experts)}
  for m in METHODS:
    merged, steady, first, mb = merge_timed(suite, m, experts)
    acc = suite.evaluate(merged)
    r = {"accuracy": acc, "merge_seconds": steady, "merge_first_call_seconds": first,
         "merge_peak_added_mb": mb, "shifted": evaluate_shifted(suite, merged, shifted)}
    if experts is suite.experts:
      r.update(cti(suite, merged, acc))
    else:
      r.update(cti(suite, merged, acc, experts, adapted_acc))
    if curves:
      delta, err = linear_direction(suite, m, experts, merged)
      r["linearity_max_abs_error"] = err
      r["curve"] = {str(s): suite.evaluate(at_scale(suite, delta, s)) for s in SCALES[m]}
    out[m] = r
    print(f"  {m}: {100 * np.mean(list(r['accuracy'].values())):.2f} (shifted "
          f"{100 * np.mean(list(r['shifted']['accuracy'].values())):.2f})", flush=True)
  return out


def run(seeds, sources, *, curves_for=("fractal",), beta="default") -> None:
  suite = load_suite(0)
  (OUT / "runs").mkdir(parents=True, exist_ok=True)
  shifted = shifted_test(suite, seed=0)
  base_path = OUT / "runs" / f"baseline-{suite.config.seed}.json"
  if not base_path.exists():
    print("baseline (no RI)", flush=True)
    base = {"suite_seed": suite.config.seed, "cache_key": suite.config.hash, "tasks": list(suite.tasks),
            "pretrained": suite.evaluate(suite.pretrained),
            "pretrained_shifted": evaluate_shifted(suite, suite.pretrained, shifted),
            "experts": {t: suite.evaluate(e, [t])[t] for t, e in zip(suite.tasks, suite.experts)},
            "experts_shifted": {t: evaluate_shifted(suite, e, shifted)["accuracy"][t]
                                for t, e in zip(suite.tasks, suite.experts)},
            "methods": method_block(suite, suite.experts, shifted, curves=True)}
    base_path.write_text(json.dumps(base, indent=1))
  for seed in seeds:
    for source in sources:
      tag = "" if beta == "default" else f"-beta{'auto' if beta is None else beta}"
      path = OUT / "runs" / f"{seed}-{source}{tag}.json"
      if path.exists():
        continue
      print(f"RI seed {seed} source {source}{tag}", flush=True)
      experts, meta = ri_adapted(suite, seed, source, beta)
      print(f"  RI: {meta['seconds']:.0f} s", flush=True)
      res = {"seed": seed, "source": source + tag, "ri": meta,
             "methods": method_block(suite, experts, shifted, curves=source in curves_for and not tag and seed in CURVE_SEEDS)}
      path.write_text(json.dumps(res, indent=1))


def experts_check(seed: int, source: str) -> None:
  """How far RI moved each expert's own function on its task data: own-task accuracy (test and shifted) and
  the head-space drift ``E||h_i(z(x; theta'_i)) - h_i(z(x; theta_i))||`` (CTI of the adapted expert against the
  original one, on the same 200 test images per task). Writes ``runs/experts-<seed>-<source>.json``."""
  from jaxmerge.interference import cross_task_interference

  suite = load_suite(0)
  experts, _ = ri_adapted(suite, seed, source)
  shifted = shifted_test(suite, seed=0)
  out = {"seed": seed, "source": source, "accuracy": {}, "shifted": {}, "head_drift": [], "feature_drift": []}
  for i, (t, e) in enumerate(zip(suite.tasks, experts)):
    out["accuracy"][t] = suite.evaluate(e, [t])[t]
    images, labels, _ = shifted[t]
    out["shifted"][t] = float(suite._correct(e, images, labels, np.full(len(labels), i, np.int32)).mean())
    d = cross_task_interference(suite.embed, e, [suite.experts[i]], [suite.data[t].test.images[:CTI_IMAGES]],
                                [suite.heads[t]])
    out["head_drift"].append(float(d["head"][0]))
    out["feature_drift"].append(float(d["feature"][0]))
  (OUT / "runs" / f"experts-{seed}-{source}.json").write_text(json.dumps(out, indent=1))
  print(json.dumps(out, indent=1))


# ---- report ----------------------------------------------------------------------------------------------------


def _avg(acc: dict) -> float:
  return 100 * float(np.mean(list(acc.values())))


def _ms(xs) -> str:
  xs = np.asarray(xs, float)
  if len(xs) == 1:
    return f"{xs[0]:.2f}"
  return f"{xs.mean():.2f} ± {xs.std(ddof=1):.2f}"


def _cmd_for(cmd: str, seeds: str, label: str) -> str:
  src, _, beta = label.partition("-beta")
  return cmd.format(seeds=seeds, src=src) + (f" --beta {beta}" if beta else "")


def report() -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  base = json.loads((OUT / "runs" / "baseline-0.json").read_text())
  runs = [json.loads(p.read_text()) for p in sorted((OUT / "runs").glob("[0-9]*-*.json"))]
  checks = [json.loads(p.read_text()) for p in sorted((OUT / "runs").glob("experts-*.json"))]
  tasks = base["tasks"]
  by_source: dict[str, list] = {}
  for r in runs:
    by_source.setdefault(r["source"], []).append(r)
  main = by_source.get("fractal", [])
  cmd = "python experiments/ri_offline.py run --seeds {seeds} --sources {src}"
  seeds_of = lambda rs: " ".join(str(r["seed"]) for r in rs)  # noqa: E731
  lines = []
  names = {"task_arithmetic": "task arithmetic", "ties": "TIES", "tsv_m": "TSV-M", "iso_cts": "Iso-CTS"}

  # (a) methods with and without RI.
  lines += ["#### (a) Average accuracy (%) with and without RI (auxiliary source: fractal)", "",
            f"Seeds: {seeds_of(main) or 'none'} (n = {len(main)}). Without RI the merges are deterministic (one value).",
            "", "| method | without RI | with RI | gain | command |", "|---|---|---|---|---|"]
  for m in METHODS:
    b = _avg(base["methods"][m]["accuracy"])
    w = [_avg(r["methods"][m]["accuracy"]) for r in main]
    lines.append(f"| {names[m]} | {b:.2f} | {_ms(w) if w else '—'} | {_ms(np.array(w) - b) if w else '—'} | "
                 f"`{cmd.format(seeds=seeds_of(main), src='fractal')}` |")
  lines.append(f"| pretrained (zero-shot) | {_avg(base['pretrained']):.2f} | | | same |")
  lines.append(f"| experts (each on its task) | {_avg(base['experts']):.2f} | | | same |")

  # (b) aux sources.
  lines += ["", "#### (b) RI with each auxiliary source: average accuracy (%)", "",
            "| source | seeds | " + " | ".join(names[m] for m in METHODS) + " | RI seconds | command |",
            "|---|---|" + "---|" * len(METHODS) + "---|---|",
            "| (no RI) | | " + " | ".join(f"{_avg(base['methods'][m]['accuracy']):.2f}" for m in METHODS) + " | | |"]
  for src, rs in sorted(by_source.items()):
    lines.append(f"| {src} | {seeds_of(rs)} | " + " | ".join(_ms([_avg(r['methods'][m]['accuracy']) for r in rs])
                                                          for m in METHODS)
                 + f" | {_ms([r['ri']['seconds'] for r in rs])} | `{_cmd_for(cmd, seeds_of(rs), src)}` |")

  # (c) scale curves.
  if main:
    fig, axes = plt.subplots(1, len(METHODS), figsize=(4 * len(METHODS), 3.4))
    n_curve = sum("curve" in r["methods"]["task_arithmetic"] for r in main)
    lines += ["", f"#### (c) Accuracy (%) against the merge scale (fractal; RI seeds with a curve: {n_curve})", "",
              "| method | scale | " + " | ".join(str(s) for s in SCALES["task_arithmetic"]) + " |", "|---|---|" +
              "---|" * len(SCALES["task_arithmetic"])]
    for ax, m in zip(axes, METHODS):
      xs = SCALES[m]
      b = [_avg(base["methods"][m]["curve"][str(s)]) for s in xs]
      w = np.array([[_avg(r["methods"][m]["curve"][str(s)]) for s in xs] for r in main if "curve" in r["methods"][m]])
      n_curve = len(w)
      ax.plot(xs, b, "o-", label="without RI")
      ax.errorbar(xs, w.mean(0), yerr=w.std(0, ddof=1) if len(w) > 1 else None, fmt="s-", capsize=3, label="with RI")
      ax.set_title(names[m])
      ax.set_xlabel("merge scale")
      ax.set_ylabel("avg accuracy (%)")
      ax.grid(alpha=0.3)
      lines.append(f"| {names[m]} | {' / '.join(map(str, xs))} | " + " | ".join(
        f"{bb:.1f} → {ww:.1f}" for bb, ww in zip(b, w.mean(0))) + " |")
      lines.append(f"| | range (max − min) | without RI {max(b) - min(b):.1f}, with RI "
                   f"{w.mean(0).max() - w.mean(0).min():.1f} |" + " |" * (len(xs) - 1))
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(OUT / "scale_curves.png", dpi=110)
    plt.close(fig)

  # (d) shifted domains.
  if main:
    from jaxmerge.data import synthetic

    lines += ["", "#### (d) Unseen domains: average accuracy (%) on the held-out shifted test sets (fractal)", "",
              f"Shifts: {', '.join(synthetic.SHIFTS)} (severity 1, a quarter of each task's 500 test images each). "
              f"Pretrained {_avg(base['pretrained_shifted']['accuracy']):.2f}, experts "
              f"{_avg(base['experts_shifted']):.2f}.", "",
              "| method | without RI | with RI | gain | " + " | ".join(f"gain on {k}" for k in synthetic.SHIFTS) + " |",
              "|---|---|---|---|" + "---|" * len(synthetic.SHIFTS)]
    for m in METHODS:
      b = _avg(base["methods"][m]["shifted"]["accuracy"])
      w = [_avg(r["methods"][m]["shifted"]["accuracy"]) for r in main]
      per_kind = []
      for k in synthetic.SHIFTS:
        bk = 100 * np.mean([base["methods"][m]["shifted"]["per_shift"][t][k] for t in tasks])
        wk = [100 * np.mean([r["methods"][m]["shifted"]["per_shift"][t][k] for t in tasks]) for r in main]
        per_kind.append(_ms(np.array(wk) - bk))
      lines.append(f"| {names[m]} | {b:.2f} | {_ms(w)} | {_ms(np.array(w) - b)} | " + " | ".join(per_kind) + " |")

  # (e) CTI, against the original experts and against the adapted ones (never mixed up: separate tables).
  if main:
    from jaxmerge.interference import spearman

    def cti_of(rm, which, kind):  # results of this script; runs before the rename used "cti_vs_original/adapted"
      block = rm.get(f"cti_vs_{which}_experts") or rm.get(f"cti_vs_{which}")
      return None if block is None else np.asarray(block[kind], float)

    def adapted_drop(rm):  # points; None for runs written before the adapted experts' accuracy was recorded
      block = rm.get("cti_vs_adapted_experts") or {}
      return None if "accuracy_drop" not in block else 100 * np.asarray(block["accuracy_drop"], float)

    exp = np.array([100 * base["experts"][t] for t in tasks])
    lines += ["", "#### (e) Cross-task interference per task (fractal; mean over seeds)", "",
              "Head-space CTI `E||h_i(z_M) - h_i(z_i)||` and feature CTI `E||z_M - z_i||^2/||z_i||^2` on 200 "
              "unlabeled test images per task. **(e1) CTI vs original experts**: `z_i` is the original expert "
              "(`cti_vs_original_experts`), before → after RI, with the accuracy drop against the original experts "
              "(points). **(e2) CTI vs adapted experts**: for the RI merges, `z_i` is the RI-adapted expert the merge "
              "was built from (`cti_vs_adapted_experts`), with the accuracy drop against the adapted experts; the "
              "merge without RI is shown against its own constituents, the original experts. rho = Spearman "
              "correlation over tasks of the CTI with the drop.", "",
              "(e1) CTI vs original experts", "",
              "| method | CTI | " + " | ".join(tasks) + " | mean | rho(CTI vs original, drop vs original) before / "
              "after |", "|---|---|" + "---|" * len(tasks) + "---|---|"]
    fig, axes = plt.subplots(1, len(METHODS), figsize=(4 * len(METHODS), 3.6))
    pooled = {"before": ([], []), "after vs original": ([], []), "after vs adapted": ([], [])}
    e2 = []
    for ax, m in zip(axes, METHODS):
      drop_b = exp - np.array([100 * base["methods"][m]["accuracy"][t] for t in tasks])
      drop_w = exp - np.mean([[100 * r["methods"][m]["accuracy"][t] for t in tasks] for r in main], axis=0)
      drops_a = [adapted_drop(r["methods"][m]) for r in main]
      drop_a = None if any(d is None for d in drops_a) else np.mean(drops_a, axis=0)
      for kind in ("head", "feature"):
        b = cti_of(base["methods"][m], "original", kind)
        w = np.mean([cti_of(r["methods"][m], "original", kind) for r in main], axis=0)
        a = np.mean([cti_of(r["methods"][m], "adapted", kind) for r in main], axis=0)
        lines.append(f"| {names[m]} | {kind} | " + " | ".join(f"{x:.3g} → {y:.3g}" for x, y in zip(b, w)) +
                     f" | {b.mean():.3g} → {w.mean():.3g} | {spearman(b, drop_b):.2f} / {spearman(w, drop_w):.2f} |")
        e2.append(f"| {names[m]} | {kind} | " + " | ".join(f"{x:.3g} → {y:.3g}" for x, y in zip(b, a)) +
                  f" | {b.mean():.3g} → {a.mean():.3g} | "
                  f"{'—' if drop_a is None else f'{spearman(a, drop_a):.2f}'} | {spearman(a, drop_w):.2f} |")
        if kind == "head":
          pooled["before"][0].extend(b), pooled["before"][1].extend(drop_b)
          pooled["after vs original"][0].extend(w), pooled["after vs original"][1].extend(drop_w)
          if drop_a is not None:
            pooled["after vs adapted"][0].extend(a), pooled["after vs adapted"][1].extend(drop_a)
          ax.scatter(b, drop_b, marker="o", label="without RI (vs original experts)")
          ax.scatter(w, drop_w, marker="^", label="with RI (vs original experts)")
          if drop_a is not None:
            ax.scatter(a, drop_a, marker="x", label="with RI (vs adapted experts)")
          for i, t in enumerate(tasks):
            ax.annotate("", xy=(w[i], drop_w[i]), xytext=(b[i], drop_b[i]),
                        arrowprops=dict(arrowstyle="->", alpha=0.4))
            ax.annotate(t, (b[i], drop_b[i]), fontsize=6)
      ax.set_title(names[m])
      ax.set_xlabel("head-space CTI")
      ax.set_ylabel("accuracy drop vs the same experts (points)")
      ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(OUT / "cti_vs_drop.png", dpi=110)
    plt.close(fig)
    lines += ["", "(e2) CTI vs adapted experts (the merge's own constituents: original experts without RI, adapted "
              "experts with RI)", "",
              "| method | CTI | " + " | ".join(tasks) + " | mean | rho(CTI vs adapted, drop vs adapted) | "
              "rho(CTI vs adapted, drop vs original) |", "|---|---|" + "---|" * len(tasks) + "---|---|---|"] + e2
    lines += ["", "Pooled over the four methods and the tasks (head-space CTI, n = "
              f"{len(pooled['before'][0])}): rho(CTI, drop) " + ", ".join(
                f"{k} {spearman(*v):.2f}" for k, v in pooled.items() if v[0]) + "."]
    for c in checks:
      lines += ["", f"RI-adapted experts (seed {c['seed']}, {c['source']}) on their own task, original → adapted: "
                f"accuracy {_avg(base['experts']):.2f} → {_avg(c['accuracy']):.2f}, shifted "
                f"{_avg(base['experts_shifted']):.2f} → {_avg(c['shifted']):.2f}; own-head drift from the original "
                f"expert on its task images (head-space CTI of the adapted expert alone) "
                f"{np.mean(c['head_drift']):.3g} (per task {', '.join(f'{x:.3g}' for x in c['head_drift'])})."]

  # (f) cost.
  if runs:
    lines += ["", "#### (f) Cost: the RI step against the merges (wall time on the shared 2-core CPU)", "",
              "| step | wall time (s) | peak memory added (MB) |", "|---|---|---|"]
    lines.append(f"| RI, 8 experts, {runs[0]['ri']['config']['steps']} steps of {runs[0]['ri']['config']['batch_size']}"
                 f" aux images (incl. compilation; n = {len(runs)}) | {_ms([r['ri']['seconds'] for r in runs])} | "
                 f"{_ms([r['ri']['peak_added_mb'] for r in runs])} |")
    for m in METHODS:
      lines.append(f"| {names[m]} merge (steady state; first call incl. compilation) | "
                   f"{base['methods'][m]['merge_seconds']:.3f} ({base['methods'][m]['merge_first_call_seconds']:.2f}) | "
                   f"{base['methods'][m]['merge_peak_added_mb']:.1f} |")

  # RI loss curves.
  if runs:
    fig, ax = plt.subplots(1, 2, figsize=(8, 3.2))
    for r in runs:
      h = r["ri"]["history"]
      ax[0].plot(h["disentangle"], label=f"{r['source']} s{r['seed']}")
      ax[1].plot(h["preserve"], label=f"{r['source']} s{r['seed']}")
    ax[0].set_title("disentangle term")
    ax[1].set_title("preserve term (KL)")
    for a in ax:
      a.set_xlabel("step")
      a.grid(alpha=0.3)
    ax[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(OUT / "ri_losses.png", dpi=110)
    plt.close(fig)
  (OUT / "tables.md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="cmd", required=True)
  r = sub.add_parser("run")
  r.add_argument("--seeds", type=int, nargs="+", default=[0])
  r.add_argument("--sources", nargs="+", default=["fractal"])
  r.add_argument("--beta", default="default",
                 help="RI's beta: 'default' (the library's, RI_DEFAULTS), 'auto' (auto_beta) or a number")
  sub.add_parser("report")
  e = sub.add_parser("experts", help="own-task accuracy and drift of the RI-adapted experts")
  e.add_argument("--seed", type=int, default=0)
  e.add_argument("--source", default="fractal")
  p.add_argument("--smoke", action="store_true", help="reduced suite and 5 RI steps, results in a temp dir")
  args = p.parse_args(argv)
  if args.smoke:
    import tempfile

    global OUT
    SMOKE["steps"] = 5
    OUT = pathlib.Path(tempfile.gettempdir()) / "ri_offline_smoke"
  if args.cmd == "experts":
    experts_check(args.seed, args.source)
  elif args.cmd == "run":
    beta = args.beta if args.beta == "default" else None if args.beta == "auto" else float(args.beta)
    run(args.seeds, args.sources, beta=beta)
  else:
    report()
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
