"""The evaluation loop and metrics against torch forwards, scikit-learn, rouge-score and hand computations."""

import json
import math
import zlib

import numpy as np
import pytest
import torch
from rouge_score import rouge_scorer
from sklearn.metrics import roc_auc_score, roc_curve

from jaxunlearn.evaluation import statistics as M
from jaxunlearn.evaluation.loop import Evaluator
from jaxunlearn.models import split_model
from jaxunlearn.models.hf_checkpoint import from_pretrained
from jaxunlearn.parallel import sharding
from tests.tiny_models import padded_batch, save_hf_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval") / "model"
    hf = save_hf_model("qwen2_bias_tied", path)
    return path, hf


def _torch_logp(hf, tokens, mask):
    with torch.no_grad():
        logits = hf(input_ids=torch.from_numpy(tokens), attention_mask=torch.from_numpy(mask)).logits.double()
    return torch.log_softmax(logits, -1).numpy()


def test_token_stats_and_perplexity_match_torch(tiny):
    path, hf = tiny
    lm, params = split_model(from_pretrained(path, mesh=sharding.single_device_mesh(), dtype="float32"))
    tokens, mask = padded_batch(seed=4, batch=5, length=12)
    stats = Evaluator(lm, batch_size=2, chunk_size=5).token_stats(params, tokens, mask)  # 3 batches, last padded
    logp = _torch_logp(hf, tokens, mask)[:, :-1]
    nxt = tokens[:, 1:]
    valid = (mask[:, 1:] & mask[:, :-1]).astype(bool)
    true_lp = np.take_along_axis(logp, nxt[..., None], -1)[..., 0]
    np.testing.assert_array_equal(stats["target_mask"][:, :-1], valid)
    np.testing.assert_allclose(stats["logprob"][:, :-1][valid], true_lp[valid], atol=2e-5)
    np.testing.assert_array_equal(stats["is_argmax"][:, :-1][valid], (logp.argmax(-1) == nxt)[valid])
    p = np.exp(logp)
    mean = (p * logp).sum(-1)
    std = np.sqrt((p * (logp - mean[..., None]) ** 2).sum(-1))
    np.testing.assert_allclose(stats["mean"][:, :-1][valid], mean[valid], atol=2e-5)
    np.testing.assert_allclose(stats["std"][:, :-1][valid], std[valid], atol=2e-5)

    # Perplexity by hand: the official per-chunk mean, and the token-weighted one.
    chunk_nll = [-true_lp[i][valid[i]].mean() for i in range(len(tokens))]
    ppl = M.perplexity_metrics(stats)
    assert ppl["ppl"] == pytest.approx(math.exp(np.mean(chunk_nll)), rel=1e-5)
    assert ppl["ppl_token"] == pytest.approx(math.exp(-true_lp[valid].mean()), rel=1e-5)
    assert ppl["tokens"] == valid.sum() and ppl["chunks"] == 5
    assert ppl["ppl"] != pytest.approx(ppl["ppl_token"], rel=1e-6)  # the two definitions really differ here


def test_perplexity_pass_and_cpu_chunks_change_no_value(tiny):
    """The perplexity-only pass (no moments) and the run's CPU-sized logits chunks give the numbers of the full
    pass over whole sequences."""
    from jaxunlearn.config import base_config
    from jaxunlearn.evaluation.loop import CPU_CHUNK_ROWS

    path, _ = tiny
    mesh = sharding.single_device_mesh()
    lm, params = split_model(from_pretrained(path, mesh=mesh, dtype="float32"))
    tokens, mask = padded_batch(seed=6, batch=6, length=12)
    whole = Evaluator(lm, batch_size=6, chunk_size=1024).token_stats(params, tokens, mask)
    config = base_config("ga")
    config.evaluation.batch_size = CPU_CHUNK_ROWS // 4  # 4 positions per chunk: 3 chunks of a 12-token sequence
    run_evaluator = Evaluator.for_run(lm, mesh, config)
    assert run_evaluator.chunk_size == 4
    light = run_evaluator.token_stats(params, tokens, mask, moments=False)
    assert set(light) == {"logprob", "is_argmax", "target_mask"}
    np.testing.assert_allclose(light["logprob"], whole["logprob"], atol=1e-5)
    np.testing.assert_array_equal(light["is_argmax"], whole["is_argmax"])
    full = run_evaluator.token_stats(params, tokens, mask)
    for key in ("mean", "std"):
        np.testing.assert_allclose(full[key], whole[key], atol=1e-5)


