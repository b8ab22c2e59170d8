"""Benchmark plug-in for the model-level merges (:mod:`jaxmerge.moe`): accuracy, extra parameters and latency.

Model-level merges change the forward function, so they do not fit the runner's ``method -> params``
contract; :func:`run_moe` builds each one on a suite, evaluates it with the suite's data and frozen heads,
and returns rows in the runner's format (:func:`jaxmerge.bench.runner.run_suite`'s ``rows``) with three extra
columns: ``extra_params`` (numbers stored beyond one plain vision tower, masks as bits / 32),
``extra_params_ratio`` (relative to one tower) and ``relative_latency`` (warm forward time of a batch divided by
the plain tower's, both timed in alternation in the same process, best of 7 each).

Methods (:data:`MOE_METHODS`): ``wemoe`` (routers trained by entropy minimization on the unlabeled test inputs
through :func:`jaxmerge.tta.fit`), ``smile`` (training-free), ``twin`` and ``free`` (routers trained on labeled
validation data to predict the task), and the per-task models ``emr``, ``tall_mask``, ``tsv_c``, ``byom``,
``byom_lora`` (task id known at inference).

``jaxmerge bench --moe`` appends these rows to the results table through :func:`resolve_methods` and
:func:`add_moe_rows`. The five per-task names are also data-free registry methods (``jm.merge_per_task``); with
``--moe`` they are built here instead (the same task models, stored as their compressed parts), so that their
rows carry the measured storage and latency. Every other row gets the columns by construction: a plain
weight merge (and the pretrained model) stores one tower and runs the plain network (0 extra parameters,
latency 1.0, stated rather than measured); the experts store ``T`` towers (``(T - 1)`` towers extra).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxmerge as jm
import jaxmerge.moe as moe
from jaxmerge.bench import runner as _runner

__all__ = ["MOE_METHODS", "PER_TASK_METHODS", "SETTINGS", "SMOKE_MOE_METHODS", "add_moe_rows", "build",
           "resolve_methods", "run_moe"]

# Benchmark settings for the tiny CLIP on CPU (the references' are for ViT-B/32 on GPU). WEMoE: FusionBench's
# router (2 hidden layers, bias init 0.3, batch-level reduction) and Adam learning rate 1e-4, at 200 steps of
# batch 16 per task instead of 1000 (CPU cost). At 1e-3 entropy minimization drove the routers to confidently
# wrong mixtures on this suite (26.6% after 100 steps, experiments/README.md "Model-level merges").
SETTINGS = {
    "wemoe": dict(init_lambda=0.3, hidden_layers=2, batch_reduce=True, steps=200, batch_size=16, learning_rate=1e-4),
    "smile": dict(k=8, gate_k=4, top_k=1),  # FusionBench ViT-B/32: 32 and 16 of width 768; width 64 here
    "twin": dict(scale=0.3, rank=8, router_steps=300),
    "free": dict(cutoff=1.0, density=0.01, router_steps=300),
    "byom": dict(density=0.1, scale=0.3),
    "byom_lora": dict(rank=4),
}
MOE_METHODS = ("wemoe", "smile", "twin", "free", "emr", "tall_mask", "tsv_c", "byom", "byom_lora")
# Model-level names that are also (per-task, data-free) registry methods.
PER_TASK_METHODS = ("emr", "tall_mask", "tsv_c", "byom", "byom_lora")
# `jaxmerge bench --smoke --moe` without --methods: one routed NNX model and one per-task model.
SMOKE_MOE_METHODS = ("smile", "emr")


def _normalize(x):
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class Built:
  """A built model-level merge: ``forward(images_uint8, task_idx) -> normalized embeddings``."""

  def __init__(self, forward: Callable[..., Any], extra_params: int, per_task: bool, build_seconds: float,
               notes: str = ""):
    self.forward, self.extra_params, self.per_task = forward, extra_params, per_task
    self.build_seconds, self.notes = build_seconds, notes


def _projection(suite) -> jax.Array:
  return jnp.asarray(suite.clip_params["visual_projection"]["kernel"], jnp.float32)


def _nnx_forward(suite, model: nnx.Module):
  graphdef, state = nnx.split(model)
  proj = _projection(suite)

  @jax.jit
  def fwd(state, images):
    with jax.default_matmul_precision("highest"):
      return _normalize(nnx.merge(graphdef, state)(suite.preprocess(images)) @ proj)

  return lambda images, task: fwd(state, images)


def _entropy_batches(suite, batch_size: int, seed: int):
  its = [suite.batches(t, "test", batch_size, seed=seed) for t in suite.tasks]
  while True:
    yield np.stack([next(i) for i in its])


def _wemoe(suite, key, s) -> Built:
  import optax  # noqa: PLC0415

  from jaxmerge import tta  # noqa: PLC0415

  cfg = suite.model.config
  model = moe.wemoe(cfg, suite.pretrained, suite.experts, key=key, init_lambda=s["init_lambda"],
                    hidden_layers=s["hidden_layers"], batch_reduce=s["batch_reduce"])
  heads, valid = tta.pad_heads([suite.heads[t] for t in suite.tasks])
  proj = _projection(suite)

  def apply_fn(m, extra, batch):  # batch: uint8 [T, B, H, W, 3]; logits [T, B, C_max]
    def one(x, h):
      z = _normalize(m(suite.preprocess(x)) @ extra["proj"])
      return tta.head_logits(z, h)
    return jax.vmap(one)(batch, extra["heads"])

  def loss(logits, batch):
    del batch
    return jnp.sum(jnp.mean(tta.entropy(logits, valid[:, None, :]), axis=1))

  adapter, frozen, rebuild = moe.router_adapter(model, apply_fn)
  theta, hist = tta.fit(adapter, {"model": frozen, "extra": {"heads": heads, "proj": proj}},
                        optax.adam(s["learning_rate"]), _entropy_batches(suite, s["batch_size"], 0), loss, key=key,
                        steps=s["steps"], progress=False, desc="wemoe routers")
  trained = rebuild(theta)
  extra = moe.count_params(trained) - _tower_params(suite)
  note = f"entropy {hist['loss'][0]:.3f} -> {hist['loss'][-1]:.3f} over {s['steps']} steps" if s["steps"] else ""
  return Built(_nnx_forward(suite, trained), extra, False, 0.0, note)


def _smile(suite, key, s) -> Built:
  del key
  model = moe.smile(suite.model.config, suite.pretrained, suite.experts, k=s["k"], gate_k=s["gate_k"],
                    top_k=s["top_k"])
  return Built(_nnx_forward(suite, model), moe.count_params(model) - _tower_params(suite), False, 0.0)


def _tower_params(suite) -> int:
  return int(sum(np.size(x) for x in jax.tree.leaves(suite.pretrained)))


def _routed(suite, key, model: moe.ExpertModel, steps: int) -> moe.ExpertModel:
  """Trains the task router on the validation split (features: the shared model's embeddings)."""
  shared = model.params(jnp.zeros((model.num_tasks,)))
  feats, labels = [], []
  for i, t in enumerate(suite.tasks):
    x = suite.data[t].val.images
    feats.append(np.asarray(suite.embed(shared, x)))
    labels.append(np.full(len(x), i, np.int32))
  router = moe.train_router(np.concatenate(feats), np.concatenate(labels), steps=steps, key=key)
  return moe.pertask.ExpertModel(model.apply_fn, model.like, model.base, model.experts, model.num_tasks,
                                 (router, suite.embed), model.name)


def _expert_forward(model: moe.ExpertModel, routed: bool):
  if routed:
    fwd = jax.jit(lambda images: model(images))
    return lambda images, task: fwd(images)
  fwd = jax.jit(lambda images, task: model(images, task))
  return lambda images, task: fwd(images, jnp.asarray(task, jnp.int32))


def _per_task(suite, key, name, s) -> Built:
  del key
  args = (suite.embed, suite.pretrained, suite.experts)
  if name == "emr":
    m = moe.emr_model(*args)
  elif name == "tall_mask":
    m = moe.tall_model(*args)
  elif name == "tsv_c":
    m = moe.low_rank_model(*args)
  elif name == "byom":
    m = moe.byom_model(*args, density=s["density"], scale=s["scale"])
  else:
    m = moe.low_rank_model(*args, rank=s["rank"], name="byom_lora")
  return Built(_expert_forward(m, False), m.extra_params(), True, 0.0)


def build(suite, name: str, key: jax.Array) -> Built:
  """Builds (and trains, where the method has a router) the model-level merge ``name`` on ``suite``.

  Args:
    suite: a built suite.
    name: one of ``MOE_METHODS``; its settings come from ``SETTINGS[name]``.
    key: PRNG key.

  Returns:
    A :class:`Built` with the model's forward, its extra parameter count, whether it keeps one model per
    task (``per_task``), and the build time in seconds (``build_seconds``).

  Raises:
    ValueError: an unknown method name.
  """
  s = SETTINGS.get(name, {})
  start = time.perf_counter()
  if name == "wemoe":
    b = _wemoe(suite, key, s)
  elif name == "smile":
    b = _smile(suite, key, s)
  elif name in ("twin", "free"):
    args = (suite.embed, suite.pretrained, suite.experts)
    m = (moe.twin_model(*args, scale=s["scale"], rank=s["rank"]) if name == "twin" else
         moe.free_model(*args, cutoff=s["cutoff"], density=s["density"]))
    m = _routed(suite, key, m, s["router_steps"])
    b = Built(_expert_forward(m, True), m.extra_params(), False, 0.0)
  elif name in ("emr", "tall_mask", "tsv_c", "byom", "byom_lora"):
    b = _per_task(suite, key, name, s)
  else:
    raise ValueError(f"unknown model-level method {name!r}; valid: {', '.join(MOE_METHODS)}")
  b.build_seconds = time.perf_counter() - start
  return b


def _evaluate(suite, b: Built, batch: int = 100) -> dict[str, float]:
  heads = {t: jnp.asarray(suite.heads[t], jnp.float32) for t in suite.tasks}
  acc = {}
  for i, t in enumerate(suite.tasks):
    d = suite.data[t].test
    correct = 0
    for j in range(0, len(d.labels), batch):
      x = d.images[j:j + batch]
      pad = batch - len(x)
      if pad:  # fixed shapes: one compilation
        x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)])
      z = b.forward(x, i)
      pred = np.asarray(jnp.argmax(z @ heads[t].T, axis=-1))[: batch - pad]
      correct += int(np.sum(pred == d.labels[j:j + batch]))
    acc[t] = correct / len(d.labels)
  return acc


