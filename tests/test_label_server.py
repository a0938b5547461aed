"""The RLHF label server: forged and malformed requests never reach the answer log, valid answers do
(once, changeable until used), runs sharing a queue folder stay apart, and the page works in a real
headless Chromium."""

import json
import os
import pathlib
import shutil
import sys
import threading
import time

import jax
import numpy as np
import pytest

from effjax.rlhf import raters

ROOT = pathlib.Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import label_server as probe_lib  # noqa: E402  (the hostile-request catalogue, shared with the benchmark)


def test_hostile_requests_never_reach_the_answer_log(tmp_path):
  got = probe_lib.probe(tmp_path)
  accepted = [(r["name"], r["status"]) for r in got["results"] if r["accepted"]]
  down = [r["name"] for r in got["results"] if not r["serving"]]
  assert got["tried"] >= 80
  assert accepted == [] and down == [] and got["answers_logged"] == 0
  # Refusals say why: no request is answered 500 (an unhandled error) or dropped unanswered,
  # except the HTTP/0.9 line, which has no status line to answer with.
  statuses = {r["name"]: r["status"] for r in got["results"]}
  assert all(s is not None and s != 500 for n, s in statuses.items() if n != "HTTP/0.9 request line")
  assert statuses["text/plain (a simple cross-origin POST)"] == 415
  assert statuses["foreign Host"] == 403 and statuses["wrong secret"] == 404
  assert statuses["choice Infinity"] == 400 and statuses["Content-Length -1 with 5 MiB"] == 411


def _post(rater, qid, choice):
  body = json.dumps({"id": qid, "choice": choice}).encode()
  port = rater.server.port
  status, reply = probe_lib.send(port, probe_lib.raw_request(
      "POST", f"/{rater.server.secret}/answer",
      [("Host", f"127.0.0.1:{port}"), ("Origin", f"http://127.0.0.1:{port}"),
       ("Content-Type", "application/json; charset=utf-8"), ("Content-Length", str(len(body)))], body))
  return status, json.loads(reply)


def _lines(path):
  return path.read_text().splitlines()


def test_answers_are_recorded_once_changeable_until_used_and_per_run(tmp_path):
  queue = tmp_path / "queue"
  rater = raters.QueueRater(str(queue), port=0, wait_seconds=5, poll_seconds=0.01, log=lambda m: None)
  # A second run with the same seed sharing the folder: the same batch key, different pairs.
  other = raters.QueueRater(str(queue), wait_seconds=0.2, poll_seconds=0.01, log=lambda m: None)
  try:
    batch = probe_lib.pairs(2)
    ids = rater.ask(batch, jax.random.key(0))
    assert [q["id"] for q in rater.pending()] == ids
    assert _post(rater, ids[0], 1) == (200, {"ok": True, "message": "recorded"})
    assert _post(rater, ids[0], 1) == (200, {"ok": True, "message": "already recorded"})
    assert _post(rater, ids[0], 0) == (200, {"ok": True, "message": "changed"})
    assert len(_lines(rater.answers_path)) == 2
    assert [q["id"] for q in rater.pending()] == ids[1:]
    # Lines written by hand go through the same schema; bad ones are ignored.
    with open(rater.answers_path, "a") as f:
      for bad in ({"id": ids[1], "choice": 2}, {"id": ids[1], "choice": 1.0}, {"id": ids[1]}):
        f.write(json.dumps(bad) + "\n")
      f.write(f'{{"id": "{ids[1]}", "choice": Infinity}}\n')
    assert ids[1] not in rater.read_answers()
    with open(rater.answers_path, "a") as f:
      f.write(json.dumps({"id": ids[1], "choice": 1}) + "\n")
    assert rater.wait(ids).tolist() == [0, 1]
    # Used for training: it can no longer change, and nothing is written.
    status, reply = _post(rater, ids[0], 1)
    assert status == 409 and not reply["ok"]
    assert _post(rater, ids[0], 0)[0] == 200  # repeating the used answer is harmless
    n_lines = len(_lines(rater.answers_path))
    # The other run asks its own pairs under its own ids and never sees this run's answers.
    other_ids = other.ask(probe_lib.pairs(2), jax.random.key(0))
    assert set(other_ids).isdisjoint(ids)
    with pytest.raises(TimeoutError, match="2 of 2 answers missing"):
      other.wait(other_ids)
    assert _post(rater, other_ids[0], 1)[0] == 404  # nor can its ids be answered through this server
    assert len(_lines(rater.answers_path)) == n_lines
    # The same run resumed (its nonce is kept in the run directory) reuses the answers on file.
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    nonce = raters.run_nonce(run_dir)
    assert raters.run_nonce(run_dir) == nonce and len(nonce) == 16
    first = raters.QueueRater(str(queue), run_nonce=nonce, wait_seconds=5, poll_seconds=0.01)
    asked = first.ask(batch, jax.random.key(3))
    with open(first.answers_path, "a") as f:
      for qid, c in zip(asked, (0, 1)):
        f.write(json.dumps({"id": qid, "choice": c}) + "\n")
    resumed = raters.QueueRater(str(queue), run_nonce=raters.run_nonce(run_dir), wait_seconds=0.2)
    assert resumed.label(batch, jax.random.key(3)).tolist() == [0, 1]
    assert len(_lines(resumed.queries_path)) == 6  # the resumed run did not queue its pairs twice
  finally:
    rater.close()


