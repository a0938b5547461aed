"""The Spec-Bench harness: question selection, the summary arithmetic, and `effjax bench specbench`
end to end on a tiny model with a character-level chat tokenizer."""

import json

import numpy as np
import pytest

from effjax import cli
from effjax.data import load_problems
from effjax.data.records import Problem
from effjax.decoding.cli import command_line
from effjax.decoding.methods import label, make_strategy, parse_label
from effjax.evals import specbench


QUESTIONS = [
    {"question_id": 81, "category": "writing",
     "turns": ["Write a haiku about the sea.", "Now make it rhyme."]},
    {"question_id": 321, "category": "qa", "turns": ["Who wrote Hamlet?"]},
]


def char_tokenizer():
  """A real transformers tokenizer: one token per character, a chat template, <eos> = 1."""
  from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  chars = [chr(c) for c in range(32, 127)] + ["\n"]
  vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2} | {c: i + 3 for i, c in enumerate(chars)}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
  tok.decoder = decoders.Fuse()
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>",
                                 unk_token="<unk>")
  fast.chat_template = ("{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}\n{% endfor %}"
                        "{% if add_generation_prompt %}a:{% endif %}")
  return fast


def test_select_spreads_a_limited_group_over_its_categories():
  problems = [Problem(str(i), ("q",), metadata={"category": c}) for i, c in enumerate(
      ["writing"] * 3 + ["roleplay"] * 3 + ["math"] * 3 + ["qa"] * 4)]
  picked = specbench.select(problems, 3)
  assert [p.id for p in picked] == ["0", "4", "8", "9", "11", "12"]
  assert specbench.select(problems, None) == problems
  assert [specbench.group_of(c) for c in ("coding", "humanities", "rag")] == [
      "mt_bench", "mt_bench", "rag"]


def test_dev_set_groups():
  problems = load_problems("sample:spec_bench")
  picked = specbench.select(problems.problems, 2)
  groups = [specbench.group_of(p.metadata["category"]) for p in picked]
  assert groups == [g for g in specbench.GROUPS for _ in range(2)]
  assert {p.metadata["category"] for p in picked[:2]} == {"writing", "humanities"}
  assert all(len(p.turns) == (2 if g == "mt_bench" else 1) for p, g in zip(picked, groups))


def _record(method, group, turns, equal=True, prefill_s=0.25):
  return {"method": method, "group": group, "equal_to_ar": equal,
          "turns": [{"new_tokens": n, "calls": c, "seconds": s, "prefill_s": prefill_s}
                    for n, c, s in turns]}


def test_summary_pools_tau_and_divides_mean_speeds():
  records = [
      _record("ar", "qa", [(11, 10, 1.0)]), _record("x", "qa", [(11, 5, 0.5)]),
      _record("ar", "rag", [(5, 4, 1.0), (5, 4, 1.0)]), _record("x", "rag", [(9, 2, 1.0)], False),
  ]
  table = specbench.summarize(records)
  assert list(table) == ["qa", "rag", "overall"]
  qa = {r["method"]: r for r in table["qa"]}
  assert qa["x"]["tau"] == 2.0 and qa["x"]["tokens_per_s"] == 22.0 and qa["x"]["speedup"] == 2.0
  rag = {r["method"]: r for r in table["rag"]}
  assert rag["ar"]["tokens_per_s"] == 5.0 and rag["x"]["tau"] == 4.0  # (9 - 1) / 2
  overall = {r["method"]: r for r in table["overall"]}
  assert overall["x"]["tau"] == pytest.approx((10 + 8) / 7)
  assert overall["x"]["speedup"] == pytest.approx(np.mean([22, 9]) / np.mean([11, 5]))
  assert overall["x"]["equal"] == 1 and overall["x"]["questions"] == 2
  # Decode only: (new tokens - 1) / (seconds - prefill) per question; x: 10 / 0.25, 8 / 0.75;
  # ar: 10 / 0.75, 8 / 1.5 (two turns).
  decode_x, decode_ar = np.mean([10 / 0.25, 8 / 0.75]), np.mean([10 / 0.75, 8 / 1.5])
  assert overall["x"]["decode_tokens_per_s"] == pytest.approx(decode_x)
  assert overall["x"]["decode_speedup"] == pytest.approx(decode_x / decode_ar)
  text = specbench.format_table(table)
  assert f"| x | 2.00 / 2.00x | 4.00 / 1.80x | 2.57 / 1.94x | {decode_x / decode_ar:.2f}x |" in text
  assert text.rstrip().endswith("| 1/2 |")


def test_tau_ratio_interval_redraws_questions_within_groups():
  # Two groups of two questions, each method making the same calls on a question: x accepts
  # twice y's tokens on every question, so every redraw gives 2: a zero-width interval.
  rec = lambda m, q, g, acc, calls: dict(_record(m, g, [(acc + 1, calls, 1.0)]), question_id=q)
  same = [rec("x", "1", "a", 8, 2), rec("y", "1", "a", 4, 2), rec("x", "2", "a", 4, 2),
          rec("y", "2", "a", 2, 2), rec("x", "3", "b", 6, 3), rec("y", "3", "b", 3, 3),
          rec("x", "4", "b", 2, 3), rec("y", "4", "b", 1, 3)]
  assert specbench.tau_ratio_interval(same, "x", "y") == (2.0, 2.0, 2.0, 4)
  # Now question 4's y ties x: pooled 20 / 11. Each redraw keeps two questions per group, so
  # every draw lies between the extremes q2, q2 + q4, q4: (4 + 4 + 2 + 2) / (2 + 2 + 2 + 2) =
  # 1.5 and q1, q1 + q3, q3: 28 / 14 = 2.
  mixed = same[:7] + [rec("y", "4", "b", 2, 3)]
  ratio, low, high, n = specbench.tau_ratio_interval(mixed, "x", "y")
  assert ratio == pytest.approx(20 / 11) and n == 4
  assert 1.5 - 1e-9 <= low < ratio < high <= 2.0 + 1e-9
  # A question one method lacks is left out; none in common is an error.
  assert specbench.tau_ratio_interval(same[:6], "x", "y")[3] == 3
  with pytest.raises(ValueError, match="no question answered by both"):
    specbench.tau_ratio_interval(same, "x", "z")


