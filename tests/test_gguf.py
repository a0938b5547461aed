"""GGUF loading: tiny files written like llama.cpp's converter read back exactly, the embedded SmolLM2
and Gemma 3 files match transformers' own GGUF loading (torch), broken files fail clearly."""

from __future__ import annotations

import gguf
import jax.numpy as jnp
import numpy as np
import pytest

from effjax.errors import CheckpointError
from effjax.checkpoints.gguf_reader import GGUFFile, load_gguf
from effjax.models import PRESETS, RopeScaling, create_model, tiny_config
from tiny_gguf import hf_gguf_model, hf_gguf_tokenizer, params_of, real_gguf, tiny_bpe, write_gguf

Q8_0, F16 = gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.F16
PROMPTS = ["The capital of France is", "def fibonacci(n):\n    if n < 2:\n        return n",
           "Once upon a time, in a land far away, there lived a"]


def _tiny(family: str):
  vocab = len(tiny_bpe()[1])
  if family == "llama":  # untied head; Llama 3 scaling with frequencies in all three regimes
    return tiny_config("llama", vocab_size=vocab, tie_embeddings=False, rope_theta=500_000.0,
                       rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192))
  if family == "qwen2":
    return tiny_config("qwen2", vocab_size=vocab, num_kv_heads=1)
  if family == "qwen3":
    return tiny_config("qwen3", vocab_size=vocab, head_dim=32)
  if family == "gemma2":
    return tiny_config("gemma2", vocab_size=vocab, attn_softcap=4.0, final_softcap=3.0)
  return tiny_config("gemma3", vocab_size=vocab, rope_scaling=RopeScaling("linear", 4.0))


def _with_token_ids(cfg):
  tokens = tiny_bpe()[1]
  return cfg.replace(eos_ids=(tokens.index("<|im_end|>"),), pad_id=tokens.index("<|endoftext|>"))


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gemma2", "gemma3"])
def test_llama_cpp_layout_reads_back_exactly(tmp_path, family):
  cfg = _tiny(family)
  model = create_model(cfg, seed=1)
  params = params_of(model)
  # Norm weights away from their init so the Gemma (1 + w) shift and the layout really show.
  rng = np.random.default_rng(0)
  params = {k: v + rng.normal(size=v.shape).astype(np.float32) if "norm" in k else v
            for k, v in params.items()}
  qtypes = {"layers.0.mlp.up.weight": Q8_0, "layers.1.mlp.down.weight": F16}
  path = write_gguf(tmp_path / f"{family}.gguf", cfg, params, qtypes=qtypes)
  got_cfg, got = load_gguf(path)
  assert got_cfg == _with_token_ids(cfg)
  got_params = params_of(got)
  assert got_params.keys() == params.keys()
  for name, want in params.items():
    if name in qtypes:
      want = gguf.quants.dequantize(gguf.quants.quantize(want, qtypes[name]), qtypes[name])
      assert not np.array_equal(want, params[name])  # the quantized path really ran
    # Gemma norms pass through 1 + w and back: float32 rounding, nothing more.
    atol = 3e-7 if family.startswith("gemma") and "norm" in name else 0
    np.testing.assert_allclose(got_params[name], want, rtol=0, atol=atol, err_msg=name)


@pytest.fixture(scope="module")
def smollm2():
  f = real_gguf("smollm2-135m-instruct")
  cfg, model = load_gguf(f)
  return f, cfg, model


def test_smollm2_config_matches_preset(smollm2):
  f, cfg, _ = smollm2
  assert f.metadata["general.architecture"] == "llama"
  assert cfg == PRESETS["smollm2-135m"].replace(eos_ids=(2,), pad_id=2)


def _logits(model, ids: list[int]) -> np.ndarray:
  return np.asarray(model(jnp.asarray([ids])).logits[0])


def test_smollm2_logits_match_transformers_gguf(smollm2):
  import torch

  f, _, model = smollm2
  ref = hf_gguf_model("smollm2-135m-instruct")
  tok = hf_gguf_tokenizer("smollm2-135m-instruct")
  for prompt in PROMPTS:
    ids = tok(prompt).input_ids
    with torch.no_grad():
      want = ref(torch.tensor([ids])).logits[0].numpy()
    got = _logits(model, ids)
    np.testing.assert_allclose(got, want, atol=1e-3, rtol=0, err_msg=prompt)
    assert np.abs(got).max() > 5  # real logits, not a degenerate model


@pytest.fixture(scope="module")
def gemma3():  # ~30 s: the reader parses 262k vocabulary entries one by one
  f = real_gguf("gemma3-270m")
  cfg, model = load_gguf(f)
  return f, cfg, model


