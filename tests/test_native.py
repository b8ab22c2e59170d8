"""The native CPU kernels (jaxmerge.engine.native): global TIES, task arithmetic, simple averaging and DARE on either in
one C call, and TIES's thresholds as an XLA custom call.

Every result is compared with jaxmerge's XLA programs (``JAXMERGE_NATIVE=0``), which the parity suite checks
against FusionBench: bit for bit, over the hyperparameter grid, both input layouts, one to several tasks, ties
in the magnitudes, exact cancellations under a negative majority sign (the kernel's fix-up), NaN input and the
fallbacks (no compiler, switched off).
"""

from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmerge as jm
from jaxmerge.engine import native
from jaxmerge import stats
from tests.clip_shapes import make_models

needs_native = pytest.mark.skipif(native._compiler() is None, reason="no C compiler on this machine")


def _xla(monkeypatch, fn):
  """``fn()`` with the native kernels switched off (jaxmerge's XLA programs)."""
  with monkeypatch.context() as m:
    m.setenv("JAXMERGE_NATIVE", "0")
    assert not native.available()
    return fn()


def _quantized(num_tasks, seed=0):
  """Tiny-CLIP models whose task vectors sit on a grid of 1/64: many tied magnitudes and exact cancellations."""
  pre, fts = make_models(num_tasks, seed=seed)
  q = [{k: (pre[k] + np.round((v - pre[k]) * 64) / 64).astype(np.float32) for k, v in f.items()} for f in fts]
  return pre, q


def _equal(a, b, what, pre=None):
  """Equal leaves; with ``pre``, equal up to the rounding of the last multiply-add ``pre + scale * merged``,
  which XLA:CPU fuses into one FMA in some programs and not in others (the kernel always fuses where the CPU
  can): within 2 float32 ulps of ``|pre| + |result|``."""
  assert set(a) == set(b), what
  for k in a:
    x, y = np.asarray(a[k]), np.asarray(b[k])
    assert x.shape == y.shape and x.dtype == y.dtype, (what, k)
    if pre is None:
      np.testing.assert_array_equal(x, y, err_msg=f"{what}: leaf {k}")
    else:
      bound = 2 * np.finfo(np.float32).eps * (np.abs(np.asarray(pre[k], np.float32)) + np.abs(y))
      worst = np.max(np.abs(x.astype(np.float64) - y) - bound, initial=-np.inf)
      assert worst <= 0, f"{what}: leaf {k} differs beyond the last rounding ({worst:.3g})"


@needs_native
def test_builds_and_registers():
  assert native.available()
  path = native.build()
  assert path.exists() and path.suffix == ".so"
  assert native.build() == path  # cached: same file, not rebuilt


@needs_native
@pytest.mark.parametrize("num_tasks", [1, 3])
@pytest.mark.parametrize(
    "hp",
    [
        {},
        {"density": 0.5, "scale": 1.0, "disjoint": "mean"},
        {"density": 0.1, "scale": 0.5, "disjoint": "max"},
        {"density": 0.3, "count": "exact", "zero_sign": "positive", "disjoint": "mean"},
        {"density": 1.0},
        {"density": 0.0, "scale": 2.0},
    ],
)
def test_merge_equals_xla_programs(monkeypatch, num_tasks, hp):
  pre, fts = _quantized(num_tasks)
  tx = jm.get_method("ties")(**hp)
  assert native.spec(tx).op == "ties"
  want = _xla(monkeypatch, lambda: jm.merge(tx, pre, fts))
  _equal(jm.merge(tx, pre, fts), want, f"ties {hp} T={num_tasks}", pre)
  # JAX arrays on the CPU and a stacked (T, ...) layout take the same kernel.
  stacked = jm.tree.stack(fts)
  jpre = jax.tree.map(jnp.asarray, pre)
  _equal(jm.merge(tx, jpre, stacked), want, f"ties {hp} stacked", pre)



def _ties(pre, fts, *, density, scale, merge_func="sum", count="reference", zero_sign="majority"):
  """Global TIES as one native call (jaxmerge.engine.native.run)."""
  return native.run(native.Spec("ties", scale, None, (density, merge_func, count, zero_sign)), pre, fts)


