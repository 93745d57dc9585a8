"""WMDP: the internal scorer's WMDP and MMLU prompts against lm-evaluation-harness's own task files (through the
lm-eval adapter, on the same local data), then the RMU preset end to end."""

import functools
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from tokenizers import processors
from transformers import AutoTokenizer

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.tasks import TaskManager  # noqa: E402

from jaxunlearn.evaluation.lm_eval_adapter import JaxUnlearnLM  # noqa: E402
from jaxunlearn.evaluation.loop import Evaluator  # noqa: E402
from jaxunlearn.evaluation.multiple_choice import (  # noqa: E402
    MMLU_CATEGORIES,
    WMDP_GROUP,
    WMDP_SUBJECTS,
    _about,
    encode_pair,
    load_task,
    mmlu_categories,
    score_task,
    weighted_mean,
)
from jaxunlearn.models import split_model  # noqa: E402
from jaxunlearn.models.hf_checkpoint import from_pretrained, load_tokenizer  # noqa: E402
from jaxunlearn.parallel import sharding  # noqa: E402
from tests.tiny_benchmarks import write_wmdp  # noqa: E402
from tests.tiny_models import load_config_file, make_tokenizer, save_hf_model  # noqa: E402

LM_EVAL_TASKS = Path(lm_eval.__file__).parent / "tasks"


# --- transcriptions of lm-evaluation-harness 0.4.13 (the pinned version), for the checks below ----------------------


def lm_eval_aggregate_subtask_metrics(metrics, sizes, weight_by_size=True):
    """Transcribed from EleutherAI/lm-evaluation-harness lm_eval/api/metrics.py ``aggregate_subtask_metrics``."""
    if not weight_by_size:
        sizes = [1] * len(sizes)
    assert len(metrics) == len(sizes)
    return sum([metric * size for metric, size in zip(metrics, sizes)]) / sum(sizes)


def lm_eval_group_acc(tree, results):
    """A group's ``acc`` as lm-eval's ``Group.aggregate`` (lm_eval/api/group.py) computes it: over the group's leaf
    tasks (``get_all_tasks``), ``aggregate_subtask_metrics(values, sample_len)``; ``tree`` maps a group to its
    children (groups or leaf task names), ``results`` a leaf task to ``(acc, sample_len)``."""

    def leaves(node):
        return [leaf for child in tree[node] for leaf in leaves(child)] if node in tree else [node]

    tasks = leaves("__root__")
    return lm_eval_aggregate_subtask_metrics([results[t][0] for t in tasks], [results[t][1] for t in tasks])


def lm_eval_tok_encode(tokenizer, string, add_special_tokens=None, add_bos_token=None):
    """Transcribed from lm_eval/models/huggingface.py ``HFLM.tok_encode`` (with lm_eval/models/utils.py
    ``_add_special_kwargs`` and ``has_bos_prefix``; ``prefix_token_id``: BOS, else EOS)."""
    if add_special_tokens is not None:
        special_tokens_kwargs = {"add_special_tokens": add_special_tokens}
    elif add_bos_token is not None:
        special_tokens_kwargs = {"add_special_tokens": add_bos_token}
    else:
        special_tokens_kwargs = {}
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if add_special_tokens is None and string.startswith(tokenizer.decode(prefix)):
        special_tokens_kwargs["add_special_tokens"] = False
    return tokenizer.encode(string, **special_tokens_kwargs)


def lm_eval_encode_request(tokenizer, context, continuation, add_bos_token=None):
    """Transcribed from lm_eval/api/model.py ``TemplateLM.loglikelihood`` (the empty context) and ``_encode_pair``
    (causal backend)."""
    encode = functools.partial(lm_eval_tok_encode, tokenizer, add_bos_token=add_bos_token)
    if context == "":
        continuation_enc = encode(continuation, add_special_tokens=False)
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if prefix != continuation_enc[0]:
            return [prefix], continuation_enc
        return continuation_enc[:1], continuation_enc[1:]
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole_enc = encode(context + continuation)
    context_enc = encode(context)
    return context_enc, whole_enc[len(context_enc) :]


