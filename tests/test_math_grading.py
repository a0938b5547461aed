"""Answer extraction and math-equivalence grading on GSM8K and MATH-500 style answers."""

import json
import threading
from pathlib import Path

import pytest

from effjax.evals import math_grading as mg

DATA = Path("/work/shared/data")


def test_last_boxed_nested_and_variants():
  text = r"First \boxed{2}. Finally $\boxed{\left( 3, \frac{\pi}{2} \right)}$."
  assert mg.last_boxed(text) == r"\left( 3, \frac{\pi}{2} \right)"
  assert mg.last_boxed(r"\boxed{\frac{\sqrt{3}}{2}}") == r"\frac{\sqrt{3}}{2}"
  assert mg.last_boxed(r"so \fbox{5} apples") == "5"
  assert mg.last_boxed(r"$\boxed 7$") == "7"
  assert mg.last_boxed(r"\boxed{4} then \boxed{\frac{1}{2}") == "4"  # unbalanced last box
  assert mg.last_boxed("no box here 12") is None


def test_numbers_and_references():
  assert mg.last_number("She pays $1,234.50 in total, not 3.") == "3"
  assert mg.last_number("The total is $1,234.50") == "1234.50"
  assert mg.last_number("It drops to -3 degrees") == "-3"
  assert mg.last_number("no digits") is None
  assert mg.extract_answer(r"x = 3 so \boxed{x = 4}, then 5") == "x = 4"
  assert mg.extract_answer("So the answer is 1,000.") == "1000"
  assert mg.reference_answer("He pays 2*500 = <<2*500=1000>>1000.\n#### 1,000") == "1000"
  assert mg.reference_answer(r"\frac{14}{3}") == r"\frac{14}{3}"
  assert mg.reference_answer(r"so the area is $\boxed{12\pi}$.") == r"12\pi"


@pytest.mark.parametrize("pred,gold", [
    ("0.5", r"\frac{1}{2}"), (r"\dfrac{3}{4}", r"\frac34"), ("3/4", r"\tfrac{3}{4}"),
    ("1,000", "1000"), ("1000", "1,000"), (r"\$18.00", "18"), (r"10\text{ cm}", "10"),
    (r"5 \text{ inches}", "5"), (r"90^\circ", "90"), (r"2\sqrt{3}", r"\sqrt{12}"),
    (r"\sqrt2", r"\sqrt{2}"), (r"(-\infty, 3)", r"(-\infty,3)"), (r"\left[ 2, 5 \right)", "[2,5)"),
    (r"\left( 3, \frac{\pi}{2} \right)", r"(3,\frac{\pi}{2})"), ("x=3", "3"), ("(x+1)^2", "x^2+2x+1"),
    (r"\text{(C)}", r"\text{(C)}"), ("C", r"\text{(C)}"), (r"\text{Evelyn}", r"\text{Evelyn}"),
])
def test_equivalent(pred, gold):
  assert mg.equivalent(pred, gold)


@pytest.mark.parametrize("pred,gold", [
    ("17", "18"), (r"\frac{4}{3}", r"\frac{3}{4}"), ("[2,5]", "[2,5)"), ("(2,5]", "[2,5)"),
    ("0.333", r"\frac{1}{3}"), ("-3", "3"), (r"\sqrt{3}", r"\sqrt{2}"), ("1000", "100"),
])
def test_not_equivalent(pred, gold):
  assert not mg.equivalent(pred, gold)


def test_fallback_when_math_verify_raises(monkeypatch):
  def broken(*args, **kwargs):
    raise RuntimeError("parser failure")
  monkeypatch.setattr(mg, "parse", broken)
  assert mg.equivalent(r"\$1,000", "1000")
  assert mg.equivalent(r"\dfrac{1}{2}", r"\frac{1}{2}")
  assert mg.equivalent(r"\text{ Monday }", "monday")
  assert not mg.equivalent("17", "18")


def test_grading_off_the_main_thread():
  out = []
  worker = threading.Thread(target=lambda: out.append(mg.grade(r"\boxed{\dfrac{1}{2}}", "0.5")))
  worker.start()
  worker.join()
  assert out[0].correct


def test_gsm8k_dev_references_grade_their_own_solutions():
  rows = [json.loads(l) for l in (DATA / "gsm8k/dev.jsonl").read_text().splitlines()[:150]]
  for r in rows:
    body, answer = r["answer"].rsplit("####", 1)
    assert mg.grade(body + "So the answer is " + answer.strip() + ".", r["answer"]).correct
    assert mg.grade(f"Thus \\boxed{{{answer.strip()}}}.", r["answer"]).correct
    wrong = str(int(float(answer.replace(",", ""))) + 1)
    assert not mg.grade(f"\\boxed{{{wrong}}}", r["answer"]).correct


def test_math500_dev_answers_grade_their_boxed_solutions():
  rows = [json.loads(l) for l in (DATA / "math500/dev.jsonl").read_text().splitlines()[:120]]
  for r in rows:
    g = mg.grade(r["solution"], r["answer"])
    assert g.correct, (r["unique_id"], g)
