"""jaxmerge vs the NumPy references of ``tests/reference.py`` and the sanity properties of METHODS.md section 8.

Part 1 compares, on structured CLIP-vision-shaped weights (``tests/clip_shapes.py``), the methods that
FusionBench lacks: NAN, Breadcrumbs (per row), PCB (reference vision code), Consensus (TA and TIES bases),
Localize-and-Stitch (data-free), BYOM-FFT, EMR's global rescaler, and DELLA's MAGPRUNE (keep probabilities
and per-entry rescale recovered from one draw, keep rates by Monte Carlo). Metric: relative Frobenius error
of the merged update per leaf < 1e-4 (``tests/parity/_common.py``).

Part 2 checks the reductions and invariants of METHODS.md section 8 on a tiny tree (fast to compile): T = 1
behaviour, DARE(p=0) = TA, DARE unbiasedness and keep rate, DELLA(window 0) = DARE + TIES(mean),
TIES(keep 100%, T=1) = fine-tuned, Breadcrumbs(gamma 0, keep 1) = TA, TALL(lambda 0, >=) = all ones,
NAN(equal norms) = TA(1/2), Model Stock(identical) = fine-tuned, SLERP endpoints and symmetry, EMR T=1 exact,
permutation invariance, output structure/shape/dtype, and copied non-float leaves.
"""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

import jaxmerge as jm  # noqa: E402
from tests import reference as ref  # noqa: E402
from tests.clip_shapes import make_task_vectors  # noqa: E402
from tests.parity._common import assert_close, models, to_numpy, tx  # noqa: E402

KEY = jax.random.key(0)


def merge(name, pre, fts, key=None, **hp):
  return to_numpy(jm.merge(tx(name, **hp), pre, fts, key=key))


def merge_per_task(name, pre, fts, key=None, **hp):
  return [to_numpy(m) for m in jm.merge_per_task(tx(name, **hp), pre, fts, key=key)]


_TINY_SHAPES = {"enc/w": (6, 5), "enc/b": (6,), "conv": (3, 2, 2, 2), "scale": ()}


def tiny(num_tasks: int, seed: int = 0, shapes=None):
  """A tiny tree with a matrix, a vector, a 4-D kernel and a scalar, structured task vectors."""
  shapes = shapes or _TINY_SHAPES
  rng = np.random.default_rng([seed, 99])
  pre = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
  tvs = make_task_vectors(shapes, num_tasks, seed=seed, scale=0.1)
  return pre, [{k: (pre[k] + tv[k]).astype(np.float32) for k in shapes} for tv in tvs]


def close(a, b, rtol=1e-5, atol=1e-6, what=""):
  for k in b:
    np.testing.assert_allclose(np.asarray(a[k], np.float64), np.asarray(b[k], np.float64), rtol=rtol, atol=atol,
                               err_msg=f"{what}: {k}")


# ======================================================================= part 1: vs tests/reference.py
# (small CLIP fixture: width 16, one layer, 23 HF-named leaves incl. the 4-D patch embedding)


def test_nan():
  pre, fts = models(3, seed=10, small=True)
  assert_close(merge("nan", pre, fts), ref.nan(pre, fts), pre, what="nan")


def test_breadcrumbs_rows():
  pre, fts = models(3, seed=11, small=True)
  out = merge("breadcrumbs", pre, fts, density=0.6, gamma=0.05, scale=0.4)
  assert_close(out, ref.breadcrumbs(pre, fts, density=0.6, gamma=0.05, scale=0.4), pre, what="breadcrumbs")


def test_pcb_vision_reference():
  pre, fts = models(3, seed=12, small=True)
  lams = [1.0, 1.2, 0.8]
  out = merge("pcb", pre, fts, ratio=0.1, scale=lams, clamp_ratio=0.01)
  expect = ref.pcb(pre, fts, ratio=0.1, scale=lams, clamp_ratio=0.01, inter="normalized")
  assert_close(out, expect, pre, what="pcb")


def test_consensus_task_arithmetic():
  pre, fts = models(4, seed=13, small=True)
  out = merge("consensus", pre, fts, k=2, tall_lambda=0.5, scale=0.4)
  assert_close(out, ref.consensus(pre, fts, k=2, tall_lambda=0.5, scale=0.4), pre, what="consensus-ta")


