"""Analysis metrics (METHODS.md section 6) against closed forms, NumPy formulas and hand-checked cases."""

from __future__ import annotations

import numpy as np
import pytest

import jaxmerge as jm
from jaxmerge import analysis as A

RNG = np.random.default_rng(0)


def _orthogonal_tasks(t=3, m=12, n=9, k=2):
  """Task matrices with mutually orthogonal column AND row spaces (disjoint blocks of random orthogonal bases)."""
  qu, _ = np.linalg.qr(RNG.standard_normal((m, m)))
  qv, _ = np.linalg.qr(RNG.standard_normal((n, n)))
  return np.stack([qu[:, i * k:(i + 1) * k] @ np.diag(RNG.uniform(1, 3, k)) @ qv[:, i * k:(i + 1) * k].T
                   for i in range(t)]).astype(np.float32)


# ---------------------------------------------------------------------------------------------------- STI


def test_sti_zero_on_orthogonal_and_single_task():
  x = _orthogonal_tasks()
  assert float(A.singular_task_interference_matrix(x, k=2)) < 1e-4
  y = RNG.standard_normal((1, 6, 5)).astype(np.float32)
  assert float(A.singular_task_interference_matrix(y)) < 1e-4


@pytest.mark.parametrize("theta", [0.3, 1.1])
def test_sti_two_rank_one_tasks_closed_form(theta):
  """Delta_1 = e1 e1^T, Delta_2 = a a^T with a = (cos, sin): (U^T U - I) S (V^T V - I) = c^2 I, sum 2 c^2;
  induced 1-norm c^2."""
  a = np.array([np.cos(theta), np.sin(theta)])
  x = np.stack([np.outer([1.0, 0.0], [1.0, 0.0]), np.outer(a, a)]).astype(np.float32)
  c = np.cos(theta)
  np.testing.assert_allclose(float(A.singular_task_interference_matrix(x, k=1)), 2 * c * c, rtol=1e-5)
  np.testing.assert_allclose(float(A.singular_task_interference_matrix(x, k=1, norm="induced")), c * c, rtol=1e-5)


