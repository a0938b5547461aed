"""Cost-aware budgets ("auto"): each step speculates exactly as much as pays on this device.

A speculative step of T tokens costs cost(T) (effjax.decoding.cost_model: measured per device and
model) and appends E tokens in expectation; plain decoding appends 1 for cost(1). `Auto` compiles
a few fixed-shape step bodies, the options:

- plain: the root alone (one token);
- draft-n: the n likeliest draft nodes of the prompt-lookup chain (effjax.decoding.pld) and Token
  Recycling's successors (effjax.decoding.recycling) merged into one tree, n + 1 tokens;
- hybrid-N: those draft nodes and ESP's dynamic-tree candidates (one mask) merged into one tree of
  N nodes, 2 (N + 1) tokens with the masks, which also refreshes the mask candidates;

and at every step runs the one with the most expected tokens per second, sum over active rows of
E_i / cost(T_i) at the engine's cache length, through `lax.switch` inside the jitted decode loop
(no host round trip). Every option is a lossless tree step, so the output is plain decoding's.

The expected tokens come from online estimates that start empty in every generation:
- the lookup chain: per depth d, the rate a_d at which the model generated the chain's d-th token
  when it had generated the first d - 1 (observed after every step whatever ran: the model's own
  tokens are compared with the chain drafted before it), from a sceptical prior at depth 1
  (`chain_prior`, 1/4: since every step observes the chain, waiting for evidence costs a few plain
  steps, while a hopeful guess costs a multi-token forward) and, at depth d, from depth d - 1's
  estimate (`Auto.chain_rates`); a chain token at depth d is reached with
  probability a_1 ... a_d. The counts fade by `chain_memory` per step, so the estimate follows the
  text as it is now: a summary that quoted its source at length and then paraphrases stops
  paying for ten-token chains within a few steps;
- the recycled successors (`recycled` > 0; off by default): the `recycled` cheapest nodes of Token
  Recycling's template, filled from the successor table every step updates with the model's top-k
  at the first `recorded` tokens of its accepted path (as in Token Recycling the table carries
  over between generations on one engine, `inherit`). A node whose successor the model once gave
  probability p is reached with probability prod min(1, c p) along its path (siblings together at
  most their parent's), c the ratio of how often the model's token at the root was one of the
  root's recycled successors to the probability recorded for them (prior 1). On SpecBench with a
  2-core CPU (BENCHMARKS.md, "auto with Token Recycling's successors") `recycled=10` raised
  SmolLM2-135M's tokens per call from 1.49 to 1.64-1.67 but not its speed (a 4-token forward
  costs 1.3x a plain step there), and cost Gemma 3 270M 6% of its speed: opt in where forwards of
  a few tokens cost about one;
- ESP: a node is reached with probability c * prod q_i (the masks' own probabilities), c the same
  ratio for the depth-1 mask candidates; mask candidates count only when computed at the current
  root (a plain or draft step leaves them one token behind, and they are then worth nothing).
E(option) = 1 + the sum of the reach probabilities of the nodes it would draft (the likeliest
draft nodes, a token proposed by both draft sources counted once; for hybrid-N the N most probable
of those and the mask candidates). One mask proposes alternatives for the first token only, so the
ESP reach probabilities of a step sum to at most 1 (scaled down where the calibration says more):
a hybrid tree appends at most one expected token more than its draft nodes alone.

Starting fast (`Engine.stream`, the main job): every option is one more copy of the model in the
decode program, so auto's program takes seconds longer to load than plain decoding's (SmolLM2-135M's
five options 2.6-3.8 s on a 2-core CPU, 100-200 plain steps). `starter()` is auto with the same loop
state that runs plain steps only (its program loads as fast as plain decoding's) while its
estimates go on and prompt lookup runs in its shadow (`ShadowLookup`: the tokens per forward its
longest chain would have given, had it run). `Engine.stream` decodes with it until the load would
repay itself (`load_now`: the time that shadow rate saves over plain steps, across the tokens still
allowed, reaches `load_seconds`, after `load_steps` steps), then loads auto's own program
(decoding waits for it) and goes on with it from the same state. Text that does not repeat never
loads it. (The shadow, not the estimates, decides: their sceptical priors and fading counts are
made for choosing a step's budget, and under plain steps they never see a chain's deeper tokens.
Loading in a background thread while the starter decodes was tried: on 2 cores the two starve each
other, BENCHMARKS.md, "auto starts fast".)

Options the cost model makes unprofitable in every state are not compiled (`Auto.prune`, on by
default): by that bound, a hybrid tree whose forward costs more than one extra token can repay,
against plain decoding and the draft options at every cache length, is never the best choice.
Each option is one more copy of the model in the decode program, slower to compile and to restore:
on a 2-core CPU this drops the 60-token tree for SmolLM2-135M and the 30- and 60-token trees for
Gemma 3 270M (its LM head makes every row dear); on an accelerator, where forwards of any of these
sizes cost about the same, every option stays.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from effjax.decoding.cost_model import CostModel
from effjax.decoding.engine import DecodeState, Strategy, fetch
from effjax.decoding.esp import ESP, ESPState, dynamic_candidates, ema_update, esp_tree_step
from effjax.decoding.pld import chain_tree, context, lookup
from effjax.decoding.recycling import TOP_K, InheritsTable, SuccessorTable, Template, template
from effjax.decoding.sampling import GREEDY, Sampler
from effjax.decoding.topk import top_log_probs
from effjax.decoding.tree import (Tree, concat_parents, count_appended, select_nodes, select_tree,
                                  tree_step)
from effjax.models.cache import commit
from effjax.models.transformer import Transformer
from effjax.program_cache import host_field


@dataclasses.dataclass(frozen=True)
class Option:
  kind: str  # "plain", "draft" or "hybrid"
  nodes: int = 0  # tree nodes (draft, hybrid)

  @property
  def block(self) -> int:
    """Tokens in the option's forward."""
    return {"plain": 1, "draft": self.nodes + 1, "hybrid": 2 * (self.nodes + 1)}[self.kind]

  @property
  def name(self) -> str:
    return "plain" if self.kind == "plain" else f"{self.kind}-{self.nodes}"