def test_is_argmax_counts_a_tie_for_the_top():
    """Hand-made logits: tokens 1 and 3 tie for the maximum, so greedy decoding may emit either."""
    import jax.numpy as jnp

    from jaxunlearn.models import losses

    hidden = jnp.ones((1, 3, 1), jnp.float32)
    head = jnp.array([[0.0, 2.0, 1.0, 2.0]], jnp.float32)  # logits [0, 2, 1, 2] at every position
    stats = losses.vocabulary_stats(hidden, head, jnp.array([[1, 3, 2]]))
    np.testing.assert_array_equal(stats["is_argmax"], [[True, True, False]])
    logp = np.array([0.0, 2.0, 1.0, 2.0]) - np.log(np.exp([0.0, 2.0, 1.0, 2.0]).sum())
    np.testing.assert_allclose(stats["logprob"][0], logp[[1, 3, 2]], atol=1e-6)
    mean = (np.exp(logp) * logp).sum()
    np.testing.assert_allclose(stats["mean"][0], mean, atol=1e-6)
    np.testing.assert_allclose(stats["std"][0], np.sqrt((np.exp(logp) * (logp - mean) ** 2).sum()), atol=1e-6)


def test_sharded_evaluation_equals_one_device(tiny):
    path, _ = tiny
    tokens, mask = padded_batch(seed=5, batch=8, length=12)
    one_lm, one_params = split_model(from_pretrained(path, mesh=sharding.single_device_mesh(), dtype="float32"))
    ref = Evaluator(one_lm, batch_size=8).token_stats(one_params, tokens, mask)
    mesh = sharding.make_mesh(fsdp=4, tensor=2)
    lm, params = split_model(from_pretrained(path, mesh=mesh, dtype="float32"))
    out = Evaluator(lm, mesh, batch_size=8, chunk_size=5).token_stats(params, tokens, mask)
    for key in ("logprob", "mean", "std"):
        np.testing.assert_allclose(out[key], ref[key], atol=1e-5)
    np.testing.assert_array_equal(out["is_argmax"], ref["is_argmax"])


def _open_unlearning_es(labels, preds):
    """open-unlearning's extraction strength loop, transcribed."""
    for k in range(len(labels)):
        if list(labels[k:]) == list(preds[k:]):
            break
    return 1 - k / len(labels)


def test_exact_memorization_and_extraction_strength_by_hand():
    hits = np.array(
        [[1, 0, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]], bool
    )
    mask = np.array([[1] * 5 + [0], [1] * 4 + [0] * 2, [1] * 6, [1] * 3 + [0] * 3, [0] * 6], bool)  # last: no target
    stats = {"is_argmax": hits, "target_mask": mask, "logprob": np.zeros(hits.shape)}
    out = M.memorization_metrics(stats)
    em = [4 / 5, 1.0, 4 / 6, 2 / 3]
    es = [1 - 2 / 5, 1.0, 1 - 2 / 6, 1 / 3]  # the last chunk's final prediction is wrong: open-unlearning's 1/n
    assert out["chunks"] == 4
    assert out["exact_memorization"] == pytest.approx(np.mean(em))
    assert out["exact_memorization"] == pytest.approx(M.perplexity_metrics(stats)["acc"])
    assert out["extraction_strength"] == pytest.approx(np.mean(es))
    for row, m in zip(hits[:4], mask[:4]):  # open-unlearning's loop (src/evals/metrics/memorization.py) agrees
        labels = np.arange(m.sum())
        preds = np.where(row[m], labels, -1)
        assert M.extraction_strength(row[m]) == pytest.approx(_open_unlearning_es(labels, preds))


