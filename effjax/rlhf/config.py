"""Typed configuration of an online RLHF run, loaded strictly from a TOML, JSON or YAML file.

Every section is a frozen dataclass; an unknown key, a wrong type or a bad choice is an error that
names the key. Values the papers publish are the defaults (Z = 100 particles, heads 2 x 1024 / 2 x
256, 64 prompts x 16 responses, top-k 5, tau = 400). Values they do not publish (RM steps, replay and
learning rate, policy learning rate, nudge eps, KL beta, anchor eta) default to what the toy
experiment used (BENCHMARKS.md); they were set by a pilot run there, not tuned, and a real model
needs its own (e.g. a far smaller policy learning rate: configs/rlhf_gsm8k_smollm2.toml).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import types
import typing
from typing import Any, Literal

AgentKind = Literal["offline", "periodic", "online", "info_directed"]
Selection = Literal["random", "info", "dts", "boltzmann"]


@dataclasses.dataclass(frozen=True)
class ENNConfig:
  """Reward model heads on the backbone's last-token hidden state (ONLINE_RLHF.md, step 4)."""

  num_particles: int = 100
  point_hidden: tuple[int, ...] = (1024, 1024)
  prior_hidden: tuple[int, ...] = (256, 256)
  diff_hidden: tuple[int, ...] = (1024, 1024)
  prior_scale: float = 1.0  # output scale of the frozen random priors: the initial disagreement
  particles_include_point: bool = True  # r_z = point + prior_z + diff_z (else prior_z + diff_z)
  # Pull of each differential head toward its initial weights: diff_reg / labels * squared distance
  # (a Gaussian prior at the initial draw; enn.py). Chosen on the toy (BENCHMARKS.md).
  diff_reg: float = 1.0
  bootstrap: bool = False  # each particle weighs each label 0 or 2 (its own bootstrap of the labels)
  train_particles: bool = True  # False: the differential heads never learn (a control experiment)
  lr: float = 1e-3
  backbone_lr_scale: float = 1.0  # backbone lr = lr * this (0 freezes the backbone)
  steps_per_batch: int = 4  # RM gradient steps after each labelled batch (online agents)
  replay: int = 64  # labels replayed from earlier batches in each of those steps
  retrain_epochs: int = 4  # offline / periodic: passes over all labels when retraining from phi_0
  retrain_batch: int = 128
  clip_norm: float = 1.0
  remat: bool = True  # recompute the backbone's layers in the backward pass (memory for compute)


@dataclasses.dataclass(frozen=True)
class PolicyConfig:
  """REINFORCE with the 1/2 baseline, affirmative nudge and KL to an EMA anchor (step 5, 6)."""

  lr: float = 1e-3
  eps: float = 0.05  # affirmative nudge
  beta: float = 0.05  # weight of the token-level KL to the anchor
  eta: float = 0.99  # anchor EMA: theta_bar <- eta * theta_bar + (1 - eta) * theta
  clip_norm: float = 1.0
  top_k: int = 5
  temperature: float = 1.0
  retrain_steps: int = 100  # offline / periodic: policy steps against the frozen RM
  trainable_layers: int = 0  # 0: every parameter learns; k: only the last k blocks + final norm
  remat: bool = True  # recompute the policy's layers in the backward pass (memory for compute)
  # Rows (ordered pairs) per forward/backward in a policy step; gradients are accumulated over
  # the chunks, so the step is the same, only peak memory shrinks. The reward model scores the
  # prompts of one such chunk (micro_batch / 4) at a time. 0: all rows at once.
  micro_batch: int = 0


