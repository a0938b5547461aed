"""The hybrid tree: one draft tree under one BC budget from every training-free source, its slots
filled by each node's estimated acceptance probability, learnt online in this generation.

Sources, each proposing candidate nodes below the root with the source's own probability of the
node given its parent ("own"):
- esp: ESP's probes, the dynamic-tree candidates of the mask distributions (own = q_i(token));
- suffix: the suffix drafter's trie of continuations (effjax.decoding.suffix; own = the count
  ratio of the node to its parent);
- recycle: Token Recycling's successors (effjax.decoding.recycling) along its whole 80-node
  reference template at every budget (own = the probability the model gave the successor when it
  was recorded; the table carries over between generations as Token Recycling's does, `inherit`);
- ngram: the prompt-lookup chain (effjax.decoding.pld; own = 1).
A node proposed by several sources is one node (select_nodes merges it, keeping its best estimate).

Each candidate's acceptance probability given its parent is estimated as own * c, with c a
calibration factor per row and cell (source, depth, confidence bin), shrunk towards its source's:
  c = (hits + prior * c_source) / (own_seen + prior),  c_source = (H + prior) / (O + prior),
where hits counts the candidates of that cell whose parent was reached this generation and whose
token the model chose there, own_seen sums their own probabilities, and H, O are the same sums over
all the source's cells (so c starts at 1, trusting the source, moves to the source's measured hit
rate as soon as any of its cells has evidence, and to the cell's own as the cell gathers some: a
deep node of a source that has been overconfident at depth 1 is not trusted at face value). Every
candidate whose parent lies on the accepted path is observed, kept in the tree or not (the model's
token at every accepted node is known), so a source the tree left out is still measured. The
confidence bins: esp by q (< 0.1, < 0.3, < 0.6, above); suffix by the match length (1, 2-3, 4-7,
8+); recycle by successor rank (0, 1, 2-3, 4+); ngram by the matched n-gram's length. A node's
estimate is the product along its path (cumulative log scores); the tree keeps the num_nodes best,
ancestor-closed. Nothing is fitted to a benchmark's questions: the statistics start empty in every
generation and live in the loop state (the prior, the bins and the presets' mask count were compared
on questions of our own, benchmarks/tuning).

The block of a step is the tree's owners and ESP's mask(s) after only the `masked_owners` owners
most likely to end the accepted path (`likely_ends`: the estimated probability of reaching the
owner less that of reaching one of its children; bc / 10 of them in the presets). The next step's
ESP candidates come from the masks of the deepest accepted node; where it has none, ESP proposes
nothing for that step and the other sources fill the tree.

For cost-aware budgets: `Hybrid.plan(state)` gives the next step's candidates and tree with each
node's estimated path probability, and `expected_tokens` the expected tokens one step appends with
the best tree of n nodes for every n (1 + the sum of the n largest path probabilities: each node
is accepted with its path probability, the bonus token always comes). `HybridState.expected`
holds that curve for the step just taken; `predicted` / `accepted` sum the expected and the
actual accepted nodes over the generation (how well the estimate is calibrated).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from effjax.decoding.engine import DecodeState
from effjax.decoding.esp import ESP, ESPState, dynamic_candidates, esp_tree_step
from effjax.decoding.pld import context, lookup_match
from effjax.decoding.recycling import TOP_K, InheritsTable, SuccessorTable, template
from effjax.decoding.suffix import suffix_candidates
from effjax.decoding.tree import Selection, Tree, concat_parents, select_nodes
from effjax.models.transformer import Transformer

SOURCES = ("esp", "suffix", "recycle", "ngram")
ESP_SRC, SUFFIX_SRC, RECYCLE_SRC, NGRAM_SRC = range(len(SOURCES))
DEPTHS = 8  # depth cells: 1..7 and 8+
BINS = 4
ESP_BINS = (0.1, 0.3, 0.6)  # bin edges on q
SUFFIX_BINS = (2, 4, 8)  # bin edges on the match length
RECYCLE_BINS = (1, 2, 4)  # bin edges on the successor rank


@struct.dataclass
class AcceptanceStats:
  """Per row and cell [B, source, depth, bin]: candidates observed (their parent was reached),
  hits (the model chose their token there) and the sum of their own probabilities."""

  seen: jax.Array
  hits: jax.Array
  own: jax.Array

  @classmethod
  def empty(cls, batch: int) -> "AcceptanceStats":
    z = jnp.zeros((batch, len(SOURCES), DEPTHS, BINS), jnp.float32)
    return cls(z, z, z)

  def calibration(self, prior: float) -> jax.Array:
    """[B, source, depth, bin] the factor c by which each cell's own probabilities are scaled: the
    cell's hits over its own probabilities, shrunk towards its source's factor over all cells."""
    total = lambda x: x.sum((2, 3), keepdims=True)
    source = (total(self.hits) + prior) / (total(self.own) + prior)
    return (self.hits + prior * source) / (self.own + prior)

  def observe(self, cell: jax.Array, own: jax.Array, seen: jax.Array, hit: jax.Array
              ) -> "AcceptanceStats":
    """Add candidates (cell [B, C] flat cell index, own [B, C]) where seen [B, C]."""
    b = cell.shape[0]
    add = lambda x, v: x.reshape(b, -1).at[jnp.arange(b)[:, None], cell].add(
        jnp.where(seen, v, 0.0)).reshape(x.shape)
    return AcceptanceStats(add(self.seen, 1.0), add(self.hits, hit.astype(jnp.float32)),
                           add(self.own, own))


@struct.dataclass
class Candidates:
  """All sources' candidates in one list, [B, C] (a parent at a lower level than its child)."""

  parent: jax.Array  # candidate index of the parent, -1 = the root
  tokens: jax.Array
  own: jax.Array  # the source's probability of the node given its parent
  valid: jax.Array
  cell: jax.Array  # flat (source, depth, bin) cell
  counted: jax.Array  # whether an observation of it is counted (one copy per suffix trie node)
  levels: tuple[int, ...]

  @classmethod
  def concat(cls, parts: list["Candidates"]) -> "Candidates":
    """Parts in order; parent indices shift by each part's offset."""
    cat = lambda name: jnp.concatenate([getattr(p, name) for p in parts], axis=1)
    return cls(parent=concat_parents([p.parent for p in parts]), tokens=cat("tokens"),
               own=cat("own"), valid=cat("valid"), cell=cat("cell"), counted=cat("counted"),
               levels=sum((p.levels for p in parts), ()))


