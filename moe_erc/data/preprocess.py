"""Tokenize raw text into megatron-core indexed datasets (``{prefix}.bin`` + ``{prefix}.idx``).

Inputs (JSON, parquet and hub datasets are read with HF ``datasets`` in streaming mode, so memory stays
flat on large corpora; plain text needs no ``datasets``):

* ``.txt`` / ``.md`` / ``.markdown`` / ``.text`` files: a whole file is one document (key ``text``);
  for corpora of many small documents use JSON lines instead.
* ``.jsonl`` / ``.json`` / ``.ndjson`` files and ``.parquet`` files: one record per document,
  the text under each of ``json_keys``.
* directories (searched recursively for the suffixes above; hidden files and ``*.tokenizer.json``
  skipped) and glob patterns.
* an HF hub dataset name, only when no such path exists (its ``train`` split).

For every key ``k`` one dataset ``{output_prefix}_{k}_document`` is written (Megatron-LM's
``preprocess_data.py`` naming): each non-blank document is tokenized, followed by one end-of-document
token, stored as one sequence. The tokenizer is saved beside it as ``.tokenizer.json``, the counts and the largest
token id as ``.stats.json`` (the trainer checks that id against the model's vocabulary before the first step). A
prefix that already holds a dataset is refused without ``--force``; a run that fails or is killed half-way leaves
no dataset at the prefix (temporary files, renamed into place at the end, ``.idx`` last).

Command line: ``python -m moe_erc.data.preprocess --input DIR --output-prefix data/corpus``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import glob
import json
import logging
import multiprocessing
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy

from moe_erc.data.tokenizer import Tokenizer, load_tokenizer, tokenizer_path_for, train_bpe
from moe_erc.errors import DataError, UserError
from moe_erc.outputs import NO_SPACE, check_output_dir, no_space_message, process_running

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".text")
JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# Tokenize in batches of about this many characters: large enough to amortize process hand-offs.
_BATCH_CHARS = 1 << 20
_BATCH_DOCS = 1024


@dataclass
class Source:
    """One input: a local file (``kind`` text/json/parquet) or an HF hub dataset (``kind`` hub)."""

    kind: str
    location: str


@dataclass
class PreprocessReport:
    """What :func:`run_preprocess` wrote; counts are per dataset prefix."""

    prefixes: list[str]
    documents: dict[str, int]
    tokens: dict[str, int]  # end-of-document tokens included
    skipped_blank: dict[str, int]
    sources: list[Source] = field(default_factory=list)
    tokenizer: Tokenizer | None = None
    seconds: float = 0.0


def preprocess(
    inputs: Sequence[str],
    output_prefix: str,
    json_keys: Sequence[str] = ("text",),
    tokenizer: str = "train",
    vocab_size: int = 8192,
    workers: int = 1,
    append_eod: bool = True,
    force: bool = False,
) -> list[str]:
    """Tokenize ``inputs`` into one indexed dataset per json key; return the dataset prefixes.

    ``tokenizer`` is ``"train"`` (train a byte-level BPE of ``vocab_size`` on the inputs) or a
    spec for :func:`moe_erc.data.tokenizer.load_tokenizer`. ``workers`` > 1 tokenizes in that
    many processes.
    """
    return run_preprocess(inputs, output_prefix, json_keys, tokenizer, vocab_size, workers, append_eod,
                          force).prefixes


def run_preprocess(
    inputs: Sequence[str],
    output_prefix: str,
    json_keys: Sequence[str] = ("text",),
    tokenizer: str = "train",
    vocab_size: int = 8192,
    workers: int = 1,
    append_eod: bool = True,
    force: bool = False,
) -> PreprocessReport:
    """:func:`preprocess`, returning the counts as well. A prefix that already holds a dataset is refused unless
    ``force`` (the dataset may be weeks of tokenization)."""
    started = time.perf_counter()
    json_keys = list(dict.fromkeys(json_keys))  # de-duplicate, keep order
    if not json_keys:
        raise DataError("no json keys given; pass --json-keys text (or the keys holding the text)")
    if workers < 1:
        raise DataError(f"workers={workers}: use 1 or more worker processes")
    prefixes = {key: f"{output_prefix}_{key}_document" for key in json_keys}
    if not force:
        _refuse_existing(prefixes.values(), output_prefix)
    sources = resolve_inputs(inputs)
    _check_keys_fit_sources(sources, json_keys)

    if tokenizer == "train":
        logger.info("training a %d-token byte-level BPE on %d input(s)", vocab_size, len(sources))
        tok = train_bpe(_all_texts(sources, json_keys), vocab_size)
    else:
        tok = load_tokenizer(tokenizer)

    Path(output_prefix).parent.mkdir(parents=True, exist_ok=True)
    writers = {key: _DatasetWriter(prefixes[key], tok) for key in json_keys}
    try:
        batches = _batched_documents(_iter_records(sources, json_keys), len(json_keys))
        for batch in _tokenize(tok, batches, workers):
            for i, ids in enumerate(batch):
                writers[json_keys[i % len(json_keys)]].add(ids, append_eod)
        for key, writer in writers.items():
            if writer.documents == 0:
                raise DataError(f"no non-blank documents under key '{key}' in {_describe(sources)}; check the inputs and --json-keys")
        for writer in writers.values():
            writer.commit()
    finally:
        for writer in writers.values():
            writer.discard()

    return PreprocessReport(
        prefixes=list(prefixes.values()),
        documents={prefixes[k]: w.documents for k, w in writers.items()},
        tokens={prefixes[k]: w.tokens for k, w in writers.items()},
        skipped_blank={prefixes[k]: w.skipped_blank for k, w in writers.items()},
        sources=sources,
        tokenizer=tok,
        seconds=time.perf_counter() - started,
    )


def _refuse_existing(prefixes: Iterable[str], output_prefix: str) -> None:
    for prefix in prefixes:
        taken = [p for p in (f"{prefix}.bin", f"{prefix}.idx", str(tokenizer_path_for(prefix)))
                 if os.path.exists(p)]
        if taken:
            raise DataError(f"--output-prefix {output_prefix}: {', '.join(Path(p).name for p in taken)} already hold "
                            f"a dataset; give another prefix, or add --force to replace it")


def resolve_inputs(inputs: Sequence[str] | str) -> list[Source]:
    """Expand files, directories, globs and hub names into :class:`Source`s, in a stable order."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    sources: list[Source] = []
    for spec in map(str, inputs):
        path = Path(spec).expanduser()
        if path.is_dir():
            files = [p for p in sorted(path.rglob("*")) if p.is_file() and _kind(p) and not _skipped(p, path)]
            if not files:
                raise DataError(f"directory {spec} holds no {', '.join(_all_suffixes())} files")
            sources += [Source(_kind(p), str(p)) for p in files]
        elif path.is_file():
            if not _kind(path):
                raise DataError(f"input {spec} has an unsupported type; use one of {', '.join(_all_suffixes())}")
            sources.append(Source(_kind(path), str(path)))
        elif glob.has_magic(spec):
            matches = [Path(p) for p in sorted(glob.glob(os.path.expanduser(spec), recursive=True))]
            files = [p for p in matches if p.is_file() and _kind(p)]
            if not files:
                raise DataError(f"pattern {spec} matches no {', '.join(_all_suffixes())} files")
            sources += [Source(_kind(p), str(p)) for p in files]
        elif _HUB_NAME.match(spec) and not _kind(path):
            sources.append(Source("hub", spec))
        else:
            raise DataError(f"input {spec} does not exist; pass text/JSON/parquet files, directories or an HF dataset name")
    if not sources:
        raise DataError("no inputs given; pass --input with files or directories")
    return sources


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags, named as in Megatron-LM's ``tools/preprocess_data.py``."""
    parser = argparse.ArgumentParser(
        prog="python -m moe_erc.data.preprocess",
        description="Tokenize text into megatron-core indexed datasets ({prefix}_{key}_document.bin/.idx).",
    )
    parser.add_argument("--input", nargs="+", required=True, metavar="PATH",
                        help="files (.txt .md .jsonl .json .parquet), directories, globs, or an HF dataset name")
    parser.add_argument("--output-prefix", required=True, help="datasets are written to {prefix}_{key}_document")
    parser.add_argument("--json-keys", nargs="+", default=["text"], metavar="KEY",
                        help="record keys holding the text; one dataset per key (default: text)")
    parser.add_argument("--tokenizer", default="train",
                        help="'train' (byte-level BPE on the inputs), a tokenizer.json, a tokenizer "
                             "directory, or an HF tokenizer name (default: train)")
    parser.add_argument("--vocab-size", type=int, default=8192, help="vocabulary size when training (default: 8192)")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes (default: 1)")
    parser.add_argument("--no-append-eod", dest="append_eod", action="store_false",
                        help="do not end each document with the end-of-document token")
    parser.add_argument("--force", action="store_true",
                        help="replace a dataset that already exists at the output prefix")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; print a one-paragraph summary. Returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        check_output_dir(Path(args.output_prefix).parent, option=f"--output-prefix {args.output_prefix}:")
        report = run_preprocess(
            args.input, args.output_prefix, args.json_keys, args.tokenizer, args.vocab_size, args.workers,
            args.append_eod, args.force)
    except UserError as error:
        print(f"preprocess: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a full disk or quota: the temporary files are gone, nothing is at the prefix
        if error.errno not in NO_SPACE:
            raise
        print(f"preprocess: error: {no_space_message(error)}", file=sys.stderr)
        return 2
    print(summarize(report))
    return 0


def summarize(report: PreprocessReport) -> str:
    """One paragraph: inputs, documents, tokens, files written, seconds."""
    files = len([s for s in report.sources if s.kind != "hub"])
    hubs = len(report.sources) - files
    read = f"{files} file(s)" + (f" and {hubs} HF dataset(s)" if hubs else "")
    written = "; ".join(
        f"{prefix}.bin/.idx: {report.documents[prefix]:,} documents, {report.tokens[prefix]:,} tokens"
        + (f" ({report.skipped_blank[prefix]:,} blank skipped)" if report.skipped_blank[prefix] else "")
        for prefix in report.prefixes
    )
    tok = report.tokenizer
    return (
        f"Read {read} and wrote {written}. Tokenizer: vocab_size={tok.vocab_size}, eod={tok.eod}, "
        f"fingerprint {tok.fingerprint}, saved beside each dataset as .tokenizer.json. "
        f"Took {report.seconds:.1f} s."
    )


# --- reading -------------------------------------------------------------------------------------


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    for kind, suffixes in (("text", TEXT_SUFFIXES), ("json", JSON_SUFFIXES), ("parquet", PARQUET_SUFFIXES)):
        if name.endswith(suffixes):
            return kind
    return None


def _all_suffixes() -> tuple[str, ...]:
    return TEXT_SUFFIXES + JSON_SUFFIXES + PARQUET_SUFFIXES


def _skipped(path: Path, root: Path) -> bool:
    """Hidden files, and tokenizers saved by an earlier run into the same directory."""
    return path.name.endswith(".tokenizer.json") or any(part.startswith(".") for part in path.relative_to(root).parts)


def _describe(sources: list[Source]) -> str:
    shown = ", ".join(s.location for s in sources[:3])
    return shown + (f" and {len(sources) - 3} more" if len(sources) > 3 else "")


def _check_keys_fit_sources(sources: list[Source], json_keys: list[str]) -> None:
    if json_keys != ["text"] and any(s.kind == "text" for s in sources):
        raise DataError(
            f"plain-text inputs only have the key 'text' but --json-keys is {' '.join(json_keys)}; "
            f"use JSON/parquet inputs or --json-keys text"
        )


def _load_streaming(source: Source):
    """Records of one source (one file at a time: files may differ in columns). A text file is one record
    read directly; other kinds stream through an HF ``IterableDataset``."""
    if source.kind == "text":  # no `datasets` needed: GPU images without it can tokenize plain text
        return [{"text": Path(source.location).read_text(encoding="utf-8")}]
    import datasets  # imported here: slow, and only needed while reading

    if source.kind == "hub":
        return datasets.load_dataset(source.location, split="train", streaming=True)
    return datasets.load_dataset(source.kind, data_files=[source.location], split="train", streaming=True)


def _iter_records(sources: list[Source], json_keys: list[str]) -> Iterator[list[str]]:
    """Per document record, the text under each key ('' for missing/None/blank values)."""
    for source in sources:
        try:
            try:
                records = _load_streaming(source)
            except StopIteration:  # how datasets' JSON loader reports a file without records
                continue
            for number, record in enumerate(records):
                yield [_text_of(record, key, source, number) for key in json_keys]
        except UserError:
            raise
        except Exception as error:  # datasets/pyarrow/json raise many types; all mean bad input here
            raise DataError(f"cannot read {source.location} ({type(error).__name__}: {_first_line(error)})") from None


def _text_of(record: dict, key: str, source: Source, number: int) -> str:
    if key not in record:
        raise DataError(
            f"record {number} of {source.location} has no key '{key}' (it has: {', '.join(record)}); "
            f"pass the right --json-keys"
        )
    value = record[key]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"record {number} of {source.location}: '{key}' is {type(value).__name__}, expected text")
    return value if value.strip() else ""


