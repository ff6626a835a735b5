"""course/lab.ipynb runs end to end: a --quick class lab (a smoke run), its tables, plots and
example answers, executed by a real Jupyter kernel (nbclient), as a student would run it."""
import os

import nbformat
from nbclient import NotebookClient

from conftest import REPO


def test_the_class_lab_notebook_runs_end_to_end(tmp_path, monkeypatch):
    notebook = nbformat.read(os.path.join(REPO, "course", "lab.ipynb"), as_version=4)
    monkeypatch.setenv("LAB_QUICK", "1")
    monkeypatch.setenv("LAB_OUT_DIR", str(tmp_path / "class"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    client = NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": os.path.join(REPO, "course")}})
    client.execute()
    outputs = {i: "".join(o.get("text", "") for o in cell.get("outputs", []))
               for i, cell in enumerate(notebook.cells) if cell.cell_type == "code"}
    text = "\n".join(outputs.values())
    assert (tmp_path / "class" / "results.json").is_file()
    assert "'config': 'class'" in text and "'quick': True" in text  # the settings it ran with
    for policy in ("base", "sft", "ppo", "ppo_ptx", "dpo"):  # a row per policy in the table
        assert f"\n{policy} " in text, policy
    assert "=== " in text and "  sft " in text  # example answers, side by side
    errors = [o for cell in notebook.cells for o in cell.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors


