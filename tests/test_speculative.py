"""Every decoding method by name on tiny random models: greedy output equal to plain greedy decoding
on a ragged batch with per-row limits, an EOS id and a stop sequence, and the KV cache holding
exactly prompt + generated tokens but the last afterwards; sampling distributed exactly as plain
sampling over several steps with top-k and top-p; the pieces of Token Recycling and the suffix
drafter against brute force."""

import dataclasses
import functools
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from effjax.decoding.engine import AutoRegressive, Engine
from effjax.decoding.esp import ESP
from effjax.decoding.hybrid import (BINS, DEPTHS, SOURCES, AcceptanceStats, Hybrid, MASKED_OWNERS,
                                    expected_tokens, likely_ends)
from effjax.decoding.methods import all_labels, budgets, make_strategy, parse_label
from effjax.decoding.recycling import REFERENCE_CHILDREN, SuccessorTable, TokenRecycling, template
from effjax.decoding.sampling import Sampler
from effjax.decoding.suffix import match_lengths, suffix_candidates
from effjax.decoding.tree import Tree
from effjax.models import create_model, tiny_config

PROMPTS = [[1, 2, 3, 4, 9, 10, 11, 14, 15, 20, 21], [7, 8, 9], [5, 6, 7, 8] * 3 + [5, 6]]
LIMITS = [36, 40, 11]
CACHE = 160


def tiny(family, vocab=32, seed=0):
  """A 2-layer model with an untied head (a tied random head mostly repeats the last token)."""
  kinds = dict(layer_kinds=("sliding", "global")) if family.startswith("gemma") else {}
  cfg = tiny_config(family, vocab_size=vocab, tie_embeddings=False, num_layers=2, **kinds)
  return cfg, create_model(cfg, seed=seed)


def _end(tokens, eos, stop, limit):
  """(length, how it ended) of plain decoding's output with this EOS id, stop sequence and limit,
  from its output without them."""
  for i in range(min(len(tokens), limit)):
    if tokens[i] == eos:
      return i + 1, "eos"
    if i and tokens[i - 1:i + 1] == stop:
      return i + 1, "stop"
  return min(len(tokens), limit), "limit"


@functools.cache
def setup(family):
  """An engine with an EOS id and a stop sequence that each end a row after as many tokens as
  possible (so, often inside a multi-token step), and plain greedy decoding's tokens under them."""
  _, model = tiny(family)
  free = Engine(model, cache_len=CACHE).generate(PROMPTS, max_new_tokens=40).tokens

  def quality(eos, stop):
    ends = [_end(t, eos, stop, lim) for t, lim in zip(free, LIMITS)]
    return min(max((n for n, how in ends if how == kind), default=0) for kind in ("eos", "stop"))

  eos, stop = max(((e, row[i:i + 2]) for e in {t for row in free for t in row}
                   for row in free for i in range(len(row) - 1)), key=lambda es: quality(*es))
  assert quality(eos, stop) >= 4, family
  engine = Engine(model, cache_len=CACHE, eos_ids=[eos])
  want = engine.generate(PROMPTS, max_new_tokens=LIMITS, stop_sequences=[stop]).tokens
  assert want == [t[:_end(t, eos, stop, lim)[0]] for t, lim in zip(free, LIMITS)]
  return engine, stop, want


def run_checked(engine, strategy, stop):
  """Generate, and check the cache of a speculative method afterwards: it holds the prompt and
  every generated token but the last, and nothing else (a row that ended inside a step kept only
  what it appended, and a finished row's cache stops)."""
  state = engine.start(PROMPTS, strategy=strategy, max_new_tokens=LIMITS, stop_sequences=[stop])
  state = engine.advance(state, strategy, 100)
  tokens, length, index, pos, plen, calls = jax.device_get(
      (state.tokens, state.length, state.cache.index, state.cache.pos, state.prompt_len,
       state.calls))
  if not isinstance(strategy, AutoRegressive):  # plain decoding forwards finished rows too
    np.testing.assert_array_equal(index, plen + length - 1)
    np.testing.assert_array_equal(pos >= 0, np.arange(pos.shape[1])[None] < index[:, None])
  return [tokens[i, :length[i]].tolist() for i in range(len(PROMPTS))], int(calls), state


