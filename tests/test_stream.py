"""Streaming merges (jaxmerge.stream): equal to in-memory merges for every streamable method on a multi-shard
checkpoint, one compile per distinct leaf program, exact multi-pass plans for global methods, clear errors, and
peak memory that does not grow with the model."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

import jaxmerge as jm
from jaxmerge import stream
from jaxmerge import tree as jtree
from jaxmerge.engine.xla import runs_by_leaf, runs_flat
from jaxmerge.io import safetensors_io as S

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHAPES = {  # HF-CLIP names; two distinct float shapes, each used twice (tests the compile cache)
    "vision_model.encoder.layers.0.mlp.fc1.weight": (6, 4),
    "vision_model.encoder.layers.0.mlp.fc2.weight": (6, 4),
    "vision_model.encoder.layers.0.mlp.fc1.bias": (6,),
    "vision_model.post_layernorm.bias": (6,),
}


def _models(t, seed=0):
  r = np.random.default_rng(seed)
  pre = {k: r.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
  shared = {k: r.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
  fts = [{k: v + 0.1 * (i + 1) * shared[k] + 0.1 * r.standard_normal(v.shape).astype(np.float32)
          for k, v in pre.items()} for i in range(t)]
  pre["vision_model.embeddings.position_ids"] = np.arange(3, dtype=np.int64)
  for f in fts:
    f["vision_model.embeddings.position_ids"] = pre["vision_model.embeddings.position_ids"]
  return pre, fts


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  """Base and 3 fine-tuned checkpoints on disk, each sharded one tensor per file with an index."""
  d = tmp_path_factory.mktemp("stream")
  pre, fts = _models(3)
  S.save_sharded(d / "base", pre, max_shard_bytes=64)
  for i, f in enumerate(fts):
    S.save_sharded(d / f"m{i}", f, max_shard_bytes=64)
  assert len(list((d / "m0").glob("*.safetensors"))) >= len(SHAPES)
  return d, pre, fts


def _readers(d, t):
  return S.open_checkpoint(d / "base"), [S.open_checkpoint(d / f"m{i}") for i in range(t)]


def _run(tx, d, t, *, method=None, key=None, per_task=False):
  pre, models = _readers(d, t)
  ws = [stream.DictWriter() for _ in range(t)] if per_task else stream.DictWriter()
  res = stream.merge_streaming(tx, pre, models, ws, method=method, key=key)
  return (ws if per_task else [ws]), res


def _assert_same(outs, wants, rtol=1e-6, atol=1e-7):
  for o, w in zip(outs, wants):
    assert set(o) == set(w)
    for k in w:
      assert o[k].dtype == np.asarray(w[k]).dtype, k
      np.testing.assert_allclose(o[k], np.asarray(w[k]), rtol=rtol, atol=atol, err_msg=k)


def _data_free():
  return [n for n in jm.list_methods() if jm.method_info(n).data == "none"]


@pytest.mark.parametrize("name", _data_free())
def test_streaming_equals_in_memory_for_every_streamable_method(ckpt, name):
  d, pre, fts = ckpt
  info = jm.method_info(name)
  tx = info.factory()
  if name not in stream.streamable_methods():
    with pytest.raises(ValueError, match="cannot be streamed"):
      _run(tx, d, 3, method=(name, {}), key=jax.random.key(0), per_task=info.per_task)
    return
  t = 2 if name == "slerp" else 3
  key = jax.random.key(7)
  want = (jm.merge_per_task if info.per_task else jm.merge)(tx, pre, fts[:t], key=key)
  outs, res = _run(tx, d, t, method=(name, {}), key=key, per_task=info.per_task)
  _assert_same(outs, want if info.per_task else [want], rtol=1e-5, atol=1e-6)
  assert res.tensors == len(pre)


@pytest.mark.parametrize("name,hp", [
    ("ties", {"scope": "leaf", "count": "exact", "zero_sign": "positive", "disjoint": "mean"}),
    ("ties", {"density": 0.5, "count": "exact", "disjoint": "max"}),
    ("ties", {"density": 1.0}),
    ("consensus", {"base": "ties", "k": 1}),
    ("localize_stitch", {"density": 1.0}),
    ("localize_stitch", {"density": 0.01}),  # int(N d) = 0: nothing is kept
    ("byom", {"density": 1.0}),
    ("emr", {"rescaler": "global"}),
])
def test_variants_and_edge_cases_stream_exactly(ckpt, name, hp):
  d, pre, fts = ckpt
  info = jm.method_info(name)
  tx = info.factory(**hp)
  key = jax.random.key(3)
  want = (jm.merge_per_task if info.per_task else jm.merge)(tx, pre, fts, key=key)
  outs, _ = _run(tx, d, 3, method=(name, hp), key=key, per_task=info.per_task)
  _assert_same(outs, want if info.per_task else [want])


@pytest.mark.parametrize("a,expect", [([-1.0, -1.0, -2.0], -3.0), ([1.0, 1.0, 2.0], 3.0), ([1.0, -1.0, 0.0], -3.0)])
def test_ties_zero_sign_majority_fallback(a, expect):
  """Hand-checked: where the trimmed task vectors cancel exactly (``b[1]``: 3 and -3), TIES takes the sign of the
  sum of elected signs over the whole model (FusionBench): -1, +1, and 0 in the three cases; with 0 the
  reference's disjoint rule keeps the negative entry. The streamed merge assumes +1 while writing and rewrites
  the leaf when the model-wide majority turns out otherwise."""
  pre = {"a": np.zeros(3, np.float32), "b": np.zeros(2, np.float32)}
  x1 = {"a": np.array(a, np.float32), "b": np.array([0.0, 3.0], np.float32)}
  x2 = {"a": np.array(a, np.float32), "b": np.array([0.0, -3.0], np.float32)}
  tx = jm.get_method("ties")(density=1.0, scale=1.0)
  want = jm.merge(tx, pre, [x1, x2])
  out = stream.DictWriter()
  stream.merge_streaming(tx, pre, [x1, x2], out, method=("ties", {"density": 1.0, "scale": 1.0}))
  assert float(out["b"][1]) == expect == float(np.asarray(want["b"])[1])
  _assert_same([out], [want], rtol=0, atol=0)


def test_random_prefix_in_a_multi_pass_plan():
  """DARE then global TIES: the drop is recomputed identically in every pass (keys derive from the path)."""
  pre, fts = _models(3, seed=5)
  keep = ["vision_model.encoder.layers.0.mlp.fc1.weight", "vision_model.post_layernorm.bias"]
  pre = {k: pre[k] for k in keep}
  fts = [{k: f[k] for k in keep} for f in fts]
  hp = {"base": "ties", "p": 0.3, "density": 0.4}
  tx = jm.get_method("dare")(**hp)
  key = jax.random.key(11)
  want = jm.merge(tx, pre, fts, key=key)
  out = stream.DictWriter()
  res = stream.merge_streaming(tx, pre, fts, out, method=("dare", hp), key=key)
  _assert_same([out], [want], rtol=0, atol=0)
  assert res.passes == 3


def test_one_compile_per_distinct_leaf_program(ckpt):
  d, pre, fts = ckpt
  distinct = len({s for s in SHAPES.values()})
  _, res = _run(jm.get_method("task_arithmetic")(), d, 3)
  # A flat transform's leaf program cannot read the path: traced and lowered once per shape, not per tensor.
  assert res.programs == distinct and res.passes == 1 and res.lowerings == distinct
  _, res = _run(jm.get_method("ties")(), d, 3, method=("ties", {}))
  assert res.programs == 3 * distinct and res.passes == 3  # histogram high, histogram low, apply
  assert res.lowerings == 3 * distinct
  # mergekit's TIES (per-tensor trim) is leafwise and path-free, though not flat: one program per shape too.
  tx = jm.get_method("ties")(scope="leaf", count="exact", zero_sign="positive", disjoint="mean")
  assert stream.leafwise(tx) and runs_by_leaf(tx) and not runs_flat(tx)
  outs, res = _run(tx, d, 3)
  _assert_same(outs, [jm.merge(tx, pre, fts)])
  assert res.programs == distinct and res.lowerings == distinct
  outs, res = _run(jm.get_method("dare")(), d, 3, key=jax.random.key(0))
  # The leaf key folds in the leaf's id, passed as an argument (jaxmerge.tree.traced_leaf_ids): DARE is
  # path-free, one program per shape, and draws what the in-memory merge draws.
  assert res.programs == distinct and res.lowerings == distinct
  _assert_same(outs, [jm.merge(jm.get_method("dare")(), pre, fts, key=jax.random.key(0))])
  _, again = _run(jm.get_method("dare")(), d, 3, key=jax.random.key(1))
  assert again.compiles == 0 and again.programs == res.programs  # the process-wide cache


def test_reads_reuse_buffers_and_compile_ahead(tmp_path, monkeypatch):
  """Many tensors of one shape: the merge equals the in-memory one bit for bit while reads go into recycled
  buffers (few fresh allocations, not one per tensor and model) and the one program is compiled ahead."""
  r = np.random.default_rng(0)
  pre = {f"model.layers.{i}.mlp.down_proj.weight": r.standard_normal((16, 8)).astype(np.float32) for i in range(12)}
  fts = [{k: v + 0.1 * r.standard_normal(v.shape).astype(np.float32) for k, v in pre.items()} for _ in range(3)]
  S.save_sharded(tmp_path / "base", pre, max_shard_bytes=1024)
  for i, f in enumerate(fts):
    S.save_sharded(tmp_path / f"m{i}", f, max_shard_bytes=1024)
  tx = jm.get_method("task_arithmetic")(scale=0.7)
  want = jm.merge(tx, pre, fts)  # before counting: the in-memory merge allocates its own outputs
  fresh = []
  real = S.aligned_empty
  monkeypatch.setattr(S, "aligned_empty", lambda *a, **k: (fresh.append(a), real(*a, **k))[1])
  out = stream.DictWriter()
  res = stream.merge_leafwise(tx, S.open_checkpoint(tmp_path / "base"),
                              [S.open_checkpoint(tmp_path / f"m{i}") for i in range(3)], out)
  _assert_same([out], [want], rtol=0, atol=0)
  assert len(fresh) <= 4 * 4  # 12 tensors x 4 checkpoints read; at most a few sets in flight are ever new
  assert res.compiles <= 1 and res.lowerings == 1


def test_a_failed_write_stops_the_merge(ckpt):
  d, pre, fts = ckpt

  class Failing(stream.DictWriter):
    def write(self, name, array):
      if len(self) == 2:
        raise OSError("disk full")
      super().write(name, array)

  base, models = _readers(d, 3)
  with pytest.raises(OSError, match="disk full"):
    stream.merge_leafwise(jm.get_method("task_arithmetic")(), base, models, Failing())


def test_path_dependent_transforms_compile_per_label(ckpt):
  """A partition by path gives leaves of one shape different programs, and each is merged correctly."""
  d, pre, fts = ckpt
  tx = jm.masked(jm.chain(jm.transforms.sum_tasks(), jm.transforms.scale(2.0)), jm.filters.path_contains("fc1"))
  want = jm.merge(tx, pre, fts)
  outs, res = _run(tx, d, 3)
  _assert_same(outs, [want])
  assert res.programs == 4  # (6, 4) and (6,), each with the fc1 rule and with the fallback mean
  assert res.lowerings == len(SHAPES)  # not flat: traced per tensor, so the fc1 rule is never reused wrongly


def test_clear_errors(ckpt, tmp_path):
  d, pre, fts = ckpt
  with pytest.raises(ValueError, match=r"method 'pcb' with \{\} cannot be streamed.*Streamable methods.*ties"):
    _run(jm.get_method("pcb")(), d, 3, method=("pcb", {}))
  with pytest.raises(ValueError, match="not leafwise"):
    stream.merge_leafwise(jm.get_method("ties")(), pre, fts, stream.DictWriter())
  with pytest.raises(ValueError, match="needs a PRNG key"):
    _run(jm.get_method("dare")(), d, 3)
  bad = dict(fts[1])
  bad["vision_model.encoder.layers.0.mlp.fc2.weight"] = np.zeros((4, 6), np.float32)
  S.save(tmp_path / "bad.safetensors", bad)
  with pytest.raises(ValueError, match=r"bad\.safetensors: parameter 'vision_model.encoder.layers.0.mlp.fc2.weight' "
                                       r"has shape \(4, 6\), the pretrained model has \(6, 4\)"):
    stream.merge_leafwise(jm.get_method("task_arithmetic")(), S.open_checkpoint(d / "base"),
                          [S.open_checkpoint(d / "m0"), S.open_checkpoint(tmp_path / "bad.safetensors")],
                          stream.DictWriter())
  nan = dict(fts[2])
  nan["vision_model.post_layernorm.bias"] = np.full(6, np.inf, np.float32)
  S.save(tmp_path / "nan.safetensors", nan)
  for name in ("task_arithmetic", "ties"):
    out = S.ShardedWriter(tmp_path / f"out_{name}", {k: (v.shape, v.dtype) for k, v in pre.items()})
    with pytest.raises(ValueError, match=r"nan\.safetensors: parameter 'vision_model.post_layernorm.bias' contains "
                                         r"NaN or Inf"):
      try:
        stream.merge_streaming(jm.get_method(name)(), S.open_checkpoint(d / "base"),
                               [S.open_checkpoint(d / "m0"), S.open_checkpoint(tmp_path / "nan.safetensors")], out,
                               method=(name, {}))
      except BaseException:
        out.abort()
        raise
    assert not (tmp_path / f"out_{name}").exists()
  # NaN in the pretrained model: named as such (the finiteness probe is one scalar per tensor; the host then finds
  # which inputs hold the NaN).
  bad_pre = dict(pre)
  bad_pre["vision_model.encoder.layers.0.mlp.fc1.bias"] = np.full((6,), np.nan, np.float32)
  for name in ("task_arithmetic", "ties"):
    with pytest.raises(ValueError, match=r"^pretrained model: parameter 'vision_model.encoder.layers.0.mlp.fc1.bias' "
                                         r"contains NaN or Inf"):
      stream.merge_streaming(jm.get_method(name)(), bad_pre, fts[:2], stream.DictWriter(), method=(name, {}))


def test_writes_sharded_safetensors_and_casts_output(ckpt, tmp_path):
  d, pre, fts = ckpt
  base, models = _readers(d, 3)
  specs = {k: (base.shape(k), np.float16 if base.dtype(k) == np.float32 else base.dtype(k)) for k in base.keys()}
  with S.ShardedWriter(tmp_path / "out", specs, max_shard_bytes=64) as w:
    stream.merge_streaming(jm.get_method("ties")(), base, models, w, method=("ties", {}), out_dtype="float16")
  got = S.load(tmp_path / "out")
  want = jm.merge(jm.get_method("ties")(), pre, fts)
  assert (tmp_path / "out" / S.INDEX_NAME).exists()
  for k, v in want.items():
    assert got[k].dtype == (np.float16 if np.asarray(v).dtype == np.float32 else np.asarray(v).dtype)
    np.testing.assert_array_equal(got[k], np.asarray(v).astype(got[k].dtype))


_MEMORY_SCRIPT = textwrap.dedent("""
    import json, pathlib, resource, sys
    import numpy as np
    import jaxmerge as jm
    from jaxmerge import stream
    from jaxmerge.io import safetensors_io as S

    root, T, cap, n = pathlib.Path(sys.argv[1]), 2, int(sys.argv[2]), int(sys.argv[3])
    S.WRITEBACK_BYTES = 1 << 20  # flush every MiB, so that the warm-up merge starts the flushing thread too
    def status(key):
      for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
          return int(line.split()[1]) * 1024

    def make(name, n):
      r = np.random.default_rng(0)
      base = {f"model.layers.{i}.mlp.down_proj.weight": r.standard_normal((256, 1024), dtype=np.float32)
              for i in range(n)}
      S.save_sharded(root / name / "base", base, max_shard_bytes=8 << 20)
      for t in range(T):
        S.save_sharded(root / name / f"m{t}", {k: v + np.float32(0.01 * (t + 1)) for k, v in base.items()},
                       max_shard_bytes=8 << 20)
      return sum(v.nbytes for v in base.values())

    def merge(name):
      pre = S.open_checkpoint(root / name / "base")
      models = [S.open_checkpoint(root / name / f"m{t}") for t in range(T)]
      with S.ShardedWriter(root / name / "out", {k: (pre.shape(k), pre.dtype(k)) for k in pre.keys()},
                           max_shard_bytes=8 << 20) as w:
        stream.merge_streaming(jm.get_method("ties")(), pre, models, w, method=("ties", {}))

    make("small", 2)
    merge("small")  # compiles (cached process-wide) and starts the reader, writer and flushing threads
    model_bytes = make("large", n)
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak RSS (VmHWM)
    before, data = status("VmRSS"), status("VmData")
    # the cap, enforced: anonymous memory (heap, mmap'ed buffers) may grow by at most `cap` bytes
    resource.setrlimit(resource.RLIMIT_DATA, (data + cap, resource.getrlimit(resource.RLIMIT_DATA)[1]))
    merge("large")
    print(json.dumps({"peak": status("VmHWM") - before, "model": model_bytes}))
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS reset")
def test_streaming_merge_stays_under_a_memory_cap(tmp_path):
  """Global TIES (three exact passes) streamed over 2 fine-tuned models of 64 tensors of 1 MiB (64 MiB per
  model, 192 MiB of inputs) under a 24 MiB cap: the process limits its own anonymous memory growth to the cap
  (RLIMIT_DATA; exceeding it would fail the merge) and its peak RSS increase, mapped file pages included,
  stays below the cap, although each checkpoint is 2.7x and the inputs 8x larger than the cap. An in-memory
  merge would hold (T + 1) models plus float32 task vectors. glibc's dynamic mmap threshold is pinned so freed
  tensors go back to the system and RSS measures live memory, not allocator caches."""
  cap, n = 24 << 20, 64
  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "MALLOC_MMAP_THRESHOLD_": "65536"}
  proc = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(tmp_path), str(cap), str(n)], env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  res = json.loads(proc.stdout.strip().splitlines()[-1])
  assert res["model"] == n << 20 and res["model"] > 2.5 * cap
  assert 0 < res["peak"] < cap, res


