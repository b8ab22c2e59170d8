"""Data: CLIP preprocessing (``preprocess``), image sources and uint8 batches (``datasets``), the 20 TALL tasks
(``tasks``) and the offline suite's generators (``synthetic``). Submodules load on first access."""

import importlib as _importlib

_SUBMODULES = ("datasets", "preprocess", "synthetic", "tasks")


def __getattr__(name):
  if name in _SUBMODULES:
    return _importlib.import_module(f"{__name__}.{name}")
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
  return sorted(list(globals()) + list(_SUBMODULES))
