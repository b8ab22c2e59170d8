"""mergekit configs' I/O features in ``jaxmerge merge``: slices (layer stacking, in memory and streamed), models
by hub id (a fake hub cache, ``HF_HUB_OFFLINE``), ``config.json``'s ``dtype`` read back by transformers, the
tokenizer settings streamed, and the errors naming the bad setting. Parity with mergekit itself on its own
configs: ``tests/parity/test_mergekit_suite.py``."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from jaxmerge import cli
from jaxmerge import config as C
from jaxmerge.io import hub
from jaxmerge.io import layers
from jaxmerge.io import safetensors_io as S

LAYER = {"self_attn.q_proj.weight": (4, 4), "mlp.up_proj.weight": (6, 4), "input_layernorm.weight": (4,)}


def _llama(path: pathlib.Path, n: int, seed: int, dtype=np.float32) -> dict:
  """A Llama-named checkpoint with ``n`` layers (layer ``i``'s tensors are ``seed * 100 + i`` plus noise)."""
  r = np.random.default_rng(seed)
  sd = {"model.embed_tokens.weight": r.standard_normal((8, 4)), "model.norm.weight": r.standard_normal(4),
        "lm_head.weight": r.standard_normal((8, 4))}
  for i in range(n):
    for k, s in LAYER.items():
      sd[f"model.layers.{i}.{k}"] = seed * 100 + i + 0.01 * r.standard_normal(s)
  sd = {k: np.asarray(v, dtype) for k, v in sd.items()}
  path.mkdir(parents=True)
  S.save(path / "model.safetensors", sd, metadata={"format": "pt"})
  (path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                                "num_hidden_layers": n, "vocab_size": 8, "torch_dtype": "float32"}))
  return sd


def _merge(cfg, tmp_path, out, *flags):
  (tmp_path / "m.yml").write_text(json.dumps(cfg))
  return cli.main(["merge", str(tmp_path / "m.yml"), "--out", str(tmp_path / out), *flags])


def test_layer_names():
  assert layers.layer_of("model.layers.12.mlp.up_proj.weight") == ("model.layers.", 12, "mlp.up_proj.weight")
  assert layers.layer_of("transformer.h.3.attn.c_attn.bias") == ("transformer.h.", 3, "attn.c_attn.bias")
  assert layers.layer_of("model.norm.weight") is None


def test_passthrough_slices_stack_and_renumber_layers(tmp_path):
  a = _llama(tmp_path / "a", 4, 1)
  b = _llama(tmp_path / "b", 3, 2)
  cfg = {"merge_method": "passthrough", "dtype": "bfloat16",
         "slices": [{"sources": [{"model": "a", "layer_range": [1, 3]}]},
                    {"sources": [{"model": "b", "layer_range": [0, 3]}]}]}
  assert _merge(cfg, tmp_path, "mem") == 0
  assert _merge(cfg, tmp_path, "st", "--stream") == 0
  mem, st = S.load(tmp_path / "mem"), S.load(tmp_path / "st")
  assert set(mem) == set(st) and {k for k in mem if ".layers." in k} == {
      f"model.layers.{i}.{k}" for i in range(5) for k in LAYER}
  for k in mem:
    np.testing.assert_array_equal(np.asarray(mem[k], np.float32), np.asarray(st[k], np.float32), err_msg=k)
  # output layers 0-1 are a's layers 1-2, layers 2-4 are b's 0-2; the embedding is a's, the norm and head b's
  bf = lambda x: np.asarray(x.astype(mem["model.norm.weight"].dtype), np.float32)  # noqa: E731
  for out_i, (src, i) in enumerate([(a, 1), (a, 2), (b, 0), (b, 1), (b, 2)]):
    np.testing.assert_array_equal(np.asarray(mem[f"model.layers.{out_i}.mlp.up_proj.weight"], np.float32),
                                  bf(src[f"model.layers.{i}.mlp.up_proj.weight"]))
  np.testing.assert_array_equal(np.asarray(mem["model.embed_tokens.weight"], np.float32),
                                bf(a["model.embed_tokens.weight"]))
  np.testing.assert_array_equal(np.asarray(mem["lm_head.weight"], np.float32), bf(b["lm_head.weight"]))
  out_cfg = json.loads((tmp_path / "mem" / "config.json").read_text())
  assert out_cfg["num_hidden_layers"] == 5 and out_cfg["dtype"] == "bfloat16" and "torch_dtype" not in out_cfg
  info = json.loads((tmp_path / "st" / "merge_info.json").read_text())
  assert info["num_layers"] == 5 and info["stream"] is True