def test_histograms_take_task_slices_and_select_exactly():
  """The streaming histograms accept a ``(T, ...)`` stack or its ``T`` slices (what the plans pass) with the
  same counts, and the two-pass select over several tensors equals a sort of their concatenation."""
  from jaxmerge import stats as ss

  r = np.random.default_rng(3)
  xs = [(r.standard_normal((3,) + s) * 10.0 ** r.integers(-3, 2)).astype(np.float32) for s in [(40, 7), (5,), (9, 3, 2)]]
  xs[1][0, :2] = 0.0  # ties and zeros
  hi = np.array([[30000], [40000], [50000]], np.int32)
  for x in xs:
    rows = [x[i] for i in range(3)]
    np.testing.assert_array_equal(ss.high_histogram(rows), ss.high_histogram(x))
    np.testing.assert_array_equal(ss.low_histogram(rows, hi), ss.low_histogram(x, hi))
  total = sum(x[0].size for x in xs)
  ranks = np.array([[1, total], [7, 100], [total // 2, total // 3]])
  sel = ss.KthSmallest(ranks, total)
  for x in xs:
    sel.add_high(ss.high_histogram([np.abs(x[i]) for i in range(3)]), x[0].size)
  sel.finish_high()
  for x in xs:
    sel.add_low(ss.low_histogram([np.abs(x[i]) for i in range(3)], sel.buckets), x[0].size)
  got = sel.finish_low()
  flat = np.sort(np.concatenate([np.abs(x).reshape(3, -1) for x in xs], axis=1), axis=1)
  np.testing.assert_array_equal(got, np.take_along_axis(flat, ranks - 1, axis=1))


def test_engine_streams_aligned_readers_and_names_a_mismatch():
  """The engine streams readers that agree on names and shapes (jaxmerge.stream aligns them first, with
  jaxmerge.io.llm); given mismatched ones directly it refuses them, naming the model and the parameter."""
  from jaxmerge.engine import stream as engine_stream

  pre = {"a": np.zeros((2, 3), np.float32), "b": np.zeros(4, np.float32)}
  good = {"a": np.ones((2, 3), np.float32), "b": np.ones(4, np.float32)}
  bad = {"a": np.ones((3, 2), np.float32), "b": np.ones(4, np.float32)}
  tx = jm.get_method("task_arithmetic")(scale=0.5)
  out = stream.DictWriter()
  engine_stream.merge_leafwise(tx, pre, [good, good], out)
  np.testing.assert_array_equal(out["a"], np.full((2, 3), 1.0, np.float32))
  with pytest.raises(ValueError, match=r"model 1 .*'a'"):
    engine_stream.merge_leafwise(tx, pre, [good, bad], stream.DictWriter())
