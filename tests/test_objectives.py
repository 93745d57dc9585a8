"""Each objective's value and gradient against a straightforward torch computation on the same weights.

The torch side uses transformers' own forward pass and autograd, with the official code's normalisation
written out by hand: per-sequence mean over valid target positions, then the mean over sequences.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxunlearn.methods.context import Context
from jaxunlearn.methods.paper import adversarial_labels, random_labels
from jaxunlearn.methods.registry import METHODS, get_method
from jaxunlearn.models.hf_checkpoint import to_hf_layout
from tests.tiny_models import VOCAB, current_and_reference, padded_batch

VARIANT = "llama_mha_untied"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return current_and_reference(tmp_path_factory.mktemp("objectives"), VARIANT)


def _split(seed):
    tokens, mask = padded_batch(seed=seed, batch=3, length=12)
    return {"tokens": tokens, "mask": mask, "chunk_id": np.asarray([7, 3, 11], np.int32)}


BATCH = {"forget": _split(0), "retain": _split(1)}


def _jax_value_and_grads(name, lm, params, ref_params, hparams=None):
    method = get_method(name)
    ctx = Context(
        lm,
        hparams={**method.hparams, **(hparams or {})},
        seed=5,
        extras={"label_ids": np.arange(3, VOCAB, dtype=np.int32)},
        chunk_size=5,
    )
    batch = jax.tree.map(jnp.asarray, BATCH)

    def loss(p):
        return method.loss(p, ref_params, batch, jax.random.key(0), ctx)

    (value, metrics), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return float(value), jax.tree.map(float, metrics), grads, ctx


def _torch_logits(model, split):
    return model(input_ids=torch.from_numpy(split["tokens"]), attention_mask=torch.from_numpy(split["mask"])).logits


def _torch_seq_nll(model, split, labels=None):
    """Per-sequence mean NLL of the next tokens (or of ``labels[:, t]`` at position t)."""
    logp = torch.log_softmax(_torch_logits(model, split).float(), dim=-1)[:, :-1]
    tokens, mask = torch.from_numpy(split["tokens"]), torch.from_numpy(split["mask"]).bool()
    targets = tokens[:, 1:] if labels is None else torch.from_numpy(np.array(labels))[:, :-1].long()
    valid = (mask[:, 1:] & mask[:, :-1]).float()
    nll = -logp.gather(-1, targets[..., None])[..., 0]
    return (nll * valid).sum(1) / valid.sum(1)


def _torch_seq_kl(model, reference, split):
    with torch.no_grad():
        ref_logp = torch.log_softmax(_torch_logits(reference, split).float(), dim=-1)
    logp = torch.log_softmax(_torch_logits(model, split).float(), dim=-1)
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
    mask = torch.from_numpy(split["mask"]).float()
    return (kl * mask).sum(1) / mask.sum(1)


def _compare_grads(lm, grads, torch_model):
    """Map our gradients to HF tensor names/layouts and compare with torch's .grad."""
    torch_grads = {n: p.grad.numpy() for n, p in torch_model.named_parameters()}
    from jaxunlearn.models import family

    checked = 0
    for entry in family(lm.config).hf_tensors(lm.config):
        g = grads
        for k in entry.path:
            g = g[k]
        g = np.asarray(g)
        layers = range(lm.config.num_layers) if entry.stacked else [None]
        for i in layers:
            ours = to_hf_layout(entry.layout, g[i] if i is not None else g)
            theirs = torch_grads[entry.name.format(layer=i)]
            scale = max(np.abs(theirs).max(), 1e-6)
            np.testing.assert_allclose(ours, theirs, atol=2e-5 * scale + 1e-7, rtol=1e-3, err_msg=entry.name)
            checked += 1
    assert checked == len(torch_grads)


def _torch_model(hf_model):
    hf_model.zero_grad(set_to_none=True)
    return hf_model


# The paper's seven variants: shipped config file -> registered method. The *_general ones train their retain term
# on the general corpus instead of the domain's own retain split.
PAPER_VARIANTS = {
    "ga": "ga",
    "random_label": "random_label",
    "adversarial": "adversarial",
    "ga_gd": "ga_gd",
    "ga_kl": "ga_kl",
    "ga_gd_general": "ga_gd",
    "ga_kl_general": "ga_kl",
}


