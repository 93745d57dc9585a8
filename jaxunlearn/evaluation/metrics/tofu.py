"""TOFU's evaluation (Maini et al. 2024, arXiv 2401.06121), with open-unlearning's definitions.

Four question-answer sets of the TOFU data set (``locuslab/TOFU``; each a ``*_perturbed`` configuration with
``question``, ``answer``, ``paraphrased_answer`` and ``perturbed_answer``, a list): the forget set, the retain
set, real authors and world facts. For each, with ``p(a | q) = exp(-mean NLL of a's tokens)`` (length-normalised;
the answer's tokens and EOS, after the prompt the question fills in ``template``):

* ``prob``: the mean ``p(answer | question)``; on real authors and world facts also ``prob_normalised``, the mean
  of ``p(answer) / (p(answer) + sum_j p(perturbed_j))``;
* ``rougeL_recall``: ROUGE-L recall (rouge-score, Porter stemming) of the greedy answer (``max_new_tokens``,
  cut at EOS) against the answer;
* ``truth_ratio``: per question ``R = p_wrong / p_right`` with ``p_right`` the paraphrased answer's probability
  (the answer's on real authors and world facts) and ``p_wrong = exp(-mean_j NLL_j)`` over the perturbed answers;
  reported as ``mean(min(R, 1/R))`` on the forget set (1 = cannot tell right from wrong) and ``mean(max(0, 1 - R))``
  elsewhere (1 = always prefers the right answer).

``model_utility`` is the harmonic mean of the nine values {prob (normalised on real authors and world facts),
ROUGE-L recall, truth ratio} x {retain, real authors, world facts}; ``forget_quality`` the p-value of the
two-sample Kolmogorov-Smirnov test between the model's forget-set truth ratios and those of a model trained
without the forget set: the run's oracle (``evaluation.oracle_model``: TOFU's retain model), or a retain model's
``TOFU_EVAL.json`` from open-unlearning (``retain_logs``), with the test's statistic as ``ks_statistic``. High
forget quality = indistinguishable from the retain model.

``template`` ``auto`` (the default) lays the questions out as open-unlearning does for the model
(:func:`jaxunlearn.data.qa.template_for_model`). ``question_key`` ``paraphrased_question`` asks the forget and
retain sets' paraphrased questions instead (open-unlearning's ``eval.tofu.question_key``: every forget and retain
metric, not real authors or world facts). ``max_items`` is TOFU's ``ds_size``: the first items of every set.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxunlearn.data import qa
from jaxunlearn.data.documents import load_records
from jaxunlearn.data.source import DocumentSource
from jaxunlearn.evaluation.registry import EvalContext, Option, register_metric
from jaxunlearn.evaluation.tables import fmt
from jaxunlearn.storage import locations

SETS = ("forget", "retain", "real_authors", "world_facts")
UTILITY_SETS = ("retain", "real_authors", "world_facts")
# The right answer a truth ratio compares the perturbed answers with.
RIGHT = {"forget": "paraphrased_answer", "retain": "paraphrased_answer"}
# The sets whose questions ``question_key`` picks (open-unlearning's forget_* and retain_* metric configs).
QUESTION_KEY_SETS = ("forget", "retain")
QUESTION_KEYS = ("question", "paraphrased_question")
WHERE = "config.evaluation.tofu.template"


def _check_template(value: str) -> bool:
    try:
        qa.check_template(value)
    except ValueError:
        return False
    return True


OPTIONS = {
    "path": Option("", None, "the TOFU data set (locuslab/TOFU or a local copy; '' = off)"),
    "forget": Option("forget10_perturbed", bool, "the forget set's configuration (e.g. forget05_perturbed)"),
    "retain": Option("retain_perturbed", bool, "a configuration name"),
    "real_authors": Option("real_authors_perturbed", bool, "a configuration name"),
    "world_facts": Option("world_facts_perturbed", bool, "a configuration name"),
    "template": Option(
        qa.AUTO, _check_template, "auto, chat[:SYSTEM PROMPT], or one {question} field and {answer} at its end"
    ),
    "question_key": Option("question", lambda v: v in QUESTION_KEYS, " or ".join(QUESTION_KEYS)),
    "max_new_tokens": Option(200, lambda v: v >= 1, ">= 1"),
    "max_items": Option(0, lambda v: v >= 0, ">= 0 (0 = all)"),
    "retain_logs": Option("", None, "a retain model's TOFU_EVAL.json (open-unlearning) or report.json"),
}


def load_set(options: Mapping[str, Any], name: str) -> list[dict[str, Any]]:
    """The question-answer records of one TOFU set (``split`` train of its configuration), its first ``max_items``
    (TOFU's ``ds_size``: ``select(range(min(ds_size, len)))``; 0 = all, as open-unlearning), the question asked
    under ``question``."""
    source = DocumentSource(label=f"tofu.{name}", path=options["path"], name=options[name], split="train")
    key = options["question_key"] if name in QUESTION_KEY_SETS else "question"
    columns = [key, "answer", "perturbed_answer"] + ([RIGHT[name]] if name in RIGHT else [])
    records = load_records(source, columns)
    records = records[: options["max_items"]] if options["max_items"] else records
    return [{**r, "question": r[key]} for r in records]


def answer_nll(ctx: EvalContext, template: str, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
    """Mean NLL ``[n]`` of each answer's tokens (and EOS) after its question's prompt."""
    scored = []
    for question, answer in pairs:
        ids, prompt_length = qa.question_answer_ids(ctx.tokenizer, template, question, answer, where=WHERE)
        scored.append((ids[:prompt_length], ids[prompt_length:]))
    sums = ctx.evaluator.score_continuations(ctx.params, scored, ctx.max_length, desc="tofu: answers")
    return np.asarray([-s / min(len(cont), ctx.max_length) for (s, _), (_, cont) in zip(sums, scored)])


def greedy_answers(ctx: EvalContext, template: str, questions: Sequence[str], max_new_tokens: int) -> list[str]:
    """The model's greedy answer to each question (cut at EOS, special tokens dropped)."""
    prompts = [qa.question_answer_ids(ctx.tokenizer, template, q, "", eos=False, where=WHERE) for q in questions]
    return ctx.generate_text([ids[:length] for ids, length in prompts], max_new_tokens)


def rouge_l_recall(predictions: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """ROUGE-L recall per pair, as TOFU and open-unlearning score answers (rouge-score with Porter stemming)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return np.asarray([scorer.score(ref, pred)["rougeL"].recall for pred, ref in zip(predictions, references)])


def truth_ratios(right_nll: np.ndarray, wrong_nll: np.ndarray) -> np.ndarray:
    """``R = exp(-mean_j NLL_wrong_j) / exp(-NLL_right)`` per question (``wrong_nll`` ``[n, k]``), with
    open-unlearning's 1e-10 in the denominator."""
    return np.exp(-wrong_nll.mean(axis=1)) / (np.exp(-right_nll) + 1e-10)


def harmonic_mean(values: Sequence[float]) -> float:
    """The harmonic mean (0 when any value is 0, as ``scipy.stats.hmean``)."""
    values = np.asarray(values, np.float64)
    return 0.0 if np.any(values == 0) else float(len(values) / np.sum(1.0 / values))


def evaluate_set(ctx: EvalContext, options: Mapping[str, Any], name: str) -> tuple[dict[str, Any], np.ndarray]:
    """One set's numbers, and its per-question truth ratios."""
    template, records = options["template"], load_set(options, name)
    questions = [r["question"] for r in records]
    perturbed = [list(r["perturbed_answer"]) for r in records]
    k = min(len(p) for p in perturbed)
    flat = [(q, a) for q, answers in zip(questions, perturbed) for a in answers[:k]]
    answer = answer_nll(ctx, template, [(q, r["answer"]) for q, r in zip(questions, records)])
    right = (
        answer_nll(ctx, template, [(q, r[RIGHT[name]]) for q, r in zip(questions, records)])
        if name in RIGHT
        else answer
    )
    wrong = answer_nll(ctx, template, flat).reshape(len(records), k)
    ratios = truth_ratios(right, wrong)
    generated = greedy_answers(ctx, template, questions, options["max_new_tokens"])
    out: dict[str, Any] = {
        "prob": float(np.mean(np.exp(-answer))),
        "rougeL_recall": float(np.mean(rouge_l_recall(generated, [r["answer"] for r in records]))),
        "n": len(records),
    }
    if name == "forget":
        out["truth_ratio"] = float(np.mean(np.minimum(ratios, 1.0 / (ratios + 1e-10))))
    else:
        out["truth_ratio"] = float(np.mean(np.maximum(0.0, 1.0 - ratios)))
    if name in ("real_authors", "world_facts"):
        p_right, p_wrong = np.exp(-answer), np.exp(-wrong).sum(axis=1)
        out["prob_normalised"] = float(np.mean(p_right / (p_right + p_wrong + 1e-10)))
    return out, ratios


def tofu(ctx: EvalContext, options: Mapping[str, Any]) -> dict[str, Any] | None:
    """``{forget, retain, real_authors, world_facts: {prob, rougeL_recall, truth_ratio, ...}, model_utility,
    forget_truth_ratios}`` (nothing without ``path``); ``forget_quality`` is added across models."""
    if not options["path"]:
        return None
    if options["template"] == qa.AUTO:
        options = {**options, "template": model_template(ctx)}
    out: dict[str, Any] = {}
    for name in SETS:
        out[name], ratios = evaluate_set(ctx, options, name)
        if name == "forget":
            out["forget_truth_ratios"] = ratios.tolist()
    components = []
    for name in UTILITY_SETS:
        prob = out[name].get("prob_normalised", out[name]["prob"])
        components += [prob, out[name]["rougeL_recall"], out[name]["truth_ratio"]]
    out["model_utility"] = harmonic_mean(components)
    return out


def model_template(ctx: EvalContext) -> str:
    """The TOFU format of the evaluated model (``template`` ``auto`` outside a run, which resolves it earlier)."""
    names = [getattr(ctx.tokenizer, "name_or_path", "")]
    hf = json.loads(ctx.evaluator.lm.config.hf_config_json or "{}")
    names.append(hf.get("_name_or_path", ""))
    return qa.template_for_model(ctx.evaluator.lm.config.model_type, ctx.tokenizer, names)


def reference_ratios(results: Mapping[str, Mapping[str, Any]], options: Mapping[str, Any]) -> list[float] | None:
    """The forget-set truth ratios of a model trained without the forget set: from ``retain_logs`` (open-unlearning's
    ``TOFU_EVAL.json``, or a jaxunlearn ``report.json``: its oracle's, or its one model's), else the oracle's."""
    if options["retain_logs"]:
        logs = json.loads(locations.read_text(options["retain_logs"], "config.evaluation.tofu.retain_logs"))
        if "forget_truth_ratio" in logs:  # open-unlearning
            return [v["score"] for v in logs["forget_truth_ratio"]["value_by_index"].values()]
        models = {name: m["tofu"] for name, m in logs.get("models", {}).items() if "tofu" in m}
        if "oracle" in models:  # a run's report: its retain model
            models = {"oracle": models["oracle"]}
        if len(models) != 1:
            raise ValueError(
                f"config.evaluation.tofu.retain_logs={options['retain_logs']!r}: expected open-unlearning's "
                "TOFU_EVAL.json, or a report.json with TOFU results of an oracle or of one model "
                f"(found {', '.join(models) or 'none'})"
            )
        return next(iter(models.values()))["forget_truth_ratios"]
    oracle = results.get("oracle", {}).get("tofu")
    return oracle["forget_truth_ratios"] if oracle else None


def add_forget_quality(results: dict[str, dict[str, Any]], options: Mapping[str, Any]) -> None:
    """``forget_quality`` of every model: the KS-test p-value of its forget truth ratios against the reference's;
    ``ks_statistic`` the test's statistic (the largest gap between the two empirical distributions)."""
    from scipy.stats import ks_2samp

    reference = reference_ratios(results, options)
    if reference is None:
        return
    for metrics in results.values():
        if "tofu" in metrics:
            test = ks_2samp(metrics["tofu"]["forget_truth_ratios"], reference)
            metrics["tofu"]["forget_quality"] = float(test.pvalue)
            metrics["tofu"]["ks_statistic"] = float(test.statistic)


ROWS = (
    ("forget_quality", None, "forget quality (KS p-value vs the retain model)"),
    ("ks_statistic", None, "KS statistic vs the retain model"),
    ("model_utility", None, "model utility (harmonic mean of 9)"),
    ("prob", "forget", "forget: p(answer)"),
    ("rougeL_recall", "forget", "forget: ROUGE-L recall"),
    ("truth_ratio", "forget", "forget: truth ratio, mean min(R, 1/R)"),
    ("prob", "retain", "retain: p(answer)"),
    ("rougeL_recall", "retain", "retain: ROUGE-L recall"),
    ("truth_ratio", "retain", "retain: truth ratio, mean max(0, 1 - R)"),
    ("prob_normalised", "real_authors", "real authors: p normalised over the options"),
    ("rougeL_recall", "real_authors", "real authors: ROUGE-L recall"),
    ("truth_ratio", "real_authors", "real authors: truth ratio"),
    ("prob_normalised", "world_facts", "world facts: p normalised over the options"),
    ("rougeL_recall", "world_facts", "world facts: ROUGE-L recall"),
    ("truth_ratio", "world_facts", "world facts: truth ratio"),
)


def report(results: Mapping[str, Mapping[str, Any]], options: Mapping[str, Any]) -> list[str]:
    names = list(results)
    lines = [
        "## TOFU",
        "",
        f"{next(iter(results.values()))['forget']['n']} forget questions ({options['forget']}); answers "
        f"generated greedily for up to {options['max_new_tokens']} tokens; forget and retain sets asked by "
        f"{options['question_key']}. Forget quality needs a retain model (the oracle, or "
        "evaluation.tofu.retain_logs).",
        "",
        "| measure | " + " | ".join(names) + " |",
        "|" + "---|" * (len(names) + 1),
    ]
    for key, section, title in ROWS:
        values = [(results[n].get(section, {}) if section else results[n]).get(key) for n in names]
        lines.append(f"| {title} | " + " | ".join(fmt(v, 4) for v in values) + " |")
    return lines + [""]


register_metric("tofu", report=report, options=OPTIONS, finalize=add_forget_quality, version=2)(tofu)
