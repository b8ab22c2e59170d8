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
