"""`effjax generate`: stream text from a model, or batch-generate a JSONL file of prompts."""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time

from effjax.cli_args import add_strict_arg, nonnegative_int, positive_int


def add_sampling_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
  p.add_argument("--top-k", type=nonnegative_int, default=0, help="0 = off")
  p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
  p.add_argument("--min-p", type=float, default=0.0, help="0 = off")
  p.add_argument("--seed", type=int, default=0)


def sampler_from_args(args):
  from effjax.decoding.sampling import Sampler

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


def summary(method: str, res, strategy) -> str:
  """One line: tokens, tau (tokens per decode forward), decoding tokens/s (and for auto, the
  steps each budget ran)."""
  n = res.new_tokens
  runs = ""
  if getattr(res.extra, "runs", None) is not None:
    runs = "; steps " + ", ".join(f"{o.name} {int(c)}" for o, c in
                                  zip(strategy.options, res.extra.runs) if c)
  if res.handed_over is not None:
    runs += (f"; plain steps until its speculative program was loaded after {res.handed_over}"
             if res.handed_over < res.model_calls else
             "; plain steps only: the text gave speculation too little to load its program")
  return (f"[{method}: {n} tokens; prefill + compile {res.prefill_s:.2f}s, decoding "
          f"{res.decode_s:.2f}s; {res.model_calls} decode forwards, tau {res.tokens_per_call:.2f} "
          f"tokens per forward; {(n - 1) / max(res.decode_s, 1e-9):.1f} tokens/s decoding{runs}]")


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
  p.add_argument("--method", default="auto",
                 help="decoding method: auto (default: the budget that pays on this device, step "
                      "by step), ar (plain), pld, lookahead, tr, suffix, esp-bc10|30|60, "
                      "esp-dyn-bc10|30|60, hybrid-bc10|30|60 (a method and its BC budget); all "
                      "lossless")
  p.add_argument("--cost-model", default=None,
                 help="for auto: a JSON table of forward costs {\"entries\": [[cache_len, tokens, "
                      "seconds], ...]} (default: measured once per device and model, cached)")
  p.add_argument("--hand-over", action=argparse.BooleanOptionalAction, default=True,
                 help="auto: start with plain steps and load the speculative program only once "
                      "the text shows it pays (default); --no-hand-over loads it first")
  add_sampling_args(p)
  p.add_argument("--verbose", action="store_true",
                 help="report where the time went: start-up, imports, loading, compiling or "
                      "restoring programs, prefill, decode")
  p.set_defaults(func=run)


def run(args) -> int:
  from effjax.phases import Phases

  phases = Phases()
  # Start-up creates about a million long-lived objects (modules, the model tree); collecting
  # garbage among them is wasted work (~15% of a cold run): collect again once the answer starts.
  gc.disable()
  from effjax.checkpoints.registry import load_model
  from effjax.data.chat import TextStream, encode_prompt
  from effjax.decoding.engine import Engine, cache_len_for
  from effjax.decoding.methods import make_strategy, parse_label, prepare, remember_load
  from effjax.models.sharding import parse_mesh

  phases.mark("import", "jax, flax, effjax")
  # Bad method or sampling flags fail here, before loading.
  strategy = make_strategy(*parse_label(args.method), sampler=sampler_from_args(args))
  mesh = parse_mesh(args.mesh)
  problems = None
  if args.file is not None:  # read before the model: a bad file fails in a moment
    from effjax.data import load_problems
    problems = load_problems(args.file, strict=args.strict)
  loaded = load_model(args.model, dtype=args.dtype, mesh=mesh, quant=args.quant)
  phases.mark("load", f"weights and tokenizer: {loaded.source}")
  eos = set(loaded.cfg.eos_ids) | {loaded.tokenizer.eos_token_id} - {None}
  encode = lambda text: encode_prompt(loaded.tokenizer, text, chat=args.chat, system=args.system)
  prompts = [encode(args.prompt)] if problems is None else [encode(p.prompt) for p in problems]
  cache_len = args.cache_len or cache_len_for([len(p) for p in prompts],
                                              args.max_new_tokens + strategy.block_size - 1,
                                              loaded.cfg.max_position)
  engine = Engine(loaded.model, cache_len=cache_len, eos_ids=sorted(eos), mesh=mesh)
  engine.check(prompts, args.max_new_tokens, strategy)  # before auto times forwards
  strategy = prepare(strategy, loaded.model, cost_model=args.cost_model,
                     log=lambda s: print(s, file=sys.stderr, flush=True))
  phases.mark("prompt", "chat template, tokenizer, engine set-up")

  if problems is None:
    stream = TextStream(loaded.tokenizer)
    n = 0
    programs = _ProgramRows(phases)
    chunks = engine.stream(prompts, strategy=strategy, max_new_tokens=args.max_new_tokens,
                           seed=args.seed, hand_over=args.hand_over)
    while True:
      try:
        chunk = next(chunks)
      except StopIteration as end:
        res = end.value
        break
      print(stream.push(chunk[0]), end="", flush=True)
      if n == 0:  # the prefill samples the first token
        phases.mark("prefill", f"{len(prompts[0])} prompt tokens", minus=programs())
        _collect_garbage_again()
      n += len(chunk[0])
    phases.mark("decode", f"{n - 1} more tokens", minus=programs())
    remember_load(strategy, loaded.model, res)
    print("\n" + summary(args.method, res, strategy), file=sys.stderr)
    if args.verbose:
      print(phases.report(), file=sys.stderr)
    return 0

  _collect_garbage_again()
  out = open(args.out, "w") if args.out else sys.stdout
  total, calls, t0 = 0, 0, time.perf_counter()
  try:
    for i in range(0, len(problems), args.batch_size):
      batch = problems[i:i + args.batch_size]
      # Streamed in chunks unseen, so that auto loads its program only once it pays (hand_over).
      res = _result_of(engine.stream(prompts[i:i + args.batch_size], strategy=strategy,
                                     max_new_tokens=args.max_new_tokens, seed=args.seed + i,
                                     chunk=32, hand_over=args.hand_over))
      remember_load(strategy, loaded.model, res)
      calls += res.model_calls
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
  phases.mark("generate", f"{len(problems)} prompts, {total} tokens (compiling included)")
  print(f"[{args.method}: {len(problems)} prompts, {total} tokens in {dt:.2f}s, {total / dt:.1f} "
        f"tokens/s; {calls} decode forwards]", file=sys.stderr)
  if args.verbose:
    print(phases.report(), file=sys.stderr)
  return 0



def _result_of(chunks):
  """Run a generator to its end; its return value."""
  while True:
    try:
      next(chunks)
    except StopIteration as end:
      return end.value


def _collect_garbage_again() -> None:
  gc.freeze()  # what start-up made stays; later garbage is collected as usual
  gc.enable()


class _ProgramRows:
  """Adds the programs compiled or restored since the last call to `phases` as a "compile" row and
  returns their (wall, cpu) seconds, for the phase that contained them to leave out."""

  def __init__(self, phases):
    from effjax import program_cache

    self.phases, self.events, self.seen = phases, program_cache.events, len(program_cache.events)

  def __call__(self) -> tuple[float, float]:
    new, self.seen = self.events[self.seen:], len(self.events)
    if not new:
      return 0.0, 0.0
    wall, cpu = sum(e.seconds for e in new), sum(e.cpu_seconds for e in new)
    self.phases.add("compile", wall, cpu, ", ".join(f"{e.name}: {e.source}" for e in new))
    return wall, cpu
