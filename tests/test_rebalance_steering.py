"""Online ReBalance in the engine: exact steering positions, S = 0 transparency, bookkeeping
against plain Python on a recorded run, NoWait suppression, and the trace/plot output."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax.decoding.engine import AutoRegressive, Engine, StepHook
from effjax.decoding.sampling import Sampler
from effjax.models import create_model, tiny_config
from effjax.rebalance import steering as st
from effjax.rebalance.confidence import TrackerConfig
from effjax.rebalance.control import ReBalanceConstants, alpha, solve_k
from effjax.rebalance.nowait import NoWaitHook, reflection_token_ids
from step_texts import token_texts

V, LAYER, NEW = 128, 2, 40
PROMPTS = [[1, 2, 3, 4, 9, 10, 11, 40, 41], [7, 8, 9], [100, 3, 55, 12, 12, 6]]
CONSTS = ReBalanceConstants(q25c=0.15, q75c=0.45, L1=-1.0, q25v=0.0005, q75v=0.01, L2=-2.0,
                            H2=0.1, layer=LAYER)


TEXTS = token_texts(V)
decode = lambda ids: "".join(TEXTS[i] for i in ids)


@pytest.fixture(scope="module")
def model():
  m = create_model(tiny_config("llama", vocab_size=V, tie_embeddings=False), seed=3)
  # Varied next-token distributions (p_max mostly 0.2..0.7) rather than a copying loop.
  m.embed.set_value(m.embed.get_value() * 0.35)
  m.lm_head.set_value(m.lm_head.get_value() * 2.8)
  return m


@pytest.fixture(scope="module")
def engine(model):
  return Engine(model, cache_len=64, eos_ids=[])


@pytest.fixture(scope="module")
def plain(engine):
  """Unsteered greedy tokens (one compiled strategy for every test that needs them)."""
  return engine.generate(PROMPTS, strategy=AutoRegressive(), max_new_tokens=NEW).tokens


def make_hook(vector, trace_len=NEW):
  # The arithmetic mean (the authors' decoding code), which python_steps reproduces.
  return st.ReBalanceHook(np.asarray(vector, np.float32),
                          TrackerConfig.create(CONSTS, mean="arithmetic"),
                          st.Delimiters.from_texts(TEXTS), starts_in_span=True,
                          trace_len=trace_len)


class Recorder(StepHook):
  """Wraps a hook; records, per forward, the logits and the residual stream entering LAYER at the
  fed token (slot 0: the last prompt token, slot j + 1: generated token j)."""

  hidden_layers = (LAYER,)

  def __init__(self, inner, dim):
    self.inner, self.dim = inner, dim

  def init(self, batch):
    return (self.inner.init(batch), jnp.zeros((batch, NEW, self.dim)), jnp.zeros((batch, NEW, V)),
            jnp.zeros((batch,), jnp.int32))

  def steering(self, state):
    return self.inner.steering(state[0])

  def process_logits(self, state, logits):
    return self.inner.process_logits(state[0], logits)

  def observe(self, state, logits, layer_hidden, fed, sampled, active):
    inner, hidden, lg, pos = state
    rows = jnp.arange(pos.shape[0])
    hidden = hidden.at[rows, pos].set(jnp.where(active[:, None], layer_hidden[0], 0.0))
    lg = lg.at[rows, pos].set(jnp.where(active[:, None], logits, 0.0))
    inner = self.inner.observe(inner, logits, (), fed, sampled, active)
    return inner, hidden, lg, pos + active


def python_steps(tokens, pmax):
  """Step records by a token-by-token loop over texts: delimiter = "\\n\\n" inside a token or a
  "\\n"-starting token after a "\\n"-ending one; c arithmetic mean, v = (c - c_prev)^2 / 4."""
  k = solve_k(CONSTS)
  out, total, count, prev, c_prev, start = [], 0.0, 0, "", None, 0
  for j, t in enumerate(tokens):
    text = TEXTS[t]
    if "\n\n" in text or (prev.endswith("\n") and text.startswith("\n")):
      if count:
        c = min(max(total / count, 0.0), 1.0)
        v = 0.0 if c_prev is None else (c - c_prev) ** 2 / 4
        out.append(dict(token=j, c=c, v=v, alpha=float(alpha(c, v, CONSTS, k)), tokens=count,
                        text=decode(tokens[start:j + 1]).strip()))
        c_prev = c
      total, count, start = 0.0, 0, j + 1
    else:
      total += pmax[j]
      count += 1
    prev = text
  return out


@pytest.fixture(scope="module")
def steered_run(model, engine):
  vector = jax.random.normal(jax.random.key(1), (model.cfg.dim,)) * 3.0
  rec = Recorder(make_hook(vector), model.cfg.dim)
  res = engine.generate(PROMPTS, strategy=AutoRegressive(Sampler(temperature=1.0), rec),
                        max_new_tokens=NEW, seed=5)
  return np.asarray(vector), res


def test_steering_adds_alpha_s_at_delimiters_only(model, steered_run):
  vector, res = steered_run
  inner, hidden, _, _ = res.hook_state
  trace = inner.trace
  # Unsteered teacher-forced forward over prompt + steered generation (rows right-padded).
  seqs = [p + g for p, g in zip(PROMPTS, res.tokens)]
  width = max(map(len, seqs))
  tokens = jnp.asarray([s + [0] * (width - len(s)) for s in seqs])
  valid = jnp.asarray([[i < len(s) for i in range(width)] for s in seqs])
  unsteered = np.asarray(model(tokens, input_mask=valid, hidden_layers=(LAYER,)).layer_hidden[0])
  steered_rows = 0
  for b, (prompt, gen) in enumerate(zip(PROMPTS, res.tokens)):
    assert len(gen) == NEW
    p = len(prompt)
    # Fed positions: the last prompt token, then generated tokens 0..NEW-2.
    want = unsteered[b, p - 1:p + NEW - 1].copy()
    applied = np.asarray(trace.applied[b, :NEW - 1])
    want[1:] += applied[:, None] * vector[None, :]
    np.testing.assert_allclose(hidden[b], want, atol=2e-4)
    # alpha is non-zero exactly at the delimiters that close a step (the whole response is the
    # span here, and the second of two delimiters reuses the last alpha).
    delims = {s["token"] for s in python_steps(gen, [0.5] * NEW)}
    prev_text = [""] + [TEXTS[t] for t in gen[:-1]]
    is_delim = np.array([("\n\n" in TEXTS[t]) or (pt.endswith("\n") and TEXTS[t].startswith("\n"))
                         for t, pt in zip(gen, prev_text)])
    assert set(np.nonzero(trace.closed[b])[0]) == delims
    assert not np.any(applied[~is_delim[:NEW - 1]])
    steered_rows += np.count_nonzero(applied) >= 3
  assert steered_rows == len(PROMPTS)


def test_bookkeeping_matches_python_on_the_recorded_run(steered_run):
  _, res = steered_run
  inner, _, logits, _ = res.hook_state
  for b, gen in enumerate(res.tokens):
    pmax = [1.0 / sum(math.exp(x - max(row)) for x in row) for row in logits[b].tolist()]
    want = python_steps(gen, pmax)
    got = st.step_trace(gen, inner.trace, b, decode)
    assert len(got) == len(want) >= 3
    for g, w in zip(got, want):
      assert (g["token"], g["tokens"], g["text"]) == (w["token"], w["tokens"], w["text"])
      assert g["c"] == pytest.approx(w["c"], abs=1e-6)
      assert g["v"] == pytest.approx(w["v"], abs=1e-7)
      assert g["alpha"] == pytest.approx(w["alpha"], abs=1e-5)
      assert g["applied"] == g["alpha"]


def test_zero_vector_equals_unsteered_engine(model, engine):
  sampler = Sampler(temperature=1.0, top_p=0.9)
  unsteered = engine.generate(PROMPTS, strategy=AutoRegressive(sampler), max_new_tokens=NEW,
                              seed=2)
  zero = engine.generate(PROMPTS, strategy=AutoRegressive(sampler, make_hook(np.zeros(64))),
                         max_new_tokens=NEW, seed=2)
  assert zero.tokens == unsteered.tokens
  assert np.count_nonzero(zero.hook_state.trace.applied) > 5  # the steering path really ran


def test_steering_outside_think_span_is_off(model, engine, plain):
  unused = sorted(set(range(V)) - {t for row in plain for t in row} - set(sum(PROMPTS, [])))
  open_id, close_id = unused[:2]  # the span never opens
  tracker = TrackerConfig.create(CONSTS, think_open_id=open_id, think_close_id=close_id)
  vector = np.ones(model.cfg.dim, np.float32)
  hook = st.ReBalanceHook(vector, tracker, st.Delimiters.from_texts(TEXTS), starts_in_span=False,
                          trace_len=NEW)
  res = engine.generate(PROMPTS, strategy=AutoRegressive(hook=hook), max_new_tokens=NEW)
  assert not np.any(res.hook_state.trace.applied) and res.hook_state.trace.closed.any()
  assert res.tokens == plain


def test_nowait_suppresses_reflection_tokens(engine, plain):
  banned = tuple(sorted({t for row in plain for t in row[:5]}))
  res = engine.generate(PROMPTS, strategy=AutoRegressive(hook=NoWaitHook(banned, V)),
                        max_new_tokens=NEW).tokens
  assert not set(banned) & {t for row in res for t in row}


def test_reflection_token_ids_takes_single_token_spellings():
  vocab = {"wait": 1, " Wait": 2, "WAIT": 3, " hmm": 4, "Hmm": 5, " but": 6, "But": 7}

  class Tok:
    def encode(self, text, add_special_tokens=False):
      return [vocab[text]] if text in vocab else [90, 91]

  assert reflection_token_ids(Tok(), ["wait", "hmm"]) == (1, 2, 3, 4, 5)
  assert reflection_token_ids(Tok(), ["let me check"]) == ()
  with pytest.raises(ValueError):
    NoWaitHook((), V)


def test_trace_file_and_plot(tmp_path, steered_run):
  _, res = steered_run
  inner = res.hook_state[0]
  path = tmp_path / "trace.jsonl"
  for b, gen in enumerate(res.tokens):
    st.write_trace(path, f"p{b}", st.step_trace(gen, inner.trace, b, decode))
  problem, steps = st.read_trace(path, "p1")
  assert problem == "p1" and all(s.pop("problem") == "p1" for s in steps)
  assert steps == st.step_trace(res.tokens[1], inner.trace, 1, decode)
  assert st.read_trace(path)[0] == "p0"
  st.plot_trace(steps, tmp_path / "p1.png", title="p1")
  assert (tmp_path / "p1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  with pytest.raises(ValueError, match="no steps"):
    st.read_trace(path, "missing")
