"""`effjax models` (the named models and where their weights come from) and `effjax convert`."""

from __future__ import annotations

import argparse

from effjax.models.config import PRESETS


def _models(args: argparse.Namespace) -> int:
  from effjax.checkpoints.registry import MODELS, cache_root

  rows = [("name", "family", "params", "source package", "installed", "cached")]
  for m in MODELS.values():
    cfg = PRESETS[m.preset]
    installed = m.installed()
    rows.append((m.name, cfg.family, f"{cfg.num_params() / 1e6:.0f}M", m.package,
                 "yes" if installed else f"no: {m.install}",
                 "yes" if installed and m.cached() else "no"))
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  for r in rows:
    print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
  print(f"\ncache: {cache_root()} (set EFFJAX_CACHE to move it)")
  return 0


def _convert(args: argparse.Namespace) -> int:
  from effjax.checkpoints.registry import convert

  loaded, out = convert(args.src, args.out, dtype=args.dtype, quant=args.quant, overwrite=args.force,
                        params=args.params)
  cfg = loaded.cfg
  weights = f", {cfg.quant} weights" if cfg.quant else ""
  print(f"wrote {out}: {cfg.family}, {cfg.num_layers} layers, dim {cfg.dim}, vocab {cfg.vocab_size}, "
        f"{cfg.dtype}{weights}, from {loaded.source}")
  return 0


def register(subparsers) -> None:
  p = subparsers.add_parser("models", help="list the named models and where their weights come from")
  p.set_defaults(func=_models)
  p = subparsers.add_parser("convert", help="convert a GGUF file, HF directory or named model to an "
                                            "effjax checkpoint directory")
  p.add_argument("src", help="GGUF file, Hugging Face directory, or a named model")
  p.add_argument("out", help="output directory (must not exist unless --force)")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
  p.add_argument("--quant", default=None, choices=("int8",),
                 help="save weight-only int8 weights with per-channel scales (Q8_0 GGUF tensors are "
                      "rescaled, not dequantized)")
  p.add_argument("--force", action="store_true", help="replace OUT if it exists")
  p.add_argument("--params", default="safetensors", choices=("safetensors", "orbax"),
                 help="parameters as one memory-mapped safetensors file (fast to load, default) "
                      "or as an Orbax checkpoint (for multi-host jobs)")
  p.set_defaults(func=_convert)