# Plain steps, small and full draft trees, and the hybrid tree at BC 10 / 30 / 60 (one mask).
DEFAULT_OPTIONS = (Option("plain"), Option("draft", 3), Option("draft", 10), Option("hybrid", 4),
                   Option("hybrid", 14), Option("hybrid", 29))


@struct.dataclass
class Drafts:
  """The draft candidates of a step, [B, C]: the lookup chain's, then the recycled successors'
  (parents first), with their reach probabilities."""

  parent: jax.Array  # candidate index of the parent, -1 = the root
  tokens: jax.Array
  own: jax.Array  # the source's probability given the parent: 1 (chain), recorded (recycled)
  reach: jax.Array
  valid: jax.Array
  levels: tuple[int, ...] = struct.field(pytree_node=False)


@struct.dataclass
class ShadowLookup:
  """Prompt lookup run in the shadow of plain steps, per row [B]: the chain a lookup step would
  have drafted, how far the model's tokens have followed it since, and the tokens per forward such
  steps would have appended (each ends at the first token off its chain, which it appends as its
  own), counted with the weight chain_memory^age in steps (a finished row's stay as they were)."""

  chain: jax.Array  # [B, L]
  valid: jax.Array  # its drafted length
  at: jax.Array  # its tokens the model has generated since; -1: the next step drafts a new one
  tokens: jax.Array  # tokens the finished shadow steps appended (faded)
  calls: jax.Array  # finished shadow steps (faded)

  @classmethod
  def start(cls, batch: int, length: int) -> "ShadowLookup":
    z = jnp.zeros((batch,), jnp.float32)
    return cls(jnp.zeros((batch, length), jnp.int32), jnp.zeros((batch,), jnp.int32),
               jnp.full((batch,), -1, jnp.int32), z, z)

  def follow(self, chain: jax.Array, valid: jax.Array, token: jax.Array, active: jax.Array,
             memory: float) -> "ShadowLookup":
    """After a plain step that generated `token` [B]; chain [B, >= L] (valid [B]) is the lookup
    drafted before it, whose first L tokens a shadow step that has ended takes up."""
    new, width = self.at < 0, self.chain.shape[1]
    drafted = jnp.where(new[:, None], chain[:, :width], self.chain)
    valid = jnp.where(new, jnp.minimum(valid, width), self.valid)
    at = jnp.maximum(self.at, 0)
    hit = (at < valid) & (jnp.take_along_axis(
        drafted, jnp.minimum(at, drafted.shape[1] - 1)[:, None], axis=1)[:, 0] == token)
    ends = active & ~hit
    keep = lambda x, y: jnp.where(active.reshape((-1,) + (1,) * (x.ndim - 1)), x, y)
    return ShadowLookup(keep(drafted, self.chain), keep(valid, self.valid),
                        keep(jnp.where(hit, at + 1, -1), self.at),
                        keep(memory * self.tokens + jnp.where(ends, at + 1.0, 0.0), self.tokens),
                        keep(memory * self.calls + ends, self.calls))


