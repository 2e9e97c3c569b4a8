"""Shared fixtures: offline environment and a small tokenized corpus built once per session."""

import os

os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", WANDB_MODE="disabled", TORCH_COMPILE_DISABLE="1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> str:
    """A Megatron indexed dataset of four embedded plays with a 512-token BPE; returns its prefix."""
    from moe_erc.data.corpus import embedded_corpus_files
    from moe_erc.data.preprocess import preprocess

    out = tmp_path_factory.mktemp("corpus")
    files = [str(f) for f in embedded_corpus_files()[:4]]
    (prefix,) = preprocess(files, str(out / "plays"), tokenizer="train", vocab_size=512)
    return prefix
