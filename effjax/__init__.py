"""effjax: efficient LLM techniques (online RLHF, ReBalance, ESP) in JAX/Flax."""

__version__ = "0.1.0"
