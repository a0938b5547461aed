"""TFDS problem sets through TFDS's own mock data (no download, no TensorFlow)."""

import collections
import importlib.util
import sys

import pytest

from effjax.data import load_problems
from effjax.data.samples import sample_path
from effjax.data.tfds_source import parse_spec

GSM8K_DEV = sample_path("gsm8k")

needs_tfds = pytest.mark.skipif(
    importlib.util.find_spec("tensorflow_datasets") is None,
    reason='tensorflow-datasets is not installed (pip install "effjax[tfds]")')


@pytest.fixture
def tfds():
  from effjax.data.tfds_source import import_tfds  # registers the builders load_problems uses

  return import_tfds()


def mocked_examples(tfds, name, split, n):
  """What tfds.data_source gives under mock_data, read directly for comparison."""
  with tfds.testing.mock_data(num_examples=n):
    source = tfds.data_source(name, split=split)
    return [source[i] for i in range(len(source))]


@needs_tfds
def test_gsm8k(tfds):
  examples = mocked_examples(tfds, "gsm8k", "test", 4)
  with tfds.testing.mock_data(num_examples=4):
    problems = load_problems("tfds:gsm8k")
  assert problems.spec == "tfds:gsm8k:test" and not problems.skipped and len(problems) == 4
  for i, (problem, ex) in enumerate(zip(problems, examples)):
    assert (problem.id, problem.source) == (f"test-{i}", f"tfds:gsm8k:test[{i}]")
    assert problem.turns == (ex["question"],)
    assert problem.answer == ex["short_answer"].strip()
    assert problem.metadata == {"solution": ex["annotation"].strip()}


@needs_tfds
def test_math_qa(tfds):
  (ex,) = mocked_examples(tfds, "math_qa", "train", 1)
  with tfds.testing.mock_data(num_examples=1):
    (problem,) = load_problems("tfds:math_qa:train")
  assert problem.prompt == f"{ex['Problem']}\n\nOptions: {ex['options']}"
  assert problem.answer == ex["correct"].strip()
  assert problem.metadata == {"answer_text": ex["correct_option"], "category": ex["category"],
                              "rationale": ex["Rationale"]}


@needs_tfds
def test_databricks_dolly(tfds):
  (ex,) = mocked_examples(tfds, "databricks_dolly", "train", 1)
  with tfds.testing.mock_data(num_examples=1):
    (problem,) = load_problems("tfds:databricks_dolly")
  assert problem.prompt == f"{ex['instruction']}\n\n{ex['context']}"
  assert (problem.answer, problem.metadata) == (ex["response"], {"category": ex["category"]})


@needs_tfds
@pytest.mark.parametrize("name", ["natural_questions", "natural_questions/longt5",
                                  "natural_questions_open"])
def test_natural_questions(tfds, name):
  (ex,) = mocked_examples(tfds, name, "validation", 1)
  with tfds.testing.mock_data(num_examples=1):
    (problem,) = load_problems(f"tfds:{name}")
  if name == "natural_questions":  # raw annotations: short answers nested per annotation
    assert problem.id == ex["id"] and problem.prompt == ex["question"]["text"]
    answers = [str(a) for a in ex["annotations"]["short_answers"]["text"].ravel()]
  elif name == "natural_questions/longt5":
    assert problem.id == ex["id"] and problem.prompt == ex["question"]
    answers = [str(a) for a in ex["all_answers"]]
    assert problem.answer == ex["answer"]
  else:
    assert problem.prompt == ex["question"]
    answers = [str(a) for a in ex["answer"]]
  assert answers and problem.metadata["answers"] == answers
  if name != "natural_questions/longt5":
    assert problem.answer == answers[0]


@needs_tfds
def test_limit_and_bad_examples(tfds):
  examples = [
      {"question": "ok?", "annotation": "because", "short_answer": " 1"},
      {"question": "  ", "annotation": "", "short_answer": "2"},
      {"question": b"\xff", "annotation": "", "short_answer": "3"},
      {"annotation": "", "short_answer": "4"},
      {"question": "fine too", "annotation": "", "short_answer": "5"},
      {"question": "not reached", "annotation": "", "short_answer": "6"},
  ]
  with tfds.testing.mock_data(as_data_source_fn=lambda *args, **kwargs: examples):
    problems = load_problems("tfds:gsm8k:train", limit=2)
  assert [(p.id, p.prompt, p.answer) for p in problems] == [
      ("train-0", "ok?", "1"), ("train-4", "fine too", "5")]
  assert [(s.source, s.reason) for s in problems.skipped] == [
      ("tfds:gsm8k:train[1]", "empty prompt"),
      ("tfds:gsm8k:train[2]", "not UTF-8"),
      ("tfds:gsm8k:train[3]", "missing field 'question'"),
  ]
  with tfds.testing.mock_data(as_data_source_fn=lambda *args, **kwargs: examples[1:4]):
    with pytest.raises(ValueError, match="no usable record"):
      load_problems("tfds:gsm8k:train")


