"""Everything a run needs before its first step, and every check that can fail early: the config, the built-in
world, the mesh, the model's architecture, the tokenizer and the data. Nothing here touches the workdir."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import ml_collections

from jaxunlearn.common.settings import flatten, set_dotted
from jaxunlearn.config import validate
from jaxunlearn.data import Chunks, DataError, DocumentSource, StepBatcher, load_chunks, qa
from jaxunlearn.data.chunks import pad_token_id
from jaxunlearn.errors import ConfigError
from jaxunlearn.methods.registry import Needs, get_method, method_hparams, resolve_needs
from jaxunlearn.models import ModelConfig, hf_checkpoint, param_shardings
from jaxunlearn.parallel import sharding
from jaxunlearn.storage import locations
from jaxunlearn.training.step import lora_spec
from jaxunlearn.world import WorldRecipe, ensure_world

EVAL_SPLITS = ("forget", "approximate", "retain", "general")

log = logging.getLogger("jaxunlearn")


@dataclasses.dataclass
class Prepared:
    """Everything a run needs before its first step (also used by tests and benchmarks)."""

    config: ml_collections.ConfigDict  # with every ``world:`` reference resolved
    mesh: Any
    model_dir: Path
    model_config: ModelConfig
    tokenizer: Any
    needs: Needs  # what the method reads under its hyper-parameters
    batcher: StepBatcher | None  # None when preparing an evaluation only
    total_steps: int
    eval_splits: dict[str, Chunks]
    world: Any = None  # the built-in world, when the config refers to it
    source_config: ml_collections.ConfigDict | None = None  # as given, ``world:`` references unresolved


def prepare(config: ml_collections.ConfigDict, *, training: bool = True) -> Prepared:
    """Validate the config and load what is cheap: mesh, tokenizer, model config, data. Fails fast.

    ``training=False`` (evaluation only) skips the checks and data that only training needs.
    """
    validate(config)
    source, (config, world) = config, resolve_world(config)
    needs = resolve_needs(config.method)
    mesh = sharding.make_mesh(sharding.MeshConfig.from_config(config.mesh))
    ways = sharding.batch_ways(mesh, config.mesh.rules)
    if training and config.train.micro_batch_size % ways:
        raise ConfigError(
            f"config.train.micro_batch_size={config.train.micro_batch_size}: must be a multiple of the number of "
            f"devices the batch is split over ({ways}, from config.mesh.rules)"
        )
    model_dir, model_config = model_architecture(config, mesh)
    tokenizer = load_tokenizer(config, model_dir, model_config)
    resolve_qa_templates(config, model_config, tokenizer, split_names(config, needs, training))
    chunks = load_splits(config, tokenizer, model_config, split_names(config, needs, training))
    batcher, total = None, 0
    if training:
        retain = chunks["retain"] if needs.retain else None
        forget, forget2 = chunks["forget"], chunks.get("forget2")
        if forget2 is not None:  # one width for both topics' batches (the longer cap)
            width, pad_id = max(forget.tokens.shape[1], forget2.tokens.shape[1]), pad_token_id(tokenizer)
            forget, forget2 = forget.widened(width, pad_id), forget2.widened(width, pad_id)
        t = config.train
        batcher = StepBatcher(forget, retain, t.micro_batch_size, t.grad_accum_steps, config.seed, forget2)
        total = t.max_steps or t.epochs * batcher.steps_per_epoch
    # Utility is measured on `eval_retain` when given (e.g. in-distribution text for the *_general methods).
    named = {**chunks, "retain": chunks.get("eval_retain", chunks.get("retain"))}
    eval_splits = {k: named[k] for k in EVAL_SPLITS if named.get(k) is not None}
    return Prepared(config, mesh, model_dir, model_config, tokenizer, needs, batcher, total, eval_splits, world, source)


def model_architecture(config: ml_collections.ConfigDict, mesh: Any) -> tuple[Path, ModelConfig]:
    """The model's directory and architecture; fails now if the mesh cannot split it or the oracle differs."""
    m = config.model
    model_dir = hf_checkpoint.resolve_model_dir(m.path, revision=m.revision or None)
    model_config = ModelConfig.from_hf(
        hf_checkpoint.read_hf_config(model_dir),
        param_dtype=m.param_dtype,
        dtype=m.dtype,
        remat=m.remat,
        attention_impl=m.attention_impl,
    )
    param_shardings(model_config, mesh, config.mesh.rules)  # fails now if the mesh cannot split the heads
    check_method(config.method, model_config)
    if config.lora.rank:
        lora_spec(config, model_config)  # targets that match no weight (the method trains) fail now
    hf_checkpoint.check_checkpoint(model_dir, model_config)  # headers and tensor table: a damaged file fails now
    if config.evaluation.enabled and config.evaluation.oracle_model:
        check_oracle_architecture(config.evaluation.oracle_model, model_config)
    return model_dir, model_config


