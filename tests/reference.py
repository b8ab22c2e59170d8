"""Plain NumPy reference implementations of merge methods, written from the paper formulas / METHODS.md.

Written for clarity, not speed: loops, float64 math, no tricks. Inputs are flat ``{name: array}`` dicts
(``pretrained``) and lists of them (``finetuned``); outputs are float32 dicts like ``pretrained``. Every
function documents which reading (paper, reference code, mergekit) it implements, so that tests can check
jaxmerge's options one by one. Only float leaves are merged here; callers strip non-float leaves.

Conventions shared by all functions:

- ``tau_t = theta_t - theta_0`` in float64.
- "row view" of a leaf: the rows of the PyTorch ``(out, in)`` matrix for 2-D leaves (METHODS' matrix-leaf rule
  for HF checkpoints), ONE row for every other leaf (1-D, 0-d, and the 4-D patch embedding, which is a vector
  leaf under that rule; mergekit instead ranks a 4-D tensor along its dim 1, the original Breadcrumbs code
  along the last axis: neither is reproduced here).
- "global" statistics concatenate all leaves of one task in sorted-key order (order does not change
  thresholds, only which of exactly tied entries are kept).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

Flat = dict[str, np.ndarray]

# ----------------------------------------------------------------------------------------------- helpers


def task_vectors(pretrained: Flat, finetuned: Sequence[Flat]) -> list[Flat]:
  return [{k: np.asarray(ft[k], np.float64) - np.asarray(pretrained[k], np.float64) for k in pretrained}
          for ft in finetuned]


def add_to(pretrained: Flat, delta: Flat) -> Flat:
  return {k: (np.asarray(pretrained[k], np.float64) + delta[k]).astype(np.float32) for k in pretrained}


def keys_of(pretrained: Flat) -> list[str]:
  return sorted(pretrained)


def flatten(tv: Flat, keys: Sequence[str]) -> np.ndarray:
  return np.concatenate([np.asarray(tv[k], np.float64).reshape(-1) for k in keys])


def unflatten(vec: np.ndarray, like: Flat, keys: Sequence[str]) -> Flat:
  out, i = {}, 0
  for k in keys:
    n = int(np.prod(np.shape(like[k])))
    out[k] = vec[i:i + n].reshape(np.shape(like[k]))
    i += n
  return out


def rows(x: np.ndarray) -> np.ndarray:
  """Row view (see module docstring): rows of 2-D leaves, one row for any other leaf."""
  x = np.asarray(x, np.float64)
  if x.ndim == 2:
    return x
  return x.reshape(1, -1)


def sum_tvs(tvs: Sequence[Flat]) -> Flat:
  return {k: sum(tv[k] for tv in tvs) for k in tvs[0]}


# ------------------------------------------------------------------------------------- weighted averages


def simple_average(pretrained: Flat, finetuned: Sequence[Flat]) -> Flat:
  tvs = task_vectors(pretrained, finetuned)
  return add_to(pretrained, {k: v / len(tvs) for k, v in sum_tvs(tvs).items()})


def task_arithmetic(pretrained: Flat, finetuned: Sequence[Flat], scale: float = 0.3) -> Flat:
  tvs = task_vectors(pretrained, finetuned)
  return add_to(pretrained, {k: scale * v for k, v in sum_tvs(tvs).items()})


def nan(pretrained: Flat, finetuned: Sequence[Flat], global_scale: float | None = None) -> Flat:
  """NAN (METHODS 2.7): per leaf ``a_t = (1/||tau_t||) / sum_s 1/||tau_s||``, ``theta_0 + g sum_t a_t tau_t``,
  ``g = T/2`` by default. Norm of the task vector (Frobenius over the whole leaf)."""
  tvs = task_vectors(pretrained, finetuned)
  g = len(tvs) / 2 if global_scale is None else global_scale
  out = {}
  for k in pretrained:
    inv = np.array([1.0 / np.linalg.norm(tv[k].ravel()) for tv in tvs])
    a = inv / inv.sum()
    out[k] = g * sum(a[t] * tvs[t][k] for t in range(len(tvs)))
  return add_to(pretrained, out)


def slerp_vectors(v0: np.ndarray, v1: np.ndarray, t: float, dot_threshold: float = 0.9995,
                  epsilon: float = 1e-8) -> np.ndarray:
  """SLERP of two flat vectors (METHODS 2.8, FusionBench's rule: normalize only when ``||v|| > eps``; if
  ``|cos| > threshold`` interpolate linearly)."""
  v0 = np.asarray(v0, np.float64)
  v1 = np.asarray(v1, np.float64)
  n0, n1 = np.linalg.norm(v0), np.linalg.norm(v1)
  u0 = v0 / n0 if n0 > epsilon else v0
  u1 = v1 / n1 if n1 > epsilon else v1
  dot = float(np.sum(u0 * u1))
  if abs(dot) > dot_threshold:
    return (1 - t) * v0 + t * v1
  omega = math.acos(max(-1.0, min(1.0, dot)))
  return math.sin((1 - t) * omega) / math.sin(omega) * v0 + math.sin(t * omega) / math.sin(omega) * v1


def slerp(finetuned: Sequence[Flat], t: float = 0.5, dot_threshold: float = 0.9995, epsilon: float = 1e-8,
          granularity: str = "leaf") -> Flat:
  """SLERP between ``finetuned[0]`` (t=0) and ``finetuned[1]`` (t=1) weights.

  ``granularity="leaf"``: one angle per flattened leaf (FusionBench). ``"row"``: one angle per row of the
  leading axis, each 1-D entry its own row, zero norms replaced by 1 (mergekit 0.1.5).
  """
  a, b = finetuned
  out = {}
  for k in a:
    x, y = np.asarray(a[k], np.float64), np.asarray(b[k], np.float64)
    if granularity == "leaf":
      out[k] = slerp_vectors(x.ravel(), y.ravel(), t, dot_threshold, epsilon).reshape(x.shape)
    else:
      xr, yr = x.reshape(x.shape[0], -1), y.reshape(y.shape[0], -1)
      res = np.empty_like(xr)
      for i in range(xr.shape[0]):
        n0, n1 = np.linalg.norm(xr[i]), np.linalg.norm(yr[i])
        n0 = n0 if n0 > epsilon else 1.0
        n1 = n1 if n1 > epsilon else 1.0
        dot = float(np.clip(np.sum(xr[i] / n0 * yr[i] / n1), -1, 1))
        if abs(dot) > dot_threshold:
          res[i] = (1 - t) * xr[i] + t * yr[i]
        else:
          om = math.acos(dot)
          res[i] = math.sin((1 - t) * om) / math.sin(om) * xr[i] + math.sin(t * om) / math.sin(om) * yr[i]
      out[k] = res.reshape(x.shape)
  return {k: v.astype(np.float32) for k, v in out.items()}


def model_stock(pretrained: Flat, finetuned: Sequence[Flat], average: str = "cosine", clamp: bool = False,
                filter_wise: bool = False) -> Flat:
  """Model Stock (METHODS 2.9). Per leaf (or per row with ``filter_wise``), pairwise cosines of the task
  vectors; ``average="cosine"``: mean of cosines (paper, mergekit); ``"angle"``: cosine of the mean angle
  (FusionBench for T > 2). ``t = T c / (1 + (T-1) c)``, ``theta = t mean(theta_t) + (1-t) theta_0``."""
  tvs = task_vectors(pretrained, finetuned)
  n = len(tvs)
  out = {}
  for k in pretrained:
    views = [rows(tv[k]) if filter_wise else tv[k].reshape(1, -1) for tv in tvs]
    r = views[0].shape[0]
    ts = np.empty(r)
    for i in range(r):
      cos, ang = [], []
      for a in range(n):
        for b in range(a + 1, n):
          x, y = views[a][i], views[b][i]
          c = float(np.clip(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)), -1, 1))
          cos.append(c)
          ang.append(math.acos(c))
      c = float(np.mean(cos)) if average == "cosine" else math.cos(float(np.mean(ang)))
      if clamp:
        c = min(max(c, 0.0), 1.0)
      ts[i] = n * c / (1 + (n - 1) * c)
    mean_tv = sum(tv[k] for tv in tvs) / n
    shape = np.shape(pretrained[k])
    if filter_wise:
      out[k] = (ts[:, None] * rows(mean_tv)).reshape(shape)
    else:
      out[k] = ts[0] * mean_tv
  return add_to(pretrained, out)


# -------------------------------------------------------------------------------------------- TIES family


def trim_mask(x: np.ndarray, density: float, rule: str = "kthvalue") -> np.ndarray:
  """Top-``density`` magnitude mask of a flat vector.

  ``rule="kthvalue"`` (FusionBench/TIES code): ``k = n - int(n * density)``; keep ``|x| >= `` the k-th
  smallest ``|x|`` (1-indexed), which keeps ``int(n*density) + 1`` entries when there are no ties (all of them
  if k = 0). ``rule="exact"`` (mergekit): keep exactly ``max(1, int(n*density))`` largest (all if density >= 1).
  """
  a = np.abs(np.asarray(x, np.float64)).ravel()
  n = a.size
  if rule == "kthvalue":
    k = n - int(n * density)
    if k <= 0:
      return np.ones(n, bool)
    kth = np.sort(a)[k - 1]
    return a >= kth
  if density >= 1:
    return np.ones(n, bool)
  k = max(1, int(density * n))
  mask = np.zeros(n, bool)
  mask[np.argsort(-a, kind="stable")[:k]] = True
  return mask


def elect_and_merge(stack: np.ndarray, disjoint: str = "sum", zero_sign: str = "majority",
                    weights: np.ndarray | None = None) -> np.ndarray:
  """TIES steps 2-3 on a ``(T, n)`` array of trimmed task vectors.

  ``zero_sign="majority"`` (FusionBench): where ``sum_t`` is 0 the elected sign is ``sgn(sum of elected
  signs)`` over the whole vector; ``"positive"`` (mergekit): ``sum >= 0`` elects +.
  Disjoint: ``sum``, ``mean`` (count of agreeing nonzero entries, floor 1), ``max`` (largest agreeing
  magnitude times the elected sign), ``weighted_mean`` (mergekit normalize: divide by sum of the weights of
  agreeing entries; requires ``weights``; the stack is assumed already multiplied by the weights).
  """
  s = np.sign(stack.sum(0))
  if zero_sign == "majority":
    s[s == 0] = np.sign(s.sum())
  else:
    s = np.where(stack.sum(0) >= 0, 1.0, -1.0)
  agree = np.where(s[None] > 0, stack > 0, stack < 0)
  sel = stack * agree
  if disjoint == "sum":
    return sel.sum(0)
  if disjoint == "mean":
    return sel.sum(0) / np.maximum((sel != 0).sum(0), 1)
  if disjoint == "max":
    return np.abs(sel).max(0) * s
  if disjoint == "weighted_mean":
    div = (weights[:, None] * agree).sum(0)
    div[div == 0] = 1
    return sel.sum(0) / div
  raise ValueError(disjoint)


def ties(pretrained: Flat, finetuned: Sequence[Flat], density: float = 0.2, scale: float = 0.3,
         disjoint: str = "sum", scope: str = "global", rule: str = "kthvalue",
         zero_sign: str = "majority") -> Flat:
  """TIES-Merging (METHODS 3.1). ``scope="global"``: one threshold per task over all leaves (FusionBench);
  ``"leaf"``: per tensor (mergekit). Sign election and disjoint merge are per coordinate either way, except
  FusionBench's zero-sign majority, which is global over the flattened model (per leaf with scope="leaf")."""
  tvs = task_vectors(pretrained, finetuned)
  keys = keys_of(pretrained)
  if scope == "global":
    stack = np.stack([flatten(tv, keys) for tv in tvs])
    trimmed = np.stack([row * trim_mask(row, density, rule) for row in stack])
    merged = unflatten(elect_and_merge(trimmed, disjoint, zero_sign), pretrained, keys)
  else:
    merged = {}
    for k in keys:
      stack = np.stack([tv[k].ravel() for tv in tvs])
      trimmed = np.stack([row * trim_mask(row, density, rule) for row in stack])
      merged[k] = elect_and_merge(trimmed, disjoint, zero_sign).reshape(np.shape(pretrained[k]))
  return add_to(pretrained, {k: scale * v for k, v in merged.items()})


