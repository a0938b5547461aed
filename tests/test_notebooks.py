"""Every notebook in notebooks/ runs top to bottom on CPU (tiny settings, as in CI).

Code cells run in order as one script in a fresh interpreter; shell and magic lines ('!pip ...',
'%matplotlib ...') are Colab set-up and are skipped here, where effjax is already installed.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))


def notebook_script(path: Path) -> str:
  nb = json.loads(path.read_text())
  assert nb.get("nbformat") == 4, f"{path.name}: not an nbformat 4 notebook"
  cells = []
  for cell in nb["cells"]:
    if cell["cell_type"] != "code":
      continue
    src = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
    cells.append("\n".join(l for l in src.splitlines() if not l.lstrip().startswith(("!", "%"))))
  assert cells, f"{path.name} has no code cells"
  return "\n\n".join(cells)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path):
  script = tmp_path / f"{path.stem}.py"
  script.write_text(notebook_script(path))
  env = dict(os.environ, MPLBACKEND="Agg", EFFJAX_NOTEBOOK_CI="1")
  proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
