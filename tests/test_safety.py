"""Reliability and security of the I/O layer and the CLI (issue 22): no file outside a model's directory is
read, hostile headers and indexes fail with a clear error, and interrupted or failed runs leave nothing
behind."""

from __future__ import annotations

import json
import os
import pathlib
import struct
import threading

import numpy as np
import pytest

import jaxmerge.ri  # noqa: F401  (registers "ri")
from jaxmerge import cli
from jaxmerge.io import llm
from jaxmerge.io import paths
from jaxmerge.io import safetensors_io as S


def _sharded(d: pathlib.Path, seed=0) -> dict:
  x = {"a": np.full((4, 4), seed + 1.0, np.float32), "b": np.arange(6, dtype=np.float32) + seed}
  S.save_sharded(d, x, max_shard_bytes=40)
  return x


def _index(d: pathlib.Path) -> dict:
  return json.loads((d / S.INDEX_NAME).read_text())


def _rewrite_index(d: pathlib.Path, fn) -> None:
  raw = _index(d)
  raw["weight_map"] = {k: fn(v) for k, v in raw["weight_map"].items()}
  (d / S.INDEX_NAME).write_text(json.dumps(raw))


# --------------------------------------------------------------------------------------------- paths


def test_index_cannot_name_files_outside_its_directory(tmp_path):
  _sharded(tmp_path / "other", seed=5)
  d = tmp_path / "models" / "m"
  _sharded(d)
  assert S.load(d)["a"][0, 0] == 1.0
  raw = _index(d)
  first = sorted(set(raw["weight_map"].values()))[0]
  for bad in (f"../../other/{first}", "/etc/passwd", str((tmp_path / "other" / first).resolve())):
    (d / S.INDEX_NAME).write_text(json.dumps(raw))
    _rewrite_index(d, lambda v, bad=bad: bad if v == first else v)
    with pytest.raises(ValueError, match="not a plain relative path"):
      S.open_checkpoint(d)
  (d / S.INDEX_NAME).write_text(json.dumps(raw))
  # A shard that is a symbolic link out of the directory.
  _rewrite_index(d, lambda v: "link.safetensors" if v == first else v)
  (d / "link.safetensors").symlink_to(tmp_path / "other" / first)
  with pytest.raises(ValueError, match="outside the model directory"):
    S.open_checkpoint(d)
  # The only *.safetensors of a directory, a link out of it.
  solo = tmp_path / "solo"
  solo.mkdir()
  S.save(tmp_path / "elsewhere.safetensors", {"w": np.ones(2, np.float32)})
  (solo / "model.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
  with pytest.raises(ValueError, match="outside the model directory"):
    S.open_checkpoint(solo)
  assert S.load(tmp_path / "elsewhere.safetensors")["w"].shape == (2,)  # a path the user passes is theirs


def test_hugging_face_cache_snapshot_links_into_blobs_keep_working(tmp_path):
  """``models--org--name/snapshots/<rev>/*`` are relative links into ``models--org--name/blobs/``."""
  repo = tmp_path / "hub" / "models--org--name"
  staged = tmp_path / "staged"
  x = _sharded(staged)
  (repo / "blobs").mkdir(parents=True)
  snap = repo / "snapshots" / "0123abcd"
  snap.mkdir(parents=True)
  (staged / "tokenizer.json").write_text('{"model": {}}')
  for i, f in enumerate(sorted(staged.iterdir())):
    blob = repo / "blobs" / f"{i:040x}"
    blob.write_bytes(f.read_bytes())
    (snap / f.name).symlink_to(os.path.relpath(blob, snap))
  back = S.load(snap)
  assert set(back) == set(x) and np.array_equal(back["b"], x["b"])
  out = tmp_path / "out"
  out.mkdir()
  assert llm.copy_model_files(snap, out) == ["tokenizer.json"]
  # A link to another repository's blobs is still refused.
  other = tmp_path / "hub" / "models--evil--x" / "blobs"
  other.mkdir(parents=True)
  (other / "t").write_text("{}")
  (snap / "tokenizer.json").unlink()
  (snap / "tokenizer.json").symlink_to(other / "t")
  with pytest.raises(ValueError, match="tokenizer.json .*outside the model directory"):
    llm.copy_model_files(snap, tmp_path / "out2")


def test_tokenizer_and_config_links_out_of_the_base_directory_are_refused(tmp_path):
  base = tmp_path / "base"
  base.mkdir()
  secret = tmp_path / "secret.txt"
  secret.write_text("do not copy")
  (base / "tokenizer.json").symlink_to(secret)
  out = tmp_path / "out"
  out.mkdir()
  with pytest.raises(ValueError, match="tokenizer.json"):
    llm.copy_model_files(base, out)
  assert not (out / "tokenizer.json").exists()
  (base / "tokenizer.json").unlink()
  (base / "config.json").symlink_to(secret)
  with pytest.raises(ValueError, match="config.json"):
    llm.check_architectures(base, [base])


def test_inside_rejects_dotdot_and_absolute_names(tmp_path):
  for bad in ("../x", "a/../../x", "/abs", "", "a\\..\\..\\x"):
    with pytest.raises(ValueError):
      paths.inside(tmp_path, bad)
  assert paths.inside(tmp_path, "sub/x.safetensors") == tmp_path / "sub" / "x.safetensors"


# --------------------------------------------------------------------------------------------- headers


def _raw(header: bytes, data: bytes = b"") -> bytes:
  return struct.pack("<Q", len(header)) + header + data


def test_header_shape_overflow_is_an_error_naming_the_tensor(tmp_path):
  f = tmp_path / "big.safetensors"
  f.write_bytes(_raw(json.dumps({"w": {"dtype": "F32", "shape": [2**32, 2**32], "data_offsets": [0, 0]}}).encode()))
  with pytest.raises(ValueError, match=r"big\.safetensors is corrupt or truncated: tensor 'w'"):
    S.open_checkpoint(f)
  f.write_bytes(_raw(json.dumps({"w": {"dtype": "F32", "shape": [2.5], "data_offsets": [0, 10]}}).encode()))
  with pytest.raises(ValueError, match="bad header entry for tensor 'w'"):
    S.open_checkpoint(f)


def test_deeply_nested_header_is_a_clear_error(tmp_path):
  f = tmp_path / "deep.safetensors"
  f.write_bytes(_raw(b"[" * 200_000))
  with pytest.raises(ValueError, match="nests too deeply"):
    S.open_checkpoint(f)
  d = tmp_path / "idx"
  _sharded(d)
  (d / S.INDEX_NAME).write_text("[" * 200_000)
  with pytest.raises(ValueError, match="not a valid safetensors index"):
    S.open_checkpoint(d)


def test_fifo_checkpoint_is_refused_without_hanging(tmp_path):
  fifo = tmp_path / "pipe.safetensors"
  os.mkfifo(fifo)
  result = []
  t = threading.Thread(target=lambda: result.append(pytest.raises(ValueError, S.open_checkpoint, fifo)), daemon=True)
  t.start()
  t.join(10)
  assert not t.is_alive(), "opening a FIFO blocked"
  assert "FIFO" in str(result[0].value)


def test_pytorch_file_is_named_as_such(tmp_path):
  torch = pytest.importorskip("torch")
  f = tmp_path / "pytorch_model.bin"
  torch.save({"w": torch.ones(64, 64)}, f)
  with pytest.raises(ValueError, match="looks like a PyTorch"):
    S.open_checkpoint(f)


# --------------------------------------------------------------------------------------------- hyperparameters


def test_every_method_declares_every_hyperparameter_and_its_defaults_pass():
  import jaxmerge as jm

  for name in jm.list_methods():
    info = jm.method_info(name)
    assert set(info.params) == set(info.hparams), name
    for k, v in info.hparams.items():
      info.params[k].check(name, k, v)


@pytest.mark.parametrize("method, hp, match", [
    ("ties", {"density": -0.1}, r"'ties': hyperparameter density must be a finite number in \[0, 1\], got -0.1"),
    ("ties", {"density": 1.5}, r"density must be a finite number in \[0, 1\]"),
    ("ties", {"density": "high"}, r"density must be a finite number in \[0, 1\], got 'high'"),
    ("dare", {"base": "ties", "density": -0.1}, r"'dare': hyperparameter density"),
    ("task_arithmetic", {"scale": float("nan")}, "scale must be a finite number, got nan"),
    ("ties", {"scale": float("inf")}, "scale must be a finite number, got inf"),
    ("slerp", {"t": float("nan")}, r"t must be a finite number in \[0, 1\]"),
    ("tsv_m", {"rank_fraction": 0.0}, r"rank_fraction must be a finite number in \(0, 1\] or null"),
    ("tsv_m", {"rank_fraction": -1}, "rank_fraction"),
    ("consensus", {"k": 1.5}, "k must be an integer >= 0"),
    ("consensus", {"k": True}, "k must be an integer"),
    ("pcb", {"scale": [1.0, float("nan")]}, "scale must be a finite number"),
    ("dare", {"rescale": 1}, "rescale must be one of True, False, 'l1'"),
    ("ri", {"temperature": 0}, "temperature must be a finite number > 0"),
    ("scale_search", {"base": "nope"}, "hyperparameter base names an unknown method 'nope'; valid methods: "),
    ("scale_search", {"base": 3}, "base must be a registered method name"),
])
def test_out_of_range_hyperparameters_name_method_parameter_and_range(method, hp, match):
  import jaxmerge as jm

  with pytest.raises(ValueError, match=match):
    jm.get_method(method)(**hp)
  with pytest.raises(ValueError, match=match):
    jm.registry.validate(method, hp)


def test_direct_factory_calls_are_checked_too():
  from jaxmerge import alias

  with pytest.raises(ValueError, match="density"):
    alias.ties(1.5)  # positional, without the registry
  assert alias.ties(0.3).steps  # a valid positional call still builds


def test_methods_table_shows_the_declared_ranges():
  from jaxmerge.commands import methods

  row = next(r for r in methods.table().splitlines() if r.startswith("| `ties` "))
  assert "density=0.2 (a finite number in [0, 1])" in row


def test_consensus_k_beyond_the_number_of_tasks_is_an_error():
  import jaxmerge as jm

  pre = {"w": np.zeros(4, np.float32)}
  fts = [{"w": np.ones(4, np.float32)}, {"w": -np.ones(4, np.float32)}]
  with pytest.raises(ValueError, match=r"k <= the number of tasks \(2\), got k=3"):
    jm.merge(jm.get_method("consensus")(k=3), pre, fts)


def test_python_float_leaf_is_named():
  import jaxmerge as jm

  with pytest.raises(ValueError, match="parameter 'w' is a float, not an array"):
    jm.merge(jm.get_method("task_arithmetic")(), {"w": 1.0}, [{"w": 2.0}])


# --------------------------------------------------------------------------------------------- degenerate merges


def test_pcb_with_an_expert_equal_to_the_base_tiny_and_scalar_leaves_is_finite():
  import jaxmerge as jm

  r = np.random.default_rng(0)
  pre = {"w": r.standard_normal((6, 5)).astype(np.float32), "s": np.float32(0.5) * np.ones((), np.float32)}
  other = {k: v + r.standard_normal(np.shape(v)).astype(np.float32) for k, v in pre.items()}
  tx = jm.get_method("pcb")()
  # Every expert equal to the base: nothing to merge, the pretrained model exactly (the reference gives NaN).
  same = jm.merge(tx, pre, [dict(pre), dict(pre)])
  for k in pre:
    np.testing.assert_array_equal(np.asarray(same[k]), pre[k])
  # One expert equal to the base: it contributes nothing, so the result is the other expert's PCB alone.
  one = jm.merge(tx, pre, [dict(pre), other])
  alone = jm.merge(tx, pre, [other])
  for k in pre:
    assert np.all(np.isfinite(np.asarray(one[k])))
    np.testing.assert_allclose(np.asarray(one[k]), np.asarray(alone[k]), rtol=1e-6, atol=1e-6)
  tiny = jm.merge(tx, {"w": np.zeros(1, np.float32)}, [{"w": np.ones(1, np.float32)}, {"w": np.ones(1, np.float32)}])
  assert np.all(np.isfinite(np.asarray(tiny["w"])))


def test_model_stock_with_anti_parallel_task_vectors_keeps_the_pretrained_leaf():
  import jaxmerge as jm

  pre = {"w": np.linspace(-1, 1, 8, dtype=np.float32), "b": np.zeros(3, np.float32)}
  tau = np.linspace(0.5, 2.0, 8, dtype=np.float32)
  fts = [{"w": pre["w"] + tau, "b": np.array([1, 2, 3], np.float32)},
         {"w": pre["w"] - tau, "b": np.array([1, 2, 2.5], np.float32)}]
  for average in ("angle", "cosine"):
    out = jm.merge(jm.get_method("model_stock")(average=average), pre, fts)
    np.testing.assert_allclose(np.asarray(out["w"]), pre["w"], atol=1e-6)
    assert np.all(np.isfinite(np.asarray(out["b"]))) and np.any(np.asarray(out["b"]) != 0)  # the other leaf merges


# --------------------------------------------------------------------------------------------- the merge command


def _pair(tmp_path, value=0.5, dtype=np.float32):
  r = np.random.default_rng(0)
  pre = {"w": r.standard_normal((8, 4)).astype(dtype), "b": np.full(4, value, dtype)}
  S.save(tmp_path / "base.safetensors", pre)
  for i in range(2):
    S.save(tmp_path / f"m{i}.safetensors", {k: (v + r.standard_normal(v.shape).astype(dtype)) for k, v in pre.items()})
  return ["--base", str(tmp_path / "base.safetensors"), "--model", str(tmp_path / "m0.safetensors"),
          "--model", str(tmp_path / "m1.safetensors")]


def _merge(*args):
  return cli.main(["merge", *map(str, args)])


def test_cli_rejects_nan_and_bad_hparams_with_exit_2(tmp_path, capsys):
  inputs = _pair(tmp_path)
  for hp, match in (("scale=.nan", "scale must be a finite number, got nan"),
                    ("density=high", "density must be a finite number in [0, 1], got 'high'")):
    method = "task_arithmetic" if hp.startswith("scale") else "ties"
    assert _merge("--method", method, *inputs, "--hparam", hp, "--out", tmp_path / "o" / "x") == 2
    assert match in capsys.readouterr().err
  assert not (tmp_path / "o").exists()


def test_yaml_schemas_validate_parameters(tmp_path):
  from jaxmerge import config

  base = {"method": "ties", "base": "b", "models": ["m"]}
  with pytest.raises(ValueError, match="density must be"):
    config.from_dict({**base, "hparams": {"density": 2}})
  with pytest.raises(ValueError, match="hparams must be a mapping"):
    config.from_dict({**base, "hparams": [1, 2]})
  mk = {"merge_method": "task_arithmetic", "base_model": "b", "models": [{"model": "m", "parameters": {"weight": 1}}]}
  assert config.from_dict(mk).method == "mergekit:task_arithmetic"
  with pytest.raises(ValueError, match="parameter 'weight' of model m must be a finite number, got nan"):
    config.from_dict({**mk, "models": [{"model": "m", "parameters": {"weight": float("nan")}}]})
  with pytest.raises(ValueError, match=r"parameter 'density' of the global parameters must be in \[0.0, 1.0\], got 1.5"):
    config.from_dict({**mk, "merge_method": "ties", "parameters": {"density": 1.5}})
  with pytest.raises(ValueError, match="chat_template 'nope' is neither a known template name"):
    config.from_dict({**mk, "chat_template": "nope"})


def test_float16_overflow_is_an_error_and_nothing_is_left(tmp_path, capsys):
  big = {"w": np.full((4, 4), 5e4, np.float32)}  # the merge gives 7.5e4 > 65504
  S.save(tmp_path / "b.safetensors", big)
  S.save(tmp_path / "m.safetensors", {"w": big["w"] * 1.5})
  for stream in ("--stream", "--no-stream"):
    out = tmp_path / "new" / "deeper" / "out"
    assert _merge("--method", "task_arithmetic", "--hparam", "scale=1", "--base", tmp_path / "b.safetensors",
                  "--model", tmp_path / "m.safetensors", "--dtype", "float16", stream, "--out", out) == 2
    assert "merged tensor 'w' has values beyond float16's range" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()  # nor the parents it created
  # bfloat16 holds them.
  assert _merge("--method", "task_arithmetic", "--hparam", "scale=1", "--base", tmp_path / "b.safetensors",
                "--model", tmp_path / "m.safetensors", "--dtype", "bfloat16", "--out", tmp_path / "bf") == 0


@pytest.mark.parametrize("stream", ["--stream", "--no-stream"])
def test_float64_inputs_stay_float64_with_a_note(tmp_path, capsys, stream):
  inputs = _pair(tmp_path, dtype=np.float64)
  assert _merge("--method", "task_arithmetic", *inputs, stream, "--out", tmp_path / "o") == 0
  assert "merged in float32 and written as float64" in capsys.readouterr().out
  back = S.load(tmp_path / "o")
  assert back["w"].dtype == np.float64
  pre, a, b = (S.load(tmp_path / f) for f in ("base.safetensors", "m0.safetensors", "m1.safetensors"))
  want = pre["w"] + 0.3 * ((a["w"] - pre["w"]) + (b["w"] - pre["w"]))
  np.testing.assert_allclose(back["w"], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stream", ["--stream", "--no-stream"])
def test_outputs_honour_the_umask(tmp_path, stream):
  inputs = _pair(tmp_path)
  old = os.umask(0o027)
  try:
    assert _merge("--method", "task_arithmetic", *inputs, stream, "--out", tmp_path / "o") == 0
  finally:
    os.umask(old)
  assert (tmp_path / "o").stat().st_mode & 0o777 == 0o750
  for f in (tmp_path / "o").iterdir():
    assert f.stat().st_mode & 0o777 == 0o640, f


def test_stale_temporaries_of_dead_runs_are_removed_live_ones_kept(tmp_path, capsys):
  from jaxmerge.io import atomic

  inputs = _pair(tmp_path)
  host = atomic._host()
  dead = 2**22 + 12345  # above the default pid_max: no such process
  stale_dir = tmp_path / f".o.jm{dead}h{host}-abc.tmp"
  stale_dir.mkdir()
  (stale_dir / "model.safetensors").write_bytes(b"\0" * 64)
  stale_file = tmp_path / f".x.safetensors.jm{dead}h{host}-q1.tmp"
  stale_file.write_bytes(b"partial")
  live = tmp_path / f".o.jm{os.getppid()}h{host}-def.tmp"
  live.mkdir()
  foreign = tmp_path / f".o.jm{dead}h{'0' * 8 if host != '0' * 8 else '1' * 8}-ghi.tmp"
  foreign.mkdir()
  unrelated = tmp_path / ".o.abc.tmp"
  unrelated.mkdir()
  assert _merge("--method", "task_arithmetic", *inputs, "--out", tmp_path / "o") == 0
  assert "removed" in capsys.readouterr().out
  assert not stale_dir.exists() and not stale_file.exists()
  assert live.exists() and foreign.exists() and unrelated.exists()
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o.jm" + str(os.getpid()))]


def test_interrupted_streamed_shard_is_not_a_valid_checkpoint(tmp_path):
  specs = {"a": ((4, 4), np.float32), "b": ((3,), np.float32)}
  w = S.ShardedWriter(tmp_path / "out", specs, atomic=False)
  w.write("a", np.ones((4, 4), np.float32))
  w.write("b", np.ones(3, np.float32))  # everything written, but never closed (killed)
  with pytest.raises(ValueError, match="corrupt"):
    S.open_checkpoint(tmp_path / "out" / "model.safetensors")
  safetensors_numpy = pytest.importorskip("safetensors.numpy")
  with pytest.raises(Exception):
    safetensors_numpy.load_file(str(tmp_path / "out" / "model.safetensors"))
  w.close()
  assert np.array_equal(S.load(tmp_path / "out")["a"], np.ones((4, 4), np.float32))
  np.testing.assert_array_equal(safetensors_numpy.load_file(str(tmp_path / "out" / "model.safetensors"))["b"],
                                np.ones(3, np.float32))


@pytest.mark.parametrize("stream", ["--stream", "--no-stream"])
def test_disk_full_names_the_output_and_leaves_nothing(tmp_path, monkeypatch, capsys, stream):
  import errno

  inputs = _pair(tmp_path)

  def full(*a, **k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(S, "_pwrite_all", full)
  monkeypatch.setattr(S.os, "fsync", full)
  out = tmp_path / "made" / "o"
  assert _merge("--method", "task_arithmetic", *inputs, stream, "--out", out) == 2
  err = capsys.readouterr().err
  assert f"cannot write the output {out}: No space left on device" in err
  assert not (tmp_path / "made").exists()
  assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_orbax_output_with_a_relative_out(tmp_path, monkeypatch):
  inputs = _pair(tmp_path)
  monkeypatch.chdir(tmp_path)
  assert _merge("--method", "task_arithmetic", *inputs, "--format", "orbax", "--out", "rel") == 0
  back = S.load(tmp_path / "rel")
  assert set(back) == {"w", "b"}


def test_index_outside_the_directory_fails_the_cli_with_exit_2(tmp_path, capsys):
  inputs = _pair(tmp_path)
  d = tmp_path / "sharded"
  _sharded(d)
  _sharded(tmp_path / "other", seed=3)
  _rewrite_index(d, lambda v: "../other/" + v)
  assert _merge("--method", "task_arithmetic", "--base", d, "--model", d, "--out", tmp_path / "o") == 2
  assert "not a plain relative path" in capsys.readouterr().err
  del inputs


def test_bench_smoke_keeps_a_tta_method_with_tta():
  from jaxmerge.bench import command

  everything = ["simple_average", "task_arithmetic", "ties", "adamerging", "concrete"]
  assert command.smoke_selection(everything, [], tta=False)[0] == ["simple_average", "task_arithmetic", "ties"]
  plain, _ = command.smoke_selection(everything, [], tta=True)
  assert "adamerging" in plain and "concrete" not in plain
  _, moe = command.smoke_selection([], ["wemoe", "smile", "emr", "twin"], tta=True)
  assert moe == ["wemoe", "smile", "emr"]
  _, moe = command.smoke_selection([], ["wemoe", "smile", "emr", "twin"], tta=False)
  assert moe == ["smile", "emr"]


def test_orbax_checkpoint_with_a_link_out_of_it_is_refused(tmp_path):
  from jaxmerge.io import orbax_io

  orbax_io.save(tmp_path / "ck", {"w": np.ones((2, 2), np.float32)})
  assert set(S.load(tmp_path / "ck")) == {"w"}
  (tmp_path / "secret").write_text("x")
  (tmp_path / "ck" / "extra").symlink_to(tmp_path / "secret")
  with pytest.raises(ValueError, match="orbax checkpoint file .*outside the model directory"):
    S.open_checkpoint(tmp_path / "ck")


def test_pytorch_index_of_a_hugging_face_directory_cannot_name_files_outside(tmp_path):
  from jaxmerge.io import hf

  d = tmp_path / "m"
  d.mkdir()
  (d / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"w": "../../etc/passwd"}}))
  with pytest.raises(ValueError, match="not a plain relative path"):
    hf.read_state_dict(d)
