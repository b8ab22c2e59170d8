"""Per-layer math of the model-level merges (survey family D), as pure functions of arrays (no flax).

Kernels follow jaxmerge's Flax layout: a dense layer is ``y = x @ W + b`` with ``W`` of shape ``(in, out)``
(the transpose of PyTorch's ``(out, in)`` weight). Stacked expert tensors carry a leading task axis ``T``.
Everything is float32 at ``HIGHEST`` matmul precision and jit/vmap/grad compatible.

References:
  Tang et al., "SMILE: Zero-Shot Sparse Mixture of Low-Rank Experts Construction From Pre-Trained Foundation
  Models", 2024. https://arxiv.org/abs/2408.10174
  Tang et al., "Merging Multi-Task Models via Weight-Ensembling Mixture of Experts", ICML 2024.
  https://arxiv.org/abs/2402.00433
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxmerge import linalg

__all__ = [
    "SmileFactors",
    "high_pass",
    "init_router",
    "router_logits",
    "smile_factors",
    "smile_linear",
    "smile_routing",
    "wemoe_gate",
    "wemoe_mlp",
]

HIGHEST = jax.lax.Precision.HIGHEST


def _f32(x):
  return jnp.asarray(x).astype(jnp.float32)


def _add(y: jax.Array, b: jax.Array) -> jax.Array:
  """``y + b`` with ``b`` broadcast over ``y``'s leading axes (explicitly: rank promotion may be disabled)."""
  return y + _f32(b).reshape((1,) * (y.ndim - b.ndim) + tuple(b.shape))


class SmileFactors(NamedTuple):
  """One SMILE layer's experts, for a kernel ``W (in, out)`` and ``T`` tasks.

  Attributes:
    gate: ``(T, in, k_gate)``: the top ``k_gate`` input-space (right, in PyTorch layout) singular vectors of
      each task's weight difference; the router score of task ``t`` is ``||x @ gate[t]||``.
    down: ``(T, in, k)``: ``V_t^k S_t^k`` (the expert is ``x -> x @ down[t] @ up[t] + bias[t]``).
    up: ``(T, k, out)``: ``U_t^k`` transposed.
    bias: ``(T, out)``: bias differences ``b_t - b_0`` (zeros for a layer without bias).
  """

  gate: Float[Array, "T i g"]
  down: Float[Array, "T i k"]
  up: Float[Array, "T k o"]
  bias: Float[Array, "T o"]


def smile_factors(kernel: Float[Array, "i o"], expert_kernels: Float[Array, "T i o"],
                  bias: Float[Array, " o"] | None = None, expert_biases: Float[Array, "T o"] | None = None,
                  *, k: int | None, gate_k: int) -> SmileFactors:
  """SMILE's experts and gate of one linear layer from its pretrained and fine-tuned kernels.

  ``Delta_t = W_t - W_0`` (Flax layout ``(in, out)``) is decomposed ``Delta_t = V_t S_t U_t^T``: ``V_t`` spans
  the layer's input space. The expert keeps the top-``k`` triplets, the gate the top-``gate_k`` input vectors.

  Args:
    kernel: pretrained kernel ``(in, out)``.
    expert_kernels: fine-tuned kernels ``(T, in, out)``.
    bias, expert_biases: pretrained ``(out,)`` and fine-tuned ``(T, out)`` biases, or ``None``.
    k: expert rank (``None``: full rank ``min(in, out)``).
    gate_k: routing rank.

  Returns:
    :class:`SmileFactors`.

  Raises:
    ValueError: mismatched shapes or non-positive ranks.

  References:
    Tang et al., "SMILE", 2024. https://arxiv.org/abs/2408.10174
  """
  w0, wt = _f32(kernel), _f32(expert_kernels)
  if w0.ndim != 2 or wt.ndim != 3 or wt.shape[1:] != w0.shape:
    raise ValueError(f"SMILE: expert kernels {tuple(wt.shape)} do not match the kernel {tuple(w0.shape)} "
                     "(expected (T, in, out))")
  r = min(w0.shape)
  k = r if k is None else int(k)
  if k <= 0 or gate_k <= 0:
    raise ValueError(f"SMILE: k and gate_k must be positive, got k={k}, gate_k={gate_k}")
  k, gate_k = min(k, r), min(int(gate_k), r)
  v, s, ut = linalg.svd(wt - w0[None])  # (T, in, r), (T, r), (T, r, out)
  if bias is None:
    db = jnp.zeros((wt.shape[0], w0.shape[1]), jnp.float32)
  else:
    if expert_biases is None or tuple(jnp.shape(expert_biases)) != (wt.shape[0], w0.shape[1]):
      raise ValueError(f"SMILE: expert biases must be (T, out) = {(wt.shape[0], w0.shape[1])}")
    db = _f32(expert_biases) - _f32(bias)[None]
  return SmileFactors(gate=v[..., :gate_k], down=v[..., :k] * s[:, None, :k], up=ut[:, :k], bias=db)


