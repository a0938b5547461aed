"""`effjax plan`: recipes, slices, and the runtime's programs compiled ahead of time for TPU
topologies (libtpu, no TPU) with memory figures checked against hand computations."""

import dataclasses
import math
import subprocess
import sys

import jax
import pytest

from effjax.models.config import tiny_config
from effjax.plan import planner
from effjax.plan.chips import parse_slice
from effjax.plan.programs import GRADIENTS, KV_CACHE, OPTIMIZER, PARAMS
from effjax.plan.recipes import RECIPE_DIR, DecodeRecipe, Recipe, RLHFRecipe, load_recipe
from effjax.rlhf.config import AgentConfig, ENNConfig, PolicyConfig

BATCH, PROMPT, NEW = 8, 32, 64
TINY_DECODE = Recipe(kind="decode", model="tiny:llama", slice="v5e:2x2",
                     decode=DecodeRecipe(methods=("ar",), batches=(BATCH,), prompt_len=PROMPT,
                                         max_new_tokens=NEW))
TINY_RLHF = Recipe(
    kind="rlhf", model="tiny:llama", slice="v5e:2x2",
    rlhf=RLHFRecipe(prompt_len=8, response_len=8,
                    agent=AgentConfig(prompts_per_batch=8, responses_per_prompt=4),
                    enn=ENNConfig(num_particles=8, point_hidden=(16, 16), prior_hidden=(8, 8),
                                  diff_hidden=(16, 16), replay=8, steps_per_batch=1),
                    policy=PolicyConfig(micro_batch=8)))


def tpu_target(name: str) -> planner.Target:
  try:
    return planner.target_for(name)
  except planner.PlanError as e:
    pytest.skip(f"libtpu cannot load on this host, so no TPU topology: {e}")


def param_count(cfg) -> int:
  """Every parameter of a llama-family config, counted by hand (norms included)."""
  attn = cfg.dim * cfg.head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
  per_layer = attn + 3 * cfg.dim * cfg.mlp_dim + 2 * cfg.dim
  embed = cfg.vocab_size * cfg.dim * (1 if cfg.tie_embeddings else 2)
  return cfg.num_layers * per_layer + embed + cfg.dim


def test_slices_parse():
  assert parse_slice("v5litepod-64").topology_name == "v5e:8x8"
  assert parse_slice("v5e:8x8").accelerator_type == "v5litepod-64"
  s = parse_slice("v5p-32")  # 32 TensorCores = 16 chips
  assert (s.topology_name, s.chips) == ("v5p:2x2x4", 16)
  assert parse_slice("v6e-16").topology_name == "v6e:4x4"
  assert parse_slice("v4:2x2x4").accelerator_type == "v4-32"
  for bad in ("v9:2x2", "v5e:2xq", "v5litepod-12", "tpu"):
    with pytest.raises(ValueError):
      parse_slice(bad)


def test_recipes_load_and_fit_their_slices():
  names = sorted(p.stem for p in RECIPE_DIR.glob("*.toml"))
  assert names, "no recipes in configs/recipes"
  for name in names:
    _, recipe = load_recipe(name)
    chips = parse_slice(recipe.slice).chips
    sizes = dict(part.split("=") for part in recipe.mesh.split(","))
    fixed = math.prod(int(v) for v in sizes.values() if v != "-1")
    assert chips % fixed == 0, f"{name}: mesh {recipe.mesh} does not divide {chips} chips"
    assert recipe.launch, f"{name}: no launch commands"


def test_recipe_errors_name_the_key(tmp_path):
  bad = tmp_path / "bad.toml"
  bad.write_text('kind = "decode"\nmodel = "llama3.1-8b"\nslice = "v5e:2x2"\n[decode]\nbatch = 4\n')
  with pytest.raises(ValueError, match="decode: unknown key.*batch"):
    load_recipe(bad)
  bad.write_text('kind = "decode"\nmodel = "gpt-5"\nslice = "v5e:2x2"\n')
  with pytest.raises(ValueError, match="not a preset"):
    load_recipe(bad)


