"""A byte-level BPE tokenizer beside the character one: the seed's subword experiment.

HuggingFace `tokenizers` trains and applies it (GPT-2's scheme: text as
UTF-8 bytes, each byte spelled as one printable character, merges learnt
from the training text), so every string round-trips and no character is
unknown. The tokenizer's `tokenizer.json` travels inside the checkpoint and
the `.onnx` file (metadata `tokenizer`), so no later command needs a flag.

A corpus is stored once as characters (`minigpt.encoded`); a BPE model reads
it through a second cache of its own token ids, keyed by the corpus and the
tokenizer, two bytes a token.
"""

from __future__ import annotations

import codecs
import functools
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from minigpt.encoded import EncodedCorpus, ids_dtype
from minigpt.errors import CheckpointError, DataError, MiniGPTError
from minigpt.settings import VOCAB_SIZE
from minigpt.tokenizer import CharTokenizer

TOKENIZER_META = "tokenizer"  # the metadata key of a BPE model's tokenizer.json
KINDS = ("char", "bpe")
PIECE_CHARACTERS = 1 << 22  # characters of a corpus encoded at a time


@functools.lru_cache(maxsize=1)
def byte_spellings() -> dict[str, int]:
    """GPT-2's printable character for each byte (its `bytes_to_unicode`), as character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    spelt, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            spelt[chr(byte)] = byte
        else:
            spelt[chr(256 + extra)] = byte
            extra += 1
    return spelt


class BPETokenizer:
    """Byte-level BPE through HuggingFace `tokenizers`: ids are its vocabulary's, text is UTF-8 bytes."""

    kind = "bpe"

    def __init__(self, tokenizer_json: str):
        from tokenizers import Tokenizer

        try:
            spec = json.loads(tokenizer_json)
            self._tokenizer = Tokenizer.from_str(tokenizer_json)
        except Exception as exc:  # noqa: BLE001 - tokenizers raises its own exception types
            raise MiniGPTError(f"not a tokenizer.json ({str(exc).splitlines()[0][:120]})") from None
        if (spec.get("model") or {}).get("type") != "BPE" or (spec.get("pre_tokenizer") or {}).get("type") \
                != "ByteLevel":
            raise MiniGPTError("not a byte-level BPE tokenizer.json (minigpt trains and reads GPT-2's kind)")
        self._json = tokenizer_json
        spelt = byte_spellings()
        vocabulary = self._tokenizer.get_vocab()
        self._bytes = [b""] * len(vocabulary)
        for token, index in vocabulary.items():
            self._bytes[index] = bytes(spelt[c] for c in token)

    @property
    def vocab_size(self) -> int:
        return len(self._bytes)

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return b"".join(self._bytes[i] for i in ids).decode("utf-8", errors="replace")

    def token_bytes(self, index: int) -> bytes:
        return self._bytes[index]

    def pieces(self):
        """A function from each next id to the text it completes ("" while a character's bytes are still
        arriving); called with None, what is left (a broken character's replacement)."""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        return lambda index: decoder.decode(b"", final=True) if index is None else decoder.decode(self._bytes[index])

    def __contains__(self, char: str) -> bool:
        return len(self.encode(char)) == 1

    def id_of(self, char: str) -> int:
        (index,) = self.encode(char)
        return index

    def to_json(self) -> str:
        return self._json

    def metadata(self) -> dict[str, str]:
        return {TOKENIZER_META: self._json}

    def corpus_ids(self, corpus: EncodedCorpus, name: str, block_size: int = 1) -> np.ndarray:
        """Split `name` of `corpus` in this tokenizer's ids, through a cache beside the corpus's own."""
        ids = encoded_split(self, corpus, name)
        if len(ids) < block_size + 1:
            raise DataError(f"the {name} split is {len(ids)} tokens but block_size {block_size} needs at least "
                            f"{block_size + 1}; use more data, a smaller --block-size or a smaller --vocab-size")
        return ids

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BPETokenizer) and self._json == other._json

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size})"


