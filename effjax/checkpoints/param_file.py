"""A model's parameters as one safetensors file, memory-mapped on load and placed on devices directly.

The file holds the model's own parameter tree, whatever its layout (fused projections, int8 codes
and their scales, ...): one tensor per leaf, named by its path ("layers.3.attn.q.kernel"), in its
dtype. It is a standard safetensors file (any safetensors reader opens it); effjax adds a crc32 per
tensor in the header's `__metadata__`, and pads the header so the data starts 64-byte aligned.

Loading maps the file (copy-on-write: nothing can write through to it), checks every tensor's
checksum, and gives each device only its shard (`jax.make_array_from_callback`); an aligned tensor
in its stored dtype on a CPU device is used in place, without a copy. A truncated or corrupt file
is a CheckpointError naming the file and the tensor, never a misread.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Mapping

import jax
import ml_dtypes
import numpy as np

from effjax.checkpoints.assemble import place
from effjax.errors import CheckpointError

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
           "BOOL": np.bool_}
_CODES = {np.dtype(v): k for k, v in _DTYPES.items()}
_ALIGN = 64
_CRC_KEY = "effjax.crc32"
_MAX_HEADER = 1 << 26  # 64 MiB: far beyond any model's table of tensors


def save(path: str | os.PathLike, arrays: Iterable[tuple[str, np.ndarray]]) -> None:
  """Write (name, array) pairs to `path` in this order; arrays may be jax arrays (fetched one at a
  time, so host memory holds one tensor beyond the file being written)."""
  arrays = list(arrays)
  header, offset, crcs = {}, 0, {}
  for name, a in arrays:
    dtype = np.dtype(a.dtype)
    if dtype not in _CODES:
      raise CheckpointError(f"{path}: tensor {name!r} has dtype {dtype}, which effjax does not store")
    nbytes = int(np.prod(a.shape, dtype=np.int64)) * dtype.itemsize
    header[name] = {"dtype": _CODES[dtype], "shape": list(a.shape),
                    "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  with open(path, "wb") as f:
    f.write(b"\0" * _header_room(header, arrays))  # rewritten below, once the checksums are known
    for name, a in arrays:
      data = _bytes(np.asarray(a))
      crcs[name] = zlib.crc32(data)
      f.write(data)
    f.seek(0)
    f.write(_encode_header(header, crcs, _header_room(header, arrays)))


def _bytes(a: np.ndarray) -> np.ndarray:
  """The array's bytes as a flat uint8 view (buffers of ml_dtypes types cannot be exported)."""
  return np.ascontiguousarray(a).reshape(-1).view(np.uint8)


def _is_float(dtype) -> bool:
  return jax.dtypes.issubdtype(dtype, np.floating)


def _encode_header(header: dict, crcs: dict, room: int | None = None) -> bytes:
  meta = {"__metadata__": {"format": "effjax-params", _CRC_KEY: json.dumps(crcs)}}
  text = json.dumps({**meta, **header}, separators=(",", ":")).encode()
  size = room if room is not None else -(-(8 + len(text)) // _ALIGN) * _ALIGN
  return struct.pack("<Q", size - 8) + text + b" " * (size - 8 - len(text))


def _header_room(header: dict, arrays) -> int:
  """Bytes before the data: room for the header with the widest checksums, 64-byte aligned."""
  return len(_encode_header(header, {name: 0xFFFFFFFF for name, _ in arrays}))


class ParamFile:
  """An opened parameter file: its tensors as read-only views of the mapped file."""

  def __init__(self, path: str | os.PathLike):
    self.path = Path(path)
    try:
      size = self.path.stat().st_size
      with self.path.open("rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < n <= min(_MAX_HEADER, size - 8):
          raise CheckpointError(f"{self.path}: truncated or not a safetensors file "
                                f"({size} bytes, header length {n})")
        header = json.loads(f.read(n))
      meta = header.pop("__metadata__", {})
      self.crcs = {k: int(v) for k, v in json.loads(meta[_CRC_KEY]).items()}
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError,
            ValueError, AttributeError) as e:
      if isinstance(e, CheckpointError):
        raise
      raise CheckpointError(f"{self.path}: unreadable parameter file header "
                            f"({type(e).__name__}: {e})") from None
    start, end = 8 + n, 8 + n
    self.entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
    for name, e in header.items():
      try:
        dtype, shape, (lo, hi) = np.dtype(_DTYPES[e["dtype"]]), tuple(e["shape"]), e["data_offsets"]
      except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{self.path}: tensor {name!r} has an invalid header entry {e!r}") from err
      nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
      if hi - lo != nbytes or lo < 0 or name not in self.crcs:
        raise CheckpointError(f"{self.path}: tensor {name!r} header is inconsistent: {e!r}")
      self.entries[name] = (dtype, shape, start + lo, start + hi)
      end = max(end, start + hi)
    if end != size:
      raise CheckpointError(f"{self.path}: truncated or padded file: the header describes "
                            f"{end} bytes, the file has {size}")
    self._map = np.memmap(self.path, dtype=np.uint8, mode="c") if size > start else None

  def array(self, name: str) -> np.ndarray:
    """Tensor `name` as a read-only view of the mapped file (not yet checked)."""
    dtype, shape, lo, hi = self.entries[name]
    view = self._map[lo:hi].view(dtype).reshape(shape) if hi > lo else np.zeros(shape, dtype)
    view.flags.writeable = False
    return view

  def verify(self, names: Iterable[str]) -> None:
    """Check the tensors' checksums (in threads: crc32 releases the GIL); this also brings their
    pages into memory, which the first forward would do anyway."""
    names = list(names)

    def bad(name: str) -> bool:
      return zlib.crc32(_bytes(self.array(name))) != self.crcs[name]

    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
      corrupt = [name for name, b in zip(names, pool.map(bad, names)) if b]
    if corrupt:
      raise CheckpointError(f"{self.path}: corrupt tensor data (checksum mismatch) in "
                            f"{corrupt[:5]}{' ...' if len(corrupt) > 5 else ''}")


def load(path: str | os.PathLike, targets: Mapping[str, tuple[tuple[int, ...], np.dtype]],
         shardings: Mapping[str, jax.sharding.Sharding]) -> dict[str, jax.Array]:
  """The tensors named in `targets` (name -> (shape, dtype)) from the file at `path`, each placed
  with its sharding. Floating-point tensors are cast to the target dtype; any other difference in
  names, shapes or dtypes is a CheckpointError."""
  f = ParamFile(path)
  missing, extra = sorted(set(targets) - set(f.entries)), sorted(set(f.entries) - set(targets))
  if missing or extra:
    raise CheckpointError(f"{f.path}: the parameters do not match the model: missing {missing[:5]}, "
                          f"unexpected {extra[:5]}")
  for name, (shape, dtype) in targets.items():
    stored, stored_shape = f.entries[name][:2]
    castable = _is_float(stored) and _is_float(dtype)
    if tuple(shape) != stored_shape or (stored != np.dtype(dtype) and not castable):
      raise CheckpointError(f"{f.path}: tensor {name!r} is {stored}{list(stored_shape)}, the model "
                            f"expects {np.dtype(dtype)}{list(shape)}")
  f.verify(targets)
  return {name: place(f.array(name), dtype, shardings[name]) for name, (_, dtype) in targets.items()}
