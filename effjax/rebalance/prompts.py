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


def answer_tokens(prompt: Sequence[int], response: Sequence[int], think_open: int | None,
                  think_close: int | None) -> list[int] | None:
  """The response's answer region: the tokens after its thinking span closes, the whole response
  for a model without think tags or one that never opened the span, None while still thinking."""
  response = list(response)
  if think_open is None or starts_in_span(list(prompt) + response, think_open, think_close):
    return None if think_open is not None else response
  closes = [i for i, t in enumerate(response) if t == think_close]
  return response[closes[-1] + 1:] if closes else response


def eos_ids(cfg, tokenizer) -> tuple[int, ...]:
  """The model's end-of-sequence ids plus the tokenizer's (chat models end turns with it)."""
  return tuple(sorted(set(cfg.eos_ids) | ({tokenizer.eos_token_id} - {None})))
