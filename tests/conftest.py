"""Test configuration: strict rank promotion, 8 fake CPU devices for sharding tests, a key fixture, and a
persistent compilation cache so that identical merge programs compile once per machine."""

import os
import pathlib
import tempfile

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
_cache = pathlib.Path(os.environ.get("JAXMERGE_TEST_COMPILE_CACHE", pathlib.Path(tempfile.gettempdir()) / "jaxmerge-jit-cache"))
jax.config.update("jax_compilation_cache_dir", str(_cache))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@pytest.fixture
def key():
  return jax.random.key(0)