def test_cli_registers_without_jax():
  code = ("import sys, argparse; import effjax.plan.cli as c; c.register(argparse.ArgumentParser()"
          ".add_subparsers()); print('jax' in sys.modules)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "False"


def param_tile_padding(c) -> int:
  """Bytes that padding the minor two dimensions of every parameter shard to (8, 128) tiles adds,
  plus 64 KiB for the other inputs' tiles."""
  extra = 0
  for x in jax.tree.leaves(c.program.args[0].value):
    *major, rows, cols = (1, 1, *x.sharding.shard_shape(x.shape))
    tiled = math.ceil(rows / 8) * 8 * math.ceil(cols / 128) * 128
    extra += math.prod(major) * (tiled - rows * cols) * x.dtype.itemsize
  return extra + 64 * 1024


@pytest.fixture(scope="module")
def v5e_decode():
  target = tpu_target("v5e:2x2")
  return planner.plan_recipe(TINY_DECODE, target, "data=1,fsdp=-1,tensor=1")[0]


@pytest.fixture(scope="module")
def cpu_decode():
  """The same command on this host's CPU mesh (8 devices in the tests): no libtpu needed."""
  return planner.plan_recipe(TINY_DECODE, planner.target_for("cpu"), "data=1,fsdp=-1,tensor=1")[0]


@pytest.mark.parametrize("where", ["v5e_decode", "cpu_decode"])
def test_decode_memory_matches_hand_computation(where, request):
  r = request.getfixturevalue(where)
  cfg = tiny_config("llama", dtype="bfloat16")
  n = r.target.num_chips
  assert (n, r.target.chip.name) == ((4, "v5e") if where == "v5e_decode" else (8, "cpu"))
  params = param_count(cfg) * 2 // n  # bf16; every parameter has an FSDP-sharded axis
  cache_len = r.plan.info["ar"]["cache_len"]
  assert cache_len == 128  # the runtime's sizing: 32 + 64 + 1 rounded up to 128
  kv = 2 * cfg.num_layers * BATCH * cache_len * cfg.num_kv_heads * cfg.head_dim * 2 // n
  for c in r.compiled:
    assert c.inputs[PARAMS] == params, c.program.name
    assert c.inputs[KV_CACHE] == kv, c.program.name
    # XLA's own count of the inputs agrees, up to padding: it pads small arrays to whole (8, 128)
    # tiles, which for this tiny model's sharded parameters (a (16, 2, 4, 16) qkv kernel per
    # device) can be 16x their bytes
    assert params + kv <= c.arguments <= sum(c.inputs.values()) + param_tile_padding(c), \
        c.program.name
    assert c.peak < r.target.hbm
  decode = next(c for c in r.compiled if c.program.name == "ar decode")
  # one decode step per device: its rows x (2 FLOPs per matmul weight + attention over the cache)
  rows = BATCH // n
  matmul = param_count(cfg) - cfg.dim * (2 * cfg.num_layers + 1)
  attention = cfg.num_layers * 4 * cfg.num_heads * cfg.head_dim * cache_len
  expect = rows * (2 * matmul + attention)
  assert 0.5 * expect < decode.flops < 2 * expect
  # the products' own count (flops.py) is the same hand count, the step's token attending to the
  # cache and to itself (the block's keys are a second part of its softmax); the phase takes the
  # larger of it and XLA's count
  assert decode.product_flops == rows * (2 * matmul + attention * (cache_len + 1) / cache_len)
  phase = r.phase("ar decode step")
  assert phase.flops == max(decode.flops, decode.product_flops)
  assert phase.count == NEW and phase.hbm == decode.min_bytes


def test_plan_that_does_not_fit_names_what_to_change(v5e_decode):
  small = dataclasses.replace(v5e_decode.target.chip, hbm_bytes=1e5)
  r = dataclasses.replace(v5e_decode, target=dataclasses.replace(v5e_decode.target, chip=small))
  with pytest.raises(planner.PlanError, match="does not fit.*change: "):
    planner.check_fit(TINY_DECODE, r)
  assert planner.check_fit(TINY_DECODE, v5e_decode) is None  # the real chip: fits, >= 10% free


def test_multi_host_topology_uses_the_runtime_sharding_rules():
  from flax import nnx

  from effjax.models.sharding import parse_mesh, state_shardings
  from effjax.models.transformer import abstract_model

  target = tpu_target("v5e:4x4")
  assert target.num_chips == 16 and target.num_processes == 4
  r = planner.plan_recipe(TINY_DECODE, target, "data=2,fsdp=-1,tensor=2")[0]
  mesh = parse_mesh("data=2,fsdp=-1,tensor=2", devices=target.devices)
  _, params = nnx.split(abstract_model(tiny_config("llama", dtype="bfloat16")))
  expected = [s.spec for s in __import__("jax").tree.leaves(state_shardings(params, mesh))]
  for c in r.compiled:
    got = [s.spec for s in c.in_shardings[:len(expected)]]
    assert got == expected, c.program.name  # compiled with the runtime's rules, no resharding


def test_rlhf_state_float32_optimizer_and_held_copies():
  target = tpu_target("v5e:2x2")
  r = planner.plan_recipe(TINY_RLHF, target, "data=1,fsdp=-1,tensor=1",
                          only={"rollout", "policy apply"})[0]
  n = param_count(tiny_config("llama"))
  by_name = {c.program.name: c for c in r.compiled}
  rollout, apply = by_name["rollout"], by_name["policy apply"]
  assert rollout.inputs[PARAMS] == n * 2 // 4  # the bf16 policy
  assert rollout.kv_inside > 0
  # policy + anchor in bf16; Adam's two moments in float32 (+ its int32 step count); bf16 gradients
  assert apply.inputs[PARAMS] == 2 * (n * 2 // 4)
  assert apply.inputs[OPTIMIZER] == 2 * (n * 4 // 4) + 4
  assert apply.inputs[GRADIENTS] == n * 2 // 4
  # held meanwhile: theta_0 and the reward model with its optimizer state, phi_0 and the priors
  assert apply.held > (n * 2 // 4) * 3
  assert [p.name for p in r.phases] == ["policy apply + anchor EMA"]


def test_costing_program_reported_but_not_the_peak():
  """The one-micro-batch policy step is compiled for its FLOPs (XLA counts a scan body once): it
  never runs in the recipe, so however much memory it would need, the scanned step sets the peak."""
  target = tpu_target("v5e:2x2")
  r = planner.plan_recipe(TINY_RLHF, target, "data=1,fsdp=-1,tensor=1",
                          only={"policy gradients", "policy gradients, one micro-batch"})[0]
  scanned, one = r.compiled
  assert (scanned.program.costs_only, one.program.costs_only) == (False, True)
  huge = dataclasses.replace(one, temp=10 * target.hbm)
  r = dataclasses.replace(r, compiled=[scanned, huge])
  assert r.peak is scanned and planner.check_fit(TINY_RLHF, r) is None
  # Its FLOPs cost the step: the scanned update counts as (rows / micro_batch) one-micro-batch runs.
  phase = r.phase("policy gradients (scores both groups)")
  assert phase.flops == pytest.approx(one.flops * 32 / 8)


def test_layer_extrapolation_matches_the_full_compile(cpu_decode):
  """Compiles with 1 and 2 layers, taken linearly to the model's 4, agree with the 4-layer compile:
  exactly for what the plan shards itself, closely for XLA's FLOPs and bytes."""
  r = planner.plan_recipe(TINY_DECODE, planner.target_for("cpu"), "data=1,fsdp=-1,tensor=1",
                          layers=(1, 2))[0]
  full = {c.program.name: c for c in cpu_decode.compiled}
  assert [c.program.name for c in r.compiled] == list(full)
  for c in r.compiled:
    f = full[c.program.name]
    assert c.extrapolated_from == (1, 2)
    assert (c.inputs[PARAMS], c.inputs[KV_CACHE]) == (f.inputs[PARAMS], f.inputs[KV_CACHE])
    assert c.flops == pytest.approx(f.flops, rel=0.05), c.program.name
    assert c.bytes_accessed == pytest.approx(f.bytes_accessed, rel=0.25), c.program.name


def test_speculative_decode_programs_take_the_state_their_prefill_makes():
  """ESP and the hybrid tree make their own decode state in the prefill (candidates, estimates);
  the decode-loop program is compiled on that state, for each method of a recipe."""
  recipe = dataclasses.replace(TINY_DECODE, decode=dataclasses.replace(
      TINY_DECODE.decode, methods=("esp", "hybrid", "ar"), bc=10))
  r = planner.plan_recipe(recipe, planner.target_for("cpu"), "data=1,fsdp=-1,tensor=1")[0]
  names = [c.program.name for c in r.compiled]
  assert names == ["esp-bc10 prefill", "esp-bc10 decode", "hybrid-bc10 decode", "ar decode"]
  by_name = {c.program.name: c for c in r.compiled}
  # a tree step carries its BC block; plain decoding one token per row
  assert by_name["esp-bc10 decode"].flops > 2 * by_name["ar decode"].flops
  # the report: a break-even tau per method against plain decoding ...
  from effjax.plan import report

  assert set(report.decode_throughput(r)["break_even_tau"]) == {"esp-bc10", "hybrid-bc10"}
  # ... and a partial plan without plain decoding's program still reports (no break-even)
  part = planner.plan_recipe(recipe, planner.target_for("cpu"), "data=1,fsdp=-1,tensor=1",
                             only={"esp-bc10 prefill", "esp-bc10 decode"})[0]
  assert "break_even_tau" not in report.decode_throughput(part)
  assert "esp-bc10" in report.format_result(recipe, part)
  # ... and so does one without any decode program
  prefill = planner.plan_recipe(recipe, planner.target_for("cpu"), "data=1,fsdp=-1,tensor=1",
                                only={"esp-bc10 prefill"})[0]
  assert not report.has_decode_step(prefill) and "decode" not in report.to_dict(recipe, prefill)
  assert "esp-bc10 prefill" in report.format_result(recipe, prefill)


def test_int8_decode_plan_reads_a_byte_per_weight(v5e_decode):
  """`effjax plan --quant int8`: the parameters per device are int8 codes, a float32 scale per
  output row and bfloat16 norms (counted by hand), and the TPU program multiplies by the converted
  codes (as many FLOPs as bfloat16's), not by CPU's two int8 digits per activation (about twice
  as many)."""
  r = planner.plan_recipe(TINY_DECODE.replace(quant="int8"), v5e_decode.target,
                          "data=1,fsdp=-1,tensor=1")[0]
  assert r.plan.title.endswith("int8 weights")
  cfg = tiny_config("llama")
  tables = cfg.vocab_size * (1 if cfg.tie_embeddings else 2)
  out_rows = cfg.num_layers * (cfg.head_dim * (cfg.num_heads + 2 * cfg.num_kv_heads)
                               + 2 * cfg.mlp_dim + 2 * cfg.dim)
  norms = cfg.dim * (2 * cfg.num_layers + 1)
  weights = param_count(cfg) - norms
  total = weights + 4 * (out_rows + tables) + 2 * norms
  n = r.target.num_chips
  for c, ref in zip(r.compiled, v5e_decode.compiled):
    # every weight is sharded; a scale vector too small to split may be whole on each device
    assert total // n <= c.inputs[PARAMS] <= (weights + 2 * norms) // n + 4 * (out_rows + tables)
    assert c.inputs[PARAMS] < 0.6 * ref.inputs[PARAMS], c.program.name
  decode = next(c for c in r.compiled if c.program.name == "ar decode")
  ref = next(c for c in v5e_decode.compiled if c.program.name == "ar decode")
  assert 0.8 * ref.flops < decode.flops < 1.25 * ref.flops
  # lowered for TPU: the converted codes' product, counted like bfloat16's (CPU's two digits per
  # activation would count twice as many)
  assert decode.product_flops == ref.product_flops


def test_product_flops_count_each_product_once_and_the_branch_lowered_for_the_platform():
  """flops.product_flops, golden values: 2 x output elements x contracted size per product; a loop
  body once (as XLA's cost analysis counts it); a nested jit; of lax.platform_dependent the
  branch for the platform; of another conditional the dearest branch."""
  import jax.numpy as jnp

  from effjax.plan.flops import product_flops

  def program(x, w):
    y = jax.lax.platform_dependent(x, w, cpu=lambda x, w: (jnp.concatenate([x, x]) @ w)[:2],
                                   default=lambda x, w: x @ w)
    y = jax.lax.while_loop(lambda c: c.sum() < 0, lambda c: c @ jnp.ones((4, 4)), y)
    y = jax.lax.cond(y.sum() > 0, lambda c: c @ jnp.ones((4, 4)), lambda c: c, y)
    return jax.jit(lambda a: a @ jnp.ones((4, 5)))(y)

  jaxpr = jax.make_jaxpr(program)(jnp.ones((2, 3)), jnp.ones((3, 4)))
  rest = 2 * 2 * 4 * 4 + 2 * 2 * 4 * 4 + 2 * 2 * 4 * 5
  assert product_flops(jaxpr, "tpu") == 2 * 2 * 3 * 4 + rest
  assert product_flops(jaxpr, "cuda") == 2 * 2 * 3 * 4 + rest
  assert product_flops(jaxpr, "cpu") == 2 * 4 * 3 * 4 + rest
