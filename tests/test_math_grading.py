"""Answer extraction and math-equivalence grading on GSM8K and MATH-500 style answers."""

import json
import threading

import pytest

from effjax.data.samples import sample_path
from effjax.evals import math_grading as mg



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
  assert mg.extract_answer("So the answer is 1,000.") is None  # no answer marker
  assert mg.extract_answer("So the answer is 1,000.", fallback_last_number=True) == "1000"
  assert mg.reference_answer("He pays 2*500 = <<2*500=1000>>1000.\n#### 1,000") == "1000"
  assert mg.reference_answer(r"\frac{14}{3}") == r"\frac{14}{3}"
  assert mg.reference_answer(r"so the area is $\boxed{12\pi}$.") == r"12\pi"


def test_truncated_responses_have_no_answer():
  # Cut off mid-reasoning: the last number of the reasoning is not an answer.
  cut = "Tom has 3 apples and buys 4 more. 3+4 = 7. Wait, maybe"
  g = mg.grade(cut, "#### 7")
  assert g.predicted is None and not g.answered and not g.correct
  assert mg.grade(cut, "#### 7", fallback_last_number=True).correct  # the old, lenient reading
  # A thinking model cut off inside its span: even a boxed value in the reasoning does not count.
  thinking = r"Let me see, maybe \boxed{7}? Hmm, wait, let me recheck 3 + 4"
  assert not mg.grade(thinking, "#### 7", thinking=True).answered
  assert mg.grade(thinking + "</think>\n\nThe answer is $\\boxed{7}$.", "#### 7",
                  thinking=True).correct
  # After the span closes, an answer without a marker is still no answer.
  assert not mg.grade("3+4=7</think>The apples total 7", "#### 7", thinking=True).answered
  # An unbalanced box that the response never finished is no answer either.
  assert not mg.grade(r"So the total is \boxed{\frac{7}{", "#### 7").answered


def test_answer_region_and_markers():
  assert mg.answer_region("abc", thinking=False) == "abc"
  assert mg.answer_region("a</think>b</think>c", thinking=True) == "c"
  assert mg.answer_region("still thinking", thinking=True) is None
  assert mg.final_answer("so\n#### 1,234.\n") == "1234"
  assert mg.final_answer("#### \n") is None
  assert mg.grade("Janet makes 9 * 2 = 18 dollars.\n#### 18", "#### 18").correct
  assert mg.grade(r"She makes $\boxed{\$18}$ a day", "#### 18").correct


@pytest.mark.parametrize("response,want", [
    # The last marker in the answer region wins, boxed or ####.
    (r"First \boxed{12}, then corrected: \boxed{18}.", "18"),
    (r"\boxed{18} ... on reflection \boxed{12}", "12"),
    ("#### 12\nno wait\n#### 18", "18"),
    (r"#### 12 then \boxed{18}", "18"),
    ("\\boxed{12}\n#### 18", "18"),
    # Answers inside the thinking span do not count for a thinking model.
    (r"\boxed{18}</think>Final: \boxed{12}", "12"),
])
def test_multi_answer_responses_take_the_last_answer(response, want):
  thinking = "</think>" in response
  assert mg.extract_answer(response, thinking=thinking) == want
  assert mg.grade(response, "#### 18", thinking=thinking).correct == (want == "18")


def test_several_values_in_one_box_are_not_the_single_answer():
  assert not mg.grade(r"\boxed{12, 18}", "#### 18").correct
  assert mg.grade(r"\boxed{(-\infty, 3)}", r"(-\infty,3)").correct


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
  rows = [json.loads(l) for l in sample_path("gsm8k").read_text().splitlines()[:150]]
  for r in rows:
    body, answer = r["answer"].rsplit("####", 1)
    assert mg.grade(r["answer"], r["answer"]).correct  # the "####" line is an answer
    assert not mg.grade(body + "So the answer is " + answer.strip() + ".", r["answer"]).answered
    assert mg.grade(f"Thus \\boxed{{{answer.strip()}}}.", r["answer"]).correct
    wrong = str(int(float(answer.replace(",", ""))) + 1)
    assert not mg.grade(f"\\boxed{{{wrong}}}", r["answer"]).correct


def test_math500_dev_answers_grade_their_boxed_solutions():
  rows = [json.loads(l) for l in sample_path("math500").read_text().splitlines()[:120]]
  for r in rows:
    g = mg.grade(r["solution"], r["answer"])
    assert g.correct, (r["unique_id"], g)


def test_answer_tokens_cut_the_thinking_span():
  from effjax.rebalance.prompts import answer_tokens

  OPEN, CLOSE = 50, 51
  assert answer_tokens([1, OPEN], [5, 6, CLOSE, 7, 8], OPEN, CLOSE) == [7, 8]
  assert answer_tokens([1, OPEN], [5, 6, 7], OPEN, CLOSE) is None  # still thinking
  assert answer_tokens([1], [OPEN, 5, CLOSE, 9], OPEN, CLOSE) == [9]  # opened in the response
  assert answer_tokens([1], [OPEN, 5, 6], OPEN, CLOSE) is None
  assert answer_tokens([1], [5, 6], OPEN, CLOSE) == [5, 6]  # never thought
  assert answer_tokens([1, OPEN], [5, 6], None, None) == [5, 6]  # no think tags