@dataclasses.dataclass(frozen=True)
class AgentConfig:
  kind: AgentKind = "info_directed"
  selection: Selection | None = None  # None: random for offline/periodic/online, info for info_directed
  num_batches: int = 100
  prompts_per_batch: int = 64
  responses_per_prompt: int = 16
  tau: int = 400  # periodic: retrain every tau batches
  retrain_at: tuple[int, ...] = ()  # offline / periodic: retrain after these batch counts (overrides tau)
  dts_tries: int = 8  # double Thompson sampling: redraws of the second particle
  boltzmann_temperature: float = 1.0
  eval_every: int = 10  # online agents: evaluate every this many batches
  eval_at: tuple[int, ...] = ()  # online agents: evaluate after these batch counts (overrides eval_every)
  eval_samples: int = 4  # sampled responses per held-out prompt for the sampled-response metrics

  @property
  def pair_selection(self) -> Selection:
    if self.selection is not None:
      return self.selection
    return "info" if self.kind == "info_directed" else "random"

  @property
  def incremental(self) -> bool:
    return self.kind in ("online", "info_directed")


@dataclasses.dataclass(frozen=True)
class PolicyModelConfig:
  """Sizes of the toy's SFT transformer (a llama-family effjax model)."""

  dim: int = 64
  mlp_dim: int = 128
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 16


@dataclasses.dataclass(frozen=True)
class ToyConfig:
  """The CPU-sized language environment of ONLINE_RLHF.md (see effjax/rlhf/toy.py)."""

  seed: int = 0
  vocab_size: int = 32  # token 0 is padding and never generated
  prompt_len: int = 6
  response_len: int = 8
  num_train_prompts: int = 20000
  num_eval_prompts: int = 256
  data_temperature: float = 0.7  # peakiness of the SFT data's Markov chain (lower: more peaked)
  prompt_effect: float = 1.0  # how strongly the prompt shifts the SFT data's token distribution
  teacher_hidden: int = 32
  teacher_prompt_weight: float = 1.0  # teacher reward = bigram part + this * prompt-dependent part
  teacher_repeat_penalty: float = 0.0  # minus this per repeated token (degenerate repetition is bad)
  model: PolicyModelConfig = PolicyModelConfig()
  sft_steps: int = 1500
  sft_batch: int = 256
  sft_lr: float = 3e-3


@dataclasses.dataclass(frozen=True)
class GSM8KConfig:
  """Real-model environment: a named checkpoint as the policy, GSM8K-style prompts."""

  model: str = "smollm2-135m-instruct"
  dtype: Literal["float32", "bfloat16"] = "float32"  # parameters (bfloat16 on TPU / GPU)
  data: str = "sample:gsm8k"  # a GSM8K JSONL file, a folder of them, or sample:gsm8k
  strict: bool = True  # an unusable line in the data is an error (False: skipped with a warning)
  max_prompt_len: int = 192
  response_len: int = 128
  num_eval_prompts: int = 32


@dataclasses.dataclass(frozen=True)
class ArithmeticConfig:
  """Real-model environment: one-step arithmetic items a short response can answer (gsm8k.py)."""

  model: str = "smollm2-135m-instruct"
  seed: int = 0  # the item generator's seed (the same items for every run seed)
  ops: str = "+-*"
  max_operand: int = 99
  num_train_prompts: int = 5000
  num_eval_prompts: int = 32
  max_prompt_len: int = 64
  response_len: int = 16
  system: str = ""  # a system message ("": the chat template's default)


@dataclasses.dataclass(frozen=True)
class EnvConfig:
  kind: Literal["toy", "gsm8k", "arithmetic"] = "toy"
  toy: ToyConfig = ToyConfig()
  gsm8k: GSM8KConfig = GSM8KConfig()
  arithmetic: ArithmeticConfig = ArithmeticConfig()


@dataclasses.dataclass(frozen=True)
class RaterConfig:
  """Bradley-Terry over a scorer, or people answering from a label queue."""

  kind: Literal["teacher", "gsm8k", "checkpoint", "human"] = "teacher"
  temperature: float = 1.0  # P(a > b) = sigmoid((s_a - s_b) / temperature)
  noise: float = 0.0  # probability that a label is flipped
  length_coef: float = 0.0  # gsm8k: score -= length_coef * tokens beyond target_len / target_len
  target_len: int = 96
  checkpoint: str = ""  # checkpoint rater: directory written by effjax.rlhf.enn.save_reward_model
  queue_dir: str = ""  # human rater: where queries.jsonl is written and answers.jsonl is read
  serve_port: int = 0  # human rater: also serve the queue to a browser on 127.0.0.1:port (0 = file only)
  wait_seconds: float = 3600.0  # human rater: how long to wait for a batch's answers


