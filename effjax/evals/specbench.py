"""The Spec-Bench protocol (hemingkx/Spec-Bench) on the effjax engine.

Per question, every method runs the whole conversation at batch 1 and greedy: each user turn is
added to the conversation (the model's chat template), the method answers, and its decoded answer
stays in the conversation for the next turn (MT-bench has two turns). Plain decoding ("ar") always
runs too, interleaved question by question with the other methods so that machine noise hits all
of them alike; speedups are against it, and every method's tokens are compared with its tokens.
A few warm-up conversations on the first question come first, and each (method, prompt bucket) is
compiled before it is timed. Each turn runs in a cache sized to its prompt bucket (the engine's
`fit_cache`), since every decode step attends over all cache slots.

Reported per group (MT-bench's eight categories form one group) and overall, as Spec-Bench does:
tau = accepted tokens per decode forward (pooled; plain decoding = 1), tokens/s = the mean over
questions of new tokens / wall time, speedup = a method's mean tokens/s / plain decoding's, and how
many questions have exactly plain decoding's output. With a reduced max_new_tokens the prefill is a
large share of that wall time for every method, so the overall row also gives the decode-only
speedup: tokens after the prefill's first one / decode time, as a ratio to plain decoding's.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from effjax.data.records import Problem
from effjax.decoding.compiled import value_key
from effjax.decoding.engine import AutoRegressive, Engine, Strategy

MT_BENCH = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem",
            "humanities")
GROUPS = ("mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag")
BASELINE = "ar"


def group_of(category: str) -> str:
  return "mt_bench" if category in MT_BENCH else category


def select(problems: Sequence[Problem], per_group: int | None) -> list[Problem]:
  """At most `per_group` questions of each group, evenly spaced within it (so a limited MT-bench
  slice still spans its categories), in source order."""
  if per_group is None:
    return list(problems)
  by_group: dict[str, list[int]] = {}
  for i, p in enumerate(problems):
    by_group.setdefault(group_of(p.metadata.get("category", "")), []).append(i)
  keep = set()
  for idx in by_group.values():
    picks = np.unique(np.linspace(0, len(idx) - 1, min(per_group, len(idx))).round().astype(int))
    keep.update(idx[k] for k in picks)
  return [p for i, p in enumerate(problems) if i in keep]


@dataclasses.dataclass(frozen=True)
class PromptFormat:
  """How a conversation becomes token ids: the tokenizer's chat template, or (for base models
  without one) a plain 'User: ... / Assistant:' transcript."""

  tokenizer: Any
  chat: bool

  @classmethod
  def for_tokenizer(cls, tokenizer, chat: bool | None = None) -> "PromptFormat":
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat and not has_template:
      raise ValueError("this tokenizer has no chat template; run without chat (a plain transcript)")
    return cls(tokenizer, has_template if chat is None else chat)

  @property
  def name(self) -> str:
    return "chat template" if self.chat else "plain transcript (no chat template)"

  def encode(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
    if self.chat:
      ids = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True,
                                               tokenize=True)
      if isinstance(ids, Mapping) or hasattr(ids, "input_ids"):  # a BatchEncoding
        ids = ids["input_ids"]
      return [int(t) for t in ids]
    role = {"user": "User", "assistant": "Assistant"}
    text = "".join(f"{role[m['role']]}: {m['content']}\n\n" for m in messages) + "Assistant:"
    return [int(t) for t in self.tokenizer.encode(text)]

  def decode(self, tokens: Sequence[int]) -> str:
    return self.tokenizer.decode(list(tokens), skip_special_tokens=True).strip()


@dataclasses.dataclass
class Turn:
  prompt_tokens: int
  tokens: list[int]  # generated, the EOS included
  calls: int  # decode forwards after the prefill
  seconds: float  # prefill + decode wall time
  prefill_s: float
  text: str
  predicted: float | None = None  # the hybrid's expected accepted nodes, summed over its steps
  accepted: int | None = None  # ... and the nodes it accepted

  def record(self) -> dict[str, Any]:
    return dataclasses.asdict(self) | {"new_tokens": len(self.tokens)}


def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
  """Index of the first token where a and b differ (or where the shorter ends); None if equal."""
  for i, (x, y) in enumerate(zip(a, b)):
    if x != y:
      return i
  return None if len(a) == len(b) else min(len(a), len(b))


class Runner:
  """Runs conversations with one engine; compiles each (strategy, prompt bucket) untimed first."""

  def __init__(self, engine: Engine, fmt: PromptFormat, max_new_tokens: int):
    self.engine = engine
    self.fmt = fmt
    self.max_new_tokens = max_new_tokens
    self._compiled: set[tuple[Hashable, int]] = set()

  def _compile(self, strategy: Strategy, prompt: list[int]) -> None:
    bucket = next(b for b in self.engine.buckets if b >= len(prompt))
    key = (value_key(strategy), bucket)
    if key in self._compiled:
      return
    state = self.engine.start([prompt], strategy=strategy, max_new_tokens=self.max_new_tokens)
    jax.block_until_ready(self.engine.advance(state, strategy, 0).length)
    self._compiled.add(key)

  def conversation(self, problem: Problem, strategy: Strategy) -> list[Turn]:
    messages: list[dict[str, str]] = []
    turns = []
    for user in problem.turns:
      messages.append({"role": "user", "content": user})
      prompt = self.fmt.encode(messages)
      self._compile(strategy, prompt)
      res = self.engine.generate([prompt], strategy=strategy, max_new_tokens=self.max_new_tokens)
      text = self.fmt.decode(res.tokens[0])
      turns.append(Turn(len(prompt), res.tokens[0], res.model_calls, res.prefill_s + res.decode_s,
                        res.prefill_s, text, *_prediction(res.extra)))
      messages.append({"role": "assistant", "content": text})
    return turns


def _prediction(extra) -> tuple[float | None, int | None]:
  """A strategy state's online estimate of accepted nodes next to the count (the hybrid's)."""
  if hasattr(extra, "predicted") and hasattr(extra, "accepted"):
    return float(extra.predicted[0]), int(extra.accepted[0])
  return None, None


def cache_len_for(fmt: PromptFormat, problems: Sequence[Problem], max_new_tokens: int,
                  block: int, margin: int = 64, multiple: int = 256) -> int:
  """A cache long enough for every conversation: its user turns, an answer of max_new_tokens per
  turn (re-encoded answers may differ a little: `margin`), and one block."""
  need = 0
  for p in problems:
    messages = []
    for user in p.turns:
      messages += [{"role": "user", "content": user}, {"role": "assistant", "content": ""}]
    need = max(need, len(fmt.encode(messages[:-1])) + len(p.turns) * (max_new_tokens + margin))
  need += block
  return -(-need // multiple) * multiple


def run(engine: Engine, fmt: PromptFormat, problems: Sequence[Problem],
        methods: Mapping[str, Strategy], *, max_new_tokens: int, warmup: int = 3,
        out: Callable[[dict[str, Any]], None] | None = None,
        log: Callable[[str], None] = print,
        done: Sequence[Mapping[str, Any]] = ()) -> list[dict[str, Any]]:
  """Every method on every question (plain decoding first); one record per (question, method).

  `out` receives each record as soon as it exists (e.g. to append it to a JSONL file). `done`:
  records of an earlier, interrupted run with the same settings; their (question, method) pairs
  are not run again (a question's missing methods run after its recorded plain decoding).
  """
  strategies: dict[str, Strategy] = {BASELINE: AutoRegressive()}
  strategies.update((k, v) for k, v in methods.items() if k != BASELINE)
  runner = Runner(engine, fmt, max_new_tokens)
  have = {(r["question_id"], r["method"]): dict(r) for r in done}
  todo = [p for p in problems if any((p.id, m) not in have for m in strategies)]
  t0 = time.perf_counter()
  for _ in range(warmup if todo else 0):
    for strategy in strategies.values():
      runner.conversation(todo[0], strategy)
  log(f"warm-up ({warmup} x {len(strategies)} conversations) {time.perf_counter() - t0:.0f}s; "
      f"{len(problems) - len(todo)} of {len(problems)} questions already done")
  records = []
  for n, problem in enumerate(problems, start=1):
    category = problem.metadata.get("category", "")
    base: list[list[int]] = []
    line = []
    for name, strategy in strategies.items():
      rec = have.get((problem.id, name))
      if rec is None:
        turns = [t.record() for t in runner.conversation(problem, strategy)]
        if name != BASELINE:
          diffs = [first_difference(t["tokens"], b) for t, b in zip(turns, base)]
        else:
          diffs = [None] * len(turns)
        rec = {"question_id": problem.id, "category": category, "group": group_of(category),
               "method": name, "equal_to_ar": all(d is None for d in diffs),
               "first_difference": diffs, "turns": turns}
        if out is not None:
          out(rec)
        s = summarize_records([rec])[0]
        line.append(f"{name} tau {s['tau']:.2f} {s['tokens_per_s']:.1f} tok/s"
                    + ("" if rec["equal_to_ar"] else " DIFFERS"))
      if name == BASELINE:
        base = [t["tokens"] for t in rec["turns"]]
      records.append(rec)
    if line:
      log(f"[{n}/{len(problems)}] {problem.id} ({category}): " + "; ".join(line))
  return records


def read_records(path: Path) -> list[dict[str, Any]]:
  """The complete records of a results.jsonl (a line cut off by a killed run is dropped)."""
  out = []
  if path.is_file():
    for line in path.read_text().splitlines():
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return out


def accepted_and_calls(turns: Sequence[Mapping[str, Any]]) -> tuple[int, int]:
  """Tokens after each turn's first (the prefill's) and model calls, summed: tau's two sides."""
  return sum(t["new_tokens"] - 1 for t in turns), sum(t["calls"] for t in turns)


