"""``jaxmerge merge``: merge safetensors checkpoints with any registered method and write the result atomically.

    jaxmerge merge CONFIG.yaml --out DIR
    jaxmerge merge --method ties --base pre.safetensors --model a.safetensors --model b.safetensors \\
        --hparam density=0.2 --hparam scale=0.3 --out DIR

CONFIG is ``{method: NAME, base: PATH, models: [PATH, ...], hparams: {...}, dtype: float32|bfloat16|float16,
seed: N}``; flags override it. PATH is a safetensors file or a directory holding one (a Hugging Face directory)
or a sharded checkpoint with an index. The output directory holds ``model.safetensors`` (sharded with an index
when large), or one ``task_<i>/`` directory per task for methods that keep one model per task. It is written to
a temporary directory and renamed when complete, so an interrupted run leaves nothing at ``DIR``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import tempfile
import time

__all__ = ["register", "run", "load_config"]

_DTYPES = ("float32", "bfloat16", "float16")


def register(subparsers) -> None:
  p = subparsers.add_parser("merge", help="merge checkpoints into one", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("config", nargs="?", help="YAML config (method, base, models, hparams, dtype, seed)")
  p.add_argument("--out", required=True, help="output directory")
  p.add_argument("--method", help="registry name (see `jaxmerge methods`)")
  p.add_argument("--base", help="pretrained checkpoint")
  p.add_argument("--model", action="append", default=None, help="fine-tuned checkpoint (repeat)")
  p.add_argument("--hparam", action="append", default=[], metavar="K=V", help="hyperparameter (repeat)")
  p.add_argument("--dtype", choices=_DTYPES, help="output dtype (default: the base checkpoint's)")
  p.add_argument("--seed", type=int, help="PRNG seed for stochastic methods (default 0)")
  p.add_argument("--layout", choices=("hf", "flax"), default=None, help="how 2-D weights are stored (default hf)")
  p.set_defaults(func=run)


def _value(text: str):
  import yaml

  return yaml.safe_load(text)


def load_config(args: argparse.Namespace) -> dict:
  """The merged configuration: YAML file first, then flags."""
  cfg: dict = {}
  if args.config:
    import yaml

    try:
      cfg = yaml.safe_load(pathlib.Path(args.config).read_text()) or {}
    except OSError as e:
      raise ValueError(f"cannot read config {args.config}: {e}") from e
    except yaml.YAMLError as e:
      raise ValueError(f"config {args.config} is not valid YAML: {e}") from e
    if not isinstance(cfg, dict):
      raise ValueError(f"config {args.config} must be a mapping")
    unknown = sorted(set(cfg) - {"method", "base", "models", "hparams", "dtype", "seed", "layout", "names"})
    if unknown:
      raise ValueError(f"config {args.config} has unknown keys {unknown}; valid: base, dtype, hparams, layout, "
                       "method, models, names, seed")
  for k in ("method", "base", "dtype", "seed", "layout"):
    if getattr(args, k) is not None:
      cfg[k] = getattr(args, k)
  if args.model:
    cfg["models"] = args.model
  hp = dict(cfg.get("hparams") or {})
  for item in args.hparam:
    if "=" not in item:
      raise ValueError(f"--hparam takes K=V, got {item!r}")
    k, v = item.split("=", 1)
    hp[k] = _value(v)
  cfg["hparams"] = hp
  for k in ("method", "base", "models"):
    if not cfg.get(k):
      raise ValueError(f"no {k} given (config key or --{k if k != 'models' else 'model'})")
  if cfg.get("dtype") not in (None, *_DTYPES):
    raise ValueError(f"dtype must be one of {_DTYPES}, got {cfg['dtype']!r}")
  return cfg


def _write(out: pathlib.Path, models: list[dict], per_task: bool, info: dict) -> None:
  from jaxmerge.io import safetensors_io

  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
  try:
    if per_task:
      for i, m in enumerate(models):
        safetensors_io.save_sharded(tmp / f"task_{i}", m, metadata={"jaxmerge_method": info["method"]})
    else:
      safetensors_io.save_sharded(tmp / "model", models[0], metadata={"jaxmerge_method": info["method"]})
      for f in (tmp / "model").iterdir():
        os.replace(f, tmp / f.name)
      (tmp / "model").rmdir()
    (tmp / "merge_info.json").write_text(json.dumps(info, indent=1, default=str))
    if out.exists():
      raise ValueError(f"output {out} already exists; choose a new --out")
    os.replace(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def run(args: argparse.Namespace) -> int:
  import jax
  import numpy as np

  import jaxmerge as jm
  from jaxmerge.io import safetensors_io

  cfg = load_config(args)
  info = jm.method_info(cfg["method"])
  if info.data != "none":
    raise ValueError(f"method {cfg['method']!r} needs data ({info.data}); `jaxmerge merge` runs data-free methods")
  tx = info.factory(**cfg["hparams"])
  out = pathlib.Path(args.out)
  if out.exists():
    raise ValueError(f"output {out} already exists; choose a new --out")
  base = safetensors_io.load(cfg["base"])
  models = [safetensors_io.load(p) for p in cfg["models"]]
  names = cfg.get("names") or [str(p) for p in cfg["models"]]
  layout = jm.filters.flax_layout if cfg.get("layout") == "flax" else jm.filters.hf_layout
  key = jax.random.key(int(cfg.get("seed") or 0))
  t0 = time.perf_counter()
  fn = jm.merge_per_task if info.per_task else jm.merge
  merged = fn(tx, base, models, key=key, layout=layout, names=names)
  merged = merged if info.per_task else [merged]
  if cfg.get("dtype"):
    import jax.numpy as jnp

    dt = jnp.dtype(cfg["dtype"])
    merged = [{k: (v.astype(dt) if jnp.issubdtype(v.dtype, jnp.floating) else v) for k, v in m.items()} for m in merged]
  merged = [{k: np.asarray(v) for k, v in m.items()} for m in merged]
  seconds = time.perf_counter() - t0
  _write(out, merged, info.per_task, {"method": cfg["method"], "hparams": cfg["hparams"], "base": cfg["base"],
                                      "models": cfg["models"], "dtype": cfg.get("dtype"), "seed": cfg.get("seed", 0),
                                      "seconds": seconds})
  print(f"merged {len(models)} models with {cfg['method']} in {seconds:.2f} s -> {out}")
  return 0
