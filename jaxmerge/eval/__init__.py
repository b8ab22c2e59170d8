"""Evaluation: zero-shot heads and jitted batched evaluation (``zeroshot``), metrics (``metrics``), and the
``jaxmerge eval`` subcommand (``command``), peak-memory measurement (``memory``). Submodules load on first
access."""

import importlib as _importlib

_SUBMODULES = ("command", "memory", "metrics", "zeroshot")


def __getattr__(name):
  if name in _SUBMODULES:
    return _importlib.import_module(f"{__name__}.{name}")
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
  return sorted(list(globals()) + list(_SUBMODULES))
