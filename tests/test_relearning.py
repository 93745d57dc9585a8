"""The relearning attack's pieces: documents held out whole, the fine-tuning equal to torch's AdamW on the same
batches (on a copy: the evaluated parameters are untouched), and the steps-to-recovery bookkeeping.

The attack inside a run (its report section, for every model) is checked in tests/test_report.py and
tests/test_world.py."""

import copy

import jax
import numpy as np
import pytest
import torch

from jaxunlearn.attacks.relearn import Relearner, Settings, split_by_document, steps_to_reach
from jaxunlearn.data import Chunks, StepBatcher
from jaxunlearn.models import family, split_model
from jaxunlearn.models.hf_checkpoint import from_pretrained, to_hf_layout
from jaxunlearn.models.layouts import nested_get
from jaxunlearn.parallel import sharding
from tests.tiny_models import padded_batch, save_hf_model


def _chunks(doc_index, seed=0, length=12):
    tokens, mask = padded_batch(seed=seed, batch=len(doc_index), length=length)
    doc_index = np.asarray(doc_index, np.int32)
    return Chunks(tokens.astype(np.int32), mask.sum(1).astype(np.int32), doc_index, len(np.unique(doc_index)))


def test_documents_are_held_out_whole_seeded_and_never_all_on_one_side():
    chunks = _chunks([0, 0, 1, 2, 2, 2, 3, 4, 5, 5])
    relearn, measured = split_by_document(chunks, 0.5, seed=3)
    assert len(relearn) + len(measured) == len(chunks)
    assert relearn.num_documents == 3 and measured.num_documents == 3
    # Whole documents on each side: every token row of the original appears on exactly one side.
    rows = {tuple(r) for r in chunks.tokens}
    assert {tuple(r) for r in relearn.tokens} | {tuple(r) for r in measured.tokens} == rows
    assert not {tuple(r) for r in relearn.tokens} & {tuple(r) for r in measured.tokens}
    again, _ = split_by_document(chunks, 0.5, seed=3)
    np.testing.assert_array_equal(again.tokens, relearn.tokens)
    others = [split_by_document(chunks, 0.5, seed=s)[0].tokens for s in range(4, 9)]
    assert any(o.shape != relearn.tokens.shape or not np.array_equal(o, relearn.tokens) for o in others)
    tiny, rest = split_by_document(chunks, 0.01, seed=0)  # at least one document each way
    assert tiny.num_documents == 1 and rest.num_documents == 5
    assert split_by_document(chunks, 0.99, seed=0)[1].num_documents == 1
    with pytest.raises(ValueError, match="1 document"):
        split_by_document(_chunks([0, 0, 0]), 0.5, seed=0)


def test_steps_to_reach_the_first_measured_step_at_the_level():
    curve = [{"step": 0, "forget_ppl": 90.0}, {"step": 2, "forget_ppl": 70.0}, {"step": 4, "forget_ppl": 55.0}]
    assert steps_to_reach(curve, 90.0) == 0
    assert steps_to_reach(curve, 60.0) == 4
    assert steps_to_reach(curve, 50.0) is None


def _torch_seq_nll(model, tokens, mask):
    logp = torch.log_softmax(model(input_ids=tokens, attention_mask=mask).logits.float(), dim=-1)[:, :-1]
    valid = (mask[:, 1:].bool() & mask[:, :-1].bool()).float()
    nll = -logp.gather(-1, tokens[:, 1:, None])[..., 0]
    return (nll * valid).sum(1) / valid.sum(1)


def test_relearning_fine_tunes_a_copy_as_torch_adamw_does(tmp_path):
    """Three steps of next-token descent (AdamW 0.9/0.999, constant lr, no weight decay, clipping at 1.0) on the
    seeded chunk order, against torch's AdamW on transformers' model; measured at steps 0, 2 and 3."""
    hf_model = save_hf_model("llama_mha_untied", tmp_path / "model", seed=0)
    mesh = sharding.single_device_mesh()
    lm, params = split_model(from_pretrained(tmp_path / "model", mesh=mesh, dtype="float32"))
    before = jax.tree.map(np.array, params)
    chunks = _chunks([0, 1, 1, 2, 3], seed=4)
    settings = Settings(steps=3, lr=1e-2, batch_size=2, every=2, seed=1)
    seen = []
    Relearner(lm, mesh, None, settings, chunk_size=5).run(
        params, chunks, lambda step, p: seen.append((step, jax.tree.map(np.array, p)))
    )
    assert [step for step, _ in seen] == [0, 2, 3]
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(before)):
        np.testing.assert_array_equal(np.asarray(a), b)  # the evaluated parameters are untouched

    model = copy.deepcopy(hf_model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    batcher = StepBatcher(chunks, None, 2, 1, 1)
    for step in range(3):
        batch = batcher.batch(step)["forget"]
        tokens, mask = (torch.from_numpy(batch[k][0]).long() for k in ("tokens", "mask"))
        opt.zero_grad()
        _torch_seq_nll(model, tokens, mask).mean().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    theirs = {n: p.detach().numpy() for n, p in model.named_parameters()}
    relearned = seen[-1][1]
    for entry in family(lm.config).hf_tensors(lm.config):
        value = nested_get(relearned, entry.path)
        for i in range(lm.config.num_layers) if entry.stacked else [None]:
            ours = to_hf_layout(entry.layout, value[i] if i is not None else value)
            np.testing.assert_allclose(ours, theirs[entry.name.format(layer=i)], atol=2e-5, err_msg=entry.name)
    with pytest.raises(ValueError, match="lower config.evaluation.relearning.batch_size"):
        Relearner(lm, mesh, None, Settings(3, 1e-2, 8, 1, 0), chunk_size=5).run(params, chunks, lambda *a: None)
