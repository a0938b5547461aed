"""Problem and prompt sets (JSONL, TFDS) and the resumable, per-host prompt stream for RLHF."""

from effjax.data.loader import load_problems
from effjax.data.records import Problem, ProblemSet, Skipped
from effjax.data.stream import PromptStream

__all__ = ["Problem", "ProblemSet", "PromptStream", "Skipped", "load_problems"]
