"""`effjax generate`: stream text from a model, or batch-generate a JSONL file of prompts."""

from __future__ import annotations

import argparse
import json
import sys
import time

from effjax.cli_args import add_strict_arg, nonnegative_int, positive_int
from effjax.decoding.sampling import Sampler


def add_sampling_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
  p.add_argument("--top-k", type=nonnegative_int, default=0, help="0 = off")
  p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
  p.add_argument("--min-p", type=float, default=0.0, help="0 = off")
  p.add_argument("--seed", type=int, default=0)


def sampler_from_args(args) -> Sampler:
  return Sampler(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p)


def add_model_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--model", default="smollm2-135m-instruct",
                 help="a named model (see `effjax models`) or a GGUF file / HF dir / effjax checkpoint")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                 help="float32 on CPU; bfloat16 on GPU/TPU")
  p.add_argument("--quant", default=None, choices=["int8"],
                 help="weight-only int8 weights with per-channel scales (default: as stored)")
  p.add_argument("--mesh", default=None, help="e.g. 'data=1,fsdp=-1,tensor=1' (default: one device)")
  p.add_argument("--cache-len", type=positive_int, default=None,
                 help="KV cache slots per row (default: sized to the prompts and --max-new-tokens)")


def register(sub) -> None:
  p = sub.add_parser("generate", help="generate text (streams for a single prompt)")
  add_model_args(p)
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--prompt", help="one prompt")
  src.add_argument("--file", help="JSONL of prompts ({'prompt': ...} or any format effjax.data reads)")
  p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True,
                 help="apply the model's chat template (default on)")
  p.add_argument("--system", default=None, help="system message for the chat template")
  p.add_argument("--max-new-tokens", type=positive_int, default=256)
  p.add_argument("--batch-size", type=positive_int, default=8, help="rows per batch with --file")
  add_strict_arg(p, default=False)
  p.add_argument("--out", default=None, help="with --file: write JSONL results here (default stdout)")
  add_sampling_args(p)
  p.set_defaults(func=run)


def run(args) -> int:
  from effjax.checkpoints.registry import load_model
  from effjax.data.chat import TextStream, encode_prompt
  from effjax.decoding.engine import AutoRegressive, Engine, cache_len_for
  from effjax.models.sharding import parse_mesh

  strategy = AutoRegressive(sampler_from_args(args))  # bad sampling flags fail here, before loading
  mesh = parse_mesh(args.mesh)
  problems = None
  if args.file is not None:  # read before the model: a bad file fails in a moment
    from effjax.data import load_problems
    problems = load_problems(args.file, strict=args.strict)
  loaded = load_model(args.model, dtype=args.dtype, mesh=mesh, quant=args.quant)
  eos = set(loaded.cfg.eos_ids) | {loaded.tokenizer.eos_token_id} - {None}
  encode = lambda text: encode_prompt(loaded.tokenizer, text, chat=args.chat, system=args.system)
  prompts = [encode(args.prompt)] if problems is None else [encode(p.prompt) for p in problems]
  cache_len = args.cache_len or cache_len_for([len(p) for p in prompts], args.max_new_tokens,
                                              loaded.cfg.max_position)
  engine = Engine(loaded.model, cache_len=cache_len, eos_ids=sorted(eos), mesh=mesh)

  if problems is None:
    stream = TextStream(loaded.tokenizer)
    t0, n = time.perf_counter(), 0
    for chunk in engine.stream(prompts, strategy=strategy,
                               max_new_tokens=args.max_new_tokens, seed=args.seed):
      n += len(chunk[0])
      print(stream.push(chunk[0]), end="", flush=True)
    dt = time.perf_counter() - t0
    print(f"\n[{n} tokens in {dt:.2f}s, {n / dt:.1f} tokens/s including compilation]",
          file=sys.stderr)
    return 0

  out = open(args.out, "w") if args.out else sys.stdout
  total, t0 = 0, time.perf_counter()
  try:
    for i in range(0, len(problems), args.batch_size):
      batch = problems[i:i + args.batch_size]
      res = engine.generate(prompts[i:i + args.batch_size], strategy=strategy,
                            max_new_tokens=args.max_new_tokens, seed=args.seed + i)
      for rec, toks in zip(batch, res.tokens):
        total += len(toks)
        text = loaded.tokenizer.decode(toks, skip_special_tokens=True)
        out.write(json.dumps({"id": rec.id, "prompt": rec.prompt, "output": text,
                              "new_tokens": len(toks)}) + "\n")
      out.flush()
  finally:
    if args.out:
      out.close()
  dt = time.perf_counter() - t0
  print(f"[{len(problems)} prompts, {total} tokens in {dt:.2f}s, {total / dt:.1f} tokens/s]",
        file=sys.stderr)
  return 0