def dare_drop(tau: np.ndarray, u: np.ndarray, p: float, rescale: bool = True) -> np.ndarray:
  """DARE drop given uniforms ``u`` in [0, 1): keep where ``u >= p`` (METHODS 3.4), divide by ``1 - p``."""
  keep = u >= p
  out = tau * keep
  return out / (1 - p) if (rescale and p < 1) else out


def dare(pretrained: Flat, finetuned: Sequence[Flat], uniforms: Sequence[Flat], p: float = 0.5,
         rescale: bool = True, base: str = "task_arithmetic", scale: float = 0.3, **ties_kw) -> Flat:
  """DARE-TA / DARE-TIES given the uniform draws (one dict per task)."""
  tvs = task_vectors(pretrained, finetuned)
  dropped = [{k: dare_drop(tv[k], np.asarray(u[k], np.float64), p, rescale) for k in tv} for tv, u in
             zip(tvs, uniforms)]
  fts = [{k: np.asarray(pretrained[k], np.float64) + d[k] for k in d} for d in dropped]
  if base == "task_arithmetic":
    return add_to(pretrained, {k: scale * sum(d[k] for d in dropped) for k in pretrained})
  return ties({k: np.asarray(v, np.float64) for k, v in pretrained.items()}, fts, scale=scale, **ties_kw)


