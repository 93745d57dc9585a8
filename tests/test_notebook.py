"""notebooks/quickstart.ipynb: the same cells as its jupytext source, committed without outputs; its install cell's
decisions (keep a usable jax, add the accelerator extra otherwise, say when to restart, say what to do when pip
fails); and the notebook installing jaxunlearn from a built wheel in a fresh kernel of a fresh environment where jax
is already installed (Colab's situation), then running top to bottom on CPU (the small ``ci`` recipe)."""

import json
import os
import resource
import shutil
import sys
import time
import tomllib
from pathlib import Path

import jupytext
import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
from packaging.requirements import Requirement

from tests.test_packaging import _build_wheel, _fresh_venv

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


def _install_cell(workdir: str = "workdirs/quickstart") -> dict:
    """The names the notebook's install-helpers cell defines, executed here (it has no side effects)."""
    (source,) = [cell.source for cell in jupytext.read(SOURCE).cells if "def install_spec(" in cell.source]
    namespace = {"WORKDIR": workdir, "__name__": "quickstart_install"}
    exec(compile(source, "quickstart-install-cell", "exec"), namespace)
    return namespace


def test_the_install_cell_supports_the_jax_pyproject_requires():
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (jax,) = [Requirement(d) for d in dependencies if Requirement(d).name == "jax"]
    (bound,) = [s.version for s in jax.specifier if s.operator == ">="]
    assert _install_cell()["JAX_MIN"] == tuple(int(x) for x in bound.split("."))


# googlecolab/backend-info, pip-freeze.tpu.txt (the TPU runtime's packages, August 2026): jax 0.7.2 with libtpu.
COLAB_TPU = {"jax": "0.7.2", "jaxlib": "0.7.2", "libtpu": "0.0.21.1", "numpy": "2.1.3"}


@pytest.mark.parametrize(
    ("versions", "device", "usable"),
    [
        (COLAB_TPU, "tpu", False),  # Colab's TPU runtime: older than jaxunlearn supports (flax 0.12.8 needs 0.10)
        ({**COLAB_TPU, "jax": "0.10.2", "jaxlib": "0.10.2"}, "tpu", True),  # kept, no [tpu] extra
        ({"jax": "0.10.2", "jaxlib": "0.10.2"}, "tpu", False),  # no TPU backend (libtpu) installed
        ({}, "tpu", False),
        ({"jax": "0.10.2", "jaxlib": "0.10.2"}, "cpu", True),  # TPU-less: CPU jax suffices
        ({}, "cpu", False),
        ({"jax": "0.10.2", "jaxlib": "0.10.2", "jax-cuda13-plugin": "0.10.2"}, "gpu", True),
        ({"jax": "0.10.2", "jaxlib": "0.10.2"}, "gpu", False),
    ],
)
def test_the_install_cell_keeps_a_usable_jax(versions, device, usable):
    assert _install_cell()["jax_is_usable"](versions, device) is usable


def test_the_install_cell_asks_pip_for_the_source_with_the_extra(tmp_path):
    spec = _install_cell()["install_spec"]
    wheel = tmp_path / "jaxunlearn-0.1.0-py3-none-any.whl"
    cases = {
        ("jaxunlearn", None): ("jaxunlearn", set(), "", None),
        ("jaxunlearn", "tpu"): ("jaxunlearn", {"tpu"}, "", None),
        ("jaxunlearn==0.1.0", "tpu"): ("jaxunlearn", {"tpu"}, "==0.1.0", None),
        (str(wheel), "cuda"): ("jaxunlearn", {"cuda"}, "", f"file://{wheel}"),
        ("https://example.org/jaxunlearn-0.1.0.tar.gz", None): (
            "jaxunlearn", set(), "", "https://example.org/jaxunlearn-0.1.0.tar.gz"),
        ("git+https://github.com/o/jaxunlearn@v0.1", "tpu"): (
            "jaxunlearn", {"tpu"}, "", "git+https://github.com/o/jaxunlearn@v0.1"),
    }  # fmt: skip
    for (source, extra), (name, extras, specifier, url) in cases.items():
        requirement = Requirement(spec(source, extra))  # parsed as pip parses it
        assert (requirement.name, requirement.extras, str(requirement.specifier), requirement.url) == (
            name, extras, specifier, url), source  # fmt: skip


