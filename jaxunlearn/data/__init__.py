"""Documents -> token chunks -> per-step batches."""

from jaxunlearn.data.batches import StepBatcher
from jaxunlearn.data.chunks import Chunks, default_cache_dir, load_chunks, tokenize_and_chunk
from jaxunlearn.data.documents import DataError, DocumentSource, load_documents

__all__ = [
    "Chunks",
    "DataError",
    "DocumentSource",
    "StepBatcher",
    "default_cache_dir",
    "load_chunks",
    "load_documents",
    "tokenize_and_chunk",
]
