"""The Flax NNX decoder family (Llama, Qwen2, Qwen3, Gemma 2, Gemma 3), its KV cache and sharding.

Names are imported on first use, so that reading configs (`effjax.models.config`, e.g. for
`effjax models`) does not import JAX.
"""

from effjax.lazy import exports

_MODULE_OF = {
    "KVCache": "cache", "commit": "cache", "rollback": "cache",
    "PRESETS": "config", "ModelConfig": "config", "RopeScaling": "config", "make_config": "config",
    "tiny_config": "config",
    "DEFAULT_RULES": "sharding", "ShardingRules": "sharding", "make_mesh": "sharding",
    "parse_mesh": "sharding",
    "ModelOutput": "transformer", "Steering": "transformer", "Transformer": "transformer",
    "abstract_model": "transformer", "create_model": "transformer",
}
__all__ = list(_MODULE_OF)

__getattr__ = exports(__name__, _MODULE_OF)