def smile_routing(x: Float[Array, "*b i"], gate: Float[Array, "T i g"], top_k: int) -> Float[Array, "*b T"]:
  """SMILE's routing weights: ``p = softmax_t ||x @ gate[t]||``, top-``top_k`` kept and renormalized.

  With one task the weight is 1 (the reference's rule).

  Args:
    x: inputs ``[..., in]`` (one routing decision per row).
    gate: routing vectors ``(T, in, k_gate)`` (:attr:`SmileFactors.gate`).
    top_k: experts kept per row (clipped to ``T``).

  Returns:
    Routing weights ``[..., T]``: zero outside the ``top_k`` largest, the kept ones summing to 1.

  References:
    Tang et al., "SMILE", 2024. https://arxiv.org/abs/2408.10174
  """
  t = gate.shape[0]
  if t == 1:
    return jnp.ones((*x.shape[:-1], 1), jnp.float32)
  proj = jnp.einsum("...i,tig->...tg", _f32(x), _f32(gate), precision=HIGHEST)
  p = jax.nn.softmax(jnp.linalg.norm(proj, axis=-1), axis=-1)
  kk = min(int(top_k), t)
  vals, idx = jax.lax.top_k(p, kk)
  keep = jnp.sum(jax.nn.one_hot(idx, t, dtype=p.dtype), axis=-2) > 0
  lam = jnp.where(keep, p, 0.0)
  return lam / jnp.sum(vals, axis=-1, keepdims=True)


def smile_linear(x: Float[Array, "*b i"], kernel: Float[Array, "i o"], bias: Float[Array, " o"] | None,
                 factors: SmileFactors, top_k: int = 1) -> Float[Array, "*b o"]:
  """SMILE's sparse mixture of low-rank experts: ``y = x W_0 + b_0 + sum_t lambda_t(x) (x V_t S_t U_t^T + db_t)``.

  Routing is per token (per row of ``x``); every expert is computed and non-selected ones get weight 0 (no
  data-dependent control flow).

  Args:
    x: inputs ``[..., in]``.
    kernel, bias: the pretrained layer.
    factors: :func:`smile_factors`' output.
    top_k: experts per token.

  Returns:
    ``[..., out]``.

  References:
    Tang et al., "SMILE", 2024. https://arxiv.org/abs/2408.10174
  """
  x = _f32(x)
  y = jnp.matmul(x, _f32(kernel), precision=HIGHEST)
  if bias is not None:
    y = _add(y, bias)
  lam = smile_routing(x, factors.gate, top_k)
  h = jnp.einsum("...i,tik->...tk", x, factors.down, precision=HIGHEST)
  e = _add(jnp.einsum("...tk,tko->...to", h, factors.up, precision=HIGHEST), factors.bias)
  return y + jnp.einsum("...t,...to->...o", lam, e, precision=HIGHEST)


# ---------------------------------------------------------------------------------------------------- WEMoE


def init_router(key: jax.Array, width: int, num_tasks: int, *, hidden_layers: int = 2,
                init_lambda: float = 0.3) -> list[dict]:
  """WEMoE's router: ``hidden_layers`` ReLU layers of size ``width`` then a linear map to ``T`` logits.

  Kernels ``N(0, 0.01^2)``, hidden biases 0, output bias ``init_lambda`` (so the initial weights are close to
  task arithmetic with ``init_lambda``). ``hidden_layers=0`` is a constant (input-independent) weight vector.

  Args:
    key: PRNG key for the kernels.
    width: the router's input width (and hidden size).
    num_tasks: ``T``, the number of output logits.
    hidden_layers: number of ReLU layers, 0, 1 or 2 (the reference's depth is 2).
    init_lambda: the output bias, i.e. the initial task weight.

  Returns:
    A list of ``{"kernel": (in, out), "bias": (out,)}`` dicts (just ``[{"bias": (T,)}]`` for depth 0).

  References:
    Tang et al., "Merging Multi-Task Models via Weight-Ensembling Mixture of Experts", ICML 2024.
    https://arxiv.org/abs/2402.00433
  """
  if hidden_layers not in (0, 1, 2):
    raise ValueError(f"router hidden_layers must be 0, 1 or 2 (the reference's), got {hidden_layers}")
  if hidden_layers == 0:
    return [{"bias": jnp.full((num_tasks,), init_lambda, jnp.float32)}]
  keys = jax.random.split(key, hidden_layers)
  sizes = [width] * hidden_layers + [num_tasks]
  layers = []
  for i in range(hidden_layers):
    last = i == hidden_layers - 1
    b = jnp.full((sizes[i + 1],), init_lambda if last else 0.0, jnp.float32)
    layers.append({"kernel": 0.01 * jax.random.normal(keys[i], (sizes[i], sizes[i + 1]), jnp.float32), "bias": b})
  return layers


