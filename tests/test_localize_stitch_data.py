"""Data-driven Localize-and-Stitch (jaxmerge.tta.stitch) on the tiny MLP encoder of tests/test_tta.py: the
zero-step masks are the data-free ones, the loss falls, determinism, and stitching by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmerge as jm
from jaxmerge.tta import api
from jaxmerge.tta import heads as H
from jaxmerge.tta import stitch as S
from tests.test_tta import CLASSES, T, forward, make_problem


@pytest.fixture(scope="module")
def problem():
  pre, fts, heads, x = make_problem()
  ys = [np.asarray(jax.random.randint(jax.random.key(10 + t), (x.shape[1],), 0, c)) for t, c in enumerate(CLASSES)]
  data = [(np.asarray(x[t]), ys[t]) for t in range(T)]
  return pre, fts, heads, data


def _leaves_equal(a, b):
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


@pytest.mark.parametrize("density", [0.0, 0.1, 0.3, 1.0])
@pytest.mark.parametrize("binarize", ["topk", "round"])
def test_zero_steps_is_data_free_localize_stitch(problem, density, binarize):
  pre, fts, heads, data = problem
  out = api.run_method("localize_stitch_data", pre, fts, forward, heads, data, steps=0, density=density,
                       binarize=binarize)
  ref = jm.merge(jm.get_method("localize_stitch")(density=density), pre, fts)
  _leaves_equal(out, ref)
  assert int(out["count"]) == 7  # the integer leaf is passed through


def test_initial_masks_are_the_top_k_of_the_task_vector(problem):
  pre, fts, _, _ = problem
  _, tau, _ = H.split_params(pre, fts)
  t0 = {p: x[0] for p, x in tau.items()}
  m = S.topk_masks({p: jnp.abs(x) for p, x in t0.items()}, {p: x != 0 for p, x in t0.items()}, 0.2)
  flat = np.concatenate([np.abs(np.asarray(t0[p])).ravel() for p in sorted(t0)])
  kept = np.concatenate([np.asarray(m[p]).ravel() for p in sorted(m)])
  k = int(flat.size * 0.2)
  thr = np.sort(flat)[::-1][k - 1]  # the k-th largest; kept entries are strictly above it
  np.testing.assert_array_equal(kept, flat > thr)
  assert kept.sum() == k - 1  # distinct magnitudes


def test_loss_decreases_and_is_deterministic(problem):
  pre, fts, heads, data = problem
  kw = dict(density=0.3, steps=12, learning_rate=1.0, key=jax.random.key(4), return_history=True)
  m1, h1 = api.run_method("localize_stitch_data", pre, fts, forward, heads, data, **kw)
  m2, h2 = api.run_method("localize_stitch_data", pre, fts, forward, heads, data, **kw)
  assert h1["loss"].shape == (T, 12) and h1["ce"].shape == (T, 12)
  assert np.all(h1["loss"][:, -1] < h1["loss"][:, 0])  # every task's objective falls
  # The L1 term pulls the soft mask down: a strong penalty ends with a sparser soft mask than none.
  _, h0 = api.run_method("localize_stitch_data", pre, fts, forward, heads, data, **{**kw, "l1_strength": 0.0})
  _, h9 = api.run_method("localize_stitch_data", pre, fts, forward, heads, data, **{**kw, "l1_strength": 50.0})
  assert np.all(h9["soft_density"][:, -1] < h0["soft_density"][:, -1])
  assert np.all(h9["soft_density"][:, -1] < h9["soft_density"][:, 0])
  np.testing.assert_array_equal(h1["loss"], h2["loss"])
  _leaves_equal(m1, m2)
  n = sum(int(np.size(x)) for x in jax.tree.leaves(pre) if jnp.issubdtype(x.dtype, jnp.floating))
  np.testing.assert_allclose(h1["density"], (int(n * 0.3) - 1) / n)  # "topk": the target density
  # The training changed the masks (otherwise the result would be the data-free merge).
  free = jm.merge(jm.get_method("localize_stitch")(density=0.3), pre, fts)
  assert any(not np.array_equal(u, v) for u, v in zip(jax.tree.leaves(m1), jax.tree.leaves(free)))
  m3 = api.run_method("localize_stitch_data", pre, fts, forward, heads, data, **{**kw, "key": jax.random.key(5),
                                                                                   "return_history": False,
                                                                                   "batch_size": 4})
  assert any(not np.array_equal(u, v) for u, v in zip(jax.tree.leaves(m1), jax.tree.leaves(m3)))


def test_stitch_of_disjoint_masks_is_the_sum_of_masked_task_vectors():
  pre = {"w": jnp.array([1.0, 2.0, 3.0, 4.0])}
  tau = {"w": jnp.array([[10.0, 20.0, 30.0, 40.0], [-1.0, -2.0, -3.0, -4.0]])}
  disjoint = {"w": jnp.array([[1, 0, 1, 0], [0, 1, 0, 0]], bool)}
  np.testing.assert_array_equal(S.stitch(pre, tau, disjoint)["w"], [11.0, 0.0, 33.0, 4.0])
  overlap = {"w": jnp.array([[1, 1, 0, 0], [1, 0, 0, 0]], bool)}  # entry 0 claimed twice: averaged
  np.testing.assert_array_equal(S.stitch(pre, tau, overlap)["w"], [1.0 + 4.5, 22.0, 3.0, 4.0])


def test_binarize_rules():
  logits = {"a": jnp.array([3.0, -1.0, 0.5, 2.0, -4.0])}
  tau = {"a": jnp.array([1.0, 1.0, 1.0, 0.0, 1.0])}
  np.testing.assert_array_equal(S.binarize_masks(logits, tau, 0.0, "round")["a"], [1, 0, 1, 0, 0])  # tau = 0: never
  # top int(5 * 0.6) = 3 among nonzero: strictly above the 3rd largest (-1.0) -> 3.0 and 0.5
  np.testing.assert_array_equal(S.binarize_masks(logits, tau, 0.6, "topk")["a"], [1, 0, 1, 0, 0])
  with pytest.raises(ValueError, match="binarize"):
    S.binarize_masks(logits, tau, 0.5, "median")


def test_registry_entry_and_errors(problem):
  pre, fts, heads, data = problem
  info = jm.method_info("localize_stitch_data")
  assert info.data == "val" and info.family == "sparsification" and info.hparams["density"] == 0.01
  with pytest.raises(ValueError, match="needs labels"):
    api.run_method("localize_stitch_data", pre, fts, forward, heads, [d[0] for d in data], steps=0)
  with pytest.raises(ValueError, match="binarize"):
    jm.get_method("localize_stitch_data")(binarize="half")
  with pytest.raises(ValueError, match="density"):
    jm.get_method("localize_stitch_data")(density=1.5)
  with pytest.raises(ValueError, match="heads"):
    S.localize_stitch_data(pre, fts, forward, heads[:2], data, key=jax.random.key(0), steps=0)
