"""JAX's multi-controller runtime on one machine: two processes x two CPU devices, coordinated through
``jax.distributed`` exactly as on a TPU pod or a Slurm GPU cluster, against one process x four devices.

The Slurm variables are set by hand (JAX's cluster detection reads them), so the same code path as
``launch/slurm_gpu.sbatch`` runs: ``--config.distributed=True`` and nothing else.
"""

import json
import os
import socket
import subprocess

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.test_cli import REPO, run_cli_args
from tests.tiny_models import write_tiny_setup

pytestmark = pytest.mark.slow  # the fast tier (-m "not slow") leaves this file out


def _free_port_job_id() -> int:
    """A Slurm job id whose derived coordinator port (JAX: 61440 + id % 4096) is free here."""
    for job in range(os.getpid() % 4096, os.getpid() % 4096 + 4096):
        port = 65535 - 4096 + 1 + job % 4096
        with socket.socket() as s:
            try:
                s.bind(("localhost", port))
            except OSError:
                continue
            return job
    pytest.skip("no free port for the coordinator")


def _run_processes(args: list[str], envs: list[dict]) -> list[str]:
    """Run one process per environment; all must succeed. Returns their stderr."""
    procs = [
        subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
        for env in envs
    ]
    try:
        outputs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    return [err for _, err in outputs]


EXTRA = [
    "--config.train.max_steps=3",
    "--config.mesh.data=1",
    "--config.mesh.fsdp=2",
    "--config.mesh.tensor=2",
    "--config.evaluation.enabled=True",
    "--config.data.general.path=",
    "--config.data.eval_retain.path=",
    "--config.evaluation.oracle_model=",
    "--config.evaluation.verbatim.max_chunks=4",
]
BASE_ENV = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}


