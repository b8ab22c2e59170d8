"""mergekit's parameter settings, resolved per tensor: per-model values, tensor filters and layer gradients.

A setting (a value in a ``parameters:`` mapping) is one of

- a scalar (``0.5``, ``true``);
- a gradient: a list of numbers interpolated linearly over ``t`` in ``[0, 1]`` (``[0, 0.5, 1]``), where ``t`` is
  the layer's position in its slice (``index / (layers - 1)``; ``1`` for a single layer; ``0`` for tensors
  outside the layers: embeddings, final norm, head); a list of booleans or strings picks
  ``values[int(t * (len - 1))]``;
- a filtered value ``{filter: NAME, value: SETTING}`` or a list of them: the first whose ``filter`` is a substring
  of the tensor's name (or is missing or ``"*"``) applies; none matching means "not set here".

For each tensor, a parameter is looked up from the most specific scope to the least: a model's own
``parameters`` (per-input parameters only), then the enclosing scopes (a slice's, then the config's global
``parameters``), then the method's default (:data:`METHODS`). :class:`Resolver` does this for one tensor name
and ``t``; :func:`layer_t` computes ``t`` for a whole-model merge.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["METHODS", "MethodSpec", "Param", "Resolver", "check_setting", "layer_index", "layer_t", "unused_names"]

REQUIRED = object()


@dataclasses.dataclass(frozen=True)
class Param:
  """One parameter of a mergekit method.

  Attributes:
    name: the YAML key.
    kind: ``"float"``, ``"int"`` or ``"bool"``.
    scope: ``"shared"`` (one value for the tensor), ``"input"`` (one per input, the base included) or
      ``"non_base"`` (one per input other than the base).
    default: the default value, or :data:`REQUIRED`.
    lo: the smallest valid value (numbers), or ``None``.
    hi: the largest valid value, or ``None``.
  """

  name: str
  kind: str
  scope: str
  default: Any = REQUIRED
  lo: float | None = None
  hi: float | None = None


@dataclasses.dataclass(frozen=True)
class MethodSpec:
  """A mergekit method's parameters and input contract.

  Attributes:
    name: the method (``merge_method``).
    params: its parameters.
    base: ``"required"``, ``"optional"`` (used when given) or ``"ignored"`` (the base, when given, is an input
      like the others).
    min_inputs: the fewest inputs (base included).
    max_inputs: the most inputs, or ``None``.
    non_base: ``(min, max)`` inputs besides the base, or ``None``.
  """

  name: str
  params: tuple[Param, ...]
  base: str = "ignored"
  min_inputs: int = 1
  max_inputs: int | None = None
  non_base: tuple[int, int | None] | None = None

  def param(self, name: str) -> Param | None:
    return next((p for p in self.params if p.name == name), None)


def _gta(normalize: bool, rescale: bool, extra: tuple[Param, ...] = ()) -> tuple[Param, ...]:
  return (Param("int8_mask", "bool", "shared", False), Param("normalize", "bool", "shared", normalize),
          Param("rescale", "bool", "shared", rescale), Param("lambda", "float", "shared", 1.0),
          Param("weight", "float", "non_base"), Param("density", "float", "non_base", 1.0, 0.0, 1.0), *extra)


_GAMMA = Param("gamma", "float", "non_base", 0.01, 0.0, 1.0)
_EPS = Param("epsilon", "float", "non_base", 0.15, 0.0, 1.0)

METHODS: dict[str, MethodSpec] = {s.name: s for s in (
    MethodSpec("task_arithmetic", _gta(False, False), base="required"),
    MethodSpec("ties", _gta(True, False), base="required"),
    MethodSpec("dare_ties", _gta(False, True), base="required"),
    MethodSpec("dare_linear", _gta(False, True), base="required"),
    MethodSpec("breadcrumbs", _gta(False, False, (_GAMMA,)), base="required"),
    MethodSpec("breadcrumbs_ties", _gta(False, False, (_GAMMA,)), base="required"),
    MethodSpec("della", _gta(True, True, (_EPS,)), base="required"),
    MethodSpec("della_linear", _gta(False, True, (_EPS,)), base="required"),
    MethodSpec("linear", (Param("weight", "float", "input"), Param("normalize", "bool", "shared", True))),
    MethodSpec("slerp", (Param("t", "float", "shared"),), base="required", min_inputs=2, max_inputs=2),
    MethodSpec("nuslerp", (Param("weight", "float", "non_base"), Param("nuslerp_row_wise", "bool", "shared", False),
                           Param("nuslerp_flatten", "bool", "shared", True)), base="optional", non_base=(2, 2)),
    MethodSpec("multislerp", (Param("weight", "float", "non_base"), Param("normalize_weights", "bool", "shared", True),
                              Param("eps", "float", "shared", 1e-8, 0.0)), base="optional", non_base=(1, None)),
    MethodSpec("karcher", (Param("max_iter", "int", "shared", 10, 0), Param("tol", "float", "shared", 1e-5, 0.0))),
    MethodSpec("sce", (Param("int8_mask", "bool", "shared", False),
                       Param("select_topk", "float", "shared", 1.0, 0.0, 1.0)), base="required"),
    MethodSpec("ram", (Param("epsilon", "float", "shared", 1e-5, 0.0),), base="required"),
    MethodSpec("ramplus_tl", (Param("r", "float", "shared", 0.1), Param("alpha", "float", "shared", 0.2),
                              Param("epsilon", "float", "shared", 1e-5, 0.0)), base="required"),
    MethodSpec("nearswap", (Param("t", "float", "shared"),), base="required", min_inputs=2, max_inputs=2),
    MethodSpec("arcee_fusion", (), base="required", min_inputs=2, max_inputs=2),
    MethodSpec("passthrough", (Param("scale", "float", "input", None),), max_inputs=1),
    MethodSpec("model_stock", (Param("filter_wise", "bool", "shared", False),), base="required", min_inputs=3),
)}


def _is_scalar(v: Any) -> bool:
  return isinstance(v, (bool, int, float, str))


def _number(v: Any) -> Any:
  """YAML strings such as ``"1e-3"`` read as numbers (mergekit validates them as floats)."""
  if isinstance(v, str):
    try:
      return float(v)
    except ValueError:
      return v
  return v


def _validate(p: Param, v: Any, what: str) -> Any:
  """``v`` as ``p``'s type, checked against its range; ``ValueError`` naming ``what`` otherwise."""
  if p.kind == "bool":
    if isinstance(v, bool):
      return v
    if isinstance(v, str) and v.lower() in ("true", "false"):
      return v.lower() == "true"
    raise ValueError(f"{what} must be true or false, got {v!r}")
  v = _number(v)
  if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
    raise ValueError(f"{what} must be a finite number, got {v!r}")
  if p.kind == "int":
    if int(v) != v:
      raise ValueError(f"{what} must be an integer, got {v!r}")
    v = int(v)
  else:
    v = float(v)
  if (p.lo is not None and v < p.lo) or (p.hi is not None and v > p.hi):
    rng = f"[{p.lo if p.lo is not None else '-inf'}, {p.hi if p.hi is not None else 'inf'}]"
    raise ValueError(f"{what} must be in {rng}, got {v!r}")
  return v


