"""``jaxmerge methods``: the registry as a table (name, family, data needed, extra storage, one model per task,
whether ``jaxmerge merge --stream`` can stream it, default hyperparameters and their allowed values, from each
method's declaration in :mod:`jaxmerge.registry`)."""

from __future__ import annotations

import argparse

__all__ = ["register", "run", "table"]


def register(subparsers) -> None:
  """Adds the ``methods`` subcommand (called by :mod:`jaxmerge.cli`).

  Args:
    subparsers: the ``argparse`` sub-parsers action of the ``jaxmerge`` parser; the new parser's ``func``
      default is :func:`run`.
  """
  p = subparsers.add_parser("methods", help="list the merge methods")
  p.add_argument("--format", choices=("markdown", "json"), default="markdown")
  p.set_defaults(func=run)


def table() -> str:
  """The registry as a markdown table.

  Returns:
    The table (one row per registered method: family, data, extra storage, one model per task, streaming,
    default hyperparameters), lines joined by newlines.
  """
  import jaxmerge as jm

  rows = ["| method | family | data | extra storage | task id | streams | hyperparameters (defaults, allowed) |",
          "|---|---|---|---|---|---|---|"]
  for name in jm.list_methods():
    i = jm.method_info(name)
    hp = "; ".join(f"{k}={v!r} ({i.params[k].describe()})" if k in i.params else f"{k}={v!r}"
                   for k, v in i.hparams.items()).replace("|", "\\|") or "-"
    rows.append(f"| `{name}` | {i.family} | {i.data} | {i.storage} | {'yes' if i.per_task else 'no'} | "
                f"{_streams(name)} | {hp} |")
  return "\n".join(rows)


def _streams(name: str) -> str:
  """How ``jaxmerge merge --stream`` runs the method with its defaults: one pass, several exact passes, or not."""
  import jaxmerge as jm  # noqa: PLC0415
  from jaxmerge import stream  # noqa: PLC0415

  info = jm.method_info(name)
  if info.data != "none":
    return "-"
  try:
    tx = info.factory()
  except Exception:  # noqa: BLE001
    return "?"
  if stream.leafwise(tx):
    return "yes"
  return "passes" if stream.method_plan(name, {}) is not None else "no"


def run(args: argparse.Namespace) -> int:
  """Prints the registry: the markdown :func:`table`, or JSON with every method's info.

  Args:
    args: the parsed options; ``args.format`` is ``"markdown"`` or ``"json"``.

  Returns:
    The exit status, 0.
  """
  import json

  import jaxmerge as jm

  if args.format == "json":
    out = {n: {k: v for k, v in jm.method_info(n)._asdict().items() if k != "factory"} for n in jm.list_methods()}
    for n, info in out.items():
      info["params"] = {k: d.describe() for k, d in info["params"].items()}
    print(json.dumps(out, indent=1, default=repr))
  else:
    print(table())
  return 0