def _all_texts(sources: list[Source], json_keys: list[str]) -> Iterator[str]:
    for texts in _iter_records(sources, json_keys):
        yield from (t for t in texts if t)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else "no details"


# --- tokenizing ----------------------------------------------------------------------------------


def _batched_documents(records: Iterable[list[str]], keys: int) -> Iterator[list[str]]:
    """Flatten records into batches of texts (record-major, ``keys`` texts per record)."""
    batch: list[str] = []
    chars = 0
    for texts in records:
        batch += texts
        chars += sum(map(len, texts))
        if chars >= _BATCH_CHARS or len(batch) >= _BATCH_DOCS * keys:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _tokenize(tokenizer: Tokenizer, batches: Iterable[list[str]], workers: int) -> Iterator[list[numpy.ndarray]]:
    """Token ids (int32 arrays) for every text of every batch, in input order."""
    if workers == 1:
        for batch in batches:
            yield _encode(tokenizer, batch)
        return
    # fork is cheap and needs nothing importable from __main__; spawn where fork does not exist.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    context = multiprocessing.get_context(method)
    with context.Pool(workers, initializer=_init_worker, initargs=(tokenizer,)) as pool:
        pending: collections.deque = collections.deque()
        for batch in batches:
            pending.append(pool.apply_async(_encode_in_worker, (batch,)))
            # Bounded look-ahead keeps memory flat (Pool.imap would read the whole input ahead).
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _encode(tokenizer: Tokenizer, texts: list[str]) -> list[numpy.ndarray]:
    return [numpy.asarray(ids, dtype=numpy.int32) for ids in tokenizer.tokenize_batch(texts)]


