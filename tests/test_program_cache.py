"""Compiled programs stored and restored across engines: the restored programs give the same
tokens, anything the program depends on changes its key, unusable files are recompiled, and
strategies that are not plain values are never stored."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from effjax import program_cache
from effjax.decoding.engine import AutoRegressive, Engine, StepHook
from effjax.decoding.sampling import Sampler
from effjax.models import create_model, make_mesh, tiny_config

PROMPTS = [[1, 5, 9, 2, 7], [3, 4]]


@pytest.fixture(scope="module")
def model():
  return create_model(tiny_config("llama"), seed=1)


@pytest.fixture
def store(tmp_path, monkeypatch):
  monkeypatch.setenv("EFFJAX_PROGRAMS", str(tmp_path / "programs"))
  return tmp_path / "programs"


def _sources(since: int) -> list[tuple[str, str]]:
  return [(e.name, e.source) for e in program_cache.events[since:]]


def _generate(model, strategy=None, **engine_kw):
  eng = Engine(model, cache_len=32, buckets=[16, 32], **engine_kw)
  return eng.generate(PROMPTS, strategy=strategy, max_new_tokens=6, seed=4).tokens


def test_a_new_engine_restores_the_stored_programs(model, store):
  strategy = AutoRegressive(Sampler(temperature=0.8, top_k=5))
  seen = len(program_cache.events)
  want = _generate(model, strategy)
  assert _sources(seen) == [("init", "compiled"), ("prefill", "compiled"), ("decode", "compiled")]
  assert len(list(store.glob("*.pkl"))) == 3
  seen = len(program_cache.events)
  again = _generate(model, AutoRegressive(Sampler(temperature=0.8, top_k=5)))  # equal value
  assert _sources(seen) == [("init", "disk"), ("prefill", "disk"), ("decode", "disk")]
  assert again == want
  seen = len(program_cache.events)
  _generate(model, AutoRegressive(Sampler(temperature=0.8, top_k=6)))  # another program
  assert _sources(seen) == [("init", "compiled"), ("prefill", "compiled"), ("decode", "compiled")]


def test_shapes_config_and_mesh_change_the_key(model, store):
  _generate(model)
  seen = len(program_cache.events)
  other = create_model(tiny_config("llama", norm_eps=1e-3), seed=1)  # same shapes, other math
  _generate(other)
  _generate(model, mesh=make_mesh(data=2, fsdp=2, tensor=2))
  eng = Engine(model, cache_len=32, buckets=[16, 32])
  eng.generate([[1] * 20], max_new_tokens=6)  # the next prompt bucket
  assert [s for _, s in _sources(seen)] == ["compiled"] * 9


def test_unusable_program_files_are_recompiled(model, store, capsys):
  want = _generate(model)
  for path in store.glob("*.pkl"):
    path.write_bytes(path.read_bytes()[:100])
  seen = len(program_cache.events)
  assert _generate(model) == want
  assert _sources(seen) == [("init", "compiled"), ("prefill", "compiled"), ("decode", "compiled")]
  assert "stored program unusable" in capsys.readouterr().err
  seen = len(program_cache.events)
  assert _generate(model) == want
  assert _sources(seen) == [("init", "disk"), ("prefill", "disk"), ("decode", "disk")]


@dataclasses.dataclass(frozen=True, eq=False)
class _Bias(StepHook):
  vector: object  # an array: its repr does not show every value

  def process_logits(self, state, logits):
    return logits + jnp.asarray(self.vector)[: logits.shape[-1]]


def test_strategies_holding_arrays_are_kept_in_memory_only(model, store):
  hooked = AutoRegressive(hook=_Bias(np.linspace(0, 1, 256, dtype=np.float32)))
  assert program_cache.describe(hooked) is None
  _generate(model, hooked)
  assert not list(store.glob("*.pkl"))
  assert program_cache.describe(AutoRegressive()) == program_cache.describe(AutoRegressive())
  assert "top_k=5" in program_cache.describe(AutoRegressive(Sampler(temperature=1.0, top_k=5)))
  assert program_cache.describe((1, "a", None, 2.0)) == "(1, 'a', None, 2.0,)"
  assert program_cache.describe(object()) is None


def test_fields_only_the_host_reads_do_not_name_a_program():
  from effjax.decoding.budget import Auto

  describe = program_cache.describe
  # When auto's program is loaded (load_seconds, load_steps) is decided on the host: a new
  # remembered load time must not make the stored programs unreachable.
  assert describe(Auto(load_seconds=2.4, load_steps=8)) == describe(Auto())
  assert "load_seconds" not in describe(Auto())
  assert describe(Auto(plain_only=True)) != describe(Auto())  # the starter is another program
  assert describe(Auto(chain=12)) != describe(Auto())


def test_without_a_directory_nothing_is_stored(model, tmp_path, monkeypatch):
  monkeypatch.delenv("EFFJAX_PROGRAMS", raising=False)
  seen = len(program_cache.events)
  _generate(model)
  assert _sources(seen) == [("init", "compiled"), ("prefill", "compiled"), ("decode", "compiled")]
  assert not list(tmp_path.rglob("*.pkl"))


@pytest.fixture
def jax_persistent_cache(tmp_path):
  """JAX's own persistent compilation cache on, for every program, in a temporary directory."""
  import jax
  from jax.experimental.compilation_cache import compilation_cache

  keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
  before = {k: jax.config.values[k] for k in keys}
  jax.config.update("jax_compilation_cache_dir", str(tmp_path / "jax"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  compilation_cache.reset_cache()
  yield
  for k, v in before.items():
    jax.config.update(k, v)
  compilation_cache.reset_cache()


def test_programs_are_stored_whole_when_jax_has_them_cached(model, jax_persistent_cache, tmp_path,
                                                            monkeypatch):
  """An executable JAX restored from its own cache serializes without its kernels; stored programs
  are compiled afresh, so a restored one runs."""
  import jax

  strategy = AutoRegressive(Sampler(temperature=0.5))
  monkeypatch.delenv("EFFJAX_PROGRAMS", raising=False)
  want = _generate(model, strategy)  # compiled into JAX's cache only
  jax.clear_caches()
  monkeypatch.setenv("EFFJAX_PROGRAMS", str(tmp_path / "programs"))
  assert _generate(model, strategy) == want  # stored
  seen = len(program_cache.events)
  assert _generate(model, strategy) == want  # restored from the store
  assert _sources(seen) == [("init", "disk"), ("prefill", "disk"), ("decode", "disk")]
