"""The flat merge path (one ``(T, N)`` array for ``flat`` transforms) equals the leaf-by-leaf program exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmerge as jm
from jaxmerge import filters as jfilters
from jaxmerge import transforms as T
from jaxmerge import tree as jtree
from jaxmerge.engine import planner, xla
from jaxmerge.engine.merge import prepare


def _models(t=3, seed=0):
  rng = np.random.default_rng(seed)
  shapes = {"a": (7, 5), "b": (5,), "c": (2, 3, 4), "d": (64,)}
  pre = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
  fts = [{k: v + rng.standard_normal(v.shape).astype(np.float32) * 0.1 for k, v in pre.items()} for _ in range(t)]
  return pre, fts


FLAT_METHODS = [
    ("task_arithmetic", {"scale": 0.4}),
    ("simple_average", {}),
    ("ties", {}),
    ("ties", {"disjoint": "mean", "density": 0.5}),
    ("ties", {"zero_sign": "positive", "count": "exact"}),
    ("localize_stitch", {"density": 0.2}),
]


@pytest.mark.parametrize("name,hp", FLAT_METHODS)
def test_flat_path_equals_leafwise_program(name, hp):
  tx = jm.get_method(name)(**hp)
  assert xla.runs_flat(tx), f"{name} should run on the flat path"
  pre, fts = _models()
  flat = jm.merge(tx, pre, fts)
  p, f, _ = prepare(pre, fts)
  leafwise = xla.whole_program(tx, jfilters.hf_layout, False)(p, f, None, None)
  for k in pre:
    np.testing.assert_array_equal(np.asarray(flat[k]), np.asarray(leafwise[k]), err_msg=k)
    assert flat[k].shape == pre[k].shape and flat[k].dtype == jnp.float32


def test_flat_path_stacked_input_and_per_task():
  pre, fts = _models(t=4, seed=1)
  stacked = {k: np.stack([m[k] for m in fts]) for k in pre}
  tx = jm.get_method("ties")()
  a, b = jm.merge(tx, pre, fts), jm.merge(tx, pre, stacked)
  for k in pre:
    np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))
  per = T.trim(0.3)  # task-preserving, global scope: flat
  assert xla.runs_flat(per)
  models = jm.merge_per_task(per, pre, fts)
  p, f, _ = prepare(pre, fts)
  ref = xla.whole_program(per, jfilters.hf_layout, True)(p, f, None, None)
  for k in pre:
    np.testing.assert_array_equal(np.stack([np.asarray(m[k]) for m in models]), np.asarray(ref[k]))


def test_flat_flag_propagates_and_leafwise_steps_are_not_flat():
  assert xla.runs_flat(jm.chain(T.trim(0.2), jm.get_method("task_arithmetic")()))
  assert not xla.runs_flat(T.trim(0.2, scope="leaf"))
  assert not xla.runs_flat(jm.get_method("dare")())  # per-leaf random keys
  assert not xla.runs_flat(jm.get_method("ties")(scope="leaf"))


def test_flat_path_names_nan_leaf_and_model():
  pre, fts = _models()
  fts[1]["c"] = fts[1]["c"].copy()
  fts[1]["c"][0, 1, 2] = np.nan
  with pytest.raises(ValueError, match=r"model 1.*'c'"):
    jm.merge(jm.get_method("ties")(), pre, fts)


def test_mixed_dtypes_fall_back_to_leafwise_program():
  pre, fts = _models()
  pre = dict(pre, b=pre["b"].astype(jnp.bfloat16))
  fts = [dict(m, b=m["b"].astype(jnp.bfloat16)) for m in fts]
  out = jm.merge(jm.get_method("ties")(), pre, fts)
  assert out["b"].dtype == jnp.bfloat16 and out["a"].dtype == jnp.float32


@pytest.mark.parametrize("name,hp", [("dare", {"base": "ties"}),
                                     ("dare", {"base": "ties", "p": 0.3, "rescale": False, "disjoint": "mean"}),
                                     ("consensus", {"base": "ties", "k": 1})])
def test_leafwise_prefix_then_flat_steps_equal_the_whole_model_program(name, hp, monkeypatch):
  """DARE (or Consensus) on global TIES: the drop (mask) runs leaf by leaf, one program per leaf shape, TIES on
  the flat view; the result equals the one whole-model program bit for bit (same random draws), and NaN is
  still named."""
  monkeypatch.setenv("JAXMERGE_NATIVE", "0")  # the XLA route (DARE on TIES is otherwise one native call)
  tx = jm.get_method(name)(**hp)
  prefix, rest = planner.leaf_then_flat(tx)
  assert prefix.needs_key == (name == "dare") and not rest.needs_key and xla.runs_flat(rest)
  assert planner.leaf_then_flat(jm.get_method("ties")()) is None  # wholly flat: the flat path
  assert planner.leaf_then_flat(jm.get_method("dare")()) is None  # wholly leafwise: leaf by leaf
  pre, fts = _models(t=4, seed=2)
  pre["e"], fts = pre["a"] + 1, [dict(m, e=m["a"] + 1) for m in fts]  # two leaves of one shape
  key = jax.random.key(5)
  assert jm.route(tx, pre, fts, key=key) == "leaf_then_flat", "DARE on TIES should take the leaf-then-flat route"
  got = jm.merge(tx, pre, fts, key=key)
  p, f, _ = prepare(pre, fts)
  ref = xla.whole_program(tx, jfilters.hf_layout, False)(p, f, None, key)
  for k in pre:
    np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(ref[k]), err_msg=k)
  assert xla.prefix_program(prefix, jfilters.hf_layout, True)._cache_size() == len({v.shape for v in pre.values()})
  fts[2] = dict(fts[2], d=np.full(64, np.inf, np.float32))
  with pytest.raises(ValueError, match=r"model 2.*'d'"):
    jm.merge(tx, pre, fts, key=key)


def test_fence_is_identity_and_global_sum_exact():
  x = jnp.array([3.0, -1.0, 2.5, 0.0])
  np.testing.assert_array_equal(np.asarray(jax.jit(jtree.fence)(x)), np.asarray(x))
  parts = [jnp.float32(v) for v in (1.0, 2.0, -4.0, 8.0)]
  assert float(jax.jit(jtree.global_sum)(parts)) == 7.0


@pytest.mark.parametrize("tasks,bound", [(4, 0.75), (8, 0.45)])
@pytest.mark.parametrize("kw", [{}, {"disjoint": "mean"}, {"disjoint": "max", "zero_sign": "positive"}])
def test_ties_scratch_memory_is_not_a_copy_of_the_task_vectors(tasks, bound, kw):
  """XLA's own count of the flat TIES program's scratch memory stays well below the ``(T, N)`` task vectors:
  the trimmed stack is never stored (the merge pass trims again from the task vectors), and at most a few
  tasks' histogram indices are live at once (before: 1.17x / 1.15x the task vectors at 4 / 8 tasks)."""
  tx = jm.get_method("ties")(**kw)
  tv = {"flat": jax.ShapeDtypeStruct((tasks, 1_000_000), jnp.float32)}
  stats = jax.jit(lambda tv: tx.apply(tx.init(tv), tv)).lower(tv).compile().memory_analysis()
  assert stats.temp_size_in_bytes < bound * stats.argument_size_in_bytes, (stats.temp_size_in_bytes, stats.argument_size_in_bytes)
