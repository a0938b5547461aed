"""Steering composed with speculative decoding: ReBalance and NoWait run inside prompt lookup, ESP
and the hybrid tree, and the output equals steered plain decoding token for token (greedy)."""

import jax
import numpy as np
import pytest

from effjax.decoding.engine import AutoRegressive, Engine, Steered, with_hook
from effjax.decoding.esp import ESP
from effjax.decoding.hybrid import Hybrid
from effjax.decoding.lookahead import Lookahead
from effjax.decoding.pld import PromptLookup
from effjax.models import create_model, tiny_config
from effjax.rebalance import steering as st
from effjax.rebalance.confidence import TrackerConfig
from effjax.rebalance.control import ReBalanceConstants
from effjax.rebalance.nowait import NoWaitHook
from step_texts import token_texts

V, LAYER, NEW = 96, 2, 48
CONSTS = ReBalanceConstants(q25c=0.3, q75c=0.7, L1=-1.0, q25v=0.0005, q75v=0.01, L2=-2.0, H2=0.1,
                            layer=LAYER)


TEXTS = token_texts(V, (9, 10, 13, 17))
# Prompts that repeat themselves, so prompt lookup has drafts.
PROMPTS = [[5, 6, 7, 8, 5, 6, 7, 8, 5, 6], [11, 12, 13, 11, 12, 13, 11], [40, 41, 42, 43, 44, 40]]


@pytest.fixture(scope="module")
def model():
  m = create_model(tiny_config("llama", vocab_size=V, tie_embeddings=False), seed=7)
  # A model that mostly copies its context (drafts get accepted) with confident and unsure steps.
  m.embed.set_value(m.embed.get_value() * 0.6)
  m.lm_head.set_value(m.lm_head.get_value() * 2.0)
  return m


@pytest.fixture(scope="module")
def engine(model):
  return Engine(model, cache_len=160, eos_ids=[])


def rebalance(vector, open_id=None, close_id=None, starts_in_span=True):
  return st.ReBalanceHook(np.asarray(vector, np.float32),
                          TrackerConfig.create(CONSTS, think_open_id=open_id,
                                               think_close_id=close_id),
                          st.Delimiters.from_texts(TEXTS), starts_in_span=starts_in_span,
                          trace_len=NEW)


class Uncapped(st.ReBalanceHook):
  """ReBalance without its barrier: trees accept delimiters (not exact)."""

  def barrier(self, state, tokens, parent_tokens):
    return None


TREES = {"pld": lambda: PromptLookup(draft_len=6), "esp": lambda: ESP(widths=(3, 2)),
         "hybrid": lambda: Hybrid(masks=2, budget=30, chain=6)}  # hybrid: ESP's dynamic tree


@pytest.fixture(scope="module")
def vector(model):
  return np.asarray(jax.random.normal(jax.random.key(4), (model.cfg.dim,)) * 4.0)


@pytest.fixture(scope="module")
def plain_rebalance(engine, vector):
  hook = rebalance(vector)
  return hook, engine.generate(PROMPTS, strategy=AutoRegressive(hook=hook), max_new_tokens=NEW)


@pytest.mark.parametrize("tree", sorted(TREES))
def test_rebalance_in_a_tree_equals_steered_plain_decoding(engine, vector, plain_rebalance, tree):
  hook, want = plain_rebalance
  unsteered = engine.generate(PROMPTS, max_new_tokens=NEW).tokens
  assert want.tokens != unsteered  # the steering changes the output
  got = engine.generate(PROMPTS, strategy=Steered(TREES[tree](), rebalance(vector)),
                        max_new_tokens=NEW)
  assert got.tokens == want.tokens
  assert got.model_calls < want.model_calls  # tree steps still accept several tokens
  # The hook saw the same tokens: the same steps, confidences and alphas.
  a, b = want.hook_state.trace, got.hook_state.trace
  np.testing.assert_array_equal(a.closed, b.closed)
  np.testing.assert_array_equal(a.applied != 0, b.applied != 0)
  np.testing.assert_allclose(b.c, a.c, atol=1e-5)
  np.testing.assert_allclose(b.applied, a.applied, atol=1e-4)
  assert np.count_nonzero(a.applied) >= 6


def test_without_the_barrier_a_tree_would_not_be_exact(engine, vector, plain_rebalance):
  _, want = plain_rebalance
  base = rebalance(vector)
  uncapped = Uncapped(base.vector, base.tracker, base.delimiters, True, NEW)
  got = engine.generate(PROMPTS, strategy=Steered(PromptLookup(draft_len=6), uncapped),
                        max_new_tokens=NEW)
  assert got.tokens != want.tokens


def test_think_span_opening_inside_a_tree(engine, vector):
  # The span opens at a token the model emits early on: the delimiters after it are steered, in
  # the tree as in plain decoding.
  plain = engine.generate(PROMPTS, max_new_tokens=NEW).tokens
  open_id = next(t for t in plain[1][2:] if "\n" not in TEXTS[t])
  close_id = next(t for t in range(1, V) if t not in sum(plain, []) and "\n" not in TEXTS[t])
  make = lambda: rebalance(vector, open_id, close_id, starts_in_span=False)
  want = engine.generate(PROMPTS, strategy=AutoRegressive(hook=make()), max_new_tokens=NEW)
  assert np.count_nonzero(want.hook_state.trace.applied) > 0
  got = engine.generate(PROMPTS, strategy=Steered(TREES["hybrid"](), make()), max_new_tokens=NEW)
  assert got.tokens == want.tokens


@pytest.mark.parametrize("tree", ["pld", "hybrid"])
def test_nowait_in_a_tree_equals_nowait_plain_decoding(engine, tree):
  unsteered = engine.generate(PROMPTS, max_new_tokens=NEW).tokens
  banned = tuple(sorted({row[4] for row in unsteered} | {row[9] for row in unsteered}))
  want = engine.generate(PROMPTS, strategy=AutoRegressive(hook=NoWaitHook(banned, V)),
                         max_new_tokens=NEW)
  assert want.tokens != unsteered and not set(banned) & set(sum(want.tokens, []))
  got = engine.generate(PROMPTS, strategy=Steered(TREES[tree](), NoWaitHook(banned, V)),
                        max_new_tokens=NEW)
  assert got.tokens == want.tokens


def test_hooks_only_with_strategies_that_apply_them():
  hook = NoWaitHook((1,), V)
  with pytest.raises(ValueError, match="does not support step hooks"):
    Steered(Lookahead(level=3, window=4, guess=1), hook)
  with pytest.raises(ValueError, match="already runs with a hook"):
    Steered(AutoRegressive(hook=hook), hook)
  plain = AutoRegressive()
  assert with_hook(plain, None) is plain
  assert type(with_hook(plain, hook)) is AutoRegressive and with_hook(plain, hook).hook is hook
  pld = PromptLookup()
  assert with_hook(pld, hook).base is pld
