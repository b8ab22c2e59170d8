"""Scale search on labeled validation data (the survey's validation-driven protocol) for any merge.

A merge is written ``theta_0 + s * Delta``: ``Delta`` is the method's merged update at unit scale (methods with a
``scale`` hyperparameter are run with ``scale=1``, whose update is linear in it for every such method here:
task arithmetic, TIES, DARE, ... apply ``scale`` last), otherwise the method's own update, which the search then
rescales. Each candidate is one fused ``theta_0 + s * Delta`` (``s`` is an argument: no recompilation) and one
evaluation. Grid search follows Task Arithmetic's protocol (``0, 0.05, ..., 1``); golden-section search
assumes a unimodal score on ``[lo, hi]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmerge import tree as jtree

__all__ = ["DEFAULT_GRID", "golden_section", "grid_search", "rescale", "scale_search"]

DEFAULT_GRID = tuple(round(0.05 * i, 2) for i in range(21))
_INV_PHI = (math.sqrt(5.0) - 1.0) / 2.0


def grid_search(score: Callable[[float], float], grid: Sequence[float]) -> tuple[float, list[tuple[float, float]]]:
  """The grid point with the highest ``score`` (the first one on ties) and every ``(point, score)``.

  Args:
    score: ``score(point) -> float`` (higher is better).
    grid: the points to evaluate (at least one), in order.

  Returns:
    ``(best point, [(point, score), ...])`` with one entry per grid point, in grid order.

  Raises:
    ValueError: an empty grid.

  References:
    Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023 (lambda chosen on validation data from
    ``0, 0.05, ..., 1``). https://arxiv.org/abs/2212.04089
  """
  grid = [float(g) for g in grid]
  if not grid:
    raise ValueError("grid_search needs at least one grid point")
  history = [(g, float(score(g))) for g in grid]
  best = max(range(len(history)), key=lambda i: (history[i][1], -i))
  return history[best][0], history


def golden_section(score: Callable[[float], float], lo: float, hi: float, iters: int = 12
                   ) -> tuple[float, list[tuple[float, float]]]:
  """Golden-section search for the maximum of a unimodal ``score`` on ``[lo, hi]`` (``iters + 2`` evaluations).

  Args:
    score: ``score(point) -> float`` (higher is better).
    lo: the interval's lower end.
    hi: the interval's upper end (``> lo``).
    iters: interval reductions (each one new evaluation; ``>= 0``).

  Returns:
    ``(best evaluated point, [(point, score), ...])``.

  References:
    Kiefer, "Sequential minimax search for a maximum", Proc. AMS 1953.
  """
  if not hi > lo:
    raise ValueError(f"golden_section needs lo < hi, got [{lo}, {hi}]")
  if iters < 0:
    raise ValueError(f"iters must be >= 0, got {iters}")
  a, b = float(lo), float(hi)
  c, d = b - _INV_PHI * (b - a), a + _INV_PHI * (b - a)
  fc, fd = float(score(c)), float(score(d))
  history = [(c, fc), (d, fd)]
  for _ in range(iters):
    if fc >= fd:
      b, d, fd = d, c, fc
      c = b - _INV_PHI * (b - a)
      fc = float(score(c))
      history.append((c, fc))
    else:
      a, c, fc = c, d, fd
      d = a + _INV_PHI * (b - a)
      fd = float(score(d))
      history.append((d, fd))
  best = max(history, key=lambda h: h[1])
  return best[0], history


@jax.jit
def _rescale(pre: dict, delta: dict, s: jax.Array) -> dict:
  return {p: (pre[p].astype(jnp.float32) + s * delta[p]).astype(pre[p].dtype) for p in pre}


def rescale(pretrained: Any, merged: Any) -> Callable[[float], Any]:
  """``s -> theta_0 + s * (merged - theta_0)`` on float leaves (others from ``merged``); compiled once.

  Args:
    pretrained: pretrained parameters ``theta_0`` (any pytree).
    merged: a merged model with the same paths.

  Returns:
    ``at(s) -> params``: the pytree like ``merged`` at scale ``s`` (float leaves in the pretrained dtypes).
  """
  pre = {p: x for p, x in jtree.flatten_paths(pretrained).items() if jtree.is_float(x)}
  flat_m = jtree.flatten_paths(merged)
  delta = {p: jnp.asarray(flat_m[p], jnp.float32) - jnp.asarray(pre[p], jnp.float32) for p in pre}
  pre = {p: jnp.asarray(x) for p, x in pre.items()}

  def at(s: float) -> Any:
    out = _rescale(pre, delta, jnp.float32(s))
    return jtree.unflatten_paths(merged, {**flat_m, **out})

  return at


def scale_search(
    pretrained: Any,
    merged_unit: Any,
    score: Callable[[Any], float],
    *,
    search: str = "grid",
    grid: Sequence[float] = DEFAULT_GRID,
    lo: float = 0.0,
    hi: float = 1.0,
    iters: int = 12,
) -> tuple[Any, dict]:
  """The best ``theta_0 + s * (merged_unit - theta_0)`` under ``score(params)`` (higher is better).

  Args:
    pretrained: pretrained parameters.
    merged_unit: the method's merge at unit scale.
    score: validation score of a parameter pytree (e.g. mean validation accuracy over tasks).
    search: ``"grid"`` or ``"golden"``.
    grid: grid points (``search="grid"``).
    lo, hi, iters: golden-section interval and iterations.

  Returns:
    ``(params at the best scale, {"scale": s, "history": [(s, score), ...]})``.

  References:
    Yang et al., "Model Merging in LLMs, MLLMs, and Beyond: Methods, Theories, Applications and
    Opportunities", 2024 (validation-driven protocol). https://arxiv.org/abs/2408.07666
  """
  at = rescale(pretrained, merged_unit)
  fn = lambda s: score(at(s))  # noqa: E731
  if search == "grid":
    best, history = grid_search(fn, grid)
  elif search == "golden":
    best, history = golden_section(fn, lo, hi, iters)
  else:
    raise ValueError(f"search must be 'grid' or 'golden', got {search!r}")
  return at(best), {"scale": float(best), "history": np.asarray(history, np.float64)}
