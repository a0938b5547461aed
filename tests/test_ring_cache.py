"""Sliding-window layers on a ring of window + block slots give what the full-length cache gives:
long prompts in chunks, ragged rows, uncommitted token trees with commit and rollback, and whole
speculative generations; and they hold fewer slots."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax.decoding.engine import Engine
from effjax.decoding.pld import PromptLookup
from effjax.models import KVCache, commit, create_model, rollback, tiny_config

ATOL = 1e-4  # the ring sums over other (masked) slots: float32 rounding only
LENGTH, BLOCK = 64, 5  # tiny configs slide over 8 positions: rings of 13 slots


def _model(family):
  cfg = tiny_config(family)
  model = create_model(cfg, seed=1)
  model.embed.set_value(model.embed.get_value() * 0.3)  # a softer head: varied greedy tokens
  return cfg, model


def _caches(cfg, batch):
  full, ring = KVCache.init(cfg, batch, LENGTH), KVCache.init(cfg, batch, LENGTH, block=BLOCK)
  assert [c.shape[2] for c in ring.k] == [8 + BLOCK if cfg.layer_kind(i) == "sliding" else LENGTH
                                          for i in range(cfg.num_layers)]
  assert ring.ring_len == 8 + BLOCK and full.ring_len is None
  return full, ring


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_long_ragged_prompts_in_chunks_then_decoding(family):
  cfg, model = _model(family)
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(1, cfg.vocab_size, (2, 50)), jnp.int32)
  lengths = np.array([37, 23])  # row 1 is right-padded in the second chunk
  step = jax.jit(lambda c, tok, m: (lambda o: (o.logits, o.cache))(model(tok, input_mask=m, cache=c)))
  got = {}
  for name, cache in zip(("full", "ring"), _caches(cfg, 2)):
    logits = []
    for lo, hi in ((0, 20), (20, 37)):  # two chunks, each longer than the window
      mask = jnp.asarray(np.arange(lo, hi)[None, :] < lengths[:, None])
      out, cache = step(cache, tokens[:, lo:hi], mask)
      logits.append(np.where(np.asarray(mask)[..., None], np.asarray(out), 0))
    np.testing.assert_array_equal(cache.index, lengths)
    nxt = np.argmax(_last(logits, lengths), -1)
    for _ in range(12):  # one token at a time, each row from its own length
      out, cache = step(cache, jnp.asarray(nxt[:, None], jnp.int32), jnp.ones((2, 1), bool))
      nxt = np.argmax(np.asarray(out)[:, -1], -1)
      logits.append(np.asarray(out))
    got[name] = logits
  for full, ring in zip(got["full"], got["ring"]):
    np.testing.assert_allclose(ring, full, atol=ATOL, rtol=0)


def _last(chunks, lengths):
  """Each row's logits at its last prompt token, from the chunked prefill."""
  both = np.concatenate(chunks, axis=1)
  return both[np.arange(len(lengths)), lengths - 1]


def test_token_trees_with_commit_and_rollback():
  """Speculative steps: a block of BLOCK uncommitted tree tokens, then a commit of a path through
  it (or a rollback), many times past the window; every step's logits as with the full cache."""
  cfg, model = _model("gemma3")
  rng = np.random.default_rng(1)
  prompt = jnp.asarray(rng.integers(1, cfg.vocab_size, (1, 11)), jnp.int32)
  parent = np.array([-1, 0, 1, 1, 3])  # a tree: root, a chain and a branch
  depth = np.array([0, 1, 2, 2, 3])
  anc = np.eye(BLOCK, dtype=bool)
  for i in range(1, BLOCK):
    anc[i] |= anc[parent[i]]
  tree_mask = jnp.asarray(anc)[None]

  @jax.jit
  def tree_step(cache, tok):
    start = cache.index
    out = model(tok, positions=start[:, None] + jnp.asarray(depth)[None], attn_mask=tree_mask,
                cache=cache, advance=False)
    return out.logits, out.block

  full, ring = _caches(cfg, 1)
  full, ring = model(prompt, cache=full).cache, model(prompt, cache=ring).cache
  for step in range(14):
    tok = jnp.asarray(rng.integers(1, cfg.vocab_size, (1, BLOCK)), jnp.int32)
    (want, full_block), (got, ring_block) = tree_step(full, tok), tree_step(ring, tok)
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0, err_msg=f"step {step}")
    path = jnp.asarray([[0, 1, 3, 4][:1 + step % 4] + [0] * (3 - step % 4)])
    count = jnp.asarray([1 + step % 4])
    full = commit(full, full_block.take(path), count)
    ring = commit(ring, ring_block.take(path), count)
    if step % 4 == 3:  # taken back (as DEER takes back a trial): the last two entries go
      full, ring = rollback(full, full.index - 2), rollback(ring, ring.index - 2)
    np.testing.assert_array_equal(ring.index, full.index)
  assert int(full.index[0]) > 3 * 8  # well past the window
  nxt = jnp.asarray([[5]], jnp.int32)
  np.testing.assert_allclose(model(nxt, cache=ring).logits, model(nxt, cache=full).logits,
                             atol=ATOL, rtol=0)


def test_an_uncommitted_block_longer_than_the_ring_sees_what_the_full_cache_gives():
  """advance=False only reads the ring, so a block of any length fits (here twice the ring)."""
  cfg, model = _model("gemma2")
  full, ring = _caches(cfg, 1)
  rng = np.random.default_rng(2)
  prompt = jnp.asarray(rng.integers(1, cfg.vocab_size, (1, 20)), jnp.int32)
  full, ring = model(prompt, cache=full).cache, model(prompt, cache=ring).cache
  block = jnp.asarray(rng.integers(1, cfg.vocab_size, (1, 2 * ring.ring_len)), jnp.int32)
  np.testing.assert_allclose(model(block, cache=ring, advance=False).logits,
                             model(block, cache=full, advance=False).logits, atol=ATOL, rtol=0)


def test_speculative_generation_equals_the_full_cache_and_uses_fewer_slots():
  cfg, model = _model("gemma3")
  phrase = [11, 12, 13, 14, 15, 16]
  prompts = [phrase * 5 + [3], [7, 8, 9] * 6]  # repetitive: prompt lookup drafts get accepted
  strategy = PromptLookup(max_ngram=2, draft_len=4)
  runs = {}
  for ring in (False, True):
    engine = Engine(model, cache_len=96, eos_ids=(), ring_cache=ring)
    state = engine.start(prompts, strategy=strategy, max_new_tokens=40)
    state = engine.advance(state, strategy, 60)
    tokens = [np.asarray(state.tokens[i, :int(state.length[i])]).tolist() for i in range(2)]
    runs[ring] = (tokens, int(state.calls), state.cache)
  (full, full_calls, full_cache), (ring, ring_calls, ring_cache) = runs[False], runs[True]
  assert ring == full and all(len(t) == 40 for t in ring)
  assert ring_calls == full_calls < 39  # drafts were accepted
  nbytes = lambda c: sum(x.nbytes for x in jax.tree.leaves(c))
  assert ring_cache.ring_len == 8 + strategy.block_size
  assert nbytes(ring_cache) < 0.6 * nbytes(full_cache)
