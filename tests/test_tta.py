"""Test-time adaptation core (fit, losses) and AdaMerging on a tiny MLP encoder with linear heads."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxmerge as jm
import jaxmerge.tta as tta
import importlib

am = importlib.import_module("jaxmerge.tta.adamerging")
from jaxmerge.tta import heads as H

T, DIN, HID, D, B = 3, 6, 10, 8, 12
CLASSES = (3, 4, 2)


def forward(params, x):
  h = jnp.tanh(x @ params["l1"]["w"].T + params["l1"]["b"][None])
  return h @ params["l2"]["w"].T


def make_problem(seed=0, scale=0.5):
  k = jax.random.split(jax.random.key(seed), 8)
  pre = {"l1": {"w": jax.random.normal(k[0], (HID, DIN)) / np.sqrt(DIN), "b": jnp.zeros(HID)},
         "l2": {"w": jax.random.normal(k[1], (D, HID)) / np.sqrt(HID)}, "count": jnp.array(7, jnp.int32)}
  fts = []
  for t in range(T):
    kk = jax.random.split(k[2 + t], 3)
    fts.append({"l1": {"w": pre["l1"]["w"] + scale * jax.random.normal(kk[0], (HID, DIN)) / np.sqrt(DIN),
                       "b": pre["l1"]["b"] + 0.1 * jax.random.normal(kk[1], (HID,))},
                "l2": {"w": pre["l2"]["w"] + scale * jax.random.normal(kk[2], (D, HID)) / np.sqrt(HID)},
                "count": jnp.array(7, jnp.int32)})
  heads = [3.0 * jax.random.normal(jax.random.fold_in(k[6], t), (c, D)) for t, c in enumerate(CLASSES)]
  x = jax.random.normal(k[7], (T, B, DIN))
  return pre, fts, heads, x


def repeat(x, n):
  return [x] * n


# ---- losses -------------------------------------------------------------------------------------------------


def test_entropy_uniform_and_masked_padding():
  assert np.isclose(float(tta.entropy(jnp.zeros(5))), np.log(5), atol=1e-6)
  logits = jax.random.normal(jax.random.key(1), (4, 3))
  padded = jnp.concatenate([logits, 100.0 * jnp.ones((4, 2))], axis=1)
  mask = jnp.array([True, True, True, False, False])
  np.testing.assert_allclose(tta.entropy(padded, mask), tta.entropy(logits), rtol=1e-6)
  g = jax.grad(lambda z: tta.entropy(z, mask).sum())(padded)
  assert np.all(np.isfinite(g)) and np.all(np.asarray(g)[:, 3:] == 0)
  np.testing.assert_allclose(g[:, :3], jax.grad(lambda z: tta.entropy(z).sum())(logits), rtol=1e-5, atol=1e-7)


def test_kl_and_mse_hand_checked():
  p, q = jnp.array([[0.0, np.log(3.0)]]), jnp.array([[0.0, 0.0]])  # softmax(p) = (1/4, 3/4)
  expected = 0.25 * np.log(0.25 / 0.5) + 0.75 * np.log(0.75 / 0.5)
  np.testing.assert_allclose(tta.kl_divergence(p, q), [expected], rtol=1e-6)
  np.testing.assert_allclose(tta.kl_divergence(2 * p, 2 * q, temperature=2.0), [expected], rtol=1e-6)
  assert float(tta.kl_divergence(p, p)[0]) == 0.0
  mask = jnp.array([True, True, False])
  pp = jnp.concatenate([p, jnp.array([[50.0]])], axis=1)
  qq = jnp.concatenate([q, jnp.array([[-50.0]])], axis=1)
  np.testing.assert_allclose(tta.kl_divergence(pp, qq, mask=mask), [expected], rtol=1e-6)
  np.testing.assert_allclose(tta.mse(pp, qq, mask), [np.log(3.0) ** 2 / 2], rtol=1e-6)
  with pytest.raises(ValueError, match="temperature"):
    tta.kl_divergence(p, q, temperature=0.0)


# ---- fit ----------------------------------------------------------------------------------------------------


def test_fit_quadratic_history_and_errors(key):
  adapter = tta.Adapter(lambda k, fr: {"w": jnp.zeros(3)}, lambda th, fr, b, *, key: th["w"] - fr["target"] * b)
  frozen = {"target": jnp.array([1.0, -2.0, 3.0])}
  start = {"w": jnp.ones(3)}
  loss = lambda out, b: (jnp.sum(out ** 2), {"norm": jnp.linalg.norm(out)})  # noqa: E731
  theta, hist = tta.fit(adapter, frozen, optax.sgd(0.25), repeat(1.0, 20), loss, key=key, steps=20,
                        progress=True, has_aux=True, theta=start)
  np.testing.assert_allclose(theta["w"], frozen["target"], atol=1e-4)
  assert hist["loss"].shape == (20,) and hist["norm"].shape == (20,)
  assert np.all(np.diff(hist["loss"]) < 0)
  np.testing.assert_allclose(hist["loss"][0], np.sum((1 - frozen["target"]) ** 2), rtol=1e-6)
  assert not start["w"].is_deleted()  # the caller's theta is copied before donation
  with pytest.raises(ValueError, match="ran out"):
    tta.fit(adapter, frozen, optax.sgd(0.1), repeat(1.0, 2), lambda o, b: jnp.sum(o ** 2), key=key, steps=3,
            progress=False)


# ---- AdaMerging ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_zero_steps_is_task_arithmetic(granularity, key):
  pre, fts, heads, x = make_problem()
  merged, hist = tta.adamerging(pre, fts, forward, heads, [], granularity=granularity, init_scale=0.3, steps=0,
                                key=key, progress=False)
  ta = jm.merge(jm.get_method("task_arithmetic")(scale=0.3), pre, fts)
  for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(ta)):
    assert a.dtype == b.dtype
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  assert hist["loss"].shape == (0,)


def test_zero_steps_ties_base_is_ties(key):
  pre, fts, heads, x = make_problem()
  merged, _ = tta.adamerging(pre, fts, forward, heads, [], base="ties", density=0.3, init_scale=0.4, steps=0,
                             key=key, progress=False)
  ref = jm.merge(jm.get_method("ties")(density=0.3, scale=0.4, disjoint="sum"), pre, fts)
  for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_coefficient_gradients_match_finite_differences_and_chain_rule():
  pre, fts, heads, x = make_problem()
  pre32, tau, passthrough = H.split_params(pre, fts)
  hs, mask = H.pad_heads(heads)
  frozen = {"pre": pre32, "deltas": tau, "passthrough": passthrough, "heads": hs, "mask": mask}
  adapter = tta.adamerging_adapter(forward, pre, granularity="layer", init_scale=0.3)
  theta = adapter.init(None, frozen)
  f = jax.jit(lambda th: am.entropy_loss(adapter.apply(th, frozen, x, key=None), x))
  g = jax.grad(f)(theta)
  # Chain rule: dL/dlambda_t^(l) = <dL/dtheta^(l), tau_t^(l)> at the merged parameters.
  merged = {p: pre32[p] + 0.3 * tau[p].sum(0) for p in pre32}

  def loss_of_params(flat):
    params = H.assemble(pre, flat, passthrough)
    z = forward(params, x.reshape(T * B, DIN)).reshape(T, B, D)
    logits = jnp.einsum("tbd,tcd->tbc", z, hs, precision=jax.lax.Precision.HIGHEST)
    return am.entropy_loss((logits, mask), x)

  gp = jax.grad(loss_of_params)(merged)
  for p in pre32:
    expected = jnp.tensordot(tau[p].reshape(T, -1), gp[p].reshape(-1), axes=1)
    np.testing.assert_allclose(g.scales[p], expected, rtol=1e-4, atol=1e-6)
  # Central finite differences (float32, eps 1e-2) on every coefficient of two leaves.
  for p in ("l1/w", "l2/w"):
    for t in range(T):
      def shifted(eps, p=p, t=t):
        return f(theta._replace(scales={**theta.scales, p: theta.scales[p].at[t].add(eps)}))
      fd = (shifted(1e-2) - shifted(-1e-2)) / 2e-2
      np.testing.assert_allclose(g.scales[p][t], fd, rtol=2e-2, atol=1e-4)


@pytest.mark.parametrize("granularity,base,remat", [("layer", "task_arithmetic", False), ("task", "ties", True)])
def test_entropy_decreases_and_is_deterministic(granularity, base, remat):
  pre, fts, heads, x = make_problem()
  kw = dict(granularity=granularity, base=base, optimizer=optax.adam(5e-2), steps=25, progress=False, remat=remat)
  m1, h1 = tta.adamerging(pre, fts, forward, heads, repeat(x, 25), key=jax.random.key(3), **kw)
  per_task = [[x[t]] * 25 for t in range(T)]  # T per-task iterables are zipped into stacked batches
  m2, h2 = tta.adamerging(pre, fts, forward, heads, per_task, key=jax.random.key(3), **kw)
  assert h1["loss"][-1] < 0.9 * h1["loss"][0]
  np.testing.assert_array_equal(h1["loss"], h2["loss"])
  for a, b in zip(jax.tree.leaves(m1), jax.tree.leaves(m2)):
    np.testing.assert_array_equal(a, b)
  assert int(m1["count"]) == 7  # non-float leaves are copied


def test_registry_entry_and_bad_input(key):
  info = jm.method_info("adamerging")
  assert info.family == "adaptation" and info.data == "tta"
  cfg = jm.get_method("adamerging")(granularity="task")
  assert isinstance(cfg, tta.AdaMergingConfig) and cfg.init_scale == 0.3 and cfg.steps == 1000
  assert set(cfg.run_kwargs()) >= {"granularity", "init_scale", "base", "optimizer", "steps"}
  with pytest.raises(ValueError, match="granularity"):
    jm.get_method("adamerging")(granularity="model")
  pre, fts, heads, x = make_problem()
  with pytest.raises(ValueError, match="heads"):
    tta.adamerging(pre, fts, forward, heads[:2], [], steps=0, key=key, progress=False)


def test_kl_gradient_matches_autodiff_and_is_exactly_zero_at_the_target():
  k1, k2 = jax.random.split(jax.random.key(9))
  p, q = jax.random.normal(k1, (4, 5)), jax.random.normal(k2, (4, 5))
  mask = jnp.array([True, True, True, True, False])

  def plain(p, q):  # autodiff of the textbook form, over the real classes
    lp, lq = jax.nn.log_softmax(p[:, :4] / 2.0), jax.nn.log_softmax(q[:, :4] / 2.0)
    return jnp.sum(jnp.exp(lp) * (lp - lq))

  ours = jax.grad(lambda p, q: tta.kl_divergence(p, q, 2.0, mask).sum(), argnums=(0, 1))(p, q)
  ref = jax.grad(plain, argnums=(0, 1))(p, q)
  for a, b in zip(ours, ref):
    np.testing.assert_allclose(a[:, :4], b[:, :4], rtol=1e-4, atol=1e-6)
    assert np.all(np.asarray(a)[:, 4] == 0)
  gq = jax.grad(lambda q: tta.kl_divergence(p, q, 2.0, mask).sum())(p)
  assert np.all(np.asarray(gq) == 0)
