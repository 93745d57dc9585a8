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

    def evaluate(self, data: Path, question_key: str = "question") -> dict:
        """Every set's numbers; ``question_key`` is the forget and retain sets' question column."""
        out = {}
        for name, config in (
            ("forget", "forget10_perturbed"),
            ("retain", "retain_perturbed"),
            ("real_authors", "real_authors_perturbed"),
            ("world_facts", "world_facts_perturbed"),
        ):
            records = rows(data, config)
            if name in ("forget", "retain"):
                records = [{**r, "question": r[question_key]} for r in records]
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


@pytest.mark.slow
def test_tofu_on_paraphrased_questions_equals_transformers(tofu_setup):
    data = tofu_setup["data"]
    opts = {**options(data), "question_key": "paraphrased_question"}
    ours = our_results(tofu_setup["full"], "unlearned", opts)
    theirs = Reference(tofu_setup["full"]).evaluate(data, "paraphrased_question")
    asked = our_results(tofu_setup["full"], "unlearned", options(data))
    for split in T.SETS:
        for key, value in theirs[split].items():
            assert ours[split][key] == pytest.approx(value, rel=2e-4, abs=1e-6), (split, key)
    assert ours["forget"]["prob"] != pytest.approx(asked["forget"]["prob"], rel=1e-3)  # other questions, other p
    assert ours["real_authors"] == asked["real_authors"]  # real authors are asked their own questions


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


# --- the prompt format per model (issue 25, item 4) ------------------------------------------------------------


