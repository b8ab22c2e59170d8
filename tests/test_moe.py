"""Properties of the model-level merges (issue 7, acceptance points 1 and 4) on a tiny CLIP vision tower.

- WEMoE with a zero router (bias lambda) equals task arithmetic(lambda); SMILE with one task at full rank
  equals the expert; Twin and BYOM with one-hot routing and full rank equal each expert; the EMR, TALL, TSV-C
  and BYOM per-task models equal ``jm.merge_per_task``'s models (their definitions); FREE with cut-off 0 and
  no experts equals task arithmetic with ``lambda_t = E(tau_t) / sum E`` (closed form in NumPy).
- Upcycled models jit, vmap over batches, save and restore with orbax, keep the plain tower's call signature;
  unknown task ids and router/expert shape mismatches raise ``ValueError``; only routers train.
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxmerge as jm
import jaxmerge.moe as moe
from jaxmerge.models import clip

CFG = clip.ClipConfig.tiny(has_text=False, projection_dim=None, vision_layers=1, image_size=16, patch_size=8)
T = 3


@pytest.fixture(scope="module")
def setup():
  pre = clip.init_params(CFG, jax.random.key(0))["vision_model"]
  fts = [jax.tree.map(lambda x, k=k: x + 0.05 * jax.random.normal(jax.random.fold_in(jax.random.key(k), x.size), x.shape), pre)
         for k in range(1, T + 1)]
  images = jax.random.normal(jax.random.key(9), (2, 16, 16, 3))
  fwd = jax.jit(lambda p, x: clip.vision_features(CFG, {"vision_model": p}, x))
  return pre, fts, images, fwd


def _call(model, x):
  graphdef, state = nnx.split(model)
  return _apply(graphdef, state, x)


def _apply(graphdef, state, x):
  return jax.jit(lambda s, xx: nnx.merge(graphdef, s)(xx))(state, x)


def _max_diff(a, b):
  return max(float(jnp.max(jnp.abs(jnp.asarray(u, jnp.float32) - jnp.asarray(v, jnp.float32))))
             for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _zero_router_kernels(model):
  for _, node in nnx.iter_graph(model):
    if isinstance(node, moe.WEMoEMLP):
      for layer in node.router.layers.values():
        layer["kernel"][...] = jnp.zeros_like(layer["kernel"][...])


def test_wemoe_zero_router_is_task_arithmetic(setup):
  pre, fts, images, fwd = setup
  model = moe.wemoe(CFG, pre, fts, key=jax.random.key(1), init_lambda=0.4)
  ta = jm.merge(jm.get_method("task_arithmetic")(scale=0.4), pre, fts)
  before = _call(model, images)
  assert _max_diff(before, fwd(ta, images)) > 1e-6  # random routers: not TA
  _zero_router_kernels(model)
  np.testing.assert_allclose(_call(model, images), fwd(ta, images), atol=2e-5)


def test_smile_one_task_full_rank_is_the_expert(setup):
  pre, fts, images, fwd = setup
  model = moe.smile(CFG, pre, fts[:1], k=None, gate_k=2, average_experts=True)
  np.testing.assert_allclose(_call(model, images), fwd(fts[0], images), atol=2e-5)
  low = moe.smile(CFG, pre, fts[:1], k=1, gate_k=1, average_experts=True)  # rank 1 is not the expert
  assert _max_diff(_call(low, images), fwd(fts[0], images)) > 1e-4


def test_smile_routing_matches_numpy_loop():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(5, 6)).astype(np.float32)
  w0, wt = rng.normal(size=(6, 4)).astype(np.float32), rng.normal(size=(3, 6, 4)).astype(np.float32)
  b0, bt = rng.normal(size=4).astype(np.float32), rng.normal(size=(3, 4)).astype(np.float32)
  f = moe.math.smile_factors(w0, wt, b0, bt, k=4, gate_k=2)
  y = np.asarray(moe.math.smile_linear(x, w0, b0, f, top_k=2))
  for i in range(5):  # the paper's formula, one token at a time
    scores = []
    for t in range(3):
      u, s, vt = np.linalg.svd((wt[t] - w0).T)  # PyTorch layout (out, in): V spans the input space
      scores.append(np.linalg.norm(vt[:2] @ x[i]))
    p = np.exp(scores - np.max(scores))
    p /= p.sum()
    top = np.argsort(-p)[:2]
    want = x[i] @ w0 + b0 + sum(p[t] / p[top].sum() * (x[i] @ (wt[t] - w0) + bt[t] - b0) for t in top)
    np.testing.assert_allclose(y[i], want, atol=1e-4)


@pytest.mark.parametrize("name", ["emr", "tall_mask", "tsv_c", "byom"])
def test_per_task_models_match_their_definitions(setup, name):
  pre, fts, images, fwd = setup
  build = {"emr": moe.emr_model, "tall_mask": moe.tall_model, "tsv_c": moe.low_rank_model, "byom": moe.byom_model}
  model = build[name](fwd, pre, fts)
  if name == "tsv_c" and "tsv_c" not in jm.list_methods():
    pytest.skip("tsv_c is not registered")
  ref = jm.merge_per_task(jm.get_method(name)(), pre, fts, layout=jm.filters.flax_layout)
  for t in range(T):
    assert _max_diff(model.task_params(t), ref[t]) < 1e-5
  np.testing.assert_allclose(model(images, 1), fwd(ref[1], images), atol=1e-5)
  if name == "emr":  # a traced task id selects the same model (jit + vmap over tasks)
    outs = jax.jit(jax.vmap(lambda t: model(images, t)))(jnp.arange(T))
    np.testing.assert_allclose(outs[2], fwd(ref[2], images), atol=1e-5)
  with pytest.raises(ValueError, match="unknown task id"):
    model(images, T)
  assert 0 < model.extra_params()


def test_twin_and_byom_one_hot_full_rank_are_the_experts(setup):
  pre, fts, images, fwd = setup
  twin = moe.twin_model(fwd, pre, fts, rank=None)
  byom = moe.byom_model(fwd, pre, fts, density=1.0)
  lora = moe.low_rank_model(fwd, pre, fts, rank=10_000, name="byom_lora")
  for t in range(T):
    for m in (twin, byom, lora):
      assert _max_diff(m.task_params(t), fts[t]) < 1e-5, (m.name, t)
  # One-hot routing weights per sample: sample b gets expert onehot[b]'s model.
  w = jax.nn.one_hot(jnp.array([2, 0]), T)
  out = twin(images, weights=w)
  np.testing.assert_allclose(out[0], fwd(fts[2], images[:1])[0], atol=1e-5)
  np.testing.assert_allclose(out[1], fwd(fts[0], images[1:])[0], atol=1e-5)


def test_free_cutoff_zero_no_experts_is_weighted_task_arithmetic(setup):
  pre, fts, images, fwd = setup
  model = moe.free_model(fwd, pre, fts, cutoff=0.0, density=None)
  flat = [np.concatenate([np.ravel(np.asarray(f) - np.asarray(p)) for f, p in zip(jax.tree.leaves(ft), jax.tree.leaves(pre))])
          for ft in fts]
  lam = np.array([np.mean(np.abs(v)) for v in flat])
  lam /= lam.sum()
  want = jax.tree.map(lambda p, *f: p + sum(l * (x - p) for l, x in zip(lam, f)), pre, *fts)
  assert _max_diff(model.params(jnp.zeros(T)), want) < 1e-5
  # A positive cut-off removes the lowest frequencies (not the same model).
  hp = moe.free_model(fwd, pre, fts, cutoff=2.0, density=None)
  assert _max_diff(hp.params(jnp.zeros(T)), want) > 1e-4


def test_high_pass_is_transpose_symmetric_and_all_pass_at_zero():
  x = jax.random.normal(jax.random.key(0), (6, 9))
  np.testing.assert_allclose(moe.math.high_pass(x, 0.0), x, atol=1e-5)
  np.testing.assert_allclose(moe.math.high_pass(x.T, 2.5), moe.math.high_pass(x, 2.5).T, atol=1e-5)
  # Cut-off above every frequency radius removes everything.
  np.testing.assert_allclose(moe.math.high_pass(x, 100.0), 0.0, atol=1e-5)


def test_upcycled_model_jit_vmap_signature_and_input_untouched(setup):
  pre, fts, images, fwd = setup
  plain = moe.vision_module(CFG, pre)
  before = nnx.to_pure_dict(nnx.state(plain))
  up = moe.upcycle(plain, clip.MLP, lambda path, m: moe.WEMoEMLP(
      m, {n: {lf: jnp.zeros((T, *getattr(getattr(m, n), lf)[...].shape)) for lf in ("kernel", "bias")}
          for n in ("fc1", "fc2")}, moe.math.init_router(jax.random.key(0), 32, T), path=path))
  assert isinstance(plain.encoder.layers["0"].mlp, clip.MLP)  # input untouched
  assert _max_diff(nnx.to_pure_dict(nnx.state(plain)), before) == 0
  assert inspect.signature(type(up).__call__) == inspect.signature(type(plain).__call__)
  # Zero task vectors: the upcycled tower is the plain one, jitted, and per batch under vmap.
  np.testing.assert_allclose(_call(up, images), fwd(pre, images), atol=2e-5)
  graphdef, state = nnx.split(up)
  batches = jnp.stack([images, images[::-1]])
  out = jax.jit(jax.vmap(lambda x: nnx.merge(graphdef, state)(x)))(batches)
  np.testing.assert_allclose(out[1], fwd(pre, images[::-1]), atol=2e-5)


def test_save_restore_and_router_only_training(setup, tmp_path):
  pre, fts, images, fwd = setup
  model = moe.wemoe(CFG, pre, fts, key=jax.random.key(3))
  moe.save_state(tmp_path / "ckpt", model)
  fresh = moe.wemoe(CFG, pre, fts, key=jax.random.key(4))  # other routers
  assert _max_diff(_call(fresh, images), _call(model, images)) > 0
  restored = moe.load_state(tmp_path / "ckpt", fresh)
  np.testing.assert_allclose(_call(restored, images), _call(model, images), atol=1e-6)
  with pytest.raises(ValueError, match="does not match"):
    moe.load_state(tmp_path / "ckpt", moe.wemoe(CFG, pre, fts[:2], key=jax.random.key(4)))
  # Only the routers are RouterParam; training them with jaxmerge.tta.fit changes nothing else.
  import optax

  from jaxmerge import tta

  n_router = moe.count_params(model, moe.RouterParam)
  assert 0 < n_router < moe.count_params(model) / 4
  adapter, frozen, rebuild = moe.router_adapter(model, lambda m, extra, batch: m(batch))
  loss = lambda out, batch: jnp.mean(tta.entropy(out))  # noqa: E731
  theta, hist = tta.fit(adapter, {"model": frozen}, optax.adam(1e-2), iter([images] * 3), loss,
                        key=jax.random.key(0), steps=3, progress=False)
  trained = rebuild(theta)
  assert hist["loss"].shape == (3,)
  assert _max_diff(nnx.to_pure_dict(nnx.state(trained, moe.RouterParam)),
                   nnx.to_pure_dict(nnx.state(model, moe.RouterParam))) > 0
  assert _max_diff(nnx.to_pure_dict(nnx.state(trained, nnx.Not(moe.RouterParam))),
                   nnx.to_pure_dict(nnx.state(model, nnx.Not(moe.RouterParam)))) == 0


def test_shape_mismatches_are_clear_errors(setup):
  pre, fts, images, fwd = setup
  mlp = moe.vision_module(CFG, pre).encoder.layers["0"].mlp
  deltas = {n: {lf: jnp.zeros((T, *getattr(getattr(mlp, n), lf)[...].shape)) for lf in ("kernel", "bias")}
            for n in ("fc1", "fc2")}
  with pytest.raises(ValueError, match="router has 2 outputs for 3 experts"):
    moe.WEMoEMLP(mlp, deltas, moe.math.init_router(jax.random.key(0), 32, 2), path="encoder/layers/0/mlp")
  with pytest.raises(ValueError, match="router input size"):
    moe.WEMoEMLP(mlp, deltas, moe.math.init_router(jax.random.key(0), 16, T))
  bad = {**deltas, "fc1": {**deltas["fc1"], "kernel": jnp.zeros((T, 5, 5))}}
  with pytest.raises(ValueError, match="fc1/kernel"):
    moe.WEMoEMLP(mlp, bad, moe.math.init_router(jax.random.key(0), 32, T))
  f = moe.math.smile_factors(np.zeros((32, 128)), np.ones((2, 32, 128)), k=2, gate_k=1)
  with pytest.raises(ValueError, match="SMILE fc"):
    moe.SmileLinear(moe.vision_module(CFG, pre).encoder.layers["0"].mlp.fc2, f, path="fc")
  twin = moe.twin_model(fwd, pre, fts, rank=2)
  with pytest.raises(ValueError, match="router has 2 outputs for 3 experts"):
    moe.ExpertModel(fwd, pre, twin.base, twin.experts, T, (moe.math.init_router(jax.random.key(0), 32, 2), fwd))
  with pytest.raises(ValueError, match="upcycle"):
    moe.upcycle(moe.vision_module(CFG, pre), moe.SmileLinear, lambda p, m: m)
