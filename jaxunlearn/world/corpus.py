"""Real text found at run time on any Python install, split deterministically by document.

* Code domain: the standard library's own source files (tests excluded), one document per file.
* General domain: the language-reference prose shipped with Python (``pydoc_data.topics``), one document per
  topic.

Splits: ``forget``, ``approximate`` (unseen, same domain: the membership non-members), ``retain``
(in-distribution, trained on), ``general_retain`` (trained on) and ``general_eval`` (held out). Forget and
approximate documents are drawn from the same size band, so the only systematic difference between them is
whether the model saw them.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import numpy as np

from jaxunlearn.data.python_source import is_test_path, topic_documents

SPLITS = ("forget", "approximate", "retain", "general_retain", "general_eval")

Document = tuple[str, str]  # (id, text)


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def code_documents(max_chars: int) -> list[Document]:
    """Standard-library ``.py`` files (no tests, no third-party packages) up to ``max_chars``, by path."""
    root = stdlib_root()
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if is_test_path(rel):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if 0 < len(text) <= max_chars:
            docs.append((f"code/{rel.as_posix()}", text))
    return docs


def general_documents() -> list[Document]:
    """The language reference's topics (``pydoc_data.topics``), one document each, by name."""
    # Aliases kept: the built-in world's documents (and so its cache key and numbers) predate the de-duplication.
    return [(f"topic/{name}", text) for name, text in topic_documents(unique=False)]


def split_documents(
    *,
    seed: int,
    forget_docs: int,
    approximate_docs: int,
    band_chars: tuple[int, int],
    retain_chars: int,
    retain_max_chars: int,
    general_eval_fraction: float,
) -> dict[str, list[Document]]:
    """Deterministic, disjoint splits (the same ``seed`` on the same Python gives the same documents)."""
    rng = np.random.default_rng(seed)
    code = code_documents(retain_max_chars)
    lo, hi = band_chars
    band = [d for d in code if lo <= len(d[1]) <= hi]
    if len(band) < forget_docs + approximate_docs:
        raise ValueError(
            f"only {len(band)} standard-library files have {lo}-{hi} characters; need "
            f"{forget_docs + approximate_docs} for the forget and approximate splits"
        )
    order = rng.permutation(len(band))
    forget = [band[i] for i in order[:forget_docs]]
    approximate = [band[i] for i in order[forget_docs : forget_docs + approximate_docs]]
    taken = {d[0] for d in forget + approximate}
    rest = [d for d in code if d[0] not in taken]
    retain, total = [], 0
    for i in rng.permutation(len(rest)):
        if total >= retain_chars:
            break
        retain.append(rest[i])
        total += len(rest[i][1])
    general = general_documents()
    order = rng.permutation(len(general))
    n_eval = max(1, round(general_eval_fraction * len(general)))
    return {
        "forget": forget,
        "approximate": approximate,
        "retain": sorted(retain),
        "general_retain": sorted(general[i] for i in order[n_eval:]),
        "general_eval": sorted(general[i] for i in order[:n_eval]),
    }
