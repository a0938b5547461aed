"""`load_problems`: the one entry point every command uses to read a problem or prompt set."""

from __future__ import annotations

import logging
from pathlib import Path

from effjax.data.jsonl import read_jsonl
from effjax.data.records import ProblemSet
from effjax.data import samples, tfds_source
from effjax.errors import DataError

log = logging.getLogger(__name__)

# How many skipped records are logged one by one; the rest are only counted.
_LOGGED_SKIPS = 10


def load_problems(spec: str | Path, *, data_dir: str | None = None, limit: int | None = None,
                  strict: bool = False) -> ProblemSet:
  """Loads a problem set from a JSONL path (SpecBench, GSM8K, MATH-500 or {"prompt": ...} records,
  detected from the keys), from `sample:NAME` (a set shipped with effjax: gsm8k, math500, spec_bench)
  or from `tfds:NAME[:SPLIT]` (prepared data under `data_dir`).

  Bad records are skipped, logged with their file and line, and counted in the result; with
  `strict` any bad record is a DataError instead (evaluations: a broken line must not silently
  shrink the set). A set with no usable record is a DataError. `limit` stops after that many usable
  records.
  """
  if limit is not None and limit < 1:
    raise ValueError(f"limit must be positive, got {limit}")
  spec = str(spec)
  if spec.startswith(tfds_source.PREFIX):
    problems = tfds_source.read_tfds(spec, data_dir=data_dir, limit=limit)
  else:
    spec = str(samples.resolve(spec))
    if data_dir is not None:
      raise ValueError(f"data_dir applies to tfds: specs only, not to {spec}")
    if not Path(spec).is_file():
      raise FileNotFoundError(
          f"no such problem file: {spec} (or use sample:NAME or tfds:NAME[:SPLIT])")
    problems = read_jsonl(spec, limit=limit)
  if strict and problems.skipped:
    raise DataError(f"{problems.skipped[0]}; {len(problems.skipped)} unusable record(s) in "
                    f"{problems.spec} (strict loading: fix them, or skip them with strict=False / --no-strict)")
  for skip in problems.skipped[:_LOGGED_SKIPS]:
    log.warning("skipped %s", skip)
  if len(problems) == 0:
    raise DataError(f"{problems.summary()}: no usable record"
                     + (f"; first problem: {problems.skipped[0]}" if problems.skipped else ""))
  (log.warning if problems.skipped else log.info)("%s", problems.summary())
  return problems