def _slurm_envs() -> list[dict]:
    """Two processes x two CPU devices, found by JAX's Slurm detection with a coordinator on this machine."""
    slurm = {
        "SLURM_JOB_ID": str(_free_port_job_id()),
        "SLURM_STEP_NODELIST": "localhost",
        "SLURM_NTASKS": "2",
        "SLURM_STEP_NUM_NODES": "1",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
    }
    return [{**BASE_ENV, **slurm, "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i)} for i in range(2)]


def _command(module: str, args: list[str], preset: str = "") -> list[str]:
    """``run_cli_args``' command line for another module (``-m jaxunlearn.main`` replaced) and preset."""
    return [*args[:2], module, args[3] + (f":{preset}" if preset else ""), *args[4:]]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("multiprocess")
    return {**write_tiny_setup(root), "cache": root / "cache", "root": root}


@pytest.fixture(scope="module")
def one_process(setup):
    """The main command on one process x four devices: the reference of the multi-process runs."""
    tmp_path = setup["root"]
    extra = [*EXTRA, f"--config.data.approximate.path={setup['approximate']}"]
    one = subprocess.run(
        run_cli_args(setup, "ga_gd", tmp_path / "one", *extra),
        env={**BASE_ENV, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"},
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    return tmp_path, setup, extra, one


def test_two_processes_equal_one_process(one_process):
    tmp_path, setup, extra, one = one_process
    # The terminal summary shows the report's numbers: forget perplexity before and after.
    report = json.loads((tmp_path / "one" / "report.json").read_text())["models"]
    assert f"report:          {tmp_path / 'one' / 'report.md'}" in one.stdout
    printed = next(line for line in one.stdout.splitlines() if line.startswith("forget ppl")).split()[2:]
    expected = [report["original"]["perplexity"]["forget"]["ppl"], report["unlearned"]["perplexity"]["forget"]["ppl"]]
    assert [float(x) for x in printed] == pytest.approx(expected, rel=1e-3)

    args = run_cli_args(setup, "ga_gd", tmp_path / "two", *extra, "--config.distributed=True")
    envs = _slurm_envs()
    _run_processes(args, envs)
    # The same command again: every process must take process 0's view of the finished workdir (cached
    # evaluations, history, export), or they would run different collectives and hang.
    again = _run_processes(args, envs)
    assert all("already finished at step 3" in err for err in again)

    a = load_file(tmp_path / "one" / "hf_model" / "model.safetensors")
    b = load_file(tmp_path / "two" / "hf_model" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_allclose(a[name], b[name], atol=1e-5, err_msg=name)
    run_one = json.loads((tmp_path / "one" / "run.json").read_text())
    run_two = json.loads((tmp_path / "two" / "run.json").read_text())
    assert run_two["environment"]["process_count"] == 2
    assert run_two["environment"]["mesh"]["num_devices"] == 4
    assert run_one["final_metrics"]["loss"] == pytest.approx(run_two["final_metrics"]["loss"], abs=1e-5)
    # Each process logs to its own file.
    assert "starting ga_gd" in (tmp_path / "two" / "log.txt").read_text()
    assert "starting ga_gd" in (tmp_path / "two" / "log.process1.txt").read_text()


def _assert_same_numbers(got, expected, where="report"):
    """The same keys at every level, and the same numbers within 1e-5."""
    if isinstance(expected, dict):
        assert got.keys() == expected.keys(), where
        for key in expected:
            _assert_same_numbers(got[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, str):  # a label, e.g. where PrivLeak's reference comes from
        assert got == expected, where
    else:
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-6), where


def test_evaluate_on_two_processes_over_two_slices_equals_one_process(one_process):
    """``evaluate`` as two processes on a multislice mesh (``mesh.dcn_data=2``: on CPU each process is a slice,
    the data axis spans them) gives the one-process run's numbers for the original model."""
    tmp_path, setup, extra, _ = one_process
    mesh = ["--config.mesh.data=1", "--config.mesh.fsdp=1", "--config.mesh.tensor=2", "--config.mesh.dcn_data=2"]
    args = run_cli_args(setup, "ga", tmp_path / "eval", *extra, *mesh, "--config.distributed=True")
    args = _command("jaxunlearn.commands.evaluate", args) + [f"--model={setup['model']}"]
    _run_processes(args, _slurm_envs())
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["stamp"]["mesh"] == {"data": 2, "fsdp": 1, "tensor": 2}
    assert report["stamp"]["device"].startswith("4 x ")
    expected = json.loads((tmp_path / "one" / "report.json").read_text())["models"]["original"]
    _assert_same_numbers(report["models"]["model"], expected)
    # Process 0 wrote the report; each process logged to its own file.
    assert (tmp_path / "eval" / "log.process1.txt").exists() and (tmp_path / "eval" / "log.txt").exists()


def test_compare_on_two_processes(setup):
    """The comparison as two processes, in a workdir at a (``file://``) URL: its runs join the runtime once (a
    second ``jax.distributed.initialize`` raises), every process reads process 0's reports, and process 0 alone
    writes the comparison."""
    tmp_path = setup["root"]
    flags = [
        "--preset=arxiv",  # the built-in preset's retain default would build the world
        "--methods=ga",
        "--lr_multipliers=1",
        "--config.train.max_steps=2",
        "--config.train.grad_accum_steps=1",
        "--config.checkpoint.export=False",
        "--config.mesh.data=1",
        "--config.mesh.fsdp=2",
        "--config.mesh.tensor=2",
        "--config.evaluation.enabled=True",
        "--config.evaluation.verbatim.max_chunks=4",
        f"--config.data.eval_retain.path={setup['retain']}",
        "--config.distributed=True",
    ]
    for split in ("approximate", "general"):
        flags.append(f"--config.data.{split}.path={setup[split]}")
    flags += [f"--config.data.{split}.name=" for split in ("forget", "approximate", "general")]  # no Hub names
    # At a URL: the runs' workdirs are staged per process and pushed back, process 1's log included.
    args = run_cli_args(setup, "ga", f"file://{tmp_path / 'compare'}", *flags)
    errs = _run_processes(_command("jaxunlearn.commands.compare", args, preset="arxiv"), _slurm_envs())
    assert all("starting ga: 2 steps" in err for err in errs)
    result = json.loads((tmp_path / "compare" / "compare.json").read_text())
    assert [(r["variant"], r["steps"]) for r in result["rows"]] == [("ga", 2)]
    assert result["best"]["variant"] == "ga" and (tmp_path / "compare" / "compare.md").exists()
    run_dir = tmp_path / "compare" / "ga" / f"lr-{result['best']['lr']:.3g}"
    assert (run_dir / "log.process1.txt").exists()


def test_a_signal_to_one_process_stops_every_process_after_the_same_step(setup):
    """Preemption or ``launch/tpu_pod.py stop`` reaches each host at its own moment; here only process 1 gets
    SIGTERM. Both must checkpoint the same step and exit 130: a process stopping alone would leave the other
    waiting forever in the next step's collectives (the test would time out)."""
    import signal
    import time

    workdir = setup["root"] / "signalled"
    args = run_cli_args(
        setup,
        "ga",
        workdir,
        "--config.train.max_steps=100000",
        "--config.checkpoint.every_steps=100000",
        "--config.mesh.fsdp=2",
        "--config.mesh.tensor=2",
        "--config.distributed=True",
    )
    procs = [
        subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
        for env in _slurm_envs()
    ]
    try:
        deadline = time.monotonic() + 120
        metrics = workdir / "metrics.jsonl"
        while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "the run did not start"
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGTERM)
        outputs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [130, 130], [err[-2000:] for _, err in outputs]
    record = json.loads((workdir / "run.json").read_text())
    assert record["status"] == "interrupted"
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert len(steps) == 1 and 2 <= steps[0] < 100000