def _relative_latency(fn, plain, images, task, repeats: int = 7) -> float:
  """Warm forward time of ``fn`` over ``plain``'s, timed in alternation (plain, model, plain, ...) so that both
  minimums come from the same stretch of machine load; each is the best of ``repeats``."""
  jax.block_until_ready(fn(images, task))
  jax.block_until_ready(plain(images))
  best_fn = best_plain = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(plain(images))
    best_plain = min(best_plain, time.perf_counter() - start)
    start = time.perf_counter()
    jax.block_until_ready(fn(images, task))
    best_fn = min(best_fn, time.perf_counter() - start)
  return best_fn / best_plain


def run_moe(suite, methods: Sequence[str] = MOE_METHODS, *, seed: int = 0, expert_acc: dict | None = None,
            strict: bool = False, latency_batch: int = 100, progress: bool = False) -> tuple[list[dict], list[dict]]:
  """Builds, evaluates and times every model-level method on ``suite``.

  Args:
    suite: a built suite (e.g. :func:`jaxmerge.bench.suite.build_offline_suite`).
    methods: names from :data:`MOE_METHODS`.
    seed: PRNG seed for router initialization.
    expert_acc: ``{task: accuracy}`` of the experts (normalized accuracy); computed if ``None``.
    strict: re-raise a method's error instead of recording it.
    latency_batch: images per timed forward (single-task batch of the first task).
    progress: show a progress bar over methods.

  Returns:
    ``(rows, skipped)`` in :func:`jaxmerge.bench.runner.run_suite`'s format.
  """
  tasks = list(suite.tasks)
  if expert_acc is None:
    expert_acc = {t: suite.evaluate(e, [t])[t] for t, e in zip(tasks, suite.experts)}
  images = suite.data[tasks[0]].test.images[:latency_batch]
  plain = jax.jit(lambda x: suite.embed(suite.pretrained, x))
  n_tower = _tower_params(suite)
  key = jax.random.key(seed)
  rows, skipped = [], []
  bar = list(enumerate(methods))
  if progress:
    from tqdm.auto import tqdm  # noqa: PLC0415

    bar = tqdm(bar, desc="model-level merges", leave=False)
  for i, name in bar:
    try:
      b = build(suite, name, jax.random.fold_in(key, i))
      start = time.perf_counter()
      acc = _evaluate(suite, b)
      eval_seconds = time.perf_counter() - start
      lat = _relative_latency(b.forward, plain, images, 0)
      rows.append(_runner.result_row(name, acc, expert_acc, tasks, b.build_seconds, eval_seconds=eval_seconds,
                               kind="model-level", data=_DATA[name], family="moe", per_task_model=b.per_task,
                               extra_params=int(b.extra_params), extra_params_ratio=b.extra_params / n_tower,
                               relative_latency=lat, hparams=dict(SETTINGS.get(name, {})), notes=b.notes))
    except Exception as e:  # noqa: BLE001 (one method's failure must not lose the others)
      if strict:
        raise
      skipped.append({"method": name, "reason": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"})
  return rows, skipped


_DATA = {"wemoe": "tta", "smile": "none", "twin": "val", "free": "val", "emr": "none (task id)",
         "tall_mask": "none (task id)", "tsv_c": "none (task id)", "byom": "none (task id)",
         "byom_lora": "none (task id)"}


def resolve_methods(spec: str | Sequence[str] | None, *, tta: bool = False) -> tuple[list[str], list[str]]:
  """Splits a ``jaxmerge bench --moe`` method selection into registry methods and model-level methods.

  Args:
    spec: comma-separated names or a list, each a registry method (``jm.list_methods()``) or a model-level
      method (:data:`MOE_METHODS`); ``None`` or ``"all"`` selects every registry method that needs no data
      (plus the TTA ones with ``tta``) and every model-level method.
    tta: include registry methods with ``data == "tta"`` in the default selection.

  Returns:
    ``(plain, model_level)``: the registry methods for :func:`jaxmerge.bench.runner.run_suite` and the
    model-level methods for :func:`add_moe_rows`, each in the order given (duplicates dropped). The names of
    :data:`PER_TASK_METHODS` go to ``model_level`` only.

  Raises:
    ValueError: an unknown name (the message lists the valid registry and model-level names), or an empty
      selection.
  """
  if spec is None or spec == "all" or spec == ["all"]:
    plain = [m for m in _runner.resolve_methods(None, tta=tta) if m not in MOE_METHODS]
    return plain, list(MOE_METHODS)
  names = list(dict.fromkeys(s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()))
  registered = jm.list_methods()
  unknown = [n for n in names if n not in registered and n not in MOE_METHODS]
  if unknown:
    raise ValueError(f"unknown method(s) {', '.join(map(repr, unknown))}; valid methods: {', '.join(registered)}; "
                     f"model-level methods (--moe): {', '.join(MOE_METHODS)}")
  if not names:
    raise ValueError("--methods selected no method")
  return [n for n in names if n not in MOE_METHODS], [n for n in names if n in MOE_METHODS]


def _storage_columns(row: dict, n_tasks: int) -> dict:
  """Extra parameters (in towers and numbers of the tower ``n``) and relative latency of a non-model-level row."""
  if row["method"] == "experts":
    return {"extra_params_ratio": float(n_tasks - 1), "relative_latency": 1.0, "latency_measured": False}
  if row.get("per_task_model"):  # a per-task registry method materialized as T towers: not measured here
    return {"extra_params_ratio": None, "relative_latency": None, "latency_measured": False}
  return {"extra_params_ratio": 0.0, "relative_latency": 1.0, "latency_measured": False}


def add_moe_rows(results: dict, suite, methods: Sequence[str], *, seed: int = 0, progress: bool = True,
                 strict: bool = False) -> dict:
  """Appends the model-level merges to a :func:`jaxmerge.bench.runner.run_suite` result and gives every row
  the columns ``extra_params``, ``extra_params_ratio`` and ``relative_latency``.

  Model-level rows are measured by :func:`run_moe` (their ``kind`` is ``"model-level"``, ``seconds`` is the
  build time, router training included). The other rows get the columns by construction: baselines and plain
  weight merges 0 extra parameters and latency 1.0 (``latency_measured`` False), the experts ``T - 1`` towers.

  Args:
    results: the runner's results dict, with its ``"pretrained"`` and ``"experts"`` rows; updated in place.
    suite: the suite the results come from.
    methods: names from :data:`MOE_METHODS` (see :func:`resolve_methods`).
    seed: PRNG seed for router initialization.
    progress: show a progress bar over methods.
    strict: re-raise a method's error instead of recording it under ``"skipped"``.

  Returns:
    ``results``, with the model-level rows appended, their failures under ``"skipped"`` and their wall time
    under ``timings["model_level"]``.

  Raises:
    ValueError: a name that is not a model-level method, or results without an ``"experts"`` row.
  """
  bad = [m for m in methods if m not in MOE_METHODS]
  if bad:
    raise ValueError(f"not model-level method(s): {', '.join(map(repr, bad))}; valid: {', '.join(MOE_METHODS)}")
  experts = [r for r in results["rows"] if r["method"] == "experts"]
  if not experts:
    raise ValueError("results have no 'experts' row (run jaxmerge.bench.runner.run_suite first)")
  n_tower = _tower_params(suite)
  for r in results["rows"]:
    cols = _storage_columns(r, len(suite.tasks))
    ratio = cols["extra_params_ratio"]
    r.update(cols, extra_params=None if ratio is None else int(round(ratio * n_tower)))
  start = time.perf_counter()
  rows, skipped = run_moe(suite, list(methods), seed=seed, expert_acc=dict(experts[0]["accuracy"]), strict=strict,
                          progress=progress)
  for r in rows:
    r["latency_measured"] = True
  results["rows"].extend(rows)
  results.setdefault("skipped", []).extend(skipped)
  results.setdefault("timings", {})["model_level"] = time.perf_counter() - start
  results["tower_params"] = n_tower
  return results
