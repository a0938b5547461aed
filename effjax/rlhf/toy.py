"""A CPU-sized language environment in which the effects of online RLHF can show.

- Prompts: uniform random token strings (tens of thousands of them: memorising prompts does not pay),
  split into a training pool and a held-out evaluation set.
- SFT data: a prompt-conditioned Markov chain. Token logits are a random bigram table G[prev] plus a
  prompt-dependent shift H s(x) (s: a random embedding of the prompt's tokens), at a temperature.
- Teacher reward (hidden): a random bigram table W (independent of G) summed over the response's
  transitions, plus a prompt-dependent token preference u(x) from a random MLP of another prompt
  embedding, optionally minus a penalty per repeated token (teacher_repeat_penalty: degenerate,
  repetitive responses are bad, and the SFT data rarely shows how bad). Because W is independent of G, most high-reward transitions are ones the SFT policy
  rarely takes: the best responses are rare but reachable (distribution shift), and the RM has to
  learn the prompt -> preference map from labels (it cannot memorise prompts). The reward is
  standardised so that two SFT responses to the same prompt differ by ~N(0, 2): with rater
  temperature 1 many pairs are near 50/50 and a few are clear.
- SFT policy: a tiny llama-family effjax Transformer trained by MLE on fresh samples of that chain.
"""

from __future__ import annotations

import hashlib
import json
import math
import pathlib
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct

from effjax.checkpoints.checkpoint_dir import VERSION as PARAMS_FORMAT
from effjax.models.config import ModelConfig, make_config
from effjax.models.transformer import Transformer
from effjax.rlhf import rollout
from effjax.rlhf.config import ToyConfig


@struct.dataclass
class ToyWorld:
  data_embed: jax.Array  # [V, d] prompt embedding of the data process
  data_bigram: jax.Array  # [V, V] G
  data_shift: jax.Array  # [V, d] H
  teacher_embed: jax.Array  # [V, d]
  teacher_bigram: jax.Array  # [V, V] W
  teacher_in: jax.Array  # [h, d]
  teacher_out: jax.Array  # [V, h]
  reward_mean: jax.Array  # scalar: standardisation of the raw teacher reward
  reward_scale: jax.Array


def prompt_summary(embed: jax.Array, prompts: jax.Array) -> jax.Array:
  """Mean token embedding times sqrt(P): entries ~N(0, 1) for random prompts."""
  return embed[prompts].mean(axis=1) * math.sqrt(prompts.shape[1])


def data_logits(world: ToyWorld, toy: ToyConfig, summary: jax.Array, prev: jax.Array) -> jax.Array:
  logits = world.data_bigram[prev] + toy.prompt_effect * summary @ world.data_shift.T
  return (logits / toy.data_temperature).at[:, 0].set(-jnp.inf)  # never the padding token


def sample_data(world: ToyWorld, toy: ToyConfig, prompts: jax.Array, rng: jax.Array) -> jax.Array:
  """Responses [B, L] of the SFT data process."""
  summary = prompt_summary(world.data_embed, prompts)

  def step(prev, key):
    tok = jax.random.categorical(key, data_logits(world, toy, summary, prev)).astype(jnp.int32)
    return tok, tok

  _, toks = jax.lax.scan(step, prompts[:, -1], jax.random.split(rng, toy.response_len))
  return toks.T


def teacher_parts(world: ToyWorld, toy: ToyConfig, prompts: jax.Array):
  """(bigram table [V, V], per-prompt token preference [B, V]) of the raw teacher reward."""
  s = prompt_summary(world.teacher_embed, prompts)
  u = jnp.tanh(s @ world.teacher_in.T) @ world.teacher_out.T
  return world.teacher_bigram, toy.teacher_prompt_weight * u


def repeats(responses: jax.Array) -> jax.Array:
  """Tokens that repeat an earlier token of the same response: L - #distinct, [B]."""
  s = jnp.sort(responses, axis=1)
  return jnp.sum(s[:, 1:] == s[:, :-1], axis=1)


def raw_teacher(world: ToyWorld, toy: ToyConfig, prompts: jax.Array, responses: jax.Array):
  w, u = teacher_parts(world, toy, prompts)
  prev = jnp.concatenate([prompts[:, -1:], responses[:, :-1]], axis=1)
  raw = w[prev, responses].sum(axis=1) + jnp.take_along_axis(u, responses, axis=1).sum(axis=1)
  return raw - toy.teacher_repeat_penalty * repeats(responses)


def teacher_reward(world: ToyWorld, toy: ToyConfig, prompts: jax.Array, responses: jax.Array):
  """The hidden reward, standardised on SFT-data responses: [B]."""
  return (raw_teacher(world, toy, prompts, responses) - world.reward_mean) / world.reward_scale