def test_all_seven_paper_methods_are_registered():
    """Each of the paper's seven variants is a shipped config that validates and names a registered method; the
    general-retain variants differ from their in-distribution twin in the retain split only; what each method
    declares it reads (its retain term, the frozen original) is the paper's."""
    from jaxunlearn.commands.cli import config_files
    from jaxunlearn.common.settings import flatten
    from jaxunlearn.config import validate
    from jaxunlearn.methods.registry import resolve_needs
    from tests.tiny_models import load_config_file

    assert set(PAPER_VARIANTS) <= set(config_files())
    configs = {}
    for name, method in PAPER_VARIANTS.items():
        for preset in ("builtin", "arxiv"):
            config = load_config_file(name, preset)
            if preset == "arxiv":
                config.model.path = "01-ai/Yi-6B"
            validate(config)
            assert config.method.name == method and method in METHODS, (name, preset)
            configs[name, preset] = config

    # In-distribution vs general retain data (the paper's arXiv domain; the built-in world's own splits).
    retain = {
        ("ga_gd", "arxiv"): ("llmunlearn/unlearn_dataset", "arxiv", "retain"),
        ("ga_gd_general", "arxiv"): ("llmunlearn/unlearn_dataset", "general", "retain"),
        ("ga_gd", "builtin"): ("world:retain+general_retain", "", ""),
        ("ga_gd_general", "builtin"): ("world:general_retain", "", ""),
    }
    for (name, preset), expected in retain.items():
        for variant in (name, name.replace("ga_gd", "ga_kl")):
            split = configs[variant, preset].data.retain
            assert (split.path, split.name, split.split) == expected, (variant, preset)
    for method in ("ga_gd", "ga_kl"):
        for preset in ("builtin", "arxiv"):
            own = flatten(configs[method, preset], "config")
            general = flatten(configs[f"{method}_general", preset], "config")
            differing = {key for key in own if own[key] != general[key]}
            assert differing and all(key.startswith("config.data.retain.") for key in differing), differing

    needs = {name: resolve_needs(configs[name, "arxiv"].method) for name in PAPER_VARIANTS}
    for name in ("ga", "random_label", "adversarial"):
        assert not needs[name].retain, name
    for name in ("ga_gd", "ga_kl", "ga_gd_general", "ga_kl_general"):
        assert needs[name].retain, name
    assert needs["ga_kl"].reference and needs["ga_kl_general"].reference  # KL to the frozen original
    assert needs["adversarial"].reference  # the original's best wrong token
    assert not needs["ga"].reference and not needs["ga_gd"].reference and not needs["random_label"].reference
    assert "label_ids" in needs["random_label"].extras
    # A zero retain weight drops the retain term and its data.
    assert not get_method("ga_kl").needs({"retain_weight": 0.0}).retain


def test_gradient_ascent(models):
    lm, params, ref_params, current, _ = models
    value, metrics, grads, _ = _jax_value_and_grads("ga", lm, params, ref_params)
    model = _torch_model(current)
    loss = -_torch_seq_nll(model, BATCH["forget"]).mean()
    loss.backward()
    assert abs(value - loss.item()) < 1e-5
    assert abs(metrics["forget_nll"] + value) < 1e-6
    _compare_grads(lm, grads, model)


@pytest.mark.parametrize("weights", [(1.0, 1.0), (0.5, 2.0)])
@pytest.mark.slow
def test_ga_gd(models, weights):
    lm, params, ref_params, current, _ = models
    wf, wr = weights
    value, metrics, grads, _ = _jax_value_and_grads(
        "ga_gd", lm, params, ref_params, dict(forget_weight=wf, retain_weight=wr)
    )
    model = _torch_model(current)
    forget = _torch_seq_nll(model, BATCH["forget"]).mean()
    retain = _torch_seq_nll(model, BATCH["retain"]).mean()
    loss = -wf * forget + wr * retain
    loss.backward()
    assert abs(value - loss.item()) < 1e-5
    assert abs(metrics["retain_nll"] - retain.item()) < 1e-5
    _compare_grads(lm, grads, model)


@pytest.mark.parametrize("name", ["ga", "ga_gd", "ga_kl"])
@pytest.mark.slow
def test_forget_nll_cap_stops_the_ascent_of_chunks_above_it(models, name):
    """With ``forget_nll_cap`` the ascended term is mean(min(NLL_chunk, cap)): torch's clamp, by hand."""
    lm, params, ref_params, current, reference = models
    with torch.no_grad():
        seq = np.sort(_torch_seq_nll(current, BATCH["forget"]).numpy())
    cap = float(seq[0] + seq[1]) / 2  # between the two lowest: one chunk below the cap, two above
    value, metrics, grads, _ = _jax_value_and_grads(name, lm, params, ref_params, dict(forget_nll_cap=cap))
    model = _torch_model(current)
    forget = _torch_seq_nll(model, BATCH["forget"])
    loss = -torch.clamp(forget, max=cap).mean()
    if name == "ga_gd":
        loss = loss + _torch_seq_nll(model, BATCH["retain"]).mean()
    if name == "ga_kl":
        loss = loss + _torch_seq_kl(model, reference, BATCH["retain"]).mean()
    loss.backward()
    assert abs(value - loss.item()) < 1e-5
    assert abs(metrics["forget_nll"] - forget.mean().item()) < 1e-5  # the logged NLL stays uncapped
    _compare_grads(lm, grads, model)


