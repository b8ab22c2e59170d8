"""Resolving Interference against its specification: the losses against a float64 NumPy evaluation of the
formulas (independent and joint modes) at fixed parameters, the registry entry after ``import jaxmerge`` alone,
one set of defaults, and cross-task interference against the original and the adapted experts."""

import inspect
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxmerge as jm
from jaxmerge import tree as jtree
from jaxmerge.interference import cross_task_interference, cti_report, spearman
from jaxmerge.ri import auto_beta, disentangle
from jaxmerge.tta.methods import RIConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]
T, DIN, HID, D, B = 3, 5, 7, 6, 8
CLASSES = (3, 4, 2)  # different class counts: the heads are padded, the padded classes must not count


# ---- a tiny encoder, its float64 twin, and fixed parameters ----------------------------------------------------


def forward(params, x):
  h = jnp.tanh(x @ params["l1"]["w"].T + params["l1"]["b"][None])
  return h @ params["l2"]["w"].T


def forward64(params, x):
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  h = np.tanh(np.asarray(x, np.float64) @ p["l1"]["w"].T + p["l1"]["b"][None])
  return h @ p["l2"]["w"].T


def models():
  rng = np.random.default_rng(0)
  pre = {"l1": {"w": rng.normal(size=(HID, DIN)) / np.sqrt(DIN), "b": 0.1 * rng.normal(size=HID)},
         "l2": {"w": rng.normal(size=(D, HID)) / np.sqrt(HID)}}
  pre = jax.tree.map(lambda a: np.asarray(a, np.float32), pre)
  fts = [jax.tree.map(lambda a: (a + 0.4 * rng.normal(size=a.shape) / np.sqrt(a.shape[-1])).astype(np.float32), pre)
         for _ in range(T)]
  heads = [(3.0 * rng.normal(size=(c, D))).astype(np.float32) for c in CLASSES]
  batches = [rng.normal(size=(B, DIN)).astype(np.float32) for _ in range(2)]
  # The step-1 parameters: tau'_i = tau_i + P_i (P: a fixed perturbation per task and leaf).
  perturb = {p: (0.3 * rng.normal(size=(T,) + x.shape) / np.sqrt(x.shape[-1])).astype(np.float32)
             for p, x in jtree.flatten_paths(pre).items()}
  return pre, fts, heads, batches, perturb


def fixed_steps(perturb):
  """An optax "optimizer" that ignores the gradient and adds ``perturb`` at every step, so that the history
  holds the loss at ``tau`` (entry 0) and at ``tau + perturb`` (entry 1)."""

  def update(grads, state, params=None):
    del params
    return {p: jnp.asarray(perturb[p]) for p in grads}, state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def perturbed(pre, fts, perturb, k):
  """The experts' parameters ``theta_0 + tau_i + k P_i`` as float64 trees."""
  flat_ft = [jtree.flatten_paths(f) for f in fts]
  return [jtree.unflatten_paths(pre, {p: np.asarray(flat_ft[i][p], np.float64) + k * np.float64(perturb[p][i])
                                      for p in perturb}) for i in range(T)]


def log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def divergence(target, model, preserve, temperature):
  """RI.md's ``D`` per example: ``KL(softmax(target / T) || softmax(model / T))`` (the expert is the teacher) or
  the mean squared logit difference."""
  if preserve == "kl":
    lp, lq = log_softmax(target / temperature), log_softmax(model / temperature)
    return np.sum(np.exp(lp) * (lp - lq), -1)
  return np.mean(np.square(model - target), -1)


def independent_reference(pre, experts, adapted, heads, x, beta, preserve, temperature):
  """RI.md's ``L_i`` for every expert: ``1/(T-1) sum_{j != i} E_x ||h_j(z(x; theta'_i)) - h_j(z(x; theta_0))||^2
  + beta E_x D(h_i(z(x; theta_i)), h_i(z(x; theta'_i)))``."""
  w = [np.asarray(h, np.float64) for h in heads]
  z0 = forward64(pre, x)
  dis, pres = np.zeros(T), np.zeros(T)
  for i in range(T):
    z, zi = forward64(adapted[i], x), forward64(experts[i], x)
    dis[i] = sum(np.mean(np.sum(np.square((z - z0) @ w[j].T), -1)) for j in range(T) if j != i) / (T - 1)
    pres[i] = np.mean(divergence(zi @ w[i].T, z @ w[i].T, preserve, temperature))
  return dis, pres


