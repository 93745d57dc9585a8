"""Documents -> token chunks -> per-step batches."""

from jaxunlearn.data.arrays import Chunks
from jaxunlearn.data.batches import StepBatcher
from jaxunlearn.data.chunks import load_chunks, tokenize_and_chunk
from jaxunlearn.data.documents import load_documents
from jaxunlearn.data.source import DataError, DocumentSource

__all__ = [
    "Chunks",
    "DataError",
    "DocumentSource",
    "StepBatcher",
    "load_chunks",
    "load_documents",
    "tokenize_and_chunk",
]
