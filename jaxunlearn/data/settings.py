"""The ``data`` config section's own checks: lengths, the splits' sizes and selections, the question template."""

from __future__ import annotations

from typing import Any

import jaxunlearn.data.tfds_source as tfds_source
from jaxunlearn.data.qa import check_template
from jaxunlearn.errors import NON_NEGATIVE, ConfigError, check_rules, require

SPLITS = ("forget", "forget2", "retain", "approximate", "general", "eval_retain")


def check_config(d: Any) -> None:
    """The ``data`` section (whether a method or a metric has the split it needs is checked across sections)."""
    check_rules(
        d,
        "config.data",
        {
            "max_length": (lambda v: v >= 2, "at least 2"),
            "forget.path": (bool, "the forget set is required"),
            **{f"{s}.max_documents": (NON_NEGATIVE[0], ">= 0 (0 = all)") for s in SPLITS},
        },
    )
    require(
        2 <= d.min_chunk_tokens <= d.max_length,
        "config.data.min_chunk_tokens",
        d.min_chunk_tokens,
        "in [2, max_length] (a chunk needs two tokens for one next-token target)",
    )
    topics = 1 + bool(d.forget2.path)
    first = d.first_tokens
    require(
        first == () or (len(first) == topics and all(isinstance(n, int) and n >= 2 for n in first)),
        "config.data.first_tokens",
        first,
        f"() (off) or one length >= 2 per forget topic ({topics}: forget{', forget2' if topics == 2 else ''})",
    )
    require(not d.forget2.question, "config.data.forget2.question", d.forget2.question, "forget2 is plain text only")
    if d.qa_template and any(d[split].get("question") for split in SPLITS):
        try:
            check_template(d.qa_template)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    for split in SPLITS:
        path = d[split].path
        if tfds_source.is_tfds_path(path):  # the selection's syntax; whether it is prepared is read with the data
            try:
                tfds_source.parse(path)
            except ValueError as e:
                raise ConfigError(f"config.data.{split}.path={path!r}: {e}") from None