def joint_reference(pre, experts, adapted, heads, x, scale, preserve, temperature):
  """RI.md's joint loss terms ``E_x D(h_i(z(x; theta_i)), h_i(z(x; theta_0 + scale sum_j tau'_j)))`` per task."""
  merged = jax.tree.map(lambda p, *a: np.asarray(p, np.float64) + scale * sum(np.asarray(t, np.float64) - p for t in a),
                        pre, *adapted)
  zm = forward64(merged, x)
  return np.array([np.mean(divergence(forward64(experts[i], x) @ np.asarray(heads[i], np.float64).T,
                                      zm @ np.asarray(heads[i], np.float64).T, preserve, temperature))
                   for i in range(T)])


# ---- acceptance 5: the losses against the formulas --------------------------------------------------------------


@pytest.mark.parametrize("preserve,temperature,task_loop", [("kl", 2.0, "vmap"), ("mse", 1.0, "map")])
def test_independent_losses_match_the_formula(preserve, temperature, task_loop):
  pre, fts, heads, batches, perturb = models()
  adapted, hist = disentangle(pre, fts, heads, batches, forward_fn=forward, steps=2, optimizer=fixed_steps(perturb),
                              preserve=preserve, temperature=temperature, task_loop=task_loop,
                              key=jax.random.key(0), progress=False)  # beta: the default, auto_beta(heads)
  beta = np.mean([np.mean(np.sum(np.square(np.asarray(h, np.float64)), -1)) for h in heads])
  assert auto_beta(heads) == pytest.approx(beta, rel=1e-12)
  for k in range(2):  # entry k: the loss at tau' = tau + k P, on batch k
    dis, pres = independent_reference(pre, fts, perturbed(pre, fts, perturb, k), heads, batches[k], beta, preserve,
                                      temperature)
    assert dis.min() > 1e-2 and (k == 0 or pres.min() > 1e-3)  # every term is exercised
    np.testing.assert_allclose(hist["disentangle_tasks"][k], dis, rtol=2e-5)
    np.testing.assert_allclose(hist["preserve_tasks"][k], pres, rtol=2e-5, atol=1e-9)
    np.testing.assert_allclose(hist["loss"][k], np.sum(dis + beta * pres), rtol=2e-5)
    np.testing.assert_allclose(hist["disentangle"][k], dis.mean(), rtol=2e-5)
  assert np.all(hist["preserve_tasks"][0] == 0)  # tau' = tau: the expert's own function is intact
  # The returned experts are theta_0 + tau + 2 P.
  for a, e in zip(adapted, perturbed(pre, fts, perturb, 2)):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(e)):
      np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_independent_loss_with_a_given_beta_and_the_kl_direction():
  """beta given explicitly; the KL is the expert's distribution against the adapted one (not the reverse)."""
  pre, fts, heads, batches, perturb = models()
  _, hist = disentangle(pre, fts, heads, batches, forward_fn=forward, steps=2, optimizer=fixed_steps(perturb),
                        beta=3.5, temperature=0.7, key=jax.random.key(0), progress=False)
  adapted = perturbed(pre, fts, perturb, 1)
  dis, pres = independent_reference(pre, fts, adapted, heads, batches[1], 3.5, "kl", 0.7)
  np.testing.assert_allclose(hist["loss"][1], np.sum(dis + 3.5 * pres), rtol=2e-5)
  w = [np.asarray(h, np.float64) for h in heads]
  reverse = [np.mean(divergence(forward64(adapted[i], batches[1]) @ w[i].T, forward64(fts[i], batches[1]) @ w[i].T,
                                "kl", 0.7)) for i in range(T)]
  assert np.max(np.abs(np.array(reverse) - pres) / pres) > 1e-2  # the test tells the two directions apart
  np.testing.assert_allclose(hist["preserve_tasks"][1], pres, rtol=2e-5)


@pytest.mark.parametrize("preserve,temperature", [("kl", 1.5), ("mse", 1.0)])
def test_joint_loss_matches_the_formula(preserve, temperature):
  pre, fts, heads, batches, perturb = models()
  _, hist = disentangle(pre, fts, heads, batches, forward_fn=forward, steps=2, optimizer=fixed_steps(perturb),
                        mode="joint", merge_scale=0.4, preserve=preserve, temperature=temperature,
                        key=jax.random.key(0), progress=False)
  assert "disentangle" not in hist
  for k in range(2):
    pres = joint_reference(pre, fts, perturbed(pre, fts, perturb, k), heads, batches[k], 0.4, preserve, temperature)
    assert pres.min() > 1e-3
    np.testing.assert_allclose(hist["preserve_tasks"][k], pres, rtol=2e-5)
    np.testing.assert_allclose(hist["loss"][k], pres.sum(), rtol=2e-5)


# ---- acceptance 1: the registry after `import jaxmerge` alone ------------------------------------------------------


def _python(code: str) -> str:
  env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
  assert out.returncode == 0, out.stderr
  return out.stdout


