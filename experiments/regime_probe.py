"""Probes the offline suite's regime: fine-tune experts on a backbone with other settings, merge, evaluate.

How suite version 3's regime was chosen (``experiments/README.md``, "Why this regime"): each probe fine-tunes the
eight experts from a backbone with the given :class:`~jaxmerge.bench.suite.OfflineConfig` overrides, prints the
task-vector statistics (:func:`jaxmerge.bench.regime.regime_stats`, without the linearity probe) and the average
accuracy of each method.

::

    # the shipped backbone, AdamW at 5e-5 instead of 1e-4
    python experiments/regime_probe.py --set finetune_lr=5e-5 --methods task_arithmetic,ties,tsv_m,wudi
    # another backbone (built with experiments/pretrain_backbone.py --out /tmp/bb --name tf03
    #   --set pretrain_task_fraction=0.3), SGD experts
    python experiments/regime_probe.py --backbone-dir /tmp/bb --backbone tf03 \\
        --set finetune_optimizer='"sgd"' finetune_lr=0.03 finetune_weight_decay=0.0

Values of ``--set`` are JSON. Experts are cached under ``--cache`` (default ``$JAXMERGE_CACHE/probes``).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
from pathlib import Path

import jax
import numpy as np

from jaxmerge import filters
from jaxmerge.bench import runner
from jaxmerge.bench import suite as S
from jaxmerge.bench import train as btrain
from jaxmerge.bench.backbone import ASSET_DIR, backbone_info, load_backbone
from jaxmerge.bench.cache import Cache, default_cache_dir
from jaxmerge.bench.regime import regime_stats
from jaxmerge.bench.text import WordTokenizer
from jaxmerge.data import synthetic


def build(config: S.OfflineConfig, name: str, root: Path, cache: Path, progress: bool = True) -> S.OfflineSuite:
  """The suite of ``config`` on backbone ``name`` from ``root`` (its recipe replaces the config's backbone fields)."""
  info = backbone_info(name, root)
  config = dataclasses.replace(config, backbone=None, **{k: info["recipe"][k] for k in S.BACKBONE_FIELDS})
  tok = WordTokenizer(tuple(info["vocab"]), config.context_length)
  model = S._model_for(config, len(tok.vocab), tok.eos_id)
  params, _ = load_backbone(name, jax.eval_shape(model.init, jax.random.key(0)), root)
  data = {t: synthetic.make_task(t, seed=config.seed, sizes=config.sizes) for t in config.tasks}
  heads = S._zero_shot_heads(model, params, tok, [data[t].spec for t in config.tasks])
  suite = S.OfflineSuite(name=f"probe-{name}", config=config, data=data, model=model, clip_params=params,
                         heads=heads, experts=[], layout=filters.flax_layout, timings={})
  key = hashlib.sha256(json.dumps([info["sha256"], config.to_dict()], sort_keys=True).encode()).hexdigest()[:12]
  store = Cache(cache / f"probe-{key}")
  like = jax.tree.map(np.asarray, suite.pretrained)
  experts = [store.load_tree(f"expert-{t}", like) for t in config.tasks]
  step = None
  for i, t in enumerate(config.tasks):
    if experts[i] is None:
      step = step or btrain.make_finetune_step(suite, config)
      experts[i] = jax.tree.map(np.asarray, btrain.finetune(suite, config, t, step))
      store.save_tree(f"expert-{t}", experts[i])
  suite.experts = experts
  return suite


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--backbone", default=S.DEFAULT_BACKBONE, help="backbone name")
  p.add_argument("--backbone-dir", default=str(ASSET_DIR), help="directory of the backbone (default: shipped)")
  p.add_argument("--set", nargs="*", default=[], metavar="FIELD=JSON", help="OfflineConfig overrides")
  p.add_argument("--methods", default="simple_average,task_arithmetic,ties,tsv_m,iso_c,iso_cts,cart,wudi,adamerging")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--cache", default=None, help="expert cache (default: $JAXMERGE_CACHE/probes)")
  args = p.parse_args(argv)
  try:
    overrides = S.config_overrides(args.set)
  except ValueError as e:
    raise SystemExit(str(e)) from None
  config = dataclasses.replace(S.OfflineConfig(seed=args.seed), **overrides)
  cache = Path(args.cache) if args.cache else Path(os.environ.get("JAXMERGE_CACHE") or default_cache_dir()) / "probes"
  suite = build(config, args.backbone, Path(args.backbone_dir), cache)
  st = regime_stats(suite, linearity=False)
  print(f"||tau||/||theta0|| mean {100 * np.mean(list(st['relative_norm'].values())):.2f}%  "
        f"mean |cos| {st['mean_abs_cosine']:.3f}  effective rank / width {st['mean_effective_rank']:.3f}")
  res = runner.run_suite(suite, [m.strip() for m in args.methods.split(",") if m.strip()], seed=args.seed,
                         progress=False)
  for r in res["rows"]:
    print(f"{r['method']:20s} {100 * r['average']:5.1f}")
  for s in res["skipped"]:
    print(f"skipped {s['method']}: {s['reason']}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
