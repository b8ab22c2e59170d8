"""Pretrains the offline suite's backbone (a tiny CLIP) and writes it as package data.

The default ``jaxmerge bench`` starts from a backbone that ships with jaxmerge
(``jaxmerge/bench/assets/<name>.{safetensors,json}``), as the real protocol starts from OpenAI's CLIP. This
script is how that file was made: it pretrains jaxmerge's CLIP at the architecture and with the recipe of
:class:`jaxmerge.bench.suite.OfflineConfig` (contrastively, on the captioned pretraining mixture of
:func:`jaxmerge.data.synthetic.make_pretraining`, seed 0) and saves the weights, the word vocabulary, the
recipe and the SHA-256 of the weights.

::

    python experiments/pretrain_backbone.py                     # rebuild the shipped backbone (about 17 min on 2 cores)
    python experiments/pretrain_backbone.py --out /tmp/bb --name mine --set pretrain_steps=1000

A rebuilt backbone is numerically close to the shipped one but not bit-identical on another machine (the
floating-point order of XLA's CPU kernels depends on the host's vector instructions); the benchmark's
documented tables are for the shipped file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import jax
import numpy as np

from jaxmerge.bench import suite as S
from jaxmerge.bench import train as btrain
from jaxmerge.bench.backbone import ASSET_DIR, save_backbone
from jaxmerge.bench.text import WordTokenizer
from jaxmerge.bench.versions import check_versions
from jaxmerge.data import synthetic


def _parse_set(items: list[str]) -> dict:
  out = {}
  for item in items:
    key, _, value = item.partition("=")
    if key not in S.BACKBONE_FIELDS:
      raise SystemExit(f"--set {key}: not a backbone field; valid: {', '.join(S.BACKBONE_FIELDS)}")
    out[key] = type(getattr(S.OfflineConfig(), key))(json.loads(value))
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--name", default=S.DEFAULT_BACKBONE, help=f"backbone name (default {S.DEFAULT_BACKBONE})")
  p.add_argument("--out", default=str(ASSET_DIR), help="output directory (default: the package's assets)")
  p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                 help="override a backbone field of OfflineConfig (architecture or recipe)")
  args = p.parse_args(argv)
  config = dataclasses.replace(S.OfflineConfig(), backbone=None, seed=0, **_parse_set(args.set))
  start = time.perf_counter()
  pre = synthetic.make_pretraining(seed=config.seed, n=config.pretrain_size,
                                   task_fraction=config.pretrain_task_fraction)
  specs = [synthetic.task_spec(t) for t in config.tasks]
  tok = WordTokenizer.build([*pre.captions, *S._prompts(specs)], config.context_length)
  model = S._model_for(config, len(tok.vocab), tok.eos_id)
  params = btrain.pretrain(model, config, pre, tok, preprocess=S._preprocess, progress=True)
  params = jax.tree.map(np.asarray, params)
  seconds = time.perf_counter() - start
  path = save_backbone(args.name, params, config=dataclasses.asdict(model.config), recipe=config.backbone_fields(),
                       vocab=list(tok.vocab), root=args.out,
                       extra={"pretrain_seed": config.seed, "pretrain_seconds": round(seconds, 1),
                              "versions": check_versions()["installed"]})
  print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB) in {seconds:.0f} s")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
