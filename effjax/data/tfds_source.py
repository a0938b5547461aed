"""Problem sets from TensorFlow Datasets: `tfds:NAME[:SPLIT]`, read with `tfds.data_source`.

`tfds.data_source` reads prepared ArrayRecord files by random access and needs no TensorFlow, so
the `tfds` extra is enough (plus `gcsfs` for a gs:// data_dir). tensorflow_datasets is imported
only when a tfds: spec is read.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from effjax.data.records import Problem, ProblemSet, as_text, collect, make_problem
from effjax.errors import BadRecord

PREFIX = "tfds:"
INSTALL = 'pip install "effjax[tfds]"'

# (turns, reference answer, metadata) from one decoded TFDS example.
Converted = tuple[list[str], str | None, dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class Adapter:
  """How the examples of one TFDS data set become Problems (field names from the TFDS builders)."""

  default_split: str
  convert: Callable[[Mapping[str, Any]], Converted]


def _field(example: Mapping[str, Any], key: str) -> Any:
  if key not in example:
    raise BadRecord(f"missing field '{key}'")
  return example[key]


def _text(example: Mapping[str, Any], key: str) -> str:
  return as_text(_field(example, key), key)


def _texts(value: Any, key: str) -> Iterator[str]:
  """The strings of a (nested) sequence feature, flattened in order."""
  if isinstance(value, (str, bytes)):
    yield as_text(value, key)
  elif isinstance(value, Mapping):
    raise BadRecord(f"field '{key}' is not a sequence of strings")
  else:
    for item in (value.ravel() if isinstance(value, np.ndarray) else value):
      yield from _texts(item, key)


def _gsm8k(ex: Mapping[str, Any]) -> Converted:
  # The builder splits the solution at "#### " into annotation and short_answer.
  return ([_text(ex, "question")], _text(ex, "short_answer").strip(),
          {"solution": _text(ex, "annotation").strip()})


def _math_qa(ex: Mapping[str, Any]) -> Converted:
  prompt = f"{_text(ex, 'Problem')}\n\nOptions: {_text(ex, 'options')}"
  return ([prompt], _text(ex, "correct").strip(),
          {"answer_text": _text(ex, "correct_option"), "category": _text(ex, "category"),
           "rationale": _text(ex, "Rationale")})


def _dolly(ex: Mapping[str, Any]) -> Converted:
  instruction, context = _text(ex, "instruction"), _text(ex, "context")
  prompt = f"{instruction}\n\n{context}" if context.strip() and instruction.strip() else instruction
  return [prompt], _text(ex, "response"), {"category": _text(ex, "category")}


def _first_or_none(answers: list[str]) -> str | None:
  return next((a for a in answers if a.strip()), None)


def _natural_questions(ex: Mapping[str, Any]) -> Converted:
  question = _field(ex, "question")
  if isinstance(question, Mapping):  # "default" config: question {text, tokens}, raw annotations
    annotations = _field(ex, "annotations")
    answers = list(_texts(annotations["short_answers"]["text"], "short_answers.text"))
    if not answers:  # yes/no questions: 0 = NO, 1 = YES, -1 = none
      answers = [("no", "yes")[v] for v in np.ravel(annotations["yes_no_answer"]) if v in (0, 1)]
    prompt = as_text(question.get("text"), "question.text")
    return [prompt], _first_or_none(answers), {"answers": answers}
  # "longt5" config: flat question / answer / all_answers
  answers = list(_texts(ex.get("all_answers", ()), "all_answers"))
  answer = _text(ex, "answer") or _first_or_none(answers)
  return [as_text(question, "question")], answer, {"answers": answers}


def _natural_questions_open(ex: Mapping[str, Any]) -> Converted:
  answers = list(_texts(_field(ex, "answer"), "answer"))
  return [_text(ex, "question")], _first_or_none(answers), {"answers": answers}


ADAPTERS: dict[str, Adapter] = {
    "gsm8k": Adapter("test", _gsm8k),
    "math_qa": Adapter("test", _math_qa),
    "databricks_dolly": Adapter("train", _dolly),
    "natural_questions": Adapter("validation", _natural_questions),
    "natural_questions_open": Adapter("validation", _natural_questions_open),
}

# tfds registers its older builders (gsm8k, math_qa, natural_questions_open) only when their
# category package is imported, which `import tensorflow_datasets` defers.
_BUILDER_PACKAGES = ("tensorflow_datasets.text", "tensorflow_datasets.question_answering")


def parse_spec(spec: str) -> tuple[str, str, Adapter]:
  """`tfds:NAME[/CONFIG][:VERSION][:SPLIT]` -> (tfds name, split, adapter). The split may be a TFDS
  split expression (`train[:100]`, `train+test`) and defaults per data set (gsm8k -> test)."""
  rest = spec[len(PREFIX):] if spec.startswith(PREFIX) else ""
  head, bracket, tail = rest.partition("[")  # slices like [:100] hold colons of their own
  parts = head.split(":")
  has_split = len(parts) > 1 and not parts[-1][:1].isdigit()  # a version starts with a digit
  name = ":".join(parts[:-1]) if has_split else head
  split = parts[-1] + bracket + tail if has_split else None
  if not name or split == "" or (bracket and not has_split):
    raise ValueError(f"not a TFDS spec (expected tfds:NAME[:SPLIT]): {spec!r}")
  base = name.split(":")[0].split("/")[0]
  if base not in ADAPTERS:
    raise ValueError(f"no record mapping for TFDS data set '{base}'; supported: {', '.join(ADAPTERS)}")
  adapter = ADAPTERS[base]
  return name, split or adapter.default_split, adapter


def import_tfds():
  try:
    tfds = importlib.import_module("tensorflow_datasets")
  except ImportError as e:
    raise ModuleNotFoundError(f"reading TFDS data sets needs tensorflow-datasets: {INSTALL}") from e
  for package in _BUILDER_PACKAGES:
    importlib.import_module(package)
  return tfds


def read_tfds(spec: str, *, data_dir: str | None = None, limit: int | None = None) -> ProblemSet:
  """Reads the prepared TFDS data under `data_dir` (a folder or a gs:// path; default TFDS_DATA_DIR
  or ~/tensorflow_datasets). Never downloads: prepare the data with `tfds build` beforehand."""
  name, split, adapter = parse_spec(spec)
  tfds = import_tfds()
  where = data_dir or "the default TFDS data dir"
  try:
    source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except tfds.core.DatasetNotFoundError:
    raise ValueError(f"TFDS has no data set named '{name}'") from None
  except (NotImplementedError, KeyError) as e:  # no data, TFRECORD-only data, or no such split
    reason = e.args[0].splitlines()[0] if e.args and isinstance(e.args[0], str) else repr(e)
    raise FileNotFoundError(
        f"{spec}: no ArrayRecord data for {name} in {where} ({reason}); prepare it with "
        f"`tfds build {name} --file_format=array_record --data_dir=DIR`") from None
  label = f"{PREFIX}{name}:{split}"

  def make(index: int) -> Problem:
    example = source[index]
    try:
      turns, answer, metadata = adapter.convert(example)
    except (KeyError, TypeError, IndexError) as e:  # nested features not shaped as the builder says
      raise BadRecord("unexpected example structure", f"{type(e).__name__}: {e}") from None
    uid = as_text(example["id"], "id") if "id" in example else f"{split}-{index}"
    return make_problem(uid, turns, answer, metadata, f"{label}[{index}]")

  records = ((f"{label}[{i}]", lambda i=i: make(i)) for i in range(len(source)))
  problems, skipped = collect(records, limit=limit)
  return ProblemSet(spec=label, format=f"tfds:{name}", problems=problems, skipped=skipped)
