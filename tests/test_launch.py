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
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from safetensors.numpy import load_file

from tests.test_cli import REPO, run_cli_args
from tests.test_multiprocess import _slurm_envs
from tests.tiny_models import write_tiny_setup

FAKE_GCLOUD = r"""#!{python}
import json, os, shutil, signal, subprocess, sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

state = Path(os.environ["FAKE_GCLOUD_DIR"])
argv = sys.argv[1:]
with open(state / "calls.jsonl", "a") as f:
    f.write(json.dumps(argv) + "\n")
opts = dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)
pos = [a for a in argv if not a.startswith("--")]
pos = pos[1:] if pos[0] == "alpha" else pos
tpus_file, queued_file = state / "tpus.json", state / "queued.json"
# tpus.json: {{name: {{"type": ..., "state": READY | PREEMPTED | ...}}}} (or {{name: type}}: READY)
tpus = {{k: v if isinstance(v, dict) else {{"type": v, "state": "READY"}}
        for k, v in (json.loads(tpus_file.read_text()) if tpus_file.exists() else {{}}).items()}}
qrs = json.loads(queued_file.read_text()) if queued_file.exists() else {{}}
count = int(os.environ.get("FAKE_GCLOUD_WORKERS", "2"))
workers = range(count) if opts.get("worker", "all") == "all" else [int(opts["worker"])]


def home(i):
    return state / "homes" / f"worker-{{i}}"


def shell(i):
    env = {{k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}}
    env.update(json.loads((state / "worker_env.json").read_text()))
    env.update(HOME=str(home(i)), JAXUNLEARN_WORKER_ID=str(i), SLURM_PROCID=str(i), SLURM_LOCALID=str(i))
    home(i).mkdir(parents=True, exist_ok=True)
    return subprocess.run(["bash", "-c", opts["command"]], cwd=home(i), env=env, capture_output=True, text=True,
                          timeout=120)


def save():
    tpus_file.write_text(json.dumps(tpus))
    queued_file.write_text(json.dumps(qrs))


def wipe_disks():
    # A deleted slice: its processes end, its disks go (a recreated slice has fresh ones).
    for pid_file in state.glob("homes/*/jaxunlearn/*/worker-*.pid"):
        try:
            os.killpg(int(pid_file.read_text()), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    shutil.rmtree(state / "homes", ignore_errors=True)


def values(*fields):
    print("\t".join(fields[: opts.get("format", "value(x)").count(",") + 1]))


def not_found():
    print("ERROR: (gcloud.compute.tpus) NOT_FOUND: Resource was not found", file=sys.stderr)
    sys.exit(1)


verb = pos[2:4]
if verb[1] in ("ssh", "scp"):
    failures = state / "remote_failures"
    failed = int(failures.read_text()) if failures.exists() else 0
    if failed < int(os.environ.get("FAKE_GCLOUD_FAIL_REMOTE", "0")):
        failures.write_text(str(failed + 1))
        print("ssh: connect to host 10.0.0.2 port 22: Connection refused", file=sys.stderr)
        sys.exit(255)
    node = pos[4] if verb[1] == "ssh" else pos[-1].split(":")[0]
    if tpus.get(node, {{}}).get("state") != "READY":
        print(f"ssh: connect to host of {{node}} port 22: Connection timed out", file=sys.stderr)
        sys.exit(255)
if verb == ["tpu-vm", "describe"]:
    if pos[4] not in tpus:
        not_found()
    values(tpus[pos[4]]["state"], tpus[pos[4]]["type"])
elif verb == ["tpu-vm", "create"]:
    tpus[pos[4]] = {{"type": opts["accelerator-type"], "state": "READY"}}
    save()
elif verb == ["tpu-vm", "delete"]:
    tpus.pop(pos[4], None) if pos[4] in tpus else not_found()
    wipe_disks()
    save()
elif verb == ["queued-resources", "describe"]:
    if pos[4] not in qrs:
        not_found()
    values(qrs[pos[4]]["state"], qrs[pos[4]]["type"])
elif verb == ["queued-resources", "create"]:
    nodes = [opts["node-id"]] if "node-id" in opts else [f"{{opts['node-prefix']}}-{{i}}" for i in range(int(opts["node-count"]))]
    qrs[pos[4]] = {{"type": opts["accelerator-type"], "state": "ACTIVE", "nodes": nodes}}
    tpus.update({{n: {{"type": opts["accelerator-type"], "state": "READY"}} for n in nodes}})
    save()
elif verb == ["queued-resources", "delete"]:
    for n in qrs.pop(pos[4])["nodes"] if pos[4] in qrs else not_found():
        tpus.pop(n, None)
    wipe_disks()
    save()
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
else:
    print(f"fake gcloud: unsupported {{argv}}", file=sys.stderr)
    sys.exit(3)
"""