def check_setting(p: Param, setting: Any, what: str) -> None:
  """Validates a setting's structure and values (gradient endpoints, filtered values) up front.

  Args:
    p: the parameter.
    setting: the YAML value.
    what: how to name it in errors (e.g. ``"parameter 'density' of model m1"``).

  Raises:
    ValueError: a malformed setting or a value of the wrong type or out of range.
  """
  if isinstance(setting, Mapping):
    setting = [setting]
  if _is_scalar(setting) or setting is None:
    if setting is not None:
      _validate(p, setting, what)
    return
  if not isinstance(setting, Sequence) or isinstance(setting, (bytes, bytearray)):
    raise ValueError(f"{what} must be a number, a list of numbers (a gradient over layers) or a list of "
                     f"{{filter, value}}, got {setting!r}")
  if not setting:
    return
  if all(_is_scalar(e) for e in setting):
    for e in setting:
      _validate(p, e, what)
    return
  for cond in setting:
    if not isinstance(cond, Mapping) or "value" not in cond or set(cond) - {"filter", "value"}:
      raise ValueError(f"{what}: each entry of a filtered setting must be {{filter: NAME, value: ...}}, got {cond!r}")
    if cond.get("filter") is not None and not isinstance(cond["filter"], str):
      raise ValueError(f"{what}: filter must be a string, got {cond['filter']!r}")
    if isinstance(cond["value"], Mapping) or (isinstance(cond["value"], list) and cond["value"]
                                              and not all(_is_scalar(e) for e in cond["value"])):
      raise ValueError(f"{what}: a filtered value must be a number or a gradient, got {cond['value']!r}")
    check_setting(p, cond["value"], what)