def test_method_registry():
  assert label("esp", 30) == "esp-bc30" and label("pld", 30) == "pld"
  assert parse_label("esp-bc30") == ("esp", 30) and parse_label("pld") == ("pld", None)
  assert parse_label("esp-dyn-bc60") == ("esp-dyn", 60) and label("esp-dyn", 60) == "esp-dyn-bc60"
  with pytest.raises(ValueError, match="unknown decoding method"):
    parse_label("esp-bcx")
  assert make_strategy("lookahead", 60).block_size == 60
  assert make_strategy("lookahead").block_size == 56  # Spec-Bench's N=5, W=7, G=7
  with pytest.raises(ValueError, match="unknown decoding method"):
    make_strategy("medusa")
  with pytest.raises(ValueError, match="BC must be one of"):
    make_strategy("lookahead", 20)


def test_bench_specbench_command_end_to_end(tmp_path, capsys):
  from effjax.checkpoints.checkpoint_dir import save_checkpoint
  from effjax.models import create_model, tiny_config

  cfg = tiny_config("llama", eos_ids=(1,))
  tokenizer = char_tokenizer()
  save_checkpoint(tmp_path / "tiny", cfg, create_model(cfg, seed=1), tokenizer)
  data = tmp_path / "questions.jsonl"
  data.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
  out = tmp_path / "out"
  rc = cli.main(["bench", "specbench", "--model", str(tmp_path / "tiny"),
                 "--method", "lookahead-bc10", "--data", str(data), "--max-new-tokens", "6",
                 "--warmup", "1", "--buckets", "128", "--out", str(out)])
  assert rc == 0
  records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
  assert [(r["question_id"], r["method"]) for r in records] == [
      ("81", "ar"), ("81", "lookahead-bc10"), ("321", "ar"), ("321", "lookahead-bc10")]
  assert [(r["category"], r["group"]) for r in records[::2]] == [
      ("writing", "mt_bench"), ("qa", "qa")]
  assert all(r["equal_to_ar"] for r in records)
  assert [len(r["turns"]) for r in records] == [2, 2, 1, 1]
  for r in records:
    for t in r["turns"]:
      assert 1 <= t["new_tokens"] == len(t["tokens"]) <= 6 and t["seconds"] > 0
  # The second turn's prompt holds the first question and the model's own first answer.
  first, second = records[1]["turns"]
  conversation = [{"role": "user", "content": QUESTIONS[0]["turns"][0]},
                  {"role": "assistant", "content": first["text"]},
                  {"role": "user", "content": QUESTIONS[0]["turns"][1]}]
  assert second["prompt_tokens"] == len(tokenizer.apply_chat_template(
      conversation, add_generation_prompt=True, tokenize=False))
  summary = json.loads((out / "summary.json").read_text())
  assert list(summary["table"]) == ["mt_bench", "qa", "overall"]
  assert summary["meta"]["max_new_tokens"] == 6 and summary["meta"]["minutes"] >= 0
  command = summary["meta"]["command"]  # spells out every setting: it parses back to itself
  assert command.startswith("effjax bench specbench --model ") and "--buckets 128" in command
  assert command_line(cli.build_parser().parse_args(command.split()[1:]), out) == command
  assert summary["meta"]["prompt_format"] == "chat template"
  table = (out / "summary.md").read_text()
  assert table.splitlines()[0].startswith("| method | mt_bench tau / speedup | qa tau / speedup |")
  assert "| ar | 1.00 / 1.00x | 1.00 / 1.00x | 1.00 / 1.00x |" in table
  assert [line.rsplit("|", 2)[-2].strip() for line in table.splitlines()[2:]] == ["2/2", "2/2"]
  assert table.strip() in capsys.readouterr().out

  # A killed run resumes: the cut-off last record is dropped and run again, nothing twice; a method
  # added since runs on every question after the recorded plain decoding.
  lines = (out / "results.jsonl").read_text().splitlines()
  (out / "results.jsonl").write_text("\n".join(lines[:2] + [lines[2][:40]]))
  rc = cli.main(["bench", "specbench", "--model", str(tmp_path / "tiny"), "--method",
                 "lookahead-bc10", "suffix", "--data", str(data), "--max-new-tokens", "6",
                 "--warmup", "0", "--buckets", "128", "--out", str(out), "--resume"])
  assert rc == 0
  again = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
  assert sorted((r["question_id"], r["method"]) for r in again) == sorted(
      (q, m) for q in ("81", "321") for m in ("ar", "lookahead-bc10", "suffix"))
  assert again[:2] == records[:2] and all(r["equal_to_ar"] for r in again)
  summary = json.loads((out / "summary.json").read_text())
  assert [r["method"] for r in summary["table"]["overall"]] == ["ar", "lookahead-bc10", "suffix"]
  capsys.readouterr()
  assert cli.main(["bench", "specbench", "--model", str(tmp_path / "tiny"), "--method", "suffix",
                   "--data", str(data), "--max-new-tokens", "7", "--warmup", "0", "--buckets",
                   "128", "--out", str(out), "--resume"]) != 0
  assert "other settings (max_new_tokens: [6] there, [7] now)" in capsys.readouterr().err