def breadcrumbs_mask_row(row: np.ndarray, density: float, gamma: float, rule: str = "paper") -> np.ndarray:
  """Breadcrumbs mask of one row: drop the top ``int(gamma n)`` magnitudes, keep the next ``int(density n)``.

  ``rule="paper"`` (METHODS 3.5): keep descending ranks ``[n_top, n_top + n_keep)`` clipped at ``n``.
  ``rule="mergekit"``: ``density >= 1`` keeps everything; otherwise keep ascending ranks
  ``[n_bot, n_bot + n_keep)`` with ``n_bot = max(0, n - n_keep - n_top)`` (so if ``n_keep + n_top > n`` the
  smallest ``n_keep`` are kept).
  """
  a = np.abs(row)
  n = a.size
  n_top, n_keep = int(gamma * n), int(density * n)
  mask = np.zeros(n, bool)
  if rule == "paper":
    order = np.argsort(-a, kind="stable")
    mask[order[n_top:min(n, n_top + n_keep)]] = True
    return mask
  if density >= 1:
    return np.ones(n, bool)
  n_bot = max(0, n - n_keep - n_top)
  order = np.argsort(a, kind="stable")
  mask[order[n_bot:n_bot + n_keep]] = True
  return mask


def breadcrumbs(pretrained: Flat, finetuned: Sequence[Flat], density: float = 0.85, gamma: float = 0.006,
                scale: float = 0.2, granularity: str = "row", rule: str = "paper") -> Flat:
  """Model Breadcrumbs: per row (or whole tensor, ``granularity="tensor"``), mask both tails, sum, scale."""
  tvs = task_vectors(pretrained, finetuned)
  out = {}
  for k in pretrained:
    shape = np.shape(pretrained[k])
    acc = np.zeros(shape)
    for tv in tvs:
      x = tv[k]
      if x.ndim == 0:
        acc = acc + x
        continue
      view = rows(x) if granularity == "row" else x.reshape(1, -1)
      m = np.stack([breadcrumbs_mask_row(r, density, gamma, rule) for r in view])
      acc = acc + (view * m).reshape(shape)
    out[k] = scale * acc
  return add_to(pretrained, out)