def bos_tokenizer():
    """The tiny tokenizer with a Llama-style post-processor: BOS before every text it encodes by default."""
    tok = make_tokenizer()
    bos = tok.convert_tokens_to_ids("<s>")
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    assert tok.encode("the fox")[0] == bos and tok.encode("the fox", add_special_tokens=False)[0] != bos
    return tok


class FakeEvaluator:
    """Scores each (context, continuation) pair by a fixed pseudo-random number of its tokens: no model needed."""

    def __init__(self):
        self.pairs = []

    def score_continuations(self, params, pairs, max_length, *, desc=None):
        self.pairs += [(list(c), list(t)) for c, t in pairs]
        return [(score_of(c, t), False) for c, t in pairs]


def score_of(context, continuation):
    return float(np.random.default_rng(abs(hash((tuple(context), tuple(continuation)))) % 2**32).normal())


# --- 1. WMDP-Chem and the wmdp group; 2. MMLU's size-weighted groups --------------------------------------------


def test_group_scores_are_lm_evals_size_weighted_mean():
    rng = np.random.default_rng(3)
    accs, sizes = rng.uniform(0.2, 0.9, 3).tolist(), [1273, 408, 1987]  # WMDP's sizes: bio, chem, cyber
    expected = lm_eval_aggregate_subtask_metrics(accs, sizes)
    assert weighted_mean(accs, sizes) == pytest.approx(expected, rel=1e-12)
    assert weighted_mean(accs, sizes) != pytest.approx(np.mean(accs), rel=1e-3)  # not the plain mean
    assert weighted_mean(accs, sizes, weight_by_size=False) == pytest.approx(
        lm_eval_aggregate_subtask_metrics(accs, sizes, False), rel=1e-12
    )
    # the installed lm-eval's own function agrees with the transcription
    from lm_eval.api.metrics import aggregate_subtask_metrics

    assert aggregate_subtask_metrics(accs, sizes, True) == pytest.approx(expected, rel=1e-12)


def test_wmdp_group_and_mmlu_categories_match_lm_evals_task_files():
    """The group definitions are lm-eval's: ``wmdp`` = bio, chem, cyber with weight_by_size (tasks/wmdp/_wmdp.yaml,
    wmdp_*.yaml); MMLU's subjects in the categories its task files tag them with, each group weighted by size."""
    group = yaml.safe_load((LM_EVAL_TASKS / "wmdp" / "_wmdp.yaml").read_text())
    assert group["aggregate_metric_list"] == [{"metric": "acc", "aggregation": "mean", "weight_by_size": True}]
    configs = [
        yaml.safe_load((LM_EVAL_TASKS / "wmdp" / f"{t}.yaml").read_text())["dataset_name"] for t in group["task"]
    ]
    assert tuple(configs) == WMDP_GROUP
    chem = yaml.safe_load((LM_EVAL_TASKS / "wmdp" / "wmdp_chem.yaml").read_text())
    assert chem["description"] == _about(WMDP_SUBJECTS["wmdp-chem"])
    tags = {}
    for path in (LM_EVAL_TASKS / "mmlu" / "default").glob("mmlu_*.yaml"):
        spec = yaml.safe_load(path.read_text())
        tags[spec["dataset_name"]] = spec["tag"].removeprefix("mmlu_").removesuffix("_tasks")
    assert len(tags) == 57 and tags == MMLU_CATEGORIES
    for name in ("_mmlu", "_mmlu_stem", "_mmlu_other", "_mmlu_social_sciences", "_mmlu_humanities"):
        spec = yaml.safe_load((LM_EVAL_TASKS / "mmlu" / "default" / f"{name}.yaml").read_text())
        assert spec["aggregate_metric_list"][0]["weight_by_size"] is True


