"""The ReBalance harness around the control function: SEAL's labels, vector and steering, one
confidence statistic from extraction to decoding, calibration/evaluation disjointness (exact and
near-duplicate), the Qwen3 layer option, and steered generation on an 8-device mesh."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax.data.samples import sample_path
from effjax.decoding.engine import AutoRegressive, Engine, Steered
from effjax.decoding.pld import PromptLookup
from effjax.models import Steering, create_model, make_mesh, tiny_config
from effjax.rebalance import extract as ex
from effjax.rebalance import seal
from effjax.rebalance.confidence import TrackerConfig
from effjax.rebalance.control import PRESETS, ReBalanceConstants, preset
from effjax.rebalance.disjoint import ProblemSet, clashes, require_disjoint, shingles
from effjax.rebalance.steering import Delimiters, ReBalanceHook

V, LAYER, NEW = 96, 2, 32
TEXTS = ["\n\n" if i % 8 == 0 else ".\n\n" if i % 11 == 5 else f" w{i}" for i in range(V)]
PROMPTS = [[5, 6, 7, 8, 5, 6, 7], [11, 12, 13, 14], [40, 41, 42, 43, 44, 40]]
CONSTS = ReBalanceConstants(q25c=0.3, q75c=0.7, L1=-1.0, q25v=0.0005, q75v=0.01, L2=-2.0, H2=0.1,
                            layer=LAYER)
GSM8K_LINE = ("Janet's ducks lay 16 eggs per day. She eats three for breakfast every morning and "
              "bakes muffins for her friends every day with four. She sells the remainder at the "
              "farmers' market daily for $2 per fresh duck egg. How much in dollars does she make "
              "every day at the farmers' market?")


@pytest.fixture(scope="module")
def model():
  m = create_model(tiny_config("llama", vocab_size=V, tie_embeddings=False), seed=11)
  m.embed.set_value(m.embed.get_value() * 0.6)
  m.lm_head.set_value(m.lm_head.get_value() * 2.0)
  return m


# -- SEAL --

@pytest.mark.parametrize("text,kind", [
    ("Wait, that is not right.", seal.REFLECTION), ("  wait. Hmm", seal.REFLECTION),
    ("So 3 + 4 = 7. Let me check: 7 - 4 = 3.", seal.REFLECTION),
    ("That's correct, so x = 2.", seal.REFLECTION), ("This seems right.", seal.REFLECTION),
    ("Alternatively, we could count.", seal.TRANSITION),
    ("Let's try another approach: modular arithmetic.", seal.TRANSITION),
    ("Maybe think differently about it.", seal.EXECUTION),  # the authors' typo never matches
    ("Alternatively, let me verify.", seal.REFLECTION),  # reflection is tested first
    ("Multiply 3 by 4 to get 12.", seal.EXECUTION), ("I waited for the bus.", seal.EXECUTION),
])
def test_seal_thought_labels(text, kind):
  assert seal.thought_kind(text) == kind


def test_seal_vector_drops_each_problems_first_step(tmp_path):
  rng = np.random.default_rng(0)
  store = ex.CalibrationStore.create(tmp_path / "s", num_layers=3, dim=8)
  texts = [["Wait, first.", "Compute 2+2.", "Wait, check.", "Alternatively, add."],
           ["Add them.", "Hold on, is that right?", "So 4."]]
  for p, t in enumerate(texts):
    hidden = rng.normal(size=(3, len(t), 8))
    store.append(f"p{p}", [ex.Step(j, j + 1, x) for j, x in enumerate(t)],
                 np.array([0.3 if seal.thought_kind(x) else 0.9 for x in t]), hidden)
  labels, counts = seal.seal_labels(store.problems)
  np.testing.assert_array_equal(labels, [-1, 0, 1, 1, -1, 1, 0])
  assert counts == {"reflection": 2, "transition": 1, "execution": 2}
  profile = ex.build_profile(store, "m", preset=CONSTS.replace(q25c=0.4, q75c=0.6, layer=1),
                             seal_layer=2)
  x = np.asarray(store.layer(2), np.float64)
  want = x[labels == 1].mean(0) - x[labels == 0].mean(0)
  np.testing.assert_allclose(profile.seal.vector, want, rtol=1e-6)
  assert (profile.seal.layer, profile.seal.strength) == (2, -1.0)


def test_seal_steers_strength_times_v_at_delimiters_only(model):
  vector = np.asarray(jax.random.normal(jax.random.key(3), (model.cfg.dim,)), np.float32) * 3
  hook = seal.SealHook(seal.SealVector(vector, LAYER, -1.0), Delimiters.from_texts(TEXTS))
  eng = Engine(model, cache_len=64, eos_ids=[])
  res = eng.generate(PROMPTS, strategy=AutoRegressive(hook=hook), max_new_tokens=NEW)
  assert res.tokens != eng.generate(PROMPTS, max_new_tokens=NEW).tokens
  # Teacher-forced, unsteered vs steered at the generated delimiters: the residual stream entering
  # LAYER differs by exactly -v there and nowhere else (the layer's input, before its own update).
  for b, (prompt, gen) in enumerate(zip(PROMPTS, res.tokens)):
    seq = jnp.asarray([prompt + gen[:-1]])
    delim = np.array([False] * len(prompt) + ["\n\n" in TEXTS[t] for t in gen[:-1]])
    coef = jnp.asarray(np.where(delim, -1.0, 0.0)[None], jnp.float32)
    plain = model(seq, hidden_layers=(LAYER,)).layer_hidden[0][0]
    steered = model(seq, steering=Steering(jnp.asarray(vector), coef, LAYER),
                    hidden_layers=(LAYER,))
    np.testing.assert_allclose(steered.layer_hidden[0][0], plain + coef[0][:, None] * vector,
                               atol=1e-5)
    # ... and greedy decoding under that steering reproduces the engine's tokens.
    want = np.argmax(np.asarray(steered.logits[0, len(prompt) - 1:]), axis=-1).tolist()
    assert want == gen, b
    # The count includes a delimiter sampled last (steered when fed, after the limit here).
    assert int(res.hook_state.steered[b]) == sum("\n\n" in TEXTS[t] for t in gen)
  assert int(res.hook_state.steered.sum()) >= 3


def test_seal_in_a_tree_equals_seal_plain_decoding(model):
  vector = np.asarray(jax.random.normal(jax.random.key(3), (model.cfg.dim,)), np.float32) * 3
  make = lambda: seal.SealHook(seal.SealVector(vector, LAYER, -1.0), Delimiters.from_texts(TEXTS))
  eng = Engine(model, cache_len=96, eos_ids=[])
  want = eng.generate(PROMPTS, strategy=AutoRegressive(hook=make()), max_new_tokens=NEW)
  got = eng.generate(PROMPTS, strategy=Steered(PromptLookup(draft_len=5), make()),
                     max_new_tokens=NEW)
  assert got.tokens == want.tokens
  # Some steps accepted drafts (a row of back-to-back delimiters cannot: each is a barrier).
  assert got.extra.hist[:, 2:].sum() > 0
  np.testing.assert_array_equal(got.hook_state.steered, want.hook_state.steered)


# -- one confidence statistic --

def test_step_confidence_statistics():
  logp = np.log([0.9, 0.5, 0.2, 0.8])
  steps = [ex.Step(0, 2, "a"), ex.Step(2, 4, "b")]
  np.testing.assert_allclose(ex.step_confidences(logp, steps, "geometric"),
                             [np.sqrt(0.45), np.sqrt(0.16)])
  np.testing.assert_allclose(ex.step_confidences(logp, steps, "arithmetic"), [0.7, 0.5])
  np.testing.assert_allclose(ex.step_confidences(logp, steps), ex.step_confidences(
      logp, steps, "geometric"))  # the paper's statistic is the default
  with pytest.raises(ValueError, match="unknown confidence statistic"):
    ex.step_confidences(logp, steps, "median")
  assert TrackerConfig.create(CONSTS).mean == "geometric"


def test_profile_statistic_reaches_decoding_and_disagreement_is_an_error(tmp_path):
  vector = np.ones(4, np.float32)
  profile = ex.ReBalanceProfile(vector, CONSTS, "m", ProblemSet.of(["a b c"]),
                                statistic="arithmetic")
  profile.save(tmp_path / "p.safetensors")
  loaded = ex.ReBalanceProfile.load(tmp_path / "p.safetensors")
  assert loaded.statistic == "arithmetic" and loaded.seal is None
  assert loaded.tracker_config().mean == "arithmetic"
  assert loaded.tracker_config("arithmetic", window=3).window == 3
  with pytest.raises(ValueError, match="quartiles are of the arithmetic mean"):
    loaded.tracker_config("geometric")
  store = ex.CalibrationStore.create(tmp_path / "s", 1, 4, statistic="arithmetic")
  assert ex.CalibrationStore.open(tmp_path / "s").statistic == "arithmetic"
  with pytest.raises(ValueError, match="unknown confidence statistic"):
    ex.ReBalanceProfile(vector, CONSTS, "m", ProblemSet.of(["a"]), statistic="mode")
  del store


def test_qwen3_preset_layer_from_the_code_or_the_paper():
  assert preset("qwen3-14b").layer == 35 == PRESETS["qwen3-14b"].layer
  assert preset("qwen3-14b", "paper").layer == 34
  assert preset("qwen3-14b", "paper").replace(layer=35) == PRESETS["qwen3-14b"]
  assert preset("deepseek-r1-distill-qwen-1.5b", "paper").layer == 19  # Qwen2: the same
  with pytest.raises(ValueError, match="no ReBalance preset"):
    preset("llama")


# -- disjointness --

def test_near_duplicates_are_found_and_distinct_problems_pass():
  calib = ProblemSet.of([GSM8K_LINE, "A robe takes 2 bolts of blue fiber and half that much white "
                         "fiber. How many bolts in total does it take?"], ["janet", "robe"])
  edited = [
      GSM8K_LINE.replace("16", "18").replace("$2", "$3"),  # numbers changed
      GSM8K_LINE.replace("How much in dollars does she make", "What does she earn, in dollars,"),
      "  " + GSM8K_LINE.upper() + "  ",  # case and whitespace: an exact match
      "Tom has 3 apples and buys 4 more. How many apples does he have now?",
      "A robe takes 2 bolts of silk. How many dresses can be made from 10 bolts?",
  ]
  found = clashes(calib, ProblemSet.of(edited, [f"e{i}" for i in range(5)]))
  assert [(c.problem, c.other) for c in found] == [(0, 0), (1, 0), (2, 0)]
  assert found[2].overlap == 1.0 and 0.6 <= found[0].overlap < 1.0
  with pytest.raises(ValueError, match=r"3 of the 5 evaluation problems are in the calibration "
                                       r"set: e0 \(near-duplicate of janet"):
    require_disjoint(calib, ProblemSet.of(edited, [f"e{i}" for i in range(5)]),
                     reference_name="the calibration set", checked_name="evaluation problems")
  assert len(shingles("two words")) == 1 and len(shingles(GSM8K_LINE)) > 30


def test_gsm8k_sample_split_is_disjoint_and_packed_sets_round_trip():
  rows = [json.loads(line)["question"] for line in sample_path("gsm8k").read_text().splitlines()]
  calib, rest = ProblemSet.of(rows[:300]), ProblemSet.of(rows[300:])
  assert clashes(calib, rest) == []  # the documented calibration / evaluation split
  again = ProblemSet.unpack(calib.fingerprints, *calib.packed())
  assert all(np.array_equal(a, b) for a, b in zip(again.grams, calib.grams))


def test_evaluate_refuses_steering_without_its_profile_and_close_problems(tmp_path):
  from effjax.data.records import Problem
  from effjax.rebalance.evaluate import EvalSettings, evaluate

  hook = ReBalanceHook(np.ones(4, np.float32), TrackerConfig.create(CONSTS),
                       Delimiters.from_texts(TEXTS))
  problems = [Problem("p1", (GSM8K_LINE.replace("16", "20"),), "#### 1")]
  with pytest.raises(ValueError, match="steer with a calibrated profile"):
    evaluate(None, problems, {"rebalance": AutoRegressive(hook=hook)}, tmp_path, EvalSettings())
  profile = ex.ReBalanceProfile(np.ones(4, np.float32), CONSTS, "m", ProblemSet.of([GSM8K_LINE]))
  with pytest.raises(ValueError, match="p1 \\(near-duplicate"):
    evaluate(None, problems, {"baseline": AutoRegressive()}, tmp_path, EvalSettings(),
             profile=profile)


# -- sharded --

def test_steered_generation_on_a_mesh_equals_one_device(model):
  vector = np.asarray(jax.random.normal(jax.random.key(5), (model.cfg.dim,)), np.float32) * 4
  make = lambda: ReBalanceHook(vector, TrackerConfig.create(CONSTS), Delimiters.from_texts(TEXTS),
                               trace_len=NEW)
  prompts = PROMPTS + [[3, 4, 5]]
  want = Engine(model, cache_len=64, eos_ids=[]).generate(
      prompts, strategy=AutoRegressive(hook=make()), max_new_tokens=NEW)
  mesh = make_mesh(data=2, fsdp=2, tensor=2)
  got = Engine(model, cache_len=64, eos_ids=[], mesh=mesh).generate(
      prompts, strategy=AutoRegressive(hook=make()), max_new_tokens=NEW)
  assert got.tokens == want.tokens
  assert np.count_nonzero(want.hook_state.trace.applied) >= 4
  np.testing.assert_allclose(got.hook_state.trace.applied, want.hook_state.trace.applied,
                             atol=1e-4)