@functools.partial(jax.jit, static_argnums=0)
def make_world(toy: ToyConfig) -> ToyWorld:
  v, d, h = toy.vocab_size, toy.teacher_hidden, toy.teacher_hidden
  ks = jax.random.split(jax.random.key(toy.seed), 9)
  n = jax.random.normal
  world = ToyWorld(
      data_embed=n(ks[0], (v, d)), data_bigram=n(ks[1], (v, v)), data_shift=n(ks[2], (v, d)) / math.sqrt(d),
      teacher_embed=n(ks[3], (v, d)), teacher_bigram=n(ks[4], (v, v)),
      teacher_in=n(ks[5], (h, d)) / math.sqrt(d), teacher_out=n(ks[6], (v, h)) / math.sqrt(h),
      reward_mean=jnp.zeros(()), reward_scale=jnp.ones(()))
  # Standardise: mean over SFT-data responses, scale = within-prompt standard deviation.
  prompts = random_prompts(toy, ks[7], 2048)
  reps = 8
  resp = sample_data(world, toy, jnp.repeat(prompts, reps, axis=0), ks[8])
  raw = raw_teacher(world, toy, jnp.repeat(prompts, reps, axis=0), resp).reshape(-1, reps)
  within = jnp.sqrt(jnp.sum((raw - raw.mean(1, keepdims=True)) ** 2) / (raw.size - raw.shape[0]))
  return world.replace(reward_mean=raw.mean(), reward_scale=within)


def random_prompts(toy: ToyConfig, rng: jax.Array, count: int) -> jax.Array:
  return jax.random.randint(rng, (count, toy.prompt_len), 1, toy.vocab_size, dtype=jnp.int32)


def model_config(toy: ToyConfig) -> ModelConfig:
  m = toy.model
  return make_config("llama", vocab_size=toy.vocab_size, dim=m.dim, mlp_dim=m.mlp_dim,
                     num_layers=m.num_layers, num_heads=m.num_heads, num_kv_heads=m.num_kv_heads,
                     head_dim=m.head_dim, max_position=4 * (toy.prompt_len + toy.response_len),
                     pad_id=0)


