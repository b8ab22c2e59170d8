"""The JAX CLIP against transformers' PyTorch CLIP (tiny random configs saved locally), and the HF round trip."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmerge as jm
from jaxmerge.io import hf
from jaxmerge.models import clip

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

CONFIGS = [
    dict(act="quick_gelu", width=32, heads=4, patch=8, image=32, proj=16, text_len=12, eos=2),
    dict(act="gelu", width=24, heads=3, patch=4, image=16, proj=8, text_len=9, eos=5),
]


def _save_tiny(tmp_path, c):
  torch.manual_seed(0)
  vcfg = dict(hidden_size=c["width"], intermediate_size=2 * c["width"], num_hidden_layers=2,
              num_attention_heads=c["heads"], image_size=c["image"], patch_size=c["patch"], hidden_act=c["act"])
  tcfg = dict(hidden_size=c["width"], intermediate_size=2 * c["width"], num_hidden_layers=2,
              num_attention_heads=c["heads"], vocab_size=50, max_position_embeddings=c["text_len"],
              hidden_act=c["act"], eos_token_id=c["eos"], bos_token_id=0, pad_token_id=1)
  cfg = transformers.CLIPConfig(text_config=tcfg, vision_config=vcfg, projection_dim=c["proj"])
  model = transformers.CLIPModel(cfg).eval()
  with torch.no_grad():  # non-trivial layer norms and logit scale
    for name, p in model.named_parameters():
      if "norm" in name or "logit_scale" in name:
        p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(tmp_path / "clip")
  return model


@pytest.mark.parametrize("c", CONFIGS)
def test_parity_with_transformers(tmp_path, c):
  model = _save_tiny(tmp_path, c)
  cfg, params = hf.load_clip(tmp_path / "clip")
  rng = np.random.default_rng(0)
  images = rng.standard_normal((3, c["image"], c["image"], 3)).astype(np.float32)
  ids = rng.integers(3, 50, (3, c["text_len"]))
  ids[:, 0] = 0
  lengths = [c["text_len"], 5, 7]
  mask = np.zeros_like(ids)
  for i, n in enumerate(lengths):
    ids[i, n - 1] = c["eos"] if c["eos"] != 2 else 49  # eos_token_id == 2: pooling at the highest id
    ids[i, n:] = 1
    mask[i, :n] = 1
  with torch.no_grad():
    ti = model.get_image_features(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)))
    tt = model.get_text_features(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    ti, tt = getattr(ti, "pooler_output", ti), getattr(tt, "pooler_output", tt)
    tl = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
               pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2))).logits_per_image
  ji = jax.jit(lambda p, x: clip.encode_image(cfg, p, x))(params, images)
  jt = jax.jit(lambda p, i, m: clip.encode_text(cfg, p, i, m))(params, ids, mask)
  np.testing.assert_allclose(ji, ti.numpy(), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(jt, tt.numpy(), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(clip.logits(ji, jt, params["logit_scale"]), tl.numpy(), rtol=1e-4, atol=1e-4)


def test_merged_vision_tower_round_trips_through_transformers(tmp_path):
  model = _save_tiny(tmp_path, CONFIGS[0])
  cfg, params = hf.load_clip(tmp_path / "clip")
  r = np.random.default_rng(1)
  experts = [jax.tree.map(lambda x: x + 0.01 * r.standard_normal(x.shape).astype(np.float32), params["vision_model"])
             for _ in range(2)]
  merged = jm.merge(jm.get_method("ties")(), params["vision_model"], experts, layout=jm.filters.flax_layout)
  vparams = {"vision_model": merged}
  vcfg = clip.ClipConfig(**{**cfg.__dict__, "projection_dim": None, "has_text": False})
  hf.save_clip_vision(tmp_path / "merged", vcfg, vparams)
  tv = transformers.CLIPVisionModel.from_pretrained(tmp_path / "merged").eval()
  images = r.standard_normal((2, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    want = tv(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2))).pooler_output.numpy()
  cfg2, p2 = hf.load_clip(tmp_path / "merged")
  assert not cfg2.has_text and cfg2.projection_dim is None
  np.testing.assert_allclose(clip.encode_image(cfg2, p2, images), want, rtol=1e-4, atol=1e-4)
  del model


def test_layouts_agree_on_clip_weights(tmp_path):
  _save_tiny(tmp_path, CONFIGS[1])
  cfg, params = hf.load_clip(tmp_path / "clip")
  r = np.random.default_rng(2)
  experts = [jax.tree.map(lambda x: x + 0.05 * r.standard_normal(x.shape).astype(np.float32), params["vision_model"])
             for _ in range(3)]
  ours = jm.merge(jm.get_method("breadcrumbs")(), params["vision_model"], experts, layout=jm.filters.flax_layout)
  full = lambda v: {**params, "vision_model": v}  # noqa: E731
  hf_pre = {k: v for k, v in hf.to_hf_state_dict(cfg, params).items() if k.startswith("vision_model.")}
  hf_exp = [{k: v for k, v in hf.to_hf_state_dict(cfg, full(e)).items() if k.startswith("vision_model.")} for e in experts]
  theirs = jm.merge(jm.get_method("breadcrumbs")(), hf_pre, hf_exp)
  back = hf.to_hf_state_dict(cfg, full(ours))
  for k, v in theirs.items():
    np.testing.assert_allclose(back[k], np.asarray(v), rtol=1e-6, atol=1e-7)


def test_errors(tmp_path):
  model = _save_tiny(tmp_path, CONFIGS[0])
  state = hf.to_hf_state_dict(*hf.load_clip(tmp_path / "clip"))
  cfg = hf.load_clip(tmp_path / "clip")[0]
  bad = dict(state)
  bad.pop("vision_model.post_layernorm.bias")
  bad["vision_model.encoder.layers.0.mlp.fc1.weight"] = np.zeros((3, 3), np.float32)
  bad["extra.weight"] = np.zeros(2, np.float32)
  with pytest.raises(ValueError, match=r"missing keys \['vision_model.post_layernorm.bias'\].*fc1.weight: \(3, 3\).*extra.weight"):
    hf.from_hf_state_dict(cfg, bad)
  transformers.BertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                          intermediate_size=8).save_pretrained(tmp_path / "bert")
  with pytest.raises(ValueError, match="'bert' checkpoint, not a CLIP model"):
    hf.load_clip(tmp_path / "bert")
  with pytest.raises(ValueError, match=r"images must be \[B, 32, 32, 3\]"):
    clip.encode_image(cfg, hf.load_clip(tmp_path / "clip")[1], jnp.zeros((1, 16, 16, 3)))
  del model