def test_sti_tree_and_numpy_formula():
  """Per-layer values against the NumPy formula; both layouts give the same numbers."""
  tvs = [{"a": {"kernel": RNG.standard_normal((7, 5)).astype(np.float32)}, "b": RNG.standard_normal(3).astype(np.float32)}
         for _ in range(3)]
  out = A.singular_task_interference(tvs, k=2)
  x = np.stack([tv["a"]["kernel"] for tv in tvs]).astype(np.float64)
  us, ss, vs = zip(*(np.linalg.svd(m, full_matrices=False) for m in x))
  u = np.concatenate([q[:, :2] for q in us], 1)
  v = np.concatenate([q[:2].T for q in vs], 1)
  s = np.diag(np.concatenate([q[:2] for q in ss]))
  want = np.abs((u.T @ u - np.eye(6)) @ s @ (v.T @ v - np.eye(6))).sum()
  np.testing.assert_allclose(out["per_layer"]["a/kernel"], [want], rtol=1e-4)
  np.testing.assert_allclose(out["total"], want, rtol=1e-4)
  flax = A.singular_task_interference([{"a": {"kernel": tv["a"]["kernel"].T}, "b": tv["b"]} for tv in tvs], k=2,
                                      layout=jm.filters.flax_layout)
  np.testing.assert_allclose(flax["total"], want, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------- SAR


def test_sar_hand_case_and_self():
  """Merged diag(1, 0.01): k_M = 1 (tail 1e-4 <= eps^2), so SAR = norm of the first row / norm."""
  merged = np.diag([1.0, 0.01]).astype(np.float32)
  d = np.array([[[3.0, 4.0], [1.0, 2.0]]], np.float32)
  sar, k = A.subspace_alignment_ratio_matrix(d, merged)
  assert int(k) == 1
  np.testing.assert_allclose(float(sar[0]), 5.0 / np.sqrt(30.0), rtol=1e-5)
  x = RNG.standard_normal((2, 8, 6)).astype(np.float32)
  self_sar, _ = A.subspace_alignment_ratio_matrix(x[:1], x[0])
  assert float(self_sar[0]) >= np.sqrt(1 - 0.05 ** 2) - 1e-6


def test_sar_layout_and_iso_c_beats_ta():
  """Output-space projector: Flax (in, out) kernels give the same SAR; Iso-C's flat spectrum aligns every task
  at least as well as task arithmetic (METHODS.md 6.3)."""
  tvs = [{"w": (RNG.standard_normal((10, 8)) * np.linspace(3, 0.1, 8)[None] + 2 * (i == 0)).astype(np.float32)}
         for i in range(3)]
  pre = {"w": np.zeros((10, 8), np.float32)}
  ta = jm.merge(jm.get_method("task_arithmetic")(scale=1.0), pre, tvs)
  iso = jm.merge(jm.get_method("iso_c")(), pre, tvs)
  s_ta = A.subspace_alignment_ratio(tvs, ta)
  s_iso = A.subspace_alignment_ratio(tvs, iso)
  assert np.all(s_iso["per_task"] >= s_ta["per_task"] - 1e-6)
  assert int(s_iso["rank"]["w"][0]) >= int(s_ta["rank"]["w"][0])
  flax = A.subspace_alignment_ratio([{"kernel": tv["w"].T} for tv in tvs], {"kernel": np.asarray(ta["w"]).T},
                                    layout=jm.filters.flax_layout)
  np.testing.assert_allclose(flax["per_task"], s_ta["per_task"], rtol=1e-5)


# ---------------------------------------------------------------------------------------------- CART I, R


def test_cart_interference_orthogonal_and_closed_forms():
  x = _orthogonal_tasks(t=3, k=2)
  inter, recon = A.cart_interference_matrix(x, [1, 2, 3], centered=False)
  np.testing.assert_allclose(np.asarray(inter), 0.0, atol=1e-5)
  s = np.linalg.svd(x.astype(np.float64), compute_uv=False)
  np.testing.assert_allclose(np.asarray(recon), [(s[:, k:] ** 2).sum() for k in (1, 2, 3)], rtol=1e-4, atol=1e-6)
  # T = 2 centered: Dbar_1 = -Dbar_2 share their row space, so I(1) = 2 * 1 * 1 = 2.
  y = RNG.standard_normal((2, 6, 5)).astype(np.float32)
  inter, recon = A.cart_interference_matrix(y, [1, 5])
  np.testing.assert_allclose(float(inter[0]), 2.0, rtol=1e-5)
  assert float(recon[1]) < 1e-5 * float(recon[0])


def test_cart_interference_tree_is_monotone():
  tvs = [{"w": RNG.standard_normal((9, 7)).astype(np.float32)} for _ in range(4)]
  out = A.cart_interference(tvs, [0, 2, 4, 7])
  r = out["reconstruction_total"]
  assert np.all(np.diff(r) <= 1e-6) and r[-1] < 1e-4 * r[0]


# ------------------------------------------------------------------------------------ cosine, sign conflict


def test_cosine_similarity():
  tvs = [{"a": np.array([1.0, 0.0], np.float32), "b": np.array([[0.0]], np.float32)},
         {"a": np.array([1.0, 1.0], np.float32), "b": np.array([[0.0]], np.float32)},
         {"a": np.array([-2.0, 0.0], np.float32), "b": np.array([[0.0]], np.float32)}]
  c = A.cosine_similarity(tvs)
  np.testing.assert_allclose(c, [[1, 2 ** -0.5, -1], [2 ** -0.5, 1, -(2 ** -0.5)], [-1, -(2 ** -0.5), 1]], atol=1e-6)
  per = A.cosine_similarity(tvs, per_leaf=True)
  np.testing.assert_allclose(per["b"], 0.0)


def test_sign_conflict_rate_hand_case():
  t1 = np.array([1.0, 2.0, 0.0, -1.0, 3.0], np.float32)
  t2 = np.array([-1.0, 2.0, 5.0, 0.0, 1.0], np.float32)
  t3 = np.array([0.0, -1.0, 0.0, 0.0, 2.0], np.float32)
  out = A.sign_conflict_rate([{"x": t1}, {"x": t2}, {"x": t3}])
  # entries with >= 2 nonzeros: 0, 1, 4; conflicting: 0, 1.
  np.testing.assert_allclose(out["rate"], 2 / 3, rtol=1e-6)
  np.testing.assert_allclose(out["pairwise"], [[0, 1 / 3, 1 / 2], [1 / 3, 0, 1 / 2], [1 / 2, 1 / 2, 0]], atol=1e-6)
  neg = A.sign_conflict_rate([{"x": t1}, {"x": -t1}, {"x": t1}])
  assert neg["pairwise"][0, 1] == 1.0 and neg["pairwise"][0, 2] == 0.0
  trimmed = A.sign_conflict_rate([{"x": t1}, {"x": t2}, {"x": t3}], density=0.4)
  # keep top 2 per task: t1 {4: 3, 1: 2}, t2 {2: 5, 1: 2}, t3 {4: 2, 1: -1}: entries 1 and 4 shared, 1 conflicts.
  np.testing.assert_allclose(trimmed["rate"], 1 / 2, rtol=1e-6)


# --------------------------------------------------------------------------------------------- plots, CTI


def test_plots_write_png(tmp_path):
  pytest.importorskip("matplotlib")
  p1 = A.plot_heatmap(np.eye(3), str(tmp_path / "h.png"), labels=["a", "b", "c"], title="cos")
  p2 = A.plot_curves([1, 2, 3], {"I(k)": [3, 2, 1], "R(k)": [1, 0.5, 0.1]}, str(tmp_path / "c.png"), logy=True)
  for p in (p1, p2):
    with open(p, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with pytest.raises(ValueError):
    A.plot_heatmap(np.ones(3), str(tmp_path / "bad.png"))


def test_cross_task_interference_reexport():
  from jaxmerge.interference import cross_task_interference

  assert A.cross_task_interference is cross_task_interference
