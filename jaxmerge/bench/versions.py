"""The benchmark's pinned environment: ``constraints.txt`` (installed with ``pip install -e . -c
jaxmerge/bench/constraints.txt``) and a check that reports installed versions that differ from it.

Floating-point results of training depend on the versions of JAX, XLA (jaxlib), NumPy and the optimizer
library, so the documented tables are only reproducible with the pinned versions; a run with others says so
in its report.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

__all__ = ["CONSTRAINTS", "NUMERICS_PACKAGES", "check_versions", "pinned_versions"]

CONSTRAINTS = Path(__file__).resolve().parent / "constraints.txt"
# The packages whose versions can change the benchmark's numbers.
NUMERICS_PACKAGES = ("jax", "jaxlib", "numpy", "optax", "flax", "ml_dtypes", "scikit-learn", "scipy")


def _norm(name: str) -> str:
  return name.lower().replace("_", "-")


def pinned_versions(path: str | Path = CONSTRAINTS) -> dict[str, str]:
  """The pins of a constraints file.

  Args:
    path: the constraints file (default: the benchmark's).

  Returns:
    ``{package: version}`` of its ``name==version`` lines, names normalized (lower case, ``-`` for ``_``).
  """
  out = {}
  for line in Path(path).read_text().splitlines():
    line = line.split("#", 1)[0].strip()
    if "==" in line:
      name, version = line.split("==", 1)
      out[_norm(name.strip())] = version.strip()
  return out


def check_versions(packages=NUMERICS_PACKAGES, path: str | Path = CONSTRAINTS) -> dict:
  """Compares the installed versions of ``packages`` with the pinned ones.

  Args:
    packages: distribution names to check (default: :data:`NUMERICS_PACKAGES`).
    path: the constraints file (default: the benchmark's).

  Returns:
    ``{"installed": {package: version or "missing"}, "pinned": {package: version}, "differs": {package:
    [installed, pinned]}}``.
  """
  pinned = pinned_versions(path)
  installed, differs = {}, {}
  for p in packages:
    try:
      v = metadata.version(p)
    except metadata.PackageNotFoundError:
      v = "missing"
    installed[p] = v
    want = pinned.get(_norm(p))
    if want is not None and want != v:
      differs[p] = [v, want]
  return {"installed": installed, "pinned": {p: pinned.get(_norm(p)) for p in packages}, "differs": differs}