_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer: Tokenizer) -> None:
    global _worker_tokenizer
    # One process per core already; Rust threads on top would oversubscribe (and warn after fork).
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_tokenizer = tokenizer


def _encode_in_worker(texts: list[str]) -> list[numpy.ndarray]:
    return _encode(_worker_tokenizer, texts)


# --- writing -------------------------------------------------------------------------------------


def _remove_leftovers(prefix: str) -> None:
    """Temporary files of an earlier run on ``prefix`` that was killed (its pid no longer runs)."""
    for path in glob.glob(f"{glob.escape(prefix)}.*.tmp-*"):
        pid = path.rsplit(".tmp-", 1)[1]
        if pid.isdigit() and not process_running(int(pid)):
            with contextlib.suppress(OSError):
                os.remove(path)


class _DatasetWriter:
    """Writes one indexed dataset to temporary files and renames them into place on commit.

    The ``.idx`` is renamed last and any old one removed first, so an interrupted run never leaves
    a ``.bin``/``.idx``/tokenizer set that looks valid but does not belong together.
    """

    def __init__(self, prefix: str, tokenizer: Tokenizer) -> None:
        from moe_erc.compat import ensure_importable

        ensure_importable()
        from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

        from moe_erc.data.datasets import stats_path_for

        self.prefix = prefix
        self.tokenizer = tokenizer
        _remove_leftovers(prefix)
        self.stats = str(stats_path_for(prefix))
        suffix = f".tmp-{os.getpid()}"
        self.tmp_bin, self.tmp_idx, self.tmp_tok, self.tmp_stats = (
            f"{prefix}.bin{suffix}",
            f"{prefix}.idx{suffix}",
            f"{tokenizer_path_for(prefix)}{suffix}",
            f"{self.stats}{suffix}",
        )
        # uint16 when every id fits (vocab < 65500), else int32: megatron's own choice.
        self.builder = IndexedDatasetBuilder(self.tmp_bin, dtype=DType.optimal_dtype(tokenizer.vocab_size))
        self.documents = self.tokens = self.skipped_blank = 0
        self.max_token_id = -1

    def add(self, ids: numpy.ndarray, append_eod: bool) -> None:
        """Append one document of token ids (blank documents, with no ids, are skipped)."""
        if ids.size == 0:
            self.skipped_blank += 1
            return
        if append_eod:
            ids = numpy.append(ids, self.tokenizer.eod)
        self.builder.add_document(ids, [ids.size])
        self.max_token_id = max(self.max_token_id, int(ids.max()))
        self.documents += 1
        self.tokens += int(ids.size)

    def commit(self) -> None:
        self.builder.finalize(self.tmp_idx)
        self.tokenizer.save(self.tmp_tok)
        Path(self.tmp_stats).write_text(json.dumps({
            "max_token_id": self.max_token_id, "documents": self.documents, "tokens": self.tokens,
            "vocab_size": self.tokenizer.vocab_size, "tokenizer_fingerprint": self.tokenizer.fingerprint}))
        idx, bin_, tok = f"{self.prefix}.idx", f"{self.prefix}.bin", str(tokenizer_path_for(self.prefix))
        for stale in (idx, tok, self.stats):
            if os.path.exists(stale):
                os.remove(stale)
        os.replace(self.tmp_bin, bin_)
        os.replace(self.tmp_tok, tok)
        os.replace(self.tmp_stats, self.stats)
        os.replace(self.tmp_idx, idx)

    def discard(self) -> None:
        """Close and delete whatever temporary files are left (all of them unless committed)."""
        if not self.builder.data_file.closed:
            self.builder.data_file.close()
        for path in (self.tmp_bin, self.tmp_idx, self.tmp_tok, self.tmp_stats):
            if os.path.exists(path):
                os.remove(path)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.exit(main())
