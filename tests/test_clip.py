"""The Flax CLIP against transformers' PyTorch CLIPModel (tiny random configs saved with save_pretrained), the NNX
module form, and the functional contract (jit, layer keys, dtypes, errors)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxmerge as jm
from jaxmerge.io import hf
from jaxmerge.models import clip
from tests import clip_fixtures as F

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _text_inputs(c, cfg, rng, batch=4):
  """Token ids with different lengths; padding after the end-of-text token (padding id == eos id for the
  configs whose eos is not 2, so that "first eos" pooling is exercised)."""
  n = c["text_len"]
  eos = cfg.eos_token_id
  ids = rng.integers(3, min(cfg.vocab_size, F.EOS_ID) - 1, (batch, n))
  ids[:, 0] = cfg.bos_token_id
  mask = np.zeros_like(ids)
  for i, length in enumerate([n, 2, n // 2 + 1, n - 1][:batch]):
    ids[i, length - 1] = eos if eos != 2 else cfg.vocab_size - 1  # legacy rule: pooled at the largest id
    ids[i, length:] = cfg.pad_token_id
    mask[i, :length] = 1
  return ids, mask


@pytest.mark.parity
@pytest.mark.parametrize("c", F.CONFIGS, ids=[c["name"] for c in F.CONFIGS])
def test_parity_with_transformers(tmp_path, c):
  path, model = F.save_tiny_clip(tmp_path / "clip", c, tokenizer=False, preprocessor=False)
  cfg, params = hf.load_clip(path)
  assert (cfg.hidden_act, cfg.patch_size, cfg.projection_dim, cfg.context_length) == (c["act"], c["patch"], c["proj"], c["text_len"])
  rng = np.random.default_rng(0)
  images = rng.standard_normal((3, c["image"], c["image"], 3)).astype(np.float32)
  ids, mask = _text_inputs(c, cfg, rng)
  pix = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
  with torch.no_grad():
    ti = model.get_image_features(pixel_values=pix).pooler_output.numpy()
    tt = model.get_text_features(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).pooler_output.numpy()
    tl = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), pixel_values=pix).logits_per_image.numpy()
  ji = jax.jit(lambda p, x: clip.encode_image(cfg, p, x))(params, images)
  jt = jax.jit(lambda p, i, m: clip.encode_text(cfg, p, i, m))(params, ids, mask)
  np.testing.assert_allclose(ji, ti, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(jt, tt, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(clip.logits(ji, jt, params["logit_scale"]), tl, rtol=1e-4, atol=1e-4)
  assert np.abs(ji).max() > 0.1 and np.abs(jt).max() > 0.1  # non-degenerate outputs


def test_nnx_module_and_functional_api_agree(key):
  cfg = clip.ClipConfig.tiny()
  model = clip.CLIP(cfg, rngs=nnx.Rngs(0))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  ref = clip.init_params(cfg, key)
  assert jax.tree.structure(params) == jax.tree.structure(ref)
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, ref)
  assert set(params["vision_model"]["encoder"]["layers"]) == {"0", "1"}  # documented: string layer keys
  images = jax.random.normal(key, (2, 32, 32, 3))
  ids = jnp.asarray([[0, 5, 9, 63] + [1] * 12, [0, 7, 63] + [1] * 13], jnp.int32)
  # the module's own forward (nnx.jit over the module) == the functional API on its pure dict (jitted: eager
  # mode compiles every primitive separately, which is what made this test slow)
  pooled, text, emb = nnx.jit(lambda m, x, i: (m.vision_model(x), m.text_model(i), m.encode_image(x)))(model, images, ids)
  f_pooled, f_text, f_emb = jax.jit(lambda p, x, i: (clip.vision_features(cfg, p, x), clip.encode_text(cfg, p, i),
                                                     clip.encode_image(cfg, p, x)))(params, images, ids)
  np.testing.assert_allclose(pooled, f_pooled, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(text @ params["text_projection"]["kernel"], f_text, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(emb, f_emb, rtol=1e-6, atol=1e-6)


def test_functional_contract(key):
  cfg = clip.ClipConfig.tiny()
  params = clip.init_params(cfg, key)
  images = jax.random.normal(key, (3, 32, 32, 3))
  ids = jnp.asarray(np.tile(np.r_[0, 4, 8, 63, [1] * 12], (3, 1)), jnp.int32)
  mask = (ids != 1).astype(jnp.int32)
  enc = jax.jit(clip.encode_image, static_argnums=0)
  eager = clip.encode_image(cfg, params, images)  # works outside jit too (the only eager call: it is slow)
  assert eager.shape == (3, cfg.projection_dim)
  jitted = enc(cfg, params, images)
  np.testing.assert_allclose(jitted, eager, rtol=1e-6, atol=1e-6)
  # integer layer keys (an nnx.List state) give the same model
  as_int = jax.tree.map(lambda x: x, params)
  for tower in ("vision_model", "text_model"):
    layers = as_int[tower]["encoder"]["layers"]
    as_int[tower]["encoder"]["layers"] = {int(k): v for k, v in layers.items()}
  text = jax.jit(lambda a, b: (clip.encode_text(cfg, a, ids, mask), clip.encode_text(cfg, b, ids, mask)))
  t_int, t_str = text(as_int, params)
  np.testing.assert_array_equal(enc(cfg, as_int, images), jitted)
  np.testing.assert_array_equal(t_int, t_str)
  # bfloat16 parameters are upcast: equal to float32 math on the rounded weights
  bf = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  rounded = jax.tree.map(lambda x: x.astype(jnp.float32), bf)
  np.testing.assert_allclose(enc(cfg, bf, images), enc(cfg, rounded, images), rtol=1e-6, atol=1e-6)
  # gradients flow through the pure function
  g = jax.jit(jax.grad(lambda p: jnp.sum(clip.encode_image(cfg, p, images) ** 2)))(params)
  assert float(jnp.abs(g["vision_model"]["encoder"]["layers"]["1"]["mlp"]["fc2"]["kernel"]).max()) > 0
  # vision-only configs return the pooled output
  vcfg = cfg.vision_only()
  pooled, feats = jax.jit(lambda p: (clip.encode_image(vcfg, {"vision_model": p["vision_model"]}, images),
                                     clip.vision_features(cfg, p, images)))(params)
  np.testing.assert_allclose(pooled, feats, rtol=1e-6)
  np.testing.assert_allclose(eager, pooled @ params["visual_projection"]["kernel"], rtol=1e-5, atol=1e-6)


def test_presets_and_hf_config_round_trip():
  for cfg in (clip.ClipConfig.vit_b32(), clip.ClipConfig.vit_b16(), clip.ClipConfig.vit_l14(), clip.ClipConfig.tiny()):
    assert clip.ClipConfig.from_hf(cfg.to_hf()) == cfg
    v = cfg.vision_only()
    assert clip.ClipConfig.from_hf(v.to_hf()) == v
  b32 = transformers.CLIPConfig()  # transformers' defaults are ViT-B/32's sizes
  assert clip.ClipConfig.from_hf(b32).replace(eos_token_id=2, bos_token_id=0, pad_token_id=1, logit_scale_init=clip.ClipConfig().logit_scale_init) \
      == clip.ClipConfig.vit_b32()
  assert clip.ClipConfig.vit_l14().num_positions == 257 and clip.ClipConfig.vit_b16().num_positions == 197


def test_merged_vision_tower_round_trips_through_transformers(tmp_path):
  c = F.CONFIGS[0]
  path, _ = F.save_tiny_clip(tmp_path / "clip", c, tokenizer=False, preprocessor=False)
  cfg, params = hf.load_clip(path)
  r = np.random.default_rng(1)
  experts = [jax.tree.map(lambda x: x + 0.01 * r.standard_normal(x.shape).astype(np.float32), params["vision_model"])
             for _ in range(2)]
  merged = jm.merge(jm.get_method("ties")(), params["vision_model"], experts, layout=jm.filters.flax_layout)
  out = hf.save_clip_vision(tmp_path / "merged", cfg, {"vision_model": merged})
  tv, info = transformers.CLIPVisionModel.from_pretrained(out, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
  images = r.standard_normal((2, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    want = tv.eval()(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).pooler_output.numpy()
  cfg2, p2 = hf.load_clip(out)
  assert cfg2 == cfg.vision_only()
  np.testing.assert_allclose(clip.encode_image(cfg2, p2, images), want, rtol=1e-4, atol=1e-4)
  # the merged tower evaluated with the pretrained projection = transformers' CLIPModel with that tower swapped in
  full = transformers.CLIPModel.from_pretrained(path).eval()
  full.vision_model.load_state_dict(tv.state_dict())
  with torch.no_grad():
    want_proj = full.get_image_features(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).pooler_output.numpy()
  got = clip.encode_image(cfg, {**params, "vision_model": p2["vision_model"]}, images)
  np.testing.assert_allclose(got, want_proj, rtol=1e-4, atol=1e-4)


def test_layouts_agree_on_clip_weights(tmp_path):
  """Merging Flax-layout params with flax_layout == merging the HF state dict with hf_layout."""
  path, _ = F.save_tiny_clip(tmp_path / "clip", F.CONFIGS[1], tokenizer=False, preprocessor=False)
  cfg, params = hf.load_clip(path)
  r = np.random.default_rng(2)
  experts = [jax.tree.map(lambda x: x + 0.05 * r.standard_normal(x.shape).astype(np.float32), params["vision_model"])
             for _ in range(3)]
  ours = jm.merge(jm.get_method("breadcrumbs")(), params["vision_model"], experts, layout=jm.filters.flax_layout)
  vcfg = cfg.vision_only()
  to_hf = lambda v: hf.to_hf_state_dict(vcfg, {"vision_model": v})  # noqa: E731
  theirs = jm.merge(jm.get_method("breadcrumbs")(), to_hf(params["vision_model"]), [to_hf(e) for e in experts])
  back = to_hf(ours)
  assert set(back) == set(theirs)
  for k, v in theirs.items():
    np.testing.assert_allclose(back[k], np.asarray(v), rtol=1e-6, atol=1e-7)


def test_errors(key):
  cfg = clip.ClipConfig.tiny()
  params = clip.init_params(cfg, key)
  with pytest.raises(ValueError, match=r"images must be \[B, 32, 32, 3\], got \(1, 16, 16, 3\)"):
    clip.encode_image(cfg, params, jnp.zeros((1, 16, 16, 3)))
  broken = jax.tree.map(lambda x: x, params)
  del broken["vision_model"]["post_layernorm"]["bias"]
  broken["vision_model"]["encoder"]["layers"]["0"]["mlp"]["fc1"]["kernel"] = jnp.zeros((3, 3))
  with pytest.raises(ValueError, match=r"missing \['post_layernorm/bias'\].*encoder/layers/0/mlp/fc1/kernel: \(3, 3\)"):
    clip.encode_image(cfg, broken, jnp.zeros((1, 32, 32, 3)))
  with pytest.raises(ValueError, match="no visual_projection/kernel"):
    clip.encode_image(cfg, {"vision_model": params["vision_model"]}, jnp.zeros((1, 32, 32, 3)))
  with pytest.raises(ValueError, match="needs a model with a text tower"):
    clip.encode_text(cfg.vision_only(), params, jnp.zeros((1, 4), jnp.int32))
  with pytest.raises(ValueError, match=r"T <= 16"):
    clip.encode_text(cfg, params, jnp.zeros((1, 17), jnp.int32))
  with pytest.raises(ValueError, match="unsupported hidden_act 'relu'"):
    clip.ClipConfig.tiny(hidden_act="relu")
  with pytest.raises(ValueError, match="not divisible"):
    clip.ClipConfig.tiny(vision_heads=3)
  wide = cfg.replace(vision_width=64, vision_heads=4)
  with pytest.raises(ValueError, match=r"vision_width: 64 \(expected 32\)"):
    clip.check_compatible(cfg, wide)
