"""Concrete subspace learning and AdaRank on the tiny MLP encoder of tests/test_tta.py: starting points,
gradients against finite differences, the entropy objective, determinism."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmerge as jm
from jaxmerge.tta import heads as H
from jaxmerge.tta import masks as M
from jaxmerge.tta.adamerging import entropy_loss
from tests.test_tta import T, forward, make_problem, repeat


@pytest.fixture(scope="module")
def problem():
  pre, fts, heads, x = make_problem()
  pre32, tau, passthrough = H.split_params(pre, fts)
  hs, mask = H.pad_heads(heads)
  frozen = {"pre": pre32, "deltas": tau, "passthrough": passthrough, "heads": hs, "mask": mask}
  ta = jm.merge(jm.get_method("task_arithmetic")(scale=0.3), pre, fts)
  return pre, fts, heads, x, frozen, ta


def _close(a, b, tol):
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(u, v, rtol=tol, atol=tol)


def test_concrete_starting_points(problem):
  pre, fts, heads, x, frozen, ta = problem
  merged, hist = M.concrete(pre, fts, forward, heads, [], steps=0, key=jax.random.key(0), progress=False)
  _close(merged, ta, 1e-6)  # logits 0: constant mask, tau * m / mean(m) = tau
  assert hist["loss"].shape == (0,)
  adapter = M.concrete_adapter(forward, pre)
  saturated = {p: jnp.full_like(v, 40.0) for p, v in frozen["pre"].items()}
  ta_adapter = jm.tta.adamerging_adapter(forward, pre, granularity="task", init_scale=0.3)
  ref = ta_adapter.apply(ta_adapter.init(None, frozen), frozen, x)[0]
  out = adapter.apply(saturated, frozen, x, key=jax.random.key(5))[0]  # sampled masks ~ 1 -> TA
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_concrete_gradient_matches_finite_differences(problem):
  pre, fts, heads, x, frozen, ta = problem
  adapter = M.concrete_adapter(forward, pre)
  k = jax.random.key(3)
  theta = jax.tree.map(lambda v: 0.3 * jax.random.normal(jax.random.key(1), v.shape), adapter.init(None, frozen))
  f = jax.jit(lambda th: entropy_loss(adapter.apply(th, frozen, x, key=k), x))
  g = jax.grad(f)(theta)
  for p, idx in (("l1/w", (2, 3)), ("l2/w", (1, 4)), ("l1/b", (5,))):
    fd = (f({**theta, p: theta[p].at[idx].add(1e-2)}) - f({**theta, p: theta[p].at[idx].add(-1e-2)})) / 2e-2
    np.testing.assert_allclose(g[p][idx], fd, rtol=5e-2, atol=2e-5)


def test_concrete_entropy_decreases_and_is_deterministic(problem):
  pre, fts, heads, x, frozen, ta = problem
  kw = dict(steps=25, key=jax.random.key(2), progress=False, optimizer=jm.tta.methods.adam(5e-2))
  m1, h1 = M.concrete(pre, fts, forward, heads, repeat(x, 25), **kw)
  m2, h2 = M.concrete(pre, fts, forward, heads, repeat(x, 25), **kw)
  assert np.mean(h1["loss"][-5:]) < np.mean(h1["loss"][:5])
  np.testing.assert_array_equal(h1["loss"], h2["loss"])
  _close(m1, m2, 0.0)
  m3, h3 = M.concrete(pre, fts, forward, heads, repeat(x, 10), base="adamerging", adamerging_steps=5,
                      **{**kw, "steps": 5})
  assert h3["adamerging_loss"].shape == (5,) and int(m3["count"]) == 7


def test_adarank_starting_point_gradients_and_objective(problem):
  pre, fts, heads, x, frozen, ta = problem
  merged, hist = M.adarank(pre, fts, forward, heads, [], steps=0, key=jax.random.key(0), progress=False)
  _close(merged, ta, 2e-5)  # every component kept, coefficients 0.3: task arithmetic
  assert hist["kept_fraction"] == 1.0
  fr = {**frozen, "factors": M.adarank_factors(frozen["deltas"])}
  assert set(fr["factors"]) == {"l1/w", "l2/w"}  # matrices only; the bias follows TA
  adapter, _ = M.adarank_adapter_and_merge(forward, pre)
  theta = adapter.init(None, fr)
  f = jax.jit(lambda th: entropy_loss(adapter.apply(th, fr, x), x))
  g = jax.grad(f)(theta)
  for p in ("l1/w", "l1/b"):
    for t in range(T):
      def shifted(eps, p=p, t=t):
        return f({**theta, "coef": {**theta["coef"], p: theta["coef"][p].at[t].add(eps)}})
      np.testing.assert_allclose(g["coef"][p][t], (shifted(1e-2) - shifted(-1e-2)) / 2e-2, rtol=2e-2, atol=1e-4)
  assert float(f(theta)) == float(f({**theta, "mask": jax.tree.map(lambda v: 5.0 * v, theta["mask"])}))  # binary
  # straight-through: d/dz of the loss is dL/dB * sigmoid'(z / temp) / temp, and the forward mask is binary.
  s = jax.nn.sigmoid(theta["mask"]["l2/w"] / 10.0)
  assert np.all(np.asarray(g["mask"]["l2/w"]) != 0)
  dense = jax.grad(lambda b: f({**theta, "mask": {**theta["mask"], "l2/w": 10.0 * jnp.log(b / (1 - b))}}))(s)
  np.testing.assert_allclose(g["mask"]["l2/w"], dense * s * (1 - s) / 10.0, rtol=1e-3, atol=1e-7)
  kw = dict(steps=12, key=jax.random.key(4), progress=False, optimizer=jm.tta.methods.adam(5e-2))
  m1, h1 = M.adarank(pre, fts, forward, heads, repeat(x, 12), **kw)
  m2, h2 = M.adarank(pre, fts, forward, heads, repeat(x, 12), **kw)
  assert h1["loss"][-1] < h1["loss"][0]
  np.testing.assert_array_equal(h1["loss"], h2["loss"])
  _close(m1, m2, 0.0)


def test_surgery_identity_gradients_and_objective(problem):
  import importlib

  S = importlib.import_module("jaxmerge.tta.surgery")  # (jaxmerge.tta.surgery is also the function's name)

  pre, fts, heads, x, frozen, ta = problem
  adapters, hist = S.surgery(ta, fts, forward, [x], steps=0, key=jax.random.key(0), progress=False)
  z = forward(ta, x[0])
  np.testing.assert_array_equal(S.apply_surgery(adapters, 1, z), z)  # W_up = 0: identity before training
  assert adapters["down"].shape == (T, 16, z.shape[-1]) and hist["loss"].shape == (0,)
  experts = jax.tree.map(lambda *xs: jnp.stack(xs), *fts)
  fr = {"merged": ta, "experts": experts, "dim": jnp.zeros(z.shape[-1])}
  adapter = S.surgery_adapter(forward, rank=4)
  theta = adapter.init(jax.random.key(1), fr)
  theta["up"] = 0.1 * jax.random.normal(jax.random.key(2), theta["up"].shape)
  f = jax.jit(lambda th: S.l1_loss(adapter.apply(th, fr, x), x))
  g = jax.grad(f)(theta)
  for name, idx in (("up", (0, 3, 1)), ("down", (2, 1, 5)), ("up", (1, 0, 2))):
    fd = (f({**theta, name: theta[name].at[idx].add(1e-3)}) - f({**theta, name: theta[name].at[idx].add(-1e-3)})) / 2e-3
    np.testing.assert_allclose(g[name][idx], fd, rtol=3e-2, atol=2e-4)
  kw = dict(steps=20, key=jax.random.key(3), progress=False, optimizer=jm.tta.methods.adam(1e-2))
  a1, h1 = S.surgery(ta, fts, forward, repeat(x, 20), **kw)
  a2, h2 = S.surgery(ta, fts, forward, repeat(x, 20), **kw)
  assert h1["loss"][-1] < 0.9 * h1["loss"][0]
  np.testing.assert_array_equal(h1["loss"], h2["loss"])
  np.testing.assert_array_equal(a1["up"], a2["up"])
