"""MUSE on a tiny local copy with its real schema: VerbMem and KnowMem against transformers' greedy ``generate`` and
rouge-score, then the preset end to end (main command, evaluate) and the scalability/sustainability runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from rouge_score import rouge_scorer
from transformers import AutoModelForCausalLM, AutoTokenizer

from jaxunlearn.evaluation.loop import Evaluator
from jaxunlearn.evaluation.metrics import muse as M
from jaxunlearn.evaluation.registry import EvalContext
from jaxunlearn.models import split_model
from jaxunlearn.models.hf_checkpoint import from_pretrained
from jaxunlearn.parallel import sharding
from tests.tiny_benchmarks import few_small_steps, write_muse
from tests.tiny_models import load_config_file, make_tokenizer, save_hf_model

REPO = Path(__file__).resolve().parent.parent
NEW = 5


@pytest.fixture(scope="module")
def muse_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("muse")
    tok = make_tokenizer()
    for name, seed in (("target", 0), ("retrained", 1)):
        save_hf_model("llama_gqa_tied", root / name, seed=seed)
        tok.save_pretrained(root / name)
    return {"root": root, "data": write_muse(root / "MUSE"), "target": root / "target", "retrained": root / "retrained"}


def rows(data: Path, config: str, split: str) -> list[dict]:
    return [json.loads(line) for line in (data / config / f"{split}.jsonl").read_text().splitlines()]


def reference(model_dir: Path, data: Path) -> dict:
    """MUSE's eval written out (muse_bench metrics/verbmem.py, knowmem.py, logger.py): greedy generate per prompt,
    decode, stop words, VerbMem's reference cut to its first NEW tokens, rouge-score without stemming."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)

    def answer(prompt: str, stop=()) -> str:
        ids = tok(prompt, add_special_tokens=True)["input_ids"]
        with torch.no_grad():
            x = torch.tensor([ids])  # an explicit mask: <unk> is id 0, which generate would take for padding
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW, do_sample=False)
        out = out[0, len(ids) :].tolist()
        if tok.eos_token_id in out:
            out = out[: out.index(tok.eos_token_id)]
        text = tok.decode(out, skip_special_tokens=True)
        for word in stop:
            text = text.split(word)[0]
        return text

    def score(pairs):
        s = [scorer.score(ref, pred)["rougeL"] for pred, ref in pairs]
        return {"rougeL_f1": np.mean([x.fmeasure for x in s]), "rougeL_recall": np.mean([x.recall for x in s])}

    def gt_short(gt: str) -> str:  # metrics/verbmem.py: the reference cut to max_new_tokens, BOS included
        gt_ids = tok(gt, return_tensors="pt", add_special_tokens=True).input_ids[:, :NEW]
        return tok.batch_decode(gt_ids, skip_special_tokens=True, clean_up_tokenization_spaces=True)[0]

    def min_40(text: str) -> float:  # metrics/privleak.py: compute_ppl, then inference's Min-40%
        input_ids = torch.tensor(tok.encode(text)).unsqueeze(0)
        with torch.no_grad():
            logits = model(input_ids, labels=input_ids).logits
        probabilities = torch.nn.functional.log_softmax(logits, dim=-1)
        all_prob = [probabilities[0, i, t].item() for i, t in enumerate(input_ids[0][1:])]
        return float(-np.mean(np.sort(all_prob)[: int(len(all_prob) * 0.4)]))

    def forget_holdout_auc() -> float:  # metrics/privleak.py eval: split0 = forget (label 0), split1 = holdout (1)
        from sklearn.metrics import auc, roc_curve

        forget = [min_40(r["text"]) for r in rows(data, "privleak", "forget")]
        holdout = [min_40(r["text"]) for r in rows(data, "privleak", "holdout")]
        y = np.array([0] * len(forget) + [1] * len(holdout))
        fpr, tpr, _ = roc_curve(y, -np.array(forget + holdout))
        return auc(fpr, tpr)

    verbmem = rows(data, "verbmem", "forget")
    assert all(len(tok(r["gt"])["input_ids"]) > NEW for r in verbmem)  # the cut matters
    out = {"verbmem_forget": score([(answer(r["prompt"]), gt_short(r["gt"])) for r in verbmem])}
    for side in ("forget", "retain"):
        icl = "".join(
            f"Question: {r['question']}\nAnswer: {r['answer']}\n\n" for r in rows(data, "knowmem", f"{side}_qa_icl")
        )
        qa = rows(data, "knowmem", f"{side}_qa")
        stop = ("\n\n", "\nQuestion", "Question:")
        out[f"knowmem_{side}"] = score(
            [(answer(f"{icl}Question: {r['question']}\nAnswer: ", stop), r["answer"]) for r in qa]
        )
    out["privleak"] = {"muse_auc": forget_holdout_auc()}
    return out


