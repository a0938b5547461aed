"""The reference for benchmarks/cold_start.py: a plain transformers + torch script that loads a model
(a GGUF file, dequantized to dense float32 as transformers does, or a safetensors directory) and
generates greedily, as a torch user would write it.

    python benchmarks/torch_generate.py (--gguf FILE | --model-dir DIR) --prompt TEXT
                                        [--max-new-tokens 24] [--no-chat]

Prints the generated text on stdout and, on stderr, one JSON line of phase timings (seconds since
the process started: import, load, generate) and the generated token ids.
"""

import time

START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  src = ap.add_mutually_exclusive_group(required=True)
  src.add_argument("--gguf")
  src.add_argument("--model-dir")
  ap.add_argument("--prompt", required=True)
  ap.add_argument("--max-new-tokens", type=int, default=24)
  ap.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True)
  args = ap.parse_args()

  import torch
  from transformers import AutoModelForCausalLM, AutoTokenizer

  imported = time.perf_counter()
  if args.gguf:
    path = Path(args.gguf)
    kw = dict(pretrained_model_name_or_path=str(path.parent), gguf_file=path.name)
  else:
    kw = dict(pretrained_model_name_or_path=args.model_dir)
  tokenizer = AutoTokenizer.from_pretrained(**kw)
  model = AutoModelForCausalLM.from_pretrained(**kw, dtype=torch.float32).eval()
  loaded = time.perf_counter()
  if args.chat:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}],
                                        add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]
  else:
    ids = tokenizer(args.prompt, return_tensors="pt").input_ids
  with torch.inference_mode():
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                         do_sample=False)
  new = out[0, ids.shape[1]:].tolist()
  print(tokenizer.decode(new, skip_special_tokens=True), end="", flush=True)
  done = time.perf_counter()
  print(json.dumps(dict(import_s=imported - START, load_s=loaded - imported,
                        generate_s=done - loaded, tokens=new)), file=sys.stderr)


if __name__ == "__main__":
  main()
