"""Durability of RLHF runs (label log, kill -9 and resume), raters, and the curve fit."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

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


def test_human_rater_over_local_http(tmp_path):
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  rater = raters.QueueRater(str(tmp_path / "queue"), port=port, wait_seconds=20, poll_seconds=0.05)
  try:
    pb = raters.PairBatch(np.array([[1, 2]]).repeat(3, 0), np.array([2, 2, 2]),
                          np.array([[3, 4], [5, 6], [7, 8]]), np.ones((3, 2), bool),
                          np.array([[4, 3], [6, 5], [8, 7]]), np.array([[True, False]] * 3),
                          np.arange(3))

    def answer():
      url = f"http://127.0.0.1:{port}"
      for _ in range(200):
        pending = json.loads(urllib.request.urlopen(f"{url}/queries", timeout=5).read())
        if len(pending) == 3:
          break
        time.sleep(0.05)
      assert pending[1]["b"] == [6]
      for q, c in zip(pending, (1, 0, 1)):
        req = urllib.request.Request(f"{url}/answer", data=json.dumps(dict(id=q["id"], choice=c)).encode(),
                                     method="POST")
        urllib.request.urlopen(req, timeout=5).read()

    t = threading.Thread(target=answer)
    t.start()
    got = rater.label(pb, jax.random.key(0))
    t.join()
    assert got.tolist() == [1, 0, 1]
    assert rater.prob(pb) is None
    # Asked again (a resumed run), the answers on file are reused without waiting.
    assert rater.label(pb, jax.random.key(0)).tolist() == [1, 0, 1]
    rater.wait_seconds = 0.2
    with pytest.raises(TimeoutError, match="3 of 3 answers missing"):
      rater.label(pb, jax.random.key(1))
  finally:
    rater.close()


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
  groups = {
      "offline": [dict(labels=n, win=curves.win_curve(n, 3000.0, 0.2), seed=0, dir="")],
      "info_directed": [dict(labels=n[:6], win=curves.win_curve(n[:6], 300.0, 0.2), seed=0, dir="")],
  }
  summary = curves.summarize(groups)
  np.testing.assert_allclose(summary["info_directed"]["efficiency_vs_reference"], 10.0, rtol=1e-3)
