"""Hugging Face CLIP checkpoints <-> jaxmerge params: the name map, every on-disk format, the hub cache, atomic
writes, and the errors."""

import json
import os
import pathlib
import shutil

import jax
import numpy as np
import pytest

from jaxmerge.io import hf
from jaxmerge.models import clip
from tests import clip_fixtures as F

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

C = F.CONFIGS[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """A tiny CLIPModel on disk and its loaded (config, params)."""
  path, model = F.save_tiny_clip(tmp_path_factory.mktemp("tiny") / "clip", C, tokenizer=False, preprocessor=False)
  cfg, params = hf.load_clip(path)
  return path, model, cfg, params


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_name_map_is_a_bijection_and_round_trips(tiny):
  path, model, cfg, params = tiny
  names = hf.name_map(cfg)
  hf_names = [n for n, _, _ in names]
  paths = [p for _, p, _ in names]
  assert len(set(hf_names)) == len(hf_names) == len(set(paths))
  sd = {k: v.numpy() for k, v in model.state_dict().items() if not k.endswith("position_ids")}
  assert set(hf_names) == set(sd)  # every HF tensor is mapped, nothing else
  flat = {"/".join(str(getattr(k, "key", k)) for k in kp) for kp, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
  assert set(paths) == flat
  back = hf.to_hf_state_dict(cfg, params)
  assert set(back) == set(sd)
  for k in sd:
    np.testing.assert_array_equal(back[k], sd[k])
  _assert_trees_equal(hf.from_hf_state_dict(cfg, back), params)
  # layouts: (out, in) Linear -> (in, out) kernel; (O, I, kh, kw) conv -> (kh, kw, I, O)
  np.testing.assert_array_equal(params["vision_model"]["encoder"]["layers"]["1"]["mlp"]["fc1"]["kernel"],
                                sd["vision_model.encoder.layers.1.mlp.fc1.weight"].T)
  np.testing.assert_array_equal(params["vision_model"]["embeddings"]["patch_embedding"]["kernel"],
                                sd["vision_model.embeddings.patch_embedding.weight"].transpose(2, 3, 1, 0))
  vcfg = cfg.vision_only()
  vsd = hf.to_hf_state_dict(vcfg, params, vision_only=True, vision_prefix="")
  assert all(not k.startswith(("vision_model.", "text_model.", "visual_")) for k in vsd)
  _assert_trees_equal(hf.from_hf_state_dict(vcfg, vsd), {"vision_model": params["vision_model"]})


def test_every_checkpoint_format_loads_the_same_params(tiny, tmp_path, monkeypatch):
  path, model, cfg, params = tiny
  # sharded safetensors with an index
  model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
  assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
  _assert_trees_equal(hf.load_clip(tmp_path / "sharded")[1], params)
  # pytorch_model.bin (torch importable)
  sd = {k: v for k, v in model.state_dict().items()}
  (tmp_path / "bin").mkdir()
  shutil.copy(path / "config.json", tmp_path / "bin" / "config.json")
  torch.save(sd, tmp_path / "bin" / "pytorch_model.bin")
  _assert_trees_equal(hf.load_clip(tmp_path / "bin")[1], params)
  # ... and a clear error when torch is not importable
  def no_torch():
    raise ImportError("No module named 'torch'")

  monkeypatch.setattr(hf, "_import_torch", no_torch)
  with pytest.raises(ValueError, match="only PyTorch .bin weights and torch is not installed"):
    hf.load_clip(tmp_path / "bin")
  monkeypatch.undo()
  # a weights file given directly
  _assert_trees_equal(hf.load_clip(path / "model.safetensors")[1], params)


def test_vision_models_with_and_without_prefix(tiny, tmp_path):
  path, model, cfg, params = tiny
  # transformers 5's save_pretrained writes CLIPVisionModel keys without "vision_model."
  vpath, vmodel = F.save_tiny_vision(tmp_path / "v5", C, from_clip=model)
  from safetensors.numpy import load_file
  assert not any(k.startswith("vision_model.") for k in load_file(vpath / "model.safetensors"))
  vcfg, vparams = hf.load_clip(vpath)
  assert vcfg == cfg.vision_only()
  _assert_trees_equal(vparams, {"vision_model": params["vision_model"]})
  # save_clip_vision writes the prefixed (transformers 4) spelling; both spellings load to the same params
  out = hf.save_clip_vision(tmp_path / "v4", cfg, params)
  assert all(k.startswith("vision_model.") for k in load_file(out / "model.safetensors"))
  _assert_trees_equal(hf.load_clip(out)[1], vparams)
  out5 = hf.save_clip_vision(tmp_path / "v5b", cfg, params, vision_prefix="")
  _assert_trees_equal(hf.load_clip(out5)[1], vparams)
  for d in (out, out5):
    m, info = transformers.CLIPVisionModel.from_pretrained(d, output_loading_info=True)
    assert not any(info.values()), info
  # a vision tower next to a CLIPModel config (what `jaxmerge merge` writes for merged vision towers)
  shutil.copy(path / "config.json", tmp_path / "v4" / "config.json")
  c2, p2 = hf.load_clip(tmp_path / "v4")
  assert c2 == cfg.vision_only()
  _assert_trees_equal(p2, vparams)
  # CLIPVisionModelWithProjection keeps its projection
  wp = transformers.CLIPVisionModelWithProjection(F.hf_config(C).vision_config)
  wp.save_pretrained(tmp_path / "wp")
  wcfg, wparams = hf.load_clip(tmp_path / "wp")
  assert wcfg.projection_dim == wp.config.projection_dim and "visual_projection" in wparams
  x = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    want = wp.eval()(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).image_embeds.numpy()
  np.testing.assert_allclose(clip.encode_image(wcfg, wparams, x), want, rtol=1e-4, atol=1e-4)


def test_save_clip_full_model_and_bfloat16(tiny, tmp_path):
  path, model, cfg, params = tiny
  out = hf.save_clip(tmp_path / "full", cfg, params)
  m, info = transformers.CLIPModel.from_pretrained(out, output_loading_info=True)
  assert not any(info.values()), info
  sd = model.state_dict()
  for k, v in m.state_dict().items():
    np.testing.assert_array_equal(v.numpy(), sd[k].numpy())
  bf = jax.tree.map(lambda x: np.asarray(x).astype(jax.numpy.bfloat16), params)
  hf.save_clip(tmp_path / "bf16", cfg, bf)
  assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
  c2, p2 = hf.load_clip(tmp_path / "bf16")
  assert p2["vision_model"]["pre_layrnorm"]["scale"].dtype == np.dtype(jax.numpy.bfloat16)
  _assert_trees_equal(p2, bf)


def test_hub_cache_resolution_offline(tiny, tmp_path, monkeypatch):
  """A repo id resolves through the local hub cache with HF_HUB_OFFLINE=1 (no network)."""
  path, model, cfg, params = tiny
  import huggingface_hub.constants as hc

  cache = tmp_path / "hub"
  repo = cache / "models--tiny-org--tiny-clip"
  commit = "0123456789abcdef0123456789abcdef01234567"
  (repo / "refs").mkdir(parents=True)
  (repo / "refs" / "main").write_text(commit)
  shutil.copytree(path, repo / "snapshots" / commit)
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
  monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
  monkeypatch.chdir(tmp_path)  # "tiny-org/tiny-clip" is not a local path here
  c2, p2 = hf.load_clip("tiny-org/tiny-clip")
  assert c2 == cfg
  _assert_trees_equal(p2, params)
  with pytest.raises(ValueError, match="neither a local path nor a repo in the Hugging Face cache"):
    hf.load_clip("tiny-org/not-cached")


def test_atomic_writes(tiny, tmp_path, monkeypatch):
  path, model, cfg, params = tiny
  out = hf.save_clip_vision(tmp_path / "tower", cfg, params)
  before = (out / "model.safetensors").read_bytes()
  from jaxmerge.io import safetensors_io

  def boom(*a, **k):
    raise RuntimeError("disk full")

  monkeypatch.setattr(safetensors_io, "save", boom)
  changed = jax.tree.map(lambda x: np.asarray(x) + 1, params)
  with pytest.raises(RuntimeError, match="disk full"):
    hf.save_clip_vision(tmp_path / "tower", cfg, changed)
  assert (out / "model.safetensors").read_bytes() == before  # the old directory is intact
  assert sorted(os.listdir(tmp_path)) == ["tower"]  # no temporary directories left behind
  monkeypatch.undo()
  hf.save_clip_vision(tmp_path / "tower", cfg, changed)  # replacing an existing directory works
  _assert_trees_equal(hf.load_clip(out)[1]["vision_model"], changed["vision_model"])
  assert sorted(os.listdir(tmp_path)) == ["tower"]


def test_errors(tiny, tmp_path):
  path, model, cfg, params = tiny
  state = hf.to_hf_state_dict(cfg, params)
  bad = dict(state)
  bad.pop("vision_model.post_layernorm.bias")
  bad["vision_model.encoder.layers.0.mlp.fc1.weight"] = np.zeros((3, 3), np.float32)
  bad["extra.weight"] = np.zeros(2, np.float32)
  with pytest.raises(ValueError, match=r"missing keys \['vision_model.post_layernorm.bias'\], misshapen keys "
                                       r"\['vision_model.encoder.layers.0.mlp.fc1.weight: \(3, 3\) \(expected \(64, 32\)\)'\], "
                                       r"unexpected keys \['extra.weight'\]"):
    hf.from_hf_state_dict(cfg, bad)
  # other architectures
  transformers.BertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                          intermediate_size=8).save_pretrained(tmp_path / "bert")
  with pytest.raises(ValueError, match=r"holds a 'bert' checkpoint .*not a CLIP model"):
    hf.load_clip(tmp_path / "bert")
  vit = transformers.ViTModel(transformers.ViTConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                                     intermediate_size=8, image_size=8, patch_size=4))
  vit.save_pretrained(tmp_path / "vit")
  with pytest.raises(ValueError, match=r"'vit' checkpoint \(ViTModel\), not a CLIP model"):
    hf.load_clip(tmp_path / "vit")
  # corrupt and truncated safetensors name the file
  for name, mutate in (("truncated", lambda b: b[: len(b) // 2]), ("garbage", lambda b: b"\xff" * 8 + b[8:64])):
    d = tmp_path / name
    shutil.copytree(path, d)
    f = d / "model.safetensors"
    f.write_bytes(mutate(f.read_bytes()))
    with pytest.raises(ValueError, match=str(f).replace(".", r"\.")):
      hf.load_clip(d)
  # a fine-tuned tower whose width differs from the pretrained model's
  wide = dict(C, width=48, heads=4, mlp=96)
  wpath, _ = F.save_tiny_vision(tmp_path / "wide", wide)
  with pytest.raises(ValueError, match=r"not compatible with the pretrained model: vision_width: 48 \(expected 32\)"):
    hf.load_clip(wpath, like=cfg)
  # missing pieces
  (tmp_path / "noconfig").mkdir()
  shutil.copy(path / "model.safetensors", tmp_path / "noconfig" / "model.safetensors")
  with pytest.raises(ValueError, match="has no config.json; pass config="):
    hf.load_clip(tmp_path / "noconfig")
  assert hf.load_clip(tmp_path / "noconfig", config=cfg)[0] == cfg
  with pytest.raises(ValueError, match="does not exist"):
    hf.load_clip(tmp_path / "nowhere")
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "config.json").write_text((path / "config.json").read_text())
  with pytest.raises(ValueError, match="no safetensors or orbax checkpoint"):
    hf.load_clip(tmp_path / "empty")
  with pytest.raises(ValueError, match=r"params has no 'vision_model/post_layernorm/bias'"):
    broken = jax.tree.map(lambda x: x, params)
    del broken["vision_model"]["post_layernorm"]["bias"]
    hf.save_clip_vision(tmp_path / "x", cfg, broken)
  assert not (tmp_path / "x").exists()
