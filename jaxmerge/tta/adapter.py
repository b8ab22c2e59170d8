"""The trainable/frozen split of a test-time adaptation: an ``Adapter`` (optax's ``GradientTransformation``
shape, for models).

An adaptation trains a small pytree ``theta`` (merge coefficients, mask logits, adapted task vectors) while a
possibly large ``frozen`` pytree (pretrained weights, the task-vector stack, heads) stays fixed. ``frozen`` is
always an *argument* of the compiled step (see :func:`jaxmerge.tta.fit`), never a closed-over constant.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

__all__ = ["Adapter"]


class Adapter(NamedTuple):
  """A pair of pure functions over ``(theta, frozen)``.

  Attributes:
    init: ``init(key, frozen) -> theta``: the initial trainable pytree.
    apply: ``apply(theta, frozen, batch, *, key) -> out``: what the loss consumes (typically logits, or a
      tuple of the quantities a composite loss needs). Must be jit-compatible and differentiable in ``theta``.
  """

  init: Callable[[Any, Any], Any]
  apply: Callable[..., Any]
