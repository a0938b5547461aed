"""`effjax generate`: clear errors before any work, real generation with the embedded model."""

import json
import os
import re
import subprocess
import sys

import jax
import pytest

from effjax.cli import main


@pytest.mark.parametrize("argv,msg", [
    (["--model", "no-such-model", "--prompt", "hi"], "neither a named model"),
    (["--prompt", "hi", "--temperature", "-1"], "temperature"),
    (["--prompt", "hi", "--top-p", "1.5", "--temperature", "1"], "top_p"),
    (["--prompt", "hi", "--max-new-tokens", "0"], "max-new-tokens"),
    (["--prompt", "hi", "--mesh", "data=x"], "mesh"),
    (["--prompt", "hi", "--method", "medusa"], "unknown decoding method"),
    (["--prompt", "hi", "--method", "esp-bc20"], "BC must be one of"),
])
def test_bad_arguments_are_clear_errors(argv, msg, capsys):
  assert main(["generate", *argv]) == 2
  assert msg in capsys.readouterr().err


def test_prompt_longer_than_cache_is_refused(capsys):
  assert main(["generate", "--prompt", "word " * 200, "--cache-len", "128"]) == 2
  err = capsys.readouterr().err
  assert "cache_len=128" in err and "measuring forward costs" not in err  # refused first


def test_streams_text_and_batches_a_jsonl_file(tmp_path, capsys):
  argv = ["generate", "--prompt", "What is the capital of France?", "--max-new-tokens", "12",
          "--cache-len", "256"]
  assert main([*argv, "--method", "ar"]) == 0
  out = capsys.readouterr()
  assert "Paris" in out.out
  assert re.search(r"\[ar: \d+ tokens", out.err) and "tau 1.00" in out.err and "tokens/s" in out.err
  # The default, auto, streams the same text (lossless); on a short answer that repeats nothing
  # it never loads its speculative program (plain steps from its starter program).
  assert main(argv) == 0
  auto = capsys.readouterr()
  assert auto.out == out.out and re.search(r"\[auto: \d+ tokens", auto.err)
  assert "plain steps only: the text gave speculation too little" in auto.err
  # A speculative method streams the same text and reports its tokens per forward.
  assert main([*argv, "--method", "pld"]) == 0
  spec = capsys.readouterr()
  assert spec.out == out.out and re.search(r"\[pld: \d+ tokens", spec.err) and "tau " in spec.err
  prompts = tmp_path / "p.jsonl"
  prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in ["Say hello.", "Count to three."]))
  res = tmp_path / "out.jsonl"
  assert main(["generate", "--file", str(prompts), "--out", str(res), "--max-new-tokens", "8",
               "--cache-len", "256", "--temperature", "0.7", "--top-k", "20", "--seed", "3"]) == 0
  rows = [json.loads(l) for l in res.read_text().splitlines()]
  assert [r["prompt"] for r in rows] == ["Say hello.", "Count to three."]
  assert all(0 < r["new_tokens"] <= 8 and r["output"] for r in rows)


QUESTION = "What is the capital of France? Answer in one word."


@pytest.mark.slow
@pytest.mark.parametrize("flags,want", [
    ([], "The capital of France is Paris."),  # auto, the default: plain decoding's greedy text
    (["--method", "ar", "--temperature", "0.7", "--top-k", "20", "--seed", "3"],
     "That's not entirely accurate. The capital of France is Paris, not Paris itself. I'm using a "
     "helper named Sm"),
])
def test_cold_start_output_is_unchanged_and_restores_stored_programs(tmp_path, capsys, monkeypatch,
                                                                      flags, want):
  """The same text as before the fast start (recorded with effjax a371fdc); a second process
  restores the programs the first stored instead of compiling, and reports its phases."""
  monkeypatch.setenv("EFFJAX_PROGRAMS", str(tmp_path / "programs"))
  argv = ["generate", "--prompt", QUESTION, "--max-new-tokens", "24", *flags]
  assert main(argv) == 0
  assert capsys.readouterr().out == want
  # The same JAX configuration as this process (a set matmul precision is part of the key).
  precision = jax.config.values["jax_default_matmul_precision"]
  env = dict(os.environ, **({} if precision is None else {"JAX_DEFAULT_MATMUL_PRECISION": precision}))
  proc = subprocess.run([sys.executable, "-m", "effjax.cli", *argv, "--verbose"],
                        capture_output=True, text=True, timeout=600, env=env)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout == want
  rows = {line.split()[0]: line for line in proc.stderr.splitlines()[-10:] if line.strip()}
  assert {"start", "import", "load", "prompt", "compile", "prefill", "decode", "total"} <= set(rows)
  assert "prefill: disk" in proc.stderr and "decode: disk" in proc.stderr