def test_mmlu_accuracy_over_all_items_is_lm_evals_mmlu_group():
    """lm-eval's ``mmlu`` number (groups of groups, weighted by size at each level) is the accuracy over all items,
    which the ``all`` configuration scores; a plain mean over the subjects is another number."""
    rng = np.random.default_rng(0)
    subjects = {s: {"n": int(rng.integers(100, 1600)), "acc": 0.0} for s in MMLU_CATEGORIES}
    correct = {}
    for s, r in subjects.items():
        correct[s] = int(rng.integers(0, r["n"]))
        r["acc"] = correct[s] / r["n"]
    tree = {"__root__": ["mmlu"], "mmlu": [f"mmlu_{c}" for c in ("stem", "other", "social_sciences", "humanities")]}
    for s, c in MMLU_CATEGORIES.items():
        tree.setdefault(f"mmlu_{c}", []).append(s)
    leaf = {s: (r["acc"], r["n"]) for s, r in subjects.items()}
    official = lm_eval_group_acc(tree, leaf)
    over_all_items = sum(correct.values()) / sum(r["n"] for r in subjects.values())
    assert official == pytest.approx(over_all_items, rel=1e-12)
    assert official != pytest.approx(np.mean([r["acc"] for r in subjects.values()]), rel=1e-3)
    ours = mmlu_categories(subjects)
    for category in ("stem", "other", "social_sciences", "humanities"):
        expected = lm_eval_group_acc({**tree, "__root__": [f"mmlu_{category}"]}, leaf)
        assert ours[f"mmlu_{category}"]["acc"] == pytest.approx(expected, rel=1e-12)
    assert weighted_mean([r["acc"] for r in ours.values()], [r["n"] for r in ours.values()]) == pytest.approx(
        official, rel=1e-12
    )


def test_tasks_metric_reports_wmdp_chem_the_wmdp_group_and_mmlu_categories(tmp_path):
    from jaxunlearn.config.presets import WMDP_TASKS
    from jaxunlearn.evaluation.metrics.tasks import tasks
    from jaxunlearn.evaluation.registry import EvalContext

    data = write_wmdp(tmp_path)
    specs = tuple(s.replace("cais/wmdp", str(data["wmdp"])).replace("cais/mmlu", str(data["mmlu"])) for s in WMDP_TASKS)
    assert "wmdp:cais/wmdp:wmdp-chem:test" in WMDP_TASKS
    tok = make_tokenizer()
    ctx = EvalContext(FakeEvaluator(), {}, tok, {}, 0, 64, "model")
    results = tasks(ctx, {"specs": specs, "max_items": 0, "add_bos_token": "default"})

    def acc_of(spec):  # independent: lm-eval's request encoding, the fake scores, argmax against the gold answer
        _, items = load_task(spec)
        hits = [
            int(np.argmax([score_of(*lm_eval_encode_request(tok, it.context, c)) for c in it.choices]) == it.gold)
            for it in items
        ]
        return np.mean(hits), len(hits), hits, items

    per = {spec.split(":")[-2]: acc_of(spec) for spec in specs}
    for config in WMDP_GROUP:
        assert results[f"wmdp:{config}"]["acc"] == pytest.approx(per[config][0]) and per[config][1] > 0
    assert results["wmdp"]["n"] == sum(per[c][1] for c in WMDP_GROUP) == 8 + 5 + 8
    assert results["wmdp"]["acc"] == pytest.approx(
        lm_eval_aggregate_subtask_metrics([per[c][0] for c in WMDP_GROUP], [per[c][1] for c in WMDP_GROUP])
    )
    _, _, hits, items = per["all"]
    by = {s: [h for h, it in zip(hits, items) if it.subject == s] for s in ("anatomy", "philosophy")}
    assert results["mmlu_stem"] == {"acc": pytest.approx(np.mean(by["anatomy"])), "n": 6}
    assert results["mmlu_humanities"] == {"acc": pytest.approx(np.mean(by["philosophy"])), "n": 4}
    assert "mmlu_other" not in results
    leaf = {s: (np.mean(h), len(h)) for s, h in by.items()}
    tree = {"__root__": ["mmlu"], "mmlu": ["mmlu_stem", "mmlu_humanities"], "mmlu_stem": ["anatomy"]}
    tree["mmlu_humanities"] = ["philosophy"]
    assert results["mmlu:all"]["acc"] == pytest.approx(lm_eval_group_acc(tree, leaf))
    # without chem there is no wmdp group (lm-eval's is over all three)
    partial = tasks(ctx, {"specs": (specs[0], specs[2]), "max_items": 0, "add_bos_token": "default"})
    assert "wmdp" not in partial and len(partial) == 2


# --- 3. BOS as lm-eval 0.4.13 adds it ---------------------------------------------------------------------------


