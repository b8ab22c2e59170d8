"""Bounded property-based fuzzing (hypothesis) of the parsers that read untrusted input: the safetensors header,
the shard index, both YAML config schemas and hyperparameter validation. Each either accepts its input and
then behaves (every tensor reads back with its declared size, every shard lies inside the directory, every
accepted hyperparameter is within its declared range) or raises ``ValueError``: never another exception, a
hang or a crash. A few seconds each."""

from __future__ import annotations

import json
import math
import pathlib
import struct
import tempfile

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import jaxmerge as jm  # noqa: E402
import jaxmerge.ri  # noqa: E402,F401  (registers "ri")
from jaxmerge import config  # noqa: E402
from jaxmerge.io import safetensors_io as S  # noqa: E402

FUZZ = settings(max_examples=100, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                     st.text(max_size=12))
_json = st.recursive(_scalars, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                      st.dictionaries(st.text(max_size=8), kids, max_size=4)),
                     max_leaves=12)

_dtypes = st.sampled_from(["F32", "F16", "BF16", "F64", "I64", "U8", "BOOL", "F8", "x", 3])
_dims = st.one_of(st.integers(-3, 6), st.integers(2**31, 2**64), st.just(2**32), st.floats(0, 4), st.text(max_size=2))
_entry = st.one_of(
    st.fixed_dictionaries({"dtype": _dtypes, "shape": st.lists(_dims, max_size=3),
                           "data_offsets": st.lists(st.one_of(st.integers(-4, 200), st.integers(2**62, 2**64)),
                                                    min_size=0, max_size=3)}),
    _json)


def _file(tmp: pathlib.Path, raw: bytes) -> pathlib.Path:
  f = tmp / "f.safetensors"
  f.write_bytes(raw)
  return f


@FUZZ
@given(header=st.dictionaries(st.text(max_size=6), _entry, max_size=4), data=st.binary(max_size=160),
       pad=st.integers(0, 9), lie=st.integers(-2, 2**64 - 1) | st.none())
def test_header_parser_accepts_or_raises_value_error(header, data, pad, lie):
  with tempfile.TemporaryDirectory() as tmp:
    raw = json.dumps(header).encode() + b" " * pad
    n = len(raw) if lie is None or lie < 0 else lie
    f = _file(pathlib.Path(tmp), struct.pack("<Q", n) + raw + data)
    try:
      r = S.SafetensorsReader(f)
    except ValueError:
      return
    with r:
      for name in r:
        x = r.get(name)
        assert x.shape == r.shape(name) and x.dtype == r.dtype(name)
        assert x.nbytes == r.nbytes(name) <= len(data)


@FUZZ
@given(raw=st.binary(max_size=64))
def test_header_parser_on_random_bytes(raw):
  with tempfile.TemporaryDirectory() as tmp:
    try:
      S.SafetensorsReader(_file(pathlib.Path(tmp), raw)).close()
    except ValueError:
      pass


_names = st.one_of(st.sampled_from(["model.safetensors", "../x/model.safetensors", "/etc/passwd", "sub/../m",
                                    "a\\..\\..\\b", "", ".", "model.safetensors.index.json", "\x00"]),
                   st.text(max_size=10))


@FUZZ
@given(index=st.one_of(st.fixed_dictionaries({"weight_map": st.dictionaries(st.text(max_size=4), _names | _json,
                                                                            max_size=4)}),
                       _json))
def test_index_reader_accepts_only_files_inside(index):
  with tempfile.TemporaryDirectory() as tmp:
    root = pathlib.Path(tmp)
    d = root / "m"
    S.save_sharded(d, {"a": np.ones(3, np.float32)})
    (root / "x").mkdir()
    S.save(root / "x" / "model.safetensors", {"a": np.ones(3, np.float32)})
    (d / S.INDEX_NAME).write_text(json.dumps(index))
    try:
      r = S.open_checkpoint(d)
    except ValueError:
      return
    with r:
      for name in r.keys():
        f = r.file_of(name).resolve()
        assert d.resolve() in f.parents


