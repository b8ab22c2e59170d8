"""Shared helpers of the parity tests: fixtures as torch state dicts and the error metric.

Error metric (used by every parity test): for each leaf, the relative Frobenius error of the merged *task
vector*, ``||(a - theta_0) - (b - theta_0)||_F / max(||b - theta_0||_F, 1e-3 ||theta_0||_F)``, where ``a`` is
jaxmerge's and ``b`` the reference's merged weights. Measuring against the merged update (not the whole
weight) makes the 1e-4 tolerance meaningful: the update is ~1e-2 of the weights, so an error relative to the
weights would hide a 1% mistake in the update. The floor handles leaves whose merged update is ~0. Both sides
work in float32 from identical float32 inputs, so the observed errors are ~1e-7.
"""

from __future__ import annotations

import functools

import numpy as np

from tests.clip_shapes import ClipShapes, make_models

TOL = 1e-4
SMALL = ClipShapes(width=16, layers=1, mlp=32)


@functools.lru_cache(maxsize=None)
def models(num_tasks: int, seed: int = 0, small: bool = False):
  """Cached ``(pretrained, finetuned)`` NumPy fixtures (treat as read-only): the default tiny CLIP vision
  tower (width 32, 2 layers), or with ``small=True`` width 16 and 1 layer (fewer leaves: faster to compile)."""
  return make_models(num_tasks, seed=seed, cfg=SMALL if small else ClipShapes())


def _freeze(v):
  return tuple(v) if isinstance(v, list) else v


@functools.lru_cache(maxsize=None)
def _tx(name: str, items: tuple):
  import jaxmerge as jm

  return jm.get_method(name)(**dict(items))


def tx(name: str, **hp):
  """``jm.get_method(name)(**hp)``, memoized so that tests with equal hyperparameters share one transform
  object and therefore one jit compilation (lists become tuples)."""
  return _tx(name, tuple(sorted((k, _freeze(v)) for k, v in hp.items())))


def leaf_errors(out, ref, pre) -> dict[str, float]:
  errs = {}
  for k, b in ref.items():
    a = np.asarray(out[k], np.float64)
    b = np.asarray(b, np.float64)
    p = np.asarray(pre[k], np.float64)
    denom = max(np.linalg.norm(b - p), 1e-3 * np.linalg.norm(p), 1e-12)
    errs[k] = float(np.linalg.norm(a - b) / denom)
  return errs


def assert_close(out, ref, pre, tol: float = TOL, what: str = "") -> None:
  """Per-leaf relative error of the merged update below ``tol`` (see module docstring); names the worst leaf."""
  assert set(out) >= set(ref), f"{what}: missing leaves {sorted(set(ref) - set(out))[:5]}"
  for k in ref:
    assert np.shape(out[k]) == np.shape(ref[k]), f"{what}: {k} shape {np.shape(out[k])} != {np.shape(ref[k])}"
  errs = leaf_errors(out, ref, pre)
  worst = max(errs, key=errs.get)
  assert errs[worst] < tol, f"{what}: relative error {errs[worst]:.3e} at {worst} (tolerance {tol})"


def to_numpy(tree) -> dict[str, np.ndarray]:
  return {k: np.asarray(v) for k, v in tree.items()}