def test_the_install_cell_tells_the_accelerator_without_importing_jax(monkeypatch):
    cell = _install_cell()
    for var in ("TPU_ACCELERATOR_TYPE", "COLAB_TPU_ADDR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(shutil, "which", lambda _: None)
    monkeypatch.setattr(os.path, "exists", lambda path: False)
    assert cell["accelerator"]() == "cpu"
    monkeypatch.setattr(os.path, "exists", lambda path: path == "/dev/nvidia0")
    assert cell["accelerator"]() == "gpu"
    monkeypatch.setattr(os.path, "exists", lambda path: path == "/dev/accel0")  # a TPU VM's chips
    assert cell["accelerator"]() == "tpu"
    monkeypatch.setattr(os.path, "exists", lambda path: False)
    monkeypatch.setenv("TPU_ACCELERATOR_TYPE", "v5litepod-1")
    assert cell["accelerator"]() == "tpu"


def test_the_install_cell_says_to_restart_only_for_replaced_imported_packages():
    restart = _install_cell()["restart_needed"]
    before = {"numpy": "2.1.3", "jax": "0.7.2", "scipy": "1.16.3", "ipython": "8.0"}
    after = {"numpy": "2.4.6", "jax": "0.10.2", "scipy": "1.17.1", "ipython": "8.0", "jaxunlearn": "0.1.0"}
    modules = {"numpy": ["numpy"], "jax": ["jax"], "scipy": ["scipy"], "IPython": ["ipython"]}
    assert restart(before, after, {"numpy", "IPython", "os"}, modules) == ["numpy 2.1.3 -> 2.4.6"]
    assert restart(before, after, {"IPython", "os"}, modules) == []  # upgraded, but not loaded yet: no restart
    assert restart(before, before, set(modules), modules) == []


def test_a_failed_install_says_what_to_do_instead(tmp_path):
    cell = _install_cell()
    missing = tmp_path / "no" / "jaxunlearn-0.1.0-py3-none-any.whl"
    with pytest.raises(cell["InstallProblem"]) as problem:
        cell["install"](str(missing))
    text = str(problem.value)
    assert text.startswith("pip could not install jaxunlearn") and str(missing) in text
    assert 'INSTALL = "/content/jaxunlearn-0.1.0-py3-none-any.whl"' in text and "git+https://" in text
    assert problem.value._render_traceback_() == [text]  # IPython shows the message, not a traceback


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _text(cell) -> str:
    return "".join(out.get("text", "") for out in cell.outputs if out.output_type == "stream")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    return _build_wheel(tmp_path_factory.mktemp("notebook_wheel"))


def _client(nb, tmp_path: Path, monkeypatch, venv: Path) -> NotebookClient:
    """A client for ``nb`` in a kernel of ``venv``'s Python, offline, working in ``tmp_path``. The notebook's pip
    finds every dependency already installed (the venv sees this environment's packages, not the checkout)."""
    spec = tmp_path / "jupyter" / "kernels" / "fresh"
    spec.mkdir(parents=True)
    argv = [str(venv / "bin" / "python"), "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "fresh", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "jupyter-runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.delenv("PYTHONPATH", raising=False)
    return NotebookClient(nb, timeout=300, kernel_name="fresh", resources={"metadata": {"path": str(tmp_path)}})


def _with_install(nb, source: Path, upto: str | None = None):
    """``nb`` with ``INSTALL = source`` after its parameters cell (as papermill injects parameters), cut after the
    first cell containing ``upto``."""
    cells = list(nb.cells)
    if upto is not None:
        cells = cells[: next(i for i, c in enumerate(cells) if upto in c.source) + 1]
    at = next(i for i, c in enumerate(cells) if "parameters" in c.metadata.get("tags", [])) + 1
    cells.insert(at, nbformat.v4.new_code_cell(f"INSTALL = {str(source)!r}"))
    nb.cells = cells
    return nb


def _installed_here(venv: Path) -> list[str]:
    purelib = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    return sorted(p.name.split("-")[0] for p in purelib.glob("*.dist-info"))


def test_a_tpu_less_runtime_installs_the_wheel_and_keeps_its_jax(tmp_path, monkeypatch, wheel):
    """A fresh environment with CPU jax (no TPU, no GPU): the wheel is installed without an extra, nothing else."""
    venv = _fresh_venv(tmp_path)
    for var in ("TPU_ACCELERATOR_TYPE", "COLAB_TPU_ADDR"):
        monkeypatch.delenv(var, raising=False)
    nb = _with_install(nbformat.read(NOTEBOOK, as_version=4), wheel, upto="jax.default_backend()")
    _client(nb, tmp_path, monkeypatch, venv).execute()
    printed = "\n".join(_text(cell) for cell in nb.cells if cell.cell_type == "code")
    import jax

    assert f"installing jaxunlearn @ {wheel.as_uri()} on a CPU runtime, keeping jax {jax.__version__}" in printed
    assert "installed jaxunlearn 0.1.0" in printed and f"jax {jax.__version__}, backend cpu" in printed
    assert _installed_here(venv) == ["jaxunlearn"]  # jax and every dependency were already there
    # Run again (a second "Run all"): the package is found, nothing is installed.
    nb = _with_install(nbformat.read(NOTEBOOK, as_version=4), wheel, upto="jaxunlearn is already installed")
    _client(nb, tmp_path / "again", monkeypatch, venv).execute()
    assert "jaxunlearn is already installed: nothing to do" in "".join(
        _text(c) for c in nb.cells if c.cell_type == "code"
    )


def test_a_wrong_install_source_stops_the_notebook_with_what_to_do(tmp_path, monkeypatch):
    venv = _fresh_venv(tmp_path)
    nb = _with_install(nbformat.read(NOTEBOOK, as_version=4), tmp_path / "missing.whl", upto="jax.default_backend()")
    with pytest.raises(CellExecutionError) as stopped:
        _client(nb, tmp_path, monkeypatch, venv).execute()
    assert "pip could not install jaxunlearn @ file://" in str(stopped.value)
    assert not any("jax.default_backend()" in c.source and c.outputs for c in nb.cells)  # later cells did not run
    assert _installed_here(venv) == []


@pytest.mark.slow
def test_notebook_installs_from_the_wheel_and_runs_on_cpu(tmp_path, monkeypatch, wheel):
    """The whole notebook in a fresh kernel of a fresh environment, as on Colab's TPU runtime: jax with libtpu
    installed (this environment's, seen through the venv) and a TPU announced by ``TPU_ACCELERATOR_TYPE``; the
    install cell keeps that jax and installs the wheel. JAX itself runs on the CPU here (``JAX_PLATFORMS=cpu``),
    offline (conftest's HF variables are inherited), the small recipe, its world in a fresh cache. The kernel gets
    two CPU devices, as the main command gives a 2-core machine."""
    pytest.importorskip("libtpu", reason="Colab's TPU runtime has jax with libtpu")
    venv = _fresh_venv(tmp_path)
    monkeypatch.setenv("TPU_ACCELERATOR_TYPE", "v5litepod-1")
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    monkeypatch.setenv("JAXUNLEARN_NOTEBOOK", "ci")
    monkeypatch.setenv("JAXUNLEARN_CACHE", str(tmp_path / "cache"))
    nb = _with_install(nbformat.read(NOTEBOOK, as_version=4), wheel)
    client = _client(nb, tmp_path, monkeypatch, venv)
    start, cpu = time.perf_counter(), _children_cpu_seconds()
    client.execute()  # shuts the kernel down at the end: its CPU time is then the children's
    wall, cpu = time.perf_counter() - start, _children_cpu_seconds() - cpu
    print(f"notebooks/quickstart.ipynb executed (ci size) in {wall:.1f} s ({cpu:.1f} s of CPU in the kernel)")

    printed = "\n".join(_text(cell) for cell in nb.cells if cell.cell_type == "code")
    import jax

    assert f"installing jaxunlearn @ {wheel.as_uri()} on a TPU runtime, keeping jax {jax.__version__}" in printed
    assert "installed jaxunlearn 0.1.0" in printed and _installed_here(venv) == ["jaxunlearn"]
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
