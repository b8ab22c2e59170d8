"""Representation Surgery as a registered method and a bench row: identity before training, the L1 objective
falls, training on cached features equals training with forward passes, and the ``--tta`` bench rows of
``surgery`` and ``localize_stitch_data`` on a tiny suite (the MLP encoder of tests/test_tta.py)."""

import importlib
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmerge as jm
from jaxmerge.bench import runner
from jaxmerge.tta import api
from tests.test_tta import D, DIN, T, forward, make_problem

S = importlib.import_module("jaxmerge.tta.surgery")  # (jaxmerge.tta.surgery is also the function's name)
N = 24


@pytest.fixture(scope="module")
def problem():
  pre, fts, heads, _ = make_problem()
  xs = [np.asarray(jax.random.normal(jax.random.key(20 + t), (N, DIN))) for t in range(T)]
  return pre, fts, heads, xs


def test_untrained_surgery_is_the_merged_model(problem):
  pre, fts, heads, xs = problem
  model, hist = api.run_method("surgery", pre, fts, forward, heads, xs, steps=0, return_history=True)
  assert isinstance(model, S.SurgeryModel) and hist["loss"].shape == (0,)
  ta = jm.merge(jm.get_method("task_arithmetic")(), pre, fts)
  for a, b in zip(jax.tree.leaves(model.merged), jax.tree.leaves(ta)):
    np.testing.assert_array_equal(a, b)
  for t in range(T):
    z = forward(ta, jnp.asarray(xs[t]))
    np.testing.assert_array_equal(model.features(forward, jnp.asarray(xs[t]), t), z)  # W_up = 0: identity
    np.testing.assert_array_equal(z @ heads[t].T, model.features(forward, jnp.asarray(xs[t]), t) @ heads[t].T)
  assert model.num_trainable == 2 * T * 16 * D
  with pytest.raises(ValueError, match="one merged model"):
    jm.get_method("surgery")(base="tall_mask")
  with pytest.raises(ValueError, match="unknown method"):
    jm.get_method("surgery")(base="nope")


def test_surgery_loss_decreases_and_cached_features_match_forward_passes(problem):
  pre, fts, heads, xs = problem
  model, hist = api.run_method("surgery", pre, fts, forward, heads, xs, steps=30, batch_size=8, learning_rate=1e-2,
                               return_history=True)
  assert hist["loss"][-5:].mean() < 0.8 * hist["loss"][:5].mean()
  ta = model.merged
  zm = [np.asarray(forward(ta, jnp.asarray(x))) for x in xs]
  ze = [np.asarray(forward(f, jnp.asarray(x))) for f, x in zip(fts, xs)]
  # Full-batch steps: the sampled batch is a permutation of all rows, and the L1 mean does not depend on order.
  key = jax.random.key(7)
  kw = dict(rank=4, optimizer=jm.tta.methods.adam(1e-2), steps=15)
  a1, h1 = S.surgery_from_features(zm, ze, batch_size=N, key=key, **kw)
  a2, h2 = S.surgery(ta, fts, forward, [np.stack(xs)] * 15, key=jax.random.split(key)[1], progress=False, **kw)
  np.testing.assert_allclose(h1["loss"], h2["loss"], rtol=1e-4)
  for k in ("down", "up"):
    np.testing.assert_allclose(a1[k], a2[k], rtol=1e-3, atol=1e-5)
  assert h1["loss"][-1] < h1["loss"][0]
  with pytest.raises(ValueError, match="feature rows"):
    S.surgery_from_features([z[:0] for z in zm], [z[:0] for z in ze], key=key, steps=1)


class TinySuite:
  """The runner's Suite protocol over the MLP encoder: inputs are float vectors, labels are each expert's own
  predictions (so experts score 100%)."""

  name = "tiny"

  def __init__(self):
    pre, fts, heads, _ = make_problem()
    self.tasks = ("a", "b", "c")
    self.pretrained, self.experts, self.layout, self.timings = pre, fts, None, {}
    self.heads = {t: np.asarray(h) for t, h in zip(self.tasks, heads)}
    self.data = {}
    for i, t in enumerate(self.tasks):
      split = {}
      for j, name in enumerate(("val", "test")):
        x = np.asarray(jax.random.normal(jax.random.key(100 + 10 * i + j), (N, DIN)))
        y = np.asarray(jnp.argmax(forward(fts[i], jnp.asarray(x)) @ heads[i].T, axis=-1), np.int32)
        split[name] = types.SimpleNamespace(images=x, labels=y)
      self.data[t] = types.SimpleNamespace(**split)
    self.embed = forward

  def evaluate(self, params, tasks=None, split="test"):
    out = {}
    for t in tasks or self.tasks:
      d = getattr(self.data[t], split)
      pred = np.argmax(np.asarray(forward(params, jnp.asarray(d.images)) @ self.heads[t].T), -1)
      out[t] = float(np.mean(pred == d.labels))
    return out

  def unlabeled(self, task, split="test"):
    return getattr(self.data[task], split).images


def test_bench_rows_on_a_tiny_suite(monkeypatch, tmp_path):
  from jaxmerge.bench import tta_runner

  monkeypatch.setattr(tta_runner, "PLOT_DIR", tmp_path)
  monkeypatch.setattr(tta_runner, "TTA_STEPS", 40)
  suite = TinySuite()
  assert "surgery" in runner.resolve_methods(None, tta=True)  # part of the default --tta selection
  seen = []
  evaluate_on = tta_runner.SurgeryRow.evaluate_on
  monkeypatch.setattr(tta_runner.SurgeryRow, "evaluate_on", lambda self, s: seen.append(self) or evaluate_on(self, s))
  res = runner.run_suite(suite, ["task_arithmetic", "surgery", "localize_stitch_data"], progress=False, strict=True)
  rows = {r["method"]: r for r in res["rows"]}
  assert set(rows) >= {"task_arithmetic", "surgery", "localize_stitch_data"} and not res["skipped"]
  assert rows["surgery"]["per_task_model"] and rows["surgery"]["data"] == "tta"
  cost = tta_runner.COSTS["surgery"]
  assert cost["trainable"] == 2 * T * 16 * D and cost["steps"] == 40 and cost["seconds"] > 0
  assert tta_runner.HISTORIES["surgery"]["loss"][-1] < tta_runner.HISTORIES["surgery"]["loss"][0]
  # The row is the accuracy of the adapted features (each task with its adapter), computed independently here.
  model = seen[0]
  for i, t in enumerate(suite.tasks):
    d = suite.data[t].test
    z = S.apply_surgery(model.adapters, i, forward(model.merged, jnp.asarray(d.images)))
    want = float(np.mean(np.argmax(np.asarray(z @ suite.heads[t].T), -1) == d.labels))
    assert rows["surgery"]["accuracy"][t] == pytest.approx(want)
  # Untrained adapters (W_up = 0) score exactly as the merged model: the task-arithmetic row.
  zero = tta_runner.SurgeryRow(model.merged, {**model.adapters, "up": jnp.zeros_like(model.adapters["up"])})
  assert evaluate_on(zero, suite) == rows["task_arithmetic"]["accuracy"]
  ls = tta_runner.COSTS["localize_stitch_data"]
  assert ls["trainable"] == T * sum(int(np.size(x)) for x in jax.tree.leaves(suite.pretrained)
                                    if jnp.issubdtype(x.dtype, jnp.floating))
  assert (tmp_path / "costs.json").exists() and (tmp_path / "surgery_loss.png").exists()
