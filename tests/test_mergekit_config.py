"""mergekit-schema configs (jaxmerge.config): plans with mergekit's semantics (:mod:`jaxmerge.mk`), parity with
mergekit's kernels per tensor and with whole mergekit runs on tiny Llama checkpoints, the float32 fast route, and
clear errors for the settings mergekit refuses or jaxmerge does not support (see also
tests/parity/test_mergekit_methods.py)."""

import json
import pathlib

import ml_dtypes
import numpy as np
import pytest

from jaxmerge import cli
from jaxmerge import config as C
from jaxmerge.io import safetensors_io as S
from jaxmerge.mk import engine as E

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


def _ours(cfg, arrays):
  """jaxmerge's result: the config's plan (:mod:`jaxmerge.mk`) run on in-memory arrays keyed by model id."""
  spec = C.from_dict(cfg)
  return E.merge_arrays(spec.plan, {m: arrays[m] for m in spec.plan.inputs}), spec


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
    # Settings main refused, now reproduced: TIES/DELLA normalize with unequal weights (mergekit's test_ties),
    # TIES rescale, breadcrumbs' density + gamma > 1 fallback, model_stock filter_wise.
    ("ties", (1.0, 0.5, 2.0), {"density": 0.5}),
    ("ties", (1.0, 1.0, 1.0), {"density": 0.3, "rescale": True}),
    ("breadcrumbs", (1.0, 1.0, 1.0), {"density": 0.9, "gamma": 0.2}),
    ("model_stock", (None, None, None), {"filter_wise": True}),
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
  assert spec.source == "mergekit" and spec.method == f"mergekit:{method}" and spec.plan.method == method


@pytest.mark.parity
def test_parity_slerp():
  pytest.importorskip("mergekit")
  arrays = _arrays(1)
  cfg = {"merge_method": "slerp", "base_model": "base", "models": [{"model": "base"}, {"model": "m0"}],
         "parameters": {"t": 0.3}}
  ours, spec = _ours(cfg, arrays)
  assert spec.base == "base" and spec.models == ("m0",) and spec.plan.inputs == ("base", "m0")
  _close(ours, _mk(cfg, arrays))


def test_dare_keeps_each_tensors_l1_norm_and_is_seeded():
  """dare_linear keeps each entry with probability density and rescales each tensor's L1 norm (mergekit's rule);
  the same seed draws the same masks, another seed other masks (keep-rate statistics:
  tests/parity/test_mergekit_methods.py)."""
  arrays = _arrays()
  cfg = _cfg("dare_linear", (1.0,), {0: {"density": 0.5}})
  one, spec = _ours(cfg, arrays)
  checked = 0
  for k in SHAPES:
    before = np.abs(arrays["m0"][k] - arrays["base"][k]).sum()
    after = np.abs(one[k] - arrays["base"][k]).sum()
    if after == 0:  # every entry dropped (probability 2**-n for n entries): nothing to rescale, as in mergekit
      continue
    np.testing.assert_allclose(after, before, rtol=1e-5)
    checked += 1
  assert checked >= 2
  again, _ = _ours(cfg, arrays)
  other, _ = _ours({**cfg, "seed": 1}, arrays)
  k = "model.embed_tokens.weight"
  np.testing.assert_array_equal(again[k], one[k])
  assert not np.array_equal(other[k], one[k])


