"""The decoder family on tiny random configs: shapes, cache decode, masks, steering, sharding."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effjax.models import (PRESETS, KVCache, Steering, abstract_model, commit, create_model,
                           make_mesh, rollback, tiny_config)
from effjax.models.sharding import state_shardings

FAMILIES = ["llama", "qwen2", "qwen3", "gemma2", "gemma3"]


def _tokens(cfg, b, t, seed=0):
  return jax.random.randint(jax.random.key(seed), (b, t), 0, cfg.vocab_size)


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request):
  cfg = tiny_config(request.param)
  return cfg, create_model(cfg, seed=1)


def test_shapes_and_dtypes(family_model):
  cfg, model = family_model
  out = model(_tokens(cfg, 2, 12), hidden_layers=(0, 2, cfg.num_layers))
  chex.assert_shape(out.logits, (2, 12, cfg.vocab_size))
  chex.assert_type(out.logits, jnp.float32)
  chex.assert_shape(out.hidden, (2, 12, cfg.dim))
  assert len(out.layer_hidden) == 3
  chex.assert_tree_all_finite(out.logits)
  assert model(_tokens(cfg, 2, 12), compute_logits=False).logits is None


def test_cache_decode_equals_full_forward(family_model):
  """Prefill 5 tokens, then one token at a time: same logits as one full forward (windows apply)."""
  cfg, model = family_model
  toks = _tokens(cfg, 2, 20)
  full = model(toks).logits
  cache = KVCache.init(cfg, 2, 32)
  out = model(toks[:, :5], cache=cache)
  steps = [out.logits]
  cache = out.cache
  for i in range(5, 20):
    out = model(toks[:, i:i + 1], cache=cache)
    cache = out.cache
    steps.append(out.logits)
  np.testing.assert_allclose(jnp.concatenate(steps, 1), full, atol=1e-4, rtol=1e-4)
  np.testing.assert_array_equal(cache.index, [20, 20])


def test_embeddings_input_equals_tokens(family_model):
  cfg, model = family_model
  toks = _tokens(cfg, 1, 7)
  a = model(toks).logits
  b = model(embeddings=model.embed_tokens(toks)).logits
  np.testing.assert_allclose(a, b, atol=1e-6)


def test_remat_keeps_values_and_gradients(family_model):
  """remat=True recomputes layers in the backward pass: same loss and same gradients."""
  cfg, model = family_model
  toks = _tokens(cfg, 2, 9)
  graphdef, params = nnx.split(model)

  def loss(p, remat):
    logits = nnx.merge(graphdef, p)(toks, remat=remat).logits
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

  (a, ga), (b, gb) = (jax.value_and_grad(loss)(params, r) for r in (False, True))
  np.testing.assert_allclose(a, b, rtol=1e-6)
  chex.assert_trees_all_close(ga, gb, atol=1e-6, rtol=1e-5)
  # Rematerialised layers show up as optimization barriers in the lowered backward pass.
  hlo = lambda r: jax.jit(jax.grad(loss), static_argnums=1).lower(params, r).as_text()
  assert "optimization_barrier" in hlo(True) and "optimization_barrier" not in hlo(False)


def test_ragged_batch_right_padding():
  """Rows padded on the right give the same logits as each row alone; index counts valid tokens."""
  cfg = tiny_config("gemma3")
  model = create_model(cfg)
  toks = _tokens(cfg, 2, 9)
  mask = jnp.array([[True] * 9, [True] * 5 + [False] * 4])
  out = model(toks, input_mask=mask, cache=KVCache.init(cfg, 2, 16))
  np.testing.assert_array_equal(out.cache.index, [9, 5])
  alone = model(toks[1:, :5], cache=KVCache.init(cfg, 1, 16))
  np.testing.assert_allclose(out.logits[1, :5], alone.logits[0], atol=1e-5)
  # The next token of the short row lands at its own index and sees only its 5 real tokens.
  nxt = jnp.array([[3], [4]])
  both = model(nxt, cache=out.cache)
  single = model(nxt[1:], cache=alone.cache)
  np.testing.assert_allclose(both.logits[1], single.logits[0], atol=1e-5)


def test_tree_mask_matches_separate_branches():
  """Two sibling branches verified in one forward under a tree mask equal two separate forwards."""
  cfg = tiny_config("qwen3")
  model = create_model(cfg)
  prefix = _tokens(cfg, 1, 6)
  pre = model(prefix, cache=KVCache.init(cfg, 1, 32))
  root, a, b = 5, 7, 9
  # Block: [root, a, b], a and b are both children of root at the same position.
  block = jnp.array([[root, a, b]])
  mask = jnp.array([[[1, 0, 0], [1, 1, 0], [1, 0, 1]]], bool)
  p0 = pre.cache.index[:, None]
  pos = p0 + jnp.array([[0, 1, 1]])
  tree = model(block, positions=pos, attn_mask=mask, cache=pre.cache, advance=False)
  for col, tok in ((1, a), (2, b)):
    chain = model(jnp.array([[root, tok]]), cache=pre.cache)
    # float32 sums in another order (a 3- vs a 2-token forward): logits near 35 differ in the
    # 7th digit on some CPUs, so the bound is relative too; a wrong mask moves them by O(1).
    np.testing.assert_allclose(tree.logits[:, col], chain.logits[:, 1], atol=1e-5, rtol=1e-5)
  assert tree.cache is None  # advance=False: the cache is only read, the block comes back
  chex.assert_shape(tree.block.k, (1, 3, cfg.num_kv_heads, cfg.head_dim))
  np.testing.assert_array_equal(tree.block.pos, pos)


def test_commit_keeps_exactly_the_accepted_entries():
  cfg = tiny_config("llama")
  model = create_model(cfg)
  prefix = _tokens(cfg, 1, 4)
  pre = model(prefix, cache=KVCache.init(cfg, 1, 16))
  block = jnp.array([[11, 12, 13, 14]])
  mask = jnp.array([[[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 1, 1]]], bool)
  pos = pre.cache.index[:, None] + jnp.array([[0, 1, 1, 2]])
  tree = model(block, positions=pos, attn_mask=mask, cache=pre.cache, advance=False)
  # Accept root (offset 0), node at offset 2 and its child at offset 3.
  kept = commit(pre.cache, tree.block.take(jnp.array([[0, 2, 3]])), jnp.array([3]))
  chain = model(jnp.array([[11, 13, 14]]), cache=pre.cache)
  np.testing.assert_array_equal(kept.index, [7])
  np.testing.assert_array_equal(kept.pos[0, :8], [0, 1, 2, 3, 4, 5, 6, -1])
  for layer in range(cfg.num_layers):  # tree and chain forwards differ only in float32 sum order
    np.testing.assert_allclose(kept.k[layer][:, :, :7], chain.cache.k[layer][:, :, :7], atol=1e-5)
    np.testing.assert_allclose(kept.v[layer][..., :7], chain.cache.v[layer][..., :7], atol=1e-5)
  nxt = jnp.array([[2]])
  np.testing.assert_allclose(model(nxt, cache=kept).logits, model(nxt, cache=chain.cache).logits,
                             atol=1e-5, rtol=1e-5)


def test_rollback_forgets_slots():
  cfg = tiny_config("llama")
  model = create_model(cfg)
  toks = _tokens(cfg, 1, 8)
  long = model(toks, cache=KVCache.init(cfg, 1, 16)).cache
  short = model(toks[:, :5], cache=KVCache.init(cfg, 1, 16)).cache
  back = rollback(long, jnp.array([5]))
  nxt = jnp.array([[1]])
  np.testing.assert_allclose(model(nxt, cache=back).logits, model(nxt, cache=short).logits,
                             atol=1e-5)


def test_steering_changes_only_the_steered_positions():
  cfg = tiny_config("qwen2")
  model = create_model(cfg)
  toks = _tokens(cfg, 1, 10)
  layer = 2
  vec = jax.random.normal(jax.random.key(3), (cfg.dim,))
  coef = jnp.zeros((1, 10)).at[0, 6].set(1.5)
  hl = tuple(range(cfg.num_layers + 1))
  base = model(toks, hidden_layers=hl)
  steered = model(toks, hidden_layers=hl, steering=Steering(vec, coef, layer))
  for i in range(layer):  # before the steered layer: nothing changes
    np.testing.assert_array_equal(steered.layer_hidden[i], base.layer_hidden[i])
  delta = steered.layer_hidden[layer] - base.layer_hidden[layer]
  np.testing.assert_allclose(delta[0, 6], 1.5 * vec, atol=1e-5)
  np.testing.assert_array_equal(np.delete(np.asarray(delta[0]), 6, axis=0), 0)
  # Causality: positions before 6 never see the change, later ones do.
  np.testing.assert_array_equal(steered.logits[:, :6], base.logits[:, :6])
  assert float(jnp.abs(steered.logits[:, 7:] - base.logits[:, 7:]).max()) > 1e-4
  zero = model(toks, steering=Steering(jnp.zeros(cfg.dim), coef, layer))
  np.testing.assert_array_equal(zero.logits, base.logits)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_full_size_presets_eval_shape(name):
  cfg = PRESETS[name]
  _, state = nnx.split(abstract_model(cfg))
  n = sum(int(np.prod(v.get_value().shape)) for _, v in nnx.to_flat_state(state))
  assert n == cfg.num_params() + sum(  # num_params counts matrices only: add norms and biases
      int(np.prod(v.get_value().shape)) for p, v in nnx.to_flat_state(state)
      if p[-1] in ("scale", "bias"))
  out = jax.eval_shape(lambda t: create_model(cfg)(t, compute_logits=False).hidden,
                       jax.ShapeDtypeStruct((1, 4), jnp.int32))
  chex.assert_shape(out, (1, 4, cfg.dim))


def test_sharded_forward_equals_unsharded():
  cfg = tiny_config("gemma2")
  model = create_model(cfg)
  toks = _tokens(cfg, 4, 10)
  want = model(toks).logits
  mesh = make_mesh(data=2, fsdp=2, tensor=2)
  graphdef, state = nnx.split(model)
  state = jax.device_put(state, state_shardings(state, mesh))

  @jax.jit
  def fwd(state, toks):
    return nnx.merge(graphdef, state)(toks, mesh=mesh).logits

  got = fwd(state, toks)
  np.testing.assert_allclose(got, want, atol=1e-5)
  qkv = state["layers"][0]["attn"]["qkv"]["kernel"].get_value()  # [D, Kh, g + 2, Dh]
  assert qkv.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None, None)


@pytest.mark.parametrize("dtype,want", [("float32", jax.lax.Precision.HIGHEST),
                                        ("bfloat16", jax.lax.Precision.DEFAULT)])
def test_matmul_precision_is_the_models_own(dtype, want):
  """Every product of a float32 model asks for float32 precision itself (TPU / GPU defaults would
  use bfloat16 passes or TF32), whatever jax_default_matmul_precision says; bfloat16 models take the
  backend's native products."""
  cfg = tiny_config("gemma3", dtype=dtype)
  model = create_model(cfg)
  graphdef, state = nnx.split(model)
  jaxpr = jax.make_jaxpr(lambda s, t: nnx.merge(graphdef, s)(t).logits)(state, jnp.ones((1, 4), jnp.int32))
  dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
  assert len(dots) >= cfg.num_layers * 6 + 1  # projections, scores, values, MLP; the logits
  assert all(e.params["precision"] == (want, want) for e in dots), {e.params["precision"] for e in dots}
