"""``jaxmerge merge``: merge checkpoints with any data-free method and write the result atomically.

    jaxmerge merge CONFIG.yaml --out DIR
    jaxmerge merge --method ties --base pre.safetensors --model a.safetensors --model b.safetensors \\
        --hparam density=0.2 --hparam scale=0.3 --out DIR

CONFIG is jaxmerge's schema ``{method: NAME, base: PATH, models: [PATH, ...], hparams: {...},
dtype: float32|bfloat16|float16, seed: N, vocab_policy: error|truncate|pad_base}`` or mergekit's
(``merge_method``, ``base_model``, ``models: [{model, parameters}]`` or ``slices``, ``parameters``, ``dtype``,
``tokenizer_source``/``tokenizer``, ``chat_template``); see :mod:`jaxmerge.config`. Flags override the YAML and
work without it. PATH is a safetensors file, a directory holding one or a sharded checkpoint with an index (a
Hugging Face directory), an orbax directory, or a hub id ``org/name[@revision]`` (downloaded, or read from the
cache with ``HF_HUB_OFFLINE=1``: :mod:`jaxmerge.io.hub`).

Math runs in float32; each output tensor has the pretrained checkpoint's dtype unless ``--dtype`` says
otherwise. ``DIR`` receives ``model.safetensors`` (shards and ``model.safetensors.index.json`` above
``--max-shard-size``) or an orbax checkpoint (``--format orbax``), the base directory's ``config.json`` and
tokenizer files when it has them, and ``merge_info.json``; methods that keep one model per task (EMR, TALL masks,
BYOM) write ``DIR/task_<i>/`` instead. Everything is written under a temporary directory beside ``DIR`` and
renamed when complete, so an interrupted run never leaves a partial ``DIR``; the next run removes what a killed
one left behind, a failed run removes its temporaries and the parent directories it created, and the output gets
the permissions of the user's umask. A ``float16`` output refuses weights that do not fit it (above 65504).

``--mesh TASK[xMODEL]`` runs the in-memory merge on a device mesh (:mod:`jaxmerge.sharding`): the stack of
models is sharded along its task axis over ``TASK`` devices (which must divide the number of models), and with
``MODEL > 1`` the first axis of every parameter it divides is sharded over ``MODEL`` more devices; ``auto`` uses
the most devices that divide the number of models. The result equals the unsharded merge (single process; for
multi-host runs use :func:`jaxmerge.sharding.merge_sharded` after ``jax.distributed.initialize()``).

**CLIP's standard layout**: a ``CLIPModel`` base directory and ``CLIPVisionModel`` expert directories (their
``config.json`` say ``model_type`` ``clip`` and ``clip_vision_model``; the towers' sizes must agree) merge the
vision towers: the base's text tower, projections and logit scale are left out, expert keys are read with or
without the ``vision_model.`` prefix (transformers 4 and 5 spellings), and ``DIR`` is a ``CLIPVisionModel``
directory (``vision_model.*`` keys, the first expert's ``config.json``), evaluated with ``jaxmerge eval --model DIR
--pretrained BASE``.

``--stream`` merges tensor by tensor (memory: a few tensors times the number of models); it is chosen
automatically when an in-memory merge would need more than half of the available memory. Global methods
(TIES's model-wide threshold, Localize-and-Stitch, BYOM, EMR) stream in exact extra passes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import shutil
import time

__all__ = ["load_config", "mesh_rules", "parse_mesh", "register", "run"]

_DTYPES = ("float32", "bfloat16", "float16")


def register(subparsers) -> None:
  """Adds the ``merge`` subcommand (called by :mod:`jaxmerge.cli`).

  Args:
    subparsers: the ``argparse`` sub-parsers action of the ``jaxmerge`` parser; the new parser's ``func``
      default is :func:`run`.
  """
  p = subparsers.add_parser("merge", help="merge checkpoints into one", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("config", nargs="?", help="YAML config (jaxmerge's schema or mergekit's)")
  p.add_argument("--out", required=True, help="output directory (must not exist)")
  p.add_argument("--method", help="registry name (see `jaxmerge methods`)")
  p.add_argument("--base", help="pretrained checkpoint")
  p.add_argument("--model", action="append", default=None, help="fine-tuned checkpoint (repeat)")
  p.add_argument("--hparam", action="append", default=[], metavar="K=V", help="hyperparameter (repeat; YAML value)")
  p.add_argument("--dtype", choices=_DTYPES, help="output dtype (default: the base checkpoint's)")
  p.add_argument("--compute-dtype", dest="compute_dtype", choices=_DTYPES, default=None,
                 help="mergekit-schema configs: compute in this dtype instead of the config's dtype (mergekit's "
                      "rule), e.g. float32; jaxmerge's schema always computes in float32")
  p.add_argument("--seed", type=int, help="PRNG seed for stochastic methods (default 0)")
  p.add_argument("--layout", choices=("hf", "flax"), default=None, help="how 2-D weights are stored (default hf)")
  p.add_argument("--vocab-policy", dest="vocab_policy", choices=("error", "truncate", "pad_base"),
                 help="vocabulary-size mismatches (default error; see jaxmerge.io.llm)")
  stream = p.add_mutually_exclusive_group()
  stream.add_argument("--stream", dest="stream", action="store_true", default=None,
                      help="merge tensor by tensor (default: automatic for large inputs)")
  stream.add_argument("--no-stream", dest="stream", action="store_false", help="merge in memory")
  p.add_argument("--mesh", default=None, metavar="TASK[xMODEL]|auto",
                 help="merge in memory on a device mesh (jaxmerge.sharding): TASK devices along the task axis "
                      "(must divide the number of models), times MODEL devices sharding the first axis of every "
                      "parameter it divides; 'auto' = the most devices that divide the number of models")
  p.add_argument("--format", choices=("safetensors", "orbax"), default="safetensors", help="output format")
  p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (e.g. 5GB, 500MiB)")
  p.set_defaults(func=run)


def _value(text: str):
  import yaml  # noqa: PLC0415

  try:
    return yaml.safe_load(text)
  except yaml.YAMLError:
    return text


def load_config(args: argparse.Namespace):
  """The resolved :class:`jaxmerge.config.MergeSpec`: the YAML file first, then the flags.

  Args:
    args: the parsed options of the ``merge`` subcommand; relative checkpoint paths in the YAML are also
      looked up beside the YAML file.

  Returns:
    The :class:`jaxmerge.config.MergeSpec`.

  Raises:
    ValueError: an unreadable or invalid config, a malformed ``--hparam``, or an invalid merge.
  """
  from jaxmerge import config  # noqa: PLC0415

  cfg, where, rel = {}, "flags", None
  if args.config:
    cfg = config.load_yaml(args.config)
    where, rel = f"config {args.config}", pathlib.Path(args.config).resolve().parent
  hp = {}
  for item in args.hparam or []:
    if "=" not in item:
      raise ValueError(f"--hparam takes K=V, got {item!r}")
    k, v = item.split("=", 1)
    hp[k.strip()] = _value(v)
  overrides = {"method": args.method, "base": args.base, "models": args.model, "hparams": hp, "dtype": args.dtype,
               "seed": args.seed, "layout": args.layout, "vocab_policy": getattr(args, "vocab_policy", None)}
  cfg = config.locate_models(cfg, rel)
  if not args.config or not config.is_mergekit(cfg):
    for k in ("base", "models"):
      if overrides.get(k):
        overrides[k] = config.locate_models({"method": "x", k: overrides[k]})[k]
  spec = config.resolve(cfg, overrides, where=where, relative_to=rel)
  compute = getattr(args, "compute_dtype", None)
  if compute and spec.plan is None:
    raise ValueError("--compute-dtype applies to mergekit-schema configs; jaxmerge's schema computes in float32")
  return config.with_compute_dtype(spec, compute)


def _available_bytes() -> int:
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return 8 << 30


def _float_bytes(view, floats) -> int:
  import numpy as np  # noqa: PLC0415

  return sum(int(np.prod(view.shape(k), dtype=np.int64)) * 4 for k in floats)


def parse_mesh(text: str, num_tasks: int):
  """The device mesh of ``--mesh``: ``auto``, ``TASK`` or ``TASKxMODEL`` (e.g. ``4x2``).

  Args:
    text: the option's value.
    num_tasks: the number of fine-tuned models (``auto`` picks the most devices that divide it).

  Returns:
    A ``jax.sharding.Mesh`` with axes ``("task",)`` or ``("task", "model")``.

  Raises:
    ValueError: a malformed value, more devices than available, or a task axis that does not divide the number
      of models.
  """
  from jaxmerge import sharding  # noqa: PLC0415

  text = str(text).strip().lower()
  if text == "auto":
    return sharding.task_mesh(num_tasks)
  parts = text.split("x")
  if not 1 <= len(parts) <= 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
    raise ValueError(f"--mesh takes 'auto', TASK or TASKxMODEL with positive integers (e.g. 4 or 4x2), got {text!r}")
  task, model = int(parts[0]), int(parts[1]) if len(parts) == 2 else 1
  if num_tasks % task:
    raise ValueError(f"--mesh {text}: the task axis ({task} devices) does not divide the number of models "
                     f"({num_tasks}); jaxmerge does not pad the task axis (it would change every method that counts "
                     "tasks): use a divisor of the number of models or 'auto'")
  if model == 1:
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    devices = jax.devices()
    if task > len(devices):
      raise ValueError(f"--mesh {text}: a mesh of shape ({task},) needs {task} devices, only {len(devices)} are "
                       "available")
    return jax.sharding.Mesh(np.asarray(devices[:task]), (sharding.TASK,))
  return sharding.mesh(task, model)


def mesh_rules(m, base_v, floats):
  """Partition rules for ``--mesh``: with a ``"model"`` axis, each floating parameter whose first axis it
  divides is sharded along it; everything else is sharded along the task axis only.

  Args:
    m: the ``jax.sharding.Mesh`` (from :func:`parse_mesh`).
    base_v: the aligned pretrained checkpoint (a view with ``shape(key)``).
    floats: the keys of the floating-point parameters.

  Returns:
    ``None`` when the mesh has no ``"model"`` axis larger than 1, else a list of ``(regex, PartitionSpec)``
    rules, ``P("task", "model")`` for each floating parameter whose first axis the model axis divides.
  """
  import re  # noqa: PLC0415

  from jax.sharding import PartitionSpec as P  # noqa: PLC0415

  size = dict(m.shape).get("model", 1)
  if size == 1:
    return None
  return [(re.escape(k), P("task", "model")) for k in floats
          if len(base_v.shape(k)) >= 1 and base_v.shape(k)[0] % size == 0]


def _merge_in_memory(spec, base_v, model_vs, floats, key, layout, mesh=None):
  import numpy as np  # noqa: PLC0415

  import jaxmerge as jm  # noqa: PLC0415

  base = {k: base_v.get(k) for k in base_v.keys()}
  models = [{k: m.get(k) for k in base} for m in model_vs]
  if mesh is not None:
    from jaxmerge import sharding  # noqa: PLC0415

    merged = sharding.merge_sharded(spec.tx, base, models, mesh=mesh, rules=mesh_rules(mesh, base_v, floats),
                                    key=key, layout=layout, names=list(spec.names), per_task=spec.per_task)
  else:
    fn = jm.merge_per_task if spec.per_task else jm.merge
    merged = fn(spec.tx, base, models, key=key, layout=layout, names=list(spec.names))
  merged = merged if spec.per_task else [merged]
  del models
  with np.errstate(over="ignore"):  # (an overflow is reported below, naming the tensor)
    outs = [{k: np.asarray(m[k]).astype(base_v.out_dtype(k)) if k in floats else np.asarray(m[k]) for k in base}
            for m in merged]
  for o in outs:
    for k in floats:
      _check_fits(k, o[k], o[k].dtype)
  return outs


def _check_fits(name: str, array, dtype) -> None:
  """Raises ``ValueError`` when a merged tensor has values its output dtype cannot hold (``float16`` above 65504
  becomes Inf; the inputs were checked finite, so a non-finite output is an overflow)."""
  import numpy as np  # noqa: PLC0415

  if np.dtype(dtype) != np.float16:
    return
  a = np.asarray(array)
  if not np.isfinite(a).all():
    raise ValueError(f"merged tensor {name!r} has values beyond float16's range (|x| > 65504) and would be written "
                     "as Inf; use --dtype bfloat16 or float32")


class _CheckedWriter:
  """A writer that checks each merged tensor with :func:`_check_fits` before passing it on, and widens float32
  results to a declared float64 (JAX computes in float32 unless x64 is enabled)."""

  def __init__(self, writer, dtypes):
    self._w, self._dtypes = writer, dtypes

  def write(self, name, array):
    import numpy as np  # noqa: PLC0415

    dt = np.dtype(self._dtypes(name))
    if dt == np.float64 and np.dtype(array.dtype) != dt:
      array = np.asarray(array).astype(dt)
    _check_fits(name, array, dt)
    self._w.write(name, array)

  def __getattr__(self, attr):
    return getattr(self._w, attr)


def _float32_exact(plan, base_v, model_vs, any_compute: bool = False) -> bool:
  """Whether jaxmerge's float32 transform of a mergekit config (``spec.tx``) gives mergekit's result here: every
  float tensor computed in float32 (unless ``any_compute``) and written in the dtype mergekit writes."""
  import numpy as np  # noqa: PLC0415

  from jaxmerge import stream as jstream  # noqa: PLC0415

  readers = [base_v, *model_vs]
  for k in base_v.keys():
    if not jstream.is_float_dtype(base_v.dtype(k)):
      continue
    dts = [np.dtype(r.dtype(k)) for r in readers]
    if not any_compute and plan.compute_for(dts) != np.float32:
      return False
    if np.dtype(plan.out_for(dts)) != np.dtype(base_v.out_dtype(k)):
      return False
  return True


def _plan_route(gspec, base_v, model_vs):
  """The mergekit plan that merges a group, or ``None`` when jaxmerge's transform (``gspec.tx``) runs it: a
  jaxmerge-schema spec, or a mergekit one that both tools compute in float32 (or ``tie_rule: keep_all``)."""
  plan = gspec.plan
  if plan is not None and gspec.tx is not None:
    keep_all = plan.tie_rule == "keep_all"
    if _float32_exact(plan, base_v, model_vs, any_compute=keep_all):
      return None
    if keep_all:
      raise ValueError("jaxmerge.tie_rule keep_all needs checkpoints whose tensors mergekit writes in one dtype "
                       "(set out_dtype)")
  return plan


def _plan_readers(plan, base_v, model_vs) -> list:
  """The readers in the plan's input order (the base view at the plan's base position)."""
  first = plan.base_index if plan.base_index is not None else 0
  readers = list(model_vs)
  readers.insert(first, base_v)
  return readers[:len(plan.inputs)]  # a single-input plan (passthrough) reads the base view only


def _plan_out_dtypes(plan, base_v, model_vs) -> dict:
  """``{tensor: output dtype}`` of a plan's group (mergekit's rule: ``out_dtype``, else the kernel's dtype)."""
  import numpy as np  # noqa: PLC0415

  readers = _plan_readers(plan, base_v, model_vs)
  return {k: np.dtype(plan.out_for([np.dtype(r.dtype(k)) for r in readers])) for k in base_v.keys()}


