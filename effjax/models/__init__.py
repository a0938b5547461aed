"""The Flax NNX decoder family (Llama, Qwen2, Qwen3, Gemma 2, Gemma 3), its KV cache and sharding."""

from effjax.models.cache import KVCache, commit, rollback
from effjax.models.config import PRESETS, ModelConfig, RopeScaling, make_config, tiny_config
from effjax.models.sharding import DEFAULT_RULES, ShardingRules, make_mesh, parse_mesh
from effjax.models.transformer import (ModelOutput, Steering, Transformer, abstract_model,
                                       create_model)

__all__ = [
    "KVCache", "commit", "rollback", "PRESETS", "ModelConfig", "RopeScaling", "make_config",
    "tiny_config", "DEFAULT_RULES", "ShardingRules", "make_mesh", "parse_mesh", "ModelOutput",
    "Steering", "Transformer", "abstract_model", "create_model",
]
