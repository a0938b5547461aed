"""JSONL problem sets: each format on the sample sets shipped with effjax, bad-record reporting,
the inspect command."""

import fnmatch
import hashlib
import json
import logging
import re
import tomllib
from pathlib import Path

import pytest

from effjax import cli
from effjax.data import load_problems, samples
from effjax.data.samples import sample_path
from effjax.errors import DataError

REPO = Path(__file__).resolve().parents[1]


def raw_records(path):
  return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_lines(path, lines):
  path.write_bytes(b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n"
                            for line in lines))
  return path


def test_spec_bench_dev_file():
  path = sample_path("spec_bench")
  raw = raw_records(path)
  problems = load_problems(path)
  assert problems.format == "spec_bench" and not problems.skipped
  assert len(problems) == len(raw) == 360
  for problem, record in zip(problems, raw):
    assert problem.id == str(record["question_id"])
    assert problem.turns == tuple(record["turns"])
    assert problem.metadata["category"] == record["category"]
    assert problem.answer is None
  first = problems[0]
  assert (first.id, first.metadata["category"], len(first.turns)) == ("81", "writing", 2)
  assert first.prompt.startswith("Compose an engaging travel blog post about a recent trip to Hawaii")
  assert first.source == f"{path}:1"
  # MT-bench (ids 81-160) has two turns, the other Spec-Bench tasks one.
  assert all(len(p.turns) == (2 if int(p.id) <= 160 else 1) for p in problems)


def test_gsm8k_dev_file():
  path = sample_path("gsm8k")
  raw = raw_records(path)
  problems = load_problems(path)
  assert problems.format == "gsm8k" and not problems.skipped and len(problems) == len(raw) == 990
  assert problems[0].answer == "18"
  assert problems[0].prompt.startswith("Janet’s ducks lay 16 eggs per day.")
  for n, (problem, record) in enumerate(zip(problems, raw), start=1):
    assert problem.id == f"gsm8k-{n}"
    assert problem.turns == (record["question"],)
    assert problem.answer == record["answer"].split("#### ")[-1].strip()
    assert "####" not in problem.metadata["solution"]
    assert record["answer"].startswith(problem.metadata["solution"])


def test_math500_dev_file():
  path = sample_path("math500")
  raw = raw_records(path)
  problems = load_problems(path)
  assert problems.format == "math500" and not problems.skipped and len(problems) == len(raw) == 400
  first = problems[0]
  assert first.id == "test/precalculus/807.json"
  assert first.answer == r"\left( 3, \frac{\pi}{2} \right)"
  assert (first.metadata["subject"], first.metadata["level"]) == ("Precalculus", 2)
  for problem, record in zip(problems, raw):
    assert (problem.id, problem.prompt, problem.answer) == (
        record["unique_id"], record["problem"], record["answer"])
    assert problem.metadata == {"subject": record["subject"], "solution": record["solution"],
                                "level": record["level"]}


def test_sample_sets_ship_with_licence_and_provenance():
  """Each sample set is in the package, matches the checksum SOURCES.txt gives, has its LICENSE,
  is named by `sample:NAME`, and is covered by pyproject's package-data (so a wheel carries it)."""
  root = sample_path("gsm8k").parents[1]
  sources = (root / "SOURCES.txt").read_text()
  for name in samples.NAMES:
    path = sample_path(name)
    digest = re.search(rf"^{name}\s+\d+ of \d+\s+([0-9a-f]{{64}})$", sources, re.M).group(1)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, name
    assert (path.parent / "LICENSE").read_text().lstrip().startswith(("MIT License", "Apache License"))
    assert load_problems(f"sample:{name}", limit=2).spec == str(path)
  with pytest.raises(ValueError, match="unknown sample set 'gsm9k'"):
    load_problems("sample:gsm9k")
  package = "effjax.data.samples"
  patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
  shipped = [f.relative_to(root).as_posix() for f in root.rglob("*") if f.is_file()
             and f.suffix not in (".py", ".pyc")]
  assert len(shipped) == 1 + 2 * len(samples.NAMES), shipped
  for rel in shipped:
    assert any(fnmatch.fnmatch(rel, pat) for pat in patterns[package]), rel


def test_limit_keeps_the_first_records():
  problems = load_problems(sample_path("gsm8k"), limit=5)
  assert [p.id for p in problems] == [f"gsm8k-{n}" for n in range(1, 6)]


def test_plain_prompts(tmp_path):
  path = write_lines(tmp_path / "prompts.jsonl", [
      json.dumps({"prompt": "Say hi.", "id": 7, "answer": "hi", "lang": "en"}),
      "",
      json.dumps({"prompt": "Count to three."}),
  ])
  problems = load_problems(path)
  assert problems.format == "plain" and not problems.skipped
  assert [(p.id, p.prompt, p.answer, dict(p.metadata), p.source) for p in problems] == [
      ("7", "Say hi.", "hi", {"lang": "en"}, f"{path}:1"),
      ("prompt-3", "Count to three.", None, {}, f"{path}:3"),
  ]


