"""Merge configurations: jaxmerge's YAML schema and the common subset of mergekit's, resolved to one
:class:`MergeSpec` (a transform plus the checkpoints it merges).

jaxmerge's schema names a registry method and its hyperparameters::

    method: ties                 # jm.list_methods()
    base: path/to/pretrained     # safetensors file or directory, Hugging Face directory, orbax directory
    models: [path/a, path/b]
    hparams: {density: 0.2, scale: 0.3}
    dtype: bfloat16              # output dtype (default: the base checkpoint's); math is float32
    seed: 0                      # PRNG seed for stochastic methods
    vocab_policy: error          # error | truncate | pad_base (jaxmerge.io.llm)

mergekit's schema (``merge_method``, ``base_model``, ``models: [{model, parameters}]``, ``parameters``,
``dtype``/``out_dtype``) is recognized by its ``merge_method`` key and reproduces mergekit's semantics, which
differ from the papers' and FusionBench's (METHODS.md section 7 item 11):

=================  ==========================================================================================
mergekit           jaxmerge
=================  ==========================================================================================
task_arithmetic    ``base + lambda * sum_t w_t tau_t`` (divided by ``sum_t w_t`` with ``normalize``)
linear             ``sum_i w_i theta_i / sum_i w_i`` over the listed models (the base counts only if listed)
ties               per tensor: keep exactly ``max(1, int(density n))`` magnitudes, weight, elect the sign of the
                   weighted sum (a zero sum elects ``+``), disjoint sum, or weighted disjoint mean with
                   ``normalize`` (default), times ``lambda``; ``ties(scope="leaf", count="exact",
                   zero_sign="positive")``
dare_ties          per-tensor random keep with probability ``density``, L1 rescale per tensor (``rescale``,
                   default), then ties' election without a magnitude trim, disjoint sum (``normalize``: mean)
dare_linear        random keep, L1 rescale, weighted sum (``normalize``: divided by the sum of the weights)
breadcrumbs(_ties) per tensor: drop the top ``gamma``, keep the next ``density`` (``density >= 1``: no mask)
della(_linear)     MAGPRUNE with ``epsilon`` as the half-width; mergekit's default L1 rescale needs
                   ``della(rescale="l1")``, which jaxmerge lacks (``rescale: false`` works)
slerp              per tensor, the base is ``t = 0``; ``t`` must be one number (no layer gradients)
model_stock        mean pairwise cosine per tensor (``filter_wise: false``)
=================  ==========================================================================================

mergekit computes in the config's ``dtype``; jaxmerge computes in float32 and writes ``out_dtype`` (else
``dtype``, else the base's dtype). Per-model ``weight`` defaults to 1 (mergekit requires it). Settings jaxmerge
cannot reproduce exactly (layer gradients, per-model densities that differ, weighted ``normalize`` for TIES,
LoRA references, slices) raise ``ValueError`` naming the setting.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

from jaxmerge import registry as _registry

__all__ = ["MergeSpec", "from_dict", "is_mergekit", "load_yaml", "resolve", "DTYPES", "canonical_dtype"]

DTYPES = ("float32", "bfloat16", "float16")
_DTYPE_ALIASES = {"float32": "float32", "fp32": "float32", "float": "float32", "f32": "float32",
                  "bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16",
                  "half": "float16", "f16": "float16"}
JAXMERGE_KEYS = ("method", "base", "models", "hparams", "dtype", "seed", "layout", "names", "vocab_policy")
MERGEKIT_KEYS = ("merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source",
                 "chat_template", "tokenizer", "slices", "modules", "seed", "vocab_policy", "layout")
MERGEKIT_METHODS = ("task_arithmetic", "linear", "ties", "dare_ties", "dare_linear", "breadcrumbs",
                    "breadcrumbs_ties", "della", "della_linear", "slerp", "model_stock")
VOCAB_POLICIES = ("error", "truncate", "pad_base")


@dataclasses.dataclass(frozen=True)
class MergeSpec:
  """A resolved merge.

  Attributes:
    method: what is run, for messages and ``merge_info.json`` (a registry name, or ``mergekit:<name>``).
    tx: the :class:`~jaxmerge.base.MergeTransform`.
    base: the pretrained checkpoint's path.
    models: the fine-tuned checkpoints' paths (the task order).
    names: model names for error messages.
    hparams: the hyperparameters as given (registry methods) or as mapped (mergekit).
    dtype: output dtype name, or ``None`` for the base checkpoint's dtypes.
    seed: PRNG seed.
    per_task: one output model per task (``merge_per_task``).
    layout: ``"hf"`` or ``"flax"`` (how 2-D weights are stored).
    vocab_policy: ``"error"``, ``"truncate"`` or ``"pad_base"`` (:mod:`jaxmerge.io.llm`).
    registry_method: the registry name and hyperparameters when ``tx`` came from the registry (lets the
      streaming merge find an exact two-pass plan for a non-leafwise method), else ``None``.
    source: ``"jaxmerge"`` or ``"mergekit"``.
    notes: semantic notes worth printing (approximations, defaults filled in).
  """

  method: str
  tx: Any
  base: str
  models: tuple[str, ...]
  names: tuple[str, ...]
  hparams: dict
  dtype: str | None = None
  seed: int = 0
  per_task: bool = False
  layout: str = "hf"
  vocab_policy: str = "error"
  registry_method: tuple[str, dict] | None = None
  source: str = "jaxmerge"
  notes: tuple[str, ...] = ()


def canonical_dtype(value: Any, what: str = "dtype") -> str | None:
  """``"bf16"`` -> ``"bfloat16"`` etc.; ``None`` stays ``None``; anything else raises ``ValueError``.

  Args:
    value: a dtype name or alias (case-insensitive: ``float32``/``fp32``/``f32``/``float``,
      ``bfloat16``/``bf16``, ``float16``/``fp16``/``f16``/``half``), or ``None``.
    what: how to name the value in the error message.

  Returns:
    One of ``DTYPES``, or ``None``.

  Raises:
    ValueError: an unknown dtype name.
  """
  if value is None:
    return None
  name = _DTYPE_ALIASES.get(str(value).lower())
  if name is None:
    raise ValueError(f"{what} must be one of {DTYPES}, got {value!r}")
  return name


def load_yaml(path: str | os.PathLike) -> dict:
  """Reads a YAML mapping; ``ValueError`` naming the file on unreadable or invalid YAML.

  Args:
    path: the YAML file.

  Returns:
    The parsed mapping (``{}`` for an empty file).

  Raises:
    ValueError: an unreadable file, invalid YAML, or a document that is not a mapping.
  """
  import yaml  # noqa: PLC0415

  try:
    cfg = yaml.safe_load(pathlib.Path(path).read_text())
  except OSError as e:
    raise ValueError(f"cannot read config {path}: {e}") from e
  except yaml.YAMLError as e:
    raise ValueError(f"config {path} is not valid YAML: {e}") from e
  if cfg is None:
    cfg = {}
  if not isinstance(cfg, dict):
    raise ValueError(f"config {path} must be a mapping, got {type(cfg).__name__}")
  return cfg


def is_mergekit(cfg: Mapping[str, Any]) -> bool:
  """Whether a config dict is in mergekit's schema (it has ``merge_method``).

  Args:
    cfg: the parsed YAML.

  Returns:
    ``True`` for mergekit's schema, ``False`` for jaxmerge's.
  """
  return "merge_method" in cfg


def from_dict(cfg: Mapping[str, Any], *, where: str = "config", relative_to: str | os.PathLike | None = None) -> MergeSpec:
  """Resolves a config dict (either schema) to a :class:`MergeSpec`.

  Args:
    cfg: the parsed YAML.
    where: how to name the config in errors.
    relative_to: directory that relative checkpoint paths are resolved against (e.g. the YAML's directory);
      ``None`` keeps them as given (relative to the working directory).

  Returns:
    The :class:`MergeSpec`.
  """
  spec = _from_mergekit(cfg, where) if is_mergekit(cfg) else _from_jaxmerge(cfg, where)
  if relative_to is not None:
    fix = lambda p: p if os.path.isabs(p) else str(pathlib.Path(relative_to) / p)  # noqa: E731
    if not os.path.exists(spec.base) and os.path.exists(fix(spec.base)):
      spec = dataclasses.replace(spec, base=fix(spec.base))
    models = tuple(m if os.path.exists(m) or not os.path.exists(fix(m)) else fix(m) for m in spec.models)
    spec = dataclasses.replace(spec, models=models)
  return spec


def resolve(cfg: Mapping[str, Any], overrides: Mapping[str, Any] | None = None, *, where: str = "config",
            relative_to: str | os.PathLike | None = None) -> MergeSpec:
  """Applies command-line ``overrides`` to a config dict, then resolves it (see :func:`from_dict`).

  ``overrides`` keys: ``method``, ``base``, ``models``, ``hparams`` (merged into the config's), ``dtype``,
  ``seed``, ``layout``, ``vocab_policy``. With a mergekit config only ``dtype``, ``seed``, ``layout`` and
  ``vocab_policy`` may be overridden.

  Args:
    cfg: the parsed YAML (either schema; ``{}`` when only flags are given).
    overrides: the flags' values; ``None``, empty lists and empty dicts count as not given.
    where: how to name the config in errors.
    relative_to: directory that relative checkpoint paths are resolved against (see :func:`from_dict`).

  Returns:
    The :class:`MergeSpec`.

  Raises:
    ValueError: a mergekit config with overridden ``method``, ``base``, ``models`` or ``hparams``, or an
      invalid config.
  """
  cfg = dict(cfg)
  overrides = {k: v for k, v in (overrides or {}).items() if v is not None and v != [] and v != {}}
  if is_mergekit(cfg):
    bad = sorted(set(overrides) & {"method", "base", "models", "hparams"})
    if bad:
      raise ValueError(f"{where} is a mergekit config: set {bad} in the YAML (flags only override dtype, seed, "
                       "layout and vocab_policy)")
    if "dtype" in overrides:
      cfg["out_dtype"] = overrides.pop("dtype")
    cfg.update(overrides)
    return from_dict(cfg, where=where, relative_to=relative_to)
  hp = _mapping(cfg.get("hparams"), "hparams", where)
  hp.update(overrides.pop("hparams", {}) or {})
  cfg.update(overrides)
  cfg["hparams"] = hp
  return from_dict(cfg, where=where, relative_to=relative_to)


# ----------------------------------------------------------------------------------------------------------
# jaxmerge schema.


def _check_common(cfg: Mapping[str, Any], where: str) -> tuple[int, str, str]:
  seed = cfg.get("seed", 0)
  if seed is None:
    seed = 0
  if isinstance(seed, bool) or not isinstance(seed, int):
    raise ValueError(f"{where}: seed must be an integer, got {seed!r}")
  layout = cfg.get("layout") or "hf"
  if layout not in ("hf", "flax"):
    raise ValueError(f"{where}: layout must be 'hf' or 'flax', got {layout!r}")
  policy = cfg.get("vocab_policy") or "error"
  if policy not in VOCAB_POLICIES:
    raise ValueError(f"{where}: vocab_policy must be one of {VOCAB_POLICIES}, got {policy!r}")
  return seed, layout, policy


def _mapping(value: Any, what: str, where: str) -> dict:
  """``value`` as a dict with string keys (``None`` is empty); ``ValueError`` naming ``what`` otherwise."""
  if value is None:
    return {}
  if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
    raise ValueError(f"{where}: {what} must be a mapping of names to values, got {value!r}")
  return dict(value)


def _path(value: Any, what: str, where: str) -> str:
  if not isinstance(value, (str, os.PathLike)) or not str(value):
    raise ValueError(f"{where}: {what} must be a checkpoint path, got {value!r}")
  return str(value)


def _from_jaxmerge(cfg: Mapping[str, Any], where: str) -> MergeSpec:
  import jaxmerge as jm  # noqa: PLC0415

  unknown = sorted(set(cfg) - set(JAXMERGE_KEYS))
  if unknown:
    raise ValueError(f"{where} has unknown keys {unknown}; valid: {', '.join(sorted(JAXMERGE_KEYS))} "
                     "(or mergekit's schema, with merge_method)")
  for k in ("method", "base", "models"):
    if not cfg.get(k):
      flag = "--model" if k == "models" else f"--{k}"
      raise ValueError(f"no {k} given ({where} key {k!r} or {flag})")
  models = cfg["models"]
  if isinstance(models, (str, os.PathLike)):
    models = [models]
  if not isinstance(models, Sequence):
    raise ValueError(f"{where}: models must be a list of checkpoint paths")
  models = tuple(_path(m, "each model", where) for m in models)
  base = _path(cfg["base"], "base", where)
  hparams = _mapping(cfg.get("hparams"), "hparams", where)
  if not isinstance(cfg["method"], str):
    raise ValueError(f"{where}: method must be a registry name (`jaxmerge methods`), got {cfg['method']!r}")
  info = jm.method_info(cfg["method"])
  if info.data != "none":
    raise ValueError(f"method {info.name!r} needs data ({info.data}); `jaxmerge merge` runs data-free methods "
                     f"({', '.join(n for n in jm.list_methods() if jm.method_info(n).data == 'none')})")
  tx = info.factory(**hparams)
  seed, layout, policy = _check_common(cfg, where)
  names = cfg.get("names") or models
  if isinstance(names, (str, bytes)) or not isinstance(names, Sequence):
    raise ValueError(f"{where}: names must be a list, one per model")
  names = tuple(str(n) for n in names)
  if len(names) != len(models):
    raise ValueError(f"{where}: {len(names)} names for {len(models)} models")
  return MergeSpec(
      method=info.name, tx=tx, base=base, models=models, names=names, hparams=hparams,
      dtype=canonical_dtype(cfg.get("dtype"), f"{where}: dtype"), seed=seed, per_task=info.per_task,
      layout=layout, vocab_policy=policy, registry_method=(info.name, hparams), source="jaxmerge")


# ----------------------------------------------------------------------------------------------------------
# mergekit schema.

_SHARED = {"normalize", "lambda", "rescale", "int8_mask", "t", "filter_wise"}
_PER_MODEL = {"weight", "density", "gamma", "epsilon"}
_ALLOWED_PARAMS = {
    "task_arithmetic": {"weight", "normalize", "lambda", "int8_mask"},
    "linear": {"weight", "normalize"},
    "ties": {"weight", "density", "normalize", "lambda", "rescale", "int8_mask"},
    "dare_ties": {"weight", "density", "normalize", "lambda", "rescale", "int8_mask"},
    "dare_linear": {"weight", "density", "normalize", "lambda", "rescale", "int8_mask"},
    "breadcrumbs": {"weight", "density", "gamma", "normalize", "lambda", "rescale", "int8_mask"},
    "breadcrumbs_ties": {"weight", "density", "gamma", "normalize", "lambda", "rescale", "int8_mask"},
    "della": {"weight", "density", "epsilon", "normalize", "lambda", "rescale", "int8_mask"},
    "della_linear": {"weight", "density", "epsilon", "normalize", "lambda", "rescale", "int8_mask"},
    "slerp": {"t"},
    "model_stock": {"filter_wise"},
}
# The declared type and range of each mergekit parameter (jaxmerge.registry's descriptions): a NaN weight or a
# density of 1.5 is an error naming the parameter, not a NaN model.
MERGEKIT_PARAMS = {
    "weight": _registry.real(), "density": _registry.real(0, 1), "gamma": _registry.real(0, 1),
    "epsilon": _registry.real(0, 1), "lambda": _registry.real(), "t": _registry.real(0, 1),
    "normalize": _registry.flag(), "rescale": _registry.flag(), "int8_mask": _registry.flag(),
    "filter_wise": _registry.flag(),
}
_DEFAULTS = {  # (normalize, rescale) defaults of mergekit 0.1.5's generalized task arithmetic methods
    "task_arithmetic": (False, False), "ties": (True, False), "dare_ties": (False, True),
    "dare_linear": (False, True), "breadcrumbs": (False, False), "breadcrumbs_ties": (False, False),
    "della": (True, True), "della_linear": (False, True), "linear": (True, False),
}


def _scalar(value: Any, name: str, owner: str, where: str) -> Any:
  if isinstance(value, (bool, int, float)):
    decl = MERGEKIT_PARAMS.get(name)
    if decl is not None and not decl._ok(value):
      raise ValueError(f"{where}: parameter {name!r} of {owner} must be {decl.describe()}, got {value!r}")
    return value
  raise ValueError(f"{where}: parameter {name!r} of {owner} is {value!r}; jaxmerge supports one number per "
                   "parameter (mergekit's layer gradients and tensor filters are not supported)")


def _model_ref(value: Any, where: str) -> str:
  if isinstance(value, Mapping):
    if value.get("lora"):
      raise ValueError(f"{where}: LoRA model references are not supported ({value})")
    value = value.get("model", value.get("path"))
    if isinstance(value, Mapping):
      value = value.get("path")
  ref = _path(value, "each model", where)
  if "+" in ref and not os.path.exists(ref):
    raise ValueError(f"{where}: model reference {ref!r} looks like mergekit's 'model+lora' form, which is not "
                     "supported")
  return ref


def _from_mergekit(cfg: Mapping[str, Any], where: str) -> MergeSpec:
  from jaxmerge import reductions as R  # noqa: PLC0415
  from jaxmerge import transforms as T  # noqa: PLC0415
  from jaxmerge.combine import chain  # noqa: PLC0415
  from jaxmerge.registry import get_method  # noqa: PLC0415

  unknown = sorted(set(cfg) - set(MERGEKIT_KEYS))
  if unknown:
    raise ValueError(f"{where} (mergekit schema) has unknown keys {unknown}; supported: "
                     f"{', '.join(k for k in MERGEKIT_KEYS if k not in ('slices', 'modules', 'tokenizer'))}")
  for k in ("slices", "modules", "tokenizer"):
    if cfg.get(k):
      raise ValueError(f"{where}: mergekit's {k!r} is not supported (jaxmerge merges whole models listed under "
                       "'models')")
  if cfg.get("chat_template") is not None:
    raise ValueError(f"{where}: mergekit's 'chat_template' is not supported (jaxmerge copies the base model's "
                     "tokenizer files, chat template included, unchanged); remove it")
  if not isinstance(cfg["merge_method"], str):
    raise ValueError(f"{where}: merge_method must be a name, got {cfg['merge_method']!r}")
  method = cfg["merge_method"]
  if method not in MERGEKIT_METHODS:
    raise ValueError(f"{where}: merge_method {method!r} is not supported; supported mergekit methods: "
                     f"{', '.join(MERGEKIT_METHODS)}")
  notes: list[str] = []
  tok = cfg.get("tokenizer_source")
  seed, layout, policy = _check_common(cfg, where)
  if tok not in (None, "base"):
    raise ValueError(f"{where}: tokenizer_source {tok!r} is not supported (only 'base', which keeps the base "
                     "vocabulary: vocab_policy pad_base, rows aligned by token id)")
  if tok == "base" and "vocab_policy" not in cfg:
    policy = "pad_base"
    notes.append("tokenizer_source: base -> vocab_policy pad_base (embedding rows aligned by token id)")
  base = _model_ref(cfg["base_model"], where) if cfg.get("base_model") else None
  entries = cfg.get("models") or []
  if not isinstance(entries, Sequence) or isinstance(entries, (str, bytes)):
    raise ValueError(f"{where}: models must be a list of {{model: PATH, parameters: {{...}}}}")
  allowed = _ALLOWED_PARAMS[method]
  glob = _mapping(cfg.get("parameters"), "parameters", where)
  for k, v in glob.items():
    if k not in allowed:
      raise ValueError(f"{where}: parameter {k!r} does not apply to merge_method {method!r}; valid: {sorted(allowed)}")
    _scalar(v, k, "parameters", where)
  models, params = [], []
  for e in entries:
    ref = _model_ref(e, where)
    own = _mapping(e.get("parameters"), f"the parameters of model {ref}", where) if isinstance(e, Mapping) else {}
    for k, v in own.items():
      if k not in allowed:
        raise ValueError(f"{where}: parameter {k!r} of model {ref} does not apply to merge_method {method!r}; "
                         f"valid: {sorted(allowed)}")
      if k in _SHARED:
        raise ValueError(f"{where}: {k!r} is a global parameter in mergekit; set it under 'parameters', not on "
                         f"model {ref}")
      _scalar(v, k, f"model {ref}", where)
    models.append(ref)
    params.append({**{k: v for k, v in glob.items() if k in _PER_MODEL}, **own})
  shared = {k: v for k, v in glob.items() if k in _SHARED}
  dtype = canonical_dtype(cfg.get("out_dtype") or cfg.get("dtype"), f"{where}: dtype")
  if cfg.get("dtype") and canonical_dtype(cfg["dtype"]) != "float32":
    notes.append(f"mergekit computes in {cfg['dtype']}; jaxmerge computes in float32 and writes {dtype}")

  if method == "linear":
    if not models:
      raise ValueError(f"{where}: linear needs at least one model")
    pre = base or models[0]
    weights = [float(p.get("weight", 1.0)) for p in params]
    normalize = bool(shared.get("normalize", True))
    total = sum(weights)
    if normalize:
      if abs(total) < 1e-12:
        raise ValueError(f"{where}: linear with normalize needs weights with a nonzero sum, got {weights}")
      coeffs = [w / total for w in weights]
    else:
      if abs(total - 1.0) > 1e-6:
        raise ValueError(f"{where}: linear with normalize: false and weights summing to {total} scales the model "
                         "itself, which jaxmerge's task-vector form does not express; use weights summing to 1")
      coeffs = weights
    tx = R.weighted_sum(coeffs)
    hp = {"weights": coeffs}
    return _mk_spec(method, tx, pre, models, hp, dtype, seed, layout, policy, notes, None)

  if base is None:
    raise ValueError(f"{where}: merge_method {method!r} needs base_model")
  tasks = [(m, p) for m, p in zip(models, params) if m != base]
  if not tasks:
    raise ValueError(f"{where}: no models to merge besides the base model {base}")
  models = [m for m, _ in tasks]
  params = [p for _, p in tasks]

  if method == "slerp":
    if len(models) != 1:
      raise ValueError(f"{where}: slerp merges the base model with exactly one other model, got {models}")
    if "t" not in shared:
      raise ValueError(f"{where}: slerp needs the parameter 't'")
    t = float(shared["t"])
    tx = get_method("slerp")(t=t)
    return _mk_spec(method, tx, base, [base, models[0]], {"t": t}, dtype, seed, layout, policy, notes,
                    ("slerp", {"t": t}))

  if method == "model_stock":
    if shared.get("filter_wise"):
      raise ValueError(f"{where}: model_stock with filter_wise: true is not supported (needs a per-row option)")
    if len(models) < 2:
      raise ValueError(f"{where}: model_stock needs at least two models besides the base")
    hp = {"average": "cosine"}
    return _mk_spec(method, get_method("model_stock")(**hp), base, models, hp, dtype, seed, layout, policy, notes,
                    ("model_stock", hp))

  normalize_default, rescale_default = _DEFAULTS[method]
  normalize = bool(shared.get("normalize", normalize_default))
  rescale = bool(shared.get("rescale", rescale_default))
  lam = float(shared.get("lambda", 1.0))
  weights = [float(p.get("weight", 1.0)) for p in params]
  if any("weight" not in p for p in params):
    notes.append("models without a 'weight' get weight 1 (mergekit requires it)")

  def same(name: str, default: float) -> float:
    values = {float(p.get(name, default)) for p in params}
    if len(values) > 1:
      raise ValueError(f"{where}: per-model {name!r} values differ ({sorted(values)}); jaxmerge applies one {name} "
                       "to every model")
    return values.pop()

  uniform = len(set(weights)) == 1
  w0 = weights[0]
  consensus = method in ("ties", "dare_ties", "breadcrumbs_ties", "della")

  def tail() -> list:
    """Weighting, consensus and reduction steps, mergekit's order: deltas *= w, elect, mix, normalize, lambda."""
    if consensus:
      if not uniform and normalize:
        raise ValueError(f"{where}: {method} with normalize and unequal weights {weights} divides by the sum of "
                         "the weights that survive the sign mask; jaxmerge's disjoint mean counts entries instead "
                         "(needs a weighted disjoint mean); use equal weights or normalize: false")
      if not uniform:
        return [T.scale_tasks(weights), R.disjoint_merge("sum", "leaf", "positive"), T.scale(lam)]
      if w0 <= 0:
        raise ValueError(f"{where}: {method} needs positive weights, got {weights}")
      if normalize:
        return [R.disjoint_merge("mean", "leaf", "positive"), T.scale(lam)]
      return [R.disjoint_merge("sum", "leaf", "positive"), T.scale(lam * w0)]
    total = sum(weights)
    div = (total if abs(total) >= 1e-8 else 1.0) if normalize else 1.0
    coeffs = [w * lam / div for w in weights]
    return [R.weighted_sum(coeffs)]

  if method == "task_arithmetic":
    steps = tail()
    hp = {"weights": weights, "normalize": normalize, "lambda": lam}
    return _mk_spec(method, chain(*steps), base, models, hp, dtype, seed, layout, policy, notes, None)

  density = same("density", 1.0)
  hp = {"weights": weights, "density": density, "normalize": normalize, "rescale": rescale, "lambda": lam}
  if not 0 <= density <= 1:
    raise ValueError(f"{where}: density must be in [0, 1], got {density}")

  if method == "ties":
    if rescale and density < 1:
      raise ValueError(f"{where}: ties with rescale: true (L1 rescale after the magnitude trim) is not supported")
    first = [T.trim(density, "leaf", "exact")] if density < 1 else []
    return _mk_spec(method, chain(*first, *tail()), base, models, hp, dtype, seed, layout, policy, notes, None)

  if method in ("dare_ties", "dare_linear"):
    first = [T.drop(1.0 - density, "l1" if rescale else False)] if density < 1 else []
    return _mk_spec(method, chain(*first, *tail()), base, models, hp, dtype, seed, layout, policy, notes, None)

  if method in ("breadcrumbs", "breadcrumbs_ties"):
    gamma = same("gamma", 0.01)
    hp["gamma"] = gamma
    if rescale and density < 1:
      raise ValueError(f"{where}: {method} with rescale: true is not supported")
    if density < 1 and density + gamma > 1:
      raise ValueError(f"{where}: {method} with density + gamma > 1 keeps mergekit's 'smallest values' fallback, "
                       "which jaxmerge's outlier mask does not reproduce; use density + gamma <= 1")
    first = [T.outlier_mask(density, gamma, "tensor")] if density < 1 else []
    return _mk_spec(method, chain(*first, *tail()), base, models, hp, dtype, seed, layout, policy, notes, None)

  # della, della_linear
  eps = same("epsilon", 0.15)
  hp["epsilon"] = eps
  if density < 1 and rescale:
    raise ValueError(f"{where}: {method} rescales each tensor's L1 norm after MAGPRUNE (rescale: true, mergekit's "
                     "default); jaxmerge's MAGPRUNE rescales by 1/q per entry. Set rescale: false, or use "
                     "jaxmerge's own della method")
  first = [T.magprune(1.0 - density, eps, rescale=False)] if density < 1 else []
  return _mk_spec(method, chain(*first, *tail()), base, models, hp, dtype, seed, layout, policy, notes, None)


def _mk_spec(method, tx, base, models, hp, dtype, seed, layout, policy, notes, registry) -> MergeSpec:
  return MergeSpec(method=f"mergekit:{method}", tx=tx, base=base, models=tuple(models), names=tuple(models),
                   hparams=hp, dtype=dtype, seed=seed, per_task=False, layout=layout, vocab_policy=policy,
                   registry_method=registry, source="mergekit", notes=tuple(notes))