def check_method(method_config: ml_collections.ConfigDict, model_config: ModelConfig) -> None:
    """The method's own check of its hyper-parameters against the model (e.g. RMU's layer), before any compute."""
    method = get_method(method_config.name)
    if method.check is not None:
        try:
            method.check(method_hparams(method_config), model_config)
        except ValueError as e:
            raise ConfigError(str(e)) from None


def check_oracle_architecture(path: str, model_config: ModelConfig) -> None:
    """Before any compute: KL(oracle || model) needs the oracle to share the model's architecture."""
    oracle_dir = hf_checkpoint.resolve_model_dir(path)
    oracle = ModelConfig.from_hf(hf_checkpoint.read_hf_config(oracle_dir)).replace(
        param_dtype=model_config.param_dtype,
        dtype=model_config.dtype,
        remat=model_config.remat,
        attention_impl=model_config.attention_impl,
    )
    if oracle.replace(hf_config_json="") != model_config.replace(hf_config_json=""):
        raise ConfigError(f"config.evaluation.oracle_model={path!r}: its architecture differs from config.model.path's")
    hf_checkpoint.check_checkpoint(oracle_dir, oracle)


def load_tokenizer(config: ml_collections.ConfigDict, model_dir: Path, model_config: ModelConfig) -> Any:
    """The run's tokenizer (``config.model.tokenizer``, else the model's own), checked against the model."""
    m = config.model
    tokenizer = hf_checkpoint.load_tokenizer(m.tokenizer or model_dir, revision=m.revision or None)
    if len(tokenizer) > model_config.vocab_size:
        raise DataError(
            f"the tokenizer ({m.tokenizer or model_dir}) has {len(tokenizer)} tokens but the model's vocab_size is "
            f"{model_config.vocab_size}: they do not belong together"
        )
    return tokenizer


def resolve_qa_templates(
    config: ml_collections.ConfigDict, model_config: ModelConfig, tokenizer: Any, names: list[str]
) -> None:
    """Replace each ``auto`` question-answer template that this run reads (``data.qa_template`` for question-answer
    splits, ``evaluation.tofu.template``) with the model's TOFU format (:func:`qa.template_for_model`: its
    model_type, chat template and names), so that the chunks' cache keys and the recorded config hold the real one.
    A model without a known format is a ConfigError naming the setting."""
    hf_name = json.loads(model_config.hf_config_json or "{}").get("_name_or_path", "")
    hints = [config.model.path, config.model.tokenizer, getattr(tokenizer, "name_or_path", ""), hf_name]
    d, e = config.data, config.evaluation
    targets = []
    if d.get("qa_template") == qa.AUTO and any(d[s].get("question") for s in names):
        targets.append((d, "qa_template", "config.data.qa_template"))
    if e.enabled and "tofu" in e.metrics and e.tofu.path and e.tofu.template == qa.AUTO:
        targets.append((e.tofu, "template", "config.evaluation.tofu.template"))
    for section, key, where in targets:
        try:
            section[key] = qa.template_for_model(model_config.model_type, tokenizer, [str(h) for h in hints], where)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        log.info("%s=auto: %r for this model", where, section[key])


