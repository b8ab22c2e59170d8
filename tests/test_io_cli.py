"""Safetensors I/O (lazy reading, corrupt files, atomic writes) and the `jaxmerge merge` / `methods` commands."""

import json
import pathlib
import struct

import ml_dtypes
import numpy as np
import pytest

import jaxmerge as jm
from jaxmerge import cli
from jaxmerge.io import safetensors_io as S


def _ckpts(tmp_path, t=3, dtype=np.float32):
  r = np.random.default_rng(0)
  names = {"vision_model.encoder.layers.0.mlp.fc1.weight": (8, 4), "vision_model.encoder.layers.0.mlp.fc1.bias": (8,),
           "vision_model.embeddings.patch_embedding.weight": (4, 3, 2, 2), "vision_model.embeddings.position_ids": None}
  pre = {k: (r.standard_normal(s).astype(dtype) if s else np.arange(5, dtype=np.int64)[None]) for k, s in names.items()}
  paths = []
  S.save(tmp_path / "base.safetensors", pre)
  for i in range(t):
    m = {k: (v + r.standard_normal(v.shape).astype(dtype) if v.dtype != np.int64 else v) for k, v in pre.items()}
    d = tmp_path / f"expert{i}"
    S.save_sharded(d, m)
    paths.append(d)
  return pre, paths


def test_round_trip_bf16_sharded_and_reference_reader(tmp_path):
  safetensors_numpy = pytest.importorskip("safetensors.numpy")
  x = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(5, ml_dtypes.bfloat16), "c": np.arange(3)}
  S.save(tmp_path / "m.safetensors", x, metadata={"k": "v"})
  back = S.load(tmp_path / "m.safetensors")
  for k in x:
    assert back[k].dtype == x[k].dtype and np.array_equal(back[k], x[k])
  np.testing.assert_array_equal(safetensors_numpy.load_file(str(tmp_path / "m.safetensors"))["a"], x["a"])
  S.save_sharded(tmp_path / "sharded", x, max_shard_bytes=40)
  assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
  assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
  back = S.load(tmp_path / "sharded")
  assert set(back) == set(x) and np.array_equal(back["a"], x["a"])


def test_corrupt_and_truncated_files_name_the_file(tmp_path):
  good = tmp_path / "good.safetensors"
  S.save(good, {"w": np.ones((4, 4), np.float32)})
  raw = good.read_bytes()
  (tmp_path / "trunc.safetensors").write_bytes(raw[:-10])
  with pytest.raises(ValueError, match=r"trunc\.safetensors is corrupt or truncated: tensor 'w'"):
    S.load(tmp_path / "trunc.safetensors")
  (tmp_path / "hdr.safetensors").write_bytes(struct.pack("<Q", 10**9) + raw[8:])
  with pytest.raises(ValueError, match=r"hdr\.safetensors is corrupt or truncated: header length"):
    S.load(tmp_path / "hdr.safetensors")
  n = struct.unpack("<Q", raw[:8])[0]
  (tmp_path / "json.safetensors").write_bytes(raw[:8] + b"{" + b"x" * (n - 1) + raw[8 + n:])
  with pytest.raises(ValueError, match=r"json\.safetensors is corrupt: its header is not valid JSON"):
    S.load(tmp_path / "json.safetensors")
  (tmp_path / "tiny.safetensors").write_bytes(b"abc")
  with pytest.raises(ValueError, match="truncated before the header"):
    S.load(tmp_path / "tiny.safetensors")
  with pytest.raises(ValueError, match="does not exist"):
    S.load(tmp_path / "missing.safetensors")


