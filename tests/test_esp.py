"""ESP on tiny random models: greedy output equals plain greedy decoding on ragged batches, and the
pieces (arguments, mask init, EMA, static and dynamic trees) match their definitions. Every method
by name, sampling exactness and the hybrid: tests/test_speculative.py."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax.decoding.engine import Engine
from effjax.decoding.esp import (ESP, dynamic_candidates, ema_update, init_masks,
                                 prefill_with_masks, static_tree)
from effjax.decoding.tree import select_tree
from effjax.models import create_model, tiny_config

PROMPTS = [[1, 2, 3, 4, 9, 10, 11, 14, 15, 20, 21], [7, 8, 9], [5, 6, 7, 8] * 3 + [5, 6]]
LIMITS = [14, 18, 9]


def tiny(family, vocab=32, seed=0, **kw):
  """A 2-layer model with an untied head (a tied random head mostly repeats the last token)."""
  kinds = dict(layer_kinds=("sliding", "global")) if family.startswith("gemma") else {}
  cfg = tiny_config(family, vocab_size=vocab, tie_embeddings=False, num_layers=2, **kinds, **kw)
  return cfg, create_model(cfg, seed=seed)


@functools.cache
def plain_greedy(family):
  _, model = tiny(family)
  eng = Engine(model, cache_len=96)
  return eng, eng.generate(PROMPTS, max_new_tokens=LIMITS).tokens


def _name(case):
  family, s = case
  return f"{family}-{'dyn' if s.dynamic else s.widths}-{s.budget}"


# The presets by name run in tests/test_speculative.py; here three masks (the most ESP allows) with
# "last" init on Llama, and the k = 2 dynamic tree on Gemma 3, with their histograms.
CASES = [("llama", ESP(widths=(2, 2, 2), init="last")), ("gemma3", ESP.preset(60, dynamic=True))]


@pytest.mark.parametrize("case", CASES, ids=_name)
def test_greedy_equals_plain_greedy_on_ragged_batch(case):
  family, strategy = case
  eng, want = plain_greedy(family)
  res = eng.generate(PROMPTS, strategy=strategy, max_new_tokens=LIMITS)
  assert res.tokens == want
  hist = res.extra.hist
  per_call = np.arange(hist.shape[1])
  # Every decode forward of an active row is counted once, by the tokens it appended.
  np.testing.assert_array_equal((hist * per_call).sum(axis=1), [len(t) - 1 for t in want])
  assert hist[:, 2:].sum() > 0  # drafts were accepted, so verification really ran
  assert res.model_calls == hist.sum(axis=1).max()


def test_esp_checks_its_settings():
  assert ESP.preset(60).masks == 2 and ESP.preset(60).block_size == 60
  assert ESP.preset(30).max_step_tokens == 2 and ESP.preset(60).max_step_tokens == 3
  dyn = ESP.preset(60, dynamic=True)
  assert (dyn.masks, dyn.num_nodes, dyn.block_size) == (2, 19, 60)
  with pytest.raises(ValueError, match="1 to 3"):
    ESP(widths=(1, 1, 1, 1))
  with pytest.raises(ValueError, match="multiple"):
    ESP(widths=None, masks=2, budget=31)
  # One tree or the other: arguments that contradict each other are an error, never overridden.
  assert ESP().widths == (4,) and ESP().budget == 10
  assert ESP(widths=(14,), masks=1, budget=30).budget == 30  # consistent: fine
  assert ESP(masks=2, budget=60).dynamic and ESP(budget=30).masks == 1
  for bad in (dict(masks=2, budget=60, widths=(4,)), dict(widths=(4,), masks=2),
              dict(widths=(14,), budget=60)):
    with pytest.raises(ValueError, match="implies"):
      ESP(**bad)
  with pytest.raises(ValueError, match="needs a budget"):
    ESP(masks=2)
  with pytest.raises(ValueError, match="preset"):
    ESP.preset(20)
  with pytest.raises(ValueError, match="init"):
    ESP(init="zeros")


def test_mask_init_and_ema_follow_their_definitions():
  table = jax.random.normal(jax.random.key(0), (20, 6))
  prompt = jnp.array([[3, 4, 5, 0], [7, 8, 0, 0]])
  plen = jnp.array([3, 2])
  mean = init_masks(table[prompt], plen, 2, "mean", jax.random.key(1))
  np.testing.assert_allclose(mean[0, 1], table[jnp.array([3, 4, 5])].mean(0), rtol=1e-6)
  np.testing.assert_allclose(mean[1, 0], table[jnp.array([7, 8])].mean(0), rtol=1e-6)
  last = init_masks(table[prompt], plen, 2, "last", jax.random.key(1))
  np.testing.assert_array_equal(last[0], table[jnp.array([4, 5])])
  drawn = init_masks(table[jnp.tile(prompt[:1, :3], (1, 200))], jnp.array([600]), 3, "sample",
                     jax.random.key(2))
  assert not np.allclose(drawn[0, 0], drawn[0, 1])
  emb = table[jnp.array([3, 4, 5])]
  spread = jnp.sqrt(((emb - emb.mean(0)) ** 2).mean())
  np.testing.assert_allclose(jnp.std(drawn[0] - emb.mean(0)), spread, rtol=0.5)
  # EMA: the closed form equals applying Eq. 5 once per committed token, in order.
  m = jax.random.normal(jax.random.key(3), (2, 2, 6))
  new = jax.random.normal(jax.random.key(4), (2, 4, 6))
  got = ema_update(m, new, jnp.array([3, 0]), 0.1)
  want = m[0]
  for e in new[0, :3]:
    want = want + 0.1 * (e - want)
  np.testing.assert_allclose(got[0], want, rtol=1e-5)
  np.testing.assert_array_equal(got[1], m[1])


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_prefill_with_masks_equals_a_forward_of_prompt_then_masks(family):
  """The folded prefill (masks in each row's padding, one forward) gives the logits of a causal
  forward of [prompt, m_1..m_k] alone, and a cache holding only the prompt."""
  cfg, model = tiny(family)
  eng = Engine(model, cache_len=40)
  prompts, k = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16], [7, 8, 9]], 2
  esp = ESP()
  init = eng._functions(esp)[0]  # the engine's own init program: the state prefill starts from
  state = init(*eng._inputs(prompts, np.array([4, 4]), np.zeros((0, 1), np.int32), 0, esp))
  masks = jax.random.normal(jax.random.key(0), (2, k, cfg.dim))
  logits, mask_logits, _, cache = prefill_with_masks(model, state, masks)
  for i, p in enumerate(prompts):
    emb = jnp.concatenate([model.embed_tokens(jnp.array([p])), masks[i:i + 1]], axis=1)
    want = model(embeddings=emb).logits[0]
    np.testing.assert_allclose(logits[i], want[len(p) - 1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mask_logits[i], want[len(p):], rtol=1e-5, atol=1e-5)
    assert int(cache.index[i]) == len(p)
    np.testing.assert_array_equal(cache.pos[i], np.where(np.arange(40) < len(p), np.arange(40), -1))


def test_static_tree_top1_expansion_and_pruning():
  root = jnp.array([7])
  # q_1 ranks 7 (the root's token: pruned), 3, 9, 4; q_2 ranks 3 (= its parent: pruned), 5, 6.
  cand = jnp.array([[[7, 3, 9, 4], [3, 5, 6, 1]]])
  tree = static_tree(root, cand, (3, 2))
  np.testing.assert_array_equal(tree.tokens, [[7, 3, 9, 4, 5, 6]])
  np.testing.assert_array_equal(tree.parent, [[0, 0, 0, 0, 1, 1]])


def _alg1_reference(root, q, owners):
  """Paper Alg. 1 by enumeration: at depth i the owners - i best (path, token) extensions of the
  depth i-1 candidates by P(path) * q_i(token), no token equal to its parent's; then the
  owners - 1 best of all candidates. Returns the kept token paths."""
  level = [((), 1.0, root)]
  pool = []
  for i in range(1, len(q) + 1):
    ext = [(path + (t,), p * q[i - 1][t], t) for path, p, last in level
           for t in range(len(q[i - 1])) if t != last]
    ext.sort(key=lambda e: -e[1])
    level = ext[:owners - i]
    pool += level
  pool.sort(key=lambda e: -e[1])
  return {path for path, _, _ in pool[:owners - 1]}


@pytest.mark.parametrize("seed", range(3))
def test_dynamic_tree_matches_algorithm_1(seed):
  k, owners, vocab = 2, 6, 12
  rng = np.random.default_rng(seed)
  q = rng.dirichlet(np.full(vocab, 0.5), size=k)
  root = int(np.argmax(q[0]))  # the best q_1 token is the root's: pruned at depth 1
  logp = jnp.log(jnp.asarray(q, jnp.float32))[None]
  top_logp, top_tok = jax.lax.top_k(logp, owners)
  parent, tokens, score, valid, levels = dynamic_candidates(jnp.array([root]), top_tok, top_logp,
                                                            owners)
  tree = select_tree(jnp.array([root]), parent, tokens, score, valid, levels, owners - 1)
  par, tok = np.asarray(tree.parent[0]), np.asarray(tree.tokens[0])
  paths = set()
  for o in range(1, owners):
    path, i = [], o
    while i:
      path.append(int(tok[i]))
      i = par[i]
    paths.add(tuple(reversed(path)))
  assert paths == _alg1_reference(root, q, owners)
  assert np.asarray(tree.valid).all()