def _slice_t(offset: int, count: int):
  """mergekit's gradient position of a sliced tensor (output names): the layer's index in its slice over
  ``count - 1`` (1 for a one-layer slice), 0 for the tensors outside the layers."""
  from jaxmerge.mk import params as P  # noqa: PLC0415

  def t_of(name: str) -> float:
    i = P.layer_index(name)
    if i is None:
      return 0.0
    return (i - offset) / (count - 1) if count > 1 else 1.0

  return t_of


def _merge_plan(plan, base_v, model_vs, write, stream: bool, t_of=None) -> None:
  """Runs a mergekit-schema plan (:mod:`jaxmerge.mk`) on one group, passing each merged tensor to ``write``:
  streamed (each tensor read when it is merged) or in memory (every input read first); both merge each tensor the
  same way."""
  import numpy as np  # noqa: PLC0415

  from jaxmerge.mk import engine  # noqa: PLC0415

  readers = _plan_readers(plan, base_v, model_vs)
  names = [str(n) for n in plan.inputs]
  keys = list(base_v.keys())
  sizes = {k: int(np.prod(base_v.shape(k))) for k in keys}
  if stream:
    def read(i, k, empty):  # into a reused buffer where the reader can (no fresh pages per tensor)
      r = readers[i]
      if getattr(r, "reads_into", False):
        return r.get(k, out=empty(tuple(r.shape(k)), np.dtype(r.dtype(k))))
      return r.get(k)

    engine.run(plan, keys, read, write, names, sizes, t_of=t_of, buffers=True)
    return
  loaded = [{k: np.array(r.get(k)) for k in keys} for r in readers]
  engine.run(plan, keys, lambda i, k: loaded[i][k], write, names, sizes, t_of=t_of)


