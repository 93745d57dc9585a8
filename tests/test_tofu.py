"""TOFU on a tiny local copy with its real schema: every number against a straightforward computation with
transformers (forward passes and greedy ``generate``), rouge-score and scipy; then the preset end to end through
the main and evaluate commands."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch
from rouge_score import rouge_scorer
from transformers import AutoModelForCausalLM, AutoTokenizer

from jaxunlearn.evaluation.loop import Evaluator
from jaxunlearn.evaluation.metrics import tofu as T
from jaxunlearn.evaluation.registry import EvalContext
from jaxunlearn.models import split_model
from jaxunlearn.models.hf_checkpoint import from_pretrained
from jaxunlearn.parallel import sharding
from tests.tiny_benchmarks import CHAT_TEMPLATE, few_small_steps, write_tofu
from tests.tiny_models import load_config_file, make_tokenizer, save_hf_model

REPO = Path(__file__).resolve().parent.parent
TEMPLATE = "chat:the lazy dog"  # the tokenizer's chat template, with a system prompt
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def tofu_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("tofu")
    tok = make_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    for name, seed in (("full", 0), ("retain", 1)):
        save_hf_model("llama_gqa_tied", root / name, seed=seed)
        tok.save_pretrained(root / name)
    return {"root": root, "data": write_tofu(root / "TOFU"), "full": root / "full", "retain": root / "retain"}


def options(data: Path) -> dict:
    return {
        **{k: o.default for k, o in T.OPTIONS.items()},
        "path": str(data),
        "template": TEMPLATE,
        "max_new_tokens": NEW_TOKENS,
    }


def our_results(model_dir: Path, name: str, opts: dict) -> dict:
    mesh = sharding.single_device_mesh()
    lm, params = split_model(from_pretrained(model_dir, mesh=mesh, dtype="float32"))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ctx = EvalContext(Evaluator(lm, mesh, batch_size=4, chunk_size=16), params, tokenizer, {}, 0, 128, name)
    return T.tofu(ctx, opts)


def rows(data: Path, config: str) -> list[dict]:
    return [json.loads(line) for line in (data / config / "train.jsonl").read_text().splitlines()]


class Reference:
    """TOFU's numbers for one model, written out with transformers and torch."""

    def __init__(self, model_dir: Path):
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)

    def chat(self, question, answer=None):
        messages = [{"role": "system", "content": "the lazy dog"}, {"role": "user", "content": question}]
        if answer is None:
            return self.tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
        ids = self.tok.apply_chat_template(messages + [{"role": "assistant", "content": answer}], return_dict=False)
        return ids if ids[-1] == self.tok.eos_token_id else ids + [self.tok.eos_token_id]

    def nll(self, question, answer) -> float:
        """Mean NLL of the answer's tokens (the labels after the prompt, EOS included)."""
        ids, prompt = self.chat(question, answer), self.chat(question)
        assert ids[: len(prompt)] == prompt
        with torch.no_grad():
            logp = torch.log_softmax(self.model(torch.tensor([ids])).logits[0].float(), -1)
        targets = torch.tensor(ids[1:])
        token_logp = logp[:-1].gather(-1, targets[:, None])[:, 0]
        return float(-token_logp[len(prompt) - 1 :].mean())

    def rouge_recall(self, question, answer) -> float:
        prompt = self.chat(question)
        with torch.no_grad():
            x = torch.tensor([prompt])  # an explicit mask: <unk> is id 0, which generate would take for padding
            out = self.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS, do_sample=False)
            out = out[0, len(prompt) :].tolist()
        if self.tok.eos_token_id in out:
            out = out[: out.index(self.tok.eos_token_id)]
        return self.scorer.score(answer, self.tok.decode(out, skip_special_tokens=True))["rougeL"].recall

    def evaluate(self, data: Path) -> dict:
        out = {}
        for name, config in (
            ("forget", "forget10_perturbed"),
            ("retain", "retain_perturbed"),
            ("real_authors", "real_authors_perturbed"),
            ("world_facts", "world_facts_perturbed"),
        ):
            records = rows(data, config)
            answer = np.array([self.nll(r["question"], r["answer"]) for r in records])
            right_key = "paraphrased_answer" if name in ("forget", "retain") else "answer"
            right = np.array([self.nll(r["question"], r[right_key]) for r in records])
            wrong = np.array([[self.nll(r["question"], a) for a in r["perturbed_answer"]] for r in records])
            ratio = np.exp(-wrong.mean(1)) / (np.exp(-right) + 1e-10)
            res = {
                "prob": np.exp(-answer).mean(),
                "rougeL_recall": np.mean([self.rouge_recall(r["question"], r["answer"]) for r in records]),
                "truth_ratio": np.mean(np.minimum(ratio, 1 / (ratio + 1e-10)))
                if name == "forget"
                else np.mean(np.maximum(0, 1 - ratio)),
            }
            if name in ("real_authors", "world_facts"):
                res["prob_normalised"] = np.mean(np.exp(-answer) / (np.exp(-answer) + np.exp(-wrong).sum(1) + 1e-10))
            out[name], out[f"{name}_ratios"] = res, ratio
        parts = []
        for name in ("retain", "real_authors", "world_facts"):
            parts += [
                out[name].get("prob_normalised", out[name]["prob"]),
                out[name]["rougeL_recall"],
                out[name]["truth_ratio"],
            ]
        out["model_utility"] = scipy.stats.hmean(parts)
        return out


