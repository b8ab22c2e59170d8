"""Validation-driven merges (Fisher, RegMean), Gram capture, the data-method registry and its errors.

Closed forms on a linear softmax classifier ``logits = W x`` (``p = softmax(W x)``):
exact Fisher per example ``F[i, j] = p_i (1 - p_i) x_j^2``; the reference estimator on a batch of one
``F[i, j] = (sqrt(p_i) - p_i sum_c sqrt(p_c))^2 x_j^2``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmerge as jm
from jaxmerge.bench import runner
from jaxmerge.tta import api, capture
from jaxmerge.tta import validation as V

C, DIN, T = 4, 5, 3


def linear_forward(params, x):
  return x @ params["w"].T


def softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


@pytest.fixture(scope="module")
def problem():
  rng = np.random.default_rng(0)
  pre = {"w": rng.normal(size=(C, DIN)).astype(np.float32), "b": np.zeros(C, np.float32),
         "step": np.array(3, np.int32)}
  fts = [{"w": pre["w"] + 0.5 * rng.normal(size=(C, DIN)).astype(np.float32),
          "b": rng.normal(size=C).astype(np.float32), "step": np.array(3, np.int32)} for _ in range(T)]
  xs = [rng.normal(size=(6, DIN)).astype(np.float32) for _ in range(T)]
  return pre, fts, xs


def test_fisher_estimators_match_closed_forms(problem):
  pre, fts, xs = problem
  head = jnp.eye(C)
  w, x = fts[0]["w"], xs[0]
  p = softmax(x @ w.T)  # [N, C]
  exact = np.einsum("nc,nj->cj", p * (1 - p), x**2)
  s = np.sqrt(p).sum(-1, keepdims=True)
  ref = np.einsum("nc,nj->cj", (np.sqrt(p) - p * s) ** 2, x**2)
  for est, want in (("exact", exact), ("reference", ref)):
    f, n = V.fisher_information(linear_forward, fts[0], head, [x[i:i + 1] for i in range(len(x))], estimator=est)
    assert n == len(x)
    np.testing.assert_allclose(f["w"], want, rtol=1e-4, atol=1e-7)
    np.testing.assert_array_equal(f["b"], 0.0)  # unused by the forward


def test_fisher_merge_matches_numpy_formula_and_sanity(problem):
  pre, fts, xs = problem
  heads = [jnp.eye(C)] * T
  out = V.fisher(pre, fts, linear_forward, heads, xs, batch_size=2, estimator="exact", normalize=True)
  fs = []
  for t in range(T):
    p = softmax(xs[t] @ fts[t]["w"].T)
    fs.append(np.einsum("nc,nj->cj", p * (1 - p), xs[t] ** 2) / len(xs[t]))
  inv = np.array([1.0 / (np.linalg.norm(f) + 1e-6) for f in fs])  # "b" has zero Fisher
  coef = inv / inv.sum() / T
  num = sum(c * (f + 1e-6) * m["w"] for c, f, m in zip(coef, fs, fts))
  den = sum(c * (f + 1e-6) for c, f in zip(coef, fs))
  np.testing.assert_allclose(out["w"], num / den, rtol=1e-4)
  # zero Fisher everywhere -> the model-weighted average (the epsilon cancels); non-float leaves are kept.
  np.testing.assert_allclose(out["b"], sum(c * m["b"] for c, m in zip(coef, fts)) / coef.sum(), rtol=1e-5, atol=1e-6)
  assert int(out["step"]) == 3
  one = V.fisher(pre, fts[:1], linear_forward, heads[:1], xs[:1])
  np.testing.assert_allclose(one["w"], fts[0]["w"], rtol=1e-6)
  excl = V.fisher(pre, fts, linear_forward, heads, xs, exclude=("b",))
  np.testing.assert_array_equal(excl["b"], pre["b"])


def mlp_forward(params, x):
  h = jnp.tanh(x @ params["l1"]["kernel"] + params["l1"]["bias"][None, None])  # Flax (in, out)
  return h @ params["l2"]["w"].T  # PyTorch (out, in)


def test_linear_grams_and_regmean_closed_form():
  rng = np.random.default_rng(1)

  def model(s):
    return {"l1": {"kernel": rng.normal(size=(DIN, 7)).astype(np.float32) * s, "bias": rng.normal(size=7).astype(np.float32)},
            "l2": {"w": rng.normal(size=(3, 7)).astype(np.float32)}}

  pre = model(1.0)
  fts = [model(1.0) for _ in range(2)]
  xs = [rng.normal(size=(2, 4, DIN)).astype(np.float32) for _ in range(2)]  # token axis: every token is a row
  cap = capture.linear_grams(jax.jit(mlp_forward), fts[0], jnp.asarray(xs[0]))
  x0 = xs[0].reshape(-1, DIN)
  h0 = np.tanh(x0 @ fts[0]["l1"]["kernel"] + fts[0]["l1"]["bias"])
  assert cap.in_axis == {"l1/kernel": 0, "l2/w": 1} and cap.rows == {"l1/kernel": 8, "l2/w": 8}
  np.testing.assert_allclose(cap.grams["l1/kernel"], x0.T @ x0, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(cap.grams["l2/w"], h0.T @ h0, rtol=1e-5, atol=1e-5)

  alpha = 0.7
  out = V.regmean(pre, fts, mlp_forward, xs, alpha=alpha, batch_size=1)
  gs1, gs2 = [], []
  for m, x in zip(fts, xs):
    xf = x.reshape(-1, DIN)
    h = np.tanh(xf @ m["l1"]["kernel"] + m["l1"]["bias"])
    gs1.append(xf.T @ xf / len(xf))
    gs2.append(h.T @ h / len(h))
  shrink = lambda g: alpha * g + (1 - alpha) * np.diag(np.diag(g))  # noqa: E731
  w1 = np.linalg.solve(sum(shrink(g) for g in gs1), sum(shrink(g) @ m["l1"]["kernel"] for g, m in zip(gs1, fts)))
  w2 = sum(m["l2"]["w"] @ shrink(g) for g, m in zip(gs2, fts)) @ np.linalg.inv(sum(shrink(g) for g in gs2))
  np.testing.assert_allclose(out["l1"]["kernel"], w1, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(out["l2"]["w"], w2, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(out["l1"]["bias"], (fts[0]["l1"]["bias"] + fts[1]["l1"]["bias"]) / 2, rtol=1e-6)
  one = V.regmean(pre, fts[:1], mlp_forward, xs[:1])  # T = 1 -> the model itself
  np.testing.assert_allclose(one["l1"]["kernel"], fts[0]["l1"]["kernel"], rtol=1e-4, atol=1e-5)


def test_registry_knows_the_data_methods():
  for name, data in (("fisher", "val"), ("regmean", "val"), ("adamerging", "tta")):
    assert jm.method_info(name).data == data
  assert jm.get_method("regmean")().alpha == 0.95 and jm.get_method("fisher")().num_examples == 256
  assert "adamerging" in runner.resolve_methods(None, tta=True)
  assert "adamerging" not in runner.resolve_methods(None)
  with pytest.raises(ValueError, match="alpha"):
    jm.get_method("regmean")(alpha=1.5)
  with pytest.raises(ValueError, match="estimator"):
    jm.get_method("fisher")(estimator="empirical")


def test_run_method_errors_and_dispatch(problem):
  pre, fts, xs = problem
  heads = [jnp.eye(C)] * T
  with pytest.raises(ValueError, match="needs labeled validation data"):
    api.run_method("fisher", pre, fts, linear_forward, heads)
  with pytest.raises(ValueError, match="needs unlabeled test inputs"):
    api.run_method("adamerging", pre, fts, linear_forward, heads, None)
  with pytest.raises(ValueError, match="empty batch"):
    api.run_method("regmean", pre, fts, linear_forward, heads, [xs[0], xs[1][:0], xs[2]])
  bad = [(x, np.full(len(x), C, np.int32)) for x in xs]
  with pytest.raises(ValueError, match="head has 4 classes"):
    api.run_method("fisher", pre, fts, linear_forward, heads, bad)
  with pytest.raises(ValueError, match="2 task"):
    api.run_method("fisher", pre, fts, linear_forward, heads, xs[:2])
  with pytest.raises(ValueError, match="unknown hyperparameter"):
    api.run_method("fisher", pre, fts, linear_forward, heads, xs, alpha=0.5)
  good = [(x, np.arange(len(x)) % C) for x in xs]
  out = api.run_method("fisher", pre, fts, linear_forward, heads, good, num_examples=4, batch_size=2)
  np.testing.assert_allclose(out["w"], V.fisher(pre, fts, linear_forward, heads, [x[:4] for x in xs],
                                                 batch_size=2)["w"], rtol=1e-6)


def test_golden_section_and_grid_search():
  from jaxmerge.tta import search as S

  f = lambda s: -(s - 0.37) ** 2  # noqa: E731
  best, hist = S.golden_section(f, 0.0, 1.0, iters=14)
  assert abs(best - 0.37) < 3e-3 and len(hist) == 16
  best, hist = S.grid_search(lambda s: min(s, 0.4), [0.1, 0.4, 0.5, 0.6])  # ties: the first maximum
  assert best == 0.4 and [h[0] for h in hist] == [0.1, 0.4, 0.5, 0.6]
  with pytest.raises(ValueError, match="lo < hi"):
    S.golden_section(f, 1.0, 0.0)


def test_scale_search_is_the_method_at_the_best_scale(problem):
  pre, fts, xs = problem
  from jaxmerge.tta import search as S

  for name in ("task_arithmetic", "ties"):
    unit = jm.merge(jm.get_method(name)(scale=1.0), pre, fts)
    at = S.rescale(pre, unit)
    for s in (0.35,):
      np.testing.assert_allclose(at(s)["w"], jm.merge(jm.get_method(name)(scale=s), pre, fts)["w"], rtol=1e-5, atol=1e-6)
  # labels from each expert's own predictions on its task: the best scale is found by a brute-force loop too.
  heads = [jnp.eye(C)] * T
  data = [(x, np.asarray(jnp.argmax(linear_forward(m, x), -1))) for m, x in zip(fts, xs)]
  out, info = api.run_method("scale_search", pre, fts, linear_forward, heads, data, return_history=True)
  tau = sum(m["w"] - pre["w"] for m in fts)
  brute = [api.validation_accuracy(linear_forward, {"w": pre["w"] + s * tau}, heads, data)
           for s in jm.get_method("scale_search")().grid()]
  assert np.isclose(info["history"][:, 1].max(), max(brute)) and np.allclose(info["history"][:, 1], brute)
  assert api.validation_accuracy(linear_forward, out, heads, data) == max(brute)
  with pytest.raises(ValueError, match="needs labels"):
    api.run_method("scale_search", pre, fts, linear_forward, heads, xs)


def test_bench_plugin_dispatches_by_name_and_falls_back():
  from jaxmerge.bench import tta_runner  # imported (and registered) before the snapshot that is restored below

  calls = []
  saved = dict(runner._RUNNERS)
  try:
    runner.register_runner("val", lambda suite, m, hp, key: calls.append(m) or "previous")
    run = tta_runner._dispatch("val")
    assert run(None, "some_other_val_method", {}, None) == "previous" and calls == ["some_other_val_method"]
    assert set(tta_runner._RUNNERS_BY_NAME) >= {"fisher", "regmean", "scale_search", "adamerging"}
    assert "jaxmerge.bench.tta_runner" in runner.PLUGIN_MODULES["val"] + runner.PLUGIN_MODULES["tta"]
  finally:
    runner._RUNNERS.clear()
    runner._RUNNERS.update(saved)


def test_ugm_formula_and_limits(problem):
  pre, fts, xs = problem
  heads = [jnp.eye(C)] * T
  alphas = [0.2, 0.3, 0.5]
  fs = []
  for t in range(T):
    p = softmax(xs[t] @ fts[t]["w"].T)
    fs.append(np.einsum("nc,nj->cj", p * (1 - p), xs[t] ** 2) / len(xs[t]))
  delta = 0.7 * sum(f.sum() for f in fs) / (T * (fs[0].size + C))  # relative prior: 0.7 x mean entry (b's too)
  out = V.ugm(pre, fts, linear_forward, heads, xs, alphas=alphas, prior_precision=0.7, estimator="exact")
  num = sum(a * (delta + f) * (m["w"] - pre["w"]) for a, f, m in zip(alphas, fs, fts))
  np.testing.assert_allclose(out["w"], pre["w"] + num / (delta + sum(a * f for a, f in zip(alphas, fs))), rtol=1e-4)
  # "b" does not enter the forward (F = 0): task arithmetic with coefficients alpha_t.
  np.testing.assert_allclose(out["b"], sum(a * m["b"] for a, m in zip(alphas, fts)), rtol=1e-5, atol=1e-6)
  # delta = 0: Fisher averaging with model weights alpha_t.
  zero = V.ugm(pre, fts, linear_forward, heads, xs, alphas=alphas, prior_precision=0.0, estimator="exact")
  fa = V.fisher(pre, fts, linear_forward, heads, xs, estimator="exact", normalize=False, epsilon=0.0, weights=alphas)
  np.testing.assert_allclose(zero["w"], fa["w"], rtol=1e-4)
  assert jm.method_info("ugm").data == "val"