def magprune_probs_row(row: np.ndarray, p: float, window: float) -> np.ndarray:
  """DELLA keep probabilities of one row: ascending magnitude rank normalized to [0, 1] (``rn``),
  ``q = (1 - p) - window + 2 window rn`` (window = half-width, the reference's epsilon)."""
  n = row.size
  ranks = np.empty(n)
  ranks[np.argsort(np.abs(row), kind="stable")] = np.arange(n)
  rn = ranks / (n - 1) if n > 1 else np.zeros(n)
  return (1 - p) - window + 2 * window * rn


def della_drop(tau: np.ndarray, u: np.ndarray, p: float, window: float, rescale: bool = True) -> np.ndarray:
  """MAGPRUNE on one leaf given uniforms ``u``: keep where ``u < q`` (prob q), survivors divided by q."""
  view, uv = rows(tau), rows(u)
  out = np.zeros_like(view)
  for i in range(view.shape[0]):
    q = magprune_probs_row(view[i], p, window)
    keep = uv[i] < q
    out[i] = np.where(keep, view[i] / q if rescale else view[i], 0.0)
  return out.reshape(np.shape(tau))


def della(pretrained: Flat, finetuned: Sequence[Flat], uniforms: Sequence[Flat], p: float = 0.3,
          window: float = 0.14, scale: float = 1.1) -> Flat:
  """DELLA: MAGPRUNE, then sign election (per coordinate, METHODS 3.9) and disjoint mean, times scale."""
  tvs = task_vectors(pretrained, finetuned)
  out = {}
  for k in pretrained:
    stack = np.stack([della_drop(tv[k], np.asarray(u[k], np.float64), p, window).ravel()
                      for tv, u in zip(tvs, uniforms)])
    out[k] = scale * elect_and_merge(stack, "mean", "majority").reshape(np.shape(pretrained[k]))
  return add_to(pretrained, out)


