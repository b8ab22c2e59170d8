"""Parity with FusionBench 0.2.33 on structured CLIP-vision-shaped weights (acceptance point 1).

For every listed method FusionBench implements (simple average, task arithmetic, TIES, DARE, SLERP,
Model Stock, TALL masks, EMR) jaxmerge's result on flat ``{hf_name: array}`` dicts is compared with
FusionBench's on the same float32 torch tensors, for several task counts and non-default hyperparameters.
Metric: relative Frobenius error of the merged update per leaf < 1e-4 (``tests/parity/_common.py``).
FusionBench is driven through its own algorithm classes where they accept in-memory modules
(``ParameterDictModel`` keeps the dotted HF names), otherwise through its pure functions.

DARE draws with torch's global RNG, which cannot match JAX streams: it is checked at p = 0 (exact parity
with FusionBench's DARE-TIES), and FusionBench's drop rule is checked against
``tests/reference.py`` with identical uniforms (monkeypatched ``torch.rand_like``); the stochastic
properties of jaxmerge's DARE live in ``tests/test_methods_reference.py``.

Not in FusionBench (tested against ``tests/reference.py`` instead): NAN, Breadcrumbs, DELLA, PCB,
Consensus, Localize-and-Stitch, BYOM.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("fusion_bench")
jax = pytest.importorskip("jax")

import jaxmerge as jm  # noqa: E402
from fusion_bench.method import SimpleAverageAlgorithm, TaskArithmeticAlgorithm, TiesMergingAlgorithm  # noqa: E402
from fusion_bench.method.dare import DareTiesMerging  # noqa: E402
from fusion_bench.method.emr_merging.utils import emr_merge  # noqa: E402
from fusion_bench.method.model_stock import ModelStock  # noqa: E402
from fusion_bench.method.slerp.slerp import slerp_on_state_dicts  # noqa: E402
from fusion_bench.method.tall_mask.utils import generate_task_masks  # noqa: E402
from fusion_bench.method.ties_merging.ties_merging_utils import state_dict_to_vector  # noqa: E402
from fusion_bench.modelpool import BaseModelPool  # noqa: E402
from fusion_bench.models.parameter_dict import ParameterDictModel  # noqa: E402

from tests import reference as ref  # noqa: E402
from tests.parity._common import assert_close, models, to_numpy, tx  # noqa: E402

pytestmark = pytest.mark.parity


def _sd(flat):
  return {k: torch.from_numpy(np.array(v, np.float32)) for k, v in flat.items()}


def _module(flat):
  return ParameterDictModel({k: torch.nn.Parameter(v, requires_grad=True) for k, v in _sd(flat).items()})


def _pool(pre, fts):
  """A fresh pool each call: FusionBench algorithms modify the pretrained module in place."""
  return {"_pretrained_": _module(pre), **{f"task{i}": _module(f) for i, f in enumerate(fts)}}


def _out(module_or_sd):
  sd = module_or_sd.state_dict() if hasattr(module_or_sd, "state_dict") else module_or_sd
  return {k: v.detach().numpy() for k, v in sd.items()}


def _merge(name, pre, fts, key=None, **hp):
  return to_numpy(jm.merge(tx(name, **hp), pre, fts, key=key))


# --------------------------------------------------------------------------------------- weighted averages


@pytest.mark.parametrize("num_tasks", [2, 5])
def test_simple_average(num_tasks):
  pre, fts = models(num_tasks)
  fb = _out(SimpleAverageAlgorithm(inplace=False).run(BaseModelPool(_pool(pre, fts))))
  assert_close(_merge("simple_average", pre, fts), fb, pre, what="simple_average")


@pytest.mark.parametrize("num_tasks,scale", [(2, 0.3), (3, 0.7), (5, -0.25)])
def test_task_arithmetic(num_tasks, scale):
  pre, fts = models(num_tasks)
  fb = _out(TaskArithmeticAlgorithm(scaling_factor=scale).run(_pool(pre, fts)))
  assert_close(_merge("task_arithmetic", pre, fts, scale=scale), fb, pre, what="task_arithmetic")


def test_slerp():
  """Generic leaves (SLERP branch) and nearly collinear leaves (FusionBench's LERP branch). (Endpoints t = 0, 1
  are checked in tests/test_methods_reference.py.)"""
  pre, fts = models(2)
  fb = _out(slerp_on_state_dicts(0.3, _sd(fts[0]), _sd(fts[1]), DOT_THRESHOLD=0.9995, epsilon=1e-8))
  assert_close(_merge("slerp", pre, fts, t=0.3), fb, pre, what="slerp t=0.3")
  near = {k: (v * np.float32(1.0 + 1e-4)).astype(np.float32) for k, v in fts[0].items()}
  pair = [fts[0], near]
  fb = _out(slerp_on_state_dicts(0.3, _sd(pair[0]), _sd(pair[1]), DOT_THRESHOLD=0.9995, epsilon=1e-8))
  assert_close(_merge("slerp", pre, pair, t=0.3), fb, pre, what="slerp collinear")


@pytest.mark.parametrize("num_tasks", [2, 5])
def test_model_stock(num_tasks):
  """FusionBench averages pairwise ANGLES for T > 2 (jaxmerge default ``average="angle"``)."""
  pre, fts = models(num_tasks)
  pool = BaseModelPool(_pool(pre, fts))
  fb = _out(ModelStock(ignore_keys=[]).run(pool))
  assert_close(_merge("model_stock", pre, fts), fb, pre, what="model_stock")


# --------------------------------------------------------------------------------------------------- TIES


@pytest.fixture(params=["native", "xla"])
def engine(request, monkeypatch):
  """Global TIES runs as one native CPU call where a C compiler exists (jaxmerge.engine.native), else as XLA programs:
  both are checked against FusionBench."""
  from jaxmerge.engine import native

  if request.param == "xla":
    monkeypatch.setenv("JAXMERGE_NATIVE", "0")
  elif not native.available():
    pytest.skip("no C compiler: the native kernel is unavailable")
  return request.param


@pytest.mark.parametrize(
    "num_tasks,density,scale,disjoint",
    [(3, 0.2, 0.3, "sum"), (2, 0.5, 1.0, "mean"), (5, 0.1, 0.5, "max")],
)
def test_ties_global(engine, num_tasks, density, scale, disjoint):
  pre, fts = models(num_tasks)
  algo = TiesMergingAlgorithm(scaling_factor=scale, threshold=density, remove_keys=[], merge_func=disjoint)
  fb = _out(algo.run(_pool(pre, fts)))
  out = _merge("ties", pre, fts, density=density, scale=scale, disjoint=disjoint)
  assert_close(out, fb, pre, what=f"ties {disjoint} ({engine})")


def test_zero_sign_rules_hand_built(engine):
  """Exact zero sign sums: FusionBench's TIES elects the global majority sign there (here +, then -), its EMR
  elects -1. Compared with ``ties_merging`` / ``emr_merge`` on a hand-built pair of task vectors."""
  from fusion_bench.method.ties_merging.ties_merging_utils import ties_merging

  a = np.array([[1.0, 2.0, 3.0, 4.0, 5.0], [0.5, -1.0, 1.5, 2.5, -0.7]], np.float32)
  b = a.copy()
  b[0, 0] = -1.0  # zero sum at (0, 0)
  b[1, 1] = 1.0  # zero sum at (1, 1)
  for sign in (1.0, -1.0):  # flips the global majority
    pre = {"w": np.zeros((2, 5), np.float32)}
    fts = [{"w": sign * a}, {"w": sign * b}]
    tv = torch.from_numpy(np.stack([sign * a.ravel(), sign * b.ravel()]))
    fb = ties_merging(tv, reset_thresh=0.999, merge_func="sum").numpy().reshape(2, 5)  # keeps everything
    out = _merge("ties", pre, fts, density=0.999, scale=1.0, disjoint="sum")
    np.testing.assert_allclose(out["w"], fb, rtol=1e-6, err_msg=f"ties sign {sign}")
    uni, masks, resc = emr_merge([{"w": torch.from_numpy(f["w"])} for f in fts])
    outs = jm.merge_per_task(tx("emr"), pre, fts)
    for t in range(2):
      expect = (resc[t] * masks["w"][t] * uni["w"]).numpy()
      np.testing.assert_allclose(np.asarray(outs[t]["w"]), expect, rtol=1e-6, err_msg=f"emr sign {sign} task {t}")


# --------------------------------------------------------------------------------------------------- DARE


@pytest.mark.parametrize("num_tasks", [3])
def test_dare_p0_equals_fusionbench(num_tasks):
  """p = 0 keeps everything in both libraries: exact parity of the deterministic part (DARE-TIES; DARE-TA at
  p = 0 equals TA, checked in tests/test_methods_reference.py)."""
  pre, fts = models(num_tasks)
  key = jax.random.key(0)
  fb = _out(DareTiesMerging(sparsity_ratio=0.0, only_on_linear_weights=False, rescale=True, scaling_factor=0.5,
                            threshold=20, remove_keys=[], merge_func="sum").run(BaseModelPool(_pool(pre, fts))))
  out = _merge("dare", pre, fts, key=key, p=0.0, base="ties", scale=0.5, density=0.2, disjoint="sum")
  assert_close(out, fb, pre, what="dare-ties p=0")


def test_fusionbench_dare_drop_matches_reference(monkeypatch):
  """With identical uniforms, FusionBench's DARE-TIES equals tests/reference.py (validates the reference)."""
  pre, fts = models(3)
  rng = np.random.default_rng(7)
  uniforms = [{k: rng.random(np.shape(v)).astype(np.float32) for k, v in pre.items()} for _ in fts]
  # FusionBench draws task by task, parameter by parameter in module order (= our insertion order).
  queue = [torch.from_numpy(u[k]) for u in uniforms for k in pre]
  monkeypatch.setattr(torch, "rand_like", lambda x, *a, **k: queue.pop(0).reshape(x.shape))
  p = 0.4
  fb = _out(DareTiesMerging(sparsity_ratio=p, only_on_linear_weights=False, rescale=True, scaling_factor=0.5,
                            threshold=20, remove_keys=[], merge_func="mean").run(BaseModelPool(_pool(pre, fts))))
  assert not queue
  expect = ref.dare(pre, fts, uniforms, p=p, base="ties", scale=0.5, density=0.2, disjoint="mean")
  assert_close(expect, fb, pre, what="reference dare-ties vs fusionbench")


