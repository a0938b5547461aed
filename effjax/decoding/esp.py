"""ESP: training-free multi-token prediction by embedding-space probing (ESP.md).

k mask embeddings appended after the context make a frozen LM guess the next k tokens at once: the
logits at mask i propose the token i + 1 steps after its owner. Each step drafts a token tree from
the mask distributions of the previous step, verifies it and computes the next masks in one
forward (effjax.decoding.tree), and commits the accepted tokens. Greedy output equals plain greedy
decoding; at temperature > 0 the walk follows the model's own samples, so sampling is lossless too.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
from flax import struct

from effjax.decoding.engine import DecodeState, Strategy, sample_first
from effjax.decoding.sampling import GREEDY, Sampler
from effjax.decoding.topk import top_log_probs
from effjax.decoding.tree import (Layout, StepOutcome, Tree, count_appended, select_tree,
                                  tree_step)
from effjax.models.cache import commit, write_rows
from effjax.models.transformer import Transformer

MaskInit = Literal["mean", "sample", "last"]

# Static presets (ESP.md): BC = (k + 1)(1 + sum K_i).
PRESETS: dict[int, tuple[int, ...]] = {10: (4,), 30: (14,), 60: (15, 4)}


@struct.dataclass
class ESPState:
  masks: jax.Array  # [B, k, D] mask input embeddings
  cand_tokens: jax.Array  # [B, k, M] top tokens of each mask's distribution q_i, best first
  cand_logp: jax.Array  # [B, k, M] their log-probabilities
  hist: jax.Array  # [B, max_step_tokens + 1] model calls by tokens appended


@dataclasses.dataclass(frozen=True, eq=False)
class ESP(Strategy):
  """ESP decoding with one of the two trees of ESP.md:

  - static: `widths` [K_1..K_k] with top-1 expansion; the masks (k) and the budget
    BC = (k + 1)(1 + sum K_i) follow from it;
  - dynamic (paper Alg. 1): `masks` k and a `budget` of BC tokens per forward, widths None.

  Give one or the other: `ESP(widths=(14,))`, `ESP(masks=2, budget=60)`. Arguments that contradict
  each other (`ESP(widths=(4,), masks=2)`) are an error, never silently overridden. `ESP()` is the
  static BC10 tree; `ESP(budget=30)` the dynamic tree with one mask.
  """

  widths: tuple[int, ...] | None = None
  masks: int | None = None
  budget: int | None = None
  init: MaskInit = "mean"
  ema: float = 0.1
  sampler: Sampler = GREEDY
  hooks = True

  def __post_init__(self):
    set_ = lambda name, value: object.__setattr__(self, name, value)
    if self.widths is None and self.masks is None and self.budget is None:
      set_("widths", PRESETS[10])
    if self.widths is not None:
      set_("widths", tuple(self.widths))
      if not 1 <= len(self.widths) <= 3 or min(self.widths) < 1:
        raise ValueError(f"a static tree needs 1 to 3 depths (one per mask) of width >= 1, got "
                         f"{self.widths}")
      masks, budget = len(self.widths), (len(self.widths) + 1) * (1 + sum(self.widths))
      for name, implied in (("masks", masks), ("budget", budget)):
        given = getattr(self, name)
        if given is not None and given != implied:
          raise ValueError(f"the static tree widths={self.widths} implies {name}={implied}, but "
                           f"{name}={given} was given: give widths alone for the static tree, or "
                           f"widths=None with masks and budget for the dynamic one")
      set_("masks", masks)
      set_("budget", budget)
    else:
      if self.budget is None:
        raise ValueError(f"the dynamic tree (widths=None) needs a budget BC, e.g. "
                         f"ESP(masks={self.masks}, budget=60)")
      if self.masks is None:
        set_("masks", 1)
      if not 1 <= self.masks <= 3:
        raise ValueError(f"masks must be 1, 2 or 3, got {self.masks}")
      if self.budget % (self.masks + 1) or self.budget // (self.masks + 1) <= self.masks:
        raise ValueError(f"budget BC={self.budget} must be a multiple of masks + 1 = "
                         f"{self.masks + 1} with BC / (masks + 1) > masks")
    if self.init not in ("mean", "sample", "last"):
      raise ValueError(f"init must be mean, sample or last, got {self.init!r}")
    if not 0 <= self.ema <= 1:
      raise ValueError(f"ema must be in [0, 1], got {self.ema}")

  @property
  def dynamic(self) -> bool:
    return self.widths is None

  @classmethod
  def preset(cls, bc: int, *, dynamic: bool = False, **kw) -> "ESP":
    """BC10 / BC30 / BC60 (ESP.md); dynamic=True uses Alg. 1 with the preset's k and budget."""
    if bc not in PRESETS:
      raise ValueError(f"no ESP preset for BC{bc}; choose one of {sorted(PRESETS)}")
    if dynamic:
      return cls(masks=len(PRESETS[bc]), budget=bc, **kw)
    return cls(widths=PRESETS[bc], **kw)

  @property
  def num_nodes(self) -> int:
    return self.budget // (self.masks + 1) - 1

  @property
  def depth(self) -> int:
    return self.masks if self.widths is None else Layout.top1(self.widths).depth

  @property
  def block_size(self) -> int:
    return self.budget

  @property
  def max_step_tokens(self) -> int:
    return self.depth + 1

  @property
  def num_candidates(self) -> int:
    """Tokens kept per mask distribution: enough for the widest depth after pruning."""
    return (max(self.widths) + 1) if self.widths is not None else self.num_nodes + 1

  def prefill(self, model: Transformer, state: DecodeState, key: jax.Array) -> DecodeState:
    k_init, k_tok = jax.random.split(key)
    masks = init_masks(model.embed_tokens(state.prompt), state.prompt_len, self.masks, self.init,
                       k_init)
    logits, mask_logits, hidden, cache = prefill_with_masks(model, state, masks)
    if mask_logits.shape[-1] < self.num_candidates:
      raise ValueError(f"the tree needs {self.num_candidates} candidates per mask, more than the "
                       f"vocabulary of {mask_logits.shape[-1]} tokens")
    before = state.length
    state = sample_first(state.replace(cache=cache), logits, hidden, self.sampler, k_tok)
    masks = ema_update(masks, model.embed_tokens(state.last[:, None]), state.length - before,
                       self.ema)
    tok, logp = top_log_probs(mask_logits, self.num_candidates)
    hist = jnp.zeros((before.shape[0], self.max_step_tokens + 1), jnp.int32)
    return state.replace(extra=ESPState(masks, tok, logp, hist))

  def draft(self, state: DecodeState) -> Tree:
    ex = state.extra
    if self.widths is not None:
      return static_tree(state.last, ex.cand_tokens, self.widths)
    parent, tokens, score, valid, levels = dynamic_candidates(
        state.last, ex.cand_tokens, ex.cand_logp, self.num_nodes + 1)
    return select_tree(state.last, parent, tokens, score, valid, levels, self.num_nodes)

  def step(self, model: Transformer, state: DecodeState, key: jax.Array) -> DecodeState:
    return esp_step(model, state, self.draft(state), self.depth, self.sampler, self.ema,
                    self.num_candidates, key)


