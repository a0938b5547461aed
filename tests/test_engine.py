"""The decoding engine against a naive loop of full forwards, and its input checks."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax.decoding.compiled import value_key
from effjax.decoding.engine import AutoRegressive, Engine, StepHook, cache_len_for
from effjax.decoding.sampling import Sampler
from effjax.models import Steering, create_model, make_mesh, tiny_config

PROMPTS = [[1, 2, 3, 4, 9, 10, 11, 40, 41], [7, 8, 9], [100, 3, 55, 12, 12]]


def _model(family, softness=0.2, **kw):
  cfg = tiny_config(family, **kw)
  model = create_model(cfg, seed=3)
  # Soften the random head so sampling tests see real distributions, not one-hot ones.
  model.embed.set_value(model.embed.get_value() * softness)
  return cfg, model


def naive_greedy(model, prompt, n, eos=()):
  """Greedy decoding by full forwards without a cache. The input is right-padded to one width (the
  model is causal: padding after a position does not change its logits), so one compile serves."""
  width = len(prompt) + n
  forward = jax.jit(lambda x, at: model(x).logits[0, at])
  toks, out = list(prompt), []
  for _ in range(n):
    t = int(jnp.argmax(forward(jnp.array([toks + [0] * (width - len(toks))]), len(toks) - 1)))
    out.append(t)
    toks.append(t)
    if t in eos:
      break
  return out


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_greedy_equals_naive_loop_on_ragged_batch(family):
  _, model = _model(family)
  eng = Engine(model, cache_len=48)
  res = eng.generate(PROMPTS, max_new_tokens=14)
  for p, got in zip(PROMPTS, res.tokens):
    assert got == naive_greedy(model, p, 14)
  assert res.model_calls == 13


def test_eos_stops_each_row_and_bucketing_does_not_change_outputs():
  _, model = _model("qwen3")
  free = Engine(model, cache_len=64).generate(PROMPTS, max_new_tokens=12).tokens
  eos = free[0][4]  # a token row 0 produces at step 5
  eng = Engine(model, cache_len=64, eos_ids=[eos])
  res = eng.generate(PROMPTS, max_new_tokens=12)
  for p, got in zip(PROMPTS, res.tokens):
    assert got == naive_greedy(model, p, 12, eos=(eos,))
  assert res.tokens[0][-1] == eos and len(res.tokens[0]) == 5
  other = Engine(model, cache_len=64, eos_ids=[eos], buckets=[9, 32, 64])
  assert other.generate(PROMPTS, max_new_tokens=12).tokens == res.tokens


def test_stop_sequences_and_per_row_limits():
  _, model = _model("llama")
  eng = Engine(model, cache_len=64)
  free = eng.generate(PROMPTS, max_new_tokens=10).tokens
  stop = free[1][3:5]
  end = next(i + 2 for i in range(9) if free[1][i:i + 2] == stop)  # first completion
  res = eng.generate(PROMPTS, max_new_tokens=[10, 10, 3], stop_sequences=[stop])
  assert res.tokens[1] == free[1][:end]
  assert len(res.tokens[2]) == 3 and res.tokens[2] == free[2][:3]


def test_seeded_sampling_is_reproducible():
  _, model = _model("gemma3", softness=0.05)
  eng = Engine(model, cache_len=48)
  strat = AutoRegressive(Sampler(temperature=1.0, top_p=0.9))
  a = eng.generate(PROMPTS, strategy=strat, max_new_tokens=16, seed=11).tokens
  b = eng.generate(PROMPTS, strategy=strat, max_new_tokens=16, seed=11).tokens
  c = eng.generate(PROMPTS, strategy=strat, max_new_tokens=16, seed=12).tokens
  assert a == b and a != c


def test_stream_yields_the_same_tokens():
  _, model = _model("llama")
  eng = Engine(model, cache_len=48)
  whole = eng.generate(PROMPTS[:1], max_new_tokens=11).tokens[0]
  pieces = [c[0] for c in eng.stream(PROMPTS[:1], max_new_tokens=11, chunk=3)]
  assert sum(pieces, []) == whole and len(pieces) > 2


@dataclasses.dataclass(frozen=True, eq=False)
class _ConstantSteer(StepHook):
  """Steers every forward by the same vector; counts forwards it observed."""

  vector: jax.Array
  layer: int
  coef: float

  @property
  def hidden_layers(self):
    return (self.layer,)

  def init(self, batch):
    return jnp.zeros((batch,), jnp.int32)

  def steering(self, state):
    return Steering(self.vector, jnp.full((state.shape[0], 1), self.coef), self.layer)

  def observe(self, state, logits, layer_hidden, fed, sampled, active):
    return state + active


def test_step_hook_steers_and_zero_vector_changes_nothing():
  cfg, model = _model("qwen2")
  eng = Engine(model, cache_len=48)
  plain = eng.generate(PROMPTS, max_new_tokens=10)
  zero = eng.generate(PROMPTS, max_new_tokens=10,
                      strategy=AutoRegressive(hook=_ConstantSteer(jnp.zeros(cfg.dim), 1, 1.0)))
  assert zero.tokens == plain.tokens
  np.testing.assert_array_equal(zero.hook_state, [10, 10, 10])  # prefill + 9 decode forwards
  big = jax.random.normal(jax.random.key(0), (cfg.dim,)) * 50
  steered = eng.generate(PROMPTS, max_new_tokens=10,
                         strategy=AutoRegressive(hook=_ConstantSteer(big, 1, 1.0)))
  assert steered.tokens != plain.tokens


def test_sharded_generation_equals_unsharded():
  _, model = _model("gemma2")
  prompts = PROMPTS + [[5, 6, 7, 8]]
  want = Engine(model, cache_len=48).generate(prompts, max_new_tokens=8).tokens
  mesh = make_mesh(data=2, fsdp=2, tensor=2)
  got = Engine(model, cache_len=48, mesh=mesh).generate(prompts, max_new_tokens=8).tokens
  assert got == want


@pytest.mark.parametrize("prompts,kw,msg", [
    ([[1] * 60], dict(max_new_tokens=8), "cache_len=64"),
    ([[]], dict(max_new_tokens=8), "empty"),
    ([[1, 2, 9999]], dict(max_new_tokens=8), "outside the vocabulary"),
    ([[1, 2]], dict(max_new_tokens=0), "max_new_tokens"),
    ([], dict(max_new_tokens=4), "no prompts"),
    ([[1, 2]], dict(max_new_tokens=4, stop_sequences=[[-1, -1]]), "token ids >= 0"),
])
def test_bad_inputs_fail_before_compiling(prompts, kw, msg):
  _, model = _model("llama")
  eng = Engine(model, cache_len=64)
  with pytest.raises(ValueError, match=msg):
    eng.generate(prompts, **kw)
  assert not eng._compiled


def test_prompts_in_one_bucket_share_one_compilation():
  _, model = _model("llama")
  eng = Engine(model, cache_len=64, buckets=[16, 64])
  eng.generate([[1, 2, 3]], max_new_tokens=4)
  eng.generate([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]], max_new_tokens=4)
  (init, prefill, decode), = eng._compiled.values()  # generate() reuses its default strategy
  assert init.cache_size() == 1 and prefill.cache_size() == 1 and decode.cache_size() == 1
  eng.generate([[1] * 20], max_new_tokens=4)  # next bucket: one more
  assert prefill.cache_size() == 2


def test_strategies_are_cached_by_value_with_a_bound():
  cfg, model = _model("llama")
  eng = Engine(model, cache_len=32, buckets=[16, 32], max_strategies=2)
  vector = np.linspace(-1, 1, cfg.dim, dtype=np.float32)
  steer = lambda v, coef=1.0: AutoRegressive(Sampler(temperature=0.7), hook=_ConstantSteer(v, 1, coef))
  first = eng.generate([[1, 2, 3]], strategy=steer(vector), max_new_tokens=4, seed=1)
  again = eng.generate([[1, 2, 3]], strategy=steer(vector.copy()), max_new_tokens=4, seed=1)
  assert again.tokens == first.tokens and len(eng._compiled) == 1  # an equal strategy: no compile
  programs, = eng._compiled.values()  # init, prefill, decode
  assert [p.cache_size() for p in programs] == [1, 1, 1]
  eng.generate([[1, 2, 3]], strategy=steer(vector * 2), max_new_tokens=4)  # new content
  assert len(eng._compiled) == 2
  eng.generate([[1, 2, 3]], strategy=steer(vector, coef=2.0), max_new_tokens=4)
  assert len(eng._compiled) == 2 and programs not in eng._compiled.values()  # bound: LRU out
  assert value_key(steer(vector)) == value_key(steer(jnp.asarray(vector)))
  assert value_key(steer(vector)) != value_key(steer(vector.astype(np.float16)))
  assert value_key(steer(vector, coef=1)) != value_key(steer(vector, coef=1.0))  # traced apart


def test_cache_len_for_sizes_the_cache_to_the_job():
  assert cache_len_for([10, 100], 28, 4096) == 256  # 100 + 28 + 1 = 129 slots -> next 128
  assert cache_len_for([99], 28, 4096) == 128
  assert cache_len_for([4000], 200, 4096) == 4096  # capped; the engine then refuses the prompt


def test_fit_cache_sizes_each_call_to_its_prompt_bucket():
  _, model = _model("llama")
  want = Engine(model, cache_len=512).generate(PROMPTS, max_new_tokens=12).tokens
  eng = Engine(model, cache_len=512, fit_cache=True)
  assert eng.generate(PROMPTS, max_new_tokens=12).tokens == want
  state = eng.start(PROMPTS, max_new_tokens=12)  # bucket 16 + 12 + 1 slots -> 128
  assert state.cache.length == 128
  state = eng.start([[5] * 199], max_new_tokens=100)  # bucket 256 + 101 -> 384
  assert state.cache.length == 384