@pytest.mark.parametrize("p", [1.0, 2.0, math.inf])
@pytest.mark.slow
def test_gradient_norms_equal_open_unlearnings_gradnorm_in_torch(tiny, p):
    """Per sequence: backward of its mean token NLL, then the mean over the model's parameter tensors of each
    gradient's p-norm (open-unlearning's GradNorm statistic), computed with torch autograd on the same weights."""
    path, hf = tiny
    lm, params = split_model(from_pretrained(path, mesh=sharding.single_device_mesh(), dtype="float32"))
    tokens, mask = padded_batch(seed=9, batch=3, length=12)
    ours = Evaluator(lm, batch_size=2, chunk_size=5).gradient_norms(params, tokens, mask, p)  # 2 batches, 1 padded
    theirs = []
    for t, m in zip(tokens, mask):
        hf.zero_grad(set_to_none=True)
        logits = hf(input_ids=torch.from_numpy(t[None]).long(), attention_mask=torch.from_numpy(m[None])).logits
        logp = torch.log_softmax(logits.float(), -1)[0, :-1]
        valid = torch.from_numpy((m[1:] & m[:-1]).astype(bool))
        picked = logp.gather(-1, torch.from_numpy(t[1:]).long()[:, None])[:, 0]
        (-picked[valid].mean()).backward()
        norms = [param.grad.detach().norm(p=p) for param in hf.parameters() if param.grad is not None]
        theirs.append(torch.stack(norms).mean().item())
    np.testing.assert_allclose(ours, theirs, rtol=2e-4)
    assert len(set(np.round(theirs, 6))) == 3  # three different sequences, three different statistics


def test_mia_scores_equal_their_definitions():
    lp = np.array([[-1.0, -4.0, -2.0, -8.0, -0.5], [-3.0, -3.0, -1.0, 0.0, 0.0]])
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    mu = np.array([[-2.0, -2.0, -1.0, -3.0, -1.0], [-1.0, -2.0, -2.0, 0.0, 0.0]])
    sd = np.array([[1.0, 2.0, 0.5, 1.0, 0.5], [2.0, 1.0, 1.0, 1.0, 1.0]])
    stats = {"logprob": lp, "target_mask": mask, "mean": mu, "std": sd, "is_argmax": np.zeros_like(mask)}
    s = M.mia_scores(stats, texts=["abc" * 10, "xyz"], ks=(0.2, 0.4, 1.0))
    # LOSS: mean log-likelihood of the valid tokens
    np.testing.assert_allclose(s["loss"], [(-1 - 4 - 2 - 8 - 0.5) / 5, (-3 - 3 - 1) / 3])
    # Min-20%: floor(0.2 x 5) = 1 lowest -> -8; row 2: floor(0.6) = 0 -> at least 1 -> -3
    np.testing.assert_allclose(s["min_k_0.2"], [-8.0, -3.0])
    # Min-40%: 2 lowest of row 1 (-8, -4); 1 of row 2
    np.testing.assert_allclose(s["min_k_0.4"], [-6.0, -3.0])
    np.testing.assert_allclose(s["min_k_1"], s["loss"])
    # Min-K%++: z = (lp - mu) / sd -> row 1: [1, -1, -2, -5, 1]; row 2: [-1, -1, 1]
    np.testing.assert_allclose(s["min_k++_0.4"], [(-5 - 2) / 2, -1.0])
    np.testing.assert_allclose(s["min_k++_1"], [(1 - 1 - 2 - 5 + 1) / 5, (-1 - 1 + 1) / 3])
    # zlib: mean log-likelihood / compressed length
    np.testing.assert_allclose(
        s["zlib"], [s["loss"][0] / len(zlib.compress(b"abc" * 10)), s["loss"][1] / len(zlib.compress(b"xyz"))]
    )
    ref = M.mia_scores(stats, ref_stats={**stats, "logprob": lp - 1.0}, ks=(0.5,))
    np.testing.assert_allclose(ref["reference"], [1.0, 1.0])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_and_tpr_match_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 300)
    scores = np.round(rng.normal(labels * 0.7, 1.0), 1)  # rounding creates ties
    fpr, tpr = M.roc_curve(labels, scores)
    sk_fpr, sk_tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)
    assert M.auc(fpr, tpr) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    for alpha in (0.01, 0.05):
        assert M.tpr_at_fpr(fpr, tpr, alpha) == pytest.approx(sk_tpr[sk_fpr <= alpha].max())
    summary = M.attack_summary(scores[labels == 1], scores[labels == 0])
    assert summary["auc"] == pytest.approx(roc_auc_score(labels, scores))
    flipped = M.attack_summary(-scores[labels == 1], -scores[labels == 0])
    assert flipped["auc"] == pytest.approx(1 - summary["auc"]) and flipped["auc_folded"] == pytest.approx(
        summary["auc"]
    )


