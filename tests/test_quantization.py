"""The quantization attack's weights against straightforward per-row references, through every layout."""

import numpy as np
import pytest

from jaxunlearn.attacks.quantize import NF4_LEVELS, quantize_params, quantize_rows
from jaxunlearn.models import family, split_model
from jaxunlearn.models.hf_checkpoint import from_pretrained
from jaxunlearn.models.layouts import to_hf_layout
from jaxunlearn.parallel import sharding
from tests.tiny_models import save_hf_model


def _reference(row: np.ndarray, scheme: str) -> np.ndarray:
    """One row, element by element: symmetric RTN with the row's absmax, or NF4 with each 64-block's absmax."""
    out = np.empty_like(row)
    if scheme in ("int8", "int4"):
        q_max = 127 if scheme == "int8" else 7
        scale = max(abs(float(x)) for x in row) / q_max
        for i, x in enumerate(row):
            out[i] = min(max(round(float(x) / scale), -q_max), q_max) * scale
        return out
    for start in range(0, len(row), 64):
        block = row[start : start + 64]
        absmax = max(abs(float(x)) for x in block)
        for i, x in enumerate(block):
            out[start + i] = min(NF4_LEVELS, key=lambda level: abs(float(x) / absmax - level)) * absmax
    return out


@pytest.mark.parametrize("scheme", ["int8", "int4", "nf4"])
def test_quantize_rows_equals_an_element_by_element_reference(scheme):
    rows = np.random.default_rng(0).standard_normal((5, 150)).astype(np.float32)  # 150: a short last NF4 block
    ours = quantize_rows(rows, scheme)
    np.testing.assert_allclose(ours, np.stack([_reference(r, scheme) for r in rows]), rtol=1e-6, atol=1e-7)
    levels = {"int8": 255, "int4": 15, "nf4": 16 * 3}  # NF4: 16 levels in each of a row's 3 blocks
    assert all(len(np.unique(r)) <= levels[scheme] for r in ours)


# Weight matrices per decoder layer: q, k, v, o, gate, up, down; GPT-NeoX's fused query_key_value, dense, and the
# two MLP matrices.
MATRICES_PER_LAYER = {"llama": 7, "qwen2": 7, "gpt_neox": 4}


@pytest.mark.parametrize("variant", ["llama_gqa_tied", "qwen2_bias_tied", "gpt_neox_pythia"])
def test_every_weight_matrix_is_quantized_per_hf_row_and_vectors_are_kept(tmp_path, variant):
    save_hf_model(variant, tmp_path / "m")
    lm, params = split_model(
        from_pretrained(tmp_path / "m", mesh=sharding.make_mesh(fsdp=4, tensor=2), dtype="float32")
    )
    quantized = quantize_params(params, lm.config, "int4")
    checked = 0
    for entry in family(lm.config).hf_tensors(lm.config):
        before, after = params, quantized
        for key in entry.path:
            before, after = before[key], after[key]
        assert after.sharding == before.sharding
        before, after = np.asarray(before), np.asarray(after)
        for i in range(lm.config.num_layers) if entry.stacked else [None]:
            b, a = (before[i], after[i]) if i is not None else (before, after)
            hf_before, hf_after = to_hf_layout(entry.layout, b), to_hf_layout(entry.layout, a)
            if hf_before.ndim == 1:
                np.testing.assert_array_equal(hf_after, hf_before)  # norms and biases stay exact
            else:
                expected = np.stack([_reference(r, "int4") for r in hf_before])
                np.testing.assert_allclose(hf_after, expected, rtol=1e-6, atol=1e-7, err_msg=entry.name)
                checked += 1
    # the embedding (and an untied head) and every layer's matrices
    assert checked >= 1 + MATRICES_PER_LAYER[lm.config.model_type] * lm.config.num_layers
