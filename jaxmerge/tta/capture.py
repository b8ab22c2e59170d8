"""Input Gram matrices of every linear map of a model, captured from its forward pass (for RegMean).

A *linear map* is any 2-D parameter leaf that enters a ``dot_general`` contracting one of its axes (``x @ W``
with a Flax ``(in, out)`` kernel, ``x @ W.T`` with a PyTorch ``(out, in)`` weight, through ``jit``, dtype
casts and transposes). The forward function is traced once to a jaxpr, and a small interpreter replays it,
recording ``X^T X`` of the other operand (every leading position, e.g. every token, is a row of ``X``). This
works for any jittable ``forward_fn(params, inputs)`` without hooks in the model code, as PyTorch forward hooks
on ``nn.Linear`` do in the reference implementations. Convolutions, embeddings and element-wise parameters are
not linear maps in this sense.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax._src import core as _core

__all__ = ["GramCapture", "linear_grams"]

# Higher-order primitives whose body is inlined (their custom differentiation rules are irrelevant here).
_INLINE = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr",
           "remat": "jaxpr", "checkpoint": "jaxpr", "custom_jvp_call": "call_jaxpr",
           "custom_vjp_call": "call_jaxpr", "custom_vjp_call_jaxpr": "fun_jaxpr"}
# Unary primitives that keep a parameter's values (its provenance passes through).
_SAME = ("convert_element_type", "copy", "copy_p", "optimization_barrier")


class GramCapture(NamedTuple):
  """What :func:`linear_grams` returns for one batch.

  Attributes:
    grams: ``{path: [in, in]}`` float32 sums ``X^T X`` of each linear map's inputs.
    rows: ``{path: int}`` number of rows of ``X`` (tokens) summed.
    in_axis: ``{path: int}`` the axis of the parameter leaf that is contracted with the inputs.
  """

  grams: dict
  rows: dict
  in_axis: dict


def _read(env, v):
  return v.val if isinstance(v, _core.Literal) else env[v]


def _eval(jaxpr, consts, args, prov_in, record) -> tuple[list, list]:
  env, prov = {}, {}
  for v, c in zip(jaxpr.constvars, consts):
    env[v] = c
  for v, a, p in zip(jaxpr.invars, args, prov_in):
    env[v] = a
    if p is not None:
      prov[v] = p
  for eqn in jaxpr.eqns:
    invals = [_read(env, v) for v in eqn.invars]
    inprov = [None if isinstance(v, _core.Literal) else prov.get(v) for v in eqn.invars]
    name = eqn.primitive.name
    outprov = [None] * len(eqn.outvars)
    if name in _INLINE and _INLINE[name] in eqn.params:
      sub = eqn.params[_INLINE[name]]
      if isinstance(sub, _core.ClosedJaxpr):
        sub_jaxpr, sub_consts = sub.jaxpr, sub.consts
      else:
        sub_jaxpr, sub_consts = sub, ()
      n = len(sub_jaxpr.invars)
      outs, outprov = _eval(sub_jaxpr, sub_consts, invals[-n:], inprov[-n:], record)
    else:
      with eqn.ctx.manager:
        outs = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
      if not eqn.primitive.multiple_results:
        outs = [outs]
      if name in _SAME and inprov[0] is not None:
        outprov = [inprov[0]]
      elif name == "transpose" and inprov[0] is not None:
        path, axes = inprov[0]
        outprov = [(path, tuple(axes[j] for j in eqn.params["permutation"]))]
      elif name == "dot_general":
        _record_dot(eqn, invals, inprov, record)
    for v, o, p in zip(eqn.outvars, outs, outprov):
      env[v] = o
      if p is not None:
        prov[v] = p
  return [_read(env, v) for v in jaxpr.outvars], [None if isinstance(v, _core.Literal) else prov.get(v)
                                                  for v in jaxpr.outvars]


def _record_dot(eqn, invals, inprov, record) -> None:
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  for w, x, wc, xc, wb in ((1, 0, rc, lc, rb), (0, 1, lc, rc, lb)):
    p = inprov[w]
    if p is None or len(wc) != 1 or wb or len(p[1]) != 2:
      continue
    path, axes = p
    xv = jnp.asarray(invals[x], jnp.float32)
    xm = jnp.moveaxis(xv, xc[0], -1).reshape(-1, xv.shape[xc[0]])
    g = jnp.einsum("ni,nj->ij", xm, xm, precision=jax.lax.Precision.HIGHEST)
    record.append((path, axes[wc[0]], g, xm.shape[0]))
    return


@functools.lru_cache(maxsize=16)
def _compiled(forward_fn: Callable, paths: tuple[str, ...], treedef: Any):
  def run(leaves, inputs):
    def fwd(leaves, inputs):
      return forward_fn(jax.tree.unflatten(treedef, leaves), inputs)

    closed = jax.make_jaxpr(fwd)(leaves, inputs)
    flat_in = jax.tree.leaves((leaves, inputs))
    prov = [(paths[i], (0, 1)) if i < len(paths) and jnp.ndim(flat_in[i]) == 2 else None
            for i in range(len(flat_in))]
    record: list = []
    _eval(closed.jaxpr, closed.consts, flat_in, prov, record)
    grams, rows, in_axis = {}, {}, {}
    for path, axis, g, n in record:
      if path in grams:
        if in_axis[path] != axis:
          raise ValueError(f"parameter {path!r} is used as a linear map along two different axes")
        grams[path] = grams[path] + g
        rows[path] += n
      else:
        grams[path], rows[path], in_axis[path] = g, n, axis
    return grams, rows, in_axis

  jitted = jax.jit(lambda leaves, inputs: run(leaves, inputs)[0])
  return run, jitted


def linear_grams(forward_fn: Callable[[Any, jax.Array], Any], params: Any, inputs: jax.Array) -> GramCapture:
  """Sums ``X^T X`` of the inputs of every linear map of ``params`` in ``forward_fn(params, inputs)``.

  Args:
    forward_fn: a jittable function of the parameter pytree and a batch (its output is discarded).
    params: the parameter pytree (2-D float leaves used as matmul operands are the linear maps).
    inputs: one batch.

  Returns:
    A :class:`GramCapture` (only leaves that are used as linear maps appear).

  References:
    Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language Models" (RegMean), ICLR 2023.
    https://arxiv.org/abs/2212.09849
  """
  from jaxmerge import tree as jtree

  leaves, treedef = jax.tree.flatten(params)
  paths = tuple(jtree.paths(params))
  run, jitted = _compiled(forward_fn, paths, treedef)
  # rows and axes are Python values produced while tracing: trace once (cheap) for them, then run compiled.
  rows_axes = {}

  def meta(l, i):
    g, rows, axes = run(l, i)
    rows_axes["rows"], rows_axes["axes"] = rows, axes
    return g

  jax.eval_shape(meta, leaves, inputs)
  grams = jitted(leaves, inputs)
  return GramCapture(grams, rows_axes["rows"], rows_axes["axes"])
