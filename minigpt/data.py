"""Text corpora: a local file or folder, WikiText-2 from the hub, or an offline fallback."""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from minigpt.errors import DataError

WIKITEXT = ("wikitext", "wikitext-2-raw-v1")
FALLBACK_SOURCE = "pydoc_data.topics"
VALID_FRACTION = 0.1  # of a single text file, taken from its end
# File names of each split in a data folder, in order of preference.
SPLIT_FILE_PATTERNS = ("wiki.{}.raw", "wiki.{}.tokens", "{}.txt")
SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class Corpus:
    """The splits of one corpus; a split the source does not have is None."""

    train: str | None
    valid: str | None
    test: str | None
    source: str  # what was read, for logs and the checkpoint's metadata

    def split(self, name: str) -> str:
        text = getattr(self, name)
        if not text:
            present = ", ".join(s for s in SPLITS if getattr(self, s))
            raise DataError(f"{self.source} has no {name} split (it has: {present}); "
                            f"use a split it has, or data with a {name} split")
        return text

    def encode(self):
        """These splits as ids (`minigpt.encoded.EncodedCorpus`), in memory; the vocabulary spans every split."""
        from minigpt.encoded import encode_texts

        return encode_texts(self.source, {split: getattr(self, split) for split in SPLITS if getattr(self, split)})


def log(message: str) -> None:
    print(f"minigpt: {message}", file=sys.stderr, flush=True)