def byte_tokenizer(bos: bool, chat_template: str | None = None):
    """A byte-level BPE (as GPT-2/Phi/Llama 3 tokenizers: spaces are tokens of their own), adding BOS when ``bos``
    (as Llama's tokenizers), with ``chat_template``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from tests.tiny_models import WORDS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"], initial_alphabet=alphabet)
    tok.train_from_iterator([" ".join(WORDS) + " Question: Answer: [INST] [/INST]"] * 10, trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    out.chat_template = chat_template
    return out


# Tiny chat templates with each family's markers (and Llama 3's date line, Gemma's refusal of a system turn).
LLAMA3_CHAT = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{% if m['role'] == 'system' %}Today Date: {{ date_string }}\n\n{% endif %}{{ m['content'] }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
LLAMA2_CHAT = (
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token }}[INST] {{ m['content'] }} [/INST]"
    "{% else %} {{ m['content'] }} {{ eos_token }}{% endif %}{% endfor %}"
)
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PHI3_CHAT = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
GEMMA_CHAT = (
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

# template_args of locuslab/open-unlearning@d3d7cf9 configs/model/*.yaml (the keys preprocess_chat_instance reads),
# with each model's model_type, whether its tokenizer adds BOS, and its chat template (here a tiny one).
OU_MODELS = {
    "meta-llama/Llama-3.2-1B-Instruct": (
        "llama",
        True,
        LLAMA3_CHAT,
        {"apply_chat_template": True, "system_prompt": "You are a helpful assistant.", "date_string": "10 Apr 2025"},
    ),
    "meta-llama/Llama-2-7b-chat-hf": (
        "llama",
        True,
        LLAMA2_CHAT,
        {"apply_chat_template": False, "user_start_tag": "[INST] ", "user_end_tag": " [/INST]", "asst_start_tag": ""},
    ),
    "meta-llama/Llama-2-7b-hf": (
        "llama",
        True,
        None,
        {
            "apply_chat_template": False,
            "user_start_tag": "Question: ",
            "user_end_tag": "\n",
            "asst_start_tag": "Answer: ",
        },
    ),
    "microsoft/phi-1_5": (
        "phi",
        False,
        None,
        {
            "apply_chat_template": False,
            "user_start_tag": "Question: ",
            "user_end_tag": "\n",
            "asst_start_tag": "Answer: ",
        },
    ),
    "Qwen/Qwen2.5-1.5B-Instruct": (
        "qwen2",
        False,
        CHATML,
        {"apply_chat_template": True, "system_prompt": "You are a helpful assistant."},
    ),
    # Not in open-unlearning: ChatML on a Llama body, laid out as its Qwen2.5 config (apply_chat_template, system)
    "HuggingFaceTB/SmolLM2-135M-Instruct": (
        "llama",
        False,
        CHATML,
        {"apply_chat_template": True, "system_prompt": "You are a helpful assistant."},
    ),
    "microsoft/Phi-3.5-mini-instruct": (
        "phi3",
        False,
        PHI3_CHAT,
        {"apply_chat_template": True, "system_prompt": "You are a helpful assistant."},
    ),
    "HuggingFaceH4/zephyr-7b-beta": (
        "mistral",
        False,
        PHI3_CHAT,
        {"apply_chat_template": True, "system_prompt": "You are a helpful assistant.", "date_string": "10 Apr 2025"},
    ),
    "google/gemma-7b-it": ("gemma", True, GEMMA_CHAT, {"apply_chat_template": True}),
    # TOFU's own Llama-2-chat target (locuslab/tofu config/model_config.yaml llama2-7b: "[INST] ", " [/INST]", ""),
    # here with a tokenizer that carries no chat template: told apart by its name.
    "locuslab/tofu_ft_llama2-7b": (
        "llama",
        True,
        None,
        {"apply_chat_template": False, "user_start_tag": "[INST] ", "user_end_tag": " [/INST]", "asst_start_tag": ""},
    ),
}


def ou_preprocess_chat_instance(tokenizer, template_config, prompt, response):
    """``(chat_ids, prompt_ids)``, transcribed from locuslab/open-unlearning@d3d7cf9 src/data/utils.py
    ``preprocess_chat_instance`` for one question (no in-context examples, no truncation: short texts)."""
    if template_config["apply_chat_template"]:
        chat = []
        system_prompt = template_config.get("system_prompt", None)
        if system_prompt:
            chat += [{"role": "system", "content": system_prompt}]
        chat += [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        date_str = template_config.get("date_string", None)
        date_info = {"date_string": date_str} if date_str is not None else {}
        chat_ids = tokenizer.apply_chat_template(
            chat, tokenize=True, add_generation_prompt=False, return_dict=False, **date_info
        )
        prompt_ids = tokenizer.apply_chat_template(
            chat[:-1], tokenize=True, add_generation_prompt=True, return_dict=False, **date_info
        )
    else:
        wrapped_prompt = (
            template_config["user_start_tag"]
            + prompt
            + template_config["user_end_tag"]
            + template_config["asst_start_tag"]
        )
        chat_ids = tokenizer(wrapped_prompt + response, add_special_tokens=True)["input_ids"]
        prompt_ids = tokenizer(wrapped_prompt, add_special_tokens=True)["input_ids"]
    chat_ids = list(chat_ids)
    if chat_ids[-1] != tokenizer.eos_token_id:
        chat_ids += [tokenizer.eos_token_id]
    return chat_ids, list(prompt_ids)


@pytest.mark.parametrize("name", list(OU_MODELS))
def test_auto_format_gives_open_unlearnings_token_ids(name):
    from jaxunlearn.data import qa

    model_type, bos, chat_template, template_args = OU_MODELS[name]
    tok = byte_tokenizer(bos, chat_template)
    template = qa.template_for_model(model_type, tok, [name])
    for question, answer in (("the quick fox", "jumps over the lazy dog"), ("who removes documents?", "a model")):
        chat_ids, prompt_ids = ou_preprocess_chat_instance(tok, template_args, question, answer)
        ids, prompt_length = qa.question_answer_ids(tok, template, question, answer)
        assert (ids, prompt_length) == (chat_ids, len(prompt_ids)), (name, template)
        # Generation starts from open-unlearning's predict_with_generate input_ids, the prompt's tokens.
        prompt, length = qa.question_answer_ids(tok, template, question, "", eos=False)
        assert prompt[:length] == prompt_ids


def test_auto_format_of_an_unknown_model_is_a_one_line_error_naming_the_setting():
    from jaxunlearn.data import qa

    cases = [
        (
            "llama",
            byte_tokenizer(True, "{% for m in messages %}### {{ m['content'] }}\n{% endfor %}"),
            ["some/llama-chat"],
        ),  # a chat format no OU model has
        ("llama", byte_tokenizer(True), ["/models/checkpoint-1000"]),  # Llama, no chat template, no name to go by
        ("qwen2", byte_tokenizer(False), ["Qwen/Qwen2.5-1.5B"]),  # a base model outside open-unlearning's list
    ]
    for model_type, tok, names in cases:
        with pytest.raises(ValueError) as err:
            qa.template_for_model(model_type, tok, names, "config.data.qa_template")
        message = str(err.value)
        assert "\n" not in message and message.startswith("config.data.qa_template='auto': ")
        assert "set config.data.qa_template to its template" in message


def test_the_tofu_preset_resolves_auto_from_the_model_or_names_the_setting():
    from types import SimpleNamespace

    from jaxunlearn.config import ConfigError
    from jaxunlearn.data import qa
    from jaxunlearn.run.prepare import resolve_qa_templates

    config = load_config_file("ga_gd", "tofu")
    assert config.data.qa_template == "auto" and config.evaluation.tofu.template == "auto"
    config.model.path = "/models/llama-2-7b-chat"
    names = ["forget", "retain", "approximate"]
    llama = SimpleNamespace(model_type="llama", hf_config_json="{}")
    resolve_qa_templates(config, llama, byte_tokenizer(True), names)  # no chat template: its name says Llama-2-chat
    assert config.data.qa_template == config.evaluation.tofu.template == qa.LLAMA2_CHAT

    config = load_config_file("ga_gd", "tofu")
    config.model.path = "/models/checkpoint-1000"
    with pytest.raises(ConfigError, match=r"^config\.data\.qa_template='auto': .*set config\.data\.qa_template"):
        resolve_qa_templates(config, llama, byte_tokenizer(True), names)
    config.data.qa_template = qa.QUESTION_ANSWER  # given: only the metric's template is left to pick
    with pytest.raises(ConfigError, match=r"^config\.evaluation\.tofu\.template='auto': "):
        resolve_qa_templates(config, llama, byte_tokenizer(True), names)


def test_max_items_picks_the_items_tofus_ds_size_picks(tofu_setup):
    import datasets

    data = tofu_setup["data"]
    for ds_size in (4, 300):
        opts = {**options(data), "max_items": ds_size}
        for name in T.SETS:
            # locuslab/tofu evaluate_util.py get_dataloader: data.select(range(min(cfg.ds_size, len(data))))
            full = datasets.load_dataset("json", data_files=str(data / opts[name] / "train.jsonl"), split="train")
            picked = full.select(range(min(ds_size, len(full))))
            ours = T.load_set(opts, name)
            assert [r["question"] for r in ours] == picked["question"], (name, ds_size)
            assert [r["answer"] for r in ours] == picked["answer"]


class RecordingContext:
    """An EvalContext stand-in that records every prompt the metric scores or generates from."""

    def __init__(self, tokenizer):
        self.tokenizer, self.params, self.max_length, self.prompts = tokenizer, {}, 128, []
        self.evaluator = self

    def score_continuations(self, params, pairs, max_length, desc=None):
        self.prompts += [self.tokenizer.decode(context) for context, _ in pairs]
        return [(-float(len(c)), False) for _, c in pairs]

    def generate_text(self, prompts, max_new_tokens):
        self.prompts += [self.tokenizer.decode(p) for p in prompts]
        return ["the" for _ in prompts]


# The question each set is asked under question_key=paraphrased_question: locuslab/open-unlearning@d3d7cf9
# configs/eval/tofu_metrics/{forget,retain}_Q_A_{Prob,PARA_Prob,PERT_Prob,ROUGE}.yaml set
# question_key: ${eval.tofu.question_key}; ra_* and wf_* do not (they ask "question").
OU_QUESTION_KEY = {
    "forget": "paraphrased_question",
    "retain": "paraphrased_question",
    "real_authors": "question",
    "world_facts": "question",
}


def test_paraphrased_questions_are_asked_where_open_unlearning_asks_them(tofu_setup):
    data = tofu_setup["data"]
    tok = make_tokenizer()
    opts = {
        **options(data),
        "template": "Question: {question}\nAnswer: {answer}",
        "question_key": "paraphrased_question",
    }
    for name in T.SETS:
        ctx = RecordingContext(tok)
        T.evaluate_set(ctx, opts, name)
        records = rows(data, opts[name])
        asked = [tok.decode(tok(f"Question: {r[OU_QUESTION_KEY[name]]}\nAnswer:")["input_ids"]) for r in records]
        k = len(records[0]["perturbed_answer"])
        # answers, paraphrased answers (forget, retain), k perturbed answers each, then the generation prompts
        per_question = 1 + (name in T.RIGHT) + k + 1
        assert sorted(ctx.prompts) == sorted(asked * per_question), name
        if OU_QUESTION_KEY[name] != "question":
            assert not set(ctx.prompts) & {
                tok.decode(tok(f"Question: {r['question']}\nAnswer:")["input_ids"]) for r in records
            }


def test_ks_statistic_is_reported_next_to_forget_quality(tofu_setup, tmp_path):
    opts = options(tofu_setup["data"])
    ours = [0.1, 0.2, 0.3, 0.25, 0.15, 0.05, 0.9]
    reference = [0.5, 0.9, 1.3, 2.0, 0.7, 1.1, 0.2, 0.28]
    results = {
        "unlearned": {"tofu": {"forget_truth_ratios": ours}},
        "oracle": {"tofu": {"forget_truth_ratios": reference}},
    }
    T.add_forget_quality(results, opts)
    test = scipy.stats.ks_2samp(ours, reference)
    # The statistic by hand: the largest gap between the two empirical CDFs, over the pooled values.
    pooled = np.sort(ours + reference)
    cdf = lambda x: np.searchsorted(np.sort(x), pooled, side="right") / len(x)  # noqa: E731
    by_hand = float(np.max(np.abs(cdf(ours) - cdf(reference))))
    tofu = results["unlearned"]["tofu"]
    assert tofu["ks_statistic"] == pytest.approx(test.statistic) == pytest.approx(by_hand)
    assert tofu["forget_quality"] == pytest.approx(test.pvalue)
    assert results["oracle"]["tofu"]["ks_statistic"] == 0.0
    lines = T.report({"unlearned": {**tofu, "forget": {"n": 7}}}, opts)
    assert any(line.startswith("| KS statistic") and f"{by_hand:.4f}" in line for line in lines)
