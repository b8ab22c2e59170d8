"""The offline suite's shipped backbone, seeds, regime statistics, conclusions and pinned versions
(jaxmerge.bench.backbone, regime, runner.aggregate_seeds, report.check_conclusions, versions)."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxmerge.bench import backbone, regime, report, runner, versions
from jaxmerge.bench.suite import BACKBONE_FIELDS, OfflineConfig


# ---- shipped backbone -----------------------------------------------------------------------------------------


def _tree(seed=0):
  rng = np.random.default_rng(seed)
  return {"a": {"kernel": rng.standard_normal((3, 4)).astype(np.float32)}, "b": rng.standard_normal(5).astype(np.float32),
          "s": np.asarray(2.5, np.float32)}  # a 0-d leaf (CLIP's logit_scale) keeps its shape


def test_backbone_roundtrip_and_checksum(tmp_path):
  tree = _tree()
  backbone.save_backbone("bb", tree, config={"w": 4}, recipe={"steps": 1}, vocab=["<pad>", "x"], root=tmp_path)
  assert backbone.list_backbones(tmp_path) == ["bb"]
  like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
  loaded, info = backbone.load_backbone("bb", like, root=tmp_path)
  np.testing.assert_array_equal(loaded["a"]["kernel"], tree["a"]["kernel"])
  np.testing.assert_array_equal(loaded["b"], tree["b"])
  assert loaded["s"].shape == () and float(loaded["s"]) == 2.5
  assert info["recipe"] == {"steps": 1} and info["vocab"] == ["<pad>", "x"] and info["parameters"] == 18
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left
  # One flipped byte: the checksum names the file.
  f = tmp_path / "bb.safetensors"
  data = bytearray(f.read_bytes())
  data[-3] ^= 0xFF
  f.write_bytes(bytes(data))
  with pytest.raises(ValueError, match="bb.safetensors fail their checksum"):
    backbone.load_backbone("bb", like, root=tmp_path)


def test_backbone_shape_and_name_errors(tmp_path):
  tree = _tree()
  backbone.save_backbone("bb", tree, config={}, recipe={}, vocab=[], root=tmp_path)
  wrong = {"a": {"kernel": jax.ShapeDtypeStruct((4, 3), np.float32)}, "b": jax.ShapeDtypeStruct((5,), np.float32),
           "s": jax.ShapeDtypeStruct((), np.float32)}
  with pytest.raises(ValueError, match="'a/kernel' has shape \\(3, 4\\)"):
    backbone.load_backbone("bb", wrong, root=tmp_path)
  with pytest.raises(ValueError, match="missing \\['c'\\]"):
    backbone.load_backbone("bb", {**wrong, "c": jax.ShapeDtypeStruct((1,), np.float32)}, root=tmp_path)
  with pytest.raises(ValueError, match="no backbone 'nope'.*available: bb"):
    backbone.backbone_info("nope", root=tmp_path)


def test_shipped_backbone_matches_the_default_config():
  config = OfflineConfig()
  assert config.backbone in backbone.list_backbones()
  info = backbone.backbone_info(config.backbone)
  assert info["recipe"] == config.backbone_fields()
  # The cache key covers the weights' checksum, so a new backbone file can never reuse old experts.
  assert config.hash != dataclasses.replace(config, backbone=None).hash


def test_a_config_that_differs_from_the_backbone_is_refused(tmp_path):
  from jaxmerge.bench.suite import build_offline_suite

  bad = dataclasses.replace(OfflineConfig(), width=OfflineConfig().width * 2, tasks=("digits", "colors"))
  with pytest.raises(ValueError, match="width="):
    build_offline_suite(bad, tmp_path, progress=False)


# ---- seeds ----------------------------------------------------------------------------------------------------


def _result(seed, avgs):
  tasks = ["a", "b"]
  rows = []
  for m, (x, y) in avgs.items():
    rows.append({"method": m, "accuracy": {"a": x, "b": y}, "average": (x + y) / 2,
                 "normalized": {"a": x / 0.9, "b": y / 0.9}, "normalized_average": (x + y) / 1.8, "seconds": 1.0 + seed,
                 "kind": "merge"})
  return {"suite": "s", "tasks": tasks, "seed": seed, "rows": rows, "skipped": [], "timings": {"t": 2.0},
          "cross_eval": {"experts": tasks, "tasks": tasks, "accuracy": [[0.9, 0.1 * seed], [0.2, 0.8]]}}


def test_aggregate_seeds_by_hand():
  per = [_result(0, {"ta": (0.5, 0.7), "ties": (0.4, 0.4)}), _result(1, {"ta": (0.7, 0.7), "ties": (0.6, 0.6)}),
         _result(2, {"ta": (0.6, 0.4)})]  # ties failed on seed 2
  out = runner.aggregate_seeds(per)
  ta = out["rows"][0]
  assert ta["method"] == "ta" and [r["method"] for r in out["rows"]] == ["ta"]
  assert ta["average_per_seed"] == pytest.approx([0.6, 0.7, 0.5])
  assert ta["average"] == pytest.approx(0.6)
  assert ta["average_std"] == pytest.approx(0.1)  # sample std of 0.6, 0.7, 0.5
  assert ta["accuracy"] == pytest.approx({"a": 0.6, "b": 0.6})
  assert ta["seconds"] == pytest.approx(2.0)
  assert out["skipped"] == [{"method": "ties", "reason": "failed on some seeds"}]
  assert out["seeds"] == [0, 1, 2] and out["timings"] == {"t": 6.0}
  np.testing.assert_allclose(out["cross_eval"]["accuracy"], [[0.9, 0.1], [0.2, 0.8]])
  with pytest.raises(ValueError, match="different tasks"):
    runner.aggregate_seeds([per[0], {**per[1], "tasks": ["a", "c"]}])


def test_conclusions_and_reference():
  rows = [{"method": m, "average": a, "average_std": 0.01, "kind": "merge", "normalized_average": a / 0.9}
          for m, a in [("task_arithmetic", 0.7), ("simple_average", 0.72), ("ties", 0.75), ("tsv_m", 0.8)]]
  rows.append({"method": "tsv_c", "average": 0.85, "kind": "merge", "normalized_average": 0.95, "per_task_model": True})
  got = {c["claim"]: c for c in report.check_conclusions(rows)}
  assert got["task arithmetic > simple averaging"]["holds"] is False
  assert got["task arithmetic > simple averaging"]["margin"] == pytest.approx(-0.02)
  assert got["TIES > task arithmetic"]["holds"] and got["TSV-M > TIES"]["holds"]
  assert "WUDI > task arithmetic" not in got  # not run
  assert got["tsv_c (one model per task) close to the experts"]["holds"]
  ref = report.compare_with_reference([{"method": m, "average": a / 100} for m, a in report.FUSIONBENCH_VIT_B32.items()])
  assert ref["kendall_tau"] == pytest.approx(1.0) and len(ref["methods"]) == len(report.FUSIONBENCH_VIT_B32)


def test_config_overrides_parse_json_values_and_reject_unknown_fields():
  from jaxmerge.bench.suite import OfflineConfig, config_overrides

  got = config_overrides(["finetune_lr=5e-5", "sizes=[768, 64, 200]", 'finetune_optimizer="sgd"'])
  assert got == {"finetune_lr": 5e-5, "sizes": (768, 64, 200), "finetune_optimizer": "sgd"}
  assert dataclasses.replace(OfflineConfig(), **got).sizes == (768, 64, 200)
  with pytest.raises(ValueError, match="finetune_rate: not an OfflineConfig field"):
    config_overrides(["finetune_rate=1e-4"])


def test_stability_flags_a_data_free_row_over_two_points():
  rows = [{"method": "wudi", "data": "none", "average_per_seed": [0.735, 0.714, 0.761]},
          {"method": "tsv_m", "data": "none", "average_per_seed": [0.734, 0.725, 0.736]},
          {"method": "adamerging", "data": "tta", "average_per_seed": [0.70, 0.67, 0.72]},
          {"method": "one_seed", "data": "none", "average_per_seed": [0.5]}]
  got = report.check_stability(rows)
  assert [c["method"] for c in got] == ["adamerging", "wudi", "tsv_m"]  # largest range first; one seed left out
  assert got[1]["range"] == pytest.approx(0.047) and got[1]["holds"] is False
  assert got[2]["range"] == pytest.approx(0.011) and got[2]["holds"] is True
  assert got[0]["holds"] is None  # needs data: not covered by the target
  assert report.check_stability([{"method": "x", "data": "none", "average_per_seed": [0.5, 0.52]}])[0]["holds"]


# ---- regime statistics ----------------------------------------------------------------------------------------


class _FakeSuite:
  """Two tasks with known task vectors; 'accuracy' on task t is the share of tau_t present in the model."""

  def __init__(self):
    rng = np.random.default_rng(0)
    self.tasks = ("x", "y")
    self.pretrained = {"layer": {"kernel": rng.standard_normal((8, 6))}, "bias": np.ones(6)}
    u, v = rng.standard_normal((8, 2)), rng.standard_normal((2, 6))
    self.taus = [{"layer": {"kernel": u @ v * 0.1}, "bias": np.zeros(6)},  # rank 2
                 {"layer": {"kernel": np.outer(rng.standard_normal(8), rng.standard_normal(6)) * 0.1},
                  "bias": np.full(6, 0.05)}]
    self.experts = [jax.tree.map(lambda p, t: p + t, self.pretrained, t) for t in self.taus]

  def evaluate(self, params, tasks=None):
    out = {}
    for t in tasks or self.tasks:
      tau = self.taus[self.tasks.index(t)]["layer"]["kernel"]
      d = params["layer"]["kernel"] - self.pretrained["layer"]["kernel"]
      out[t] = float(np.sum(d * tau) / np.sum(tau * tau))
    return out


def test_regime_stats_closed_form():
  s = _FakeSuite()
  st = regime.regime_stats(s, alphas=(0.0, 0.5, 1.0))
  n0 = np.sqrt(sum(np.sum(np.asarray(x) ** 2) for x in jax.tree.leaves(s.pretrained)))
  for i, t in enumerate(s.tasks):
    nt = np.sqrt(sum(np.sum(np.asarray(x) ** 2) for x in jax.tree.leaves(s.taus[i])))
    assert st["relative_norm"][t] == pytest.approx(nt / n0)
  f = [np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)]) for t in s.taus]
  assert st["mean_abs_cosine"] == pytest.approx(abs(f[0] @ f[1]) / np.linalg.norm(f[0]) / np.linalg.norm(f[1]))
  # rank-2 and rank-1 matrices of width 6: at most 2/6 and exactly 1/6 of the width.
  ranks = []
  for t in s.taus:
    sv = np.linalg.svd(t["layer"]["kernel"], compute_uv=False)
    e = np.cumsum(sv ** 2) / np.sum(sv ** 2)
    ranks.append((np.searchsorted(e, 0.9 - 1e-12) + 1) / 6)
  assert st["effective_rank"] == {"layer/kernel": pytest.approx(np.mean(ranks))}
  assert ranks[1] == pytest.approx(1 / 6)
  assert st["width"] == 6
  for t in s.tasks:  # the probe adds alpha * tau_t: 'accuracy' is alpha
    assert st["linearity"]["accuracy"][t] == pytest.approx([0.0, 0.5, 1.0])
  lines = "\n".join(regime.regime_markdown([st, st]))
  assert "± " in lines and "Iso-C" in lines


# ---- pinned versions ------------------------------------------------------------------------------------------


def test_versions_check(tmp_path):
  import numpy

  f = tmp_path / "c.txt"
  f.write_text(f"# comment\nnumpy=={numpy.__version__}\njax==0.0.1  # pinned\nOther_Pkg==1.0\n")
  assert versions.pinned_versions(f) == {"numpy": numpy.__version__, "jax": "0.0.1", "other-pkg": "1.0"}
  out = versions.check_versions(("numpy", "jax", "no-such-package"), f)
  assert "numpy" not in out["differs"] and out["differs"]["jax"][1] == "0.0.1"
  assert out["installed"]["no-such-package"] == "missing"
  # The shipped constraints pin every numerics package.
  pinned = versions.pinned_versions()
  assert all(versions._norm(p) in pinned for p in versions.NUMERICS_PACKAGES)


# ---- the same table on hosts with other vector instructions ---------------------------------------------------

_ISA_SCRIPT = textwrap.dedent("""
  import dataclasses, json, sys
  import jax, numpy as np
  from jaxmerge.bench.runner import run_suite
  from jaxmerge.bench.suite import OfflineConfig, build_offline_suite
  cfg = dataclasses.replace(OfflineConfig.smoke(0), tasks=("digits", "colors", "orientation"), sizes=(256, 16, 300),
                            finetune_steps=40)
  suite = build_offline_suite(cfg, sys.argv[1], progress=False)
  res = run_suite(suite, ["task_arithmetic", "ties", "tsv_m"], progress=False, strict=True)
  first = np.asarray(jax.tree.leaves(suite.experts[0])[0]).ravel()[:64].tolist()
  print(json.dumps({"averages": {r["method"]: r["average"] for r in res["rows"]}, "weights": first}))
""")


@pytest.mark.skipif(__import__("platform").machine() not in ("x86_64", "AMD64"), reason="XLA CPU ISA flags are x86")
def test_same_table_under_another_cpu_isa(tmp_path):
  """The suite's training and merges under XLA's default ISA and capped at AVX2 (a host without AVX-512; on
  such a host both runs are AVX2): every average within 0.3 points. The backbone is the shipped one, so only
  fine-tuning, merging and evaluation run on the host."""
  out = {}
  for name, flags in (("default", ""), ("avx2", "--xla_cpu_max_isa=AVX2")):
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu", "JAXMERGE_NATIVE": "0"}
    proc = subprocess.run([sys.executable, "-c", _ISA_SCRIPT, str(tmp_path / name)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out[name] = json.loads(proc.stdout.strip().splitlines()[-1])
  a, b = out["default"]["averages"], out["avx2"]["averages"]
  assert set(a) == set(b)
  for m in a:
    assert abs(a[m] - b[m]) <= 0.003, (m, a[m], b[m])
  # The fine-tuned weights agree to float32 noise (they need not be bit-identical).
  np.testing.assert_allclose(out["default"]["weights"], out["avx2"]["weights"], atol=1e-4)
