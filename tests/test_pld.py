"""Prompt lookup decoding: the vectorised n-gram search against the reference loop, output equal to
plain greedy decoding (tests/test_esp.py, with the other strategies), and long accepted chains on
repetitive text."""

import jax.numpy as jnp
import numpy as np

from effjax.decoding.engine import Engine
from effjax.decoding.pld import PromptLookup, lookup_match
from effjax.models import create_model, tiny_config


def _reference(text, max_ngram=3, draft_len=10):
  """The reference implementation's search: first earlier match of the longest n-gram."""
  for n in range(max_ngram, 0, -1):
    gram = text[-n:]
    for i in range(len(text) - n + 1):
      if text[i:i + n] == gram and i + n < len(text) - n:
        return text[i + n:i + n + draft_len]
  return []


def test_lookup_matches_the_reference_search():
  rng = np.random.default_rng(0)
  texts = [list(rng.integers(0, v, size=n)) for v, n in [(3, 20), (5, 15), (50, 12), (4, 2),
                                                         (2, 7), (6, 30), (30, 25), (3, 1)]]
  texts.append([1, 2, 3, 9, 9, 1, 2, 3])  # a 3-gram match with a short tail
  width = 40
  ctx = jnp.array([t + [0] * (width - len(t)) for t in texts])
  draft, n, _ = lookup_match(ctx, jnp.array([len(t) for t in texts]), 3, 10)
  for i, t in enumerate(texts):
    want = _reference([int(x) for x in t])
    assert int(n[i]) == len(want), i
    assert np.asarray(draft[i, :len(want)]).tolist() == want, i


def test_repetitive_text_is_accepted_in_long_chains():
  # A random model with a tied head keeps repeating its last token: lookup drafts the repeats.
  cfg = tiny_config("qwen2", num_layers=2)
  model = create_model(cfg, seed=3)
  eng = Engine(model, cache_len=64)
  prompts = [[5, 9, 9, 9, 9, 9, 9, 9], [3, 4, 3, 4, 3, 4, 3, 4, 3]]
  want = eng.generate(prompts, max_new_tokens=30).tokens
  res = eng.generate(prompts, strategy=PromptLookup(), max_new_tokens=30)
  assert res.tokens == want
  assert res.tokens_per_call > 3
  assert res.extra.hist[:, 11].sum() > 0  # whole 10-token drafts accepted (+ the bonus)