@pytest.mark.slow
def test_tofu_metrics_equal_transformers_rouge_score_and_scipy(tofu_setup):
    data = tofu_setup["data"]
    opts = options(data)
    results = {
        "unlearned": {"tofu": our_results(tofu_setup["full"], "unlearned", opts)},
        "oracle": {"tofu": our_results(tofu_setup["retain"], "oracle", opts)},
    }
    T.add_forget_quality(results, opts)
    expected = {n: Reference(tofu_setup[d]).evaluate(data) for n, d in (("unlearned", "full"), ("oracle", "retain"))}
    for name in results:
        ours, theirs = results[name]["tofu"], expected[name]
        for split in T.SETS:
            for key, value in theirs[split].items():
                assert ours[split][key] == pytest.approx(value, rel=2e-4, abs=1e-6), (name, split, key)
        np.testing.assert_allclose(ours["forget_truth_ratios"], theirs["forget_ratios"], rtol=2e-4)
        assert ours["model_utility"] == pytest.approx(theirs["model_utility"], rel=2e-4)
    fq = scipy.stats.ks_2samp(expected["unlearned"]["forget_ratios"], expected["oracle"]["forget_ratios"]).pvalue
    assert results["unlearned"]["tofu"]["forget_quality"] == pytest.approx(fq, rel=1e-6)
    assert results["oracle"]["tofu"]["forget_quality"] == 1.0  # the retain model against itself


def test_forget_quality_reads_open_unlearnings_retain_logs(tofu_setup, tmp_path):
    opts = options(tofu_setup["data"])
    ratios = [0.5, 0.9, 1.3, 2.0, 0.7, 1.1]
    logs = {
        "forget_truth_ratio": {"agg_value": 0.6, "value_by_index": {str(i): {"score": r} for i, r in enumerate(ratios)}}
    }
    (tmp_path / "TOFU_EVAL.json").write_text(json.dumps(logs))
    results = {"unlearned": {"tofu": {"forget_truth_ratios": [0.1, 0.2, 0.3, 0.25, 0.15, 0.05]}}}
    T.add_forget_quality(results, {**opts, "retain_logs": str(tmp_path / "TOFU_EVAL.json")})
    expected = scipy.stats.ks_2samp([0.1, 0.2, 0.3, 0.25, 0.15, 0.05], ratios).pvalue
    assert results["unlearned"]["tofu"]["forget_quality"] == pytest.approx(expected)
    assert expected < 0.01  # disjoint samples: distinguishable


def tofu_config(tofu_setup, method: str, cache: Path):
    config = load_config_file(method, "tofu")
    data = str(tofu_setup["data"])
    config.model.path, config.model.dtype = str(tofu_setup["full"]), "float32"
    config.evaluation.oracle_model = str(tofu_setup["retain"])
    for split in ("forget", "retain", "approximate"):
        config.data[split].path = data
    config.data.qa_template = TEMPLATE
    config.data.max_length, config.data.cache_dir = 128, str(cache)
    config.evaluation.tofu.update(path=data, template=TEMPLATE, max_new_tokens=NEW_TOKENS)
    return few_small_steps(config, 3)


@pytest.mark.slow
def test_the_tofu_preset_runs_end_to_end_and_evaluate_reproduces_it(tofu_setup, tmp_path):
    from jaxunlearn.run.engine import unlearn

    config = tofu_config(tofu_setup, "ga_gd", tmp_path / "cache")
    assert config.data.forget.name == "forget10" and config.data.retain.name == "retain90"
    assert config.data.approximate.name == "holdout10" and config.data.forget.question == "question"
    unlearn(config, tmp_path / "run")
    report = json.loads((tmp_path / "run" / "report.json").read_text())["models"]
    assert {"original", "unlearned", "oracle"} <= set(report)
    assert report["oracle"]["tofu"]["forget_quality"] == 1.0
    for name in ("original", "unlearned"):
        t = report[name]["tofu"]
        assert 0 <= t["forget_quality"] <= 1 and 0 <= t["model_utility"] < 1 and t["forget"]["n"] == 6
    assert report["unlearned"]["tofu"]["forget"]["prob"] < report["original"]["tofu"]["forget"]["prob"]
    assert "## TOFU" in (tmp_path / "run" / "report.md").read_text()

    args = [
        sys.executable,
        "-m",
        "jaxunlearn.commands.evaluate",
        "--config=ga_gd:tofu",
        f"--model={tmp_path / 'run'}",
        f"--workdir={tmp_path / 'eval'}",
        "--config.model.dtype=float32",
        "--config.data.max_length=128",
        f"--config.data.qa_template={TEMPLATE}",
        f"--config.data.cache_dir={tmp_path / 'cache'}",
        f"--config.evaluation.tofu.path={tofu_setup['data']}",
        f"--config.evaluation.tofu.template={TEMPLATE}",
        f"--config.evaluation.tofu.max_new_tokens={NEW_TOKENS}",
        f"--config.evaluation.tofu.retain_logs={tmp_path / 'run' / 'report.json'}",
        "--config.mesh.fsdp=1",
    ] + [f"--config.data.{s}.path={tofu_setup['data']}" for s in ("forget", "retain", "approximate")]
    env = {**os.environ, "XLA_FLAGS": "", "PYTHONPATH": str(REPO)}
    result = subprocess.run(args, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    evaluated = json.loads((tmp_path / "eval" / "report.json").read_text())["models"]["model"]["tofu"]
    run = report["unlearned"]["tofu"]
    assert evaluated["forget_quality"] == pytest.approx(run["forget_quality"], rel=1e-6)
    assert evaluated["model_utility"] == pytest.approx(run["model_utility"], rel=1e-4)
    assert evaluated["forget"]["prob"] == pytest.approx(run["forget"]["prob"], rel=1e-4)