_CONSENSUS_TIES = dict(k=1, tall_lambda=0.3, base="ties", scale=0.7, density=0.5, disjoint="mean")


def test_consensus_ties_base():
  pre, fts = tiny(3, seed=1)
  close(merge("consensus", pre, fts, **_CONSENSUS_TIES), ref.consensus(pre, fts, **_CONSENSUS_TIES),
        what="consensus-ties")


def test_localize_stitch():
  """Official rule: ``k = int(density N)``, keep ``|tau| > topk(k).min()`` (k - 1 entries per task), one
  threshold per task over all leaves (the tiny tree's leaves have different scales)."""
  pre, fts = tiny(3, seed=14)
  out = merge("localize_stitch", pre, fts, density=0.3)
  assert_close(out, ref.localize_stitch(pre, fts, density=0.3), pre, what="localize_stitch")


def test_byom_fft():
  pre, fts = tiny(3, seed=15)
  outs = merge_per_task("byom", pre, fts)
  for t, expect in enumerate(ref.byom_fft(pre, fts, density=0.1, scale=0.3)):
    assert_close(outs[t], expect, pre, what=f"byom task {t}")


def test_emr_global_rescaler():
  pre, fts = tiny(3, seed=2)
  outs = merge_per_task("emr", pre, fts, rescaler="global")
  for t, expect in enumerate(ref.emr_models(pre, fts, rescaler="global")):
    close(outs[t], expect, what=f"emr global task {t}")


_LONG = {"w": (4, 100), "b": (50,), "conv": (2, 2, 3, 3)}


def test_della_magprune_probabilities_rescale_and_keep_rates():
  """T = 1: the output is ``scale * keep * tau / q``. From one draw, ``q`` is recovered on kept entries and
  must equal the reference rank formula (rows of 2-D leaves, one row otherwise); dropped entries are exactly
  ``theta_0``. Over 40 draws, the keep frequency of the lowest / highest magnitude fifth of each row matches
  the mean probability of that fifth."""
  pre, fts = tiny(1, seed=16, shapes=_LONG)
  p, window, scale = 0.4, 0.3, 1.5
  t = tx("della", p=p, window=window, scale=scale)
  qs = {k: np.concatenate([ref.magprune_probs_row(r, p, window) for r in ref.rows(fts[0][k].astype(np.float64)
                                                                                - pre[k])]).reshape(np.shape(pre[k]))
        for k in pre}
  hits = {k: np.zeros(np.shape(v)) for k, v in pre.items()}
  draws = 40
  for i in range(draws):
    out = to_numpy(jm.merge(t, pre, fts, key=jax.random.key(100 + i)))
    for k in pre:
      tau = fts[0][k].astype(np.float64) - pre[k]
      got = out[k].astype(np.float64) - pre[k]
      kept = got != 0
      hits[k] += kept
      if i == 0:
        np.testing.assert_allclose(got[kept], scale * tau[kept] / qs[k][kept], rtol=2e-4, atol=1e-7, err_msg=k)
  for k in pre:
    freq, q = ref.rows(hits[k] / draws), ref.rows(qs[k])
    for r in range(q.shape[0]):
      order = np.argsort(q[r])
      n5 = q.shape[1] // 5
      for sl in (order[:n5], order[-n5:]):
        assert abs(freq[r, sl].mean() - q[r, sl].mean()) < 0.1, (k, r)


