"""The four agents (offline, periodic, online, info-directed) over shared components.

Rollout, reward-model update and policy update are each one jitted step over pytrees; this loop only
moves prompts, responses and labels between them, the rater and the durable logs:

  incremental (online, info_directed), per batch t:
    sample n responses for B prompts -> pick a pair per prompt -> labels (logged first) ->
    RM update (new labels + replay) -> sample fresh prompts -> policy update (a) + (b) -> anchor EMA
  offline / periodic, per batch t:
    a random pair (two samples) from the data policy (pi_0 for offline, the latest retrained policy
    for periodic) -> labels (logged first); at retrain points: RM from phi_0 on all labels, policy
    from theta_0 against that frozen RM (sub-step (b), no nudge), evaluate.

Every random draw comes from (seed, batch, purpose), labels come from the label log when present, and
the full state is checkpointed with Orbax at batch boundaries, so a killed run restarted with the
same command continues exactly where it stopped and ends where an uninterrupted run ends.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from effjax.models.sharding import parse_mesh, state_shardings
from effjax.rlhf import enn, labels, pairs, policy, raters, rollout
from effjax.rlhf.config import (AgentConfig, ENNConfig, PolicyConfig, RunConfig, config_from_dict,
                                config_to_dict)

# Purposes of random draws inside one batch.
ROLLOUT, SELECT, LABEL, FRESH_ROLLOUT, REPLAY, RETRAIN_RM, RETRAIN_POLICY, BOOTSTRAP = range(8)
QUERY_PROMPTS, FRESH_PROMPTS, RETRAIN_PROMPTS = range(3)
RM_CHUNK = 16  # RM retraining steps per jitted call


def make_environment(cfg: RunConfig, log=print):
  if cfg.env.kind == "toy":
    from effjax.rlhf.toy import ToyEnvironment
    return ToyEnvironment(cfg.env.toy, cfg.cache_dir, log=log)
  if cfg.env.kind == "gsm8k":
    from effjax.rlhf.gsm8k import GSM8KEnvironment
    return GSM8KEnvironment(cfg.env.gsm8k, log=log)
  if cfg.env.kind == "arithmetic":
    from effjax.rlhf.gsm8k import ArithmeticEnvironment
    return ArithmeticEnvironment(cfg.env.arithmetic, log=log)
  raise ValueError(f"unknown environment {cfg.env.kind!r}")


@dataclasses.dataclass
class Steps:
  """The jitted steps of one run (built once; the graphdefs are static)."""

  sample: Callable  # (policy, prompts, lens, key) -> (responses [B, n, L], mask)
  sample_pair: Callable  # the same with n = 2 (offline / periodic data: a random pair)
  sample_eval: Callable  # the same with n = eval_samples (evaluation)
  greedy: Callable  # (policy, prompts, lens, key) -> (responses [B, 1, L], mask)
  logprobs: Callable  # (policy, prompts, lens, responses [N, L], mask) -> sum log pi per row [N]
  score: Callable  # (rm, frozen, prompts, lens, responses, mask) -> (point, particles)
  select: Callable  # (point, particles, key) -> pair [B, 2]
  rm_update: Callable  # (rm, frozen, opt, batches [S, M]) -> (rm, opt, metrics)
  policy_update: Callable  # (policy, anchor, opt, rm, frozen, a, b) -> (policy, anchor, opt, metrics)
  policy_retrain: Callable  # the same with sub-step (b) only and no nudge (offline / periodic)
  rm_opt: optax.GradientTransformation
  policy_opt: optax.GradientTransformation


@functools.lru_cache(maxsize=16)
def build_steps(agent: AgentConfig, pcfg: PolicyConfig, ecfg: ENNConfig, policy_graphdef, rm_graphdef,
                response_len: int, mesh=None) -> Steps:
  """The jitted steps, shared by every run in a process with the same settings (one compile)."""
  rm_opt = enn.rm_optimizer(ecfg)
  policy_opt = policy.policy_optimizer(pcfg)
  sampler = functools.partial(rollout.make_sampler, policy_graphdef, length=response_len,
                              top_k=pcfg.top_k, temperature=pcfg.temperature, mesh=mesh)
  return Steps(
      sample=sampler(num_samples=agent.responses_per_prompt),
      sample_pair=sampler(num_samples=2),
      sample_eval=sampler(num_samples=agent.eval_samples),
      logprobs=rollout.make_sequence_logprob(policy_graphdef, mesh),
      greedy=rollout.make_sampler(policy_graphdef, num_samples=1, length=response_len, top_k=1,
                                  temperature=0.0, mesh=mesh),
      score=enn.make_scorer(rm_graphdef, mesh),
      select=jax.jit(pairs.selector(agent)),
      rm_update=enn.make_rm_update(rm_graphdef, rm_opt, mesh),
      policy_update=policy.make_policy_update(policy_graphdef, rm_graphdef, pcfg, policy_opt,
                                              use_a=True, mesh=mesh),
      policy_retrain=policy.make_policy_update(policy_graphdef, rm_graphdef, pcfg, policy_opt,
                                               use_a=False, mesh=mesh, eps=0.0),
      rm_opt=rm_opt, policy_opt=policy_opt,
  )


def step_settings(agent: AgentConfig) -> AgentConfig:
  """The agent fields the compiled steps depend on (the rest must not split the step cache)."""
  return AgentConfig(selection=agent.pair_selection, responses_per_prompt=agent.responses_per_prompt,
                     dts_tries=agent.dts_tries, boltzmann_temperature=agent.boltzmann_temperature,
                     eval_samples=agent.eval_samples)


class Checkpoints:
  """Orbax checkpoints of the training state pytree, by batch count. Leaves are stored flat (by
  index, with their key paths in the metadata) so any pytree of arrays round-trips exactly."""

  def __init__(self, directory: pathlib.Path, keep: int):
    import orbax.checkpoint as ocp
    self.ocp = ocp
    self.manager = ocp.CheckpointManager(
        directory.absolute(),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False,
                                             cleanup_tmp_directories=True))

  def latest(self) -> int | None:
    return self.manager.latest_step()

  def save(self, batch: int, state: Any) -> None:
    ocp = self.ocp
    flat, _ = jax.tree_util.tree_flatten_with_path(state)
    arrays = {f"{i:05d}": np.asarray(x) for i, (_, x) in enumerate(flat)}
    paths = [jax.tree_util.keystr(k) for k, _ in flat]
    self.manager.save(batch, args=ocp.args.Composite(state=ocp.args.StandardSave(arrays),
                                                     meta=ocp.args.JsonSave({"paths": paths})))
    self.manager.wait_until_finished()

  def restore(self, batch: int, template: Any) -> Any:
    ocp = self.ocp
    flat, treedef = jax.tree_util.tree_flatten_with_path(template)
    target = {f"{i:05d}": np.asarray(x) for i, (_, x) in enumerate(flat)}
    got = self.manager.restore(batch, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                            meta=ocp.args.JsonRestore()))
    paths = [jax.tree_util.keystr(k) for k, _ in flat]
    if got.meta["paths"] != paths:
      raise ValueError(f"checkpoint {batch} in {self.manager.directory} does not match this run's "
                       "state (different config?)")
    leaves = [jnp.asarray(got.state[f"{i:05d}"], dtype=x.dtype) for i, (_, x) in enumerate(flat)]
    return jax.tree_util.tree_unflatten(treedef, leaves)

  def arrays(self, batch: int) -> dict[str, np.ndarray]:
    """The stored leaves of checkpoint `batch`, by index (for comparisons; no template needed)."""
    got = self.manager.restore(batch, args=self.ocp.args.Composite(state=self.ocp.args.StandardRestore()))
    return {k: np.asarray(v) for k, v in got.state.items()}

  def close(self) -> None:
    self.manager.close()


class Trainer:
  """One run of one agent: `Trainer(cfg).run()` starts or resumes it."""

  def __init__(self, cfg: RunConfig, env=None, log=None, progress: bool = True):
    self.cfg = cfg
    self.log = log or (lambda msg: print(msg, file=sys.stderr))
    self.progress = progress
    self.out = pathlib.Path(cfg.out_dir)
    self.out.mkdir(parents=True, exist_ok=True)
    self._check_config_file()
    self.env = env if env is not None else make_environment(cfg, self.log)
    self.rater = raters.make_rater(cfg.rater, self.env, self.out, self.log)
    self.mesh = parse_mesh(cfg.mesh)

    sft = self.env.sft_policy()
    # theta0: the policy's learning parameters; policy_frozen: the rest (shared with the SFT model).
    self.policy_graphdef, theta0, policy_frozen = policy.split_policy(sft, cfg.policy)
    rm = enn.create_reward_model(sft, cfg.enn, seed=cfg.seed)
    self.rm_graphdef, phi0, frozen = enn.split(rm)
    self.theta0, self.policy_frozen, self.phi0, self.frozen = self._place(
        (theta0, policy_frozen, phi0, frozen))
    self.steps = build_steps(step_settings(cfg.agent), cfg.policy, cfg.enn, self.policy_graphdef,
                             self.rm_graphdef, self.env.response_len, self.mesh)
    self.rm_opt, self.policy_opt = self.steps.rm_opt, self.steps.policy_opt
    self.key = jax.random.key(cfg.seed)
    self.batch_size = cfg.agent.prompts_per_batch

    self.label_log = labels.LabelLog(self.out / "labels.jsonl")
    self.checkpoints = Checkpoints(self.out / "checkpoints", cfg.keep_checkpoints)
    self.state = self._place(self.initial_state())
    start = self.checkpoints.latest()
    if start is not None:
      self.state = self._place(self.checkpoints.restore(start, self.state))
      self.log(f"resuming {self.out} after batch {start}")
    self.start = start or 0
    self.metrics = labels.MetricsLog(self.out / "metrics.jsonl", self.start, self.out / "tensorboard")
    self.evals = labels.MetricsLog(self.out / "evals.jsonl", self.start)  # per held-out prompt
    self.buffer = self._buffer(self.label_log.before(self.start))
    self._eval_setup()

  # ---- state -------------------------------------------------------------------------------------

  def initial_state(self) -> dict:
    s = dict(policy=self.theta0, anchor=self.theta0,
             policy_opt=enn.init_optimizer(self.policy_opt, self.theta0),
             rm=self.phi0, rm_opt=enn.init_optimizer(self.rm_opt, self.phi0))
    if not self.cfg.agent.incremental:
      s["data_policy"] = self.theta0
    # Own copies (one compiled copy): theta0 / phi0 stay the retraining origin.
    return jax.jit(lambda t: jax.tree.map(jnp.copy, t))(s)

  def _place(self, tree):
    if self.mesh is None:
      return tree
    return jax.device_put(tree, state_shardings(tree, self.mesh))

  def _check_config_file(self) -> None:
    """A run directory belongs to one config: resuming with a different one is an error."""
    path = self.out / "config.json"
    mine = config_to_dict(self.cfg)
    if path.exists():
      # Through the loader: fields added since the run started read as their defaults.
      theirs = config_to_dict(config_from_dict(json.loads(path.read_text())))
      if json.loads(json.dumps(theirs)) != json.loads(json.dumps(mine)):
        raise ValueError(f"{self.out} holds a run with a different config; use a new out_dir")
    else:
      path.write_text(json.dumps(mine, indent=1))

  def full(self, params) -> tuple:
    """A policy's learning parameters with its frozen rest: what the jitted steps take."""
    return params, self.policy_frozen

  def rng(self, batch: int, purpose: int, sub: int = 0) -> jax.Array:
    return jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(self.key, batch), purpose), sub)

  def prompt_ids(self, batch: int, stream: int, sub: int = 0) -> np.ndarray:
    gen = np.random.default_rng([self.cfg.seed, batch, stream, sub])
    return gen.choice(self.env.num_train, self.batch_size, replace=False)

  # ---- labels ------------------------------------------------------------------------------------

  def _buffer(self, records: list[dict]) -> dict[str, np.ndarray]:
    arrays = labels.to_arrays(records, self.env.response_len)
    prompts, lens = self.env.prompts(arrays["prompt_ids"])
    return dict(arrays, prompts=prompts, prompt_lens=lens)

  def obtain_labels(self, batch: int, pb: raters.PairBatch) -> list[dict]:
    """Labels for every row: from the log when already there, else from the rater (logged first)."""
    rows = range(len(pb.prompt_ids))
    have = {i: self.label_log.get(batch, i) for i in rows}
    for i, rec in have.items():
      if rec is not None and (rec["a"] != pb.a[i][pb.a_mask[i]].tolist()
                              or rec["b"] != pb.b[i][pb.b_mask[i]].tolist()
                              or rec["prompt_id"] != int(pb.prompt_ids[i])):
        raise ValueError(f"{self.label_log.path}: the logged pair for batch {batch} row {i} differs "
                         "from this run's (a different seed, config or code?)")
    missing = np.asarray([i for i in rows if have[i] is None], np.int64)
    if len(missing):
      choice = self.rater.label(pb.rows(missing), self.rng(batch, LABEL))
      new = []
      for i, c in zip(missing, choice):
        rec = dict(batch=batch, row=int(i), prompt_id=int(pb.prompt_ids[i]),
                   a=pb.a[i][pb.a_mask[i]].tolist(), b=pb.b[i][pb.b_mask[i]].tolist(),
                   a_len=int(pb.a_mask[i].sum()), b_len=int(pb.b_mask[i].sum()), choice=int(c))
        new.append(rec)
        have[int(i)] = rec
      self.label_log.append(new)
    return [have[i] for i in rows]

  def add_to_buffer(self, records: list[dict]) -> None:
    new = self._buffer(records)
    self.buffer = {k: np.concatenate([self.buffer[k], new[k]]) for k in self.buffer}

  def pair_batches(self, idx: np.ndarray) -> dict:
    """Buffer rows idx [S, M] as a stacked pair batch for the RM update (buffer row = the label's
    index in the label log, which fixes its bootstrap weights)."""
    b = self.buffer
    out = dict(prompts=b["prompts"][idx], prompt_lens=b["prompt_lens"][idx], a=b["a"][idx],
               a_mask=b["a_mask"][idx], b=b["b"][idx], b_mask=b["b_mask"][idx],
               choice=b["choice"][idx],
               num_labels=np.full(idx.shape[:1], len(b["choice"]), np.float32))
    if self.cfg.enn.bootstrap:
      out["particle_weights"] = enn.bootstrap_weights(self.rng(0, BOOTSTRAP), idx,
                                                      self.cfg.enn.num_particles)
    return out

  # ---- evaluation --------------------------------------------------------------------------------

  def _eval_setup(self) -> None:
    """Held-out prompts and the SFT policy's greedy and sampled responses to them (fixed keys)."""
    self.eval_ids = self.env.eval_ids()
    self.eval_prompts, self.eval_lens = self.env.prompts(self.eval_ids, "eval")
    self.sft_greedy = self.steps.greedy(self.full(self.theta0), self.eval_prompts, self.eval_lens,
                                        jax.random.key(0))
    self.sft_sampled = self.steps.sample_eval(self.full(self.theta0), self.eval_prompts,
                                              self.eval_lens, jax.random.key(1))

  def _eval_pairs(self, ours, theirs) -> raters.PairBatch:
    """Row (prompt i, sample j) of ours against the same row of theirs, flattened."""
    (r, m), (r0, m0) = ours, theirs
    b, n, length = r.shape
    flat = lambda x: np.asarray(x).reshape(b * n, length)
    rep = lambda x: np.repeat(x, n, axis=0)
    return raters.PairBatch(rep(self.eval_prompts), rep(self.eval_lens), flat(r), flat(m), flat(r0),
                            flat(m0), rep(self.eval_ids), "eval")

  def evaluate(self, params, batch: int = -1) -> dict:
    """On held-out prompts, against the SFT policy (0.5 = tie), by the rater's probability:
      win_rate            greedy policy vs greedy SFT
      win_rate_sampled    eval_samples sampled responses vs as many SFT samples
    and, where the rater has a scorer, the non-saturating ones: its score (the toy's teacher, the
    verifiable answer check) of the greedy and sampled responses (reward_greedy / reward_sampled);
    the current reward model's point reward of the sampled responses (rm_reward_sampled: it rising
    while reward_sampled falls is over-optimisation); kl_sft, a Monte-Carlo KL(policy || SFT) per
    response on those samples.
    The per-prompt values behind the win rates and rewards go to evals.jsonl (intervals over prompts)."""
    greedy = self.steps.greedy(self.full(params), self.eval_prompts, self.eval_lens, jax.random.key(0))
    sampled = self.steps.sample_eval(self.full(params), self.eval_prompts, self.eval_lens,
                                     jax.random.key(2))
    per_prompt = {}
    per = lambda x: np.asarray(x, np.float64).reshape(len(self.eval_ids), -1).mean(1)
    for name, ours, theirs in (("", greedy, self.sft_greedy), ("_sampled", sampled, self.sft_sampled)):
      pb = self._eval_pairs(ours, theirs)
      p = self.rater.prob(pb)
      if p is not None:
        per_prompt["win_rate" + name] = per(p)
      score = getattr(self.rater, "scorer", None)  # the toy's teacher, the verifiable scorer, ...
      if score is not None:
        per_prompt["reward" + ("_greedy" if not name else name)] = per(score(
            pb.prompts, pb.prompt_lens, pb.a, pb.a_mask, pb.prompt_ids, "eval"))
    out = {k: float(v.mean()) for k, v in per_prompt.items()}
    self.evals.write(dict(batch=batch, **{k: v.round(5).tolist() for k, v in per_prompt.items()}))
    point, _ = self.steps.score(self.state["rm"], self.frozen, self.eval_prompts, self.eval_lens,
                                *sampled)
    out["rm_reward_sampled"] = float(np.mean(point))
    pb = self._eval_pairs(sampled, sampled)
    logp = self.steps.logprobs(self.full(params), pb.prompts, pb.prompt_lens, pb.a, pb.a_mask)
    logp0 = self.steps.logprobs(self.full(self.theta0), pb.prompts, pb.prompt_lens, pb.a, pb.a_mask)
    out["kl_sft"] = float(np.mean(np.asarray(logp) - np.asarray(logp0)))
    return out

  def sample_reward(self, prompts, lens, ids, resp, mask) -> float | None:
    """Mean score of sampled responses when the environment has a scorer (the toy's teacher)."""
    if not hasattr(self.env, "score"):
      return None
    b, n, length = resp.shape
    s = self.env.score(np.repeat(prompts, n, 0), np.repeat(lens, n, 0), np.asarray(resp).reshape(-1, length),
                       np.asarray(mask).reshape(-1, length), np.repeat(ids, n, 0), "train")
    return float(np.mean(s))

  # ---- one batch ---------------------------------------------------------------------------------

  def query(self, batch: int) -> tuple[dict, list[dict], dict]:
    """Sample from the policy, pick pairs, get labels: (group a for the policy update, label
    records, metrics)."""
    ids = self.prompt_ids(batch, QUERY_PROMPTS)
    prompts, lens = self.env.prompts(ids)
    resp, mask = self.steps.sample(self.full(self.state["policy"]), prompts, lens,
                                   self.rng(batch, ROLLOUT))
    point, particles = self.steps.score(self.state["rm"], self.frozen, prompts, lens, resp, mask)
    pair = self.steps.select(point, particles, self.rng(batch, SELECT))
    rows = np.arange(len(ids))
    r, m, pr = np.asarray(resp), np.asarray(mask), np.asarray(pair)
    pb = raters.PairBatch(prompts, lens, r[rows, pr[:, 0]], m[rows, pr[:, 0]], r[rows, pr[:, 1]],
                          m[rows, pr[:, 1]], ids)
    records = self.obtain_labels(batch, pb)
    metrics = dict(particle_spread=float(np.std(np.asarray(particles), axis=-1).mean()))
    rew = self.sample_reward(prompts, lens, ids, resp, mask)
    if rew is not None:
      metrics["sample_reward"] = rew
    group_a = dict(prompts=prompts, prompt_lens=lens, responses=resp, mask=mask, pair=pair)
    return group_a, records, metrics

  def fresh_group(self, batch: int, params, stream: int = FRESH_PROMPTS, sub: int = 0,
                  purpose: int = FRESH_ROLLOUT) -> dict:
    ids = self.prompt_ids(batch, stream, sub)
    prompts, lens = self.env.prompts(ids)
    resp, mask = self.steps.sample(self.full(params), prompts, lens, self.rng(batch, purpose, sub))
    return dict(prompts=prompts, prompt_lens=lens, responses=resp, mask=mask)

  def incremental_batch(self, t: int) -> dict:
    cfg = self.cfg
    s = self.state
    group_a, records, metrics = self.query(t)
    n_old = len(self.buffer["choice"])
    self.add_to_buffer(records)
    # RM: steps_per_batch steps, each on the new labels + `replay` earlier ones.
    gen = np.random.default_rng([cfg.seed, t, REPLAY])
    new_idx = np.arange(n_old, n_old + len(records))
    # The first batch has nothing earlier: it replays itself.
    replay = gen.integers(0, n_old or len(records), (cfg.enn.steps_per_batch, cfg.enn.replay))
    idx = np.concatenate([np.broadcast_to(new_idx, (cfg.enn.steps_per_batch, len(new_idx))), replay], 1)
    rm, rm_opt, m_rm = self.steps.rm_update(s["rm"], self.frozen, s["rm_opt"], self.pair_batches(idx))
    s = dict(s, rm=rm, rm_opt=rm_opt)
    group_b = self.fresh_group(t, s["policy"])
    pol, anchor, popt, m_pol = self.steps.policy_update(s["policy"], s["anchor"], s["policy_opt"], rm,
                                                        self.frozen, group_a, group_b,
                                                        self.policy_frozen)
    self.state = dict(s, policy=pol, anchor=anchor, policy_opt=popt)
    metrics.update(_floats(m_rm), **_floats(m_pol))
    self._warn_skips(t, metrics)
    return metrics

  def retrain_points(self) -> set[int]:
    a = self.cfg.agent
    if a.retrain_at:
      return {n for n in a.retrain_at if n <= a.num_batches} | {a.num_batches}
    return set(range(a.tau, a.num_batches + 1, a.tau)) | {a.num_batches}

  def offline_batch(self, t: int) -> dict:
    """Collect labels with random pairs from the data policy; retrain at the retrain points.

    A random pair of n samples is two independent samples, so only two are drawn (and no reward
    model scores them: the pair does not depend on it)."""
    ids = self.prompt_ids(t, QUERY_PROMPTS)
    prompts, lens = self.env.prompts(ids)
    resp, mask = (np.asarray(x) for x in self.steps.sample_pair(self.full(self.state["data_policy"]),
                                                                 prompts, lens, self.rng(t, ROLLOUT)))
    pb = raters.PairBatch(prompts, lens, resp[:, 0], mask[:, 0], resp[:, 1], mask[:, 1], ids)
    self.add_to_buffer(self.obtain_labels(t, pb))
    metrics = {}
    rew = self.sample_reward(prompts, lens, ids, resp, mask)
    if rew is not None:
      metrics["sample_reward"] = rew
    if t + 1 in self.retrain_points():
      metrics.update(self.retrain(t))
    return metrics

  def retrain(self, t: int) -> dict:
    """RM from phi_0 on all labels so far, then the policy from theta_0 against that frozen RM."""
    cfg = self.cfg
    n = len(self.buffer["choice"])
    steps = math.ceil(cfg.enn.retrain_epochs * n / cfg.enn.retrain_batch)
    rm, rm_opt = self.phi0, enn.init_optimizer(self.rm_opt, self.phi0)
    gen = np.random.default_rng([cfg.seed, t, RETRAIN_RM])
    m_rm: dict = {}
    for _ in range(math.ceil(steps / RM_CHUNK)):
      idx = gen.integers(0, n, (RM_CHUNK, cfg.enn.retrain_batch))
      rm, rm_opt, m_rm = self.steps.rm_update(rm, self.frozen, rm_opt, self.pair_batches(idx))
    pol = anchor = self.theta0
    popt = enn.init_optimizer(self.policy_opt, self.theta0)
    m_pol: dict = {}
    for k in range(cfg.policy.retrain_steps):
      group_b = self.fresh_group(t, pol, RETRAIN_PROMPTS, k, RETRAIN_POLICY)
      pol, anchor, popt, m_pol = self.steps.policy_retrain(pol, anchor, popt, rm, self.frozen, group_b,
                                                           group_b, self.policy_frozen)
    self.state = dict(self.state, rm=rm, rm_opt=rm_opt, policy=pol, anchor=anchor, policy_opt=popt)
    if cfg.agent.kind == "periodic":
      self.state["data_policy"] = pol
    metrics = dict(_floats(m_rm), **_floats(m_pol), retrained=1)
    self._warn_skips(t, metrics)
    return metrics

  def _warn_skips(self, t: int, metrics: dict) -> None:
    for name in ("rm_skipped", "policy_skipped"):
      if metrics.get(name):
        self.log(f"batch {t}: {name.split('_')[0]} update skipped: non-finite loss or gradient "
                 f"({int(metrics[name])} step(s)); the last good state is kept")

  # ---- the run -----------------------------------------------------------------------------------

  def should_eval(self, t: int, metrics: dict) -> bool:
    a = self.cfg.agent
    if not a.incremental:
      return bool(metrics.get("retrained"))
    if a.eval_at:
      return t + 1 in a.eval_at or t + 1 == a.num_batches
    return (t + 1) % a.eval_every == 0 or t + 1 == a.num_batches

  def run(self) -> dict:
    from tqdm import tqdm
    a = self.cfg.agent
    bar = tqdm(total=a.num_batches, initial=self.start, disable=not self.progress, unit="batch",
               desc=f"{a.kind} seed {self.cfg.seed}", file=sys.stderr)
    last_win = next((r["win_rate"] for r in reversed(self.metrics.records) if "win_rate" in r), None)
    if self.start == 0 and not self.metrics.records:
      self.metrics.write(dict(batch=-1, labels=0, **self.evaluate(self.theta0)))
    for t in range(self.start, a.num_batches):
      t0 = time.perf_counter()
      m = self.incremental_batch(t) if a.incremental else self.offline_batch(t)
      if self.should_eval(t, m):
        m.update(self.evaluate(self.state["policy"], t))
        last_win = m.get("win_rate")
      m.update(batch=t, labels=(t + 1) * self.batch_size, seconds=time.perf_counter() - t0)
      self.metrics.write(m)
      if (t + 1) % self.cfg.checkpoint_every == 0 or t + 1 == a.num_batches:
        self.checkpoints.save(t + 1, self.state)
      bar.update(1)
      bar.set_postfix(_postfix(m, last_win))
    bar.close()
    result = self.result()
    (self.out / "result.json").write_text(json.dumps(result, indent=1))
    return result

  def result(self) -> dict:
    wins = [(r["labels"], r["win_rate"]) for r in self.metrics.records if "win_rate" in r]
    return dict(agent=self.cfg.agent.kind, selection=self.cfg.agent.pair_selection,
                seed=self.cfg.seed, eps=self.cfg.policy.eps, labels=len(self.label_log.records),
                final_win_rate=wins[-1][1] if wins else None, curve=wins)

  def close(self) -> None:
    self.checkpoints.close()
    self.metrics.close()
    self.evals.close()
    if hasattr(self.rater, "close"):
      self.rater.close()


def _floats(m: dict) -> dict:
  return {k: float(v) for k, v in m.items()}


def _postfix(m: dict, win: float | None) -> dict:
  out = dict(labels=m["labels"])
  if win is not None:
    out["win"] = f"{win:.3f}"
  for k, short in (("rm_loss", "rm"), ("policy_loss", "pol")):
    if k in m:
      out[short] = f"{m[k]:.3f}"
  return out
