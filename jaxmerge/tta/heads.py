"""Frozen linear task heads and the parameter plumbing shared by the adaptations (AdaMerging, RI).

The model interface is generic: ``forward_fn(params, images) -> features [B, D]`` and one head ``[C_t, D]``
per task, with ``logits = features @ head.T``. On the offline suite (:mod:`jaxmerge.bench.suite`) use
``forward_fn=suite.embed`` (normalized CLIP image embeddings) and ``heads=[suite.heads[t] for t in
suite.tasks]`` (zero-shot heads with the logit scale folded in): this is exactly ``suite.logits``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float

from jaxmerge import tree as jtree
from jaxmerge.engine.merge import prepare

__all__ = ["Structure", "assemble", "head_logits", "pad_heads", "split_params", "stack_models", "structure_of"]


def pad_heads(heads: Sequence[Any] | Mapping[str, Any]) -> tuple[Float[Array, "T C D"], Bool[Array, "T C"]]:
  """Stacks ``T`` heads ``[C_t, D]`` into float32 ``[T, C_max, D]`` (zero rows) and a real-class mask.

  Args:
    heads: ``T`` head arrays ``[C_t, D]``, as a sequence or a mapping (its values, in order).

  Returns:
    ``(stacked, mask)``: float32 ``[T, C_max, D]`` heads padded with zero rows and a bool ``[T, C_max]`` mask
    that is ``True`` on the real classes.

  Raises:
    ValueError: no heads, a head that is not 2-D, or heads with different feature sizes ``D``.
  """
  hs = list(heads.values()) if isinstance(heads, Mapping) else list(heads)
  if not hs:
    raise ValueError("no task heads given")
  shapes = [tuple(np.shape(h)) for h in hs]
  if any(len(s) != 2 for s in shapes) or len({s[1] for s in shapes}) != 1:
    raise ValueError(f"heads must be [C_t, D] arrays with one feature size D, got shapes {shapes}")
  c_max, d = max(s[0] for s in shapes), shapes[0][1]
  stacked = np.zeros((len(hs), c_max, d), np.float32)
  mask = np.zeros((len(hs), c_max), bool)
  for i, h in enumerate(hs):
    stacked[i, : shapes[i][0]] = np.asarray(jax.device_get(h), np.float32)
    mask[i, : shapes[i][0]] = True
  return jnp.asarray(stacked), jnp.asarray(mask)


def head_logits(features: Float[Array, "*b D"], head: Float[Array, "C D"]) -> Float[Array, "*b C"]:
  """``features @ head.T`` in float32 (highest matmul precision).

  Args:
    features: features ``[..., D]``.
    head: one task head ``[C, D]``.

  Returns:
    float32 logits ``[..., C]``.
  """
  return jnp.einsum("...d,cd->...c", features.astype(jnp.float32), head.astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST)


def split_params(pretrained: Any, finetuned: Any, *, names: Sequence[str] | None = None) -> tuple[dict, dict, dict]:
  """Validates the models and returns ``(pre32, tau32, passthrough)`` as flat ``{path: array}`` dicts.

  ``tau32`` holds the stacked float32 task vectors ``[T, ...]`` of every floating leaf; ``passthrough`` the
  non-floating pretrained leaves (copied, never adapted).

  Args:
    pretrained: the pretrained parameter tree.
    finetuned: a list of ``T`` fine-tuned trees, or one stacked tree (leading task axis).
    names: model names used in error messages.

  Returns:
    ``(pre32, tau32, passthrough)``: the float32 pretrained leaves, the float32 task vectors ``[T, ...]`` and
    the non-floating pretrained leaves, each a flat ``{path: array}`` dict.
  """
  pre, ft, passthrough = prepare(pretrained, finetuned, names=names)
  pre32, tau = _task_vectors(pre, ft)
  return pre32, tau, passthrough


@jax.jit
def _task_vectors(pre: dict, ft: Any) -> tuple[dict, dict]:
  pre32 = {p: x.astype(jnp.float32) for p, x in pre.items()}
  if isinstance(ft, tuple):
    tau = {p: jnp.stack([m[p].astype(jnp.float32) for m in ft]) - pre32[p][None] for p in pre}
  else:
    tau = {p: ft[p].astype(jnp.float32) - pre32[p][None] for p in pre}
  return pre32, tau


@jax.jit
def stack_models(ft: tuple) -> dict:
  """Stacks a tuple of flat ``{path: array}`` dicts into one dict of ``[T, ...]`` arrays (dtypes kept).

  Args:
    ft: a tuple of ``T`` flat dicts with the same paths (those of the first are used).

  Returns:
    ``{path: [T, ...] array}``.
  """
  return {p: jnp.stack([m[p] for m in ft]) for p in ft[0]}


class Structure(NamedTuple):
  """A hashable description of a parameter tree (its treedef and leaf paths), so that adapters built for the
  same model structure are cached and their steps compiled once."""

  treedef: Any
  paths: tuple[str, ...]


def structure_of(tree: Any) -> Structure:
  """The :class:`Structure` of ``tree`` (a ``Structure`` is returned unchanged).

  Args:
    tree: a parameter pytree, or a :class:`Structure`.

  Returns:
    The :class:`Structure` (treedef and leaf paths).
  """
  if isinstance(tree, Structure):
    return tree
  return Structure(jax.tree.structure(tree), tuple(jtree.paths(tree)))


def assemble(like: Any, flat: Mapping[str, Any], passthrough: Mapping[str, Any]) -> Any:
  """Rebuilds a full parameter pytree with ``like``'s structure (a pytree or a :class:`Structure`) from float
  leaves and passthrough leaves.

  Args:
    like: the target pytree or its :class:`Structure`.
    flat: ``{path: array}`` float leaves.
    passthrough: ``{path: array}`` remaining leaves; together with ``flat`` they must cover every path.

  Returns:
    A pytree with ``like``'s structure.
  """
  st = structure_of(like)
  merged = {**flat, **passthrough}
  return jax.tree.unflatten(st.treedef, [merged[p] for p in st.paths])


def task_batches(batches: Any, num_tasks: int):
  """Iterates stacked ``[T, B, ...]`` batches from either such an iterable or ``T`` per-task iterables."""
  if isinstance(batches, (list, tuple)) and len(batches) == num_tasks and not hasattr(batches[0], "shape"):
    for group in zip(*batches):
      yield np.stack([np.asarray(g) for g in group])
    return
  yield from batches
