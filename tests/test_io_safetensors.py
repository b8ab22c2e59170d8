"""Checkpoint I/O: safetensors reading (lazy, bf16, sharded, corrupt files), atomic and streamed writing, orbax,
and the LLM alignment views (tied embeddings, vocabulary policy, dtype mismatches)."""

import json
import pathlib
import struct

import ml_dtypes
import numpy as np
import pytest

from jaxmerge.io import llm
from jaxmerge.io import orbax_io as O
from jaxmerge.io import safetensors_io as S

BF16 = np.dtype(ml_dtypes.bfloat16)


def _tensors(seed=0):
  r = np.random.default_rng(seed)
  return {
      "vision_model.encoder.layers.0.mlp.fc1.weight": r.standard_normal((8, 4)).astype(np.float32),
      "vision_model.encoder.layers.0.mlp.fc1.bias": r.standard_normal(8).astype(BF16),
      "vision_model.embeddings.patch_embedding.weight": r.standard_normal((4, 3, 2, 2)).astype(np.float16),
      "vision_model.embeddings.position_ids": np.arange(5, dtype=np.int64)[None],
      "flags": np.array([True, False]),
      "empty": np.zeros((0, 3), np.float32),
      "scalar": np.array(2.5, np.float64),
  }


def _same(a, b):
  assert a.dtype == b.dtype and a.shape == b.shape
  np.testing.assert_array_equal(np.asarray(a, np.float64) if a.dtype == BF16 else a,
                                np.asarray(b, np.float64) if b.dtype == BF16 else b)


def test_round_trip_every_dtype_lazily(tmp_path):
  x = _tensors()
  S.save(tmp_path / "m.safetensors", x, metadata={"k": "v"})
  with S.open_checkpoint(tmp_path / "m.safetensors") as r:
    assert set(r.keys()) == set(x) and r.metadata == {"k": "v"}
    for k, v in x.items():
      assert r.shape(k) == v.shape and r.dtype(k) == v.dtype
      got = r.get(k)
      _same(got, v)
      assert got.flags.writeable  # a fresh array, not a view of the mapping
      _same(r[k], v)
  assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_interop_with_the_reference_libraries(tmp_path):
  st_np = pytest.importorskip("safetensors.numpy")
  x = {k: v for k, v in _tensors().items() if v.dtype != BF16}
  S.save(tmp_path / "ours.safetensors", x)
  theirs = st_np.load_file(str(tmp_path / "ours.safetensors"))
  for k in x:
    _same(theirs[k], x[k])
  st_np.save_file(x, str(tmp_path / "theirs.safetensors"))
  for k, v in S.load(tmp_path / "theirs.safetensors").items():
    _same(v, x[k])
  torch = pytest.importorskip("torch")
  st_torch = pytest.importorskip("safetensors.torch")
  w = torch.randn(3, 5).to(torch.bfloat16)
  st_torch.save_file({"w": w}, str(tmp_path / "bf16.safetensors"))
  got = S.open_checkpoint(tmp_path / "bf16.safetensors").get("w")
  assert got.dtype == BF16
  np.testing.assert_array_equal(got.astype(np.float32), w.float().numpy())


def test_sharded_directory_with_index(tmp_path):
  x = _tensors()
  S.save_sharded(tmp_path / "ck", x, max_shard_bytes=64)
  files = sorted(p.name for p in (tmp_path / "ck").iterdir())
  assert S.INDEX_NAME in files and sum(f.endswith(".safetensors") for f in files) > 2
  index = json.loads((tmp_path / "ck" / S.INDEX_NAME).read_text())
  assert index["metadata"]["total_size"] == sum(v.nbytes for v in x.values())
  r = S.open_checkpoint(tmp_path / "ck")
  assert isinstance(r, S.ShardedReader) and set(r.keys()) == set(x)
  for k, v in x.items():
    _same(r.get(k), v)
    assert r.file_of(k).name == index["weight_map"][k]
  for shard in set(index["weight_map"].values()):  # every shard respects the limit or holds one tensor
    rr = S.SafetensorsReader(tmp_path / "ck" / shard)
    assert sum(rr.nbytes(k) for k in rr) <= 64 or len(rr) == 1
  # An index that lists a tensor its shard lacks, or a missing shard, names the index.
  index["weight_map"]["ghost"] = next(iter(index["weight_map"].values()))
  (tmp_path / "ck" / S.INDEX_NAME).write_text(json.dumps(index))
  with pytest.raises(ValueError, match=r"tensor 'ghost' is listed in shard"):
    S.open_checkpoint(tmp_path / "ck")
  index["weight_map"]["ghost"] = "model-00099-of-00099.safetensors"
  (tmp_path / "ck" / S.INDEX_NAME).write_text(json.dumps(index))
  with pytest.raises(ValueError, match="does not exist"):
    S.open_checkpoint(tmp_path / "ck")


