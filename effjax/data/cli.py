"""`effjax data inspect SPEC`: what a problem set holds, what was skipped and why."""

from __future__ import annotations

import argparse
import logging
import textwrap

from effjax.cli_args import add_strict_arg, nonnegative_int, positive_int
from effjax.data.loader import load_problems

_LISTED_SKIPS = 20


def register(subparsers) -> None:
  data = subparsers.add_parser("data", help="problem and prompt sets")
  sub = data.add_subparsers(dest="data_command", required=True)
  inspect = sub.add_parser("inspect", help="count a set's records, list skipped ones, show a few",
                           description=__doc__)
  inspect.add_argument("spec", help="a JSONL file, sample:NAME (gsm8k, math500, spec_bench) "
                       "or tfds:NAME[:SPLIT]")
  inspect.add_argument("--data-dir", help="TFDS data dir (a folder or gs:// path)")
  inspect.add_argument("--limit", type=positive_int, help="read at most this many usable records")
  inspect.add_argument("--show", type=nonnegative_int, default=3, help="records to print (default 3)")
  add_strict_arg(inspect, default=False)
  inspect.set_defaults(func=_inspect)


def _clip(text: str, width: int = 200) -> str:
  return textwrap.shorten(" ".join(text.split()), width=width, placeholder=" ...")


def _inspect(args: argparse.Namespace) -> int:
  logging.getLogger("effjax.data").setLevel(logging.ERROR)  # the report below says it all
  problems = load_problems(args.spec, data_dir=args.data_dir, limit=args.limit, strict=args.strict)
  print(problems.summary())
  for skip in problems.skipped[:_LISTED_SKIPS]:
    print(f"  skipped {skip}")
  if len(problems.skipped) > _LISTED_SKIPS:
    print(f"  ... and {len(problems.skipped) - _LISTED_SKIPS} more skipped")
  for problem in problems[:args.show]:
    print(f"\n[{problem.id}] {problem.source}")
    for n, turn in enumerate(problem.turns, start=1):
      print(f"  turn {n}: {_clip(turn)}")
    if problem.answer is not None:
      print(f"  answer: {_clip(problem.answer)}")
    if problem.metadata:
      print("  " + ", ".join(f"{k}={_clip(str(v), 60)}" for k, v in problem.metadata.items()))
  return 0
