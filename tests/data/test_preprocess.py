"""Preprocess: text/JSON/parquet inputs -> megatron indexed datasets with exact token counts."""

import json
import os
import time


import pyarrow
import pyarrow.parquet
import pytest

from moe_erc.data import corpus
from moe_erc.compat import ensure_importable
from moe_erc.data.preprocess import main, preprocess, resolve_inputs
from moe_erc.data.tokenizer import load_tokenizer, tokenizer_path_for
from moe_erc.errors import DataError

ensure_importable()
from megatron.core.datasets.indexed_dataset import IndexedDataset  # noqa: E402

PLAIN = [
    "# Act I\n\nEnter a ghost.\nWho's there?\n",
    "Friends to this ground,\nand liegemen to the Dane.\n\n",
    "A second play: longer text — with ünïcode, tabs\tand trailing spaces.   ",
]
RECORDS = [
    {"title": "First", "text": "The quality of mercy is not strained.", "id": 1},
    {"title": "Second", "text": "It droppeth as the gentle rain from heaven.", "id": 2},
    {"title": "Third", "text": "Upon the place beneath: it is twice blest.", "id": 3},
]


def write_text_files(directory):
    directory.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(PLAIN):
        (directory / f"doc{i}.{'md' if i % 2 else 'txt'}").write_text(text, encoding="utf-8")
    return directory


def write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def write_parquet(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(records), path)
    return path


def documents_of(prefix):
    """The documents stored at ``prefix`` as lists of token ids."""
    dataset = IndexedDataset(prefix)
    assert len(dataset.document_indices) - 1 == len(dataset)  # one sequence per document
    return [dataset[i].tolist() for i in range(len(dataset))]


def expected_documents(tokenizer, texts):
    return [tokenizer.tokenize(t) + [tokenizer.eod] for t in texts]


def test_text_files_one_document_each(tmp_path):
    inputs = write_text_files(tmp_path / "in")
    prefixes = preprocess([str(inputs)], str(tmp_path / "out" / "plays"), vocab_size=300)
    prefix = str(tmp_path / "out" / "plays_text_document")
    assert prefixes == [prefix]
    tokenizer = load_tokenizer(tokenizer_path_for(prefix))
    documents = documents_of(prefix)
    assert documents == expected_documents(tokenizer, PLAIN)  # directory files come in sorted order
    assert sum(map(len, documents)) == sum(len(tokenizer.tokenize(t)) + 1 for t in PLAIN)
    assert tokenizer.detokenize(documents[2]) == PLAIN[2] + "<|endoftext|>"
    assert IndexedDataset(prefix).index.dtype.__name__ == "uint16"  # small vocab -> 2 bytes per token
    leftovers = [p.name for p in (tmp_path / "out").iterdir() if ".tmp-" in p.name]
    assert leftovers == []


def test_jsonl_and_parquet_with_given_tokenizer_and_two_keys(tmp_path):
    first = preprocess([str(write_text_files(tmp_path / "in"))], str(tmp_path / "tok"), vocab_size=300)[0]
    tokenizer_file = str(tokenizer_path_for(first))
    tokenizer = load_tokenizer(tokenizer_file)
    jsonl = write_jsonl(tmp_path / "mixed" / "a.jsonl", RECORDS[:2])
    parquet = write_parquet(tmp_path / "mixed" / "b.parquet", RECORDS[2:])

    prefixes = preprocess(
        [str(jsonl), str(parquet)], str(tmp_path / "out" / "quotes"), json_keys=("text", "title"), tokenizer=tokenizer_file
    )
    assert prefixes == [str(tmp_path / "out" / "quotes_text_document"), str(tmp_path / "out" / "quotes_title_document")]
    for key, prefix in zip(("text", "title"), prefixes):
        assert documents_of(prefix) == expected_documents(tokenizer, [r[key] for r in RECORDS])
        assert load_tokenizer(tokenizer_path_for(prefix)).fingerprint == tokenizer.fingerprint


def test_workers_give_identical_output(tmp_path):
    inputs = write_jsonl(tmp_path / "in" / "many.jsonl", [{"text": f"line {i} " * (i % 7 + 1)} for i in range(300)])
    one = preprocess([str(inputs)], str(tmp_path / "one"), vocab_size=300, workers=1)[0]
    two = preprocess([str(inputs)], str(tmp_path / "two"), vocab_size=300, workers=2)[0]
    for suffix in (".bin", ".idx"):
        assert open(one + suffix, "rb").read() == open(two + suffix, "rb").read()


def test_no_append_eod_and_blank_documents(tmp_path):
    records = [{"text": "kept"}, {"text": "   \n"}, {"text": None}, {"text": "also kept"}]
    inputs = write_jsonl(tmp_path / "in.jsonl", records)
    prefix = preprocess([str(inputs)], str(tmp_path / "out"), vocab_size=300, append_eod=False)[0]
    tokenizer = load_tokenizer(tokenizer_path_for(prefix))
    assert documents_of(prefix) == [tokenizer.tokenize("kept"), tokenizer.tokenize("also kept")]


