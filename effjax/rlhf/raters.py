"""Raters: who says which of two responses is better.

A rater gives, for a batch of pairs (a, b), the probability P(a > b) (when it has one) and a label
(1: a preferred, 0: b preferred). Simulated raters are Bradley-Terry over a scalar scorer,
P = sigmoid((s_a - s_b) / temperature), with labels flipped at a configurable noise rate; each
label's coin is drawn from its own key, so asking again for a subset gives the same labels.
People answer from a label queue: a JSONL file pair in a directory, optionally served on 127.0.0.1
by the label server (effjax/rlhf/label_server.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import secrets
import sys
import threading
import time
from typing import Callable, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from effjax.rlhf.config import RaterConfig
from effjax.rlhf.label_server import LabelServer, Rejected, parse_answer


@dataclasses.dataclass
class PairBatch:
  """One pair per prompt, host arrays. Row i's label key is fold_in(batch key, uid[i])."""

  prompts: np.ndarray  # [B, P] right-padded
  prompt_lens: np.ndarray  # [B]
  a: np.ndarray  # [B, L]
  a_mask: np.ndarray
  b: np.ndarray
  b_mask: np.ndarray
  prompt_ids: np.ndarray  # [B] index of the prompt in its split
  split: str = "train"
  uid: np.ndarray | None = None  # [B] stable per-row id (defaults to the row number)

  def rows(self, idx: np.ndarray) -> "PairBatch":
    uid = np.arange(len(self.prompt_ids)) if self.uid is None else self.uid
    pick = lambda x: x[idx]
    return PairBatch(pick(self.prompts), pick(self.prompt_lens), pick(self.a), pick(self.a_mask),
                     pick(self.b), pick(self.b_mask), pick(self.prompt_ids), self.split, uid[idx])


# (prompts, prompt_lens, responses, response_mask, prompt_ids, split) -> scores [B]
Scorer = Callable[..., np.ndarray]


class Rater(Protocol):
  def prob(self, batch: PairBatch) -> np.ndarray | None:
    """P(a > b) [B], or None when the rater cannot say (people)."""

  def label(self, batch: PairBatch, key: jax.Array) -> np.ndarray:
    """Choices [B] int32: 1 when a is preferred."""


class ScorerRater:
  """Bradley-Terry over a scalar scorer, with label noise."""

  def __init__(self, scorer: Scorer, temperature: float = 1.0, noise: float = 0.0):
    if temperature <= 0:
      raise ValueError(f"rater temperature must be > 0, got {temperature}")
    if not 0.0 <= noise <= 0.5:
      raise ValueError(f"rater noise must be in [0, 0.5], got {noise}")
    self.scorer = scorer
    self.temperature = temperature
    self.noise = noise

  def scores(self, batch: PairBatch) -> tuple[np.ndarray, np.ndarray]:
    s_a = self.scorer(batch.prompts, batch.prompt_lens, batch.a, batch.a_mask, batch.prompt_ids,
                      batch.split)
    s_b = self.scorer(batch.prompts, batch.prompt_lens, batch.b, batch.b_mask, batch.prompt_ids,
                      batch.split)
    return np.asarray(s_a, np.float64), np.asarray(s_b, np.float64)

  def prob(self, batch: PairBatch) -> np.ndarray:
    s_a, s_b = self.scores(batch)
    p = 1.0 / (1.0 + np.exp(-(s_a - s_b) / self.temperature))
    return self.noise + (1.0 - 2.0 * self.noise) * p

  def label(self, batch: PairBatch, key: jax.Array) -> np.ndarray:
    p = self.prob(batch)
    uid = np.arange(len(p)) if batch.uid is None else batch.uid
    u = np.asarray(jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(key, i)))(jnp.asarray(uid)))
    return (u < p).astype(np.int32)


# ---- scorers -------------------------------------------------------------------------------------

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_number(text: str) -> str | None:
  """The answer a GSM8K response commits to: after '####' or 'answer is' if present, else the last
  number in the text; commas and a trailing '.0' dropped."""
  for marker in ("####", "answer is", "Answer:"):
    if marker in text:
      found = _NUMBER.findall(text.split(marker)[-1])
      if found:
        return _normalise(found[0])
  found = _NUMBER.findall(text)
  return _normalise(found[-1]) if found else None


def _normalise(num: str) -> str:
  num = num.replace(",", "").rstrip(".")
  if "." in num:
    num = num.rstrip("0").rstrip(".")
  return num


def answers_match(response: str, reference: str) -> bool:
  """effjax.evals.math_grading when its dependency (math-verify) is installed, else the final
  number compared as text. `reference` is a GSM8K solution ("... #### 42") or a bare answer."""
  try:
    from effjax.evals import math_grading
  except ImportError:
    got = final_number(response)
    gold = reference.rsplit("####", 1)[-1].strip()
    return got is not None and got == _normalise(gold)
  return math_grading.grade(response, reference, fallback_last_number=True).correct


