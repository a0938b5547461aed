"""Cost-aware budgets (`auto`): output equal to plain greedy decoding whatever the costs, and the
cost model decides what runs: flat costs (an accelerator) speculate, costs growing with the block
(a CPU at its worst) decode plainly, and the lookup chain is taken where the text repeats."""

import functools
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax.decoding.budget import Auto, Option, ShadowLookup
from effjax.decoding.cost_model import CostModel
from effjax.decoding.engine import Engine
from effjax.models import create_model, tiny_config

PROMPTS = [[1, 2, 3, 4, 9, 10, 11, 14, 15, 20, 21], [7, 8, 9], [5, 6, 7, 8] * 3 + [5, 6]]
LIMITS = [14, 18, 24]
OPTIONS = (Option("plain"), Option("draft", 3), Option("draft", 10), Option("hybrid", 4),
           Option("hybrid", 14))


def costs(per_token: float) -> CostModel:
  """cost(k) = 1 + per_token * (k - 1) ms, at any cache length."""
  return CostModel(tuple((64, k, 1e-3 * (1 + per_token * (k - 1)))
                        for k in (1, 2, 4, 10, 11, 30, 60)))


@functools.cache
def engine_and_plain():
  cfg = tiny_config("llama", vocab_size=32, tie_embeddings=False, num_layers=2)
  eng = Engine(create_model(cfg, seed=0), cache_len=96)
  return eng, eng.generate(PROMPTS, max_new_tokens=LIMITS).tokens


@pytest.mark.parametrize("per_token,runs", [
    (0.0, "speculates"),  # flat: an accelerator
    (1.0, "plain"),  # cost grows as fast as the block: nothing can pay
    (0.08, "chain"),  # cheap short blocks: the lookup chain pays where the text repeats
])
def test_auto_equals_plain_and_follows_the_cost_model(per_token, runs):
  eng, want = engine_and_plain()
  auto = Auto(options=OPTIONS, cost_model=costs(per_token))
  res = eng.generate(PROMPTS, strategy=auto, max_new_tokens=LIMITS)
  assert res.tokens == want
  ran = dict(zip([o.name for o in auto.options], res.extra.runs.tolist()))
  assert sum(ran.values()) == res.model_calls
  # Growing costs leave the trees that cannot repay their forward out of the program.
  assert [o.name for o in auto.options] == {
      "speculates": [o.name for o in OPTIONS], "plain": ["plain", "draft-3", "draft-10"],
      "chain": ["plain", "draft-3", "draft-10", "hybrid-4"]}[runs]
  hist = res.extra.esp.hist
  np.testing.assert_array_equal((hist * np.arange(hist.shape[1])).sum(axis=1),
                                [len(t) - 1 for t in want])
  if runs == "plain":
    assert ran["plain"] == res.model_calls == max(len(t) for t in want) - 1
  elif runs == "speculates":
    assert ran["hybrid-14"] > ran["plain"] and hist[:, 2:].sum() > 0
  else:
    assert ran["draft-3"] + ran["draft-10"] > 0 and res.model_calls < max(len(t) for t in want) - 1


def test_auto_checks_its_settings():
  with pytest.raises(ValueError, match="first option"):
    Auto(options=(Option("draft", 3),))
  with pytest.raises(ValueError, match="bad option"):
    Auto(options=(Option("plain"), Option("draft", 0)))
  with pytest.raises(ValueError, match="more than the 10 candidates"):
    Auto(options=(Option("plain"), Option("draft", 11)))
  Auto(options=(Option("plain"), Option("draft", 20)), recycled=10)
  with pytest.raises(ValueError, match="recycled=10 needs"):
    Auto(chain=2, recycled=10)
  auto = Auto()
  assert auto.blocks == (1, 4, 11, 10, 30, 60) and auto.block_size == 60
  eng, _ = engine_and_plain()
  with pytest.raises(ValueError, match="needs a cost model"):
    eng.generate(PROMPTS[:1], strategy=Auto(options=OPTIONS[:2]), max_new_tokens=4)


def test_deeper_chain_depths_start_from_the_depth_above():
  auto = Auto(options=OPTIONS[:2], chain=4, chain_prior=(1.0, 3.0))
  hits = np.zeros((3, 4))
  seen = np.zeros((3, 4))
  hits[:2, 0], seen[:2, 0] = (18, 2), (20, 20)  # depth 1 observed: often right, rarely right
  rates = np.asarray(auto.chain_rates(jnp.asarray(hits), jnp.asarray(seen)))
  np.testing.assert_allclose(rates, np.repeat([[19 / 24], [3 / 24], [1 / 4]], 4, axis=1),
                             rtol=1e-6)
  hits[0, 1], seen[0, 1] = 0, 12  # depth 2 of the first row: never right
  rates = np.asarray(auto.chain_rates(jnp.asarray(hits), jnp.asarray(seen)))
  depth2 = 4 * (19 / 24) / 16
  np.testing.assert_allclose(rates[0], [19 / 24, depth2, depth2, depth2], rtol=1e-6)


