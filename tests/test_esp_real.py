"""Speculative methods on the embedded SmolLM2-135M-Instruct in float32: greedy output equals plain
greedy decoding on SpecBench prompts (a difference is allowed only where plain decoding's top-2
logits are within 1e-4, which is checked), and drafts are accepted (tau > 1)."""

import functools

import jax.numpy as jnp
import numpy as np
import pytest

from effjax.checkpoints.registry import MODELS, load_model
from effjax.data import load_problems
from effjax.decoding.engine import Engine
from effjax.decoding.methods import make_strategy, parse_label
from effjax.evals import specbench

NEW_TOKENS = 48
TIE = 1e-4

pytestmark = pytest.mark.slow


@functools.cache
def prepared(name):
  if not MODELS[name].installed():
    pytest.skip(f"{name} is not installed")
  loaded = load_model(name)
  fmt = specbench.PromptFormat.for_tokenizer(loaded.tokenizer)
  problems = load_problems("sample:spec_bench")
  chosen = [next(p for p in problems if p.metadata.get("category") == c)
            for c in ("math_reasoning", "writing")]
  prompts = [fmt.encode([{"role": "user", "content": p.prompt}]) for p in chosen]
  eng = Engine(loaded.model, cache_len=512)
  return loaded.model, eng, prompts, eng.generate(prompts, max_new_tokens=NEW_TOKENS).tokens


def _differs_only_at_a_tie(model, prompt, want, got):
  """True when got == want, or they first differ where plain decoding's top-2 logits tie."""
  i = next((j for j, (a, b) in enumerate(zip(want, got)) if a != b), None)
  if i is None:
    return len(want) == len(got)
  logits = np.asarray(model(jnp.array([prompt + want[:i]])).logits[0, -1])
  top2 = np.argsort(-logits)[:2]
  return logits[top2[0]] - logits[top2[1]] < TIE and got[i] in top2


# Each strategy costs a compile of the real model (~30 s on 2 cores): the k = 2 dynamic ESP tree,
# the hybrid (ESP, suffix, recycling and lookup candidates in one tree), Token Recycling's
# reference tree and the suffix drafter on SmolLM2. Every method on every SpecBench dev question
# of both embedded models: benchmarks/specbench.py.
CASES = [("smollm2-135m-instruct", m) for m in ("esp-dyn-bc60", "hybrid-bc30", "tr", "suffix")]


@pytest.mark.parametrize("model_name,method", CASES, ids=[f"{a}-{b}" for a, b in CASES])
def test_greedy_equals_plain_greedy_on_embedded_models(model_name, method):
  model, eng, prompts, want = prepared(model_name)
  res = eng.generate(prompts, strategy=make_strategy(*parse_label(method)),
                     max_new_tokens=NEW_TOKENS)
  for p, w, g in zip(prompts, want, res.tokens):
    assert _differs_only_at_a_tie(model, p, w, g)
  # Drafts are accepted on a real model (the suffix drafter only where the text repeats itself).
  assert res.tokens_per_call > (1.0 if method == "suffix" else 1.05)
