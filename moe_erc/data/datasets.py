"""Train/valid/test GPT datasets over indexed data, built by megatron-core, and their loaders.

A sample (``GPTDataset[i]``) is a dict of tensors, ``S`` = ``seq_length``:

* ``tokens``       int64 ``[S]``: input ids; documents follow each other, each ending with EOD.
* ``labels``       int64 ``[S]``: the next token of each position (``tokens`` shifted left by one).
* ``loss_mask``    float32 ``[S]``: 1.0, or 0.0 where the label is padding.
* ``position_ids`` int64 ``[S]``: ``0 .. S-1`` (not reset at document boundaries).
* ``attention_mask`` bool ``[1, S, S]``: only with ``create_attention_mask=True``; True = masked.
* ``dataset_id``   int64 scalar: only when ``data_path`` blends several datasets.

:func:`build_dataloader` stacks them into ``[micro_batch_size, S]`` batches (``[B, 1, S, S]``
for the attention mask, ``[B]`` for ``dataset_id``).
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
from pathlib import Path
from numbers import Real
from typing import Callable, Iterator, Sequence

import torch

from moe_erc.compat import ensure_importable
from moe_erc.data.tokenizer import Tokenizer
from moe_erc.errors import ConfigError, DataError

_SPLIT_NAMES = ("train", "valid", "test")
_INDEX_MAGIC = b"MMIDIDX\x00\x00"


def stats_path_for(prefix: str) -> Path:
    """The dataset's sidecar of counts written by preprocess: ``{prefix}.stats.json`` (``max_token_id``, documents,
    tokens, vocabulary, tokenizer fingerprint)."""
    return Path(f"{prefix}.stats.json")


def largest_token_id(prefix: str, say=print) -> int:
    """The largest token id in the dataset at ``prefix``: from its ``.stats.json`` sidecar (written by preprocess),
    else read from the ``.bin`` in chunks (flat memory; a note first when the file is over 1 GiB)."""
    import json

    import numpy

    stats = stats_path_for(prefix)
    if stats.is_file():
        try:
            return int(json.loads(stats.read_text())["max_token_id"])
        except (ValueError, KeyError, TypeError):
            pass  # a damaged sidecar: read the data instead
    ensure_importable()
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dtype = IndexedDataset(prefix, mmap=False).index.dtype
    size = os.path.getsize(f"{prefix}.bin")
    if size > 1 << 30:
        say(f"checking the token ids of {prefix}.bin ({size / 2**30:.1f} GiB: it has no .stats.json, which "
            f"moe-erc preprocess writes) against the model's vocabulary")
    data = numpy.memmap(f"{prefix}.bin", dtype=dtype, mode="r")
    chunk = 1 << 26
    return max(int(data[i:i + chunk].max()) for i in range(0, len(data), chunk)) if len(data) else -1


def check_token_ids(prefixes: list[str], vocabulary: int, say=print) -> None:
    """:class:`DataError` when a dataset holds a token id the embedding has no row for (a corpus tokenized with
    another, larger tokenizer): on a GPU a device-side assert hours in, on a CPU an IndexError."""
    for prefix in prefixes:
        largest = largest_token_id(prefix, say)
        if largest >= vocabulary:
            raise DataError(f"dataset {prefix} holds token id {largest} but the model's vocabulary has {vocabulary} "
                            f"ids (0..{vocabulary - 1}): it was tokenized with another tokenizer; set tokenizer.path "
                            f"(or model.vocab_size) to the one it was made with, or re-run preprocess")


def check_indexed_dataset(prefix: str) -> None:
    """Raise :class:`DataError` unless ``{prefix}.idx`` parses, lists at least one document, and
    ``{prefix}.bin`` has exactly the size the index implies (so it is neither truncated nor padded)."""
    ensure_importable()
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    idx_path, bin_path = f"{prefix}.idx", f"{prefix}.bin"
    for path in (idx_path, bin_path):
        if not os.path.isfile(path):
            raise DataError(f"data file {path} is missing; check data.data_path or run preprocess to create {prefix}")
    # Checked before megatron reads it: a failed IndexedDataset() prints a stray error from its __del__.
    problem = _index_layout_problem(idx_path)
    if problem:
        raise DataError(f"index {idx_path} is corrupt ({problem}); re-run preprocess for {prefix}")
    try:
        # mmap=False: only the index is read here, the .bin is not even opened.
        index = IndexedDataset(prefix, mmap=False).index
        lengths, pointers, itemsize = index.sequence_lengths, index.sequence_pointers, index.dtype_size
        expected = int(pointers[-1]) + int(lengths[-1]) * itemsize if len(lengths) else 0
    except Exception as error:  # asserts on inconsistent counts
        raise DataError(f"index {idx_path} is corrupt ({type(error).__name__}: {error}); re-run preprocess for {prefix}") from None
    if len(lengths) == 0:
        raise DataError(f"dataset {prefix} holds no documents; re-run preprocess on non-empty inputs")
    actual = os.path.getsize(bin_path)
    if actual != expected:
        raise DataError(
            f"data file {bin_path} has {actual} bytes but its index expects {expected} "
            f"(truncated or from another run); re-run preprocess for {prefix}"
        )


def _index_layout_problem(idx_path: str) -> str | None:
    """What is wrong with the layout of a megatron ``.idx`` file, or None.

    Layout (little-endian): 9-byte magic, u64 version 1, u8 dtype code, u64 sequence count n,
    u64 document count d, then n int32 lengths, n int64 pointers and d int64 document indices.
    """
    from megatron.core.datasets.indexed_dataset import DType

    header = struct.Struct("<9sQBQQ")
    size = os.path.getsize(idx_path)
    with open(idx_path, "rb") as stream:
        raw = stream.read(header.size)
    if len(raw) < header.size:
        return f"{size} bytes, shorter than the header"
    magic, version, dtype_code, sequences, documents = header.unpack(raw)
    if magic != _INDEX_MAGIC or version != 1:
        return "not a megatron MMIDIDX version 1 index"
    if dtype_code not in {d.value for d in DType}:
        return f"unknown token dtype code {dtype_code}"
    expected = header.size + sequences * (4 + 8) + documents * 8
    if size != expected:
        return f"{size} bytes where its counts imply {expected}"
    return None


def parse_data_path(data_path: Sequence[str | Real] | str) -> tuple[list[str], list[float] | None]:
    """``"p"``, ``["p1", "p2"]`` or a weighted blend ``[w1, "p1", w2, "p2"]`` (weights may be
    numeric strings) -> ``(prefixes, weights or None)``."""
    items = [data_path] if isinstance(data_path, (str, os.PathLike)) else list(data_path)
    if not items:
        raise DataError("data.data_path is empty; give a dataset prefix, a list of prefixes or [weight, prefix, ...]")
    numeric = [_as_weight(item) is not None for item in items]
    if not any(numeric):
        return [str(item) for item in items], None
    is_blend = len(items) % 2 == 0 and all(numeric[0::2]) and not any(numeric[1::2])
    if not is_blend:
        raise DataError(f"data.data_path {list(items)} mixes weights and prefixes; write it as [weight1, prefix1, weight2, prefix2, ...]")
    weights = [_as_weight(w) for w in items[0::2]]
    if not all(w > 0 and math.isfinite(w) for w in weights):
        raise DataError(f"data.data_path weights {weights} must all be positive numbers")
    return [str(p) for p in items[1::2]], weights


def build_gpt_datasets(
    data_path: Sequence[str | Real] | str,
    split: str,
    seq_length: int,
    seed: int,
    tokenizer: Tokenizer,
    train_samples: int,
    valid_samples: int,
    test_samples: int,
    cache_dir: str,
    create_attention_mask: bool = False,
    is_built_on_rank: Callable[[], bool] | None = None,
) -> tuple:
    """``(train, valid, test)`` datasets of ``seq_length``-token samples (see the module docstring).

    Documents are divided between the splits by ``split`` (e.g. ``"98,2,0"``), then each split
    is shuffled with ``seed`` and repeated for as many epochs as its ``*_samples`` need. A split
    asking for 0 samples is ``None``. Sample indices are cached in ``cache_dir/<data signature>``
    (megatron keys its cache on paths, not contents, so re-made data must not hit it). Call it on every
    rank: with torch.distributed initialized, rank 0 builds the indices first and the other ranks
    read them from ``cache_dir`` (which must be shared). ``is_built_on_rank`` (default: every rank)
    returns False on ranks that get their data another way; they receive ``None`` datasets.
    """
    ensure_importable()
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    prefixes, weights = parse_data_path(data_path)
    for prefix in prefixes:
        check_indexed_dataset(prefix)
    sizes = [train_samples, valid_samples, test_samples]
    if seq_length < 1 or any(not isinstance(n, int) or n < 0 for n in sizes):
        raise ConfigError(f"seq_length={seq_length} must be >= 1 and sample counts {sizes} must be integers >= 0")
    split_vector = _parse_split(split)

    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=(prefixes, weights),
        split=split,
        path_to_cache=os.path.join(cache_dir, _data_signature(prefixes)),
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=create_attention_mask,
    )
    # Splits nobody asked samples of are not built at all: a split that got no documents (e.g.
    # the 1% test split of a 38-document corpus) would otherwise make megatron loop forever.
    for i, n in enumerate(sizes):
        if n == 0:
            config.split_matrix[i] = None
    _check_splits_have_documents(prefixes, split, split_vector, config.split_matrix, sizes)

    builder = BlendedMegatronDatasetBuilder(GPTDataset, sizes, is_built_on_rank or (lambda: True), config)
    return tuple(builder.build())


def build_dataloader(
    dataset,
    micro_batch_size: int,
    data_parallel_rank: int,
    data_parallel_size: int,
    consumed_samples: int = 0,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> torch.utils.data.DataLoader:
    """Batches ``[micro_batch_size, seq_length]`` of ``dataset`` for one data-parallel rank.

    Samples are taken in index order (the dataset is already shuffled) in global micro-batches of
    ``micro_batch_size * data_parallel_size``; rank ``r`` gets the ``r``-th slice of each. Starts
    after ``consumed_samples`` (all ranks together) so a resumed run continues exactly; a last
    incomplete global micro-batch is dropped. ``pin_memory`` (for a GPU) lets :func:`move_batch` copy
    batches to the device asynchronously.
    """
    sampler = PretrainingBatchSampler(
        len(dataset), micro_batch_size, data_parallel_rank, data_parallel_size, consumed_samples
    )
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=torch.utils.data.default_collate,
        persistent_workers=num_workers > 0,
        pin_memory=pin_memory,
        # Its own generator: creating an iterator draws a worker seed, which must not move the global
        # RNG (dropout, ERC noise) or a resumed run would diverge from an uninterrupted one.
        generator=torch.Generator().manual_seed(0),
    )


def move_batch(batch: dict, device: torch.device) -> dict:
    """Every tensor of ``batch`` on ``device``. From pinned host memory the copies are asynchronous
    (``non_blocking``): the host queues them and goes on; the GPU stream orders them before their use."""
    return {key: value.to(device, non_blocking=True) if torch.is_tensor(value) else value
            for key, value in batch.items()}


class PretrainingBatchSampler:
    """Index batches for one data-parallel rank, deterministic and resumable (Megatron-LM's
    ``MegatronPretrainingSampler`` semantics). Yields lists of ``micro_batch_size`` indices."""

    def __init__(
        self,
        total_samples: int,
        micro_batch_size: int,
        data_parallel_rank: int,
        data_parallel_size: int,
        consumed_samples: int = 0,
    ) -> None:
        if micro_batch_size < 1 or data_parallel_size < 1 or not 0 <= data_parallel_rank < data_parallel_size:
            raise ConfigError(
                f"micro_batch_size={micro_batch_size} and data_parallel_size={data_parallel_size} must be >= 1, "
                f"and data_parallel_rank={data_parallel_rank} in [0, {data_parallel_size})"
            )
        if not 0 <= consumed_samples <= total_samples:
            raise DataError(
                f"consumed_samples={consumed_samples} is beyond the dataset's {total_samples} samples; "
                f"resume with the same data settings, or build the dataset with more train samples"
            )
        self.total_samples = total_samples
        self.micro_batch_size = micro_batch_size
        self.rank = data_parallel_rank
        self.global_batch = micro_batch_size * data_parallel_size
        self.consumed_samples = consumed_samples

    def __len__(self) -> int:
        """Number of micro-batches this rank will yield."""
        return (self.total_samples - self.consumed_samples) // self.global_batch

    def __iter__(self) -> Iterator[list[int]]:
        first = self.consumed_samples + self.rank * self.micro_batch_size
        for start in range(first, first + len(self) * self.global_batch, self.global_batch):
            yield list(range(start, start + self.micro_batch_size))


def _data_signature(prefixes: list[str]) -> str:
    """16 hex digits identifying the contents of the datasets: sha256 of each ``.idx`` (12 bytes
    per document, so cheap to read) and each ``.bin`` size."""
    digest = hashlib.sha256()
    for prefix in prefixes:
        digest.update(f"{os.path.getsize(prefix + '.bin')}:".encode())
        with open(prefix + ".idx", "rb") as stream:
            for chunk in iter(lambda: stream.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def _as_weight(item) -> float | None:
    if isinstance(item, bool):
        return None
    if isinstance(item, Real):
        return float(item)
    try:
        return float(str(item).strip())
    except ValueError:
        return None


def _parse_split(split: str) -> list[float]:
    try:
        parts = [float(p) for p in str(split).replace("/", ",").split(",") if p.strip()]
    except ValueError:
        parts = []
    if not 1 <= len(parts) <= 3 or any(p < 0 or not math.isfinite(p) for p in parts) or sum(parts) <= 0:
        raise ConfigError(f"data split '{split}' must be up to three non-negative weights for train,valid,test, e.g. '98,2,0'")
    return parts + [0.0] * (3 - len(parts))


def _check_splits_have_documents(prefixes, split, split_vector, split_matrix, sizes) -> None:
    """DataError when a split that must deliver samples gets no document of some dataset."""
    ensure_importable()
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    for prefix in prefixes:
        documents = len(IndexedDataset(prefix, mmap=False).index)
        for name, bookends, n, weight in zip(_SPLIT_NAMES, split_matrix, sizes, split_vector):
            if n == 0:
                continue
            if bookends is None:
                raise DataError(f"{n} {name} samples requested but data split '{split}' gives {name} no share; give it a weight")
            # The same rounding as megatron-core's builder uses to cut the document range.
            begin, end = (int(round(b * float(documents))) for b in bookends)
            if end <= begin:
                raise DataError(
                    f"data {prefix} has only {documents} documents, so split '{split}' leaves the {name} "
                    f"split (weight {weight:g}) none; raise its share, use more documents, or ask 0 {name} samples"
                )