@needs_native
def test_thresholds_and_xla_op_equal_the_host_call(monkeypatch):
  pre, fts = _quantized(4, seed=1)
  keys = sorted(pre)
  p = [pre[k] for k in keys]
  m = [[f[k] for k in keys] for f in fts]
  out, thr, bad = _ties(p, m, density=0.2, scale=0.3)
  assert not bad.any()
  # The exact thresholds: a sort of each task's magnitudes.
  n = sum(x.size for x in p)
  k = stats.threshold_rank(n, 0.2)
  for t in range(4):
    mags = np.sort(np.concatenate([np.abs(f - q).ravel() for f, q in zip(m[t], p)]))
    assert thr[t] == mags[k - 1]
  # The same select as an XLA op inside jit (the CPU path of jaxmerge.stats' per-task thresholds).
  deltas = [jnp.stack([f[i] - p[i] for f in m]) for i in range(len(p))]
  np.testing.assert_array_equal(np.asarray(jax.jit(lambda d: native.ties_thresholds(d, k))(deltas)), thr)


@needs_native
def test_cancellations_under_a_negative_majority(monkeypatch):
  """Zero sign sums with nonzero terms take the model's majority sign, known only after the pass: the kernel
  merges them with + and fixes them up. Built so that the majority is - and such entries exist."""
  rng = np.random.default_rng(0)
  pre = {"a": np.zeros((64, 48), np.float32), "b": np.zeros((300,), np.float32)}
  a = -np.abs(rng.standard_normal((3, 64, 48))).astype(np.float32)  # mostly negative: majority -
  a[0, :8, :8] -= 4.0  # large enough to survive both tasks' trims
  a[1, :8, :8] = -a[0, :8, :8]  # tasks 0 and 1 cancel exactly here; task 2 is zero
  a[2, :8, :8] = 0.0
  b = rng.standard_normal((3, 300)).astype(np.float32)
  fts = [{"a": a[t], "b": b[t]} for t in range(3)]
  for disjoint in ("sum", "mean", "max"):
    tx = jm.get_method("ties")(density=0.9, scale=1.0, disjoint=disjoint)
    want = _xla(monkeypatch, lambda tx=tx: jm.merge(tx, pre, fts))
    got = jm.merge(tx, pre, fts)
    _equal(got, want, f"cancellations {disjoint}", pre)
    # Negative majority: the cancelled entries keep the negative term (disjoint sum/mean) or -max.
    block = np.asarray(got["a"])[:8, :8]
    assert (block <= 0).all() and (block < 0).any()


@needs_native
def test_nan_input_is_named():
  pre, fts = make_models(2)
  bad = {k: v.copy() for k, v in fts[1].items()}
  leaf = sorted(bad)[3]
  bad[leaf].flat[5] = np.nan
  with pytest.raises(ValueError, match=leaf):
    jm.merge(jm.get_method("ties")(), pre, [fts[0], bad])


@needs_native
def test_task_thresholds_use_the_custom_call_on_cpu(monkeypatch):
  """Inside XLA programs (DARE on TIES, Consensus, a jitted trim) the thresholds are one custom call on the CPU,
  equal to the radix select, with gradients flowing around them (trim is piecewise identity)."""
  rng = np.random.default_rng(2)
  leaves = [jnp.asarray(np.round(rng.standard_normal((3,) + s) * 32) / 32, jnp.float32) for s in [(40, 30), (7,), (2, 3, 4, 5)]]
  for count in ("reference", "exact"):
    for density in (0.0, 0.1, 0.5, 0.99):
      f = jax.jit(lambda xs, d=density, c=count: stats.task_thresholds(xs, d, c, use_native=True))
      got = f(leaves)
      want = jax.jit(lambda xs, d=density, c=count: stats.task_thresholds(xs, d, c))(leaves)  # the XLA select
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=f"{count} {density}")
  assert "jaxmerge_ties" in jax.jit(lambda xs: stats.task_thresholds(xs, 0.2, use_native=True)).lower(leaves).as_text()
  assert "jaxmerge_ties" not in jax.jit(lambda xs: stats.task_thresholds(xs, 0.2)).lower(leaves).as_text()
  trim = jm.transforms.trim(0.3)
  tree = {"a": leaves[0], "b": leaves[2]}

  def loss(t):
    return sum(jnp.sum(x**2) for x in jax.tree.leaves(trim.apply(None, t)))

  g = jax.grad(loss)(tree)
  g_xla = _xla(monkeypatch, lambda: jax.grad(loss)(tree))
  _equal(g, g_xla, "grad through trim")
  # Under vmap (one call per mapped element).
  batch = jnp.stack([leaves[0], -leaves[0]])
  v = jax.vmap(lambda x: stats.task_thresholds([x], 0.2, use_native=True))(batch)
  np.testing.assert_array_equal(np.asarray(v[0]), np.asarray(v[1]))