@pytest.mark.slow
def test_muse_criteria_equal_transformers_generate_and_rouge_score(muse_setup):
    mesh = sharding.single_device_mesh()
    lm, params = split_model(from_pretrained(muse_setup["target"], mesh=mesh, dtype="float32"))
    tok = AutoTokenizer.from_pretrained(muse_setup["target"])
    ctx = EvalContext(Evaluator(lm, mesh, batch_size=4, chunk_size=16), params, tok, {}, 0, 256, "unlearned")
    opts = {
        **{k: o.default for k, o in M.OPTIONS.items()},
        "path": str(muse_setup["data"]),
        "verbmem_new_tokens": NEW,
        "knowmem_new_tokens": NEW,
        "privleak_max_tokens": 1024,  # above the tiny model's 64 positions: MUSE scores each text whole
    }
    ours = M.muse(ctx, opts)
    theirs = reference(muse_setup["target"], muse_setup["data"])
    for key, values in theirs.items():
        for field, value in values.items():
            assert ours[key][field] == pytest.approx(value, abs=1e-9), (key, field)
    assert ours["verbmem_forget"]["n"] == 4 and ours["knowmem_retain"]["n"] == 4
    # PrivLeak's AUC: all 4 forget and 4 holdout texts, each whole (MUSE never cuts them)
    assert (ours["privleak"]["forget"], ours["privleak"]["holdout"], ours["privleak"]["truncated"]) == (4, 4, 0)
    assert abs(ours["privleak"]["muse_auc"] - 0.5) > 0.05  # so that 1 - AUC, the other scale, would fail
    assert M.privacy_leakage(ctx, {**opts, "privleak_max_tokens": 16})["truncated"] == 8  # longer ones are cut


def test_privleak_against_the_oracle_or_muses_constant_or_chance():
    """eval.py: (auc - AUC_RETRAIN) / AUC_RETRAIN * 100, both on MUSE's scale (constants.py: news 0.4772)."""
    theirs = lambda auc, retrain: (auc - retrain) / retrain * 100  # noqa: E731
    opts = {k: o.default for k, o in M.OPTIONS.items()}
    results = {name: {"muse": {"privleak": {"muse_auc": auc}}} for name, auc in (("unlearned", 0.3), ("oracle", 0.45))}
    M.add_privleak(results, opts)
    assert results["unlearned"]["muse"]["privleak"]["privleak"] == pytest.approx(theirs(0.3, 0.45))
    assert results["oracle"]["muse"]["privleak"]["privleak"] == pytest.approx(0.0)
    assert results["unlearned"]["muse"]["privleak"]["retrained_from"] == "oracle"
    given = {"unlearned": {"muse": {"privleak": {"muse_auc": 0.3}}}}
    M.add_privleak(given, {**opts, "retrained_auc": 0.4772})
    assert given["unlearned"]["muse"]["privleak"]["privleak"] == pytest.approx(theirs(0.3, 0.4772))
    alone = {"model": {"muse": {"privleak": {"muse_auc": 0.3}}}}
    M.add_privleak(alone, opts)
    assert alone["model"]["muse"]["privleak"]["privleak"] == pytest.approx(-40.0)  # against 0.5
    assert alone["model"]["muse"]["privleak"]["retrained_from"] == "chance"


def muse_config(muse_setup, method: str, cache: Path, *, oracle: bool = True):
    config = load_config_file(method, "muse_news")
    data = str(muse_setup["data"])
    assert (config.data.forget.name, config.data.forget.split) == ("raw", "forget")
    assert (config.data.retain.name, config.data.retain.split) == ("raw", "retain1")
    assert (config.data.approximate.name, config.data.approximate.split) == ("privleak", "holdout")
    config.model.path, config.model.dtype = str(muse_setup["target"]), "float32"
    config.evaluation.oracle_model = str(muse_setup["retrained"]) if oracle else ""
    for split in ("forget", "retain", "approximate", "eval_retain"):
        config.data[split].path = data
    config.data.max_length, config.data.cache_dir = 64, str(cache)
    config.evaluation.muse.update(path=data, verbmem_new_tokens=NEW, knowmem_new_tokens=NEW)
    return few_small_steps(config, 2)


