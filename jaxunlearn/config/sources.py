"""Where the paper's presets read their data: the paper's data set on the Hub, PG-19 for books, and the schema of
one data split (a leaf: presets and the base config both build splits with :func:`split_config`)."""

from __future__ import annotations

import ml_collections

# The paper's data set on the Hugging Face Hub (configs arxiv / github / general).
PAPER_DATASET = "llmunlearn/unlearn_dataset"
# The paper's third domain, books, was never released (only arXiv, GitHub and general text are on the Hub). The
# `books` preset stands in PG-19 (DeepMind's Project Gutenberg books published before 1919; TensorFlow Datasets
# `pg19`, text feature `book_text`; train 28,602 / validation 50 / test 100 books), prepared in a TFDS data_dir.
# TFDS stores a split in a fixed order by a hash of each book's id, the same on every machine, so the first books of
# `train` are a fixed pseudo-random sample of it: forget = the first 50 (about 20 MB of text at PG-19's mean of
# ~0.4 MB a book, the size of the paper's arXiv forget set, 22 MB), in-distribution retain = the next 100 (disjoint
# from forget), approximate = the 100 `test` books (never trained on by the unlearning, same era and source).
BOOKS_COLUMN = "book_text"
BOOKS_SPLITS = {
    "forget": "tfds:pg19:train[:50]",
    "retain": "tfds:pg19:train[50:150]",
    "approximate": "tfds:pg19:test",
}


def split_config(
    path: str = "",
    name: str = "",
    split: str = "",
    column: str = "",
    max_documents: int = 0,
    tfds_data_dir: str = "",
    question: str = "",
):
    """One data split: a local file/directory, a Hub dataset (``path``, ``name``, ``split``) or a TensorFlow Datasets
    selection (``path="tfds:NAME[/CONFIG][:VERSION]:SPLIT"``, read from ``tfds_data_dir``, default TFDS's own).
    ``question``: question-answer data, the question column (``column`` is the answer's, default ``answer``): one
    chunk per record, laid out by ``data.qa_template``, whose loss counts the answer only."""
    return ml_collections.ConfigDict(
        dict(
            path=path,
            name=name,
            split=split,
            column=column,
            max_documents=max_documents,
            tfds_data_dir=tfds_data_dir,
            question=question,
        )
    )


def domain_split(domain: str, split: str) -> ml_collections.ConfigDict:
    """One split of a paper domain: the Hub data set's, or PG-19's in TFDS for ``books``."""
    if domain == "books":
        return split_config(BOOKS_SPLITS[split], column=BOOKS_COLUMN)
    return split_config(PAPER_DATASET, domain, split)