@pytest.mark.parametrize("with_bos", [True, False])
@pytest.mark.parametrize("add_bos_token", [None, True, False])
def test_token_ids_are_lm_evals_hflm_tok_encode(tmp_path, with_bos, add_bos_token):
    (bos_tokenizer() if with_bos else make_tokenizer()).save_pretrained(tmp_path)
    tok = load_tokenizer(tmp_path)  # as jaxunlearn loads it
    # lm-eval's tokenizer: loaded with add_bos_token when it is set (lm_eval/models/huggingface.py _create_tokenizer)
    reference = AutoTokenizer.from_pretrained(
        tmp_path, **({} if add_bos_token is None else {"add_bos_token": add_bos_token})
    )
    cases = [
        ("the quick brown", " fox jumps"),
        ("the quick brown ", "fox"),  # trailing space moves to the continuation
        ("", " the lazy dog"),  # empty context: the prefix token
        ("<s> machine unlearning", " of"),  # already starts with BOS: none added
        ("Question: the fox\nA. dog\nAnswer:", " A"),
    ]
    for context, continuation in cases:
        expected = lm_eval_encode_request(reference, context, continuation, add_bos_token)
        assert encode_pair(tok, context, continuation, add_bos_token) == expected
        adapter = JaxUnlearnLM(object(), {}, tok, add_bos_token=add_bos_token)
        assert adapter._encode_pair(context.rstrip() or "x", continuation) == lm_eval_encode_request(
            reference, context.rstrip() or "x", continuation, add_bos_token
        )
        assert adapter.tok_encode(context) == lm_eval_tok_encode(reference, context, None, add_bos_token)
    ctx, _ = encode_pair(tok, "the quick brown", " fox", add_bos_token)
    adds = add_bos_token if add_bos_token is not None else with_bos  # None: the tokenizer's default
    assert (ctx[0] == tok.bos_token_id) == adds


def test_the_transcription_is_the_installed_lm_evals_tok_encode():
    """The transcription above against lm-eval 0.4.13's own ``HFLM.tok_encode``, called on a stand-in model."""
    from lm_eval.models.huggingface import HFLM

    tok = bos_tokenizer()
    for add_bos_token in (None, True, False):
        model = SimpleNamespace(tokenizer=tok, add_bos_token=add_bos_token, prefix_token_id=tok.bos_token_id)
        for text in ("the quick brown fox", "<s> the fox", " lazy dog"):
            for special in (None, True, False):
                got = HFLM.tok_encode(model, text, add_special_tokens=special)
                assert got == lm_eval_tok_encode(tok, text, special, add_bos_token)


@pytest.fixture(scope="module")
def wmdp_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("wmdp")
    save_hf_model("llama_gqa_tied", root / "model")
    make_tokenizer().save_pretrained(root / "model")
    lm, params = split_model(from_pretrained(root / "model", mesh=sharding.single_device_mesh(), dtype="float32"))
    return {
        "root": root,
        "model": root / "model",
        "evaluator": Evaluator(lm, batch_size=4),
        "params": params,
        "tokenizer": load_tokenizer(root / "model"),
        **write_wmdp(root / "data"),
    }


def harness_task(directory: Path, task: str, template: str, data: Path) -> str:
    """lm-eval's own task file and template, merged, with only the data set's path changed to the local copy."""
    spec = {
        **yaml.safe_load((LM_EVAL_TASKS / template).read_text()),
        **yaml.safe_load((LM_EVAL_TASKS / task).read_text()),
    }
    spec.pop("include", None)
    spec.pop("tag", None)
    name = spec["task"] = "local_" + spec["task"]
    spec["dataset_path"] = str(data)
    directory.mkdir(exist_ok=True)
    (directory / f"{name}.yaml").write_text(yaml.safe_dump(spec))
    return name


