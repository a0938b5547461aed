"""benchmarks/device_check.py's CPU dry run: tiny shapes, the same code path as on a GPU, and
the JSON + markdown it writes."""

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "device_check.py"


def test_dry_run_writes_costs_rates_steps_and_implied_speedups(tmp_path):
  spec = importlib.util.spec_from_file_location("device_check", SCRIPT)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  # no deadline: a loaded CI machine must not turn into skipped items
  assert mod.main(["--dry-run", "--budget-s", "1e9", "--out", str(tmp_path)]) == 0
  r = json.loads((tmp_path / "device_check.json").read_text())
  assert r["dry_run"] and not r["skipped"]
  assert r["copy_bandwidth_GBps"] >= r["elementwise_bandwidth_GBps"] > 0
  assert "sum over 0.0078125 GiB" in (tmp_path / "device_check.md").read_text()  # 8 MiB
  assert list(r["models"]) == ["smollm2-135m", "gemma3-270m", "llama3.1-8b"]
  for name, m in r["models"].items():
    assert m["params_dtype"] == "bfloat16"
    assert sorted(map(int, m["forward_ms"])) == [1, 2, 4, 11]
    assert all(v > 0 for v in m["forward_ms"].values()) and m["forward_vs_k1"]["1"] == 1.0
    assert m["decode_tokens_per_s"] > 0 and m["roofline_tokens_per_s"] > 0
    # int8 weights: a byte per weight, a float32 scale per output row (the roofline's bytes)
    assert m["int8_decode_tokens_per_s"] > 0
    cfg = mod.model_configs(True)[name]
    int8_bytes = mod.step_bytes(cfg.replace(quant="int8"), r["cache_len"])
    assert 0.5 < int8_bytes / mod.step_bytes(cfg, r["cache_len"]) < 0.75
    assert abs(m["int8_roofline_tokens_per_s"] * int8_bytes
               - r["copy_bandwidth_GBps"] * 1e9) < 1e-3 * r["copy_bandwidth_GBps"] * 1e9
    # Steps: plain decoding and prompt lookup, each against the forward of its block.
    assert list(m["step_ms"]) == ["ar", "pld"] and all(v > 0 for v in m["step_ms"].values())
    for method, block in (("ar", "1"), ("pld", "11")):
      ratio = m["step_ms"][method] / m["forward_ms"][block]
      assert abs(m["step_vs_forward"][method] - ratio) < 0.01 * ratio + 1e-3
    # Every method with a CPU tau is listed; blocks up to the largest measured k (11) get the
    # speedup from the forwards, tau x cost(1) / cost(block); timed steps the one from the steps.
    assert set(m["implied_speedup"]) == set(mod.CPU_TAUS[name])
    pld = m["implied_speedup"]["pld"]
    tau = mod.CPU_TAUS[name]["pld"]
    assert pld["block"] == 11
    assert abs(pld["speedup"] - tau / m["forward_vs_k1"]["11"]) < 0.01 * pld["speedup"]
    step = tau * m["step_ms"]["ar"] / m["step_ms"]["pld"]
    assert abs(pld["step_speedup"] - step) < 0.01 * step
    assert all("speedup" not in v for k, v in m["implied_speedup"].items() if v["block"] > 11)
  md = (tmp_path / "device_check.md").read_text()
  assert "DRY RUN" in md and "| llama3.1-8b | pld | 1.44 | 11 |" in md
  assert "| gemma3-270m | pld |" in md  # the steps table
  assert "| smollm2-135m | int8 |" in md
