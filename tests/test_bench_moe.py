"""Tests of ``jaxmerge bench --moe``: model-level merges as rows of the bench results (jaxmerge.bench.moe_runner)."""

import csv
import json

import jax
import numpy as np
import pytest

import jaxmerge as jm
from jaxmerge.bench import command, moe_runner, report, runner
from jaxmerge.bench.suite import build_offline_suite
from tests.test_bench import MICRO, _parse

PLAIN = ["task_arithmetic"]
MODEL_LEVEL = ["emr", "smile"]  # a task-indexed model (stored parts) and an NNX routed model (no training)


@pytest.fixture(scope="module")
def moe_results(tmp_path_factory):
  """The micro suite's bench results with ``--moe`` rows, and the reports written from them."""
  root = tmp_path_factory.mktemp("moe")
  suite = build_offline_suite(MICRO, root / "cache", progress=False)
  results = runner.run_suite(suite, PLAIN, progress=False, strict=True)
  moe_runner.add_moe_rows(results, suite, MODEL_LEVEL, progress=False, strict=True)
  report.write_reports(results, root / "out", plots=False)
  return suite, results, root / "out"


def test_moe_rows_join_the_table(moe_results):
  suite, results, _ = moe_results
  rows = {r["method"]: r for r in results["rows"]}
  assert list(rows) == ["pretrained", "experts", *PLAIN, *MODEL_LEVEL] and results["skipped"] == []
  n = moe_runner._tower_params(suite)
  assert results["tower_params"] == n
  for r in rows.values():
    assert set(r["accuracy"]) == set(suite.tasks)
    assert all(0.0 <= a <= 1.0 for a in r["accuracy"].values())
    assert r["relative_latency"] > 0
  for m in MODEL_LEVEL:
    r = rows[m]
    assert r["kind"] == "model-level" and r["latency_measured"]
    assert r["extra_params"] > 0 and r["extra_params_ratio"] == pytest.approx(r["extra_params"] / n)
    assert r["normalized_average"] == pytest.approx(
      np.mean([r["accuracy"][t] / rows["experts"]["accuracy"][t] for t in suite.tasks]))
  for m in ("pretrained", *PLAIN):
    assert rows[m]["extra_params"] == 0 and rows[m]["relative_latency"] == 1.0
    assert not rows[m]["latency_measured"]
  t = len(suite.tasks)
  assert rows["experts"]["extra_params"] == (t - 1) * n


def test_emr_row_storage_and_parity_with_the_registry_method(moe_results):
  """EMR's row is the registry's per-task EMR models, and stores the unified vector, T bit-masks, T scalars."""
  suite, results, _ = moe_results
  row = next(r for r in results["rows"] if r["method"] == "emr")
  t, n = len(suite.tasks), moe_runner._tower_params(suite)
  assert row["per_task_model"]
  # Every leaf of the tiny tower has a task vector: the unified vector is one tower, each mask n / 32.
  assert row["extra_params"] == round(n + t * n / 32 + t * len(jax.tree.leaves(suite.pretrained)))
  models = jm.merge_per_task(jm.get_method("emr")(), suite.pretrained, suite.experts, layout=suite.layout)
  for task, model in zip(suite.tasks, models):
    n_test = len(suite.data[task].test.labels)
    # Same models; the two evaluation paths batch differently (at most one near-tie may flip).
    assert row["accuracy"][task] == pytest.approx(suite.evaluate(model, [task])[task], abs=1.01 / n_test)


def test_reports_carry_the_moe_columns(moe_results):
  suite, results, out = moe_results
  js = json.loads((out / "results.json").read_text())
  by_name = {r["method"]: r for r in js["rows"]}
  for name, r in by_name.items():
    assert {"extra_params", "extra_params_ratio", "relative_latency"} <= set(r), name
  with open(out / "results.csv") as f:
    table = list(csv.DictReader(f))
  assert [r["method"] for r in table] == list(by_name)
  for r in table:
    assert int(r["extra_params"]) == by_name[r["method"]]["extra_params"]
    assert float(r["relative_latency"]) == pytest.approx(by_name[r["method"]]["relative_latency"], abs=1e-4)
  md = (out / "results.md").read_text()
  assert "| extra params | /tower | rel. latency |" in md
  smile = by_name["smile"]
  assert (f"| {smile['extra_params']:,} | {smile['extra_params_ratio']:.2f} | {smile['relative_latency']:.2f} |"
          in md)
  assert "| task_arithmetic |" in md and "| 0 | 0.00 | 1.00* |" in md and "| emr † ‡ |" in md


def test_reports_without_moe_keep_their_columns(tmp_path):
  rows = [{"method": m, "accuracy": {"a": 0.5}, "average": 0.5, "normalized": {"a": 1.0}, "normalized_average": 1.0,
           "seconds": 0.0, "kind": "baseline"} for m in ("pretrained", "experts")]
  report.write_reports({"suite": "s", "tasks": ["a"], "seed": 0, "rows": rows}, tmp_path, plots=False)
  assert "extra params" not in (tmp_path / "results.md").read_text()
  with open(tmp_path / "results.csv") as f:
    assert all(r["extra_params"] == "" for r in csv.DictReader(f))


def test_method_selection_with_and_without_moe():
  plain, level = moe_runner.resolve_methods(None)
  assert level == list(moe_runner.MOE_METHODS)
  assert plain == [m for m in runner.resolve_methods(None) if m not in moe_runner.PER_TASK_METHODS]
  assert moe_runner.resolve_methods("task_arithmetic, wemoe,emr,wemoe") == (["task_arithmetic"], ["wemoe", "emr"])
  with pytest.raises(ValueError, match=r"unknown method\(s\) 'nope'.*valid methods: .*ties.*model-level "
                                       r"methods \(--moe\): wemoe, smile"):
    moe_runner.resolve_methods("wemoe,nope")
  # The CLI checks names before building any suite.
  with pytest.raises(ValueError, match="'nope'.*model-level methods"):
    command.run(_parse(["bench", "--moe", "--methods", "smile,nope", "--cache", "/nonexistent"]))
  with pytest.raises(ValueError, match="'wemoe' are model-level methods: add --moe"):
    command.run(_parse(["bench", "--methods", "task_arithmetic,wemoe", "--cache", "/nonexistent"]))
  assert command._resolve("emr", tta=False, moe=False) == (["emr"], [])  # without --moe: the registry method
  with pytest.raises(ValueError, match="not model-level method"):
    moe_runner.add_moe_rows({"rows": []}, None, ["ties"])