def test_rerun_replaces_dataset(tmp_path):
    inputs = write_jsonl(tmp_path / "in.jsonl", RECORDS)
    prefix = preprocess([str(inputs)], str(tmp_path / "out"), vocab_size=300)[0]
    write_jsonl(tmp_path / "in.jsonl", RECORDS[:1])
    assert preprocess([str(inputs)], str(tmp_path / "out"), vocab_size=300, force=True)[0] == prefix
    assert len(documents_of(prefix)) == 1


def test_interrupted_rerun_never_leaves_a_valid_looking_mix(tmp_path, monkeypatch):
    from moe_erc.data import preprocess as module
    from moe_erc.data.datasets import check_indexed_dataset

    inputs = write_jsonl(tmp_path / "in.jsonl", RECORDS)
    prefix = preprocess([str(inputs)], str(tmp_path / "out"), vocab_size=300)[0]
    write_jsonl(tmp_path / "in.jsonl", RECORDS[:1])
    real_replace = os.replace

    def crash_before_index(source, target):
        if str(target).endswith(".idx"):
            raise KeyboardInterrupt  # as if killed between the renames
        real_replace(source, target)

    monkeypatch.setattr(module.os, "replace", crash_before_index)
    with pytest.raises(KeyboardInterrupt):
        preprocess([str(inputs)], str(tmp_path / "out"), vocab_size=300, force=True)
    with pytest.raises(DataError, match="missing"):
        check_indexed_dataset(prefix)  # the old index went first: nothing valid-looking is left
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


@pytest.mark.parametrize(
    "make_inputs, message",
    [
        (lambda d: [str(write_text_files(d / "in") and d / "nothing_here")], "does not exist"),
        (lambda d: [str((d / "empty").mkdir() or d / "empty")], "holds no"),
        (lambda d: [str(write_jsonl(d / "blank.jsonl", [{"text": " "}, {"text": ""}]))], "no non-blank documents"),
        (lambda d: [str(write_jsonl(d / "none.jsonl", []))], "no non-blank documents"),
        (lambda d: [str(write_jsonl(d / "other.jsonl", [{"body": "x"}]))], "has no key 'text'"),
        (lambda d: [str(write_jsonl(d / "num.jsonl", [{"text": 3}]))], "expected text"),
        (lambda d: [str((d / "bad.jsonl").write_text("{oops\n") and d / "bad.jsonl")], "cannot read"),
        (lambda d: [str((d / "x.csv").write_text("a,b\n") and d / "x.csv")], "unsupported type"),
        (lambda d: [str(d / "*.jsonl")], "matches no"),
        (lambda d: ["moe-erc-test/no-such-dataset"], "cannot read moe-erc-test/no-such-dataset"),
    ],
)
def test_bad_inputs_are_data_errors(tmp_path, make_inputs, message):
    with pytest.raises(DataError, match=message):
        preprocess(make_inputs(tmp_path), str(tmp_path / "out" / "x"), vocab_size=300)
    out = tmp_path / "out"
    assert not out.exists() or not any(out.iterdir())  # temporary files were removed


def test_text_inputs_reject_other_keys(tmp_path):
    with pytest.raises(DataError, match="plain-text inputs only have the key 'text'"):
        preprocess([str(write_text_files(tmp_path / "in"))], str(tmp_path / "x"), json_keys=("title",))


def test_resolve_inputs_expands_directories_and_globs(tmp_path):
    write_text_files(tmp_path / "in")
    write_jsonl(tmp_path / "in" / "sub" / "c.jsonl", RECORDS)
    (tmp_path / "in" / ".hidden.txt").write_text("secret")
    (tmp_path / "in" / "notes.csv").write_text("skip me")
    (tmp_path / "in" / "old_text_document.tokenizer.json").write_text("{}")  # output of an earlier run
    kinds = [(s.kind, os.path.basename(s.location)) for s in resolve_inputs([str(tmp_path / "in")])]
    assert kinds == [("text", "doc0.txt"), ("text", "doc1.md"), ("text", "doc2.txt"), ("json", "c.jsonl")]
    assert len(resolve_inputs(str(tmp_path / "in" / "*.txt"))) == 2
    assert resolve_inputs(["someorg/somedataset"])[0].kind == "hub"