def esp_step(model: Transformer, state: DecodeState, tree: Tree, depth: int, sampler: Sampler,
             ema: float, num_candidates: int, key: jax.Array) -> DecodeState:
  """Verify `tree` with the current masks; keep the next masks' candidates (shared by hybrids)."""
  return esp_tree_step(model, state, tree, depth, sampler, ema, num_candidates, key).state


def esp_tree_step(model: Transformer, state: DecodeState, tree: Tree, depth: int,
                  sampler: Sampler, ema: float, num_candidates: int, key: jax.Array, *,
                  commit_cache: bool = True, mask_owners: jax.Array | None = None) -> StepOutcome:
  """esp_step with the whole step outcome (path, owner logits, kept K/V...); its state carries the
  new ESPState (and, with commit_cache=False, no cache: see tree_step). With mask_owners (see
  tree_step) a row whose deepest accepted node had no masks gets no candidates (log-prob -inf)."""
  ex = state.extra
  active = ~state.done
  out = tree_step(model, state, tree, ex.masks, depth, sampler, key, commit_cache=commit_cache,
                  mask_owners=mask_owners)
  tok, logp = top_log_probs(out.mask_logits, num_candidates)
  logp = jnp.where(out.mask_found[:, None, None], logp, -jnp.inf)
  masks = ema_update(ex.masks, model.embed_tokens(out.tokens), out.appended, ema)
  keep = active[:, None, None]
  extra = ESPState(masks=jnp.where(keep, masks, ex.masks),
                   cand_tokens=jnp.where(keep, tok, ex.cand_tokens),
                   cand_logp=jnp.where(keep, logp, ex.cand_logp),
                   hist=count_appended(ex.hist, out.appended, active))
  return out.replace(state=out.state.replace(extra=extra))