def summarize_records(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """Per method: questions, tau, mean tokens/s, questions equal to plain decoding."""
  out = []
  for method in dict.fromkeys(r["method"] for r in records):
    rs = [r for r in records if r["method"] == method]
    turns = [t for r in rs for t in r["turns"]]
    accepted, calls = accepted_and_calls(turns)
    speeds = [sum(t["new_tokens"] for t in r["turns"]) / max(sum(t["seconds"] for t in r["turns"]),
                                                             1e-9) for r in rs]
    decode_speeds = [sum(t["new_tokens"] - 1 for t in r["turns"])
                     / max(sum(t["seconds"] - t["prefill_s"] for t in r["turns"]), 1e-9) for r in rs]
    out.append({"method": method, "questions": len(rs), "tau": accepted / max(calls, 1),
                "tokens_per_s": float(np.mean(speeds)),
                "decode_tokens_per_s": float(np.mean(decode_speeds)),
                "new_tokens": sum(t["new_tokens"] for t in turns),
                "equal": sum(bool(r["equal_to_ar"]) for r in rs)})
  return out


def tau_ratio_interval(records: Sequence[Mapping[str, Any]], num: str, den: str, *,
                       level: float = 0.95, resamples: int = 4000, seed: int = 0
                       ) -> tuple[float, float, float, int]:
  """tau(num) / tau(den) over the questions both methods answered, and a paired bootstrap
  interval of it: questions drawn with replacement within each group (the sample is stratified
  by group), the same draw for both methods, each tau pooled over the drawn questions' turns as
  in summarize_records. Greedy tau has no seed to vary; the questions are what a sceptic would
  redraw. Returns (ratio, low, high, questions)."""
  per_q: dict[str, dict[str, tuple[float, float]]] = {}
  group: dict[str, str] = {}
  for r in records:
    if r["method"] in (num, den):
      per_q.setdefault(r["question_id"], {})[r["method"]] = accepted_and_calls(r["turns"])
      group[r["question_id"]] = r["group"]
  qs = [q for q, m in per_q.items() if len(m) == 2]
  if not qs:
    raise ValueError(f"no question answered by both {num} and {den}")
  x = np.array([[*per_q[q][num], *per_q[q][den]] for q in qs], np.float64)  # [Q, 4]
  ratio = lambda s: (s[..., 0] / s[..., 1]) / (s[..., 2] / s[..., 3])
  rng = np.random.default_rng(seed)
  draws = np.zeros((resamples, 4))
  for g in dict.fromkeys(group[q] for q in qs):
    members = np.array([i for i, q in enumerate(qs) if group[q] == g])
    draws += x[rng.choice(members, (resamples, len(members)))].sum(axis=1)
  low, high = np.quantile(ratio(draws), [(1 - level) / 2, (1 + level) / 2])
  return float(ratio(x.sum(axis=0))), float(low), float(high), len(qs)


def summarize(records: Sequence[Mapping[str, Any]]) -> dict[str, list[dict[str, Any]]]:
  """Per group (in Spec-Bench's order, then 'overall'): each method's summary with its speedup."""
  groups = [g for g in GROUPS if any(r["group"] == g for r in records)]
  groups += sorted({r["group"] for r in records} - set(GROUPS))
  table = {}
  for g in groups + ["overall"]:
    rows = summarize_records([r for r in records if g == "overall" or r["group"] == g])
    base = next((r["tokens_per_s"] for r in rows if r["method"] == BASELINE), None)
    base_decode = next((r["decode_tokens_per_s"] for r in rows if r["method"] == BASELINE), None)
    for row in rows:
      row["speedup"] = row["tokens_per_s"] / base if base else float("nan")
      row["decode_speedup"] = row["decode_tokens_per_s"] / base_decode if base_decode else float("nan")
    table[g] = rows
  return table


def format_table(table: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
  """Markdown: one row per method, tau / speedup per group and overall, equality with plain."""
  groups = list(table)
  methods = list(dict.fromkeys(r["method"] for rows in table.values() for r in rows))
  cell = {(g, r["method"]): r for g, rows in table.items() for r in rows}
  head = ("| method | " + " | ".join(f"{g} tau / speedup" for g in groups)
          + " | decode-only speedup | tokens/s | equal to ar |")
  lines = [head, "|" + "---|" * (len(groups) + 4)]
  for m in methods:
    cells = []
    for g in groups:
      r = cell.get((g, m))
      cells.append("-" if r is None else f"{r['tau']:.2f} / {r['speedup']:.2f}x")
    o = cell[("overall", m)]
    lines.append(f"| {m} | " + " | ".join(cells) + f" | {o['decode_speedup']:.2f}x"
                 + f" | {o['tokens_per_s']:.1f} | {o['equal']}/{o['questions']} |")
  return "\n".join(lines)


def write_outputs(out_dir: Path, records: Sequence[Mapping[str, Any]], meta: Mapping[str, Any]
                  ) -> tuple[dict[str, Any], str]:
  """summary.json (the numbers and how they were made) and summary.md (the table) in out_dir."""
  table = summarize(records)
  text = format_table(table)
  (out_dir / "summary.json").write_text(json.dumps({"meta": dict(meta), "table": table}, indent=1))
  (out_dir / "summary.md").write_text(text + "\n")
  return table, text