def train_bpe(corpus: EncodedCorpus, vocab_size: int) -> BPETokenizer:
    """A byte-level BPE of `vocab_size` tokens learnt from the corpus's train split, read a piece at a time."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    VOCAB_SIZE.check(vocab_size, "--vocab-size")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[], show_progress=False)
    tokenizer.train_from_iterator(text_pieces(corpus, "train"), trainer)
    made = tokenizer.get_vocab_size()
    if made < vocab_size:
        raise MiniGPTError(f"the training text makes only {made} BPE tokens, fewer than --vocab-size {vocab_size}; "
                           f"give --vocab-size {made} or less, or more text")
    return BPETokenizer(tokenizer.to_str())


def text_pieces(corpus: EncodedCorpus, name: str) -> Iterator[str]:
    """Split `name` as text, in pieces of about PIECE_CHARACTERS that end where the text's pre-tokens do
    (after a newline that a non-space follows), so the pieces encode as the whole text would."""
    carried = ""
    for start in range(0, len(corpus.split(name)), PIECE_CHARACTERS):
        text = carried + corpus.text(name, start + PIECE_CHARACTERS, start)
        cut = _last_boundary(text)
        carried = text[cut:]
        if cut:
            yield text[:cut]
    if carried:
        yield carried


def _last_boundary(text: str) -> int:
    """The end of the last newline in `text` followed by a character that is not whitespace (0 if none)."""
    at = len(text) - 1
    while (at := text.rfind("\n", 0, at)) >= 0:
        if not text[at + 1].isspace():
            return at + 1
    return 0


def encoded_split(tokenizer: BPETokenizer, corpus: EncodedCorpus, name: str) -> np.ndarray:
    """Split `name` as token ids: from the cache when the corpus came through it (written once, atomically),
    else encoded in memory."""
    corpus.split(name)  # an unknown split is named before anything is encoded
    if corpus.cache_path is None:
        return _encode_split(tokenizer, corpus, name)
    stem = hashlib.sha256(tokenizer.to_json().encode()).hexdigest()[:16]
    path = corpus.cache_path.with_name(f"{corpus.cache_path.stem}.bpe-{stem}.{name}.ids")
    dtype = ids_dtype(tokenizer.vocab_size)
    if not path.exists():
        from minigpt.paths import atomic_write_bytes

        atomic_write_bytes(path, _encode_split(tokenizer, corpus, name).tobytes())
    return np.memmap(path, dtype=dtype, mode="r") if path.stat().st_size else np.zeros(0, dtype)


def _encode_split(tokenizer: BPETokenizer, corpus: EncodedCorpus, name: str) -> np.ndarray:
    dtype = ids_dtype(tokenizer.vocab_size)
    parts = [np.array(tokenizer.encode(piece), dtype=dtype) for piece in text_pieces(corpus, name)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype)


def make_tokenizer(kind: str, corpus: EncodedCorpus, vocab_size: int | None) -> CharTokenizer | BPETokenizer:
    """The tokenizer a new run trains with: the corpus's characters, a BPE learnt from it, or a
    tokenizer.json file."""
    if kind == "char":
        return CharTokenizer(corpus.chars)
    if kind == "bpe":
        return train_bpe(corpus, 1024 if vocab_size is None else vocab_size)
    return read_tokenizer_file(Path(kind))


def read_tokenizer_file(path: Path) -> BPETokenizer:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise MiniGPTError(f"--tokenizer {path}: cannot read it ({reason}); give char, bpe or a "
                           "tokenizer.json file") from None
    try:
        tokenizer = BPETokenizer(text)
    except MiniGPTError as exc:
        raise MiniGPTError(f"--tokenizer {path} is {exc}; give char, bpe or a byte-level BPE tokenizer.json") \
            from None
    if tokenizer.vocab_size > VOCAB_SIZE.high:
        raise MiniGPTError(f"--tokenizer {path} has {tokenizer.vocab_size} tokens; minigpt stores at most "
                           f"{VOCAB_SIZE.high}")
    return tokenizer


def tokenizer_from_metadata(metadata: dict[str, str], source: str) -> CharTokenizer | BPETokenizer:
    """A checkpoint's or graph's tokenizer: `tokenizer` (BPE) or `vocab` (characters)."""
    try:
        if TOKENIZER_META in metadata:
            return BPETokenizer(metadata[TOKENIZER_META])
        if "vocab" in metadata:
            return char_tokenizer_from_json(metadata["vocab"])
    except MiniGPTError as exc:
        raise CheckpointError(f"{source} has bad metadata: {exc}") from None
    raise CheckpointError(f"{source} has no 'vocab' in its metadata; it was not written by minigpt")


def char_tokenizer_from_json(text: str) -> CharTokenizer:
    """A character vocabulary as `CharTokenizer.to_json` writes it: one JSON string of distinct characters."""
    try:
        chars = json.loads(text)
    except (TypeError, json.JSONDecodeError) as exc:
        raise MiniGPTError(f"vocab is not valid JSON ({exc})") from None
    if not isinstance(chars, str) or len(set(chars)) != len(chars):
        raise MiniGPTError("vocab must be a JSON string of distinct characters")
    return CharTokenizer(chars)


def token_strings(tokenizer) -> list[str]:
    """Each id's text as OpenAI's logprobs name tokens: its characters, or `bytes:\\xNN...` for a BPE token
    whose bytes do not make whole characters."""
    if tokenizer.kind == "char":
        return list(tokenizer.chars)
    strings = []
    for index in range(tokenizer.vocab_size):
        spelt = tokenizer.token_bytes(index)
        try:
            strings.append(spelt.decode("utf-8"))
        except UnicodeDecodeError:
            strings.append("bytes:" + "".join(f"\\x{byte:02x}" for byte in spelt))
    return strings


def token_offsets(tokenizer, ids) -> list[int]:
    """Where each token's text starts in `tokenizer.decode(ids)` (a token that ends inside a character adds
    nothing: the character is the next token's)."""
    decode, length, offsets = tokenizer.pieces(), 0, []
    for index in ids:
        offsets.append(length)
        length += len(decode(index))
    return offsets


def token_spellings(tokenizer) -> list:
    """What each id stands for (a character, or a BPE token's bytes): ids of two tokenizers that spell the same
    are the same token."""
    return list(tokenizer.chars) if tokenizer.kind == "char" else [tokenizer.token_bytes(i)
                                                                   for i in range(tokenizer.vocab_size)]


def check_same_kind(kind: str, theirs: str, flag: str, path) -> None:
    """--init-from keeps a model's kind of tokenizer (--resume keeps the tokenizer itself)."""
    if kind != theirs:
        raise MiniGPTError(f"{flag} {path} is a {theirs} model and this run's tokenizer is {kind}; "
                           f"train with --tokenizer {theirs}, or start a new run without {flag}")
