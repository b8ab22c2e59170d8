"""Parity with mergekit 0.1.5 merge kernels, called on in-memory tensors (no merge run on disk).

mergekit exposes ``mergekit.merge_methods.api.merge_tensors(tensors, method, base_index=0, parameters=...)``,
one call per tensor. Its semantics differ from the papers and FusionBench (METHODS.md section 7 item 11);
each test names the jaxmerge hyperparameters that reproduce mergekit:

- TIES: per tensor (``scope="leaf"``), exactly ``max(1, int(d n))`` kept (``count="exact"``), a zero sign
  sum elects ``+`` (``zero_sign="positive"``), ``normalize`` = disjoint mean (``disjoint="mean"``),
  ``lambda`` = ``scale``.
- Breadcrumbs: per tensor (``granularity="tensor"``), no rescale, ``lambda`` = ``scale``.
- SLERP: per tensor with the base as ``t = 0`` endpoint: jaxmerge ``slerp(t)`` on ``[A, B]``.
- Model Stock: mean of pairwise cosines (``average="cosine"``); FusionBench averages angles instead.
- DARE / DELLA: random (torch RNG), and mergekit rescales by the tensor's L1 norm instead of ``1/(1-p)`` or
  ``1/q``: tested by properties (jaxmerge ``rescale="l1"`` preserves each tensor's L1 norm) and by the
  deterministic keep probabilities of MAGPRUNE, captured from mergekit's ``torch.bernoulli`` call.

Metric: relative Frobenius error of the merged update per leaf < 1e-4 (``tests/parity/_common.py``).
Hyperparameters jaxmerge does not accept (options proposed to the lead) make the test skip with the name.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("mergekit")
jax = pytest.importorskip("jax")

import jaxmerge as jm  # noqa: E402
from mergekit import sparsify as mk_sparsify  # noqa: E402
from mergekit.merge_methods.api import merge_tensors  # noqa: E402

from tests import reference as ref  # noqa: E402
from tests.parity._common import assert_close, models, to_numpy, tx  # noqa: E402

pytestmark = pytest.mark.parity


def _method(name, **hp):
  """``get_method(name)(**hp)``, skipping (with the option's name) when jaxmerge lacks a proposed option."""
  try:
    return tx(name, **hp)
  except TypeError as e:
    pytest.skip(f"jaxmerge {name} does not accept {sorted(hp)}: {e}")


def _mk(pre, fts, method, **params):
  out = {}
  for k in pre:
    tensors = [torch.from_numpy(np.array(pre[k]))] + [torch.from_numpy(np.array(f[k])) for f in fts]
    out[k] = merge_tensors(tensors, method, base_index=0, parameters=params, dtype=torch.float32).numpy()
  return out


MK_TIES = dict(scope="leaf", count="exact", zero_sign="positive", disjoint="mean")


@pytest.mark.parametrize("num_tasks,density,lam", [(3, 0.3, 0.6)])
def test_ties_per_tensor(num_tasks, density, lam):
  pre, fts = models(num_tasks, seed=1, small=True)
  expect = _mk(pre, fts, "ties", weight=1.0, density=density, **{"lambda": lam})
  tx = _method("ties", density=density, scale=lam, **MK_TIES)
  assert_close(to_numpy(jm.merge(tx, pre, fts)), expect, pre, what="ties vs mergekit")


def test_ties_zero_sign_positive():
  """Opposite, equal entries: mergekit elects ``+`` on a zero sum (FusionBench uses the global majority)."""
  pre = {"w": np.zeros((2, 3), np.float32)}
  a = np.array([[1.0, -2.0, 3.0], [0.5, 4.0, -1.0]], np.float32)
  b = a.copy()
  b[0, 0] = -1.0  # sum 0 at (0, 0); elsewhere both agree
  fts = [{"w": a}, {"w": b}]
  expect = _mk(pre, fts, "ties", weight=1.0, density=1.0)
  assert expect["w"][0, 0] == 1.0
  out = to_numpy(jm.merge(_method("ties", density=1.0, scale=1.0, **MK_TIES), pre, fts))
  np.testing.assert_allclose(out["w"], expect["w"], rtol=1e-6)


@pytest.mark.parametrize("num_tasks,density,gamma,lam", [(3, 0.6, 0.05, 0.7)])
def test_breadcrumbs_per_tensor(num_tasks, density, gamma, lam):
  pre, fts = models(num_tasks, seed=2, small=True)
  expect = _mk(pre, fts, "breadcrumbs", weight=1.0, density=density, gamma=gamma, **{"lambda": lam})
  tx = _method("breadcrumbs", density=density, gamma=gamma, scale=lam, granularity="tensor")
  assert_close(to_numpy(jm.merge(tx, pre, fts)), expect, pre, what="breadcrumbs vs mergekit")


def test_slerp():
  pre, fts = models(2, seed=3, small=True)
  expect = {}
  for k in pre:
    pair = [torch.from_numpy(np.array(fts[0][k])), torch.from_numpy(np.array(fts[1][k]))]
    expect[k] = merge_tensors(pair, "slerp", base_index=0, parameters={"t": 0.35}).numpy()
  assert_close(to_numpy(jm.merge(_method("slerp", t=0.35), pre, fts)), expect, pre, what="slerp vs mergekit")


@pytest.mark.parametrize("num_tasks", [3])
def test_model_stock_cosine(num_tasks):
  pre, fts = models(num_tasks, seed=4, small=True)
  expect = _mk(pre, fts, "model_stock")
  tx = _method("model_stock", average="cosine")
  assert_close(to_numpy(jm.merge(tx, pre, fts)), expect, pre, what="model_stock vs mergekit")


def test_mergekit_magprune_probabilities_match_reference(monkeypatch):
  """mergekit's DELLA keep probabilities (captured from ``torch.bernoulli``) equal the reference formula
  ``q = (1-p) - eps + 2 eps rn`` per row for 1-D and 2-D tensors (mergekit ranks 4-D tensors along dim 1)."""
  pre, fts = models(1, seed=5)
  captured = []
  real = torch.bernoulli
  monkeypatch.setattr(mk_sparsify.torch, "bernoulli", lambda probs, *a, **k: (captured.append(probs.clone()),
                                                                              real(probs, *a, **k))[1])
  p, eps = 0.4, 0.1
  for k in pre:
    if np.ndim(pre[k]) > 2:
      continue
    tau = torch.from_numpy(fts[0][k] - pre[k])
    mk_sparsify.della_magprune(tau, density=1 - p, epsilon=eps)
    q = captured.pop().numpy().reshape(-1)
    expect = np.concatenate([ref.magprune_probs_row(r, p, eps) for r in ref.rows(tau.numpy())])
    np.testing.assert_allclose(q, expect, atol=1e-6, err_msg=k)


def test_dare_l1_rescale_property():
  """mergekit's DARE rescale keeps each tensor's L1 norm (``rescale="l1"``); jaxmerge must do the same."""
  rng = np.random.default_rng(6)
  pre = {"w": rng.standard_normal((8, 40)).astype(np.float32), "b": rng.standard_normal(40).astype(np.float32)}
  fts = [{k: (v + 0.01 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in pre.items()}]
  tx = _method("dare", p=0.6, rescale="l1", scale=1.0)
  out = to_numpy(jm.merge(tx, pre, fts, key=jax.random.key(3)))
  for k in pre:
    tau = fts[0][k].astype(np.float64) - pre[k]
    got = out[k].astype(np.float64) - pre[k]
    assert np.count_nonzero(got) < 0.6 * got.size, k
    np.testing.assert_allclose(np.abs(got).sum(), np.abs(tau).sum(), rtol=1e-4, err_msg=k)
  # and mergekit itself (same property, validates the claim)
  t = torch.from_numpy(fts[0][next(iter(pre))] - pre[next(iter(pre))])
  r = mk_sparsify.bernoulli(t, density=0.4, rescale_norm=mk_sparsify.RescaleNorm.l1)
  np.testing.assert_allclose(r.abs().sum().item(), t.abs().sum().item(), rtol=1e-5)
