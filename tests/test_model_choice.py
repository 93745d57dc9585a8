"""The notebook's default model: the runtime's TPU slice from its devices, and the largest candidate whose run fits
it (full fine-tuning, else LoRA), compiled for the slice by the planner."""

import dataclasses
from types import SimpleNamespace

import jax
import pytest

from jaxunlearn.models import lora
from jaxunlearn.planning import choice
from jaxunlearn.planning.topology import GENERATIONS, Topology
from tests.test_plan import HUGE, WIDE, plan_config, shape_dir


@pytest.mark.parametrize(
    ("kind", "count", "name"),
    [("TPU v5 lite", 1, "v5e-1"), ("TPU v5 lite", 8, "v5e-8"), ("TPU v6 lite", 1, "v6e-1"), ("TPU v4", 4, "v4-8")],
)
def test_local_topology_names_the_runtime_chips_as_cloud_tpu_does(kind, count, name):
    devices = [SimpleNamespace(platform="tpu", device_kind=kind)] * count
    assert choice.local_topology(devices).name == name


def test_local_topology_is_none_off_tpu_and_for_unknown_generations():
    assert choice.local_topology([SimpleNamespace(platform="cpu", device_kind="cpu")]) is None
    assert choice.local_topology([SimpleNamespace(platform="tpu", device_kind="TPU v2")] * 8) is None
    assert choice.local_topology(jax.devices()) is None  # this machine's CPU devices


def test_the_largest_fitting_model_skips_hopeless_ones_and_falls_back_to_lora(tmp_path_factory):
    """HUGE (4.5B parameters) is skipped without compiling: 16 bytes per parameter for full fine-tuning, 2 for a
    bf16 LoRA base, are far above 48 MiB; so is WIDE's full fine-tuning (72 MB), while its LoRA run fits."""
    pytest.importorskip("libtpu", reason='the planner compiles for TPUs with libtpu (pip install "jax[tpu]")')
    huge, wide = shape_dir(tmp_path_factory, "huge_choice", HUGE), shape_dir(tmp_path_factory, "wide_choice", WIDE)
    config = plan_config(wide, method="ga", micro=1, accum=1)
    config.evaluation.batch_size = 1
    config.model.remat = "full"
    one_chip = Topology(dataclasses.replace(GENERATIONS["v5e"], hbm_gib=48 / 1024), (1, 1))
    said = []
    picked = choice.largest_fitting(config, [str(huge), str(wide)], one_chip, say=said.append)
    assert picked is not None and picked.model == str(wide) and picked.plan.fits
    assert picked.settings == {"lora.rank": 16, "lora.base_dtype": "bfloat16", "lora.targets": lora.ALL_LINEAR}
    h, v, i, kv = HUGE["hidden_size"], HUGE["vocab_size"], HUGE["intermediate_size"], HUGE["hidden_size"] // 2
    params = 2 * v * h + (2 * h * h + 2 * h * kv + 3 * h * i + 2 * h) + h  # embeddings, head, one layer, final norm
    assert (
        said[0] == f"{huge} (full fine-tuning): needs at least {16 * params / 2**30:.1f} GiB, the v5e-1 has 0.0469 GiB"
    )
    assert said[1] == f"{huge} (LoRA): needs at least {2 * params / 2**30:.1f} GiB, the v5e-1 has 0.0469 GiB"
    assert said[2].startswith(f"{wide} (full fine-tuning): needs at least 0.1 GiB")  # 4.5M parameters x 16 bytes
    assert said[3].startswith(f"{wide} (LoRA): ") and said[3].endswith(" fits")
    assert choice.largest_fitting(config, [str(huge)], one_chip, say=said.append) is None
