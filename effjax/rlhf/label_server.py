"""The label server: people answer a run's pairs in a browser, on 127.0.0.1 only.

Anything that listens on a port is hostile-input code. Every request must
  - name this host (Host is 127.0.0.1:PORT or localhost:PORT: a DNS-rebound name is refused),
  - carry the run's secret as the first path segment (/SECRET/...; compared in constant time),
  - come from this origin when a browser says where it comes from (Origin, Sec-Fetch-Site),
and a POST must be `application/json` with one strict Content-Length (digits only, at most
MAX_BODY bytes, no Transfer-Encoding), holding exactly {"id": <a pending id>, "choice": 0 | 1}
(no NaN / Infinity, no duplicate keys, no floats or booleans). Each connection serves one request.
The queue (raters.QueueRater) decides what an answer means; this module only admits well-formed
ones. Routes under /SECRET/:
  GET  /           a page showing the next pending pair (prompt and both responses, escaped) with two
                   buttons; a click POSTs the answer and loads the next pair
  GET  /queries    the pending pairs as JSON
  POST /answer     {"id": ..., "choice": 1 (first response better) | 0 (second)}
"""

from __future__ import annotations

import hmac
import html
import json
import re
import secrets
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Protocol

MAX_BODY = 4096  # bytes: an answer is ~100
MAX_ID = 128  # characters
SOCKET_TIMEOUT = 10.0  # seconds a client may take to send its request
_DIGITS = re.compile(r"[0-9]{1,7}")


class Queue(Protocol):
  def pending(self) -> list[dict]:
    """Unanswered (or still changeable) queries: [{"id", "prompt", "a", "b"}] in order."""

  def submit(self, qid: str, choice: int) -> tuple[int, str]:
    """Record an answer: (HTTP status, message); 200 when it is (or already was) recorded."""


class Rejected(Exception):
  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status = status


def _reject_constant(name: str):
  raise Rejected(400, f"{name} is not a number")


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
  keys = [k for k, _ in pairs]
  if len(set(keys)) != len(keys):
    raise Rejected(400, "duplicate keys")
  return dict(pairs)


def parse_answer(body: bytes) -> tuple[str, int]:
  """(id, choice) from a POST body, or Rejected."""
  try:
    text = body.decode("utf-8")
    obj = json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_unique_keys)
  except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
    raise Rejected(400, f"body is not JSON: {type(e).__name__}") from None
  if not isinstance(obj, dict) or set(obj) != {"id", "choice"}:
    raise Rejected(400, 'expected exactly {"id": ..., "choice": 0 | 1}')
  qid, choice = obj["id"], obj["choice"]
  if not isinstance(qid, str) or not 0 < len(qid) <= MAX_ID:
    raise Rejected(400, "id must be a non-empty string")
  if type(choice) is not int or choice not in (0, 1):
    raise Rejected(400, "choice must be 0 or 1")
  return qid, choice


def media_type(value: str | None) -> str:
  """'application/json; charset=utf-8' -> 'application/json' (parameters other than a UTF-8
  charset are refused)."""
  if not value:
    return ""
  kind, *params = [p.strip() for p in value.split(";")]
  for p in params:
    name, _, val = p.partition("=")
    if name.strip().lower() != "charset" or val.strip().strip('"').lower() not in ("utf-8", "utf8"):
      return ""
  return kind.lower()