def test_ri_is_registered_by_import_jaxmerge_alone():
  """A fresh interpreter that imports only ``jaxmerge`` (other tests' imports cannot mask a missing entry)."""
  out = json.loads(_python(
      "import json, sys\n"
      "import jaxmerge as jm\n"
      "i = jm.method_info('ri')\n"
      "print(json.dumps({'listed': 'ri' in jm.list_methods(), 'family': i.family, 'data': i.data,\n"
      "  'hparams': i.hparams, 'config': jm.get_method('ri')(steps=3)._asdict(),\n"
      "  'heavy': sorted(m for m in ('jaxmerge.ri', 'optax', 'jaxmerge.bench') if m in sys.modules)}))"))
  assert out["listed"] and out["family"] == "adaptation" and out["data"] == "aux"
  assert out["hparams"] == RIConfig()._asdict()
  assert out["config"] == {**RIConfig()._asdict(), "steps": 3}
  assert out["heavy"] == []  # the entry does not import RI's training code, optax or the benchmark


def test_jaxmerge_methods_lists_ri():
  table = _python("from jaxmerge.commands.methods import table\nprint(table())")
  line = next(ln for ln in table.splitlines() if ln.startswith("| `ri` |"))
  assert "| adaptation | aux |" in line and "learning_rate=" in line and "num_aux=" in line
  data = json.loads(_python("import sys\nfrom jaxmerge import cli\n"
                            "sys.exit(cli.main(['methods', '--format', 'json']))"))
  assert data["ri"]["family"] == "adaptation" and data["ri"]["data"] == "aux"


def test_registry_entry_validates():
  with pytest.raises(ValueError, match="mode"):
    jm.get_method("ri")(mode="both")
  with pytest.raises(ValueError, match="batch_size"):
    jm.get_method("ri")(batch_size=0)
  with pytest.raises(ValueError, match="steps"):
    jm.get_method("ri")(steps=-1)
  cfg = jm.get_method("ri")(num_aux=64)
  assert "num_aux" not in cfg.run_kwargs() and set(cfg.run_kwargs()) <= set(inspect.signature(disentangle).parameters)


# ---- acceptance 2: one set of defaults ---------------------------------------------------------------------------


def _load_experiment(name):
  import importlib.util

  spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_every_ri_entry_point_reads_the_library_defaults():
  lib = RIConfig()._asdict()
  sig = {k: p.default for k, p in inspect.signature(disentangle).parameters.items()}
  assert {k: sig[k] for k in RIConfig().run_kwargs()} == RIConfig().run_kwargs()
  assert jm.method_info("ri").hparams == lib
  from jaxmerge.bench import ri_runner

  assert {k: ri_runner.RI_DEFAULTS[k] for k in lib} == lib
  assert set(ri_runner.RI_DEFAULTS) - set(lib) == {"aux_source", "seed"}  # the benchmark's data choices only
  clip = _load_experiment("ri_clip")  # the real CLIP suites: one expert at a time (same result, less memory)
  assert {k: clip.RI_CLIP_DEFAULTS[k] for k in lib if k != "task_loop"} == {k: v for k, v in lib.items()
                                                                             if k != "task_loop"}
  nb = json.loads((ROOT / "colabs" / "04_resolving_interference.ipynb").read_text())
  code = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
  for literal in ("1e-4", "1e-5", "beta=100", "steps=100", "steps=200"):  # no RI setting is written out
    assert literal not in code


# ---- acceptance 4: CTI against the original and the adapted experts --------------------------------------------


