"""The planner (jaxmerge.merge.route): identities are only trusted on jaxmerge's own steps, nested and flat
spellings of a chain (and a hand-made composition equal to a catalogue method) get the same backend, a forced
backend gives the whole-model program's result, and random chains of built-in steps agree on every backend that
accepts them."""

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jaxmerge as jm
from jaxmerge import reductions as R
from jaxmerge import transforms as T
from jaxmerge.base import MergeTransform, identity_of
from jaxmerge.engine import native
from jaxmerge.engine.planner import BACKENDS
from jaxmerge.engine.xla import runs_by_leaf
from jaxmerge.stream import DictWriter, leafwise, merge_leafwise, merge_streaming


def _two_leaves():
  pre = {"w": np.zeros(2, np.float32), "b": np.zeros(2, np.float32)}
  fts = [{"w": np.ones(2, np.float32), "b": np.ones(2, np.float32)} for _ in range(2)]
  return pre, fts


def _zero_bias_by_path():
  """A leafwise step that reads the parameter path (zeroes the bias), given by hand the identity of a path-free
  step (``per_task``)."""
  step = jm.per_leaf(lambda path, x, **_: x * (0.0 if path == "b" else 1.0))
  return jm.chain(step._replace(identity=("per_task", None)), R.sum_tasks())


def _user_apply_step():
  """The same, as a user's own MergeTransform reading paths with tree_map_with_path, with the deprecated
  ``path_free`` hint and a forged identity."""

  def apply(coeffs, tree, *, key=None, ctx=None):
    del coeffs, key, ctx
    return jax.tree_util.tree_map_with_path(lambda p, x: x * (0.0 if "b" in jax.tree_util.keystr(p) else 1.0), tree)

  with pytest.warns(DeprecationWarning, match="path_free"):
    step = MergeTransform(lambda t: jm.EmptyCoeffs(), apply, "task", path_free=True)
  assert step.identity is None
  return jm.chain(step._replace(identity=("per_task", None)), R.sum_tasks())


@pytest.mark.parametrize("make", [_zero_bias_by_path, _user_apply_step])
def test_a_step_reading_the_path_is_never_run_path_free(make):
  """The issue's two-leaf example: bias [2, 2] instead of [0, 0] when a hint was trusted. An identity counts
  only on the functions the library's factory registered it with (identity_of), so neither step is recognized:
  the whole-model program runs, and streaming refuses what it cannot prove leafwise."""
  pre, fts = _two_leaves()
  tx = make()
  assert identity_of(tx.steps[0]) is None and not runs_by_leaf(tx) and jm.route(tx, pre, fts) == "xla_whole"
  got = jm.merge(tx, pre, fts)
  np.testing.assert_array_equal(np.asarray(got["b"]), [0.0, 0.0])
  np.testing.assert_array_equal(np.asarray(got["w"]), [2.0, 2.0])
  with pytest.raises(ValueError, match="not leafwise"):
    merge_leafwise(tx, pre, fts, DictWriter())
  with pytest.raises(ValueError, match="cannot run this merge"):
    jm.merge(tx, pre, fts, backend="leaf")


def test_per_leaf_steps_stream_with_their_paths():
  """A ``per_leaf`` step is leafwise by construction (streams) but reads the path (never one program per shape)."""
  pre, fts = _two_leaves()
  tx = jm.chain(jm.per_leaf(lambda path, x, **_: x * (0.0 if path == "b" else 1.0)), R.sum_tasks())
  assert identity_of(tx.steps[0])[0] == "per_leaf" and leafwise(tx) and not runs_by_leaf(tx)
  assert jm.route(tx, pre, fts) == "xla_whole"
  w = DictWriter()
  merge_leafwise(tx, pre, fts, w)
  np.testing.assert_array_equal(w["b"], [0.0, 0.0])
  np.testing.assert_array_equal(w["w"], [2.0, 2.0])