class GSM8KScorer:
  """Verifiable score: 1 for the right final answer, minus a length term beyond target_len tokens."""

  def __init__(self, decode: Callable[[np.ndarray], str], gold: Callable[[int, str], str],
               length_coef: float = 0.0, target_len: int = 96):
    self.decode = decode
    self.gold = gold
    self.length_coef = length_coef
    self.target_len = target_len

  def __call__(self, prompts, prompt_lens, responses, response_mask, ids, split) -> np.ndarray:
    out = []
    for resp, mask, i in zip(np.asarray(responses), np.asarray(response_mask), np.asarray(ids)):
      n = int(mask.sum())
      correct = answers_match(self.decode(resp[:n]), self.gold(int(i), split))
      over = max(0, n - self.target_len) / self.target_len
      out.append(float(correct) - self.length_coef * over)
    return np.asarray(out)


class CheckpointScorer:
  """A sequence-scoring model saved by enn.save_reward_model: its point head is the score."""

  def __init__(self, path: str):
    from flax import nnx

    from effjax.rlhf import enn
    rm = enn.load_reward_model(path)
    graphdef, state = nnx.split(rm)

    @jax.jit
    def run(state, prompts, lens, resp, mask):
      return nnx.merge(graphdef, state)(prompts, lens, resp, mask)[0]

    self._run = lambda *a: np.asarray(run(state, *map(jnp.asarray, a)))

  def __call__(self, prompts, prompt_lens, responses, response_mask, ids, split) -> np.ndarray:
    return self._run(prompts, prompt_lens, responses, response_mask)


# ---- people ----------------------------------------------------------------------------------------

class QueueRater:
  """People label pairs through a queue directory, which several runs may share.

  Each batch's pairs are appended to queries.jsonl ({"id", "prompt", "a", "b"}: text when a decoder
  is given, else token ids); answers are lines {"id": ..., "choice": 1 | 0} in answers.jsonl (1: a is
  better), written by the label server (effjax.rlhf.label_server, with `port`: 0 = any free port) or
  by hand. Ids are "<run nonce>-<batch tag>-<row>": a run reads only answers to its own ids, so runs
  sharing the folder never take each other's answers, and a resumed run (same nonce, kept in its run
  directory) reuses the answers already given. An answer line that is malformed, has a choice other
  than 0 or 1, or names an id this run never asked is ignored. The last answer to an id counts until
  the run has used it; after that it cannot change. Waits are bounded.
  """

  def __init__(self, queue_dir: str, *, run_nonce: str | None = None,
               decode: Callable[[np.ndarray], str] | None = None, port: int | None = None,
               wait_seconds: float = 3600.0, poll_seconds: float = 0.5, log=None):
    if not queue_dir:
      raise ValueError("the human rater needs rater.queue_dir")
    self.dir = pathlib.Path(queue_dir)
    self.dir.mkdir(parents=True, exist_ok=True)
    self.queries_path = self.dir / "queries.jsonl"
    self.answers_path = self.dir / "answers.jsonl"
    self.answers_path.touch()
    self.nonce = run_nonce or secrets.token_hex(8)
    self.decode = decode
    self.wait_seconds = wait_seconds
    self.poll_seconds = poll_seconds
    self.log = log or (lambda msg: print(msg, file=sys.stderr))
    self._lock = threading.RLock()
    self.queries: dict[str, dict] = {}  # this run's queries, in order
    for q in _json_lines(self.queries_path):
      if isinstance(q, dict) and str(q.get("id", "")).startswith(self.nonce + "-"):
        self.queries[q["id"]] = q
    self.consumed: set[str] = set()
    self._bad_lines = 0
    self.server = None
    if port is not None:
      self.server = LabelServer(self, port, log=self.log)

  @property
  def url(self) -> str | None:
    return self.server.url if self.server is not None else None

  def prob(self, batch: PairBatch) -> None:
    return None

  def _text(self, tokens: np.ndarray, mask: np.ndarray | None = None):
    toks = tokens if mask is None else tokens[mask.astype(bool)]
    return self.decode(toks) if self.decode else [int(t) for t in toks]

  def label(self, batch: PairBatch, key: jax.Array) -> np.ndarray:
    return self.wait(self.ask(batch, key))

  def ask(self, batch: PairBatch, key: jax.Array) -> list[str]:
    """Queue the batch's pairs (those not queued before) and return their ids."""
    tag = int(jax.random.randint(key, (), 0, 2**31 - 1))
    uid = np.arange(len(batch.prompt_ids)) if batch.uid is None else batch.uid
    ids = [f"{self.nonce}-{tag}-{int(u)}" for u in uid]
    with self._lock:
      new = [dict(id=qid, prompt=self._text(batch.prompts[i][:batch.prompt_lens[i]]),
                  a=self._text(batch.a[i], batch.a_mask[i]), b=self._text(batch.b[i], batch.b_mask[i]))
             for i, qid in enumerate(ids) if qid not in self.queries]
      _append_lines(self.queries_path, new)
      self.queries.update((q["id"], q) for q in new)
    return ids

  def wait(self, ids: list[str]) -> np.ndarray:
    """The answers to `ids` once all are on file (bounded wait); from then on they cannot change."""
    deadline = time.monotonic() + self.wait_seconds
    while True:
      with self._lock:
        got = self.read_answers()
        if all(q in got for q in ids):
          self.consumed.update(ids)
          return np.asarray([got[q] for q in ids], np.int32)
      if time.monotonic() > deadline:
        missing = sum(q not in got for q in ids)
        raise TimeoutError(f"{missing} of {len(ids)} answers missing in {self.answers_path} after "
                           f"{self.wait_seconds:.0f}s")
      time.sleep(self.poll_seconds)

  def read_answers(self) -> dict[str, int]:
    """This run's answers on file, last valid one per id."""
    got, bad = {}, 0
    with self._lock:
      lines = self.answers_path.read_bytes().split(b"\n")
    for line in lines[:-1]:  # the last piece has no newline yet: still being written
      try:
        qid, choice = parse_answer(line)
      except Rejected:
        bad += 1
        continue
      if qid.startswith(self.nonce + "-"):
        if qid in self.queries:
          got[qid] = choice
        else:
          bad += 1
    if bad > self._bad_lines:
      self.log(f"{self.answers_path}: ignoring {bad - self._bad_lines} malformed or unknown answer "
               "line(s)")
      self._bad_lines = bad
    return got

  def submit(self, qid: str, choice: int) -> tuple[int, str]:
    """One answer from the label server: (HTTP status, message)."""
    with self._lock:
      if qid not in self.queries:
        return 404, "unknown id"
      current = self.read_answers().get(qid)
      if current == choice:
        return 200, "already recorded"
      if qid in self.consumed:
        return 409, "this pair's label is already in use; it can no longer change"
      _append_lines(self.answers_path, [dict(id=qid, choice=choice)])
      return 200, "recorded" if current is None else "changed"

  def pending(self) -> list[dict]:
    """This run's queries without an answer, in the order they were asked."""
    with self._lock:
      done = self.read_answers()
      return [q for qid, q in self.queries.items() if qid not in done and qid not in self.consumed]

  def close(self) -> None:
    if self.server is not None:
      self.server.close()


