"""experiments/ri_offline.py (the RI experiments on the offline suite) end to end on a tiny image suite."""

import importlib.util
import json
import pathlib
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmerge as jm

EXPERIMENTS = pathlib.Path(__file__).resolve().parents[1] / "experiments"
TASKS, CLASSES, HID, D, N = ("a", "b", "c"), (3, 4, 2), 12, 8, 64


def _driver():
  spec = importlib.util.spec_from_file_location("ri_offline_under_test", EXPERIMENTS / "ri_offline.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _forward(params, images):
  x = jnp.asarray(images, jnp.float32).reshape(images.shape[0], -1) / 255.0
  h = jnp.tanh(x @ params["l1"]["w"].T + params["l1"]["b"][None])
  return h @ params["l2"]["w"].T


class _ImageSuite:
  """The suite interface ri_offline.py reads, over a 2-layer MLP on 4x4 RGB uint8 images; the labels are the
  experts' own predictions, so each expert scores 1.0 on its task."""

  layout = staticmethod(jm.filters.hf_layout)
  tasks = TASKS

  def __init__(self, seed: int):
    self.config = types.SimpleNamespace(seed=seed, hash=f"fake{seed}")
    k = jax.random.split(jax.random.key(100 + seed), 4)
    din = 4 * 4 * 3
    self.pretrained = {"l1": {"w": jax.random.normal(k[0], (HID, din)) / np.sqrt(din), "b": jnp.zeros(HID)},
                       "l2": {"w": jax.random.normal(k[1], (D, HID)) / np.sqrt(HID)}}
    self.experts = [jax.tree.map(lambda p, i=i: p + 0.5 * jax.random.normal(jax.random.fold_in(k[2], i), p.shape)
                                 / np.sqrt(p.shape[-1]), self.pretrained) for i in range(len(TASKS))]
    self.heads = {t: np.asarray(jax.random.normal(jax.random.fold_in(k[3], i), (c, D)))
                  for i, (t, c) in enumerate(zip(TASKS, CLASSES))}
    rng = np.random.default_rng(seed)
    self.data = {}
    for i, t in enumerate(TASKS):
      images = rng.integers(0, 256, (N, 4, 4, 3), dtype=np.uint8)
      labels = np.asarray(jnp.argmax(_forward(self.experts[i], images) @ self.heads[t].T, -1))
      self.data[t] = types.SimpleNamespace(test=types.SimpleNamespace(images=images, labels=labels))

  embed = staticmethod(_forward)

  def _correct(self, params, images, labels, task_idx):
    return np.asarray(jnp.argmax(_forward(params, images) @ self.heads[TASKS[int(task_idx[0])]].T, -1)) == labels

  def evaluate(self, params, tasks=None, split="test"):
    return {t: float(self._correct(params, self.data[t].test.images, self.data[t].test.labels,
                                   np.full(N, TASKS.index(t))).mean()) for t in (tasks or TASKS)}

  def unlabeled(self, task, split="test"):
    return self.data[task].test.images

  def aux(self, source, n=1024):
    return jm.data.synthetic.make_aux(source, seed=self.config.seed, n=n)[:, :4, :4]


@pytest.fixture
def driver(monkeypatch, tmp_path):
  from jaxmerge.bench import ri_runner

  mod = _driver()
  monkeypatch.setenv("JAXMERGE_NO_XLA_CACHE", "1")
  monkeypatch.setattr(mod, "OUT", tmp_path / "out")
  monkeypatch.setattr(mod, "METHODS", ("task_arithmetic", "tsv_m"))
  monkeypatch.setattr(mod, "SENSITIVITY", {"beta": ("4x",)})
  monkeypatch.setattr(mod, "load_suite", lambda seed, cache: _ImageSuite(seed))
  for k, v in {"steps": 6, "learning_rate": 1e-2, "num_aux": 64, "batch_size": 16}.items():
    monkeypatch.setitem(ri_runner.RI_DEFAULTS, k, v)
  return mod


def test_driver_runs_every_study_and_matches_the_benchmark(driver, tmp_path):
  from jaxmerge.bench import ri_runner
  from jaxmerge.ri import auto_beta

  work = tmp_path / "work"
  driver.run([1], ["main", "sensitivity"], None, work)
  driver.run([2], ["main"], None, work, only=["baseline", "independent-fractal"])
  runs = driver.load_runs()
  assert set(runs) == {"baseline", "independent-fractal", "joint-fractal", "independent-fractal-beta=4x"}
  assert set(runs["independent-fractal"]) == {1, 2} and set(runs["joint-fractal"]) == {1}

  suite = _ImageSuite(1)
  # The independent fractal run is exactly what jaxmerge bench --ri computes for this suite seed.
  bench = ri_runner.ri_experts(suite, jax.random.fold_in(jax.random.key(1), 1))
  adapted, meta = driver.ri_adapted(suite, work, "independent", "fractal")
  for a, b in zip(jax.tree.leaves(adapted), jax.tree.leaves(bench)):
    np.testing.assert_allclose(a, np.asarray(b), rtol=0, atol=1e-6)
  assert meta["config"]["steps"] == 6 and meta["seconds"] > 0
  # ... and its recorded accuracy is the task arithmetic merge of those experts.
  merged = jm.merge(jm.get_method("task_arithmetic")(), suite.pretrained, bench, layout=suite.layout)
  assert runs["independent-fractal"][1]["methods"]["task_arithmetic"]["accuracy"] == suite.evaluate(merged)
  # The beta override is a multiple of auto_beta; joint mode ran in joint mode.
  cfg = runs["independent-fractal-beta=4x"][1]["ri"]["config"]
  assert cfg["beta"] == pytest.approx(4 * auto_beta([suite.heads[t] for t in TASKS]), rel=1e-6)
  assert runs["joint-fractal"][1]["ri"]["config"]["mode"] == "joint"
  # The scale curve passes through the default merge; the baseline checked linearity in the scale.
  for name in ("baseline", "independent-fractal"):
    m = runs[name][2]["methods"]["task_arithmetic"]
    assert m["curve"]["0.3"] == pytest.approx(m["accuracy"])
  assert runs["baseline"][2]["methods"]["tsv_m"]["linearity_relative_error"] < 1e-4
  assert runs["baseline"][1]["methods"]["tsv_m"]["merge_cost"]["first_call_seconds"] > 0

  driver.report()
  out = tmp_path / "out"
  summary = json.loads((out / "summary.json").read_text())
  g = summary["gain"]["independent-fractal"]["task_arithmetic"]
  want = [100 * (np.mean(list(runs["independent-fractal"][s]["methods"]["task_arithmetic"]["accuracy"].values()))
                 - np.mean(list(runs["baseline"][s]["methods"]["task_arithmetic"]["accuracy"].values())))
          for s in (1, 2)]
  assert g["seeds"] == [1, 2] and g["gain_mean"] == pytest.approx(np.mean(want))
  md = (out / "tables.md").read_text()
  assert "CTI vs original experts" in md and "CTI vs adapted experts" in md and "| beta | 4x |" in md
  assert (out / "scale_curves.png").exists() and (out / "cti_vs_drop.png").exists()
  assert len((out / "gains.csv").read_text().splitlines()) > 1