def test_identities_name_the_factory_and_its_static_hyperparameters():
  assert identity_of(T.scale(0.3)) == ("scale", 0.3)
  assert identity_of(T.drop(0.9, True)) == ("drop", 0.9, True)
  assert identity_of(R.ties_merge(0.2, "mean")) == ("ties_merge", 0.2, "mean", "reference", "majority")
  user = MergeTransform(lambda t: jm.EmptyCoeffs(), lambda c, t, **k: t)
  assert user.identity is None and identity_of(user) is None
  scale = T.scale(0.3)
  assert identity_of(scale._replace(init=lambda t: None)) is None  # another init: not the factory's step
  assert identity_of(jm.chain(jm.chain(T.drop(0.5), R.sum_tasks()), T.scale(0.5)))[0] == "chain"


def test_old_positional_hints_are_ignored():
  """MergeTransform(init, apply, kind, needs_key, leafwise, flat, path_free, steps, kernel): the old positional
  form still builds the step, keeps its steps, and drops the hints with a DeprecationWarning."""
  init, apply = (lambda t: jm.EmptyCoeffs()), (lambda c, t, **k: t)
  with pytest.warns(DeprecationWarning):
    t = MergeTransform(init, apply, "reduce", False, True, True, True, (), ("sum",))
  assert t == MergeTransform(init, apply, "reduce", False) and identity_of(t) is None


def test_library_steps_stay_by_shape():
  for tx in [jm.get_method("task_arithmetic")(), jm.get_method("ties")(scope="leaf"), T.drop(0.3),
             jm.per_task(lambda x: 2 * x), jm.chain(T.drop(0.2), R.sum_tasks(), T.scale(0.5))]:
    assert runs_by_leaf(tx)


def _models(seed=0, t=3):
  r = np.random.default_rng(seed)
  pre = {"a": r.standard_normal((30, 40)).astype(np.float32), "b": r.standard_normal((30,)).astype(np.float32),
         "c": r.standard_normal((40, 30)).astype(np.float32)}
  fts = [{k: v + r.standard_normal(v.shape).astype(np.float32) for k, v in pre.items()} for _ in range(t)]
  return pre, fts


def _close(a, b, **tol):
  for k in b:
    np.testing.assert_allclose(np.asarray(a[k]), np.asarray(b[k]), **(tol or dict(rtol=1e-5, atol=1e-6)), err_msg=k)


SPELLINGS = {
    "dare on ties": [
        jm.chain(T.drop(0.3), R.ties_merge(0.2), T.scale(0.3)),
        jm.chain(jm.chain(T.drop(0.3), R.ties_merge(0.2)), T.scale(0.3)),
        jm.chain(T.drop(0.3), T.trim(0.2, "global"), R.disjoint_merge("sum", "global"), T.scale(0.3)),
        jm.get_method("dare")(p=0.3, base="ties", density=0.2, scale=0.3),
    ],
    "ties": [
        jm.get_method("ties")(),
        jm.chain(T.trim(0.2, "global"), R.disjoint_merge("sum", "global"), T.scale(0.3)),
        jm.chain(jm.chain(T.trim(0.2, "global"), R.disjoint_merge("sum", "global")), T.scale(0.3)),
    ],
}


@pytest.mark.parametrize("name", sorted(SPELLINGS))
@pytest.mark.parametrize("native_on", [True, False])
def test_spellings_of_one_chain_get_one_backend_and_result(name, native_on, monkeypatch):
  """Nested, flat and hand-composed spellings of a catalogue method: one backend (native on the CPU; without
  it the leaf-then-flat or flat program, never the whole-model program) and one result (the same keys)."""
  if not native_on:
    monkeypatch.setattr(native, "available", lambda: False)
  pre, fts = _models()
  key = jax.random.key(3)
  txs = SPELLINGS[name]
  routes = {jm.route(tx, pre, fts, key=key) for tx in txs}
  assert len(routes) == 1 and "xla_whole" not in routes, routes
  if native_on and native.available.__module__ == "jaxmerge.engine.native":
    assert routes == {"native"}
  want = jm.merge(txs[0], pre, fts, key=key)
  for tx in txs[1:]:
    _close(jm.merge(tx, pre, fts, key=key), want)


@pytest.mark.parametrize("name", sorted(SPELLINGS))
def test_hand_composed_global_ties_streams_exactly(name):
  """A user's own global TIES composition (and its nested spelling) streams in exact passes, no registry name
  needed, with the in-memory result."""
  pre, fts = _models(seed=1)
  key = jax.random.key(4)
  for tx in SPELLINGS[name][1:]:
    w = DictWriter()
    res = merge_streaming(tx, pre, fts, w, key=key)
    assert res.passes >= 2
    _close(w, jm.merge(tx, pre, fts, key=key))


