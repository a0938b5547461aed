"""The `effjax` command itself: a user-facing description, every command listed, and answers that
need no JAX (help, `effjax models`, argument errors) never import it: they return at once."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from effjax import cli

HEAVY = ("jax", "jaxlib", "flax", "numpy", "transformers", "torch", "orbax", "grain", "optax")


def _modules_after(code: str) -> set[str]:
  """Top-level packages imported by `code` run in a fresh interpreter."""
  probe = f"{code}\nimport sys\nprint(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
  proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  return set(proc.stdout.split()) & set(HEAVY)


@pytest.mark.parametrize("argv", [["--help"], ["generate", "--no-such-flag"], ["models", "-h"],
                                  ["no-such-command"], ["generate"]])
def test_help_and_argument_errors_import_no_jax(argv):
  assert _modules_after(f"from effjax import cli\ncli.main({argv!r})") == set()


def test_listing_the_models_imports_no_jax():
  assert _modules_after("from effjax import cli\ncli.main(['models'])") == set()


def test_help_describes_effjax_and_lists_every_command(capsys):
  assert cli.main(["--help"]) == 0
  out = capsys.readouterr().out
  assert out.startswith("usage: effjax")
  assert "generate text with small open LLMs on JAX" in out and "examples:" in out
  for name in cli.COMMANDS:
    assert f"\n    {name}" in out


def test_unknown_command_is_an_argparse_error(capsys):
  assert cli.main(["no-such-command"]) == 2
  assert "invalid choice: 'no-such-command'" in capsys.readouterr().err


def test_each_command_registers_its_own_parser():
  """The table names the module that registers each command (checked by building its parser)."""
  for name in cli.COMMANDS:
    parser = cli.build_parser([name])
    sub = next(a for a in parser._actions if a.dest == "command")
    command = sub.choices[name]  # a listing stub has neither a function nor subcommands
    assert command.get_default("func") is not None or any(
        isinstance(a, argparse._SubParsersAction) for a in command._actions), name
