"""Real-model environments: a named checkpoint (default SmolLM2-135M-Instruct) answering questions.

ChatEnvironment holds (question, gold answer) problems asked through the tokenizer's chat template,
right-padded to one length (prompts longer than max_prompt_len are dropped, so shapes stay static);
the last num_eval_prompts problems are the held-out split. The rater is the verifiable scorer
(raters.GSM8KScorer: the response's answer against the gold one) over decoded text. Two problem sets:
  - GSM8KEnvironment: GSM8K word problems (answers need ~200 tokens of working from this model);
  - ArithmeticEnvironment: one-step arithmetic ("What is 47 + 38?"), whose one-number answer a
    16-token response can state, so short responses are right or wrong rather than cut off.
"""

from __future__ import annotations

import pathlib

import numpy as np

from effjax.models.transformer import Transformer
from effjax.rlhf.config import ArithmeticConfig, GSM8KConfig


class ChatEnvironment:
  def __init__(self, model: str, problems: list[tuple[str, str]], *, max_prompt_len: int,
               response_len: int, num_eval_prompts: int, dtype: str = "float32", system: str = "",
               name: str = "", log=print):
    from effjax.checkpoints.registry import load_model
    from effjax.data.chat import encode_prompt

    loaded = load_model(model, dtype=dtype)
    self._model = loaded.model
    self.tokenizer = loaded.tokenizer
    self.model_cfg = loaded.cfg
    self.response_len = response_len
    encoded = [(encode_prompt(self.tokenizer, q, system=system or None), ans) for q, ans in problems]
    kept = [(ids, ans) for ids, ans in encoded if len(ids) <= max_prompt_len]
    if len(kept) <= num_eval_prompts:
      raise ValueError(f"only {len(kept)} {name} prompts fit max_prompt_len={max_prompt_len}")
    log(f"{name}: {len(kept)} of {len(encoded)} prompts fit {max_prompt_len} tokens")
    width = max(len(ids) for ids, _ in kept)
    tokens = np.full((len(kept), width), self.model_cfg.pad_id, np.int32)
    for i, (ids, _) in enumerate(kept):
      tokens[i, :len(ids)] = ids
    lens = np.asarray([len(ids) for ids, _ in kept], np.int32)
    answers = [ans for _, ans in kept]
    n = num_eval_prompts
    self._split = dict(train=(tokens[:-n], lens[:-n], answers[:-n]),
                       eval=(tokens[-n:], lens[-n:], answers[-n:]))

  @property
  def num_train(self) -> int:
    return len(self._split["train"][2])

  def prompts(self, ids: np.ndarray, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    tokens, lens, _ = self._split[split]
    return tokens[ids], lens[ids]

  def eval_ids(self) -> np.ndarray:
    return np.arange(len(self._split["eval"][2]))

  def gold(self, i: int, split: str) -> str:
    return self._split[split][2][i]

  def decode(self, tokens: np.ndarray) -> str:
    return self.tokenizer.decode([int(t) for t in tokens], skip_special_tokens=True)

  def sft_policy(self) -> Transformer:
    return self._model


class GSM8KEnvironment(ChatEnvironment):
  def __init__(self, cfg: GSM8KConfig, log=print):
    from effjax.data import load_problems
    from effjax.data.samples import resolve

    path = pathlib.Path(resolve(cfg.data))
    files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
    if not files:
      raise FileNotFoundError(f"{path}: no GSM8K .jsonl files")
    problems = [(p.prompt, p.answer) for f in files for p in load_problems(f, strict=cfg.strict)]
    super().__init__(cfg.model, problems, max_prompt_len=cfg.max_prompt_len,
                     response_len=cfg.response_len, num_eval_prompts=cfg.num_eval_prompts,
                     dtype=cfg.dtype, name="gsm8k", log=log)


def arithmetic_problems(cfg: ArithmeticConfig) -> list[tuple[str, str]]:
  """Seeded one-step items: a + b and a - b (a >= b) with two-digit operands, a * b with b in 2..9;
  gold answers as GSM8K writes them ("#### 85")."""
  gen = np.random.default_rng(cfg.seed)
  out = []
  for _ in range(cfg.num_train_prompts + cfg.num_eval_prompts):
    op = cfg.ops[int(gen.integers(len(cfg.ops)))]
    a, b = (int(x) for x in gen.integers(10, cfg.max_operand + 1, 2))
    if op == "-":
      a, b = max(a, b), min(a, b)
    if op == "*":
      b = int(gen.integers(2, 10))
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    out.append((f"What is {a} {op} {b}?", f"#### {value}"))
  return out


class ArithmeticEnvironment(ChatEnvironment):
  def __init__(self, cfg: ArithmeticConfig, log=print):
    if not cfg.ops or set(cfg.ops) - set("+-*"):
      raise ValueError(f"env.arithmetic.ops={cfg.ops!r}: use some of '+-*'")
    super().__init__(cfg.model, arithmetic_problems(cfg), max_prompt_len=cfg.max_prompt_len,
                     response_len=cfg.response_len, num_eval_prompts=cfg.num_eval_prompts,
                     system=cfg.system, name="arithmetic", log=log)
