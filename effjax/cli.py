"""The `effjax` command. Each area registers its own subcommands (a `register(subparsers)` function)."""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules with a `register(subparsers)` function, one per area.
COMMANDS: tuple[str, ...] = ("effjax.data.cli", "effjax.checkpoints.cli", "effjax.rlhf.cli")


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="effjax", description=__doc__)
  sub = parser.add_subparsers(dest="command", required=True)
  for name in COMMANDS:
    importlib.import_module(name).register(sub)
  return parser


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  try:
    return int(args.func(args) or 0)
  except (ValueError, FileNotFoundError, ModuleNotFoundError) as e:
    print(f"effjax {args.command}: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
