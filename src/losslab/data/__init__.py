"""Corpora, the token cache and batching, behind one LightningDataModule.

A corpus of any size streams through, a file at a time and a piece of a file at a time:

- :mod:`~losslab.data.corpora`: where documents come from (``pydoc``, ``shakespeare``, ``text``,
  ``jsonl``, ``parquet``), each corpus a :class:`~losslab.data.corpora.Corpus`;
- :mod:`~losslab.data.documents`: paragraphs, how long ones are cut, which documents go to
  validation;
- :mod:`~losslab.data.token_cache`: each split tokenized once, on every core, into token files;
- :mod:`~losslab.data.batching`: the datasets, batches and resumable training order;
- :mod:`~losslab.data.datamodule`: :class:`GPTDataModule`, which puts them together, built from a
  :class:`DataConfig` (``data.*`` in the config), which checks its values before any data work.
"""

from losslab.data.batching import MODES, EpochSampler, ResumableDataLoader, pad_batch
from losslab.data.corpora import CORPORA, load_documents
from losslab.data.datamodule import DataConfig, GPTDataModule

__all__ = [
    "CORPORA",
    "MODES",
    "DataConfig",
    "EpochSampler",
    "GPTDataModule",
    "ResumableDataLoader",
    "load_documents",
    "pad_batch",
]