def test_cli_merge_flags_matches_library(tmp_path, capsys):
  pre, paths = _ckpts(tmp_path)
  out = tmp_path / "out"
  rc = cli.main(["merge", "--method", "ties", "--base", str(tmp_path / "base.safetensors"),
                 *sum((["--model", str(p)] for p in paths), []), "--hparam", "density=0.5", "--hparam", "scale=1.0",
                 "--out", str(out)])
  assert rc == 0
  got = S.load(out / "model.safetensors")
  want = jm.merge(jm.get_method("ties")(density=0.5, scale=1.0), pre, [S.load(p) for p in paths])
  for k in want:
    np.testing.assert_allclose(got[k], np.asarray(want[k]), rtol=1e-6)
  np.testing.assert_array_equal(got["vision_model.embeddings.position_ids"], pre["vision_model.embeddings.position_ids"])
  assert json.loads((out / "merge_info.json").read_text())["method"] == "ties"


def test_cli_yaml_per_task_and_dtype(tmp_path):
  pre, paths = _ckpts(tmp_path, dtype=ml_dtypes.bfloat16)
  cfg = tmp_path / "merge.yaml"
  cfg.write_text(f"method: emr\nbase: {tmp_path / 'base.safetensors'}\nmodels: [{', '.join(map(str, paths))}]\n")
  assert cli.main(["merge", str(cfg), "--out", str(tmp_path / "emr")]) == 0
  assert sorted(p.name for p in (tmp_path / "emr").iterdir() if p.is_dir()) == ["task_0", "task_1", "task_2"]
  t0 = S.load(tmp_path / "emr" / "task_0")
  assert t0["vision_model.encoder.layers.0.mlp.fc1.weight"].dtype == ml_dtypes.bfloat16
  cfg.write_text(f"method: task_arithmetic\nbase: {tmp_path / 'base.safetensors'}\nmodels: [{paths[0]}]\n"
                 "hparams: {scale: 1.0}\ndtype: float32\n")
  assert cli.main(["merge", str(cfg), "--out", str(tmp_path / "ta")]) == 0
  ta = S.load(tmp_path / "ta")
  assert ta["vision_model.encoder.layers.0.mlp.fc1.weight"].dtype == np.float32
  np.testing.assert_allclose(ta["vision_model.encoder.layers.0.mlp.fc1.weight"],
                             S.load(paths[0])["vision_model.encoder.layers.0.mlp.fc1.weight"].astype(np.float32), rtol=1e-2)


def test_cli_errors_are_clean_and_leave_no_output(tmp_path, capsys, monkeypatch):
  pre, paths = _ckpts(tmp_path)
  base = str(tmp_path / "base.safetensors")
  common = ["--base", base, "--model", str(paths[0]), "--model", str(paths[1])]
  assert cli.main(["merge", "--method", "tie", *common, "--out", str(tmp_path / "o1")]) == 2
  assert "unknown method 'tie'" in capsys.readouterr().err
  assert cli.main(["merge", "--method", "ties", *common, "--hparam", "densty=0.1", "--out", str(tmp_path / "o2")]) == 2
  assert "valid: ['count', 'density'" in capsys.readouterr().err
  bad = S.load(paths[1])
  bad["vision_model.encoder.layers.0.mlp.fc1.weight"] = np.zeros((4, 4), np.float32)
  S.save(tmp_path / "bad.safetensors", bad)
  assert cli.main(["merge", "--method", "ties", "--base", base, "--model", str(paths[0]), "--model",
                   str(tmp_path / "bad.safetensors"), "--out", str(tmp_path / "o3")]) == 2
  err = capsys.readouterr().err
  assert "bad.safetensors: parameter 'vision_model.encoder.layers.0.mlp.fc1.weight' has shape (4, 4)" in err
  # A failure while writing leaves neither the output nor a temporary directory behind.
  def boom(*a, **k):
    raise OSError("disk full")
  monkeypatch.setattr(S, "save", boom)
  assert cli.main(["merge", "--method", "ties", *common, "--out", str(tmp_path / "o4")]) == 2
  assert f"cannot write the output {tmp_path / 'o4'}: disk full" in capsys.readouterr().err
  assert not any(p.name.startswith(("o1", "o2", "o3", "o4", ".o4")) for p in tmp_path.iterdir())


def test_methods_command_lists_the_registry(capsys):
  assert cli.main(["methods"]) == 0
  out = capsys.readouterr().out
  for name in jm.list_methods():
    assert f"`{name}`" in out
