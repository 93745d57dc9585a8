"""Test-wide setup: 8 fake CPU devices and no network, fixed before JAX or the Hub client is imported; a compilation
cache for the commands the tests run as subprocesses; test files handed to xdist's workers longest first."""

import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[var] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The commands the tests start as subprocesses (``python -m jaxunlearn.main ...``, with ``{**os.environ, ...}``) share
# one persistent compilation cache: a rerun of a killed, interrupted or finished run compiles nothing its first run
# compiled. The tests' own processes do not use it (it is set after JAX is imported here): what they compile, and
# what the planner compiles for TPUs, stays as it was. xdist's workers inherit the controller's directory.
_CACHE_VARS = ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")
_cache = {var: os.environ.pop(var, None) for var in _CACHE_VARS}

import jax  # noqa: E402
import pytest  # noqa: E402

_made_cache = not _cache["JAX_COMPILATION_CACHE_DIR"]  # by this process: the controller, or a run without xdist
os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache["JAX_COMPILATION_CACHE_DIR"] or tempfile.mkdtemp(
    prefix="jaxunlearn-tests-jit-"
)
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = _cache["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] or "0"


def pytest_unconfigure(config):
    if _made_cache:
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def _eight_devices():
    assert jax.device_count() == 8, "tests expect XLA's 8 fake CPU devices"


# --- xdist --dist loadfile: longest files first ------------------------------------------------------------------
# xdist hands out whole files, by default those with the most tests first, so a long file with a few end-to-end
# tests starts last and runs alone at the end. Handing them out longest first lets the short files fill in around
# the long ones. Seconds per file on two idle cores (measured on a loaded machine, divided by 2.9); a file not listed
# counts half a second a test. The order changes nothing a test checks; keep the numbers roughly current.
FILE_SECONDS = {
    "test_cli.py": 385,
    "test_objectives.py": 235,
    "test_train.py": 216,
    "test_plan.py": 179,
    "test_world.py": 175,
    "test_muse.py": 151,
    "test_generation.py": 139,
    "test_notebook.py": 125,
    "test_lora.py": 115,
    "test_run.py": 112,
    "test_bad_inputs.py": 111,
    "test_model_parity.py": 101,
    "test_launch.py": 90,
    "test_multiprocess.py": 82,
    "test_tofu.py": 80,
    "test_locations.py": 79,
    "test_real_model_run.py": 70,
    "test_workdir.py": 64,
    "test_wmdp.py": 58,
    "test_report.py": 40,
    "test_signals.py": 38,
    "test_wmdp_rmu.py": 36,
    "test_packaging.py": 30,
    "test_real_model.py": 26,
    "test_sharding.py": 23,
    "test_lm_eval.py": 14,
    "test_evaluation.py": 13,
    "test_families.py": 13,
    "test_export.py": 11,
}


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist's: no error without it
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class LongestFileFirst(LoadFileScheduling):
        _ordered = False

        def _assign_work_unit(self, node):
            if not self._ordered:  # the work queue is complete before the first file is handed out
                self._ordered = True
                units = sorted(
                    self.workqueue.items(),
                    key=lambda unit: -FILE_SECONDS.get(os.path.basename(unit[0]), len(unit[1]) / 2),
                )
                self.workqueue.clear()
                self.workqueue.update(units)
            super()._assign_work_unit(node)

    return LongestFileFirst(config, log)