def _finish_dir(d: pathlib.Path, spec, base_v, tok_info=None, num_layers=None) -> list[str]:
  """Writes ``config.json`` and the tokenizer files next to the merged weights; returns notes."""
  from jaxmerge.io import llm  # noqa: PLC0415
  from jaxmerge.io import tokenizer as jtok  # noqa: PLC0415

  notes = []
  base_path = pathlib.Path(spec.base)
  rebuild = tok_info is not None or spec.chat_template is not None
  if base_path.is_dir():
    llm.copy_model_files(base_path, d, vocab_size=llm.vocab_size_of(base_v), dtype=spec.dtype,
                         num_layers=num_layers, tokenizer_files=not rebuild)
  if rebuild:
    models = list(dict.fromkeys([*spec.order, spec.base]))
    template = jtok.template_for(spec.chat_template, models)
    if tok_info is not None:
      jtok.save(tok_info.tokenizer, d, template)
    else:  # mergekit: the base model's tokenizer re-saved with the template
      try:
        tok = jtok.load_tokenizer(spec.base)
      except ValueError as e:
        notes.append(f"chat_template not written: {e}")
      else:
        jtok.save(tok, d, template)
  return notes


def _hf():
  from jaxmerge.io import hf  # noqa: PLC0415

  return hf


