"""The TPU pod launcher (launch/tpu_pod.py) against a fake ``gcloud`` that simulates a two-worker slice here.

The fake records every call; ``scp --worker=all`` copies into two fake worker home directories and
``ssh --worker=all --command=CMD`` runs CMD in both, at the same time, as the worker's shell would (HOME set,
output captured until every process holding it is gone, as an ssh session waits). The Slurm variables it adds
let ``jax.distributed.initialize()`` find a coordinator here, so the launched command is a real two-process
multi-controller run of the main command, started from the shipped archive, detached from the "ssh".
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_cli import REPO, run_cli_args
from tests.test_multiprocess import _slurm_envs
from tests.tiny_models import write_tiny_setup

FAKE_GCLOUD = r"""#!{python}
import json, os, shutil, subprocess, sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

state = Path(os.environ["FAKE_GCLOUD_DIR"])
argv = sys.argv[1:]
with open(state / "calls.jsonl", "a") as f:
    f.write(json.dumps(argv) + "\n")
opts = dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)
pos = [a for a in argv if not a.startswith("--")]
tpus_file = state / "tpus.json"
tpus = json.loads(tpus_file.read_text()) if tpus_file.exists() else {{}}
workers = range(2) if opts.get("worker", "all") == "all" else [int(opts["worker"])]


def home(i):
    return state / "homes" / f"worker-{{i}}"


def shell(i):
    env = {{k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}}
    env.update(json.loads((state / "worker_env.json").read_text()))
    env.update(HOME=str(home(i)), JAXUNLEARN_WORKER_ID=str(i), SLURM_PROCID=str(i), SLURM_LOCALID=str(i))
    home(i).mkdir(parents=True, exist_ok=True)
    return subprocess.run(["bash", "-c", opts["command"]], cwd=home(i), env=env, capture_output=True, text=True,
                          timeout=120)


verb = pos[2:4]
if verb == ["tpu-vm", "describe"]:
    if pos[4] not in tpus:
        print("ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: Resource was not found", file=sys.stderr)
        sys.exit(1)
    print("READY\t" + tpus[pos[4]])
elif verb == ["tpu-vm", "create"]:
    tpus_file.write_text(json.dumps({{**tpus, pos[4]: opts["accelerator-type"]}}))
elif verb == ["tpu-vm", "scp"]:
    *sources, dest = pos[4:]
    for i in workers:
        target = home(i) / dest.split(":", 1)[1]
        if not target.is_dir():
            print(f"scp: {{target}}: No such file or directory", file=sys.stderr)
            sys.exit(1)
        for source in sources:
            shutil.copy(source, target)
elif verb == ["tpu-vm", "ssh"]:
    with ThreadPoolExecutor() as pool:
        results = list(pool.map(shell, workers))
    for i, result in zip(workers, results):
        for line in (result.stdout + result.stderr).splitlines():
            print(f"worker-{{i}}: {{line}}")
    sys.exit(max(result.returncode for result in results))
"""


class Fake:
    """The fake gcloud's state directory ``dir`` and the launcher run with the fake on PATH."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.env = {**os.environ, "PATH": f"{directory / 'bin'}{os.pathsep}{os.environ['PATH']}"}
        self.env["FAKE_GCLOUD_DIR"] = str(directory)

    def run(self, *args: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, str(REPO / "launch" / "tpu_pod.py"), *args]
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, cwd=REPO, timeout=180)

    def calls(self) -> list[list[str]]:
        path = self.dir / "calls.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def run_dirs(self, run: str) -> list[Path]:
        return [self.dir / "homes" / f"worker-{i}" / "jaxunlearn" / run for i in range(2)]


