"""The XLA programs of the engine's backends (chosen by :mod:`jaxmerge.engine.planner`).

- ``xla_whole`` (:func:`whole_program`): one jitted program over every leaf: task vectors in float32, the
  transform, the result added to the pretrained weights and cast back. It runs any transform.
- ``flat`` (:func:`flat_merge`): the task vectors concatenated into one ``(T, N)`` view (on the CPU written into
  host buffers), the transform run on it, the result split back into leaves.
- ``leaf`` (:func:`leaf_program`): one leaf at a time, one compiled program per leaf shape.
- ``leaf_then_flat`` (:func:`run_leaf_then_flat`): a leafwise prefix leaf by leaf into one ``(T, N)`` buffer, then
  the flat rest on it.

Which steps run on the ``flat`` and ``leaf`` programs is this module's own knowledge: the tables :data:`FLAT` and
:data:`BY_LEAF`, keyed by the identity the library's factories give their steps (:func:`jaxmerge.base.identity_of`).
A step missing from a table (a user's own step, whose identity is ``None``) runs on the whole-model program.

NaN/Inf checks (:func:`nonfinite_flags`, :func:`raise_nonfinite`) name the model and the leaf.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmerge import tree as jtree
from jaxmerge.base import MergeContext, MergeTransform, identity_of
from jaxmerge.engine import native
from jaxmerge.engine.host import aligned_empty, host_backed, pool

__all__ = ["BY_LEAF", "FLAT", "accepts", "flat_merge", "leaf_apply", "leaf_program", "merge_leaf", "nonfinite_flags",
           "prefix_program", "raise_nonfinite", "run_leaf_then_flat", "runs_by_leaf", "runs_flat", "split_flat",
           "whole_program"]

Layout = Callable[[str, jax.ShapeDtypeStruct], Any]


def _always(ident: tuple) -> bool:
  del ident
  return True


# Steps whose result is unchanged when every leaf is concatenated into one flat (T, N) vector: elementwise math
# plus whole-model statistics, no per-leaf keys, coefficients, paths or shapes. {factory: rule on its identity}.
FLAT: dict[str, Callable[[tuple], bool]] = {
    "scale": _always, "sum_tasks": _always, "mean_tasks": _always, "weighted_sum": _always, "ties_merge": _always,
    "stitch": _always, "byom_residuals": _always,
    "trim": lambda i: i[2] == "global",  # (density, scope, count)
    "disjoint_merge": lambda i: i[2] == "global" or i[3] == "positive",  # (merge_func, sign_scope, zero_sign)
    "scale_tasks": lambda i: not i[2],  # (values, per_leaf)
}

# Leafwise steps whose program for a leaf depends only on its shape and dtype (the path is read, if at all, only
# through the leaf's random key, which the programs take as an argument: jaxmerge.tree.traced_leaf_ids): one
# compiled program per leaf shape.
BY_LEAF: dict[str, Callable[[tuple], bool]] = {
    "scale": _always, "sum_tasks": _always, "mean_tasks": _always, "weighted_sum": _always, "per_task": _always,
    "across_tasks": _always, "drop": _always, "consensus_mask": _always,
    "trim": lambda i: i[2] == "leaf",
    "disjoint_merge": lambda i: i[2] == "leaf" or i[3] == "positive",
    "scale_tasks": lambda i: not i[2],
}


def accepts(table: dict[str, Callable[[tuple], bool]], tx: MergeTransform) -> bool:
  """Whether every step of ``tx`` (chains read through, however nested) is in ``table`` by its identity.

  Args:
    table: ``{factory name: rule(identity) -> bool}``.
    tx: a merge step.

  Returns:
    ``False`` for any step without an identity the library set (:func:`jaxmerge.base.identity_of`).
  """
  ident = identity_of(tx)
  if ident is None:
    return False
  if ident[0] == "chain":
    return all(accepts(table, s) for s in ident[1])
  rule = table.get(ident[0])
  return rule is not None and bool(rule(ident))


def runs_flat(tx: MergeTransform) -> bool:
  """Whether ``tx`` runs on one ``(T, N)`` view of the whole model (:data:`FLAT`).

  Args:
    tx: a merge step.

  Returns:
    ``True`` when every step is in :data:`FLAT`.
  """
  return accepts(FLAT, tx)


def runs_by_leaf(tx: MergeTransform) -> bool:
  """Whether ``tx`` runs leaf by leaf, one program per leaf shape (:data:`BY_LEAF`).

  Args:
    tx: a merge step.

  Returns:
    ``True`` when every step is in :data:`BY_LEAF`.
  """
  return accepts(BY_LEAF, tx)


def _task_vectors(pre: jax.Array, ft: Any, p: str) -> jax.Array:
  """The ``(T, ...)`` float32 task vectors of leaf ``p`` (models as a tuple of dicts, or one stack)."""
  if isinstance(ft, tuple):
    return jtree.leaf_task_vectors(pre, [m[p] for m in ft])[1]
  return ft[p].astype(jnp.float32) - pre.astype(jnp.float32)[None]


def _has_nonfinite(x: jax.Array, axis: Any = None) -> jax.Array:
  """Whether ``x`` holds a NaN or Inf (along ``axis``), as one float reduction: ``sum(x * 0)`` is 0 for finite
  entries and NaN otherwise (a vectorized sum, several times faster on CPU than ``all(isfinite(x))``)."""
  return jnp.logical_not(jnp.isfinite(jnp.sum(x.astype(jnp.float32) * 0.0, axis=axis)))


@jax.jit
def _nonfinite(tree: dict) -> dict:
  """One NaN/Inf flag per leaf (per task row for stacked leaves)."""
  return {p: _has_nonfinite(x) for p, x in tree.items()}


@jax.jit
def _nonfinite_rows(tree: dict) -> dict:
  return {p: _has_nonfinite(x.reshape(x.shape[0], -1), axis=1) for p, x in tree.items()}


def nonfinite_flags(pre: dict, ft: Any) -> dict:
  """NaN/Inf flags of a merge's inputs, computed on the device (read them with :func:`raise_nonfinite`). One
  compiled check is shared by every model of the same structure.

  Args:
    pre: ``{path: leaf}`` of the pretrained model.
    ft: the fine-tuned models: a tuple of ``{path: leaf}`` dicts, or one ``{path: (T, ...)}`` stack.

  Returns:
    ``{"pre": {path: flag}, "ft": {path: (T,) flags}}`` (boolean arrays).
  """
  if isinstance(ft, tuple):
    per_model = [_nonfinite(m) for m in ft]
    ft_flags = {p: jnp.stack([f[p] for f in per_model]) for p in pre}
  else:
    ft_flags = _nonfinite_rows(ft)
  return {"pre": _nonfinite(pre), "ft": ft_flags}


def raise_nonfinite(pre: dict, ft: Any, flags: dict, names: Sequence[str] | None) -> None:
  """Raises on the first NaN/Inf that :func:`nonfinite_flags` found, naming the model and the parameter.

  Args:
    pre: ``{path: leaf}`` of the pretrained model.
    ft: the fine-tuned models (unused; kept so that the call mirrors :func:`nonfinite_flags`).
    flags: what :func:`nonfinite_flags` returned.
    names: the fine-tuned models' names (default ``"model i"``).

  Returns:
    ``None`` when every input is finite.

  Raises:
    ValueError: a model holds a NaN or Inf.
  """
  flags = jax.device_get(flags)
  for p, f in flags["pre"].items():
    if f:
      raise ValueError(f"pretrained model: parameter {p!r} contains NaN or Inf values")
  for p, f in flags["ft"].items():
    rows = np.flatnonzero(np.asarray(f))
    if rows.size:
      labels = list(names) if names else [f"model {i}" for i in range(len(f))]
      raise ValueError(f"{', '.join(labels[i] for i in rows)}: parameter {p!r} contains NaN or Inf values")


@functools.lru_cache(maxsize=128)
def whole_program(tx: MergeTransform, layout: Layout, per_task: bool) -> Callable[..., Any]:
  """The ``xla_whole`` backend: one jitted program over every leaf, which runs any step exactly as written.

  Args:
    tx: the merge step.
    layout: the matrix layout passed to the step (:attr:`jaxmerge.base.MergeContext.layout`).
    per_task: one merged model per task (``True``) or one model (``False``).

  Returns:
    ``run(pre, ft, coeffs, key) -> {path: merged leaf}`` (the pretrained dtype), ``pre`` a ``{path: leaf}`` dict,
    ``ft`` a tuple of such dicts or one ``{path: (T, ...)}`` stack, ``coeffs=None`` for ``tx.init``'s.
  """
  def run(pre, ft, coeffs, key):
    deltas = {p: _task_vectors(pre[p], ft, p) for p in pre}
    pre32 = {p: x.astype(jnp.float32) for p, x in pre.items()}
    if coeffs is None:
      coeffs = tx.init(deltas)
    out = tx.apply(coeffs, deltas, key=key, ctx=MergeContext(pretrained=pre32, layout=layout))
    if per_task:
      return {p: (pre32[p][None] + out[p]).astype(pre[p].dtype) for p in pre}
    return {p: (pre32[p] + out[p]).astype(pre[p].dtype) for p in pre}

  return jax.jit(run)


@functools.lru_cache(maxsize=128)
def _flat_program(tx: MergeTransform, layout: Layout, per_task: bool) -> Callable[..., Any]:
  """``(pre32 (N,), deltas (T, N), coeffs, key, dtype) -> merged`` for a ``flat`` transform on the flat view."""

  # The task vectors are donated where the output has their shape (per-task merges); a reduction's output
  # cannot reuse them.
  @functools.partial(jax.jit, donate_argnums=(1,) if per_task else (), static_argnums=(4,))
  def run(pre32, deltas, coeffs, key, dtype):
    deltas = {"flat": deltas}
    if coeffs is None:
      coeffs = tx.init(deltas)
    out = tx.apply(coeffs, deltas, key=key, ctx=MergeContext(pretrained={"flat": pre32}, layout=layout))["flat"]
    return ((pre32[None] if per_task else pre32) + out).astype(dtype)

  return run


@functools.lru_cache(maxsize=128)
def flat_merge(tx: MergeTransform, layout: Layout, per_task: bool, paths: tuple[str, ...]) -> Callable[..., Any]:
  """The merge of a ``flat`` transform on one ``(T, N)`` array of every leaf, concatenated in ``paths`` order.

  Two programs: the first concatenates the task vectors once (and flags NaN/Inf per model in the same pass);
  the second runs the transform on that buffer, which it receives donated so that its intermediates can
  reuse it. Fusing a 200-way concatenation into every pass of the transform instead recomputes it in each
  (several times slower on CPU). Splitting the result back into leaves is left to :func:`split_flat`: inside
  XLA each leaf would be a slice with its own offset, hence its own compiled kernel.

  Args:
    tx: a ``flat`` merge step.
    layout: the matrix layout passed to the step.
    per_task: one merged model per task (``True``) or one model (``False``).
    paths: the leaves' order in the flat view.

  Returns:
    ``merged(pre, ft, coeffs, key) -> (y, bad)``: ``y`` the ``(N,)`` (or ``(T, N)``) merged vector in the
    pretrained dtype, ``bad`` the ``(T + 1,)`` NaN/Inf flags (one per model, the pretrained model last).
  """

  @jax.jit
  def gather(pre, ft):
    pre32 = jnp.concatenate([pre[p].astype(jnp.float32).ravel() for p in paths])
    if isinstance(ft, tuple):
      deltas = jnp.stack([jnp.concatenate([m[p].astype(jnp.float32).ravel() for p in paths]) - pre32 for m in ft])
    else:
      t = ft[paths[0]].shape[0]
      deltas = jnp.concatenate([ft[p].astype(jnp.float32).reshape(t, -1) for p in paths], axis=1) - pre32[None]
    # Any NaN/Inf in a model (one flag per model, pretrained last; a non-finite pretrained entry makes every
    # task vector's entry non-finite too); the caller names the leaf on failure.
    bad = jnp.concatenate([_has_nonfinite(deltas, axis=1), _has_nonfinite(pre32)[None]])
    return pre32, deltas, bad

  run = _flat_program(tx, layout, per_task)

  @jax.jit
  def flags(pre32, deltas):
    return jnp.concatenate([_has_nonfinite(deltas, axis=1), _has_nonfinite(pre32)[None]])

  def merged(pre, ft, coeffs, key):
    host = _host_flat(pre, ft, paths)
    if host is not None:
      pre32, deltas = host
      bad = flags(pre32, deltas)
    else:
      pre32, deltas, bad = gather(pre, ft)
    return run(pre32, deltas, coeffs, key, pre[paths[0]].dtype), bad

  return merged


_PARALLEL_FILL = 1 << 22  # entries: below this, one thread fills the flat buffers


def _host_flat(pre: dict, ft: Any, paths: tuple[str, ...]) -> tuple[jax.Array, jax.Array] | None:
  """On the CPU backend, the flat pretrained vector ``(N,)`` and task vectors ``(T, N)`` written straight into
  host buffers that the backend adopts without a copy: one subtraction per leaf and task at memory speed,
  instead of an XLA concatenation of every leaf (several times slower on CPU). ``None`` elsewhere (other
  backends, non-float32 leaves), where the XLA path is used."""
  models = ft if isinstance(ft, tuple) else None
  leaves = list(pre.values()) + ([x for m in models for x in m.values()] if models else list(ft.values()))
  if any(x.dtype != jnp.float32 for x in leaves) or not host_backed(leaves):
    return None
  sizes = [int(np.prod(pre[p].shape, dtype=np.int64)) for p in paths]
  offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
  t = len(models) if models else int(ft[paths[0]].shape[0])
  pre_flat = aligned_empty((int(offsets[-1]),))
  deltas = aligned_empty((t, int(offsets[-1])))

  def fill(lo: int, hi: int) -> None:
    for j in range(lo, hi):
      p, off, n = paths[j], int(offsets[j]), sizes[j]
      base = np.asarray(pre[p]).reshape(-1)
      pre_flat[off:off + n] = base
      for i in range(t):
        row = np.asarray(models[i][p]).reshape(-1) if models else np.asarray(ft[p][i]).reshape(-1)
        np.subtract(row, base, out=deltas[i, off:off + n])

  # Two halves of the leaves (by size) on two threads: NumPy releases the GIL, and first-touch page faults
  # and memory bandwidth both scale with the cores.
  mid = int(np.searchsorted(offsets, offsets[-1] // 2))
  if 0 < mid < len(paths) and offsets[-1] >= _PARALLEL_FILL:
    other = pool("flat-fill", 1).submit(fill, mid, len(paths))
    fill(0, mid)
    other.result()
  else:
    fill(0, len(paths))
  device = jax.devices("cpu")[0]
  return jax.device_put(pre_flat, device), jax.device_put(deltas, device)


def split_flat(y: jax.Array, shapes: dict[str, tuple[int, ...]]) -> dict[str, jax.Array]:
  """Splits a ``(..., N)`` result into ``{path: (..., *shape)}`` leaves.

  On the CPU the leaves are views of ``y``'s buffer (no copy where a leaf's offset is 64-byte aligned, a copy
  otherwise); on accelerators, one jitted split program per structure.

  Args:
    y: the flat result.
    shapes: ``{path: shape}`` in the flat view's order.

  Returns:
    ``{path: leaf}`` with shape ``y.shape[:-1] + shape``.
  """
  lead = y.shape[:-1]
  if all(d.platform == "cpu" for d in y.devices()):
    host = np.asarray(y)
    out, off = {}, 0
    for p, shape in shapes.items():
      n = int(np.prod(shape, dtype=np.int64))
      out[p] = jax.device_put(host[..., off:off + n].reshape(lead + shape), next(iter(y.devices())))
      off += n
    return out
  return _jitted_split(tuple(shapes.items()))(y)


@functools.lru_cache(maxsize=32)
def _jitted_split(shapes: tuple[tuple[str, tuple[int, ...]], ...]) -> Callable[[jax.Array], dict]:
  def split(y):
    out, off = {}, 0
    for p, shape in shapes:
      n = int(np.prod(shape, dtype=np.int64))
      out[p] = y[..., off:off + n].reshape(y.shape[:-1] + shape)
      off += n
    return out

  return jax.jit(split)


def leaf_apply(tx: MergeTransform, layout: Layout, path: str, pre: jax.Array, fts: Sequence[jax.Array],
               coeffs: Any, key: Any, pid: Any) -> tuple[jax.Array, jax.Array]:
  """Inside a leaf program: the float32 pretrained leaf and ``tx`` applied to the leaf's ``(T, ...)`` task vectors
  (``coeffs=None``: ``tx.init``). Shared by every leaf program of both engines.

  ``pid`` is the leaf's id (:func:`jaxmerge.tree.leaf_id` of ``path``), usually a traced argument: the leaf's
  random key then folds it in as a value (:func:`jaxmerge.tree.traced_leaf_ids`), so the program of a by-leaf
  transform (:data:`BY_LEAF`) serves every leaf of the same shape.

  Args:
    tx: the merge step.
    layout: the matrix layout passed to the step.
    path: the leaf's path (a placeholder in by-shape programs).
    pre: the pretrained leaf.
    fts: the leaf's ``T`` fine-tuned values.
    coeffs: the step's coefficients, or ``None`` for ``tx.init``'s.
    key: the merge's PRNG key (or ``None``).
    pid: the leaf's id.

  Returns:
    ``(pre32, out)``: the float32 pretrained leaf and the step's output for this leaf.
  """
  with jtree.traced_leaf_ids({path: pid}):
    pre32, d = jtree.leaf_task_vectors(pre, fts)
    tree = {path: d}
    c = tx.init(tree) if coeffs is None else coeffs
    return pre32, tx.apply(c, tree, key=key, ctx=MergeContext(pretrained={path: pre32}, layout=layout))[path]


def merge_leaf(tx: MergeTransform, layout: Layout, per_task: bool, path: str, pre: jax.Array,
               fts: Sequence[jax.Array], coeffs: Any, key: Any, pid: Any) -> jax.Array:
  """One leaf's merge inside a leaf program: :func:`leaf_apply` plus the pretrained leaf.

  Args:
    tx, layout, path, pre, fts, coeffs, key, pid: as in :func:`leaf_apply`.
    per_task: one merged leaf per task (``True``) or one leaf (``False``).

  Returns:
    The merged leaf in float32 (``(T, ...)`` when ``per_task``).
  """
  pre32, out = leaf_apply(tx, layout, path, pre, fts, coeffs, key, pid)
  return (pre32[None] if per_task else pre32) + out


@functools.lru_cache(maxsize=128)
def leaf_program(tx: MergeTransform, layout: Layout, per_task: bool, check_finite: bool) -> Callable[..., Any]:
  """One leaf's merge for a by-leaf transform (:data:`BY_LEAF`): ``(pre, fts, key, leaf_id) -> (leaf, bad)``, ``fts``
  the leaf's ``T`` fine-tuned values, ``bad`` a scalar NaN/Inf probe of the leaf's inputs (``False`` without
  ``check_finite``).

  The leaf's id is an argument and the path a placeholder (a by-leaf step reads the path only through its
  key), so every leaf of a shape and dtype shares one compiled program: a whole-model program grows with the
  number of leaves (DARE's random draws made it a 26 s compilation for a ViT-B/32), this one with the number of
  distinct shapes.

  Args:
    tx: a by-leaf merge step (:func:`runs_by_leaf`).
    layout: the matrix layout passed to the step.
    per_task: one merged leaf per task (``True``) or one leaf (``False``).
    check_finite: also compute the NaN/Inf probe.

  Returns:
    The jitted ``run(pre, fts, key, leaf_id) -> (leaf, bad)`` (the leaf in the pretrained dtype).
  """

  def run(pre, fts, key, pid):
    y = merge_leaf(tx, layout, per_task, "leaf", pre, fts, None, key, pid).astype(pre.dtype)
    return y, (jnp.isnan(jtree.finite_probe((pre, *fts))) if check_finite else jnp.zeros((), bool))

  return jax.jit(run)


@functools.lru_cache(maxsize=128)
def prefix_program(prefix: MergeTransform, layout: Layout, check_finite: bool) -> Callable[..., Any]:
  """One leaf's task vectors after a chain's leafwise prefix (the first half of ``leaf_then_flat``).

  Args:
    prefix: the leafwise by-shape, task-preserving steps (:func:`jaxmerge.engine.planner.leaf_then_flat`).
    layout: the matrix layout passed to the steps.
    check_finite: also compute the NaN/Inf probe.

  Returns:
    The jitted ``run(pre, fts, key, leaf_id) -> (d, bad)``, ``d`` the ``(T, n)`` float32 task vectors of the leaf
    (``n`` its size).
  """

  def run(pre, fts, key, pid):
    d = leaf_apply(prefix, layout, "leaf", pre, fts, None, key, pid)[1]
    bad = jnp.isnan(jtree.finite_probe((pre, *fts))) if check_finite else jnp.zeros((), bool)
    return d.reshape(d.shape[0], -1), bad

  return jax.jit(run)


@functools.cache
def _jitted_concat() -> Callable[..., Any]:
  return jax.jit(lambda pre, ds: (jnp.concatenate([x.astype(jnp.float32).ravel() for x in pre]),
                                  jnp.concatenate(ds, axis=1)))


def run_leaf_then_flat(prefix: MergeTransform, rest: MergeTransform, layout: Layout, per_task: bool, pre: dict,
                        ft: tuple, key: Any, check_finite: bool) -> tuple[jax.Array, jax.Array]:
  """The ``leaf_then_flat`` backend: the prefix leaf by leaf into one ``(T, N)`` buffer (on the CPU a host buffer
  written leaf by leaf, as :func:`_host_flat`), then ``rest`` on it (global TIES as one native call where it can).

  Args:
    prefix: the leafwise by-shape, task-preserving steps.
    rest: the ``flat`` steps that follow them.
    layout: the matrix layout passed to the steps.
    per_task: one merged model per task (``True``) or one model (``False``).
    pre: ``{path: leaf}`` of the pretrained model.
    ft: the fine-tuned models, a tuple of ``{path: leaf}`` dicts.
    key: the merge's PRNG key (or ``None``).
    check_finite: also compute the NaN/Inf probes.

  Returns:
    ``(y, bad)``: the flat merged vector in the pretrained dtype (split it with :func:`split_flat`) and one NaN/Inf
    flag per leaf.
  """
  paths = tuple(pre)
  prog = prefix_program(prefix, layout, check_finite)
  sizes = [int(np.prod(pre[p].shape, dtype=np.int64)) for p in paths]
  t, n = len(ft), int(sum(sizes))
  bad = []
  if host_backed([*pre.values(), *(m[p] for m in ft for p in paths)]):
    pre_flat, deltas = aligned_empty((n,)), aligned_empty((t, n))
    pending, off = None, 0

    def copy(item):
      o, m, p, y = item
      deltas[:, o:o + m] = np.asarray(y)
      pre_flat[o:o + m] = np.asarray(pre[p], np.float32).reshape(-1)

    for p, m in zip(paths, sizes):
      y, b = prog(pre[p], tuple(f[p] for f in ft), key, np.uint32(jtree.leaf_id(p)))
      bad.append(b)
      if pending is not None:  # copy the previous leaf while this one's program runs
        copy(pending)
      pending, off = (off, m, p, y), off + m
    copy(pending)
    device = jax.devices("cpu")[0]
    sp = native.spec(rest) if not per_task else None
    if sp is not None and sp.op == "ties" and sp.drop is None and native.fits(t, n) and native.available():
      # The rest is global TIES: one native call on the host buffer (no flat XLA program to compile or run).
      y = native.ties_rows(deltas, pre_flat, sp)[0]
      return jax.device_put(y.astype(pre[paths[0]].dtype, copy=False), device), jnp.stack(bad)
    pre32, flat = jax.device_put(pre_flat, device), jax.device_put(deltas, device)
  else:
    ds = []
    for p in paths:
      y, b = prog(pre[p], tuple(f[p] for f in ft), key, np.uint32(jtree.leaf_id(p)))
      ds.append(y)
      bad.append(b)
    pre32, flat = _jitted_concat()(tuple(pre[p] for p in paths), tuple(ds))
  y = _flat_program(rest, layout, per_task)(pre32, flat, None, None, pre[paths[0]].dtype)
  return y, jnp.stack(bad)
