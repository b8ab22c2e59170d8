"""Parity of the subspace family with FusionBench 0.2.33 on structured CLIP-vision-shaped weights.

TSV-M, TSV-C, Iso-C, Iso-CTS, WUDI and KnOTS (FusionBench's ``subspace_alignment``, followed by FusionBench's own
task arithmetic / TIES on the aligned factors) on flat ``{hf_name: array}`` dicts with Hugging Face CLIP names,
at width 16 (ranks 5 and 16: task counts 3 and 5 do not divide them), several task counts and non-default
hyperparameters. Metric: relative Frobenius error of the merged update per leaf < 1e-4
(``tests/parity/_common.py``). CART and STAR are not in FusionBench: ``tests/test_subspace.py`` checks them
against NumPy loops of the paper formulas.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("fusion_bench")
jax = pytest.importorskip("jax")

import jaxmerge as jm  # noqa: E402
from fusion_bench.method.isotropic_merging.iso_utils import iso_c, iso_cts  # noqa: E402
from fusion_bench.method.knots.knots_utils import subspace_alignment  # noqa: E402
from fusion_bench.method.task_singular_vector.utils.TSVC_utils import compute_svd_and_compress  # noqa: E402
from fusion_bench.method.task_singular_vector.utils.TSVM_utils import compute_and_sum_svd_mem_reduction  # noqa: E402
from fusion_bench.method.ties_merging.ties_merging_utils import ties_merging  # noqa: E402
from fusion_bench.method.wudi.wudi import wudi_merging  # noqa: E402

from tests.parity._common import assert_close, models, to_numpy, tx  # noqa: E402

pytestmark = pytest.mark.parity


def _tvs(pre, fts):
  return [{k: torch.from_numpy(np.array(f[k] - pre[k], np.float32)) for k in pre} for f in fts]


def _add(pre, delta, scale=1.0):
  return {k: pre[k] + scale * np.asarray(delta[k].detach().numpy() if hasattr(delta[k], "detach") else delta[k],
                                         np.float32) for k in pre}


def _merge(name, pre, fts, **hp):
  return to_numpy(jm.merge(tx(name, **hp), pre, fts))


# ---------------------------------------------------------------------------------------------------- TSV


@pytest.mark.parametrize("num_tasks,scale", [(3, 0.7), (5, (0.5, 1.2, 0.8, 1.0, 0.3))])
def test_tsv_m(num_tasks, scale):
  """FusionBench's ``TaskSingularVectorMerging``: a float alpha scales the merged update (mean on vector leaves
  included); a list scales each task vector before the SVDs."""
  pre, fts = models(num_tasks, small=True)
  tvs = _tvs(pre, fts)
  if isinstance(scale, tuple):
    tvs = [{k: v * a for k, v in tv.items()} for tv, a in zip(tvs, scale)]
  fb = compute_and_sum_svd_mem_reduction(tvs, accelerator="cpu")
  ref = _add(pre, fb, scale if isinstance(scale, float) else 1.0)
  out = _merge("tsv_m", pre, fts, scale=list(scale) if isinstance(scale, tuple) else scale)
  assert_close(out, ref, pre, what=f"tsv_m T={num_tasks}")


@pytest.mark.parametrize("num_tasks", [3])
def test_tsv_c(num_tasks):
  """Per-task models: matrices keep ``int(r / T)`` triplets (FusionBench's ``compute_svd_and_compress``), other
  leaves keep the task's own vector."""
  pre, fts = models(num_tasks, small=True)
  tvs = _tvs(pre, fts)
  outs = jm.merge_per_task(tx("tsv_c"), pre, fts)
  for t, tv in enumerate(tvs):
    ref = {}
    for k, v in tv.items():
      if v.ndim == 2:
        _, u, s, vt = compute_svd_and_compress(k, v, 1 / num_tasks)
        v = u @ torch.diag(s) @ vt
      ref[k] = v
    assert_close(to_numpy(outs[t]), _add(pre, ref), pre, what=f"tsv_c task {t}")


# ---------------------------------------------------------------------------------------------------- Iso


@pytest.mark.parametrize("num_tasks,scale", [(5, 1.5)])
def test_iso_c(num_tasks, scale):
  pre, fts = models(num_tasks, small=True)
  ref = _add(pre, iso_c(_tvs(pre, fts), accelerator="cpu"), scale)
  assert_close(_merge("iso_c", pre, fts, scale=scale), ref, pre, what=f"iso_c T={num_tasks}")


@pytest.mark.parametrize("num_tasks,fraction,scale", [(3, 0.6, 1.3), (5, 0.8, 0.9)])
def test_iso_cts(num_tasks, fraction, scale):
  """Both of jaxmerge's routes are exercised: fc1 ``(32, 16)`` is tall (explicit projection), fc2 ``(16, 32)``
  and the square attention matrices use the complement basis."""
  pre, fts = models(num_tasks, small=True)
  ref = _add(pre, iso_cts(_tvs(pre, fts), common_space_fraction=fraction, accelerator="cpu"), scale)
  out = _merge("iso_cts", pre, fts, scale=scale, common_fraction=fraction)
  assert_close(out, ref, pre, what=f"iso_cts T={num_tasks} f={fraction}")


# --------------------------------------------------------------------------------------------------- WUDI


@pytest.mark.parametrize("num_tasks,steps", [(3, 25)])
def test_wudi(num_tasks, steps):
  """FusionBench's ``wudi_merging`` (Adam, lr 1e-5) with fewer steps than the default; the result moves well
  away from the task-arithmetic start (checked), so the steps are compared, not just the start."""
  pre, fts = models(num_tasks, small=True)
  ref = _add(pre, wudi_merging(_tvs(pre, fts), accelerator="cpu", iter_num=steps))
  out = _merge("wudi", pre, fts, steps=steps)
  assert_close(out, ref, pre, what=f"wudi T={num_tasks}")
  start = _merge("wudi", pre, fts, steps=0)
  k = "vision_model.encoder.layers.0.mlp.fc1.weight"
  assert np.linalg.norm(out[k] - start[k]) > 3e-3 * np.linalg.norm(start[k] - pre[k])  # 30x the tolerance


# -------------------------------------------------------------------------------------------------- KnOTS


def _knots_reference(pre, fts, base):
  """FusionBench's ``subspace_alignment`` per 2-D leaf, then FusionBench's TA sum or TIES on the aligned
  ``V_t^T`` (vector leaves are merged together with them, as one model), then ``U S V_M^T``."""
  tvs = _tvs(pre, fts)
  aligned, inner = {}, [dict() for _ in tvs]
  for k in pre:
    if tvs[0][k].ndim == 2:
      u, s, vhs = subspace_alignment([tv[k] for tv in tvs], svd_dtype=torch.float32)
      aligned[k] = (u, s)
      for t, vh in enumerate(vhs):
        inner[t][k] = vh
    else:
      for t, tv in enumerate(tvs):
        inner[t][k] = tv[k]
  keys = list(pre)
  if base[0] == "task_arithmetic":
    merged = {k: base[1] * sum(inner[t][k] for t in range(len(tvs))) for k in keys}
  else:
    flat = torch.stack([torch.cat([inner[t][k].reshape(-1) for k in keys]) for t in range(len(tvs))])
    vec = ties_merging(flat, reset_thresh=base[1], merge_func=base[2]) * base[3]
    merged, i = {}, 0
    for k in keys:
      n = inner[0][k].numel()
      merged[k] = vec[i:i + n].reshape(inner[0][k].shape)
      i += n
  out = {}
  for k in keys:
    if k in aligned:
      u, s = aligned[k]
      out[k] = u @ torch.diag(s) @ merged[k]
    else:
      out[k] = merged[k]
  return _add(pre, out)


@pytest.mark.parametrize(
    "num_tasks,base,hp",
    [(3, ("task_arithmetic", 0.4), dict(base="task_arithmetic", scale=0.4)),
     (5, ("ties", 0.2, "mean", 1.0), dict(base="ties", density=0.2, disjoint="mean", scale=1.0))],
)
def test_knots(num_tasks, base, hp):
  pre, fts = models(num_tasks, small=True)
  assert_close(_merge("knots", pre, fts, **hp), _knots_reference(pre, fts, base), pre, what=f"knots {hp}")