# On Llama: every ESP name (static and dynamic trees at each budget), ESP with mask init "sample"
# (random masks), and one or two presets of each other method (each case compiles a decode loop;
# test_method_names builds every name, lookahead's presets run in tests/test_lookahead.py).
RUN_NAMES = [n for n in all_labels() if n.startswith("esp")] + [
    "pld", "lookahead", "tr", "tr-bc10", "suffix", "hybrid-bc30"]
BY_NAME = [(n, n) for n in RUN_NAMES] + [("esp-dyn-bc30-init-sample",
                                         ESP.preset(30, dynamic=True, init="sample"))]


@pytest.mark.parametrize("name,strategy", BY_NAME, ids=[n for n, _ in BY_NAME])
def test_every_method_by_name_is_lossless_and_keeps_the_cache(name, strategy):
  engine, stop, want = setup("llama")
  if isinstance(strategy, str):
    strategy = make_strategy(*parse_label(strategy))
  got, calls, _ = run_checked(engine, strategy, stop)
  assert got == want
  if name != "ar":  # drafts were accepted: verification really ran
    assert calls < max(len(t) for t in want) - 1


# On other families (q/k norms; sliding windows, soft-capping, post-norms, embedding scales): the
# hybrid (tree forwards with masks after the likeliest path ends; ESP, suffix, recycling and lookup
# drafts).
# Every tree method shares its tree forward; two masks per owner run on Gemma 3 in
# tests/test_esp.py, lookahead on Llama and Gemma 3 in tests/test_lookahead.py.
FAMILY_CASES = [(f, "hybrid-bc10") for f in ("qwen3", "gemma2")]


@pytest.mark.parametrize("family,name", FAMILY_CASES, ids=[f"{f}-{m}" for f, m in FAMILY_CASES])
def test_methods_on_every_family(family, name):
  engine, stop, want = setup(family)
  got, _, _ = run_checked(engine, make_strategy(*parse_label(name)), stop)
  assert got == want


@pytest.mark.parametrize("name", ["hybrid-bc60", "hybrid-bc80"])
def test_the_largest_hybrid_trees_are_lossless(name):
  """The hybrid's BC60 / BC80 trees draw up to 74 candidates per mask: a vocabulary of 128."""
  _, model = tiny("llama", vocab=128)
  engine = Engine(model, cache_len=512)
  want = engine.generate(PROMPTS, max_new_tokens=LIMITS).tokens
  got, calls, _ = run_checked(engine, make_strategy(*parse_label(name)), stop=[])
  assert got == want
  assert calls < max(LIMITS) - 1  # drafts were accepted


def test_method_names():
  names = all_labels()
  assert {"esp-bc30", "esp-dyn-bc30", "tr", "tr-bc60", "suffix", "hybrid-bc60"} <= set(names)
  assert "esp" not in names and "hybrid" not in names  # these need a budget
  dyn, static = make_strategy("esp-dyn", 60), make_strategy("esp", 60)
  assert dyn.dynamic and (dyn.masks, dyn.budget) == (2, 60)
  assert not static.dynamic and static.widths == (15, 4) and static.budget == 60
  assert make_strategy("tr").block_size == 81 and make_strategy("tr", 30).block_size == 30
  # the hybrid at Token Recycling's forward size: 73 drafts, 6 masks and the root
  bc80 = make_strategy(*parse_label("hybrid-bc80"))
  assert (bc80.block_size, bc80.num_nodes, bc80.masked_owners) == (80, 73, 6)
  assert budgets("hybrid") == tuple(sorted(MASKED_OWNERS))  # every name has a preset, and back
  with pytest.raises(ValueError, match="esp's BC must be one of 10, 30, 60"):
    make_strategy("esp", 80)
  with pytest.raises(ValueError, match="no BC budget"):
    make_strategy("suffix", 30)
  with pytest.raises(ValueError, match="needs a BC budget"):
    make_strategy("esp-dyn")


def _exact_joint(model, prompt, sampler, n):
  """P(t_1..t_n | prompt) over the whole vocabulary, from one forward of every prompt + t_1..t_n-1
  (its last n positions give the n conditionals)."""
  v = model.cfg.vocab_size
  prefixes = list(itertools.product(range(v), repeat=n - 1))
  logits = model(jnp.array([prompt + list(p) for p in prefixes])).logits[:, -n:]
  p = np.asarray(sampler.probs(logits.reshape(-1, v)), np.float64).reshape(len(prefixes), n, v)
  out = {}
  for i, pre in enumerate(prefixes):
    joint = np.prod([p[i, j, pre[j]] for j in range(n - 1)])
    if joint > 0:
      for c in np.flatnonzero(p[i, n - 1]):
        out[pre + (int(c),)] = joint * p[i, n - 1, c]
  return out


