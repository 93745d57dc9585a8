"""Evaluation inside unlearning runs: the report, the stopping rule, compute accounting, the evaluate CLI."""

import importlib.metadata
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jaxunlearn.models import ModelConfig
from jaxunlearn.run.engine import unlearn
from jaxunlearn.training import flops
from tests.tiny_models import tiny_run_config, write_tiny_setup

REPO = Path(__file__).resolve().parent.parent


def _numbers(tree, path=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from _numbers(v, f"{path}[{i}]")
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield path, tree


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    setup = write_tiny_setup(root)
    config = tiny_run_config(setup, "ga_gd", root / "cache", train__max_steps=4)
    config.evaluation.every_steps = 2
    config.evaluation.mia.gradnorm = "l2"
    config.evaluation.quantization.schemes = "int8,nf4"
    config.evaluation.attacks = "relearn,relearn_related"  # relearning on held-out forget documents and on retain
    config.evaluation.relearning.update(steps=4, every=2, batch_size=4, lr=3e-3)
    record = unlearn(config, root / "run")
    return root, setup, config, record


@pytest.mark.slow
def test_report_has_every_section_and_only_finite_numbers(finished_run):
    root, _, _, record = finished_run
    run = root / "run"
    report = json.loads((run / "report.json").read_text())
    assert set(report["models"]) == {"original", "unlearned"}
    for model in report["models"].values():
        assert set(model["perplexity"]) == {"forget", "approximate", "retain", "general"}
        assert {"loss", "zlib", "min_k_0.2", "min_k++_0.2", "min_k_1", "gradnorm"} <= set(model["mia"])
        assert set(model["memorization"]) == set(model["perplexity"])
        quantized = model["quantization"]
        assert set(quantized) == {"none", "int8", "nf4"}
        assert quantized["none"]["forget_ppl"] == pytest.approx(model["perplexity"]["forget"]["ppl"])
        assert quantized["none"]["auc"] == pytest.approx(model["mia"]["min_k_0.4"]["auc"])
        assert quantized["int8"]["forget_ppl"] == pytest.approx(quantized["none"]["forget_ppl"], rel=0.05)
        assert quantized["nf4"]["forget_ppl"] != quantized["none"]["forget_ppl"]
        assert model["memorization"]["forget"]["exact_memorization"] == pytest.approx(
            model["perplexity"]["forget"]["acc"]
        )
        assert model["verbatim"]["forget"]["n"] > 0 and model["verbatim"]["approximate"]["n"] > 0
        relearned = model["relearning"]
        assert {"forget", "retain"} <= set(relearned)
        for corpus in ("forget", "retain"):
            assert [p["step"] for p in relearned[corpus]["curve"]] == [0, 2, 4]
            assert relearned[corpus]["before"] == relearned[corpus]["curve"][0]
        # Both corpora start from the same model and measure the same held-out documents.
        assert relearned["forget"]["before"] == relearned["retain"]["before"]
    original = report["models"]["original"]["relearning"]
    assert original["forget"]["steps_to_original"] == 0  # already at its own level
    assert original["forget"]["after"]["forget_ppl"] < original["forget"]["before"]["forget_ppl"]
    bad = [(p, v) for p, v in _numbers(report) if not math.isfinite(v)]
    assert not bad, bad[:5]
    assert [h["step"] for h in report["history"]] == [0, 2, 4]
    assert report["change"]["perplexity"]["forget"]["ppl"] == pytest.approx(
        report["models"]["unlearned"]["perplexity"]["forget"]["ppl"]
        - report["models"]["original"]["perplexity"]["forget"]["ppl"]
    )
    assert report["stamp"]["method"] == "ga_gd"
    assert report["stamp"]["versions"]["jax"] == importlib.metadata.version("jax")
    for plot in ("perplexity_history.png", "roc.png"):
        assert (run / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (run / "report.md").read_text()
    assert "## Membership inference" in md and "| forget |" in md and "## Quantization attack" in md
    assert "## Relearning attack" in md and "steps to original original" in md
    header = md.split("\n## ")[0]
    assert "{'" not in header and "[" not in header  # readable values, not Python reprs
    assert "- **method**: ga_gd (forget_nll_cap=0, forget_nll_cap_margin=0, forget_weight=1, retain_weight=1)" in header
    assert "- **optimizer**: AdamW, lr 0.001 (cosine" in header
    data = next(line for line in header.splitlines() if line.startswith("- **data**"))
    assert f"forget: {finished_run[1]['forget']}" in data and f"approximate: {finished_run[1]['approximate']}" in data
    assert record["report"] == str(run / "report.md")
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if x["split"] == "eval"] == [2]


def test_compute_accounting(finished_run):
    _, _, config, _ = finished_run
    report = json.loads((finished_run[0] / "run" / "report.json").read_text())
    compute = report["compute"]
    hf = json.loads((finished_run[1]["model"] / "config.json").read_text())
    mc = ModelConfig.from_hf(hf)
    # by hand: 4 steps x 8 forget + 8 retain chunks x 32 tokens, 6N + 6 L T H D per trained token, with N the
    # parameters transformers counts (a tied embedding once) minus the embedding lookup plus the tied head
    import transformers

    torch_model = transformers.AutoModelForCausalLM.from_pretrained(finished_run[1]["model"])
    embedding = torch_model.get_input_embeddings().weight.numel()
    assert (
        hf["tie_word_embeddings"]
        and torch_model.get_output_embeddings().weight is torch_model.get_input_embeddings().weight
    )
    n = sum(p.numel() for p in torch_model.parameters()) - embedding + embedding
    per_token = 6 * n + 6 * hf["num_hidden_layers"] * 32 * hf["hidden_size"]  # heads x head_dim = hidden size
    expected = 4 * 16 * 32 * per_token
    assert compute["unlearning_flops"] == pytest.approx(expected)
    assert compute["retraining_over_unlearning"] == pytest.approx(3e12 * per_token / expected)
    assert flops.matmul_params(mc) == n


@pytest.mark.slow
def test_stopping_rule_stops_at_the_target_and_stays_stopped(tmp_path):
    setup = write_tiny_setup(tmp_path)
    config = tiny_run_config(setup, "ga", tmp_path / "cache", train__max_steps=20, optim__lr=3e-3)
    config.evaluation.every_steps = 1
    config.evaluation.stop_approx_multiple = 1.05
    config.evaluation.verbatim.max_chunks = 0
    record = unlearn(config, tmp_path / "run")
    stopped = record["stopped"]
    assert stopped is not None and stopped["step"] < 20
    history = json.loads((tmp_path / "run" / "report.json").read_text())["history"]
    assert stopped["target"] == pytest.approx(1.05 * history[0]["perplexity"]["approximate"]["ppl"])
    assert history[-1]["step"] == stopped["step"]
    assert history[-1]["perplexity"]["forget"]["ppl"] >= stopped["target"]
    assert all(h["perplexity"]["forget"]["ppl"] < stopped["target"] for h in history[:-1])
    again = unlearn(config, tmp_path / "run")  # the same command: already finished, no further steps
    assert again["steps"] == stopped["step"]

    # Full evaluations every 4 steps, the stopping rule (forget split only) every step: the same stop.
    config.evaluation.every_steps = 4
    config.evaluation.stop_every_steps = 1
    cheap = unlearn(config, tmp_path / "cheap")
    assert cheap["stopped"] == pytest.approx(stopped)
    steps = [h["step"] for h in json.loads((tmp_path / "cheap" / "report.json").read_text())["history"]]
    assert steps == sorted({0, *range(4, stopped["step"], 4), stopped["step"]})


@pytest.mark.slow
def test_evaluate_cli_reproduces_the_runs_final_numbers(finished_run, tmp_path):
    root, setup, _, _ = finished_run
    args = [
        sys.executable,
        "-m",
        "jaxunlearn.commands.evaluate",
        f"--config={REPO / 'configs' / 'ga_gd.py'}:arxiv",
        f"--model={root / 'run'}",
        f"--workdir={tmp_path / 'eval'}",
        f"--config.data.forget.path={setup['forget']}",
        f"--config.data.retain.path={setup['retain']}",
        f"--config.data.approximate.path={setup['approximate']}",
        f"--config.data.general.path={setup['general']}",
        "--config.data.max_length=32",
        f"--config.data.cache_dir={root / 'cache'}",
        "--config.model.dtype=float32",
        "--config.evaluation.verbatim.prompt_tokens=8",
        "--config.evaluation.verbatim.new_tokens=8",
        "--config.evaluation.verbatim.max_chunks=16",
        "--config.mesh.fsdp=1",
    ]
    env = {**os.environ, "XLA_FLAGS": "", "PYTHONPATH": str(REPO)}
    result = subprocess.run(args, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "eval" / "report.json").read_text())["models"]["model"]
    run_report = json.loads((root / "run" / "report.json").read_text())["models"]["unlearned"]
    for split, values in run_report["perplexity"].items():
        assert report["perplexity"][split]["ppl"] == pytest.approx(values["ppl"], rel=1e-4)
    assert report["mia"]["min_k_0.4"]["auc"] == pytest.approx(run_report["mia"]["min_k_0.4"]["auc"], abs=1e-6)
    assert report["verbatim"]["forget"]["exact_match"] == run_report["verbatim"]["forget"]["exact_match"]


def test_only_process_zero_writes_the_report(finished_run, tmp_path, monkeypatch):
    """Every process of a multi-host run holds the report; a second writer would race process 0."""
    import jax

    from jaxunlearn.evaluation.report import write_report

    report = json.loads((finished_run[0] / "run" / "report.json").read_text())
    kwargs = dict(
        stamp=report["stamp"], results=report["models"], metrics=report["metrics"], options=report["evaluation"]
    )
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    returned = write_report(tmp_path / "other", **kwargs)
    assert returned["models"] == report["models"]
    assert not (tmp_path / "other").exists()
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    write_report(tmp_path / "zero", **kwargs)
    assert json.loads((tmp_path / "zero" / "report.json").read_text())["models"] == report["models"]