def test_merged_slices_equal_the_hand_computed_mix(tmp_path):
  a = _llama(tmp_path / "a", 4, 1)
  b = _llama(tmp_path / "b", 4, 2)
  cfg = {"merge_method": "linear", "dtype": "float32",
         "slices": [{"sources": [{"model": "a", "layer_range": [0, 2], "parameters": {"weight": 3.0}},
                                 {"model": "b", "layer_range": [2, 4], "parameters": {"weight": 1.0}}]}]}
  assert _merge(cfg, tmp_path, "mem") == 0
  assert _merge(cfg, tmp_path, "st", "--stream") == 0
  mem, st = S.load(tmp_path / "mem"), S.load(tmp_path / "st")
  for i in range(2):
    for k in LAYER:
      want = 0.75 * a[f"model.layers.{i}.{k}"] + 0.25 * b[f"model.layers.{i + 2}.{k}"]
      np.testing.assert_allclose(mem[f"model.layers.{i}.{k}"], want, rtol=1e-6, atol=1e-6)
      np.testing.assert_array_equal(mem[f"model.layers.{i}.{k}"], st[f"model.layers.{i}.{k}"])
  np.testing.assert_allclose(mem["model.norm.weight"], 0.75 * a["model.norm.weight"] + 0.25 * b["model.norm.weight"],
                             rtol=1e-6)
  assert json.loads((tmp_path / "mem" / "config.json").read_text())["num_hidden_layers"] == 2


@pytest.mark.parametrize("slices,match", [
    ([{"sources": [{"model": "a", "layer_range": [0, 2]}, {"model": "b", "layer_range": [0, 3]}]}],
     r"slices\[0\]: every source of a slice must have the same number of layers"),
    ([{"sources": [{"model": "a", "layer_range": [2, 2]}]}], r"layer_range must be \[start, end\)"),
    ([{"sources": [{"model": "a", "layer_range": [0, 2], "weird": 1}]}], r"unknown keys \['weird'\]"),
    ([{"sources": [{"model": "a", "layer_range": [0, 2]}, {"model": "a", "layer_range": [1, 3]}]}],
     "lists model a twice"),
])
def test_bad_slices_are_errors_naming_them(slices, match):
  with pytest.raises(ValueError, match=match):
    C.from_dict({"merge_method": "linear", "slices": slices}, where="m.yml")