@pytest.mark.slow
def test_gemma3_config_and_stored_norms(gemma3):
  f, cfg, model = gemma3
  assert cfg == PRESETS["gemma3-270m"].replace(eos_ids=(1,), pad_id=0)
  # llama.cpp stores Gemma's RMSNorm weights as 1 + w; the model holds w (it scales by 1 + w).
  stored = f.array("blk.0.post_ffw_norm.weight")
  np.testing.assert_allclose(np.asarray(model.layers[0].mlp_post_norm.scale[...]), stored - 1.0)


@pytest.mark.slow
def test_gemma3_next_token_is_sensible(gemma3):
  from effjax.checkpoints.tokenizer import tokenizer_from_gguf

  f, _, model = gemma3
  tok = tokenizer_from_gguf(f)
  ids = tok("The capital of France is Paris. The capital of Germany is").input_ids
  assert tok.decode([int(_logits(model, ids)[-1].argmax())]) == " Berlin"


@pytest.mark.slow
def test_gemma3_logits_match_transformers_gguf(gemma3):
  import torch

  _, _, model = gemma3
  ref = hf_gguf_model("gemma3-270m")
  tok = hf_gguf_tokenizer("gemma3-270m")
  for prompt in PROMPTS:
    ids = tok(prompt).input_ids
    with torch.no_grad():
      want = ref(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(_logits(model, ids), want, atol=1e-3, rtol=0, err_msg=prompt)


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
  cfg = _tiny("llama")
  path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
  return cfg, write_gguf(path, cfg, params_of(create_model(cfg)))


@pytest.mark.parametrize("keep", [0.01, 0.5, 0.999])
def test_truncated_file_is_named_as_truncated(tmp_path, tiny_file, keep):
  _, src = tiny_file
  data = src.read_bytes()
  bad = tmp_path / "cut.gguf"
  bad.write_bytes(data[:int(len(data) * keep)])
  with pytest.raises(CheckpointError, match=r"cut\.gguf: truncated"):
    load_gguf(bad)


def test_truncated_real_file(tmp_path):
  src = real_gguf("smollm2-135m-instruct").path
  bad = tmp_path / "smollm2-first-mb.gguf"
  with src.open("rb") as f:
    bad.write_bytes(f.read(1 << 20))
  with pytest.raises(CheckpointError, match=r"smollm2-first-mb\.gguf: truncated or corrupt"):
    GGUFFile(bad)


def test_not_a_gguf_file(tmp_path):
  bad = tmp_path / "model.gguf"
  bad.write_text("{}")
  with pytest.raises(CheckpointError, match=r"model\.gguf: not a GGUF file"):
    GGUFFile(bad)


def test_unknown_architecture_lists_supported(tmp_path):
  cfg = _tiny("llama")
  path = write_gguf(tmp_path / "falcon.gguf", cfg, params_of(create_model(cfg)), arch="falcon")
  with pytest.raises(CheckpointError, match=r"architecture 'falcon' is not supported; supported: "
                                            r"llama, qwen2, qwen3, gemma2, gemma3"):
    load_gguf(path)


def test_unknown_metadata_key_is_an_error(tmp_path):
  cfg = _tiny("qwen2")
  path = write_gguf(tmp_path / "moe.gguf", cfg, params_of(create_model(cfg)),
                    extra={"qwen2.expert_count": 8})
  with pytest.raises(CheckpointError,
                     match=r"unsupported qwen2 metadata keys \['qwen2.expert_count'\]"):
    load_gguf(path)


def test_missing_tensor_is_named(tmp_path):
  cfg = _tiny("qwen3")
  params = params_of(create_model(cfg))
  del params["layers.1.attn.k_norm.scale"]
  path = write_gguf(tmp_path / "holes.gguf", cfg, params)
  with pytest.raises(CheckpointError,
                     match=r"holes\.gguf: missing tensors \['layers.1.attn.k_norm.scale'\]"):
    load_gguf(path)


def test_llama3_rope_scaling_is_read_from_the_file(tmp_path):
  """Factor and low / high frequency factors come from the stored divisors, the original length
  from the metadata; divisors of another form are refused."""
  scaling = RopeScaling("llama3", 16.0, 2.0, 8.0, 1024)  # none of Llama 3's own values
  cfg = _tiny("llama").replace(rope_theta=10_000.0, head_dim=32, rope_scaling=scaling)
  params = params_of(create_model(cfg))
  path = write_gguf(tmp_path / "rope.gguf", cfg, params,
                    extra={"llama.rope.scaling.original_context_length": 1024})
  assert load_gguf(path)[0].rope_scaling == scaling
  bent = tmp_path / "bent.gguf"
  write_gguf(bent, cfg, params, extra={"llama.rope.scaling.original_context_length": 1024},
             rope_factors=lambda f: f * np.linspace(1, 1.2, len(f), dtype=np.float32))
  with pytest.raises(CheckpointError, match=r"rope_freqs.weight.*not Llama 3 scaling"):
    load_gguf(bent)