def test_corrupt_and_truncated_files_name_the_file(tmp_path):
  good = tmp_path / "good.safetensors"
  S.save(good, {"w": np.ones((4, 4), np.float32), "b": np.ones(4, np.float32)})
  raw = good.read_bytes()
  n = struct.unpack("<Q", raw[:8])[0]
  cases = {
      "trunc": (raw[:-10], r"trunc\.safetensors is corrupt or truncated: tensor '\w'"),
      "hdrlen": (struct.pack("<Q", 10**9) + raw[8:], r"hdrlen\.safetensors is corrupt or truncated: header length"),
      "json": (raw[:8] + b"{" + b"x" * (n - 1) + raw[8 + n:], r"json\.safetensors is corrupt: its header is not valid"),
      "tiny": (b"abc", r"tiny\.safetensors is not a safetensors file: truncated before the header"),
      "array": (struct.pack("<Q", 2) + b"[]", r"array\.safetensors is corrupt: the header is not a JSON object"),
  }
  header = json.loads(raw[8:8 + n])
  header["w"]["data_offsets"] = [0, 10**6]
  bad = json.dumps(header).encode()
  cases["offsets"] = (struct.pack("<Q", len(bad)) + bad + raw[8 + n:], r"offsets\.safetensors is corrupt or truncated")
  header["w"]["dtype"] = "F99"
  bad = json.dumps(header).encode()
  cases["dtype"] = (struct.pack("<Q", len(bad)) + bad + raw[8 + n:], r"dtype\.safetensors is corrupt: bad header entry")
  for name, (data, pattern) in cases.items():
    (tmp_path / f"{name}.safetensors").write_bytes(data)
    with pytest.raises(ValueError, match=pattern):
      S.load(tmp_path / f"{name}.safetensors")
  with pytest.raises(ValueError, match="does not exist"):
    S.open_checkpoint(tmp_path / "missing.safetensors")
  (tmp_path / "empty_dir").mkdir()
  with pytest.raises(ValueError, match="no safetensors or orbax checkpoint in directory"):
    S.open_checkpoint(tmp_path / "empty_dir")


def test_sharded_writer_streams_in_any_order_and_is_atomic(tmp_path):
  x = {k: v for k, v in _tensors().items()}
  specs = {k: (v.shape, v.dtype) for k, v in x.items()}
  w = S.ShardedWriter(tmp_path / "out", specs, max_shard_bytes=70, metadata={"m": "1"})
  for k in reversed(list(x)):
    assert not (tmp_path / "out").exists()  # nothing at the final path until close()
    w.write(k, x[k])
  with pytest.raises(ValueError, match="has shape"):
    w.write("flags", np.zeros(3, bool))
  assert w.close() == tmp_path / "out"
  r = S.open_checkpoint(tmp_path / "out")
  for k, v in x.items():
    _same(r.get(k), v)
  assert [p.name for p in tmp_path.iterdir()] == ["out"]
  # Undeclared or missing tensors: an error, and nothing at the final path.
  w = S.ShardedWriter(tmp_path / "out2", specs)
  with pytest.raises(ValueError, match="was not declared"):
    w.write("nope", np.zeros(1))
  w.write("flags", x["flags"])
  with pytest.raises(ValueError, match="never written"):
    w.close()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
  with pytest.raises(ValueError, match="already exists"):
    S.ShardedWriter(tmp_path / "out", specs)
  # A failure inside the `with` block aborts.
  with pytest.raises(RuntimeError):
    with S.ShardedWriter(tmp_path / "out3", specs) as w:
      w.write("flags", x["flags"])
      raise RuntimeError("boom")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_save_replaces_atomically(tmp_path, monkeypatch):
  path = tmp_path / "m.safetensors"
  S.save(path, {"a": np.ones(3, np.float32)})
  import os

  def boom(*a, **k):
    raise OSError("disk full")

  monkeypatch.setattr(os, "replace", boom)
  with pytest.raises(OSError):
    S.save(path, {"a": np.zeros(3, np.float32)})
  monkeypatch.undo()
  np.testing.assert_array_equal(S.load(path)["a"], np.ones(3, np.float32))  # the old file is intact
  assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