@pytest.mark.parametrize(
    ("spec", "task", "template", "data"),
    [
        ("wmdp:{}:wmdp-bio:test", "wmdp/wmdp_bio.yaml", "wmdp/_default_template_yaml", "wmdp"),
        ("wmdp:{}:wmdp-chem:test", "wmdp/wmdp_chem.yaml", "wmdp/_default_template_yaml", "wmdp"),
        ("wmdp:{}:wmdp-cyber:test", "wmdp/wmdp_cyber.yaml", "wmdp/_default_template_yaml", "wmdp"),
        ("mmlu:{}:anatomy:test", "mmlu/default/mmlu_anatomy.yaml", "mmlu/default/_default_template_yaml", "mmlu"),
    ],
)
@pytest.mark.slow
def test_prompts_equal_lm_evaluation_harness_task_files(wmdp_setup, tmp_path, spec, task, template, data):
    name = harness_task(tmp_path / "tasks", task, template, wmdp_setup[data])
    adapter = JaxUnlearnLM(wmdp_setup["evaluator"], wmdp_setup["params"], wmdp_setup["tokenizer"], max_length=128)
    results = lm_eval.simple_evaluate(
        model=adapter, tasks=[name], task_manager=TaskManager(include_path=str(tmp_path / "tasks")), log_samples=True
    )
    evaluator, params, tok = wmdp_setup["evaluator"], wmdp_setup["params"], wmdp_setup["tokenizer"]
    _, items = load_task(spec.format(wmdp_setup[data]))
    ours = score_task(lambda pairs: evaluator.score_continuations(params, pairs, 128), tok, items)
    assert results["results"][name]["acc,none"] == pytest.approx(ours["acc"])
    for sample in results["samples"][name]:  # the same context and continuations, token for token
        item = items[sample["doc_id"]]
        assert [a[0] for a in sample["arguments"]] == [item.context] * 4
        expected = [
            s
            for s, _ in evaluator.score_continuations(
                params, [encode_pair(tok, item.context, c) for c in item.choices], 128
            )
        ]
        np.testing.assert_allclose([r[0][0] for r in sample["resps"]], expected, rtol=1e-6)


@pytest.mark.slow
def test_the_rmu_wmdp_preset_runs_end_to_end(wmdp_setup, tmp_path):
    from jaxunlearn.run.engine import unlearn

    config = load_config_file("rmu", "wmdp")
    assert (config.data.forget.path, config.data.forget.name) == ("cais/wmdp-corpora", "cyber-forget-corpus")
    assert (config.data.retain.path, config.data.retain.name) == ("wikitext", "wikitext-2-raw-v1")
    assert config.train.max_steps == 80 and config.optim.lr == 5e-5 and config.method.layer == 7
    config.model.path, config.model.dtype = str(wmdp_setup["model"]), "float32"
    config.data.forget.path, config.data.retain.path = str(wmdp_setup["corpora"]), str(wmdp_setup["wikitext"])
    config.data.max_length, config.data.cache_dir = 32, str(tmp_path / "cache")
    config.method.update(layer=1, trainable_params=r"model\.layers\.[01]\.mlp\.down_proj\.weight")  # 3 layers
    config.evaluation.tasks.specs = tuple(
        s.replace("cais/wmdp", str(wmdp_setup["wmdp"])).replace("cais/mmlu", str(wmdp_setup["mmlu"]))
        for s in config.evaluation.tasks.specs
    )
    config.train.max_steps = 2
    config.mesh.fsdp, config.mesh.tensor = 4, 2
    unlearn(config, tmp_path / "run")
    report = json.loads((tmp_path / "run" / "report.json").read_text())["models"]
    for name in ("original", "unlearned"):
        tasks = report[name]["tasks"]
        assert {t.split(":")[-1] for t in tasks} == {
            *("wmdp-bio", "wmdp-chem", "wmdp-cyber", "wmdp", "all", "mmlu_stem", "mmlu_humanities")
        }
        assert all(0 <= t["acc"] <= 1 and t["n"] in (4, 5, 6, 8, 10, 21) for t in tasks.values())
    assert "## Multiple-choice tasks" in (tmp_path / "run" / "report.md").read_text()
    from jaxunlearn.commands.evaluate import evaluate  # what the evaluate command runs, on the unlearned model

    evaluated = evaluate(config, str(tmp_path / "run"), tmp_path / "eval")["models"]["model"]["tasks"]
    for task, values in report["unlearned"]["tasks"].items():
        assert evaluated[task]["acc"] == values["acc"] and evaluated[task].get("acc_norm") == values.get("acc_norm")