def evaluate(p: Param, setting: Any, tensor: str, t: float, what: str) -> Any:
  """The value of ``setting`` for ``tensor`` at layer position ``t``, or ``None`` when it does not apply."""
  if isinstance(setting, Mapping):
    setting = [setting]
  if setting is None:
    return None
  if _is_scalar(setting):
    return _validate(p, setting, what)
  if not setting:
    return None
  if all(_is_scalar(e) for e in setting):
    values = [_number(e) if p.kind != "bool" else e for e in setting]
    if p.kind == "bool" or not all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in values):
      return _validate(p, values[int(t * (len(values) - 1))], what)
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return _validate(p, (1 - frac) * values[i0] + frac * values[i1], what)
  for cond in setting:
    f = cond.get("filter")
    if f is None or f == "*" or (tensor and f in tensor):
      return evaluate(p, cond["value"], tensor, t, what)
  return None


_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")


def layer_index(name: str) -> int | None:
  """The decoder layer a tensor belongs to (``model.layers.7.mlp...`` -> 7).

  Args:
    name: a tensor name.

  Returns:
    The layer index, or ``None`` outside the layers.
  """
  m = _LAYER.search(name)
  return int(m.group(1)) if m else None


def layer_t(name: str, num_layers: int) -> float:
  """mergekit's gradient position of a tensor in a whole-model merge.

  Args:
    name: the tensor's name.
    num_layers: the model's number of layers.

  Returns:
    ``index / (num_layers - 1)`` inside the layers (``1`` with a single layer), ``0`` outside them.
  """
  i = layer_index(name)
  if i is None:
    return 0.0
  return i / (num_layers - 1) if num_layers > 1 else 1.0


class Resolver:
  """Per-tensor hyperparameters of one merge.

  Args:
    method: a :data:`METHODS` name.
    shared_scopes: the scopes of shared values, most specific first (e.g. ``[slice params, global params]``).
    input_scopes: per input (mergekit's input order), that input's own settings (``{}`` for none).
    base_index: the base's position among the inputs, or ``None``.
    default_weight: the weight of an input that sets none (mergekit requires one); ``None``: an error.
  """

  def __init__(self, method: str, shared_scopes: Sequence[Mapping[str, Any]],
               input_scopes: Sequence[Mapping[str, Any]], base_index: int | None,
               default_weight: float | None = 1.0):
    self.spec = METHODS[method]
    self.shared_scopes = tuple(dict(s or {}) for s in shared_scopes)
    self.input_scopes = tuple(dict(s or {}) for s in input_scopes)
    self.base_index = base_index
    self.default_weight = default_weight

  def _lookup(self, p: Param, scopes: Sequence[Mapping[str, Any]], tensor: str, t: float, who: str) -> Any:
    what = f"parameter {p.name!r} ({who}, tensor {tensor!r})"
    for scope in scopes:
      if p.name in scope:
        v = evaluate(p, scope[p.name], tensor, t, what)
        if v is not None:
          return v
    if p.default is REQUIRED:
      if p.name == "weight" and self.default_weight is not None:
        return self.default_weight
      raise ValueError(f"merge_method {self.spec.name!r} needs the parameter {p.name!r} for {who}, tensor "
                       f"{tensor!r}")
    return p.default

  def resolve(self, tensor: str, t: float, names: Sequence[str] | None = None) -> tuple[dict, list[dict]]:
    """The hyperparameters of one tensor.

    Args:
      tensor: the tensor's name (filters match substrings of it).
      t: its position for gradients (:func:`layer_t`, or the layer's position in its slice).
      names: the inputs' names for error messages.

    Returns:
      ``(shared, per_input)``: the shared values, and one dict per input (per-input parameters; the base gets
      only ``"input"``-scope ones).
    """
    shared = {p.name: self._lookup(p, self.shared_scopes, tensor, t, "shared")
              for p in self.spec.params if p.scope == "shared"}
    per = []
    for i, own in enumerate(self.input_scopes):
      who = f"model {names[i]}" if names else f"input {i}"
      per.append({p.name: self._lookup(p, (own, *self.shared_scopes), tensor, t, who) for p in self.spec.params
                  if p.scope == "input" or (p.scope == "non_base" and i != self.base_index)})
    return shared, per


def unused_names(method: str, scope: Mapping[str, Any], per_input: bool) -> list[str]:
  """The keys of ``scope`` that mergekit ignores for ``method``.

  Args:
    method: a :data:`METHODS` name.
    scope: a ``parameters`` mapping.
    per_input: whether it is a model's own mapping (shared parameters are ignored there).

  Returns:
    The keys that are not ``method``'s parameters, or (``per_input``) shared parameters set on a model.
  """
  spec = METHODS[method]
  out = []
  for k in scope:
    p = spec.param(k)
    if p is None or (per_input and p.scope == "shared"):
      out.append(k)
  return out