def test_privacy_leakage_formula():
    assert M.privacy_leakage(0.75, 0.5) == pytest.approx(50.0)
    assert M.privacy_leakage(0.5, 0.5) == 0.0


@pytest.mark.parametrize(
    "pair",
    [
        ("The quick brown fox jumps", "the quick brown dog jumps over"),
        ("a b c d e", "e d c b a"),
        ("unrelated words only", "nothing in common here"),
        ("Gradient ascent, descent; KL!", "gradient-ascent and KL descent"),
    ],
)
def test_rouge_l_matches_rouge_score(pair):
    pred, ref = pair
    expected = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False).score(ref, pred)["rougeL"]
    ours = M.rouge_l(pred, ref)
    assert ours["f1"] == pytest.approx(expected.fmeasure)
    assert ours["precision"] == pytest.approx(expected.precision)
    assert ours["recall"] == pytest.approx(expected.recall)


def test_verbatim_metrics_by_hand():
    truth = np.array([[1, 2, 3], [4, 5, 6]])
    gen = np.array([[1, 2, 3], [4, 0, 6]])
    out = M.verbatim_metrics(gen, truth, decode=lambda ids: " ".join(f"w{i}" for i in ids))
    assert out["exact_match"] == 0.5 and out["token_match"] == pytest.approx(5 / 6)
    assert out["rougeL_f1"] == pytest.approx((1.0 + 2 / 3) / 2)
    assert M.verbatim_metrics(np.zeros((0, 3)), np.zeros((0, 3)), str) == {"n": 0}


@pytest.mark.slow
def test_chunked_vocabulary_pass_bounds_memory():
    """The evaluation step never holds [batch, length, vocab] logits: its temporary memory shrinks with the
    chunk size (compiled memory analysis, per device)."""
    from jaxunlearn.models import ModelConfig, init_model

    config = ModelConfig(
        vocab_size=8192,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=4,
        head_dim=16,
        dtype="float32",
    )
    lm, params = split_model(init_model(config, mesh=sharding.single_device_mesh()))
    tokens = np.zeros((4, 512), np.int32)

    def temp_bytes(chunk):
        ev = Evaluator(lm, batch_size=4, chunk_size=chunk)
        return ev.stats_step().lower(params, tokens, tokens).compile().memory_analysis().temp_size_in_bytes

    full_logits = 4 * 512 * 8192 * 4
    whole, chunked = temp_bytes(512), temp_bytes(32)
    assert whole >= full_logits  # one chunk = the whole sequence: logits materialised
    assert chunked < full_logits and chunked < whole / 3  # less than a single [batch, length, vocab] array


