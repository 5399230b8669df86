"""examples/compose_losses.ipynb runs top to bottom in a fresh kernel and shows its sample clips."""

import base64
import io
import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="nbformat is not installed (the `test` extra)")
nbclient = pytest.importorskip("nbclient", reason="nbclient is not installed (the `test` extra)")
pytest.importorskip("ipykernel", reason="ipykernel is not installed (the `test` extra)")

NOTEBOOK = Path(__file__).resolve().parent.parent / "examples" / "compose_losses.ipynb"


def test_notebook_is_committed_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


def test_compose_losses_notebook_runs_and_shows_the_samples(tmp_path, monkeypatch):
    from PIL import Image

    # the kernel imports this checkout's rcm, whatever the installed one
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(NOTEBOOK.parent.parent),
                                                                   os.environ.get("PYTHONPATH")])))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    for shown in ("by hand vs scm_jvp: max |diff| = 0.0e+00", "sCM loss", "DMD loss", "parameters moved by"):
        assert shown in text, text
    titles = [o.data["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {})]
    assert [t for t in titles if "steps" in t] == [
        f"**student after one iteration, {n} steps (digits 0-9 top to bottom)**" for n in (1, 2, 4)]
    images = [Image.open(io.BytesIO(base64.b64decode(o.data["image/png"])))
              for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 4  # the real clips, then the student at 1, 2 and 4 steps
    for image in images[1:]:
        assert image.size[0] > image.size[1] / 10 * 7  # 10 digits down, 8 frames across
        assert len(set(image.convert("L").getdata())) > 10  # clips, not a blank