class Fake:
    """The fake gcloud's state directory ``dir`` and the launcher run with the fake on PATH."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.env = {**os.environ, "PATH": f"{directory / 'bin'}{os.pathsep}{os.environ['PATH']}"}
        self.env["FAKE_GCLOUD_DIR"] = str(directory)

    def command(self, *args: str) -> list[str]:
        return [sys.executable, str(REPO / "launch" / "tpu_pod.py"), *args]

    def run(self, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
        env = {**self.env, **(env or {})}
        return subprocess.run(self.command(*args), env=env, capture_output=True, text=True, cwd=REPO, timeout=180)

    def calls(self) -> list[list[str]]:
        path = self.dir / "calls.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def run_dirs(self, run: str, workers: int = 2) -> list[Path]:
        return [self.dir / "homes" / f"worker-{i}" / "jaxunlearn" / run for i in range(workers)]

    def write(self, name: str, data) -> None:
        (self.dir / name).write_text(json.dumps(data))


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
    kill_workers(directory)  # a failed test leaves nothing running


def kill_workers(directory: Path) -> None:
    for pid_file in directory.glob("homes/*/jaxunlearn/*/worker-*.pid"):
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


NETWORK_OPTIONS = [
    "--spot",
    "--reserved",
    "--internal-ips",
    "--network=vpc-1",
    "--subnetwork=sub-1",
    "--service-account=tpu@proj.iam.gserviceaccount.com",
    "--scopes=cloud-platform",
    "--data-disk=source=projects/proj/zones/us-east5-a/disks/data,mode=read-only",
    "--boot-disk=kms-key=projects/proj/locations/us-east5/keyRings/r/cryptoKeys/k",
]
# gcloud's spelling of them (`gcloud compute tpus tpu-vm create --help`, `... queued-resources create --help`),
# in the launcher's order: --spot --reserved --internal-ips, the valued ones, then the disks.
CREATE_FLAGS = (
    "--spot --reserved --internal-ips --network=vpc-1 --subnetwork=sub-1 "
    "--service-account=tpu@proj.iam.gserviceaccount.com --scopes=cloud-platform "
    "--boot-disk=kms-key=projects/proj/locations/us-east5/keyRings/r/cryptoKeys/k "
    "--data-disk=source=projects/proj/zones/us-east5-a/disks/data,mode=read-only"
)


def test_dry_run_passes_network_options_to_gcloud(fake):
    where = ["tpu-a", "--zone=us-east5-a", "--project=proj"]
    mirror = "--index-url=https://mirror.internal/simple"
    launch = ["launch", *where, "--accelerator-type=v6e-16", *NETWORK_OPTIONS, mirror, "--run-name=r1", "--dry-run"]
    flags = ["--", "--config=configs/ga.py", "--workdir=gs://b/r1"]
    result = fake.run(*launch, "--ssh-via=internal-ip", "--watch", *flags)
    assert result.returncode == 0, result.stderr
    lines = [re.sub(r"/\S*/jaxunlearn-launch-\w+/", "/STAGE/", line) for line in result.stdout.splitlines()]
    commands = [line for line in lines if line.startswith("+ ")]
    z = "--zone=us-east5-a --project=proj"
    start = (
        "'--command=bash ~/jaxunlearn/r1/worker.sh start --module=jaxunlearn.main --python-version=3.11 "
        "--env=PIP_INDEX_URL=https://mirror.internal/simple --env=UV_DEFAULT_INDEX=https://mirror.internal/simple "
        "-- --config=configs/ga.py --config.distributed=True --workdir=gs://b/r1'"
    )
    assert commands == [
        f"+ gcloud compute tpus tpu-vm describe tpu-a '--format=value(state,acceleratorType)' {z}",
        f"+ gcloud compute tpus tpu-vm create tpu-a --accelerator-type=v6e-16 --version=v2-alpha-tpuv6e {CREATE_FLAGS} {z}",
        f"+ gcloud compute tpus tpu-vm ssh tpu-a --worker=all '--command=mkdir -p ~/jaxunlearn/r1' --internal-ip {z}",
        "+ gcloud compute tpus tpu-vm scp /STAGE/code.tar.gz /STAGE/worker.sh tpu-a:jaxunlearn/r1/ --worker=all "
        f"--internal-ip {z}",
        f"+ gcloud compute tpus tpu-vm ssh tpu-a --worker=all {start} --internal-ip {z}",
    ]  # fmt: skip
    assert "watch: run r1 on tpu-a, every 30 s, at most 3 restarts (Ctrl-C stops watching, not the run)" in lines
    assert "status tpu-a --zone=us-east5-a --project=proj --ssh-via=internal-ip --run-name=r1" in result.stdout

    # A queued resource takes the same options; IAP goes through gcloud's alpha track.
    queued = fake.run(*launch, "--queued", "--ssh-via=iap", *flags).stdout
    assert (
        "+ gcloud compute tpus queued-resources create tpu-a --accelerator-type=v6e-16 --runtime-version=v2-alpha-tpuv6e "
        f"--node-id=tpu-a {CREATE_FLAGS} {z}\n"
    ) in queued
    assert f"+ gcloud alpha compute tpus tpu-vm ssh tpu-a --worker=all '--command=mkdir -p ~/jaxunlearn/r1' --tunnel-through-iap {z}\n" in queued  # fmt: skip

    # Internal IPs without a way in, or a generation the Cloud TPU API does not serve: one error line, status 2.
    no_way_in = fake.run("launch", *where, "--internal-ips", "--dry-run", *flags)
    assert no_way_in.returncode == 2 and no_way_in.stderr.startswith("error: --internal-ips: the workers get no ")
    assert len(no_way_in.stderr.splitlines()) == 1
    ironwood = fake.run("launch", *where, "--accelerator-type=tpu7x-8", "--dry-run", *flags)
    assert ironwood.returncode == 2 and "Ironwood (TPU7x) is not available through the Cloud TPU API" in ironwood.stderr
    v3 = fake.run("launch", *where, "--accelerator-type=v3-32", "--dry-run", *flags).stdout
    assert "tpu-vm create tpu-a --accelerator-type=v3-32 --version=tpu-ubuntu2204-base --zone" in v3
    assert fake.calls() == []


def test_ssh_and_scp_are_retried_on_connection_failures_only(tmp_path, fake):
    stub = tmp_path / "python"
    stub.write_text(STUB_PYTHON.format(python=sys.executable))
    stub.chmod(0o755)
    fake.write("tpus.json", {"tpu-test": "v5litepod-16"})
    where = ["tpu-test", "--zone=zone-a", "--ssh-retry-seconds=0.05"]
    args = ["launch", *where, f"--python={stub}", "--run-name=s1", "--", "--config=configs/ga.py"]
    launched = fake.run(*args, env={"FAKE_GCLOUD_FAIL_REMOTE": "2"})  # a fresh slice refusing ssh twice
    assert launched.returncode == 0, launched.stdout + launched.stderr
    assert [c[3] for c in fake.calls()] == ["describe", "ssh", "ssh", "ssh", "scp", "ssh"]
    assert "# ssh to tpu-test failed with status 255; try 2 of 6 in 0.05 s" in launched.stdout
    assert "# ssh to tpu-test failed with status 255; try 3 of 6 in 0.1 s" in launched.stdout
    assert "worker-1: [worker 1" in launched.stdout and "started: pid" in launched.stdout

    # The remote command's own failure (the run is already running there) is not retried.
    seen = len(fake.calls())
    again = fake.run(*args)
    assert again.returncode == 2 and "already running here" in again.stdout
    assert [c[3] for c in fake.calls()[seen:]] == ["describe", "ssh", "scp", "ssh"]
    assert "failed with status" not in again.stdout

    # A slice that never answers: --ssh-tries tries, then one error line.
    seen = len(fake.calls())
    status = fake.run("status", *where, "--ssh-tries=3", env={"FAKE_GCLOUD_FAIL_REMOTE": "5"})
    assert status.returncode == 2 and status.stdout.count("failed with status 255") == 2
    errors = [line for line in status.stderr.splitlines() if line.startswith("error: ")]  # after gcloud's own
    assert errors == [
        "error: gcloud compute tpus tpu-vm ssh tpu-test --worker=all '--command=bash ~/jaxunlearn/latest/worker.sh "
        "status' --zone=zone-a exited with status 255"
    ]
    assert [c[3] for c in fake.calls()[seen:]] == ["ssh", "ssh", "ssh"]


def test_a_queued_resource_of_another_type_is_refused(tmp_path, fake):
    stub = tmp_path / "python"
    stub.write_text(STUB_PYTHON.format(python=sys.executable))
    stub.chmod(0o755)
    fake.write("queued.json", {"pod": {"type": "v4-8", "state": "ACTIVE", "nodes": ["pod"]}})
    fake.write("tpus.json", {"pod": "v4-8"})
    args = ["pod", "--zone=zone-a", "--queued", f"--python={stub}", "--run-name=q1", "--", "--config=configs/ga.py"]
    refused = fake.run("launch", *args[:3], "--accelerator-type=v5e-16", *args[3:])
    assert refused.returncode == 2
    assert refused.stderr == (
        "error: queued resource pod exists as a v4-8 (ACTIVE), not a v5litepod-16: use another name, or delete it "
        "first (launch/tpu_pod.py delete pod --zone=zone-a --queued)\n"
    )
    describe = ["compute", "tpus", "queued-resources", "describe", "pod"]
    assert fake.calls() == [[*describe, "--format=value(state.state,tpu.nodeSpec[0].node.acceleratorType)", "--zone=zone-a"]]  # fmt: skip
    # The same type is reused: nothing created, the run starts on its node.
    reused = fake.run("launch", *args[:3], "--accelerator-type=v4-8", *args[3:])
    assert reused.returncode == 0, reused.stdout + reused.stderr
    assert [c[2:4] for c in fake.calls()[1:]] == [
        ["queued-resources", "describe"],
        ["queued-resources", "describe"],
        ["tpu-vm", "ssh"],
        ["tpu-vm", "scp"],
        ["tpu-vm", "ssh"],
    ]


def stopped_child(leader: int) -> bool:
    """Whether a child of process ``leader`` is stopped (state T in /proc)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError):
            state, ppid = stat.read_text().rsplit(")", 1)[1].split()[:2]
            if ppid == str(leader) and state == "T":
                return True
    return False


