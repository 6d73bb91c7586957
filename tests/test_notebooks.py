"""The notebooks run top to bottom in a small setting (outputs stay out of git).

Their code cells run in this process, each notebook in a namespace of its own,
as a kernel would run them one after another: the suite pays for the imports
and the kernel start once, not once per notebook.
"""

import os

import nbformat
import pytest

from tests.conftest import REPO

NOTEBOOKS = sorted(f for f in os.listdir(os.path.join(REPO, "colab")) if f.endswith(".ipynb"))
# What each notebook leaves in its workdir at the end (default: the samples it drew at step 42).
OUTPUTS = {"aaren.ipynb": "streaming.png", "ebt.ipynb": "thinking.png"}


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, tmp_path, monkeypatch):
  path = os.path.join(REPO, "colab", name)
  nb = nbformat.read(path, as_version=4)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert all(not c.get("outputs") for c in code), "commit notebooks with outputs cleared"
  assert not any(line.lstrip().startswith(("%", "!")) for c in code for line in c.source.splitlines()), \
      "magics and shell lines would not run outside a kernel"
  monkeypatch.setenv("NBP_NOTEBOOK_STEPS", "3")
  monkeypatch.setenv("NBP_NOTEBOOK_WORKDIR", str(tmp_path))
  monkeypatch.chdir(REPO)
  namespace = {"__name__": "__main__"}
  for i, cell in enumerate(code):
    exec(compile(cell.source, f"{name}, code cell {i}", "exec"), namespace)  # pylint: disable=exec-used
  expected = OUTPUTS.get(name, "step_0000042.")
  assert any(f.startswith(expected) for f in os.listdir(tmp_path)), expected  # what it drew and wrote
