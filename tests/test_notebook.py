"""notebooks/quickstart.ipynb runs top to bottom, as committed, and shows what it says it shows."""

import os
import re
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
SHARED = Path(os.environ.get("KERAS_FG_SHARED", ROOT.parent / "shared"))  # As in conftest.py.
QUICKSTART = NOTEBOOKS / "quickstart.ipynb"


def text_of(cell):
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


def images_of(cell):
    return sum("image/png" in o.get("data", {}) for o in cell.outputs)


def test_quickstart_is_committed_without_outputs():
    notebook = nbformat.read(QUICKSTART, as_version=4)
    nbformat.validate(notebook)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]


def test_quickstart_runs_and_shows_attention_and_a_tflite_prediction(monkeypatch):
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "3")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("KERAS_FG_SHARED", str(SHARED))
    notebook = nbformat.read(QUICKSTART, as_version=4)
    # The kernel must run this interpreter (and so this venv's keras_fg), not another one.
    notebook.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.prefix)"))
    # Raises CellExecutionError, with the failing cell's traceback, on any error.
    NotebookClient(
        notebook,
        kernel_name="python3",
        timeout=600,
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    ).execute()
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert text_of(code[-1]).strip() == sys.prefix
    code = code[:-1]
    assert not [o for cell in code for o in cell.outputs if o.output_type == "error"]

    output = "\n".join(text_of(cell) for cell in code)
    # The attention report is printed beside its chance level.
    hits = re.search(
        r"peak in the dilated part box ([\d.]+)%, mass there ([\d.]+)% \(chance ([\d.]+)%\)", output
    )
    assert hits and all(0.0 <= float(v) <= 100.0 for v in hits.groups()), output[-3000:]

    overlay_cell = next(c for c in code if "viz.attention_grid(" in c.source)
    assert images_of(overlay_cell) == 1
    assert sum(map(images_of, code)) >= 2  # The data examples, then the overlays.

    birds = (SHARED / "data/cub200_subset/CUB_200_2011").is_dir() and (
        SHARED / "weights/mobilenet_v2_1.0.weights.h5"
    ).is_file()
    if birds:
        for family in ("MA-CNN", "DASRBN"):
            accuracy = re.search(rf"{family} test accuracy: ([\d.]+)%", output)
            # Chance: 20 % (5 species).
            assert accuracy and float(accuracy.group(1)) > 50.0, output[-3000:]
        assert sum(map(images_of, code)) == 4
    else:
        assert "Skipping the real-bird part: not found:" in output

    tflite = text_of(next(c for c in code if "Interpreter(" in c.source))
    names = re.findall(
        r"^(?:LiteRT|Keras) prediction: (\d+_[a-z]+_(?:front|rear)_(?:upper|lower))\b",
        tflite,
        re.MULTILINE,
    )
    assert len(names) == 2 and names[0] == names[1], tflite
    difference = float(re.search(r"max \|Keras - LiteRT\| probability: (\S+)", tflite).group(1))
    assert difference < 1e-4
