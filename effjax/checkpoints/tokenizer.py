"""Tokenizers: from a Hugging Face directory (transformers), or rebuilt from GGUF metadata.

A GGUF file carries its vocabulary as metadata under llama.cpp's key names. Two kinds are rebuilt here
with the `tokenizers` library and wrapped as a transformers fast tokenizer (special tokens, BOS/EOS
handling and the file's chat template, so `apply_chat_template` works):

- byte-level BPE (`tokenizer.ggml.model == "gpt2"`: SmolLM2, Qwen, Llama 3): vocabulary and merges as
  stored, text split per `tokenizer.ggml.pre` the way the merges were learned;
- SentencePiece-style BPE (`"llama"`: Gemma): "▁" for spaces, byte fallback, and merges recovered from
  the vocabulary (the file lists none): SentencePiece merges the adjacent pair whose concatenation
  ranks best, i.e. the pair merges of every token, ranked by that token's place in the vocabulary.
"""

from __future__ import annotations

import os
from pathlib import Path

from effjax.errors import CheckpointError
from effjax.checkpoints.gguf_reader import GGUFFile, as_gguf

# llama.cpp token types (gguf.TokenType).
_NORMAL, _CONTROL, _USER_DEFINED = 1, 3, 4

_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _byte_level_pre_tokenizer(pre: str):
  """How text is split before BPE, per llama.cpp's `tokenizer.ggml.pre` names."""
  from tokenizers import Regex, pre_tokenizers

  def split(pattern: str):
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])

  gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  # No "default": llama.cpp's converter writes it for vocabularies it did not recognise.
  table = {
      "gpt-2": gpt2,
      # SmolLM splits digits one by one, then applies GPT-2's split.
      "smollm": pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), gpt2]),
      "llama3": split(_LLAMA3_SPLIT), "llama-v3": split(_LLAMA3_SPLIT),
      "llama-bpe": split(_LLAMA3_SPLIT),
      "qwen2": split(_QWEN2_SPLIT), "deepseek-r1-qwen": split(_QWEN2_SPLIT),
  }
  if pre not in table:
    raise CheckpointError(f"byte-level BPE pre-tokenizer {pre!r} is not supported; supported: "
                          f"{', '.join(sorted(table))}")
  return table[pre], pre.startswith("llama")


def _byte_level_bpe(meta: dict):
  from tokenizers import Tokenizer, decoders, models

  pre_tokenizer, ignore_merges = _byte_level_pre_tokenizer(meta.get("tokenizer.ggml.pre", "gpt-2"))
  vocab = {t: i for i, t in enumerate(meta["tokenizer.ggml.tokens"])}
  merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
  # Llama 3 takes a whole pre-token from the vocabulary before trying merges.
  tok = Tokenizer(models.BPE(vocab, merges, ignore_merges=ignore_merges))
  tok.pre_tokenizer = pre_tokenizer
  tok.decoder = decoders.ByteLevel()
  return tok, meta["tokenizer.ggml.tokens"]


def _spm_merges(tokens: list[str], mergeable: list[bool]) -> list[tuple[str, str]]:
  """Every split of every mergeable token into two vocabulary pieces, best-ranked token first."""
  rank = {t: i for i, t in enumerate(tokens) if mergeable[i]}
  merges = []
  for i, t in enumerate(tokens):
    if not mergeable[i]:
      continue
    splits = [(t[:k], t[k:]) for k in range(1, len(t)) if t[:k] in rank and t[k:] in rank]
    merges.extend(sorted(splits, key=lambda ab: (rank[ab[0]], rank[ab[1]])))
  return merges


