"""One-matrix linear-algebra kernels (written for one matrix, lifted with ``vmap``)."""

from __future__ import annotations

from typing import NamedTuple

import jax

__all__ = ["Factors"]


class Factors(NamedTuple):
  """A decomposed leaf: ``u (..., m, k)``, ``s (..., k)``, ``vt (..., k, n)`` with ``x = u diag(s) vt``."""

  u: jax.Array
  s: jax.Array
  vt: jax.Array
