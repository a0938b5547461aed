"""Hostile and malformed requests against a live RLHF label server: how many get an answer in.

    .venv/bin/python benchmarks/label_server.py [--benchmarks BENCHMARKS.md]

Starts a human rater (effjax.rlhf.raters.QueueRater) with its label server on a free 127.0.0.1 port,
queues two pairs, and sends every request in `hostile_requests` as raw bytes over its own socket
(forged hosts and origins, wrong or missing secrets, wrong media types, lying or absent lengths,
smuggling, bodies that are not exactly {"id": <pending id>, "choice": 0 | 1}, other runs' ids, ...).
A request counts as accepted if the server answers it with a 2xx status or the answer log grows.
After every request the page must still load. tests/test_label_server.py runs the same catalogue.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import socket
import sys
import tempfile

import numpy as np

ROOT = pathlib.Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))

from effjax.rlhf import raters  # noqa: E402


def raw_request(method: str, target: str, headers: list[tuple[str, str]], body: bytes = b"",
                version: str = "HTTP/1.1") -> bytes:
  head = f"{method} {target} {version}\r\n" if version else f"{method} {target}\r\n"
  head += "".join(f"{k}: {v}\r\n" for k, v in headers)
  return head.encode("latin-1") + b"\r\n" + body


def send(port: int, data: bytes, timeout: float = 15.0) -> tuple[int | None, bytes]:
  """Send raw bytes, close our side, read the reply: (status or None, body)."""
  with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
    try:
      s.sendall(data)
      s.shutdown(socket.SHUT_WR)
    except OSError:
      pass  # the server may close early on an oversized request; read what it said
    chunks = []
    try:
      while chunk := s.recv(65536):
        chunks.append(chunk)
    except OSError:
      pass
  reply = b"".join(chunks)
  try:
    status = int(reply.split(b" ", 2)[1])
  except (IndexError, ValueError):
    status = None
  return status, reply.partition(b"\r\n\r\n")[2]


def hostile_requests(port: int, secret: str, pending_id: str, other_run_id: str,
                     unknown_id: str) -> list[tuple[str, bytes]]:
  """(name, raw request) pairs; each one must be refused and must not touch the answer log."""
  host = f"127.0.0.1:{port}"
  origin = f"http://{host}"
  answer = f"/{secret}/answer"
  good = json.dumps({"id": pending_id, "choice": 1}).encode()
  json_headers = lambda body: [("Host", host), ("Content-Type", "application/json"),
                               ("Content-Length", str(len(body)))]

  def post(body: bytes, headers=None, target: str = answer, method: str = "POST"):
    return raw_request(method, target, json_headers(body) if headers is None else headers, body)

  def body_with(text: str) -> bytes:
    return post(text.encode())

  big = b"x" * (5 << 20)
  cases = [
      # the secret
      ("no secret (old route)", post(good, target="/answer")),
      ("GET /queries without the secret", raw_request("GET", "/queries", [("Host", host)])),
      ("wrong secret", post(good, target=f"/{secret[:-1]}{'A' if secret[-1] != 'A' else 'B'}/answer")),
      ("secret prefix", post(good, target=f"/{secret[:8]}/answer")),
      ("secret in other case", post(good, target=f"/{secret.swapcase()}/answer")),
      ("secret as a query parameter", post(good, target=f"/answer?secret={secret}")),
      ("dot-segment before the secret", post(good, target=f"/x/../{secret}/answer")),
      ("absolute-form target", post(good, target=f"http://{host}/{secret}/answer")),
      ("NUL in the path", post(good, target=f"/{secret}\x00/answer")),
      # the host (DNS rebinding)
      ("foreign Host", post(good, [("Host", f"evil.example:{port}"), *json_headers(good)[1:]])),
      ("rebound name without port", post(good, [("Host", "attacker.example"), *json_headers(good)[1:]])),
      ("Host with the wrong port", post(good, [("Host", f"127.0.0.1:{port + 1}"), *json_headers(good)[1:]])),
      ("Host localhost.evil", post(good, [("Host", f"localhost.evil.example:{port}"),
                                          *json_headers(good)[1:]])),
      ("no Host", post(good, json_headers(good)[1:])),
      ("two Host headers", post(good, [("Host", host), ("Host", "evil.example"), *json_headers(good)[1:]])),
      ("GET page for a foreign Host", raw_request("GET", f"/{secret}/", [("Host", "evil.example")])),
      ("GET queries for a rebound Host", raw_request("GET", f"/{secret}/queries",
                                                     [("Host", f"evil.example:{port}")])),
      # the origin (CSRF)
      ("foreign Origin", post(good, [*json_headers(good), ("Origin", "http://evil.example")])),
      ("Origin null", post(good, [*json_headers(good), ("Origin", "null")])),
      ("Origin on another port", post(good, [*json_headers(good), ("Origin", f"http://127.0.0.1:{port + 1}")])),
      ("https Origin", post(good, [*json_headers(good), ("Origin", f"https://{host}")])),
      ("two Origin headers", post(good, [*json_headers(good), ("Origin", origin), ("Origin", "http://evil.example")])),
      ("Sec-Fetch-Site cross-site", post(good, [*json_headers(good), ("Sec-Fetch-Site", "cross-site")])),
      ("Sec-Fetch-Site same-site", post(good, [*json_headers(good), ("Sec-Fetch-Site", "same-site")])),
      # the media type
      ("text/plain (a simple cross-origin POST)", post(good, [("Host", host), ("Content-Type", "text/plain"),
                                                              ("Content-Length", str(len(good)))])),
      ("form-urlencoded", post(good, [("Host", host), ("Content-Type", "application/x-www-form-urlencoded"),
                                      ("Content-Length", str(len(good)))])),
      ("multipart", post(good, [("Host", host), ("Content-Type", "multipart/form-data; boundary=x"),
                                ("Content-Length", str(len(good)))])),
      ("no Content-Type", post(good, [("Host", host), ("Content-Length", str(len(good)))])),
      ("json with latin-1 charset", post(good, [("Host", host), ("Content-Type", "application/json; charset=latin-1"),
                                                ("Content-Length", str(len(good)))])),
      ("application/jsonx", post(good, [("Host", host), ("Content-Type", "application/jsonx"),
                                        ("Content-Length", str(len(good)))])),
      ("application/json-patch+json", post(good, [("Host", host), ("Content-Type", "application/json-patch+json"),
                                                  ("Content-Length", str(len(good)))])),
      ("two Content-Type headers", post(good, [*json_headers(good), ("Content-Type", "text/plain")])),
      # the length
      ("Content-Length -1 with 5 MiB", post(good + big, [("Host", host), ("Content-Type", "application/json"),
                                                         ("Content-Length", "-1")])),
      ("no Content-Length", post(good, [("Host", host), ("Content-Type", "application/json")])),
      ("Content-Length abc", post(good, [("Host", host), ("Content-Type", "application/json"),
                                         ("Content-Length", "abc")])),
      ("Content-Length +40", post(good, [("Host", host), ("Content-Type", "application/json"),
                                         ("Content-Length", f"+{len(good)}")])),
      ("Content-Length 5 MiB", post(good + big, [("Host", host), ("Content-Type", "application/json"),
                                                 ("Content-Length", str(len(good) + len(big)))])),
      ("Content-Length 0", post(b"", [("Host", host), ("Content-Type", "application/json"),
                                      ("Content-Length", "0")])),
      ("Content-Length beyond the body", post(good, [("Host", host), ("Content-Type", "application/json"),
                                                     ("Content-Length", str(len(good) + 10))])),
      ("two Content-Length headers", post(good, [*json_headers(good), ("Content-Length", "3")])),
      ("Transfer-Encoding chunked", post(f"{len(good):x}\r\n".encode() + good + b"\r\n0\r\n\r\n",
                                         [("Host", host), ("Content-Type", "application/json"),
                                          ("Transfer-Encoding", "chunked")])),
      ("chunked and Content-Length", post(good, [*json_headers(good), ("Transfer-Encoding", "chunked")])),
      ("a valid answer smuggled after a bad body",
       post(b'{"id": "x", "choice": 2}' + post(good),
            [("Host", host), ("Content-Type", "application/json"), ("Content-Length", "24")])),
      # the body
      ("not JSON", body_with("choice=1")),
      ("JSON array", body_with(json.dumps([pending_id, 1]))),
      ("choice Infinity", body_with(f'{{"id": "{pending_id}", "choice": Infinity}}')),
      ("choice -Infinity", body_with(f'{{"id": "{pending_id}", "choice": -Infinity}}')),
      ("choice NaN", body_with(f'{{"id": "{pending_id}", "choice": NaN}}')),
      ("choice 1e400", body_with(f'{{"id": "{pending_id}", "choice": 1e400}}')),
      ("choice 2", body_with(json.dumps({"id": pending_id, "choice": 2}))),
      ("choice -1", body_with(json.dumps({"id": pending_id, "choice": -1}))),
      ("choice 1.5", body_with(json.dumps({"id": pending_id, "choice": 1.5}))),
      ("choice 1.0", body_with(json.dumps({"id": pending_id, "choice": 1.0}))),
      ("choice '1'", body_with(json.dumps({"id": pending_id, "choice": "1"}))),
      ("choice 'a'", body_with(json.dumps({"id": pending_id, "choice": "a"}))),
      ("choice true", body_with(json.dumps({"id": pending_id, "choice": True}))),
      ("choice null", body_with(json.dumps({"id": pending_id, "choice": None}))),
      ("choice [1]", body_with(json.dumps({"id": pending_id, "choice": [1]}))),
      ("no choice", body_with(json.dumps({"id": pending_id}))),
      ("no id", body_with(json.dumps({"choice": 1}))),
      ("an extra key", body_with(json.dumps({"id": pending_id, "choice": 1, "admin": True}))),
      ("duplicate choice keys", body_with(f'{{"id": "{pending_id}", "choice": 0, "choice": 1}}')),
      ("duplicate id keys", body_with(f'{{"id": "{unknown_id}", "id": "{pending_id}", "choice": 1}}')),
      ("unknown id of this run", body_with(json.dumps({"id": unknown_id, "choice": 1}))),
      ("another run's id", body_with(json.dumps({"id": other_run_id, "choice": 1}))),
      ("id as a number", body_with(json.dumps({"id": 7, "choice": 1}))),
      ("empty id", body_with(json.dumps({"id": "", "choice": 1}))),
      ("4000-character id", body_with(json.dumps({"id": "x" * 4000, "choice": 1}))),
      ("invalid UTF-8", post(b'{"id": "\xff\xfe", "choice": 1}')),
      ("UTF-8 BOM", post(b"\xef\xbb\xbf" + good)),
      ("2000-deep nesting", body_with("[" * 2000 + "]" * 2000)),
      ("trailing garbage", post(good + b"garbage")),
      ("two JSON objects", post(good + good)),
      # methods and routes
      ("PUT answer", post(good, method="PUT")),
      ("DELETE answer", post(good, method="DELETE")),
      ("PATCH answer", post(good, method="PATCH")),
      ("CORS preflight", raw_request("OPTIONS", answer, [("Host", host), ("Origin", "http://evil.example"),
                                                          ("Access-Control-Request-Method", "POST")])),
      ("GET answer", raw_request("GET", f"{answer}?id={pending_id}&choice=1", [("Host", host)])),
      ("POST to queries", post(good, target=f"/{secret}/queries")),
      ("HTTP/0.9 request line", raw_request("POST", answer, [], b"", version="")),
      ("70 kB header line", post(good, [*json_headers(good), ("X-Junk", "y" * 70000)])),
      ("70 kB request target", post(good, target=f"/{secret}/answer?" + "z" * 70000)),
      ("150 headers", post(good, [*json_headers(good), *[(f"X-{i}", "1") for i in range(150)]])),
      ("headers only, then close", raw_request("POST", answer, json_headers(good))),
  ]
  return cases


def valid_page(port: int, secret: str) -> bool:
  status, body = send(port, raw_request("GET", f"/{secret}/", [("Host", f"127.0.0.1:{port}")]))
  return status == 200 and b"<!doctype html>" in body


def pairs(n: int) -> raters.PairBatch:
  """n pairs with markup in the text, as people would see them."""
  prompts = np.arange(1, 4)[None].repeat(n, 0)
  a = np.arange(n)[:, None] + np.array([[10, 11]])
  b = np.arange(n)[:, None] + np.array([[20, 21]])
  return raters.PairBatch(prompts, np.full(n, 3), a, np.ones_like(a, bool), b, np.ones_like(b, bool),
                          np.arange(n))


def probe(workdir: pathlib.Path) -> dict:
  """Every hostile request against a fresh server; a second run shares the queue folder."""
  import jax
  decode = lambda toks: "<b>" + " ".join(map(str, toks)) + "</b><script>alert(1)</script>"
  rater = raters.QueueRater(str(workdir / "queue"), decode=decode, port=0, wait_seconds=5, log=lambda m: None)
  other = raters.QueueRater(str(workdir / "queue"), decode=decode, log=lambda m: None)
  try:
    ids = rater.ask(pairs(2), jax.random.key(0))
    other_ids = other.ask(pairs(2), jax.random.key(0))
    port, secret = rater.server.port, rater.server.secret
    unknown = ids[0].rsplit("-", 1)[0] + "-99"
    results = []
    for name, data in hostile_requests(port, secret, ids[0], other_ids[0], unknown):
      before = rater.answers_path.read_bytes()
      status, _ = send(port, data)
      grew = rater.answers_path.read_bytes() != before
      results.append(dict(name=name, status=status, accepted=bool(grew or (status or 0) // 100 == 2),
                          serving=valid_page(port, secret)))
    return dict(tried=len(results), accepted=sum(r["accepted"] for r in results),
                still_serving=all(r["serving"] for r in results), results=results,
                answers_logged=len(rater.answers_path.read_bytes().splitlines()))
  finally:
    rater.close()
    other.close()


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--benchmarks", default="", help="write the label-server section of this BENCHMARKS.md")
  args = ap.parse_args()
  with tempfile.TemporaryDirectory() as d:
    got = probe(pathlib.Path(d))
  by_status: dict = {}
  for r in got["results"]:
    by_status.setdefault(r["status"], []).append(r["name"])
  for status, names in sorted(by_status.items(), key=lambda kv: str(kv[0])):
    print(f"{status}: {len(names)}: {'; '.join(names)}")
  summary = (f"hostile or malformed requests tried: {got['tried']}, accepted: {got['accepted']}, "
             f"answer log lines written: {got['answers_logged']}, page served after every one: "
             f"{'yes' if got['still_serving'] else 'NO'}")
  print(summary)
  if args.benchmarks:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from report import write_section
    rows = "\n".join(f"| {s} | {len(n)} | {'; '.join(n)} |"
                     for s, n in sorted(by_status.items(), key=lambda kv: str(kv[0])))
    body = f"""Command: `.venv/bin/python benchmarks/label_server.py --benchmarks BENCHMARKS.md`
({datetime.date.today().isoformat()}). A live label server (`effjax/rlhf/label_server.py`) with two
queued pairs gets every request of `hostile_requests` as raw bytes; accepted = a 2xx reply or any
growth of the answer log. The same catalogue runs in `tests/test_label_server.py`, next to a headless
Chromium test of the page (markup in a response shown as text; one click = one label).

**{summary}.** Goal: 0 accepted: {'met' if got['accepted'] == 0 and got['still_serving'] else 'MISSED'}.

| reply status | requests | which |
|---|---|---|
{rows}
"""
    write_section(pathlib.Path(args.benchmarks), "## Online RLHF (label server)", body)
  return 0 if got["accepted"] == 0 and got["still_serving"] else 1


if __name__ == "__main__":
  sys.exit(main())