def test_schema_detection_defaults_and_overrides():
  spec = C.resolve({"merge_method": "ties", "base_model": "b", "models": [{"model": "b"}, {"model": "x",
                                                                                         "parameters": {"weight": 1}}],
                    "dtype": "bf16"}, {"seed": 5})
  assert spec.models == ("x",) and spec.dtype == "bfloat16" and spec.seed == 5 and spec.tx is None
  assert spec.plan.inputs == ("b", "x") and spec.plan.base_index == 0 and spec.plan.dtype == "bfloat16"
  shared, per = spec.plan.resolver.resolve("model.layers.0.mlp.up_proj.weight", 0.0)
  assert shared == {"int8_mask": False, "normalize": True, "rescale": False, "lambda": 1.0}  # mergekit's defaults
  assert per == [{}, {"weight": 1.0, "density": 1.0}]
  assert C.resolve({"merge_method": "ties", "base_model": "b", "models": [{"model": "x"}], "dtype": "float32",
                    "out_dtype": "float16", "parameters": {"weight": 1}}).dtype == "float16"
  spec = C.resolve({"merge_method": "linear", "models": [{"model": "x", "parameters": {"weight": 1}}],
                    "tokenizer_source": "base"})
  assert spec.tokenizer == C.TokenizerSpec(source="base") and spec.base == "x" and spec.vocab_policy == "error"
  with pytest.raises(ValueError, match=r"flags only override dtype, seed"):
    C.resolve({"merge_method": "ties", "base_model": "b", "models": [{"model": "x"}]}, {"method": "ties"})
  jspec = C.resolve({"method": "ties", "base": "b", "models": ["x", "y"], "hparams": {"density": 0.5}},
                    {"hparams": {"scale": 1.0}})
  assert jspec.hparams == {"density": 0.5, "scale": 1.0} and jspec.registry_method == ("ties", jspec.hparams)


def test_float32_transform_only_for_plain_task_arithmetic():
  """task_arithmetic with plain numbers carries jaxmerge's float32 transform (the fast route); it computes what
  the plan computes in float32. Gradients, filters, other methods and linear (mergekit's fused multiply-adds of
  ``w_i m_i`` leave residues near 0 that the task-vector form does not) carry none."""
  import jaxmerge as jm  # noqa: PLC0415

  arrays = _arrays()
  cfg = _cfg("task_arithmetic", (1.0, 0.5, 2.0), normalize=True, **{"lambda": 0.7})
  spec = C.from_dict(cfg)
  from jaxmerge import stream  # noqa: PLC0415

  assert spec.tx is not None and stream.leafwise(spec.tx)
  fast = jm.merge(spec.tx, arrays["base"], [arrays[m] for m in spec.models])
  _close({k: np.asarray(v) for k, v in fast.items()}, _ours(cfg, arrays)[0])
  assert C.from_dict(_cfg("task_arithmetic", (1.0, [0.5, 1.0], 1.0))).tx is None  # a gradient
  assert C.from_dict(_cfg("ties", (1.0, 1.0, 1.0))).tx is None
  assert C.from_dict({"merge_method": "linear", "models": [{"model": "x", "parameters": {"weight": 1}},
                                                           {"model": "y", "parameters": {"weight": 1}}]}).tx is None


@pytest.mark.parametrize("cfg,match", [
    ({"merge_method": "frankenmerge", "base_model": "b", "models": [{"model": "x"}]},
     "merge_method 'frankenmerge' is not supported; supported mergekit methods: task_arithmetic"),
    ({"merge_method": "ties", "models": [{"model": "x", "parameters": {"weight": 1}}]}, "needs base_model"),
    ({"merge_method": "ties", "base_model": "b", "slices": [{}], "models": [{"model": "x"}]},
     "exactly one of 'models' and 'slices'"),
    ({"merge_method": "ties", "base_model": "b", "models": [{"model": "x", "parameters": {"weight": 1}},
                                                            {"model": "y"}]},
     r"ties needs a 'weight' for every model; missing for \['y'\]"),
    ({"merge_method": "linear", "models": [{"model": "x"}, {"model": "y"}]}, "missing for \\['x', 'y'\\]"),
    ({"merge_method": "ties", "base_model": "b", "models": [{"model": "x", "parameters": {"density": [0.1, 1.5],
                                                                                         "weight": 1}}]},
     "parameter 'density' of model x must be in"),
    ({"merge_method": "slerp", "base_model": "b", "models": [{"model": "x"}, {"model": "y"}],
      "parameters": {"t": 0.5}}, "slerp merges exactly 2 models \\(the base included\\), got 3"),
    ({"merge_method": "slerp", "base_model": "b", "models": [{"model": "x"}]}, "slerp needs the parameter 't'"),
    ({"merge_method": "model_stock", "base_model": "b", "models": [{"model": "x"}]}, "at least 3 models"),
    ({"merge_method": "ties", "base_model": "b", "models": [{"model": "x+lora"}]}, "'model\\+lora' form"),
    ({"merge_method": "ties", "base_model": "b", "models": [{"model": "x"}], "tokenizer_source": "union",
      "tokenizer": {"source": "base"}}, "either tokenizer_source or a tokenizer block"),
    ({"merge_method": "ties", "base_model": "b", "models": [{"model": "x"}], "weird": 1}, "unknown keys \\['weird'\\]"),
    ({"merge_method": "ties", "base_model": "b", "models": [{"model": "x"}], "jaxmerge": {"compute": 1}},
     "unknown 'jaxmerge' options \\['compute'\\]"),
])
def test_unsupported_settings_raise_naming_them(cfg, match):
  with pytest.raises(ValueError, match=match):
    C.from_dict(cfg, where="merge.yaml")


