"""One XLA CPU device per core for the commands: how many, and when nothing is changed."""

import pytest

from jaxunlearn.config import base_config
from jaxunlearn.parallel import cpu_devices


@pytest.fixture
def cores(monkeypatch):
    def set_cores(n):
        monkeypatch.setattr(cpu_devices, "usable_cores", lambda: n)

    monkeypatch.delenv(cpu_devices.ENV, raising=False)
    return set_cores


@pytest.mark.parametrize(
    ("n_cores", "micro_batch", "expected"), [(2, 8, 2), (4, 8, 4), (3, 8, 2), (6, 9, 3), (1, 8, 1)]
)
def test_one_device_per_core_that_splits_the_batch_evenly(cores, n_cores, micro_batch, expected):
    cores(n_cores)
    config = base_config("ga")
    config.train.micro_batch_size = micro_batch
    assert cpu_devices.device_count(config) == expected


def test_a_mesh_of_ones_own_or_a_distributed_run_keeps_one_device(cores):
    cores(4)
    for key, value in [("mesh.fsdp", 2), ("mesh.tensor", 2), ("mesh.data", 2), ("distributed", True)]:
        config = base_config("ga")
        section, _, leaf = key.rpartition(".")
        (config[section] if section else config)[leaf] = value
        assert cpu_devices.device_count(config) == 1, key


def test_the_environment_chooses_and_xla_flags_win(cores, monkeypatch):
    cores(8)
    monkeypatch.setenv(cpu_devices.ENV, "1")
    assert cpu_devices.device_count(base_config("ga")) == 1
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=3")
    monkeypatch.setenv(cpu_devices.ENV, "2")
    assert cpu_devices.configure(base_config("ga")) is None  # an explicit device count is never overridden
    monkeypatch.setenv("XLA_FLAGS", "")
    assert cpu_devices.configure(base_config("ga")) is None  # this process's backends already exist (8 devices)