def cell_index(source: int, levels: tuple[int, ...], bins: jax.Array) -> jax.Array:
  """Flat cell of (source, min(level, DEPTHS), bin) per candidate; bins [B, C]."""
  depth = np.minimum(np.asarray(levels), DEPTHS) - 1
  return ((source * DEPTHS + depth)[None, :] * BINS + bins).astype(jnp.int32)


def expected_tokens(path_logp: jax.Array, valid: jax.Array, sizes: int) -> jax.Array:
  """[B, sizes + 1]: expected tokens one step appends with a tree of the n best nodes, n = 0..sizes:
  1 + the sum of the n largest path probabilities (path_logp [B, C] of distinct nodes, e.g. a
  Selection's node_score; a node never scores above its parent, so the n best are a tree)."""
  p = jnp.where(valid, jnp.exp(path_logp), 0.0)
  top = jax.lax.top_k(p, min(sizes, p.shape[1]))[0]
  top = jnp.pad(top, ((0, 0), (0, sizes - top.shape[1])))
  return 1.0 + jnp.concatenate([jnp.zeros_like(top[:, :1]), jnp.cumsum(top, axis=1)], axis=1)


def likely_ends(tree: Tree, node_score: jax.Array, m: int) -> jax.Array:
  """[B, m] the owners most likely to end the accepted path: the estimated probability of reaching
  the owner (the root always; a node exp(node_score), its path probability) less that of reaching
  one of its children."""
  b, o = tree.tokens.shape
  reach = jnp.where(tree.valid, jnp.concatenate([jnp.ones((b, 1)), jnp.exp(node_score)], axis=1),
                    0.0)
  into = jnp.zeros((b, o)).at[jnp.arange(b)[:, None], tree.parent[:, 1:]].add(reach[:, 1:])
  return jax.lax.top_k(jnp.where(tree.valid, reach - into, -jnp.inf), m)[1].astype(jnp.int32)


# Preset budget -> owners followed by a mask (see Hybrid.preset).
MASKED_OWNERS: dict[int, int] = {10: 1, 30: 3, 60: 6, 80: 6}


@struct.dataclass
class HybridState:
  esp: ESPState  # masks, their candidates and the histogram of tokens per call
  table: SuccessorTable
  stats: AcceptanceStats
  expected: jax.Array  # [B, num_nodes + 1] this step's expected tokens by tree size (see module)
  predicted: jax.Array  # [B] sum over steps of the expected accepted nodes of the tree used
  accepted: jax.Array  # [B] sum over steps of the nodes accepted (before any EOS / limit cut)


