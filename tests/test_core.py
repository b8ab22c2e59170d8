"""The core machinery: trees, filters, stats, combinators, merge entry points, jit, errors."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmerge as jm
from jaxmerge import filters as F
from jaxmerge import stats


def _models(t=3, seed=0, dtype=np.float32):
  r = np.random.default_rng(seed)
  pre = {
      "enc": {"layers": [{"fc": {"kernel": r.standard_normal((5, 4))}}, {"fc": {"kernel": r.standard_normal((5, 4))}}]},
      "bias": r.standard_normal(4),
      "count": np.arange(3, dtype=np.int32),
  }
  pre = jax.tree.map(lambda x: x.astype(dtype) if x.dtype.kind == "f" else x, pre)
  fts = [
      jax.tree.map(lambda x: (x + r.standard_normal(x.shape)).astype(x.dtype) if x.dtype.kind == "f" else x, pre)
      for _ in range(t)
  ]
  return pre, fts


# ------------------------------------------------------------------------------------------------- tree


def test_paths_and_flatten_round_trip():
  pre, _ = _models()
  flat = jm.tree.flatten_paths(pre)
  assert set(flat) == {"enc/layers/0/fc/kernel", "enc/layers/1/fc/kernel", "bias", "count"}
  back = jm.tree.unflatten_paths(pre, flat)
  chex.assert_trees_all_equal(back, pre)


def test_stack_unstack_and_task_vectors():
  pre, fts = _models()
  st = jm.tree.stack(fts)
  assert jm.tree.num_tasks(st) == 3
  chex.assert_trees_all_equal(jm.tree.unstack(st)[1], fts[1])
  tv = jm.tree.task_vectors({"w": jnp.ones(2)}, {"w": jnp.array([[2.0, 3.0]])})
  np.testing.assert_allclose(tv["w"], [[1.0, 2.0]])
  with pytest.raises(ValueError, match="empty"):
    jm.tree.stack([])


def test_leaf_key_depends_on_path_not_position():
  k = jax.random.key(1)
  a = jax.random.uniform(jm.tree.leaf_key(k, "a/b"), (3,))
  b = jax.random.uniform(jm.tree.leaf_key(k, "a/b"), (3,))
  c = jax.random.uniform(jm.tree.leaf_key(k, "a/c"), (3,))
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)


def test_leaf_uniform_is_uniform_independent_and_keyed():
  """The counter-based draws behind DARE/DELLA: uniform on [0, 1) (mean, variance, a 64-bin chi-square),
  no correlation between neighbouring entries, between two leaves or between two keys, and a Bernoulli keep
  rate within binomial bounds; deterministic under the key."""
  from scipy import stats

  k = jax.random.key(3)
  n = 1 << 20
  u = np.asarray(jm.tree.leaf_uniform(k, "enc/w", (n,)), np.float64)
  assert u.min() >= 0.0 and u.max() < 1.0
  assert abs(u.mean() - 0.5) < 4 * np.sqrt(1 / 12 / n)
  assert abs(u.var() - 1 / 12) < 1e-3
  counts = np.histogram(u, bins=64, range=(0, 1))[0]
  assert stats.chisquare(counts).pvalue > 1e-4
  for lag in (1, 2, 7, 1024):
    assert abs(np.corrcoef(u[:-lag], u[lag:])[0, 1]) < 5 / np.sqrt(n)
  other_leaf = np.asarray(jm.tree.leaf_uniform(k, "enc/b", (n,)), np.float64)
  other_key = np.asarray(jm.tree.leaf_uniform(jax.random.key(4), "enc/w", (n,)), np.float64)
  assert abs(np.corrcoef(u, other_leaf)[0, 1]) < 5 / np.sqrt(n)
  assert abs(np.corrcoef(u, other_key)[0, 1]) < 5 / np.sqrt(n)
  # Bits low in the counter must not leak into the draws: entries 2**j apart are independent too.
  grid = u.reshape(1024, 1024)
  assert abs(np.corrcoef(grid[:, 0], grid[:, 1])[0, 1]) < 5 / np.sqrt(1024)
  kept = (u >= 0.9).sum()
  assert abs(kept - 0.1 * n) < 5 * np.sqrt(n * 0.1 * 0.9)
  np.testing.assert_array_equal(np.asarray(jm.tree.leaf_uniform(k, "enc/w", (4, 8))),
                                np.asarray(jm.tree.leaf_uniform(k, "enc/w", (4, 8))))
  # The same leaf drawn inside a program that receives the leaf id as an argument (one program per shape).
  traced = jax.jit(lambda pid: _traced_uniform(k, pid))(np.uint32(jm.tree.leaf_id("enc/w")))
  np.testing.assert_array_equal(np.asarray(traced), np.asarray(jm.tree.leaf_uniform(k, "enc/w", (4, 8))))


def _traced_uniform(k, pid):
  with jm.tree.traced_leaf_ids({"leaf": pid}):
    return jm.tree.leaf_uniform(k, "leaf", (4, 8))


def test_dare_compiles_one_program_per_leaf_shape(monkeypatch):
  """DARE's leaf programs take the leaf id as an argument: a model with many leaves of one shape compiles one
  program (a whole-model program with each leaf's id as a constant took 26 s to compile for a ViT-B/32), and
  the merge equals the whole-model program's. (The XLA route: on the CPU DARE otherwise runs natively,
  tests/test_native.py.)"""
  from jaxmerge.engine import xla
  from jaxmerge.engine.merge import prepare

  monkeypatch.setenv("JAXMERGE_NATIVE", "0")

  rng = np.random.default_rng(0)
  pre = {f"l{i}": rng.standard_normal((8, 4)).astype(np.float32) for i in range(6)}
  fts = [{p: v + rng.standard_normal(v.shape).astype(np.float32) for p, v in pre.items()} for _ in range(3)]
  tx = jm.get_method("dare")(p=0.4, scale=0.7)
  xla.leaf_program.cache_clear()
  key = jax.random.key(5)
  out = jm.merge(tx, pre, fts, key=key)
  prog = xla.leaf_program(tx, F.hf_layout, False, True)
  assert prog._cache_size() == 1
  pre_f, ft_f, _ = prepare(pre, fts)
  whole = xla.whole_program(tx, F.hf_layout, False)(pre_f, ft_f, None, key)
  for p in pre:
    np.testing.assert_array_equal(np.asarray(out[p]), np.asarray(whole[p]))


# ---------------------------------------------------------------------------------------------- filters


@pytest.mark.parametrize(
    "shape,spec",
    [((6, 4), F.MatrixSpec((1,), (0,))), ((6, 4), F.MatrixSpec((0,), (1,))), ((3, 6, 4), F.MatrixSpec((1,), (2,))),
     ((2, 3, 4, 5), F.MatrixSpec((1, 2), (3,)))],
)
def test_matrix_view_round_trip(shape, spec):
  x = jnp.arange(2 * np.prod(shape), dtype=jnp.float32).reshape((2,) + shape)
  m = F.to_matrix(x, spec, batch_dims=1)
  assert m.ndim == 4 and m.shape[0] == 2
  np.testing.assert_array_equal(F.from_matrix(m, spec, x.shape, batch_dims=1), x)


def test_flax_and_hf_layouts_agree_on_the_canonical_view():
  w = jnp.arange(12.0).reshape(3, 4)  # HF (out=3, in=4)
  s_hf = F.hf_layout("a.weight", jax.ShapeDtypeStruct((3, 4), jnp.float32))
  s_fx = F.flax_layout("a/kernel", jax.ShapeDtypeStruct((4, 3), jnp.float32))
  np.testing.assert_array_equal(F.to_matrix(w, s_hf), F.to_matrix(w.T, s_fx))
  assert F.flax_layout("pos/embedding", jax.ShapeDtypeStruct((4, 3), jnp.float32)) == s_hf
  assert F.hf_layout("conv", jax.ShapeDtypeStruct((2, 2, 3, 3), jnp.float32)) is None


def test_predicates_and_rules():
  s2 = jax.ShapeDtypeStruct((4, 4), jnp.float32)
  s1 = jax.ShapeDtypeStruct((4,), jnp.float32)
  assert F.is_matrix("x", s2) and not F.is_matrix("x", s1)
  assert F.is_linear_kernel("mlp/fc1/kernel", s2) and not F.is_linear_kernel("pos/embedding", s2)
  f = F.All(F.path_contains("mlp"), F.Not(F.path_matches(r".*bias")))
  assert f("mlp/fc1/kernel", s2) and not f("mlp/fc1/bias", s1)
  assert F.Any(F.path_matches("a"), F.path_matches("b"))("b", s1)
  pre, fts = _models()
  labels = F.labels_from_rules([(r"enc/.*", "mat"), (r".*", "rest")], pre)
  assert labels["enc"]["layers"][0]["fc"]["kernel"] == "mat" and labels["bias"] == "rest"
  with pytest.raises(ValueError, match="no rule matches"):
    F.labels_from_rules([(r"enc/.*", "mat")], pre)


# ------------------------------------------------------------------------------------------------ stats


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kth_smallest_matches_sort(seed):
  r = np.random.default_rng(seed)
  vals = [r.standard_normal((37, 5)).astype(np.float32), (r.standard_normal(101) * 1e-30).astype(np.float32),
          np.zeros(7, np.float32), np.round(r.standard_normal(50), 1).astype(np.float32)]
  srt = np.sort(np.concatenate([v.ravel() for v in vals]))
  f = jax.jit(stats.kth_smallest)
  for k in [1, 2, 10, 100, 200, len(srt) - 1, len(srt)]:
    assert float(f(vals, k)) == srt[k - 1]
  assert float(stats.order_statistic(vals, -1)) == srt[-1]


# ------------------------------------------------------------------------------------------ combinators


def test_chain_rejects_task_step_after_reduction():
  with pytest.raises(ValueError, match="after a reduction"):
    jm.chain(jm.transforms.sum_tasks(), jm.transforms.trim(0.5))
  with pytest.raises(ValueError, match="two reductions"):
    jm.chain(jm.transforms.sum_tasks(), jm.transforms.mean_tasks())


def test_partition_and_masked_route_leaves():
  pre, fts = _models()
  st = jm.tree.task_vectors({k: v for k, v in jm.tree.flatten_paths(pre).items() if k != "count"},
                            {k: v for k, v in jm.tree.flatten_paths(jm.tree.stack(fts)).items() if k != "count"})
  tx = jm.partition({"mat": jm.transforms.sum_tasks(), "vec": jm.transforms.mean_tasks()},
                    lambda p, s: "mat" if len(s.shape) == 2 else "vec")
  out = tx.apply(tx.init(st), st)
  np.testing.assert_allclose(out["bias"], np.mean(st["bias"], 0), rtol=1e-6)
  np.testing.assert_allclose(out["enc/layers/0/fc/kernel"], np.sum(st["enc/layers/0/fc/kernel"], 0), rtol=1e-6)
  # masked: a reduction on the selected leaves, the mean elsewhere.
  m = jm.masked(jm.transforms.sum_tasks(), F.is_matrix)
  out2 = m.apply(m.init(st), st)
  chex.assert_trees_all_close(out, out2)
  # masked task-preserving step: unselected leaves pass through.
  m2 = jm.masked(jm.transforms.scale_tasks(2.0), F.is_matrix)
  out3 = m2.apply(m2.init(st), st)
  np.testing.assert_allclose(out3["bias"], st["bias"])
  np.testing.assert_allclose(out3["enc/layers/1/fc/kernel"], 2 * st["enc/layers/1/fc/kernel"], rtol=1e-6)


def test_named_chain_coefficients():
  tx = jm.named_chain(("sum", jm.transforms.sum_tasks()), ("scale", jm.transforms.scale(0.5)))
  c = tx.init(None)
  assert set(c) == {"sum", "scale"}
  out = tx.apply(c._replace(scale=c["scale"]) if hasattr(c, "_replace") else c, {"w": jnp.ones((2, 3))})
  np.testing.assert_allclose(out["w"], np.ones(3))


def test_per_task_and_across_tasks_helpers():
  x = {"w": jnp.arange(6.0).reshape(2, 3)}
  t = jm.per_task(lambda v: v[::-1])
  np.testing.assert_array_equal(t.apply(t.init(x), x)["w"], [[2, 1, 0], [5, 4, 3]])
  r = jm.across_tasks(lambda v: v.max(0))
  assert r.reduces
  np.testing.assert_array_equal(r.apply(r.init(x), x)["w"], [3, 4, 5])


# ------------------------------------------------------------------------------------------ merge entry


def test_merge_copies_non_float_leaves_and_keeps_structure():
  pre, fts = _models()
  out = jm.merge(jm.get_method("task_arithmetic")(scale=1.0), pre, fts)
  assert jax.tree.structure(out) == jax.tree.structure(pre)
  np.testing.assert_array_equal(out["count"], pre["count"])
  want = pre["bias"] + sum(f["bias"] - pre["bias"] for f in fts)
  np.testing.assert_allclose(out["bias"], want, rtol=1e-5)


def test_merge_accepts_a_stack_and_a_list_alike():
  pre, fts = _models()
  a = jm.merge(jm.get_method("ties")(), pre, fts)
  b = jm.merge(jm.get_method("ties")(), pre, jm.tree.stack(fts))
  chex.assert_trees_all_close(a, b)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_inputs_merge_in_float32_and_cast_back(dtype):
  pre, fts = _models(dtype=np.float32)
  lo = lambda t: jax.tree.map(lambda x: jnp.asarray(x, dtype) if x.dtype.kind == "f" else x, t)  # noqa: E731
  out = jm.merge(jm.get_method("task_arithmetic")(scale=0.5), lo(pre), [lo(f) for f in fts])
  assert out["bias"].dtype == dtype
  p32 = jnp.asarray(lo(pre)["bias"], jnp.float32)
  want = p32 + 0.5 * sum(jnp.asarray(lo(f)["bias"], jnp.float32) - p32 for f in fts)
  np.testing.assert_array_equal(out["bias"], want.astype(dtype))


def test_scale_sweep_does_not_retrace():
  pre, fts = _models()
  tx = jm.get_method("task_arithmetic")()
  pre_f, ft, _ = jm.merge.__globals__["prepare"](pre, jm.tree.stack(fts))
  calls = []

  @jax.jit
  @chex.assert_max_traces(n=1)
  def run(coeffs):
    calls.append(1)
    d = {p: ft[p] - pre_f[p][None] for p in pre_f}
    return tx.apply(coeffs, d)

  c0 = tx.init(None)
  for s in [0.1, 0.2, 0.3, 0.7]:
    coeffs = (c0[0], jm.transforms.ScaleCoeffs(jnp.float32(s)))
    run(coeffs)
  # The public entry point reuses one compiled merge across coefficient values too.
  outs = [jm.merge(tx, pre, fts, coeffs=(c0[0], jm.transforms.ScaleCoeffs(jnp.float32(s))))["bias"] for s in (0.1, 0.2)]
  np.testing.assert_allclose(outs[1] - pre["bias"], 2 * (outs[0] - pre["bias"]), rtol=1e-5)


DETERMINISTIC = ["simple_average", "task_arithmetic", "nan", "model_stock", "ties", "breadcrumbs", "pcb",
                 "consensus", "localize_stitch"]


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_jit_equals_no_jit_and_permutation_invariance(name):
  pre, fts = _models(t=3, seed=3)
  tx = jm.get_method(name)()
  pre_f, ft, _ = jm.merge.__globals__["prepare"](pre, jm.tree.stack(fts))
  d = {p: ft[p] - pre_f[p][None] for p in pre_f}
  ctx = jm.MergeContext(pretrained=pre_f)
  with jax.disable_jit():
    eager = tx.apply(tx.init(d), d, ctx=ctx)
  jitted = jax.jit(lambda d: tx.apply(tx.init(d), d, ctx=ctx))(d)
  chex.assert_trees_all_close(eager, jitted, rtol=1e-5, atol=1e-6)
  a = jm.merge(tx, pre, fts)
  b = jm.merge(tx, pre, fts[::-1])
  chex.assert_trees_all_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["emr", "tall_mask", "byom"])
def test_per_task_methods_need_merge_per_task(name):
  pre, fts = _models()
  with pytest.raises(ValueError, match="merge_per_task"):
    jm.merge(jm.get_method(name)(), pre, fts)
  outs = jm.merge_per_task(jm.get_method(name)(), pre, fts)
  assert len(outs) == len(fts) and jax.tree.structure(outs[0]) == jax.tree.structure(pre)
  with pytest.raises(ValueError, match="task-preserving"):
    jm.merge_per_task(jm.get_method("ties")(), pre, fts)


# --------------------------------------------------------------------------------------------- errors


def test_unknown_method_and_hyperparameter_list_valid_choices():
  with pytest.raises(ValueError, match="valid methods: .*task_arithmetic"):
    jm.get_method("tie")
  with pytest.raises(ValueError, match=r"valid: \['count', 'density', 'disjoint', 'scale', 'scope'"):
    jm.get_method("ties")(densty=0.1)
  with pytest.raises(ValueError, match="disjoint must be one of"):
    jm.get_method("ties")(disjoint="median")


def test_structure_shape_dtype_mismatches_name_model_and_path():
  pre, fts = _models()
  bad = jax.tree.map(lambda x: x, fts[1])
  bad["enc"]["layers"][0]["fc"]["kernel"] = np.zeros((4, 4), np.float32)
  with pytest.raises(ValueError, match=r"model 1: parameter 'enc/layers/0/fc/kernel' has shape \(4, 4\)"):
    jm.merge(jm.get_method("task_arithmetic")(), pre, [fts[0], bad])
  bad = dict(fts[1])
  del bad["bias"]
  with pytest.raises(ValueError, match=r"expert_b does not match .*missing paths \['bias'\]"):
    jm.merge(jm.get_method("task_arithmetic")(), pre, [fts[0], bad], names=["expert_a", "expert_b"])
  bad = dict(fts[1], bias=fts[1]["bias"].astype(np.float16))
  with pytest.raises(ValueError, match="'bias' has shape .* dtype float16"):
    jm.merge(jm.get_method("task_arithmetic")(), pre, [fts[0], bad])
  bad = dict(fts[1], count=np.arange(3, dtype=np.float32))
  with pytest.raises(ValueError, match="'count'"):
    jm.merge(jm.get_method("task_arithmetic")(), pre, [fts[0], bad])


def test_empty_nan_inf_and_missing_key():
  pre, fts = _models()
  with pytest.raises(ValueError, match="empty"):
    jm.merge(jm.get_method("task_arithmetic")(), pre, [])
  bad = jax.tree.map(lambda x: x, fts[2])
  bad["bias"] = bad["bias"].copy()
  bad["bias"][1] = np.nan
  with pytest.raises(ValueError, match=r"model 2: parameter 'bias' contains NaN or Inf"):
    jm.merge(jm.get_method("task_arithmetic")(), pre, fts[:2] + [bad])
  pinf = dict(pre, bias=np.full(4, np.inf, np.float32))
  with pytest.raises(ValueError, match="pretrained model: parameter 'bias'"):
    jm.merge(jm.get_method("task_arithmetic")(), pinf, fts)
  with pytest.raises(ValueError, match="needs a PRNG key"):
    jm.merge(jm.get_method("dare")(), pre, fts)
  # Stacked fine-tuned models (one leaf with a task axis) through the leaf-by-leaf programs, DARE included.
  st = jm.tree.stack(fts[:2] + [bad])
  for tx, key in ((jm.get_method("task_arithmetic")(), None), (jm.get_method("dare")(), jax.random.key(0))):
    with pytest.raises(ValueError, match=r"model 2: parameter 'bias' contains NaN or Inf"):
      jm.merge(tx, pre, st, key=key)


def test_stacked_input_shape_errors():
  pre, fts = _models()
  st = jm.tree.stack(fts)
  st["bias"] = st["bias"][:, :3]
  with pytest.raises(ValueError, match="'bias'"):
    jm.merge(jm.get_method("task_arithmetic")(), pre, st)