def test_inapplicable_parameters_warn_instead_of_refusing():
  """mergekit ignores a parameter that does not apply to the method (``t`` on ties, ``lambda`` set on one
  model); jaxmerge ignores it too, with a warning naming it (main refused the whole config)."""
  with pytest.warns(UserWarning, match="ignoring 't' of the global parameters"):
    spec = C.from_dict({"merge_method": "ties", "base_model": "b", "models": [{"model": "x",
                                                                               "parameters": {"weight": 1}}],
                        "parameters": {"t": 0.5}})
  assert "t" not in spec.plan.resolver.resolve("w", 0.0)[0]
  with pytest.warns(UserWarning, match="ignoring 'lambda' of model x"):
    C.from_dict({"merge_method": "ties", "base_model": "b",
                 "models": [{"model": "x", "parameters": {"weight": 1, "lambda": 2}}]})


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
    # mergekit's default for bf16 checkpoints: it computes in bf16 (jaxmerge's NumPy engine, mergekit's roundings)
    ("bf16-native", {"merge_method": "task_arithmetic", "base_model": "base",
                     "models": [{"model": f"ft{i}", "parameters": {"weight": w}} for i, w in enumerate((0.5, 1.0, 0.3))],
                     "parameters": {"lambda": 0.8}}),
]


@pytest.mark.parity
@pytest.mark.parametrize("dtype,cfg", E2E, ids=[f"{c['merge_method']}-{d}" for d, c in E2E])
def test_whole_run_matches_mergekit(tmp_path, dtype, cfg):
  """``jaxmerge merge mergekit.yaml`` and mergekit's own run on the same directories write the same tensors
  (bf16 checkpoints with tied embeddings: ``lm_head.weight`` absent in both outputs). bf16 runs set
  ``dtype: float32`` (both compute in float32 and round once to bf16: task_arithmetic takes jaxmerge's fast
  engine then), except ``bf16-native`` (both compute in bf16: jaxmerge's mergekit engine)."""
  yaml = pytest.importorskip("yaml")
  pytest.importorskip("mergekit")
  from mergekit.config import MergeConfiguration
  from mergekit.merge import run_merge
  from mergekit.options import MergeOptions

  dt = BF16 if dtype.startswith("bf16") else np.dtype(np.float32)
  if dtype == "bf16":  # mergekit computes in the config's dtype (bf16 by default here)
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
  fast = any("jaxmerge's own engine" in n for n in info["notes"])
  assert fast == (cfg["merge_method"] == "task_arithmetic" and dtype != "bf16-native"), info["notes"]
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


