"""Models: CLIP as Flax NNX modules behind a functional API (:mod:`jaxmerge.models.clip`)."""

import importlib as _importlib


def __getattr__(name):
  if name == "clip":
    return _importlib.import_module(f"{__name__}.clip")
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
