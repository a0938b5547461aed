"""Math answer grading: answer extraction and equivalence checking with math-verify.

Extraction is exact: the final answer is read only from the response's answer region, never from
its reasoning. For a model that thinks inside "<think> ... </think>" the region is the text after
the thinking span closes (a response still thinking when it stops has none); otherwise it is the
whole response. In the region the answer is the last \\boxed{...} (or \\fbox{...}, nested braces
included) or GSM8K-style "#### <answer>" line, whichever comes last. A response without one has no
answer: it is wrong, and counted as truncated (cut off before it answered) by the evaluations.
`fallback_last_number` restores the lenient reading (the last number anywhere) for callers that
score short answers without a marker (the RLHF GSM8K scorer).

References: GSM8K solutions end with "#### <answer>"; MATH-500 records carry the answer itself.
Equivalence is math-verify's symbolic comparison of the two answers read as LaTeX; a normalised
string/number comparison is used only where math-verify raises or cannot read one side.
"""

from __future__ import annotations

import dataclasses
import re
import threading

from math_verify import parse, verify

GSM8K_MARK = "####"
GSM8K_LINE = re.compile(r"####[ \t]*([^\n]*\S)")
THINK_CLOSE = "</think>"
NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+")
BOX_COMMANDS = ("\\boxed", "\\fbox")
TIMEOUT_S = 5


@dataclasses.dataclass(frozen=True)
class Grade:
  predicted: str | None  # None: the response never reached an answer (truncated)
  reference: str
  correct: bool

  @property
  def answered(self) -> bool:
    return self.predicted is not None


def _braced(text: str, open_at: int) -> str | None:
  """Contents of the brace group opening at text[open_at] == "{", or None if unbalanced."""
  depth = 0
  for i in range(open_at, len(text)):
    if text[i] == "{":
      depth += 1
    elif text[i] == "}":
      depth -= 1
      if depth == 0:
        return text[open_at + 1:i]
  return None


def _last_boxed_at(text: str) -> tuple[int, str] | None:
  """Start and contents of the last complete \\boxed{...}/\\fbox{...} (also "\\boxed 5")."""
  at = max(text.rfind(cmd) for cmd in BOX_COMMANDS)
  while at >= 0:
    cmd = next(c for c in BOX_COMMANDS if text.startswith(c, at))
    rest = at + len(cmd)
    if rest < len(text) and text[rest] == "{":
      found = _braced(text, rest)
    else:
      m = re.match(r" +([^\s$]+)", text[rest:])
      found = m.group(1) if m else None
    if found is not None:
      return at, found.strip()
    at = max(text.rfind(c, 0, at) for c in BOX_COMMANDS)  # unbalanced: try an earlier box
  return None


def last_boxed(text: str) -> str | None:
  """Contents of the last \\boxed{...}/\\fbox{...}; also accepts "\\boxed 5"."""
  found = _last_boxed_at(text)
  return None if found is None else found[1]


def last_number(text: str) -> str | None:
  """The last number in the text, thousands separators removed."""
  found = NUMBER.findall(text)
  return found[-1].replace(",", "") if found else None


def answer_region(response: str, *, thinking: bool = False) -> str | None:
  """The part of a response that may hold its final answer: after the last "</think>" when the
  model thinks (None if the span never closed), else the whole response."""
  if not thinking:
    return response
  if THINK_CLOSE not in response:
    return None
  return response.rsplit(THINK_CLOSE, 1)[1]


def final_answer(region: str) -> str | None:
  """The last \\boxed{...} or "#### <answer>" line of an answer region, whichever comes last."""
  boxed = _last_boxed_at(region)
  marks = list(GSM8K_LINE.finditer(region))
  if marks and (boxed is None or marks[-1].start() > boxed[0]):
    return marks[-1].group(1).strip().rstrip(".").replace(",", "")
  return None if boxed is None else boxed[1]


def extract_answer(response: str, *, thinking: bool = False,
                   fallback_last_number: bool = False) -> str | None:
  """The final answer of a model response (None: it never reached one), see the module doc."""
  region = answer_region(response, thinking=thinking)
  if region is None:
    return None
  found = final_answer(region)
  return last_number(region) if found is None and fallback_last_number else found


def reference_answer(reference: str) -> str:
  """The gold answer of a reference: after GSM8K's last "####", else the last box, else itself."""
  if GSM8K_MARK in reference:
    return reference.rsplit(GSM8K_MARK, 1)[1].strip().replace(",", "")
  boxed = last_boxed(reference)
  return (boxed if boxed is not None else reference).strip()


def _normalise(answer: str) -> str:
  s = answer.strip().strip("$").strip()
  s = re.sub(r"\\text\{\s*([^{}]*)\}", r"\1", s)
  s = re.sub(r"\\(?:left|right|!|,|;|\s)", "", s)
  s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("\\$", "")
  s = re.sub(r"(\d),(\d{3})\b", r"\1\2", s)
  s = re.sub(r"\s+", "", s).rstrip(".").lower()
  try:
    return repr(float(s))
  except ValueError:
    return s


def _as_latex(answer: str) -> str:
  return "$" + answer.strip().strip("$") + "$"


def equivalent(predicted: str, reference: str) -> bool:
  """Whether two final answers are mathematically equal (math-verify, gold first)."""
  # math-verify times out with SIGALRM, which only the main thread may set.
  timeout = TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
  try:
    gold = parse(_as_latex(reference), parsing_timeout=timeout, raise_on_error=True)
    pred = parse(_as_latex(predicted), parsing_timeout=timeout, raise_on_error=True)
    if gold and pred:
      return verify(gold, pred, timeout_seconds=timeout, raise_on_error=True)
  except Exception:  # math-verify failed on this pair (parser error, timeout): compare text
    pass
  return _normalise(predicted) == _normalise(reference)


def grade(response: str, reference: str, *, thinking: bool = False,
          fallback_last_number: bool = False) -> Grade:
  """Grades one response against a reference (a GSM8K solution or a MATH answer).

  thinking: the response comes from a model that reasons inside "<think> ... </think>" (the span
  opened in the prompt or in the response); only the text after it is read.
  """
  gold = reference_answer(reference)
  predicted = extract_answer(response, thinking=thinking,
                             fallback_last_number=fallback_last_number)
  return Grade(predicted, gold, predicted is not None and equivalent(predicted, gold))
