"""Recipes: a technique at a paper's scale on a named TPU slice, as a typed config.

A recipe names a model preset (effjax.models.PRESETS), the slice and mesh it runs on, the
technique's own settings (the RLHF sections of effjax.rlhf.config, or a decoding method with its
batch and lengths), the commands that run it on a Cloud TPU VM, and what the paper reports for
the side-by-side. Recipes live in configs/recipes/*.toml and load strictly (an unknown key is an
error naming it).
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Literal

from effjax.rlhf.config import AgentConfig, ENNConfig, PolicyConfig, _build, read_mapping

RECIPE_DIR = pathlib.Path(__file__).resolve().parents[2] / "configs" / "recipes"


@dataclasses.dataclass(frozen=True)
class RLHFRecipe:
  """One batch of the online agents (ONLINE_RLHF.md) with prompts and responses of fixed length."""

  prompt_len: int = 512
  response_len: int = 512
  agent: AgentConfig = AgentConfig()
  enn: ENNConfig = ENNConfig()
  policy: PolicyConfig = PolicyConfig()


Method = Literal["ar", "esp", "hybrid", "rebalance"]


@dataclasses.dataclass(frozen=True)
class DecodeRecipe:
  """Generation with the engine. `methods`: decoding methods (ar, esp, hybrid; the tree methods at
  BC `bc`) or rebalance (sampling steered by ReBalanceHook with the model's published constants).
  The first is the recipe's; the others are planned on the same shapes as references (plain
  decoding `ar` is what a speculative step is compared with). Each of `batches` is planned."""

  methods: tuple[Method, ...] = ("ar",)
  bc: int | None = None
  batches: tuple[int, ...] = (1,)
  prompt_len: int = 1024
  max_new_tokens: int = 1024
  temperature: float = 0.0
  top_p: float = 1.0


@dataclasses.dataclass(frozen=True)
class PaperReference:
  """What the paper reports, set beside the plan (0 / "" = not reported)."""

  hardware: str = ""
  tokens_per_call: float = 0.0  # ESP: mean accepted tokens per forward (tau)
  speedup: float = 0.0  # ESP: wall-clock speedup over plain decoding, batch 1
  mean_tokens: float = 0.0  # ReBalance: mean generated tokens per problem
  labels: int = 0  # RLHF: labels the headline result needs
  note: str = ""


@dataclasses.dataclass(frozen=True)
class Recipe:
  kind: Literal["rlhf", "decode"]
  model: str  # a name in effjax.models.PRESETS, or tiny:FAMILY (tiny_config, for tests)
  slice: str  # Cloud TPU accelerator type (v5p-32) or topology (v5e:8x8)
  mesh: str = "data=1,fsdp=-1,tensor=1"
  dtype: Literal["float32", "bfloat16"] = "bfloat16"
  quant: Literal["int8"] | None = None  # weight-only int8 (models/quant.py), or the dtype's weights
  description: str = ""
  launch: tuple[str, ...] = ()  # shell commands that run the recipe on a Cloud TPU VM
  rlhf: RLHFRecipe = RLHFRecipe()
  decode: DecodeRecipe = DecodeRecipe()
  paper: PaperReference = PaperReference()

  def __post_init__(self):
    from effjax.models.config import PRESETS

    tiny = self.model.startswith("tiny:") and self.model[5:] in ("llama", "qwen2", "qwen3",
                                                                 "gemma2", "gemma3")
    if self.model not in PRESETS and not tiny:
      raise ValueError(f"model {self.model!r} is not a preset (or tiny:FAMILY); known: "
                       f"{', '.join(sorted(PRESETS))}")
    d = self.decode
    if self.kind == "decode" and (not d.batches or min(d.batches) < 1):
      raise ValueError(f"decode.batches must be positive batch sizes, got {d.batches}")
    if self.kind == "decode" and not d.methods:
      raise ValueError("decode.methods is empty: name at least one method")
    if self.kind == "decode" and {"esp", "hybrid"} & set(d.methods) and d.bc is None:
      raise ValueError("decode.methods has a tree method (esp, hybrid): set decode.bc (10, 30, 60)")

  def replace(self, **kw) -> "Recipe":
    return dataclasses.replace(self, **kw)


def recipe_from_dict(data: dict) -> Recipe:
  return _build(Recipe, data, "")


def load_recipe(name_or_path: str | pathlib.Path) -> tuple[str, Recipe]:
  """(name, recipe) from a TOML/JSON/YAML file, or a name in configs/recipes/."""
  path = pathlib.Path(name_or_path)
  if not path.exists() and path.suffix == "" and (RECIPE_DIR / f"{path}.toml").exists():
    path = RECIPE_DIR / f"{path}.toml"
  if not path.exists():
    known = ", ".join(sorted(p.stem for p in RECIPE_DIR.glob("*.toml"))) or "none"
    raise FileNotFoundError(f"no recipe {str(name_or_path)!r} (a file, or one of: {known})")
  try:
    return path.stem, recipe_from_dict(read_mapping(path))
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from None
