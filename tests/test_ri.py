"""Resolving Interference (jaxmerge.ri) and the cross-task interference diagnostic on a tiny MLP encoder."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxmerge as jm
from jaxmerge.interference import cross_task_interference
from jaxmerge.ri import disentangle

T, DIN, HID, D, B = 3, 6, 10, 9, 16
CLASSES = (3, 4, 2)
ADAM = optax.adam(1e-2)


def forward(params, x):
  h = jnp.tanh(x @ params["l1"]["w"].T + params["l1"]["b"][None])
  return h @ params["l2"]["w"].T


def pretrained_model(dtype=jnp.float32):
  k = jax.random.split(jax.random.key(0), 2)
  pre = {"l1": {"w": jax.random.normal(k[0], (HID, DIN)) / np.sqrt(DIN), "b": jnp.zeros(HID)},
         "l2": {"w": jax.random.normal(k[1], (D, HID)) / np.sqrt(HID)}}
  return jax.tree.map(lambda x: x.astype(dtype), pre)


def interfering(dtype=jnp.float32):
  """Experts that change every weight at random: each moves the features inside the other tasks' heads."""
  pre = pretrained_model()
  ks = jax.random.split(jax.random.key(1), T)
  fts = [jax.tree.map(lambda p, kk=kk: p + 0.5 * jax.random.normal(kk, p.shape) / np.sqrt(p.shape[-1]), pre)
         for kk in ks]
  heads = [jax.random.normal(jax.random.fold_in(jax.random.key(2), t), (c, D)) for t, c in enumerate(CLASSES)]
  cast = lambda tree: jax.tree.map(lambda x: x.astype(dtype), tree)  # noqa: E731
  return cast(pre), [cast(f) for f in fts], heads


def orthogonal():
  """Heads read disjoint blocks of the D=9 features; expert i only changes the output rows of block i, so it
  leaves every other head's logits exactly as the pretrained model had them."""
  pre = pretrained_model()
  fts, heads = [], []
  for t, c in enumerate(CLASSES):
    block = slice(3 * t, 3 * t + 3)
    k1, k2 = jax.random.split(jax.random.fold_in(jax.random.key(3), t))
    heads.append(jnp.zeros((c, D)).at[:, block].set(jax.random.normal(k1, (c, 3))))
    tau = jnp.zeros((D, HID)).at[block].set(0.5 * jax.random.normal(k2, (3, HID)))
    fts.append({"l1": pre["l1"], "l2": {"w": pre["l2"]["w"] + tau}})
  return pre, fts, heads


def aux(n=60):
  return [jax.random.normal(jax.random.fold_in(jax.random.key(4), i), (B, DIN)) for i in range(n)]


def run(pre, fts, heads, steps=40, **kw):
  kw = {"optimizer": ADAM, "key": jax.random.key(0), "progress": False, **kw}
  return disentangle(pre, fts, heads, aux(steps), forward_fn=forward, steps=steps, **kw)


def assert_trees_close(a, b, atol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.shape == y.shape and x.dtype == y.dtype
    np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), atol=atol, rtol=0)


def test_single_task_changes_nothing():
  pre, fts, heads = interfering()
  adapted, hist = run(pre, fts[:1], heads[:1], steps=10)
  assert_trees_close(adapted, fts[:1], atol=1e-6)
  assert np.all(hist["disentangle"] == 0) and np.all(hist["preserve"] == 0)


def test_already_orthogonal_experts_change_nothing():
  pre, fts, heads = orthogonal()
  adapted, hist = run(pre, fts, heads, steps=20)
  assert_trees_close(adapted, fts, atol=1e-6)
  assert np.max(hist["loss"]) < 1e-10


def test_interfering_experts_are_disentangled_and_preserved():
  pre, fts, heads = interfering()
  adapted, hist = run(pre, fts, heads, steps=60)
  assert hist["loss"][-1] < 0.2 * hist["loss"][0]
  assert hist["disentangle"][-1] < 0.2 * hist["disentangle"][0]
  assert hist["preserve"][0] == 0 and np.max(hist["preserve"]) < 0.05 * hist["disentangle"][0]
  assert hist["disentangle_tasks"].shape == (60, T)
  # The summed model drifts less from each expert in its head space (head-space CTI on shifted task inputs;
  # at lambda = 1 the drift is the other experts' interference alone).
  ta = jm.get_method("task_arithmetic")(scale=1.0)
  task_x = [jax.random.normal(jax.random.fold_in(jax.random.key(5), t), (64, DIN)) + 0.5 for t in range(T)]
  before = cross_task_interference(forward, jm.merge(ta, pre, fts), fts, task_x, heads)
  after = cross_task_interference(forward, jm.merge(ta, pre, adapted), fts, task_x, heads)
  assert after["head_mean"] < 0.75 * before["head_mean"]