def test_ga_kl(models):
    lm, params, ref_params, current, reference = models
    value, metrics, grads, _ = _jax_value_and_grads("ga_kl", lm, params, ref_params)
    model = _torch_model(current)
    forget = _torch_seq_nll(model, BATCH["forget"]).mean()
    kl = _torch_seq_kl(model, reference, BATCH["retain"]).mean()
    loss = -forget + kl
    loss.backward()
    assert kl.item() > 0.1  # the two models really differ
    assert abs(value - loss.item()) < 1e-5
    assert abs(metrics["retain_kl"] - kl.item()) < 1e-5
    _compare_grads(lm, grads, model)


def test_kl_is_zero_against_itself(models):
    lm, params, _, _, _ = models
    value, metrics, _, _ = _jax_value_and_grads("ga_kl", lm, params, params)
    assert abs(metrics["retain_kl"]) < 1e-6


def test_random_label(models):
    lm, params, ref_params, current, _ = models
    value, _, grads, ctx = _jax_value_and_grads("random_label", lm, params, ref_params)
    forget = BATCH["forget"]
    labels = np.asarray(
        random_labels(jnp.asarray(forget["chunk_id"]), 12, ctx.seed, jnp.asarray(ctx.extras["label_ids"]))
    )
    model = _torch_model(current)
    loss = _torch_seq_nll(model, forget, labels=labels).mean()
    loss.backward()
    assert abs(value - loss.item()) < 1e-5
    _compare_grads(lm, grads, model)


def test_random_labels_are_fixed_per_chunk_uniform_and_never_special():
    allowed = jnp.arange(3, VOCAB, dtype=jnp.int32)  # ids 0-2 are special
    a = np.asarray(random_labels(jnp.asarray([5, 9, 2]), 4096, 0, allowed))
    b = np.asarray(random_labels(jnp.asarray([2, 5]), 4096, 0, allowed))
    np.testing.assert_array_equal(a[0], b[1])  # chunk 5: same labels in another batch composition
    np.testing.assert_array_equal(a[2], b[0])
    assert not np.array_equal(a[0], a[1])
    assert not np.array_equal(a[0], np.asarray(random_labels(jnp.asarray([5]), 4096, 1, allowed))[0])  # seed
    assert a.min() >= 3 and a.max() < VOCAB
    counts = np.bincount(a.ravel(), minlength=VOCAB)[3:]
    expected = a.size / (VOCAB - 3)
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 2 * (VOCAB - 3)  # far below for uniform draws (mean = 92 degrees of freedom)


@pytest.mark.slow
def test_adversarial(models):
    lm, params, ref_params, current, reference = models
    value, _, grads, ctx = _jax_value_and_grads("adversarial", lm, params, ref_params)
    forget = BATCH["forget"]
    # Labels: the reference model's argmax at each position with the true next token ruled out.
    with torch.no_grad():
        ref_logits = _torch_logits(reference, forget).float()
    next_tokens = np.concatenate([forget["tokens"][:, 1:], np.zeros((3, 1), np.int64)], axis=1)
    ref_logits.scatter_(-1, torch.from_numpy(next_tokens)[..., None], float("-inf"))
    expected_labels = ref_logits.argmax(-1).numpy()
    labels = np.asarray(adversarial_labels(ref_params, jax.tree.map(jnp.asarray, forget), ctx))
    valid = forget["mask"].astype(bool)
    np.testing.assert_array_equal(labels[valid], expected_labels[valid])
    assert not np.any((labels == next_tokens)[:, :-1][valid[:, 1:]])
    model = _torch_model(current)
    loss = _torch_seq_nll(model, forget, labels=expected_labels).mean()
    loss.backward()
    assert abs(value - loss.item()) < 1e-5
    _compare_grads(lm, grads, model)


@pytest.mark.parametrize("retain_weight", [0.0, 0.5])
@pytest.mark.slow
def test_npo(models, retain_weight):
    lm, params, ref_params, current, reference = models
    beta = 0.1
    value, metrics, grads, _ = _jax_value_and_grads(
        "npo", lm, params, ref_params, dict(beta=beta, retain_weight=retain_weight)
    )
    model = _torch_model(current)
    forget = BATCH["forget"]
    valid = torch.from_numpy((forget["mask"][:, 1:] & forget["mask"][:, :-1]).sum(1)).double()
    logp = -_torch_seq_nll(model, forget).double() * valid  # sequence log-likelihood (sum over tokens)
    with torch.no_grad():
        ref_logp = -_torch_seq_nll(reference, forget).double() * valid
    loss = (-(2 / beta) * torch.nn.functional.logsigmoid(-beta * (logp - ref_logp))).mean()
    if retain_weight:
        loss = loss + retain_weight * _torch_seq_kl(model, reference, BATCH["retain"]).mean()
    loss.backward()
    assert abs(value - loss.item()) < 1e-4 * max(1.0, abs(loss.item()))
    _compare_grads(lm, grads, model)


