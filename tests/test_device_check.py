"""benchmarks/device_check.py's CPU dry run: tiny shapes, the same code path as on a GPU, and
the JSON + markdown it writes."""

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "device_check.py"


def test_dry_run_writes_costs_rates_and_implied_speedups(tmp_path):
  spec = importlib.util.spec_from_file_location("device_check", SCRIPT)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  # no deadline: a loaded CI machine must not turn into skipped items
  assert mod.main(["--dry-run", "--budget-s", "1e9", "--out", str(tmp_path)]) == 0
  r = json.loads((tmp_path / "device_check.json").read_text())
  assert r["dry_run"] and r["copy_bandwidth_GBps"] > 0 and not r["skipped"]
  assert list(r["models"]) == ["smollm2-135m", "gemma3-270m", "llama3.1-8b"]
  for m in r["models"].values():
    assert m["params_dtype"] == "bfloat16"
    assert sorted(map(int, m["forward_ms"])) == [1, 2, 4, 11]
    assert all(v > 0 for v in m["forward_ms"].values()) and m["forward_vs_k1"]["1"] == 1.0
    assert m["decode_tokens_per_s"] > 0 and m["roofline_tokens_per_s"] > 0
  # Blocks up to the largest measured k (11) get an implied speedup: tau x cost(1) / cost(block).
  smol = r["models"]["smollm2-135m"]
  assert set(smol["implied_speedup"]) == {"pld", "esp-bc10"}
  pld = smol["implied_speedup"]["pld"]
  assert abs(pld["speedup"] - 1.56 / smol["forward_vs_k1"]["11"]) < 0.01
  md = (tmp_path / "device_check.md").read_text()
  assert "DRY RUN" in md and "| llama3.1-8b | pld | 1.44 | 11 |" in md
