"""MUSE's six criteria for one method (Shi et al. 2024, arXiv 2407.06460): the main run, scalability and
sustainability, as MUSE's scripts run them (``baselines/scripts/unlearn_news_scal.sh``, ``..._sust.sh``).

* ``main``: the config's run (C1 VerbMem, C2 KnowMem on the forget set, C3 PrivLeak, C4 KnowMem on the retain set);
* ``scal`` (C5, scalability): one run per fold ``k`` (2-4) of the data set's ``scal`` configuration, each
  unlearning the growing forget set ``forget_k`` from the target model (fold 1 is the main run's forget set);
* ``sust`` (C6, sustainability): successive requests, fold ``k`` (2-4) of ``sust`` unlearned from the model the
  previous request produced, the first from the main run's.

The fold runs train for MUSE's epochs of the method (:data:`FOLD_EPOCHS`: GA and NPO 1, GA+GD 7, the others 10).
MUSE starts the sustainability chain from the main run's checkpoint after that many epochs; here it starts from the
main run's exported model (the main run's own ``train.epochs``).

Every run is an ordinary resumable run in ``<workdir>/<criterion>/forget_<k>`` (``<workdir>/main``), evaluated with
the config's evaluation (the ``muse`` metric and PrivLeak against the oracle); ``muse.md`` and ``muse.json`` hold one
row per run with the four measured criteria (x 100, MUSE's scale) next to the target's and the retrained model's.
"""

from __future__ import annotations

import copy
import json
import math
from typing import Any

from jaxunlearn.experiments.runs import read_report
from jaxunlearn.run.engine import unlearn
from jaxunlearn.storage import locations

CRITERIA = ("scal", "sust")
FOLDS = (2, 3, 4)  # MUSE's scal and sust scripts: fold 1 is the main run's forget set
# MUSE's epochs per method in its scal/sust scripts (ga, ga_gdr, ga_klr, npo, npo_gdr, npo_klr), by jaxunlearn name.
FOLD_EPOCHS = {"ga": 1, "ga_gd": 7, "ga_kl": 10, "npo": 1, "npo_gd": 10}
DEFAULT_FOLD_EPOCHS = 10
PRIVLEAK = "min_k_0.4"


def criteria_row(report: dict, model: str) -> dict[str, Any]:
    """One model's MUSE numbers from a run's report (ROUGE-L F1 x 100; PrivLeak in %)."""
    m = report["models"][model]
    muse = m.get("muse", {})
    row = {k: 100 * muse[k]["rougeL_f1"] for k in ("verbmem_forget", "knowmem_forget", "knowmem_retain") if k in muse}
    leak = muse.get("privleak", {}).get("privleak", m.get("mia", {}).get("privleak", {}).get(PRIVLEAK))
    row["privleak"] = leak if leak is not None else math.nan
    row["forget_ppl"] = m["perplexity"]["forget"]["ppl"]
    return row


def fold_epochs(method: Any) -> int:
    """MUSE's epochs for a fold run of ``method`` (a ``config.method`` section): NPO with a retain term is MUSE's
    npo_klr (10), without one its npo (1)."""
    if method.name == "npo" and method.get("retain_weight", 0.0) > 0:
        return DEFAULT_FOLD_EPOCHS
    return FOLD_EPOCHS.get(method.name, DEFAULT_FOLD_EPOCHS)


def fold_config(config, criterion: str, fold: int, model_path: str | None):
    """The config of one scal/sust run: the fold's forget set, MUSE's epochs for the method (and, for sust, the
    previous run's model)."""
    c = copy.deepcopy(config)
    c.data.forget.update(path=config.evaluation.muse.path, name=criterion, split=f"forget_{fold}")
    c.train.epochs = fold_epochs(config.method)
    if model_path:
        c.model.path = model_path
    return c


def run_one(config, run_dir: str, label: str) -> tuple[dict[str, Any], dict]:
    """Run (or reuse) one unlearning run; its table row and report."""

    print(f"[muse] {label} -> {run_dir}", flush=True)
    unlearn(config, run_dir)
    report = read_report(run_dir)
    return {"run": label, "steps": report["stamp"]["steps"], **criteria_row(report, "unlearned")}, report


def run_muse(config, workdir: str, criteria: list[str], folds: list[int]) -> dict[str, Any]:
    """The main run, then every scal/sust fold; returns (and writes) the table."""
    if not config.evaluation.muse.path:
        raise ValueError("config.evaluation.muse.path is empty: use a MUSE preset (--config=<method>:muse_news)")
    base = locations.shown(workdir)
    locations.check(base, "--workdir")
    main, report = run_one(config, locations.join(base, "main"), "main")
    rows = [main]
    reference = {"target": criteria_row(report, "original")}
    if "oracle" in report["models"]:
        reference["retrained"] = criteria_row(report, "oracle")
    for criterion in criteria:
        previous = locations.join(base, "main", "hf_model") if criterion == "sust" else None  # after the main run
        for fold in folds:
            run_dir = locations.join(base, criterion, f"forget_{fold}")
            row, _ = run_one(fold_config(config, criterion, fold, previous), run_dir, f"{criterion} forget_{fold}")
            rows.append(row)
            if criterion == "sust":  # the next request starts from this run's output
                previous = locations.join(run_dir, "hf_model")
    result = {"method": config.method.name, "rows": rows, "reference": reference}
    import jax

    with locations.output_directory(base, "--workdir") as directory:
        if jax.process_index() == 0:
            (directory / "muse.json").write_text(json.dumps(result, indent=2))
            (directory / "muse.md").write_text(markdown(result))
    return result


COLUMNS = (
    ("verbmem_forget", "C1 VerbMem forget"),
    ("knowmem_forget", "C2 KnowMem forget"),
    ("privleak", "C3 PrivLeak %"),
    ("knowmem_retain", "C4 KnowMem retain"),
    ("forget_ppl", "forget ppl"),
)


def _cell(x: Any) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4g}"


def markdown(result: dict[str, Any]) -> str:
    header = "| run | steps | " + " | ".join(t for _, t in COLUMNS) + " |"
    lines = [f"# MUSE: {result['method']}", "", header, "|" + "---|" * (len(COLUMNS) + 2)]
    for name, row in result["reference"].items():
        lines.append(f"| {name} | - | " + " | ".join(_cell(row.get(k)) for k, _ in COLUMNS) + " |")
    for row in result["rows"]:
        lines.append(f"| {row['run']} | {row['steps']} | " + " | ".join(_cell(row.get(k)) for k, _ in COLUMNS) + " |")
    lines += [
        "",
        "ROUGE-L F1 x 100 (MUSE's scale). C1/C2: lower is less memorisation (the retrained model's level is the "
        "goal); C3: PrivLeak near 0 is the retrained model's; C4: higher keeps more utility. scal: growing forget "
        "sets from the target; sust: each fold unlearned from the previous run's model.",
        "",
    ]
    return "\n".join(lines)