def test_deterministic_and_loop_modes_agree():
  pre, fts, heads = interfering()
  a1, h1 = run(pre, fts, heads, steps=15)
  a2, h2 = run(pre, fts, heads, steps=15)
  np.testing.assert_array_equal(h1["loss"], h2["loss"])
  for x, y in zip(jax.tree.leaves(a1), jax.tree.leaves(a2)):
    np.testing.assert_array_equal(x, y)
  a3, h3 = run(pre, fts, heads, steps=15, task_loop="map")  # one expert at a time: same result
  np.testing.assert_allclose(h3["loss"], h1["loss"], rtol=1e-4)
  assert_trees_close(a3, a1, atol=1e-4)


def test_bf16_storage_stacked_input_and_mse():
  pre, fts, heads = interfering(jnp.bfloat16)
  stacked = jm.tree.stack(fts)
  adapted, hist = run(pre, stacked, heads, steps=30, preserve="mse")
  assert jax.tree.structure(adapted) == jax.tree.structure(stacked)
  assert all(x.dtype == jnp.bfloat16 and x.shape[0] == T for x in jax.tree.leaves(adapted))
  assert hist["loss"][-1] < 0.3 * hist["loss"][0]


def test_joint_mode_decreases_the_merged_models_loss():
  pre, fts, heads = interfering()
  adapted, hist = run(pre, fts, heads, steps=30, mode="joint", merge_scale=0.5)
  assert hist["loss"][-1] < 0.5 * hist["loss"][0]
  assert "disentangle" not in hist and hist["preserve_tasks"].shape == (30, T)
  assert isinstance(adapted, list) and len(adapted) == T


def test_registry_and_bad_input():
  info = jm.method_info("ri")
  assert info.family == "adaptation" and info.data == "aux"
  cfg = jm.get_method("ri")(beta=2.0)
  assert cfg.beta == 2.0 and cfg.mode == "independent" and cfg.run_kwargs()["preserve"] == "kl"
  assert jm.get_method("ri")().beta is None  # default: auto_beta(heads)
  from jaxmerge.ri import auto_beta

  # Mean over tasks of the mean squared row norm: (25 + (1 + 0) / 2) / 2 (CLIP heads: logit_scale ** 2).
  assert auto_beta([np.array([[3.0, 4.0]]), np.array([[1.0, 0.0], [0.0, 0.0]])]) == 12.75
  with pytest.raises(ValueError, match="mode"):
    jm.get_method("ri")(mode="both")
  pre, fts, heads = interfering()
  with pytest.raises(ValueError, match="heads"):
    run(pre, fts, heads[:2], steps=1)
  with pytest.raises(ValueError, match="preserve"):
    run(pre, fts, heads, steps=1, preserve="l1")
  # Joint mode's loss has no preserve term: a beta there would be ignored, so it is refused.
  with pytest.raises(ValueError, match="beta=4.0 has no effect in joint mode"):
    jm.get_method("ri")(mode="joint", beta=4.0)
  with pytest.raises(ValueError, match="joint mode"):
    run(pre, fts, heads, steps=1, mode="joint", beta=4.0)
  assert jm.get_method("ri")(mode="joint").beta is None


def test_cti_hand_checked():
  w = jax.random.normal(jax.random.key(6), (4, 5))
  lin = lambda p, x: x @ p["w"].T  # noqa: E731
  expert, merged = {"w": w}, {"w": 1.1 * w}
  x = jax.random.normal(jax.random.key(7), (8, 5))
  head = jax.random.normal(jax.random.key(8), (3, 4))
  out = cross_task_interference(lin, merged, [expert, expert], [x, [x[:4], x[4:]]], [head, head])
  np.testing.assert_allclose(out["feature"], [0.01, 0.01], rtol=1e-4)
  expected = np.mean(np.linalg.norm(0.1 * np.asarray(lin(expert, x) @ head.T), axis=-1))
  np.testing.assert_allclose(out["head"], [expected, expected], rtol=1e-4)
  same = cross_task_interference(lin, expert, [expert], [x])
  assert same["feature_mean"] == 0.0 and same["head"] is None


