"""Datasets: index checks, data paths, megatron GPT splits, and the data-parallel loader."""

import json
import multiprocessing
import os
import shutil
import traceback


import pytest
import torch

from moe_erc.data.datasets import (
    build_dataloader,
    build_gpt_datasets,
    check_indexed_dataset,
    parse_data_path,
)
from moe_erc.data.preprocess import preprocess
from moe_erc.data.tokenizer import load_tokenizer, tokenizer_path_for
from moe_erc.errors import ConfigError, DataError

SEQ = 16


def _write_corpus(path, documents, seed):
    words = "the quick brown fox jumps over a lazy dog while ravens sing of kings and queens".split()
    lines = []
    for d in range(documents):
        n = 5 + (d * 7 + seed) % 40  # varied lengths, so samples straddle document boundaries
        lines.append(json.dumps({"text": " ".join(words[(d + i * seed) % len(words)] for i in range(n))}))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two small datasets tokenized with one tokenizer: (prefix_a, prefix_b, tokenizer, directory)."""
    directory = tmp_path_factory.mktemp("data")
    prefix_a = preprocess([str(_write_corpus(directory / "a.jsonl", 60, 1))], str(directory / "a"), vocab_size=300)[0]
    tokenizer_file = str(tokenizer_path_for(prefix_a))
    prefix_b = preprocess([str(_write_corpus(directory / "b.jsonl", 40, 3))], str(directory / "b"), tokenizer=tokenizer_file)[0]
    return prefix_a, prefix_b, load_tokenizer(tokenizer_file), directory


def _copy_dataset(prefix, directory):
    copy = str(directory / os.path.basename(prefix))
    for suffix in (".bin", ".idx"):
        shutil.copy(prefix + suffix, copy + suffix)
    return copy


def test_check_indexed_dataset_accepts_good_data(data):
    check_indexed_dataset(data[0])


def test_check_indexed_dataset_rejects_missing_and_corrupt_files(data, tmp_path):
    with pytest.raises(DataError, match=r"nope\.idx is missing"):
        check_indexed_dataset(str(tmp_path / "nope"))

    (tmp_path / "copy").mkdir()
    truncated = _copy_dataset(data[0], tmp_path / "copy")
    size = os.path.getsize(truncated + ".bin")
    os.truncate(truncated + ".bin", size - 3)
    with pytest.raises(DataError, match=rf"has {size - 3} bytes but its index expects {size}"):
        check_indexed_dataset(truncated)

    with open(truncated + ".bin", "ab") as extra:  # now 3 bytes too many
        extra.write(b"\0" * 6)
    with pytest.raises(DataError, match="index expects"):
        check_indexed_dataset(truncated)

    shutil.copy(data[0] + ".bin", truncated + ".bin")
    with open(truncated + ".idx", "r+b") as index:
        index.truncate(os.path.getsize(truncated + ".idx") - 8)
    with pytest.raises(DataError, match="corrupt"):
        check_indexed_dataset(truncated)

    with open(truncated + ".idx", "wb") as index:
        index.write(b"not an index at all, just some bytes")
    with pytest.raises(DataError, match="corrupt .*not a megatron"):
        check_indexed_dataset(truncated)


def test_parse_data_path():
    assert parse_data_path("data/a") == (["data/a"], None)
    assert parse_data_path(["data/a", "data/b"]) == (["data/a", "data/b"], None)
    assert parse_data_path([0.3, "data/a", "0.7", "data/b"]) == (["data/a", "data/b"], [0.3, 0.7])
    assert parse_data_path(["1", "data/a"]) == (["data/a"], [1.0])
    for bad in ([], ["0.3", "data/a", "data/b"], [0.5, "data/a", 0.5], [0, "data/a"], ["data/a", 1, "data/b", 2]):
        with pytest.raises(DataError):
            parse_data_path(bad)


def test_gpt_samples_have_shape_and_shifted_labels(data, tmp_path):
    prefix, _, tokenizer, _ = data
    train, valid, test = build_gpt_datasets(prefix, "80,20,0", SEQ, 1234, tokenizer, 100, 10, 0, str(tmp_path))
    assert test is None  # 0 test samples asked: not built
    assert len(train) >= 100 and len(valid) >= 10
    for dataset in (train, valid):
        for i in range(len(dataset)):
            sample = dataset[i]
            assert set(sample) == {"tokens", "labels", "loss_mask", "position_ids"}
            assert all(value.shape == (SEQ,) for value in sample.values())
            assert sample["tokens"].dtype == sample["labels"].dtype == torch.int64
            assert torch.equal(sample["labels"][:-1], sample["tokens"][1:])
            assert torch.equal(sample["position_ids"], torch.arange(SEQ))
            assert torch.equal(sample["loss_mask"], torch.ones(SEQ))
            assert int(sample["tokens"].max()) < tokenizer.vocab_size
    # Samples run across documents, which end with the end-of-document token.
    assert any(tokenizer.eod in train[i]["tokens"].tolist() for i in range(len(train)))

    # Same arguments: same samples, now read from the cache.
    again, _, _ = build_gpt_datasets(prefix, "80,20,0", SEQ, 1234, tokenizer, 100, 10, 0, str(tmp_path))
    assert torch.equal(again[5]["tokens"], train[5]["tokens"])
    with_mask, _, _ = build_gpt_datasets(prefix, "100,0,0", SEQ, 1, tokenizer, 3, 0, 0, str(tmp_path), create_attention_mask=True)
    assert with_mask[0]["attention_mask"].shape == (1, SEQ, SEQ)


def test_weighted_blend(data, tmp_path):
    prefix_a, prefix_b, tokenizer, _ = data
    train, _, _ = build_gpt_datasets([1, prefix_a, 3, prefix_b], "100,0,0", SEQ, 7, tokenizer, 200, 0, 0, str(tmp_path))
    assert len(train) == 200
    dataset_ids = torch.tensor([int(train[i]["dataset_id"]) for i in range(len(train))])
    assert 30 <= int((dataset_ids == 0).sum()) <= 70  # about a quarter from a


def test_split_errors(data, tmp_path):
    prefix, _, tokenizer, _ = data
    with pytest.raises(DataError, match="leaves the test split"):  # 60 documents: 0.5% of them is none
        build_gpt_datasets(prefix, "99,0.5,0.5", SEQ, 1, tokenizer, 10, 1, 1, str(tmp_path))
    with pytest.raises(DataError, match="gives valid no share"):
        build_gpt_datasets(prefix, "100,0,0", SEQ, 1, tokenizer, 10, 5, 0, str(tmp_path))
    with pytest.raises(ConfigError, match="split"):
        build_gpt_datasets(prefix, "a,b", SEQ, 1, tokenizer, 10, 0, 0, str(tmp_path))
    with pytest.raises(DataError, match="missing"):
        build_gpt_datasets(str(tmp_path / "none"), "100,0,0", SEQ, 1, tokenizer, 10, 0, 0, str(tmp_path))


def _collect(dataset, micro_batch_size, rank, size, consumed=0):
    return [batch["tokens"] for batch in build_dataloader(dataset, micro_batch_size, rank, size, consumed)]


def test_dataloader_data_parallel_ranks_and_resume(data, tmp_path):
    prefix, _, tokenizer, _ = data
    train, _, _ = build_gpt_datasets(prefix, "100,0,0", SEQ, 3, tokenizer, 50, 0, 0, str(tmp_path))
    total = len(train)

    single = _collect(train, 4, 0, 1)
    assert all(batch.shape == (4, SEQ) for batch in single)
    assert len(single) == total // 4
    assert torch.equal(torch.cat(single), torch.stack([train[i]["tokens"] for i in range(len(single) * 4)]))

    # Two ranks of micro-batch 2 take the two halves of each global batch of 4.
    rank0, rank1 = _collect(train, 2, 0, 2), _collect(train, 2, 1, 2)
    assert len(rank0) == len(rank1) == len(single)
    for whole, half0, half1 in zip(single, rank0, rank1):
        assert torch.equal(whole, torch.cat([half0, half1]))

    # Resuming after 3 global batches continues exactly where the full run was.
    for rank, full in ((0, rank0), (1, rank1)):
        resumed = _collect(train, 2, rank, 2, consumed=3 * 4)
        assert len(resumed) == len(full) - 3
        assert all(torch.equal(a, b) for a, b in zip(resumed, full[3:]))

    batch = next(iter(build_dataloader(train, 3, 0, 1, num_workers=1)))
    assert {k: tuple(v.shape) for k, v in batch.items()} == {k: (3, SEQ) for k in ("tokens", "labels", "loss_mask", "position_ids")}

    with pytest.raises(DataError, match="consumed_samples"):
        build_dataloader(train, 2, 0, 2, consumed_samples=total + 1)
    with pytest.raises(ConfigError):
        build_dataloader(train, 2, 2, 2)


def _distributed_build(rank, world_size, init_file, prefix, tokenizer_file, cache_dir, results):
    try:
        torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
        train, valid, _ = build_gpt_datasets(prefix, "80,20,0", SEQ, 11, load_tokenizer(tokenizer_file), 40, 8, 0, cache_dir)
        results.put((rank, len(train), train[7]["tokens"].tolist(), valid[2]["tokens"].tolist()))
        torch.distributed.destroy_process_group()
    except BaseException:
        results.put((rank, "error", traceback.format_exc(), None))


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_build_with_torch_distributed(data, tmp_path):
    prefix, _, tokenizer, _ = data
    context = multiprocessing.get_context("fork")  # the children inherit the imported modules: fast
    results = context.Queue()
    args = (str(tmp_path / "init"), prefix, str(tokenizer_path_for(prefix)), str(tmp_path / "cache"), results)
    workers = [context.Process(target=_distributed_build, args=(rank, 2) + args) for rank in range(2)]
    for worker in workers:
        worker.start()
    outcomes = sorted(results.get(timeout=60) for _ in workers)
    for worker in workers:
        worker.join(timeout=30)
    for rank, length, detail, _ in outcomes:
        assert length != "error", f"rank {rank} failed:\n{detail}"

    train, valid, _ = build_gpt_datasets(prefix, "80,20,0", SEQ, 11, tokenizer, 40, 8, 0, str(tmp_path / "local"))
    expected = (len(train), train[7]["tokens"].tolist(), valid[2]["tokens"].tolist())
    assert [tuple(outcome[1:]) for outcome in outcomes] == [expected, expected]