@pytest.mark.parametrize("text,value", [("5GB", 5 * 10**9), ("500MiB", 500 * 2**20), ("1024", 1024),
                                        ("1.5kB", 1500), (7, 7)])
def test_parse_size(text, value):
  assert S.parse_size(text) == value


def test_parse_size_rejects_junk():
  with pytest.raises(ValueError, match="cannot read the size"):
    S.parse_size("five gigs")


def test_orbax_round_trip_lazy_reader_and_atomic_save(tmp_path):
  flat = {"model.layers.0.w": np.arange(6, dtype=np.float32).reshape(2, 3), "lm_head.weight": np.ones(4, BF16)}
  O.save(tmp_path / "flat", flat)
  r = S.open_checkpoint(tmp_path / "flat")
  assert isinstance(r, O.OrbaxReader) and set(r.keys()) == set(flat)
  for k, v in flat.items():
    assert r.shape(k) == v.shape and r.dtype(k) == v.dtype
    _same(r.get(k), v)
  nested = {"encoder": {"layer0": {"kernel": np.eye(3, dtype=np.float32)}}, "head": np.zeros(2, np.float32)}
  O.save(tmp_path / "nested", nested)
  assert set(S.load(tmp_path / "nested")) == {"encoder/layer0/kernel", "head"}
  restored = O.restore(tmp_path / "nested")
  np.testing.assert_array_equal(restored["encoder"]["layer0"]["kernel"], np.eye(3))
  # "a/b" names nest back into the original tree.
  O.save(tmp_path / "renested", S.load(tmp_path / "nested"))
  assert set(O.restore(tmp_path / "renested")) == {"encoder", "head"}
  with pytest.raises(ValueError, match="already exists"):
    O.save(tmp_path / "flat", flat)
  with pytest.raises(ValueError, match="would share the orbax name"):
    O.nest({"a.b": 1, "a/b": 2})
  assert not any(p.name.startswith(".") for p in tmp_path.iterdir())
  # A CheckpointManager-style step directory is found.
  step = tmp_path / "run" / "100"
  step.mkdir(parents=True)
  O.save(step / "default", flat)
  assert set(S.open_checkpoint(tmp_path / "run").keys()) == set(flat)


# ----------------------------------------------------------------------------------------------------------
# LLM alignment views (jaxmerge.io.llm).


def _llm(vocab=10, tied=False, dtype=np.float32, seed=0, extra_rows=0):
  r = np.random.default_rng(seed)
  d = {"model.embed_tokens.weight": r.standard_normal((vocab + extra_rows, 4)),
       "model.layers.0.self_attn.q_proj.weight": r.standard_normal((4, 4)),
       "model.norm.weight": r.standard_normal(4)}
  if not tied:
    d["lm_head.weight"] = r.standard_normal((vocab + extra_rows, 4))
  return S_reader({k: v.astype(dtype) for k, v in d.items()})


class S_reader(dict):
  """A minimal TensorReader over a dict."""

  path = "<dict>"

  def shape(self, k):
    return self[k].shape

  def dtype(self, k):
    return self[k].dtype

  def get(self, k):  # noqa: D401
    return self[k]


def test_tied_fine_tune_reads_lm_head_from_its_embedding():
  base = _llm()
  tied = _llm(tied=True, seed=1)
  bv, (mv,) = llm.align(base, [tied], names=["tied.safetensors"])
  np.testing.assert_array_equal(mv.get("lm_head.weight"), tied["model.embed_tokens.weight"])
  with pytest.raises(ValueError, match=r"untied\.safetensors: has its own 'lm_head.weight' but the pretrained model "
                                       r"ties it"):
    llm.align(_llm(tied=True), [_llm(seed=2)], names=["untied.safetensors"])


