"""RMU on WMDP's two forget corpora as the official code runs it (centerforaisafety/wmdp ``rmu/unlearn.py``
``run_rmu`` with ``rmu/utils.py`` ``get_data``): alternating bio and cyber batches of 4 documents in file order, each
document cut to its first tokens, Wikitext lines as retain batches, one control vector and alpha per topic."""

import json

import numpy as np
import pytest
from tokenizers import processors

from jaxunlearn.data.arrays import Chunks
from jaxunlearn.data.batches import StepBatcher
from tests.tiny_benchmarks import phrase
from tests.tiny_models import load_config_file, make_tokenizer, save_hf_model

# Small stand-ins for the official caps (512 bio, 768 cyber, 512 Wikitext), so that tiny documents are cut too.
BIO_CAP, CYBER_CAP, RETAIN_CAP = 12, 20, 16


def bos_tokenizer():
    """The tiny tokenizer with a Llama-style post-processor (BOS before every text, as Zephyr's tokenizer)."""
    tok = make_tokenizer()
    bos = tok.convert_tokens_to_ids("<s>")
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    return tok


def _texts(rng, words: list[int]) -> list[str]:
    return [phrase(rng, n) if n else "" for n in words]


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """A model directory with the BOS tokenizer; the bio corpus as the official ``data/bio-forget-corpus.jsonl``
    (``{"text": ...}`` lines), the cyber corpus and Wikitext's test split the same way, with empty documents and
    lines (dropped by the official ``len(text) > min_len``, ``min_len`` 0) and long ones (cut). (Wikitext is a file,
    not a directory laid out as the Hub data set: ``datasets`` caches such a directory by its name, ``wikitext``,
    and would read another test's copy.)"""
    root = tmp_path_factory.mktemp("wmdp_rmu")
    save_hf_model("llama_gqa_tied", root / "model")
    bos_tokenizer().save_pretrained(root / "model")
    rng = np.random.default_rng(7)
    bio = _texts(rng, [int(n) for n in rng.integers(1, 30, 34)])
    bio[3] = bio[17] = ""
    cyber = _texts(rng, [int(n) for n in rng.integers(1, 40, 41)])
    cyber[0] = ""
    wikitext = _texts(rng, [int(n) if n > 3 else 0 for n in rng.integers(0, 30, 60)])
    for name, texts in (("bio-forget-corpus", bio), ("cyber-forget-corpus", cyber), ("wikitext", wikitext)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return root


# --- a transcription of the official code ---------------------------------------------------------------------


def official_get_data(root, forget_corpora, retain_corpora, min_len=0, max_len=2000, batch_size=4):
    """centerforaisafety/wmdp ``rmu/utils.py`` ``get_data`` (``min_len`` 0 as ``rmu/unlearn.py`` passes it), reading
    ``data/{name}.jsonl`` and Wikitext from the local copies. One change: the official code keeps each line of the
    cyber file raw (``raw_text = line``: the JSON markup and the newline are in the text); here it is read as the
    bio one (``json.loads(line)['text']``), as jaxunlearn reads every JSON-lines corpus (docs/differences.md)."""
    from datasets import load_dataset

    def get_dataset(name):
        data = []
        if name == "wikitext":
            # load_dataset("wikitext", "wikitext-2-raw-v1", split="test"), from the local copy of that split
            raw_data = load_dataset("json", data_files=str(root / "wikitext.jsonl"), split="train")
            for x in raw_data:
                if len(x["text"]) > min_len:
                    data.append(str(x["text"]))
        else:
            for line in open(root / f"{name}.jsonl"):
                raw_text = json.loads(line)["text"]
                if len(raw_text) > min_len:
                    data.append(str(raw_text))
        data = [data[i : i + batch_size] for i in range(0, len(data), batch_size)]
        return data

    return ([get_dataset(c) for c in forget_corpora], [get_dataset(c) for c in retain_corpora])


def official_batches(root, tokenizer, max_num_batches=80):
    """``rmu/unlearn.py``: ``load_model``'s tokenizer settings (EOS as padding, on the left), then ``run_rmu``'s loop:
    step ``idx`` takes topic ``idx % 2``'s batch ``idx // 2`` and retain batch ``idx // 2``, tokenised with
    ``truncation=True`` on the right at ``512 if topic_idx == 0 else 768`` (retain: 512) tokens."""
    tokenizer.pad_token_id = tokenizer.eos_token_id
    tokenizer.padding_side = "left"
    forget_data_list, retain_data_list = official_get_data(
        root, ["bio-forget-corpus", "cyber-forget-corpus"], ["wikitext", "wikitext"]
    )
    num_batches = min(
        max_num_batches,
        min([len(f) for f in forget_data_list]),
        min([len(r) for r in retain_data_list]),
    )
    tokenizer.truncation_side = "right"
    steps = []
    for idx in range(num_batches):
        topic_idx = idx % len(forget_data_list)
        batch_idx = idx // len(forget_data_list)
        unlearn_batch = forget_data_list[topic_idx][batch_idx]
        retain_batch = retain_data_list[topic_idx][batch_idx]
        max_length = BIO_CAP if topic_idx == 0 else CYBER_CAP  # 512 if topic_idx == 0 else 768
        unlearn_inputs = tokenizer(
            unlearn_batch, return_tensors="np", padding=True, truncation=True, max_length=max_length
        )
        retain_inputs = tokenizer(
            retain_batch, return_tensors="np", padding=True, truncation=True, max_length=RETAIN_CAP
        )
        steps.append((topic_idx, unlearn_inputs, retain_inputs))
    return steps


def _rows(tokens, mask):
    """Each row's real tokens (the official batches are left-padded, ours right-padded)."""
    return [t[m.astype(bool)].tolist() for t, m in zip(tokens, mask)]


def test_two_topic_batches_are_the_official_get_data_and_schedule(corpora):
    """The ``rmu:wmdp_bio_cyber`` preset, prepared on the tiny corpora (bio as ``data.forget``, cyber as
    ``data.forget2``): every step's forget batch (token ids and topic) and retain batch equal the official code's."""
    from jaxunlearn.run.prepare import prepare

    official = official_batches(corpora, bos_tokenizer())
    assert len(official) >= 8 and any(u["input_ids"].shape[1] == CYBER_CAP for _, u, _ in official)
    config = load_config_file("rmu", "wmdp_bio_cyber")
    assert config.data.first_tokens == (512, 768) and config.train.max_steps == 80
    assert (
        config.data.forget2.name == "cyber-forget-corpus" and config.data.forget.path == "cais/wmdp-bio-forget-corpus"
    )
    config.model.path, config.model.dtype = str(corpora / "model"), "float32"
    config.method.update(layer=1, trainable_params=r"model\.layers\.[01]\.mlp\.down_proj\.weight")
    d = config.data
    d.forget.update(path=str(corpora / "bio-forget-corpus.jsonl"), split="")
    d.forget2.update(path=str(corpora / "cyber-forget-corpus.jsonl"), name="", split="")
    d.retain.update(path=str(corpora / "wikitext.jsonl"), name="", split="")
    d.first_tokens, d.max_length, d.cache_dir = (BIO_CAP, CYBER_CAP), RETAIN_CAP, str(corpora / "cache")
    config.evaluation.enabled = False
    config.train.max_steps = len(official)
    config.mesh.fsdp, config.mesh.tensor = 4, 2
    prep = prepare(config)
    assert prep.total_steps == len(official)
    for step, (topic, unlearn_inputs, retain_inputs) in enumerate(official):
        batch = prep.batcher.batch(step)
        forget, retain = batch["forget"], batch["retain"]
        assert forget["tokens"].shape[:2] == (1, 4) and forget["tokens"].shape[2] == CYBER_CAP
        assert (forget["topic"] == topic).all() and (retain["topic"] == topic).all()
        assert _rows(forget["tokens"][0], forget["mask"][0]) == _rows(
            unlearn_inputs["input_ids"], unlearn_inputs["attention_mask"]
        ), step
        assert _rows(retain["tokens"][0], retain["mask"][0]) == _rows(
            retain_inputs["input_ids"], retain_inputs["attention_mask"]
        ), step
    assert prep.batcher.batch(3)["forget"]["tokens"].tobytes() == prep.batcher.batch(3)["forget"]["tokens"].tobytes()


def _chunks(n: int, width: int = 4, offset: int = 0) -> Chunks:
    tokens = (np.arange(n * width, dtype=np.int32).reshape(n, width) + offset) % 1000
    return Chunks(tokens, np.full(n, width, np.int32), np.arange(n, dtype=np.int32), n)


def test_two_topic_batcher_alternates_in_file_order_and_cycles_each_set():
    """Step s: topic s % 2, that topic's batch s // 2 (in order, starting over past its last full batch), retain batch
    s // 2 cycling over the retain set; a pure function of the step, so a resumed run sees the same batches."""
    bio, cyber, retain = _chunks(9), _chunks(13, offset=500), _chunks(10, offset=900)
    b = StepBatcher(bio, retain, 2, 2, seed=3, forget2=cyber)
    assert b.chunks_per_step == 4 and b.steps_per_epoch == 4  # 2 full bio batches, 3 cyber: 2 x 2 steps
    expected = {0: (0, [0, 1, 2, 3]), 1: (1, [0, 1, 2, 3]), 2: (0, [4, 5, 6, 7]), 3: (1, [4, 5, 6, 7])}
    expected |= {4: (0, [0, 1, 2, 3]), 5: (1, [8, 9, 10, 11]), 7: (1, [0, 1, 2, 3])}
    for step, (topic, index) in expected.items():
        batch = b.batch(step)
        chunks = (bio, cyber)[topic]
        np.testing.assert_array_equal(batch["forget"]["tokens"].reshape(4, -1), chunks.tokens[index])
        np.testing.assert_array_equal(batch["forget"]["chunk_id"].ravel(), np.asarray(index) + topic * len(bio))
        assert (batch["forget"]["topic"] == topic).all() and batch["forget"]["topic"].shape == (2, 2)
        retain_index = (step // 2 * 4 + np.arange(4)) % len(retain)
        np.testing.assert_array_equal(batch["retain"]["tokens"].reshape(4, -1), retain.tokens[retain_index])
    again = StepBatcher(bio, retain, 2, 2, seed=99, forget2=cyber)  # no shuffling: the seed plays no part
    for step in range(12):
        for split in ("forget", "retain"):
            for key, value in b.batch(step)[split].items():
                np.testing.assert_array_equal(again.batch(step)[split][key], value)
    one = StepBatcher(bio, retain, 2, 2, seed=3)  # one topic: no topic key, shuffled as before
    assert "topic" not in one.batch(0)["forget"] and "topic" not in one.batch(0)["retain"]


def test_first_tokens_chunks_are_the_tokenizers_truncation_of_every_non_empty_document():
    from jaxunlearn.data.chunks import tokenize_and_chunk

    tok = bos_tokenizer()
    tok.truncation_side = "left"  # the official script sets "right" for its loop; so does first_only
    docs = ["the quick brown fox jumps over the lazy dog " * 3, "", "dog", "machine unlearning of models"]
    chunks = tokenize_and_chunk(docs, tok, 6, min_tokens=5, first_only=True, pad_id=tok.eos_token_id)
    assert tok.truncation_side == "left"
    expected = [tok(d, truncation=True, max_length=6)["input_ids"] for d in docs if d]
    assert chunks.doc_index.tolist() == [0, 2, 3] and chunks.num_documents == 4
    assert _rows(chunks.tokens, chunks.mask) == [tok(d)["input_ids"][:6] for d in docs if d]
    tok.truncation_side = "right"
    assert _rows(chunks.tokens, chunks.mask) == [tok(d, truncation=True, max_length=6)["input_ids"] for d in docs if d]
    assert expected != _rows(chunks.tokens, chunks.mask)  # left truncation would have kept the ends


def _cli(corpora, workdir, *extra, env=None):
    """The main command with the ``rmu:wmdp_bio_cyber`` preset on the tiny corpora (one CPU device)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    args = [
        *(sys.executable, "-m", "jaxunlearn.main", f"--config={repo / 'configs' / 'rmu.py'}:wmdp_bio_cyber"),
        f"--workdir={workdir}",
        *(f"--config.model.path={corpora / 'model'}", "--config.model.dtype=float32", "--config.method.layer=1"),
        r"--config.method.trainable_params=model\.layers\.[01]\.mlp\.down_proj\.weight",
        *("--config.method.steering_coeff2=4.0", "--config.method.retain_weight2=300.0"),
        *(f"--config.data.forget.path={corpora / 'bio-forget-corpus.jsonl'}", "--config.data.forget.split="),
        f"--config.data.forget2.path={corpora / 'cyber-forget-corpus.jsonl'}",
        *("--config.data.forget2.name=", "--config.data.forget2.split="),
        f"--config.data.retain.path={corpora / 'wikitext.jsonl'}",
        *("--config.data.retain.name=", "--config.data.retain.split="),
        f"--config.data.first_tokens=({BIO_CAP},{CYBER_CAP})",
        *(f"--config.data.max_length={RETAIN_CAP}", f"--config.data.cache_dir={corpora / 'cache'}"),
        *("--config.evaluation.enabled=False", "--config.train.max_steps=4", "--config.checkpoint.every_steps=2"),
        *extra,
    ]
    full_env = {**os.environ, "XLA_FLAGS": "", "PYTHONPATH": str(repo), **(env or {})}
    return subprocess.run(args, capture_output=True, text=True, env=full_env, cwd=repo, timeout=300)


@pytest.mark.slow
def test_the_two_topic_wmdp_preset_trains_and_resumes_to_the_same_model(corpora, tmp_path):
    """The whole run from the command line (per-topic hyper-parameters and first-token caps as flags) on two topics:
    killed after step 3 and resumed from the step-2 checkpoint, it ends with the uninterrupted run's parameters, bit
    for bit (each step's batch, topic included, is a function of the step)."""
    from safetensors.numpy import load_file

    straight = _cli(corpora, tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    lines = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4]
    assert all(np.isfinite(x["rmu_forget"]) and np.isfinite(x["rmu_retain"]) for x in lines)
    record = json.loads((tmp_path / "straight" / "run.json").read_text())
    assert set(record["data"]["sources"]) == {"forget", "forget2", "retain"}
    assert record["config"]["data"]["first_tokens"] == [BIO_CAP, CYBER_CAP]

    killed = _cli(corpora, tmp_path / "resumed", env={"JAXUNLEARN_FAULT_KILL_AFTER_STEP": "3"})
    assert killed.returncode == -9
    resumed = _cli(corpora, tmp_path / "resumed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming rmu from step 2 of 4" in resumed.stderr
    a = load_file(tmp_path / "straight" / "hf_model" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "hf_model" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
