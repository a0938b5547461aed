"""Problem and prompt sets (JSONL, TFDS) and the resumable, per-host prompt stream for RLHF.

Names are imported on first use: `effjax.data.chat` (what `effjax generate` needs) does not pull in
the stream's Grain and Orbax.
"""

from effjax.lazy import exports

_MODULE_OF = {"load_problems": "loader", "Problem": "records", "ProblemSet": "records",
              "Skipped": "records", "PromptStream": "stream"}
__all__ = sorted(_MODULE_OF)

__getattr__ = exports(__name__, _MODULE_OF)