def _sentencepiece_bpe(meta: dict):
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers

  if meta.get("tokenizer.ggml.pre", "default") != "default":
    raise CheckpointError(f"SentencePiece pre-tokenizer {meta['tokenizer.ggml.pre']!r} is not "
                          "supported")
  stored = meta["tokenizer.ggml.tokens"]
  types = list(meta.get("tokenizer.ggml.token_type") or [_NORMAL] * len(stored))
  # Gemma files spell whitespace-run pieces with real spaces; the model sees text with "▁" for spaces.
  tokens = ["▁" * len(t) if t and not t.strip(" ") else t for t in stored]
  mergeable = [ty in (_NORMAL, _USER_DEFINED) for ty in types]
  unk_id = meta.get("tokenizer.ggml.unknown_token_id")
  model = models.BPE({t: i for i, t in enumerate(tokens)}, _spm_merges(tokens, mergeable),
                     unk_token=tokens[unk_id] if unk_id is not None else None, fuse_unk=True,
                     byte_fallback=True)
  tok = Tokenizer(model)
  # Without the flags, llama.cpp prefixes a space and adds BOS for SentencePiece vocabularies.
  prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
  tok.pre_tokenizer = pre_tokenizers.Metaspace(
      replacement="▁", prepend_scheme="first" if prefix else "never", split=False)
  steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
  tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
  return tok, tokens


def tokenizer_from_gguf(src: str | os.PathLike | GGUFFile):
  """A transformers fast tokenizer rebuilt from the GGUF file's metadata."""
  from tokenizers import AddedToken
  from transformers import PreTrainedTokenizerFast

  f = as_gguf(src)
  meta = f.metadata
  kind = meta.get("tokenizer.ggml.model")
  if kind is None or "tokenizer.ggml.tokens" not in meta:
    raise CheckpointError(f"{f.path}: the GGUF file has no tokenizer "
                          "(no tokenizer.ggml.model / tokens)")
  builders = {"gpt2": _byte_level_bpe, "llama": _sentencepiece_bpe}
  if kind not in builders:
    raise CheckpointError(f"{f.path}: tokenizer model {kind!r} is not supported; supported: "
                          f"{', '.join(builders)}")
  try:
    tok, tokens = builders[kind](meta)
  except CheckpointError as e:
    raise CheckpointError(f"{f.path}: {e}") from e
  # Control tokens (<|im_start|>, <start_of_turn>) are special; user-defined ones (<think>, "\n\n")
  # are matched whole before BPE, as llama.cpp does (whitespace runs respelled with "▁" are left to
  # the merges, which rank them first anyway).
  types = meta.get("tokenizer.ggml.token_type") or []
  stored = meta["tokenizer.ggml.tokens"]
  tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                          for i, ty in enumerate(types) if ty == _CONTROL])
  tok.add_tokens([AddedToken(tokens[i], normalized=False)
                  for i, ty in enumerate(types) if ty == _USER_DEFINED and tokens[i] == stored[i]])

  def special(key: str):
    i = meta.get(f"tokenizer.ggml.{key}_token_id")
    return None if i is None else tokens[i]

  return PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token=special("bos"), eos_token=special("eos"),
      unk_token=special("unknown"), pad_token=special("padding"),
      add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama")),
      add_eos_token=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
      chat_template=meta.get("tokenizer.chat_template"), name_or_path=str(f.path))


_HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def tokenizer_from_dir(path: str | os.PathLike):
  """The tokenizer saved in a directory (an HF checkpoint, or an effjax Orbax checkpoint's copy)."""
  from transformers import AutoTokenizer

  path = Path(path)
  if not any((path / name).is_file() for name in _HF_TOKENIZER_FILES):
    raise CheckpointError(f"{path}: no tokenizer found "
                          f"(expected one of {', '.join(_HF_TOKENIZER_FILES)})")
  return AutoTokenizer.from_pretrained(path, local_files_only=True)


def load_tokenizer(path: str | os.PathLike | GGUFFile):
  """Tokenizer of a GGUF file or of a directory."""
  if isinstance(path, GGUFFile) or Path(path).is_file():
    return tokenizer_from_gguf(path)
  return tokenizer_from_dir(path)
