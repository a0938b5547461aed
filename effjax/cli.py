"""The `effjax` command. Each area registers its own subcommands (a `register(subparsers)` function)."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

from effjax.cli_args import nonnegative_int, positive_int
from effjax.distributed import maybe_initialize

# Modules with a `register(subparsers)` function, one per area.
COMMANDS: tuple[str, ...] = (
    "effjax.decoding.generate_cli",
    "effjax.decoding.cli",
    "effjax.data.cli",
    "effjax.checkpoints.cli",
    "effjax.rlhf.cli",
    "effjax.rebalance.cli",
    "effjax.plan.cli",
)


class _Parser(argparse.ArgumentParser):
  """Usage errors as one line naming the flag (argparse would print the whole usage first)."""

  def error(self, message: str):
    self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
  parser = _Parser(prog="effjax", description=__doc__)
  dist = parser.add_argument_group(
      "multi-process runs", "a cluster JAX detects (Cloud TPU VM slice, GKE, SLURM, Open MPI) needs "
      "none of these; elsewhere give all three (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, "
      "JAX_PROCESS_ID)")
  dist.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0")
  dist.add_argument("--num-processes", type=positive_int, metavar="N")
  dist.add_argument("--process-id", type=nonnegative_int, metavar="I")
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


def one_line(error: BaseException) -> str:
  """An error's message on one line (a message of several lines joined with '; ')."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  return "; ".join(lines) or type(error).__name__


def main(argv: list[str] | None = None) -> int:
  """Runs one command. Bad input (a flag, a file, a checkpoint, a data set) is one line on stderr
  naming the problem, and exit status 2; so is a missing optional dependency."""
  try:
    args = build_parser().parse_args(argv)
  except SystemExit as e:  # --help (0) or a usage error (2), already printed
    return int(e.code or 0)
  _enable_compilation_cache()
  try:
    maybe_initialize(args.coordinator, args.num_processes, args.process_id)
    return int(args.func(args) or 0)
  except (ValueError, OSError, ImportError) as e:  # includes CheckpointError, DataError, JSON errors
    print(f"effjax {args.command}: error: {one_line(e)}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print(f"effjax {args.command}: interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
