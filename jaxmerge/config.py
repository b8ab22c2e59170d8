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
``dtype``/``out_dtype``) is recognized by its ``merge_method`` key and resolves to a :class:`jaxmerge.mk.engine.Plan`
that reproduces mergekit 0.1.5 tensor by tensor (:mod:`jaxmerge.mk`): every method of mergekit's registry
(``MERGEKIT_METHODS``: task_arithmetic, linear, ties, dare_ties, dare_linear, breadcrumbs, breadcrumbs_ties,
della, della_linear, slerp, nuslerp, multislerp, karcher, sce, ram, ramplus_tl, nearswap, arcee_fusion,
passthrough, model_stock), per-model values that differ, filtered values (``[{filter: self_attn, value: ...}]``)
and layer gradients (lists interpolated over the layers), resolved per tensor by :mod:`jaxmerge.mk.params`.

Numerics: like mergekit, each tensor is loaded in the config's ``dtype`` (else the checkpoints' common dtype) and
merged in it, each 16-bit operation rounded as PyTorch rounds it; ``linear`` and ``slerp`` compute in float32 as
mergekit does. TIES and breadcrumbs keep exactly ``max(1, int(density n))`` (TIES) or ``int(density n)``
(breadcrumbs) magnitudes per tensor; magnitudes tied at the threshold are taken in index order (mergekit's
unstable sort takes an arbitrary subset of them, so such entries may differ). DARE and DELLA draw their masks
from NumPy's generator seeded by ``seed`` and the tensor name (mergekit: PyTorch's global generator), so they
agree in distribution (keep rate, L1 rescale) only. ``arcee_fusion`` uses exact quantiles (mergekit samples
1,000,000 entries of larger tensors). The output dtype is ``out_dtype``, else the kernel's result dtype, as in
mergekit (the compute dtype; float32 for ``ramplus_tl`` and ``arcee_fusion``). ``jaxmerge: {compute_dtype: float32}``
in the YAML, or ``jaxmerge merge --compute-dtype float32``, computes in float32 instead; ``jaxmerge: {tie_rule:
keep_all}`` runs ``ties`` on jaxmerge's fast engine (float32, every magnitude tied at the threshold kept).

Parameters that do not apply to the method (``weight`` on slerp, ``density`` on linear, ``lambda`` set on one
model) are ignored with a warning naming them, as mergekit ignores them. A model without ``weight`` is an error
naming it for the methods that need one (as in mergekit). ``task_arithmetic`` with plain-number settings also
carries jaxmerge's float32 transform (``tx``), which ``jaxmerge merge`` runs on its fast engine when the merge
computes in float32 (same result to float32 rounding). ``modules`` and LoRA references raise ``ValueError``
naming the setting.

mergekit's I/O settings are resolved at the end of this module: ``slices`` (layer stacking, each slice merged
with the method above; :mod:`jaxmerge.io.layers`), ``tokenizer_source`` / ``tokenizer`` and ``chat_template``
(:mod:`jaxmerge.io.tokenizer`), and model references by hub id (:func:`locate_models`, :mod:`jaxmerge.io.hub`).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any


__all__ = ["MergeSpec", "SliceSpec", "TokenSpec", "TokenizerSpec", "from_dict", "is_mergekit", "load_yaml",
           "locate_models", "resolve", "DTYPES", "canonical_dtype"]

DTYPES = ("float32", "bfloat16", "float16")
_DTYPE_ALIASES = {"float32": "float32", "fp32": "float32", "float": "float32", "f32": "float32",
                  "bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16",
                  "half": "float16", "f16": "float16"}
JAXMERGE_KEYS = ("method", "base", "models", "hparams", "dtype", "seed", "layout", "names", "vocab_policy")
MERGEKIT_KEYS = ("merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source",
                 "chat_template", "tokenizer", "slices", "modules", "seed", "vocab_policy", "layout")
MERGEKIT_METHODS = ("task_arithmetic", "linear", "ties", "dare_ties", "dare_linear", "breadcrumbs",
                    "breadcrumbs_ties", "della", "della_linear", "slerp", "nuslerp", "multislerp", "karcher", "sce",
                    "ram", "ramplus_tl", "nearswap", "arcee_fusion", "passthrough", "model_stock")
VOCAB_POLICIES = ("error", "truncate", "pad_base")