def test_npo_at_the_reference_is_two_over_beta_log_two(models):
    lm, params, _, _, _ = models
    value, _, _, _ = _jax_value_and_grads("npo", lm, params, params, dict(beta=0.5))
    assert value == pytest.approx(2 / 0.5 * np.log(2), rel=1e-6)


def test_npo_gd(models):
    lm, params, ref_params, current, reference = models
    beta, wf, wr = 0.2, 0.5, 2.0
    value, metrics, grads, _ = _jax_value_and_grads(
        "npo_gd", lm, params, ref_params, dict(beta=beta, forget_weight=wf, retain_weight=wr)
    )
    model = _torch_model(current)
    forget = BATCH["forget"]
    valid = torch.from_numpy((forget["mask"][:, 1:] & forget["mask"][:, :-1]).sum(1)).double()
    logp = -_torch_seq_nll(model, forget).double() * valid
    with torch.no_grad():
        ref_logp = -_torch_seq_nll(reference, forget).double() * valid
    npo = (-(2 / beta) * torch.nn.functional.logsigmoid(-beta * (logp - ref_logp))).mean()
    retain = _torch_seq_nll(model, BATCH["retain"]).mean()
    loss = wf * npo + wr * retain
    loss.backward()
    assert abs(value - loss.item()) < 1e-4 * max(1.0, abs(loss.item()))
    assert abs(metrics["retain_nll"] - retain.item()) < 1e-5
    _compare_grads(lm, grads, model)


@pytest.mark.parametrize("retain_weight", [0.0, 1.5])
@pytest.mark.slow
def test_simnpo(models, retain_weight):
    """SimNPO's published loss (Fan et al. 2024, eq. 5): -(2/beta) log sigmoid(-(beta/|y|) log p(y) - gamma),
    written from the sequence log-likelihood (sum over tokens) and its length, plus the retain NLL."""
    lm, params, ref_params, current, _ = models
    beta, gamma, wf = 2.5, 0.7, 0.4
    hp = dict(beta=beta, gamma=gamma, forget_weight=wf, retain_weight=retain_weight)
    value, metrics, grads, _ = _jax_value_and_grads("simnpo", lm, params, None, hp)
    model = _torch_model(current)
    forget = BATCH["forget"]
    length = torch.from_numpy((forget["mask"][:, 1:] & forget["mask"][:, :-1]).sum(1)).double()
    log_likelihood = -_torch_seq_nll(model, forget).double() * length
    simnpo = (-(2 / beta) * torch.nn.functional.logsigmoid(-(beta / length) * log_likelihood - gamma)).mean()
    loss = wf * simnpo
    if retain_weight:
        loss = loss + retain_weight * _torch_seq_nll(model, BATCH["retain"]).mean()
    loss.backward()
    assert abs(value - loss.item()) < 1e-5 * max(1.0, abs(loss.item()))
    assert abs(metrics["simnpo"] - simnpo.item()) < 1e-5
    assert ("retain_nll" in metrics) == bool(retain_weight)
    _compare_grads(lm, grads, model)


def _torch_token_nll(model, split):
    """``[batch, length - 1]`` NLL of each next token and the valid-target mask."""
    logp = torch.log_softmax(_torch_logits(model, split).float(), dim=-1)[:, :-1]
    tokens, mask = torch.from_numpy(split["tokens"]), torch.from_numpy(split["mask"]).bool()
    nll = -logp.gather(-1, tokens[:, 1:, None].long())[..., 0]
    return nll, (mask[:, 1:] & mask[:, :-1]).float()


@pytest.mark.parametrize(
    "name, hparams, weight",
    [
        ("wga", {"beta": 0.7}, lambda p: p**0.7),
        ("satimp", {"beta1": 2.0, "beta2": 1.5}, lambda p: p**2.0 * (1 - p) ** 1.5),
    ],
)
@pytest.mark.parametrize("retain_weight", [0.0, 0.8])
@pytest.mark.slow
def test_token_weighted_ascent(models, name, hparams, weight, retain_weight):
    """WGA's and SatImp's published losses, -weight(p_t) CE_t with the weight detached (open-unlearning's form),
    as a per-chunk token mean, plus the retain NLL."""
    lm, params, _, current, _ = models
    wf = 0.6
    hp = {**hparams, "forget_weight": wf, "retain_weight": retain_weight}
    value, metrics, grads, _ = _jax_value_and_grads(name, lm, params, None, hp)
    model = _torch_model(current)
    ce, valid = _torch_token_nll(model, BATCH["forget"])
    w = weight(torch.exp(-ce).detach())
    term = (-(w * ce) * valid).sum(1).div(valid.sum(1)).mean()
    loss = _forget_term_plus_retain_nll(model, term, wf, retain_weight)
    assert abs(value - loss) < 1e-5 * max(1.0, abs(loss))
    assert abs(metrics[name] - term.item()) < 1e-5
    _compare_grads(lm, grads, model)


