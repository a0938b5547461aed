"""Argument types and flags shared by the `effjax` subcommands.

A bad value is refused by argparse before any work, as one line naming the flag (exit status 2).
"""

from __future__ import annotations

import argparse


def _int_at_least(low: int):
  def parse(text: str) -> int:
    try:
      value = int(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < low:
      raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
    return value

  parse.__name__ = f"int >= {low}"
  return parse


positive_int = _int_at_least(1)
nonnegative_int = _int_at_least(0)


def add_strict_arg(p: argparse.ArgumentParser, *, default: bool) -> None:
  """--strict / --no-strict: whether an unusable record in the problem set is an error (on for
  evaluations and benchmarks, so a broken line cannot silently shrink the set) or skipped with a
  warning."""
  p.add_argument("--strict", action=argparse.BooleanOptionalAction, default=default,
                 help="an unusable record in the data is an error, not skipped with a warning "
                      f"(default {'on' if default else 'off'})")
