"""Durability of RLHF runs (label log, kill -9 and resume), raters, and the curve fit."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from effjax.rlhf import curves, labels, raters
from effjax.rlhf.config import config_from_dict

ROOT = pathlib.Path(__file__).parents[1]


def record(batch, row, choice=1):
  return dict(batch=batch, row=row, prompt_id=row, a=[1, 2], b=[3], a_len=2, b_len=1, choice=choice)


def test_label_log_survives_a_torn_write(tmp_path, capsys):
  path = tmp_path / "labels.jsonl"
  log = labels.LabelLog(path)
  log.append([record(0, 0), record(0, 1, 0)])
  good_size = path.stat().st_size
  # A crash in the middle of writing the next record: half a line, no newline.
  line = labels.encode(record(1, 0))
  with open(path, "a") as f:
    f.write(line[: len(line) // 2])
  log = labels.LabelLog(path)
  assert [(r["batch"], r["row"], r["choice"]) for r in log.records] == [(0, 0, 1), (0, 1, 0)]
  assert path.stat().st_size == good_size  # truncated to the last good record
  assert "torn" in capsys.readouterr().err
  log.append([record(1, 0)])
  assert len(labels.LabelLog(path).records) == 3
  with pytest.raises(ValueError, match="already logged"):
    log.append([record(1, 0)])
  # A full line whose content was damaged (bad CRC) at the end is torn too; in the middle it is an error.
  text = path.read_text().splitlines(keepends=True)
  path.write_text(text[0] + text[1].replace('"choice":0', '"choice":1') + text[2])
  with pytest.raises(ValueError, match="corrupt label record on line 2"):
    labels.LabelLog(path)


def test_metrics_go_to_jsonl_and_tensorboard(tmp_path):
  """Every numeric metric reaches TensorBoard at its label count; a resume drops redone JSONL rows."""
  import struct

  pytest.importorskip("tensorboardX")
  from tensorboardX.proto import event_pb2

  log = labels.MetricsLog(tmp_path / "metrics.jsonl", 0, tmp_path / "tb")
  log.write({"batch": 0, "labels": 64, "rm_loss": 0.5, "note": "text is not a scalar"})
  log.write({"batch": 1, "labels": 128, "rm_loss": 0.25, "win_rate": 0.75})
  log.close()
  scalars = []
  for f in (tmp_path / "tb").iterdir():
    data = f.read_bytes()
    at = 0
    while at < len(data):  # TFRecord: length, crc, payload, crc
      (n,) = struct.unpack("<Q", data[at:at + 8])
      event = event_pb2.Event.FromString(data[at + 12:at + 12 + n])
      at += 16 + n
      scalars += [(v.tag, event.step, round(v.simple_value, 4)) for v in event.summary.value]
  assert sorted(scalars) == [("rm_loss", 64, 0.5), ("rm_loss", 128, 0.25), ("win_rate", 128, 0.75)]
  assert [r["batch"] for r in labels.MetricsLog(tmp_path / "metrics.jsonl", 1).records] == [0]


def test_label_arrays_round_trip():
  recs = [record(0, 0), dict(record(0, 1), a=[4], a_len=1, b=[5, 6, 7], b_len=3)]
  arr = labels.to_arrays(recs, 3)
  assert arr["a"].tolist() == [[1, 2, 0], [4, 0, 0]]
  assert arr["b_mask"].tolist() == [[True, False, False], [True, True, True]]


TINY = {
    "seed": 3, "checkpoint_every": 2,
    "agent": {"kind": "info_directed", "num_batches": 6, "prompts_per_batch": 8,
              "responses_per_prompt": 4, "eval_every": 2},
    "enn": {"num_particles": 4, "point_hidden": [16], "prior_hidden": [8], "diff_hidden": [16],
            "steps_per_batch": 2, "replay": 8},
    "policy": {"lr": 0.01, "top_k": 4},
    "env": {"kind": "toy", "toy": {
        "vocab_size": 12, "prompt_len": 3, "response_len": 3, "num_train_prompts": 200,
        "num_eval_prompts": 16, "teacher_hidden": 8, "sft_steps": 0,
        "model": {"dim": 16, "mlp_dim": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1,
                  "head_dim": 8}}},
}


def _config(tmp_path, name):
  cfg = dict(TINY, out_dir=str(tmp_path / name), cache_dir=str(tmp_path / "cache"))
  path = tmp_path / f"{name}.json"
  path.write_text(json.dumps(cfg))
  return path, cfg


def _metrics(run_dir):
  out = []
  for line in (run_dir / "metrics.jsonl").read_text().splitlines():
    r = json.loads(line)
    r.pop("seconds", None)
    out.append(r)
  return out


def test_kill_and_resume_equals_an_uninterrupted_run(tmp_path):
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  # `python -m effjax.rlhf.cli run` is `effjax rlhf run` without importing every area's CLI.
  command = lambda path: [sys.executable, "-m", "effjax.rlhf.cli", "run", "--config", str(path),
                          "--no-progress"]
  ref_path, _ = _config(tmp_path, "reference")
  ref = subprocess.run(command(ref_path), env=env, capture_output=True, text=True, timeout=900)
  assert ref.returncode == 0, ref.stderr[-3000:]

  path, _ = _config(tmp_path, "killed")
  run_dir = tmp_path / "killed"
  proc = subprocess.Popen(command(path), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
  label_file = run_dir / "labels.jsonl"
  deadline = time.monotonic() + 600
  # Kill once three batches of labels are logged (past the first checkpoint, before the end).
  while time.monotonic() < deadline and proc.poll() is None:
    if label_file.exists() and label_file.read_text().count("\n") >= 3 * 8:
      break
    time.sleep(0.02)
  assert proc.poll() is None, f"run ended before it could be killed: {proc.stderr.read()[-2000:]}"
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  assert label_file.read_text().count("\n") < 6 * 8

  done = subprocess.run(command(path), env=env, capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "resuming" in done.stderr

  ref_dir = tmp_path / "reference"
  assert _metrics(run_dir) == _metrics(ref_dir)
  ref_labels = labels.LabelLog(ref_dir / "labels.jsonl").records
  got_labels = labels.LabelLog(label_file).records
  assert len(got_labels) == 6 * 8 and got_labels == ref_labels  # nothing lost, nothing twice
  assert json.loads((run_dir / "result.json").read_text()) == \
      json.loads((ref_dir / "result.json").read_text())
  from effjax.rlhf.agents import Checkpoints
  finals = [Checkpoints(d / "checkpoints", 2) for d in (run_dir, ref_dir)]
  assert [c.latest() for c in finals] == [6, 6]
  got, want = (c.arrays(6) for c in finals)
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k])


def test_scorer_rater_probability_noise_and_subsets():
  scorer = lambda prompts, lens, resp, mask, ids, split: resp.sum(-1).astype(float)
  rater = raters.ScorerRater(scorer, temperature=2.0, noise=0.1)
  a = np.array([[3], [1], [2]])
  b = np.array([[1], [3], [2]])
  m = np.ones((3, 1), bool)
  pb = raters.PairBatch(np.ones((3, 1), np.int32), np.ones(3), a, m, b, m, np.arange(3))
  p = rater.prob(pb)
  s = 1 / (1 + np.exp(-1.0))
  np.testing.assert_allclose(p, [0.1 + 0.8 * s, 0.1 + 0.8 * (1 - s), 0.5])
  full = rater.label(pb, jax.random.key(0))
  sub = rater.label(pb.rows(np.array([2, 0])), jax.random.key(0))
  assert sub.tolist() == [full[2], full[0]]


def test_gsm8k_answer_extraction():
  assert raters.final_number("so 3 + 4 = 7 apples.\n#### 1,234") == "1234"
  assert raters.final_number("The answer is 12.50 dollars") == "12.5"
  assert raters.final_number("we get 5 then 8.") == "8"
  assert raters.final_number("no digits") is None


def test_curve_fit_recovers_parameters_and_ratio():
  n = np.geomspace(100, 1e5, 12)
  a, b = 300.0, 0.2
  fa, fb = curves.fit_win_curve(n, curves.win_curve(n, a, b))
  np.testing.assert_allclose([fa, fb], [a, b], rtol=1e-4)
  w = float(curves.win_curve(5000.0, a, b))
  np.testing.assert_allclose(curves.labels_to_reach(w, a, b), 5000.0, rtol=1e-9)
  assert curves.labels_to_reach(0.9, a, 1e-6) == float("inf")  # a flat fit never gets there
  assert curves.labels_to_reach(0.9, a, -0.1) == float("inf")  # nor does a falling one
  # Offline reaches w(1e5) of a = 3000; a group with a = 300 gets there at 1e4: 10x. Seeds scatter
  # around the curves; the bootstrap interval holds the true ratio and the measured ratio (first
  # evaluation at or above the target, no fit) is 1e5 / 15,199 on this grid.
  gen = np.random.default_rng(0)
  run = lambda a, labels, s: dict(labels=labels, value=curves.win_curve(labels, a, 0.2)
                                  + gen.normal(0, 0.01, len(labels)), seed=s, dir="")
  groups = {"offline": [run(3000.0, n, s) for s in range(6)],
            "info_directed": [run(300.0, n[:10], s) for s in range(6)]}
  summary = curves.summarize(groups)
  eff = summary["info_directed"]["efficiency"]
  assert eff["ratio_lo"] < 10.0 < eff["ratio_hi"] and abs(eff["ratio"] - 10.0) < 2.0
  assert eff["ratio_hi"] / eff["ratio_lo"] < 3.0 and eff["extrapolated"] == 0.0
  assert eff["measured_labels"] == int(n[8]) and eff["reference_labels"] == 100000
  mean, lo, hi = summary["offline"]["final"], summary["offline"]["final_lo"], summary["offline"]["final_hi"]
  assert lo < mean < hi and hi - lo < 0.05
  # The ordering statistic: the difference of two means with its interval.
  d, d_lo, d_hi = curves.difference_interval([0.8, 0.82, 0.81], [0.7, 0.71, 0.69])
  np.testing.assert_allclose(d, 0.11, atol=1e-9)
  assert 0.08 < d_lo < d < d_hi < 0.14


def test_arithmetic_items_and_their_verifiable_scores():
  """The real-model arithmetic items: seeded, gold answers right, and the verifiable scorer tells a
  short right answer from a wrong or unfinished one."""
  from effjax.rlhf.config import ArithmeticConfig
  from effjax.rlhf.gsm8k import arithmetic_problems
  cfg = ArithmeticConfig(num_train_prompts=300, num_eval_prompts=10)
  items = arithmetic_problems(cfg)
  assert len(items) == 310 and items == arithmetic_problems(cfg)
  assert items != arithmetic_problems(ArithmeticConfig(seed=1, num_train_prompts=300, num_eval_prompts=10))
  for question, gold in items:
    a, op, b = question.removeprefix("What is ").removesuffix("?").split()
    assert gold == f"#### {eval(f'{a} {op} {b}')}" and op in "+-*"
    assert (op != "-" or int(a) >= int(b)) and (op != "*" or 2 <= int(b) <= 9)
  assert {q.split()[3] for q, _ in items} == {"+", "-", "*"}
  texts = {"47 + 38 = 85": 1.0, "The answer is 85.": 1.0, "47 + 38 = 75": 0.0,
           "To add 47 and 38, we first": 0.0}
  scorer = raters.GSM8KScorer(decode=lambda toks: list(texts)[int(toks[0])], gold=lambda i, s: "#### 85")
  resp = np.arange(4)[:, None]
  got = scorer(None, None, resp, np.ones_like(resp, bool), np.zeros(4, int), "train")
  assert got.tolist() == list(texts.values())