@pytest.mark.slow
def test_the_muse_preset_runs_end_to_end_and_evaluate_reproduces_it(muse_setup, tmp_path):
    from jaxunlearn.run.engine import unlearn

    unlearn(muse_config(muse_setup, "npo_gd", tmp_path / "cache"), tmp_path / "run")
    report = json.loads((tmp_path / "run" / "report.json").read_text())["models"]
    for name in ("original", "unlearned", "oracle"):
        assert set(report[name]["muse"]) == {"verbmem_forget", "knowmem_forget", "knowmem_retain", "privleak"}
    assert report["oracle"]["muse"]["privleak"]["privleak"] == pytest.approx(0.0)  # against itself
    assert "privleak" not in report["unlearned"]["mia"]  # the one PrivLeak is MUSE's, on its sets
    assert "## MUSE" in (markdown := (tmp_path / "run" / "report.md").read_text()) and "C3 PrivLeak" in markdown

    data = muse_setup["data"]
    args = [
        sys.executable,
        "-m",
        "jaxunlearn.commands.evaluate",
        "--config=npo_gd:muse_news",
        f"--model={tmp_path / 'run'}",
        f"--workdir={tmp_path / 'eval'}",
        "--config.model.dtype=float32",
        "--config.data.max_length=64",
        f"--config.data.cache_dir={tmp_path / 'cache'}",
        f"--config.evaluation.muse.path={data}",
        f"--config.evaluation.muse.verbmem_new_tokens={NEW}",
        f"--config.evaluation.muse.knowmem_new_tokens={NEW}",
        "--config.mesh.fsdp=1",
    ] + [f"--config.data.{s}.path={data}" for s in ("forget", "retain", "approximate", "eval_retain")]
    env = {**os.environ, "XLA_FLAGS": "", "PYTHONPATH": str(REPO)}
    result = subprocess.run(args, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    evaluated = json.loads((tmp_path / "eval" / "report.json").read_text())["models"]["model"]["muse"]
    for key, values in report["unlearned"]["muse"].items():
        field = "muse_auc" if key == "privleak" else "rougeL_f1"
        assert evaluated[key][field] == pytest.approx(values[field], abs=1e-9)


@pytest.mark.slow
def test_scalability_takes_each_fold_and_sustainability_chains_the_runs(muse_setup, tmp_path):
    from jaxunlearn.experiments.muse_protocol import FOLDS, fold_config, run_muse

    assert FOLDS == (2, 3, 4)  # unlearn_news_scal.sh / _sust.sh: `for k in '2' '3' '4'`
    config = muse_config(muse_setup, "ga", tmp_path / "cache", oracle=False)
    config.evaluation.metrics = ("perplexity", "muse")
    scal = fold_config(config, "scal", 3, None)  # scal: the fold's forget set, from the target
    assert (scal.data.forget.name, scal.data.forget.split, scal.model.path) == ("scal", "forget_3", config.model.path)
    result = run_muse(config, str(tmp_path / "exp"), ["sust"], [2, 3])  # sust runs chain: each from the last
    assert [r["run"] for r in result["rows"]] == ["main", "sust forget_2", "sust forget_3"]
    record = lambda *p: json.loads((tmp_path / "exp").joinpath(*p, "run.json").read_text())  # noqa: E731
    first, second = record("sust", "forget_2"), record("sust", "forget_3")
    assert first["model"]["path"] == str(tmp_path / "exp" / "main" / "hf_model")  # the chain starts after main
    assert second["model"]["path"] == str(tmp_path / "exp" / "sust" / "forget_2" / "hf_model")
    assert "C4 KnowMem retain" in (tmp_path / "exp" / "muse.md").read_text()
    assert json.loads((tmp_path / "exp" / "muse.json").read_text())["rows"][0]["run"] == "main"


# MUSE's baselines/scripts/unlearn_news_scal.sh (and _sust.sh), transcribed: its methods and their epochs.
MUSE_STEP_ALGOS = ("ga", "ga_gdr", "ga_klr", "npo", "npo_gdr", "npo_klr")
MUSE_EPOCHS = ("1", "7", "10", "1", "10", "10")
# MUSE's method -> jaxunlearn's config.method (NPO's KL retain term is npo with a retain weight).
MUSE_METHODS = {
    "ga": {"name": "ga"},
    "ga_gdr": {"name": "ga_gd"},
    "ga_klr": {"name": "ga_kl"},
    "npo": {"name": "npo", "retain_weight": 0.0},
    "npo_gdr": {"name": "npo_gd"},
    "npo_klr": {"name": "npo", "retain_weight": 1.0},
}


@pytest.mark.parametrize(("algo", "epochs"), list(zip(MUSE_STEP_ALGOS, MUSE_EPOCHS, strict=True)))
def test_fold_runs_take_muses_epochs_per_method(algo, epochs):
    from jaxunlearn.config import base_config
    from jaxunlearn.experiments.muse_protocol import fold_config

    method = MUSE_METHODS[algo]
    config = base_config(method["name"], preset="muse_news")
    config.method.update(method)
    assert fold_config(config, "scal", 2, None).train.epochs == int(epochs)
