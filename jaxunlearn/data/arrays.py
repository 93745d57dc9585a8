"""The token arrays of one split (:class:`Chunks`), made by plain-text chunking (:mod:`jaxunlearn.data.chunks`) and
by question-answer layout (:mod:`jaxunlearn.data.qa`)."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Chunks:
    """``tokens`` int32 ``[n, max_length]`` right-padded, ``lengths`` int32 ``[n]``, ``doc_index`` int32 ``[n]``;
    ``prompt_lengths`` int32 ``[n]`` for question-answer chunks (their first ``prompt_lengths`` tokens are the
    question: context, never a target), ``None`` for plain text (every token after the first is a target)."""

    tokens: np.ndarray
    lengths: np.ndarray
    doc_index: np.ndarray
    num_documents: int
    prompt_lengths: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def mask(self) -> np.ndarray:
        return (np.arange(self.tokens.shape[1])[None, :] < self.lengths[:, None]).astype(np.int32)

    @property
    def prompts(self) -> np.ndarray:
        """``prompt_lengths``, zeros for plain text."""
        return self.prompt_lengths if self.prompt_lengths is not None else np.zeros(len(self), np.int32)

    def target_mask(self, index: np.ndarray | None = None) -> np.ndarray:
        """``[n, max_length]`` bool of the chunks at ``index`` (default: all): position ``t`` scores token ``t + 1``
        when both are real tokens and ``t + 1`` is not in the prompt (:func:`jaxunlearn.models.losses.next_token_targets`
        on the host)."""
        index = np.arange(len(self)) if index is None else index
        lengths, prompts = self.lengths[index], self.prompts[index]
        t = np.arange(self.tokens.shape[1])[None, :]
        return (t + 1 < lengths[:, None]) & (t + 1 >= prompts[:, None])

    def take(self, index: np.ndarray) -> Chunks:
        """The chunks at ``index``, their documents renumbered from 0 in order of first id."""
        docs, doc_index = np.unique(self.doc_index[index], return_inverse=True)
        prompts = None if self.prompt_lengths is None else self.prompt_lengths[index]
        return Chunks(self.tokens[index], self.lengths[index], doc_index.astype(np.int32), len(docs), prompts)

    def widened(self, width: int, pad_id: int) -> Chunks:
        """The same chunks in ``width`` columns (at least their own), the new ones filled with ``pad_id``."""
        extra = width - self.tokens.shape[1]
        if extra <= 0:
            return self
        tokens = np.pad(self.tokens, ((0, 0), (0, extra)), constant_values=pad_id)
        return dataclasses.replace(self, tokens=tokens)

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())