def read_text(path: str | os.PathLike) -> str:
    """Read a whole file as UTF-8, failing with a message that names the file."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"data file not found: {path}; pass an existing file or folder with --data") from None
    except IsADirectoryError:
        raise DataError(f"{path} is a folder, expected a text file") from None
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text (bad byte at offset {exc.start}); "
                        "convert it with e.g. `iconv -t UTF-8`") from None


def load_corpus(path: str | os.PathLike | None = None) -> Corpus:
    """Load `path` (a text file or a folder of split files) or, with no path, WikiText-2.

    With no path and no reachable hub, fall back at once to the Python
    language reference that ships with every CPython, and say so.
    """
    if path is not None:
        return _load_local(Path(path))
    corpus = _load_wikitext()
    if corpus is None:
        _say_fallback()
        corpus = _load_fallback()
    return corpus


def _say_fallback() -> None:
    log(f"WikiText-2 is unreachable (offline?); training on the offline fallback corpus "
        f"{FALLBACK_SOURCE} (the Python language reference) instead")


def _load_local(path: Path) -> Corpus:
    if path.is_dir():
        return _load_folder(path)
    text = read_text(path)
    if not text:
        raise DataError(f"{path} is empty; give it some text to learn from")
    split_at = int(len(text) * (1 - VALID_FRACTION))
    return Corpus(train=text[:split_at], valid=text[split_at:], test=None, source=str(path))


def _load_folder(folder: Path) -> Corpus:
    present = split_files(folder)
    texts = {split: read_text(file) for split, file in present.items()}
    for split, text in texts.items():
        if not text:
            raise DataError(f"{present[split]} is empty; give it some text to learn from")
    return Corpus(**{split: texts.get(split) for split in SPLITS}, source=str(folder))


def split_files(folder: Path) -> dict[str, Path]:
    """The split files of a data folder, by the first naming pattern it uses."""
    for pattern in SPLIT_FILE_PATTERNS:
        files = {split: folder / pattern.format(split) for split in SPLITS}
        present = {split: file for split, file in files.items() if file.is_file()}
        if present:
            return present
    expected = ", ".join(p.format("{train,valid,test}") for p in SPLIT_FILE_PATTERNS)
    if not folder.exists():
        raise DataError(f"data folder not found: {folder}")
    raise DataError(f"{folder} holds no split files; expected one of: {expected}")


HF_PREFIX = "hf:"
WIKITEXT_SOURCE = HF_PREFIX + ":".join(WIKITEXT)
HF_SPLITS = {"train": ("train",), "valid": ("validation", "valid", "dev"), "test": ("test",)}
ROWS_PER_CHUNK = 4096


def load_encoded(path: str | os.PathLike | None = None, cache: str | os.PathLike | None = None,
                 text_column: str = "text"):
    """`load_corpus`'s corpus as ids (`minigpt.encoded.EncodedCorpus`): a file or folder is encoded once into
    the cache and memory-mapped after that, so its size is no concern; so is `hf:NAME[:CONFIG]`, any
    HuggingFace text dataset (its `text_column`); WikiText-2 and the fallback are encoded in memory."""
    from minigpt.encoded import encode_files

    if path is None:  # WikiText-2 is one HuggingFace dataset among others
        try:
            return _load_hf(WIKITEXT_SOURCE, cache, "text")
        except DataError:
            _say_fallback()
            return _load_fallback().encode()
    if str(path).startswith(HF_PREFIX):
        return _load_hf(str(path), cache, text_column)
    path = Path(path)
    if path.is_dir():
        return encode_files(str(path), split_files(path), cache=cache)
    if not path.exists():
        raise DataError(f"data file not found: {path}; pass an existing file or folder with --data")
    return encode_files(str(path), {"train": path}, valid_fraction=VALID_FRACTION, cache=cache)


def _load_hf(source: str, cache: str | os.PathLike | None, text_column: str):
    """`hf:NAME[:CONFIG]` through `datasets` (the hub, its cache, or a local folder of data files), each split
    streamed row by row into the encoded cache. Rows are joined by newlines (a row already ending in one, or
    empty, adds none, so WikiText's lines come out as they are)."""
    from minigpt.encoded import encode_streams

    source, _, column = source.partition("#")  # a column other than the default is kept in the source
    text_column = column or text_column
    name, _, config = source[len(HF_PREFIX):].partition(":")
    if not name:
        raise DataError("--data hf:NAME[:CONFIG] needs a dataset name, e.g. hf:wikitext:wikitext-2-raw-v1")
    _offline_unless_reachable()
    try:
        import datasets

        datasets.logging.set_verbosity_error()
        datasets.disable_progress_bars()  # one line per problem, not bars, on stderr
        loaded = datasets.load_dataset(name, config or None)
    except Exception as exc:  # not found, offline and not cached, a broken config: all one answer
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise DataError(f"cannot load the dataset {name!r}{f' ({config})' if config else ''}: {reason}") from None
    splits = {ours: loaded[next(t for t in theirs if t in loaded)] for ours, theirs in HF_SPLITS.items()
              if any(t in loaded for t in theirs)}
    if "train" not in splits:
        raise DataError(f"the dataset {name!r} has no train split (it has: {', '.join(loaded)})")
    for split in splits.values():
        if text_column not in split.column_names:
            raise DataError(f"the dataset {name!r} has no column {text_column!r} (it has: "
                            f"{', '.join(split.column_names)}); choose one with --text-column")

    def rows_as_text(split):
        def stream():
            for start in range(0, len(split), ROWS_PER_CHUNK):
                rows = split[start:start + ROWS_PER_CHUNK][text_column]
                yield "".join(row if not row or row.endswith("\n") else row + "\n" for row in rows if row is not None)
        return stream

    keys = {ours: {"dataset": name, "config": config, "column": text_column, "fingerprint": split._fingerprint}
            for ours, split in splits.items()}
    if text_column != "text":
        source = f"{source}#{text_column}"  # what the checkpoint records: resume and eval find the column again
    return encode_streams(source, {ours: rows_as_text(split) for ours, split in splits.items()}, keys,
                          valid_fraction=None if "valid" in splits else VALID_FRACTION, cache=cache)


def _offline_unless_reachable() -> None:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
    if not offline and not _hub_reachable():
        # Offline flags make `datasets` consult its cache and fail in under a
        # second instead of retrying the network for ~20 s. They must be set
        # before `datasets` is first imported, which reads them once.
        os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"


def encoded_from_source(source: str, cache: str | os.PathLike | None = None, text_column: str = "text"):
    """`corpus_from_source` as ids."""
    if source in (FALLBACK_SOURCE, "/".join(WIKITEXT)) or not source:
        return corpus_from_source(source).encode()
    return load_encoded(source, cache, text_column)


def _hub_reachable(timeout: float = 3.0) -> bool:
    # Read the endpoint from the environment ourselves: importing
    # huggingface_hub would freeze its offline flag before we could set it.
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _load_wikitext() -> Corpus | None:
    """WikiText-2 raw through `datasets` (the hub or its local cache), or None."""
    _offline_unless_reachable()
    try:
        import datasets

        datasets.logging.set_verbosity_error()
        datasets.disable_progress_bars()  # one line per problem, not bars, on stderr
        splits = datasets.load_dataset(*WIKITEXT)
    except Exception:  # no network and no cache: every failure means "not available"
        return None
    texts = {ours: "".join(splits[theirs]["text"])
             for ours, theirs in (("train", "train"), ("valid", "validation"), ("test", "test"))}
    return Corpus(**texts, source="/".join(WIKITEXT))


def _load_fallback() -> Corpus:
    from pydoc_data.topics import topics

    text = "".join(topics[key] for key in sorted(topics))
    train_end, valid_end = int(len(text) * 0.9), int(len(text) * 0.95)
    return Corpus(train=text[:train_end], valid=text[train_end:valid_end], test=text[valid_end:],
                  source=FALLBACK_SOURCE)


def corpus_from_source(source: str) -> Corpus:
    """Reload the corpus a checkpoint was trained on, from its recorded `source`."""
    if not source:
        raise DataError("the checkpoint does not record the data it was trained on; pass it with --data")
    if source == FALLBACK_SOURCE:
        return _load_fallback()
    if source.startswith(HF_PREFIX):
        raise DataError(f"{source} is a HuggingFace dataset: read it as ids with load_encoded")
    if source == "/".join(WIKITEXT):
        corpus = _load_wikitext()
        if corpus is None:
            raise DataError("the checkpoint was trained on WikiText-2, which is unreachable offline; "
                            "pass its text with --data")
        return corpus
    return load_corpus(source)
