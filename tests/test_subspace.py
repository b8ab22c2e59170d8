"""The subspace family: CART and STAR against NumPy loops of the paper formulas, Hugging Face vs Flax layout
equality for every method, the METHODS.md section 8 properties, rank-deficient and bf16 inputs, jit vs no jit.

FusionBench parity (TSV-M, TSV-C, Iso-C, Iso-CTS, WUDI, KnOTS) lives in tests/parity/test_fusionbench_subspace.py;
STI and I(k) on orthogonal inputs in tests/test_analysis.py. Shapes are tiny (one matrix leaf and a bias) so that
each case compiles in well under a second on an idle machine.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmerge as jm

RNG = np.random.default_rng(7)
M, N, T = 7, 5, 3


def _models(t=T, m=M, n=N, seed=0):
  rng = np.random.default_rng(seed)
  pre = {"dense": {"weight": rng.standard_normal((m, n)).astype(np.float32), "bias": rng.standard_normal(m).astype(np.float32)}}
  fts = [{"dense": {"weight": pre["dense"]["weight"] + rng.standard_normal((m, n)).astype(np.float32) * rng.uniform(0.5, 2),
                    "bias": pre["dense"]["bias"] + rng.standard_normal(m).astype(np.float32)}} for _ in range(t)]
  return pre, fts


def _flax(tree):
  return {"dense": {"kernel": np.asarray(tree["dense"]["weight"]).T, "bias": tree["dense"]["bias"]}}


def _w(tree):
  return np.asarray(tree["dense"]["weight"], np.float64)


def _svd_k(x, k):
  u, s, vt = np.linalg.svd(x, full_matrices=False)
  return (u[:, :k] * s[:k]) @ vt[:k]


PRE, FTS = _models()
TAUS = np.stack([_w(f) - _w(PRE) for f in FTS])
TAU_B = np.stack([f["dense"]["bias"] - PRE["dense"]["bias"] for f in FTS]).astype(np.float64)


# ------------------------------------------------------------------------------- NumPy loops of the papers


@pytest.mark.parametrize("rank_fraction,scale", [(0.4, 1.7), (0.08, 2.3)])
def test_cart_numpy_loop(rank_fraction, scale):
  """``theta_avg + lambda sum_t SVD_k(theta_t - theta_avg)``, ``k = max(1, int(rho r))``; biases: ``theta_avg``."""
  out = jm.merge(jm.get_method("cart")(rank_fraction=rank_fraction, scale=scale), PRE, FTS)
  thetas = [_w(f) for f in FTS]
  avg = sum(thetas) / T
  k = max(1, int(min(M, N) * rank_fraction))
  want = avg + scale * sum(_svd_k(th - avg, k) for th in thetas)
  np.testing.assert_allclose(_w(out), want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out["dense"]["bias"], np.mean([f["dense"]["bias"] for f in FTS], 0), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("eta", [40.0, 75.0])
def test_star_numpy_loop(eta):
  """Keep the fewest top directions holding eta % of the nuclear norm, rescale to the full norm, average."""
  out = jm.merge(jm.get_method("star")(eta=eta), PRE, FTS)
  parts = []
  for x in TAUS:
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    k = 1
    while s[:k].sum() / s.sum() < eta / 100:
      k += 1
    parts.append((u[:, :k] * (s[:k] * s.sum() / s[:k].sum())) @ vt[:k])
    assert k < len(s)  # the truncation is real at these etas
  np.testing.assert_allclose(_w(out) - _w(PRE), sum(parts) / T, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------- layout


LAYOUT_CASES = [
    ("tsv_m", {"scale": 0.8}), ("tsv_c", {}), ("byom_lora", {"rank": 2}), ("iso_c", {}),
    ("iso_cts", {"common_fraction": 0.4}), ("cart", {"rank_fraction": 0.4}), ("star", {}),
    ("knots", {"base": "ties", "density": 0.5}), ("wudi", {"steps": 20, "learning_rate": 1e-2}),
]


def _run(name, hp, pre, fts, layout=None):
  tx = jm.get_method(name)(**hp)
  if jm.method_info(name).per_task:
    return jm.merge_per_task(tx, pre, fts, layout=layout)
  return [jm.merge(tx, pre, fts, layout=layout)]


@pytest.mark.parametrize("name,hp", LAYOUT_CASES, ids=[c[0] for c in LAYOUT_CASES])
def test_hf_and_flax_layouts_agree(name, hp):
  """The same weights as HF ``(out, in)`` ``weight`` and Flax ``(in, out)`` ``kernel`` give the same model."""
  hf = _run(name, hp, PRE, FTS)
  fl = _run(name, hp, _flax(PRE), [_flax(f) for f in FTS], layout=jm.filters.flax_layout)
  for a, b in zip(hf, fl):
    np.testing.assert_allclose(np.asarray(b["dense"]["kernel"]).T, a["dense"]["weight"], rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(b["dense"]["bias"], a["dense"]["bias"], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name,hp", [("iso_cts", {"common_fraction": 0.4}), ("wudi", {"steps": 20, "learning_rate": 1e-2})])
def test_one_sided_methods_see_the_layout(name, hp):
  """Control for the test above: reading the Flax kernels as if they were ``(out, in)`` changes the result of
  a one-sided method (so the layout test can fail)."""
  hf = _run(name, hp, PRE, FTS)[0]
  wrong = _run(name, hp, _flax(PRE), [_flax(f) for f in FTS], layout=jm.filters.hf_layout)[0]
  assert np.abs(np.asarray(wrong["dense"]["kernel"]).T - hf["dense"]["weight"]).max() > 1e-3


# -------------------------------------------------------------------------------------------- properties


def _svals(x):
  return np.linalg.svd(np.asarray(x, np.float64), compute_uv=False)


def test_iso_c_flat_spectrum_and_nuclear_norm():
  out = jm.merge(jm.get_method("iso_c")(scale=1.0), PRE, FTS)
  s = _svals(_w(out) - _w(PRE))
  np.testing.assert_allclose(s, s.mean(), rtol=1e-5)
  np.testing.assert_allclose(s.sum(), _svals(TAUS.sum(0)).sum(), rtol=1e-5)
  np.testing.assert_allclose(out["dense"]["bias"] - PRE["dense"]["bias"], TAU_B.mean(0), rtol=1e-5, atol=1e-6)


def test_iso_cts_fraction_one_is_iso_c():
  a = jm.merge(jm.get_method("iso_cts")(common_fraction=1.0, scale=1.3), PRE, FTS)
  b = jm.merge(jm.get_method("iso_c")(scale=1.3), PRE, FTS)
  np.testing.assert_allclose(_w(a), _w(b), rtol=1e-5, atol=1e-5)


def _orthogonal_tasks(t, m, n, k, seed=3):
  rng = np.random.default_rng(seed)
  qu, _ = np.linalg.qr(rng.standard_normal((m, m)))
  qv, _ = np.linalg.qr(rng.standard_normal((n, n)))
  return [(qu[:, i * k:(i + 1) * k] * rng.uniform(1, 3, k)) @ qv[:, i * k:(i + 1) * k].T for i in range(t)]


def test_tsv_m_orthogonal_is_task_arithmetic_and_knots_ta_is_ta():
  """Rank-2 task matrices with mutually orthogonal column and row spaces (k = int(6/3) = 2): TSV-M with alpha 1
  is their sum. KnOTS around task arithmetic equals task arithmetic on generic inputs."""
  pre = {"w": np.zeros((6, 6), np.float32)}
  fts = [{"w": d.astype(np.float32)} for d in _orthogonal_tasks(3, 6, 6, 2)]
  out = jm.merge(jm.get_method("tsv_m")(scale=1.0), pre, fts)
  np.testing.assert_allclose(out["w"], sum(f["w"] for f in fts), rtol=1e-5, atol=1e-5)
  knots = jm.merge(jm.get_method("knots")(base="task_arithmetic", scale=0.3), PRE, FTS)
  np.testing.assert_allclose(_w(knots) - _w(PRE), 0.3 * TAUS.sum(0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hp", [dict(rank=0), dict(rank=N), dict(eta=100.0)], ids=["cart0", "cart_full", "star100"])
def test_extremes_give_the_average(hp):
  name = "star" if "eta" in hp else "cart"
  out = jm.merge(jm.get_method(name)(**hp), PRE, FTS)
  np.testing.assert_allclose(_w(out), np.mean([_w(f) for f in FTS], 0), rtol=1e-5, atol=1e-5)


def test_wudi_orthogonal_rows_is_task_arithmetic():
  """Mutually orthogonal row spaces (disjoint input coordinates, so that ``tau_s tau_t^T`` is exactly 0 in
  floating point: Adam would turn rounding-level gradients into lr-sized steps): the loss and its gradient are 0
  at the start, so WUDI returns ``sum_t tau_t``."""
  rng = np.random.default_rng(4)
  pre = {"w": np.zeros((6, 6), np.float32)}
  fts = []
  for t in range(3):
    d = np.zeros((6, 6), np.float32)
    d[:, 2 * t:2 * t + 2] = rng.standard_normal((6, 2))
    fts.append({"w": d})
  out = jm.merge(jm.get_method("wudi")(steps=10, learning_rate=1e-2), pre, fts)
  np.testing.assert_allclose(out["w"], sum(f["w"] for f in fts), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------- numerical safety


@pytest.mark.parametrize("name,hp", LAYOUT_CASES, ids=[c[0] for c in LAYOUT_CASES])
def test_rank_deficient_bf16_inputs_are_finite(name, hp):
  """bf16 checkpoints whose task matrices are rank 1, one of them zero: finite results in bf16 (computed in
  float32). Directions below the numerical rank are dropped rather than filled arbitrarily."""
  rng = np.random.default_rng(5)
  pre = {"dense": {"weight": rng.standard_normal((M, N)), "bias": rng.standard_normal(M)}}
  taus = [np.outer(rng.standard_normal(M), rng.standard_normal(N)) for _ in range(T - 1)] + [np.zeros((M, N))]
  cast = lambda t: jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), t)  # noqa: E731
  fts = [cast({"dense": {"weight": pre["dense"]["weight"] + d, "bias": pre["dense"]["bias"]}}) for d in taus]
  for out in _run(name, hp, cast(pre), fts):
    for leaf in jax.tree.leaves(out):
      assert leaf.dtype == jnp.bfloat16
      assert np.all(np.isfinite(np.asarray(leaf, np.float32)))


def test_jit_equals_no_jit():
  stack = jax.tree.map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]),
                       *[jax.tree.map(lambda a, b: a - b, f, PRE) for f in FTS])
  for name in ("tsv_m", "iso_cts"):
    tx = jm.get_method(name)()
    eager = tx.apply(tx.init(stack), stack)
    jitted = jax.jit(lambda s, tx=tx: tx.apply(tx.init(s), s))(stack)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def _polar64(x):
  u, _, vt = np.linalg.svd(np.asarray(x, np.float64), full_matrices=False)
  return u @ vt


@pytest.mark.parametrize(("method", "smin"), [("auto", 1e-6), ("svd", 1e-6), ("qdwh", 1e-6), ("qdwh", 2e-7)])
def test_polar_keeps_a_tiny_but_separated_direction(method, smin):
  # sigma_min / sigma_1 of a few float32 eps, 0.5 away from the next singular value: the direction is well
  # determined, and dropping it moves Q by 1/sqrt(n) = 0.18 (flipping its sign, by 0.35). An SVD-based polar
  # factor (LAPACK gesdd, in XLA and in torch alike) flips it below ~3 eps; QDWH stays accurate at 1.7 eps.
  rng = np.random.default_rng(3)
  n = 32
  q1, _ = np.linalg.qr(rng.standard_normal((n, n)))
  q2, _ = np.linalg.qr(rng.standard_normal((n, n)))
  s = np.concatenate([np.linspace(1.0, 0.5, n - 1), [smin]])
  x = ((q1 * s) @ q2.T).astype(np.float32)
  q = np.asarray(jm.linalg.polar(jnp.asarray(x), method=method))
  ref = _polar64(x)
  assert np.linalg.norm(q - ref) / np.linalg.norm(ref) < 1e-5


@pytest.mark.parametrize("method", ["auto", "qdwh"])
def test_polar_of_zero_padded_columns(method):
  a = RNG.standard_normal((9, 4)).astype(np.float32)
  x = np.concatenate([a, np.zeros((9, 3), np.float32)], axis=1)
  q = np.asarray(jm.linalg.polar(jnp.asarray(x), method=method))
  assert np.all(q[:, 4:] == 0)
  np.testing.assert_allclose(q[:, :4], _polar64(a), atol=2e-5)


def test_tsv_m_full_size_eight_tasks_matches_float64():
  # Full-size CLIP fc1 (3072 x 768), 8 structured tasks. FusionBench (float32) is 3.9e-4 away from the float64
  # formula; a rank cut-off at 4 eps in the polar factor put jaxmerge 1.2e-1 away.
  from tests.clip_shapes import make_task_vectors

  # benchmarks/bench_subspace.py's inputs for one block (same random stream), where sigma_min(V^) = 3.2 eps:
  # below the old rank cut-off of 4 eps, but still determined well enough for the SVD to get its sign right.
  shapes = {}
  for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
    shapes[f"self_attn.{n}.weight"], shapes[f"self_attn.{n}.bias"] = (768, 768), (768,)
  shapes.update({"fc1.weight": (3072, 768), "fc1.bias": (3072,), "fc2.weight": (768, 3072), "fc2.bias": (768,)})
  key = "fc1.weight"
  xs = [tv[key] for tv in make_task_vectors(shapes, 8, seed=0, rank=8, spikes=0.001)]
  out = np.asarray(jm.merge(jm.get_method("tsv_m")(scale=1.0), {key: np.zeros_like(xs[0])}, [{key: x} for x in xs])[key])
  k = 768 // 8
  fs = [np.linalg.svd(x.astype(np.float64), full_matrices=False) for x in xs]
  u = np.concatenate([f[0][:, :k] for f in fs], 1)
  s = np.concatenate([f[1][:k] for f in fs])
  v = np.concatenate([f[2][:k].T for f in fs], 1)
  ref = (_polar64(u) * s) @ _polar64(v).T
  assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 2e-3


# --------------------------------------------------------------------------------- memory of the matrix loop


def test_map_matrices_gathered_loop_equals_concatenation():
  """On CPU a group of equal-shape leaves is looped over without concatenating it (each step picks its matrix
  from its own leaf); the result must be the one of the vmapped concatenation, leaf by leaf and in order,
  including a leaf with a batch axis (two matrices per task)."""
  from jaxmerge import filters as jf
  from jaxmerge import linalg

  rng = np.random.default_rng(3)
  xs = {"a": jnp.asarray(rng.standard_normal((T, 6, 4)), jnp.float32),
        "b": jnp.asarray(rng.standard_normal((T, 2, 6, 4)), jnp.float32),  # (T, layer, out, in)
        "c": jnp.asarray(rng.standard_normal((T, 6, 4)), jnp.float32)}
  specs = {"a": jf.MatrixSpec(out_axes=(0,), in_axes=(1,)), "b": jf.MatrixSpec(out_axes=(1,), in_axes=(2,)),
           "c": jf.MatrixSpec(out_axes=(0,), in_axes=(1,))}
  fn = lambda x: jnp.tanh(x[0]) @ x[1].T + x[2].sum()  # noqa: E731  (order- and task-sensitive)
  looped = jax.jit(lambda xs: linalg.map_matrices(fn, xs, specs, batch_size=1))(xs)
  vmapped = jax.jit(lambda xs: linalg.map_matrices(fn, xs, specs, batch_size=None))(xs)
  for p in xs:
    np.testing.assert_allclose(np.asarray(looped[p]), np.asarray(vmapped[p]), rtol=1e-6, atol=1e-6)
  want_b1 = np.tanh(np.asarray(xs["b"][0, 1])) @ np.asarray(xs["b"][1, 1]).T + np.asarray(xs["b"][2, 1]).sum()
  np.testing.assert_allclose(np.asarray(looped["b"][1]), want_b1, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,bound", [("iso_c", 0.6), ("tsv_m", 1.0)])
def test_matrix_merges_do_not_copy_the_task_stack(name, bound):
  """The compiled merge's scratch memory (XLA's own count) stays below ``bound`` times the stacked task
  vectors: Iso-C sums the tasks before its loop (its kernel needs only the sum), and no method gathers a group
  of equal-shape leaves into one concatenated copy (before: 1.3x and 1.7x the stack)."""
  rng = np.random.default_rng(0)
  tv = {f"l{i}": {"weight": jnp.asarray(rng.standard_normal((4, 64, 48)), jnp.float32)} for i in range(3)}
  tx = jm.get_method(name)()
  stats = jax.jit(lambda tv: tx.apply(tx.init(tv), tv)).lower(tv).compile().memory_analysis()
  assert stats.temp_size_in_bytes < bound * stats.argument_size_in_bytes, (stats.temp_size_in_bytes, stats.argument_size_in_bytes)
