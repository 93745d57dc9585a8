"""The lm-evaluation-harness adapter against the internal scorer, torch and transformers."""

import json

import numpy as np
import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from jaxunlearn.evaluation.lm_eval_adapter import JaxUnlearnLM  # noqa: E402
from jaxunlearn.evaluation.loop import Evaluator  # noqa: E402
from jaxunlearn.evaluation.multiple_choice import encode_pair, load_task, score_task  # noqa: E402
from jaxunlearn.models import split_model  # noqa: E402
from jaxunlearn.models.hf_checkpoint import from_pretrained, load_tokenizer  # noqa: E402
from jaxunlearn.parallel import sharding  # noqa: E402
from tests.tiny_models import WORDS, make_tokenizer, save_hf_model  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    hf = save_hf_model("llama_gqa_tied", root / "model")
    make_tokenizer().save_pretrained(root / "model")
    lm, params = split_model(from_pretrained(root / "model", mesh=sharding.single_device_mesh(), dtype="float32"))
    evaluator = Evaluator(lm, batch_size=4)
    tokenizer = load_tokenizer(root / "model")
    rng = np.random.default_rng(0)
    items = []
    for _ in range(12):
        context = " ".join(rng.choice(WORDS, 6)) + " ="  # no trailing space; choices carry their own
        choices = [" " + " ".join(rng.choice(WORDS, rng.integers(1, 4))) for _ in range(4)]
        items.append({"context": context, "choices": choices, "gold": int(rng.integers(0, 4))})
    data = root / "items.jsonl"
    data.write_text("\n".join(json.dumps(x) for x in items))
    (root / "tasks").mkdir()
    (root / "tasks" / "tiny_mc.yaml").write_text(
        "task: tiny_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: '{{context}}'\n"
        "doc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{gold}}'\n"
        "target_delimiter: ''\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    adapter = JaxUnlearnLM(evaluator, params, tokenizer, max_length=64, max_gen_toks=8)
    return dict(root=root, hf=hf, evaluator=evaluator, params=params, tokenizer=tokenizer, adapter=adapter, data=data)


@pytest.mark.slow
def test_adapter_matches_internal_multiple_choice_scorer(setup):
    results = lm_eval.simple_evaluate(
        model=setup["adapter"],
        tasks=["tiny_mc"],
        task_manager=TaskManager(include_path=str(setup["root"] / "tasks")),
        log_samples=True,
    )
    harness = results["results"]["tiny_mc"]
    name, items = load_task(f"generic:{setup['data']}")
    evaluator, params = setup["evaluator"], setup["params"]
    ours = score_task(lambda pairs: evaluator.score_continuations(params, pairs, 64), setup["tokenizer"], items)
    assert harness["acc,none"] == pytest.approx(ours["acc"])
    assert harness["acc_norm,none"] == pytest.approx(ours["acc_norm"])
    # Per choice, the harness's log-likelihoods equal the internal scores of the same token pairs.
    for sample in results["samples"]["tiny_mc"]:
        item = items[sample["doc_id"]]
        pairs = [encode_pair(setup["tokenizer"], item.context, c) for c in item.choices]
        expected = [s for s, _ in evaluator.score_continuations(params, pairs, 64)]
        got = [r[0][0] for r in sample["resps"]]
        np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_loglikelihood_matches_torch(setup):
    tok, hf = setup["tokenizer"], setup["hf"]
    context, continuation = "the quick brown", " fox jumps"
    ((score, greedy),) = setup["adapter"].loglikelihood([Instance("loglikelihood", {}, (context, continuation), 0)])
    ctx, cont = encode_pair(tok, context, continuation)
    with torch.no_grad():
        logp = torch.log_softmax(hf(torch.tensor([ctx + cont])).logits.double(), -1)[0]
    expected = sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))
    assert score == pytest.approx(expected, abs=1e-4)
    argmax_ok = all(int(logp[len(ctx) - 1 + i].argmax()) == t for i, t in enumerate(cont))
    assert greedy == argmax_ok


def test_rolling_loglikelihood_matches_torch_across_windows(setup):
    tok, hf = setup["tokenizer"], setup["hf"]
    text = " ".join(WORDS * 2)  # longer than the 64-token window: several rolling windows
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > 64
    (total,) = setup["adapter"].loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    # Reference: every token scored once, each with at most 64 tokens of context (the harness's windows).
    prefix = tok.bos_token_id
    seq = [prefix] + ids
    expected = 0.0
    with torch.no_grad():
        for start in range(0, len(ids), 64):
            window_targets = ids[start : start + 64]
            ctx_start = max(0, start + len(window_targets) - 64)
            inputs = seq[ctx_start : start + len(window_targets)]
            logp = torch.log_softmax(hf(torch.tensor([inputs])).logits.double(), -1)[0]
            offset = start - ctx_start
            expected += sum(float(logp[offset + i, t]) for i, t in enumerate(window_targets))
    assert total == pytest.approx(expected, abs=1e-3)


def test_generate_until_matches_transformers(setup):
    tok, hf = setup["tokenizer"], setup["hf"]
    hf.generation_config.eos_token_id = None
    context = "machine unlearning of"
    (text,) = setup["adapter"].generate_until(
        [Instance("generate_until", {}, (context, {"until": ["\n"], "max_gen_toks": 8}), 0)]
    )
    ids = tok(context, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, pad_token_id=0)[0, len(ids) :]
    assert text == tok.decode(ref.tolist()).split("\n")[0]
