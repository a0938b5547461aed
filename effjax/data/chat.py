"""Prompt text -> token ids, through the tokenizer's own chat template when asked."""

from __future__ import annotations

from typing import Sequence


def encode_prompt(tokenizer, prompt: str | Sequence[dict], *, chat: bool = True,
                  system: str | None = None) -> list[int]:
  """Token ids of a prompt: a string or a list of {"role", "content"} messages.

  With chat=True the tokenizer's chat template is applied with the generation prompt appended;
  without a template that is an error rather than a silent fallback to raw text.
  """
  if not chat:
    if not isinstance(prompt, str):
      raise ValueError("a message list needs chat=True")
    return list(tokenizer.encode(prompt, add_special_tokens=True))
  if not getattr(tokenizer, "chat_template", None):
    raise ValueError("this tokenizer has no chat template; use chat=False (--no-chat) for raw text")
  messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
  if system:
    messages = [{"role": "system", "content": system}] + messages
  ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
  if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # transformers 5 may return a BatchEncoding
    ids = ids["input_ids"]
  return [int(t) for t in ids]


class TextStream:
  """Incremental detokenization: feed token ids, get the new text (held back mid-character)."""

  def __init__(self, tokenizer):
    self.tokenizer = tokenizer
    self.ids: list[int] = []
    self.sent = 0

  def push(self, ids: Sequence[int]) -> str:
    self.ids.extend(int(i) for i in ids)
    text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
    if text.endswith("\ufffd"):  # an unfinished multi-byte character: wait for its other bytes
      return ""
    new, self.sent = text[self.sent:], len(text)
    return new
