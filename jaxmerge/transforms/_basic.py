"""Scaling steps and the identity."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxmerge.base import ANY, TASK, EmptyCoeffs, MergeTransform, identified

__all__ = ["ScaleCoeffs", "ScaleTasksCoeffs", "identity", "scale", "scale_tasks"]


class ScaleCoeffs(NamedTuple):
  scale: jax.Array


class ScaleTasksCoeffs(NamedTuple):
  scales: jax.Array | dict


def _empty(tree):
  del tree
  return EmptyCoeffs()


def identity() -> MergeTransform:
  """Leaves every leaf as it is (either arity).

  Returns:
    A :class:`~jaxmerge.base.MergeTransform` (either arity).
  """

  def apply(coeffs, tree, *, key=None, ctx=None):
    del coeffs, key, ctx
    return tree

  return identified(_empty, apply, ANY, "identity")


def scale(value: float = 1.0) -> MergeTransform:
  """Multiplies every leaf by a global factor (the survey's lambda or alpha); works on stacks and trees.

  The factor is a coefficient (``ScaleCoeffs.scale``), so a sweep over it compiles once.

  Args:
    value: the initial factor.

  Returns:
    A :class:`~jaxmerge.base.MergeTransform` of either arity with coefficients :class:`ScaleCoeffs`.

  References:
    Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023. https://arxiv.org/abs/2212.04089
  """

  def init(tree):
    del tree
    return ScaleCoeffs(jnp.asarray(value, jnp.float32))

  def apply(coeffs, tree, *, key=None, ctx=None):
    del key, ctx
    return jax.tree.map(lambda x: x * coeffs.scale.astype(x.dtype), tree)

  return identified(init, apply, ANY, "scale", float(value))


def scale_tasks(values: float | Sequence[float] = 1.0, *, per_leaf: bool = False) -> MergeTransform:
  """``(T, ...) -> (T, ...)``: multiplies task ``t`` by ``lambda_t`` (task-wise), or by ``lambda_t^(l)``
  for each leaf ``l`` (layer-wise, AdaMerging's table).

  Args:
    values: one float for every task, or a sequence of ``T`` floats.
    per_leaf: give every leaf its own ``(T,)`` coefficients (initialized from ``values``).

  Returns:
    A task-preserving :class:`~jaxmerge.base.MergeTransform` with coefficients :class:`ScaleTasksCoeffs`.

  References:
    Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023. https://arxiv.org/abs/2212.04089
    Yang et al., "AdaMerging: Adaptive Model Merging for Multi-Task Learning", ICLR 2024.
    https://arxiv.org/abs/2310.02575
    (task-wise and layer-wise coefficients).
  """

  def init(tree):
    leaves = jax.tree.leaves(tree)
    t = leaves[0].shape[0] if leaves else 1
    base = jnp.broadcast_to(jnp.asarray(values, jnp.float32), (t,))
    if per_leaf:
      return ScaleTasksCoeffs(jax.tree.map(lambda x: base, tree))
    return ScaleTasksCoeffs(base)

  def apply(coeffs, tree, *, key=None, ctx=None):
    del key, ctx

    def mul(x, lam):
      return x * lam.astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))

    if isinstance(coeffs.scales, jax.Array) or hasattr(coeffs.scales, "shape"):
      return jax.tree.map(lambda x: mul(x, coeffs.scales), tree)
    return jax.tree.map(mul, tree, coeffs.scales)

  return identified(init, apply, TASK, "scale_tasks", values, per_leaf)
