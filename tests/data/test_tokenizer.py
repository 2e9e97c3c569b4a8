"""Tokenizer: BPE training, save/load round trips, GPT-2 files, fingerprints, data matching."""



import pytest

from moe_erc.data.tokenizer import (
    EOD_TOKEN,
    load_tokenizer,
    resolve_tokenizer,
    tokenizer_path_for,
    train_bpe,
)
from moe_erc.errors import DataError

TEXTS = [
    "Now is the winter of our discontent made glorious summer by this sun of York.",
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer.",
    "All the world's a stage, and all the men and women merely players; naïve café — ünïcode.",
] * 5


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(iter(TEXTS), vocab_size=320)


def test_trained_bpe_has_eod_and_round_trips(tokenizer):
    assert tokenizer.eod == tokenizer.hf_tokenizer.token_to_id(EOD_TOKEN) == 0
    assert 257 <= tokenizer.vocab_size <= 320
    for text in TEXTS[:3] + ["unseen wörds ✓ and\nnew lines\t"]:
        ids = tokenizer.tokenize(text)
        assert all(0 <= i < tokenizer.vocab_size for i in ids)
        assert tokenizer.detokenize(ids) == text
    # The end-of-document token stays one token and decodes back.
    assert tokenizer.tokenize(EOD_TOKEN) == [tokenizer.eod]
    assert tokenizer.detokenize([tokenizer.eod]) == EOD_TOKEN


def test_save_and_load_file_and_directory(tokenizer, tmp_path):
    tokenizer.save(tmp_path / "tokenizer.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json"]  # no temporary left over
    for spec in (tmp_path / "tokenizer.json", tmp_path, str(tmp_path)):
        loaded = load_tokenizer(spec)
        assert loaded.fingerprint == tokenizer.fingerprint
        assert (loaded.vocab_size, loaded.eod) == (tokenizer.vocab_size, tokenizer.eod)
        assert loaded.tokenize(TEXTS[1]) == tokenizer.tokenize(TEXTS[1])


def test_gpt2_style_vocab_and_merges_directory(tokenizer, tmp_path):
    tokenizer.hf_tokenizer.model.save(str(tmp_path))  # writes vocab.json + merges.txt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merges.txt", "vocab.json"]
    loaded = load_tokenizer(tmp_path)
    assert loaded.eod == tokenizer.eod
    assert loaded.vocab_size == tokenizer.vocab_size
    assert loaded.fingerprint == tokenizer.fingerprint
    text = TEXTS[2] + EOD_TOKEN + "next"
    assert loaded.tokenize(text) == tokenizer.tokenize(text)
    assert loaded.detokenize(loaded.tokenize(text)) == text


def test_fingerprint_tells_tokenizers_apart(tokenizer):
    assert len(tokenizer.fingerprint) == 16
    assert train_bpe(iter(TEXTS), vocab_size=320).fingerprint == tokenizer.fingerprint  # deterministic
    assert train_bpe(iter(TEXTS), vocab_size=300).fingerprint != tokenizer.fingerprint
    assert train_bpe(iter(TEXTS[:1]), vocab_size=320).fingerprint != tokenizer.fingerprint


def test_unique_identifiers_are_json_and_pickling_works(tokenizer):
    import json
    import pickle

    assert json.loads(json.dumps(tokenizer.unique_identifiers))["fingerprint"] == tokenizer.fingerprint
    clone = pickle.loads(pickle.dumps(tokenizer))
    assert clone.fingerprint == tokenizer.fingerprint and clone.eod == tokenizer.eod


def test_bad_specs_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_tokenizer(str(tmp_path / "nope" / "tokenizer.json"))
    with pytest.raises(DataError, match="neither tokenizer.json nor vocab.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(DataError, match="cannot read tokenizer"):
        load_tokenizer(tmp_path / "tokenizer.json")
    with pytest.raises(DataError, match="HF_HUB_OFFLINE"):
        load_tokenizer("moe-erc-test/no-such-tokenizer")
    with pytest.raises(DataError, match="too small"):
        train_bpe(iter(TEXTS), vocab_size=100)


def test_tokenizer_path_for():
    assert str(tokenizer_path_for("data/corpus_text_document")) == "data/corpus_text_document.tokenizer.json"


def test_resolve_tokenizer_uses_and_checks_saved_tokenizers(tokenizer, tmp_path):
    other = train_bpe(iter(TEXTS[:1]), vocab_size=300)
    a, b, c = (str(tmp_path / name) for name in ("a_text_document", "b_text_document", "c_text_document"))
    tokenizer.save(tokenizer_path_for(a))
    tokenizer.save(tokenizer_path_for(b))
    other.save(tokenizer_path_for(c))
    other.save(tmp_path / "other.json")

    assert resolve_tokenizer([a, b], None).fingerprint == tokenizer.fingerprint
    assert resolve_tokenizer([a], str(tokenizer_path_for(b))).fingerprint == tokenizer.fingerprint

    with pytest.raises(DataError, match="tokenizer.path"):
        resolve_tokenizer([str(tmp_path / "bare_text_document")], None)
    with pytest.raises(DataError, match="c_text_document was tokenized with a different tokenizer"):
        resolve_tokenizer([a, c], None)
    with pytest.raises(DataError, match=r"a_text_document was tokenized with a different tokenizer .*tokenizer.path="):
        resolve_tokenizer([a], str(tmp_path / "other.json"))