def _valid_targets(split):
    mask = torch.from_numpy(split["mask"]).bool()
    return (mask[:, 1:] & mask[:, :-1]).float()


def _token_mean(per_position, valid):
    return ((per_position * valid).sum(1) / valid.sum(1)).mean()


def _forget_term_plus_retain_nll(model, term, wf, retain_weight):
    """``wf x term + retain_weight x NLL(retain)`` in torch, back-propagated into ``model``; returns its value."""
    loss = wf * term
    if retain_weight:
        loss = loss + retain_weight * _torch_seq_nll(model, BATCH["retain"]).mean()
    loss.backward()
    return loss.item()


@pytest.mark.parametrize("retain_weight", [0.0, 0.9])
@pytest.mark.slow
def test_undial(models, retain_weight):
    """UNDIAL (Dong et al. 2024; open-unlearning's compute_undial_loss): the cross-entropy of the model against
    softmax(teacher logits - beta onehot(next token)), the teacher the frozen original, plus the retain NLL."""
    lm, params, ref_params, current, reference = models
    beta, wf = 3.0, 0.7
    hp = dict(beta=beta, forget_weight=wf, retain_weight=retain_weight)
    value, metrics, grads, _ = _jax_value_and_grads("undial", lm, params, ref_params, hp)
    model = _torch_model(current)
    forget = BATCH["forget"]
    labels = torch.from_numpy(forget["tokens"][:, 1:]).long()
    with torch.no_grad():
        teacher = _torch_logits(reference, forget).float()[:, :-1]
        soft = torch.softmax(teacher - beta * torch.nn.functional.one_hot(labels, VOCAB).float(), dim=-1)
    logp = torch.log_softmax(_torch_logits(model, forget).float()[:, :-1], dim=-1)
    term = _token_mean(-(soft * logp).sum(-1), _valid_targets(forget))
    loss = _forget_term_plus_retain_nll(model, term, wf, retain_weight)
    assert abs(value - loss) < 1e-5 * max(1.0, abs(loss))
    assert abs(metrics["undial"] - term.item()) < 1e-5
    _compare_grads(lm, grads, model)


@pytest.mark.parametrize("ignore_first_tokens, retain_weight", [(1, 0.0), (3, 1.2)])
@pytest.mark.slow
def test_ce_u(models, ignore_first_tokens, retain_weight):
    """CE-U (Yang et al. 2025), transcribed from open-unlearning's cross_entropy_unlearning_loss: the target is the
    model's own detached logits with the label's set to -inf; labels of the first n tokens are dropped."""
    lm, params, _, current, _ = models
    wf = 0.8
    hp = dict(ignore_first_tokens=ignore_first_tokens, forget_weight=wf, retain_weight=retain_weight)
    value, metrics, grads, _ = _jax_value_and_grads("ce_u", lm, params, None, hp)
    model = _torch_model(current)
    forget = BATCH["forget"]
    labels = torch.from_numpy(forget["tokens"][:, 1:]).long()
    logits = _torch_logits(model, forget).float()[:, :-1]
    target = logits.detach().clone().scatter(-1, labels[..., None], float("-inf"))
    ce = torch.nn.functional.cross_entropy(
        logits.transpose(1, 2), torch.softmax(target, dim=-1).transpose(1, 2), reduction="none"
    )
    valid = _valid_targets(forget)
    valid[:, : max(ignore_first_tokens - 1, 0)] = 0  # label index t + 1 < n: tokens 1 .. n - 1
    term = _token_mean(ce, valid)
    loss = _forget_term_plus_retain_nll(model, term, wf, retain_weight)
    assert abs(value - loss) < 1e-5 * max(1.0, abs(loss))
    assert abs(metrics["ce_u"] - term.item()) < 1e-5
    _compare_grads(lm, grads, model)


def _torch_layer_output(model, split, layer, grad=True):
    """The output of ``model.model.layers[layer]`` from a forward hook, as the official RMU code caches it."""
    cache = []
    handle = model.model.layers[layer].register_forward_hook(
        lambda module, inputs, output: cache.append(output[0] if isinstance(output, tuple) else output)
    )
    with torch.set_grad_enabled(grad):
        model(input_ids=torch.from_numpy(split["tokens"]), attention_mask=torch.from_numpy(split["mask"]))
    handle.remove()
    return cache[0]


def _torch_activation_loss(a, b, mask):
    """open-unlearning's RMU compute_activation_loss: masked token mean of the per-position mean squared error."""
    squared = torch.nn.functional.mse_loss(a, b, reduction="none")
    mask = torch.from_numpy(mask).float()
    per_seq = (squared * mask[..., None]).mean(dim=2).sum(dim=1) / mask.sum(dim=-1)
    return per_seq.mean()