def test_keep_all_tie_rule_runs_jaxmerge_ties(tmp_path, capsys):
  """``jaxmerge: {tie_rule: keep_all}`` runs ``ties`` on jaxmerge's fast float32 engine: on float32 checkpoints
  without tied magnitudes it writes mergekit's result; settings it cannot express are errors naming them."""
  pytest.importorskip("mergekit")
  yaml = pytest.importorskip("yaml")
  from mergekit.config import MergeConfiguration
  from mergekit.merge import run_merge
  from mergekit.options import MergeOptions

  _llama_dirs(tmp_path, np.dtype(np.float32))
  cfg = {"merge_method": "ties", "base_model": "base", "parameters": {"normalize": True, "lambda": 0.9},
         "models": [{"model": f"ft{i}", "parameters": {"weight": 1.0, "density": 0.4}} for i in range(3)]}
  (tmp_path / "m.yaml").write_text(yaml.safe_dump({**cfg, "jaxmerge": {"tie_rule": "keep_all"}}))
  ref = {**cfg, "base_model": str(tmp_path / "base"),
         "models": [{**m, "model": str(tmp_path / m["model"])} for m in cfg["models"]]}
  run_merge(MergeConfiguration.model_validate(ref), str(tmp_path / "mk"),
            options=MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True))
  capsys.readouterr()
  assert cli.main(["merge", str(tmp_path / "m.yaml"), "--stream", "--out", str(tmp_path / "jm")]) == 0
  assert "pass(es)" in capsys.readouterr().out  # jaxmerge's streaming engine, not the mergekit engine
  theirs, ours = S.load(tmp_path / "mk"), S.load(tmp_path / "jm")
  _close(ours, theirs, tol=1e-5)
  info = json.loads((tmp_path / "jm" / "merge_info.json").read_text())
  assert any("tie_rule keep_all" in n for n in info["notes"])
  with pytest.raises(ValueError, match="tie_rule applies to merge_method ties"):
    C.from_dict({**cfg, "merge_method": "task_arithmetic", "jaxmerge": {"tie_rule": "keep_all"}})
  with pytest.raises(ValueError, match="needs plain numbers as settings"):
    C.from_dict({**cfg, "parameters": {"lambda": [0.5, 1.0]}, "jaxmerge": {"tie_rule": "keep_all"}})
  with pytest.raises(ValueError, match="tie_rule must be one of exact, keep_all"):
    C.from_dict({**cfg, "jaxmerge": {"tie_rule": "some"}})


SCRATCH_CASES = [  # (method, shared parameters, per-model parameters): every kernel, the GTA family's branches
    ("task_arithmetic", {"lambda": 0.7}, [{"weight": 1.0}, {"weight": 0.5}, {"weight": 2.0}]),
    ("ties", {}, [{"weight": 1.0, "density": 0.3}, {"weight": 0.5, "density": 0.6}, {"weight": 2.0, "density": 0.4}]),
    ("ties", {"rescale": True, "normalize": False, "lambda": 1.3}, [{"weight": 1.0, "density": 0.3}] * 3),
    ("dare_ties", {}, [{"weight": 1.0, "density": 0.5}] * 3),
    ("dare_linear", {}, [{"weight": 0.7, "density": 0.5}] * 3),
    ("breadcrumbs_ties", {}, [{"weight": 1.0, "density": 0.6, "gamma": 0.05}] * 3),
    ("della", {}, [{"weight": 1.0, "density": 0.5, "epsilon": 0.1}] * 3),
    ("linear", {}, [{"weight": 1.0}, {"weight": 2.0}, {"weight": 3.0}]),
    ("karcher", {}, [{}] * 3),
    ("sce", {}, [{}] * 3),
    ("model_stock", {}, [{}] * 3),
    ("multislerp", {}, [{"weight": 1.0}] * 3),
    ("ram", {"epsilon": 0.05}, [{}] * 3),
]


@pytest.mark.parametrize("dtype", [np.dtype(np.float32), BF16], ids=["f32", "bf16"])
@pytest.mark.parametrize("method,shared,per", SCRATCH_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(SCRATCH_CASES)])
def test_reused_work_buffers_give_the_same_bytes(method, shared, per, dtype):
  """A merge reuses its work buffers from tensor to tensor (jaxmerge.mk.kernels.Scratch): buffers left full of NaN
  by an earlier tensor give the bytes of fresh arrays (every buffer is written before it is read), and a second
  tensor of the same size allocates nothing."""
  from jaxmerge.mk import kernels as K
  from jaxmerge.mk import params as P

  r = np.random.default_rng(3)
  shape = (96, 200)  # 75 KiB in float32: above the size below which fresh arrays are used
  base = r.standard_normal(shape).astype(np.float32)
  tensors = []
  for _ in range(2):
    models = [base + 0.1 * r.standard_normal(shape).astype(np.float32) for _ in per]
    tensors.append([a.astype(dtype) for a in [base, *models]])
  ids = ("base", "m0", "m1", "m2")
  plan = E.Plan(method, ids, 0, P.Resolver(method, [shared], [{}] + list(per), 0))
  scratch = K.Scratch()
  dirty = [scratch.take(4 * base.size) for _ in range(24)]
  for b in dirty:
    b.view(np.uint32)[:] = 0x7FC00001  # NaN
  scratch.give(dirty)
  allocated = scratch.allocated
  for i, arrays in enumerate(tensors):
    name = f"model.layers.{i}.mlp.up_proj.weight"
    fresh = plan.merge_tensor(name, arrays, 0.5)
    held = K.Lease(scratch)  # the result in a reused buffer too, as a streamed merge writes it
    reused = plan.merge_tensor(name, arrays, 0.5, scratch=scratch, out=held.empty)
    assert held.owns(reused) == (reused.nbytes >= 1 << 16)  # (smaller arrays come from NumPy)
    assert reused.dtype == fresh.dtype and np.array_equal(reused.view(np.uint8), fresh.view(np.uint8)), (method, i)
    assert np.all(np.isfinite(reused.astype(np.float32)))
    held.close()
  assert scratch.allocated == allocated, "the merges allocated buffers although idle ones fitted"


