"""Executes the notebooks in ``colabs/`` in place, so that the committed copies show their tables and plots.

::

    python experiments/run_notebooks.py                  # every notebook, at its default suite size
    python experiments/run_notebooks.py 02_clip_vit_b32  # one notebook

Each notebook runs top to bottom in a fresh kernel (cwd: a temporary directory) with the offline suite cached
under ``$JAXMERGE_CACHE``; its outputs are written back to the file, and its metadata records how
(``metadata.jaxmerge``: suite size, command, date, seconds, package versions). ``tests/test_notebooks.py``
checks that every committed notebook was executed this way without errors, and executes them again on the
tiny suite.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import nbclient
import nbformat

COLABS = Path(__file__).resolve().parents[1] / "colabs"


def default_suite_size(nb) -> str:
  """The suite size a notebook runs at by default: its settings cell's ``SUITE_SIZE = ... else "<size>"``."""
  for cell in nb.cells:
    m = re.search(r'^SUITE_SIZE = .* else "(\w+)"', cell.source, re.M) if cell.cell_type == "code" else None
    if m:
      return m.group(1)
  return "none"


def run(path: Path, timeout: int) -> float:
  from jaxmerge.bench.versions import check_versions

  nb = nbformat.read(path, as_version=4)
  start = time.perf_counter()
  with tempfile.TemporaryDirectory() as cwd:
    client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": cwd}})
    client.execute()
  seconds = time.perf_counter() - start
  nb.metadata["jaxmerge"] = {
    "executed_with": f"python experiments/run_notebooks.py {path.stem}",
    "suite_size": "tiny" if os.environ.get("JAXMERGE_NOTEBOOK_SMOKE") == "1" else default_suite_size(nb),
    "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    "seconds": round(seconds, 1),
    "versions": check_versions()["installed"],
  }
  tmp = path.with_suffix(".ipynb.tmp")
  nbformat.write(nb, tmp)
  os.replace(tmp, path)
  return seconds


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("names", nargs="*", help="notebook names (default: all)")
  p.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
  args = p.parse_args(argv)
  paths = sorted(COLABS.glob("*.ipynb"))
  if args.names:
    paths = [q for q in paths if q.stem in args.names]
    if len(paths) != len(args.names):
      raise SystemExit(f"unknown notebook among {args.names}; have {[q.stem for q in sorted(COLABS.glob('*.ipynb'))]}")
  os.environ.pop("MPLBACKEND", None)  # the kernel's inline backend, so that plots land in the notebook
  for path in paths:
    seconds = run(path, args.timeout)
    print(f"{path.name}: {seconds:.0f} s", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