def test_sampling_is_exact_over_several_steps():
  """The first four sampled tokens of many rows with top-k and top-p: the frequencies of every
  tree kind (masks and a static tree; a recycled tree without masks; the hybrid's per-step tree
  with masks) fit the exact joint distribution (chi-square over the cells with >= 5 expected
  counts, the rest pooled), and multi-token steps happened."""
  _, model = tiny("qwen3", vocab=8, seed=1)
  sampler = Sampler(temperature=1.0, top_k=6, top_p=0.95)
  prompt = [1, 2, 3, 4, 2, 3]
  rows, n = 1500, 4
  exact = _exact_joint(model, prompt, sampler, n)
  big = [c for c in exact if exact[c] * rows >= 5]
  exp = [exact[c] * rows for c in big] + [rows * (1 - sum(exact[c] for c in big))]
  eng = Engine(model, cache_len=40)
  # The suffix drafter and prompt lookup verify as Token Recycling does (a tree without masks).
  # The hybrid: masks after 3 of its 7 owners (6 nodes: 7 mask candidates fit the vocabulary).
  for s in (ESP(widths=(2, 2), sampler=sampler), TokenRecycling(budget=10, sampler=sampler),
            Hybrid(masks=1, budget=10, masked_owners=3, sampler=sampler)):
    res = eng.generate([prompt] * rows, strategy=s, max_new_tokens=n, seed=5)
    seen = {}
    for t in res.tokens:
      seen[tuple(t)] = seen.get(tuple(t), 0) + 1
    assert set(seen) <= set(exact)  # nothing outside the top-k / top-p support
    obs = [seen.get(c, 0) for c in big] + [rows - sum(seen.get(c, 0) for c in big)]
    assert stats.chisquare(obs, exp).pvalue > 1e-3, type(s).__name__
    hist = (res.extra.esp if isinstance(s, Hybrid) else res.extra).hist
    assert hist[:, 2:].sum() > rows // 20, type(s).__name__  # multi-token steps happened


def test_recycling_template_and_table():
  tpl = template()
  assert tpl.num_nodes == 80 and tpl.layout.depth == 6
  assert np.bincount(tpl.layout.depths[1:]).tolist()[1:] == [8, 21, 25, 15, 8, 3]
  # Every node's children are ranks 0..n-1 as listed.
  kids = {}
  for p, r in zip(tpl.layout.parents, tpl.ranks):
    kids.setdefault(p, []).append(r)
  assert sorted(len(v) for v in kids.values()) == sorted(REFERENCE_CHILDREN.values())
  assert all(v == list(range(len(v))) for v in kids.values())
  for n in (9, 29, 59):  # a budget's cut: the cheapest paths, still a tree
    cut = template(n)
    assert cut.num_nodes == n and all(p <= i for i, p in enumerate(cut.layout.parents))
  assert template(9).ranks == (0, 1, 2, 3, 0, 1, 2, 0, 0)
  # The table: the top-k after each fed token; a repeated token's last valid occurrence writes.
  logits = jax.random.normal(jax.random.key(0), (1, 4, 10))
  fed = jnp.array([[3, 5, 3, 7]])
  table = SuccessorTable.empty(1, 10, 3).update(fed, logits, jnp.array([[True, True, True, False]]))
  want = np.argsort(-np.asarray(logits[0]), axis=1)[:, :3]
  np.testing.assert_array_equal(table.tokens[0, 3], want[2])
  np.testing.assert_array_equal(table.tokens[0, 5], want[1])
  assert (table.tokens[0, 7] == -1).all()  # invalid: not written
  tok, logp, valid = table.expand(jnp.array([3]), template(9))
  # Depth 1: ranks 0..3 of token 3's successors (only 3 recorded: the 4th is empty).
  assert tok[0, :3].tolist() == want[2].tolist() and valid[0].tolist()[:4] == [True] * 3 + [False]
  np.testing.assert_allclose(logp[0, 0], jax.nn.log_softmax(logits[0, 2])[want[2][0]], rtol=1e-5)


