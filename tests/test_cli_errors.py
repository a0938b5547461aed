"""Every `effjax` failure a user can cause is one line on stderr naming the problem, exit status 2,
before any slow work (model loading, compiling). No model is loaded in this file."""

import json

import pytest

from effjax.cli import main


def run(argv, capsys):
  code = main(argv)
  err = capsys.readouterr().err.strip()
  assert code == 2, err
  assert err and "\n" not in err and "Traceback" not in err, err
  return err


@pytest.fixture
def broken_jsonl(tmp_path):
  path = tmp_path / "questions.jsonl"
  rows = [{"question_id": 1, "category": "qa", "turns": ["Who wrote Hamlet?"]},
          {"question_id": 2, "category": "qa", "turns": ["What is 2 + 2?"]}]
  path.write_text(json.dumps(rows[0]) + "\n" + '{"question_id": 3, "turns": [' + "\n"
                  + json.dumps(rows[1]) + "\n")
  return path


@pytest.fixture
def hf_dir(tmp_path):
  """An HF directory whose tokenizer files are unreadable: reading them first would fail there."""
  path = tmp_path / "hf"
  path.mkdir()
  (path / "tokenizer.json").write_text("not a tokenizer")
  (path / "tokenizer_config.json").write_text("{}")
  return path


def test_invalid_config_json_is_named_before_the_tokenizer_is_read(hf_dir, capsys):
  (hf_dir / "config.json").write_text('{"model_type": "llama",')
  err = run(["generate", "--model", str(hf_dir), "--prompt", "hi"], capsys)
  assert f"{hf_dir / 'config.json'}: not valid JSON" in err
  (hf_dir / "config.json").write_text(json.dumps({
      "model_type": "llama", "vocab_size": 32, "hidden_size": 8, "intermediate_size": 16,
      "num_hidden_layers": 1, "num_attention_heads": 2, "shiny_new_key": 1}))
  err = run(["convert", str(hf_dir), str(hf_dir.parent / "out")], capsys)
  assert "unknown config keys ['shiny_new_key']" in err


def test_convert_refuses_an_output_it_cannot_write_before_loading(tmp_path, capsys):
  src = tmp_path / "model.gguf"
  src.write_bytes(b"not a gguf file")  # loading it would fail with "not a GGUF file"
  blocker = tmp_path / "a_file"
  blocker.write_text("x")
  err = run(["convert", str(src), str(blocker / "sub" / "out")], capsys)
  assert f"{blocker} is a file" in err
  err = run(["convert", str(src), str(blocker)], capsys)
  assert "already exists (pass --force" in err
  other = tmp_path / "notes"
  other.mkdir()
  (other / "keep.txt").write_text("precious")
  err = run(["convert", str(src), str(other), "--force"], capsys)
  assert "is not an effjax checkpoint" in err and (other / "keep.txt").is_file()
  err = run(["convert", str(src), str(tmp_path / "out")], capsys)  # a writable output: loads
  assert "not a GGUF file" in err


@pytest.mark.parametrize("argv,flag", [
    (["generate", "--file", "p.jsonl", "--batch-size", "0"], "--batch-size"),
    (["generate", "--prompt", "hi", "--max-new-tokens", "-3"], "--max-new-tokens"),
    (["generate", "--prompt", "hi", "--cache-len", "many"], "--cache-len"),
    (["rebalance", "eval", "--data", "sample:gsm8k", "--batch-size", "0"], "--batch-size"),
    (["rebalance", "extract", "--data", "sample:gsm8k", "--out", "p", "--offset", "-1"], "--offset"),
    (["bench", "specbench", "--data", "sample:spec_bench", "--limit", "0"], "--limit"),
    (["data", "inspect", "sample:gsm8k", "--show", "-1"], "--show"),
])
def test_bad_numbers_are_refused_by_the_parser(argv, flag, capsys):
  err = run(argv, capsys)
  assert f"argument {flag}:" in err and ("must be >=" in err or "expected an integer" in err)


def test_usage_errors_are_one_line(capsys):
  assert "unrecognized arguments: --bogus" in run(["generate", "--prompt", "hi", "--bogus"], capsys)
  assert "invalid choice: 'nope'" in run(["nope"], capsys)


def test_strict_data_refuses_a_broken_line(broken_jsonl, tmp_path, capsys):
  where = f"{broken_jsonl}:2: invalid JSON"
  # Evaluations and benchmarks are strict by default: the set must not shrink silently.
  assert where in run(["bench", "specbench", "--data", str(broken_jsonl), "--model", "none"], capsys)
  assert where in run(["rebalance", "eval", "--data", str(broken_jsonl), "--method", "baseline",
                       "--model", "none"], capsys)
  # --no-strict skips the line (with a warning) and goes on, here to the missing model.
  err = run(["bench", "specbench", "--data", str(broken_jsonl), "--model", "none", "--no-strict"],
            capsys)
  assert "none: neither a named model" in err
  # generate --file and data inspect skip by default; --strict refuses.
  assert where in run(["generate", "--file", str(broken_jsonl), "--strict", "--model", "none"], capsys)
  assert "neither a named model" in run(["generate", "--file", str(broken_jsonl), "--model", "none"],
                                        capsys)
  assert where in run(["data", "inspect", str(broken_jsonl), "--strict"], capsys)


def test_missing_files_and_models_are_named(tmp_path, capsys):
  assert "no such problem file" in run(["data", "inspect", str(tmp_path / "none.jsonl")], capsys)
  assert "unknown sample set 'gsm9k'" in run(["data", "inspect", "sample:gsm9k"], capsys)
  assert "neither a named model" in run(["generate", "--model", str(tmp_path / "m"), "--prompt",
                                         "hi"], capsys)