@needs_tfds
def test_misshapen_example_is_skipped_not_fatal(tfds):
  examples = [{"id": "a", "question": {"text": "where?"}, "annotations": {}},
              {"id": "b", "question": "flat question", "answer": "here"}]
  with tfds.testing.mock_data(as_data_source_fn=lambda *args, **kwargs: examples):
    problems = load_problems("tfds:natural_questions")
  assert [(p.id, p.prompt, p.answer) for p in problems] == [("b", "flat question", "here")]
  (skip,) = problems.skipped
  assert (skip.source, skip.reason) == ("tfds:natural_questions:validation[0]",
                                        "unexpected example structure")
  assert "short_answers" in skip.detail


@needs_tfds
def test_prepared_array_record_data_reads_like_the_jsonl(tfds, tmp_path):
  """Real ArrayRecord files, no mock: TFDS's own gsm8k builder prepares the GSM8K sample."""
  from tensorflow_datasets.text.gsm8k import gsm8k

  class LocalGsm8k(gsm8k.Gsm8k, skip_registration=True):
    name = "gsm8k"

    def _split_generators(self, dl_manager):
      return {"test": self._generate_examples(GSM8K_DEV)}

  LocalGsm8k(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  from_tfds = load_problems("tfds:gsm8k:test", data_dir=str(tmp_path))
  from_jsonl = load_problems(GSM8K_DEV)
  def content(problems):
    return collections.Counter((p.prompt, p.answer, p.metadata["solution"]) for p in problems)
  assert len(from_tfds) == 990 and not from_tfds.skipped
  assert content(from_tfds) == content(from_jsonl)  # TFDS shuffles on write: compare as multisets
  assert len(load_problems("tfds:gsm8k:test[:10]", data_dir=str(tmp_path))) == 10
  assert "tensorflow" not in sys.modules


@needs_tfds
def test_missing_data_names_the_build_command(tfds, tmp_path):
  with pytest.raises(FileNotFoundError, match="tfds build gsm8k --file_format=array_record"):
    load_problems("tfds:gsm8k", data_dir=str(tmp_path))


def test_parse_spec():
  assert parse_spec("tfds:gsm8k")[:2] == ("gsm8k", "test")
  assert parse_spec("tfds:gsm8k:train[:100]")[:2] == ("gsm8k", "train[:100]")
  assert parse_spec("tfds:natural_questions/longt5:0.1.0:validation")[:2] == (
      "natural_questions/longt5:0.1.0", "validation")
  assert parse_spec("tfds:databricks_dolly")[:2] == ("databricks_dolly", "train")
  assert parse_spec("tfds:gsm8k:1.0.0")[:2] == ("gsm8k:1.0.0", "test")
  assert parse_spec("tfds:math_qa:train[:10%]+test")[:2] == ("math_qa", "train[:10%]+test")
  with pytest.raises(ValueError, match="no record mapping for TFDS data set 'mnist'"):
    parse_spec("tfds:mnist:train")
  for bad in ("tfds:", "tfds:gsm8k:", "tfds:gsm8k[:5]", "gsm8k"):
    with pytest.raises(ValueError, match="not a TFDS spec"):
      parse_spec(bad)


def test_missing_package_names_the_install_command(monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # makes the import fail
  with pytest.raises(ModuleNotFoundError, match=r'pip install "effjax\[tfds\]"'):
    load_problems("tfds:gsm8k")


@needs_tfds
def test_inspect_command(tfds, capsys):
  from effjax import cli

  with tfds.testing.mock_data(num_examples=3):
    assert cli.main(["data", "inspect", "tfds:gsm8k:train", "--show", "1"]) == 0
  out = capsys.readouterr().out
  assert "tfds:gsm8k:train: 3 records (tfds:gsm8k)" in out and "[train-0] tfds:gsm8k:train[0]" in out