@needs_native
def test_other_inputs_keep_the_xla_route(monkeypatch):
  """float16 leaves, a model mixing float32 and bfloat16 leaves, an explicit coefficient tree and per-leaf TIES
  do not take the kernel: same results as with it switched off."""
  pre, fts = make_models(2)
  f16 = (jax.tree.map(lambda x: jnp.asarray(x, jnp.float16), pre),
         [jax.tree.map(lambda x: jnp.asarray(x, jnp.float16), f) for f in fts])
  tx = jm.get_method("ties")()
  calls = _spy_run(monkeypatch)
  _equal(jm.merge(tx, *f16), _xla(monkeypatch, lambda: jm.merge(tx, *f16)), "fp16")
  k0 = sorted(pre)[0]
  mixed = ({**pre, k0: jnp.asarray(pre[k0], jnp.bfloat16)}, [{**f, k0: jnp.asarray(f[k0], jnp.bfloat16)} for f in fts])
  _equal(jm.merge(tx, *mixed), _xla(monkeypatch, lambda: jm.merge(tx, *mixed)), "mixed dtypes")
  assert not calls
  leaf = jm.get_method("ties")(scope="leaf")
  assert native.spec(leaf) is None
  chained = jm.chain(jm.get_method("ties")(), jm.transforms.scale(2.0))
  assert native.spec(chained) is None  # two scales: left to XLA