@pytest.fixture
def fake(tmp_path):
    directory = tmp_path / "gcloud"
    (directory / "bin").mkdir(parents=True)
    gcloud = directory / "bin" / "gcloud"
    gcloud.write_text(FAKE_GCLOUD.format(python=sys.executable))
    gcloud.chmod(0o755)
    # One Slurm job with its coordinator here (the fake sets each worker's SLURM_PROCID), one CPU device each.
    slurm = {k: v for k, v in _slurm_envs()[0].items() if k.startswith("SLURM_")}
    (directory / "worker_env.json").write_text(json.dumps({**slurm, "JAX_PLATFORMS": "cpu"}))
    yield Fake(directory)
    for pid_file in directory.glob("homes/*/jaxunlearn/*/worker-*.pid"):  # a failed test leaves nothing running
        if not pid_file.with_suffix(".exit").exists():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.killpg(int(pid_file.read_text()), signal.SIGKILL)


def wait_for(paths: list[Path], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not all(p.exists() and p.read_text().strip() for p in paths):
        assert time.monotonic() < deadline, f"timed out waiting for {paths}"
        time.sleep(0.5)


@pytest.mark.slow
def test_launch_runs_the_main_command_on_every_worker(tmp_path, fake):
    setup = {**write_tiny_setup(tmp_path), "cache": tmp_path / "cache"}
    workdir = tmp_path / "run"
    flags = run_cli_args(setup, "ga", workdir, "--config.train.max_steps=2")[4:]  # after python -m main --config
    where = ["tpu-test", "--zone=zone-a"]
    launched = fake.run("launch", *where, "--accelerator-type=v5e-16", f"--python={sys.executable}",
                        "--run-name=r1", "--", "--config=configs/ga.py", *flags)  # fmt: skip
    assert launched.returncode == 0, launched.stdout + launched.stderr
    assert "tpu_pod.py stop tpu-test --zone=zone-a --run-name=r1" in launched.stdout

    runs = fake.run_dirs("r1")
    wait_for([run / f"worker-{i}.exit" for i, run in enumerate(runs)], timeout=240)
    logs = [(run / "logs" / f"worker-{i}.log").read_text() for i, run in enumerate(runs)]
    exits = [(run / f"worker-{i}.exit").read_text().strip() for i, run in enumerate(runs)]
    assert exits == ["0", "0"], logs[0][-3000:] + logs[1][-3000:]
    record = json.loads((workdir / "run.json").read_text())
    assert record["status"] == "completed" and record["steps"] == 2
    assert record["environment"]["process_count"] == 2
    for run, log in zip(runs, logs):
        # The code ran from the unpacked archive on the worker's own disk, not from this checkout.
        assert f"jaxunlearn from {run / 'code' / 'jaxunlearn' / '__init__.py'}" in log
        assert "-m jaxunlearn.main --config=configs/ga.py --config.distributed=True" in log
        assert "started: pid" in log and "step 2/2" in log, log[-3000:]
    assert (runs[0] / "code" / "LAUNCHED_FROM.json").exists()

    seen = fake.calls()
    assert [c[3] for c in seen] == ["describe", "create", "ssh", "scp", "ssh"]
    assert "--accelerator-type=v5litepod-16" in seen[1] and "--version=v2-alpha-tpuv5-lite" in seen[1]
    assert all("--worker=all" in c and "--zone=zone-a" in c for c in seen[2:])
    assert seen[3][4:6] == [str(Path(seen[3][4]).parent / "code.tar.gz"), str(Path(seen[3][4]).parent / "worker.sh")]

    status = fake.run("status", *where)  # the latest run
    assert status.returncode == 0, status.stderr
    assert "worker-0: worker 0: finished, exit status 0" in status.stdout
    assert "worker-1: worker 1: finished, exit status 0" in status.stdout
    # The slice exists now: a launch for another type is refused before anything is copied.
    relaunch = fake.run("launch", *where, "--accelerator-type=v4-8", "--run-name=r2", "--", "--config=configs/ga.py")
    assert relaunch.returncode == 2 and "tpu-test exists as a v5litepod-16, not a v4-8" in relaunch.stderr
    assert [c[3] for c in fake.calls()[len(seen) :]] == ["ssh", "describe"]  # status, then the refused launch


STUB_PYTHON = """#!/bin/bash
if [ "$1" = -m ]; then
  echo "stub running $*"
  trap 'echo "stub stopping"; exit 130' TERM
  while :; do sleep 0.1; done
fi
exec {python} "$@"
"""


def test_stop_and_status_of_a_detached_run(tmp_path, fake):
    stub = tmp_path / "python"
    stub.write_text(STUB_PYTHON.format(python=sys.executable))
    stub.chmod(0o755)
    (fake.dir / "tpus.json").write_text(json.dumps({"tpu-test": "v5litepod-16"}))
    where = ["tpu-test", "--zone=zone-a"]
    args = ["launch", *where, f"--python={stub}", "--run-name=s1", "--env=EXTRA=1", "--", "--config=configs/ga.py"]
    launched = fake.run(*args)
    assert launched.returncode == 0, launched.stdout + launched.stderr
    assert [c[3] for c in fake.calls()] == ["describe", "ssh", "scp", "ssh"]  # reused, not created

    status = fake.run("status", *where, "--run-name=s1")
    assert "worker-0: worker 0: running (pid" in status.stdout and "worker-1: worker 1: running" in status.stdout
    again = fake.run(*args)
    assert again.returncode == 2 and "already running here" in again.stdout

    stopped = fake.run("stop", *where, "--run-name=s1")
    assert stopped.returncode == 0 and "worker 1: sent SIGTERM to process group" in stopped.stdout
    runs = fake.run_dirs("s1")
    wait_for([run / f"worker-{i}.exit" for i, run in enumerate(runs)], timeout=30)
    assert [(run / f"worker-{i}.exit").read_text().strip() for i, run in enumerate(runs)] == ["130", "130"]
    log = (runs[1] / "logs" / "worker-1.log").read_text()
    assert "stub running -m jaxunlearn.main --config=configs/ga.py --config.distributed=True" in log
    assert "stub stopping" in log
    final = fake.run("status", *where).stdout
    assert "worker 0: finished, exit status 130" in final, final


def test_dry_run_prints_every_command_and_runs_none(fake):
    slice_options = ["--zone=zone-b", "--project=proj", "--accelerator-type=v5e-16", "--slices=2", "--spot"]
    flags = ["--config=configs/ga.py", "--model=m"]
    result = fake.run("launch", "pod", *slice_options, "--dry-run", "--module=evaluate", "--", *flags)
    assert result.returncode == 0, result.stderr
    assert fake.calls() == [] and not (fake.dir / "homes").exists()
    out = result.stdout
    assert (
        "+ gcloud compute tpus queued-resources create pod --accelerator-type=v5litepod-16 "
        "--runtime-version=v2-alpha-tpuv5-lite --node-count=2 --node-prefix=pod --spot --zone=zone-b --project=proj"
    ) in out
    assert "queued-resources describe pod '--format=value(state.state)'" in out
    for node in ("pod-0", "pod-1"):
        assert "+ gcloud compute tpus tpu-vm scp " in out and f" {node}:jaxunlearn/" in out
        assert f"+ gcloud compute tpus tpu-vm ssh {node} --worker=all '--command=bash ~/jaxunlearn/" in out
    assert (
        "start --module=jaxunlearn.commands.evaluate --python-version=3.11 -- --config=configs/ga.py "
        "--config.distributed=True --config.mesh.dcn_data=2 --model=m'"
    ) in out
    stop = fake.run("stop", "pod", "--zone=zone-b", "--slices=2", "--dry-run", "--kill")
    assert (
        "tpu-vm ssh pod-1 --worker=all '--command=bash ~/jaxunlearn/latest/worker.sh stop --signal=KILL'" in stop.stdout
    )
    delete = fake.run("delete", "pod", "--zone=zone-b", "--slices=2", "--dry-run")
    assert "+ gcloud compute tpus queued-resources delete pod --force --quiet --zone=zone-b" in delete.stdout
    assert fake.calls() == []