def test_dare_drop_rescale_keep_rate_unbiased_and_reproducible():
  """T = 1, DARE-TA with scale 1: kept entries equal ``tau / (1 - p)``, the others ``theta_0``; the keep rate is
  ``1 - p``; the Monte Carlo mean over 100 keys is ``tau`` (unbiased); equal keys give equal masks, different
  keys different ones."""
  pre, fts = tiny(1, seed=17, shapes=_LONG)
  p = 0.5
  t = tx("dare", p=p, scale=1.0)
  acc = {k: np.zeros(np.shape(v)) for k, v in pre.items()}
  kept_total = n_total = 0
  draws = 100
  first = None
  for i in range(draws):
    out = to_numpy(jm.merge(t, pre, fts, key=jax.random.key(i)))
    for k in pre:
      tau = fts[0][k].astype(np.float64) - pre[k]
      got = out[k].astype(np.float64) - pre[k]
      m = got != 0
      np.testing.assert_allclose(got[m], tau[m] / (1 - p), rtol=2e-4, atol=1e-7, err_msg=k)
      acc[k] += got
      kept_total += int(m.sum())
      n_total += m.size
    if i == 0:
      first = out
  assert abs(kept_total / n_total - (1 - p)) < 0.02
  for k in pre:
    tau = fts[0][k].astype(np.float64) - pre[k]
    # per-entry std of the mean is |tau| / sqrt(draws) at p = 0.5
    assert np.linalg.norm(acc[k] / draws - tau) < 0.2 * np.linalg.norm(tau), k
  again = to_numpy(jm.merge(t, pre, fts, key=jax.random.key(0)))
  for k in pre:
    np.testing.assert_array_equal(first[k], again[k])
  assert any(np.any(first[k] != out[k]) for k in pre), "different keys gave identical masks"


def test_della_window0_equals_dare_then_ties_mean():
  """T = 3: DELLA(window 0) = DARE drop, then TIES election and disjoint mean (no trimming), same key."""
  pre, fts = tiny(3, shapes={"w": (5, 8), "b": (8,)})
  della = merge("della", pre, fts, key=KEY, p=0.3, window=0.0, scale=1.1)
  dare = merge("dare", pre, fts, key=KEY, p=0.3, base="ties", density=1.0, disjoint="mean", scale=1.1)
  close(della, dare, what="DELLA(window 0) vs DARE-TIES(mean, keep all)")


# ========================================================================== part 2: sanity properties


def test_task_arithmetic_and_average_single_task():
  pre, fts = tiny(1)
  close(merge("task_arithmetic", pre, fts, scale=1.0), fts[0], what="TA T=1 scale 1")
  close(merge("simple_average", pre, fts), fts[0], what="average T=1")


def test_single_task_nan_model_stock_consensus():
  """T = 1: NAN gives ``theta_0 + tau/2`` (a = 1, g = T/2); Model Stock gives ``theta_1`` (ratio 1);
  Consensus with k = 1 is TA, and k = 2 > T, which would keep nothing (``theta_0``), is an error naming k."""
  pre, fts = tiny(1)
  half = {k: (pre[k].astype(np.float64) + 0.5 * (fts[0][k].astype(np.float64) - pre[k])) for k in pre}
  close(merge("nan", pre, fts), half, what="NAN T=1")
  close(merge("model_stock", pre, fts), fts[0], what="Model Stock T=1")
  with pytest.raises(ValueError, match="k <= the number of tasks \\(1\\), got k=2"):
    merge("consensus", pre, fts, k=2, scale=1.0)
  close(merge("consensus", pre, fts, k=1, scale=1.0), fts[0], what="consensus T=1 k=1")


def test_average_equals_ta_one_over_t():
  pre, fts = tiny(3)
  close(merge("simple_average", pre, fts), merge("task_arithmetic", pre, fts, scale=1 / 3), what="avg = TA(1/T)")


def test_ties_keep_all_single_task_is_finetuned():
  pre, fts = tiny(1)
  for scope in ("global", "leaf"):
    close(merge("ties", pre, fts, density=1.0, scale=1.0, disjoint="mean", scope=scope), fts[0], what=scope)


def test_ties_agreeing_signs_keep_all_is_mean_of_nonzero():
  pre, _ = tiny(1)
  base = {k: np.abs(np.random.default_rng(5).standard_normal(np.shape(v))).astype(np.float32) + 0.1
          for k, v in pre.items()}
  tvs = [{k: (c * base[k]).astype(np.float32) for k in base} for c in (0.5, 1.0, 2.0)]
  tvs[1]["enc/w"][0, :] = 0.0  # a missing contributor must not count in the mean
  fts = [{k: pre[k] + tv[k] for k in pre} for tv in tvs]
  out = merge("ties", pre, fts, density=1.0, scale=1.0, disjoint="mean")
  for k in pre:
    stack = np.stack([tv[k] for tv in tvs]).astype(np.float64)
    expect = stack.sum(0) / np.maximum((stack != 0).sum(0), 1)
    np.testing.assert_allclose(out[k] - pre[k], expect, rtol=1e-5, atol=1e-6, err_msg=k)