def test_switched_off_or_no_compiler_falls_back(monkeypatch, caplog, tmp_path):
  pre, fts = make_models(2)
  tx = jm.get_method("ties")()
  want = _xla(monkeypatch, lambda: jm.merge(tx, pre, fts))
  state = dict(native._state)
  try:
    native._state.clear()
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("JAXMERGE_CACHE", str(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING, logger="jaxmerge.engine.native"):
      assert not native.available()
    assert "unavailable" in caplog.text
    with pytest.raises(RuntimeError, match="unavailable"):
      _ties([pre[k] for k in pre], [[f[k] for k in pre] for f in fts], density=0.2, scale=0.3)
    _equal(jm.merge(tx, pre, fts), want, "fallback")
  finally:
    native._state.clear()
    native._state.update(state)


@needs_native
def test_build_is_atomic_and_reports_compiler_errors(monkeypatch, tmp_path):
  monkeypatch.setenv("JAXMERGE_CACHE", str(tmp_path))
  out = native.build()
  assert out.parent == tmp_path / "native"
  kept = sorted([out.name, out.name + ".sha256"])  # the library and its hash; no temporary file left behind
  assert sorted(p.name for p in out.parent.iterdir()) == kept
  src = tmp_path / "broken.c"
  src.write_text("this is not C\n")
  monkeypatch.setattr(native, "_SOURCE", src)
  with pytest.raises(RuntimeError, match="broken.c"):
    native.build()
  assert sorted(p.name for p in out.parent.iterdir()) == kept


@needs_native
def test_build_without_ifunc_support_drops_the_avx2_clones(monkeypatch, tmp_path):
  """A toolchain that cannot dispatch target_clones (musl has no ifunc) gets the plain loops: the build retries
  with JAXMERGE_NO_CLONES instead of disabling the kernels."""
  real = native._compiler()
  fake = tmp_path / "cc-without-ifunc"
  fake.write_text("#!/bin/sh\n"
                  'case " $* " in *" -DJAXMERGE_NO_CLONES "*) exec "' + real + '" "$@";; esac\n'
                  'echo "error: the call requires ifunc" >&2\nexit 1\n')
  fake.chmod(0o755)
  monkeypatch.setenv("CC", str(fake))
  monkeypatch.setenv("JAXMERGE_CACHE", str(tmp_path / "cache"))
  out = native.build()
  assert out.exists() and b"load_deltas.avx2" not in out.read_bytes()


@needs_native
@pytest.mark.parametrize("density", [0.01, 0.2, 0.9, 0.999])
def test_thresholds_equal_a_sort_over_many_work_items(density):
  """Leaves split into several work items over the threads, with a few huge entries: each task's threshold is
  the k-th smallest magnitude of a sort of all its entries."""
  rng = np.random.default_rng(3)
  pre = [rng.standard_normal(s).astype(np.float32) for s in [(300, 400), (3000,), (50, 40, 3)]]
  fts = [[p + (rng.standard_normal(p.shape) * 0.01 * (t + 1)).astype(np.float32) for p in pre] for t in range(3)]
  fts[1][0][:2, :100] += 100.0
  _, thr, bad = _ties(pre, fts, density=density, scale=0.3)
  assert not bad.any()
  k = stats.threshold_rank(sum(x.size for x in pre), density)
  for t in range(3):
    mags = np.sort(np.concatenate([np.abs(f - p).ravel() for f, p in zip(fts[t], pre)]))
    assert thr[t] == mags[k - 1], (t, density)


def _spy_run(monkeypatch):
  """Records the :class:`native.Spec` of each native merge call."""
  calls = []
  real = native.run
  monkeypatch.setattr(native, "run", lambda sp, *a, **k: (calls.append(sp), real(sp, *a, **k))[1])
  return calls


LINEAR_CASES = [
    ("task_arithmetic", {}),
    ("task_arithmetic", {"scale": 1.0}),
    ("simple_average", {}),
    ("mean_then_scale", {}),
    ("dare", {}),
    ("dare", {"p": 0.3, "scale": 0.7}),
    ("dare", {"p": 0.9, "rescale": False}),
    ("dare", {"p": 0.0}),
    ("dare", {"base": "ties"}),
    ("dare", {"base": "ties", "p": 0.3, "disjoint": "mean", "density": 0.4}),
    ("dare", {"base": "ties", "p": 0.6, "disjoint": "max", "density": 0.1, "scale": 1.0}),
]


def _method(name, hp):
  if name == "mean_then_scale":
    return jm.chain(jm.reductions.mean_tasks(), jm.transforms.scale(0.6))
  return jm.get_method(name)(**hp)


def _small_quantized(num_tasks, seed):
  """Four leaves (a matrix, a bias, a 4-D patch embedding, a 2-D position embedding) whose task vectors sit on a
  grid of 1/64: few shapes, so the XLA reference compiles few leaf programs."""
  rng = np.random.default_rng(seed)
  shapes = {"enc/w": (40, 24), "enc/b": (24,), "patch": (8, 3, 4, 4), "pos": (5, 24)}
  pre = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
  fts = [{k: (pre[k] + np.round(rng.standard_normal(s) * 8) / 64).astype(np.float32) for k, s in shapes.items()}
         for _ in range(num_tasks)]
  return pre, fts


@needs_native
@pytest.mark.parametrize("num_tasks,name,hp", [(3, n, hp) for n, hp in LINEAR_CASES] + [
    (t, n, hp) for t in (1, 8) for n, hp in LINEAR_CASES[::4]])
def test_task_arithmetic_averaging_and_dare_equal_xla_programs(monkeypatch, num_tasks, name, hp):
  """Task arithmetic, simple averaging and DARE (on task arithmetic or TIES) run as one native call: the same
  merge as the XLA programs, with the same random draws (the kernel hashes the same counters under the same
  keys: a single differing draw would change an entry by a whole task-vector entry)."""
  pre, fts = _small_quantized(num_tasks, seed=num_tasks)
  tx = _method(name, hp)
  key = jax.random.key(11)
  want = _xla(monkeypatch, lambda: jm.merge(tx, pre, fts, key=key))
  calls = _spy_run(monkeypatch)
  got = jm.merge(tx, pre, fts, key=key)
  assert len(calls) == 1 and calls[0].op == {"simple_average": "mean", "mean_then_scale": "mean"}.get(
      name, "ties" if hp.get("base") == "ties" else "sum")
  assert (calls[0].drop is not None) == (name == "dare")
  _equal(got, want, f"{name} {hp} T={num_tasks}", pre)
  # The stacked layout reads the same entries.
  stacked = {k: np.stack([f[k] for f in fts]) for k in pre}
  _equal(jm.merge(tx, pre, stacked, key=key), want, f"{name} {hp} stacked", pre)


@needs_native
def test_dare_drops_where_leaf_uniform_says(monkeypatch):
  """The kernel's drop mask is jaxmerge.tree.leaf_uniform's, entry for entry: with one task, no rescale and a
  scale of 1, the merged task vector keeps exactly the entries whose draw is >= p (the drop is the chain's
  first step, so its key is fold_in(key, 0))."""
  pre, fts = _small_quantized(1, seed=2)
  key = jax.random.key(5)
  calls = _spy_run(monkeypatch)
  got = jm.merge(jm.get_method("dare")(p=0.4, rescale=False, scale=1.0), pre, fts, key=key)
  assert calls
  from jaxmerge import tree as jtree

  for k in pre:
    d = fts[0][k] - pre[k]
    u = np.asarray(jtree.leaf_uniform(jax.random.fold_in(key, 0), k, (1, *np.shape(pre[k]))))[0]
    kept = np.asarray(got[k]) - pre[k]
    np.testing.assert_array_equal(kept != 0, (u >= np.float32(0.4)) & (d != 0), err_msg=k)
  ids = [jtree.leaf_id(k) for k in pre]
  bits = native.dare_keys(key, list(pre))
  for n, k in enumerate(pre):
    want = jax.random.bits(jtree.leaf_key(key, k), (3,), jnp.uint32)
    np.testing.assert_array_equal(bits[n], np.asarray(want), err_msg=f"{k} (id {ids[n]})")


@needs_native
def test_linear_routes_name_nan_and_keep_xla_for_the_rest(monkeypatch):
  """NaN in a model is named (model and leaf) on the native route; DARE's L1 rescale (its TIES part still
  native, on the dropped task vectors), p = 1, float16 leaves and more than 64 tasks for a sum keep the XLA
  programs, with the same results as with the kernels switched off."""
  pre, fts = _small_quantized(3, seed=6)
  bad = [dict(f) for f in fts]
  k0 = sorted(pre)[1]
  bad[2][k0] = np.array(bad[2][k0], copy=True)
  bad[2][k0].flat[3] = np.nan
  for name in ("task_arithmetic", "simple_average"):
    with pytest.raises(ValueError, match=r"model 2.*" + k0.replace("/", ".")):
      jm.merge(jm.get_method(name)(), pre, bad)
  with pytest.raises(ValueError, match=r"model 2"):
    jm.merge(jm.get_method("dare")(), pre, bad, key=jax.random.key(0))
  key = jax.random.key(3)
  l1 = jm.get_method("dare")(base="ties", rescale="l1")
  assert native.spec(l1) is None
  rows = []
  real = native.ties_rows
  monkeypatch.setattr(native, "ties_rows", lambda *a, **k: (rows.append(1), real(*a, **k))[1])
  _equal(jm.merge(l1, pre, fts, key=key), _xla(monkeypatch, lambda: jm.merge(l1, pre, fts, key=key)), "l1", pre)
  assert rows, "DARE's L1 rescale on TIES: the TIES part runs on the dropped task vectors natively"
  calls = _spy_run(monkeypatch)
  everything = jm.get_method("dare")(p=1.0)
  assert native.spec(everything) is None
  out = jm.merge(everything, pre, fts, key=key)
  for k in pre:
    np.testing.assert_array_equal(np.asarray(out[k]), pre[k])
  f16 = (jax.tree.map(lambda x: jnp.asarray(x, jnp.float16), pre),
         [jax.tree.map(lambda x: jnp.asarray(x, jnp.float16), f) for f in fts])
  ta = jm.get_method("task_arithmetic")()
  _equal(jm.merge(ta, *f16), _xla(monkeypatch, lambda: jm.merge(ta, *f16)), "fp16 task arithmetic")
  assert not calls
  assert not native.fits(65, 10, native.spec(ta)) and native.fits(64, 10, native.spec(ta))
  assert native.fits(1024, 10) and not native.fits(4, 2**31, native.spec(jm.get_method("dare")()), [2**30])


@needs_native
@pytest.mark.parametrize("name,hp", [("ties", {}), ("ties", {"disjoint": "mean", "density": 0.5}), ("task_arithmetic", {}),
                                     ("simple_average", {}), ("dare", {"p": 0.3}), ("dare", {"base": "ties"})])
def test_bfloat16_leaves_run_natively(monkeypatch, name, hp):
  """bfloat16 models (list and stacked) are read as they are, merged in float32 and rounded to bfloat16 (nearest
  even, as XLA's convert): the XLA programs' result, up to one bfloat16 ulp where the final multiply-add's
  rounding (fused or not) falls on a rounding boundary; NaN in a bfloat16 model is still named."""
  pre, fts = _small_quantized(3, seed=7)
  pre = {k: v.astype(jnp.bfloat16) for k, v in pre.items()}
  fts = [{k: v.astype(jnp.bfloat16) for k, v in f.items()} for f in fts]
  tx = jm.get_method(name)(**hp)
  key = jax.random.key(2)
  want = _xla(monkeypatch, lambda: jm.merge(tx, pre, fts, key=key))
  calls = _spy_run(monkeypatch)
  stacked = {k: np.stack([f[k] for f in fts]) for k in pre}
  for got in (jm.merge(tx, pre, fts, key=key), jm.merge(tx, pre, stacked, key=key)):
    for k in pre:
      a, b = np.asarray(want[k]), np.asarray(got[k])
      assert b.dtype == jnp.bfloat16 and b.shape == a.shape, k
      ulps = np.abs(a.view(np.int16).astype(np.int64) - b.view(np.int16).astype(np.int64))
      assert ulps.max() <= 1 and (ulps > 0).mean() < 0.01, (k, ulps.max(), (ulps > 0).mean())
  assert len(calls) == 2
  bad = [dict(f) for f in fts]
  bad[1]["pos"] = np.array(bad[1]["pos"], copy=True)
  bad[1]["pos"][0, 0] = np.inf
  with pytest.raises(ValueError, match="model 1.*pos"):
    jm.merge(tx, pre, bad, key=key)


@needs_native
@pytest.mark.parametrize("name", ["ties", "task_arithmetic", "dare"])
def test_leaf_shapes_and_layouts_are_kept(monkeypatch, name):
  """Scalar, empty and Fortran-ordered leaves: the native merge returns every leaf in its shape, with the XLA
  programs' values."""
  rng = np.random.default_rng(1)
  pre = {"w": rng.standard_normal((5, 3)).astype(np.float32), "s": np.array(2.0, np.float32),
         "e": np.zeros((0, 4), np.float32)}
  fts = [{k: (v + rng.standard_normal(v.shape)).astype(np.float32) for k, v in pre.items()} for _ in range(3)]
  fts[1]["w"] = np.asfortranarray(fts[1]["w"])
  tx = jm.get_method(name)()
  key = jax.random.key(4)
  calls = _spy_run(monkeypatch)
  got = jm.merge(tx, pre, fts, key=key)
  assert calls
  want = _xla(monkeypatch, lambda: jm.merge(tx, pre, fts, key=key))
  for k in pre:
    assert np.shape(got[k]) == np.shape(pre[k]), k
  _equal(got, want, name, pre)


def test_fits_bounds():
  assert native.fits(1, 10) and native.fits(1024, 2**32 - 1)
  assert not native.fits(0, 10) and not native.fits(1025, 10) and not native.fits(4, 2**32) and not native.fits(4, 0)


@needs_native
def test_accelerator_programs_keep_the_xla_select():
  """Lowered for a GPU (no GPU needed: cross-platform lowering), a program with TIES's thresholds holds no call
  of the CPU kernel; lowered for the CPU, it does."""
  leaves = [jnp.ones((3, 100, 10)), jnp.ones((3, 7))]
  f = jax.jit(lambda xs: stats.task_thresholds(xs, 0.2, use_native=True))
  ok = [jax.export.DisabledSafetyCheck.custom_call("jaxmerge_ties")]
  assert "jaxmerge_ties" not in jax.export.export(f, platforms=["cuda"], disabled_checks=ok)(leaves).mlir_module()
  assert "jaxmerge_ties" in jax.export.export(f, platforms=["cpu"], disabled_checks=ok)(leaves).mlir_module()


@needs_native
@pytest.mark.parametrize("num_tasks", [40, 1024])
def test_many_tasks_match_the_numpy_reference(num_tasks):
  """More tasks than the kernel's on-stack block (16) and, at 1024, the most it takes (its histograms then run
  on one thread): the merge equals the NumPy loop of tests/reference.py."""
  from tests import reference as ref

  rng = np.random.default_rng(num_tasks)
  pre = {"w": rng.standard_normal((40, 30)).astype(np.float32), "b": rng.standard_normal(50).astype(np.float32)}
  fts = [{k: (v + rng.standard_normal(v.shape) * 0.1).astype(np.float32) for k, v in pre.items()}
         for _ in range(num_tasks)]
  keys = sorted(pre)
  out, _, bad = _ties([pre[k] for k in keys], [[f[k] for k in keys] for f in fts], density=0.3, scale=0.4)
  assert not bad.any()
  want = ref.ties(pre, fts, density=0.3, scale=0.4)
  for k, o in zip(keys, out):
    np.testing.assert_allclose(np.asarray(o), want[k], rtol=1e-5, atol=1e-5, err_msg=k)


@needs_native
def test_cache_loads_only_a_hash_checked_library_of_the_users(monkeypatch, caplog, tmp_path):
  """A truncated or planted library in the cache is never returned (it is rebuilt with a warning); a cache
  directory others can write, or owned by someone else, is not used at all."""
  monkeypatch.setenv("JAXMERGE_CACHE", str(tmp_path))
  out = native.build()
  good = out.read_bytes()
  assert (tmp_path / "native").stat().st_mode & 0o077 == 0  # created private
  assert out.with_name(out.name + ".sha256").read_text().strip() == native._digest(out)
  # Truncated (a crash mid-copy, a full disk): rebuilt, not loaded.
  out.write_bytes(good[:100])
  with caplog.at_level(logging.WARNING, logger="jaxmerge.engine.native"):
    assert native.build() == out
  assert "does not match the hash" in caplog.text and out.read_bytes() == good
  # A file planted under the library's name (with a hash file of its own that does not match it): rebuilt.
  out.write_bytes(b"\x7fELF planted")
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger="jaxmerge.engine.native"):
    native.build()
  assert "rebuilding" in caplog.text and out.read_bytes() == good
  # A symbolic link in its place: rebuilt.
  out.unlink()
  out.symlink_to(tmp_path / "elsewhere.so")
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger="jaxmerge.engine.native"):
    native.build()
  assert "symbolic link" in caplog.text and not out.is_symlink()
  # A group- or world-writable cache directory: a private temporary build, the shared one untouched.
  (tmp_path / "native").chmod(0o777)
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger="jaxmerge.engine.native"):
    private = native.build()
  assert "writable by group or others" in caplog.text
  assert private.parent != out.parent and private.parent.stat().st_mode & 0o077 == 0
  (tmp_path / "native").chmod(0o700)
  # A cache directory owned by another user (simulated): not used either.
  uid = os.getuid()
  monkeypatch.setattr(native.os, "getuid", lambda: uid + 1)
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger="jaxmerge.engine.native"):
    assert native.build().parent != out.parent
  assert "owned by uid" in caplog.text


@needs_native
def test_cache_survives_a_group_writable_umask(monkeypatch, caplog, tmp_path):
  """Under umask 002 (user private groups) the cache is still created private and reused without a warning."""
  monkeypatch.setenv("JAXMERGE_CACHE", str(tmp_path))
  old = os.umask(0o002)
  try:
    out = native.build()
    with caplog.at_level(logging.WARNING, logger="jaxmerge.engine.native"):
      assert native.build() == out
  finally:
    os.umask(old)
  assert caplog.text == ""
  for p in (out, out.with_name(out.name + ".sha256"), out.parent):
    assert p.stat().st_mode & 0o022 == 0, p
