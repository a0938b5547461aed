"""`effjax rlhf run | plot | describe`: online RLHF runs, their curves, and the toy environment."""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

# XLA:CPU's default concurrency-optimised scheduler runs the recomputation of rematerialised layers
# ahead of the backward pass and so keeps every layer's activations alive anyway (a SmolLM2-135M
# reward-model step: ~16 GB of temporaries instead of ~2 GB). Read when the backend starts, so it is
# set before the first computation; harmless on GPU/TPU.
LEAN_CPU_SCHEDULE = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def register(subparsers) -> None:
  p = subparsers.add_parser("rlhf", help="online RLHF with efficient exploration")
  sub = p.add_subparsers(dest="rlhf_command", required=True)

  run = sub.add_parser("run", help="run (or resume) one agent; rerun the same command to resume")
  run.add_argument("--config", required=True, help="TOML / JSON / YAML run config")
  run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set seed=3 --set agent.kind=online")
  run.add_argument("--no-progress", action="store_true", help="no progress bar")
  run.set_defaults(func=cmd_run)

  plot = sub.add_parser("plot", help="win rate vs labels with fitted curves; prints the summary")
  plot.add_argument("runs", nargs="+", help="run directories (out_dir of each run)")
  plot.add_argument("--out", default="rlhf_win_rate.png", help="figure path")
  plot.add_argument("--summary", default="", help="also write the summary JSON here")
  plot.add_argument("--reference", default="offline", help="group the efficiency ratio is against")
  plot.set_defaults(func=cmd_plot)

  desc = sub.add_parser("describe", help="the toy environment's SFT reward distribution and ties")
  desc.add_argument("--config", required=True)
  desc.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
  desc.set_defaults(func=cmd_describe)


def cmd_run(args: argparse.Namespace) -> int:
  if "concurrency_optimized_scheduler" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {LEAN_CPU_SCHEDULE}".strip()
  from effjax.rlhf.agents import Trainer
  from effjax.rlhf.config import load_config
  cfg = load_config(args.config, tuple(args.set))
  trainer = Trainer(cfg, progress=not args.no_progress)
  try:
    result = trainer.run()
  finally:
    trainer.close()
  print(json.dumps({k: v for k, v in result.items() if k != "curve"}))
  return 0


def cmd_plot(args: argparse.Namespace) -> int:
  from effjax.rlhf import curves
  groups = curves.load_runs(args.runs)
  summary = curves.summarize(groups, args.reference)
  curves.plot([("win rate vs SFT (rater probability)", groups, summary)], args.out)
  text = json.dumps(summary, indent=1)
  if args.summary:
    pathlib.Path(args.summary).write_text(text)
  print("\n".join(curves.summary_lines(summary, args.reference)))
  print(f"figure: {args.out}", file=sys.stderr)
  return 0


def cmd_describe(args: argparse.Namespace) -> int:
  from effjax.rlhf.config import load_config
  from effjax.rlhf.toy import ToyEnvironment, describe
  cfg = load_config(args.config, tuple(args.set))
  if cfg.env.kind != "toy":
    raise ValueError("describe is for the toy environment")
  env = ToyEnvironment(cfg.env.toy, cfg.cache_dir)
  info = describe(env, env.sft_policy(), top_k=cfg.policy.top_k, temperature=cfg.policy.temperature,
                  rater_temperature=cfg.rater.temperature)
  print(json.dumps(info, indent=1))
  return 0


def main(argv: list[str] | None = None) -> int:
  """`python -m effjax.rlhf.cli run ...`: the rlhf subcommands without loading every area's CLI."""
  parser = argparse.ArgumentParser(prog="effjax rlhf")
  sub = parser.add_subparsers(dest="command", required=True)
  register(sub)
  args = parser.parse_args(["rlhf", *(sys.argv[1:] if argv is None else argv)])
  return int(args.func(args) or 0)


if __name__ == "__main__":
  sys.exit(main())
