"""Real-model environment: a named checkpoint (default SmolLM2-135M-Instruct) on GSM8K prompts.

Prompts go through the tokenizer's chat template and are right-padded to one length (prompts longer
than max_prompt_len are dropped, so shapes stay static). The last num_eval_prompts problems are the
held-out split. The rater is the verifiable GSM8K scorer (raters.GSM8KScorer) over decoded text.
"""

from __future__ import annotations

import pathlib

import numpy as np

from effjax.models.transformer import Transformer
from effjax.rlhf.config import GSM8KConfig


class GSM8KEnvironment:
  def __init__(self, cfg: GSM8KConfig, log=print):
    from effjax.checkpoints.registry import load_model
    from effjax.data.chat import encode_prompt
    from effjax.data import load_problems
    from effjax.data.samples import resolve

    self.cfg = cfg
    loaded = load_model(cfg.model, dtype=cfg.dtype)
    self._model = loaded.model
    self.tokenizer = loaded.tokenizer
    self.model_cfg = loaded.cfg
    self.response_len = cfg.response_len
    path = pathlib.Path(resolve(cfg.data))
    files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
    if not files:
      raise FileNotFoundError(f"{path}: no GSM8K .jsonl files")
    problems = [p for f in files for p in load_problems(f, strict=cfg.strict)]
    encoded = [(encode_prompt(self.tokenizer, p.prompt), p.answer) for p in problems]
    kept = [(ids, ans) for ids, ans in encoded if len(ids) <= cfg.max_prompt_len]
    if len(kept) <= cfg.num_eval_prompts:
      raise ValueError(f"only {len(kept)} GSM8K prompts fit max_prompt_len={cfg.max_prompt_len}")
    log(f"gsm8k: {len(kept)} of {len(encoded)} prompts fit {cfg.max_prompt_len} tokens")
    width = max(len(ids) for ids, _ in kept)
    tokens = np.full((len(kept), width), self.model_cfg.pad_id, np.int32)
    for i, (ids, _) in enumerate(kept):
      tokens[i, :len(ids)] = ids
    lens = np.asarray([len(ids) for ids, _ in kept], np.int32)
    answers = [ans for _, ans in kept]
    n_eval = cfg.num_eval_prompts
    self._split = dict(train=(tokens[:-n_eval], lens[:-n_eval], answers[:-n_eval]),
                       eval=(tokens[-n_eval:], lens[-n_eval:], answers[-n_eval:]))

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
