"""Calibration and evaluation problems must be disjoint: exact and near-duplicate checks.

A problem is exact-matched by the hash of its normalised statement (case and whitespace ignored)
and near-matched by word 5-gram overlap: two statements are near-duplicates when the shared 5-grams
cover at least NEAR_DUPLICATE of the shorter one's (containment). A copy with a number or a name
changed, a sentence added or the question reworded keeps most of its 5-grams; distinct problems
share few (on the GSM8K and MATH-500 dev sets the closest pair of different problems is at 0.57, a
GSM8K problem and its inverse, and every other pair below 0.5).

A profile stores its calibration problems' fingerprints and 5-gram hashes (not their texts), so the
check runs wherever a profile is used, inside `evaluate()` and extraction alike.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import re
from collections.abc import Iterable, Sequence

import numpy as np

NGRAM = 5
NEAR_DUPLICATE = 0.6
_WORDS = re.compile(r"[a-z0-9]+")


def problem_fingerprint(text: str) -> str:
  """Short hash of a problem statement, insensitive to case and whitespace."""
  return hashlib.sha256(" ".join(text.lower().split()).encode()).hexdigest()[:16]


def shingles(text: str, n: int = NGRAM) -> np.ndarray:
  """Sorted unique 63-bit hashes of the word n-grams of a statement (lower case, alphanumeric words;
  a statement shorter than n words is one n-gram)."""
  words = _WORDS.findall(text.lower())
  grams = {" ".join(words[i:i + n]) for i in range(max(1, len(words) - n + 1))}
  return np.unique(np.array(
      [int.from_bytes(hashlib.blake2b(g.encode(), digest_size=8).digest(), "little") >> 1
       for g in grams], np.int64))


@dataclasses.dataclass(frozen=True)
class ProblemSet:
  """Fingerprints and 5-gram hashes of a set of problems (what a profile keeps of its calibration
  set). `ids` name the problems in error messages."""

  fingerprints: tuple[str, ...]
  grams: tuple[np.ndarray, ...]
  ids: tuple[str, ...] = ()

  @classmethod
  def of(cls, texts: Sequence[str], ids: Sequence[str] = ()) -> "ProblemSet":
    return cls(tuple(problem_fingerprint(t) for t in texts), tuple(shingles(t) for t in texts),
               tuple(ids))

  def name(self, i: int) -> str:
    return self.ids[i] if self.ids else f"#{i}"

  def packed(self) -> tuple[np.ndarray, np.ndarray]:
    """All hashes in one array, and each problem's offsets [n + 1] into it (a safetensors file)."""
    offsets = np.cumsum([0] + [len(g) for g in self.grams]).astype(np.int64)
    flat = np.concatenate(self.grams) if self.grams else np.zeros((0,), np.int64)
    return flat.astype(np.int64), offsets

  @classmethod
  def unpack(cls, fingerprints: Sequence[str], flat: np.ndarray, offsets: np.ndarray
             ) -> "ProblemSet":
    if len(offsets) != len(fingerprints) + 1:
      raise ValueError(f"{len(fingerprints)} fingerprints but {len(offsets) - 1} 5-gram sets")
    return cls(tuple(fingerprints), tuple(flat[a:b] for a, b in zip(offsets[:-1], offsets[1:])))


@dataclasses.dataclass(frozen=True)
class Clash:
  problem: int  # index in the checked set
  other: int  # index in the reference set
  overlap: float  # 1.0 for an exact match


def clashes(reference: ProblemSet, checked: ProblemSet,
            threshold: float = NEAR_DUPLICATE) -> list[Clash]:
  """Problems of `checked` that are in `reference`: exact matches, then near-duplicates (the
  reference problem sharing the most 5-grams), in the order of `checked`."""
  exact = {f: i for i, f in enumerate(reference.fingerprints)}
  index: dict[int, list[int]] = collections.defaultdict(list)
  for j, grams in enumerate(reference.grams):
    for g in grams.tolist():
      index[g].append(j)
  out = []
  for i, (fp, grams) in enumerate(zip(checked.fingerprints, checked.grams)):
    if fp in exact:
      out.append(Clash(i, exact[fp], 1.0))
      continue
    shared = collections.Counter(j for g in grams.tolist() for j in index.get(g, ()))
    best = max(((n / max(1, min(len(grams), len(reference.grams[j]))), j)
                for j, n in shared.items()), default=(0.0, -1))
    if best[0] >= threshold:
      out.append(Clash(i, best[1], best[0]))
  return out


def require_disjoint(reference: ProblemSet, checked: ProblemSet, *, reference_name: str,
                     checked_name: str, threshold: float = NEAR_DUPLICATE) -> None:
  """Raises a one-line ValueError naming the first clashes when the sets share a problem."""
  found = clashes(reference, checked, threshold)
  if not found:
    return
  shown = ", ".join(
      f"{checked.name(c.problem)}" + (" (exact)" if c.overlap == 1.0 else
                                      f" (near-duplicate of {reference.name(c.other)}, "
                                      f"{c.overlap:.0%} of 5-grams shared)") for c in found[:3])
  raise ValueError(f"{len(found)} of the {len(checked.fingerprints)} {checked_name} are in "
                   f"{reference_name}: {shown}{', ...' if len(found) > 3 else ''}; calibrate and "
                   "evaluate on disjoint problems")
