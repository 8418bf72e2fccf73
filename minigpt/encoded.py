"""Encode once, map always: a text corpus as character ids in a binary file, read through numpy.memmap.

The first use of a text file (or a folder of split files) streams it in
chunks: a first pass flags every character that occurs (one flag per code
point), which fixes the sorted vocabulary; a second writes each chunk's ids through
one lookup table, as uint8 when the vocabulary fits, else uint16 or int32.
Memory stays bounded by the chunk size whatever the corpus size. The cache
lives in `$XDG_CACHE_HOME/minigpt` (or `~/.cache/minigpt`), keyed by the
source's path, size and modification time, so a changed source is encoded
again. Its JSON header is written last, atomically, and is checked against
the ids file's size on every use: a half-written or damaged cache is rebuilt,
never trusted.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from minigpt.errors import DataError

FORMAT = 1
CHUNK_BYTES = 1 << 24  # 16 MiB of text at a time
UNICODE = 0x110000


def cache_dir(explicit: str | os.PathLike | None = None) -> Path:
    if explicit is not None:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "minigpt"


@dataclass
class EncodedCorpus:
    """A corpus as ids: each split a read-only array (a memmap view when it comes from the cache)."""

    source: object  # what it was read from (a `minigpt.data.DataSource`); str() names it in messages
    chars: str  # the vocabulary, sorted: id i is chars[i]
    splits: dict[str, np.ndarray]
    cache_path: Path | None = None  # its ids file in the cache (None: kept in memory); other encodings go beside it

    def text(self, name: str, limit: int | None = None, start: int = 0) -> str:
        """Split `name` (its characters start .. limit) as text again."""
        ids = self.split(name)[start:limit]
        return "".join(np.array(list(self.chars))[ids]) if len(ids) else ""

    def byte_count(self, name: str) -> int:
        """Split `name`'s length in UTF-8 bytes, counted a chunk at a time."""
        ids, sizes = self.split(name), np.array([len(c.encode()) for c in self.chars])
        return sum(int(np.bincount(ids[i:i + CHUNK_BYTES], minlength=len(sizes)) @ sizes)
                   for i in range(0, len(ids), CHUNK_BYTES))

    def split(self, name: str) -> np.ndarray:
        if name not in self.splits:
            present = ", ".join(self.splits)
            raise DataError(f"{self.source} has no {name} split (it has: {present}); "
                            f"use a split it has, or data with a {name} split")
        return self.splits[name]

    def ids(self, chars: str, name: str, block_size: int = 1) -> np.ndarray:
        """Split `name` in the ids of vocabulary `chars` (a checkpoint's), long enough for one window of
        block_size: the cached array itself when the vocabularies agree, else remapped; a character `chars`
        lacks is an error naming it."""
        ids = self.split(name)
        if len(ids) < block_size + 1:
            raise DataError(f"the {name} split has {len(ids)} characters but block_size {block_size} needs at "
                            f"least {block_size + 1}; use more data or a smaller --block_size")
        if chars == self.chars:
            return ids
        index = {c: i for i, c in enumerate(chars)}
        table = np.array([index.get(c, -1) for c in self.chars], dtype=np.int64)
        present = np.bincount(ids, minlength=len(self.chars)) > 0
        unknown = [c for c, seen, i in zip(self.chars, present, table) if seen and i < 0]
        if unknown:
            shown = ", ".join(repr(c) for c in unknown[:20])
            raise DataError(f"the {name} split has {len(unknown)} character(s) the model never saw: {shown}; "
                            "evaluate on data written in the model's characters")
        return table[ids]


def encode_texts(source, texts: dict[str, str]) -> EncodedCorpus:
    """Text already in memory: the same ids as through the cache, kept in memory."""
    points = {name: code_points(text) for name, text in texts.items()}
    seen = np.zeros(UNICODE, dtype=bool)
    for values in points.values():
        seen[values] = True
    chars, table = vocabulary(seen)
    return EncodedCorpus(source, chars, {name: table[values] for name, values in points.items()})


def vocabulary(seen: np.ndarray) -> tuple[str, np.ndarray]:
    """The sorted characters flagged in `seen`, and the code point -> id table in the smallest dtype."""
    present = np.flatnonzero(seen)
    table = np.zeros(UNICODE, dtype=ids_dtype(len(present)))
    table[present] = np.arange(len(present))
    return "".join(map(chr, present)), table


def ids_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint8 if vocab_size <= 256 else np.uint16 if vocab_size <= 65536 else np.int32)


def encode_files(source, files: dict[str, Path | list[Path]], *, valid_fraction: float | None = None,
                 cache: str | os.PathLike | None = None) -> EncodedCorpus:
    """Files through the cache: one a split, or several read as one text (each file on lines of its own), or one
    whose last `valid_fraction` is the valid split."""
    streams = {name: (lambda paths=paths: joined_chunks(paths if isinstance(paths, list) else [paths]))
               for name, paths in files.items()}
    empty = {name: f"{paths[0].parent if isinstance(paths, list) else paths} is empty; give it some text to learn "
                   "from" for name, paths in files.items()}
    keys = {name: [_file_key(path) for path in paths] if isinstance(paths, list) else _file_key(paths)
            for name, paths in files.items()}
    return encode_streams(source, streams, keys, valid_fraction=valid_fraction, cache=cache, empty=empty)


