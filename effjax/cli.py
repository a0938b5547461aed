"""effjax: generate text with small open LLMs on JAX, speed it up with speculative decoding (ESP),
steer reasoning with ReBalance and run online RLHF with efficient exploration, on CPU, GPU or TPU."""

from __future__ import annotations

import argparse
import importlib
import sys

from effjax import caches
from effjax.cli_args import nonnegative_int, positive_int
from effjax.distributed import explicit_settings, maybe_initialize

EXAMPLES = """examples:
  effjax generate --prompt "Explain what a KV cache is in two sentences."
  effjax generate --file prompts.jsonl --out answers.jsonl --model gemma3-270m --no-chat
  effjax models
  effjax COMMAND --help        the options of one command"""

# Command -> (module whose `register(subparsers)` adds it, one-line summary). A command's module is
# imported only when that command runs, so `effjax --help` and argument errors answer at once.
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("effjax.decoding.generate_cli", "generate text (streams for a single prompt)"),
    "models": ("effjax.checkpoints.cli", "list the named models and where their weights come from"),
    "convert": ("effjax.checkpoints.cli", "convert a GGUF file, HF directory or named model to an "
                                          "effjax checkpoint directory"),
    "bench": ("effjax.decoding.cli", "benchmarks (Spec-Bench protocol for decoding methods)"),
    "rebalance": ("effjax.rebalance.cli", "ReBalance: extract steering profiles, evaluate, plot"),
    "rlhf": ("effjax.rlhf.cli", "online RLHF experiments: run, plot"),
    "data": ("effjax.data.cli", "inspect a prompt/problem data set (JSONL or tfds:NAME:SPLIT)"),
    "plan": ("effjax.plan.cli", "compile a recipe for a TPU slice (no TPU needed) and report "
                                "memory and time"),
}
# Commands that never start JAX (they answer at once), so they join no multi-process run.
WITHOUT_JAX = ("models",)


class _Parser(argparse.ArgumentParser):
  """Usage errors as one line naming the flag (argparse would print the whole usage first)."""

  def error(self, message: str):
    self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _chosen(argv: list[str]) -> str | None:
  """The command named on the command line (the first word that names one: the global options'
  values, HOST:PORT or a number, never do), if any."""
  return next((a for a in argv if a in COMMANDS), None)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
  """The `effjax` parser; only the module of the command in `argv` is imported (all with None)."""
  parser = _Parser(prog="effjax", description=__doc__, epilog=EXAMPLES,
                   formatter_class=argparse.RawDescriptionHelpFormatter)
  dist = parser.add_argument_group(
      "multi-process runs", "a cluster JAX detects (Cloud TPU VM slice, GKE, SLURM, Open MPI) needs "
      "none of these; elsewhere give all three (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, "
      "JAX_PROCESS_ID)")
  dist.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0")
  dist.add_argument("--num-processes", type=positive_int, metavar="N")
  dist.add_argument("--process-id", type=nonnegative_int, metavar="I")
  sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
  chosen = COMMANDS if argv is None else [_chosen(argv)]
  modules = {COMMANDS[name][0] for name in chosen if name}
  for name, (module, summary) in COMMANDS.items():
    if module not in modules:
      sub.add_parser(name, help=summary)
    elif name not in sub.choices:  # one module may register several commands
      importlib.import_module(module).register(sub)
  return parser


def one_line(error: BaseException) -> str:
  """An error's message on one line (a message of several lines joined with '; ')."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  return "; ".join(lines) or type(error).__name__


def main(argv: list[str] | None = None) -> int:
  """Runs one command. Bad input (a flag, a file, a checkpoint, a data set) is one line on stderr
  naming the problem, and exit status 2; so is a missing optional dependency."""
  argv = sys.argv[1:] if argv is None else list(argv)
  try:
    args = build_parser(argv).parse_args(argv)
  except SystemExit as e:  # --help (0) or a usage error (2), already printed
    return int(e.code or 0)
  caches.enable()
  try:
    multi = (args.coordinator, args.num_processes, args.process_id)
    if args.command in WITHOUT_JAX:  # nothing to join; bad settings are still an error
      explicit_settings(*multi)
    else:
      maybe_initialize(*multi)
    return int(args.func(args) or 0)
  except (ValueError, OSError, ImportError) as e:  # includes CheckpointError, DataError, JSON errors
    print(f"effjax {args.command}: error: {one_line(e)}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print(f"effjax {args.command}: interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
