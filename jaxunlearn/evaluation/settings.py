"""The ``evaluation`` config section: its defaults, the attack switch, and its own checks (the metrics list and each
metric's options). Checks that also read other sections (the stopping rule's split, the oracle) are
:mod:`jaxunlearn.config.validation`'s."""

from __future__ import annotations

from typing import Any

import ml_collections

from jaxunlearn.common.settings import parse_list
from jaxunlearn.errors import AT_LEAST_1, DTYPE_OR_DEFAULT, NON_NEGATIVE, check_rules, require
from jaxunlearn.evaluation.registry import registered

# The metrics a run computes by default, in report order (each is a module in jaxunlearn/evaluation/metrics/).
DEFAULT_METRICS = (
    "perplexity",
    "memorization",
    "mia",
    "quantization",
    "relearning",
    "verbatim",
    "tasks",
    "oracle_distance",
)
# ``evaluation.attacks``: one switch for the attacks on unlearning, each the value it adds to its metric's option.
ATTACKS = {
    "relearn": ("relearning", "corpora", "forget"),  # fine-tune on held-out forget documents
    "relearn_related": ("relearning", "corpora", "retain"),  # fine-tune on related text (the retain split)
    "int8": ("quantization", "schemes", "int8"),
    "int4": ("quantization", "schemes", "int4"),
    "nf4": ("quantization", "schemes", "nf4"),
}


def metric_options(evaluation: ml_collections.ConfigDict, name: str) -> dict[str, Any]:
    """``evaluation.<name>`` as plain values, with what ``evaluation.attacks`` adds to it (e.g. ``nf4`` to
    ``quantization.schemes``)."""
    options = evaluation[name].to_dict() if name in evaluation else {}
    for attack in parse_list(evaluation.get("attacks", "")):
        metric, option, value = ATTACKS[attack]
        if metric == name and value not in parse_list(options[option]):
            options[option] = ",".join(parse_list(options[option]) + [value])
    return options


def default_config() -> ml_collections.ConfigDict:
    e = ml_collections.ConfigDict(
        dict(
            enabled=True,  # evaluate before and after unlearning and write report.json / report.md
            metrics=DEFAULT_METRICS,
            dtype="",  # compute dtype of every evaluation (default: model.dtype; the official code: float32)
            every_steps=0,  # also measure perplexities every N steps (0 = never during the run)
            batch_size=8,
            max_chunks=0,  # chunks per split (0 = all)
            in_run_max_chunks=64,  # chunks per split for the evaluations during the run
            oracle_model="",  # a model retrained without the forget set: an "oracle" column and distances to it
            # Stop unlearning once forget perplexity reaches a target, checked every `stop_every_steps` steps
            # (0 = at every `every_steps` evaluation) on the forget split alone (and the approximate one with
            # stop_approx_reference="current"), which is cheaper than a full evaluation:
            stop_every_steps=0,
            stop_forget_ppl=0.0,  # an absolute target
            stop_approx_multiple=0.0,  # or this multiple of the approximate split's perplexity, measured
            stop_approx_reference="start",  # at the start of unlearning, or at each check ("current")
            pretraining_tokens=3.0e12,  # for the compute ratio (Yi-6B: 3T tokens)
            # Attacks on the forgetting, run on every model (original, unlearned, oracle): a comma-separated list
            # from ATTACKS, e.g. "relearn,relearn_related,nf4" (= their metrics' own options; '' = none).
            attacks="",
        )
    )
    for name, metric in registered().items():  # each metric's options, e.g. config.evaluation.mia.ks
        if metric.options:
            e[name] = ml_collections.ConfigDict(metric.defaults())
    return e


RULES = {
    "dtype": DTYPE_OR_DEFAULT,
    "batch_size": AT_LEAST_1,
    "in_run_max_chunks": AT_LEAST_1,
    "every_steps": NON_NEGATIVE,
    "max_chunks": NON_NEGATIVE,
    "stop_forget_ppl": (NON_NEGATIVE[0], ">= 0 (0 = off)"),
    "stop_approx_multiple": NON_NEGATIVE,
    "stop_approx_reference": (lambda v: v in ("start", "current"), "start or current"),
    "stop_every_steps": NON_NEGATIVE,
    "pretraining_tokens": NON_NEGATIVE,
}


def check_config(e: ml_collections.ConfigDict) -> None:
    """The ``evaluation`` section: its values, the metrics list, the attacks and each metric's options."""
    check_rules(e, "config.evaluation", RULES)
    metrics = registered()
    for name in e.metrics:
        # `--config.evaluation.metrics=a,b` arrives as ("a,b",): a tuple flag needs a Python literal
        hint = " (a list on the command line: \"--config.evaluation.metrics=('a','b')\")" if "," in name else ""
        require(
            name in metrics,
            "config.evaluation.metrics",
            e.metrics,
            f"{name!r} is not a metric; known: {', '.join(sorted(metrics))}{hint}",
        )
    for attack in parse_list(e.attacks):
        require(attack in ATTACKS, "config.evaluation.attacks", e.attacks, f"{attack!r} is not one of {tuple(ATTACKS)}")
    for name, metric in metrics.items():
        for option, spec in metric.options.items():
            value = e[name][option]
            if spec.check is not None:
                require(spec.check(value), f"config.evaluation.{name}.{option}", value, spec.requirement)
    if e.enabled and (e.stop_forget_ppl or e.stop_approx_multiple):
        require(
            e.every_steps > 0 or e.stop_every_steps > 0,
            "config.evaluation.every_steps",
            e.every_steps,
            "the stopping rule needs every_steps or stop_every_steps > 0",
        )
