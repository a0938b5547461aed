"""What `auto` costs a new process: restoring its decode program from effjax's program cache, with
the options the device's cost model keeps and with all six, against plain decoding's; and the cold
`effjax generate` of README's prompt with `--method auto` (plain steps first, its speculative
program loaded once the text shows it pays), with `--method auto --no-hand-over` (that program
loaded first) and with `--method ar`.

    python benchmarks/auto_start.py [--models smollm2-135m-instruct gemma3-270m] [--repeats 4]
                                    [--out benchmarks/notes/auto_start.md]

Every measurement is a new process; every program is compiled and stored once first (untimed),
then the processes run round-robin, `--repeats` times each. Restore: a child loads the model,
builds the strategy (auto's cost model from the cache) and generates the prompt once through
`Engine.generate`; reported is the seconds effjax's program cache spent restoring the decode
program (effjax.program_cache.events). Generate: the wall clock of `effjax generate --verbose`,
its compile phase (restoring the programs, auto's mid-stream load included), the tokens/s of its
summary line (decoding only) and the plain steps before auto's speculative program took over.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from cold_start import effjax_phases, summary, timed  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
README_PROMPT = "Explain what a KV cache is in two sentences."
VARIANTS = ("ar", "auto", "auto, all options")
GENERATE = ("ar", "auto", "auto --no-hand-over")


def child(model: str, variant: str) -> None:
  """One fresh process: restore the variant's programs and generate README's prompt once."""
  from effjax import caches, program_cache

  caches.enable()
  from effjax.checkpoints.registry import load_model
  from effjax.data.chat import encode_prompt
  from effjax.decoding.budget import Auto
  from effjax.decoding.engine import Engine, cache_len_for
  from effjax.decoding.methods import make_strategy, prepare

  loaded = load_model(model)
  chat = loaded.tokenizer.chat_template is not None
  strategy = Auto(prune=False) if variant == "auto, all options" else make_strategy(variant)
  strategy = prepare(strategy, loaded.model)
  prompt = encode_prompt(loaded.tokenizer, README_PROMPT, chat=chat)
  cache_len = cache_len_for([len(prompt)], 256 + strategy.block_size - 1, loaded.cfg.max_position)
  engine = Engine(loaded.model, cache_len=cache_len, eos_ids=loaded.cfg.eos_ids)
  res = engine.generate([prompt], strategy=strategy, max_new_tokens=256)
  decode = [e for e in program_cache.events if e.name == "decode"]
  print(json.dumps(dict(restore_s=sum(e.seconds for e in decode),
                        source=[e.source for e in decode],
                        options=[o.name for o in getattr(strategy, "options", ())],
                        tokens=res.tokens[0])))


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--models", nargs="+", default=["smollm2-135m-instruct", "gemma3-270m"])
  ap.add_argument("--repeats", type=int, default=4)
  ap.add_argument("--out", default=str(ROOT / "benchmarks" / "notes" / "auto_start.md"))
  ap.add_argument("--child", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.child:
    child(*args.child)
    return
  from effjax.checkpoints.registry import load_model

  py = sys.executable
  chat = {m: load_model(m).tokenizer.chat_template is not None for m in args.models}
  restores = {(m, v): [py, __file__, "--child", m, v] for m in args.models for v in VARIANTS}
  gens = {(m, v): [py, "-m", "effjax.cli", "generate", "--model", m, "--prompt", README_PROMPT,
                   "--verbose", "--method", *v.split()] + ([] if chat[m] else ["--no-chat"])
          for m in args.models for v in GENERATE}
  everything = {("restore",) + k: c for k, c in restores.items()}
  everything.update({("generate",) + k: c for k, c in gens.items()})
  load_before = os.getloadavg()
  for label, cmd in everything.items():  # compiles and stores every program once
    timed(cmd)
    print("warmed", *label, flush=True)
  runs = {label: [] for label in everything}
  for r in range(args.repeats):
    for label, cmd in everything.items():
      runs[label].append(timed(cmd))
    print(f"round {r + 1}/{args.repeats} done", flush=True)
  load_after = os.getloadavg()

  lines = [f"Date: {datetime.date.today()}; load average {load_before[0]:.1f} before, "
           f"{load_after[0]:.1f} after; {args.repeats} rounds, median (min-max) seconds.",
           "", f"Command: `python benchmarks/auto_start.py --models {' '.join(args.models)} "
           f"--repeats {args.repeats}`", "",
           "| model | decode program | options | restored from disk | restore s | "
           "vs auto (all options) | same tokens as ar |", "|---|---|---|---|---|---|---|"]
  child_out = lambda x: json.loads(x["out"].splitlines()[-1])
  for m in args.models:
    full = statistics.median(child_out(x)["restore_s"]
                             for x in runs[("restore", m, "auto, all options")])
    ar_tokens = child_out(runs[("restore", m, "ar")][0])["tokens"]
    for v in VARIANTS:
      info = [child_out(x) for x in runs[("restore", m, v)]]
      times = [i["restore_s"] for i in info]
      disk = all(i["source"] == ["disk"] for i in info)
      same = all(i["tokens"] == ar_tokens for i in info)
      lines.append(f"| {m} | {v} | {', '.join(info[0]['options']) or 'plain'} | "
                   f"{'yes' if disk else 'NO'} | {summary(times)} | "
                   f"{statistics.median(times) / full:.2f}x | {'yes' if same else 'NO'} |")
  lines += ["", f"`effjax generate --prompt \"{README_PROMPT}\" --verbose --method "
            f"{'|'.join(GENERATE)}` (--no-chat for a model without a chat template):", "",
            "| model | method | wall s | ar / method wall | compile phase s | decoding tokens/s | "
            "plain steps before auto's program | same text as ar |",
            "|---|---|---|---|---|---|---|---|"]
  rate = lambda x: float(re.search(r"([\d.]+) tokens/s decoding", x["err"]).group(1))

  def plain_first(x) -> str:
    hit = re.search(r"loaded after (\d+)", x["err"])
    return hit.group(1) if hit else ("all" if "plain steps only" in x["err"] else "-")

  for m in args.models:
    ar_wall = statistics.median(x["wall"] for x in runs[("generate", m, "ar")])
    for v in GENERATE:
      xs = runs[("generate", m, v)]
      same = all(x["out"] == runs[("generate", m, "ar")][0]["out"] for x in xs)
      lines.append(f"| {m} | {v} | {summary([x['wall'] for x in xs])} | "
                   f"{ar_wall / statistics.median(x['wall'] for x in xs):.2f}x | "
                   f"{summary([effjax_phases(x['err'])['compile'] for x in xs])} | "
                   f"{summary([rate(x) for x in xs])} | "
                   f"{', '.join(sorted(set(plain_first(x) for x in xs)))} | "
                   f"{'yes' if same else 'NO'} |")
  text = "\n".join(lines) + "\n"
  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  Path(args.out).write_text(text)
  print(text)


if __name__ == "__main__":
  main()
