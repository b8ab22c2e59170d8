"""The sharded placement: merges of inputs sharded over a device mesh.

Inputs on a mesh run under that mesh with automatic axis types (:func:`auto_axes`: the same buffers, retyped,
:func:`on_mesh`), so task-axis reductions become collectives that XLA places; results come back on the inputs'
mesh. :func:`run_on_mesh` serves ``jm.merge``; :func:`by_leaf` serves :func:`jaxmerge.sharding.merge_sharded`
(leafwise methods one leaf program at a time, global TIES in exact histogram passes leaf by leaf).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding

from jaxmerge import stats
from jaxmerge import tree as jtree
from jaxmerge.base import MergeContext, MergeTransform
from jaxmerge.engine import native
from jaxmerge.engine.host import trim_heap
from jaxmerge.engine.xla import (
  leaf_program,
  nonfinite_flags,
  raise_nonfinite,
  runs_by_leaf,
  whole_program,
)
from jaxmerge.reductions import disjoint_rows, elect

__all__ = ["auto_axes", "by_leaf", "mesh_of", "on_mesh", "run_on_mesh"]

Layout = Callable[[str, jax.ShapeDtypeStruct], Any]


def auto_axes(m: Mesh) -> Mesh:
  """``m`` with every axis of type ``Auto`` (``m`` itself when they already are).

  Merges run on meshes with automatic axes: XLA then places the collectives that slicing or reducing the task
  axis needs. With explicit axes (``jax.make_mesh``'s default), such operations raise ``ShardingTypeError``
  unless every step spells out its output shardings, which method code does not.

  Args:
    m: a mesh.

  Returns:
    A mesh with ``m``'s devices and axis names and automatic axis types.
  """
  types = tuple(getattr(m, "axis_types", ()) or ())
  if all(t == AxisType.Auto for t in types):
    return m
  return Mesh(m.devices, m.axis_names, axis_types=(AxisType.Auto,) * len(m.axis_names))


def mesh_of(leaves: Sequence[Any]) -> Mesh | None:
  """The mesh of the first leaf sharded over several devices with a ``NamedSharding``, or ``None``.

  Args:
    leaves: arrays (JAX, NumPy, ...).

  Returns:
    A ``Mesh`` or ``None``.
  """
  for x in leaves:
    s = getattr(x, "sharding", None)
    if isinstance(x, jax.Array) and isinstance(s, NamedSharding) and len(s.device_set) > 1:
      return s.mesh
  return None


def on_mesh(x: Any, m: Mesh) -> Any:
  """``x`` with its ``NamedSharding``'s mesh replaced by ``m`` (same devices and names, other axis types; the
  data does not move), or ``x`` unchanged when it is not a ``jax.Array`` with a ``NamedSharding`` of ``m``'s
  devices.

  Args:
    x: an array.
    m: the mesh to retype ``x`` onto.

  Returns:
    The array on ``m``.
  """
  s = getattr(x, "sharding", None)
  if not isinstance(x, jax.Array) or not isinstance(s, NamedSharding) or s.mesh == m:
    return x
  if s.mesh.axis_names != m.axis_names or s.mesh.devices.shape != m.devices.shape or \
     not (s.mesh.devices == m.devices).all():
    return x
  target = NamedSharding(m, s.spec)
  if x.is_fully_addressable:  # the same device buffers under the new sharding
    return jax.make_array_from_single_device_arrays(x.shape, target, [a.data for a in x.addressable_shards])
  return jax.device_put(x, target)


@functools.lru_cache(maxsize=64)
def _leaf_program(tx: MergeTransform, layout: Layout, per_task: bool, out: NamedSharding | None,
                  donate: bool) -> Callable[..., Any]:
  """One leaf's merge on the mesh for a by-leaf transform: ``(pre, stacked, key, leaf_id) -> leaf``
  with the leaf's declared output sharding (``None``: XLA's choice); with ``donate`` the pretrained leaf is
  donated (its buffer may become the output's)."""
  def run(pre, ft, key, pid):
    with jtree.traced_leaf_ids({"leaf": pid}):
      pre32 = pre.astype(jnp.float32)
      tree = {"leaf": ft.astype(jnp.float32) - pre32[None]}
      y = tx.apply(tx.init(tree), tree, key=key, ctx=MergeContext(pretrained={"leaf": pre32}, layout=layout))["leaf"]
      return ((pre32[None] if per_task else pre32) + y).astype(pre.dtype)

  return jax.jit(run, out_shardings=out, donate_argnums=(0,) if donate and not per_task else ())


def _ties_rows(pre: jax.Array, ft: jax.Array, thr: jax.Array | None) -> tuple[jax.Array, jax.Array]:
  pre32 = pre.astype(jnp.float32)
  d = ft.astype(jnp.float32) - pre32[None]
  if thr is not None:
    d = jnp.where(jnp.abs(d) >= thr.reshape((-1,) + (1,) * (d.ndim - 1)), d, 0)
  return pre32, d


@jax.jit
def _high_hist(pre: jax.Array, ft: jax.Array) -> jax.Array:
  return stats.high_histogram(jnp.abs(_ties_rows(pre, ft, None)[1]))


@jax.jit
def _low_hist(pre: jax.Array, ft: jax.Array, hi: jax.Array) -> jax.Array:
  return stats.low_histogram(jnp.abs(_ties_rows(pre, ft, None)[1]), hi)


@functools.partial(jax.jit, static_argnums=(3,))
def _sign_count(pre: jax.Array, ft: jax.Array, thr: jax.Array, trim: bool) -> jax.Array:
  return jnp.sum(jnp.sign(jnp.sum(_ties_rows(pre, ft, thr if trim else None)[1], axis=0)).astype(jnp.int32))


@functools.lru_cache(maxsize=64)
def _ties_leaf(merge_func: str, zero_sign: str, trim: bool, out: NamedSharding | None,
               donate: bool) -> Callable[..., Any]:
  def run(pre, ft, thr, majority, scale):
    pre32, d = _ties_rows(pre, ft, thr if trim else None)
    s = elect(jnp.sum(d, axis=0), zero_sign, majority)
    return (pre32 + disjoint_rows(d, s, merge_func) * scale).astype(pre.dtype)

  return jax.jit(run, out_shardings=out, donate_argnums=(0,) if donate else ())


def _ties_by_leaf(sp: Any, place: Callable[[str], jax.Array], ft: dict, outs: dict, donate: bool,
                  release: Callable[[str], None] | None) -> dict:
  """Global TIES (:func:`jaxmerge.engine.native.spec`'s ``"ties"``, no drop) leaf by leaf on the mesh: the per-task
  thresholds by two histogram passes (:class:`jaxmerge.stats.KthSmallest`, exact), the majority sign by a
  third, then each leaf merged into its declared sharding. The temporaries are one leaf's, not the model's.
  ``place(path)`` is the pretrained leaf on the mesh; ``release(path)`` (or ``None``) frees a used-up stacked leaf."""
  density, merge_func, count, zero_sign = sp.ties
  t = int(next(iter(ft.values())).shape[0])
  sizes = {p: int(np.prod(x.shape[1:], dtype=np.int64)) for p, x in ft.items()}
  paths = list(ft)
  n = sum(sizes.values())
  k = stats.threshold_rank(n, density, count) if density < 1 else 0
  thr = jnp.zeros((t,), jnp.float32)
  if k > 0:
    sel = stats.KthSmallest(np.full((t,), k), n)

    # One leaf at a time, each histogram fetched before the next leaf's program runs: programs with collectives
    # queued without bound on the in-process CPU devices can wait on each other past XLA's rendezvous timeout.
    for p in paths:
      sel.add_high(_high_hist(place(p), ft[p]), sizes[p])
    sel.finish_high()
    hi = jnp.asarray(sel.buckets)
    for p in paths:
      sel.add_low(_low_hist(place(p), ft[p], hi), sizes[p])
    thr = jnp.asarray(sel.finish_low()[:, 0], jnp.float32)
  majority = jnp.float32(1.0)
  if zero_sign == "majority":
    majority = jnp.float32(np.sign(sum(int(_sign_count(place(p), ft[p], thr, k > 0)) for p in paths)))
  scale = jnp.float32(sp.scale)

  def leaf(p: str) -> jax.Array:
    return _ties_leaf(merge_func, zero_sign, k > 0, outs.get(p), donate)(place(p), ft[p], thr, majority, scale)

  return _in_turn({p: functools.partial(leaf, p) for p in paths}, release)


def _in_turn(calls: dict, release: Callable[[str], None] | None = None) -> dict:
  """``{path: call()}``, each call dispatched once the one before the previous has finished: at most two leaf
  programs in flight (bounded memory, and no unbounded queue of programs with collectives, see above). With
  ``release``, ``release(path)`` runs once that path's result is ready (its inputs are then used up)."""
  out, prev = {}, None
  for p, call in calls.items():
    out[p] = call()
    if prev is not None:
      jax.block_until_ready(out[prev])
      if release is not None:
        release(prev)
    prev = p
  if prev is not None and release is not None:
    jax.block_until_ready(out[prev])
    release(prev)
  return out


def by_leaf(tx: MergeTransform, layout: Layout, per_task: bool, pre: dict, ft: dict, outs: dict, key: Any,
            donate: bool = False, pre_shardings: dict | None = None, consume: bool = False) -> dict | None:
  """A merge of stacked leaves leaf by leaf on the mesh (call it under the mesh), or ``None`` when ``tx`` has no
  per-leaf plan: by-leaf transforms one leaf program at a time, global TIES (recognized by
  :func:`jaxmerge.engine.native.spec`, no drop) in exact histogram passes leaf by leaf. The temporaries are one leaf's.

  With ``pre_shardings`` the pretrained leaves stay where they are (host arrays) and each is placed on the mesh
  just before a program reads it, so the placed model (replicated over the task axis: one copy per task device)
  never exists whole; with ``consume`` each stacked leaf is deleted once its merged leaf is ready, so the stack's
  memory goes as the result's comes.

  Args:
    tx: the transform.
    layout: matrix layout.
    per_task: keep the task axis.
    pre: ``{path: pretrained leaf}``.
    ft: ``{path: stacked (T, ...) leaf}``.
    outs: ``{path: NamedSharding}`` of the outputs (missing paths: XLA's choice).
    key: PRNG key or ``None``.
    donate: the pretrained leaves may be donated to the outputs (only for copies the caller owns; always true of
      the copies placed from ``pre_shardings``).
    pre_shardings: ``{path: NamedSharding}`` to place each pretrained leaf with, one leaf at a time (above), or
      ``None`` when ``pre``'s leaves are already on the mesh.
    consume: ``ft``'s leaves are the caller's own copies, deleted as they are used up (above).

  Returns:
    ``{path: merged leaf}`` or ``None``.
  """
  if pre_shardings is not None:
    def place(p: str) -> jax.Array:
      return jax.device_put(pre[p], pre_shardings[p], may_alias=False)
    donate = True
  else:
    place = pre.__getitem__
  release = None
  if consume:
    def release(p: str) -> None:
      ft[p].delete()
      trim_heap()
  if runs_by_leaf(tx):
    def leaf(p: str) -> jax.Array:
      return _leaf_program(tx, layout, per_task, outs.get(p), donate)(place(p), ft[p], key, np.uint32(jtree.leaf_id(p)))

    return _in_turn({p: functools.partial(leaf, p) for p in pre}, release)
  sp = native.spec(tx) if not per_task else None
  if sp is not None and sp.op == "ties" and sp.drop is None:
    return _ties_by_leaf(sp, place, ft, outs, donate, release)
  return None


def run_on_mesh(tx: MergeTransform, layout: Layout, per_task: bool, pre: dict, ft: Any, coeffs: Any, key: Any,
                 names: Sequence[str] | None, check_finite: bool, mesh: Any) -> dict:
  """The sharded placement: inputs sharded over a mesh run under that mesh with automatic axis types (the same
  buffers, retyped: :func:`auto_axes`), by-leaf transforms (:func:`jaxmerge.engine.xla.runs_by_leaf`) leaf by leaf and
  everything else as the whole-model program, whose task-axis reductions then reduce along the axis
  (:func:`jaxmerge.tree.on_mesh`). Outputs come back on the inputs' mesh.

  Args:
    tx: the merge step.
    layout: the merge's matrix layout (:attr:`jaxmerge.base.MergeContext.layout`).
    per_task: one merged model per task (``True``) or one model (``False``).
    pre: ``{path: leaf}`` of the pretrained model.
    ft: the fine-tuned models: a tuple of ``{path: leaf}`` dicts, or one ``{path: (T, ...)}`` stack.
    coeffs: the step's coefficients, or ``None`` for ``tx.init``'s.
    key: the PRNG key (or ``None``).
    names: the models' names for error messages (or ``None``).
    check_finite: raise on NaN/Inf inputs, naming the model and the parameter.
    mesh: the inputs' mesh.

  Returns:
    ``{path: merged leaf}`` (``(T, ...)`` leaves when ``per_task``), sharded over ``mesh``.
  """
  auto = auto_axes(mesh)
  pre = {p: on_mesh(x, auto) for p, x in pre.items()}
  ft = (tuple({p: on_mesh(x, auto) for p, x in m.items()} for m in ft) if isinstance(ft, tuple)
        else {p: on_mesh(x, auto) for p, x in ft.items()})
  with jax.set_mesh(auto):
    if check_finite:
      raise_nonfinite(pre, ft, nonfinite_flags(pre, ft), names)
    if runs_by_leaf(tx) and coeffs is None and len(pre) > 1:
      prog = leaf_program(tx, layout, per_task, False)
      rows = (lambda p: tuple(m[p] for m in ft)) if isinstance(ft, tuple) else (lambda p: ft[p])
      out = {p: prog(x, rows(p), key, np.uint32(jtree.leaf_id(p)))[0] for p, x in pre.items()}
    else:
      out = whole_program(tx, layout, per_task)(pre, ft, coeffs, key)
  return {p: on_mesh(y, mesh) for p, y in out.items()}