def test_scratch_takes_the_smallest_fitting_buffer_and_lets_much_smaller_ones_go():
  """Scratch's rules by hand: the smallest idle buffer that fits (page-aligned), a fresh one on a miss, and on
  a miss the idle buffers under an eighth of the request are released; a lease returns its buffers when closed,
  or one by one with ``release``."""
  from jaxmerge.mk import kernels as K

  s = K.Scratch()
  a, b, c = s.take(300_000), s.take(100_000), s.take(200_000)
  assert all(x.ctypes.data % 64 == 0 for x in (a, b, c)) and s.allocated == 600_000
  s.give([a, b, c])
  got = s.take(150_000)
  assert got is c and s.allocated == 600_000  # best fit among 300k, 100k, 200k
  s.give([got])
  big = s.take(2_000_000)  # a miss: 100k and 200k (< 2M / 8) go, 300k stays
  assert s.allocated == 2_600_000
  assert sorted(x.size for x in s._idle) == [300_000]
  s.give([big])

  lease = K.Lease(s)
  x = lease.empty((500, 400), np.float32)  # 800 kB: the 2 MB buffer
  y = lease.empty((10, 10), np.float32)  # small: a plain array
  assert lease.owns(x) and lease.owns(x.reshape(-1)[5:]) and not lease.owns(y) and y.flags.owndata
  assert [b.size for b in s._idle] == [300_000]  # the 2 MB buffer is leased
  lease.release(x)
  assert sorted(b.size for b in s._idle) == [300_000, 2_000_000] and not lease.owns(x)
  z = lease.zeros((100, 100), np.float64)  # 80 kB: the 300 kB buffer, zeroed
  assert lease.owns(z) and not z.any()
  lease.close()
  assert sorted(b.size for b in s._idle) == [300_000, 2_000_000] and s.allocated == 2_600_000


@pytest.mark.parametrize("workers", [1, 2])
def test_streamed_tensors_stay_out_of_the_pool_until_written(monkeypatch, workers):
  """With reused buffers (``run(..., buffers=True)``, what ``jaxmerge merge --stream`` does), every array passed to
  ``write`` is held until ``write`` returns: none shares memory with an idle buffer another tensor could take,
  a non-float tensor (passed through from the base's read buffer) included; and the outputs equal the merge
  without reused buffers."""
  from jaxmerge.mk import kernels as K
  from jaxmerge.mk import params as P

  scratches = []

  class Spy(K.Scratch):
    def __init__(self):
      super().__init__()
      scratches.append(self)

  monkeypatch.setattr(K, "Scratch", Spy)
  r = np.random.default_rng(0)
  shapes = {"model.layers.0.ids": ((128, 160), np.int32), "model.layers.0.mlp.up_proj.weight": ((128, 160), BF16),
            "model.layers.1.ids": ((128, 160), np.int32), "model.layers.1.mlp.up_proj.weight": ((128, 160), BF16)}
  inputs = [{k: (r.integers(0, 1000, s) if dt == np.int32 else r.standard_normal(s)).astype(dt)
             for k, (s, dt) in shapes.items()} for _ in range(3)]
  plan = E.Plan("ties", ("base", "m0", "m1"), 0,
                P.Resolver("ties", [{}], [{}, {"weight": 1.0, "density": 0.5}, {"weight": 1.0, "density": 0.5}], 0))

  def read(i, k, empty):
    out = empty(inputs[i][k].shape, inputs[i][k].dtype)
    np.copyto(out, inputs[i][k])
    return out

  got = {}

  def write(k, a):
    idle = scratches[0]._idle
    assert not any(np.shares_memory(a, b) for b in idle), f"{k} was written from a buffer back in the pool"
    got[k] = a.copy()

  E.run(plan, list(shapes), read, write, workers=workers, buffers=True)
  want = E.merge_arrays(plan, dict(zip(plan.inputs, inputs)))
  for k in shapes:
    assert got[k].dtype == want[k].dtype and np.array_equal(got[k].view(np.uint8), want[k].view(np.uint8)), k
  np.testing.assert_array_equal(got["model.layers.1.ids"], inputs[0]["model.layers.1.ids"])


