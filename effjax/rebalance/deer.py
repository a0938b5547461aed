"""DEER (Yang et al. 2025): dynamic early exit of reasoning, as a strategy of the decoding engine.

A per-row state machine inside the jitted decode loop (REASONING_BASELINES.md section 2):

- THINK: decode. A sampled trigger ("Wait") is held back while trials remain: the row records its
  cache length and starts a trial. A sampled think-close tag or EOS, or a used-up thinking budget
  (think_ratio of the row's token limit), starts the exit instead (for a model without think tags
  EOS ends the response as usual: it is not inside a thinking span).
- TRIAL: teacher-force the trial prompt ("\\n**Final Answer**\\n\\boxed"), then generate at most
  `max_trial_tokens` tokens, scoring each by its probability under the raw logits (the first, "{",
  skipped), until the text ends the box (DEER's stop patterns, checked per token and across the
  boundary with the previous one). The row then rolls its cache back: the trial never enters the
  output. Mean probability > threshold, or thinking tokens within 50 of the budget: exit;
  otherwise commit the held "Wait" and think on.
- EXIT: the exit text ("\\n</think>\\n\\n") is committed and fed token by token, then ANSWER decodes
  freely to the row's limit.

Rows move independently (each row's mode, queue pointer and cache length are its own; the batch
shares one forward per step). Only committed tokens count towards the limit; `trial_calls` counts
the forwards spent in trials.

Choices where the reference implementations differ or do not apply: the trigger is a vocabulary
mask of the tokens whose text is "Wait" (with or without a leading space), as the HF script's exact
id; models without think tags (the whole response is the span) exit with the trial prompt itself,
so that the answer is written straight into the box.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from effjax.decoding.engine import DecodeState, Strategy, append_tokens, prefill_forward
from effjax.decoding.sampling import GREEDY, Sampler
from effjax.models.cache import rollback

THINK, TRIAL, EXIT, ANSWER = 0, 1, 2, 3
TRIAL_PROMPT = "\n**Final Answer**\n\\boxed"
EXIT_PROMPT = "\n</think>\n\n"
TRIGGERS = ("Wait",)
STOP_PATTERNS = (" }", "}\n", "}\n\n", "}.", "}.\n", "}\\", "}}", ")}", ")}.", ")}\n")
BUDGET_MARGIN = 50


@dataclasses.dataclass(frozen=True, eq=False)
class Vocabulary:
  """Per-token [V] tables DEER reads inside the loop."""

  trigger: np.ndarray  # bool: the token is a trigger word
  stops: np.ndarray  # bool: the token's text contains a stop pattern
  stop_ends: np.ndarray  # [V, M] bool: the text ends with the first part of split pattern m
  stop_starts: np.ndarray  # [V, M] bool: ... starts with its second part

  @classmethod
  def from_texts(cls, texts, triggers=TRIGGERS, patterns=STOP_PATTERNS) -> "Vocabulary":
    splits = [(p[:s], p[s:]) for p in patterns for s in range(1, len(p))]
    return cls(trigger=np.array([t.strip() in triggers for t in texts], bool),
               stops=np.array([any(p in t for p in patterns) for t in texts], bool),
               stop_ends=np.array([[t.endswith(a) for a, _ in splits] for t in texts], bool),
               stop_starts=np.array([[t.startswith(b) for _, b in splits] for t in texts], bool))

  def ends_trial(self, prev: jax.Array, token: jax.Array) -> jax.Array:
    across = (jnp.asarray(self.stop_ends)[prev] & jnp.asarray(self.stop_starts)[token]).any(-1)
    return jnp.asarray(self.stops)[token] | across


@struct.dataclass
class DeerState:
  mode: jax.Array  # [B]
  queue: jax.Array  # [B, Q] forced tokens of the current trial or exit prompt
  qpos: jax.Array  # [B] next queue entry
  qlen: jax.Array  # [B] queue length
  mark: jax.Array  # [B] cache length to roll back to after a trial
  held: jax.Array  # [B] the trigger token held back during a trial
  prev: jax.Array  # [B] last trial token (fed next in the trial's generation)
  trial_tokens: jax.Array  # [B] tokens generated in the current trial
  psum: jax.Array  # [B] sum of their probabilities (the first excluded)
  thinking: jax.Array  # [B] committed tokens while thinking
  trials: jax.Array  # [B] trials run
  early_exit: jax.Array  # [B] left thinking on a confident trial
  trial_calls: jax.Array  # [B] forwards spent in trials
  last_conf: jax.Array  # [B] confidence of the last trial


@dataclasses.dataclass(frozen=True, eq=False)
class DEER(Strategy):
  """DEER decoding. trial_prompt / exit_prompt: token ids (see `from_tokenizer`); think_close: the
  think-close tag id (None for models without think tags)."""

  vocab: Vocabulary
  trial_prompt: tuple[int, ...]
  exit_prompt: tuple[int, ...]
  think_close: int | None = None
  threshold: float = 0.95
  think_ratio: float = 0.6
  max_trials: int = 10
  max_trial_tokens: int = 20
  budget_margin: int = BUDGET_MARGIN  # exit after a trial once thinking is this close to the budget
  sampler: Sampler = GREEDY

  def __post_init__(self):
    if not self.trial_prompt or not self.exit_prompt:
      raise ValueError("DEER needs a trial prompt and an exit prompt")
    if not 0 < self.threshold < 1 or not 0 < self.think_ratio <= 1:
      raise ValueError(f"need 0 < threshold < 1 and 0 < think_ratio <= 1, got {self.threshold}, "
                       f"{self.think_ratio}")
    if self.max_trials < 0 or self.max_trial_tokens < 1:
      raise ValueError("max_trials must be >= 0 and max_trial_tokens >= 1")

  @classmethod
  def from_tokenizer(cls, tokenizer, vocab_size: int, think_tags: tuple[int | None, int | None],
                     **kw) -> "DEER":
    from effjax.rebalance.steering import token_texts

    encode = lambda text: tuple(tokenizer.encode(text, add_special_tokens=False))
    close = think_tags[1]
    exit_prompt = encode(EXIT_PROMPT) if close is not None else encode(TRIAL_PROMPT)
    return cls(Vocabulary.from_texts(token_texts(tokenizer, vocab_size)), encode(TRIAL_PROMPT),
               exit_prompt, close, **kw)

  @property
  def queue_len(self) -> int:
    return max(len(self.trial_prompt), len(self.exit_prompt))

  @property
  def block_size(self) -> int:
    # A trial writes its prompt and generated tokens past the committed context.
    return len(self.trial_prompt) + self.max_trial_tokens + 1

  def max_calls(self, max_new_tokens: int) -> int:
    return max_new_tokens + self.max_trials * (len(self.trial_prompt) + self.max_trial_tokens)

  def _queue(self, prompt: tuple[int, ...]) -> jax.Array:
    return jnp.asarray(list(prompt) + [0] * (self.queue_len - len(prompt)), jnp.int32)

  def prefill(self, model, state: DecodeState, key) -> DecodeState:
    b = state.length.shape[0]
    zeros = lambda dtype=jnp.int32: jnp.zeros((b,), dtype)
    state = state.replace(extra=DeerState(
        mode=zeros(), queue=jnp.zeros((b, self.queue_len), jnp.int32), qpos=zeros(), qlen=zeros(),
        mark=zeros(), held=zeros(), prev=zeros(), trial_tokens=zeros(), psum=zeros(jnp.float32),
        thinking=zeros(), trials=zeros(), early_exit=zeros(bool), trial_calls=zeros(),
        last_conf=zeros(jnp.float32)))
    logits, _, state = prefill_forward(model, state, ())
    return self._after_forward(state, logits, key)

  def step(self, model, state: DecodeState, key) -> DecodeState:
    d = state.extra
    forced = d.qpos < d.qlen
    in_trial = d.mode == TRIAL
    fed = jnp.where(in_trial, jnp.where(forced, jnp.take_along_axis(
        d.queue, jnp.minimum(d.qpos, self.queue_len - 1)[:, None], axis=1)[:, 0], d.prev),
        state.last)
    out = model(fed[:, None], cache=state.cache)
    active = ~state.done
    d = d.replace(trial_calls=d.trial_calls + (in_trial & active))
    state = state.replace(cache=out.cache, calls=state.calls + 1, extra=d)
    return self._after_forward(state, out.logits[:, 0], key, fed)

  def _after_forward(self, state: DecodeState, logits, key, fed=None) -> DecodeState:
    """The per-mode transition after a forward (the prefill's included: THINK, nothing forced)."""
    d = state.extra
    active = ~state.done
    mode = d.mode
    tok = self.sampler(logits, key)
    # The sampled token's probability is read only while a row runs a trial: skip the pass over
    # the vocabulary on every other step (most of DEER's per-step cost).
    q = jax.lax.cond((mode == TRIAL).any(), lambda: _token_prob(logits, tok),
                     lambda: jnp.zeros(tok.shape, jnp.float32))
    budget = jnp.floor(self.think_ratio * state.limit.astype(jnp.float32)).astype(jnp.int32)
    qstep = jnp.minimum(d.qpos, self.queue_len - 1)
    queued = jnp.take_along_axis(d.queue, qstep[:, None], axis=1)[:, 0]
    next_queued = jnp.take_along_axis(
        d.queue, jnp.minimum(d.qpos + 1, self.queue_len - 1)[:, None], axis=1)[:, 0]
    # A think-close tag or EOS while thinking starts the exit; without think tags the response is
    # the span, and EOS ends it as usual.
    if self.think_close is not None:
      close = (tok == self.think_close) | (tok[:, None] == state.eos[None, :]).any(-1)
    else:
      close = jnp.zeros(tok.shape, bool)

    # THINK: a trigger starts a trial; a close tag, EOS or the budget starts the exit.
    thinking = mode == THINK
    trigger = thinking & jnp.asarray(self.vocab.trigger)[tok] & (d.trials < self.max_trials)
    exits_now = thinking & ~trigger & (close | (d.thinking >= budget))
    # TRIAL: feeding the prompt (its last token's logits give the first trial token), then
    # generating until a stop pattern or the token cap.
    trial = mode == TRIAL
    prompt_fed = trial & (d.qpos < d.qlen)
    first = prompt_fed & (d.qpos + 1 == d.qlen)
    generating = trial & ~prompt_fed
    made = jnp.where(first, 1, d.trial_tokens + generating)
    prev = jnp.where(first, queued, d.prev)
    stopped = (first | generating) & (self.vocab.ends_trial(prev, tok)
                                      | (made >= self.max_trial_tokens))
    psum = jnp.where(first, 0.0, d.psum + jnp.where(generating, q, 0.0))
    conf = psum / jnp.maximum(made - 1, 1).astype(jnp.float32)
    confident = stopped & ((conf > self.threshold) | (d.thinking >= budget - self.budget_margin))
    resume = stopped & ~confident
    # EXIT: the queue is committed token by token.
    exiting = mode == EXIT

    start_exit = (exits_now | confident) & active
    start_trial = trigger & active
    # Committed this step: THINK's own token unless held back or replaced by the exit; the held
    # trigger when a trial resumes; the first exit token when an exit starts; the next exit token.
    exit_first = self._queue(self.exit_prompt)[0]
    new = jnp.where(resume, d.held, jnp.where(start_exit, exit_first,
                                              jnp.where(exiting, next_queued, tok)))
    commit = active & ((thinking & ~trigger) | resume | start_exit | exiting
                       | (mode == ANSWER))
    commit = commit & ~(exiting & (d.qpos + 1 >= d.qlen))  # exit queue already drained
    before = state.length
    state = append_tokens(state, new[:, None], commit.astype(jnp.int32))
    appended = state.length - before

    exit_done = exiting & (d.qpos + 2 >= d.qlen) | (start_exit & (len(self.exit_prompt) == 1))
    new_mode = jnp.where(start_trial, TRIAL, mode)
    new_mode = jnp.where(resume, THINK, new_mode)
    new_mode = jnp.where(start_exit, EXIT, new_mode)
    new_mode = jnp.where(exit_done & active, ANSWER, new_mode)
    new_mode = jnp.where(active, new_mode, mode)
    trial_q, exit_q = self._queue(self.trial_prompt), self._queue(self.exit_prompt)
    queue = jnp.where(start_trial[:, None], trial_q[None], jnp.where(
        start_exit[:, None], exit_q[None], d.queue))
    qlen = jnp.where(start_trial, len(self.trial_prompt),
                     jnp.where(start_exit, len(self.exit_prompt), d.qlen))
    qpos = d.qpos + (active & (prompt_fed | exiting))
    qpos = jnp.where(start_trial | start_exit, 0, qpos)
    # A finished trial forgets its cache entries.
    cache = state.cache
    if fed is not None:
      cache = rollback(cache, jnp.where(stopped & active, d.mark, cache.index))
    state = state.replace(cache=cache, extra=DeerState(
        mode=new_mode, queue=queue, qpos=qpos, qlen=qlen,
        mark=jnp.where(start_trial, cache.index, d.mark),
        held=jnp.where(start_trial, tok, d.held),
        prev=jnp.where(first | generating, tok, d.prev),
        trial_tokens=jnp.where(active, made, d.trial_tokens), psum=jnp.where(active, psum, d.psum),
        thinking=d.thinking + jnp.where((thinking & ~start_exit) | resume, appended, 0),
        trials=d.trials + (stopped & active),
        early_exit=d.early_exit | (confident & active & (conf > self.threshold)),
        trial_calls=d.trial_calls, last_conf=jnp.where(stopped & active, conf, d.last_conf)))
    return state


def _token_prob(logits: jax.Array, tok: jax.Array) -> jax.Array:
  """[B] probability of each row's token `tok` under its logits [B, V]."""
  logits = logits.astype(jnp.float32)
  picked = jnp.take_along_axis(logits, tok[:, None], axis=1)[:, 0]
  return jnp.exp(picked - jax.nn.logsumexp(logits, axis=-1))
