"""Packaging: shipped configs by name, and the wheel installed outside the checkout (offline) runs every command."""

import json
import os
import shutil
import site
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from jaxunlearn.commands.cli import named_configs
from jaxunlearn.config.files import config_files
from tests.test_cli import run_cli_args
from tests.tiny_models import write_tiny_setup

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = ("jaxunlearn", "jaxunlearn-evaluate", "jaxunlearn-compare", "jaxunlearn-plan")


def test_config_names_resolve_to_the_shipped_files(capsys, monkeypatch):
    from ml_collections.config_flags.config_flags import ConfigFileFlagParser

    shipped = config_files()
    assert set(shipped) == {p.stem for p in (REPO / "configs").glob("*.py")} - {"__init__"}
    ga, ga_kl = str(shipped["ga"]), str(shipped["ga_kl"])
    argv = ["prog", "--config=ga_kl:arxiv", "--config.seed=3", "--workdir=x"]
    assert named_configs(argv) == ["prog", f"--config={ga_kl}:arxiv", "--config.seed=3", "--workdir=x"]
    assert named_configs(["prog", "--config", "ga"]) == ["prog", "--config", ga]
    assert named_configs(["prog", "--", "--config=nope"]) == ["prog", "--", "--config=nope"]  # not a flag
    monkeypatch.chdir(REPO)  # existing file paths stay as they are; a missing one is one line, before absl parses
    for path in ("configs/ga.py", "configs/ga.py:arxiv", f"{ga}:github"):
        assert named_configs(["prog", f"--config={path}"]) == ["prog", f"--config={path}"]
    for path in ("configs/nope.py", "configs/nope.py:arxiv"):
        with pytest.raises(SystemExit) as missing:
            named_configs(["prog", f"--config={path}"])
        assert missing.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"jaxunlearn: error: --config={path}: cannot load it") and "\n" not in err
    config = ConfigFileFlagParser("config").parse(named_configs(["p", "--config=ga_kl:arxiv"])[1].split("=", 1)[1])
    assert config.method.name == "ga_kl" and config.data.forget.name == "arxiv"
    assert ConfigFileFlagParser("config").parse(shipped["ga"].as_posix()).model.path.startswith("world:")

    with pytest.raises(SystemExit) as exit_info:
        named_configs(["prog", "--config=gaa:arxiv"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "jaxunlearn: error: --config=gaa:arxiv: no such file, and no shipped config of that name "
        f"(shipped: {', '.join(shipped)})"
    )


def _build_wheel(tmp: Path) -> Path:
    """``python -m build`` of a copy of the checkout's sources, offline with this environment's setuptools: the
    sdist first, then the wheel from the sdist (so the sdist is complete). Returns the wheel, the sdist beside it."""
    import setuptools

    assert int(setuptools.__version__.split(".")[0]) >= 77, "pip install -r requirements-test.txt (setuptools>=77)"
    src = tmp / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("jaxunlearn", "configs"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, src / name)
    build = [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(tmp / "dist"), str(src)]
    done = subprocess.run(build, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (wheel,) = (tmp / "dist").glob("jaxunlearn-*.whl")
    return wheel


def test_the_sdist_and_the_wheel_carry_the_version_and_the_readme(tmp_path):
    import jaxunlearn

    wheel = _build_wheel(tmp_path)
    version = jaxunlearn.__version__
    assert wheel.name == f"jaxunlearn-{version}-py3-none-any.whl"
    sdist = wheel.with_name(f"jaxunlearn-{version}.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
        pkg_info = tar.extractfile(f"jaxunlearn-{version}/PKG-INFO").read().decode()
    assert {"PKG-INFO", "pyproject.toml", "README.md", "LICENSE", "configs/ga_kl.py"} <= names
    assert "jaxunlearn/models/shapes/yi-6b/config.json" in names and "jaxunlearn/data/assets/python_2026.jsonl" in names
    with zipfile.ZipFile(wheel) as z:
        metadata = z.read(f"jaxunlearn-{version}.dist-info/METADATA").decode()
    for text in (metadata, pkg_info):
        headers, _, description = text.partition("\n\n")
        assert f"\nVersion: {version}\n" in headers and "\nRequires-Python: >=3.11\n" in headers
        assert "\nDescription-Content-Type: text/markdown\n" in headers
        assert description.strip() == (REPO / "README.md").read_text().strip()  # the long description is the README


def _check_wheel_contents(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "jaxunlearn").rglob("*.py")}
    modules |= {f"jaxunlearn/configs/{p.name}" for p in (REPO / "configs").glob("*.py")}
    missing = sorted(m for m in modules if m not in names and "__pycache__" not in m)
    assert not missing, f"not in the wheel (add the package to [tool.setuptools] packages in pyproject.toml): {missing}"
    assert {
        f"jaxunlearn/models/shapes/{p.parent.name}/config.json" for p in (REPO / "jaxunlearn/models/shapes").glob("*/*")
    } <= names
    dist_info = "jaxunlearn-0.1.0.dist-info"
    assert f"{dist_info}/licenses/LICENSE" in names
    with zipfile.ZipFile(wheel) as z:
        metadata = z.read(f"{dist_info}/METADATA").decode()
        entry_points = z.read(f"{dist_info}/entry_points.txt").decode()
    assert "License-Expression: Apache-2.0" in metadata
    assert 'Requires-Dist: jax[tpu]==0.10.2; extra == "tpu"' in metadata
    assert all(f"{script} = " in entry_points for script in SCRIPTS)


def _fresh_venv(tmp: Path, wheel: Path | None = None) -> Path:
    """A new virtual environment with only the wheel installed (none: nothing); its dependencies resolve to this
    environment's site-packages through a ``.pth`` file (whose own ``.pth`` files, the checkout's editable install
    among them, are not processed). Offline: ``--no-index``."""
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    purelib = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    (purelib / "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    if wheel is not None:
        install = ["-m", "pip", "install", "-q", "--no-deps", "--no-index", "--no-compile", "--ignore-installed"]
        subprocess.run([venv / "bin" / "python", *install, str(wheel)], check=True, capture_output=True, timeout=120)
    return venv


@pytest.mark.slow
def test_wheel_installs_offline_and_runs_outside_the_checkout(tmp_path):
    wheel = _build_wheel(tmp_path)
    _check_wheel_contents(wheel)
    venv = _fresh_venv(tmp_path, wheel)
    bin_dir = venv / "bin"
    work = tmp_path / "elsewhere"  # no configs/ here, and not the checkout
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"XLA_FLAGS": ""}  # one CPU device

    def run(*args, timeout=120):
        return subprocess.run(args, capture_output=True, text=True, env=env, cwd=work, timeout=timeout)

    where = run(
        bin_dir / "python", "-c", "import jaxunlearn.config.files as c; print(c.__file__, c.config_files()['ga'])"
    )
    assert where.returncode == 0, where.stderr[-2000:]
    assert all(Path(p).is_relative_to(venv) for p in where.stdout.split()), where.stdout  # not the checkout

    for script in SCRIPTS:
        shown = run(bin_dir / script, "--help")
        assert shown.returncode == 1 and "shipped config's name" in shown.stdout, (script, shown.stdout)
        # The usage line shows what works after pip install: a config's name, not a checkout's path.
        usage = shown.stdout.split("flags:")[0]
        assert f"{script} --config=ga" in usage and "configs/" not in usage, (script, usage)
        unknown = run(bin_dir / script, "--config=nope")
        assert (
            unknown.returncode == 2
            and "no shipped config of that name (shipped: adversarial, ce_u, ga," in unknown.stderr
        )

    methods = run(bin_dir / "jaxunlearn-compare", "--config=ga_kl", "--methods=ga,nope")
    assert methods.returncode == 2, methods.stderr
    listed = methods.stderr.strip().split("choose from the configs ")[1].split(", ")
    assert listed == sorted(config_files()), methods.stderr

    setup = {**write_tiny_setup(tmp_path / "tiny"), "cache": tmp_path / "cache"}
    args = run_cli_args(setup, "ga", work / "run", "--config.train.max_steps=1")[3:]  # python -m jaxunlearn.main
    result = run(bin_dir / "jaxunlearn", "--config=ga", *[a for a in args if not a.startswith("--config=")])
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((work / "run" / "run.json").read_text())
    assert record["status"] == "completed" and record["steps"] == 1 and record["method"] == "ga"