def test_dare_p0_is_task_arithmetic():
  pre, fts = tiny(3)
  close(merge("dare", pre, fts, key=KEY, p=0.0, scale=0.4), merge("task_arithmetic", pre, fts, scale=0.4),
        what="DARE(p=0)")


def test_breadcrumbs_no_masking_is_task_arithmetic():
  pre, fts = tiny(3)
  close(merge("breadcrumbs", pre, fts, density=1.0, gamma=0.0, scale=0.2),
        merge("task_arithmetic", pre, fts, scale=0.2), what="Breadcrumbs(gamma 0, keep 1)")


def test_breadcrumbs_large_fractions_remove_only_top_tail():
  """gamma + density >= 1: only the top gamma of each row is removed (METHODS 3.5)."""
  pre, fts = tiny(2, shapes={"w": (4, 20), "b": (20,)})
  out = merge("breadcrumbs", pre, fts, density=0.9, gamma=0.2, scale=1.0)
  close(out, ref.breadcrumbs(pre, fts, density=0.9, gamma=0.2, scale=1.0, rule="paper"), what="breadcrumbs tails")


def test_tall_lambda0_non_strict_selects_all():
  pre, fts = tiny(3)
  outs = merge_per_task("tall_mask", pre, fts, tall_lambda=0.0, strict=False)
  full = merge("task_arithmetic", pre, fts, scale=1.0)
  for o in outs:
    close(o, full, what="TALL(0, >=)")


def test_tall_single_task_and_strict_zero():
  pre, fts = tiny(1)
  fts[0]["enc/b"][2] = pre["enc/b"][2]  # an exactly zero task-vector entry
  (out,) = merge_per_task("tall_mask", pre, fts, tall_lambda=0.6)
  close(out, fts[0], what="TALL T=1")
  (out,) = merge_per_task("tall_mask", pre, fts, tall_lambda=0.0, strict=True)
  close(out, fts[0], what="TALL T=1 strict lambda 0")


def test_consensus_k0_is_task_arithmetic():
  pre, fts = tiny(3)
  close(merge("consensus", pre, fts, k=0, scale=0.3), merge("task_arithmetic", pre, fts, scale=0.3), what="k=0")


def test_nan_equal_norms_is_ta_half():
  pre, fts = tiny(3)
  tvs = ref.task_vectors(pre, fts)
  unit = [{k: tv[k] / max(np.linalg.norm(tv[k].ravel()), 1e-12) * 0.05 for k in tv} for tv in tvs]
  eq = [{k: (pre[k] + u[k]).astype(np.float32) for k in pre} for u in unit]
  close(merge("nan", pre, eq), merge("task_arithmetic", pre, eq, scale=0.5), what="NAN equal norms")


def test_model_stock_identical_is_finetuned():
  pre, fts = tiny(3)
  same = [fts[0]] * 3
  close(merge("model_stock", pre, same), fts[0], rtol=1e-5, atol=1e-5, what="angle (default)")
  close(merge("model_stock", pre, same, average="cosine"), fts[0], rtol=1e-5, atol=1e-5, what="cosine")


def test_model_stock_orthogonal_is_pretrained():
  pre = {"w": np.zeros((2, 2), np.float32)}
  fts = [{"w": np.array([[1, 0], [0, 0]], np.float32)}, {"w": np.array([[0, 1], [0, 0]], np.float32)}]
  close(merge("model_stock", pre, fts), pre, what="orthogonal")


def test_slerp_endpoints_and_symmetry():
  pre, fts = tiny(2)
  close(merge("slerp", pre, fts, t=0.0), fts[0], what="t=0")
  close(merge("slerp", pre, fts, t=1.0), fts[1], what="t=1")
  close(merge("slerp", pre, fts, t=0.3), merge("slerp", pre, fts[::-1], t=0.7), what="swap")
  same = merge("slerp", pre, [fts[0], fts[0]], t=0.3)
  close(same, fts[0], what="identical inputs")
  close(merge("slerp", pre, fts, t=0.3), ref.slerp(fts, 0.3), what="reference")


