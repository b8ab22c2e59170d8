"""The entry points behind ``jm.merge`` (one model), ``jm.merge_per_task`` (one model per task), ``jm.make_merger``
and ``jm.route``.

``merge`` validates structure, shapes and dtypes on the host (errors name the model and path), asks the planner
(:func:`jaxmerge.engine.planner.plan`) which backend runs the merge and runs it: task vectors in float32, the
transform, the result added to the pretrained weights and cast back to their dtypes. NaN/Inf weights are rejected
with an error naming the model and path (the check rides along in the fast backends). Non-floating leaves
(integer buffers, step counters) are copied from the pretrained model and never merged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmerge import filters as jfilters
from jaxmerge import tree as jtree
from jaxmerge.base import REDUCE, MergeTransform
from jaxmerge.engine import native
from jaxmerge.engine.mesh import run_on_mesh
from jaxmerge.engine.planner import BACKENDS, forced, plan
from jaxmerge.engine.xla import (
  flat_merge,
  leaf_program,
  nonfinite_flags,
  raise_nonfinite,
  run_leaf_then_flat,
  split_flat,
  whole_program,
)
from jaxmerge.typing import Coeffs, Params, PRNGKey, Stacked

__all__ = ["BACKENDS", "check_tx", "make_merger", "merge", "merge_per_task", "prepare", "route"]

Layout = Callable[[str, jax.ShapeDtypeStruct], Any]


def _as_list(finetuned: Sequence[Params] | Stacked) -> tuple[list[Params] | None, Stacked | None]:
  if isinstance(finetuned, (list, tuple)):
    return list(finetuned), None
  return None, finetuned


def _as_array(x: Any) -> Any:
  """A JAX array, or a NumPy array as it is: the programs take both, and the native kernels read NumPy memory in
  place (``jnp.asarray`` would copy every leaf)."""
  return x if isinstance(x, np.ndarray) else jnp.asarray(x)


def prepare(
    pretrained: Params,
    finetuned: Sequence[Params] | Stacked,
    *,
    names: Sequence[str] | None = None,
    check_finite: bool = True,
) -> tuple[dict, dict, dict]:
  """Validates inputs and splits them by path into float leaves and copied leaves.

  Args:
    pretrained: any pytree of arrays.
    finetuned: a list of ``T`` pytrees, or one stack (leading task axis).
    names: model names used in error messages.
    check_finite: reject NaN/Inf weights.

  Returns:
    ``(pre_float, ft_float, passthrough)``: a flat ``{path: array}`` dict of the pretrained float leaves; the
    fine-tuned float leaves, either a tuple of such dicts (one per model, when a list was given) or one dict of
    stacked leaves; and a dict of the non-float pretrained leaves.
  """
  models, stacked = _as_list(finetuned)
  pre = jtree.flatten_paths(pretrained)
  if not pre:
    raise ValueError("the pretrained model has no parameters")
  if models is not None:
    jtree.check_compatible(pretrained, models, names)
    flats = [jtree.flatten_paths(m) for m in models]
    # Kept as a tuple of per-model dicts: the stack is formed inside the jitted merge, where XLA fuses it into
    # its consumers instead of materializing a second copy of every model.
    ft = tuple({p: f[p] for p, x in pre.items() if jtree.is_float(x)} for f in flats)
  else:
    st = jtree.flatten_paths(stacked)
    missing = [p for p in pre if p not in st]
    extra = [p for p in st if p not in pre]
    if missing or extra:
      raise ValueError(f"the stacked fine-tuned models do not match the pretrained structure: "
                       f"missing {missing[:10]}, extra {extra[:10]}")
    sizes = {np.shape(x)[0] if np.ndim(x) else None for x in st.values()}
    if len(sizes) != 1 or None in sizes:
      raise ValueError(f"stacked leaves need one leading task axis of equal size, got sizes {sizes}")
    if sizes == {0}:
      raise ValueError("no fine-tuned models given: the task axis is empty")
    for p, x in pre.items():
      if tuple(np.shape(st[p]))[1:] != tuple(np.shape(x)):
        raise ValueError(f"stacked parameter {p!r} has shape {tuple(np.shape(st[p]))}, expected (T, "
                         f"{', '.join(map(str, np.shape(x)))})")
    ft = {p: _as_array(st[p]) for p, x in pre.items() if jtree.is_float(x)}
    for p, x in ft.items():
      if not jtree.is_float(x):
        raise ValueError(f"parameter {p!r} is floating in the pretrained model but has dtype {x.dtype} in a "
                         "fine-tuned model")
  pre_float = {p: _as_array(x) for p, x in pre.items() if jtree.is_float(x)}
  passthrough = {p: x for p, x in pre.items() if not jtree.is_float(x)}
  if check_finite:
    raise_nonfinite(pre_float, ft, nonfinite_flags(pre_float, ft), names)
  return pre_float, ft, passthrough


def _run(tx: MergeTransform, layout: Layout, per_task: bool, pretrained: Params, finetuned: Any, coeffs: Any,
         key: Any, names: Sequence[str] | None, check_finite: bool, backend: str | None = None) -> tuple[dict, dict]:
  """Validates the inputs, plans the merge (:func:`plan`, or the named ``backend``) and runs it. The NaN/Inf
  check rides along in the fast backends. Returns the merged float leaves and the copied non-float ones."""
  pre, ft, passthrough = prepare(pretrained, finetuned, names=names, check_finite=False)
  route, detail = (forced(backend, tx, per_task, pre, ft, coeffs, key) if backend is not None
                   else plan(tx, per_task, pre, ft, coeffs, key))
  if route == "mesh":
    return run_on_mesh(tx, layout, per_task, pre, ft, coeffs, key, names, check_finite, detail), passthrough
  if route == "native":
    return _run_native(detail, pre, ft, names, check_finite, key), passthrough
  if route == "leaf":
    # Leaf by leaf, one compiled program per leaf shape: no copy of the inputs (task arithmetic, DARE, per-tensor
    # TIES). The NaN/Inf probe rides along in each leaf's program.
    prog = leaf_program(tx, layout, per_task, check_finite)

    def rows(p):  # the leaf's T fine-tuned values (rows of a stacked leaf are sliced inside the program)
      return tuple(m[p] for m in ft) if isinstance(ft, tuple) else ft[p]

    res = {p: prog(x, rows(p), key, np.uint32(jtree.leaf_id(p))) for p, x in pre.items()}
    if check_finite and bool(jnp.any(jnp.stack([bad for _, bad in res.values()]))):
      raise_nonfinite(pre, ft, nonfinite_flags(pre, ft), names)  # names the model and leaf
    return {p: y for p, (y, _) in res.items()}, passthrough
  if route == "leaf_then_flat":
    y, bad = run_leaf_then_flat(*detail, layout, per_task, pre, ft, key, check_finite)
    if check_finite and bool(jnp.any(bad)):
      raise_nonfinite(pre, ft, nonfinite_flags(pre, ft), names)  # names the model and leaf
    return split_flat(y, {p: tuple(pre[p].shape) for p in pre}), passthrough
  if route == "flat":
    paths = tuple(pre)
    y, bad = flat_merge(tx, layout, per_task, paths)(pre, ft, coeffs, key)
    if check_finite and bool(jnp.any(bad)):
      raise_nonfinite(pre, ft, nonfinite_flags(pre, ft), names)  # names the model and leaf
    return split_flat(y, {p: tuple(pre[p].shape) for p in paths}), passthrough
  if check_finite:
    raise_nonfinite(pre, ft, nonfinite_flags(pre, ft), names)
  return whole_program(tx, layout, per_task)(pre, ft, coeffs, key), passthrough


def route(tx: MergeTransform, pretrained: Params, finetuned: Sequence[Params] | Stacked, *,
          key: PRNGKey | None = None, coeffs: Coeffs | None = None, per_task: bool = False) -> str:
  """The backend :func:`merge` (``per_task=True``: :func:`merge_per_task`) would run these inputs on.

  One of :data:`BACKENDS`: ``"native"`` (one call of the CPU kernels: global TIES, task arithmetic, simple
  averaging and DARE on either, recognized by their steps, however the chain is spelled), ``"leaf"`` (leafwise
  path-free steps, one compiled program per leaf shape), ``"leaf_then_flat"`` (a leafwise prefix leaf by leaf,
  then flat steps on one ``(T, N)`` view), ``"flat"`` (one ``(T, N)`` program), ``"mesh"`` (inputs sharded over
  a device mesh) or ``"xla_whole"`` (the whole-model program, which runs every transform). Pass one of them as
  ``merge(..., backend=...)`` to force it (``ValueError`` when it cannot run the merge).

  Args:
    tx: the transform.
    pretrained: a pytree of arrays.
    finetuned: a list of ``T`` pytrees or one stack.
    key: the PRNG key the merge would get.
    coeffs: the coefficients the merge would get.
    per_task: plan :func:`merge_per_task` instead.

  Returns:
    The backend's name.
  """
  pre, ft, _ = prepare(pretrained, finetuned, check_finite=False)
  return plan(tx, per_task, pre, ft, coeffs, key)[0]


def _run_native(sp: Any, pre: dict, ft: Any, names: Sequence[str] | None, check_finite: bool, key: Any) -> dict:
  """Global TIES, task arithmetic, simple averaging and DARE on either as one call of the native CPU kernels
  (:mod:`jaxmerge.engine.native`): the same result as the XLA programs, without a flat copy of the task vectors or a
  compilation."""
  paths = tuple(pre)
  stacked = not isinstance(ft, tuple)
  # DARE's drop is the chain's first step: its key is fold_in(key, 0), as jaxmerge.chain gives it.
  keys = native.dare_keys(jax.random.fold_in(key, 0), paths) if sp.drop is not None else None
  fts = [ft[p] for p in paths] if stacked else [[m[p] for p in paths] for m in ft]
  out, _, bad = native.run(sp, [pre[p] for p in paths], fts, keys=keys, stacked=stacked)
  if check_finite and bool(jnp.any(bad)):
    raise_nonfinite(pre, ft, nonfinite_flags(pre, ft), names)  # names the model and leaf
  return dict(zip(paths, out))


def check_tx(tx: MergeTransform, key: PRNGKey | None, per_task: bool) -> None:
  """Checks that ``tx`` is a merge step that this entry point can run with this key.

  Args:
    tx: the merge step.
    key: the PRNG key passed by the caller (or ``None``).
    per_task: ``True`` for :func:`jaxmerge.merge_per_task` (which needs a task-preserving step), ``False`` for
      :func:`jaxmerge.merge` (which needs a reduction).

  Returns:
    ``None``.

  Raises:
    ValueError: ``tx`` is not a :class:`~jaxmerge.base.MergeTransform`, is stochastic and got no key, or its
      kind does not match the entry point.
  """
  if not isinstance(tx, MergeTransform):
    raise ValueError(f"expected a MergeTransform (e.g. jm.get_method('ties')()), got {type(tx).__name__}")
  if tx.needs_key and key is None:
    raise ValueError("this merge is stochastic and needs a PRNG key: pass key=jax.random.key(seed)")
  if per_task and tx.kind == REDUCE:
    raise ValueError("merge_per_task needs a task-preserving transform; this one reduces over tasks (use merge)")
  if not per_task and tx.kind != REDUCE:
    raise ValueError(
        "this transform keeps the task axis (one model per task, e.g. emr, tall_mask, byom): use "
        "jm.merge_per_task, or end the chain with a reduction"
    )


def _assemble(pretrained: Params, merged: dict, passthrough: dict, per_task: bool) -> Any:
  if per_task:
    t = next(iter(merged.values())).shape[0]
    return [
        jtree.unflatten_paths(pretrained, {**{p: x[i] for p, x in merged.items()}, **passthrough}) for i in range(t)
    ]
  return jtree.unflatten_paths(pretrained, {**merged, **passthrough})


def merge(
    tx: MergeTransform,
    pretrained: Params,
    finetuned: Sequence[Params] | Stacked,
    *,
    key: PRNGKey | None = None,
    coeffs: Coeffs | None = None,
    layout: Layout | None = None,
    names: Sequence[str] | None = None,
    check_finite: bool = True,
    backend: str | None = None,
) -> Params:
  """Merges fine-tuned models into one model.

  Args:
    tx: a reducing :class:`~jaxmerge.base.MergeTransform` (e.g. ``jm.get_method("ties")()``).
    pretrained: any pytree of arrays.
    finetuned: a list of ``T`` pytrees with the same structure, or one stack (leading task axis).
    key: PRNG key for stochastic methods (DARE, DELLA).
    coeffs: coefficients to use instead of ``tx.init(...)`` (sweeps and learned values: no recompilation).
    layout: how 2-D leaves are read as ``(out, in)`` matrices; default
      :func:`jaxmerge.filters.hf_layout`, use :func:`jaxmerge.filters.flax_layout` for Flax models.
    names: model names used in error messages.
    check_finite: reject NaN/Inf weights before merging.
    backend: run on this backend (one of :data:`BACKENDS`, see :func:`route`) instead of the planner's choice;
      ``"xla_whole"`` runs any transform. ``ValueError`` when the backend cannot run the merge.

  Returns:
    The merged parameters, with ``pretrained``'s structure and dtypes.

  Raises:
    ValueError: mismatched structure, shapes or dtypes (naming model and path), empty task list, NaN/Inf,
      a stochastic method without a key, or a per-task method (use :func:`merge_per_task`).

  >>> import jax.numpy as jnp, jaxmerge as jm
  >>> pre = {"w": jnp.zeros(2)}
  >>> fts = [{"w": jnp.array([1.0, 0.0])}, {"w": jnp.array([0.0, 3.0])}]
  >>> jm.merge(jm.get_method("task_arithmetic")(scale=0.5), pre, fts)["w"].tolist()
  [0.5, 1.5]
  """
  check_tx(tx, key, per_task=False)
  merged, passthrough = _run(tx, layout or jfilters.hf_layout, False, pretrained, finetuned, coeffs, key, names,
                             check_finite, backend)
  return _assemble(pretrained, merged, passthrough, False)


def merge_per_task(
    tx: MergeTransform,
    pretrained: Params,
    finetuned: Sequence[Params] | Stacked,
    *,
    key: PRNGKey | None = None,
    coeffs: Coeffs | None = None,
    layout: Layout | None = None,
    names: Sequence[str] | None = None,
    check_finite: bool = True,
    backend: str | None = None,
) -> list[Params]:
  """Builds one model per task with a task-preserving transform (EMR, TALL masks, BYOM, TSV-C).

  Same arguments as :func:`merge`; returns a list of ``T`` parameter pytrees, model ``t`` for task ``t``.

  Args:
    tx: a task-preserving :class:`~jaxmerge.base.MergeTransform`.
    pretrained: any pytree of arrays.
    finetuned: a list of ``T`` pytrees, or one stack (leading task axis).
    key: PRNG key for stochastic methods.
    coeffs: coefficients to use instead of ``tx.init(...)``.
    layout: matrix layout (default :func:`jaxmerge.filters.hf_layout`).
    names: model names used in error messages.
    check_finite: reject NaN/Inf weights before merging.
    backend: as :func:`merge`.

  Returns:
    A list of ``T`` pytrees with ``pretrained``'s structure and dtypes.
  """
  check_tx(tx, key, per_task=True)
  merged, passthrough = _run(tx, layout or jfilters.hf_layout, True, pretrained, finetuned, coeffs, key, names,
                             check_finite, backend)
  return _assemble(pretrained, merged, passthrough, True)


def make_merger(tx: MergeTransform, layout: Layout | None = None) -> Callable[..., Params]:
  """A jitted ``(pretrained, stacked, coeffs=None, key=None) -> merged`` for flat float ``{path: array}``
  dicts, without host-side validation (for loops and sweeps; validate once with :func:`prepare`).

  Args:
    tx: a reducing transform.
    layout: matrix layout (default :func:`jaxmerge.filters.hf_layout`).

  Returns:
    ``merger(pretrained, stacked, coeffs=None, key=None) -> merged`` (a flat dict of float leaves).
  """
  check_tx(tx, jax.random.key(0) if tx.needs_key else None, per_task=False)
  fn = whole_program(tx, layout or jfilters.hf_layout, False)

  def merger(pretrained, stacked, coeffs=None, key=None):
    return fn(pretrained, stacked, coeffs, key)

  return merger
