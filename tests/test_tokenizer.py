"""Tokenizers rebuilt from GGUF metadata give the same ids as the reference tokenizers (a trained
`tokenizers` BPE for the tiny file, transformers' GGUF tokenizer for the embedded models), carry the
chat template, survive save/restore; a missing or unsupported tokenizer is a clear error."""

from __future__ import annotations

import pytest

from effjax.errors import CheckpointError
from effjax.checkpoints.tokenizer import load_tokenizer, tokenizer_from_dir, tokenizer_from_gguf
from effjax.models import create_model, tiny_config
from tiny_gguf import CHAT_TEMPLATE, hf_gguf_tokenizer, params_of, real_gguf, tiny_bpe, write_gguf

TEXTS = [
    "Hello world!", "The capital of France is", "  leading spaces and trailing   ",
    "tabs\tand\nnewlines\n\n\nthree", "a   b    c     d", "     ", "\n", "",
    "numbers 1234567890 3.14159 -42 1,000,000",
    "unicode: naïve café, Straße, 日本語のテキスト, Ελληνικά, русский, עברית",
    "emoji 😀🎉👍🏽 and flags 🇫🇷 zwj 👩‍💻", "x\u00a0y\u2003z\u200b",
    "def f(x):\n    return x ** 2  # square\n", "if (a != b) { return a->c; } // code\r\n",
    "I'm you're they'll WE'VE", "<table><tr><td>1</td></tr></table>",
    "<|im_start|>user\nhi<|im_end|>", "<start_of_turn>user\nhi<end_of_turn>",
]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3 + 3 = ?"}]


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
  cfg = tiny_config("llama", vocab_size=len(tiny_bpe()[1]))
  return write_gguf(tmp_path_factory.mktemp("tok") / "tiny.gguf", cfg, params_of(create_model(cfg)))


def test_byte_level_bpe_matches_the_trained_tokenizer(tiny_file):
  ref, tokens, _ = tiny_bpe()
  tok = tokenizer_from_gguf(tiny_file)
  for text in TEXTS:
    assert tok(text).input_ids == ref.encode(text).ids, text
    assert tok.decode(tok(text).input_ids) == text
  assert (tok.bos_token, tok.eos_token, tok.pad_token) == (
      "<|im_start|>", "<|im_end|>", "<|endoftext|>")
  # Control tokens stay whole.
  assert tok("<|im_start|>hi").input_ids[0] == tokens.index("<|im_start|>")
  assert tok.chat_template == CHAT_TEMPLATE
  text = tok.apply_chat_template(MESSAGES[1:2], tokenize=False, add_generation_prompt=True)
  assert text == "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def smollm2():
  return tokenizer_from_gguf(real_gguf("smollm2-135m-instruct"))


def test_smollm2_ids_match_transformers_gguf_tokenizer(smollm2):
  ref = hf_gguf_tokenizer("smollm2-135m-instruct")
  for text in TEXTS:
    ids = smollm2(text).input_ids
    assert ids == ref(text).input_ids, text
    assert smollm2.decode(ids) == text
  assert (smollm2.bos_token, smollm2.eos_token, smollm2.pad_token) == (
      ref.bos_token, ref.eos_token, ref.pad_token)


def test_smollm2_splits_every_numeral(smollm2):
  """llama.cpp's "smollm" pre-tokenizer (like SmolLM2's own tokenizer.json) isolates every \\p{N}
  character before the GPT-2 split; transformers' GGUF tokenizer (5.24) lacks it and merges " ½"."""
  ids = smollm2(" ½ 42").input_ids
  assert smollm2.convert_ids_to_tokens(ids) == ["Ġ", "Â½", "Ġ", "4", "2"]


def test_smollm2_chat_template_matches(smollm2):
  ref = hf_gguf_tokenizer("smollm2-135m-instruct")
  kw = dict(add_generation_prompt=True)
  text = smollm2.apply_chat_template(MESSAGES, tokenize=False, **kw)
  assert text == ref.apply_chat_template(MESSAGES, tokenize=False, **kw)
  assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
  assert text.endswith("<|im_start|>assistant\n")
  assert smollm2(text).input_ids == ref(text).input_ids
  assert smollm2(text).input_ids.count(smollm2.convert_tokens_to_ids("<|im_start|>")) == 5


def test_saved_tokenizer_restores_identically(tmp_path, smollm2):
  smollm2.save_pretrained(tmp_path)
  back = tokenizer_from_dir(tmp_path)
  for text in TEXTS:
    assert back(text).input_ids == smollm2(text).input_ids, text
  assert back.chat_template == smollm2.chat_template
  assert (back.bos_token, back.eos_token, back.pad_token) == (
      smollm2.bos_token, smollm2.eos_token, smollm2.pad_token)


@pytest.mark.slow
def test_gemma3_ids_match_transformers_gguf_tokenizer():
  tok = tokenizer_from_gguf(real_gguf("gemma3-270m"))
  ref = hf_gguf_tokenizer("gemma3-270m")
  for text in TEXTS:
    ids = tok(text).input_ids
    assert ids == ref(text).input_ids, text
    assert ids[0] == tok.bos_token_id  # Gemma adds <bos>
    assert tok.decode(ids[1:]) == text
  assert tok.chat_template is None  # the base model's file has none


def test_gguf_without_tokenizer_is_an_error(tmp_path):
  cfg = tiny_config("qwen2")
  path = write_gguf(tmp_path / "bare.gguf", cfg, params_of(create_model(cfg)), tokenizer=False)
  with pytest.raises(CheckpointError, match=r"bare\.gguf: the GGUF file has no tokenizer"):
    load_tokenizer(path)


def test_unsupported_pre_tokenizer_is_named(tmp_path):
  cfg = tiny_config("llama", vocab_size=len(tiny_bpe()[1]))
  path = write_gguf(tmp_path / "pre.gguf", cfg, params_of(create_model(cfg)), pre="made-up")
  with pytest.raises(CheckpointError, match=r"pre\.gguf: byte-level BPE pre-tokenizer 'made-up' is not "
                                            r"supported; supported: .*smollm"):
    tokenizer_from_gguf(path)


def test_directory_without_tokenizer_is_an_error(tmp_path):
  (tmp_path / "config.json").write_text("{}")
  with pytest.raises(CheckpointError, match=r"no tokenizer found \(expected one of tokenizer.json"):
    load_tokenizer(tmp_path)