@pytest.mark.parametrize("retain_weight", [0.0, 50.0])
@pytest.mark.slow
def test_rmu(models, retain_weight):
    """RMU's loss (official rmu/unlearn.py, open-unlearning's masked form): MSE of the layer-l output on forget
    chunks to c u, plus alpha x MSE to the frozen model's layer-l output on retain chunks; gradients of every
    parameter, none past layer l."""
    from jaxunlearn.methods.rmu import control_vector

    lm, params, ref_params, current, reference = models
    layer, c, wf = 1, 7.0, 0.9
    hp = dict(layer=layer, steering_coeff=c, forget_weight=wf, retain_weight=retain_weight)
    value, metrics, grads, ctx = _jax_value_and_grads("rmu", lm, params, ref_params, hp)
    model = _torch_model(current)
    forget = BATCH["forget"]
    acts = _torch_layer_output(model, forget, layer)
    control = torch.from_numpy(np.asarray(control_vector(lm.config.hidden_size, ctx.seed, c)))
    term = _torch_activation_loss(acts, control.expand_as(acts), forget["mask"])
    loss = wf * term
    if retain_weight:
        retain = BATCH["retain"]
        frozen = _torch_layer_output(reference, retain, layer, grad=False)
        loss = loss + retain_weight * _torch_activation_loss(
            _torch_layer_output(model, retain, layer), frozen, retain["mask"]
        )
    loss.backward()
    assert abs(value - loss.item()) < 1e-5 * max(1.0, abs(loss.item()))
    assert abs(metrics["rmu_forget"] - term.item()) < 1e-5
    for _, p in model.named_parameters():  # the layers after l, the final norm and the head never ran
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    _compare_grads(lm, grads, model)


@pytest.mark.parametrize("topics", [(1, 1, 1), (0, 1, 0)])
def test_rmu_two_topics_use_each_topics_control_vector_coefficient_and_alpha(models, topics):
    """With two forget topics (data.forget2; official rmu/unlearn.py: one control vector, steering coefficient and
    alpha per corpus) each row is steered to its topic's ``c_t u_t`` and its retain row weighted by its topic's
    alpha: against torch, with the directions drawn per topic from the run seed (topic 0's is the one-topic run's)."""
    from jaxunlearn.methods.rmu import control_vector

    lm, params, ref_params, current, reference = models
    layer, wf = 1, 0.9
    coeffs, alphas = (7.0, 3.0), (50.0, 20.0)
    hp = dict(layer=layer, forget_weight=wf, steering_coeff=coeffs[0], steering_coeff2=coeffs[1])
    hp.update(retain_weight=alphas[0], retain_weight2=alphas[1])
    method = get_method("rmu")
    ctx = Context(lm, hparams={**method.hparams, **hp}, seed=5, chunk_size=5)
    topic = np.asarray(topics, np.int32)
    batch = {name: {**BATCH[name], "topic": topic} for name in ("forget", "retain")}
    value, metrics = jax.jit(lambda p: method.loss(p, ref_params, batch, jax.random.key(0), ctx))(params)

    size = lm.config.hidden_size
    directions = [np.asarray(control_vector(size, ctx.seed, 1.0, topic=t)) for t in (0, 1)]
    np.testing.assert_allclose(directions[0] * 7.0, np.asarray(control_vector(size, ctx.seed, 7.0)), rtol=1e-6)
    assert not np.allclose(directions[0], directions[1]) and np.linalg.norm(directions[1]) == pytest.approx(1.0)
    target = torch.from_numpy(np.stack([coeffs[t] * directions[t] for t in topics]))[:, None, :]

    def rows(a, b, mask):  # the masked per-sequence mean of the per-position MSE
        mask = torch.from_numpy(mask).float()
        return ((a - b) ** 2 * mask[..., None]).mean(dim=2).sum(dim=1) / mask.sum(dim=1)

    with torch.no_grad():
        forget, retain = BATCH["forget"], BATCH["retain"]
        acts = _torch_layer_output(current, forget, layer, grad=False)
        term = rows(acts, target.expand_as(acts), forget["mask"]).mean()
        frozen = _torch_layer_output(reference, retain, layer, grad=False)
        per_row = rows(_torch_layer_output(current, retain, layer, grad=False), frozen, retain["mask"])
        weights = torch.tensor([alphas[t] for t in topics])
    loss = wf * term + (weights * per_row).mean()
    assert float(value) == pytest.approx(loss.item(), rel=1e-5)
    assert float(metrics["rmu_forget"]) == pytest.approx(term.item(), rel=1e-5)
    assert float(metrics["rmu_retain"]) == pytest.approx(per_row.mean().item(), rel=1e-5)


def test_rmu_control_vector_is_a_fixed_positive_direction_of_norm_c():
    from jaxunlearn.methods.rmu import control_vector

    u = np.asarray(control_vector(64, 3, 6.5))
    assert np.linalg.norm(u) == pytest.approx(6.5, rel=1e-6)
    assert u.min() >= 0 and len(np.unique(u)) == 64
    np.testing.assert_array_equal(u, np.asarray(control_vector(64, 3, 6.5)))
    assert not np.allclose(u, np.asarray(control_vector(64, 4, 6.5)))


