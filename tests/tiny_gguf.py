"""Test helpers: tiny GGUF files written the way llama.cpp's converter writes them, and the real
embedded GGUF files opened once per test session.

The writer is deliberately independent of effjax's reader: it follows llama.cpp's conventions
(tensor names, metadata keys, Llama Q/K row permutation, Gemma norms stored as 1 + w, Llama 3 RoPE
scaling as a rope_freqs tensor), so reading its files back checks the reader against them.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import gguf
import numpy as np
from effjax.checkpoints.assemble import checkpoint_tensors
from effjax.models.config import ModelConfig

_TOP = {"embed": "token_embd.weight", "lm_head": "output.weight",
        "final_norm.scale": "output_norm.weight"}
_LAYER = {
    "attn_norm.scale": "attn_norm.weight", "mlp_norm.scale": "ffn_norm.weight",
    "attn_post_norm.scale": "post_attention_norm.weight",
    "mlp_post_norm.scale": "post_ffw_norm.weight",
    "attn.q_norm.scale": "attn_q_norm.weight", "attn.k_norm.scale": "attn_k_norm.weight",
    "attn.o.weight": "attn_output.weight", "mlp.gate.weight": "ffn_gate.weight",
    "mlp.up.weight": "ffn_up.weight", "mlp.down.weight": "ffn_down.weight",
    **{f"attn.{p}.{k}": f"attn_{p}.{k}" for p in "qkv" for k in ("weight", "bias")},
}
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def params_of(model) -> dict[str, np.ndarray]:
  """The model's parameters as checkpoints store them: separate [out, in] weights, [V, D] tables."""
  return dict(checkpoint_tensors(model))


def gguf_name(name: str) -> str:
  if name in _TOP:
    return _TOP[name]
  _, layer, rest = name.split(".", 2)
  return f"blk.{layer}.{_LAYER[rest]}"


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
  """convert_hf_to_gguf.py's LlamaModel.permute: interleave the two RoPE halves of every head."""
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(cfg: ModelConfig) -> np.ndarray:
  """The per-frequency divisors convert_hf_to_gguf.py stores for Llama 3.1 RoPE scaling."""
  rs = cfg.rope_scaling
  out = []
  for i in range(0, cfg.head_dim, 2):
    wavelen = 2 * math.pi * cfg.rope_theta ** (i / cfg.head_dim)
    if wavelen < rs.original_max_position / rs.high_freq_factor:
      out.append(1.0)
    elif wavelen > rs.original_max_position / rs.low_freq_factor:
      out.append(rs.factor)
    else:
      smooth = (rs.original_max_position / wavelen - rs.low_freq_factor) / (
          rs.high_freq_factor - rs.low_freq_factor)
      out.append(1 / ((1 - smooth) / rs.factor + smooth))
  return np.asarray(out, np.float32)


@functools.cache
def tiny_bpe():
  """A byte-level BPE trained on a few lines: (tokenizers.Tokenizer, tokens in id order, merges)."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  corpus = ["the quick brown fox jumps over the lazy dog", "def main():\n    return 42\n",
            "hello world, hello there", "numbers 123 4567 and the end"] * 4
  trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(corpus, trainer)
  vocab = tok.get_vocab()
  tokens = sorted(vocab, key=vocab.get)
  merges = json.loads(tok.to_str())["model"]["merges"]
  merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
  return tok, tokens, merges


def write_gguf(path: str | Path, cfg: ModelConfig, params: dict[str, np.ndarray], *,
               arch: str | None = None, tokenizer: bool = True, pre: str = "gpt-2",
               qtypes: dict[str, gguf.GGMLQuantizationType] | None = None,
               extra: dict[str, int | float | str] | None = None,
               rope_factors=lambda factors: factors) -> Path:
  """Write `params` (effjax names) as llama.cpp would convert the matching HF checkpoint."""
  arch = arch or cfg.family
  path = Path(path)
  w = gguf.GGUFWriter(path, arch)
  w.add_name("tiny")
  w.add_block_count(cfg.num_layers)
  w.add_context_length(cfg.max_position)
  w.add_embedding_length(cfg.dim)
  w.add_feed_forward_length(cfg.mlp_dim)
  w.add_head_count(cfg.num_heads)
  w.add_head_count_kv(cfg.num_kv_heads)
  w.add_key_length(cfg.head_dim)
  w.add_value_length(cfg.head_dim)
  w.add_layer_norm_rms_eps(cfg.norm_eps)
  w.add_rope_freq_base(cfg.rope_theta)
  w.add_vocab_size(cfg.vocab_size)
  if cfg.sliding_window:
    w.add_sliding_window(cfg.sliding_window)
  if cfg.layer_kinds:
    w.add_sliding_window_pattern([k == "sliding" for k in cfg.layer_kinds])
  if cfg.attn_softcap is not None:
    w.add_attn_logit_softcapping(cfg.attn_softcap)
  if cfg.final_softcap is not None:
    w.add_final_logit_softcapping(cfg.final_softcap)
  if cfg.rope_local_theta is not None:
    w.add_rope_freq_base_swa(cfg.rope_local_theta)
  if cfg.rope_scaling is not None and cfg.rope_scaling.kind == "linear":
    w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    w.add_rope_scaling_factor(cfg.rope_scaling.factor)
  if cfg.rope_scaling is not None and cfg.rope_scaling.kind == "llama3":
    w.add_tensor("rope_freqs.weight", rope_factors(llama3_rope_factors(cfg)))
  for key, value in (extra or {}).items():
    {int: w.add_uint32, float: w.add_float32, str: w.add_string}[type(value)](key, value)
  if tokenizer:
    _, tokens, merges = tiny_bpe()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.NORMAL
                       for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index("<|im_start|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_pad_token_id(tokens.index("<|endoftext|>"))
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
  for name, value in params.items():
    value = np.asarray(value, np.float32)
    if arch == "llama" and name.endswith(("attn.q.weight", "attn.q.bias")):
      value = llama_cpp_permute(value, cfg.num_heads)
    if arch == "llama" and name.endswith(("attn.k.weight", "attn.k.bias")):
      value = llama_cpp_permute(value, cfg.num_kv_heads)
    if arch in ("gemma2", "gemma3") and name.endswith("norm.scale"):
      value = value + 1.0
    qtype = (qtypes or {}).get(name, gguf.GGMLQuantizationType.F32)
    data = gguf.quants.quantize(value, qtype)
    if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
      w.add_tensor(gguf_name(name), data)  # the writer reads these types off the numpy dtype
    else:
      w.add_tensor(gguf_name(name), data, raw_dtype=qtype)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


@functools.cache
def real_gguf(name: str):
  """The opened GGUF file of a named embedded model, shared by the test modules of a session."""
  from effjax.checkpoints.gguf_reader import GGUFFile
  from effjax.checkpoints.registry import MODELS

  return GGUFFile(MODELS[name].gguf_path())


@functools.cache
def hf_gguf_tokenizer(name: str):
  """transformers' own tokenizer built from a named model's GGUF file."""
  from transformers import AutoTokenizer

  path = real_gguf(name).path
  return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@functools.cache
def hf_gguf_model(name: str):
  """transformers' own GGUF loading (torch, float32) of a named model."""
  import torch
  from transformers import AutoModelForCausalLM

  path = real_gguf(name).path
  return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                              dtype=torch.float32).eval()