def test_slerp_rejects_other_task_counts():
  pre, fts = tiny(3)
  with pytest.raises(ValueError):
    jm.merge(jm.get_method("slerp")(), pre, fts)


def test_emr_single_task_exact():
  pre, fts = tiny(1)
  (out,) = merge_per_task("emr", pre, fts)
  close(out, fts[0], rtol=1e-6, atol=1e-7, what="EMR T=1")


def test_localize_stitch_single_and_disjoint():
  pre, fts = tiny(1)
  close(merge("localize_stitch", pre, fts, density=1.0), fts[0], what="L&S T=1 full")
  # Disjoint supports: each task's four large entries sit where the other task is tiny, so every rule for the
  # count (k - 1, k or k + 1 entries with k = 4) selects disjoint sets: every changed coordinate takes its own
  # task's value, and the three largest of each task are always selected.
  pre = {"w": np.zeros((2, 8), np.float32)}
  rng = np.random.default_rng(0)
  a = rng.uniform(0.01, 0.02, (2, 8)).astype(np.float32)
  b = rng.uniform(0.01, 0.02, (2, 8)).astype(np.float32)
  a[0, :4] = [5, 4, 3.5, 3]
  b[1, 4:] = [6, 4.5, 4.2, 3.9]
  out = merge("localize_stitch", pre, [{"w": a}, {"w": b}], density=0.25)["w"]
  assert np.all((out == 0) | (out == a) | (out == b))
  np.testing.assert_array_equal(out[0, :3], a[0, :3])
  np.testing.assert_array_equal(out[1, 4:7], b[1, 4:7])


def test_localize_stitch_zero_entries_do_not_claim():
  """Sparse task vectors: entries where a task vector is exactly 0 are never in its mask (official rule
  ``|tau| > topk(k).min()``), so they must not dilute another task's update in the overlap average."""
  pre = {"w": np.zeros(10, np.float32)}
  a = np.zeros(10, np.float32)
  a[8:] = [5, 4]
  b = np.zeros(10, np.float32)
  b[9] = 6
  out = merge("localize_stitch", pre, [{"w": a}, {"w": b}], density=0.3)["w"]
  expect = ref.localize_stitch(pre, [{"w": a}, {"w": b}], density=0.3)["w"]
  np.testing.assert_allclose(expect[8:], [5, 5])
  np.testing.assert_allclose(out, expect, atol=1e-7)


def test_byom_full_density_recovers_each_model():
  pre, fts = tiny(3)
  outs = merge_per_task("byom", pre, fts, density=1.0, scale=0.3)
  for o, f in zip(outs, fts):
    close(o, f, what="BYOM m=100%")


# hyperparameters shared with other tests on the tiny tree, so that compilations are reused
_DETERMINISTIC = [
    ("ties", {"density": 0.3, "disjoint": "sum"}),
    ("nan", {}),
    ("model_stock", {}),
    ("breadcrumbs", {"density": 0.7, "gamma": 0.1}),
    ("consensus", _CONSENSUS_TIES),
    ("localize_stitch", {"density": 0.3}),
]


@pytest.mark.parametrize("name,hp", _DETERMINISTIC, ids=lambda v: v if isinstance(v, str) else "")
def test_permutation_invariance(name, hp):
  pre, fts = tiny(3, seed=4)
  t = tx(name, **hp)
  a = to_numpy(jm.merge(t, pre, fts))
  b = to_numpy(jm.merge(t, pre, [fts[2], fts[0], fts[1]]))
  close(a, b, rtol=1e-5, atol=1e-6, what=f"{name} permuted")


@pytest.mark.parametrize("name", ["emr", "tall_mask", "byom"])
def test_per_task_permutation_equivariance(name):
  pre, fts = tiny(3, seed=4)
  t = tx(name)
  a = [to_numpy(m) for m in jm.merge_per_task(t, pre, fts)]
  b = [to_numpy(m) for m in jm.merge_per_task(t, pre, [fts[2], fts[0], fts[1]])]
  for i, j in ((0, 1), (1, 2), (2, 0)):
    close(a[i], b[j], what=f"{name} task {i}")


