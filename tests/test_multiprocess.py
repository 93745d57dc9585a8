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


def test_two_processes_equal_one_process(tmp_path):
    setup = {**write_tiny_setup(tmp_path), "cache": tmp_path / "cache"}
    extra = [
        "--config.train.max_steps=3",
        "--config.mesh.data=1",
        "--config.mesh.fsdp=2",
        "--config.mesh.tensor=2",
        "--config.evaluation.enabled=True",
        f"--config.data.approximate.path={setup['approximate']}",
        "--config.data.general.path=",
        "--config.data.eval_retain.path=",
        "--config.evaluation.oracle_model=",
        "--config.evaluation.verbatim.max_chunks=4",
    ]
    base_env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    one = subprocess.run(
        run_cli_args(setup, "ga_gd", tmp_path / "one", *extra),
        env={**base_env, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"},
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    # The terminal summary shows the report's numbers: forget perplexity before and after.
    report = json.loads((tmp_path / "one" / "report.json").read_text())["models"]
    assert f"report:          {tmp_path / 'one' / 'report.md'}" in one.stdout
    printed = next(line for line in one.stdout.splitlines() if line.startswith("forget ppl")).split()[2:]
    expected = [report["original"]["perplexity"]["forget"]["ppl"], report["unlearned"]["perplexity"]["forget"]["ppl"]]
    assert [float(x) for x in printed] == pytest.approx(expected, rel=1e-3)

    job = str(_free_port_job_id())
    slurm = {
        "SLURM_JOB_ID": job,
        "SLURM_STEP_NODELIST": "localhost",
        "SLURM_NTASKS": "2",
        "SLURM_STEP_NUM_NODES": "1",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
    }
    args = run_cli_args(setup, "ga_gd", tmp_path / "two", *extra, "--config.distributed=True")
    envs = [{**base_env, **slurm, "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i)} for i in range(2)]
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
