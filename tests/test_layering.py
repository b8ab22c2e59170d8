"""Layers only import downward: the core imports jax, numpy and jaxtyping only (ARCHITECTURE.md section 9)."""

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1] / "jaxmerge"
CORE_ALLOWED = {"jax", "jaxlib", "numpy", "jaxtyping", "jaxmerge", "__future__"}
STDLIB = set(sys.stdlib_module_names)
# Not core: the layers above the merge methods. `mk` is the mergekit-YAML engine (NumPy, mergekit's dtypes),
# used only by config.py and commands/.
NOT_CORE = ("models", "io", "eval", "data", "bench", "tta", "nn", "commands", "cli.py", "config.py", "stream.py",
            "ri.py", "analysis.py", "moe", "sharding.py", "interference.py", "mk")


def _core_files():
  for path in ROOT.rglob("*.py"):
    rel = path.relative_to(ROOT).as_posix()
    if rel.startswith(NOT_CORE) or rel.split("/")[0] in NOT_CORE:
      continue
    yield path


def _top_level_imports(path):
  tree = ast.parse(path.read_text())
  for node in tree.body:  # module level only: lazy imports inside functions are allowed
    if isinstance(node, ast.Import):
      for a in node.names:
        yield a.name.split(".")[0]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      yield node.module.split(".")[0]


def test_core_modules_import_only_jax_numpy_jaxtyping():
  offenders = {}
  for path in _core_files():
    bad = {m for m in _top_level_imports(path) if m not in CORE_ALLOWED and m not in STDLIB}
    if bad:
      offenders[path.relative_to(ROOT).as_posix()] = sorted(bad)
  assert not offenders, f"core modules import heavy dependencies at module level: {offenders}"


def test_import_jaxmerge_does_not_pull_flax_or_torch():
  code = "import sys, jaxmerge; print(sorted(m for m in ('flax','optax','orbax','transformers','torch') if m in sys.modules))"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       cwd=ROOT.parent).stdout.strip()
  assert out == "[]", out
