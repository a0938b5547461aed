"""NoWait: suppress reflection tokens during decoding (the cheap baseline ReBalance compares to).

The suppressed set holds every single-token spelling of the reflection words (lower case,
Capitalised and UPPER, with and without a leading space); multi-token spellings are left alone,
as banning their first piece would ban unrelated words. Applied to the whole response.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from effjax.decoding.engine import StepHook
from effjax.decoding.sampling import NEG_INF
from effjax.rebalance.extract import REFLECTION_WORDS


def spellings(word: str) -> set[str]:
  forms = {word.lower(), word.lower().capitalize(), word.upper()}
  return forms | {" " + f for f in forms}


def reflection_token_ids(tokenizer, words: Iterable[str] = REFLECTION_WORDS) -> tuple[int, ...]:
  """Ids of the spellings of `words` that the tokenizer encodes as one token."""
  ids = set()
  for word in words:
    for form in spellings(word):
      encoded = tokenizer.encode(form, add_special_tokens=False)
      if len(encoded) == 1:
        ids.add(int(encoded[0]))
  return tuple(sorted(ids))


@dataclasses.dataclass(frozen=True, eq=False)
class NoWaitHook(StepHook):
  """Sets the logits of `token_ids` to -inf before sampling."""

  token_ids: tuple[int, ...]
  vocab_size: int

  def __post_init__(self):
    if not self.token_ids:
      raise ValueError("NoWait needs at least one token to suppress")

  def process_logits(self, state, logits: jax.Array) -> jax.Array:
    banned = np.zeros((self.vocab_size,), bool)
    banned[list(self.token_ids)] = True
    return jnp.where(jnp.asarray(banned), NEG_INF, logits)

  def barrier(self, state, tokens, parent_tokens):
    return None  # no steering, and the same logit edit for every token: any node may be accepted