def _json_lines(path: pathlib.Path) -> list:
  out = []
  if path.exists():
    for line in path.read_text().splitlines():
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError:
        continue  # a line still being written
  return out


def _append_lines(path: pathlib.Path, records: list[dict]) -> None:
  """Append, flush and fsync (people's answers are as precious as any label)."""
  if not records:
    return
  with open(path, "a") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")
    f.flush()
    os.fsync(f.fileno())


def run_nonce(run_dir: str | pathlib.Path | None) -> str | None:
  """The run's label-id nonce, kept in run_dir/label_nonce so a resumed run keeps it."""
  if run_dir is None:
    return None
  path = pathlib.Path(run_dir) / "label_nonce"
  if not path.exists():
    path.write_text(secrets.token_hex(8))
  return path.read_text().strip()


def make_rater(cfg: RaterConfig, env, run_dir: str | pathlib.Path | None = None, log=None) -> Rater:
  """The rater of `cfg` for environment `env` (which provides score / decode / gold as needed);
  run_dir keeps a human rater's label-id nonce across resumes."""
  if cfg.kind == "teacher":
    if not hasattr(env, "score"):
      raise ValueError("rater.kind='teacher' needs an environment with a hidden teacher (the toy)")
    return ScorerRater(env.score, cfg.temperature, cfg.noise)
  if cfg.kind == "gsm8k":
    scorer = GSM8KScorer(env.decode, env.gold, cfg.length_coef, cfg.target_len)
    return ScorerRater(scorer, cfg.temperature, cfg.noise)
  if cfg.kind == "checkpoint":
    if not cfg.checkpoint:
      raise ValueError("rater.kind='checkpoint' needs rater.checkpoint")
    return ScorerRater(CheckpointScorer(cfg.checkpoint), cfg.temperature, cfg.noise)
  if cfg.kind == "human":
    return QueueRater(cfg.queue_dir, run_nonce=run_nonce(run_dir), decode=getattr(env, "decode", None),
                      port=cfg.serve_port or None, wait_seconds=cfg.wait_seconds, log=log)
  raise ValueError(f"unknown rater kind {cfg.kind!r}")
