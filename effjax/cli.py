"""The `effjax` command. Each area registers its own subcommands (a `register(subparsers)` function)."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

# Modules with a `register(subparsers)` function, one per area.
COMMANDS: tuple[str, ...] = (
    "effjax.decoding.generate",
    "effjax.decoding.cli",
    "effjax.data.cli",
    "effjax.checkpoints.cli",
    "effjax.rlhf.cli",
    "effjax.rebalance.cli",
)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="effjax", description=__doc__)
  sub = parser.add_subparsers(dest="command", required=True)
  for name in COMMANDS:
    importlib.import_module(name).register(sub)
  return parser


def _enable_compilation_cache() -> None:
  """Reuse compiled programs across runs of the command (jit compiles dominate short runs)."""
  import jax

  if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    cache = Path(os.environ.get("EFFJAX_CACHE", Path.home() / ".cache" / "effjax")) / "jax"
    jax.config.update("jax_compilation_cache_dir", str(cache))


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  _enable_compilation_cache()
  try:
    return int(args.func(args) or 0)
  except (ValueError, FileNotFoundError, ModuleNotFoundError) as e:
    print(f"effjax {args.command}: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