def test_result_cache_verifies_what_it_reads(tmp_path, caplog):
    from jaxunlearn.evaluation.runner import ResultCache

    cache = ResultCache(tmp_path)
    value = {"perplexity": {"forget": {"ppl": 62.06}}, "list": [1, 2.5]}
    cache.write("original", "key-1", value)
    assert cache.read("original", "key-1") == value
    assert cache.read("original", "key-2") is None  # another key: another file, absent
    path = cache.path("original", "key-1")
    entry = json.loads(path.read_text())
    entry["value"]["perplexity"]["forget"]["ppl"] = 1.0
    path.write_text(json.dumps(entry))  # edited: the checksum no longer matches
    caplog.set_level("WARNING", logger="jaxunlearn")
    assert cache.read("original", "key-1") is None
    path.write_text(path.read_text()[:40])  # truncated
    assert cache.read("original", "key-1") is None
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2 and all(str(path) in m for m in messages)


def test_zlib_text_is_open_unlearnings_target_text():
    """open-unlearning src/evals/metrics/utils.py ``extract_target_texts_from_processed_data``, transcribed: the
    labelled tokens (prompt and padding at -100) decoded with ``skip_special_tokens=True``."""
    from jaxunlearn.data.qa import tokenize_question_answers
    from jaxunlearn.evaluation.metrics.mia import scored_texts
    from tests.tiny_models import make_tokenizer

    tok = make_tokenizer()
    pairs = [("the quick fox", "jumps over the lazy dog"), ("machine unlearning", "of pretrained models")]
    chunks = tokenize_question_answers(pairs, tok, 32, "Question: {question}\nAnswer: {answer}")
    assert all(chunks.tokens[i, chunks.lengths[i] - 1] == tok.eos_token_id for i in range(2))  # EOS is scored
    theirs = []
    for row, prompt, length in zip(chunks.tokens, chunks.prompts, chunks.lengths):
        labels = np.where((np.arange(len(row)) >= prompt) & (np.arange(len(row)) < length), row, -100)
        theirs.append(tok.decode(labels[labels != -100].tolist(), skip_special_tokens=True))
    assert scored_texts(tok, chunks, np.arange(2)) == theirs
    assert "</s>" not in "".join(theirs)


def test_min_k_plus_plus_equals_open_unlearnings_with_a_near_certain_position():
    """open-unlearning src/evals/metrics/mia/min_k_plus_plus.py ``compute_score``, transcribed (its score is minus
    ours: there lower means member); one position is near-certain, so the variance floor (1e-6) decides."""
    rng = np.random.default_rng(3)
    vocab_logprobs = np.log(rng.dirichlet(np.full(12, 0.3), size=9))
    vocab_logprobs[4] = np.log(np.r_[1 - 11e-12, np.full(11, 1e-12)])  # variance ~1e-8 < 1e-6
    targets = rng.integers(0, 12, 9)
    targets[4] = 0
    token_logprobs = vocab_logprobs[np.arange(9), targets]
    mu = (np.exp(vocab_logprobs) * vocab_logprobs).sum(-1)
    sigma = (np.exp(vocab_logprobs) * vocab_logprobs**2).sum(-1) - mu**2
    assert sigma[4] < 1e-6
    sigma = np.clip(sigma, 1e-6, None)
    for k in (0.2, 0.5, 1.0):
        scores = (token_logprobs - mu) / np.sqrt(sigma)
        theirs = -np.mean(sorted(scores)[: max(1, int(len(scores) * k))])
        std = np.sqrt(np.clip((np.exp(vocab_logprobs) * (vocab_logprobs - mu[:, None]) ** 2).sum(-1), 0, None))
        ours = M.min_k_plus_plus_score([token_logprobs], [mu], [std], k)[0]
        assert ours == pytest.approx(-theirs, rel=1e-9)
