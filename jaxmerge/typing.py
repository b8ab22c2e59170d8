"""Type vocabulary shared by every jaxmerge module.

A *model* is any pytree of arrays (a nested dict from a Flax model, or a flat ``{name: array}`` dict read
from a safetensors file). A *stack* is the same structure with a leading task axis ``T`` on every leaf.
There is deliberately no ``TaskVector`` class: stacks are plain pytrees, so every JAX transformation applies.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
from jaxtyping import Array, Float, PyTree

Params = PyTree[Array]
"""One model: a pytree of arrays."""

Stacked = PyTree[Float[Array, "T ..."]]
"""Same structure as :data:`Params`, each leaf with a leading task axis ``T``."""

Coeffs = PyTree[Array]
"""Tunable knobs of a transform (scales, logits, ...): traced, differentiable, sweepable."""

PRNGKey = jax.Array
"""A typed key from :func:`jax.random.key`."""

Path = str
"""A leaf's path: dict keys and sequence indices joined by ``/`` (flat dict keys are kept as they are)."""

Filter = Callable[[Path, jax.ShapeDtypeStruct], bool]
"""A static predicate on a leaf's path and its *per-task* shape and dtype."""

__all__ = ["Array", "Coeffs", "Filter", "Float", "Params", "Path", "PRNGKey", "PyTree", "Stacked", "Any"]
