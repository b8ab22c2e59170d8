"""Static leaf selection: path-and-shape predicates, the matrix view of a leaf, and rule tables.

A filter sees a leaf's path string and its *per-task* ``jax.ShapeDtypeStruct`` (the task axis removed),
never its values, so selections are static under ``jit`` (optax's masking rule) and the same filter
works on a model, on a stack and on a checkpoint.

A *layout* says how a leaf is read as a matrix: it maps ``(path, per-task shape)`` to a :class:`MatrixSpec`
or ``None`` (not a matrix). Formulas in the papers use the PyTorch ``(out, in)`` view; Flax stores Dense
kernels ``(in, out)``. Layout-sensitive methods (Iso-CTS, WUDI, Breadcrumbs, DELLA, ...) read leaves through
the layout, so that the same weights in either layout merge to the same model.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any as _Any
from typing import Callable, NamedTuple

import jax
import numpy as np

from jaxmerge import tree as jtree
from jaxmerge.typing import Filter, Path

__all__ = [
    "All",
    "Any",
    "MatrixSpec",
    "Not",
    "flax_layout",
    "from_matrix",
    "hf_layout",
    "is_linear_kernel",
    "is_matrix",
    "is_vector",
    "labels_from_rules",
    "layout_from_rules",
    "path_contains",
    "path_matches",
    "per_task_struct",
    "to_matrix",
]

Layout = Callable[[Path, jax.ShapeDtypeStruct], "MatrixSpec | None"]


class MatrixSpec(NamedTuple):
  """Which axes of a per-task leaf are the matrix's input and output axes.

  Every axis not listed is a batch axis (stacked layers, heads). The canonical view is
  ``(batch, out, in)`` with the listed axes flattened in order (cf. optax's ``MuonDimensionNumbers``).

  Attributes:
    in_axes: axes that index the input features (columns of the ``out x in`` view).
    out_axes: axes that index the output features (rows of the ``out x in`` view).
  """

  in_axes: tuple[int, ...] = (1,)
  out_axes: tuple[int, ...] = (0,)


HF_MATRIX = MatrixSpec(in_axes=(1,), out_axes=(0,))
FLAX_KERNEL = MatrixSpec(in_axes=(0,), out_axes=(1,))


def hf_layout(path: Path, struct: jax.ShapeDtypeStruct) -> MatrixSpec | None:
  """PyTorch / Hugging Face layout: every 2-D leaf is a matrix stored ``(out, in)``.

  This is the reference implementations' rule (``ndim == 2``): it includes 2-D position-embedding tables and
  projections, and excludes the 4-D patch-embedding convolution.

  Args:
    path: the leaf's path string.
    struct: the per-task ``ShapeDtypeStruct`` of the leaf.

  Returns:
    The leaf's :class:`MatrixSpec`, or ``None`` for a leaf that is not a matrix.
  """
  del path
  return HF_MATRIX if len(struct.shape) == 2 else None


def flax_layout(path: Path, struct: jax.ShapeDtypeStruct) -> MatrixSpec | None:
  """Flax layout: 2-D leaves named ``.../kernel`` are Dense kernels stored ``(in, out)``; other 2-D leaves
  (embedding tables) are read like their Hugging Face counterparts, rows first.

  Args:
    path: the leaf's path string.
    struct: the per-task ``ShapeDtypeStruct`` of the leaf.

  Returns:
    The leaf's :class:`MatrixSpec`, or ``None`` for a leaf that is not a matrix.
  """
  if len(struct.shape) != 2:
    return None
  return FLAX_KERNEL if path.split("/")[-1] == "kernel" else HF_MATRIX


def layout_from_rules(rules: Sequence[tuple[str, MatrixSpec | None]]) -> Layout:
  """A layout from ``[(regex, MatrixSpec or None), ...]``; the first rule whose regex fully matches wins,
  and a leaf no rule matches is not a matrix.

  Args:
    rules: ``[(regex over path strings, MatrixSpec or None), ...]``.

  Returns:
    A layout function ``(path, struct) -> MatrixSpec | None``.
  """
  compiled = [(re.compile(r), spec) for r, spec in rules]

  def layout(path: Path, struct: jax.ShapeDtypeStruct) -> MatrixSpec | None:
    for r, spec in compiled:
      if r.fullmatch(path):
        if spec is not None:
          _check_spec(path, struct.shape, spec)
        return spec
    return None

  return layout


def _check_spec(path: Path, shape: tuple[int, ...], spec: MatrixSpec) -> None:
  axes = tuple(spec.in_axes) + tuple(spec.out_axes)
  if len(set(axes)) != len(axes) or any(a < -len(shape) or a >= len(shape) for a in axes):
    raise ValueError(f"MatrixSpec {spec} does not fit parameter {path!r} of shape {shape}")


def _norm_axes(axes: Sequence[int], ndim: int) -> tuple[int, ...]:
  return tuple(a % ndim for a in axes)


def to_matrix(x: jax.Array, spec: MatrixSpec, batch_dims: int = 0) -> jax.Array:
  """Reshapes a leaf into its canonical ``(*lead, batch, out, in)`` view.

  Args:
    x: the leaf, with ``batch_dims`` leading axes (e.g. the task axis) that ``spec`` does not count.
    spec: the per-task matrix axes.
    batch_dims: how many leading axes to keep in front.

  Returns:
    An array of shape ``(*x.shape[:batch_dims], B, out, in)`` where ``B`` is the product of the other axes.
  """
  lead = x.shape[:batch_dims]
  inner = x.shape[batch_dims:]
  nd = len(inner)
  ins = _norm_axes(spec.in_axes, nd)
  outs = _norm_axes(spec.out_axes, nd)
  rest = tuple(a for a in range(nd) if a not in ins and a not in outs)
  perm = tuple(range(batch_dims)) + tuple(batch_dims + a for a in rest + outs + ins)
  y = x.transpose(perm)
  b = int(np.prod([inner[a] for a in rest], dtype=np.int64))
  m = int(np.prod([inner[a] for a in outs], dtype=np.int64))
  n = int(np.prod([inner[a] for a in ins], dtype=np.int64))
  return y.reshape(lead + (b, m, n))


def from_matrix(y: jax.Array, spec: MatrixSpec, shape: tuple[int, ...], batch_dims: int = 0) -> jax.Array:
  """Inverse of :func:`to_matrix`: ``shape`` is the original leaf's shape (including lead axes).

  Args:
    y: the matrix view (``batch_dims`` lead axes, then ``(out, in)``).
    spec: the leaf's :class:`MatrixSpec`.
    shape: the original leaf's shape.
    batch_dims: number of lead axes (e.g. 1 for a task axis).

  Returns:
    An array of ``shape``.
  """
  lead = shape[:batch_dims]
  inner = shape[batch_dims:]
  nd = len(inner)
  ins = _norm_axes(spec.in_axes, nd)
  outs = _norm_axes(spec.out_axes, nd)
  rest = tuple(a for a in range(nd) if a not in ins and a not in outs)
  order = rest + outs + ins
  y = y.reshape(lead + tuple(inner[a] for a in order))
  inv = np.argsort(order)
  perm = tuple(range(batch_dims)) + tuple(batch_dims + int(a) for a in inv)
  return y.transpose(perm)


def per_task_struct(x: _Any) -> jax.ShapeDtypeStruct:
  """The ``ShapeDtypeStruct`` of one task's slice of a stacked leaf.

  Args:
    x: a stacked leaf ``(T, ...)`` (an array or a ``ShapeDtypeStruct``).

  Returns:
    The ``ShapeDtypeStruct`` of shape ``(...)``.
  """
  return jax.ShapeDtypeStruct(tuple(np.shape(x))[1:], jax.numpy.result_type(x))


# ----------------------------------------------------------------------------------------------------------
# Predicates and their algebra (cf. flax.nnx.filterlib).


def is_matrix(path: Path, struct: jax.ShapeDtypeStruct) -> bool:
  """A per-task leaf of rank 2 (the reference implementations' matrix rule).

  Args:
    path: the leaf's path string.
    struct: the per-task ``ShapeDtypeStruct`` of the leaf.

  Returns:
    Whether the leaf is selected.
  """
  del path
  return len(struct.shape) == 2


def is_vector(path: Path, struct: jax.ShapeDtypeStruct) -> bool:
  """Any leaf that is not of rank 2.

  Args:
    path: the leaf's path string.
    struct: the per-task ``ShapeDtypeStruct`` of the leaf.

  Returns:
    Whether the leaf is selected.
  """
  return not is_matrix(path, struct)


def is_linear_kernel(path: Path, struct: jax.ShapeDtypeStruct) -> bool:
  """A rank-2 leaf whose path ends in ``kernel`` or ``weight`` and is not an embedding table.

  Args:
    path: the leaf's path string.
    struct: the per-task ``ShapeDtypeStruct`` of the leaf.

  Returns:
    Whether the leaf is selected.
  """
  last = path.replace(".", "/").split("/")
  return len(struct.shape) == 2 and last[-1] in ("kernel", "weight") and not any("embed" in s for s in last)


def path_matches(regex: str) -> Filter:
  """Selects leaves whose path *fully* matches ``regex`` (big_vision's rule).

  Args:
    regex: a regular expression over path strings.

  Returns:
    A filter ``(path, struct) -> bool``.
  """
  r = re.compile(regex)
  return lambda path, struct: r.fullmatch(path) is not None


def path_contains(substring: str) -> Filter:
  """Selects leaves whose path contains ``substring``.

  Args:
    substring: the text to look for.

  Returns:
    A filter ``(path, struct) -> bool``.
  """
  return lambda path, struct: substring in path


class Not:
  """Negates a filter."""

  def __init__(self, f: Filter):
    self.f = f

  def __call__(self, path: Path, struct: jax.ShapeDtypeStruct) -> bool:
    return not self.f(path, struct)


class Any:
  """Selects a leaf that any of the filters selects."""

  def __init__(self, *fs: Filter):
    self.fs = fs

  def __call__(self, path: Path, struct: jax.ShapeDtypeStruct) -> bool:
    return any(f(path, struct) for f in self.fs)


class All:
  """Selects a leaf that all of the filters select."""

  def __init__(self, *fs: Filter):
    self.fs = fs

  def __call__(self, path: Path, struct: jax.ShapeDtypeStruct) -> bool:
    return all(f(path, struct) for f in self.fs)


def labels_from_rules(rules: Sequence[tuple[str, str]], tree: _Any, *, stacked: bool = True) -> _Any:
  """A label tree from ``[(regex, label), ...]`` (first full match wins), for :func:`jaxmerge.partition`.

  Args:
    rules: regex over path strings and the label to give.
    tree: a model or a stack (``stacked=True``) whose structure the labels follow.
    stacked: whether ``tree`` has a leading task axis.

  Returns:
    A tree of labels with ``tree``'s structure.

  Raises:
    ValueError: a leaf that no rule matches (name it with a catch-all ``(".*", label)``).
  """
  compiled = [(re.compile(r), label) for r, label in rules]

  def label(path: Path, x: _Any) -> str:
    del x
    for r, lab in compiled:
      if r.fullmatch(path):
        return lab
    raise ValueError(f"no rule matches parameter {path!r}; add a catch-all rule ('.*', label)")

  del stacked
  return jtree.map_with_path(label, tree)