def _open_groups(spec, clip_vision: bool):
  """The groups of tensors to merge: ``(groups, readers to close, tokenizer info, output layer count)``.

  One group (the whole model) without ``slices``; one per slice with them (:mod:`jaxmerge.io.layers`). With a
  tokenizer setting, each group's readers show the output vocabulary's embedding rows
  (:class:`jaxmerge.io.tokenizer.VocabularyGroup`)."""
  from jaxmerge.io import layers  # noqa: PLC0415
  from jaxmerge.io import layouts  # noqa: PLC0415
  from jaxmerge.io import tokenizer as jtok  # noqa: PLC0415

  raw: dict[str, object] = {}
  names = spec.tensor_names  # mergekit's schema: the transformers 5 model's tensor names (jaxmerge.io.layouts)

  def opened(p):
    if p not in raw:
      raw[p] = layouts.open_checkpoint(p, names)
    return raw[p]

  try:
    info = None
    if spec.tokenizer is not None:
      referenced = list(dict.fromkeys([*spec.order, *([spec.tokenizer.base_model] if spec.tokenizer.base_model
                                                        else [])]))
      info = jtok.build(spec.tokenizer, referenced, spec.tokenizer.base_model)
    if spec.slices:
      vgroups = {}

      def open_reader(p, si):
        if info is None:
          return opened(p)
        if si not in vgroups:
          vgroups[si] = jtok.VocabularyGroup(info, {q: opened(q) for q, _, _ in spec.slices[si].ranges})
        return vgroups[si].view(p)

      groups, total = layers.plan(spec, open_reader)
      return groups, list(raw.values()), info, total
    if info is not None:
      vg = jtok.VocabularyGroup(info, {p: opened(p) for p in dict.fromkeys([*spec.order, spec.base, *spec.models])})
      base_r, model_rs = vg.view(spec.base), [vg.view(m) for m in spec.models]
    else:
      base_r = opened(spec.base)
      model_rs = [layouts.open_checkpoint(p, names) for p in spec.models]
      raw.update({f"{i}:{p}": r for i, (p, r) in enumerate(zip(spec.models, model_rs))})
    if clip_vision:  # CLIPModel base + CLIPVisionModel experts: merge the vision towers, keys "vision_model.*"
      hf = _hf()
      base_r = hf.VisionTowerReader(base_r, str(spec.base))
      model_rs = [hf.VisionTowerReader(r, str(n)) for r, n in zip(model_rs, spec.names)]
    return [layers.Group(spec=spec, base=base_r, models=model_rs)], list(raw.values()), info, None
  except BaseException:
    for r in raw.values():
      if hasattr(r, "close"):
        r.close()
    raise