# ---- the page in a real browser -----------------------------------------------------------------

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run")


def _browser(tmp_path):
  """Debian's chromium through its chromedriver (selenium never downloads a browser here)."""
  required = os.environ.get("EFFJAX_REQUIRE_BROWSER") == "1"  # set by .ci/run, which installs them
  missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not shutil.which(p)]
  try:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
  except ImportError:
    missing.append("selenium")
  if missing:
    message = f"{', '.join(missing)} not installed (apt-get install chromium chromium-driver)"
    if required:
      pytest.fail(message)
    pytest.skip(message)
  os.environ.setdefault("SE_OFFLINE", "true")
  options = webdriver.ChromeOptions()
  options.binary_location = CHROMIUM
  for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"):
    options.add_argument(flag)
  return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def test_page_shows_markup_as_text_and_one_click_is_one_label(tmp_path):
  from selenium.webdriver.common.by import By
  from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
  from selenium.webdriver.support.ui import WebDriverWait

  markup = lambda toks: "<b>bold</b><script>window.pwned = 1</script><img src=x onerror=alert(1)> " + \
      " ".join(map(str, toks))
  rater = raters.QueueRater(str(tmp_path / "queue"), decode=markup, port=0, wait_seconds=120,
                            poll_seconds=0.05, log=lambda m: None)
  driver = _browser(tmp_path)
  try:
    batch = probe_lib.pairs(2)
    got = {}
    worker = threading.Thread(target=lambda: got.update(labels=rater.label(batch, jax.random.key(0))))
    worker.start()
    while len(rater.pending()) < 2:
      time.sleep(0.05)
    driver.get(rater.url)
    shown = driver.find_element(By.ID, "a").text
    assert shown == markup(np.asarray(batch.a[0])), shown  # the markup as text, not as markup
    assert driver.find_elements(By.CSS_SELECTOR, "pre b, pre script, pre img") == []
    assert driver.execute_script("return window.pwned === undefined")
    assert driver.find_element(By.ID, "prompt").text == markup(np.asarray(batch.prompts[0]))
    driver.find_element(By.ID, "choose-b").click()
    # The page reloads onto the second pair once the first answer is saved; an element found just
    # before the reload goes stale, so the waits retry on that instead of failing.
    reloading = lambda: WebDriverWait(
        driver, 30, ignored_exceptions=(NoSuchElementException, StaleElementReferenceException))
    reloading().until(
        lambda d: d.find_element(By.ID, "a").text == markup(np.asarray(batch.a[1])))
    lines = [json.loads(line) for line in rater.answers_path.read_text().splitlines()]
    assert lines == [{"id": list(rater.queries)[0], "choice": 0}]
    driver.find_element(By.ID, "choose-a").click()
    worker.join(timeout=60)
    assert got["labels"].tolist() == [0, 1]
    assert len(rater.answers_path.read_text().splitlines()) == 2
    reloading().until(lambda d: "No pairs waiting" in d.find_element(By.ID, "left").text)
  finally:
    driver.quit()
    rater.close()