def _nested(flat, dtype):
  return {"enc": {"w": jnp.asarray(flat["enc/w"], dtype), "b": jnp.asarray(flat["enc/b"], dtype)},
          "conv": jnp.asarray(flat["conv"], dtype), "scale": jnp.asarray(flat["scale"], dtype),
          "step": jnp.asarray(7, jnp.int32), "ids": jnp.arange(4, dtype=jnp.int32)}


_STRUCTURE = [("breadcrumbs", {})]


@pytest.mark.parametrize("name,hp", _STRUCTURE, ids=lambda v: v if isinstance(v, str) else "")
def test_structure_dtype_and_non_float_leaves(name, hp):
  """Nested bf16 params with int leaves: same tree, shapes and dtypes; int leaves copied from pretrained (the
  fine-tuned int leaves differ on purpose)."""
  pre_f, fts_f = tiny(2, seed=6)
  pre = _nested(pre_f, jnp.bfloat16)
  fts = [_nested(f, jnp.bfloat16) for f in fts_f]
  for f in fts:
    f["step"] = jnp.asarray(99, jnp.int32)
  out = jm.merge(tx(name, **hp), pre, fts, key=KEY)
  assert jax.tree.structure(out) == jax.tree.structure(pre)
  for o, p in zip(jax.tree.leaves(out), jax.tree.leaves(pre)):
    assert o.shape == p.shape and o.dtype == p.dtype
  assert int(out["step"]) == 7
  np.testing.assert_array_equal(np.asarray(out["ids"]), np.arange(4))
  assert bool(jnp.all(jnp.isfinite(out["enc"]["w"].astype(jnp.float32))))


@pytest.mark.parametrize("name", ["emr"])
def test_per_task_structure(name):
  pre_f, fts_f = tiny(2, seed=6)
  pre = _nested(pre_f, jnp.float32)
  outs = jm.merge_per_task(tx(name), pre, [_nested(f, jnp.float32) for f in fts_f])
  assert len(outs) == 2
  for out in outs:
    assert jax.tree.structure(out) == jax.tree.structure(pre)
    assert int(out["step"]) == 7


def test_clip_names_and_int_buffer_round_trip():
  """Flat HF-named dicts keep their keys; the integer ``position_ids`` buffer is copied."""
  from tests.clip_shapes import make_models

  pre, fts = make_models(2, seed=8, int_buffer=True)
  out = jm.merge(jm.get_method("task_arithmetic")(scale=0.5), pre, fts)
  assert set(out) == set(pre)
  key = "vision_model.embeddings.position_ids"
  assert np.asarray(out[key]).dtype == pre[key].dtype
  np.testing.assert_array_equal(np.asarray(out[key]), pre[key])
  assert np.asarray(out["vision_model.embeddings.patch_embedding.weight"]).shape == (32, 3, 4, 4)


def test_mismatched_shapes_raise_naming_path():
  pre, fts = tiny(2)
  bad = dict(fts[1])
  bad["enc/w"] = np.zeros((5, 6), np.float32)
  with pytest.raises(ValueError, match="enc/w"):
    jm.merge(jm.get_method("task_arithmetic")(), pre, [fts[0], bad])


def test_stochastic_methods_require_key():
  pre, fts = tiny(2)
  for name in ("dare", "della"):
    with pytest.raises(ValueError):
      jm.merge(jm.get_method(name)(), pre, fts)


def test_trim_exact_count_keeps_every_entry_tied_at_the_threshold():
  # density 0.25 of 4 entries: k = 1, the largest magnitude is 1.0, shared by three entries (as bf16 task
  # vectors often are): all three survive (mergekit's topk would keep one of them).
  x = jnp.array([[1.0, -1.0, 1.0, 0.5]])
  out = jm.transforms.trim(0.25, scope="leaf", count="exact").apply((), {"w": x})["w"]
  np.testing.assert_array_equal(np.asarray(out), [[1.0, -1.0, 1.0, 0.0]])