def test_parameter_mask_selects_hf_tensors_by_name_and_layer(models):
    from jaxunlearn.methods.rmu import parameter_mask

    lm = models[0]
    mask = parameter_mask(lm.config, r"model\.layers\.(0|2)\.mlp\.down_proj\.weight|lm_head\.weight")
    np.testing.assert_array_equal(mask["layers"]["mlp"]["down_proj"].ravel(), [1.0, 0.0, 1.0])
    assert mask["layers"]["mlp"]["down_proj"].shape == (3, 1, 1)
    assert float(mask["lm_head"]) == 1.0 and float(mask["embedding"]) == 0.0
    assert not np.any(mask["layers"]["mlp"]["up_proj"]) and not np.any(mask["layers"]["attn"]["q_proj"])
    assert jax.tree.structure(mask) == jax.tree.structure(models[1])  # one leaf per parameter


@pytest.mark.slow
def test_rmu_updates_only_its_trainable_parameters_as_torch_adamw_does(models):
    """Two RMU steps of the jitted train step (AdamW, clipping over the trained parameters) against torch's AdamW on
    the parameters the regex leaves trainable (requires_grad): the same values; every other parameter unchanged."""
    import copy

    import ml_collections

    from jaxunlearn.methods.rmu import control_vector
    from jaxunlearn.models import family
    from jaxunlearn.models.layouts import nested_get
    from jaxunlearn.training.step import make_optimizer, make_train_step

    lm, params, ref_params, current, reference = models
    pattern = r"model\.layers\.(0|1)\.mlp\.down_proj\.weight"
    hp = dict(layer=1, trainable_params=pattern, steering_coeff=5.0, forget_weight=1.0, retain_weight=10.0)
    method = get_method("rmu")
    ctx = Context(lm, hparams={**method.hparams, **hp}, seed=5, chunk_size=5)
    optim = ml_collections.ConfigDict(
        dict(
            lr=1e-2, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.1, warmup_ratio=0.0, schedule="constant", clip_norm=0.5
        )
    )
    tx, schedule = make_optimizer(optim, 2)
    step = jax.jit(make_train_step(method, ctx, tx, schedule))
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}
    batch = jax.tree.map(lambda x: jnp.asarray(x)[None], BATCH)
    for _ in range(2):
        state, _ = step(state, ref_params, batch)

    model = copy.deepcopy(current)
    trained = {n: p for n, p in model.named_parameters() if re.fullmatch(pattern, n)}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in trained.values():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(trained.values(), lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    control = torch.from_numpy(np.asarray(control_vector(lm.config.hidden_size, 5, 5.0)))
    for _ in range(2):
        opt.zero_grad()
        acts = _torch_layer_output(model, BATCH["forget"], 1)
        frozen = _torch_layer_output(reference, BATCH["retain"], 1, grad=False)
        loss = _torch_activation_loss(acts, control.expand_as(acts), BATCH["forget"]["mask"])
        loss = loss + 10.0 * _torch_activation_loss(
            _torch_layer_output(model, BATCH["retain"], 1), frozen, BATCH["retain"]["mask"]
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained.values(), 0.5)
        opt.step()

    after = {n: p.detach().numpy() for n, p in model.named_parameters()}
    before = {n: p.detach().numpy() for n, p in current.named_parameters()}
    changed = 0
    for entry in family(lm.config).hf_tensors(lm.config):
        ours_all = np.asarray(nested_get(state["params"], entry.path))
        for i in range(lm.config.num_layers) if entry.stacked else [None]:
            name = entry.name.format(layer=i)
            ours = to_hf_layout(entry.layout, ours_all[i] if i is not None else ours_all)
            if name in trained:
                assert not np.array_equal(after[name], before[name])
                np.testing.assert_allclose(ours, after[name], atol=2e-6, err_msg=name)
                changed += 1
            else:
                np.testing.assert_array_equal(ours, before[name], err_msg=name)  # bit-identical: frozen
    assert changed == 2


def test_task_vector_fine_tunes_on_forget_and_negates_the_difference(models):
    """The fine-tuning objective is the forget NLL (descent), against torch; the unlearned model is
    theta_0 - alpha (theta - theta_0), against numpy."""
    lm, params, ref_params, current, _ = models
    value, metrics, grads, _ = _jax_value_and_grads("task_vector", lm, params, ref_params)
    model = _torch_model(current)
    loss = _torch_seq_nll(model, BATCH["forget"]).mean()
    loss.backward()
    assert abs(value - loss.item()) < 1e-5 and abs(metrics["forget_nll"] - value) < 1e-6
    _compare_grads(lm, grads, model)
    method = get_method("task_vector")
    negated = method.transform(params, ref_params, {"alpha": 1.7})
    for ours, p, r in zip(jax.tree.leaves(negated), jax.tree.leaves(params), jax.tree.leaves(ref_params)):
        p, r = np.asarray(p, np.float64), np.asarray(r, np.float64)
        np.testing.assert_allclose(np.asarray(ours), r - 1.7 * (p - r), rtol=1e-6, atol=1e-7)
    same = method.transform(ref_params, ref_params, {"alpha": 1.0})
    for a, b in zip(jax.tree.leaves(same), jax.tree.leaves(ref_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # nothing fine-tuned: the original


# --- what each method reads, decided from its hyper-parameters ---------------------------------------------

# (method, hyper-parameters) -> (retain, reference, reference forwards per forget chunk, extras), by hand.
EXPECTED_NEEDS = [
    ("ga", {}, (False, False, 0, set())),
    ("random_label", {}, (False, False, 0, {"label_ids"})),
    ("adversarial", {}, (False, True, 1, set())),
    ("ga_gd", {}, (True, False, 0, set())),
    ("ga_gd", {"retain_weight": 0.0}, (False, False, 0, set())),  # plain GA: no retain data loaded
    ("ga_kl", {}, (True, True, 1, set())),
    ("ga_kl", {"retain_weight": 0.0}, (False, False, 0, set())),
    ("npo", {}, (False, True, 1, set())),
    ("npo", {"retain_weight": 0.5}, (True, True, 2, set())),  # + the KL term's reference forward
    ("npo_gd", {}, (True, True, 1, set())),
    ("npo_gd", {"retain_weight": 0.0}, (False, True, 1, set())),
    ("simnpo", {}, (True, False, 0, set())),  # no reference model: never loaded
    ("simnpo", {"retain_weight": 0.0}, (False, False, 0, set())),
    ("wga", {}, (True, False, 0, set())),  # no reference model: never loaded (open-unlearning builds one)
    ("satimp", {"retain_weight": 0.0}, (False, False, 0, set())),
    ("undial", {}, (False, True, 1, set())),  # the teacher's forward on forget chunks; no retain term by default
    ("undial", {"retain_weight": 1.0}, (True, True, 1, set())),
    ("ce_u", {}, (False, False, 0, set())),  # forget chunks only, no reference model
    ("ce_u", {"retain_weight": 1.0}, (True, False, 0, set())),
    ("rmu", {}, (True, True, 1, set())),  # the frozen model's activations on retain chunks
    ("rmu", {"retain_weight": 0.0}, (False, False, 0, set())),
    ("task_vector", {}, (False, True, 0, set())),  # the original, to subtract the difference from; no forward
]


@pytest.mark.parametrize("name, hparams, expected", EXPECTED_NEEDS)
def test_methods_decide_their_inputs_from_their_hyper_parameters(name, hparams, expected):
    from jaxunlearn.config import base_config
    from jaxunlearn.methods.registry import resolve_needs

    config = base_config(name, preset="arxiv")
    for key, value in hparams.items():
        config.method[key] = value
    needs = resolve_needs(config.method)
    assert (needs.retain, needs.reference, needs.reference_forwards, set(needs.extras)) == expected


def test_a_declared_term_without_its_data_is_an_error_not_a_silent_skip(models):
    lm, params, ref_params, _, _ = models
    method = get_method("npo")
    ctx = Context(lm, hparams={**method.hparams, "retain_weight": 0.5})
    batch = {"forget": jax.tree.map(jnp.asarray, BATCH["forget"])}  # no retain chunks
    with pytest.raises(ValueError, match="needs 'retain' chunks but the batch has only \\['forget'\\]"):
        method.loss(params, ref_params, batch, jax.random.key(0), ctx)


def test_a_chunk_without_a_target_does_not_dilute_the_mean(models):
    """A one-token chunk has no next-token target: the GA and GA+GD means are over the chunks that have one
    (torch: the per-sequence means of the other rows), not a zero averaged in."""
    lm, params, ref_params, current, _ = models
    one_token = {k: v.copy() for k, v in BATCH["forget"].items()}
    one_token["mask"][2] = 0
    one_token["mask"][2, 0] = 1
    batch = {"forget": one_token, "retain": BATCH["retain"]}
    for name, hp in (("ga", {}), ("ga_gd", {"forget_weight": 1.0, "retain_weight": 1.0})):
        method = get_method(name)
        ctx = Context(lm, hparams={**method.hparams, **hp})
        value, metrics = method.loss(params, ref_params, jax.tree.map(jnp.asarray, batch), jax.random.key(0), ctx)
        with torch.no_grad():
            forget = _torch_seq_nll(current, one_token)[:2].mean().item()  # rows 0 and 1 have targets
            retain = _torch_seq_nll(current, BATCH["retain"]).mean().item() if name == "ga_gd" else 0.0
        assert float(value) == pytest.approx(-forget + retain, abs=1e-5)
        assert float(metrics["forget_nll"]) == pytest.approx(forget, abs=1e-5)
