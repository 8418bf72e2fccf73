"""Where a corpus comes from: a local file or folder, a HuggingFace dataset, or the offline fallback.

One data path: every source becomes an `EncodedCorpus` (`minigpt.encoded`),
the characters as ids. Files, folders and datasets are encoded once into a
cache and memory-mapped after that; the small fallback corpus is encoded in
memory. With no source, training reads WikiText-2 (one HuggingFace dataset
among others) and, when that cannot be reached, falls back at once to the
Python language reference that ships with every CPython, and says so.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlparse

from minigpt.encoded import EncodedCorpus, encode_files, encode_streams, encode_texts
from minigpt.errors import DataError

FALLBACK_SOURCE = "pydoc_data.topics"
VALID_FRACTION = 0.1  # of a single text file, taken from its end
# File names of each split in a data folder, in order of preference.
SPLIT_FILE_PATTERNS = ("wiki.{}.raw", "wiki.{}.tokens", "{}.txt")
SPLITS = ("train", "valid", "test")
HF_PREFIX = "hf:"
HF_SPLITS = {"train": ("train",), "valid": ("validation", "valid", "dev"), "test": ("test",)}
ROWS_PER_CHUNK = 4096
LEGACY_WIKITEXT = "wikitext/wikitext-2-raw-v1"  # how checkpoints before `hf:` sources named WikiText-2


@dataclass(frozen=True)
class DataSource:
    """What a corpus is read from: kind "path" (a text file or a folder of split files), "hf" (a
    HuggingFace dataset, its config and text column) or "fallback" (the offline corpus)."""

    kind: str
    name: str
    config: str = ""
    column: str = "text"
    size: int | None = None  # kind "path": the bytes read, so a checkpoint can tell when its data has changed

    @classmethod
    def parse(cls, spec: str | os.PathLike, text_column: str = "text") -> "DataSource":
        """`--data` as a user writes it: a path, `hf:NAME[:CONFIG]`, or the fallback's name."""
        spec = os.fspath(spec)
        if spec == FALLBACK_SOURCE:
            return cls("fallback", FALLBACK_SOURCE)
        if spec == LEGACY_WIKITEXT:
            return WIKITEXT
        if spec.startswith(HF_PREFIX):
            spec, _, column = spec.partition("#")  # how older checkpoints recorded a column
            name, _, config = spec[len(HF_PREFIX):].partition(":")
            if not name:
                raise DataError("--data hf:NAME[:CONFIG] needs a dataset name, e.g. hf:wikitext:wikitext-2-raw-v1")
            return cls("hf", name, config, column or text_column)
        return cls("path", spec)

    @classmethod
    def recorded(cls, metadata: dict[str, str]) -> "DataSource":
        """The source a checkpoint was trained on, from its metadata."""
        if "data_source" in metadata:
            try:
                return cls(**json.loads(metadata["data_source"]))
            except (TypeError, ValueError):
                raise DataError("the checkpoint's data_source metadata is damaged; pass the data with --data") \
                    from None
        if not metadata.get("data"):
            raise DataError("the checkpoint does not record the data it was trained on; pass it with --data")
        return cls.parse(metadata["data"])

    def __str__(self) -> str:
        if self.kind == "hf":
            return f"{HF_PREFIX}{self.name}" + (f":{self.config}" if self.config else "")
        return self.name

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


WIKITEXT = DataSource("hf", "wikitext", "wikitext-2-raw-v1")


def load_corpus(data: str | os.PathLike | DataSource | None = None, cache: str | os.PathLike | None = None,
                text_column: str = "text") -> EncodedCorpus:
    """The corpus `data` names (a path, `hf:NAME[:CONFIG]`, or a DataSource) as ids; with None, WikiText-2,
    or the offline fallback when WikiText-2 cannot be reached."""
    if data is None:
        try:
            return _load_hf(WIKITEXT, cache)
        except DataError:
            log(f"WikiText-2 is unreachable (offline?); training on the offline fallback corpus "
                f"{FALLBACK_SOURCE} (the Python language reference) instead")
            return _load_fallback()
    source = data if isinstance(data, DataSource) else DataSource.parse(data, text_column)
    if source.kind == "fallback":
        return _load_fallback()
    if source.kind == "hf":
        return _load_hf(source, cache)
    return _load_path(source, cache)


def load_recorded_corpus(metadata: dict[str, str], cache: str | os.PathLike | None = None) -> EncodedCorpus:
    """The corpus a checkpoint was trained on, from what its metadata records."""
    source = DataSource.recorded(metadata)
    try:
        return load_corpus(source, cache)
    except DataError as exc:
        raise DataError(f"{exc} (reading {source}, the data the checkpoint records; pass the data with "
                        "--data)") from None


def log(message: str) -> None:
    print(f"minigpt: {message}", file=sys.stderr, flush=True)


