"""WMDP: the internal scorer's WMDP and MMLU prompts against lm-evaluation-harness's own task files (through the
lm-eval adapter, on the same local data), then the RMU preset end to end."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.tasks import TaskManager  # noqa: E402

from jaxunlearn.evaluation.lm_eval_adapter import JaxUnlearnLM  # noqa: E402
from jaxunlearn.evaluation.loop import Evaluator  # noqa: E402
from jaxunlearn.evaluation.multiple_choice import encode_pair, load_task, score_task  # noqa: E402
from jaxunlearn.models import split_model  # noqa: E402
from jaxunlearn.models.hf_checkpoint import from_pretrained, load_tokenizer  # noqa: E402
from jaxunlearn.parallel import sharding  # noqa: E402
from tests.tiny_benchmarks import write_wmdp  # noqa: E402
from tests.tiny_models import load_config_file, make_tokenizer, save_hf_model  # noqa: E402

LM_EVAL_TASKS = Path(lm_eval.__file__).parent / "tasks"


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
        assert {t.split(":")[-1] for t in tasks} == {"wmdp-bio", "wmdp-cyber", "all"}
        assert all(0 <= t["acc"] <= 1 and t["n"] in (6, 8) for t in tasks.values())
    assert "## Multiple-choice tasks" in (tmp_path / "run" / "report.md").read_text()
    from jaxunlearn.commands.evaluate import evaluate  # what the evaluate command runs, on the unlearned model

    evaluated = evaluate(config, str(tmp_path / "run"), tmp_path / "eval")["models"]["model"]["tasks"]
    for task, values in report["unlearned"]["tasks"].items():
        assert evaluated[task]["acc"] == values["acc"] and evaluated[task]["acc_norm"] == values["acc_norm"]
