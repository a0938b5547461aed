"""The forward cost model: its shape (positive, monotone in k, linear in the cache length), the
on-disk cache per device and architecture (measured once, only missing points later), and a
user's table."""

import json

import numpy as np
import pytest

from effjax.decoding import cost_model
from effjax.decoding.cost_model import CostModel, cost_model_for
from effjax.models import create_model, tiny_config


def test_cost_is_monotone_in_tokens_and_linear_in_cache_length():
  # At S=256, 2 tokens measured slower than 4 (as XLA:CPU really does): the envelope takes 4's.
  cm = CostModel(((256, 1, 0.010), (256, 2, 0.016), (256, 4, 0.013), (256, 8, 0.020),
                  (1024, 1, 0.014), (1024, 2, 0.020), (1024, 4, 0.018), (1024, 8, 0.030)))
  assert cm.seconds(2, 256) == pytest.approx(0.013)
  assert cm.seconds(3, 256) == pytest.approx(0.013)  # between measured sizes: the next one up
  for s in (64, 256, 512, 1024, 4096):
    costs = [cm.seconds(k, s) for k in range(1, 9)]
    assert all(c > 0 for c in costs) and costs == sorted(costs)
  assert cm.seconds(1, 640) == pytest.approx(0.012)  # halfway between 256 and 1024
  assert cm.seconds(8, 4096) == pytest.approx(0.020 + 0.010 * (4096 - 256) / 768)
  assert cm.seconds(1, 1) > 0  # extrapolated down, floored
  np.testing.assert_allclose(cm.relative([1, 4, 8], 256), [1.0, 1.3, 2.0])
  assert cm.covers(8) and not cm.covers(9)
  with pytest.raises(ValueError, match="no measurement of 9"):
    cm.seconds(9, 256)


@pytest.mark.parametrize("entries,msg", [((), "at least one"), (((256, 0, 0.1),), "k must be"),
                                         (((256, 1, -1.0),), "positive"),
                                         (((256, 1, 0.1), (256, 1, 0.2)), "two entries")])
def test_bad_tables_are_refused(entries, msg):
  with pytest.raises(ValueError, match=msg):
    CostModel(entries)


def test_measured_once_per_device_and_model_then_only_what_is_missing(tmp_path, monkeypatch):
  monkeypatch.setenv("EFFJAX_CACHE", str(tmp_path))
  cfg = tiny_config("llama", vocab_size=64, num_layers=2, max_position=512)
  model = create_model(cfg)
  measured = []
  real = cost_model.measure

  def spy(model, points, **kw):
    measured.append(sorted(points))
    return real(model, points, reps=2)

  monkeypatch.setattr(cost_model, "measure", spy)
  cm = cost_model_for(model, [2, 1])
  assert measured == [[(256, 1), (256, 2), (512, 1), (512, 2)]]
  path = cost_model.default_path(cfg)
  assert path.is_file() and path.parent == tmp_path / "cost_models"
  for s in (256, 384, 512):
    costs = [cm.seconds(k, s) for k in (1, 2)]
    assert all(c > 0 for c in costs) and costs == sorted(costs)
  assert cost_model_for(model, [2]) == cm and len(measured) == 1  # read back, not measured
  # A larger block measures its own points only; the same architecture in another model object
  # (other weights) shares the table.
  bigger = cost_model_for(create_model(cfg, seed=1), [2, 4])
  assert measured[1] == [(256, 4), (512, 4)]
  assert bigger.covers(4) and {e[:2] for e in cm.entries} < {e[:2] for e in bigger.entries}
  other = tiny_config("llama", vocab_size=64, num_layers=3, max_position=512)
  assert cost_model.default_path(other) != path


def test_each_host_processor_keeps_its_own_table(monkeypatch):
  # JAX calls every CPU "cpu"; the processor model and the usable cores tell two hosts apart.
  cfg = tiny_config("llama", vocab_size=64, num_layers=2, max_position=512)
  here = cost_model.host_cpu()
  assert here.rsplit(" x", 1)[1].isdigit() and here in cost_model.device_name()
  paths = set()
  for cpu in ("Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz x2", "AMD EPYC 9B14 x2",
              "AMD EPYC 9B14 x4"):
    monkeypatch.setattr(cost_model, "host_cpu", lambda cpu=cpu: cpu)
    path = cost_model.default_path(cfg)
    assert path.name.startswith("cpu-cpu-x") and " " not in path.name
    paths.add(path)
  assert len(paths) == 3


def test_auto_restores_with_the_load_time_it_last_took(tmp_path, monkeypatch):
  monkeypatch.setenv("EFFJAX_CACHE", str(tmp_path))
  from effjax.decoding.budget import Auto
  from effjax.decoding.engine import GenerationResult
  from effjax.decoding.methods import prepare, remember_load

  model = create_model(tiny_config("llama", vocab_size=64, num_layers=2))
  table = tmp_path / "cost.json"
  table.write_text(json.dumps({"entries": [[512, 1, 0.01], [512, 64, 0.012]]}))
  auto = prepare(Auto(), model, cost_model=str(table))
  assert auto.load_seconds == Auto.load_seconds  # nothing remembered yet: the default
  assert cost_model.remembered_load(model.cfg, auto.program_name) is None
  result = lambda load: GenerationResult([[1]], [3], 1, 0.0, 0.0, hand_over_load=load)
  remember_load(auto, model, result((14.0, "compiled")))  # a first compile is not a restore
  remember_load(auto, model, result(None))  # no hand-over
  assert not cost_model.load_times_path(model.cfg).exists()
  remember_load(auto, model, result((2.25, "disk")))
  assert prepare(Auto(), model, cost_model=str(table)).load_seconds == 2.25
  # Another set of options is another program; a broken file is as good as none.
  fewer = prepare(Auto(options=Auto().options[:2]), model, cost_model=str(table))
  assert fewer.program_name != auto.program_name and fewer.load_seconds == Auto.load_seconds
  cost_model.load_times_path(model.cfg).write_text("[1, 2")
  assert prepare(Auto(), model, cost_model=str(table)).load_seconds == Auto.load_seconds
  remember_load(auto, model, result((3.5, "disk")))
  assert cost_model.remembered_load(model.cfg, auto.program_name) == 3.5


def test_a_users_table_is_used_as_given(tmp_path):
  model = create_model(tiny_config("llama", vocab_size=64, num_layers=2))
  path = tmp_path / "cost.json"
  path.write_text(json.dumps({"entries": [[512, 1, 0.01], [512, 16, 0.012]]}))
  cm = cost_model_for(model, [10], path=path)
  assert cm.seconds(10, 512) == pytest.approx(0.012) and cm.seconds(10, 4000) == 0.012
  with pytest.raises(ValueError, match="32 or more tokens"):
    cost_model_for(model, [32], path=path)
  path.write_text("{\"entries\": [[512, 1]]}")
  with pytest.raises(ValueError, match="not a cost model"):
    cost_model_for(model, [4], path=path)