# ------------------------------------------------------------------------------------------ TALL and EMR


@pytest.mark.parametrize("num_tasks,tall_lambda", [(2, 0.6), (5, 0.2)])
def test_tall_mask(num_tasks, tall_lambda):
  """Masks from ``fusion_bench.method.tall_mask.utils.generate_task_masks`` (the TALL repository's rule,
  strict ``>``) applied to the summed task vector. (``TallMaskTaskArithmeticAlgorithm.run`` passes the
  pretrained weights where task vectors are expected; it is not used.)"""
  pre, fts = models(num_tasks)
  flat_ptm = state_dict_to_vector(_sd(pre))
  flat_ft = torch.vstack([state_dict_to_vector(_sd(f)) for f in fts])
  tvs = flat_ft - flat_ptm
  masks = generate_task_masks(tvs, flat_ft, flat_ptm, tall_mask_lambda=tall_lambda)
  keys = sorted(pre)
  merged = tvs.sum(0)
  outs = jm.merge_per_task(tx("tall_mask", tall_lambda=tall_lambda), pre, fts)
  assert len(outs) == num_tasks
  for t in range(num_tasks):
    fb = ref.unflatten((flat_ptm + masks[t] * merged).numpy(), pre, keys)
    assert_close(to_numpy(outs[t]), fb, pre, what=f"tall_mask task {t}")


