"""Online bookkeeping against a plain-Python re-computation on a recorded token sequence."""

import math
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models

from effjax.rebalance import confidence as cf
from effjax.rebalance.control import PRESETS, alpha, solve_k

V, T, B = 16, 80, 4
DELIMS = (3, 7)
OPEN, CLOSE = 1, 2
CONSTS = PRESETS["deepseek-r1-distill-qwen-1.5b"]


def recorded_run(seed=0):
  rng = np.random.default_rng(seed)
  logits = (rng.normal(size=(T, B, V)) * rng.uniform(0.5, 4.0, size=(T, B, 1))).astype(np.float32)
  # Content tokens mostly, a delimiter every few tokens, sometimes two in a row.
  tokens = rng.choice([0, 4, 5, 6, 8, 9, 10], size=(T, B))
  for b in range(B):
    t = int(rng.integers(0, 3))
    while t < T:
      tokens[t, b] = rng.choice(DELIMS)
      if rng.random() < 0.2 and t + 1 < T:
        tokens[t + 1, b] = DELIMS[0]
      t += int(rng.integers(2, 9))
  tokens[10, 1], tokens[50, 1] = OPEN, CLOSE  # row 1 opens its span late and closes it
  tokens[60, 0] = CLOSE  # row 0 starts inside (prompt ends with OPEN) and closes
  active = np.ones((T, B), bool)
  active[30:45, 2] = False  # row 2 is paused (e.g. waiting in a batch)
  active[70:, 3] = False  # row 3 finished
  return logits, tokens.astype(np.int32), active


def python_reference(logits, tokens, active, in_span0, mean, window, tags=True):
  """Token-by-token loop with the math module, per row."""
  out = np.zeros((T, B))
  steps_out = []
  for b in range(B):
    total, count, hist, in_span, last_alpha = 0.0, 0, [], in_span0[b], 0.0
    rows = []
    for t in range(T):
      if not active[t, b]:
        continue
      row = [float(x) for x in logits[t, b]]
      mx = max(row)
      pmax = 1.0 / sum(math.exp(x - mx) for x in row)
      tok = int(tokens[t, b])
      if tok in DELIMS:
        if count > 0:
          c = total / count if mean == "arithmetic" else math.exp(total / count)
          c = min(max(c, 0.0), 1.0)
          hist.append(c)
          v = statistics.pvariance(hist[-window:])
          if window == 2:
            assert v == pytest.approx(0.0 if len(hist) == 1 else (hist[-1] - hist[-2]) ** 2 / 4,
                                      abs=1e-12)
          last_alpha = float(alpha(c, v, CONSTS, solve_k(CONSTS)))
          rows.append((t, c, v, count))
        out[t, b] = last_alpha if in_span else 0.0
        total, count = 0.0, 0
      else:
        total += pmax if mean == "arithmetic" else math.log(pmax)
        count += 1
      if tags and tok == OPEN:
        in_span = True
      elif tags and tok == CLOSE:
        in_span = False
    steps_out.append(rows)
  return out, steps_out


def run_tracker(cfg, logits, tokens, active, in_span0):
  mask = jnp.zeros((V,), bool).at[jnp.array(DELIMS)].set(True)

  @jax.jit
  def go(logits, tokens, active):
    state = cf.init_state(cfg, B, in_span0)
    def body(state, xs):
      return cf.update(state, xs[0], xs[1], mask, cfg, xs[2])
    return jax.lax.scan(body, state, (logits, tokens, active))

  return go(logits, tokens, active)


@pytest.mark.parametrize("mean,window", [("arithmetic", 2), ("geometric", 2), ("arithmetic", 3)])
def test_bookkeeping_matches_python(mean, window):
  logits, tokens, active = recorded_run()
  cfg = cf.TrackerConfig.create(CONSTS, mean=mean, window=window, think_open_id=OPEN,
                                think_close_id=CLOSE)
  prompts = jnp.array([[5, OPEN], [5, 6], [OPEN, 4], [OPEN, CLOSE]])
  in_span0 = cf.span_from_prompt(cfg, prompts)
  np.testing.assert_array_equal(in_span0, [True, False, True, False])
  final, sig = run_tracker(cfg, logits, tokens, active, in_span0)
  want_alpha, want_steps = python_reference(logits, tokens, active, np.asarray(in_span0), mean,
                                            window)
  np.testing.assert_allclose(np.asarray(sig.alpha), want_alpha, atol=1e-5)
  closed = np.asarray(sig.closed)
  for b in range(B):
    ts = np.nonzero(closed[:, b])[0]
    assert [r[0] for r in want_steps[b]] == list(ts)
    np.testing.assert_allclose(np.asarray(sig.c)[ts, b], [r[1] for r in want_steps[b]], atol=1e-6)
    np.testing.assert_allclose(np.asarray(sig.v)[ts, b], [r[2] for r in want_steps[b]], atol=1e-7)
    np.testing.assert_array_equal(np.asarray(sig.tokens)[ts, b], [r[3] for r in want_steps[b]])
  np.testing.assert_array_equal(final.steps, [len(r) for r in want_steps])
  assert np.count_nonzero(np.asarray(sig.alpha)) > 10  # the run actually steers
  # Steering only on delimiters, never on inactive rows or outside the span (row 3 never opens).
  is_delim = np.isin(tokens, DELIMS)
  assert not np.any(np.asarray(sig.alpha)[~is_delim | ~active])
  assert not np.any(np.asarray(sig.alpha)[:, 3])


def test_whole_response_span():
  logits, tokens, active = recorded_run(1)
  cfg = cf.TrackerConfig.create(CONSTS, mean="arithmetic")
  _, sig = run_tracker(cfg, logits, tokens, active, None)
  want, _ = python_reference(logits, tokens, active, [True] * B, "arithmetic", 2, tags=False)
  # Without tags nothing toggles the span: OPEN/CLOSE are ordinary tokens here.
  np.testing.assert_allclose(np.asarray(sig.alpha), want, atol=1e-5)
  assert np.count_nonzero(np.asarray(sig.alpha)[60:, 0]) > 0  # row 0 keeps steering after CLOSE


def test_delimiter_mask_from_tokenizer():
  # Byte-level BPE pieces: "Ċ" is "\n".
  vocab = {"a": 0, "Ċ": 1, "ĊĊ": 2, ".ĊĊ": 3, "b": 4, "ĊĊĊ": 5, ".": 6, "Ġa": 7}
  merges = [("Ċ", "Ċ"), (".", "ĊĊ"), ("ĊĊ", "Ċ")]
  tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
  tok.decoder = decoders.ByteLevel()
  mask = cf.delimiter_mask(tok, vocab_size=10)
  np.testing.assert_array_equal(np.nonzero(mask)[0], [2, 3, 5])