@dataclasses.dataclass(frozen=True)
class RunConfig:
  seed: int = 0
  out_dir: str = "runs/rlhf"
  cache_dir: str = "runs/rlhf_cache"  # trained SFT policies, keyed by the environment's config
  checkpoint_every: int = 10  # batches
  keep_checkpoints: int = 2
  mesh: str = ""  # e.g. "data=1,fsdp=-1,tensor=1"; empty: one device
  agent: AgentConfig = AgentConfig()
  enn: ENNConfig = ENNConfig()
  policy: PolicyConfig = PolicyConfig()
  env: EnvConfig = EnvConfig()
  rater: RaterConfig = RaterConfig()


def _build(tp: Any, value: Any, where: str) -> Any:
  """`value` converted to type `tp`, strictly."""
  origin = typing.get_origin(tp)
  if dataclasses.is_dataclass(tp):
    if not isinstance(value, dict):
      raise ValueError(f"{where}: expected a table/object, got {value!r}")
    hints = typing.get_type_hints(tp)
    names = {f.name for f in dataclasses.fields(tp)}
    unknown = sorted(set(value) - names)
    if unknown:
      raise ValueError(f"{where}: unknown key(s) {unknown}; known: {sorted(names)}")
    return tp(**{k: _build(hints[k], v, f"{where}.{k}" if where else k) for k, v in value.items()})
  if origin is Literal:
    if value not in typing.get_args(tp):
      raise ValueError(f"{where}: {value!r} is not one of {list(typing.get_args(tp))}")
    return value
  if origin in (typing.Union, types.UnionType):
    args = typing.get_args(tp)
    if value is None and type(None) in args:
      return None
    errors = []
    for a in args:
      if a is type(None):
        continue
      try:
        return _build(a, value, where)
      except ValueError as e:
        errors.append(str(e))
    raise ValueError("; ".join(errors))
  if origin is tuple:
    if not isinstance(value, (list, tuple)):
      raise ValueError(f"{where}: expected a list, got {value!r}")
    (item, _) = typing.get_args(tp)
    return tuple(_build(item, v, f"{where}[{i}]") for i, v in enumerate(value))
  if tp is float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ValueError(f"{where}: expected a number, got {value!r}")
    return float(value)
  if tp in (int, bool, str):
    if type(value) is not tp:
      raise ValueError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value
  raise TypeError(f"{where}: unsupported config type {tp}")


def read_mapping(path: str | pathlib.Path) -> dict:
  path = pathlib.Path(path)
  text = path.read_text()
  if path.suffix == ".toml":
    import tomllib
    return tomllib.loads(text)
  if path.suffix == ".json":
    return json.loads(text)
  if path.suffix in (".yaml", ".yml"):
    import yaml  # optional: only YAML configs need it
    return yaml.safe_load(text) or {}
  raise ValueError(f"{path}: config must be .toml, .json or .yaml")


def apply_override(data: dict, assignment: str) -> None:
  """'agent.kind="online"' or 'seed=3' (the value is JSON; a bare word is a string)."""
  key, sep, raw = assignment.partition("=")
  if not sep:
    raise ValueError(f"override {assignment!r} is not key=value")
  try:
    value = json.loads(raw)
  except json.JSONDecodeError:
    value = raw
  node = data
  parts = key.strip().split(".")
  for p in parts[:-1]:
    node = node.setdefault(p, {})
  node[parts[-1]] = value


def config_from_dict(data: dict) -> RunConfig:
  return _build(RunConfig, data, "")


def load_config(path: str | pathlib.Path, overrides: tuple[str, ...] = ()) -> RunConfig:
  data = read_mapping(path)
  for o in overrides:
    apply_override(data, o)
  try:
    return config_from_dict(data)
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from None


def config_to_dict(cfg: Any) -> dict:
  return dataclasses.asdict(cfg)
