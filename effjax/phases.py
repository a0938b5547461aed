"""Wall-clock and CPU seconds per phase of a command (`effjax generate --verbose`)."""

from __future__ import annotations

import os
import time


def process_age() -> float:
  """Seconds since this process started (Linux /proc; 0 where unavailable)."""
  try:
    with open("/proc/self/stat") as f:
      start_ticks = int(f.read().rpartition(")")[2].split()[19])
    return time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")
  except (OSError, ValueError, IndexError, AttributeError):
    return 0.0


class Phases:
  """Consecutive phases: `mark(name)` closes the phase that ran since the previous mark. The first
  phase, "start", is the interpreter's start-up up to this object's creation."""

  def __init__(self):
    self.rows: list[tuple[str, float, float, str]] = [
        ("start", process_age(), time.process_time(), "python start-up, argument parsing")]
    self._wall, self._cpu = time.perf_counter(), time.process_time()

  def mark(self, name: str, note: str = "", *, minus: tuple[float, float] = (0.0, 0.0)) -> None:
    """Close phase `name`; `minus` (wall, cpu) is time inside it that another row reports."""
    wall, cpu = time.perf_counter(), time.process_time()
    self.rows.append((name, wall - self._wall - minus[0], cpu - self._cpu - minus[1], note))
    self._wall, self._cpu = wall, cpu

  def add(self, name: str, wall: float, cpu: float, note: str = "") -> None:
    self.rows.append((name, wall, cpu, note))

  def report(self) -> str:
    lines = [f"{'phase':<10}{'wall s':>8}{'cpu s':>8}"]
    for name, wall, cpu, note in self.rows:
      lines.append(f"{name:<10}{wall:>8.2f}{cpu:>8.2f}  {note}".rstrip())
    lines.append(f"{'total':<10}{sum(r[1] for r in self.rows):>8.2f}"
                 f"{sum(r[2] for r in self.rows):>8.2f}")
    return "\n".join(lines)