def init_masks(prompt_emb: jax.Array, prompt_len: jax.Array, k: int, init: MaskInit,
               key: jax.Array) -> jax.Array:
  """[B, k, D] initial mask embeddings from each row's prompt embeddings (Eq. 4 and variants):
  mean: all k masks are the mean; sample: independent draws from N(mu, sigma^2 I) fitted to the
  prompt embeddings; last: the embeddings of the last k prompt tokens."""
  b, p, _ = prompt_emb.shape
  emb = prompt_emb.astype(jnp.float32)  # [B, P, D], right-padded
  if init == "last":
    idx = jnp.maximum(prompt_len[:, None] - k + jnp.arange(k)[None, :], 0)
    return jnp.take_along_axis(emb, idx[:, :, None], axis=1)
  valid = (jnp.arange(p)[None, :] < prompt_len[:, None])[..., None]
  n = prompt_len[:, None].astype(jnp.float32)
  mu = jnp.where(valid, emb, 0).sum(axis=1) / n  # [B, D]
  if init == "mean":
    return jnp.broadcast_to(mu[:, None], (b, k, mu.shape[-1]))
  var = (jnp.where(valid, (emb - mu[:, None]) ** 2, 0).sum(axis=1) / n).mean(axis=-1)  # [B]
  noise = jax.random.normal(key, (b, k, mu.shape[-1]))
  return mu[:, None] + jnp.sqrt(var)[:, None, None] * noise


def ema_update(masks: jax.Array, new: jax.Array, count: jax.Array, lam: float) -> jax.Array:
  """Eq. 5 once per committed token, in order: m <- m + lam (e - m) for the first count[b] of
  new [B, n, D]. In closed form m_n = (1 - lam)^n m + sum_i lam (1 - lam)^(n - i) e_i."""
  n = new.shape[1]
  i = jnp.arange(1, n + 1)[None, :]
  c = count[:, None]
  w = jnp.where(i <= c, lam * (1 - lam) ** jnp.maximum(c - i, 0).astype(jnp.float32), 0.0)
  decay = (1 - lam) ** count.astype(jnp.float32)
  mixed = jnp.einsum("bn,bnd->bd", w, new.astype(jnp.float32))
  return (masks.astype(jnp.float32) * decay[:, None, None] + mixed[:, None, :]).astype(masks.dtype)