# ----------------------------------------------------------------------------------------- PCB, TALL, EMR


def _minmax(x: np.ndarray) -> np.ndarray:
  return (x - x.min()) / (x.max() - x.min())


def _clamp_order(x: np.ndarray, lo_ratio: float, hi_ratio: float) -> np.ndarray:
  s = np.sort(x)
  d = x.size
  return np.clip(x, s[int(d * lo_ratio)], s[int(d * (1 - hi_ratio)) - 1])


def pcb(pretrained: Flat, finetuned: Sequence[Flat], ratio: float = 0.05, scale: float | Sequence[float] = 1.2,
        clamp_ratio: float = 0.01, inter: str = "normalized") -> Flat:
  """PCB-Merging, reference vision code (duguodong7/pcb-merging ``vision_source_code/pcb.py``), global per task.

  ``A_t = clamp(|x_t|)`` to its ``[clamp_ratio, 1-clamp_ratio]`` order statistics, ``xc_t = sgn(x_t) A_t``;
  intra ``exp(T minmax(A_t)^2)``; inter ``tanh(x_t * sum_s sgn(x_s) minmax(A_s))`` (``inter="normalized"``,
  vision script) or ``tanh(x_t * sum_s x_s)`` (``inter="raw"``, the generic helper); score
  ``minmax(clip(intra*inter, lower=its (1-ratio) order statistic))``;
  ``merged = sum_t lam_t xc_t score_t / max(sum_t score_t, 1e-12)``; output ``theta_0 + merged``.
  """
  tvs = task_vectors(pretrained, finetuned)
  keys = keys_of(pretrained)
  x = np.stack([flatten(tv, keys) for tv in tvs])
  n, d = x.shape
  lam = np.full(n, scale) if np.isscalar(scale) else np.asarray(scale, np.float64)
  a = np.stack([_clamp_order(np.abs(r), clamp_ratio, clamp_ratio) for r in x])
  xc = np.sign(x) * a
  intra = np.exp(n * np.stack([_minmax(r) for r in a]) ** 2)
  if inter == "normalized":
    other = (np.sign(x) * np.stack([_minmax(r) for r in a])).sum(0)
  else:
    other = x.sum(0)
  bal = intra * np.tanh(x * other[None])
  score = np.stack([_minmax(_clamp_order(r, 1 - ratio, 0.0)) for r in bal])
  merged = (lam[:, None] * xc * score).sum(0) / np.maximum(score.sum(0), 1e-12)
  return add_to(pretrained, unflatten(merged, pretrained, keys))


