"""SIGINT and SIGTERM at any moment, from import to exit (issue 26): exit status 130, one line naming the signal and
no traceback, ``interrupted`` in run.json once it exists, the current step checkpointed once training started, and a
rerun that resumes; time-based checkpoints (``checkpoint.every_minutes``)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from jaxunlearn.common.interrupts import FAULT_ENV
from jaxunlearn.training.hooks import Hooks, StepInfo
from tests.test_cli import REPO, run_cli, run_cli_args
from tests.tiny_models import write_tiny_setup


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("signals")
    return {**write_tiny_setup(root), "cache": root / "cache"}


def _env(**extra):
    return {**os.environ, "XLA_FLAGS": "", "PYTHONPATH": str(REPO), **extra}


def _assert_one_line_exit(result_code, stderr, signame):
    assert result_code == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("jaxunlearn: error: ")]
    assert len(errors) == 1 and f"interrupted by {signame}" in errors[0], stderr[-3000:]
    assert f"jaxunlearn: {signame} received: stopping" in stderr, stderr[-3000:]  # logged when it came


# moment -> how the signal comes: FAULT_ENV's "SIG@phase" (the process sends it to itself there) or "SIG after
# run.json" (sent from outside once run.json exists: the run is loading or compiling).
MOMENTS = {
    "import": "SIGINT@import:jax",  # in the middle of `import jax`, before any flag is parsed
    "loading": "SIGTERM after run.json",  # from outside, like a preemption (was: exit 143, run.json 'running')
    "gc-callback": "SIGINT@gc:load",  # lands in a garbage collector callback, like JAX's _xla_gc_callback (was: lost)
    "training": "SIGTERM@step2",  # after step 2's hooks: step 2 is checkpointed
}
SLOW = ("loading", "training")  # a run and its rerun: 15-25 s (import: 0.3 s, gc-callback: 5 s)
# The training case also checkpoints by time: every_minutes shorter than a step saves every step (every_steps=0).
EXTRA = {"training": ("--config.checkpoint.every_minutes=0.00001", "--config.checkpoint.keep=5")}


@pytest.mark.parametrize("moment", [pytest.param(m, marks=pytest.mark.slow if m in SLOW else ()) for m in MOMENTS])
def test_a_signal_at_any_moment_exits_130_in_one_line_and_the_rerun_completes(setup, tmp_path, moment):
    how = MOMENTS[moment]
    signame = how.split("@")[0].split()[0]
    run = tmp_path / "run"
    extra = ("--config.train.max_steps=4", "--config.checkpoint.every_steps=0", *EXTRA.get(moment, ()))
    args = run_cli_args(setup, "ga", run, *extra)
    if "@" in how:
        result = subprocess.run(
            args, capture_output=True, text=True, env=_env(**{FAULT_ENV: how}), cwd=REPO, timeout=300
        )
        code, stderr = result.returncode, result.stderr
    else:
        with open(tmp_path / "stderr", "w") as err:
            proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=err, env=_env(), cwd=REPO)
            try:
                deadline = time.monotonic() + 120
                while not (run / "run.json").exists() and proc.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.01)
                proc.send_signal(getattr(signal, signame))
                code = proc.wait(timeout=120)
            finally:
                proc.kill()
        stderr = (tmp_path / "stderr").read_text()
    _assert_one_line_exit(code, stderr, signame)

    if moment == "import":  # before the workdir: nothing was made
        assert not run.exists()
        return
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "interrupted" and signame in record["error"], record
    checkpoints = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    if moment == "training":
        assert checkpoints == [1, 2] and "after step 2" in stderr  # by time, and the interrupted step: not the end
    else:
        assert checkpoints == []  # stopped while loading, not after training to the end
    if moment == "gc-callback":
        return
    rerun = run_cli(setup, "ga", run, *extra)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert ("resuming ga from step 2 of 4" in rerun.stderr) == (moment == "training"), rerun.stderr[-3000:]
    assert json.loads((run / "run.json").read_text())["status"] == "completed"
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_a_signal_that_lands_in_a_gc_callback_is_raised_after_it_not_swallowed():
    """Python swallows an exception raised in a gc callback ("Exception ignored ... KeyboardInterrupt"): JAX's
    ``_xla_gc_callback`` lost Ctrl-C that way, and the run trained to the end. Installed, the handler raises it once
    the callback is over; in a ``__del__`` too. No JAX here: a second or less."""
    code = """if True:
        import gc, os, signal, sys, time
        from jaxunlearn.common import interrupts
        interrupts.install()

        def callback(phase, info):  # like JAX's: registered for good
            if sys.argv[1] == "gc" and not fired:
                fired.append(1)
                os.kill(os.getpid(), signal.SIGINT)
                t = time.monotonic()
                while time.monotonic() - t < 0.5:  # the handler runs in here
                    pass

        class Resource:
            def __del__(self):
                if sys.argv[1] == "del":
                    os.kill(os.getpid(), signal.SIGINT)
                    t = time.monotonic()
                    while time.monotonic() - t < 0.5:
                        pass

        fired = []
        gc.callbacks.append(callback)
        start = time.monotonic()
        try:
            gc.collect()
            Resource()
            while time.monotonic() - start < 3:
                pass
            print("swallowed")
        except KeyboardInterrupt as e:
            print(f"raised after {time.monotonic() - start:.2f} s: {e}")
    """
    for where in ("gc", "del"):
        result = subprocess.run(
            [sys.executable, "-c", code, where], capture_output=True, text=True, env=_env(), cwd=REPO, timeout=60
        )
        assert result.stdout.startswith("raised after "), (where, result.stdout, result.stderr)
        assert float(result.stdout.split()[2]) < 1.5 and "interrupted by SIGINT" in result.stdout, result.stdout
        assert "Exception ignored" not in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_every_minutes_runs_a_hook_after_the_first_step_that_ends_that_long_after_it_last_ran():
    now = [0.0]
    hooks = Hooks(clock=lambda: now[0])
    saved = []
    hooks.add(lambda info: saved.append(info.step), every=10, minutes=2.0, at_end=True)

    def step(n, seconds, total=30):
        now[0] += seconds
        hooks(StepInfo(n, total, None, {}, 0, seconds))

    step(1, 50.0)
    step(2, 50.0)
    assert saved == []  # 100 s
    step(3, 50.0)
    assert saved == [3]  # 150 s >= 120 s: saved, and the clock starts again
    for n in range(4, 8):
        step(n, 30.0)  # 30, 60, 90, 120 s after step 3
    assert saved == [3, 7]
    step(8, 10.0)
    step(9, 10.0)
    step(10, 10.0)  # every=10: saved by the step period, which restarts the time period too
    assert saved == [3, 7, 10]
    step(11, 100.0)
    assert saved == [3, 7, 10]  # 100 s after step 10
    step(12, 1.0, total=12)  # the last step
    assert saved == [3, 7, 10, 12]

    off = Hooks(clock=lambda: now[0])
    calls = []
    off.add(lambda info: calls.append(info.step), every=0, minutes=0.0)  # 0 = off
    now[0] += 1e6
    off(StepInfo(1, 30, None, {}, 0, 1.0))
    assert calls == []
    with pytest.raises(ValueError, match="minutes=-1"):
        off.add(lambda info: None, minutes=-1)
