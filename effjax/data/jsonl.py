"""JSONL problem sets: SpecBench, GSM8K, MATH-500 and plain {"prompt": ...} files.

The format is detected from the keys of the first JSON object in the file; every line is then
checked against that format. Lines that cannot be used are skipped and reported with file and line.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from effjax.data.records import Problem, ProblemSet, collect, make_problem, text_field
from effjax.errors import BadRecord

# A parser turns one JSON object, its line number (ids for sets that have none) and its
# "path:line" into a Problem.
Parser = Callable[[Mapping[str, Any], int, str], Problem]


def _id_field(record: Mapping[str, Any], key: str) -> str | None:
  value = record.get(key)
  if value is None:
    return None
  if isinstance(value, bool) or not isinstance(value, (str, int)):
    raise BadRecord(f"field '{key}' is not a string or integer", f"got {type(value).__name__}")
  return str(value)


def _spec_bench(record: Mapping[str, Any], line: int, source: str) -> Problem:
  qid = _id_field(record, "question_id")
  if qid is None:
    raise BadRecord("missing field 'question_id'")
  category = text_field(record, "category")
  turns = record.get("turns")
  if turns is None:
    raise BadRecord("missing field 'turns'")
  if not isinstance(turns, list) or not all(isinstance(t, str) for t in turns):
    raise BadRecord("field 'turns' is not a list of strings")
  return make_problem(qid, turns, None, {"category": category}, source)


def _gsm8k(record: Mapping[str, Any], line: int, source: str) -> Problem:
  question = text_field(record, "question")
  answer = text_field(record, "answer")
  solution, sep, final = answer.rpartition("####")
  if not sep or not final.strip():
    raise BadRecord("answer has no final answer after '#### '")
  return make_problem(f"gsm8k-{line}", [question], final.strip(), {"solution": solution.strip()}, source)


def _math500(record: Mapping[str, Any], line: int, source: str) -> Problem:
  problem = text_field(record, "problem")
  answer = text_field(record, "answer")
  metadata: dict[str, Any] = {}
  for key in ("subject", "solution"):
    if (value := text_field(record, key, required=False)) is not None:
      metadata[key] = value
  if "level" in record:
    level = record["level"]
    if isinstance(level, bool) or not isinstance(level, int):
      raise BadRecord("field 'level' is not an integer", f"got {type(level).__name__}")
    metadata["level"] = level
  uid = text_field(record, "unique_id", required=False) or f"math500-{line}"
  return make_problem(uid, [problem], answer, metadata, source)


def _plain(record: Mapping[str, Any], line: int, source: str) -> Problem:
  prompt = text_field(record, "prompt")
  answer = text_field(record, "answer", required=False)
  uid = _id_field(record, "id") or f"prompt-{line}"
  metadata = {k: v for k, v in record.items() if k not in ("prompt", "answer", "id")}
  return make_problem(uid, [prompt], answer, metadata, source)


# The key that identifies each format, checked in this order (a MATH-500 record has no "question",
# a GSM8K record no "turns"...), and its parser.
FORMATS: dict[str, tuple[str, Parser]] = {
    "spec_bench": ("turns", _spec_bench),
    "math500": ("problem", _math500),
    "gsm8k": ("question", _gsm8k),
    "plain": ("prompt", _plain),
}


def detect_format(record: Mapping[str, Any]) -> str | None:
  for name, (key, _) in FORMATS.items():
    if key in record:
      return name
  return None


def read_jsonl(path: str | Path, *, limit: int | None = None) -> ProblemSet:
  """Reads a JSONL problem set. Bad lines become `Skipped` entries; raises nothing for them."""
  path = Path(path)
  fmt: str | None = None

  def parse(raw: bytes, line: int, source: str) -> Problem:
    nonlocal fmt
    record = _decode(raw)
    if fmt is None:
      fmt = detect_format(record)
      if fmt is None:
        keys = ", ".join(sorted(record)) or "none"
        raise BadRecord("no known format key (turns, problem, question, prompt)", f"keys: {keys}")
    return FORMATS[fmt][1](record, line, source)

  # Bytes, not text: a line that is not UTF-8 must not stop the lines after it.
  with path.open("rb") as f:
    lines = ((f"{path}:{n}", functools.partial(parse, raw, n, f"{path}:{n}"))
             for n, raw in enumerate(f, start=1) if raw.strip())
    problems, skipped = collect(lines, limit=limit)
  return ProblemSet(spec=str(path), format=fmt or "unknown", problems=problems, skipped=skipped)


def _decode(raw: bytes) -> dict[str, Any]:
  try:
    text = raw.rstrip(b"\r\n").decode("utf-8-sig")  # -sig: files saved with a byte-order mark
  except UnicodeDecodeError as e:
    raise BadRecord("not UTF-8", f"byte {raw[e.start]:#04x} at column {e.start + 1}") from None
  try:
    record = json.loads(text)
  except json.JSONDecodeError as e:
    raise BadRecord("invalid JSON", f"{e.msg}: column {e.colno}") from None
  if not isinstance(record, dict):
    raise BadRecord("not a JSON object", f"got {type(record).__name__}")
  return record
