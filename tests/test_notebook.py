"""notebooks/quickstart.ipynb: the same cells as its jupytext source, committed without outputs, and executed
top to bottom on CPU (the small ``ci`` recipe) in a real Jupyter kernel, with real results."""

import json
import resource
import time
from pathlib import Path

import jupytext
import nbformat
import pytest
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"
SOURCE = REPO / "notebooks" / "quickstart.py"
REGENERATE = "regenerate one from the other: jupytext --sync notebooks/quickstart.py"


def _cells(path: Path) -> list[tuple[str, str]]:
    return [(cell.cell_type, cell.source) for cell in jupytext.read(path).cells]


def test_notebook_and_its_source_are_in_sync():
    notebook, source = _cells(NOTEBOOK), _cells(SOURCE)
    assert len(notebook) == len(source), f"{len(notebook)} cells in the .ipynb, {len(source)} in the .py: {REGENERATE}"
    for i, (cell, twin) in enumerate(zip(notebook, source)):
        assert cell == twin, f"cell {i} differs between quickstart.ipynb and quickstart.py: {REGENERATE}"


def test_notebook_is_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code and not any(cell.outputs or cell.execution_count for cell in code), (
        "clear the outputs: jupyter nbconvert --clear-output --inplace notebooks/quickstart.ipynb"
    )


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _text(cell) -> str:
    return "".join(out.get("text", "") for out in cell.outputs if out.output_type == "stream")


@pytest.mark.slow
def test_notebook_runs_on_cpu(tmp_path, monkeypatch):
    """The whole notebook in a python3 kernel of this interpreter, offline (conftest's HF variables are inherited),
    the small recipe, its world in a fresh cache. The kernel gets two CPU devices, as the main command gives a
    2-core machine: faster than one, and the real model's steps take 0.6x the time they take on conftest's 8."""
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    monkeypatch.setenv("JAXUNLEARN_NOTEBOOK", "ci")
    monkeypatch.setenv("JAXUNLEARN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "jupyter"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    start, cpu = time.perf_counter(), _children_cpu_seconds()
    client.execute()  # shuts the kernel down at the end: its CPU time is then the children's
    wall, cpu = time.perf_counter() - start, _children_cpu_seconds() - cpu
    print(f"notebooks/quickstart.ipynb executed (ci size) in {wall:.1f} s ({cpu:.1f} s of CPU in the kernel)")

    printed = "\n".join(_text(cell) for cell in nb.cells if cell.cell_type == "code")
    assert "jaxunlearn is already installed" in printed  # the install cell did no work
    assert "backend cpu, 2 device(s)" in printed
    assert "status completed after 4 steps" in printed

    run = tmp_path / "workdirs" / "quickstart"
    report = json.loads((run / "report.json").read_text())
    assert set(report["models"]) == {"original", "unlearned", "oracle"}
    forget = {name: model["perplexity"]["forget"]["ppl"] for name, model in report["models"].items()}
    assert forget["unlearned"] > forget["original"], forget
    assert (run / "report.md").read_text().startswith("# jaxunlearn report: ga_kl on world:target")
    assert (run / "hf_model" / "model.safetensors").exists()
    plots = [Path(p) for p in report["plots"]]
    assert {p.name for p in plots} == {"perplexity_history.png", "roc.png"} and all(p.exists() for p in plots)

    # The report cell shows the summary and report.md; the plots cell shows every PNG the run wrote.
    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    assert any("## Distance to the oracle" in out.get("data", {}).get("text/markdown", "") for out in outputs)
    assert sum("image/png" in out.get("data", {}) for out in outputs) == len(plots)
    assert "forget ppl" in printed and "min_k_0.4 AUC" in printed

    # The evaluation of the exported model alone gives the run's own numbers for the unlearned model.
    evaluation = json.loads((tmp_path / "workdirs" / "quickstart-eval" / "report.json").read_text())
    alone = evaluation["models"]["model"]["perplexity"]["forget"]["ppl"]
    assert abs(alone - forget["unlearned"]) <= 1e-4 * forget["unlearned"], (alone, forget["unlearned"])

    # The real model (SmolLM2-135M-Instruct, the smollm2 preset, two steps) forgets a little and is shown doing so.
    real = json.loads((tmp_path / "workdirs" / "quickstart-smollm2" / "report.json").read_text())["models"]
    assert real["unlearned"]["perplexity"]["forget"]["nll"] > real["original"]["perplexity"]["forget"]["nll"]
    assert "--- original ---" in printed and "--- unlearned ---" in printed and "--- the module goes on ---" in printed
