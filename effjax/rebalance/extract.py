"""Offline ReBalance extraction on host arrays: steps, confidences, labels, layer choice, profile.

Flow (REBALANCE.md, "Offline extraction"): for every calibration problem, a greedy generation gives
the thinking tokens, their decoded pieces and log-probabilities; `split_steps` cuts the thinking text
on "\\n\\n+"; the caller runs the model over the sequence and hands the residual stream entering
every layer at each step's first token to `CalibrationStore.append`, which streams it to one file
per layer. `build_profile` then computes the quartiles, labels, the best layer (PCA + ridge R^2)
and the steering vector from the store, reading one layer at a time in chunks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from effjax.rebalance.confidence import DEFAULT_STATISTIC, STATISTICS, TrackerConfig
from effjax.rebalance.control import ReBalanceConstants
from effjax.rebalance.disjoint import ProblemSet, problem_fingerprint, require_disjoint
from effjax.rebalance.seal import DEFAULT_STRENGTH, SealVector, seal_labels

STEP_SPLIT = re.compile(r"\n\n+")
# Reflection and transition markers: the spec's list, plus common variants of the same moves.
REFLECTION_WORDS: tuple[str, ...] = (
    "wait", "alternatively", "maybe", "but", "however", "let me check", "double check",
    "double-check", "hold on", "hmm", "let me verify", "make sure", "check again", "recheck",
    "re-check", "reconsider", "re-examine", "on second thought", "another approach", "another way",
    "perhaps", "actually",
)
# Amplitudes for an extracted profile: the 1.5B model's published values (see control.py on how to
# choose them for another model).
DEFAULT_L1, DEFAULT_L2, DEFAULT_H2 = -1.02, -1.91, 0.1
PCA_COMPONENTS = 64
RIDGE_ALPHA = 1.0
TEST_FRACTION = 0.2
CHUNK_ROWS = 2048
PROFILE_KEY = "effjax.rebalance"


@dataclasses.dataclass(frozen=True)
class Step:
  """One reasoning step: tokens [start, end) of the thinking text, and its text.

  anchor: the token holding the end of the delimiter before the step (-1 when the step starts the
  text): where online steering acts, and where calibration reads the hidden states.
  """

  start: int
  end: int
  text: str
  anchor: int = -1


def thinking_range(token_ids: Sequence[int], think_open_id: int | None,
                   think_close_id: int | None) -> tuple[int, int]:
  """[start, end) of the thinking tokens in a response: after the last open tag before the close
  tag (0 if the prompt already opened it) up to the close tag (the end if it never closes)."""
  ids = list(token_ids)
  end = ids.index(think_close_id) if think_close_id in ids else len(ids)
  opens = [i for i in range(end) if ids[i] == think_open_id]
  return (opens[-1] + 1 if opens else 0), end


def split_steps(pieces: Sequence[str]) -> list[Step]:
  """Steps of the text formed by the decoded token pieces, split on "\\n\\n+".

  A step's first token is the token holding its first character (the position after the
  delimiter); its last token is the one holding its last character, so a token such as ".\\n\\n"
  ends the step before it; its anchor is the token holding the delimiter's last character.
  Whitespace-only segments are not steps.
  """
  text = "".join(pieces)
  ends = np.cumsum([len(p) for p in pieces])
  token_at = lambda char: int(np.searchsorted(ends, char, side="right"))
  cuts = [m.span() for m in STEP_SPLIT.finditer(text)]
  starts = [0] + [b for _, b in cuts]
  stops = [a for a, _ in cuts] + [len(text)]
  return [Step(token_at(a), token_at(z - 1) + 1, text[a:z], token_at(a - 1) if a else -1)
          for a, z in zip(starts, stops) if text[a:z].strip()]


def step_confidences(logprobs: np.ndarray, steps: Sequence[Step],
                     statistic: str = DEFAULT_STATISTIC) -> np.ndarray:
  """c of each step over its tokens' probabilities p (greedy decoding: p is the max probability):
  exp(mean log p) ("geometric", the paper's) or mean p ("arithmetic")."""
  check_statistic(statistic)
  logprobs = np.asarray(logprobs, np.float64)
  if statistic == "geometric":
    return np.array([np.exp(logprobs[s.start:s.end].mean()) for s in steps], np.float64)
  return np.array([np.exp(logprobs[s.start:s.end]).mean() for s in steps], np.float64)


def check_statistic(statistic: str) -> None:
  if statistic not in STATISTICS:
    raise ValueError(f"unknown confidence statistic {statistic!r}; choose from "
                     f"{', '.join(STATISTICS)}")


def step_variances(c: np.ndarray) -> np.ndarray:
  """(c_j - c_{j-1})^2 / 4 within one problem, for j >= 1."""
  c = np.asarray(c, np.float64)
  return (c[1:] - c[:-1]) ** 2 / 4


def reflection_pattern(words: Iterable[str] = REFLECTION_WORDS) -> re.Pattern:
  alts = sorted((re.escape(w).replace(r"\ ", r"\s+").replace(r"\-", r"[-\s]?") for w in words),
                key=len, reverse=True)
  return re.compile(r"\b(?:" + "|".join(alts) + r")\b", re.IGNORECASE)


def has_reflection(texts: Sequence[str], words: Iterable[str] = REFLECTION_WORDS) -> np.ndarray:
  pattern = reflection_pattern(words)
  return np.array([pattern.search(t) is not None for t in texts], bool)


def calibration_hash(fingerprints: Iterable[str]) -> str:
  return hashlib.sha256("\n".join(sorted(set(fingerprints))).encode()).hexdigest()


class CalibrationStore:
  """Hidden states at step starts on disk: `layer_XXX.bin` ([rows, dim] per layer, appended per
  problem), `steps.jsonl` (one line per problem: fingerprint, step confidences, texts, token counts)
  and `meta.json` (with the confidence statistic of every c). Rows are steps, in append order;
  reads are memory-mapped per layer.
  """

  def __init__(self, path: str | os.PathLike, num_layers: int, dim: int, dtype: str,
               statistic: str = DEFAULT_STATISTIC):
    check_statistic(statistic)
    self.path = Path(path)
    self.num_layers, self.dim, self.dtype = num_layers, dim, np.dtype(dtype)
    self.statistic = statistic
    self.problems: list[dict] = []
    steps_file = self.path / "steps.jsonl"
    if steps_file.exists():
      self.problems = [json.loads(line) for line in steps_file.read_text().splitlines() if line]
    # Drop rows a crash may have left past the last complete problem.
    row_bytes = dim * self.dtype.itemsize
    for layer in range(num_layers):
      f = self._layer_file(layer)
      if not f.exists() or f.stat().st_size < self.num_rows * row_bytes:
        raise ValueError(f"{f} is missing rows listed in steps.jsonl")
      if f.stat().st_size > self.num_rows * row_bytes:
        os.truncate(f, self.num_rows * row_bytes)

  @classmethod
  def create(cls, path: str | os.PathLike, num_layers: int, dim: int, dtype: str = "float32",
             statistic: str = DEFAULT_STATISTIC) -> "CalibrationStore":
    if np.dtype(dtype) not in (np.float16, np.float32):
      raise ValueError(f"store hidden states as float16 or float32, not {dtype}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if (path / "meta.json").exists():
      raise FileExistsError(f"{path} already holds a calibration store; open it to resume")
    check_statistic(statistic)
    (path / "meta.json").write_text(json.dumps(
        {"num_layers": num_layers, "dim": dim, "dtype": np.dtype(dtype).name,
         "statistic": statistic}))
    for layer in range(num_layers):
      (path / f"layer_{layer:03d}.bin").touch()
    return cls(path, num_layers, dim, dtype, statistic)

  @classmethod
  def open(cls, path: str | os.PathLike) -> "CalibrationStore":
    meta = json.loads((Path(path) / "meta.json").read_text())
    # Stores written before the statistic was recorded hold geometric means.
    return cls(path, meta["num_layers"], meta["dim"], meta["dtype"],
               meta.get("statistic", "geometric"))

  def _layer_file(self, layer: int) -> Path:
    return self.path / f"layer_{layer:03d}.bin"

  @property
  def num_rows(self) -> int:
    return sum(len(p["c"]) for p in self.problems)

  @property
  def done(self) -> set[str]:
    return {p["problem"] for p in self.problems}

  def append(self, problem: str, steps: Sequence[Step], c: np.ndarray, hidden: np.ndarray,
             grams: np.ndarray | None = None):
    """Adds one problem: its fingerprint, steps, their confidences c [n], the hidden states
    entering every layer at the steps' first tokens, hidden [num_layers, n, dim], and the 5-gram
    hashes of its statement (disjoint.shingles; for the near-duplicate check)."""
    n = len(steps)
    if hidden.shape != (self.num_layers, n, self.dim) or len(c) != n:
      raise ValueError(f"expected hidden {(self.num_layers, n, self.dim)} and {n} confidences, "
                       f"got {hidden.shape} and {len(c)}")
    for layer in range(self.num_layers):
      with open(self._layer_file(layer), "ab") as f:
        f.write(np.ascontiguousarray(hidden[layer], self.dtype).tobytes())
    record = {"problem": problem, "c": [float(x) for x in c],
              "tokens": [s.end - s.start for s in steps], "text": [s.text for s in steps],
              "grams": [] if grams is None else [int(g) for g in grams]}
    with open(self.path / "steps.jsonl", "a") as f:
      f.write(json.dumps(record) + "\n")
    self.problems.append(record)

  def layer(self, layer: int) -> np.ndarray:
    """[rows, dim] read-only memory map of the states entering `layer`."""
    if self.num_rows == 0:
      return np.zeros((0, self.dim), self.dtype)
    return np.memmap(self._layer_file(layer), self.dtype, "r", shape=(self.num_rows, self.dim))

  def confidences(self) -> np.ndarray:
    return np.array([x for p in self.problems for x in p["c"]], np.float64)

  def variances(self) -> np.ndarray:
    """Step-to-step variances within each problem (a problem's first step has none)."""
    parts = [step_variances(p["c"]) for p in self.problems]
    return np.concatenate(parts) if parts else np.zeros((0,))

  def texts(self) -> list[str]:
    return [t for p in self.problems for t in p["text"]]

  def problem_set(self) -> ProblemSet:
    """The calibration problems' fingerprints and 5-gram hashes."""
    return ProblemSet(tuple(p["problem"] for p in self.problems),
                      tuple(np.asarray(p.get("grams", []), np.int64) for p in self.problems))


@dataclasses.dataclass(frozen=True)
class StepStats:
  q25c: float
  q75c: float
  q25v: float
  q75v: float


def step_stats(c: np.ndarray, v: np.ndarray) -> StepStats:
  q25c, q75c = np.quantile(c, [0.25, 0.75])
  q25v, q75v = np.quantile(v, [0.25, 0.75])
  return StepStats(float(q25c), float(q75c), float(q25v), float(q75v))


def label_steps(c: np.ndarray, reflection: np.ndarray, stats: StepStats) -> np.ndarray:
  """+1 overthinking (reflection word or c < q25c), 0 normal (no reflection word and c > q75c),
  -1 dropped."""
  over = reflection | (c < stats.q25c)
  normal = ~reflection & (c > stats.q75c)
  return np.where(over, 1, np.where(normal, 0, -1)).astype(np.int8)


def _chunks(n: int):
  for i in range(0, n, CHUNK_ROWS):
    yield slice(i, min(i + CHUNK_ROWS, n))


def layer_r2(x: np.ndarray, y: np.ndarray, train: np.ndarray,
             n_components: int = PCA_COMPONENTS, ridge: float = RIDGE_ALPHA) -> float:
  """Held-out R^2 of ridge regression on the top principal components of x, fitted on the train
  rows; x [N, D] is read in chunks (a memory map is fine)."""
  n, d = x.shape
  n_train = int(train.sum())
  mean = np.zeros(d)
  for sl in _chunks(n):
    mean += x[sl][train[sl]].sum(axis=0, dtype=np.float64)
  mean /= n_train
  cov = np.zeros((d, d))
  for sl in _chunks(n):
    xc = x[sl][train[sl]].astype(np.float64) - mean
    cov += xc.T @ xc
  k = min(n_components, d, n_train)
  _, vecs = np.linalg.eigh(cov)
  components = vecs[:, ::-1][:, :k]
  z = np.concatenate([(x[sl].astype(np.float64) - mean) @ components for sl in _chunks(n)])
  y_mean = y[train].mean()
  zt = z[train]
  beta = np.linalg.solve(zt.T @ zt + ridge * np.eye(k), zt.T @ (y[train] - y_mean))
  y_test = y[~train]
  residual = ((y_test - (z[~train] @ beta + y_mean)) ** 2).sum()
  return float(1.0 - residual / ((y_test - y_test.mean()) ** 2).sum())


def split_mask(n: int, seed: int, test_fraction: float = TEST_FRACTION) -> np.ndarray:
  """[n] bool, True for the training rows of a seeded random split."""
  train = np.ones((n,), bool)
  train[np.random.default_rng(seed).permutation(n)[:int(round(test_fraction * n))]] = False
  return train


def select_layer(store: CalibrationStore, seed: int = 0, n_components: int = PCA_COMPONENTS,
                 ridge: float = RIDGE_ALPHA) -> tuple[int, tuple[float, ...]]:
  """The layer whose hidden states best predict step confidence (held-out R^2), and every R^2."""
  c = store.confidences()
  if len(c) < 10:
    raise ValueError(f"layer selection needs at least 10 steps, the store has {len(c)}")
  train = split_mask(len(c), seed)
  scores = tuple(layer_r2(store.layer(l), c, train, n_components, ridge)
                 for l in range(store.num_layers))
  return int(np.argmax(scores)), scores


def steering_vector(x: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """mean(overthinking rows) - mean(normal rows) of x [N, D], unnormalised, read in chunks."""
  if not ((labels == 1).any() and (labels == 0).any()):
    raise ValueError("need both overthinking and normal steps to build a steering vector")
  sums = np.zeros((2, x.shape[1]))
  for sl in _chunks(x.shape[0]):
    rows = x[sl].astype(np.float64)
    sums[0] += rows[labels[sl] == 1].sum(axis=0)
    sums[1] += rows[labels[sl] == 0].sum(axis=0)
  return (sums[0] / (labels == 1).sum() - sums[1] / (labels == 0).sum()).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class ReBalanceProfile:
  """Everything `eval` needs to steer a model: the vector, the constants (with the layer), the
  confidence statistic they were calibrated with, optionally the SEAL vector from the same traces,
  and where they came from (the calibration problems' fingerprints and 5-gram hashes, so that
  evaluation problems equal or close to them are refused)."""

  vector: np.ndarray
  constants: ReBalanceConstants
  model_id: str
  calibration: ProblemSet
  layer_r2: tuple[float, ...] = ()
  counts: dict[str, int] = dataclasses.field(default_factory=dict)
  statistic: str = DEFAULT_STATISTIC
  seal: SealVector | None = None

  def __post_init__(self):
    check_statistic(self.statistic)

  @property
  def calibration_problems(self) -> tuple[str, ...]:
    return self.calibration.fingerprints

  @property
  def calibration_hash(self) -> str:
    return calibration_hash(self.calibration.fingerprints)

  def check_disjoint(self, problems: ProblemSet) -> None:
    """Refuses evaluation problems equal or near-identical to calibration problems."""
    require_disjoint(self.calibration, problems, reference_name="the profile's calibration set",
                     checked_name="evaluation problems")

  def tracker_config(self, statistic: str | None = None, **kw) -> TrackerConfig:
    """The online settings for these constants; decoding uses the profile's confidence statistic
    (asking for another is an error: its quartiles would not describe the decoding's c)."""
    if statistic is not None and statistic != self.statistic:
      raise ValueError(f"the profile's quartiles are of the {self.statistic} mean of p_max; "
                       f"decoding with the {statistic} mean would compare a different statistic "
                       f"with them (extract a profile with --confidence {statistic})")
    return TrackerConfig.create(self.constants, mean=self.statistic, **kw)

  def save(self, path: str | os.PathLike):
    grams, offsets = self.calibration.packed()
    meta = {"constants": dataclasses.asdict(self.constants), "model_id": self.model_id,
            "calibration_hash": self.calibration_hash,
            "calibration_problems": list(self.calibration.fingerprints),
            "layer_r2": list(self.layer_r2), "counts": self.counts, "confidence": self.statistic}
    tensors = {"vector": np.ascontiguousarray(self.vector, np.float32),
               "calibration_grams": grams, "calibration_offsets": offsets}
    if self.seal is not None:
      meta["seal"] = {"layer": self.seal.layer, "strength": self.seal.strength,
                      "counts": self.seal.counts}
      tensors["seal_vector"] = np.ascontiguousarray(self.seal.vector, np.float32)
    save_file(tensors, str(path), metadata={PROFILE_KEY: json.dumps(meta)})

  @classmethod
  def load(cls, path: str | os.PathLike) -> "ReBalanceProfile":
    with safe_open(str(path), "numpy") as f:
      metadata = f.metadata() or {}
      if PROFILE_KEY not in metadata:
        raise ValueError(f"{path} is not a ReBalance profile")
      tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta = json.loads(metadata[PROFILE_KEY])
    fingerprints = tuple(meta["calibration_problems"])
    if "calibration_offsets" in tensors:
      calibration = ProblemSet.unpack(fingerprints, tensors["calibration_grams"],
                                      tensors["calibration_offsets"])
    else:  # written before near-duplicate checks: exact matches only
      calibration = ProblemSet(fingerprints, tuple(np.zeros((0,), np.int64) for _ in fingerprints))
    seal = None
    if "seal" in meta:
      seal = SealVector(tensors["seal_vector"], meta["seal"]["layer"], meta["seal"]["strength"],
                        meta["seal"]["counts"])
    # Profiles written before the statistic was recorded were calibrated with the geometric mean.
    profile = cls(vector=tensors["vector"], constants=ReBalanceConstants(**meta["constants"]),
                  model_id=meta["model_id"], calibration=calibration,
                  layer_r2=tuple(meta["layer_r2"]), counts=meta["counts"],
                  statistic=meta.get("confidence", "geometric"), seal=seal)
    if profile.calibration_hash != meta["calibration_hash"]:
      raise ValueError(f"{path}: calibration hash does not match its problem list")
    return profile


def build_profile(store: CalibrationStore, model_id: str, *, L1: float = DEFAULT_L1,
                  L2: float = DEFAULT_L2, H2: float = DEFAULT_H2, seed: int = 0,
                  words: Iterable[str] = REFLECTION_WORDS,
                  preset: ReBalanceConstants | None = None, seal_layer: int | None = None,
                  seal_strength: float = DEFAULT_STRENGTH) -> ReBalanceProfile:
  """Quartiles, labels, layer choice and steering vector from a filled store, and SEAL's vector
  from the same steps (at `seal_layer`; default ReBalance's layer).

  With `preset` (published constants) its quartiles label the steps and its layer and amplitudes
  are kept: only S comes from the store.
  """
  c = store.confidences()
  if preset is None:
    stats = step_stats(c, store.variances())
    layer, scores = select_layer(store, seed)
    constants = ReBalanceConstants(q25c=stats.q25c, q75c=stats.q75c, L1=L1, q25v=stats.q25v,
                                   q75v=stats.q75v, L2=L2, H2=H2, layer=layer)
  else:
    if not 0 <= preset.layer < store.num_layers:
      raise ValueError(f"the preset steers layer {preset.layer}; the store has {store.num_layers}")
    stats = StepStats(preset.q25c, preset.q75c, preset.q25v, preset.q75v)
    layer, scores, constants = preset.layer, (), preset
  labels = label_steps(c, has_reflection(store.texts(), words), stats)
  seal_layer = layer if seal_layer is None else seal_layer
  if not 0 <= seal_layer < store.num_layers:
    raise ValueError(f"SEAL layer {seal_layer} is outside the store's {store.num_layers} layers")
  thought_labels, thought_counts = seal_labels(store.problems)
  seal = None  # without both kinds of thought SEAL has no vector (eval says so if asked for it)
  if (thought_labels == 1).any() and (thought_labels == 0).any():
    seal = SealVector(steering_vector(store.layer(seal_layer), thought_labels), seal_layer,
                      seal_strength, thought_counts)
  return ReBalanceProfile(
      vector=steering_vector(store.layer(layer), labels), constants=constants, model_id=model_id,
      calibration=store.problem_set(), layer_r2=scores, statistic=store.statistic, seal=seal,
      counts={"problems": len(store.problems), "steps": len(c),
              "overthinking": int((labels == 1).sum()), "normal": int((labels == 0).sum()),
              **{f"seal_{k}": n for k, n in thought_counts.items()}})
