"""The planner: which backend runs a merge (:func:`plan`), or checks a forced one (:func:`forced`).

A step says what it computes (its identity, its kind); the planner asks the backends, fastest first, which can
prove it runs the merge exactly: ``native`` (the C kernels, :mod:`jaxmerge.engine.native`, recognized from the
steps' identities however the chain is nested), ``leaf`` (leafwise by-shape steps, one program per leaf shape),
``leaf_then_flat`` (a leafwise prefix, then flat steps), ``flat`` (one ``(T, N)`` program) and ``xla_whole`` (the
whole-model program: slower, never wrong). Inputs sharded over a device mesh take the ``mesh`` placement
(:mod:`jaxmerge.engine.mesh`).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import numpy as np

from jaxmerge.base import MergeTransform, identity_of, steps_of
from jaxmerge.combine import chain
from jaxmerge.engine import native
from jaxmerge.engine.host import host_backed
from jaxmerge.engine.mesh import mesh_of
from jaxmerge.engine.xla import runs_by_leaf, runs_flat

__all__ = ["BACKENDS", "forced", "leaf_then_flat", "plan"]


BACKENDS = ("native", "leaf", "leaf_then_flat", "flat", "xla_whole", "mesh")


def _flat_dtype(pre: dict, ft: Any) -> Any:
  """The one float dtype of every leaf (pretrained and fine-tuned), or ``None`` when they differ."""
  dtypes = {x.dtype for x in pre.values()}
  models = ft if isinstance(ft, tuple) else (ft,)
  dtypes |= {x.dtype for m in models for x in m.values()}
  return dtypes.pop() if len(dtypes) == 1 else None


def _flat_ok(tx: MergeTransform, coeffs: Any, pre: dict, ft: Any) -> bool:
  return runs_flat(tx) and coeffs is None and len(pre) > 1 and _flat_dtype(pre, ft) is not None


@functools.lru_cache(maxsize=128)
def leaf_then_flat(tx: MergeTransform) -> tuple[MergeTransform, MergeTransform] | None:
  """``(prefix, rest)`` for a chain whose first steps are leafwise, by-shape and task-preserving (DARE's drop)
  and whose other steps are ``flat`` and need no key (global TIES, a scale): the prefix then runs leaf by leaf,
  one program per leaf shape, and the rest on the ``(T, N)`` view, instead of one whole-model program whose
  compilation grows with the number of leaves (71 s for DARE on TIES over a ViT-B/32 at 4 tasks).

  Args:
    tx: the merge step (a chain, for a split to exist).

  Returns:
    ``(prefix, rest)``, two chains that keep the original chain's keys, or ``None`` when ``tx`` is not such a
    chain.
  """
  ident = identity_of(tx)
  if ident is None or ident[0] != "chain" or runs_by_leaf(tx) or runs_flat(tx):  # leaf by leaf, or wholly flat
    return None
  steps = steps_of(tx)
  k = 0
  while k < len(steps) and not runs_flat(steps[k]) and runs_by_leaf(steps[k]) and not steps[k].reduces:
    k += 1
  rest = steps[k:]
  if k == 0 or not rest or not all(runs_flat(s) and not s.needs_key for s in rest):
    return None
  # The prefix keeps the chain's keys: step i of a chain gets fold_in(key, i), in the sub-chain too.
  return chain(*steps[:k]), chain(*rest)


def _native_spec(tx: MergeTransform, pre: dict, ft: Any, key: Any) -> Any:
  """The native kernels' spec for this merge (:func:`jaxmerge.engine.native.spec`), or ``None`` when the transform, the
  leaves (all float32 or all bfloat16, each on one CPU device or in NumPy) or the machine (no C compiler,
  ``JAXMERGE_NATIVE=0``) do not allow it."""
  sp = native.spec(tx)
  if sp is None or not pre or (sp.drop is not None and key is None):
    return None
  paths = tuple(pre)
  stacked = not isinstance(ft, tuple)
  models = (ft,) if stacked else ft
  leaves = [*pre.values(), *(m[p] for m in models for p in paths)]
  dtypes = {np.dtype(x.dtype) for x in leaves}
  if len(dtypes) != 1 or dtypes.pop() not in native.DTYPES or not host_backed(leaves):
    return None
  if any(isinstance(x, jax.Array) and len(x.devices()) != 1 for x in leaves):  # sharded: the XLA programs
    return None
  tasks = int(ft[paths[0]].shape[0]) if stacked else len(ft)
  sizes = [int(np.size(pre[p])) for p in paths]
  if not native.fits(tasks, sum(sizes), sp, sizes) or not native.available():
    return None
  return sp


def plan(tx: MergeTransform, per_task: bool, pre: dict, ft: Any, coeffs: Any, key: Any) -> tuple[str, Any]:
  """The planner: ``(backend, detail)`` for this merge, the fastest backend that can prove it runs it exactly.

  ``"mesh"`` (inputs sharded over a device mesh, detail: the mesh); ``"native"`` (global TIES, task arithmetic,
  simple averaging and DARE on them, recognized by their steps' identities, :func:`jaxmerge.engine.native.spec`, as one
  call of the CPU kernels; detail: the spec); ``"leaf"`` (steps in :data:`jaxmerge.engine.xla.BY_LEAF` leaf by
  leaf, one compiled program per leaf shape); ``"leaf_then_flat"`` (a by-leaf prefix, then steps in
  :data:`jaxmerge.engine.xla.FLAT` on the ``(T, N)`` view; detail: ``(prefix, rest)``); ``"flat"`` (steps in
  :data:`~jaxmerge.engine.xla.FLAT` on one ``(T, N)`` view);
  ``"xla_whole"`` (everything else: the whole-model program, slower, never wrong).

  Args:
    tx: the merge step.
    per_task: one merged model per task (``True``) or one model (``False``).
    pre: ``{path: leaf}`` of the pretrained model.
    ft: the fine-tuned models: a tuple of ``{path: leaf}`` dicts, or one ``{path: (T, ...)}`` stack.
    coeffs: the step's coefficients, or ``None`` for ``tx.init``'s.
    key: the PRNG key (or ``None``).

  Returns:
    ``(backend, detail)``: one of :data:`BACKENDS` and what that backend needs (see above; ``None`` if nothing).
  """
  models = ft if isinstance(ft, tuple) else (ft,)
  mesh = mesh_of([*pre.values(), *(x for m in models for x in m.values())])
  if mesh is not None:
    return "mesh", mesh
  sp = _native_spec(tx, pre, ft, key) if coeffs is None and not per_task else None
  if sp is not None:
    return "native", sp
  if runs_by_leaf(tx) and coeffs is None and len(pre) > 1:
    return "leaf", None
  split = leaf_then_flat(tx) if coeffs is None and len(pre) > 1 and isinstance(ft, tuple) else None
  if split is not None and _flat_dtype(pre, ft) is not None:
    return "leaf_then_flat", split
  if _flat_ok(tx, coeffs, pre, ft):
    return "flat", None
  return "xla_whole", None


def forced(backend: str, tx: MergeTransform, per_task: bool, pre: dict, ft: Any, coeffs: Any,
            key: Any) -> tuple[str, Any]:
  """``(backend, detail)`` for a backend the caller names (tests, benchmarks, users who want one).

  Args:
    backend: one of :data:`BACKENDS`.
    tx, per_task, pre, ft, coeffs, key: as in :func:`plan`.

  Returns:
    ``(backend, detail)`` as :func:`plan` returns it.

  Raises:
    ValueError: ``backend`` is unknown, or cannot run this merge exactly.
  """
  if backend not in BACKENDS:
    raise ValueError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)} (or None: the planner's choice)")
  if backend == "xla_whole":
    return backend, None
  auto = plan(tx, per_task, pre, ft, coeffs, key)
  if auto[0] == backend:
    return auto
  ok = {"leaf": lambda: runs_by_leaf(tx) and coeffs is None and auto[0] != "mesh",
        "flat": lambda: _flat_ok(tx, coeffs, pre, ft) and auto[0] != "mesh"}
  if backend in ok and ok[backend]():
    return backend, None
  if backend == "leaf_then_flat" and auto[0] != "mesh" and coeffs is None and isinstance(ft, tuple):
    split = leaf_then_flat(tx)
    if split is not None and _flat_dtype(pre, ft) is not None:
      return backend, split
  raise ValueError(f"backend {backend!r} cannot run this merge (the planner chose {auto[0]!r}): see "
                   "jaxmerge.merge.route for what each backend accepts")
