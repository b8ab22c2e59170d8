"""Layers only import downward (ARCHITECTURE.md section 9): the core imports jax, numpy and jaxtyping only; the core
(the engine included) never imports I/O, models, evaluation, data or the benchmark; methods never import the
engine; no private name crosses modules."""

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1] / "jaxmerge"
CORE_ALLOWED = {"jax", "jaxlib", "numpy", "jaxtyping", "jaxmerge", "__future__"}
STDLIB = set(sys.stdlib_module_names)
# Not core: the layers above the merge methods. `mk` is the mergekit-YAML engine (NumPy, mergekit's dtypes),
# used only by config.py and commands/.
NOT_CORE = ("models", "io", "eval", "data", "bench", "tta", "nn", "commands", "cli.py", "config.py", "stream",
            "ri.py", "analysis.py", "moe", "interference.py", "mk")
UPPER = ("io", "bench", "models", "eval", "data", "commands", "cli", "config", "stream", "tta", "moe", "ri",
         "analysis", "interference", "mk")
METHODS = ("typing.py", "tree.py", "filters.py", "linalg.py", "stats.py", "base.py", "combine.py", "transforms",
           "reductions", "alias.py", "alias_subspace.py", "registry.py")


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


def _rel(path):
  return path.relative_to(ROOT).as_posix()


def _all_jaxmerge_imports(path):
  """Every jaxmerge module imported anywhere in the file (module level and inside functions)."""
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      yield from (a.name for a in node.names if a.name.startswith("jaxmerge"))
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("jaxmerge"):
      yield from (f"{node.module}.{a.name}" if node.module == "jaxmerge" else node.module for a in node.names)


def test_core_and_engine_never_import_io_models_eval_data_or_bench():
  offenders = {}
  for path in _core_files():
    bad = {m for m in _all_jaxmerge_imports(path) if m.split(".")[1:2] and m.split(".")[1] in UPPER}
    if bad and _rel(path) != "__init__.py":  # (the package's __init__ registers the TTA methods)
      offenders[_rel(path)] = sorted(bad)
  assert not offenders, f"core modules import upper layers: {offenders}"


def test_methods_never_import_the_engine():
  offenders = {}
  for path in ROOT.rglob("*.py"):
    rel = _rel(path)
    if rel.startswith(METHODS):
      bad = {m for m in _all_jaxmerge_imports(path) if m.split(".")[1:2] in (["engine"], ["sharding"], ["stream"])}
      if bad:
        offenders[rel] = sorted(bad)
  assert not offenders, f"method modules import the engine: {offenders}"


def _module_name(path):
  parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_private_name_crosses_modules():
  """``from jaxmerge.x import _name``, ``module._name`` on an imported jaxmerge module, and imports from a private
  module (``jaxmerge.reductions._mean``) outside its own package are all refused."""
  offenders = []
  for path in ROOT.rglob("*.py"):
    mod = _module_name(path)
    package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text())
    modules = set()
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("jaxmerge"):
        for a in node.names:
          modules.add(a.asname or a.name)
          if a.name.startswith("_") and not a.name.startswith("__"):
            offenders.append(f"{mod}: from {node.module} import {a.name}")
        parts = node.module.split(".")
        private = [i for i, c in enumerate(parts) if c.startswith("_")]
        if private and not package.startswith(".".join(parts[:private[0]])):
          offenders.append(f"{mod}: from {node.module} import ... (a private module of another package)")
      elif isinstance(node, ast.Import):
        modules |= {a.asname for a in node.names if a.name.startswith("jaxmerge") and a.asname}
    for node in ast.walk(tree):
      if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules
          and node.attr.startswith("_") and not node.attr.startswith("__")):
        offenders.append(f"{mod}: {node.value.id}.{node.attr}")
  assert not offenders, "private names cross modules:\n" + "\n".join(sorted(offenders))


def test_the_merge_function_shadows_no_module():
  """``jm.merge`` is the function and no module is named ``jaxmerge.merge`` (the engine is ``jaxmerge.engine``)."""
  code = ("import sys, jaxmerge, jaxmerge.sharding, jaxmerge.stream; "
          "print(callable(jaxmerge.merge), 'jaxmerge.merge' in sys.modules, 'jaxmerge.engine.merge' in sys.modules)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       cwd=ROOT.parent).stdout.strip()
  assert out == "True False True", out
