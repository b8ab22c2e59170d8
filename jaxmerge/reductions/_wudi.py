"""WUDI merging: data-free interference minimization, layer by layer, with Adam.

The rows of a linear layer's task matrix approximately span that task's inputs, so the interference of a merged
update ``tau_M`` on task ``t`` is measured on ``tau_t``'s own rows:
``L(tau_M) = sum_t ||(tau_M - tau_t) tau_t^T||_F^2 / ||tau_t||_F^2`` (canonical ``(out, in)`` view: input-space
Grams, so the layout matters). Starting from ``sum_t tau_t``, a fixed number of Adam steps is taken.

The gradient ``2 sum_t (tau_M - tau_t) G_t`` with ``G_t = tau_t^T tau_t / ||tau_t||^2`` equals
``2 ((tau_M - S) G + E)`` with ``S = sum_t tau_t`` (the start), ``G = sum_t G_t`` and ``E = sum_t (S - tau_t) G_t``
(the gradient at the start, exactly zero for orthogonal row spaces), both computed once: each step is then one
``(out x in) @ (in x in)`` product instead of ``2T`` products (the per-task form is used when it is cheaper,
i.e. when ``in > 2 T out``). optax is imported when a WUDI transform is built, so ``import jaxmerge`` stays light.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxmerge import linalg
from jaxmerge.base import REDUCE, MergeTransform
from jaxmerge.reductions._matrix import matrix_transform
from jaxmerge.tree import task_sum
from jaxmerge.typing import Filter

__all__ = ["wudi_loss", "wudi_matrix", "wudi_merge"]


def wudi_loss(merged: Float[Array, "m n"], x: Float[Array, "T m n"]) -> jax.Array:
  """``sum_t ||(tau_M - tau_t) tau_t^T||_F^2 / ||tau_t||_F^2`` (zero task matrices are skipped).

  Args:
    merged: the merged update ``tau_M``, ``(m, n)``.
    x: the task matrices ``tau_t``, ``(T, m, n)``.

  Returns:
    The loss, a scalar.

  References:
    Cheng et al., "Whoever Started the Interference Should End It: Guiding Data-Free Model Merging via Task
    Vectors", ICML 2025. https://arxiv.org/abs/2503.08099
  """
  norms = jnp.sum(jnp.square(x), axis=(1, 2))
  w = jnp.where(norms > 0, 1.0 / jnp.where(norms > 0, norms, 1.0), 0.0)
  prod = jnp.einsum("tmn,tkn->tmk", merged[None] - x, x, precision=linalg.HIGHEST)
  return jnp.sum(w * jnp.sum(jnp.square(prod), axis=(1, 2)))


def wudi_matrix(x: Float[Array, "T m n"], optimizer, steps: int) -> Float[Array, "m n"]:
  """WUDI for one matrix: ``steps`` optimizer updates from ``sum_t tau_t`` (an optax ``GradientTransformation``).

  Args:
    x: the task matrices ``tau_t``, ``(T, m, n)``.
    optimizer: an optax ``GradientTransformation`` (Adam in :func:`wudi_merge`).
    steps: number of updates (a ``fori_loop``; 0 returns ``sum_t tau_t``).

  Returns:
    The merged ``(m, n)`` matrix after ``steps`` updates minimizing :func:`wudi_loss`.

  References:
    Cheng et al., "Whoever Started the Interference Should End It: Guiding Data-Free Model Merging via Task
    Vectors", ICML 2025. https://arxiv.org/abs/2503.08099
  """
  t, m, n = x.shape
  norms = jnp.sum(jnp.square(x), axis=(1, 2))
  w = jnp.where(norms > 0, 1.0 / jnp.where(norms > 0, norms, 1.0), 0.0)
  hi = linalg.HIGHEST
  start = task_sum(x)
  if n <= 2 * t * m:
    g = jnp.einsum("t,tmn,tmk->nk", w, x, x, precision=hi)  # sum_t w_t tau_t^T tau_t
    # The gradient at the start, sum_t w_t (S - tau_t) tau_t^T tau_t, in the per-task form, so that it is exactly
    # zero when the row spaces are orthogonal (Adam would turn rounding-level gradients into lr-sized steps).
    prod0 = jnp.einsum("tmn,tkn->tmk", start[None] - x, x, precision=hi)
    e = jnp.einsum("t,tmk,tkn->mn", w, prod0, x, precision=hi)

    def grad(mat):
      return 2.0 * (linalg.matmul(mat - start, g) + e)
  else:

    def grad(mat):
      prod = jnp.einsum("tmn,tkn->tmk", mat[None] - x, x, precision=hi)
      return 2.0 * jnp.einsum("t,tmk,tkn->mn", w, prod, x, precision=hi)


  def body(_, carry):
    mat, state = carry
    updates, state = optimizer.update(grad(mat), state, mat)
    return mat + updates, state

  mat, _ = jax.lax.fori_loop(0, steps, body, (start, optimizer.init(start)))
  return mat


def wudi_merge(
    steps: int = 300,
    learning_rate: float = 1e-5,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    fallback: str = "mean",
    where: Filter | None = None,
    batch_size: int | None = 0,
) -> MergeTransform:
  """``(T, ...) -> (...)``: WUDI on matrix leaves (Adam, no weight decay, no global scale).

  Args:
    steps: Adam iterations per matrix (paper and FusionBench's function default 300; FusionBench's config 400).
    learning_rate: Adam step size (1e-5).
    b1, b2, eps: Adam's moments and epsilon (PyTorch's defaults, as in the reference).
    fallback: vector leaves (``"mean"``, the reference's).
    where: restricts the matrix leaves.
    batch_size: matrices processed together (:func:`jaxmerge.linalg.map_matrices`).

  Returns:
    A :class:`~jaxmerge.base.MergeTransform` (a reduction, ``(T, ...) -> (...)``).

  References:
    Cheng et al., "Whoever Started the Interference Should End It: Guiding Data-Free Model Merging via Task
    Vectors", ICML 2025. https://arxiv.org/abs/2503.08099
  """
  import optax  # noqa: PLC0415 (kept out of `import jaxmerge`)

  if steps < 0:
    raise ValueError(f"steps must be >= 0, got {steps}")
  optimizer = optax.adam(learning_rate, b1=b1, b2=b2, eps=eps)

  def kernel(coeffs, x):
    del coeffs
    return wudi_matrix(x, optimizer, steps)

  return matrix_transform(kernel, kind=REDUCE, fallback=fallback, where=where, batch_size=batch_size)