def test_successor_table_merges_rows_by_last_writer():
  fed = jnp.array([[1, 2], [1, 3]])
  logits = jax.random.normal(jax.random.key(1), (2, 2, 5))
  table = SuccessorTable.empty(2, 5, 2).update(fed, logits, jnp.array([[True, True], [True, False]]))
  one = SuccessorTable.merged(table)
  chex.assert_shape((one.tokens, one.logp, one.written), [(1, 5, 2), (1, 5, 2), (1, 5)])
  top = np.argsort(-np.asarray(logits), axis=-1)[..., :2]
  np.testing.assert_array_equal(one.tokens[0, 1], top[1, 0])  # both rows wrote token 1: the last
  np.testing.assert_array_equal(one.tokens[0, 2], top[0, 1])  # only row 0 wrote token 2
  assert (one.tokens[0, [0, 3, 4]] == -1).all() and not one.written.any()  # row 1's 3 was invalid
  with pytest.raises(ValueError, match="inherited successor table"):
    SuccessorTable.start(one, 2, 5, 2)  # the engine broadcasts the memory to the batch first


@pytest.mark.parametrize("strategy", [TokenRecycling(budget=10), Hybrid.preset(10)],
                         ids=["tr-bc10", "hybrid-bc10"])
def test_successor_table_carries_over_between_generations(strategy):
  """As in Token Recycling's reference, a generation starts from the table the last one left: the
  same prompt again needs fewer calls, with the same output; a batch leaves one table for the next
  batch of any size; reset_memory (or inherit=False) starts from an empty table."""
  _, model = tiny("llama")
  engine = Engine(model, cache_len=CACHE)
  prompt = [PROMPTS[0]]
  want = engine.generate(prompt, max_new_tokens=40).tokens
  first = engine.generate(prompt, strategy=strategy, max_new_tokens=40)
  memory = engine._memory_of(strategy)[0]
  assert (np.asarray(memory.tokens[0, want[0][:-1]]) >= 0).all()  # every fed token was recorded
  second = engine.generate(prompt, strategy=strategy, max_new_tokens=40)
  assert first.tokens == second.tokens == want
  assert second.model_calls < first.model_calls
  batch = engine.generate(PROMPTS, strategy=strategy, max_new_tokens=20)
  assert batch.tokens == engine.generate(PROMPTS, max_new_tokens=20).tokens
  assert engine.generate(prompt[:1], strategy=strategy, max_new_tokens=40).tokens == want
  engine.reset_memory()
  assert engine.generate(prompt, strategy=strategy, max_new_tokens=40).model_calls == \
      first.model_calls
  alone = dataclasses.replace(strategy, inherit=False)
  calls = [engine.generate(prompt, strategy=alone, max_new_tokens=40).model_calls for _ in "ab"]
  assert calls == [first.model_calls] * 2


def _brute_match(text, i, cap):
  n = 0
  while n < cap and n <= i and text[i - n] == text[len(text) - 1 - n]:
    n += 1
  return n


def test_suffix_match_lengths_and_trie():
  rng = np.random.default_rng(0)
  texts = [list(rng.integers(0, v, size=n)) for v, n in [(3, 30), (2, 12), (20, 9), (4, 25)]]
  texts.append([5] * 6)
  width = 32
  ctx = jnp.array([t + [0] * (width - len(t)) for t in texts])
  length = jnp.array([len(t) for t in texts])
  m = np.asarray(match_lengths(ctx, length, 5))
  for r, t in enumerate(texts):
    want = [_brute_match(t, i, 5) if i < len(t) - 1 else 0 for i in range(width)]
    assert m[r].tolist() == want, r
  # "1 2 3 1 2 3 1 2": the longest earlier match "1 2 3 1 2" (5 tokens) continues "3 1 2".
  # "5 5 5 5 5 5": SuffixDecoding's choice is m = 3 (its occurrences continue 3, 2 and 1 tokens:
  # p = 1, 2/3, 1/3, score 2 within a budget of 3) over m = 5 (one token, score 1).
  ctx = jnp.array([[1, 2, 3, 1, 2, 3, 1, 2, 0, 0], [5, 5, 5, 5, 5, 5, 0, 0, 0, 0]])
  c = suffix_candidates(ctx, jnp.array([8, 6]), occurrences=4, depth=3, max_depth=8, max_spec=16,
                        alpha=1.0, offset=0.0, min_token_prob=0.1)
  assert c.match.tolist() == [5, 3]
  first = np.asarray(c.first) == np.arange(12)
  for r, want in enumerate([[(3, 1.0), (1, 1.0), (2, 1.0)], [(5, 1.0), (5, 2 / 3), (5, 1 / 3)]]):
    nodes = [(int(t), float(p)) for t, p, v, f in zip(c.tokens[r], c.prob[r], c.valid[r], first[r])
             if v and f]
    assert [(t, round(p, 4)) for t, p in nodes] == [(t, round(p, 4)) for t, p in want]