def test_spearman_matches_scipy_and_hand_checked_cases():
  scipy_stats = pytest.importorskip("scipy.stats")
  rng = np.random.default_rng(3)
  for n in (3, 8, 20):
    x, y = rng.normal(size=n), rng.normal(size=n)
    x[: n // 3] = x[0]  # ties
    assert spearman(x, y) == pytest.approx(scipy_stats.spearmanr(x, y)[0], abs=1e-12)
  assert spearman([1, 2, 3], [2, 3, 1]) == pytest.approx(-0.5)  # centred ranks (-1, 0, 1), (0, 1, -1): -1 / 2
  assert spearman([1, 2, 3], [10, 20, 30]) == 1.0 and spearman([3, 2, 1], [1, 5, 9]) == -1.0
  assert np.isnan(spearman([1, 1, 1], [1, 2, 3])) and np.isnan(spearman([1], [2]))
  with pytest.raises(ValueError, match="equal length"):
    spearman([1, 2], [1, 2, 3])


def test_cti_report_against_original_and_adapted_experts_hand_checked():
  """A linear encoder ``z = W x``: expert i = a_i W, adapted expert i = b_i W, merged = W, so feature CTI against
  expert i is ``((1 - a_i) / a_i)^2`` exactly, and the head-space CTI is ``|1 - a_i| E||H_i W x||``."""
  lin = lambda p, x: x @ p["w"].T  # noqa: E731
  rng = np.random.default_rng(4)
  w = rng.normal(size=(4, 5))
  a, b = np.array([1.1, 1.3, 1.05]), np.array([1.02, 1.2, 1.3])
  merged = {"w": jnp.asarray(w, jnp.float32)}
  orig = [{"w": jnp.asarray(s * w, jnp.float32)} for s in a]
  adapted = [{"w": jnp.asarray(s * w, jnp.float32)} for s in b]
  xs = [rng.normal(size=(6, 5)).astype(np.float32) for _ in range(3)]
  heads = [rng.normal(size=(c, 4)).astype(np.float32) for c in (2, 3, 2)]
  merged_acc = {"t0": 0.80, "t1": 0.60, "t2": 0.85}
  orig_acc = {"t0": 0.85, "t1": 0.80, "t2": 0.86}  # drops 0.05, 0.20, 0.01: the ranks of the original CTI
  adapted_acc = [0.99, 0.70, 0.86]  # drops 0.19, 0.10, 0.01: the reverse of the adapted CTI's ranks (1, 2, 3)
  out = cti_report(lin, merged, orig, xs, heads, adapted_experts=adapted, merged_accuracy=merged_acc,
                   original_accuracy=orig_acc, adapted_accuracy=adapted_acc)
  vo, va = out["cti_vs_original_experts"], out["cti_vs_adapted_experts"]
  assert vo["reference"] == "original experts" and va["reference"] == "adapted experts"
  np.testing.assert_allclose(vo["feature"], ((1 - a) / a) ** 2, rtol=1e-4)
  np.testing.assert_allclose(va["feature"], ((1 - b) / b) ** 2, rtol=1e-4)
  head_o = [abs(1 - a[i]) * np.mean(np.linalg.norm(xs[i] @ w.T @ heads[i].T, axis=-1)) for i in range(3)]
  head_a = [abs(1 - b[i]) * np.mean(np.linalg.norm(xs[i] @ w.T @ heads[i].T, axis=-1)) for i in range(3)]
  np.testing.assert_allclose(vo["head"], head_o, rtol=1e-4)
  np.testing.assert_allclose(va["head"], head_a, rtol=1e-4)
  assert vo["feature_mean"] == pytest.approx(np.mean(vo["feature"]))
  np.testing.assert_allclose(vo["accuracy_drop"], [0.05, 0.20, 0.01], atol=1e-12)
  np.testing.assert_allclose(va["accuracy_drop"], [0.19, 0.10, 0.01], atol=1e-12)
  assert vo["spearman_with_accuracy_drop"]["feature"] == pytest.approx(1.0)  # ranks (2, 3, 1) and (2, 3, 1)
  assert va["spearman_with_accuracy_drop"]["feature"] == pytest.approx(-1.0)  # ranks (1, 2, 3) and (3, 2, 1)
  assert va["spearman_with_accuracy_drop_vs_original_experts"]["feature"] == pytest.approx(-0.5)
  # Against the original experts only, without accuracies: no drop, no correlation.
  only = cti_report(lin, merged, orig, xs)
  assert set(only) == {"cti_vs_original_experts"} and "accuracy_drop" not in only["cti_vs_original_experts"]
  assert only["cti_vs_original_experts"]["head"] is None
  with pytest.raises(ValueError, match="adapted experts"):
    cti_report(lin, merged, orig, xs, adapted_experts=adapted[:2])
  with pytest.raises(ValueError, match="original_accuracy has 2"):
    cti_report(lin, merged, orig, xs, merged_accuracy=merged_acc, original_accuracy=[0.1, 0.2])


def test_cti_report_matches_cross_task_interference():
  lin = lambda p, x: jnp.tanh(x @ p["w"].T)  # noqa: E731
  rng = np.random.default_rng(5)
  ps = [{"w": jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)} for _ in range(7)]
  xs = [rng.normal(size=(9, 5)).astype(np.float32) for _ in range(3)]
  heads = [rng.normal(size=(3, 4)).astype(np.float32) for _ in range(3)]
  out = cti_report(lin, ps[0], ps[1:4], xs, heads, adapted_experts=ps[4:7])
  for key, experts in (("cti_vs_original_experts", ps[1:4]), ("cti_vs_adapted_experts", ps[4:7])):
    ref = cross_task_interference(lin, ps[0], experts, xs, heads)
    np.testing.assert_array_equal(out[key]["feature"], ref["feature"])
    np.testing.assert_array_equal(out[key]["head"], ref["head"])