@struct.dataclass
class AutoState:
  esp: ESPState  # one mask: its embedding, its candidates; hist counts tokens per model call
  table: SuccessorTable | None  # the recycled successors (None: recycled=0)
  fresh: jax.Array  # [B] whether the candidates were computed at the current root
  chain_seen: jax.Array  # [B, L] per depth: chain tokens whose first d - 1 the model generated
  chain_hits: jax.Array  # [B, L] ... and whose d-th too
  esp_mass: jax.Array  # [B] summed mask probability of the depth-1 candidates, when fresh
  esp_hits: jax.Array  # [B] times the model's token at the root was one of them
  rec_mass: jax.Array  # [B] summed recorded probability of the root's recycled successors
  rec_hits: jax.Array  # [B] times the model's token at the root was one of them
  runs: jax.Array  # [n_options] steps each option ran
  shadow: "ShadowLookup"  # the starter's evidence that speculation pays here now


@dataclasses.dataclass(frozen=True, eq=False)
class Auto(InheritsTable, Strategy):
  """Cost-aware speculation over `options` with the device's `cost_model` (None: set it with
  `with_cost_model` before decoding, e.g. from cost_model_for(model, auto.blocks)). chain: the
  longest lookup chain drafted; max_ngram: the lookup's longest n-gram; chain_prior: the (hits,
  misses) pseudo-counts depth 1's rate starts from (deeper depths start from the depth above with
  the same strength); chain_memory: the factor the chain counts fade by per step (1: the whole
  generation counts alike; 0.9: an observation weighs about ten steps); recycled: the recycled
  successors offered (the cheapest nodes of Token Recycling's template; 0: the lookup chain
  alone), top_k recorded per token after the first `recorded` tokens of each step's accepted path
  (the root and the first accepted nodes: a top-k over a large vocabulary is not free, so unlike
  Token Recycling the rejected nodes are not recorded), the table carried over between
  generations (`inherit`);
  prune: keep only the options that can be the best choice under the cost model
  (`worth_running`); plain_only: run plain steps only, the estimates going on (`starter`);
  load_seconds: what loading the speculative program costs, which the time the starter's shadow
  lookup says it saves over the tokens still allowed must reach before `Engine.stream` loads it
  (`load_now`),
  after at least `load_steps` steps (2.4-3.8 s for the embedded models' programs on a 2-core CPU,
  BENCHMARKS.md; the tokens still allowed are an upper bound, as an answer may end sooner);
  `effjax generate` replaces it with the time the program's last restore took on this device
  (`methods.prepare`, remembered by `program_name` next to the cost model)."""

  options: tuple[Option, ...] = DEFAULT_OPTIONS
  cost_model: CostModel | None = None
  chain: int = 10
  max_ngram: int = 3
  ema: float = 0.1
  chain_prior: tuple[float, float] = (1.0, 3.0)
  chain_memory: float = 0.9
  recycled: int = 0
  recorded: int = 4
  top_k: int = TOP_K
  inherit: bool = True
  prune: bool = True
  plain_only: bool = False
  load_seconds: float = host_field(3.0)
  load_steps: int = host_field(16)
  sampler: Sampler = GREEDY

  def __post_init__(self):
    object.__setattr__(self, "options", tuple(self.options))
    if len(self.chain_prior) != 2 or min(self.chain_prior) <= 0:
      raise ValueError(f"chain_prior must be two positive pseudo-counts (hits, misses), got "
                       f"{self.chain_prior}")
    if not self.options or self.options[0].kind != "plain":
      raise ValueError("the first option must be plain decoding (Option('plain'))")
    for o in self.options:
      if o.kind not in ("plain", "draft", "hybrid") or (o.kind != "plain") != (o.nodes >= 1):
        raise ValueError(f"bad option {o}: plain has no nodes, draft and hybrid at least one")
      if o.kind == "draft" and o.nodes > self.draft_nodes:
        raise ValueError(f"option {o.name} drafts more than the {self.draft_nodes} candidates of "
                         f"chain={self.chain} and recycled={self.recycled}")
    if not 0.0 < self.chain_memory <= 1.0:
      raise ValueError(f"chain_memory must be in (0, 1], got {self.chain_memory}")
    if self.chain < 1 or self.max_ngram < 1 or self.recorded < 1:
      raise ValueError(f"chain, max_ngram and recorded must be >= 1, got {self.chain}, "
                       f"{self.max_ngram}, {self.recorded}")
    if self.recycled:
      tpl = template(self.recycled)  # raises on an impossible size
      if max(tpl.ranks) >= self.top_k or tpl.layout.depth > self.chain:
        raise ValueError(f"recycled={self.recycled} needs top_k > {max(tpl.ranks)} and chain >= "
                         f"{tpl.layout.depth}, got top_k={self.top_k}, chain={self.chain}")
    if self.load_seconds < 0 or self.load_steps < 1:
      raise ValueError(f"need load_seconds >= 0 and load_steps >= 1, got {self.load_seconds}, "
                       f"{self.load_steps}")
    if self.prune and self.cost_model is not None:
      object.__setattr__(self, "options", self.worth_running(self.cost_model))

  def with_cost_model(self, cost_model: CostModel) -> "Auto":
    return dataclasses.replace(self, cost_model=cost_model)

  def starter(self) -> "Auto | None":
    """This strategy running plain steps only, with the same loop state: what `Engine.stream`
    decodes with while this one's program loads."""
    return None if self.plain_only else dataclasses.replace(self, plain_only=True)

  def load_now(self, state: DecodeState) -> bool:
    """For the starter's state (on the host): whether the speculative program would repay its
    load, by the shadow lookup's recent tokens per forward (see the module docstring)."""
    steps, tokens, calls, limit, length, done = fetch((
        state.calls, state.extra.shadow.tokens, state.extra.shadow.calls, state.limit,
        state.length, state.done))
    if steps < self.load_steps:
      return False
    if not self.shadow_nodes:
      return True  # no chain option to judge by: the hybrids' masks may pay
    cost = lambda k: self.cost_model.seconds(k, state.cache.length)
    tau = tokens.sum() / calls.sum() if calls.sum() else 1.0
    saving = 1.0 - cost(self.shadow_nodes + 1) / (cost(1) * tau)  # per token, against plain
    left = np.where(done, 0, limit - length).max()
    return bool(saving * left * cost(1) >= self.load_seconds)

  @property
  def shadow_nodes(self) -> int:
    """The longest lookup chain a draft option holds (0: none), the one `ShadowLookup` runs."""
    return min(self.chain, max((o.nodes for o in self.options if o.kind == "draft"), default=0))

  @property
  def draft_nodes(self) -> int:
    """Draft candidates per step: the lookup chain's and the recycled successors'."""
    return self.chain + self.recycled

  def worth_running(self, cost_model: CostModel) -> tuple[Option, ...]:
    """The options that are the best choice in some state at some cache length under `cost_model`.

    Let x be the expected tokens of the draft nodes a hybrid-N tree holds (at most the
    m = min(draft_nodes, N) likeliest): x is in [1, 1 + m], the tree's expectation at most
    min(x + 1, 1 + N) (its mask candidates add at most one token), plain decoding's is 1, and a
    draft-n option's at least 1 + min(1, n / m) (x - 1) (it holds the n likeliest). A hybrid that
    loses to one of those for every x, at every cache length from 64 slots to twice the largest
    measured (the costs are linear in it), never has the most expected tokens per second."""
    others = [o for o in self.options if o.kind != "hybrid"]
    top = 2 * max(cost_model.cache_lens)
    lens = sorted(set(cost_model.cache_lens) | {s for s in (64 * 2 ** i for i in range(16))
                                                 if s <= top})

    def can_win(o: Option) -> bool:
      m = min(self.draft_nodes, o.nodes)
      for s in lens:
        cost, rival_costs = cost_model.seconds(o.block, s), [cost_model.seconds(r.block, s)
                                                             for r in others]
        for i in range(401):
          x = 1.0 + m * i / 400
          rival = max((1.0 if r.kind == "plain" else 1.0 + min(1.0, r.nodes / m) * (x - 1.0)) / c
                      for r, c in zip(others, rival_costs))
          if min(x + 1.0, 1.0 + o.nodes) / cost > rival:
            return True
      return False

    return tuple(o for o in self.options if o.kind != "hybrid" or can_win(o))

  @property
  def blocks(self) -> tuple[int, ...]:
    return tuple(o.block for o in self.options)

  @property
  def program_name(self) -> str:
    """What its decode program's load time is remembered by (cost_model.remember_load): the
    options compiled into it, which decide its size."""
    return "auto:" + ",".join(o.name for o in self.options)

  @property
  def max_nodes(self) -> int:
    return max((o.nodes for o in self.options if o.kind == "hybrid"), default=1)

  @property
  def selected(self) -> int:
    """Draft nodes the per-step estimate ranks: the most any option holds."""
    return min(self.draft_nodes, max(o.nodes for o in self.options))

  @property
  def _esp(self) -> ESP:
    """The mask machinery: one mask, candidates for the largest hybrid tree."""
    return ESP(masks=1, budget=2 * (self.max_nodes + 1), ema=self.ema, sampler=self.sampler)

  @property
  def _template(self) -> Template | None:
    return template(self.recycled) if self.recycled else None

  @property
  def block_size(self) -> int:
    return max(self.blocks)

  @property
  def max_step_tokens(self) -> int:
    return self.chain + 1  # the deepest draft: recycled trees are no deeper (__post_init__)

  def new_memory(self, cfg):
    return super().new_memory(cfg) if self.recycled else None

  def leave_memory(self, state):
    return super().leave_memory(state) if self.recycled else None

  def prefill(self, model: Transformer, state: DecodeState, key: jax.Array) -> DecodeState:
    state = self._esp.prefill(model, state, key)
    b, n = state.length.shape[0], self.chain
    esp = state.extra.replace(hist=jnp.zeros((b, self.max_step_tokens + 1), jnp.int32))
    table = (SuccessorTable.start(state.memory, b, model.cfg.vocab_size, self.top_k)
             if self.recycled else None)
    zeros = jnp.zeros((b,), jnp.float32)
    return state.replace(memory=(), extra=AutoState(
        esp=esp, table=table, fresh=jnp.ones((b,), bool),
        chain_seen=jnp.zeros((b, n), jnp.float32), chain_hits=jnp.zeros((b, n), jnp.float32),
        esp_mass=zeros, esp_hits=zeros, rec_mass=zeros, rec_hits=zeros,
        runs=jnp.zeros((len(self.options),), jnp.int32),
        shadow=ShadowLookup.start(b, max(self.shadow_nodes, 1))))

  def chain_rates(self, hits: jax.Array, seen: jax.Array) -> jax.Array:
    """Per depth [B, L], the rate at which the model generates the chain's d-th token once it has
    generated the first d - 1. Depth 1 starts from `chain_prior`; depth d from depth d - 1's
    estimate, with the same strength: deep depths are observed only when a long chain runs, and
    a chain that keeps matching tends to go on matching (a flat prior there kept long chains from
    ever being tried where the text repeats at length)."""
    h, m = self.chain_prior
    mean, rates = jnp.full(hits.shape[:1], h / (h + m)), []
    for d in range(hits.shape[1]):
      mean = (hits[:, d] + (h + m) * mean) / (seen[:, d] + h + m)
      rates.append(mean)
    return jnp.stack(rates, axis=1)

  def recycled_reach(self, rec_hits: jax.Array, rec_mass: jax.Array, logp: jax.Array,
                     valid: jax.Array) -> jax.Array:
    """[B, K] the probability of reaching each recycled node: prod min(1, c p) along its path, p
    the recorded probabilities, c = (hits + 1) / (mass + 1); each node's siblings and itself
    together at most 1 at every level."""
    parents = np.asarray(self._template.layout.parents)  # tree slot of each node's parent, 0 root
    c = (rec_hits + 1.0) / (rec_mass + 1.0)
    q = jnp.where(valid, jnp.minimum(1.0, c[:, None] * jnp.exp(logp)), 0.0)
    by_parent = jnp.zeros((q.shape[0], len(parents) + 1)).at[:, parents].add(q)
    q = q / jnp.maximum(1.0, by_parent[:, parents])
    reach = []
    for i, p in enumerate(parents):  # parents come first
      reach.append(q[:, i] if p == 0 else q[:, i] * reach[p - 1])
    return jnp.stack(reach, axis=1)

  def drafts(self, state: DecodeState) -> tuple[Drafts, jax.Array, jax.Array]:
    """This step's draft candidates, and the lookup chain [B, L] with its valid length [B]."""
    ex: AutoState = state.extra
    b, n = state.last.shape[0], self.chain
    ctx, length = context(state)
    chain, chain_valid = lookup(ctx, length, self.max_ngram, n)
    in_chain = jnp.arange(n)[None, :] < chain_valid[:, None]
    chain_p = jnp.cumprod(self.chain_rates(ex.chain_hits, ex.chain_seen), axis=1) * in_chain
    parts = [Drafts(jnp.broadcast_to(jnp.arange(-1, n - 1, dtype=jnp.int32), (b, n)), chain,
                    jnp.ones((b, n)), chain_p, in_chain, tuple(range(1, n + 1)))]
    if self.recycled:
      tpl = self._template
      tokens, logp, valid = ex.table.expand(state.last, tpl)
      parts.append(Drafts(
          jnp.broadcast_to(jnp.asarray(tpl.layout.parents, jnp.int32) - 1, tokens.shape), tokens,
          jnp.where(valid, jnp.exp(logp), 0.0),
          self.recycled_reach(ex.rec_hits, ex.rec_mass, logp, valid), valid, tpl.layout.depths[1:]))
    cat = lambda name: jnp.concatenate([getattr(p, name) for p in parts], axis=1)
    return (Drafts(concat_parents([p.parent for p in parts]), cat("tokens"), cat("own"),
                   cat("reach"), cat("valid"), sum((p.levels for p in parts), ())),
            chain, chain_valid)

  def esp_reach(self, ex: AutoState, score: jax.Array, valid: jax.Array) -> jax.Array:
    """[B, C] the mask candidates' reach probabilities (score: their log prod q)."""
    calib = (ex.esp_hits + 1.0) / (ex.esp_mass + 1.0)
    p = jnp.where(valid & ex.fresh[:, None],
                  jnp.clip(calib[:, None] * jnp.exp(score), 0.0, 1.0), 0.0)
    # Alternatives for the same (first) token: together reached with probability at most 1.
    return p / jnp.maximum(1.0, p.sum(axis=1, keepdims=True))

  def expected(self, draft_p: jax.Array, esp_p: jax.Array) -> tuple[jax.Array, ...]:
    """Expected tokens appended [B] per option, from the reach probabilities of the distinct
    draft nodes [B, D] and of the mask candidates [B, C]."""
    top = lambda p, k: jax.lax.top_k(p, min(k, p.shape[1]))[0].sum(axis=1)
    out = []
    for o in self.options:
      if o.kind == "plain":
        out.append(jnp.ones(draft_p.shape[:1]))
      elif o.kind == "draft":
        out.append(1.0 + top(draft_p, o.nodes))
      else:
        out.append(1.0 + top(jnp.concatenate([draft_p, esp_p], axis=1), o.nodes))
    return tuple(out)

  def choose(self, expected: tuple[jax.Array, ...], active: jax.Array, cache_len: int) -> jax.Array:
    """Index of the option with the most expected tokens per second over the active rows."""
    if self.cost_model is None:
      raise ValueError("Auto needs a cost model: auto.with_cost_model(cost_model_for(model, "
                       "auto.blocks))")
    rate = jnp.stack([jnp.where(active, e, 0.0).sum() / self.cost_model.seconds(o.block, cache_len)
                      for e, o in zip(expected, self.options)])
    return jnp.argmax(rate).astype(jnp.int32)

  def step(self, model: Transformer, state: DecodeState, key: jax.Array) -> DecodeState:
    ex: AutoState = state.extra
    b, n = state.last.shape[0], self.chain
    drafts, chain, chain_valid = self.drafts(state)
    log_reach = jnp.log(jnp.maximum(drafts.reach, 1e-9))
    if self.recycled:  # a token both sources propose is one node
      draft_p = jnp.exp(select_nodes(state.last, drafts.parent, drafts.tokens, log_reach,
                                     drafts.valid, drafts.levels, self.selected).node_score)
    else:  # the chain alone: its nodes are distinct
      draft_p = drafts.reach
    parent, tokens, score, valid, levels = dynamic_candidates(
        state.last, ex.esp.cand_tokens, ex.esp.cand_logp, self.max_nodes + 1)
    esp_p = self.esp_reach(ex, score, valid)
    expected = self.expected(draft_p, esp_p)
    active = ~state.done
    # The starter's only branch is plain decoding's.
    choice = (jnp.zeros((), jnp.int32) if self.plain_only else
              self.choose(expected, active, state.cache.length))
    depth_of = lambda o: min(n, o.nodes)
    kept_len = 1 + max(depth_of(o) for o in self.options)
    rows = min(self.recorded, kept_len)

    def fed(tree: Tree, out):
      """The first `rows` tokens of the accepted path, their top-k successors and validity."""
      if not self.recycled:
        return ()
      at = _pad(out.path[:, :rows], rows)
      top, logp = top_log_probs(jnp.take_along_axis(out.logits, at[:, :, None], axis=1),
                                self.top_k)
      return (jnp.take_along_axis(tree.tokens, at, axis=1), top, logp,
              jnp.arange(rows)[None, :] <= out.accepted[:, None])

    def draft_only(tree: Tree, depth: int):
      """A step without masks: the candidates fall one token behind."""
      def run(s):
        out = tree_step(model, s, tree, None, depth, self.sampler, key, commit_cache=False)
        masks = ema_update(s.extra.masks, model.embed_tokens(out.tokens), out.appended, self.ema)
        esp = s.extra.replace(masks=masks, hist=count_appended(s.extra.hist, out.appended, active))
        return (out.state.replace(extra=esp), out.kept.pad(kept_len), _pad(out.tokens, n + 1),
                jnp.zeros((b,), bool), fed(tree, out))
      return run

    def hybrid(o: Option):
      """The draft candidates and the mask candidates in one tree; the masks are refreshed."""
      def run(s):
        tree = select_tree(
            s.last, concat_parents([drafts.parent, parent]),
            jnp.concatenate([drafts.tokens, tokens], axis=1),
            jnp.concatenate([log_reach, jnp.log(jnp.maximum(esp_p, 1e-9))], axis=1),
            jnp.concatenate([drafts.valid, valid], axis=1), drafts.levels + levels, o.nodes)
        out = esp_tree_step(model, s, tree, depth_of(o), self.sampler, self.ema,
                            self._esp.num_candidates, key, commit_cache=False)
        new = out.state
        # The model's tokens along the accepted path, as appended at the old length.
        toks = jax.vmap(lambda row, at: jax.lax.dynamic_slice_in_dim(row, at, n + 1))(
            _pad(new.tokens, new.tokens.shape[1] + n + 1), s.length)
        return new, out.kept.pad(kept_len), toks, jnp.ones((b,), bool), fed(tree, out)
      return run

    branches = []
    for o in self.options[:1] if self.plain_only else self.options:
      if o.kind == "plain":
        root = Tree(state.last[:, None], jnp.zeros((b, 1), jnp.int32), jnp.ones((b, 1), bool))
        branches.append(draft_only(root, 0))
      elif o.kind == "draft" and not self.recycled:
        branches.append(draft_only(chain_tree(state.last, chain[:, :o.nodes],
                                              jnp.minimum(chain_valid, o.nodes)), o.nodes))
      elif o.kind == "draft":
        branches.append(draft_only(
            select_tree(state.last, drafts.parent, drafts.tokens, log_reach, drafts.valid,
                        drafts.levels, o.nodes), depth_of(o)))
      else:
        branches.append(hybrid(o))
    # No branch writes the cache (XLA would copy it for each): the path's K/V is committed after.
    new, kept, toks, fresh, recorded = jax.lax.switch(choice, branches, state.replace(extra=ex.esp))
    appended = new.length - state.length
    new = new.replace(cache=commit(state.cache, kept, appended))
    # Observe the chain drafted before the step against the tokens the model generated: depth d
    # was reached when the model generated the chain's first d - 1 tokens and a d-th.
    made = jnp.arange(n)[None, :] < appended[:, None]
    same = (toks[:, :n] == chain) & made
    prefix = jnp.cumprod(jnp.concatenate([jnp.ones((b, 1), jnp.int32), same[:, :-1]], axis=1),
                         axis=1) > 0
    seen = prefix & made & (jnp.arange(n)[None, :] < chain_valid[:, None]) & active[:, None]
    # ... and the depth-1 candidates of the masks (where fresh) and of the successor table
    # against the model's first token.
    observe = active & (appended > 0)
    first = ex.esp.cand_tokens[:, 0, :self.max_nodes]
    mass = jnp.exp(ex.esp.cand_logp[:, 0, :self.max_nodes]).sum(axis=1)
    hit = (first == toks[:, :1]).any(axis=1)
    table, rec_mass, rec_hits = ex.table, ex.rec_mass, ex.rec_hits
    if self.recycled:
      fed_tokens, top, logp, fed_valid = recorded
      table = table.record(fed_tokens, top, logp, fed_valid & active[:, None])
      root_children = np.asarray(self._template.layout.parents) == 0
      rec_tok, rec_p, rec_valid = (x[:, n:][:, root_children]
                                   for x in (drafts.tokens, drafts.own, drafts.valid))
      rec_mass = rec_mass + jnp.where(observe, rec_p.sum(axis=1), 0.0)
      rec_hits = rec_hits + (observe & ((rec_tok == toks[:, :1]) & rec_valid).any(axis=1))
    return new.replace(extra=AutoState(
        esp=new.extra, table=table, fresh=jnp.where(active, fresh, ex.fresh),
        chain_seen=self.chain_memory * ex.chain_seen + seen,
        chain_hits=self.chain_memory * ex.chain_hits + (seen & same),
        esp_mass=ex.esp_mass + jnp.where(observe & ex.fresh, mass, 0.0),
        esp_hits=ex.esp_hits + (observe & ex.fresh & hit),
        rec_mass=rec_mass, rec_hits=rec_hits,
        runs=ex.runs.at[choice].add(active.any().astype(jnp.int32)),
        shadow=(ex.shadow.follow(chain, chain_valid, toks[:, 0], active, self.chain_memory)
                if self.plain_only else ex.shadow)))


def _pad(x: jax.Array, width: int) -> jax.Array:
  return jnp.pad(x, ((0, 0), (0, width - x.shape[1])))
