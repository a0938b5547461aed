"""benchmarks/engine.py's export: the Hugging Face directory every peer system loads must hold the
effjax model's own weights, config and tokenizer (read back here through effjax's HF loader)."""

import importlib.util
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from effjax.checkpoints.registry import load_model
from effjax.models import create_model, tiny_config
from tiny_gguf import params_of, tiny_bpe, write_gguf

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "engine.py"


def test_exported_hf_dir_reads_back_with_the_same_logits_and_tokens(tmp_path):
  spec = importlib.util.spec_from_file_location("engine_bench", SCRIPT)
  engine = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(engine)
  tokens = tiny_bpe()[1]
  cfg = tiny_config("llama", vocab_size=len(tokens), tie_embeddings=False, rope_theta=100_000.0,
                    rope_scaling=None, eos_ids=(tokens.index("<|im_end|>"),),
                    pad_id=tokens.index("<|endoftext|>"))
  src = load_model(write_gguf(tmp_path / "tiny.gguf", cfg, params_of(create_model(cfg, seed=3))))
  out = engine.export_hf(src, tmp_path / "hf")
  back = load_model(out)

  assert json.loads((out / "config.json").read_text())["pad_token_id"] == cfg.pad_id
  assert (back.cfg.rope_theta, back.cfg.eos_ids, back.cfg.num_layers) == (100_000.0, cfg.eos_ids,
                                                                         cfg.num_layers)
  text = "<|im_start|>user\nhello<|im_end|>"
  assert back.tokenizer(text).input_ids == src.tokenizer(text).input_ids
  ids = jnp.asarray([src.tokenizer(text).input_ids])
  np.testing.assert_array_equal(np.asarray(back.model(ids).logits),
                                np.asarray(src.model(ids).logits))