class _FakeSuite:
  """The runner's suite interface over the tiny MLP: 3 tasks whose labels are the experts' own predictions."""

  name = "fake"
  tasks = ("a", "b", "c")
  layout = staticmethod(jm.filters.hf_layout)
  timings = {}

  def __init__(self):
    self.pretrained, self.experts, heads = interfering()
    self.heads = dict(zip(self.tasks, heads))
    self.x = {t: jax.random.normal(jax.random.fold_in(jax.random.key(10), i), (32, DIN))
              for i, t in enumerate(self.tasks)}
    self.y = {t: np.asarray(jnp.argmax(forward(e, self.x[t]) @ self.heads[t].T, -1))
              for t, e in zip(self.tasks, self.experts)}

  embed = staticmethod(forward)

  def evaluate(self, params, tasks=None, split="test"):
    return {t: float(np.mean(np.asarray(jnp.argmax(forward(params, self.x[t]) @ self.heads[t].T, -1)) == self.y[t]))
            for t in (tasks or self.tasks)}

  def aux(self, source, n=1024):
    return np.asarray(jax.random.normal(jax.random.key(11), (n, DIN)))

  def unlabeled(self, task, split="test"):
    return np.asarray(self.x[task])

  def batches(self, task, split="train", batch_size=16, *, seed=0, labels=False, repeat=True):
    while True:
      yield np.asarray(self.x[task][:batch_size])


def test_bench_plugins_through_the_runner(monkeypatch):
  from jaxmerge.bench import ri_runner, runner

  monkeypatch.setattr(ri_runner, "TTA_STEPS", 5)
  monkeypatch.setitem(ri_runner.RI_DEFAULTS, "steps", 10)
  monkeypatch.setitem(ri_runner.RI_DEFAULTS, "learning_rate", 1e-2)
  suite = _FakeSuite()
  res = runner.run_suite(suite, ["task_arithmetic", "adamerging", "ri"], adapters=("ri",), progress=False,
                         strict=True)
  rows = {r["method"]: r for r in res["rows"]}
  assert {"task_arithmetic", "adamerging", "ri", "ri+task_arithmetic"} <= set(rows)
  assert rows["experts"]["average"] == 1.0 and not res["skipped"]
  # The "ri" method row is RI followed by default task arithmetic: the same model as the adapter row.
  assert rows["ri"]["accuracy"] == rows["ri+task_arithmetic"]["accuracy"]
  # CTI: the plain row against the original experts only, the RI row against both, each with its own drop.
  tasks = list(suite.tasks)
  plain, ri_row = rows["task_arithmetic"], rows["ri+task_arithmetic"]
  assert "cti_vs_adapted_experts" not in plain and "cti_vs_original_experts" not in rows["adamerging"]
  merged = jm.merge(jm.get_method("task_arithmetic")(), suite.pretrained, suite.experts)
  ref = cross_task_interference(forward, merged, suite.experts, [suite.x[t] for t in tasks], list(suite.heads.values()))
  np.testing.assert_allclose(plain["cti_vs_original_experts"]["feature"], ref["feature"], rtol=1e-6)
  np.testing.assert_allclose(plain["cti_vs_original_experts"]["head"], ref["head"], rtol=1e-6)
  np.testing.assert_allclose(plain["cti_vs_original_experts"]["accuracy_drop"],
                             [1.0 - plain["accuracy"][t] for t in tasks], atol=1e-12)
  adapted_acc = res["adapted_experts"]["ri"]
  a, o = ri_row["cti_vs_adapted_experts"], ri_row["cti_vs_original_experts"]
  assert a["reference"] == "adapted experts" and o["reference"] == "original experts"
  np.testing.assert_allclose(a["accuracy_drop"], [adapted_acc[t] - ri_row["accuracy"][t] for t in tasks], atol=1e-12)
  assert not np.allclose(a["feature"], o["feature"])  # RI moved the experts: the two references differ
  assert set(a["spearman_with_accuracy_drop"]) == {"feature", "head"}
  from jaxmerge.bench import report

  md = report._markdown(res)
  assert "CTI vs original experts" in md and "CTI vs adapted experts" in md and "Adapted experts (`ri`)" in md