def router_logits(router: list[dict], h: Float[Array, "*b w"]) -> Float[Array, "*b T"]:
  """Applies a router from :func:`init_router` (ReLU between layers; depth 0 ignores ``h``).

  Args:
    router: the layer list of :func:`init_router`.
    h: inputs ``[..., width]``.

  Returns:
    Task logits ``[..., T]`` (the depth-0 bias broadcast over ``h``'s leading axes).

  References:
    Tang et al., "WEMoE", ICML 2024. https://arxiv.org/abs/2402.00433
  """
  if "kernel" not in router[0]:
    return jnp.broadcast_to(_f32(router[0]["bias"]), (*h.shape[:-1], router[0]["bias"].shape[0]))
  z = _f32(h)
  for i, layer in enumerate(router):
    z = _add(jnp.matmul(z, _f32(layer["kernel"]), precision=HIGHEST), layer["bias"])
    if i < len(router) - 1:
      z = jax.nn.relu(z)
  return z


def wemoe_gate(router: list[dict], h: Float[Array, "B N w"], batch_reduce: bool) -> Float[Array, "B T"]:
  """Per-sample task weights of a WEMoE layer: router logits averaged over tokens (and over the batch with
  ``batch_reduce``, then broadcast back to ``B`` rows).

  Args:
    router: the layer list of :func:`init_router`.
    h: token features ``(B, N, width)``.
    batch_reduce: average the weights over the batch as well.

  Returns:
    Task weights ``(B, T)``.

  References:
    Tang et al., "WEMoE", ICML 2024. https://arxiv.org/abs/2402.00433
  """
  w = jnp.mean(router_logits(router, h), axis=1)
  if batch_reduce:
    w = jnp.broadcast_to(jnp.mean(w, axis=0, keepdims=True), w.shape)
  return w


def wemoe_mlp(h: Float[Array, "B N w"], base: dict, deltas: dict, weights: Float[Array, "B T"],
              act) -> Float[Array, "B N w"]:
  """The weight-ensembled MLP: each sample ``b`` runs ``fc2(act(fc1(h_b)))`` with the parameters
  ``theta_0 + sum_t weights[b, t] tau_t`` (materialized per sample, exactly as the reference merges them).

  Args:
    h: the MLP input (after the block's second layer norm).
    base: pretrained ``{"fc1": {"kernel", "bias"}, "fc2": {...}}``.
    deltas: the same tree with a leading task axis (task vectors).
    weights: per-sample task weights from :func:`wemoe_gate`.
    act: the activation function.

  Returns:
    The MLP output ``(B, N, width)``.

  References:
    Tang et al., "WEMoE", ICML 2024. https://arxiv.org/abs/2402.00433
  """
  def merged(name, leaf):
    return _f32(base[name][leaf])[None] + jnp.einsum("bt,t...->b...", weights, _f32(deltas[name][leaf]),
                                                     precision=HIGHEST)

  z = jnp.einsum("bni,bio->bno", _f32(h), merged("fc1", "kernel"), precision=HIGHEST) + merged("fc1", "bias")[:, None]
  z = act(z)
  return jnp.einsum("bni,bio->bno", z, merged("fc2", "kernel"), precision=HIGHEST) + merged("fc2", "bias")[:, None]


# ----------------------------------------------------------------------------------------------------- FREE


def high_pass(x: Float[Array, "m n"], cutoff: float) -> Float[Array, "m n"]:
  """FREE-Merging's frequency filter: ``real(F^-1(H * F(x)))`` with ``H = 1[sqrt(eta^2 + gamma^2) >= cutoff]``
  on the centered (``fftshift``) 2-D frequency grid. ``cutoff = 0`` passes everything. Symmetric under
  transposition of ``x`` (the result is transposed with it), so the matrix layout does not matter.

  Args:
    x: a matrix ``(m, n)``.
    cutoff: radius (in frequency-grid units) below which frequencies are removed.

  Returns:
    The filtered matrix ``(m, n)``, float32.

  References:
    Zheng and Wang, "FREE-Merging: Fourier Transform for Efficient Model Merging", 2024.
    https://arxiv.org/abs/2411.16815
  """
  x = _f32(x)
  m, n = x.shape
  eta = jnp.arange(m, dtype=jnp.float32) - m // 2
  gamma = jnp.arange(n, dtype=jnp.float32) - n // 2
  keep = jnp.sqrt(eta[:, None] ** 2 + gamma[None, :] ** 2) >= cutoff
  f = jnp.fft.fftshift(jnp.fft.fft2(x))
  return jnp.real(jnp.fft.ifft2(jnp.fft.ifftshift(jnp.where(keep, f, 0)))).astype(jnp.float32)
