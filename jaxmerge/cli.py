"""The ``jaxmerge`` console command.

Subcommands: ``bench`` (the offline benchmark suite, the main job), ``merge`` (checkpoints in, merged checkpoint
out), ``eval`` (evaluate a checkpoint on a suite) and ``methods`` (the registry). Each lives in its own module
exposing ``register(subparsers)``; this file only dispatches. Errors in the user's input (``ValueError``) are
printed as one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

_COMMANDS = (
    "jaxmerge.bench.command",
    "jaxmerge.commands.merge",
    "jaxmerge.eval.command",
    "jaxmerge.commands.methods",
)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="jaxmerge",
      description="Model merging in JAX: benchmark, merge and evaluate models.",
  )
  sub = parser.add_subparsers(dest="command", metavar="COMMAND")
  for name in _COMMANDS:
    importlib.import_module(name).register(sub)
  return parser


def main(argv: list[str] | None = None) -> int:
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
  return int(result or 0)


if __name__ == "__main__":
  sys.exit(main())