def test_chain_counts_fade_so_the_estimate_follows_the_text_as_it_is_now():
  """Two full 4-token matches, then eight steps where only the first chain token is right: with
  every step remembered, depth 4 keeps its 2 of 2 early successes (0.72); fading by half per step
  leaves them almost no weight."""
  def rates(memory):
    hits, seen = np.zeros(4), np.zeros(4)
    for new_seen, new_hits in [([1, 1, 1, 1], [1, 1, 1, 1])] * 2 + [([1, 1, 0, 0], [1, 0, 0, 0])] * 8:
      seen, hits = memory * seen + new_seen, memory * hits + new_hits
    auto = Auto(options=OPTIONS[:2], chain=4, chain_memory=memory)
    return np.asarray(auto.chain_rates(jnp.asarray(hits[None]), jnp.asarray(seen[None])))[0]

  def golden(w, u):  # w: the weight of all ten steps, u: of the first two; prior (1, 3)
    d1 = (w + 1) / (w + 4)
    d2 = (u + 4 * d1) / (w + 4)
    d3 = (u + 4 * d2) / (u + 4)
    return [d1, d2, d3, (u + 4 * d3) / (u + 4)]

  np.testing.assert_allclose(rates(1.0), golden(10, 2), rtol=1e-6)
  np.testing.assert_allclose(rates(0.5), golden(2 - 0.5**9, 0.5**9 + 0.5**8), rtol=1e-6)
  assert rates(1.0)[3] > 0.7 and rates(0.5)[3] < 0.34
  with pytest.raises(ValueError, match="chain_memory"):
    Auto(chain_memory=0.0)


@pytest.mark.parametrize("memory", [1.0, 0.5])
def test_the_decode_loop_fades_the_chain_counts(memory):
  eng, want = engine_and_plain()
  auto = Auto(options=OPTIONS, cost_model=costs(0.08), chain_memory=memory)
  res = eng.generate(PROMPTS, strategy=auto, max_new_tokens=LIMITS)
  assert res.tokens == want
  seen = np.asarray(res.extra.chain_seen)
  if memory == 1.0:  # whole counts: one per step that observed depth 1
    np.testing.assert_array_equal(seen, np.round(seen))
    assert seen[:, 0].max() > 2
  else:  # a geometric sum of weights that halve each step stays under 2
    assert 0 < seen[:, 0].max() < 2


# Forward seconds measured on a 2-core CPU for SmolLM2-135M (the cost model `auto` measured there).
CPU_COSTS = CostModel(tuple((s, k, t * 1e-3) for s, row in (
    (256, (15.3, 19.8, 24.9, 26.9, 44.2, 75.9)), (2048, (19.4, 27.4, 42.2, 43.7, 94.2, 179.1)))
    for k, t in zip((1, 4, 10, 11, 30, 60), row)))


def test_pruning_keeps_the_options_a_device_can_profit_from():
  assert Auto(cost_model=costs(0.0)).options == Auto().options  # flat costs: every option
  cpu = Auto(cost_model=CPU_COSTS)
  assert [o.name for o in cpu.options] == ["plain", "draft-3", "draft-10", "hybrid-4", "hybrid-14"]
  assert cpu.block_size == 30 and cpu.blocks == (1, 4, 11, 10, 30)
  assert Auto(cost_model=CPU_COSTS, prune=False).options == Auto().options
  assert Auto().with_cost_model(CPU_COSTS).options == cpu.options