@dataclasses.dataclass(frozen=True)
class MergeSpec:
  """A resolved merge.

  Attributes:
    method: what is run, for messages and ``merge_info.json`` (a registry name, or ``mergekit:<name>``).
    tx: the :class:`~jaxmerge.base.MergeTransform`. For mergekit's schema, ``None``, or the float32 equivalent of
      ``plan`` that ``jaxmerge merge`` runs on its fast engine when the merge computes in float32
      (``task_arithmetic`` with plain-number settings).
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
    notes: semantic notes worth printing (approximations, defaults filled in, ignored parameters).
    plan: for mergekit's schema, the :class:`jaxmerge.mk.engine.Plan` that merges tensor by tensor with
      mergekit's arithmetic; ``None`` for jaxmerge's schema.
    slices: mergekit's ``slices`` (layer stacking): one :class:`SliceSpec` per output slice, in order; empty
      when whole models are merged.
    tokenizer: the output tokenizer to build (mergekit's ``tokenizer_source`` or ``tokenizer:`` block), or
      ``None`` to copy the base model's tokenizer files.
    chat_template: mergekit's ``chat_template`` as given (a template name, ``"auto"`` or a Jinja string).
    order: the models in mergekit's order for vocabulary alignment (the listed models, then the base model
      when it is not listed); empty for jaxmerge's schema.
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
  plan: Any = None
  slices: tuple[SliceSpec, ...] = ()
  tokenizer: TokenizerSpec | None = None
  chat_template: str | None = None
  order: tuple[str, ...] = ()


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
  spec = _from_mergekit_io(cfg, where) if is_mergekit(cfg) else _from_jaxmerge(cfg, where)
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

# jaxmerge's own key in a mergekit-schema YAML: {compute_dtype: float32} computes in float32 instead of the
# config's dtype (the same as `jaxmerge merge --compute-dtype float32`).
JAXMERGE_OPTIONS = ("compute_dtype", "tie_rule")
TIE_RULES = ("exact", "keep_all")


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


def _check_params(method: str, scope: Mapping[str, Any], owner: str, per_input: bool, where: str,
                  notes: list[str]) -> dict:
  """Validates the settings of one scope (each value's structure, type and range) and drops, with a warning
  naming them, the ones mergekit ignores for ``method``."""
  import warnings  # noqa: PLC0415

  from jaxmerge.mk import params as P  # noqa: PLC0415

  spec = P.METHODS[method]
  ignored = P.unused_names(method, scope, per_input)
  if ignored:
    why = ("shared parameters, read from the global 'parameters' only" if per_input and
           all(spec.param(k) is not None for k in ignored) else f"not parameters of {method}")
    msg = (f"{where}: ignoring {', '.join(repr(k) for k in ignored)} of {owner} ({why}; mergekit ignores them "
           "too)")
    warnings.warn(msg, stacklevel=3)
    notes.append(msg)
  out = {}
  for k, v in scope.items():
    if k in ignored:
      continue
    P.check_setting(spec.param(k), v, f"{where}: parameter {k!r} of {owner}")
    out[k] = v
  return out


def _from_mergekit(cfg: Mapping[str, Any], where: str) -> MergeSpec:
  from jaxmerge.mk import engine as E  # noqa: PLC0415
  from jaxmerge.mk import params as P  # noqa: PLC0415

  unknown = sorted(set(cfg) - set(MERGEKIT_KEYS) - {"jaxmerge"})
  if unknown:
    raise ValueError(f"{where} (mergekit schema) has unknown keys {unknown}; supported: "
                     f"{', '.join(k for k in MERGEKIT_KEYS if k not in ('slices', 'modules', 'tokenizer'))}, "
                     "jaxmerge")
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
  if method not in P.METHODS:
    raise ValueError(f"{where}: merge_method {method!r} is not supported; supported mergekit methods: "
                     f"{', '.join(MERGEKIT_METHODS)}")
  spec_m = P.METHODS[method]
  notes: list[str] = []
  tok = cfg.get("tokenizer_source")
  seed, layout, policy = _check_common(cfg, where)
  if tok not in (None, "base"):
    raise ValueError(f"{where}: tokenizer_source {tok!r} is not supported (only 'base', which keeps the base "
                     "vocabulary: vocab_policy pad_base, rows aligned by token id)")
  if tok == "base" and "vocab_policy" not in cfg:
    policy = "pad_base"
    notes.append("tokenizer_source: base -> vocab_policy pad_base (embedding rows aligned by token id)")
  opts = _mapping(cfg.get("jaxmerge"), "jaxmerge", where)
  bad = sorted(set(opts) - set(JAXMERGE_OPTIONS))
  if bad:
    raise ValueError(f"{where}: unknown 'jaxmerge' options {bad}; valid: {', '.join(JAXMERGE_OPTIONS)}")
  compute = canonical_dtype(opts.get("compute_dtype"), f"{where}: jaxmerge.compute_dtype")
  tie_rule = opts.get("tie_rule", "exact")
  if tie_rule not in TIE_RULES:
    raise ValueError(f"{where}: jaxmerge.tie_rule must be one of {', '.join(TIE_RULES)}, got {tie_rule!r}")
  if tie_rule == "keep_all" and method != "ties":
    raise ValueError(f"{where}: jaxmerge.tie_rule applies to merge_method ties, not {method!r}")
  base = _model_ref(cfg["base_model"], where) if cfg.get("base_model") else None
  entries = cfg.get("models") or []
  if not isinstance(entries, Sequence) or isinstance(entries, (str, bytes)) or not entries:
    raise ValueError(f"{where}: models must be a non-empty list of {{model: PATH, parameters: {{...}}}}")
  glob = _check_params(method, _mapping(cfg.get("parameters"), "parameters", where), "the global parameters",
                       False, where, notes)
  inputs, scopes = [], []
  for e in entries:
    ref = _model_ref(e, where)
    own = _mapping(e.get("parameters"), f"the parameters of model {ref}", where) if isinstance(e, Mapping) else {}
    inputs.append(ref)
    scopes.append(_check_params(method, own, f"model {ref}", True, where, notes))
  if base is not None and base not in inputs:  # mergekit adds the base as the last input, without parameters
    inputs.append(base)
    scopes.append({})
  if spec_m.base == "required" and base is None:
    raise ValueError(f"{where}: merge_method {method!r} needs base_model")
  base_index = inputs.index(base) if base is not None and spec_m.base != "ignored" else None
  n_in, n_other = len(inputs), len(inputs) - (base_index is not None)
  if n_in < spec_m.min_inputs or (spec_m.max_inputs is not None and n_in > spec_m.max_inputs):
    want = (f"exactly {spec_m.min_inputs}" if spec_m.min_inputs == spec_m.max_inputs else
            f"at most {spec_m.max_inputs}" if spec_m.max_inputs is not None else f"at least {spec_m.min_inputs}")
    raise ValueError(f"{where}: {method} merges {want} models (the base included), got {n_in}: {inputs}")
  if spec_m.non_base is not None:
    lo, hi = spec_m.non_base
    if n_other < lo or (hi is not None and n_other > hi):
      want = f"exactly {lo}" if lo == hi else f"at least {lo}"
      raise ValueError(f"{where}: {method} merges {want} models besides the base, got {n_other}")
  if spec_m.param("weight") is not None and "weight" not in glob:
    idx = [i for i in range(n_in) if i != base_index or spec_m.param("weight").scope == "input"]
    missing = [inputs[i] for i in idx if "weight" not in scopes[i]]
    if missing:  # mergekit: "Missing weight for input(s)"
      raise ValueError(f"{where}: {method} needs a 'weight' for every model; missing for {missing} (set it under "
                       "the model's 'parameters', or one for all under the global 'parameters')")
  for name in [p.name for p in spec_m.params if p.default is P.REQUIRED and p.name != "weight"]:
    if name not in glob:
      raise ValueError(f"{where}: {method} needs the parameter {name!r} (under 'parameters')")
  resolver = P.Resolver(method, [glob], scopes, base_index, default_weight=None)
  cdtype = canonical_dtype(cfg.get("dtype"), f"{where}: dtype")
  out = canonical_dtype(cfg.get("out_dtype"), f"{where}: out_dtype")
  plan = E.Plan(method=method, inputs=tuple(inputs), base_index=base_index, resolver=resolver, dtype=cdtype,
                compute_dtype=compute, out_dtype=out, seed=seed, tie_rule=tie_rule)
  if compute:
    notes.append(f"jaxmerge.compute_dtype: computing in {compute} (mergekit computes in "
                 f"{cdtype or 'the checkpoints dtype'})")
  # The readers: the base (or the first input) and every other input, in the plan's order.
  first = base_index if base_index is not None else 0
  models = tuple(m for i, m in enumerate(inputs) if i != first)
  if not models:  # one input (passthrough): the readers need a model besides the base; the engine reads only one
    models = (inputs[first],)
  hp = {"parameters": glob, "models": {m: s for m, s in zip(inputs, scopes) if s}}
  fast = _float32_transform(method, first, glob, scopes)
  if tie_rule == "keep_all":
    fast, why = _keep_ties_transform(glob, [sc for i, sc in enumerate(scopes) if i != first])
    if fast is None:
      raise ValueError(f"{where}: jaxmerge.tie_rule keep_all (jaxmerge's fast TIES) needs {why}")
    notes.append("jaxmerge.tie_rule keep_all: jaxmerge's fast TIES in float32; magnitudes tied at the trim threshold "
                 "are all kept (mergekit keeps exactly k of them)")
  return MergeSpec(method=f"mergekit:{method}", tx=fast, base=inputs[first], models=models, names=models,
                   hparams=hp, dtype=out or cdtype, seed=seed, per_task=False, layout=layout, vocab_policy=policy,
                   registry_method=None, source="mergekit", notes=tuple(notes), plan=plan)


def _float32_transform(method: str, first: int, glob: Mapping[str, Any], scopes: Sequence[Mapping[str, Any]]):
  """jaxmerge's own transform for a mergekit config that it computes as mergekit does when mergekit computes in
  float32: ``task_arithmetic`` with plain numbers as settings, ``base + sum_i c_i (m_i - base)`` with mergekit's
  coefficients (the same operations; float32 rounding aside). ``None`` for anything else (``linear`` too:
  mergekit sums ``w_i m_i`` with fused multiply-adds, whose residues near 0 the task-vector form does not have).
  ``jaxmerge merge`` runs it on its fast (XLA) engine when every tensor's compute dtype is float32
  (:func:`jaxmerge.commands.merge.run`).
  """
  from jaxmerge import reductions as R  # noqa: PLC0415

  def plain(scope):
    return all(isinstance(v, (bool, int, float)) for v in scope.values())

  if method != "task_arithmetic" or not plain(glob) or not all(plain(s) for s in scopes):
    return None
  others = [float(s.get("weight", glob.get("weight", 1.0))) for i, s in enumerate(scopes) if i != first]
  if not others:
    return None
  lam = float(glob.get("lambda", 1.0))
  total = sum(others)
  div = (total if abs(total) >= 1e-8 else 1.0) if glob.get("normalize", False) else 1.0
  return R.weighted_sum([w * lam / div for w in others])


def _keep_ties_transform(glob: Mapping[str, Any], models: Sequence[Mapping[str, Any]]):
  """jaxmerge's own TIES for a mergekit ``ties`` config (``jaxmerge: {tie_rule: keep_all}``): mergekit's
  per-tensor trim of ``max(1, int(density n))`` magnitudes, except that every magnitude tied at the threshold is
  kept, the sign election and the (weighted) disjoint sum or mean, times ``lambda``. Returns ``(transform,
  None)``, or ``(None, why)`` for settings it does not express."""
  from jaxmerge import reductions as R  # noqa: PLC0415
  from jaxmerge import transforms as T  # noqa: PLC0415
  from jaxmerge.combine import chain  # noqa: PLC0415

  scopes = [glob, *models]
  if not all(isinstance(v, (bool, int, float)) for sc in scopes for v in sc.values()):
    return None, "plain numbers as settings (no gradients or filters)"
  if glob.get("rescale", False):
    return None, "rescale: false"
  weights = [float(m.get("weight", glob.get("weight", 1.0))) for m in models]
  densities = {float(m.get("density", glob.get("density", 1.0))) for m in models}
  if len(densities) != 1:
    return None, "one density for every model"
  density = densities.pop()
  lam = float(glob.get("lambda", 1.0))
  normalize = bool(glob.get("normalize", True))
  uniform = len(set(weights)) == 1
  if normalize and not uniform:
    return None, "equal weights with normalize (the weighted disjoint mean is mergekit's engine only)"
  if uniform and weights[0] <= 0:
    return None, "positive weights"
  first = [T.trim(density, "leaf", "exact")] if density < 1 else []
  if not uniform:
    tail = [T.scale_tasks(weights), R.disjoint_merge("sum", "leaf", "positive"), T.scale(lam)]
  elif normalize:
    tail = [R.disjoint_merge("mean", "leaf", "positive"), T.scale(lam)]
  else:
    tail = [R.disjoint_merge("sum", "leaf", "positive"), T.scale(lam * weights[0])]
  return chain(*first, *tail), None


def with_compute_dtype(spec: MergeSpec, compute: str | None) -> MergeSpec:
  """``spec`` with a mergekit plan computing in ``compute`` (``--compute-dtype``); jaxmerge-schema specs
  (always float32) and ``None`` return ``spec`` unchanged.

  Args:
    spec: a resolved spec.
    compute: ``"float32"`` etc., or ``None``.

  Returns:
    The spec.
  """
  if compute is None or spec.plan is None:
    return spec
  c = canonical_dtype(compute, "--compute-dtype")
  slices = tuple(dataclasses.replace(s, spec=with_compute_dtype(s.spec, c)) for s in spec.slices)
  return dataclasses.replace(spec, plan=dataclasses.replace(spec.plan, compute_dtype=c), slices=slices,
                             notes=(*spec.notes, f"--compute-dtype: computing in {c}"))


# ----------------------------------------------------------------------------------------------------------
# mergekit schema: slices, tokenizer, chat template, model locations (kept apart from method semantics above).

_IO_KEYS = ("slices", "tokenizer", "tokenizer_source", "chat_template")
_NUM_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


@dataclasses.dataclass(frozen=True)
class SliceSpec:
  """One output slice of mergekit's ``slices``: layers ``[start, end)`` of each source model, merged.

  Attributes:
    spec: the merge of the slice's sources (its ``base``, ``models``, ``tx``); a ``passthrough`` slice copies
      its one source.
    ranges: ``((model path, start, end), ...)``, the sources in the config's order.
  """

  spec: MergeSpec
  ranges: tuple[tuple[str, int, int], ...]

  @property
  def num_layers(self) -> int:
    """The number of layers this slice contributes."""
    return self.ranges[0][2] - self.ranges[0][1]

  def range_of(self, path: str) -> tuple[int, int]:
    """The layer range of the source ``path``."""
    for p, a, b in self.ranges:
      if p == path:
        return a, b
    raise KeyError(path)


@dataclasses.dataclass(frozen=True)
class TokenSpec:
  """Where one token's embedding comes from (an entry of the ``tokenizer.tokens`` block).

  Attributes:
    token: the token text (added to the output vocabulary when missing).
    kind: ``"model"`` (the token's row in ``model``), ``"model_token"`` (row ``token_id``, or the row of
      ``source_token``, in ``model``), ``"zero"`` or ``"default"`` (mergekit's rule: the one model that has it,
      the base model's row, or the mean of the models that have it).
    model: the source model path for ``model`` and ``model_token``.
    token_id: the source row for ``model_token``.
    source_token: the source token text for ``model_token``.
    force: use this source even for models that have the token.
  """

  token: str
  kind: str = "default"
  model: str | None = None
  token_id: int | None = None
  source_token: str | None = None
  force: bool = False


@dataclasses.dataclass(frozen=True)
class TokenizerSpec:
  """The output tokenizer (mergekit's ``tokenizer_source`` or ``tokenizer:`` block).

  Attributes:
    source: ``"base"``, ``"union"`` or a model path.
    tokens: the configured tokens, in order.
    pad_to_multiple_of: pad the embedding rows to a multiple of this (``None``: no padding).
    base_model: the config's ``base_model`` (``None`` without one): its rows win for tokens some models lack.
  """

  source: str
  tokens: tuple[TokenSpec, ...] = ()
  pad_to_multiple_of: int | None = None
  base_model: str | None = None


def _named_templates() -> dict[str, str]:
  """The chat templates mergekit ships, by name (read from an installed mergekit; empty without one)."""
  try:
    import importlib.resources  # noqa: PLC0415

    root = importlib.resources.files("mergekit._data.chat_templates")
    return {f.name[:-len(".jinja")]: f.read_text() for f in root.iterdir() if f.name.endswith(".jinja")}
  except (ImportError, ModuleNotFoundError, OSError, TypeError):
    return {}


def chat_template_text(value: str, where: str = "config") -> str | None:
  """The Jinja text of a ``chat_template`` setting, mergekit's rules: a short name without braces is a named
  template (``chatml``, ``llama3``, ...: the files mergekit ships), ``"auto"`` is resolved later (``None``
  here), anything else must be a Jinja template (at least 20 characters with a ``{``).

  Args:
    value: the setting.
    where: how to name the config in errors.

  Returns:
    The template text, or ``None`` for ``"auto"``.

  Raises:
    ValueError: not a string, an unknown name, or text that is not a template.
  """
  if not isinstance(value, str) or not value:
    raise ValueError(f"{where}: chat_template must be a template name or a Jinja string, got {value!r}")
  if value == "auto":
    return None
  if len(value) < 256 and "\n" not in value and "{" not in value:
    named = _named_templates()
    if value in named:
      return named[value]
    if not named:
      raise ValueError(f"{where}: chat_template {value!r} names one of mergekit's templates, which are read from "
                       "an installed mergekit (pip install mergekit); none is installed: give the Jinja text")
  if len(value) < 20 or "{" not in value:
    raise ValueError(f"{where}: chat_template {value!r} is neither a known template name "
                     f"({', '.join(sorted(_named_templates())) or 'none installed'}) nor a Jinja template")
  return value


def _int(value: Any, what: str, where: str, low: int = 0) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < low:
    raise ValueError(f"{where}: {what} must be an integer >= {low}, got {value!r}")
  return value


def _token_spec(token: Any, value: Any, where: str) -> TokenSpec:
  what = f"tokenizer.tokens[{token!r}]"
  if not isinstance(token, str) or not token:
    raise ValueError(f"{where}: tokenizer.tokens keys must be token strings, got {token!r}")
  value = {} if value is None else value
  if not isinstance(value, Mapping):
    raise ValueError(f"{where}: {what} must be a mapping {{source: ..., force: ...}}, got {value!r}")
  bad = sorted(set(value) - {"source", "force"})
  if bad:
    raise ValueError(f"{where}: {what} has unknown keys {bad} (valid: source, force)")
  force = value.get("force", False)
  if not isinstance(force, bool):
    raise ValueError(f"{where}: {what}.force must be true or false, got {force!r}")
  src = value.get("source")
  if src is None:
    return TokenSpec(token, "default", force=force)
  if isinstance(src, (str, os.PathLike)):
    return TokenSpec(token, "model", model=_model_ref(src, where), force=force)
  if not isinstance(src, Mapping) or src.get("kind") not in ("model_token", "zero"):
    raise ValueError(f"{where}: {what}.source must be a model, {{kind: zero}} or {{kind: model_token, model: M, "
                     f"token_id: N | token: T}}, got {src!r}")
  if src["kind"] == "zero":
    return TokenSpec(token, "zero", force=force)
  bad = sorted(set(src) - {"kind", "model", "token_id", "token"})
  if bad:
    raise ValueError(f"{where}: {what}.source has unknown keys {bad}")
  if ("token_id" in src) == ("token" in src):
    raise ValueError(f"{where}: {what}.source needs exactly one of token_id and token, got {dict(src)}")
  tid = _int(src["token_id"], f"{what}.source.token_id", where) if "token_id" in src else None
  stok = src.get("token")
  if tid is None and not isinstance(stok, str):
    raise ValueError(f"{where}: {what}.source.token must be a string, got {stok!r}")
  return TokenSpec(token, "model_token", model=_model_ref(src.get("model"), where), token_id=tid,
                   source_token=stok, force=force)


def _tokenizer_spec(cfg: Mapping[str, Any], where: str) -> TokenizerSpec | None:
  source, block = cfg.get("tokenizer_source"), cfg.get("tokenizer")
  if source is not None and block is not None:
    raise ValueError(f"{where}: give either tokenizer_source or a tokenizer block, not both (as mergekit)")
  if block is not None:
    if not isinstance(block, Mapping):
      raise ValueError(f"{where}: tokenizer must be a mapping {{source, tokens, pad_to_multiple_of}}, got {block!r}")
    bad = sorted(set(block) - {"source", "tokens", "pad_to_multiple_of"})
    if bad:
      raise ValueError(f"{where}: tokenizer has unknown keys {bad} (valid: source, tokens, pad_to_multiple_of)")
    source = block.get("source", "union")
    tokens = block.get("tokens") or {}
    if not isinstance(tokens, Mapping):
      raise ValueError(f"{where}: tokenizer.tokens must map token strings to {{source, force}}, got {tokens!r}")
    pad = block.get("pad_to_multiple_of")
    pad = None if pad is None else _int(pad, "tokenizer.pad_to_multiple_of", where, 1)
    toks = tuple(_token_spec(k, v, where) for k, v in tokens.items())
  elif source is not None:
    toks, pad = (), None
  else:
    return None
  if source not in ("union", "base"):
    source = _model_ref(source, where)
  return TokenizerSpec(source=str(source), tokens=toks, pad_to_multiple_of=pad)


def _mk_order(models: Sequence[str], base: str | None) -> tuple[str, ...]:
  order = list(dict.fromkeys(models))
  if base is not None and base not in order:
    order.append(base)
  return tuple(order)


def _slice_specs(cfg: Mapping[str, Any], where: str) -> tuple[SliceSpec, ...]:
  slices = cfg.get("slices")
  if not isinstance(slices, Sequence) or isinstance(slices, (str, bytes)) or not slices:
    raise ValueError(f"{where}: slices must be a non-empty list of {{sources: [{{model, layer_range}}]}}")
  method = cfg["merge_method"]
  out = []
  for i, s in enumerate(slices):
    sw = f"{where}: slices[{i}]"
    if not isinstance(s, Mapping) or not isinstance(s.get("sources"), Sequence) or not s["sources"]:
      raise ValueError(f"{sw} must be a mapping with a non-empty 'sources' list, got {s!r}")
    bad = sorted(set(s) - {"sources", "base_model", "parameters"})
    if bad:
      raise ValueError(f"{sw} has unknown or unsupported keys {bad} (supported: sources, base_model, parameters)")
    ranges, entries = [], []
    for j, src in enumerate(s["sources"]):
      if not isinstance(src, Mapping):
        raise ValueError(f"{sw}.sources[{j}] must be a mapping {{model, layer_range}}, got {src!r}")
      bad = sorted(set(src) - {"model", "layer_range", "parameters"})
      if bad:
        raise ValueError(f"{sw}.sources[{j}] has unknown keys {bad} (valid: model, layer_range, parameters)")
      ref = _model_ref(src, where)
      lr = src.get("layer_range")
      if (not isinstance(lr, Sequence) or isinstance(lr, str) or len(lr) != 2
          or not all(isinstance(x, int) and not isinstance(x, bool) for x in lr) or not 0 <= lr[0] < lr[1]):
        raise ValueError(f"{sw}.sources[{j}] ({ref}): layer_range must be [start, end) with 0 <= start < end, "
                         f"got {lr!r}")
      if any(r[0] == ref for r in ranges):
        raise ValueError(f"{sw} lists model {ref} twice; each source of a slice must be a different model")
      ranges.append((ref, int(lr[0]), int(lr[1])))
      entries.append({"model": ref, "parameters": src.get("parameters")})
    lengths = {b - a for _, a, b in ranges}
    if len(lengths) > 1:
      raise ValueError(f"{sw}: every source of a slice must have the same number of layers, got layer ranges "
                       f"{[(p, [a, b]) for p, a, b in ranges]}")
    params = {**_mapping(cfg.get("parameters"), "parameters", where),
              **_mapping(s.get("parameters"), f"slices[{i}].parameters", where)}
    base = s.get("base_model") or cfg.get("base_model")
    base = _model_ref(base, where) if base else None
    seed, layout, _ = _check_common(cfg, where)
    sub = {"merge_method": method, "models": entries, "parameters": params, "seed": seed, "layout": layout}
    for k in ("dtype", "out_dtype", "vocab_policy", "jaxmerge"):
      if cfg.get(k) is not None:
        sub[k] = cfg[k]
    if base is not None and base in [r[0] for r in ranges]:
      sub["base_model"] = base
    elif base is not None and method not in ("linear",):
      raise ValueError(f"{sw}: the base model {base} is not one of the slice's sources "
                       f"{[r[0] for r in ranges]}; mergekit needs it there to take its layers")
    try:
      spec = _from_mergekit(sub, where)
    except ValueError as e:
      raise ValueError(f"{sw}: {e}") from e
    out.append(SliceSpec(spec=dataclasses.replace(spec, order=tuple(r[0] for r in ranges)), ranges=tuple(ranges)))
  return tuple(out)


def _from_mergekit_io(cfg: Mapping[str, Any], where: str) -> MergeSpec:
  """mergekit's schema with its I/O features: ``slices``, ``tokenizer_source``/``tokenizer``, ``chat_template``
  around the method semantics of :func:`_from_mergekit` (which resolves each slice, or the ``models`` list)."""
  unknown = sorted(set(cfg) - set(MERGEKIT_KEYS) - {"jaxmerge"})
  if unknown:
    raise ValueError(f"{where} (mergekit schema) has unknown keys {unknown}; supported: "
                     f"{', '.join(k for k in MERGEKIT_KEYS if k != 'modules')}, jaxmerge")
  if cfg.get("modules"):
    raise ValueError(f"{where}: mergekit's 'modules' (per-module slices of multimodal models) is not supported; "
                     "use 'models' or 'slices'")
  if cfg.get("slices") and cfg.get("models"):
    raise ValueError(f"{where}: give exactly one of 'models' and 'slices' (as mergekit)")
  tokenizer = _tokenizer_spec(cfg, where)
  if tokenizer is not None and cfg.get("base_model"):
    tokenizer = dataclasses.replace(tokenizer, base_model=_model_ref(cfg["base_model"], where))
  template = cfg.get("chat_template")
  if template is not None:
    chat_template_text(template, where)
  core = {k: v for k, v in cfg.items() if k not in _IO_KEYS}
  if not cfg.get("slices"):
    spec = _from_mergekit(core, where)
    order = _mk_order([_model_ref(e, where) for e in cfg.get("models") or []],
                      _model_ref(cfg["base_model"], where) if cfg.get("base_model") else None)
    return dataclasses.replace(spec, tokenizer=tokenizer, chat_template=template, order=order)
  slices = _slice_specs(cfg, where)
  first = slices[0].spec
  order = tuple(dict.fromkeys(p for s in slices for p, _, _ in s.ranges))
  base = _model_ref(cfg["base_model"], where) if cfg.get("base_model") else None
  if len(slices[-1].ranges) > len(slices[0].ranges):
    raise ValueError(f"{where}: the last slice has more sources ({len(slices[-1].ranges)}) than the first "
                     f"({len(slices[0].ranges)}); mergekit would silently drop the extra models from the weights "
                     "after the last layer (norm, head)")
  notes = [n for s in slices for n in s.spec.notes]
  return dataclasses.replace(
      first, method=first.method, base=base or order[0], models=tuple(p for p in order if p != (base or order[0]))
      or (order[0],), names=order, hparams={"slices": [dict(s.spec.hparams) for s in slices]},
      registry_method=None, notes=tuple(dict.fromkeys(notes)), slices=slices, tokenizer=tokenizer,
      chat_template=template, order=order)


def _map_refs(cfg: Mapping[str, Any], fn) -> dict:
  """A copy of a config (either schema) with every model reference replaced by ``fn(ref, what)``."""
  cfg = json_copy(cfg)

  def ref(value, what):
    if isinstance(value, Mapping):
      value = dict(value)
      if isinstance(value.get("model"), (str, os.PathLike)):
        value["model"] = fn(str(value["model"]), what)
      elif isinstance(value.get("model"), Mapping) and isinstance(value["model"].get("path"), str):
        value["model"] = {**value["model"], "path": fn(value["model"]["path"], what)}
      elif isinstance(value.get("path"), str):
        value["path"] = fn(value["path"], what)
      return value
    return fn(str(value), what) if isinstance(value, (str, os.PathLike)) and value else value

  if is_mergekit(cfg):
    if cfg.get("base_model"):
      cfg["base_model"] = ref(cfg["base_model"], "base_model")
    if isinstance(cfg.get("models"), list):
      cfg["models"] = [ref(e, "model") for e in cfg["models"]]
    for s in cfg.get("slices") or []:
      if isinstance(s, dict):
        if s.get("base_model"):
          s["base_model"] = ref(s["base_model"], "slice base_model")
        if isinstance(s.get("sources"), list):
          s["sources"] = [ref(e, "slice source") for e in s["sources"]]
    if cfg.get("tokenizer_source") not in (None, "union", "base"):
      cfg["tokenizer_source"] = ref(cfg["tokenizer_source"], "tokenizer_source")
    tok = cfg.get("tokenizer")
    if isinstance(tok, dict):
      if tok.get("source") not in (None, "union", "base"):
        tok["source"] = ref(tok["source"], "tokenizer.source")
      for t in (tok.get("tokens") or {}).values():
        if isinstance(t, dict) and isinstance(t.get("source"), str):
          t["source"] = ref(t["source"], "token source")
        elif isinstance(t, dict) and isinstance(t.get("source"), dict) and t["source"].get("model"):
          t["source"] = ref(t["source"], "token source")
  else:
    if cfg.get("base"):
      cfg["base"] = ref(cfg["base"], "base")
    models = cfg.get("models")
    if isinstance(models, (str, os.PathLike)):
      cfg["models"] = ref(models, "model")
    elif isinstance(models, list):
      cfg["models"] = [ref(m, "model") for m in models]
  return cfg


def json_copy(value: Any) -> Any:
  """A deep copy of nested mappings and lists (mappings become dicts, tuples lists)."""
  if isinstance(value, Mapping):
    return {k: json_copy(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [json_copy(v) for v in value]
  return value


def locate_models(cfg: Mapping[str, Any], relative_to: str | os.PathLike | None = None, *,
                  download: bool = True) -> dict:
  """Replaces every model reference of a config (either schema) by a local path: an existing path as given, a
  path relative to ``relative_to``, or a Hugging Face hub id ``org/name[@revision]`` resolved (downloaded when
  online, from the cache with ``HF_HUB_OFFLINE=1``) by :func:`jaxmerge.io.hub.locate`.

  Args:
    cfg: the parsed YAML.
    relative_to: the directory relative paths are also looked up in (the YAML's directory).
    download: resolve hub ids (``False`` leaves references that are not local paths unchanged).

  Returns:
    A copy of the config with local paths.

  Raises:
    ValueError: a reference that is neither a local path nor a hub id that can be fetched, naming it.
  """
  from jaxmerge.io import hub  # noqa: PLC0415

  seen: dict[str, str] = {}

  def fn(r: str, what: str) -> str:
    if r in seen:
      return seen[r]
    p = pathlib.Path(r).expanduser()
    if p.exists():
      out = r
    elif relative_to is not None and not p.is_absolute() and (pathlib.Path(relative_to) / p).exists():
      out = str(pathlib.Path(relative_to) / p)
    elif download and hub.is_hub_id(r):
      out = str(hub.locate(r, what=what))
    else:
      out = r
    seen[r] = out
    return out

  return _map_refs(cfg, fn)
