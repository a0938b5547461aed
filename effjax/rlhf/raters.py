"""Raters: who says which of two responses is better.

A rater gives, for a batch of pairs (a, b), the probability P(a > b) (when it has one) and a label
(1: a preferred, 0: b preferred). Simulated raters are Bradley-Terry over a scalar scorer,
P = sigmoid((s_a - s_b) / temperature), with labels flipped at a configurable noise rate; each
label's coin is drawn from its own key, so asking again for a subset gives the same labels.
People answer from a label queue: a JSONL file pair in a directory, optionally served on 127.0.0.1.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from effjax.rlhf.config import RaterConfig


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
  """People label pairs through a queue directory.

  Each batch's pairs are appended to queries.jsonl ({"id", "prompt", "a", "b"}, text when a decoder is
  given, else token ids); answers arrive as lines {"id": ..., "choice": 1 | 0} in answers.jsonl (1:
  a is better). With `port`, a local server on 127.0.0.1 serves GET /queries (unanswered ones) and
  POST /answer (one answer object) and appends to the same file. Waits are bounded.
  """

  def __init__(self, queue_dir: str, *, decode: Callable[[np.ndarray], str] | None = None,
               port: int = 0, wait_seconds: float = 3600.0, poll_seconds: float = 0.5):
    if not queue_dir:
      raise ValueError("the human rater needs rater.queue_dir")
    self.dir = pathlib.Path(queue_dir)
    self.dir.mkdir(parents=True, exist_ok=True)
    self.queries = self.dir / "queries.jsonl"
    self.answers = self.dir / "answers.jsonl"
    self.answers.touch()
    self.decode = decode
    self.wait_seconds = wait_seconds
    self.poll_seconds = poll_seconds
    self._lock = threading.Lock()
    self.server = _serve(self, port) if port else None

  def prob(self, batch: PairBatch) -> None:
    return None

  def _text(self, tokens: np.ndarray, mask: np.ndarray | None = None):
    toks = tokens if mask is None else tokens[mask.astype(bool)]
    return self.decode(toks) if self.decode else [int(t) for t in toks]

  def label(self, batch: PairBatch, key: jax.Array) -> np.ndarray:
    tag = int(jax.random.randint(key, (), 0, 2**31 - 1))
    uid = np.arange(len(batch.prompt_ids)) if batch.uid is None else batch.uid
    ids = [f"{tag}-{int(u)}" for u in uid]
    pending = set(ids) - set(self.read_answers())
    with self._lock, open(self.queries, "a") as f:
      for qid, i in zip(ids, range(len(ids))):
        if qid in pending:
          f.write(json.dumps(dict(id=qid, prompt=self._text(batch.prompts[i][:batch.prompt_lens[i]]),
                                  a=self._text(batch.a[i], batch.a_mask[i]),
                                  b=self._text(batch.b[i], batch.b_mask[i]))) + "\n")
      f.flush()
      os.fsync(f.fileno())
    deadline = time.monotonic() + self.wait_seconds
    while True:
      got = self.read_answers()
      if all(q in got for q in ids):
        return np.asarray([got[q] for q in ids], np.int32)
      if time.monotonic() > deadline:
        missing = sum(q not in got for q in ids)
        raise TimeoutError(f"{missing} of {len(ids)} answers missing in {self.answers} after "
                           f"{self.wait_seconds:.0f}s")
      time.sleep(self.poll_seconds)

  def read_answers(self) -> dict[str, int]:
    got = {}
    with self._lock:
      lines = self.answers.read_text().splitlines()
    for line in lines:
      try:
        rec = json.loads(line)
        got[str(rec["id"])] = int(rec["choice"] in (1, "a", True))
      except (json.JSONDecodeError, KeyError, TypeError):
        continue  # a line still being written, or not an answer
    return got

  def add_answer(self, qid: str, choice: int) -> None:
    with self._lock, open(self.answers, "a") as f:
      f.write(json.dumps(dict(id=qid, choice=int(choice))) + "\n")
      f.flush()
      os.fsync(f.fileno())

  def unanswered(self) -> list[dict]:
    done = self.read_answers()
    if not self.queries.exists():
      return []
    out = []
    for line in self.queries.read_text().splitlines():
      try:
        q = json.loads(line)
      except json.JSONDecodeError:
        continue
      if q["id"] not in done:
        out.append(q)
    return out

  def close(self) -> None:
    if self.server is not None:
      self.server.shutdown()
      self.server.server_close()


def _serve(rater: QueueRater, port: int) -> ThreadingHTTPServer:
  class Handler(BaseHTTPRequestHandler):
    def _send(self, code: int, payload) -> None:
      body = json.dumps(payload).encode()
      self.send_response(code)
      self.send_header("Content-Type", "application/json")
      self.send_header("Content-Length", str(len(body)))
      self.end_headers()
      self.wfile.write(body)

    def do_GET(self):
      if self.path.rstrip("/") == "/queries":
        self._send(200, rater.unanswered())
      else:
        self._send(404, {"error": "GET /queries or POST /answer"})

    def do_POST(self):
      if self.path.rstrip("/") != "/answer":
        self._send(404, {"error": "POST /answer"})
        return
      try:
        n = min(int(self.headers.get("Content-Length", 0)), 1 << 16)
        rec = json.loads(self.rfile.read(n))
        rater.add_answer(str(rec["id"]), int(rec["choice"]))
      except (ValueError, KeyError, TypeError) as e:
        self._send(400, {"error": str(e)})
        return
      self._send(200, {"ok": True})

    def log_message(self, *args):
      pass

  server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  return server


def make_rater(cfg: RaterConfig, env) -> Rater:
  """The rater of `cfg` for environment `env` (which provides score / decode / gold as needed)."""
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
    return QueueRater(cfg.queue_dir, decode=getattr(env, "decode", None), port=cfg.serve_port,
                      wait_seconds=cfg.wait_seconds)
  raise ValueError(f"unknown rater kind {cfg.kind!r}")