@pytest.mark.parametrize("cost_model", [CPU_COSTS, costs(0.08), costs(0.3)])
def test_a_pruned_option_is_never_the_best_choice(cost_model):
  """The estimator over many random states, at several cache lengths: every step's choice among
  all options is one the pruning kept, and the mask candidates' reach probabilities sum to <= 1."""
  full = Auto(cost_model=cost_model, prune=False, recycled=10)
  kept = {o.name for o in Auto(options=full.options, cost_model=cost_model, recycled=10).options}
  rng = np.random.default_rng(0)
  b, c, chosen = 4, full.max_nodes, set()
  for _ in range(300):
    seen = rng.uniform(0, 30, (b, full.chain))
    ex = SimpleNamespace(esp_hits=jnp.asarray(rng.uniform(0, 40, b)),
                         esp_mass=jnp.asarray(rng.uniform(0, 20, b)),
                         fresh=jnp.asarray(rng.random(b) < 0.8))
    rates = full.chain_rates(jnp.asarray(seen * rng.beta(2, 0.6, (b, full.chain))),
                             jnp.asarray(seen))
    chain_p = jnp.cumprod(rates, axis=1) * (np.arange(full.chain)[None, :]
                                           < rng.integers(0, full.chain + 1, (b, 1)))
    recorded = np.log(1e-12 + rng.dirichlet(np.full(8, rng.uniform(0.05, 2)), (b, full.recycled)))
    rec_p = full.recycled_reach(jnp.asarray(rng.uniform(0, 30, b)),
                                jnp.asarray(rng.uniform(0, 30, b)), jnp.asarray(recorded[:, :, 0]),
                                jnp.asarray(rng.random((b, full.recycled)) < 0.8))
    draft_p = jax.lax.top_k(jnp.concatenate([chain_p, rec_p], axis=1), full.selected)[0]
    score = jnp.asarray(np.log(rng.dirichlet(np.full(c, rng.uniform(0.05, 2)), b)))
    esp_p = full.esp_reach(ex, score, jnp.asarray(rng.random((b, c)) < 0.9))
    expected = full.expected(draft_p, esp_p)
    assert float(esp_p.sum(axis=1).max()) <= 1 + 1e-5
    active = jnp.asarray(rng.random(b) < 0.7)
    for cache_len in (64, 300, 2048):
      chosen.add(full.options[int(full.choose(expected, active, cache_len))].name)
  assert chosen <= kept and len(chosen) > 1, (chosen, kept)


def test_recycled_reach_golden_values():
  """template(3): the root's successors of rank 0 and 1, and rank 0 under the first. Row 0: c =
  (1 + 1) / (3 + 1) = 0.5; row 1: c = 10 / 2 = 5, so min(1, c p) saturates and the root's two
  successors (1 and 0.5) are scaled to sum to 1."""
  auto = Auto(options=OPTIONS[:2], recycled=3)
  logp = jnp.log(jnp.array([[0.8, 0.1, 0.5]] * 2))
  reach = auto.recycled_reach(jnp.array([1.0, 9.0]), jnp.array([3.0, 1.0]), logp,
                              jnp.array([[True, True, True], [True, True, True]]))
  np.testing.assert_allclose(reach, [[0.4, 0.05, 0.1], [2 / 3, 1 / 3, 2 / 3]], rtol=1e-6)
  reach = auto.recycled_reach(jnp.array([1.0]), jnp.array([3.0]), logp[:1],
                              jnp.array([[False, True, True]]))
  np.testing.assert_allclose(reach, [[0.0, 0.05, 0.0]], atol=1e-7)


def test_auto_records_and_inherits_the_successor_table():
  """Every generated token but the last is fed on an accepted path, so with every path row
  recorded the table has its successors; the next generation on the engine starts from that
  table; recycled=0 keeps none."""
  eng, want = engine_and_plain()
  auto = Auto(options=OPTIONS, cost_model=costs(0.0), recycled=10, recorded=11)
  res = eng.generate(PROMPTS, strategy=auto, max_new_tokens=LIMITS)
  assert res.tokens == want
  written = np.asarray(res.extra.table.written)
  for row, toks in enumerate(want):
    assert written[row, toks[:-1]].all()
  assert float(res.extra.rec_mass.min()) > 0
  left = eng._memory_of(auto)[0]
  assert left.tokens.shape == (1, 32, 8)
  assert (np.asarray(left.tokens[0, want[0][:-1], 0]) >= 0).all()
  again = eng.generate(PROMPTS, strategy=auto, max_new_tokens=LIMITS)
  assert again.tokens == want
  bare = Auto(options=OPTIONS, cost_model=costs(0.0))
  res = eng.generate(PROMPTS, strategy=bare, max_new_tokens=LIMITS)
  assert res.tokens == want and res.extra.table is None and eng._memory_of(bare)[0] is None


def stream_all(eng, strategy, prompts, limit):
  """Engine.stream one step per chunk: every row's tokens and the GenerationResult."""
  chunks = eng.stream(prompts, strategy=strategy, max_new_tokens=limit, chunk=1)
  got = [[] for _ in prompts]
  while True:
    try:
      got = [g + t for g, t in zip(got, next(chunks))]
    except StopIteration as end:
      return got, end.value


