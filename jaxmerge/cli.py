"""The ``jaxmerge`` console command.

Subcommands: ``bench`` (the offline benchmark suite, the main job), ``merge`` (checkpoints in, merged checkpoint
out), ``eval`` (evaluate a checkpoint on a suite) and ``methods`` (the registry). Each lives in its own module
exposing ``register(subparsers)``; this file only dispatches. Errors in the user's input (``ValueError``) and
files that cannot be read or written (``OSError``, with the path) are printed as one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

_COMMANDS = (
    "jaxmerge.bench.command",
    "jaxmerge.commands.merge",
    "jaxmerge.eval.command",
    "jaxmerge.commands.methods",
)


def build_parser() -> argparse.ArgumentParser:
  """The ``jaxmerge`` argument parser, with the subcommands whose modules are importable.

  Returns:
    The parser; each subcommand sets ``func`` (called with the parsed arguments).
  """
  parser = argparse.ArgumentParser(
      prog="jaxmerge",
      description="Model merging in JAX: benchmark, merge and evaluate models.",
  )
  sub = parser.add_subparsers(dest="command", metavar="COMMAND")
  for name in _COMMANDS:
    try:
      module = importlib.import_module(name)
    except ModuleNotFoundError as e:  # an optional subcommand whose module is absent from this install
      if e.name is None or not (name == e.name or name.startswith(e.name + ".")):
        raise
      continue
    module.register(sub)
  return parser


def _enable_compilation_cache() -> None:
  """Persist compiled XLA programs under the jaxmerge cache, so that a second run skips compilation
  (``JAXMERGE_NO_XLA_CACHE=1`` turns this off)."""
  if os.environ.get("JAXMERGE_NO_XLA_CACHE"):
    return
  import jax

  root = os.environ.get("JAXMERGE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "jaxmerge")
  jax.config.update("jax_compilation_cache_dir", os.path.join(root, "xla"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def main(argv: list[str] | None = None) -> int:
  """Runs the ``jaxmerge`` command (enabling the persistent XLA compilation cache first).

  Args:
    argv: the command-line arguments without the program name; ``None`` reads ``sys.argv[1:]``.

  Returns:
    The exit status: the subcommand's (0 on success), 1 without a subcommand (after printing the help), 2 when
    it raised ``ValueError`` or ``OSError`` (the message is printed to stderr as one line).
  """
  _enable_compilation_cache()
  parser = build_parser()
  args = parser.parse_args(argv)
  if not getattr(args, "func", None):
    parser.print_help()
    return 1
  try:
    result = args.func(args)
  except ValueError as e:
    print(f"jaxmerge {args.command}: error: {e}", file=sys.stderr)
    return 2
  except OSError as e:  # a file that cannot be read or written (permissions, a full disk): one line, the path
    print(f"jaxmerge {args.command}: error: {e}", file=sys.stderr)
    return 2
  return int(result or 0)


if __name__ == "__main__":
  sys.exit(main())