@dataclasses.dataclass(frozen=True, eq=False)
class Hybrid(InheritsTable, ESP):
  """The hybrid tree at `budget` BC tokens per forward with `masks` ESP masks after each of
  `masked_owners` owners, those most likely to end the accepted path (node slots = budget - 1 -
  masked_owners * masks); masked_owners=None puts masks after every owner as ESP does (node slots
  = budget / (masks + 1) - 1). Source settings: the lookup chain (`chain` tokens, n-grams up to
  `max_ngram`), the suffix trie (`occurrences` most recent occurrences, match lengths up to
  `max_match`, nodes of support ratio >= `min_token_prob`), the recycled successors (`top_k` per
  token). `prior`: pseudo-count of the calibration factor (how many expected hits of evidence it
  takes to move c halfway from 1)."""

  widths: None = None
  budget: int = 30
  masked_owners: int | None = None
  chain: int = 10
  max_ngram: int = 3
  occurrences: int = 8
  max_match: int = 8  # 8, 16 and 64 gave tau within 0.01 on benchmarks/tuning; 8 costs least
  min_token_prob: float = 0.1
  top_k: int = TOP_K
  prior: float = 1.0
  inherit: bool = True  # the successor table carries over between generations (Token Recycling)

  def __post_init__(self):
    if self.widths is not None:
      raise ValueError("the hybrid uses ESP's dynamic candidates: leave widths None")
    super().__post_init__()
    if min(self.chain, self.max_ngram, self.occurrences, self.max_match, self.top_k) < 1:
      raise ValueError(f"chain, max_ngram, occurrences, max_match and top_k must be >= 1, got "
                       f"{self.chain}, {self.max_ngram}, {self.occurrences}, {self.max_match}, "
                       f"{self.top_k}")
    if self.prior <= 0 or not 0 <= self.min_token_prob <= 1:
      raise ValueError(f"need prior > 0 and 0 <= min_token_prob <= 1, got {self.prior}, "
                       f"{self.min_token_prob}")
    if max(template().ranks) >= self.top_k:
      raise ValueError(f"top_k={self.top_k} is below the recycling template's ranks")
    if self.masked_owners is not None and not 1 <= self.masked_owners <= self.num_nodes + 1:
      raise ValueError(f"masked_owners={self.masked_owners} must be between 1 and the owners of "
                       f"the tree ({self.num_nodes + 1} at budget {self.budget})")

  @property
  def num_nodes(self) -> int:
    if self.masked_owners is None:
      return super().num_nodes
    return self.budget - 1 - self.masked_owners * self.masks

  @classmethod
  def preset(cls, bc: int, **kw) -> "Hybrid":
    """BC10 / 30 / 60 / 80 with one mask (ESP's ablation finds one as good as two at BC60, ESP.md)
    after each of the 1 / 3 / 6 / 6 owners most likely to end the path (8 / 26 / 53 / 73 node
    slots). The next step's ESP candidates come from the masks of the deepest accepted node alone,
    so masks after every owner (4 / 14 / 29 node slots) spend half the forward on rows that one
    step in many reads; a tenth of it keeps the likely ends covered and gives the rest to drafts.
    BC80 (Token Recycling's forward size) keeps BC60's six: on benchmarks/tuning, eight gave
    SmolLM2 tau 3.83 against 4.06 with six (BENCHMARKS.md)."""
    if bc not in MASKED_OWNERS:
      raise ValueError(f"no hybrid preset for BC{bc}; choose one of {sorted(MASKED_OWNERS)}")
    return cls(masks=1, budget=bc, masked_owners=MASKED_OWNERS[bc], **kw)

  @property
  def chain_len(self) -> int:
    return min(self.chain, self.num_nodes)

  @property
  def depth(self) -> int:
    return self.num_nodes  # a suffix or lookup chain may fill every slot

  def prefill(self, model: Transformer, state: DecodeState, key: jax.Array) -> DecodeState:
    state = super().prefill(model, state, key)
    b = state.length.shape[0]
    zeros = jnp.zeros((b,), jnp.float32)
    return state.replace(extra=HybridState(
        esp=state.extra, table=SuccessorTable.start(state.memory, b, model.cfg.vocab_size,
                                                    self.top_k),
        stats=AcceptanceStats.empty(b), expected=jnp.ones((b, self.num_nodes + 1)),
        predicted=zeros, accepted=zeros), memory=())

  def candidates(self, state: DecodeState) -> Candidates:
    """Every source's candidates for the next step, with cells and own probabilities."""
    ex: HybridState = state.extra
    n = self.num_nodes
    b = state.last.shape[0]
    ctx, length = context(state)
    parts = []

    # ESP: P(path) = prod q_i; own = q_i of the node (its score minus its parent's).
    parent, tokens, score, valid, levels = dynamic_candidates(
        state.last, ex.esp.cand_tokens, ex.esp.cand_logp, n + 1)
    local = score - jnp.where(parent >= 0, jnp.take_along_axis(score, jnp.maximum(parent, 0),
                                                               axis=1), 0.0)
    q = jnp.where(valid, jnp.exp(local), 0.0)
    parts.append(Candidates(parent, tokens, q, valid,
                            cell_index(ESP_SRC, levels, jnp.digitize(q, jnp.array(ESP_BINS))),
                            valid, levels))

    # Suffix trie: own = support ratio to the parent; bin by the match length.
    sc = suffix_candidates(ctx, length, occurrences=self.occurrences, depth=n,
                           max_depth=self.max_match, max_spec=n, alpha=1.0, offset=0.0,
                           min_token_prob=self.min_token_prob)
    keep = sc.valid & (sc.prob >= self.min_token_prob)
    first = sc.first == jnp.arange(sc.first.shape[1])[None, :]
    bins = jnp.broadcast_to(jnp.digitize(sc.match, jnp.array(SUFFIX_BINS))[:, None],
                            sc.tokens.shape)
    parts.append(Candidates(sc.parent, sc.tokens, sc.ratio, keep,
                            cell_index(SUFFIX_SRC, sc.levels, bins), keep & first, sc.levels))

    # Recycled successors along the reference template (all 80 nodes, whatever the budget: the
    # estimates choose which fill the slots): own = their recorded probability; bin by rank.
    tpl = template()
    tokens, logp, valid = ex.table.expand(state.last, tpl)
    parent = jnp.broadcast_to(jnp.asarray(tpl.layout.parents, jnp.int32) - 1, tokens.shape)
    levels = tpl.layout.depths[1:]
    bins = jnp.broadcast_to(jnp.digitize(jnp.asarray(tpl.ranks), jnp.array(RECYCLE_BINS)),
                            tokens.shape)
    parts.append(Candidates(parent, tokens, jnp.where(valid, jnp.exp(logp), 0.0), valid,
                            cell_index(RECYCLE_SRC, levels, bins), valid, levels))

    # Prompt lookup chain: own = 1; bin by the matched n-gram's length.
    m = self.chain_len
    chain, valid_len, ngram = lookup_match(ctx, length, self.max_ngram, m)
    valid = jnp.arange(m)[None, :] < valid_len[:, None]
    levels = tuple(range(1, m + 1))
    bins = jnp.broadcast_to(jnp.clip(ngram - 1, 0, BINS - 1)[:, None], chain.shape)
    parts.append(Candidates(jnp.broadcast_to(jnp.arange(-1, m - 1, dtype=jnp.int32), (b, m)),
                            chain, jnp.ones(chain.shape), valid,
                            cell_index(NGRAM_SRC, levels, bins), valid, levels))
    return Candidates.concat(parts)

  def plan(self, state: DecodeState) -> tuple[Candidates, Selection]:
    """The next step's candidates and the tree of the num_nodes best by estimated acceptance:
    each candidate's probability given its parent is own * c(cell), a node's the product along
    its path (Selection.node_score, log). `expected_tokens(sel.node_score, sel.tree.valid[:, 1:],
    n)` turns it into the expected tokens per step of the best trees of 0..n nodes."""
    ex: HybridState = state.extra
    cand = self.candidates(state)
    calib = ex.stats.calibration(self.prior).reshape(cand.cell.shape[0], -1)
    rate = jnp.clip(cand.own * jnp.take_along_axis(calib, cand.cell, axis=1), 1e-6, 1.0)
    return cand, select_nodes(state.last, cand.parent, cand.tokens, jnp.log(rate), cand.valid,
                              cand.levels, self.num_nodes, cumulative=True)

  def step(self, model: Transformer, state: DecodeState, key: jax.Array) -> DecodeState:
    ex: HybridState = state.extra
    cand, sel = self.plan(state)
    active = ~state.done
    ends = None if self.masked_owners is None else likely_ends(sel.tree, sel.node_score,
                                                                self.masked_owners)
    out = esp_tree_step(model, state.replace(extra=ex.esp), sel.tree, self.depth, self.sampler,
                        self.ema, self.num_candidates, key, mask_owners=ends)
    # Observe every candidate whose parent is on the accepted path: was its token the model's?
    on_path = ((out.path[:, None, :] == sel.parent[:, :, None])
               & (jnp.arange(out.path.shape[1]) <= out.accepted[:, None])[:, None, :])
    seen = cand.valid & cand.counted & active[:, None] & on_path.any(axis=2)
    hit = (on_path & (cand.tokens[:, :, None] == out.tokens[:, None, :])).any(axis=2)
    stats = ex.stats.observe(cand.cell, cand.own, seen, hit)
    table = ex.table.update(sel.tree.tokens, out.logits, sel.tree.valid & active[:, None])
    expected = expected_tokens(sel.node_score, sel.tree.valid[:, 1:], self.num_nodes)
    gain = jnp.where(active, expected[:, -1] - 1.0, 0.0)
    return out.state.replace(extra=HybridState(
        esp=out.state.extra, table=table, stats=stats, expected=expected,
        predicted=ex.predicted + gain,
        accepted=ex.accepted + jnp.where(active, out.accepted, 0).astype(jnp.float32)))