def test_tall_mask_per_task_lambda():
  pre, fts = models(3)
  lams = [0.2, 0.5, 0.9]
  flat_ptm = state_dict_to_vector(_sd(pre))
  flat_ft = torch.vstack([state_dict_to_vector(_sd(f)) for f in fts])
  tvs = flat_ft - flat_ptm
  outs = jm.merge_per_task(tx("tall_mask", tall_lambda=lams), pre, fts)
  for t, lam in enumerate(lams):
    m = generate_task_masks(tvs, flat_ft, flat_ptm, tall_mask_lambda=lam)[t]
    fb = ref.unflatten((flat_ptm + m * tvs.sum(0)).numpy(), pre, sorted(pre))
    assert_close(to_numpy(outs[t]), fb, pre, what=f"tall_mask lambda_t task {t}")


@pytest.mark.parametrize("num_tasks", [3])
def test_emr(num_tasks):
  """Per-task EMR models ``theta_0 + lambda_t (M_t * tau_uni)`` from FusionBench's ``emr_merge``."""
  pre, fts = models(num_tasks)
  tpre = _sd(pre)
  tvs = [{k: v - tpre[k] for k, v in _sd(f).items()} for f in fts]
  uni, masks, rescalers = emr_merge(tvs)
  outs = jm.merge_per_task(tx("emr"), pre, fts)
  assert len(outs) == num_tasks
  for t in range(num_tasks):
    fb = {k: (tpre[k] + rescalers[t] * masks[k][t] * uni[k]).numpy() for k in pre}
    assert_close(to_numpy(outs[t]), fb, pre, what=f"emr task {t}")


def test_fusionbench_inputs_untouched():
  """Sanity of the harness: the cached fixtures are not modified by FusionBench's in-place algorithms."""
  pre, fts = models(2)
  before = copy.deepcopy(pre)
  TaskArithmeticAlgorithm(scaling_factor=0.3).run(_pool(pre, fts))
  for k in pre:
    np.testing.assert_array_equal(pre[k], before[k])