@pytest.mark.slow
def test_watch_recreates_a_preempted_slice_and_the_run_resumes_bit_identical(tmp_path, fake):
    setup = {**write_tiny_setup(tmp_path), "cache": tmp_path / "cache"}
    extra = ("--config.train.max_steps=4", "--config.checkpoint.every_steps=1")
    # The uninterrupted run, straight from the CLI, as the launched one runs: one process with one CPU device
    # through JAX's Slurm detection (--config.distributed=True alone changes the last bits of the result).
    worker_env = {**json.loads((fake.dir / "worker_env.json").read_text()), "SLURM_NTASKS": "1"}
    straight = subprocess.run(
        run_cli_args(setup, "ga", tmp_path / "straight", *extra, "--config.distributed=True"),
        env={**os.environ, **worker_env, "XLA_FLAGS": "", "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert straight.returncode == 0, straight.stderr[-3000:]

    # The launched run: a one-worker slice. Its first launch stops itself (SIGSTOP) in step 3's hooks, so that the
    # preemption below comes mid-run, after a complete checkpoint (step 1's asynchronous save is complete once step
    # 2's has begun).
    fake.write("worker_env.json", {**worker_env, "JAXUNLEARN_FAULT_SIGNAL": "SIGSTOP@step3"})
    workdir = tmp_path / "run"
    flags = run_cli_args(setup, "ga", workdir, *extra)[4:]
    launch = ["launch", "tpu-test", "--zone=zone-a", "--accelerator-type=v5e-4", "--spot", "--run-name=w1"]
    launch += [f"--python={sys.executable}", "--watch", "--poll-seconds=0.5", "--max-restarts=2"]
    launch += ["--ssh-retry-seconds=0.05", "--", "--config=configs/ga.py", *flags]
    started = time.monotonic()
    watcher = subprocess.Popen(
        fake.command(*launch),
        env={**fake.env, "FAKE_GCLOUD_WORKERS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
    )
    try:
        pid_file = fake.run_dirs("w1", workers=1)[0] / "worker-0.pid"
        deadline = time.monotonic() + 240
        while not (pid_file.exists() and pid_file.read_text().strip() and stopped_child(int(pid_file.read_text()))):
            assert watcher.poll() is None and time.monotonic() < deadline, "the run did not reach step 3"
            time.sleep(0.2)
        leader = int(pid_file.read_text())
        log = (pid_file.parent / "logs" / "worker-0.log").read_text()
        assert "step 2/4" in log and "step 4/4" not in log, log[-3000:]
        assert [p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()], log[-3000:]
        # The preemption: the slice is PREEMPTED and its processes are gone.
        fake.write("worker_env.json", worker_env)
        fake.write("tpus.json", {"tpu-test": {"type": "v5litepod-4", "state": "PREEMPTED"}})
        with contextlib.suppress(ProcessLookupError):
            os.killpg(leader, signal.SIGKILL)
        out, _ = watcher.communicate(timeout=300)
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.communicate()
    print(f"launch --watch with a preemption: {time.monotonic() - started:.1f} s")
    assert watcher.returncode == 0, out[-5000:]
    events = [line for line in out.splitlines() if line.startswith("watch: ")]
    assert (
        events[0] == "watch: run w1 on tpu-test, every 0.5 s, at most 2 restarts (Ctrl-C stops watching, not the run)"
    )
    assert (
        "watch: tpu-test is PREEMPTED: restart 1 of 2: deleting tpu-test, recreating it and relaunching run w1"
    ) in events
    assert events[-1] == "watch: run w1 finished: all 1 workers exited with status 0", out[-5000:]
    verbs = [c[2:4] for c in fake.calls() if c[3] != "describe" and "status --brief" not in c[-2]]
    assert verbs == [["tpu-vm", "create"], *[["tpu-vm", v] for v in ("ssh", "scp", "ssh")]] * 1 + [
        ["tpu-vm", "delete"],
        ["tpu-vm", "create"],
        *[["tpu-vm", v] for v in ("ssh", "scp", "ssh")],
    ]
    # On the recreated slice (fresh disks) the relaunched run resumed from the workdir's checkpoint.
    log = (fake.run_dirs("w1", workers=1)[0] / "logs" / "worker-0.log").read_text()
    assert "resuming ga from step" in log and "step 4/4" in log, log[-3000:]
    record = json.loads((workdir / "run.json").read_text())
    assert record["status"] == "completed" and record["steps"] == 4

    a = load_file(tmp_path / "straight" / "hf_model" / "model.safetensors")
    b = load_file(workdir / "hf_model" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].tobytes() == b[name].tobytes(), name


IMAGE_PYTHON = """#!/bin/bash
case $1 in
  -V) echo "Python {version}.4" ;;
  -c) echo "{version}"; exit {status} ;;  # the worker script's version probe
  -m) echo "python3 $*" >> "$STUB_LOG"; mkdir -p "$HOME/.local/bin"; cp "$UV_STUB" "$HOME/.local/bin/uv" ;;
esac
"""
UV = """#!/bin/bash
if [[ $1 == --version ]]; then echo "uv 0.13.10"; exit; fi
echo "uv $* UV_PYTHON_DOWNLOADS=$UV_PYTHON_DOWNLOADS" >> "$STUB_LOG"
if [[ $1 == venv ]]; then
  mkdir -p "${{@: -1}}/bin" && printf '#!/bin/bash\\nexec {python} "$@"\\n' > "${{@: -1}}/bin/python"
  chmod +x "${{@: -1}}/bin/python"
fi
"""


@pytest.mark.parametrize("image", ["3.10", "3.12"])
def test_worker_environment_uses_the_image_python_or_says_uv_downloads_one(tmp_path, image):
    """worker.sh start, run here with stubs: the image's Pythons (all 3.10, or python3 3.12), and uv (logging)."""
    bin_dir, home = tmp_path / "bin", tmp_path / "home"
    bin_dir.mkdir()
    for name in ("python3", "python3.11", "python3.12", "python3.13", "python3.14"):
        version = image if name == "python3" else "3.10"
        (bin_dir / name).write_text(IMAGE_PYTHON.format(version=version, status=int(version < "3.11")))
        (bin_dir / name).chmod(0o755)
    (tmp_path / "uv").write_text(UV.format(python=sys.executable))
    (tmp_path / "uv").chmod(0o755)
    run_dir = home / "jaxunlearn" / "r1"
    run_dir.mkdir(parents=True)
    (run_dir / "worker.sh").write_bytes((REPO / "launch" / "tpu_worker.sh").read_bytes())
    (tmp_path / "jaxunlearn").mkdir()
    (tmp_path / "jaxunlearn" / "__init__.py").write_text("")
    with tarfile.open(run_dir / "code.tar.gz", "w:gz") as tar:
        for name in ("requirements.txt", "pyproject.toml"):
            tar.add(REPO / name, arcname=name)
        tar.add(tmp_path / "jaxunlearn", arcname="jaxunlearn")
    log = tmp_path / "stub.log"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "HOME": str(home)}
    env.update(STUB_LOG=str(log), UV_STUB=str(tmp_path / "uv"), JAXUNLEARN_WORKER_ID="0")
    start = ["bash", str(run_dir / "worker.sh"), "start", "--module=this", "--env=PIP_INDEX_URL=https://mirror/simple"]
    result = subprocess.run([*start, "--", "--x=1"], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    out, calls = result.stdout, log.read_text().splitlines()
    assert "installing uv 0.13.10: python3 -m pip install --user uv==0.13.10 (index: https://mirror/simple)" in out
    assert calls[0] == "python3 -m pip install --user --quiet uv==0.13.10"
    venv, install = calls[1].split(), calls[2].split()
    envs = home / "jaxunlearn" / "envs"
    if image == "3.10":
        assert "no Python >= 3.11 on this image (python3: Python 3.10.4): uv downloads CPython 3.11 from GitHub" in out
        assert "This needs internet access to github.com (a recent uv may try the Astral mirror" in out
        assert "To avoid it: an image with Python >= 3.11, --python=PATH" in out
        assert venv[:5] == ["uv", "venv", "--quiet", "--python", "3.11"]
        assert venv[6] == "UV_PYTHON_DOWNLOADS=automatic" and venv[5].startswith(f"{envs}/py3.11-")
    else:
        assert f"base Python: {bin_dir / 'python3'} (3.12, on the image)" in out and "downloads" not in out
        assert venv[:5] == ["uv", "venv", "--quiet", "--python", str(bin_dir / "python3")]
        assert venv[6] == "UV_PYTHON_DOWNLOADS=never" and venv[5].startswith(f"{envs}/py3.12-")
    assert install[:5] == ["uv", "pip", "install", "--quiet", "--python"] and install[5] == f"{venv[5]}/bin/python"
    assert install[6:] == [
        "-r", str(run_dir / "code" / "requirements.txt"), "-r", str(run_dir / "code" / "pyproject.toml"),
        "--extra", "tpu", f"UV_PYTHON_DOWNLOADS={venv[6].split('=')[1]}",
    ]  # fmt: skip
    assert "started: pid" in out


EXITING_PYTHON = """#!/bin/bash
if [ "$1" = -m ]; then echo "stub exits with $STUB_EXIT"; exit "$STUB_EXIT"; fi
exec {python} "$@"
"""


@pytest.mark.parametrize("status", [3, 1])
def test_watch_stops_on_a_final_status_and_gives_up_after_max_restarts(tmp_path, fake, status):
    stub = tmp_path / "python"
    stub.write_text(EXITING_PYTHON.format(python=sys.executable))
    stub.chmod(0o755)
    launch = ["launch", "tpu-test", "--zone=zone-a", f"--python={stub}", f"--env=STUB_EXIT={status}", "--run-name=x"]
    launch += ["--watch", "--poll-seconds=0.2", "--max-restarts=1", "--", "--config=configs/ga.py"]
    result = fake.run(*launch)
    events = [line for line in result.stdout.splitlines() if line.startswith("watch: ") and " running on " not in line]
    verbs = [c[3] for c in fake.calls() if c[3] in ("create", "delete")]
    if status == 3:  # non-finite values: a relaunch would end the same way
        assert result.returncode == 3, result.stdout + result.stderr
        assert events[1:] == ["watch: worker 0 of tpu-test exited with status 3 (non-finite values): not retried"]
        assert verbs == ["create"]
    else:  # a crash: recreated and relaunched once, then given up
        assert result.returncode == 1, result.stdout + result.stderr
        assert events[1:] == [
            "watch: worker 0 of tpu-test exited with status 1: restart 1 of 1: deleting tpu-test, recreating it and "
            "relaunching run x",
            "watch: run x relaunched on the new tpu-test; it resumes from its checkpoint",
            "watch: worker 0 of tpu-test exited with status 1; giving up after 1 restarts (--max-restarts)",
        ]
        assert verbs == ["create", "delete", "create"]
