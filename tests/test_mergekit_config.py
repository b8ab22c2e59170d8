"""mergekit-schema configs (jaxmerge.config): mapping to jaxmerge transforms with mergekit's semantics, parity with
mergekit's kernels per tensor and with whole mergekit runs on tiny Llama checkpoints, and clear errors for the
settings jaxmerge cannot reproduce."""

import json
import pathlib

import jax
import ml_dtypes
import numpy as np
import pytest

import jaxmerge as jm
from jaxmerge import cli
from jaxmerge import config as C
from jaxmerge.io import safetensors_io as S

BF16 = np.dtype(ml_dtypes.bfloat16)
SHAPES = {"model.layers.0.mlp.up_proj.weight": (6, 5), "model.layers.0.input_layernorm.weight": (5,),
          "model.embed_tokens.weight": (7, 5)}


def _arrays(t=3, seed=0):
  r = np.random.default_rng(seed)
  pre = {k: r.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
  common = {k: r.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
  out = {"base": pre}
  for i in range(t):
    out[f"m{i}"] = {k: v + 0.3 * common[k] + 0.3 * r.standard_normal(v.shape).astype(np.float32) for k, v in pre.items()}
  return out


def _cfg(method, weights=(1.0, 1.0, 1.0), per_model=None, base=True, **params):
  models = []
  for i, w in enumerate(weights):
    p = {"weight": w} if w is not None else {}
    p.update((per_model or {}).get(i, {}))
    models.append({"model": f"m{i}", "parameters": p})
  cfg = {"merge_method": method, "models": models, "parameters": params}
  if base:
    cfg["base_model"] = "base"
  return cfg


def _ours(cfg, arrays, key=None):
  spec = C.from_dict(cfg)
  out = jm.merge(spec.tx, arrays[spec.base], [arrays[m] for m in spec.models], key=key)
  return {k: np.asarray(v) for k, v in out.items()}, spec


def _mk(cfg, arrays):
  """mergekit's result, one merge_tensors call per tensor (per-model parameters keyed by model id)."""
  torch = pytest.importorskip("torch")
  from mergekit.merge_methods.api import merge_tensors

  entries = cfg["models"]
  ids = [e["model"] for e in entries]
  base = cfg.get("base_model")
  if base is not None and base not in ids:
    ids = [base] + ids
  params = dict(cfg.get("parameters") or {})
  for key in ("weight", "density", "gamma", "epsilon"):
    per = {e["model"]: e["parameters"][key] for e in entries if key in (e.get("parameters") or {})}
    if per:
      params[key] = per
  out = {}
  for k in SHAPES:
    tensors = [torch.from_numpy(np.array(arrays[i][k])) for i in ids]
    out[k] = merge_tensors(tensors, cfg["merge_method"], ids=ids, base_index=ids.index(base) if base else None,
                           parameters=params, dtype=torch.float32).numpy()
  return out


def _close(a, b, tol=2e-6):
  for k in b:
    np.testing.assert_allclose(a[k], b[k], rtol=tol, atol=tol, err_msg=k)


PARITY = [
    ("task_arithmetic", (1.0, 0.5, 2.0), {}),
    ("task_arithmetic", (1.0, 0.5, 2.0), {"normalize": True, "lambda": 0.7}),
    ("linear", (1.0, 2.0, 3.0), {}),
    ("ties", (1.0, 1.0, 1.0), {"density": 0.5}),
    ("ties", (0.7, 0.7, 0.7), {"density": 0.4, "normalize": False, "lambda": 1.3}),
    ("ties", (1.0, 0.5, 2.0), {"density": 0.6, "normalize": False}),
    ("ties", (1.0, 1.0, 1.0), {"density": 1.0}),
    ("breadcrumbs", (1.0, 0.5, 2.0), {"density": 0.6, "gamma": 0.1}),
    ("breadcrumbs", (1.0, 1.0, 1.0), {"density": 1.0, "gamma": 0.2}),  # density 1: mergekit ignores gamma
    ("breadcrumbs_ties", (1.0, 1.0, 1.0), {"density": 0.7, "gamma": 0.1, "normalize": True}),
    ("dare_ties", (1.0, 1.0, 1.0), {"density": 1.0}),
    ("dare_linear", (1.0, 0.5, 2.0), {"density": 1.0, "normalize": True}),
    ("della", (1.0, 1.0, 1.0), {"density": 1.0, "epsilon": 0.1}),
    ("della_linear", (1.0, 2.0, 1.0), {"density": 1.0, "epsilon": 0.1}),
    ("model_stock", (None, None, None), {}),
]


@pytest.mark.parity
@pytest.mark.parametrize("method,weights,params", PARITY)
def test_parity_with_mergekit_kernels(method, weights, params):
  pytest.importorskip("mergekit")
  arrays = _arrays()
  per_model = None
  if "density" in params or "gamma" in params or "epsilon" in params:
    per_model = {i: {k: params[k] for k in ("density", "gamma", "epsilon") if k in params} for i in range(3)}
    params = {k: v for k, v in params.items() if k not in ("density", "gamma", "epsilon")}
  cfg = _cfg(method, weights, per_model, **params)
  if method == "linear":
    cfg["models"].insert(0, {"model": "base", "parameters": {"weight": 0.5}})
  ours, spec = _ours(cfg, arrays)
  _close(ours, _mk(cfg, arrays))
  assert spec.source == "mergekit" and spec.method == f"mergekit:{method}"


@pytest.mark.parity
def test_parity_slerp():
  pytest.importorskip("mergekit")
  arrays = _arrays(1)
  cfg = {"merge_method": "slerp", "base_model": "base", "models": [{"model": "base"}, {"model": "m0"}],
         "parameters": {"t": 0.3}}
  ours, spec = _ours(cfg, arrays)
  assert spec.models == ("base", "m0")
  _close(ours, _mk(cfg, arrays))


def test_random_methods_map_to_jaxmerge_dare_and_magprune():
  """dare_* keep each entry with probability density and rescale each tensor's L1 norm (mergekit's rule):
  the mapped transform is jaxmerge's DARE with rescale="l1" and the same key draws the same masks."""
  arrays = _arrays()
  key = jax.random.key(4)
  cfg = _cfg("dare_linear", (1.0, 1.0, 1.0), {i: {"density": 0.6} for i in range(3)}, **{"lambda": 0.5})
  ours, _ = _ours(cfg, arrays, key=key)
  ref = jm.merge(jm.get_method("dare")(p=0.4, rescale="l1", scale=0.5), arrays["base"],
                 [arrays[f"m{i}"] for i in range(3)], key=key)
  _close(ours, {k: np.asarray(v) for k, v in ref.items()}, tol=1e-6)
  # The kept deltas keep each tensor's L1 norm (mergekit's rescale) for one model.
  cfg = _cfg("dare_linear", (1.0,), {0: {"density": 0.5}})
  one, _ = _ours(cfg, arrays, key=key)
  checked = 0
  for k in SHAPES:
    before = np.abs(arrays["m0"][k] - arrays["base"][k]).sum()
    after = np.abs(one[k] - arrays["base"][k]).sum()
    if after == 0:  # every entry dropped (probability 2**-n for n entries): nothing to rescale, as in mergekit
      continue
    np.testing.assert_allclose(after, before, rtol=1e-5)
    checked += 1
  assert checked >= 2
  cfg = _cfg("della_linear", (1.0, 1.0, 1.0), {i: {"density": 0.6, "epsilon": 0.1} for i in range(3)},
             rescale=False)
  ours, spec = _ours(cfg, arrays, key=key)
  assert spec.tx.needs_key and spec.tx.leafwise


def test_schema_detection_defaults_and_overrides():
  spec = C.resolve({"merge_method": "ties", "base_model": "b", "models": [{"model": "b"}, {"model": "x"}],
                    "dtype": "bf16"}, {"seed": 5})
  assert spec.models == ("x",) and spec.dtype == "bfloat16" and spec.seed == 5 and spec.tx.leafwise
  assert spec.hparams == {"weights": [1.0], "density": 1.0, "normalize": True, "rescale": False, "lambda": 1.0}
  assert any("weight" in n for n in spec.notes)
  assert C.resolve({"merge_method": "ties", "base_model": "b", "models": [{"model": "x"}], "dtype": "float32",
                    "out_dtype": "float16"}).dtype == "float16"
  spec = C.resolve({"merge_method": "linear", "models": [{"model": "x"}], "tokenizer_source": "base"})
  assert spec.tokenizer == C.TokenizerSpec(source="base") and spec.base == "x" and spec.vocab_policy == "error"
  with pytest.raises(ValueError, match=r"flags only override dtype, seed"):
    C.resolve({"merge_method": "ties", "base_model": "b", "models": [{"model": "x"}]}, {"method": "ties"})
  jspec = C.resolve({"method": "ties", "base": "b", "models": ["x", "y"], "hparams": {"density": 0.5}},
                    {"hparams": {"scale": 1.0}})
  assert jspec.hparams == {"density": 0.5, "scale": 1.0} and jspec.registry_method == ("ties", jspec.hparams)


@pytest.mark.parametrize("cfg,match", [
    ({"merge_method": "nuslerp", "base_model": "b", "models": [{"model": "x"}]}, "merge_method 'nuslerp' is not "
                                                                                  "supported; supported mergekit"),
    ({"merge_method": "ties", "models": [{"model": "x"}]}, "needs base_model"),
    ({"merge_method": "ties", "base_model": "b", "slices": [{}], "models": [{"model": "x"}]},
     "exactly one of 'models' and 'slices'"),
    ({"merge_method": "ties", "base_model": "b", "models": [{"model": "x", "parameters": {"density": [0.1, 0.5]}}]},
     "parameter 'density' of model x is \\[0.1, 0.5\\]; jaxmerge supports one number"),
    ({"merge_method": "ties", "base_model": "b", "models": [{"model": "x", "parameters": {"density": 0.2}},
                                                            {"model": "y", "parameters": {"density": 0.5}}]},
     "per-model 'density' values differ"),
    ({"merge_method": "ties", "base_model": "b", "models": [{"model": "x", "parameters": {"weight": 1}},
                                                            {"model": "y", "parameters": {"weight": 2}}]},
     "with normalize and unequal weights"),
    ({"merge_method": "della", "base_model": "b", "models": [{"model": "x", "parameters": {"density": 0.5}}]},
     "rescales each tensor's L1 norm after MAGPRUNE"),
    ({"merge_method": "ties", "base_model": "b", "models": [{"model": "x"}], "parameters": {"t": 0.5}},
     "parameter 't' does not apply to merge_method 'ties'"),
    ({"merge_method": "ties", "base_model": "b", "models": [{"model": "x", "parameters": {"lambda": 2}}]},
     "'lambda' is a global parameter"),
    ({"merge_method": "slerp", "base_model": "b", "models": [{"model": "x"}, {"model": "y"}],
      "parameters": {"t": 0.5}}, "exactly one other model"),
    ({"merge_method": "model_stock", "base_model": "b", "models": [{"model": "x"}, {"model": "y"}],
      "parameters": {"filter_wise": True}}, "filter_wise"),
    ({"merge_method": "ties", "base_model": "b", "models": [{"model": "x+lora"}]}, "'model\\+lora' form"),
    ({"merge_method": "ties", "base_model": "b", "models": [{"model": "x"}], "tokenizer_source": "union",
      "tokenizer": {"source": "base"}}, "either tokenizer_source or a tokenizer block"),
    ({"merge_method": "breadcrumbs", "base_model": "b", "models": [{"model": "x", "parameters": {"density": 0.9,
                                                                                              "gamma": 0.2}}]},
     "density \\+ gamma > 1"),
    ({"merge_method": "ties", "base_model": "b", "models": [{"model": "x"}], "weird": 1}, "unknown keys \\['weird'\\]"),
])
def test_unsupported_settings_raise_naming_them(cfg, match):
  with pytest.raises(ValueError, match=match):
    C.from_dict(cfg, where="merge.yaml")


# ----------------------------------------------------------------------------------------------------------
# Whole runs on disk: tiny Llama checkpoints (bf16, tied embeddings), jaxmerge merge vs mergekit's run_merge.

LLAMA = {"model.embed_tokens.weight": (32, 8), "model.norm.weight": (8,)}
for _i in range(2):
  _p = f"model.layers.{_i}."
  LLAMA.update({_p + "self_attn.q_proj.weight": (8, 8), _p + "self_attn.k_proj.weight": (4, 8),
                _p + "self_attn.v_proj.weight": (4, 8), _p + "self_attn.o_proj.weight": (8, 8),
                _p + "mlp.gate_proj.weight": (16, 8), _p + "mlp.up_proj.weight": (16, 8),
                _p + "mlp.down_proj.weight": (8, 16), _p + "input_layernorm.weight": (8,),
                _p + "post_attention_layernorm.weight": (8,)})


def _llama_dirs(root, dtype, t=3):
  r = np.random.default_rng(0)
  base = {k: r.standard_normal(s).astype(np.float32) for k, s in LLAMA.items()}
  cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32, "hidden_size": 8,
         "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
         "tie_word_embeddings": True, "torch_dtype": str(np.dtype(dtype)), "rms_norm_eps": 1e-5,
         "max_position_embeddings": 64}
  paths = []
  for name in ["base"] + [f"ft{i}" for i in range(t)]:
    sd = base if name == "base" else {k: v + 0.05 * r.standard_normal(v.shape).astype(np.float32)
                                      for k, v in base.items()}
    (root / name).mkdir()
    S.save(root / name / "model.safetensors", {k: v.astype(dtype) for k, v in sd.items()}, metadata={"format": "pt"})
    (root / name / "config.json").write_text(json.dumps(cfg))
    paths.append(root / name)
  return paths


E2E = [
    ("bf16", {"merge_method": "linear", "models": [{"model": "ft0", "parameters": {"weight": 1.0}},
                                                  {"model": "ft1", "parameters": {"weight": 3.0}}]}),
    ("bf16", {"merge_method": "task_arithmetic", "base_model": "base",
              "models": [{"model": f"ft{i}", "parameters": {"weight": w}} for i, w in enumerate((0.5, 1.0, 0.3))],
              "parameters": {"lambda": 0.8}}),
    ("bf16", {"merge_method": "ties", "base_model": "base",
              "models": [{"model": f"ft{i}", "parameters": {"weight": 1.0, "density": 1.0}} for i in range(3)]}),
    ("f32", {"merge_method": "ties", "base_model": "base",
             "models": [{"model": "base"}] + [{"model": f"ft{i}", "parameters": {"weight": 1.0, "density": 0.4}}
                                              for i in range(3)], "parameters": {"normalize": True}}),
    ("f32", {"merge_method": "breadcrumbs", "base_model": "base",
             "models": [{"model": f"ft{i}", "parameters": {"weight": 0.5, "density": 0.5, "gamma": 0.1}}
                        for i in range(3)]}),
    ("bf16", {"merge_method": "slerp", "base_model": "base", "models": [{"model": "base"}, {"model": "ft0"}],
              "parameters": {"t": 0.4}}),
    ("bf16", {"merge_method": "model_stock", "base_model": "base", "models": [{"model": f"ft{i}"} for i in range(3)]}),
]


@pytest.mark.parity
@pytest.mark.parametrize("dtype,cfg", E2E, ids=[f"{c['merge_method']}-{d}" for d, c in E2E])
def test_whole_run_matches_mergekit(tmp_path, dtype, cfg):
  """``jaxmerge merge mergekit.yaml`` and mergekit's own run on the same directories write the same tensors
  (bf16 checkpoints with tied embeddings: ``lm_head.weight`` absent in both outputs). bf16 runs set
  ``dtype: float32`` so that mergekit, like jaxmerge, computes in float32 and rounds once to bf16."""
  yaml = pytest.importorskip("yaml")
  pytest.importorskip("mergekit")
  from mergekit.config import MergeConfiguration
  from mergekit.merge import run_merge
  from mergekit.options import MergeOptions

  dt = BF16 if dtype == "bf16" else np.dtype(np.float32)
  if dt == BF16:  # mergekit computes in the config's dtype (bf16 by default here); jaxmerge always in float32
    cfg = {**cfg, "dtype": "float32", "out_dtype": "bfloat16"}
  _llama_dirs(tmp_path, dt)
  (tmp_path / "merge.yaml").write_text(yaml.safe_dump(cfg))
  absolute = json.loads(json.dumps(cfg))
  absolute["base_model"] = str(tmp_path / cfg["base_model"]) if "base_model" in cfg else None
  for m in absolute["models"]:
    m["model"] = str(tmp_path / m["model"])
  absolute = {k: v for k, v in absolute.items() if v is not None}
  run_merge(MergeConfiguration.model_validate(absolute), str(tmp_path / "mk"),
            options=MergeOptions(copy_tokenizer=False, lazy_unpickle=False))
  assert cli.main(["merge", str(tmp_path / "merge.yaml"), "--out", str(tmp_path / "jm")]) == 0
  theirs, ours = S.load(tmp_path / "mk"), S.load(tmp_path / "jm")
  assert set(ours) == set(theirs) and "lm_head.weight" not in ours
  for k in theirs:
    assert ours[k].dtype == theirs[k].dtype == dt, k
    a, b = np.asarray(ours[k], np.float64), np.asarray(theirs[k], np.float64)
    if dt == BF16:  # both compute in float32 and round once; allow a rare 1-ulp difference
      assert np.mean(a != b) < 0.01, k
      np.testing.assert_allclose(a, b, rtol=2**-7, atol=1e-6, err_msg=k)
    else:
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=k)
  info = json.loads((tmp_path / "jm" / "merge_info.json").read_text())
  assert info["source"] == "mergekit" and info["method"] == f"mergekit:{cfg['merge_method']}"
  assert json.loads((tmp_path / "jm" / "config.json").read_text())["tie_word_embeddings"] is True


def test_streamed_mergekit_config_equals_in_memory(tmp_path):
  _llama_dirs(tmp_path, BF16)
  cfg = {"merge_method": "ties", "base_model": "base",
         "models": [{"model": f"ft{i}", "parameters": {"weight": 1.0, "density": 0.3}} for i in range(3)],
         "dtype": "bfloat16"}
  (tmp_path / "m.yaml").write_text(json.dumps(cfg))
  assert cli.main(["merge", str(tmp_path / "m.yaml"), "--out", str(tmp_path / "mem")]) == 0
  assert cli.main(["merge", str(tmp_path / "m.yaml"), "--stream", "--out", str(tmp_path / "st")]) == 0
  a, b = S.load(tmp_path / "mem"), S.load(tmp_path / "st")
  for k in a:
    assert a[k].dtype == BF16
    np.testing.assert_array_equal(np.asarray(a[k], np.float32), np.asarray(b[k], np.float32))
  assert pathlib.Path(tmp_path / "st" / "config.json").exists()
