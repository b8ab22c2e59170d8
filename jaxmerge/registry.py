"""The method registry: names, hyperparameters and what each method needs.

``jaxmerge.get_method(name)`` returns the method's factory; calling it with hyperparameters gives a
:class:`~jaxmerge.base.MergeTransform`. Unknown names and unknown hyperparameters raise ``ValueError`` with
the valid choices.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, NamedTuple

__all__ = ["MethodInfo", "get_method", "list_methods", "method_info", "register"]

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
  """

  name: str
  factory: Callable[..., Any]
  family: str
  data: str
  storage: str
  per_task: bool
  reference: str
  hparams: dict


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
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
  """Decorator that adds a factory to the registry under ``name``.

  Args:
    name: the registry name.
    family: the survey's family (``weighted_average``, ``sparsification``, ``subspace``, ...).
    data: data the method needs: ``none``, ``val``, ``aux`` or ``tta``.
    storage: extra storage beyond one model.
    per_task: the method keeps one model per task (:func:`jaxmerge.merge_per_task`).
    reference: the paper's URL.

  Returns:
    A decorator that registers the factory and returns it unchanged.
  """
  if family not in FAMILIES:
    raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
  if data not in DATA:
    raise ValueError(f"data must be one of {DATA}, got {data!r}")

  def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
    hparams = _defaults(fn)

    @functools.wraps(fn)
    def checked(**kwargs: Any) -> Any:
      unknown = sorted(set(kwargs) - set(hparams))
      if unknown:
        raise ValueError(
            f"unknown hyperparameter(s) {unknown} for method {name!r}; valid: {sorted(hparams)}"
        )
      return fn(**kwargs)

    if name in _REGISTRY:
      raise ValueError(f"method {name!r} is registered twice")
    _REGISTRY[name] = MethodInfo(name, checked, family, data, storage, per_task, reference, hparams)
    return fn

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