def _schemas(junk: bool):
  """Strategies for jaxmerge's and mergekit's schema: with ``junk``, any value may replace a valid one (one time
  in four); without, only the numbers vary (NaN, Inf, out of range, booleans), so accepted configs get fuzzed too."""

  def mostly(valid):
    return st.one_of(valid, valid, valid, _json) if junk else valid

  num = st.floats(-1.5, 2.5) | st.floats(allow_nan=True, allow_infinity=True) | st.booleans() | st.integers(-3, 3)
  paths = mostly(st.sampled_from(["base", "m1", "m2"]))
  jax_cfg = st.fixed_dictionaries(
      {"method": mostly(st.sampled_from(["ties", "task_arithmetic", "dare", "slerp", "pcb", "consensus", "fisher"])),
       "base": paths, "models": mostly(st.lists(paths, min_size=1, max_size=3))},
      optional={"hparams": mostly(st.dictionaries(st.sampled_from(["density", "scale", "p", "t", "k", "x"]), num,
                                                  max_size=2)),
                "dtype": mostly(st.sampled_from(["float32", "bf16", "half"])), "seed": mostly(st.integers(0, 9)),
                "layout": mostly(st.sampled_from(["hf", "flax"])),
                "vocab_policy": mostly(st.sampled_from(["error", "pad_base"]))})
  params = st.dictionaries(st.sampled_from(["weight", "density", "gamma", "epsilon", "lambda", "normalize", "rescale",
                                            "int8_mask", "t", "filter_wise", "other"]), num, max_size=3)
  model = st.fixed_dictionaries({"model": paths}, optional={"parameters": mostly(
      st.dictionaries(st.sampled_from(["weight", "density", "gamma", "epsilon"]), num, max_size=2))})
  mk_cfg = st.fixed_dictionaries(
      {"merge_method": mostly(st.sampled_from(list(config.MERGEKIT_METHODS))), "base_model": paths,
       "models": mostly(st.lists(mostly(model), min_size=1, max_size=3))},
      optional={"parameters": mostly(params), "dtype": mostly(st.sampled_from(["float32", "bfloat16"])),
                "seed": mostly(st.integers(0, 9)),
                **({"out_dtype": _json, "tokenizer_source": _json, "chat_template": _json, "slices": _json}
                   if junk else {})})
  return st.one_of(jax_cfg, mk_cfg)


@FUZZ
@given(cfg=st.one_of(_schemas(junk=True), _schemas(junk=False)))
def test_yaml_schemas_accept_or_raise_value_error(cfg):
  try:
    spec = config.from_dict(cfg)
  except ValueError:
    return
  assert spec.models and isinstance(spec.base, str)
  for v in spec.hparams.values():  # no NaN or Inf weight, density, lambda or t gets through
    for x in (v if isinstance(v, list) else [v]):
      if isinstance(x, float):
        assert math.isfinite(x)
  if spec.source == "jaxmerge":
    jm.registry.validate(spec.method, spec.hparams)


_values = st.one_of(_scalars, st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=3),
                    st.sampled_from(["sum", "mean", "ties", "task_arithmetic", "l1", "row", "global", "angle"]),
                    st.dictionaries(st.text(max_size=4), _scalars, max_size=2))


@FUZZ
@given(data=st.data())
def test_factories_accept_only_declared_values(data):
  name = data.draw(st.sampled_from(jm.list_methods()))
  info = jm.method_info(name)
  keys = data.draw(st.lists(st.sampled_from(sorted(info.hparams)), max_size=3, unique=True)) if info.hparams else []
  hp = {k: data.draw(_values) for k in keys}
  try:
    info.factory(**hp)
  except ValueError:
    return
  for k, v in hp.items():  # anything accepted is within its declaration
    info.params[k].check(name, k, v)