def test_command_line(tmp_path, capsys):
    inputs = write_jsonl(tmp_path / "in.jsonl", RECORDS)
    code = main(["--input", str(inputs), "--output-prefix", str(tmp_path / "cli"), "--vocab-size", "300"])
    out = capsys.readouterr().out
    assert code == 0
    assert "3 documents" in out and "cli_text_document" in out and "vocab_size=" in out
    assert main(["--input", str(tmp_path / "missing.jsonl"), "--output-prefix", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_embedded_corpus_files():
    files = corpus.embedded_corpus_files()
    assert len(files) == 38 and all(f.suffix == ".md" for f in files)
    assert files == sorted(files)


def test_prepare_embedded_corpus_once(tmp_path, monkeypatch):
    # Two plays keep this fast; the full corpus (38 plays, vocab 8192) is the same code path.
    plays = corpus.embedded_corpus_files()[:2]
    monkeypatch.setattr(corpus, "embedded_corpus_files", lambda: plays)
    prefix = corpus.prepare_embedded_corpus(tmp_path, vocab_size=512)
    assert prefix == str(tmp_path / "shakespeare_text_document")
    tokenizer = load_tokenizer(tokenizer_path_for(prefix))
    assert tokenizer.vocab_size == 512
    documents = documents_of(prefix)
    assert len(documents) == 2 and all(d[-1] == tokenizer.eod for d in documents)
    assert documents[0] == tokenizer.tokenize(plays[0].read_text(encoding="utf-8")) + [tokenizer.eod]

    stamp = os.stat(prefix + ".bin").st_mtime_ns
    started = time.perf_counter()
    assert corpus.prepare_embedded_corpus(tmp_path, vocab_size=512) == prefix
    assert time.perf_counter() - started < 1.0
    assert os.stat(prefix + ".bin").st_mtime_ns == stamp  # not rewritten

    corpus.prepare_embedded_corpus(tmp_path, vocab_size=600)  # another vocabulary: re-prepared
    assert load_tokenizer(tokenizer_path_for(prefix)).vocab_size == 600


def test_preprocess_records_the_largest_id_and_refuses_to_replace_a_dataset_without_force(tmp_path, capsys):
    """The sidecar's max_token_id is the largest id in the .bin; a second run onto the same prefix is refused in one
    line and leaves the dataset as it was; --force replaces it."""
    import numpy

    from moe_erc.data.datasets import largest_token_id

    inputs = write_jsonl(tmp_path / "in.jsonl", RECORDS)
    prefix = preprocess([str(inputs)], str(tmp_path / "out"), vocab_size=300)[0]
    stats = json.loads(open(f"{prefix}.stats.json").read())
    data = numpy.fromfile(f"{prefix}.bin", dtype=IndexedDataset(prefix).index.dtype)
    assert stats["max_token_id"] == int(data.max()) and stats["tokens"] == data.size
    assert largest_token_id(prefix) == int(data.max())
    before = {p: os.stat(p).st_mtime_ns for p in (f"{prefix}.bin", f"{prefix}.idx", f"{prefix}.stats.json")}
    args = ["--input", str(inputs), "--output-prefix", str(tmp_path / "out"), "--vocab-size", "300"]
    assert main(args) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == (f"preprocess: error: --output-prefix {tmp_path / 'out'}: out_text_document.bin, "
                    f"out_text_document.idx, out_text_document.tokenizer.json already hold a dataset; give another "
                    f"prefix, or add --force to replace it")
    assert {p: os.stat(p).st_mtime_ns for p in before} == before
    assert main([*args, "--force"]) == 0


def test_a_full_disk_during_preprocess_is_one_line_and_leaves_nothing_at_the_prefix(tmp_path, monkeypatch, capsys):
    import errno

    from moe_erc.data import preprocess as module

    inputs = write_jsonl(tmp_path / "in.jsonl", RECORDS)
    real_add = module._DatasetWriter.add

    def add(self, ids, append_eod):
        if self.documents == 2:
            raise OSError(errno.ENOSPC, "No space left on device", self.tmp_bin)
        real_add(self, ids, append_eod)

    monkeypatch.setattr(module._DatasetWriter, "add", add)
    assert main(["--input", str(inputs), "--output-prefix", str(tmp_path / "out"), "--vocab-size", "300"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("preprocess: error: no space left on device writing ") and "GiB free on" in line
    assert "earlier outputs are as they were" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_a_killed_runs_temporary_files_are_removed_by_the_next_run(tmp_path):
    """A preprocess killed half-way (SIGKILL: no clean-up) leaves only temporary names, no dataset; the next run
    onto the prefix removes them (their pid is gone) and leaves a live process's alone."""
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    prefix = tmp_path / "out_text_document"
    stale = [tmp_path / f"out_text_document.bin.tmp-{dead.pid}", tmp_path / f"out_text_document.idx.tmp-{dead.pid}"]
    live = tmp_path / "out_text_document.bin.tmp-1"  # pid 1 runs: another preprocess, still writing
    for path in [*stale, live]:
        path.write_bytes(b"partial")
    inputs = write_jsonl(tmp_path / "in.jsonl", RECORDS)
    preprocess([str(inputs)], str(tmp_path / "out"), vocab_size=300)
    assert not any(p.exists() for p in stale) and live.exists() and os.path.isfile(f"{prefix}.idx")
