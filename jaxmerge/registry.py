"""The method registry: names, hyperparameters and what each method needs.

``jaxmerge.get_method(name)`` returns the method's factory; calling it with hyperparameters gives a
:class:`~jaxmerge.base.MergeTransform`. Unknown names and unknown hyperparameters raise ``ValueError`` with
the valid choices.

Each method declares its hyperparameters once (``register(..., params={name: Hparam})``: type, range,
finiteness, choices); the factory checks every value it is called with against that description and raises
``ValueError`` naming the method, the hyperparameter, the allowed range and the value. The same descriptions
back ``jaxmerge merge --hparam``, both YAML schemas (:mod:`jaxmerge.config`) and ``jaxmerge methods``.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, Callable, NamedTuple

__all__ = ["Hparam", "MethodInfo", "choice", "flag", "get_method", "integer", "list_methods", "mapping", "method_info",
           "method_name", "real", "register", "validate"]

FAMILIES = ("weighted_average", "sparsification", "subspace", "moe", "adaptation")
DATA = ("none", "val", "aux", "tta")


class MethodInfo(NamedTuple):
  """What the registry knows about a method.

  Attributes:
    name: registry name.
    factory: the function that builds the transform from hyperparameters.
    family: the survey's family (weighted_average, sparsification, subspace, moe, adaptation).
    data: ``"none"``, ``"val"`` (labeled validation data), ``"aux"`` (unlabeled inputs per task) or
      ``"tta"`` (unlabeled test inputs of every task).
    storage: extra storage beyond one model (``"none"`` or a short description).
    per_task: whether it yields one model per task (needs the task id at inference): use
      :func:`jaxmerge.merge_per_task`.
    reference: paper link.
    hparams: default hyperparameters, from the factory's signature.
    params: ``{name: Hparam}``, the declared type and range of each hyperparameter.
  """

  name: str
  factory: Callable[..., Any]
  family: str
  data: str
  storage: str
  per_task: bool
  reference: str
  hparams: dict
  params: dict = {}


class Hparam(NamedTuple):
  """The declared type and range of one hyperparameter (build it with :func:`real`, :func:`integer`,
  :func:`flag`, :func:`choice` or :func:`mapping`).

  Attributes:
    kind: ``"real"`` (a finite number), ``"int"``, ``"bool"``, ``"choice"``, ``"mapping"`` or ``"method"`` (a
      registered method's name).
    lo, hi: the bounds of a number (``None``: unbounded).
    lo_open, hi_open: whether a bound is excluded.
    choices: the allowed values of a ``"choice"``.
    optional: ``None`` is allowed (it means the method's documented default).
    per_task: a non-empty list of numbers (one per task) is allowed as well.
  """

  kind: str
  lo: float | None = None
  hi: float | None = None
  lo_open: bool = False
  hi_open: bool = False
  choices: tuple = ()
  optional: bool = False
  per_task: bool = False

  def describe(self) -> str:
    """The allowed values in words, e.g. ``"a finite number in [0, 1]"`` or ``"one of 'sum', 'mean'"``."""
    if self.kind == "choice":
      text = "one of " + ", ".join(repr(c) for c in self.choices)
    elif self.kind == "bool":
      text = "true or false"
    elif self.kind == "mapping":
      text = "a mapping"
    elif self.kind == "method":
      text = "a registered method name (`jaxmerge methods`)"
    else:
      what = "an integer" if self.kind == "int" else "a finite number"
      if self.lo is not None and self.hi is not None:
        text = f"{what} in {'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}{')' if self.hi_open else ']'}"
      elif self.lo is not None:
        text = f"{what} {'>' if self.lo_open else '>='} {_num(self.lo)}"
      elif self.hi is not None:
        text = f"{what} {'<' if self.hi_open else '<='} {_num(self.hi)}"
      else:
        text = what
      if self.per_task:
        text += " (or a list of them, one per task)"
    return text + (" or null" if self.optional else "")

  def check(self, method: str, name: str, value: Any) -> Any:
    """Returns ``value`` when allowed, else raises ``ValueError`` naming the method, the hyperparameter, the
    allowed values and ``value``."""
    if value is None and self.optional:
      return value
    if self.kind == "real" and self.per_task and isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
      if value and all(self._number_ok(v) for v in value):
        return value
    elif self._ok(value):
      return value
    if self.kind == "method" and isinstance(value, str):
      raise ValueError(f"method {method!r}: hyperparameter {name} names an unknown method {value!r}; valid methods: "
                       f"{', '.join(list_methods())}")
    raise ValueError(f"method {method!r}: hyperparameter {name} must be {self.describe()}, got {value!r}")

  def _ok(self, value: Any) -> bool:
    if self.kind == "choice":
      return any(value is c or (type(value) is type(c) and value == c) for c in self.choices)
    if self.kind == "bool":
      return isinstance(value, bool)
    if self.kind == "mapping":
      return isinstance(value, Mapping)
    if self.kind == "method":
      return isinstance(value, str) and value in _REGISTRY
    return self._number_ok(value)

  def _number_ok(self, value: Any) -> bool:
    if getattr(value, "shape", None) == () and getattr(getattr(value, "dtype", None), "kind", "") in "fiu":
      try:  # a 0-d NumPy or JAX array
        value = value.item()
      except Exception:  # noqa: BLE001  (a traced value: checked where it is concrete)
        return True
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
      return False
    if self.kind == "int" and not isinstance(value, numbers.Integral):
      return False
    v = float(value)
    if not math.isfinite(v):
      return False
    if self.lo is not None and (v < self.lo or (self.lo_open and v == self.lo)):
      return False
    if self.hi is not None and (v > self.hi or (self.hi_open and v == self.hi)):
      return False
    return True


def _num(x: float) -> str:
  return str(int(x)) if float(x).is_integer() else repr(x)


def real(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False,
         optional: bool = False, per_task: bool = False) -> Hparam:
  """A finite real number in ``[lo, hi]`` (bounds excluded with ``lo_open``/``hi_open``; ``None``: unbounded).

  Args:
    lo, hi: the bounds.
    lo_open, hi_open: exclude a bound.
    optional: ``None`` is allowed.
    per_task: a list of such numbers (one per task) is allowed too.

  Returns:
    The :class:`Hparam`.
  """
  return Hparam("real", lo, hi, lo_open, hi_open, (), optional, per_task)


def integer(lo: int | None = None, hi: int | None = None, *, optional: bool = False) -> Hparam:
  """An integer in ``[lo, hi]`` (``None``: unbounded); booleans and floats are refused.

  Args:
    lo, hi: the bounds.
    optional: ``None`` is allowed.

  Returns:
    The :class:`Hparam`.
  """
  return Hparam("int", lo, hi, optional=optional)


def flag() -> Hparam:
  """A boolean (``true``/``false``; numbers and strings are refused).

  Returns:
    The :class:`Hparam`.
  """
  return Hparam("bool")


def choice(*values: Any, optional: bool = False) -> Hparam:
  """One of ``values`` (compared with their type: ``1`` is not ``True``).

  Args:
    *values: the allowed values.
    optional: ``None`` is allowed.

  Returns:
    The :class:`Hparam`.
  """
  return Hparam("choice", choices=tuple(values), optional=optional)


def mapping(optional: bool = True) -> Hparam:
  """A mapping of further settings (e.g. a base method's hyperparameters, checked by that method).

  Args:
    optional: ``None`` is allowed.

  Returns:
    The :class:`Hparam`.
  """
  return Hparam("mapping", optional=optional)


def method_name() -> Hparam:
  """The name of a registered method (e.g. the base method of a data-driven search).

  Returns:
    The :class:`Hparam`.
  """
  return Hparam("method")


def validate(name: str, hparams: Mapping[str, Any]) -> dict:
  """Checks hyperparameters against method ``name``'s declaration, without building anything.

  Args:
    name: a registered method name.
    hparams: ``{hyperparameter: value}``.

  Returns:
    ``hparams`` as a dict.

  Raises:
    ValueError: an unknown method or hyperparameter, or a value of the wrong type or out of range (naming the
      method, the hyperparameter, the allowed values and the value).
  """
  info = method_info(name)
  unknown = sorted(set(hparams) - set(info.hparams))
  if unknown:
    raise ValueError(f"unknown hyperparameter(s) {unknown} for method {name!r}; valid: {sorted(info.hparams)}")
  for k, v in hparams.items():
    if k in info.params:
      info.params[k].check(name, k, v)
  return dict(hparams)


_REGISTRY: dict[str, MethodInfo] = {}


def _defaults(fn: Callable[..., Any]) -> dict:
  return {
      k: p.default
      for k, p in inspect.signature(fn).parameters.items()
      if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
  }


def register(
    name: str,
    *,
    family: str,
    data: str = "none",
    storage: str = "none",
    per_task: bool = False,
    reference: str = "",
    params: Mapping[str, Hparam] | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
  """Decorator that adds a factory to the registry under ``name``.

  Args:
    name: the registry name.
    family: the survey's family (``weighted_average``, ``sparsification``, ``subspace``, ...).
    data: data the method needs: ``none``, ``val``, ``aux`` or ``tta``.
    storage: extra storage beyond one model.
    per_task: the method keeps one model per task (:func:`jaxmerge.merge_per_task`).
    reference: the paper's URL.
    params: ``{hyperparameter: Hparam}`` for every argument of the factory (:func:`real`, :func:`integer`,
      :func:`flag`, :func:`choice`, :func:`mapping`).

  Returns:
    A decorator that registers the factory and returns it wrapped: every call (by keyword or position) checks
    the hyperparameters against ``params`` first.
  """
  if family not in FAMILIES:
    raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
  if data not in DATA:
    raise ValueError(f"data must be one of {DATA}, got {data!r}")

  def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
    hparams = _defaults(fn)
    declared = dict(params or {})
    stray = sorted(set(declared) - set(hparams))
    if stray:
      raise ValueError(f"method {name!r} declares hyperparameters {stray} that its factory does not take")
    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def checked(*args: Any, **kwargs: Any) -> Any:
      unknown = sorted(set(kwargs) - set(hparams))
      if unknown:
        raise ValueError(
            f"unknown hyperparameter(s) {unknown} for method {name!r}; valid: {sorted(hparams)}"
        )
      try:
        bound = sig.bind(*args, **kwargs)
      except TypeError as e:
        raise ValueError(f"method {name!r}: {e}") from None
      for k, v in bound.arguments.items():
        if k in declared:
          declared[k].check(name, k, v)
      return fn(*args, **kwargs)

    if name in _REGISTRY:
      raise ValueError(f"method {name!r} is registered twice")
    _REGISTRY[name] = MethodInfo(name, checked, family, data, storage, per_task, reference, hparams, declared)
    return checked

  return deco


def list_methods() -> list[str]:
  """Sorted names of every registered method.

  Returns:
    A sorted list of method names.
  """
  return sorted(_REGISTRY)


def method_info(name: str) -> MethodInfo:
  """The :class:`MethodInfo` of ``name``; raises ``ValueError`` listing the valid names.

  Args:
    name: a registered method name.

  Returns:
    The method's :class:`MethodInfo` (family, data needed, extra storage, reference, defaults).
  """
  if name not in _REGISTRY:
    raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(list_methods())}")
  return _REGISTRY[name]


def get_method(name: str) -> Callable[..., Any]:
  """The factory of ``name``: ``get_method("ties")(density=0.2)`` returns a MergeTransform.

  Unknown hyperparameter names raise ``ValueError`` listing the valid ones.

  Args:
    name: a registered method name (see :func:`list_methods`).

  Returns:
    The method's factory; calling it with hyperparameters returns a
    :class:`~jaxmerge.base.MergeTransform` (or a config object for methods that need data).

  Raises:
    ValueError: an unknown name (listing the valid ones).
  """
  return method_info(name).factory