@pytest.mark.parametrize("stored,compute", [(BF16, BF16), (np.dtype(np.float32), BF16), (np.dtype(np.float16), BF16),
                                            (BF16, np.dtype(np.float32)), (np.dtype(np.float16), np.dtype(np.float16)),
                                            (np.dtype(np.float32), np.dtype(np.float64))],
                         ids=["bf16-bf16", "f32-bf16", "f16-bf16", "bf16-f32", "f16-f16", "f32-f64"])
@pytest.mark.parametrize("normalize,lam,weights", [(False, 0.5, (1.0, 1.0, 1.0)), (True, 1.3, (1.0, 0.5, 2.0)),
                                                   (False, 1.0, (0.7, -0.3, 1.0))])
def test_blocked_task_arithmetic_gives_the_bytes_of_gta(stored, compute, normalize, lam, weights):
  """Task arithmetic block by block from the stored inputs (jaxmerge.mk.kernels.task_arithmetic_blocked, what
  mergekit-schema task arithmetic runs) equals gta on whole work arrays converted as Plan.merge_tensor converts
  them, bit for bit, over several blocks and a partial one; a NaN is reported for the first model holding one."""
  from jaxmerge.mk import kernels as K

  r = np.random.default_rng(1)
  shape = (3 * K._BLOCK + 17,)
  base = r.standard_normal(shape)
  inputs = [base.astype(stored)] + [(base + 0.05 * r.standard_normal(shape)).astype(stored) for _ in weights]
  n = K.Num(compute)
  work = [(x.astype(n.work) if x.dtype == compute or compute == n.work else x.astype(compute).astype(n.work))
          for x in inputs]
  shared = {"normalize": normalize, "lambda": lam, "rescale": False}
  want = K.gta("task_arithmetic", n, work[0], work[1:], shared, [{"weight": w} for w in weights])
  got = np.empty(shape, n.work)
  assert K.task_arithmetic_blocked(n, inputs, 0, weights, normalize, lam, got) == []
  assert np.array_equal(got.view(np.uint8), want.view(np.uint8))
  inputs[2][K._BLOCK + 5] = np.nan
  inputs[3][-1] = np.inf
  assert K.task_arithmetic_blocked(n, inputs, 0, weights, normalize, lam, got) == [2, 3]


def test_task_arithmetic_names_the_model_with_nan():
  """A mergekit-schema task arithmetic (the blocked path) refuses NaN/Inf inputs, naming the first model holding
  one and the tensor."""
  from jaxmerge.mk import params as P

  base = np.zeros((300, 300), BF16)
  models = [np.ones((300, 300), BF16) for _ in range(3)]
  models[1][7, 9] = np.nan
  models[2][0, 0] = np.inf
  plan = E.Plan("task_arithmetic", ("base", "m0", "m1", "m2"), 0,
                P.Resolver("task_arithmetic", [{}], [{}] + [{"weight": 1.0}] * 3, 0))
  with pytest.raises(ValueError, match=r"model m1: tensor 'w' contains NaN or Inf"):
    plan.merge_tensor("w", [base, *models], 0.0)
