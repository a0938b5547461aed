"""Durable logs: the label log (labels are the expensive thing) and the metrics log.

The label log is JSONL, one label per line with a CRC of its content. Labels are appended, flushed
and fsync'd before anything uses them. On open, a torn last record (a crash mid-write: no newline,
bad JSON or bad CRC) is dropped and the file truncated to the last good record; damage anywhere
else is an error, never silently skipped.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import zlib

import numpy as np


def _crc(body: str) -> str:
  return f"{zlib.crc32(body.encode()):08x}"


def encode(record: dict) -> str:
  body = json.dumps(record, sort_keys=True, separators=(",", ":"))
  return json.dumps({"crc": _crc(body), "label": record}, sort_keys=True, separators=(",", ":")) + "\n"


def decode(line: str) -> dict:
  obj = json.loads(line)
  rec = obj["label"]
  if obj["crc"] != _crc(json.dumps(rec, sort_keys=True, separators=(",", ":"))):
    raise ValueError("crc mismatch")
  return rec


def read_records(path: pathlib.Path, decode_line, what: str) -> tuple[list[dict], int]:
  """Good records and the byte length of the good prefix; a torn tail is reported, not kept."""
  if not path.exists():
    return [], 0
  data = path.read_bytes()
  records, good = [], 0
  lines = data.split(b"\n")
  for i, raw in enumerate(lines):
    last = i == len(lines) - 1
    if last and not raw:
      break
    try:
      if last:  # no newline after it: the write never finished
        raise ValueError("no trailing newline")
      records.append(decode_line(raw.decode()))
      good += len(raw) + 1
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
      if last or (i == len(lines) - 2 and not lines[-1]):
        print(f"{path}: dropping a torn last {what} record ({e})", file=sys.stderr)
        break
      raise ValueError(f"{path}: corrupt {what} record on line {i + 1}: {e}") from None
  return records, good


def _truncate(path: pathlib.Path, size: int) -> None:
  with open(path, "r+b") as f:
    f.truncate(size)
    f.flush()
    os.fsync(f.fileno())


class LabelLog:
  """Labels keyed by (batch, row). `records` holds everything on disk, in order."""

  def __init__(self, path: str | pathlib.Path):
    self.path = pathlib.Path(path)
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self.records, good = read_records(self.path, decode, "label")
    if self.path.exists() and self.path.stat().st_size != good:
      _truncate(self.path, good)
    self._by_key = {(r["batch"], r["row"]): r for r in self.records}

  def get(self, batch: int, row: int) -> dict | None:
    return self._by_key.get((batch, row))

  def append(self, records: list[dict]) -> None:
    """Append, flush and fsync: when this returns the labels survive a crash."""
    with open(self.path, "a") as f:
      for r in records:
        key = (r["batch"], r["row"])
        if key in self._by_key:
          raise ValueError(f"{self.path}: label for batch {key[0]} row {key[1]} already logged")
        f.write(encode(r))
      f.flush()
      os.fsync(f.fileno())
    for r in records:
      self.records.append(r)
      self._by_key[(r["batch"], r["row"])] = r

  def before(self, batch: int) -> list[dict]:
    return [r for r in self.records if r["batch"] < batch]


def to_arrays(records: list[dict], response_len: int) -> dict[str, np.ndarray]:
  """Label records -> stacked arrays (responses padded to response_len, masks from lengths)."""
  n = len(records)
  a = np.zeros((n, response_len), np.int32)
  b = np.zeros((n, response_len), np.int32)
  for i, r in enumerate(records):
    a[i, :len(r["a"])] = r["a"]
    b[i, :len(r["b"])] = r["b"]
  idx = np.arange(response_len)[None, :]
  return dict(prompt_ids=np.asarray([r["prompt_id"] for r in records], np.int64),
              a=a, b=b, a_mask=idx < np.asarray([r["a_len"] for r in records])[:, None],
              b_mask=idx < np.asarray([r["b_len"] for r in records])[:, None],
              choice=np.asarray([r["choice"] for r in records], np.int32))


class MetricsLog:
  """JSONL metrics keyed by batch. Reopening at batch t drops records from t on (they are redone).

  With tensorboardX installed, the numbers also go to TensorBoard event files in tensorboard_dir
  (x axis: labels). Events cannot be taken back: after a resume the redone batches are written
  again, and TensorBoard shows the latest value per step.
  """

  def __init__(self, path: str | pathlib.Path, resume_batch: int,
               tensorboard_dir: str | pathlib.Path | None = None):
    self.path = pathlib.Path(path)
    self.path.parent.mkdir(parents=True, exist_ok=True)
    records, _ = read_records(self.path, json.loads, "metrics")
    self.records = [r for r in records if r["batch"] < resume_batch]
    tmp = self.path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in self.records))
    os.replace(tmp, self.path)

    self.tensorboard = None
    if tensorboard_dir is not None:
      try:
        from tensorboardX import SummaryWriter
      except ModuleNotFoundError:
        pass  # optional: JSONL is the record of the run
      else:
        self.tensorboard = SummaryWriter(str(tensorboard_dir))

  def write(self, record: dict) -> None:
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
      f.flush()
    self.records.append(record)
    if self.tensorboard is not None:
      step = record.get("labels", record["batch"])
      for name, value in record.items():
        if name not in ("batch", "labels") and isinstance(value, (int, float)):
          self.tensorboard.add_scalar(name, value, step)
      self.tensorboard.flush()

  def close(self) -> None:
    if self.tensorboard is not None:
      self.tensorboard.close()