def test_bad_records_are_reported_with_file_and_line(tmp_path, caplog):
  path = write_lines(tmp_path / "mixed.jsonl", [
      json.dumps({"prompt": "good one"}),
      b'{"prompt": "caf\xe9"}',  # Latin-1, not UTF-8
      json.dumps({"prompt": "   "}),
      json.dumps({"prompt": 3}),
      "[1, 2]",
      '{"prompt": "unterminated',
      json.dumps({"text": "no prompt key"}),
      json.dumps({"prompt": "another", "id": "prompt-1"}),
      json.dumps({"prompt": "last good"}),
  ])
  with caplog.at_level(logging.WARNING, logger="effjax.data"):
    problems = load_problems(path)
  assert [p.prompt for p in problems] == ["good one", "last good"]
  assert [(s.source, s.reason) for s in problems.skipped] == [
      (f"{path}:2", "not UTF-8"),
      (f"{path}:3", "empty prompt"),
      (f"{path}:4", "field 'prompt' is not a string"),
      (f"{path}:5", "not a JSON object"),
      (f"{path}:6", "invalid JSON"),
      (f"{path}:7", "missing field 'prompt'"),
      (f"{path}:8", "duplicate id"),
  ]
  assert problems.skipped[0].detail == "byte 0xe9 at column 16"
  assert problems.skipped[4].detail == "Unterminated string starting at: column 12"
  assert sum(problems.skip_counts().values()) == 7
  assert "2 records (plain), 7 skipped" in problems.summary()
  with pytest.raises(DataError, match=f"^{path}:2: not UTF-8 .*; 7 unusable record"):
    load_problems(path, strict=True)  # strict: a bad line is an error, not a smaller set
  logged = caplog.text
  assert f"{path}:2: not UTF-8" in logged and f"{path}:8: duplicate id (prompt-1)" in logged
  assert "7 skipped" in logged


def test_format_errors_per_format(tmp_path):
  spec = write_lines(tmp_path / "spec.jsonl", [
      json.dumps({"question_id": 1, "category": "qa", "turns": ["ok"]}),
      json.dumps({"question_id": True, "category": "qa", "turns": ["x"]}),
      json.dumps({"question_id": 3, "category": "qa", "turns": "not a list"}),
      json.dumps({"question_id": 4, "turns": ["no category"]}),
      json.dumps({"question_id": 5, "category": "qa", "turns": ["first", ""]}),
  ])
  assert [s.reason for s in load_problems(spec).skipped] == [
      "field 'question_id' is not a string or integer", "field 'turns' is not a list of strings",
      "missing field 'category'", "empty prompt"]
  gsm = write_lines(tmp_path / "gsm.jsonl", [
      json.dumps({"question": "1+1?", "answer": "so 2\n#### 2"}),
      json.dumps({"question": "2+2?", "answer": "4"}),
      json.dumps({"question": "3+3?"}),
  ])
  assert [s.reason for s in load_problems(gsm).skipped] == [
      "answer has no final answer after '#### '", "missing field 'answer'"]
  math = write_lines(tmp_path / "math.jsonl", [
      json.dumps({"problem": "x?", "answer": "1", "level": "Level 3"}),
      json.dumps({"problem": "y?", "answer": "2", "level": 3}),
  ])
  problems = load_problems(math)
  assert [(p.id, p.metadata["level"]) for p in problems] == [("math500-2", 3)]
  assert problems.skipped[0].reason == "field 'level' is not an integer"


def test_format_is_detected_from_the_first_usable_object(tmp_path):
  path = write_lines(tmp_path / "late.jsonl", [
      json.dumps({"text": "unknown"}),
      json.dumps({"problem": "p", "answer": "a"}),
      json.dumps({"prompt": "plain record in a MATH file"}),
  ])
  problems = load_problems(path)
  assert problems.format == "math500" and [p.prompt for p in problems] == ["p"]
  assert [s.reason for s in problems.skipped] == [
      "no known format key (turns, problem, question, prompt)", "missing field 'problem'"]


def test_a_set_with_no_usable_record_is_refused(tmp_path):
  path = write_lines(tmp_path / "bad.jsonl", ["{", json.dumps({"prompt": ""})])
  message = r"0 records.*2 skipped.*no usable record.*bad.jsonl:1: invalid JSON"
  with pytest.raises(ValueError, match=message):
    load_problems(path)
  with pytest.raises(ValueError, match="no usable record"):
    load_problems(write_lines(tmp_path / "empty.jsonl", [""]))


def test_spec_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="no such problem file"):
    load_problems(tmp_path / "missing.jsonl")
  path = write_lines(tmp_path / "p.jsonl", [json.dumps({"prompt": "x"})])
  with pytest.raises(ValueError, match="data_dir applies to tfds"):
    load_problems(path, data_dir=str(tmp_path))
  with pytest.raises(ValueError, match="limit must be positive"):
    load_problems(path, limit=0)


def test_inspect_command(tmp_path, capsys):
  path = write_lines(tmp_path / "p.jsonl", [
      json.dumps({"prompt": "What is 2+2?", "answer": "4", "topic": "arithmetic"}),
      "not json",
      json.dumps({"prompt": "Name a colour."}),
  ])
  assert cli.main(["data", "inspect", str(path), "--show", "1"]) == 0
  out = capsys.readouterr().out
  assert f"{path}: 2 records (plain), 1 skipped: 1 invalid JSON" in out
  assert f"skipped {path}:2: invalid JSON" in out
  assert "turn 1: What is 2+2?" in out and "answer: 4" in out and "topic=arithmetic" in out
  assert "Name a colour." not in out  # --show 1
  assert cli.main(["data", "inspect", str(tmp_path / "none.jsonl")]) == 2
  assert "no such problem file" in capsys.readouterr().err
