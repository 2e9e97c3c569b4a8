"""Data pipeline: raw text -> tokenizer -> megatron indexed dataset -> GPT samples -> batches.

* :mod:`.tokenizer`  byte-level BPE (HF ``tokenizers``): train, load, save, match against data.
* :mod:`.corpus`     the embedded Shakespeare corpus, prepared once into a dataset.
* :mod:`.preprocess` text/JSON/parquet files -> ``{prefix}.bin/.idx`` (+ ``.tokenizer.json``).
* :mod:`.datasets`   megatron-core ``GPTDataset`` splits and a resumable data-parallel loader.

The public names (except ``preprocess``, which is also a submodule's name) are importable from
here too; submodules load on first use, because importing megatron-core and torch takes seconds.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Tokenizer": "tokenizer",
    "train_bpe": "tokenizer",
    "load_tokenizer": "tokenizer",
    "tokenizer_path_for": "tokenizer",
    "resolve_tokenizer": "tokenizer",
    "embedded_corpus_files": "corpus",
    "prepare_embedded_corpus": "corpus",
    "check_indexed_dataset": "datasets",
    "parse_data_path": "datasets",
    "build_gpt_datasets": "datasets",
    "build_dataloader": "datasets",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
