"""BENCHMARKS.md is one file with a section per benchmark script; each script rewrites its own."""

from __future__ import annotations

from pathlib import Path

TITLE = "# effjax benchmarks\n\nEach section is written by the script named in its heading, with the exact command.\n"


def write_section(path: Path, heading: str, body: str) -> None:
  """Replace (or append) the section that starts with `heading` up to the next '## ' heading."""
  text = path.read_text() if path.exists() else TITLE
  start = text.find(heading + "\n")
  block = f"{heading}\n\n{body.strip()}\n"
  if start < 0:
    text = text.rstrip("\n") + "\n\n" + block
  else:
    end = text.find("\n## ", start + len(heading))
    text = text[:start] + block + (text[end:] if end >= 0 else "")
  path.write_text(text)