def _load_path(source: DataSource, cache: str | os.PathLike | None) -> EncodedCorpus:
    path = Path(source.name)
    if path.is_dir():
        files = split_files(path)
        valid_fraction = None if "valid" in files or "test" in files else VALID_FRACTION
    elif not path.exists():
        raise DataError(f"data file not found: {path}; pass an existing file or folder with --data")
    elif not path.is_file():
        raise DataError(f"{path} is not a regular file (a pipe or a device is read twice when encoded); "
                        "save it to a file first")
    else:
        files, valid_fraction = {"train": path}, VALID_FRACTION
    # Recorded absolute, with its size: `eval` or `--resume` from another folder reads this very data, or says
    # why it cannot.
    size = sum(file.stat().st_size for group in files.values() for file in (group if isinstance(group, list)
                                                                            else [group]))
    if source.size is not None and source.size != size:
        raise DataError(f"{path} has changed since the model was trained on it ({source.size:,} bytes then, "
                        f"{size:,} now); pass it with --data to use it as it is now")
    located = DataSource("path", str(path.resolve()), size=size)
    return encode_files(located, files, valid_fraction=valid_fraction, cache=cache)


def split_files(folder: Path) -> dict[str, Path | list[Path]]:
    """The split files of a data folder, by the first naming pattern it uses; without any, its .txt files in
    name order as one text (the caller takes its end for validation, as of a single file)."""
    for pattern in SPLIT_FILE_PATTERNS:
        files = {split: folder / pattern.format(split) for split in SPLITS}
        present = {split: file for split, file in files.items() if file.is_file()}
        if present:
            return present
    texts = sorted(file for file in folder.glob("*.txt") if file.is_file() and not file.name.startswith("."))
    if texts:
        return {"train": texts}
    expected = ", ".join(p.format("{train,valid,test}") for p in SPLIT_FILE_PATTERNS)
    raise DataError(f"{folder} holds no split files and no .txt files; expected one of: {expected}, or .txt files "
                    "to read as one text")


def _load_hf(source: DataSource, cache: str | os.PathLike | None) -> EncodedCorpus:
    """A HuggingFace dataset through `datasets` (the hub, its cache, or a local folder of data files), each
    split streamed row by row into the encoded cache. Rows are joined by newlines (a row already ending in
    one, or empty, adds none, so WikiText's lines come out as they are)."""
    splits = _hf_splits(source)

    def rows_as_text(split):
        def stream():
            for start in range(0, len(split), ROWS_PER_CHUNK):
                rows = split[start:start + ROWS_PER_CHUNK][source.column]
                yield "".join(row if not row or row.endswith("\n") else row + "\n" for row in rows if row is not None)
        return stream

    keys = {ours: {"dataset": source.name, "config": source.config, "column": source.column,
                   "fingerprint": split._fingerprint} for ours, split in splits.items()}
    return encode_streams(source, {ours: rows_as_text(split) for ours, split in splits.items()}, keys,
                          valid_fraction=None if "valid" in splits else VALID_FRACTION, cache=cache)


def _hf_splits(source: DataSource) -> dict:
    """Our split names -> the dataset's splits, each checked for the text column."""
    _offline_unless_reachable()
    what = f"{source.name!r}" + (f" ({source.config})" if source.config else "")
    try:
        import datasets

        datasets.logging.set_verbosity_error()
        datasets.disable_progress_bars()  # one line per problem, not bars, on stderr
        loaded = datasets.load_dataset(source.name, source.config or None)
    except Exception as exc:  # not found, offline and not cached, a broken config: all one answer
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise DataError(f"cannot load the dataset {what}: {reason}") from None
    splits = {ours: loaded[next(t for t in theirs if t in loaded)] for ours, theirs in HF_SPLITS.items()
              if any(t in loaded for t in theirs)}
    if "train" not in splits:
        raise DataError(f"the dataset {source.name!r} has no train split (it has: {', '.join(loaded)})")
    for split in splits.values():
        if source.column not in split.column_names:
            raise DataError(f"the dataset {source.name!r} has no column {source.column!r} (it has: "
                            f"{', '.join(split.column_names)}); choose one with --text-column")
    return splits


def _offline_unless_reachable() -> None:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
    if not offline and not _hub_reachable():
        # Offline flags make `datasets` consult its cache and fail in under a
        # second instead of retrying the network for ~20 s. They must be set
        # before `datasets` is first imported, which reads them once.
        os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"


def _hub_reachable(timeout: float = 3.0) -> bool:
    # Read the endpoint from the environment ourselves: importing
    # huggingface_hub would freeze its offline flag before we could set it.
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _load_fallback() -> EncodedCorpus:
    from pydoc_data.topics import topics

    text = "".join(topics[key] for key in sorted(topics))
    train_end, valid_end = int(len(text) * 0.9), int(len(text) * 0.95)
    return encode_texts(DataSource("fallback", FALLBACK_SOURCE),
                        {"train": text[:train_end], "valid": text[train_end:valid_end], "test": text[valid_end:]})