def test_vocab_policies():
  base, bigger, smaller = _llm(), _llm(seed=1, extra_rows=3), _llm(seed=2, extra_rows=-2)
  with pytest.raises(ValueError, match=r"big: parameter 'model.embed_tokens.weight' has shape \(13, 4\), the "
                                       r"pretrained model has \(10, 4\): the vocabulary sizes differ"):
    llm.align(base, [bigger, smaller], names=["big", "small"])
  bv, mv = llm.align(base, [bigger, smaller], policy="truncate", names=["big", "small"])
  assert bv.shape("lm_head.weight") == (8, 4) and llm.vocab_size_of(bv) == 8
  np.testing.assert_array_equal(mv[0].get("lm_head.weight"), bigger["lm_head.weight"][:8])
  np.testing.assert_array_equal(bv.get("model.embed_tokens.weight"), base["model.embed_tokens.weight"][:8])
  bv, mv = llm.align(base, [bigger, smaller], policy="pad_base", names=["big", "small"])
  assert bv.shape("model.embed_tokens.weight") == (10, 4)
  np.testing.assert_array_equal(mv[0].get("model.embed_tokens.weight"), bigger["model.embed_tokens.weight"][:10])
  got = mv[1].get("model.embed_tokens.weight")  # 8 own rows, then the pretrained rows 8..9
  np.testing.assert_array_equal(got[:8], smaller["model.embed_tokens.weight"])
  np.testing.assert_array_equal(got[8:], base["model.embed_tokens.weight"][8:])
  # Non-vocabulary shape mismatches are errors under every policy.
  odd = _llm(seed=3)
  odd["model.norm.weight"] = np.zeros(5, np.float32)
  with pytest.raises(ValueError, match=r"odd: parameter 'model.norm.weight' has shape \(5,\)"):
    llm.align(base, [odd], policy="truncate", names=["odd"])
  missing = _llm(seed=4)
  del missing["model.norm.weight"]
  with pytest.raises(ValueError, match=r"gone does not match the pretrained model's parameters: missing "
                                       r"\['model.norm.weight'\]"):
    llm.align(base, [missing], names=["gone"])


def test_dtype_mismatch_reads_float32_and_keeps_the_base_dtype():
  base = _llm(dtype=BF16)
  ft = _llm(seed=1, dtype=np.float32)
  bv, (mv,) = llm.align(base, [ft])
  assert bv.dtype("model.norm.weight") == np.float32 and mv.dtype("model.norm.weight") == np.float32
  assert bv.out_dtype("model.norm.weight") == BF16
  np.testing.assert_array_equal(mv.get("model.norm.weight"), ft["model.norm.weight"])
  bv, _ = llm.align(_llm(dtype=BF16), [_llm(seed=1, dtype=BF16)], out_dtype="float32")
  assert bv.dtype("model.norm.weight") == np.float32 and bv.out_dtype("model.norm.weight") == np.float32
  ints = _llm()
  ints["model.norm.weight"] = np.zeros(4, np.int32)
  with pytest.raises(ValueError, match="has dtype int32"):
    llm.align(_llm(), [ints], names=["ints"])


def test_writer_flushes_each_file_as_it_goes(tmp_path, monkeypatch):
  # Write-behind: past WRITEBACK_BYTES of new data a file is fdatasynced in a background thread; close() still
  # fsyncs everything; an abort after some flushes leaves nothing behind.
  import os

  synced = []
  real = getattr(os, "fdatasync", os.fsync)
  monkeypatch.setattr(S, "WRITEBACK_BYTES", 64)
  monkeypatch.setattr(os, "fdatasync" if hasattr(os, "fdatasync") else "fsync",
                      lambda fd: (synced.append(fd), real(fd))[1])
  x = {f"w{i}": np.full((8, 4), i, np.float32) for i in range(6)}  # 128 bytes each
  specs = {k: (v.shape, v.dtype) for k, v in x.items()}
  with S.ShardedWriter(tmp_path / "out", specs, max_shard_bytes=300) as w:
    for k, v in x.items():
      w.write(k, v)
  assert len(synced) >= 2  # at least one flush per shard file, before close
  r = S.open_checkpoint(tmp_path / "out")
  for k, v in x.items():
    np.testing.assert_array_equal(r.get(k), v)
  w = S.ShardedWriter(tmp_path / "out2", specs, max_shard_bytes=300)
  for k in list(x)[:4]:
    w.write(k, x[k])
  w.abort()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_reader_arrays_are_adopted_by_jax_without_a_copy(tmp_path):
  # get() returns 64-byte aligned arrays, which JAX's CPU backend uses in place (streaming merges then copy each
  # tensor once, from the file).
  import jax

  x = {"a": np.arange(1000, dtype=np.float32).reshape(10, 100), "b": np.ones(333, BF16)}
  S.save(tmp_path / "m.safetensors", x)
  r = S.open_checkpoint(tmp_path / "m.safetensors")
  for k in x:
    got = r.get(k)
    assert got.ctypes.data % 64 == 0 and got.flags.c_contiguous and got.flags.writeable
    _same(got, x[k])
    if jax.default_backend() == "cpu":
      assert jax.device_put(got).unsafe_buffer_pointer() == got.ctypes.data