def test_global_stream_plans_are_read_from_identities_not_registry_names():
  """Consensus on TIES, Localize-and-Stitch and a user's ``per_leaf`` step in front of a hand-composed global TIES
  stream in exact passes with no registry name (``merge_streaming`` reads the plan from the steps), with the
  in-memory result."""
  pre, fts = _models(seed=5)
  key = jax.random.key(5)
  for tx in [jm.get_method("consensus")(base="ties", k=1), jm.get_method("localize_stitch")(density=0.2),
             jm.chain(jm.per_leaf(lambda path, x, **_: x * (0.5 if path == "b" else 1.0)), T.trim(0.3, "global"),
                      R.disjoint_merge("sum", "global"))]:
    w = DictWriter()
    res = merge_streaming(tx, pre, fts, w, key=key)
    assert res.passes >= 2
    _close(w, jm.merge(tx, pre, fts, key=key))


def test_forced_backends():
  pre, fts = _models(seed=2)
  tx = jm.get_method("breadcrumbs")()
  with pytest.raises(ValueError, match="backend 'native' cannot run this merge"):
    jm.merge(tx, pre, fts, backend="native")
  with pytest.raises(ValueError, match="unknown backend 'gpu'"):
    jm.merge(tx, pre, fts, backend="gpu")
  tx = jm.get_method("task_arithmetic")()
  for b in ("leaf", "flat", "xla_whole"):
    _close(jm.merge(tx, pre, fts, backend=b), jm.merge(tx, pre, fts))


# Random chains of built-in steps: task-preserving steps, one reduction, then scales; some nested.
_PREFIX = st.one_of(
    st.builds(lambda p: T.drop(p), st.sampled_from([0.0, 0.3])),
    st.builds(lambda d, s: T.trim(d, s), st.sampled_from([0.2, 0.5]), st.sampled_from(["global", "leaf"])),
    st.builds(lambda v: T.scale(v), st.sampled_from([0.5, 2.0])),
)
_REDUCE = st.one_of(
    st.just(R.sum_tasks()), st.just(R.mean_tasks()),
    st.builds(lambda d, f: R.ties_merge(d, f), st.sampled_from([0.2, 1.0]), st.sampled_from(["sum", "mean"])),
    st.builds(lambda f, s, z: R.disjoint_merge(f, s, z), st.sampled_from(["sum", "max"]),
              st.sampled_from(["global", "leaf"]), st.sampled_from(["majority", "positive"])),
)


@st.composite
def _chains(draw):
  steps = draw(st.lists(_PREFIX, max_size=2)) + [draw(_REDUCE)] + draw(st.lists(st.builds(T.scale, st.just(0.3)),
                                                                                   max_size=1))
  cut = draw(st.integers(0, len(steps)))
  if 2 <= cut and draw(st.booleans()):  # nest the first steps
    return jm.chain(jm.chain(*steps[:cut]), *steps[cut:]) if cut < len(steps) else jm.chain(*steps)
  return jm.chain(*steps)


_DATA = tuple({k: v for k, v in m.items() if k != "c"} if isinstance(m, dict) else [{k: v for k, v in f.items()
              if k != "c"} for f in m] for m in _models(seed=5, t=3))


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_chains())
def test_every_backend_that_accepts_a_chain_gives_the_whole_model_result(tx):
  pre, fts = _DATA
  key = jax.random.key(6)
  want = jm.merge(tx, pre, fts, key=key, backend="xla_whole")
  for b in BACKENDS:
    if b in ("xla_whole", "mesh"):
      continue
    try:
      got = jm.merge(tx, pre, fts, key=key, backend=b)
    except ValueError as e:
      assert "cannot run this merge" in str(e)
      continue
    _close(got, want, rtol=2e-5, atol=2e-6)
  if leafwise(tx) or native.spec(tx) is not None:
    w = DictWriter()
    merge_streaming(tx, pre, fts, w, key=key)
    _close(w, want, rtol=2e-5, atol=2e-6)