def tall_masks(pretrained: Flat, finetuned: Sequence[Flat], tall_lambda: float | Sequence[float] = 0.6,
               strict: bool = True, multi: Flat | None = None) -> list[Flat]:
  """TALL masks ``m_t = |tau_t| > lambda_t |tau_MTL - tau_t|`` (``>=`` if not strict); ``tau_MTL`` defaults
  to the plain sum of task vectors."""
  tvs = task_vectors(pretrained, finetuned)
  mtl = sum_tvs(tvs) if multi is None else multi
  lams = [tall_lambda] * len(tvs) if np.isscalar(tall_lambda) else list(tall_lambda)
  cmp: Callable = np.greater if strict else np.greater_equal
  return [{k: cmp(np.abs(tv[k]), lam * np.abs(mtl[k] - tv[k])) for k in tv} for tv, lam in zip(tvs, lams)]


def tall_mask_models(pretrained: Flat, finetuned: Sequence[Flat], tall_lambda=0.6, strict: bool = True
                     ) -> list[Flat]:
  """Per-task TALL reconstructions ``theta_0 + m_t * tau_MTL``."""
  tvs = task_vectors(pretrained, finetuned)
  mtl = sum_tvs(tvs)
  masks = tall_masks(pretrained, finetuned, tall_lambda, strict)
  return [add_to(pretrained, {k: m[k] * mtl[k] for k in mtl}) for m in masks]


def consensus(pretrained: Flat, finetuned: Sequence[Flat], k: int = 2, tall_lambda=0.6,
              base: str = "task_arithmetic", scale: float = 0.3, strict: bool = True, **ties_kw) -> Flat:
  """Consensus merging: count TALL masks (built from the plain sum of task vectors), keep entries claimed by
  at least ``k`` tasks, zero the others in every task vector, then run the base (TA or TIES)."""
  masks = tall_masks(pretrained, finetuned, tall_lambda, strict)
  cons = {key: sum(m[key].astype(np.int64) for m in masks) >= k for key in pretrained}
  tvs = task_vectors(pretrained, finetuned)
  pre64 = {key: np.asarray(v, np.float64) for key, v in pretrained.items()}
  masked_fts = [{key: pre64[key] + cons[key] * tv[key] for key in tv} for tv in tvs]
  if base == "task_arithmetic":
    return task_arithmetic(pre64, masked_fts, scale)
  return ties(pre64, masked_fts, scale=scale, **ties_kw)


def emr(pretrained: Flat, finetuned: Sequence[Flat], rescaler: str = "reference"
        ) -> tuple[Flat, list[Flat], np.ndarray]:
  """EMR-Merging (METHODS 3.2 / FusionBench ``emr_merge``): returns ``(tau_uni, masks, rescalers)``.

  Elected sign ``+1 if sum_t tau_t > 0 else -1`` (zero -> -1, reference); ``M_t = tau_t * sign > 0``;
  ``tau_uni = sign * max_t |M_t tau_t|``; rescaler ``"reference"``: ``sum_leaves mean|tau_t| /
  sum_leaves mean|M_t tau_uni|``; ``"global"``: ``sum|tau_t| / sum|M_t tau_uni|`` over all entries.
  """
  tvs = task_vectors(pretrained, finetuned)
  uni, masks = {}, [dict() for _ in tvs]
  for k in pretrained:
    sign = np.where(sum(tv[k] for tv in tvs) > 0, 1.0, -1.0)
    mx = np.zeros(np.shape(pretrained[k]))
    for t, tv in enumerate(tvs):
      m = tv[k] * sign > 0
      masks[t][k] = m
      mx = np.maximum(mx, np.abs(tv[k] * m))
    uni[k] = sign * mx
  num = np.zeros(len(tvs))
  den = np.zeros(len(tvs))
  for t, tv in enumerate(tvs):
    for k in pretrained:
      a, b = np.abs(tv[k]), np.abs(uni[k] * masks[t][k])
      if rescaler == "reference":
        num[t] += a.mean()
        den[t] += b.mean()
      else:
        num[t] += a.sum()
        den[t] += b.sum()
  return uni, masks, num / den


