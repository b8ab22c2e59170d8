"""Checkpoint I/O: safetensors (``safetensors_io``), orbax (``orbax_io``), Hugging Face CLIP (``hf``).

Submodules load on first attribute access (``jaxmerge.io.hf`` pulls in flax and transformers), so importing
``jaxmerge.io.safetensors_io`` stays light.
"""

import importlib as _importlib

_SUBMODULES = ("hf", "llm", "orbax_io", "safetensors_io")


def __getattr__(name):
  if name in _SUBMODULES:
    return _importlib.import_module(f"{__name__}.{name}")
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
  return sorted(list(globals()) + list(_SUBMODULES))