def test_stream_starts_with_plain_steps_and_hands_over_to_the_speculative_program():
  _, want = engine_and_plain()
  cfg = tiny_config("llama", vocab_size=32, tie_embeddings=False, num_layers=2)
  eng = Engine(create_model(cfg, seed=0), cache_len=96)  # its own: nothing loaded yet
  auto = Auto(options=OPTIONS[:2], cost_model=costs(0.0), load_steps=3, load_seconds=0.0)
  assert auto.starter().plain_only and auto.starter().options == auto.options
  assert auto.starter().starter() is None
  got, res = stream_all(eng, auto, PROMPTS[2:], LIMITS[2])
  assert got == res.tokens == want[2:]
  # The starter ran plain steps until it had seen load_steps of them, then auto's own program was
  # loaded and took over from the same loop state, and speculated.
  assert res.handed_over == 3 < res.model_calls
  plain, draft = res.extra.runs.tolist()
  assert plain >= res.handed_over and draft > 0 and plain + draft == res.model_calls
  seconds, source = res.hand_over_load  # what loading auto's program took, and how it came
  assert seconds > 0 and source in ("disk", "compiled")
  # Loaded now: the next stream runs auto's program from the start.
  got, res = stream_all(eng, auto, PROMPTS[2:], LIMITS[2])
  assert got == want[2:] and res.handed_over is None and res.extra.runs[1] > 0
  assert res.hand_over_load is None


def test_a_starter_that_is_never_worth_replacing_decodes_plainly_to_the_end():
  _, want = engine_and_plain()
  eng, _ = engine_and_plain()
  auto = Auto(options=OPTIONS[:2], cost_model=costs(1.0), load_seconds=1e-6)  # nothing pays
  got, res = stream_all(eng, auto, PROMPTS, LIMITS)
  assert got == want and res.handed_over == res.model_calls and res.hand_over_load is None
  assert res.extra.runs.tolist() == [res.model_calls, 0]
  # Prompt lookup ran in the starter's shadow: each shadow step appends at least its own token.
  shadow = res.extra.shadow
  assert (shadow.calls > 0).all() and (shadow.tokens >= shadow.calls).all()
  assert not eng.loaded(auto)
  with pytest.raises(ValueError, match="load_seconds"):
    Auto(load_seconds=-1.0)


def test_shadow_lookup_golden_values():
  """Two rows, chains of 3, memory 0.5: row 0 follows its chain for two tokens and ends on the third
  (one shadow step of 3 tokens), then is finished; row 1 misses at once (1 token), takes up a new
  chain, follows it to its end and ends on the token after it (3 tokens)."""
  sh = ShadowLookup.start(2, 3)
  both, row1 = jnp.array([True, True]), jnp.array([False, True])
  steps = [([[7, 8, 9], [4, 0, 0]], [3, 1], [7, 5], both),
           ([[1, 1, 1], [6, 7, 0]], [3, 2], [8, 6], both),
           ([[1, 1, 1], [1, 1, 1]], [3, 3], [3, 7], both),
           ([[1, 1, 1], [1, 1, 1]], [3, 3], [2, 9], row1)]
  ats = [[1, -1], [2, 1], [-1, 2], [-1, -1]]
  for (chain, valid, token, active), at in zip(steps, ats):
    sh = sh.follow(jnp.array(chain), jnp.array(valid), jnp.array(token), active, 0.5)
    np.testing.assert_array_equal(sh.at, at)
  np.testing.assert_allclose(sh.tokens, [3.0, 1 * 0.5 ** 3 + 3])
  np.testing.assert_allclose(sh.calls, [1.0, 0.5 ** 3 + 1])


@pytest.mark.parametrize("calls,tau,left,load", [
    (15, 11.0, 1000, False),  # too few steps, however well the lookup would do
    # costs(0.1): a plain step 1 ms, the 11-token chain forward 2 ms. tau 4: the lookup would
    # save 1 - 2 / 4 = 0.5 ms a token; 201 tokens left save 0.1005 s, over load_seconds = 0.1.
    (16, 4.0, 201, True),
    (16, 4.0, 199, False),
    (16, 2.0, 10 ** 6, False),  # a chain forward per 2 tokens saves nothing here
    (200, 2.5, 501, True),  # saves 0.2 ms a token
    (200, 2.5, 499, False),
])
def test_load_now_golden_values(calls, tau, left, load):
  auto = Auto(options=OPTIONS[:3], cost_model=costs(0.1), load_seconds=0.1).starter()
  assert auto.shadow_nodes == 10
  shadow = SimpleNamespace(tokens=np.array([tau * 2.0, tau]), calls=np.array([2.0, 1.0]))
  state = SimpleNamespace(
      calls=np.int32(calls), extra=SimpleNamespace(shadow=shadow),
      limit=np.array([300, left + 7]), length=np.array([300 - 1000, 7]),
      done=np.array([True, False]),  # a finished row's tokens left do not count
      cache=SimpleNamespace(length=256))
  assert auto.load_now(state) is load