def prefill_with_masks(model: Transformer, state: DecodeState, masks: jax.Array):
  """One causal forward of each row's prompt followed by its k masks (ESP.md, Prefill): mask i
  takes the slot and position of x_{t+i} and so sees the whole prompt and masks 1..i. The masks go
  into the padding after each row's prompt (the input is widened by k columns); only the prompt's
  K/V enter the cache.

  Returns the logits at the last prompt token [B, V] and at the masks [B, k, V] (one LM-head pass
  over those rows only), the hidden states [B, D] there of the layers the state's hook asks for,
  and the cache holding the prompt alone.
  """
  b, p = state.prompt.shape
  k = masks.shape[1]
  tokens = jnp.pad(state.prompt, ((0, 0), (0, k)))
  emb = write_rows(model.embed_tokens(tokens), masks, state.prompt_len)
  valid = jnp.arange(p + k)[None, :] < (state.prompt_len + k)[:, None]
  out = model(embeddings=emb, input_mask=valid, compute_logits=False,  # the cache is empty
              hidden_layers=() if state.hook is None else state.hook.hidden_layers)
  rows = state.prompt_len[:, None] - 1 + jnp.arange(k + 1)[None, :]
  logits = model.logits(jnp.take_along_axis(out.hidden, rows[:, :, None], axis=1))
  last = (state.prompt_len - 1)[:, None, None]
  hidden = tuple(jnp.take_along_axis(h, last, axis=1)[:, 0] for h in out.layer_hidden)
  return logits[:, 0], logits[:, 1:], hidden, commit(state.cache, out.block, state.prompt_len)


def static_tree(root: jax.Array, cand_tokens: jax.Array, widths: tuple[int, ...]) -> Tree:
  """Static top-1 expansion: depth d holds the top-K_d tokens of q_d, children of the most probable
  node at depth d - 1; a token equal to its parent's is replaced by the next best."""
  b = root.shape[0]
  parent_tok, levels = root, []
  for d, w in enumerate(widths):
    cand = cand_tokens[:, d, :w + 1]
    order = jnp.argsort(cand == parent_tok[:, None], axis=1, stable=True)[:, :w]
    chosen = jnp.take_along_axis(cand, order, axis=1)
    levels.append(chosen)
    parent_tok = chosen[:, 0]
  layout = Layout.top1(widths)
  tokens = jnp.concatenate([root[:, None]] + levels, axis=1).astype(jnp.int32)
  return Tree(tokens=tokens, parent=layout.parent_array(b), valid=jnp.ones(tokens.shape, bool),
              layout=layout)


def dynamic_candidates(root: jax.Array, cand_tokens: jax.Array, cand_logp: jax.Array, owners: int):
  """Candidates of the dynamic tree (paper Alg. 1) with B = `owners` = BC / (k + 1): at depth i the
  B - i best (parent, token) pairs by log P(parent) + log q_i(token), a token equal to its parent's
  pruned. Returns (parent, tokens, score, valid) [batch, C] and the static levels; select_tree keeps
  the B - 1 best, ancestor-closed."""
  b, k, _ = cand_tokens.shape
  # Depth 1: the B - 1 best tokens of q_1 that differ from the root.
  n1 = owners - 1
  cand = cand_tokens[:, 0, :n1 + 1]
  order = jnp.argsort(cand == root[:, None], axis=1, stable=True)[:, :n1]
  tok = jnp.take_along_axis(cand, order, axis=1)
  score = jnp.take_along_axis(cand_logp[:, 0, :n1 + 1], order, axis=1)
  parents = [jnp.full((b, n1), -1, jnp.int32)]
  tokens, scores, levels = [tok], [score], [1] * n1
  offset = 0
  for i in range(2, k + 1):
    ni = owners - i
    prev_tok, prev_score, prev_n = tokens[-1], scores[-1], tokens[-1].shape[1]
    child_tok = cand_tokens[:, i - 1, :ni + 1]
    child_logp = cand_logp[:, i - 1, :ni + 1]
    pair = prev_score[:, :, None] + child_logp[:, None, :]  # [B, prev_n, ni + 1]
    pair = jnp.where(child_tok[:, None, :] == prev_tok[:, :, None], -jnp.inf, pair)
    score, flat = jax.lax.top_k(pair.reshape(b, -1), ni)
    tokens.append(jnp.take_along_axis(child_tok, flat % (ni + 1), axis=1))
    scores.append(score)
    parents.append((offset + flat // (ni + 1)).astype(jnp.int32))
    levels += [i] * ni
    offset += prev_n
  tokens = jnp.concatenate(tokens, axis=1)
  score = jnp.concatenate(scores, axis=1)
  return (jnp.concatenate(parents, axis=1), tokens, score, jnp.isfinite(score), tuple(levels))