def split_names(config: ml_collections.ConfigDict, needs: Needs, training: bool) -> list[str]:
    """The data splits a run reads: forget (and forget2 when training on two topics), retain when the method needs
    it, and the evaluation splits."""
    d = config.data
    names = ["forget"] + (["forget2"] if d.forget2.path and training else [])
    names += ["retain"] if needs.retain and training else []
    if config.evaluation.enabled:
        names += [s for s in ("approximate", "general") if d[s].path]
        if d.eval_retain.path:
            names.append("eval_retain")
        elif d.retain.path and "retain" not in names:
            names.append("retain")
    return names


def load_splits(
    config: ml_collections.ConfigDict, tokenizer: Any, model_config: ModelConfig, names: list[str]
) -> dict[str, Chunks]:
    """The chunks of every named split, each checked against the model's vocabulary. With ``data.first_tokens`` the
    training splits are one chunk per document: the forget topics' first ``first_tokens`` tokens, retain's first
    ``max_length``."""
    d = config.data
    first = dict(zip(("forget", "forget2"), d.first_tokens)) | ({"retain": d.max_length} if d.first_tokens else {})
    chunks = {}
    with locations.synced_cache(d.cache_dir, "config.data.cache_dir") as cache_dir:
        for split in names:
            chunks[split] = load_chunks(
                DocumentSource.from_config(split, d[split]),
                tokenizer,
                first.get(split, d.max_length),
                min_tokens=d.min_chunk_tokens,
                add_special_tokens=d.add_special_tokens,
                cache_dir=cache_dir or None,
                qa_template=d.get("qa_template", ""),
                first_only=split in first,
            )
    for split, c in chunks.items():
        top = int(c.tokens.max())
        if top >= model_config.vocab_size:
            raise DataError(
                f"data.{split}: token id {top} is outside the model's vocabulary ({model_config.vocab_size})"
            )
        log.info("data.%s: %d documents, %d chunks, %d tokens", split, c.num_documents, len(c), c.num_tokens)
    return chunks


# --- the built-in world -------------------------------------------------------------------------------------


def resolve_world(config: ml_collections.ConfigDict) -> tuple[ml_collections.ConfigDict, Any]:
    """Replace every ``world:<name>`` path by the built-in world's file, building the world if needed.

    Returns the resolved copy of the config and the world (``None`` when nothing refers to it). References in
    fields this run does not read are dropped, not built.
    """
    unused = unused_fields(config)
    resolved = copy.deepcopy(config)
    refs = []
    for key, value in flatten(config, "config").items():
        if isinstance(value, str) and value.startswith("world:"):
            if key.startswith(unused):
                set_dotted(resolved, key.removeprefix("config."), "")
            else:
                refs.append((key, value))
    if not refs:
        return resolved, None
    with locations.synced_cache(config.world.cache_dir, "config.world.cache_dir") as cache_dir:
        world = ensure_world(WorldRecipe.from_config(config.world), cache_dir or None)
    for key, value in refs:
        try:
            set_dotted(resolved, key.removeprefix("config."), world.resolve(value))
        except KeyError as e:
            raise ConfigError(f"{key}={value!r}: {e.args[0]}") from e
    return resolved, world


def unused_fields(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """Config keys (prefixes) a run does not read, given its method's needs and whether it evaluates."""
    if config.evaluation.enabled:
        return ()
    unused = ["config.evaluation.", "config.data.approximate.", "config.data.general.", "config.data.eval_retain."]
    if not resolve_needs(config.method).retain:
        unused.append("config.data.retain.")
    return tuple(unused)
