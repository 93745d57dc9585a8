"""MUSE's PrivLeak (C3) as its authors compute it, against a transcription of their code.

Transcribed from swj0419/muse_bench: ``metrics/privleak.py`` (``sweep``, and ``eval``'s AUC keys: split0 scored as
non-members with label 0, split1 as members with label 1, ``roc_curve(y, -ppl)``) and ``eval.py`` (``privleak =
(auc[key] - AUC_RETRAIN[key]) / AUC_RETRAIN[key] * 100`` for ``key = "forget_holdout_Min-40%"``). Its "Min-40%" of a
text is minus the mean of its 40% lowest token log-probabilities. scikit-learn computes the ROC curve, as there.
"""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import auc as sk_auc
from sklearn.metrics import roc_curve as sk_roc_curve

from jaxunlearn.evaluation import statistics as S
from jaxunlearn.evaluation.metrics.mia import add_privleak

# MUSE's constants.py: the retrained models' AUC (forget_holdout_Min-40%) for news and books.
MUSE_AUC_RETRAIN = {"news": 0.4772, "books": 0.5393}


def muse_min_k(logprobs: np.ndarray, ratio: float = 0.4) -> float:
    """``inference``'s ``Min-40%`` (muse_bench metrics/privleak.py)."""
    k_length = int(len(logprobs) * ratio)
    return float(-np.mean(np.sort(logprobs)[:k_length]))


def muse_forget_holdout_auc(forget: list[float], holdout: list[float]) -> float:
    """``eval``'s ``auc["forget_holdout_Min-40%"]``: forget as non-members (0), holdout as members (1)."""
    ppl = np.array(forget + holdout)
    y = np.array([0] * len(forget) + [1] * len(holdout))
    fpr, tpr, _ = sk_roc_curve(y, -ppl)
    return sk_auc(fpr, tpr)


def muse_privleak(auc_unlearned: float, auc_retrain: float) -> float:
    """muse_bench eval.py."""
    return (auc_unlearned - auc_retrain) / auc_retrain * 100


def test_muse_scale_is_one_minus_ours_on_real_min_k_scores():
    rng = np.random.default_rng(0)
    # per-text token log-probabilities; forget texts a little more likely (seen), some ties in the scores
    forget_texts = [rng.normal(-2.0, 1.0, rng.integers(20, 60)) for _ in range(40)]
    holdout_texts = [rng.normal(-2.4, 1.0, rng.integers(20, 60)) for _ in range(35)]
    forget = [round(muse_min_k(t), 1) for t in forget_texts]
    holdout = [round(muse_min_k(t), 1) for t in holdout_texts]
    theirs = muse_forget_holdout_auc(forget, holdout)
    # ours: forget = members, higher score = member (minus MUSE's Min-40%)
    ours = S.attack_summary(-np.array(forget), -np.array(holdout))["auc"]
    assert 0.6 < ours < 0.95  # the forget set looks familiar: on MUSE's scale that is an AUC below 0.5
    assert S.muse_auc(ours) == pytest.approx(theirs, abs=1e-12)


@pytest.mark.parametrize(
    ("auc_unlearned", "expected"),
    [(0.99, -97.9), (0.40, 25.7), (0.5228, 0.0)],  # the worked example (usual scale, AUC_r = 0.5228)
)
def test_privleak_of_the_worked_example(auc_unlearned, expected):
    oracle = {"mia": {"min_k_0.4": {"auc": 0.5228}}}
    results = {"oracle": oracle, "unlearned": {"mia": {"min_k_0.4": {"auc": auc_unlearned}}}}
    add_privleak(results, {"retrained_auc": 0.0, "privleak": True})
    leak = results["unlearned"]["mia"]["privleak"]
    theirs = muse_privleak(1 - auc_unlearned, 1 - 0.5228)
    assert leak["min_k_0.4"] == pytest.approx(theirs, abs=1e-9)
    assert round(leak["min_k_0.4"], 1) == expected
    assert leak["retrained_muse_auc"] == pytest.approx(0.4772) and leak["retrained_from"] == "oracle"
    assert results["oracle"]["mia"]["privleak"]["min_k_0.4"] == pytest.approx(0.0)


def test_a_published_retrained_auc_is_taken_on_muses_scale_and_chance_without_one():
    # MUSE's news constant 0.4772 is on MUSE's scale: the same as an oracle measured at 0.5228 on ours
    given = {"unlearned": {"mia": {"min_k_0.4": {"auc": 0.99}}}}
    add_privleak(given, {"retrained_auc": MUSE_AUC_RETRAIN["news"], "privleak": True})
    assert given["unlearned"]["mia"]["privleak"]["min_k_0.4"] == pytest.approx(muse_privleak(0.01, 0.4772))
    assert given["unlearned"]["mia"]["privleak"]["retrained_from"] == "given"
    # no oracle, no constant: open-unlearning's reference of 0.5
    alone = {"model": {"mia": {"min_k_0.4": {"auc": 0.75}}}}
    add_privleak(alone, {"retrained_auc": 0.0, "privleak": True})
    assert alone["model"]["mia"]["privleak"]["min_k_0.4"] == pytest.approx(muse_privleak(0.25, 0.5))  # -50
    assert alone["model"]["mia"]["privleak"]["retrained_from"] == "chance"