def emr_models(pretrained: Flat, finetuned: Sequence[Flat], rescaler: str = "reference") -> list[Flat]:
  uni, masks, lam = emr(pretrained, finetuned, rescaler)
  return [add_to(pretrained, {k: lam[t] * masks[t][k] * uni[k] for k in uni}) for t in range(len(masks))]


# ------------------------------------------------------------------------------- Localize-Stitch, BYOM


def topk_global_masks(tvs: Sequence[Flat], keys: Sequence[str], density: float, rule: str = "official"
                      ) -> list[Flat]:
  """Per-task top-magnitude masks over all leaves of the task (one threshold per task).

  ``rule="official"`` (Localize-and-Stitch ``localize_utils.Localizer.create_basepatch``): ``k = int(density N)``,
  ``thr = topk(|tau|, k).min()`` (the k-th largest), keep ``|tau| > thr`` STRICTLY (k - 1 entries without ties;
  nothing if k = 0). ``"topk"`` (METHODS 3.3 formula): keep ``|tau| >= `` the k-th largest, ``k = max(1, int(dN))``.
  ``"kthvalue"``: TIES/FusionBench's count (see :func:`trim_mask`).
  """
  out = []
  for tv in tvs:
    v = np.abs(flatten(tv, keys))
    if rule == "kthvalue":
      m = trim_mask(v, density, "kthvalue")
    elif rule == "official":
      k = int(density * v.size)
      m = v > np.sort(v)[::-1][k - 1] if k > 0 else np.zeros(v.size, bool)
    else:
      k = max(1, int(density * v.size))
      m = v >= np.sort(v)[::-1][k - 1]
    out.append(unflatten(m, tv, keys))
  return out


def localize_stitch(pretrained: Flat, finetuned: Sequence[Flat], density: float = 0.1, rule: str = "official"
                    ) -> Flat:
  """Data-free Localize-and-Stitch (METHODS 3.3, reference repo yifei-he/Localize-and-Stitch): per-task global
  top-``density`` masks (``rule``, see :func:`topk_global_masks`), stitched as
  ``theta_0 + sum_t m_t tau_t / max(1, sum_s m_s)`` (the reference's ``Stitcher.get_average_masks``)."""
  tvs = task_vectors(pretrained, finetuned)
  keys = keys_of(pretrained)
  masks = topk_global_masks(tvs, keys, density, rule)
  out = {}
  for k in keys:
    cnt = sum(m[k].astype(np.float64) for m in masks)
    out[k] = sum(m[k] * tv[k] for m, tv in zip(masks, tvs)) / np.maximum(1.0, cnt)
  return add_to(pretrained, out)


def byom_fft(pretrained: Flat, finetuned: Sequence[Flat], density: float = 0.1, scale: float = 0.3,
             scope: str = "global", rule: str = "kthvalue") -> list[Flat]:
  """BYOM-FFT (METHODS 5.6): ``theta* = theta_0 + scale sum tau``; task model ``theta* + topk(theta_t - theta*)``
  with the top-``density`` magnitudes of the residual kept per task (``scope="global"`` over all leaves or per
  ``"leaf"``). No reference code is available: the count ``rule`` defaults to TIES's (``"kthvalue"``,
  jaxmerge's documented choice); ``"topk"`` keeps exactly ``max(1, int(density N))``."""
  tvs = task_vectors(pretrained, finetuned)
  keys = keys_of(pretrained)
  star = {k: np.asarray(pretrained[k], np.float64) + scale * sum(tv[k] for tv in tvs) for k in keys}
  res = [{k: np.asarray(ft[k], np.float64) - star[k] for k in keys} for ft in finetuned]
  models = []
  for u in res:
    if scope == "global":
      m = topk_global_masks([u], keys, density, rule)[0]
    else:
      m = {k: topk_global_masks([{k: u[k]}], [k], density, rule)[0][k] for k in keys}
    models.append({k: (star[k] + m[k] * u[k]).astype(np.float32) for k in keys})
  return models