class LabelServer:
  """A ThreadingHTTPServer on 127.0.0.1:port (0: any free port) serving `queue` to people."""

  def __init__(self, queue: Queue, port: int = 0, *, title: str = "effjax: which response is better?",
               log: Callable[[str], None] | None = None):
    self.queue = queue
    self.secret = secrets.token_urlsafe(24)
    self.title = title
    self.server = ThreadingHTTPServer(("127.0.0.1", port), _handler(self))
    self.server.daemon_threads = True
    self.port = self.server.server_address[1]
    self.hosts = {f"127.0.0.1:{self.port}", f"localhost:{self.port}"}
    self.url = f"http://127.0.0.1:{self.port}/{self.secret}/"
    self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
    self._thread.start()
    if log is not None:
      log(f"label server: open {self.url} to answer pairs")

  def close(self) -> None:
    self.server.shutdown()
    self.server.server_close()

  # ---- checks ------------------------------------------------------------------------------------

  def route(self, path: str) -> str:
    """The route after /SECRET/, or Rejected(404) (the same answer for every wrong secret)."""
    parts = path.split("/", 2)
    if len(parts) < 3 or parts[0] != "" or not hmac.compare_digest(parts[1].encode(),
                                                                   self.secret.encode()):
      raise Rejected(404, "not found")
    return parts[2]

  def check_origin(self, headers, host: str) -> None:
    origin = headers.get_all("Origin") or []
    if len(origin) > 1 or (origin and origin[0] != f"http://{host}"):
      raise Rejected(403, "cross-origin request")
    site = headers.get("Sec-Fetch-Site")
    if site is not None and site not in ("same-origin", "none"):
      raise Rejected(403, "cross-site request")

  def check_host(self, headers) -> str:
    host = headers.get_all("Host") or []
    if len(host) != 1 or host[0].lower() not in self.hosts:
      raise Rejected(403, "wrong Host")
    return host[0].lower()

  # ---- the page ----------------------------------------------------------------------------------

  def page(self, nonce: str) -> str:
    pending = self.queue.pending()
    esc = lambda x: html.escape(x if isinstance(x, str) else json.dumps(x), quote=True)
    if pending:
      q = pending[0]
      body = f"""<p id="left">{len(pending)} pair(s) waiting.</p>
<h2>Prompt</h2><pre id="prompt">{esc(q["prompt"])}</pre>
<div class="pair">
<div><h2>Response A</h2><pre id="a">{esc(q["a"])}</pre>
<button id="choose-a" data-id="{esc(q["id"])}" data-choice="1">A is better</button></div>
<div><h2>Response B</h2><pre id="b">{esc(q["b"])}</pre>
<button id="choose-b" data-id="{esc(q["id"])}" data-choice="0">B is better</button></div>
</div><p id="status"></p>"""
    else:
      body = '<p id="left">No pairs waiting; this page checks again every 2 s.</p>'
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(self.title)}</title>
<style nonce="{nonce}">body{{font-family:sans-serif;margin:2em}} pre{{white-space:pre-wrap;
background:#f4f4f4;padding:.5em}} .pair{{display:flex;gap:1em}} .pair>div{{flex:1}}
button{{font-size:1.1em;padding:.4em 1em}}</style></head>
<body><h1>{esc(self.title)}</h1>{body}
<script nonce="{nonce}">
for (const b of document.querySelectorAll("button[data-id]")) {{
  b.addEventListener("click", async () => {{
    for (const x of document.querySelectorAll("button")) x.disabled = true;
    const r = await fetch("answer", {{method: "POST", headers: {{"Content-Type": "application/json"}},
      body: JSON.stringify({{id: b.dataset.id, choice: Number(b.dataset.choice)}})}});
    document.getElementById("status").textContent = r.ok ? "saved" : "not saved: " + r.status;
    location.reload();
  }});
}}
if (!document.querySelector("button[data-id]")) setTimeout(() => location.reload(), 2000);
</script></body></html>"""


def _handler(server: LabelServer) -> type[BaseHTTPRequestHandler]:
  class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # one request per connection: nothing can follow a body
    timeout = SOCKET_TIMEOUT
    server_version = "effjax-labels"
    sys_version = ""

    def _send(self, status: int, body: bytes, content_type: str, extra: dict | None = None) -> None:
      self.send_response(status)
      headers = {"Content-Type": content_type, "Content-Length": str(len(body)),
                 "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff",
                 "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY",
                 "Cross-Origin-Resource-Policy": "same-origin", **(extra or {})}
      for k, v in headers.items():
        self.send_header(k, v)
      self.end_headers()
      if self.command != "HEAD":
        self.wfile.write(body)
      self.close_connection = True

    def _json(self, status: int, payload) -> None:
      self._send(status, json.dumps(payload).encode(), "application/json")

    def _serve(self) -> None:
      try:
        host = server.check_host(self.headers)
        route = server.route(self.path)
        server.check_origin(self.headers, host)
        if self.command == "GET" and route == "":
          nonce = secrets.token_urlsafe(16)
          csp = (f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
                 "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
          self._send(200, server.page(nonce).encode(), "text/html; charset=utf-8",
                     {"Content-Security-Policy": csp})
        elif self.command == "GET" and route == "queries":
          self._json(200, server.queue.pending())
        elif self.command == "POST" and route == "answer":
          qid, choice = parse_answer(self._body())
          status, message = server.queue.submit(qid, choice)
          self._json(status, {"ok": status == 200, "message": message})
        else:
          raise Rejected(405 if route in ("", "queries", "answer") else 404, "no such route")
      except Rejected as e:
        self._json(e.status, {"error": str(e)})
      except Exception as e:  # never let a request take the server down; say what went wrong
        self._json(500, {"error": type(e).__name__})

    def _body(self) -> bytes:
      if self.headers.get("Transfer-Encoding") is not None:
        raise Rejected(411, "Transfer-Encoding is not accepted; send Content-Length")
      if media_type(self.headers.get("Content-Type")) != "application/json" or \
          len(self.headers.get_all("Content-Type") or []) != 1:
        raise Rejected(415, "Content-Type must be application/json")
      lengths = self.headers.get_all("Content-Length") or []
      if len(lengths) != 1 or not _DIGITS.fullmatch(lengths[0]):
        raise Rejected(411, "one Content-Length of digits is required")
      n = int(lengths[0])
      if n == 0 or n > MAX_BODY:
        raise Rejected(413, f"body must be 1..{MAX_BODY} bytes")
      body = self.rfile.read(n)
      if len(body) != n:
        raise Rejected(400, "body shorter than Content-Length")
      return body

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = _serve

    def log_message(self, *args):
      pass

  return Handler