def test_clear_errors_for_zero_tasks_empty_aux_and_mismatched_heads():
  pre, fts, heads = interfering()
  with pytest.raises(ValueError, match="0 tasks"):
    run(pre, [], [], steps=1)
  with pytest.raises(ValueError, match="auxiliary source is empty"):
    disentangle(pre, fts, heads, [], forward_fn=forward, steps=5, key=jax.random.key(0), progress=False)
  with pytest.raises(ValueError, match="empty batch"):
    disentangle(pre, fts, heads, [np.zeros((0, DIN), np.float32)], forward_fn=forward, steps=5,
                key=jax.random.key(0), progress=False)
  wide = [jnp.zeros((c, D + 1)) for c in CLASSES]  # heads over another feature size
  with pytest.raises(ValueError, match=r"heads are \[C, 10\]"):
    run(pre, fts, wide, steps=1)
  from jaxmerge.bench.ri_runner import aux_batches

  with pytest.raises(ValueError, match="fewer than one batch"):
    next(aux_batches(np.zeros((0, DIN), np.float32), 4))


def test_shift_images_is_deterministic_label_free_and_validated():
  from jaxmerge.data import synthetic

  rng = np.random.default_rng(0)
  imgs = rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
  for kind in synthetic.SHIFTS:
    a = synthetic.shift_images(imgs, kind, seed=1)
    assert a.dtype == np.uint8 and a.shape == imgs.shape
    np.testing.assert_array_equal(a, synthetic.shift_images(imgs, kind, seed=1))
    assert np.mean(np.abs(a.astype(int) - imgs)) > 2  # the shift is visible
    np.testing.assert_array_equal(synthetic.shift_images(imgs, kind, severity=0.0), imgs)
  # Hand-checked cases: a constant image is a fixed point of blur and contrast; contrast halves deviations.
  flat = np.full((1, 4, 4, 3), 100, np.uint8)
  np.testing.assert_array_equal(synthetic.shift_images(flat, "blur"), flat)
  two = np.array([[[[0] * 3, [200] * 3]]], np.uint8)  # mean 100: contrast 0.5 maps 0 -> 50, 200 -> 150
  np.testing.assert_array_equal(synthetic.shift_images(two, "contrast")[0, 0, :, 0], [50, 150])
  assert not np.array_equal(synthetic.shift_images(imgs, "noise", seed=1), synthetic.shift_images(imgs, "noise", seed=2))
  with pytest.raises(ValueError, match="unknown shift"):
    synthetic.shift_images(imgs, "fog")
  with pytest.raises(ValueError, match="uint8"):
    synthetic.shift_images(imgs.astype(np.float32), "blur")


def test_jaxmerge_bench_ri_command(monkeypatch, tmp_path):
  """``jaxmerge bench --ri`` end to end (argument parsing, plug-in loading, RI, merge, reports) on the fake suite."""
  from jaxmerge import cli
  from jaxmerge.bench import command, ri_runner

  monkeypatch.setenv("JAXMERGE_NO_XLA_CACHE", "1")
  monkeypatch.setitem(ri_runner.RI_DEFAULTS, "steps", 10)
  monkeypatch.setitem(ri_runner.RI_DEFAULTS, "learning_rate", 1e-2)
  monkeypatch.setattr(command, "build_suite", lambda *a, **k: _FakeSuite())
  out = tmp_path / "res"
  rc = cli.main(["bench", "--ri", "--methods", "task_arithmetic", "--out", str(out), "--no-plots", "--no-progress"])
  assert rc == 0
  import json

  res = json.loads((out / "results.json").read_text())
  rows = {r["method"]: r for r in res["rows"]}
  assert {"task_arithmetic", "ri+task_arithmetic"} <= set(rows) and not res["skipped"]
  assert rows["ri+task_arithmetic"]["adapt_seconds"] > 0
  assert "ri+task_arithmetic" in (out / "results.md").read_text()
