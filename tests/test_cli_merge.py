"""`jaxmerge merge` and `jaxmerge methods`: YAML and flag forms, dtypes, sharded and orbax inputs, per-task
outputs, streaming, LLM checkpoints, clean errors, and outputs that never appear partially."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap

import jax
import ml_dtypes
import numpy as np
import pytest

import jaxmerge as jm
from jaxmerge import cli
from jaxmerge.io import orbax_io as O
from jaxmerge.io import safetensors_io as S
from tests.clip_shapes import ClipShapes, make_models

BF16 = np.dtype(ml_dtypes.bfloat16)
ROOT = pathlib.Path(__file__).resolve().parents[1]
SMALL = ClipShapes(width=8, layers=1, mlp=8)  # 4 distinct shapes: few compiles


def _write(tmp_path, t=3, dtype=np.float32, shard_bytes=None):
  """HF-CLIP-named checkpoints: base.safetensors, expert<i>/ (sharded with an index when shard_bytes)."""
  pre, fts = make_models(t, seed=0, cfg=SMALL)
  pre = {k: v.astype(dtype) for k, v in pre.items()}
  fts = [{k: v.astype(dtype) for k, v in f.items()} for f in fts]
  pre["vision_model.embeddings.position_ids"] = np.arange(5, dtype=np.int64)[None]
  for f in fts:
    f["vision_model.embeddings.position_ids"] = pre["vision_model.embeddings.position_ids"]
  S.save(tmp_path / "base.safetensors", pre)
  paths = []
  for i, f in enumerate(fts):
    S.save_sharded(tmp_path / f"expert{i}", f, max_shard_bytes=shard_bytes or S.DEFAULT_MAX_SHARD_BYTES)
    paths.append(tmp_path / f"expert{i}")
  return pre, fts, paths


def _models_flags(paths):
  return sum((["--model", str(p)] for p in paths), [])


def _close(got, want, rtol=1e-6, atol=1e-6):
  assert set(got) == set(want)
  for k in want:
    np.testing.assert_allclose(np.asarray(got[k], np.float64), np.asarray(want[k], np.float64), rtol=rtol, atol=atol,
                               err_msg=k)


def test_flags_with_sharded_inputs_match_the_library(tmp_path):
  pre, fts, paths = _write(tmp_path, shard_bytes=512)
  assert (paths[0] / S.INDEX_NAME).exists()
  out = tmp_path / "out"
  rc = cli.main(["merge", "--method", "ties", "--base", str(tmp_path / "base.safetensors"), *_models_flags(paths),
                 "--hparam", "density=0.5", "--hparam", "scale=1.0", "--out", str(out)])
  assert rc == 0
  got = S.load(out)
  want = jm.merge(jm.get_method("ties")(density=0.5, scale=1.0), pre, fts)
  _close(got, want)
  np.testing.assert_array_equal(got["vision_model.embeddings.position_ids"], pre["vision_model.embeddings.position_ids"])
  info = json.loads((out / "merge_info.json").read_text())
  assert info["method"] == "ties" and info["hparams"] == {"density": 0.5, "scale": 1.0} and not info["stream"]


def test_yaml_relative_paths_and_flag_overrides(tmp_path, monkeypatch):
  pre, fts, paths = _write(tmp_path)
  cfg = tmp_path / "merge.yaml"
  cfg.write_text("method: task_arithmetic\nbase: base.safetensors\nmodels: [expert0, expert1, expert2]\n"
                 "hparams: {scale: 0.5}\n")
  monkeypatch.chdir("/")  # paths in the YAML resolve relative to the YAML file
  assert cli.main(["merge", str(cfg), "--hparam", "scale=0.25", "--out", str(tmp_path / "ta")]) == 0
  _close(S.load(tmp_path / "ta"), jm.merge(jm.get_method("task_arithmetic")(scale=0.25), pre, fts))
  assert json.loads((tmp_path / "ta" / "merge_info.json").read_text())["hparams"] == {"scale": 0.25}


@pytest.mark.parametrize("dtype", [BF16, np.dtype(np.float16)])
def test_half_precision_in_float32_math_out(tmp_path, dtype):
  pre, fts, paths = _write(tmp_path, dtype=dtype)
  base = str(tmp_path / "base.safetensors")
  assert cli.main(["merge", "--method", "task_arithmetic", "--base", base, *_models_flags(paths),
                   "--hparam", "scale=0.3", "--out", str(tmp_path / "same")]) == 0
  same = S.load(tmp_path / "same")
  up = lambda m: {k: v.astype(np.float32) if v.dtype == dtype else v for k, v in m.items()}  # noqa: E731
  exact = jm.merge(jm.get_method("task_arithmetic")(scale=0.3), up(pre), [up(f) for f in fts])
  for k, v in same.items():
    if k.endswith("position_ids"):
      continue
    assert v.dtype == dtype, k  # cast back to the input dtype
    np.testing.assert_array_equal(v, np.asarray(exact[k]).astype(dtype))  # float32 math, one rounding
  assert cli.main(["merge", "--method", "task_arithmetic", "--base", base, *_models_flags(paths),
                   "--hparam", "scale=0.3", "--dtype", "float32", "--out", str(tmp_path / "f32")]) == 0
  f32 = S.load(tmp_path / "f32")
  for k in exact:
    if not k.endswith("position_ids"):
      assert f32[k].dtype == np.float32
      np.testing.assert_allclose(f32[k], np.asarray(exact[k]), rtol=1e-6, atol=1e-7)


def test_per_task_methods_write_one_checkpoint_per_task(tmp_path):
  pre, fts, paths = _write(tmp_path)
  cfg = tmp_path / "emr.yaml"
  cfg.write_text(f"method: emr\nbase: {tmp_path / 'base.safetensors'}\nmodels: {json.dumps([str(p) for p in paths])}\n")
  assert cli.main(["merge", str(cfg), "--out", str(tmp_path / "emr")]) == 0
  assert sorted(p.name for p in (tmp_path / "emr").iterdir()) == ["merge_info.json", "task_0", "task_1", "task_2"]
  want = jm.merge_per_task(jm.get_method("emr")(), pre, fts)
  for i in range(3):
    _close(S.load(tmp_path / "emr" / f"task_{i}"), want[i])


def test_orbax_inputs_and_output(tmp_path):
  pre, fts, _ = _write(tmp_path)
  O.save(tmp_path / "pre_orbax", pre)
  for i, f in enumerate(fts):
    O.save(tmp_path / f"ft{i}_orbax", f)
  out = tmp_path / "out"
  assert cli.main(["merge", "--method", "task_arithmetic", "--base", str(tmp_path / "pre_orbax"),
                   *_models_flags([tmp_path / f"ft{i}_orbax" for i in range(3)]), "--format", "orbax",
                   "--out", str(out)]) == 0
  assert O.is_orbax_dir(out)
  _close(S.load(out), jm.merge(jm.get_method("task_arithmetic")(), pre, fts))


@pytest.mark.parametrize("method", ["ties", "emr"])
def test_stream_flag_equals_in_memory_and_shards_the_output(tmp_path, method):
  pre, fts, paths = _write(tmp_path, shard_bytes=700)
  common = ["--method", method, "--base", str(tmp_path / "base.safetensors"), *_models_flags(paths), "--seed", "3"]
  assert cli.main(["merge", *common, "--out", str(tmp_path / "mem")]) == 0
  assert cli.main(["merge", *common, "--stream", "--max-shard-size", "1000", "--out", str(tmp_path / "st")]) == 0
  per_task = jm.method_info(method).per_task
  dirs = [f"task_{i}" for i in range(3)] if per_task else [""]
  for d in dirs:
    assert (tmp_path / "st" / d / S.INDEX_NAME).exists()
    _close(S.load(tmp_path / "st" / d), S.load(tmp_path / "mem" / d), rtol=0, atol=0)
  assert json.loads((tmp_path / "st" / "merge_info.json").read_text())["stream"] is True


def test_errors_are_clean_exit_2_and_leave_nothing(tmp_path, capsys):
  pre, fts, paths = _write(tmp_path)
  base = str(tmp_path / "base.safetensors")
  common = ["--base", base, *_models_flags(paths[:2])]

  def fails(argv, needle):
    assert cli.main(["merge", *argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err, err

  fails(["--method", "tie", *common], "unknown method 'tie'; valid methods:")
  fails(["--method", "ties", *common, "--hparam", "densty=0.1"], "unknown hyperparameter(s) ['densty'] for method 'ties'")
  fails(["--method", "ties", "--base", base], "no models given")
  bad = dict(fts[1])
  bad["vision_model.encoder.layers.0.mlp.fc1.weight"] = np.zeros((4, 4), np.float32)
  S.save(tmp_path / "bad.safetensors", bad)
  fails(["--method", "ties", "--base", base, "--model", str(paths[0]), "--model", str(tmp_path / "bad.safetensors")],
        "bad.safetensors: parameter 'vision_model.encoder.layers.0.mlp.fc1.weight' has shape (4, 4), the pretrained "
        "model has (8, 8)")
  nan = dict(fts[1])
  nan["vision_model.post_layernorm.bias"] = np.full_like(nan["vision_model.post_layernorm.bias"], np.nan)
  S.save(tmp_path / "nan.safetensors", nan)
  for stream in ([], ["--stream"]):
    fails(["--method", "task_arithmetic", "--base", base, "--model", str(paths[0]), "--model",
           str(tmp_path / "nan.safetensors"), *stream],
          "nan.safetensors: parameter 'vision_model.post_layernorm.bias' contains NaN or Inf values")
  fails(["--method", "pcb", *common, "--stream"], "cannot be streamed")
  (tmp_path / "broken.yaml").write_text("method: [ties\n")
  assert cli.main(["merge", str(tmp_path / "broken.yaml"), "--out", str(tmp_path / "o")]) == 2
  assert "is not valid YAML" in capsys.readouterr().err
  (tmp_path / "extra.yaml").write_text("method: ties\nbase: x\nmodels: [y]\nlambda: 3\n")
  assert cli.main(["merge", str(tmp_path / "extra.yaml"), "--out", str(tmp_path / "o")]) == 2
  assert "unknown keys ['lambda']" in capsys.readouterr().err
  (tmp_path / "exists").mkdir()
  fails_exists = cli.main(["merge", "--method", "ties", *common, "--out", str(tmp_path / "exists")])
  assert fails_exists == 2 and "already exists" in capsys.readouterr().err
  assert not (tmp_path / "o").exists()
  assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_failure_while_writing_leaves_no_output(tmp_path, monkeypatch):
  pre, fts, paths = _write(tmp_path)
  argv = ["merge", "--method", "task_arithmetic", "--base", str(tmp_path / "base.safetensors"), *_models_flags(paths)]

  def boom(*a, **k):
    raise OSError("disk full")

  monkeypatch.setattr(S, "save", boom)  # the in-memory path writes with save()
  # An OS error while writing is reported as one line naming the output (exit 2), not a traceback (issue 22).
  assert cli.main([*argv, "--out", str(tmp_path / "o1")]) == 2
  monkeypatch.setattr(S.ShardedWriter, "write", boom)  # the streaming path writes tensor by tensor
  assert cli.main([*argv, "--stream", "--out", str(tmp_path / "o2")]) == 2
  assert sorted(p.name for p in tmp_path.iterdir()) == ["base.safetensors", "expert0", "expert1", "expert2"]


@pytest.mark.parametrize("stream", [False, True])
def test_killed_mid_write_leaves_no_output(tmp_path, stream):
  """SIGKILL in the middle of writing: nothing appears at --out (only a hidden temporary directory)."""
  _write(tmp_path, t=2)
  out = tmp_path / "out"
  hook = "ShardedWriter.write" if stream else "save"
  script = textwrap.dedent(f"""
      import os, signal, sys
      from jaxmerge import cli
      from jaxmerge.io import safetensors_io as S
      target = S.ShardedWriter if {stream} else S
      real = getattr(target, "{hook.split('.')[-1]}")
      calls = []
      def dying(*a, **k):
        calls.append(1)
        if len(calls) == 2:
          os.kill(os.getpid(), signal.SIGKILL)
        return real(*a, **k)
      setattr(target, "{hook.split('.')[-1]}", dying)
      sys.exit(cli.main(["merge", "--method", "task_arithmetic", "--base", "{tmp_path / 'base.safetensors'}",
                         "--model", "{tmp_path / 'expert0'}", "--model", "{tmp_path / 'expert1'}",
                         "--max-shard-size", "600", {'"--stream", ' if stream else ''}"--out", "{out}"]))
  """)
  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAXMERGE_NO_XLA_CACHE": "1"}
  proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == -signal.SIGKILL, proc.stderr
  assert not out.exists()
  leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
  assert leftovers and all(p.name.endswith(".tmp") for p in leftovers)


def _llm_dir(path, vocab, seed, dtype=BF16, tied=True, base=None):
  r = np.random.default_rng(seed)
  d = {"model.embed_tokens.weight": (vocab, 8), "model.norm.weight": (8,)}
  for i in range(2):
    p = f"model.layers.{i}."
    d.update({p + "self_attn.q_proj.weight": (8, 8), p + "self_attn.k_proj.weight": (4, 8),
              p + "mlp.down_proj.weight": (8, 16), p + "input_layernorm.weight": (8,)})
  if not tied:
    d["lm_head.weight"] = (vocab, 8)
  if base is None:
    sd = {k: r.standard_normal(s).astype(np.float32) for k, s in d.items()}
  else:
    sd = {}
    for k, s in d.items():
      b = base[k].astype(np.float32)[: s[0]] if k in base else base["model.embed_tokens.weight"].astype(np.float32)
      if b.shape[0] < s[0]:
        b = np.concatenate([b, r.standard_normal((s[0] - b.shape[0],) + s[1:]).astype(np.float32)])
      sd[k] = b + 0.05 * r.standard_normal(s).astype(np.float32)
  sd = {k: v.astype(dtype) for k, v in sd.items()}
  path.mkdir()
  S.save(path / "model.safetensors", sd, metadata={"format": "pt"})
  (path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "vocab_size": vocab,
                                                "tie_word_embeddings": tied, "torch_dtype": "bfloat16"}))
  (path / "tokenizer.json").write_text("{}")
  return sd


def test_llm_bf16_tied_embeddings_and_vocab_policy(tmp_path, capsys):
  base = _llm_dir(tmp_path / "base", 32, 0)
  a = _llm_dir(tmp_path / "a", 32, 1, base=base)
  b = _llm_dir(tmp_path / "b", 34, 2, base=base)  # two added tokens
  argv = ["merge", "--method", "task_arithmetic", "--hparam", "scale=1.0", "--base", str(tmp_path / "base"),
          "--model", str(tmp_path / "a"), "--model", str(tmp_path / "b")]
  assert cli.main([*argv, "--out", str(tmp_path / "o")]) == 2
  assert "'model.embed_tokens.weight' has shape (34, 8), the pretrained model has (32, 8)" in capsys.readouterr().err
  assert cli.main([*argv, "--vocab-policy", "pad_base", "--out", str(tmp_path / "pad")]) == 0
  out = S.load(tmp_path / "pad")
  assert "lm_head.weight" not in out and out["model.norm.weight"].dtype == BF16  # still tied, still bf16
  f = lambda x: np.asarray(x, np.float32)  # noqa: E731
  want = f(base["model.embed_tokens.weight"]) + (f(a["model.embed_tokens.weight"]) - f(base["model.embed_tokens.weight"])) \
      + (f(b["model.embed_tokens.weight"][:32]) - f(base["model.embed_tokens.weight"]))
  np.testing.assert_array_equal(out["model.embed_tokens.weight"], want.astype(BF16))
  cfg = json.loads((tmp_path / "pad" / "config.json").read_text())
  assert cfg["vocab_size"] == 32 and (tmp_path / "pad" / "tokenizer.json").exists()
  assert cli.main([*argv, "--vocab-policy", "truncate", "--dtype", "float32", "--out", str(tmp_path / "tr")]) == 0
  tr = S.load(tmp_path / "tr")
  assert tr["model.embed_tokens.weight"].shape == (32, 8) and tr["model.norm.weight"].dtype == np.float32
  tr_cfg = json.loads((tmp_path / "tr" / "config.json").read_text())
  assert tr_cfg["dtype"] == "float32" and "torch_dtype" not in tr_cfg  # transformers 5's key, as mergekit writes
  # A tied fine-tune of an untied base reads its lm_head from its embedding.
  ub = _llm_dir(tmp_path / "ubase", 32, 3, tied=False)
  _llm_dir(tmp_path / "tied_ft", 32, 4, base=ub)
  assert cli.main(["merge", "--method", "task_arithmetic", "--hparam", "scale=1.0", "--base", str(tmp_path / "ubase"),
                   "--model", str(tmp_path / "tied_ft"), "--out", str(tmp_path / "u")]) == 0
  tf = S.load(tmp_path / "tied_ft")
  np.testing.assert_array_equal(S.load(tmp_path / "u")["lm_head.weight"], tf["model.embed_tokens.weight"])


def test_methods_command_lists_the_registry(capsys):
  assert cli.main(["methods"]) == 0
  out = capsys.readouterr().out
  assert out.splitlines()[0].startswith("| method | family | data | extra storage | task id | streams |")
  for name in jm.list_methods():
    i = jm.method_info(name)
    line = next(ln for ln in out.splitlines() if ln.startswith(f"| `{name}` |"))
    assert f"| {i.family} | {i.data} |" in line
    for k, v in i.hparams.items():
      assert f"{k}={v!r}" in line
  assert cli.main(["methods", "--format", "json"]) == 0
  data = json.loads(capsys.readouterr().out)
  assert sorted(data) == jm.list_methods() and data["ties"]["hparams"]["density"] == 0.2


def test_seed_controls_random_methods(tmp_path):
  pre, fts, paths = _write(tmp_path, t=2)
  argv = ["merge", "--method", "dare", "--base", str(tmp_path / "base.safetensors"), *_models_flags(paths)]
  for name, seed in (("s0", "0"), ("s1", "1")):
    assert cli.main([*argv, "--seed", seed, "--out", str(tmp_path / name)]) == 0
  s0, s1 = (S.load(tmp_path / n) for n in ("s0", "s1"))
  assert not np.array_equal(s0["vision_model.encoder.layers.0.mlp.fc1.weight"],
                            s1["vision_model.encoder.layers.0.mlp.fc1.weight"])
  _close(s0, jm.merge(jm.get_method("dare")(), pre, fts, key=jax.random.key(0)), rtol=0, atol=0)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")
def test_mesh_option_equals_the_unsharded_merge(tmp_path, capsys, monkeypatch):
  """``--mesh`` runs the in-memory merge with jaxmerge.sharding: a task mesh and a task x model mesh (first axes
  sharded where 4 divides them) give the unsharded result; bad meshes are clean errors. (Every method on
  every mesh kind: tests/test_sharding.py.)"""
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from jaxmerge import sharding as Sh

  pre, fts, paths = _write(tmp_path, t=4)
  common = ["--base", str(tmp_path / "base.safetensors"), *_models_flags(paths), "--seed", "1"]
  seen = []
  real = Sh.merge_sharded

  def spy(*a, **k):
    out = real(*a, **k)
    seen.append((k["mesh"], out))
    return out

  monkeypatch.setattr(Sh, "merge_sharded", spy)
  for method, mesh, shape in (("task_arithmetic", "4", {"task": 4}), ("dare", "2x4", {"task": 2, "model": 4})):
    argv = ["merge", "--method", method, *common]
    assert cli.main([*argv, "--out", str(tmp_path / f"{method}_plain")]) == 0
    assert cli.main([*argv, "--mesh", mesh, "--out", str(tmp_path / f"{method}_mesh")]) == 0
    m, out = seen.pop()
    assert dict(m.shape) == shape
    dirs = [f"task_{i}" for i in range(4)] if jm.method_info(method).per_task else [""]
    for d in dirs:
      _close(S.load(tmp_path / f"{method}_mesh" / d), S.load(tmp_path / f"{method}_plain" / d), rtol=2e-5, atol=2e-6)
    assert json.loads((tmp_path / f"{method}_mesh" / "merge_info.json").read_text())["mesh"] == shape
    if "model" in shape:  # an (8, 8) parameter is split over the model axis, a (5, 8) one is not
      fc1 = out["vision_model.encoder.layers.0.mlp.fc1.weight"]
      assert fc1.sharding.is_equivalent_to(NamedSharding(m, P("model")), fc1.ndim)
      pos = out["vision_model.embeddings.position_embedding.weight"]
      assert pos.shape == (5, 8) and pos.sharding.is_equivalent_to(NamedSharding(m, P()), 2)
  for mesh, needle in (("3", "the task axis (3 devices) does not divide the number of models (4)"),
                       ("4x4", "needs 16 devices, only 8 are available"),
                       ("two", "--mesh takes 'auto', TASK or TASKxMODEL")):
    assert cli.main(["merge", "--method", "ties", *common, "--mesh", mesh, "--out", str(tmp_path / "bad")]) == 2
    assert needle in capsys.readouterr().err
  assert cli.main(["merge", "--method", "ties", *common, "--mesh", "2", "--stream", "--out", str(tmp_path / "bad")]) == 2
  assert "cannot be combined with --stream" in capsys.readouterr().err
  assert not (tmp_path / "bad").exists()


def test_architectures_that_disagree_are_refused(tmp_path, capsys):
  base = _llm_dir(tmp_path / "base", 32, 0)
  _llm_dir(tmp_path / "a", 32, 1, base=base)
  _llm_dir(tmp_path / "b", 32, 2, base=base)
  cfg = json.loads((tmp_path / "b" / "config.json").read_text())
  (tmp_path / "b" / "config.json").write_text(json.dumps({**cfg, "architectures": ["MistralForCausalLM"]}))
  argv = ["merge", "--method", "task_arithmetic", "--base", str(tmp_path / "base"), "--model", str(tmp_path / "a"),
          "--model", str(tmp_path / "b"), "--out", str(tmp_path / "o")]
  assert cli.main(argv) == 2
  err = capsys.readouterr().err
  assert f"{tmp_path / 'b'}: architectures ('MistralForCausalLM',) differs from the pretrained model's " \
         "('LlamaForCausalLM',)" in err, err
  # same architecture, different parameter names (a layer missing): the names are listed
  (tmp_path / "b" / "config.json").write_text(json.dumps(cfg))
  sd = S.load(tmp_path / "b")
  del sd["model.layers.1.mlp.down_proj.weight"]
  sd["model.layers.1.mlp.down.weight"] = np.zeros((8, 16), BF16)
  S.save(tmp_path / "b" / "model.safetensors", sd)
  assert cli.main(argv) == 2
  err = capsys.readouterr().err
  assert "does not match the pretrained model's parameters: missing ['model.layers.1.mlp.down_proj.weight'], " \
         "extra ['model.layers.1.mlp.down.weight']" in err, err
  assert not (tmp_path / "o").exists()
