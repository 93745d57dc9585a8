"""Generation stops where transformers' ``generate`` stops: at every EOS id of the model's generation config
(Llama-3's ``<|eot_id|>``, Phi-3.5's ``<|end|>``), not only at the tokenizer's EOS; and an export keeps that config."""

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from jaxunlearn.evaluation.loop import Evaluator
from jaxunlearn.evaluation.registry import EvalContext
from jaxunlearn.models import split_model
from jaxunlearn.models.hf_checkpoint import from_pretrained, save_pretrained, stop_token_ids
from jaxunlearn.parallel import sharding
from tests.tiny_models import make_tokenizer, save_hf_model


def _hf_eos(path) -> tuple[int, ...]:
    """The ids transformers' generate stops at: the loaded model's generation_config.eos_token_id."""
    eos = AutoModelForCausalLM.from_pretrained(path).generation_config.eos_token_id
    return tuple(eos if isinstance(eos, list) else [] if eos is None else [eos])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("stop") / "model"
    hf = save_hf_model("llama_gqa_tied", path)
    make_tokenizer().save_pretrained(path)
    return path, hf


def test_stop_ids_are_transformers_generation_eos_ids(tiny, tmp_path):
    path, _ = tiny
    assert stop_token_ids(path) == _hf_eos(path)  # from config.json / the saved generation config
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7, 11]}))
    assert stop_token_ids(path) == _hf_eos(path) == (2, 7, 11)
    (path / "generation_config.json").write_text(json.dumps({"do_sample": False}))  # no eos: config.json's
    config_eos = json.loads((path / "config.json").read_text()).get("eos_token_id")
    assert stop_token_ids(path) == (() if config_eos is None else (config_eos,))


def test_generation_stops_at_a_generation_config_eos_as_transformers_does(tiny, tmp_path):
    path, hf = tiny
    mesh = sharding.single_device_mesh()
    lm, params = split_model(from_pretrained(path, mesh=mesh, dtype="float32"))
    tok = make_tokenizer()
    prompt = [5, 9, 14, 20]
    free = EvalContext(Evaluator(lm, mesh, batch_size=2), params, tok, {}, 0, 64, "model")
    with torch.no_grad():
        x = torch.tensor([prompt])
        run = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=8, do_sample=False, eos_token_id=None)
    greedy = run[0, len(prompt) :].tolist()
    stop = next(t for t in greedy[2:] if t != tok.eos_token_id and t not in greedy[:2])  # a token it emits later
    with torch.no_grad():  # transformers with a generation-config EOS list: it stops at (and keeps) that token
        ref = hf.generate(
            x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=8,
            do_sample=False,
            eos_token_id=[tok.eos_token_id, stop],
        )[0, len(prompt) :].tolist()
    assert ref[-1] == stop and len(ref) < 8
    expected = tok.decode(ref[:-1], skip_special_tokens=True)
    stopped = EvalContext(Evaluator(lm, mesh, batch_size=2), params, tok, {}, 0, 64, "model", stop_ids=(stop,))
    assert stopped.generate_text([prompt], 8) == [expected]
    assert free.generate_text([prompt], 8) != [expected]  # without the id it runs on


def test_an_export_keeps_the_generation_config(tiny, tmp_path):
    path, _ = tiny
    model = from_pretrained(path, mesh=sharding.single_device_mesh(), dtype="float32")
    config = {"eos_token_id": [2, 7], "do_sample": False}
    out = save_pretrained(model, tmp_path / "export", generation_config=config)
    assert stop_token_ids(out) == _hf_eos(out) == (2, 7)
    assert np.all([json.loads((out / "generation_config.json").read_text())[k] == v for k, v in config.items()])
