"""Sample problem sets shipped inside effjax: fixed dev subsets of GSM8K, MATH-500 and Spec-Bench.

They let tests, notebooks, configs and examples run from a plain clone or an installed wheel, with no
data folder beside the checkout. Provenance (source repository, commit, sha256) is in SOURCES.txt and
each set's licence in its own LICENSE file. Name one with `sample:NAME` wherever a problem set is read
(`load_problems`, `--data`, the RLHF config's `env.gsm8k.data`). The full public sets: `tfds:gsm8k`
(TensorFlow Datasets), Spec-Bench's data/spec_bench/question.jsonl (github.com/hemingkx/Spec-Bench)
and MATH-500's test.jsonl (github.com/openai/prm800k); any of their JSONL files works as a path.
"""

from __future__ import annotations

from pathlib import Path

PREFIX = "sample:"
NAMES = ("gsm8k", "math500", "spec_bench")

_ROOT = Path(__file__).resolve().parent


def sample_path(name: str) -> Path:
  """The JSONL file of the named sample set."""
  if name not in NAMES:
    raise ValueError(f"unknown sample set {name!r}; choose one of {', '.join(NAMES)}")
  return _ROOT / name / "dev.jsonl"


def resolve(spec: str | Path) -> str | Path:
  """`sample:NAME` -> the path of that sample set; any other spec unchanged."""
  if isinstance(spec, str) and spec.startswith(PREFIX):
    return sample_path(spec[len(PREFIX):])
  return spec
