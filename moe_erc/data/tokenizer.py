"""Byte-level BPE tokenizers (HF ``tokenizers``) shaped the way megatron-core's datasets use them.

megatron-core's ``GPTDataset`` only asks its tokenizer for ``eod`` (the id placed between
documents), ``vocab_size``, optionally ``pad``, and ``unique_identifiers`` (hashed into the
names of the cached sample indices). :class:`Tokenizer` provides those plus ``tokenize`` /
``detokenize`` and a :attr:`Tokenizer.fingerprint` that tells tokenizers apart, so data is
never trained with a tokenizer other than the one that produced it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Iterator

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from moe_erc.errors import DataError

EOD_TOKEN = "<|endoftext|>"
# End-of-document tokens of common pretrained tokenizers, tried in order when none is configured.
_EOD_CANDIDATES = (EOD_TOKEN, "<|end_of_text|>", "</s>", "<eos>", "<|im_end|>")
# 256 byte symbols + the end-of-document token: a byte-level BPE cannot be smaller.
MIN_VOCAB_SIZE = 257


class Tokenizer:
    """An HF ``tokenizers.Tokenizer`` plus the end-of-document id; picklable.

    Args:
        hf_tokenizer: the wrapped tokenizer.
        eod_token: the end-of-document token; by default the first of ``<|endoftext|>``,
            ``<|end_of_text|>``, ``</s>``, ``<eos>``, ``<|im_end|>`` found in the vocabulary.
        source: where it was loaded from, for messages only.
    """

    def __init__(self, hf_tokenizer: HFTokenizer, eod_token: str | None = None, source: str = "") -> None:
        self.hf_tokenizer = hf_tokenizer
        self.source = source
        candidates = (eod_token,) if eod_token else _EOD_CANDIDATES
        for token in candidates:
            token_id = hf_tokenizer.token_to_id(token)
            if token_id is not None:
                self.eod_token, self._eod = token, token_id
                break
        else:
            raise DataError(
                f"tokenizer {source or '(in memory)'} has no end-of-document token "
                f"(looked for {', '.join(candidates)}); use a tokenizer that has {EOD_TOKEN}"
            )
        self._fingerprint: str | None = None

    @property
    def vocab_size(self) -> int:
        """Number of token ids, special tokens included (ids are ``0 .. vocab_size-1``)."""
        return self.hf_tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def eod(self) -> int:
        """Id of the end-of-document token appended after every document."""
        return self._eod

    @property
    def eos(self) -> int:
        """Alias of :attr:`eod` (megatron-core checks it for pad-token collisions)."""
        return self._eod

    @property
    def fingerprint(self) -> str:
        """16 hex digits of sha256 over the vocabulary (token -> id) and the BPE merges."""
        if self._fingerprint is None:
            model = json.loads(self.hf_tokenizer.to_str())["model"]
            # Merges are stored as "a b" strings or ["a", "b"] pairs depending on the version.
            merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
            vocab = sorted(self.hf_tokenizer.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
            payload = json.dumps([model.get("type"), vocab, merges], ensure_ascii=False)
            self._fingerprint = hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]
        return self._fingerprint

    @property
    def unique_identifiers(self) -> OrderedDict:
        """JSON-able identity; megatron-core hashes it into its sample-index cache file names."""
        return OrderedDict(
            [("class", "moe_erc.data.tokenizer.Tokenizer"), ("fingerprint", self.fingerprint), ("eod", self.eod)]
        )

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text``; no end-of-document token is added."""
        return self.hf_tokenizer.encode(text, add_special_tokens=False).ids

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        """:meth:`tokenize` for many texts at once (parallel in Rust threads)."""
        return [e.ids for e in self.hf_tokenizer.encode_batch(texts, add_special_tokens=False)]

    def detokenize(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; special tokens are kept so document boundaries stay visible."""
        return self.hf_tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def save(self, path: str | os.PathLike) -> None:
        """Write the tokenizer as a single ``tokenizer.json`` file at ``path`` (atomically)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        self.hf_tokenizer.save(str(tmp))
        os.replace(tmp, path)

    def __repr__(self) -> str:
        # Short on purpose: megatron logs the whole dataset config, tokenizer included.
        return f"Tokenizer(vocab_size={self.vocab_size}, eod={self.eod}, fingerprint={self.fingerprint})"


def train_bpe(text_iterator: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a GPT-2 style byte-level BPE whose only special token is ``<|endoftext|>`` (id 0).

    ``vocab_size`` counts the 256 byte symbols and the special token; a small corpus may end
    with fewer merges, hence a smaller vocabulary.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise DataError(f"vocab_size={vocab_size} is too small for a byte-level BPE; use at least {MIN_VOCAB_SIZE}")
    hf_tokenizer = _byte_level_bpe(models.BPE())
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf_tokenizer.train_from_iterator(_non_empty(text_iterator), trainer)
    return Tokenizer(hf_tokenizer, EOD_TOKEN, source="trained BPE")


def load_tokenizer(spec: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer from a ``tokenizer.json`` file, a directory holding ``tokenizer.json`` or
    GPT-2 style ``vocab.json`` + ``merges.txt``, or else an HF hub name (only then is the hub used;
    ``HF_HUB_OFFLINE=1`` restricts it to the local HF cache)."""
    spec = str(spec)
    path = Path(spec).expanduser()
    if path.is_file():
        return _load_tokenizer_file(path)
    if path.is_dir():
        return _load_tokenizer_dir(path)
    if _looks_like_path(spec):
        raise DataError(f"tokenizer {spec} does not exist; pass a tokenizer.json, a tokenizer directory or an HF name")
    return _load_from_hub(spec)


def tokenizer_path_for(data_prefix: str | os.PathLike) -> Path:
    """Where the tokenizer that produced the dataset ``data_prefix`` is saved: ``{prefix}.tokenizer.json``."""
    return Path(f"{data_prefix}.tokenizer.json")


def resolve_tokenizer(data_prefixes: list[str], tokenizer_spec: str | None) -> Tokenizer:
    """The tokenizer to train on ``data_prefixes`` with, checked against the ones saved beside them.

    With no ``tokenizer_spec`` the tokenizer saved beside the first prefix is used. Every saved
    tokenizer must have the same fingerprint as the one returned; prefixes without a saved
    tokenizer (e.g. made by Megatron-LM) are taken on trust.
    """
    if not data_prefixes:
        raise DataError("no data prefixes given; set data.data_path")
    saved = {p: tokenizer_path_for(p) for p in data_prefixes if tokenizer_path_for(p).is_file()}
    if tokenizer_spec is None:
        first = data_prefixes[0]
        if first not in saved:
            raise DataError(
                f"no tokenizer saved beside data {first} ({tokenizer_path_for(first)} is missing); "
                f"set tokenizer.path to the tokenizer it was made with, or re-run preprocess"
            )
        tokenizer = _load_tokenizer_file(saved[first])
        origin = f"the tokenizer saved beside data {first}"
    else:
        tokenizer = load_tokenizer(tokenizer_spec)
        origin = f"tokenizer.path={tokenizer_spec}"
    for prefix, path in saved.items():
        if _load_tokenizer_file(path).fingerprint != tokenizer.fingerprint:
            raise DataError(
                f"data {prefix} was tokenized with a different tokenizer ({path}) than {origin}; "
                f"use that tokenizer or re-run preprocess on the data"
            )
    return tokenizer


def _byte_level_bpe(model: models.BPE) -> HFTokenizer:
    """GPT-2 byte-level pre-tokenization and decoding around a BPE ``model``."""
    hf_tokenizer = HFTokenizer(model)
    hf_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf_tokenizer.decoder = decoders.ByteLevel()
    return hf_tokenizer


def _non_empty(texts: Iterable[str]) -> Iterator[str]:
    return (t for t in texts if t)


def _load_tokenizer_file(path: Path) -> Tokenizer:
    try:
        hf_tokenizer = HFTokenizer.from_file(str(path))
    except Exception as error:  # the Rust side raises plain Exception on bad JSON
        raise DataError(f"cannot read tokenizer {path} ({_first_line(error)}); it must be an HF tokenizer.json") from None
    # A tokenizer_config.json only describes a file named tokenizer.json (the HF layout).
    eod_token = _configured_eod(path.parent) if path.name == "tokenizer.json" else None
    return Tokenizer(hf_tokenizer, eod_token, source=str(path))


def _load_tokenizer_dir(directory: Path) -> Tokenizer:
    if (directory / "tokenizer.json").is_file():
        return _load_tokenizer_file(directory / "tokenizer.json")
    vocab, merges = directory / "vocab.json", directory / "merges.txt"
    if not (vocab.is_file() and merges.is_file()):
        raise DataError(f"tokenizer directory {directory} has neither tokenizer.json nor vocab.json + merges.txt")
    try:
        model = models.BPE.from_file(str(vocab), str(merges))
    except Exception as error:
        raise DataError(f"cannot read GPT-2 style tokenizer files in {directory} ({_first_line(error)})") from None
    hf_tokenizer = _byte_level_bpe(model)
    eod_token = _configured_eod(directory)
    # Registering the end-of-document token as special keeps it one token (it already is in vocab.json).
    for token in (eod_token,) if eod_token else _EOD_CANDIDATES:
        if hf_tokenizer.token_to_id(token) is not None:
            hf_tokenizer.add_special_tokens([token])
            break
    return Tokenizer(hf_tokenizer, eod_token, source=str(directory))


def _configured_eod(directory: Path) -> str | None:
    """The ``eos_token`` of an HF ``tokenizer_config.json`` in ``directory``, if there is one."""
    config = directory / "tokenizer_config.json"
    if not config.is_file():
        return None
    try:
        eos = json.loads(config.read_text(encoding="utf-8")).get("eos_token")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(eos, dict):  # serialized AddedToken
        eos = eos.get("content")
    return eos if isinstance(eos, str) and eos else None


def _load_from_hub(name: str) -> Tokenizer:
    # Imported here: only hub names need it, and it is slow to import.
    from huggingface_hub import hf_hub_download

    files = {}
    try:
        for filename in ("tokenizer.json", "tokenizer_config.json"):
            try:
                files[filename] = Path(hf_hub_download(name, filename))
            except Exception:
                if filename == "tokenizer.json":
                    raise
    except Exception as error:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")
        hint = (
            "HF_HUB_OFFLINE is set and it is not in the local HF cache; download it once online or pass a local path"
            if offline
            else "check the name, your network, or pass a local tokenizer.json / directory"
        )
        raise DataError(f"cannot get tokenizer '{name}' from the HF hub ({type(error).__name__}): {hint}") from None
    hf_tokenizer = HFTokenizer.from_file(str(files["tokenizer.json"]))
    eod_token = _configured_eod(files["tokenizer_config.json"].parent) if "tokenizer_config.json" in files else None
    return Tokenizer(hf_tokenizer, eod_token, source=name)


def _looks_like_path(spec: str) -> bool:
    """True for specs that cannot be HF hub names ("org/name" or "name")."""
    return (
        spec.startswith((".", "/", "~"))
        or spec.endswith((".json", ".txt"))
        or spec.count("/") > 1
        or os.sep != "/" and os.sep in spec
    )


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