def test_slice_errors_found_when_reading(tmp_path, capsys):
  _llama(tmp_path / "a", 4, 1)
  _llama(tmp_path / "b", 4, 2)
  cfg = {"merge_method": "passthrough", "slices": [{"sources": [{"model": "a", "layer_range": [2, 6]}]}]}
  assert _merge(cfg, tmp_path, "o") == 2
  assert "layer_range [2, 6] of model" in capsys.readouterr().err and not (tmp_path / "o").exists()
  cfg = {"merge_method": "task_arithmetic", "base_model": "b",
         "slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}]}]}
  assert _merge(cfg, tmp_path, "o") == 2
  assert "the base model" in capsys.readouterr().err


@pytest.mark.parametrize("cfg,match", [
    ({"chat_template": "nope"}, "chat_template .nope. is neither a known template name"),
    ({"chat_template": 3}, "chat_template must be a template name"),
    ({"tokenizer": {"source": "union", "tokens": {"x": {"source": {"kind": "model_token", "model": "m"}}}}},
     "needs exactly one of token_id and token"),
    ({"tokenizer": {"source": "union", "pad_to_multiple_of": 0}}, "pad_to_multiple_of must be an integer >= 1"),
    ({"tokenizer": {"source": "union", "tokens": {"x": {"force": "yes"}}}}, "force must be true or false"),
    ({"modules": {"text": {}}}, "'modules'"),
])
def test_bad_tokenizer_settings_are_errors_naming_them(cfg, match):
  mk = {"merge_method": "linear", "models": [{"model": "m"}]}
  with pytest.raises(ValueError, match=match):
    C.from_dict({**mk, **cfg}, where="m.yml")


def test_tokenizer_block_is_resolved():
  spec = C.from_dict({"merge_method": "linear", "base_model": "b", "models": [{"model": "m"}],
                      "parameters": {"weight": 1.0},
                      "tokenizer": {"tokens": {"<x>": {"source": "m", "force": True},
                                               "<y>": {"source": {"kind": "model_token", "model": "b", "token": "<s>"}},
                                               "<z>": {"source": {"kind": "zero"}}}, "pad_to_multiple_of": 8},
                      "chat_template": "{{ messages[0]['content'] }} literal"})
  t = spec.tokenizer
  assert t.source == "union" and t.pad_to_multiple_of == 8 and t.base_model == "b"
  assert t.tokens == (C.TokenSpec("<x>", "model", model="m", force=True),
                      C.TokenSpec("<y>", "model_token", model="b", source_token="<s>"), C.TokenSpec("<z>", "zero"))
  assert spec.order == ("m", "b") and spec.chat_template.startswith("{{")


def _fake_hub(root: pathlib.Path, repo: str, files: dict, rev: str = "main", sha: str = "a" * 40) -> pathlib.Path:
  """The hub cache layout: models--org--name/{refs/<rev>, snapshots/<sha>/<files>} (as huggingface_hub)."""
  d = root / ("models--" + repo.replace("/", "--"))
  snap = d / "snapshots" / sha
  snap.mkdir(parents=True)
  (d / "refs").mkdir(exist_ok=True)
  (d / "refs" / rev).write_text(sha)
  for name, src in files.items():
    (snap / name).write_bytes(pathlib.Path(src).read_bytes())
  return snap


def test_hub_ids_resolve_from_the_cache_offline(tmp_path, monkeypatch, capsys):
  pytest.importorskip("huggingface_hub")
  _llama(tmp_path / "src_base", 2, 1)
  _llama(tmp_path / "src_ft", 2, 2)
  cache = tmp_path / "hub"
  files = lambda d: {f: tmp_path / d / f for f in ("model.safetensors", "config.json")}  # noqa: E731
  snap_base = _fake_hub(cache, "org/base", files("src_base"))
  snap_ft = _fake_hub(cache, "org/ft", files("src_ft"), rev="v1", sha="b" * 40)
  monkeypatch.setenv("HF_HUB_CACHE", str(cache))
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  assert hub.locate("org/base") == snap_base
  assert hub.locate("org/ft@v1") == snap_ft and hub.locate("org/ft@" + "b" * 40) == snap_ft
  with pytest.raises(ValueError, match="model 'org/missing': HF_HUB_OFFLINE is set and it is not in the hub cache"):
    hub.locate("org/missing")
  with pytest.raises(ValueError, match="does not exist"):
    hub.locate("./nothing/here")
  cfg = {"merge_method": "task_arithmetic", "base_model": "org/base",
         "models": [{"model": "org/ft@v1", "parameters": {"weight": 0.5}}]}
  assert _merge(cfg, tmp_path, "o") == 0
  out, b, f = S.load(tmp_path / "o"), S.load(snap_base), S.load(snap_ft)
  np.testing.assert_allclose(out["model.norm.weight"], b["model.norm.weight"] + 0.5 * (f["model.norm.weight"] -
                                                                                       b["model.norm.weight"]),
                             rtol=1e-6)
  cfg["models"][0]["model"] = "org/ft@v2"  # not cached: an error naming it, nothing written
  assert _merge(cfg, tmp_path, "o2") == 2
  assert "'org/ft@v2': HF_HUB_OFFLINE is set" in capsys.readouterr().err and not (tmp_path / "o2").exists()
  # jaxmerge's schema and flags take hub ids too
  assert cli.main(["merge", "--method", "task_arithmetic", "--base", "org/base", "--model", "org/ft@v1",
                   "--out", str(tmp_path / "o3")]) == 0


def test_bf16_output_config_reads_back_as_bfloat16(tmp_path):
  torch = pytest.importorskip("torch")
  pytest.importorskip("transformers")
  from transformers import AutoConfig, AutoModelForCausalLM

  from tests import mk_models as M

  M.picollama(tmp_path / "a", seed=1)
  M.picollama(tmp_path / "b", seed=2)
  cfg = {"merge_method": "linear", "dtype": "bfloat16",
         "models": [{"model": "a", "parameters": {"weight": 1}}, {"model": "b", "parameters": {"weight": 1}}]}
  assert _merge(cfg, tmp_path, "o") == 0
  assert AutoConfig.from_pretrained(tmp_path / "o").dtype == torch.bfloat16
  model = AutoModelForCausalLM.from_pretrained(tmp_path / "o", dtype="auto")
  assert model.dtype == torch.bfloat16


def test_union_tokenizer_streams_like_in_memory(tmp_path):
  pytest.importorskip("transformers")
  from tests import mk_models as M

  M.llama_with_tokenizer(tmp_path / "base", 64, seed=1)
  M.llama_with_tokenizer(tmp_path / "chat", 66, ["<|im_start|>", "<|im_end|>"], seed=2)
  cfg = {"merge_method": "task_arithmetic", "base_model": "base", "dtype": "float32", "tokenizer_source": "union",
         "models": [{"model": "chat", "parameters": {"weight": 0.5}}], "chat_template": "chatml"}
  assert _merge(cfg, tmp_path, "mem") == 0
  assert _merge(cfg, tmp_path, "st", "--stream") == 0
  mem, st = S.load(tmp_path / "mem"), S.load(tmp_path / "st")
  assert mem["model.embed_tokens.weight"].shape == (66, 32)
  for k in mem:
    np.testing.assert_array_equal(mem[k], st[k], err_msg=k)
  chat = S.load(tmp_path / "chat")
  # <|im_start|> (id 64) exists only in the chat model: its row is the chat model's, in both models' views, so
  # the task vector there is zero and the merged row equals it
  np.testing.assert_array_equal(mem["model.embed_tokens.weight"][64], chat["model.embed_tokens.weight"][64])
  assert json.loads((tmp_path / "st" / "config.json").read_text())["vocab_size"] == 66
  tok_cfg = json.loads((tmp_path / "st" / "tokenizer_config.json").read_text())
  template = tok_cfg.get("chat_template") or (tmp_path / "st" / "chat_template.jinja").read_text()
  assert "<|im_start|>" in template
