"""Normalised problem/prompt records, and the account of what a loader skipped and why.

Every source (SpecBench, GSM8K, MATH-500, plain JSONL, TFDS) is turned into `Problem`s, so the
techniques see one record type whatever the file looked like.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from effjax.errors import BadRecord


@dataclasses.dataclass(frozen=True)
class Problem:
  """One problem or prompt. `turns` holds the user turns in order (one for single-turn sets, two
  for MT-bench items); `answer` is the reference final answer where the set has one."""

  id: str
  turns: tuple[str, ...]
  answer: str | None = None
  metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # category, subject, level...
  source: str = ""  # where it was read: "path:line" or "tfds:name:split[index]"

  @property
  def prompt(self) -> str:
    return self.turns[0]


@dataclasses.dataclass(frozen=True)
class Skipped:
  source: str  # "path:line" or "tfds:name:split[index]"
  reason: str
  detail: str = ""

  def __str__(self) -> str:
    return f"{self.source}: {self.reason}" + (f" ({self.detail})" if self.detail else "")


@dataclasses.dataclass(frozen=True)
class ProblemSet(Sequence[Problem]):
  """The usable records of one data set, in source order, and the records that were skipped."""

  spec: str
  format: str
  problems: tuple[Problem, ...]
  skipped: tuple[Skipped, ...] = ()

  def __len__(self) -> int:
    return len(self.problems)

  def __getitem__(self, index):
    return self.problems[index]

  def skip_counts(self) -> dict[str, int]:
    """How many records were skipped for each reason, most frequent first."""
    return dict(collections.Counter(s.reason for s in self.skipped).most_common())

  def summary(self) -> str:
    text = f"{self.spec}: {len(self.problems)} records ({self.format})"
    if self.skipped:
      reasons = ", ".join(f"{n} {reason}" for reason, n in self.skip_counts().items())
      text += f", {len(self.skipped)} skipped: {reasons}"
    return text


def text_field(record: Mapping[str, Any], key: str, *, required: bool = True) -> str | None:
  """The string under `key`; a missing required key or a non-string value is a BadRecord."""
  if key not in record or record[key] is None:
    if required:
      raise BadRecord(f"missing field '{key}'")
    return None
  return as_text(record[key], key)


def as_text(value: Any, key: str) -> str:
  """A str, or UTF-8 bytes decoded (TFDS may hand back bytes); anything else is a BadRecord."""
  if isinstance(value, bytes):
    try:
      return value.decode("utf-8")
    except UnicodeDecodeError as e:
      raise BadRecord("not UTF-8", f"field '{key}', byte {value[e.start]:#04x}") from None
  if not isinstance(value, str):
    raise BadRecord(f"field '{key}' is not a string", f"got {type(value).__name__}")
  return str(value)


def make_problem(id_: str, turns: Sequence[str], answer: str | None, metadata: Mapping[str, Any],
                 source: str) -> Problem:
  """A Problem, refusing prompts that are empty or only whitespace."""
  if not turns or any(not t.strip() for t in turns):
    raise BadRecord("empty prompt")
  return Problem(id=id_, turns=tuple(turns), answer=answer, metadata=dict(metadata), source=source)


def collect(records: Iterable[tuple[str, Callable[[], Problem]]], *, limit: int | None = None
            ) -> tuple[tuple[Problem, ...], tuple[Skipped, ...]]:
  """Builds each (source, make) record in order, keeping the good ones and a Skipped for each bad or
  repeated id, until `limit` good ones."""
  problems: list[Problem] = []
  skipped: list[Skipped] = []
  seen_ids: set[str] = set()
  for source, make in records:
    if limit is not None and len(problems) >= limit:
      break
    try:
      problem = make()
      if problem.id in seen_ids:
        raise BadRecord("duplicate id", problem.id)
    except BadRecord as e:
      skipped.append(Skipped(source, e.reason, e.detail))
      continue
    seen_ids.add(problem.id)
    problems.append(problem)
  return tuple(problems), tuple(skipped)