def test_acceptance_statistics_and_expected_tokens():
  stats0 = AcceptanceStats.empty(1)
  np.testing.assert_allclose(stats0.calibration(1.0), 1.0)  # no evidence: trust the sources
  cell = jnp.array([[0, 0, 0, 5]])
  own = jnp.array([[0.5, 0.5, 0.5, 1.0]])
  seen = jnp.array([[True, True, True, False]])
  st = stats0.observe(cell, own, seen, jnp.array([[True, False, False, True]]))
  c = np.asarray(st.calibration(1.0)).reshape(-1)
  source = (1 + 1) / (1.5 + 1)  # esp's cells together: 1 hit for 1.5 expected
  assert c[0] == pytest.approx((1 + source) / (1.5 + 1))  # cell 0's evidence, shrunk to esp's
  assert c[5] == pytest.approx(source)  # an esp cell without evidence takes esp's factor
  assert c[DEPTHS * BINS] == 1.0  # another source without evidence: trust it
  assert float(st.seen.sum()) == 3 and float(st.hits.sum()) == 1
  exp = expected_tokens(jnp.log(jnp.array([[0.2, 0.9, 0.5, 1.0]])),
                        jnp.array([[True, True, True, False]]), 4)
  np.testing.assert_allclose(exp, [[1.0, 1.9, 2.4, 2.6, 2.6]], rtol=1e-6)


def test_likely_ends_rank_owners_by_where_the_path_stops():
  """Reach probabilities root 1, node 1 0.6, node 2 0.25 (children of the root), node 3 0.5 (child
  of node 1), slot 4 unused: the path stops at node 3 w.p. 0.5, node 2 0.25, the root 0.15, node 1
  0.1."""
  tree = Tree(tokens=jnp.zeros((1, 5), jnp.int32), parent=jnp.array([[0, 0, 0, 1, 0]]),
              valid=jnp.array([[True, True, True, True, False]]))
  score = jnp.log(jnp.array([[0.6, 0.25, 0.5, 0.0]]))
  np.testing.assert_array_equal(likely_ends(tree, score, 3), [[3, 2, 0]])
  assert Hybrid.preset(60).num_nodes == 53 and Hybrid.preset(60).block_size == 60
  assert Hybrid(masks=1, budget=60).num_nodes == 29  # masks after every owner, as ESP
  with pytest.raises(ValueError, match="masked_owners"):
    Hybrid(masks=1, budget=10, masked_owners=7)


def test_hybrid_draws_from_every_source_and_learns_online():
  """On text the model repeats, every source proposes candidates, is observed and scored; the
  estimate of accepted nodes per step follows what was accepted."""
  _, model = tiny("llama")
  eng = Engine(model, cache_len=96)
  strategy = Hybrid(masks=1, budget=16)  # 7 node slots
  prompt = [5, 6, 7, 8] * 3 + [5, 6]
  state = eng.start([prompt], strategy=strategy, max_new_tokens=40)
  cand = strategy.candidates(state)
  sources = np.asarray(cand.cell[0]) // (DEPTHS * BINS)
  for s in range(len(SOURCES)):
    assert (sources == s).any()
  # Recycled successors along the whole reference template, whatever the budget: the estimates,
  # not a cut of the template, choose which of them fill the 7 slots.
  assert (sources == SOURCES.index("recycle")).sum() == template().num_nodes == 80
  state = eng.advance(state, strategy, 12)
  ex = jax.device_get(state.extra)
  seen = ex.stats.seen[0].sum(axis=(1, 2))
  assert (seen[[SOURCES.index("esp"), SOURCES.index("ngram")]] > 0).all()
  assert (ex.stats.hits <= ex.stats.seen).all() and ex.stats.hits.sum() > 0
  assert ex.accepted[0] > 0 and 0 < ex.predicted[0]
  assert ex.expected.shape == (1, 8) and (np.diff(ex.expected[0]) >= 0).all()
