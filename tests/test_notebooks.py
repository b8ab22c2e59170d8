"""The notebooks in ``colabs/`` run top to bottom, and the committed copies show their outputs.

The committed copies were executed by ``experiments/run_notebooks.py`` (their metadata says when, how and at
which suite size), so a reader sees the tables and plots without running anything; this test checks that
every code cell ran, in order, without an error.

Every notebook runs in its own kernel on the "tiny" offline suite (``JAXMERGE_NOTEBOOK_SMOKE=1``) with one
suite cache shared by all of them (``JAXMERGE_CACHE``), so the suite is built once, by whichever notebook runs
first. The cache is a fresh temporary directory unless ``JAXMERGE_NOTEBOOK_CACHE`` names a persistent one (CI
can keep it between runs: the suite is then loaded, not rebuilt; entries are checksummed and rebuilt if
corrupt). A cell error fails the test. The notebooks hold their own checks (``assert`` / ``np.testing``): a merge
against its closed form, ``partition`` against ``masked``, sharded and streamed merges against the in-memory
merge, RI's and AdaMerging's histories.
"""

import json
import os
import pathlib
import time

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

COLABS = pathlib.Path(__file__).resolve().parents[1] / "colabs"
NOTEBOOKS = sorted(COLABS.glob("*.ipynb"))
CELL_TIMEOUT_S = 600


def test_notebooks_exist():
  names = [p.stem for p in NOTEBOOKS]
  for expected in ("01_quickstart", "02_clip_vit_b32", "03_test_time_adaptation", "04_resolving_interference",
                   "05_moe_merging", "06_scale"):
    assert expected in names, names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_was_executed(path):
  nb = json.loads(path.read_text())
  assert nb["nbformat"] == 4
  meta = nb["metadata"].get("jaxmerge", {})
  assert meta.get("executed_with", "").startswith("python experiments/run_notebooks.py"), \
    f"{path.name}: not executed by experiments/run_notebooks.py (run it before committing)"
  counts = []
  for i, cell in enumerate(nb["cells"]):
    if cell["cell_type"] == "code" and "".join(cell["source"]).strip():
      assert cell.get("execution_count") is not None, f"{path.name}: cell {i} was not executed"
      counts.append(cell["execution_count"])
      assert not [o for o in cell.get("outputs", []) if o.get("output_type") == "error"], \
        f"{path.name}: cell {i} has an error output"
  assert counts == list(range(1, len(counts) + 1)), f"{path.name}: cells ran out of order: {counts}"
  nbformat.validate(nbformat.reads(path.read_text(), as_version=4))


def test_ri_notebook_ran_on_the_benchmark_suite():
  """The RI notebook's committed outputs come from the faithful suite (what ``jaxmerge bench --ri`` adapts) and
  its RI step is the benchmark's call, not a hand-written one with other settings."""
  nb = json.loads((COLABS / "04_resolving_interference.ipynb").read_text())
  assert nb["metadata"]["jaxmerge"]["suite_size"] == "full"
  code = "".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
  assert "ri_experts(suite, jax.random.fold_in(jax.random.key(0), 1)" in code and "disentangle(" not in code


@pytest.fixture(scope="module")
def shared_env(tmp_path_factory):
  """Environment of every kernel: the tiny suite, one suite cache, a headless matplotlib, and the test run's
  persistent XLA compilation cache (set up by conftest), so kernels reuse each other's compiled programs."""
  import jax

  persistent = os.environ.get("JAXMERGE_NOTEBOOK_CACHE")
  cache = pathlib.Path(persistent) if persistent else tmp_path_factory.mktemp("notebook-cache")
  cache.mkdir(parents=True, exist_ok=True)
  env = {"JAXMERGE_NOTEBOOK_SMOKE": "1", "JAXMERGE_CACHE": str(cache), "MPLBACKEND": "Agg",
         "TQDM_DISABLE": "1", "PYDEVD_DISABLE_FILE_VALIDATION": "1"}
  xla = jax.config.jax_compilation_cache_dir
  if xla:
    env.update(JAX_COMPILATION_CACHE_DIR=str(xla), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
  before = {p.name for p in cache.iterdir() if p.name.startswith("offline-")}
  return cache, env, {}, before


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, shared_env, tmp_path, monkeypatch):
  cache, env, seconds, before = shared_env
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  nb = nbformat.reads(path.read_text(), as_version=4)
  client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                   resources={"metadata": {"path": str(tmp_path)}})
  start = time.perf_counter()
  try:
    client.execute()
  except nbclient.exceptions.CellExecutionError as e:
    pytest.fail(f"{path.name}: a cell failed:\n{e}", pytrace=False)
  seconds[path.stem] = time.perf_counter() - start
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
  assert not errors
  # One suite for all notebooks: the notebooks together add at most one suite entry to the shared cache.
  suites = {p.name for p in cache.iterdir() if p.name.startswith("offline-")} - before
  assert len(suites) <= 1, suites
  print(f"{path.name}: {seconds[path.stem]:.1f} s (so far: {sum(seconds.values()):.1f} s)")