def train_sft(toy: ToyConfig, world: ToyWorld, log=print) -> Transformer:
  """MLE on fresh samples of the data process (response tokens only)."""
  cfg = model_config(toy)
  model = Transformer(cfg, rngs=nnx.Rngs(toy.seed + 1))
  if toy.sft_steps == 0:  # an untrained policy (tests)
    return model
  graphdef, params = nnx.split(model)
  warmup = max(1, min(100, toy.sft_steps // 10))
  sched = optax.warmup_cosine_decay_schedule(0.0, toy.sft_lr, warmup, toy.sft_steps, toy.sft_lr * 0.05)
  opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(sched))
  opt_state = opt.init(params)
  lens = jnp.full((toy.sft_batch,), toy.prompt_len, jnp.int32)

  @jax.jit
  def step(params, opt_state, rng):
    k1, k2 = jax.random.split(rng)
    prompts = random_prompts(toy, k1, toy.sft_batch)
    resp = sample_data(world, toy, prompts, k2)
    mask = jnp.ones(resp.shape, bool)

    def loss_fn(p):
      logp, _ = rollout.token_logprobs(nnx.merge(graphdef, p), prompts, lens, resp, mask)
      return -logp.mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  key = jax.random.fold_in(jax.random.key(toy.seed), 12345)
  for i in range(toy.sft_steps):
    params, opt_state, loss = step(params, opt_state, jax.random.fold_in(key, i))
    if (i + 1) % max(1, toy.sft_steps // 5) == 0:
      log(f"sft step {i + 1}/{toy.sft_steps}: nll/token {float(loss):.3f}")
  return nnx.merge(graphdef, params)


def data_entropy(world: ToyWorld, toy: ToyConfig, count: int = 1024) -> float:
  """Per-token entropy of the data process (the SFT policy's best achievable nll/token)."""
  k1, k2 = jax.random.split(jax.random.key(toy.seed + 7))
  prompts = random_prompts(toy, k1, count)
  resp = sample_data(world, toy, prompts, k2)
  prev = jnp.concatenate([prompts[:, -1:], resp[:, :-1]], axis=1)
  summary = prompt_summary(world.data_embed, prompts)
  logp = jax.vmap(lambda p: jax.nn.log_softmax(data_logits(world, toy, summary, p)), 1, 1)(prev)
  ent = -jnp.sum(jnp.where(jnp.isfinite(logp), jnp.exp(logp) * logp, 0.0), axis=-1)
  return float(ent.mean())


def best_responses(world: ToyWorld, toy: ToyConfig, prompts: jax.Array) -> jax.Array:
  """The teacher's optimal response per prompt (Viterbi over the bigram + token terms): [B, L]."""
  w, u = teacher_parts(world, toy, prompts)
  w = w.at[:, 0].set(-jnp.inf)
  score = w[prompts[:, -1]] + u  # [B, V]: best total ending in each token after step 0
  back = []
  for _ in range(toy.response_len - 1):
    cand = score[:, :, None] + w[None] + u[:, None, :]  # [B, prev, next]
    back.append(jnp.argmax(cand, axis=1))
    score = jnp.max(cand, axis=1)
  tok = jnp.argmax(score, axis=1)
  out = [tok]
  for bp in reversed(back):
    tok = jnp.take_along_axis(bp, tok[:, None], axis=1)[:, 0]
    out.append(tok)
  return jnp.stack(out[::-1], axis=1).astype(jnp.int32)


class ToyEnvironment:
  """Prompts, the hidden teacher and the SFT policy of the toy (the agents' view of a task)."""

  def __init__(self, toy: ToyConfig, cache_dir: str | pathlib.Path, log=print):
    self.toy = toy
    self.world = make_world(toy)
    self.model_cfg = model_config(toy)
    self.response_len = toy.response_len
    k_train, k_eval = jax.random.split(jax.random.fold_in(jax.random.key(toy.seed), 99))
    self.train = np.asarray(random_prompts(toy, k_train, toy.num_train_prompts))
    self.eval = np.asarray(random_prompts(toy, k_eval, toy.num_eval_prompts))
    self.cache_dir = pathlib.Path(cache_dir)
    self.log = log
    self._score = jax.jit(lambda p, r: teacher_reward(self.world, toy, p, r))

  @property
  def num_train(self) -> int:
    return self.train.shape[0]

  def prompts(self, ids: np.ndarray, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    pool = self.train if split == "train" else self.eval
    p = pool[ids]
    return p, np.full((p.shape[0],), self.toy.prompt_len, np.int32)

  def eval_ids(self) -> np.ndarray:
    return np.arange(self.eval.shape[0])

  def score(self, prompts, prompt_lens, responses, response_mask, ids, split) -> np.ndarray:
    """The hidden teacher reward (toy responses are full length: masks are all True)."""
    del prompt_lens, response_mask, ids, split
    return np.asarray(self._score(jnp.asarray(prompts), jnp.asarray(responses)))

  def sft_policy(self) -> Transformer:
    """The SFT policy, trained once per environment config and cached with Orbax."""
    import orbax.checkpoint as ocp
    # The SFT policy depends on the data process only, not on the teacher.
    fields = {k: v for k, v in dataclasses.asdict(self.toy).items()
              if k not in ("teacher_prompt_weight", "teacher_repeat_penalty")}
    fields["params_format"] = PARAMS_FORMAT  # a new parameter layout needs a new cache entry
    key = hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()
    path = (self.cache_dir / f"toy_sft_{key[:12]}").absolute()
    abstract = nnx.eval_shape(lambda: Transformer(self.model_cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    if (path / "params").exists():
      with ocp.StandardCheckpointer() as ckpt:
        pure = ckpt.restore(path / "params", nnx.to_pure_dict(state))
      nnx.replace_by_pure_dict(state, pure)
      return nnx.merge(graphdef, state)
    self.log(f"training the toy SFT policy ({self.toy.sft_steps} steps) -> {path}")
    model = train_sft(self.toy, self.world, self.log)
    path.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckpt:
      ckpt.save(path / "params", nnx.to_pure_dict(nnx.split(model)[1]), force=True)
    return model


def describe(env: ToyEnvironment, policy: Transformer, *, top_k: int, temperature: float,
             rater_temperature: float, count: int = 512, samples: int = 16) -> dict:
  """What a reader needs to judge the toy: SFT reward distribution, near ties, how rare the best is."""
  toy = env.toy
  prompts = jnp.asarray(env.eval[:count])
  lens = jnp.full((prompts.shape[0],), toy.prompt_len, jnp.int32)
  graphdef, params = nnx.split(policy)
  sampler = rollout.make_sampler(graphdef, num_samples=samples, length=toy.response_len,
                                 top_k=top_k, temperature=temperature)
  resp, _ = sampler(params, prompts, lens, jax.random.key(toy.seed + 3))
  r = env._score(jnp.repeat(prompts, samples, axis=0), resp.reshape(-1, toy.response_len))
  r = np.asarray(r).reshape(-1, samples)
  p = 1.0 / (1.0 + np.exp(-(r[:, 0::2] - r[:, 1::2]) / rater_temperature))
  greedy = rollout.make_sampler(graphdef, num_samples=1, length=toy.response_len, top_k=1,
                                temperature=0.0)(params, prompts, lens, jax.random.key(0))[0][:, 0]
  best = best_responses(env.world, toy, prompts)
  best_r = np.asarray(env._score(prompts, best))
  mask = jnp.ones(best.shape, bool)
  best_logp = np.asarray(rollout.token_logprobs(policy, prompts, lens, best, mask)[0].sum(-1))
  # Within-prompt top decile of SFT samples: how often a sample reaches it, by construction 10%;
  # what matters is how far the optimum lies beyond it.
  q = np.quantile(r, [0.1, 0.5, 0.9, 0.99])
  return dict(
      sft_reward_mean=float(r.mean()), sft_reward_std_within_prompt=float(r.std(axis=1).mean()),
      sft_reward_quantiles_10_50_90_99=[float(x) for x in q],
      sft_greedy_reward=float(np.asarray(env._score(prompts, greedy)).mean()),
      best_response_reward=float(best_r.mean()),
      best_response_sft_logprob_median=float(np.median(best_logp)),
      near_tie_fraction=float(np.mean(np.abs(p - 0.5) < 0.1)),
      clear_pair_fraction=float(np.mean(np.abs(p - 0.5) > 0.4)),
      data_entropy_per_token=data_entropy(env.world, toy))