def joined_chunks(paths: list[Path]) -> Iterator[str]:
    """Files one after another as one text, a newline between two when the first does not end with one."""
    for number, path in enumerate(paths):
        last = ""
        for chunk in text_chunks(path):
            last = chunk[-1:] or last
            yield chunk
        if last not in ("", "\n") and number < len(paths) - 1:
            yield "\n"


def encode_streams(source, streams: dict[str, Callable[[], Iterator[str]]], keys: dict, *,
                   valid_fraction: float | None = None, cache: str | os.PathLike | None = None,
                   empty: dict[str, str] | None = None) -> EncodedCorpus:
    """Splits given as functions that yield their text in chunks (each called once per pass) through the
    cache, under `keys` (what identifies the source's present state)."""
    folder = cache_dir(cache)
    stem = hashlib.sha256(json.dumps([str(source), keys, valid_fraction]).encode()).hexdigest()[:24]
    header_path, ids_path = folder / f"{stem}.json", folder / f"{stem}.ids"
    header = _valid_header(header_path, ids_path, keys)
    if header is None:
        header = _encode_to_cache(streams, keys, valid_fraction, header_path, ids_path, empty or {})
    data = np.memmap(ids_path, dtype=header["dtype"], mode="r", shape=(header["length"],))
    splits = {name: data[start:end] for name, (start, end) in header["splits"].items()}
    return EncodedCorpus(source, header["chars"], splits, ids_path)


def _file_key(path: Path) -> dict:
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _valid_header(header_path: Path, ids_path: Path, keys: dict) -> dict | None:
    """The cache's header when it belongs to these very files and its ids file is whole; else None."""
    try:
        header = json.loads(header_path.read_text(encoding="utf-8"))
        itemsize = np.dtype(header["dtype"]).itemsize
        whole = ids_path.stat().st_size == header["length"] * itemsize
        if header["format"] == FORMAT and header["keys"] == keys and whole:
            return header
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def text_chunks(path: Path) -> Iterator[str]:
    """A UTF-8 file as strings of about CHUNK_BYTES, never splitting a character."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with path.open("rb") as f:
        while block := f.read(CHUNK_BYTES):
            try:
                yield decoder.decode(block)
            except UnicodeDecodeError as exc:
                raise DataError(f"{path} is not UTF-8 text (bad byte at offset {offset + exc.start}); "
                                "convert it with e.g. `iconv -t UTF-8`") from None
            offset += len(block)
        try:
            yield decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise DataError(f"{path} is not UTF-8 text (it ends inside a character); "
                            "convert it with e.g. `iconv -t UTF-8`") from None


def code_points(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")


def _encode_to_cache(streams: dict[str, Callable[[], Iterator[str]]], keys: dict, valid_fraction: float | None,
                     header_path: Path, ids_path: Path, empty: dict[str, str]) -> dict:
    from minigpt.paths import atomic_write_bytes

    # Pass 1: which characters occur (one flag per code point), and how many characters each file has.
    seen, lengths = np.zeros(UNICODE, dtype=bool), {}
    for name, stream in streams.items():
        lengths[name] = 0
        for text in stream():
            points = code_points(text)
            seen[points] = True
            lengths[name] += len(points)
        if lengths[name] == 0:
            raise DataError(empty.get(name, f"the {name} split is empty; give it some text to learn from"))
    chars, table = vocabulary(seen)
    dtype = table.dtype
    # Pass 2: ids through the table, chunk by chunk, into a temporary file renamed into place.
    try:
        ids_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file in the way, a folder that cannot be made
        raise DataError(f"cannot make the cache folder {ids_path.parent} ({exc.strerror}); pass --cache-dir a "
                        "writable folder, or set XDG_CACHE_HOME to one") from None
    splits, start = {}, 0
    tmp = ids_path.with_name(f".{ids_path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as out:
            for name, stream in streams.items():
                for text in stream():
                    out.write(table[code_points(text)].tobytes())
                splits[name] = [start, start + lengths[name]]
                start += lengths[name]
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, ids_path)
    finally:
        tmp.unlink(missing_ok=True)
    if valid_fraction is not None:  # no valid split of its own: the end of train is one
        first, end = splits["train"]
        split_at = first + int((end - first) * (1 - valid_fraction))
        splits["train"], splits["valid"] = [first, split_at], [split_at, end]
    header = {"format": FORMAT, "keys": keys, "chars": chars, "dtype": dtype.name, "length": start,
              "splits": splits}
    atomic_write_bytes(header_path, json.dumps(header, ensure_ascii=False).encode("utf-8"))  # last: the commit
    return header

