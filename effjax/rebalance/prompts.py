"""The math prompt of REBALANCE.md and the tokenizer facts steering needs (think tags, EOS)."""

from __future__ import annotations

from collections.abc import Sequence

from effjax.data.chat import encode_prompt

SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def encode_problem(tokenizer, question: str) -> list[int]:
  """The question under the system prompt, through the model's chat template."""
  return encode_prompt(tokenizer, question, system=SYSTEM_PROMPT)


def think_tag_ids(tokenizer) -> tuple[int | None, int | None]:
  """Ids of "<think>" and "</think>" when both are single tokens, else (None, None): the whole
  response is then the thinking span."""
  vocab = tokenizer.get_vocab()
  if THINK_OPEN in vocab and THINK_CLOSE in vocab:
    return vocab[THINK_OPEN], vocab[THINK_CLOSE]
  return None, None


def starts_in_span(prompt: Sequence[int], think_open: int | None, think_close: int | None) -> bool:
  """Whether generation after `prompt` starts inside the thinking span (a template that ends with
  an open tag, as the R1 distills' does)."""
  if think_open is None:
    return True
  last = lambda tag: max((i for i, t in enumerate(prompt) if t == tag), default=-1)
  return last(think_open) > last(think_close)


def eos_ids(cfg, tokenizer) -> tuple[int, ...]:
  """The model's end-of-sequence ids plus the tokenizer's (chat models end turns with it)."""
  return tuple(sorted(set(cfg.eos_ids) | ({tokenizer.eos_token_id} - {None})))
