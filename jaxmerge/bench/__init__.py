"""The benchmark: suites of pretrained and fine-tuned models, a runner that merges with every method and
evaluates, and reports (``jaxmerge bench``).

The offline suite (:mod:`jaxmerge.bench.suite`) builds a tiny CLIP, zero-shot heads and eight experts on
procedural and scikit-learn images in minutes on a laptop CPU, and caches them. Methods that need data plug
into the runner with :func:`register_runner` (TTA, validation or auxiliary data) or :func:`register_adapter`
(pre-merge adaptations such as Resolving Interference).

The names below load their modules on first use, so that ``jaxmerge merge`` (whose command line registers the
``bench`` subcommand) does not import Flax and the suite.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "SUITES": "jaxmerge.bench.command",
    "build_suite": "jaxmerge.bench.command",
    "write_reports": "jaxmerge.bench.report",
    "Suite": "jaxmerge.bench.runner",
    "register_adapter": "jaxmerge.bench.runner",
    "register_runner": "jaxmerge.bench.runner",
    "resolve_methods": "jaxmerge.bench.runner",
    "run_suite": "jaxmerge.bench.runner",
    "OfflineConfig": "jaxmerge.bench.suite",
    "OfflineSuite": "jaxmerge.bench.suite",
    "build_offline_suite": "jaxmerge.bench.suite",
}

_SUBMODULES = ("cache", "command", "moe_runner", "report", "ri_runner", "runner", "suite", "text", "train",
               "tta_runner")

__all__ = sorted(_EXPORTS) + list(_SUBMODULES)  # (submodules listed so that the API reference documents them)


def __getattr__(name: str):
  if name in _SUBMODULES:
    return importlib.import_module(f"{__name__}.{name}")
  module = _EXPORTS.get(name)
  if module is None:
    raise AttributeError(f"module 'jaxmerge.bench' has no attribute {name!r}")
  value = getattr(importlib.import_module(module), name)
  globals()[name] = value
  return value


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_EXPORTS) | set(_SUBMODULES))