def run(args: argparse.Namespace) -> int:
  """Runs ``jaxmerge merge``: resolves the config, merges (in memory, on a mesh, or streamed) and writes
  ``args.out`` atomically (see the module docstring).

  Args:
    args: the parsed options of the ``merge`` subcommand (see :func:`register`).

  Returns:
    The exit status, 0.

  Raises:
    ValueError: an invalid config or flag combination, incompatible checkpoints, or an existing output.
  """
  import jax  # noqa: PLC0415

  import jaxmerge as jm  # noqa: PLC0415
  from jaxmerge import stream as jstream  # noqa: PLC0415
  from jaxmerge.io import atomic  # noqa: PLC0415
  from jaxmerge.io import llm  # noqa: PLC0415
  from jaxmerge.io import safetensors_io as S  # noqa: PLC0415

  spec = load_config(args)
  out = pathlib.Path(args.out)
  if out.exists():
    raise ValueError(f"output {out} already exists; choose a new --out")
  max_shard = S.parse_size(args.max_shard_size)
  fmt = getattr(args, "format", "safetensors") or "safetensors"
  from jaxmerge.io import layouts  # noqa: PLC0415

  # jaxmerge.io.hf (CLIP: flax, transformers; seconds to import) only for a CLIP base
  clip_vision = not spec.slices and layouts.model_type(spec.base) == "clip" and _hf().clip_vision_layout(
      spec.base, list(spec.models))
  if not clip_vision:
    llm.check_architectures(spec.base, [p for p in dict.fromkeys([*spec.models, *spec.order]) if p != spec.base],
                            names=None)
  groups, readers, tok_info, num_layers = _open_groups(spec, clip_vision)
  base_r, model_rs = groups[0].base, groups[0].models
  aligned = []
  try:
    for g in groups:
      aligned.append((g.spec, *llm.align(g.base, g.models, policy=g.spec.vocab_policy, names=list(g.spec.names),
                                         out_dtype=g.spec.dtype)))
  except BaseException:
    for r in readers:
      if hasattr(r, "close"):
        r.close()
    raise
  base_v, model_vs = aligned[0][1], aligned[0][2]
  t = len(model_vs)
  need = sum((len(mv) + 3) * _float_bytes(bv, [k for k in bv.keys() if jstream.is_float_dtype(bv.dtype(k))])
             for _, bv, mv in aligned)
  use_stream = args.stream if args.stream is not None else need > _available_bytes() // 2
  if use_stream and fmt == "orbax":
    raise ValueError("--stream writes safetensors; use --format safetensors (or --no-stream for orbax output)")
  routes = [_plan_route(gspec, bv, mv) for gspec, bv, mv in aligned]  # per group: a mergekit plan, or None
  t_ofs = [None] * len(aligned)
  if spec.slices:  # mergekit's gradients run over each slice's own layers
    offset = 0
    for i, sl in enumerate(spec.slices):
      t_ofs[i] = _slice_t(offset, sl.num_layers)
      offset += sl.num_layers
  mesh = None
  if getattr(args, "mesh", None):
    if use_stream:
      raise ValueError("--mesh shards an in-memory merge; it cannot be combined with --stream (pass --no-stream)")
    if len(aligned) > 1:
      raise ValueError("--mesh merges whole models; it cannot be combined with slices")
    if any(r is not None for r in routes):
      raise ValueError("--mesh runs jaxmerge's transforms; mergekit-schema configs merge tensor by tensor on the host")
    mesh = parse_mesh(args.mesh, t)
  if fmt == "orbax" and any(r is not None for r in routes):
    raise ValueError("mergekit-schema configs write safetensors; use --format safetensors")
  layout = jm.filters.flax_layout if spec.layout == "flax" else jm.filters.hf_layout
  # the PRNG key of jaxmerge's transforms (creating it compiles a program: not for mergekit-plan-only merges)
  key = jax.random.key(int(spec.seed)) if any(r is None for r in routes) else None
  notes = list(spec.notes)
  if spec.tensor_names == "transformers" and layouts.renames_for(spec.base):
    notes.append(f"tensors written under transformers 5's {layouts.model_type(spec.base)} model names, as mergekit "
                 "writes them (jaxmerge: {tensor_names: checkpoint} keeps the checkpoints' names)")
  if any(g.plan is not None and r is None and g.plan.tie_rule == "exact" for (g, _, _), r in zip(aligned, routes)):
    notes.append("mergekit computes this merge in float32: jaxmerge's own engine gives its result")
  wide = [k for (_, bv, _), r in zip(aligned, routes) if r is None for k in bv.keys()
          if jstream.is_float_dtype(bv.dtype(k)) and bv.out_dtype(k) == "float64"]
  if wide:
    notes.append(f"{len(wide)} float64 tensors (e.g. {wide[0]!r}) are merged in float32 and written as float64")
  for note in notes:
    print(f"note: {note}")

  try:
    created = atomic.make_parents(out)
    for stale in atomic.remove_stale(out.parent):
      print(f"note: removed {stale}, left behind by an interrupted jaxmerge run")
    tmp = atomic.mkdtemp(out)
  except OSError as e:
    raise ValueError(f"cannot write the output {out}: {e.strerror or e} ({e.filename or out.parent})") from e
  t0 = time.perf_counter()
  arith = " (mergekit's arithmetic)" if any(r is not None for r in routes) else ""
  try:
    dirs = [tmp / f"task_{i}" for i in range(t)] if spec.per_task else [tmp]
    meta = {"jaxmerge_method": spec.method}
    out_dtypes: dict = {}
    for (_, bv, mv), plan in zip(aligned, routes):
      out_dtypes.update(_plan_out_dtypes(plan, bv, mv) if plan is not None else {k: bv.out_dtype(k) for k in bv.keys()})
    if use_stream:
      specs = {k: (bv.shape(k), out_dtypes[k]) for _, bv, _ in aligned for k in bv.keys()}
      writers = [S.ShardedWriter(d, specs, max_shard_bytes=max_shard, metadata=meta, atomic=False) for d in dirs]
      checked = [_CheckedWriter(w, out_dtypes.__getitem__) for w in writers]
      try:
        passes = compiles = 0
        for (gspec, bv, mv), plan, t_of in zip(aligned, routes, t_ofs):
          if plan is not None:  # mergekit's schema: its methods tensor by tensor (jaxmerge.mk)
            _merge_plan(plan, bv, mv, checked[0].write, True, t_of)
            passes = max(passes, 1)
            continue
          result = jstream.merge_streaming(
              gspec.tx, bv, mv, checked if gspec.per_task else checked[0], method=gspec.registry_method,
              key=key, layout=layout, names=list(gspec.names), per_task=gspec.per_task)
          passes, compiles = max(passes, result.passes), compiles + result.compiles
        for w in writers:
          w.close()
      except BaseException:
        for w in writers:
          w.abort()
        raise
      detail = f"streamed in {passes} pass(es), {compiles} compile(s){arith}"
    else:
      merged = None
      for (gspec, bv, mv), plan, t_of in zip(aligned, routes, t_ofs):
        if plan is not None:
          part_d: dict = {}
          _merge_plan(plan, bv, mv, part_d.__setitem__, False, t_of)
          for k, x in part_d.items():
            _check_fits(k, x, x.dtype)
          part = [part_d]
        else:
          gfloats = [k for k in bv.keys() if jstream.is_float_dtype(bv.dtype(k))]
          part = _merge_in_memory(gspec, bv, mv, gfloats, key, layout, mesh)
        merged = part if merged is None else [{**a, **b} for a, b in zip(merged, part)]
      for d, m in zip(dirs, merged):
        if fmt == "orbax":
          from jaxmerge.io import orbax_io  # noqa: PLC0415

          orbax_io.save(d / "orbax" if d == tmp else d, m)
        else:
          S.save_sharded(d / "model" if d == tmp else d, m, max_shard_bytes=max_shard, metadata=meta)
          if d == tmp:
            for f in (tmp / "model").iterdir():
              os.replace(f, tmp / f.name)
            (tmp / "model").rmdir()
      if fmt == "orbax" and not spec.per_task:  # the orbax item is the output directory itself
        for f in (tmp / "orbax").iterdir():
          os.replace(f, tmp / f.name)
        (tmp / "orbax").rmdir()
      detail = "in memory" + (f" on a {dict(mesh.shape)} mesh" if mesh is not None else "") + arith
    for d in dirs:
      if clip_vision:  # a CLIPVisionModel directory, like the experts
        first = pathlib.Path(spec.models[0])
        shutil.copyfile((first if first.is_dir() else first.parent) / "config.json", d / "config.json")
      else:
        notes.extend(_finish_dir(d, spec, base_v, tok_info, num_layers))
    seconds = time.perf_counter() - t0
    info = {"method": spec.method, "hparams": spec.hparams, "base": spec.base, "models": list(spec.models),
            "slices": [[list(r) for r in sl.ranges] for sl in spec.slices] or None, "num_layers": num_layers,
            "tokenizer": dataclasses.asdict(spec.tokenizer) if spec.tokenizer is not None else None,
            "chat_template": spec.chat_template, "tensor_names": spec.tensor_names,
            "layout": "clip_vision" if clip_vision else None,
            "dtype": spec.dtype, "seed": spec.seed, "vocab_policy": spec.vocab_policy, "source": spec.source,
            "stream": bool(use_stream), "mesh": dict(mesh.shape) if mesh is not None else None, "format": fmt,
            "per_task": spec.per_task, "notes": notes,
            "seconds": seconds, "jaxmerge_version": jm.__version__}
    (tmp / "merge_info.json").write_text(json.dumps(info, indent=1, default=str))
    if out.exists():
      raise ValueError(f"output {out} appeared while merging; choose a new --out")
    atomic.apply_umask(tmp)
    os.replace(tmp, out)
  except BaseException as e:
    shutil.rmtree(tmp, ignore_errors=True)
    atomic.remove_empty(created)
    if isinstance(e, OSError):
      where = e.filename or tmp
      raise ValueError(f"cannot write the output {out}: {e.strerror or e} (at {where}); nothing was left "
                       "behind") from e
    raise
  finally:
    for r in (*readers, base_r, *model_rs):
      if hasattr(r, "close"):
        r.close()
  print(f"merged {t} models with {spec.method} ({detail}) in {seconds:.2f} s -> {out}")
  return 0
