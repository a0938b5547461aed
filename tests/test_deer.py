"""DEER in the engine against a token-by-token reference that recomputes every forward without a
cache: same committed tokens, same trials, and the trials never reach the output."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effjax.decoding.engine import Engine
from effjax.models import create_model, tiny_config
from effjax.rebalance.deer import DEER, Vocabulary

V = 64
WAIT, BRACE, SPACE_BRACE, BRACE_DOT, CLOSE = 20, 21, 22, 24, 35
TRIAL, EXIT = (30, 31, 32), (33, 34)
TEXTS = {WAIT: " Wait", BRACE: "}", SPACE_BRACE: " }", 23: "\n", BRACE_DOT: "}.", CLOSE: "</think>"}
TEXT = [TEXTS.get(i, f" w{i}") for i in range(V)]
PROMPTS = [[1, 2, 3, 4, 5], [9, 8, 7], [40, 41, 42, 43]]
NEW = 40
WIDTH = 64  # the longest prompt + output + trial


@pytest.fixture(scope="module")
def model():
  m = create_model(tiny_config("llama", vocab_size=V, tie_embeddings=False), seed=5)
  head = np.asarray(m.lm_head.get_value()) * 1.5
  head[:, [WAIT, BRACE, SPACE_BRACE, BRACE_DOT]] *= 2.5  # triggers and box ends are frequent
  m.lm_head.set_value(head)
  return m


def reference(model, strategy: DEER, prompt, limit, eos=()):
  """The spec's state machine for one row, greedy, every forward over the whole sequence."""
  vocab = strategy.vocab
  forward = nnx.jit(lambda m, tokens, valid: m(tokens, input_mask=valid).logits)

  def logits_after(seq):  # one compiled shape: right-padded to WIDTH
    tokens = np.zeros((1, WIDTH), np.int32)
    tokens[0, :len(seq)] = seq
    logits = forward(model, jnp.asarray(tokens), jnp.arange(WIDTH)[None] < len(seq))
    return np.asarray(logits[0, len(seq) - 1], np.float64)
  out, thinking, trials, answering = [], 0, 0, False
  budget = int(np.floor(strategy.think_ratio * limit))
  while len(out) < limit:
    tok = int(np.argmax(logits_after(prompt + out)))
    if answering:
      out.append(tok)
      if tok in eos:
        break
      continue
    if vocab.trigger[tok] and trials < strategy.max_trials:
      gen, probs, prev = [], [], strategy.trial_prompt[-1]
      while True:
        lg = logits_after(prompt + out + list(strategy.trial_prompt) + gen)
        t = int(np.argmax(lg))
        p = np.exp(lg - lg.max())
        if gen:
          probs.append(p[t] / p.sum())
        gen.append(t)
        if bool(vocab.ends_trial(jnp.asarray([prev]), jnp.asarray([t]))[0]) or \
            len(gen) >= strategy.max_trial_tokens:
          break
        prev = t
      trials += 1
      conf = float(np.mean(probs)) if probs else 0.0
      if conf > strategy.threshold or thinking >= budget - strategy.budget_margin:
        out += list(strategy.exit_prompt)
        answering = True
      else:
        out.append(tok)
        thinking += 1
      continue
    if tok == strategy.think_close or tok in eos or thinking >= budget:
      out += list(strategy.exit_prompt)
      answering = True
      continue
    out.append(tok)
    thinking += 1
  return out[:limit], trials


def make(**kw):
  return DEER(Vocabulary.from_texts(TEXT), TRIAL, EXIT, CLOSE, max_trials=3, max_trial_tokens=4,
              **kw)


def test_stop_patterns_within_and_across_tokens():
  vocab = Vocabulary.from_texts(["}", " }", "\n", "}.", " w", ")", "x}"])
  ends = lambda prev, tok: bool(vocab.ends_trial(jnp.asarray([prev]), jnp.asarray([tok]))[0])
  assert ends(4, 1) and ends(4, 3)  # " }" and "}." inside one token
  assert ends(0, 2) and ends(6, 2)  # "}" then "\n": "}\n" across the boundary
  assert ends(5, 0)  # ")" then "}": ")}"
  assert not ends(4, 0)  # a lone "}" after a word does not end the trial
  assert vocab.trigger.sum() == 0
  assert Vocabulary.from_texts([" Wait", "Wait", "Waiting"]).trigger.tolist() == [True, True, False]


@pytest.mark.parametrize("kw", [dict(threshold=0.2, think_ratio=1.0, budget_margin=0),
                                dict(threshold=0.99, think_ratio=0.5, budget_margin=3)])
def test_deer_matches_the_reference(model, kw):
  strategy = make(**kw)
  res = Engine(model, cache_len=128, eos_ids=[]).generate(PROMPTS, strategy=strategy,
                                                           max_new_tokens=NEW)
  trials = []
  for i, prompt in enumerate(PROMPTS):
    want, n = reference(model, strategy, prompt, NEW)
    assert res.tokens[i] == want, i
    trials.append(n)
  np.testing.assert_array_equal(res.extra.trials, trials)
  assert sum(trials) >= 1  # trials did run, and none of their tokens reached the output
  assert (res.extra.trial_calls >= np.asarray(trials) * len(TRIAL)).all()
  exited = [set(EXIT) <= set(row) for row in res.tokens]
  if kw["threshold"] < 0.5:  # a confident trial ends thinking early
    assert res.extra.early_exit.any() and exited[int(np.argmax(res.extra.early_exit))]
  else:  # nothing is that confident: thinking ends at the budget (20 tokens) or trials resume
    assert not res.extra.early_exit.any() and all(exited)
    assert any(WAIT in row for row in res.tokens)  # a trial resumed: its "Wait" was committed


def test_deer_without_triggers_is_plain_decoding_until_the_budget(model):
  strategy = DEER(Vocabulary.from_texts([" w"] * V), TRIAL, EXIT, None, think_ratio=0.5)
  eng = Engine(model, cache_len=160, eos_ids=[])
  plain = eng.generate(PROMPTS, max_new_tokens=NEW).tokens
  got = eng.generate(PROMPTS, strategy=strategy, max_new_tokens=NEW)
  for row, base in zip(got.tokens, plain):
    assert row[:20] == base[:20] and row[20:22] == list(EXIT)
  assert not got.extra.trials.any()
