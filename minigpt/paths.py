"""The files commands read and write: what kind a file is, and outputs checked before any work starts.

A command that would fail when it saves must fail before it trains or
exports, and a file of the wrong kind is named as what it is, with the
command that takes it. Torch-free, so the onnx engine can use it too.
"""

from __future__ import annotations

import os
import re
import struct
import tempfile
from pathlib import Path

from minigpt.errors import CheckpointError, MiniGPTError

SNIFF_BYTES = 4096


def file_kind(path: str | os.PathLike) -> str:
    """'missing', 'folder', 'safetensors', 'onnx', 'pt', 'text' or 'unknown' (damaged or foreign bytes)."""
    path = Path(path)
    if not path.exists():
        return "missing"
    if path.is_dir():
        return "folder"
    try:
        with path.open("rb") as f:
            head = f.read(SNIFF_BYTES)
    except OSError:
        return "unknown"
    # safetensors: an 8-byte little-endian header length, then the JSON header.
    if len(head) > 8 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < 100_000_000:
        return "safetensors"
    if path.suffix in (".onnx", ".pt"):
        return path.suffix[1:]
    if head and b"\0" not in head:
        try:
            head.decode("utf-8")
            return "text"
        except UnicodeDecodeError as exc:
            if exc.start >= len(head) - 3:  # a character cut by the sniff window
                return "text"
    return "unknown"


def checkpoint_kind(path: str | os.PathLike) -> str:
    """The kind of a file given as a checkpoint; one that cannot be one is refused, saying what it is."""
    kind = file_kind(path)
    if kind == "missing":
        raise CheckpointError(f"checkpoint not found: {path}; train one with `minigpt train` "
                              "or pass an existing file with --checkpoint")
    if kind == "onnx":
        raise CheckpointError(f"{path} is an ONNX model (from `minigpt export --onnx`): only "
                              f"`minigpt generate --model {path}` runs it; this needs the .safetensors "
                              "checkpoint it was exported from")
    if kind == "text":
        raise CheckpointError(f"{path} is a text file, not a checkpoint: pass the .safetensors file "
                              "`minigpt train` wrote (text to train on goes to --data)")
    return kind


def check_onnx_model_path(path: str | os.PathLike) -> None:
    """Refuse a path that is not an ONNX model, saying what it is; damaged graphs are onnxruntime's to find."""
    kind = file_kind(path)
    if kind == "missing":
        raise CheckpointError(f"ONNX model not found: {path}; export one with "
                              "`minigpt export --onnx --checkpoint CKPT`")
    what = {"safetensors": "a minigpt checkpoint", "folder": "a folder", "text": "a text file"}.get(kind)
    if what:
        raise CheckpointError(f"{path} is {what}, not an ONNX model: run it with --engine torch, or export "
                              f"it with `minigpt export --onnx --checkpoint {path}`")


def check_output_file(path: str | os.PathLike, flag: str = "--out") -> None:
    """Fail before any work when the file `path` could not be written at the end of it."""
    path = Path(path)
    if path.is_dir():
        raise MiniGPTError(f"{flag} {path} is a folder; give a file name (one inside it, if it should go there)")
    _check_folder_writable(path.parent)


def check_output_folder(path: str | os.PathLike, flag: str = "--out") -> None:
    """Fail before any work when the folder `path` could not be created (or replaced) at the end of it."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise MiniGPTError(f"{flag} {path} is a file; this writes a folder: choose another {flag}")
    _check_folder_writable(path.parent)


def _check_folder_writable(folder: Path) -> None:
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise MiniGPTError(f"cannot write to {folder}; choose a folder that exists and is writable")


TEMPORARY_SUFFIX = ".tmp"


def temporary_prefix(path: Path) -> str:
    """How the temporary files of `atomic_write_bytes` for `path` begin: `.NAME.`."""
    return f".{path.name}."


def temporaries_of(path: str | os.PathLike) -> list[Path]:
    """The temporary files `atomic_write_bytes` makes beside `path` (the prefix, eight random characters as
    `tempfile.mkstemp` makes them, the suffix): a writer killed before its rename leaves one behind."""
    path = Path(path)
    prefix, pattern = temporary_prefix(path), r"[a-z0-9_]{8}" + re.escape(TEMPORARY_SUFFIX)
    return [found for found in path.parent.iterdir() if found.name.startswith(prefix) and
            re.fullmatch(pattern, found.name[len(prefix):]) and found.is_file()]


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Replace `path` with `data` all at once: readers see the old file or the new, never half.

    Written to a temporary file in the same folder (so the rename cannot cross
    file systems), flushed to disk, then renamed over the target.
    """
    path = Path(path)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=temporary_prefix(path), suffix=TEMPORARY_SUFFIX, dir=path.parent)
    except OSError as exc:
        raise MiniGPTError(f"cannot write to {path.parent}: {exc.strerror}; "
                           "choose a folder that exists and is writable") from None
    try:
        os.chmod(tmp_name, 0o666 & ~current_umask())  # mkstemp makes it private; a checkpoint is an ordinary file
        with os.fdopen(fd, "wb") as tmp:
            tmp.write(data)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_name, path)
    except OSError as exc:  # a full disk, a file-size limit: the old file is as it was
        Path(tmp_name).unlink(missing_ok=True)
        kept = "the previous file is untouched" if path.exists() else "nothing was written"
        raise MiniGPTError(f"cannot write {path} ({exc.strerror}): {kept}; free some space or choose another "
                           "--out") from None
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


KINDS = {"safetensors": "a minigpt checkpoint", "onnx": "an ONNX model", "pt": "a torch checkpoint",
         "hf": "a transformers directory", "picture": "a picture", "folder": "a folder", "text": "a text file",
         "unknown": "a file of unknown kind"}


def output_kind(path: str | os.PathLike) -> str:
    """file_kind, telling a transformers directory ("hf") and a PNG or SVG picture ("picture") apart too."""
    path, kind = Path(path), file_kind(path)
    if kind == "folder" and (path / "config.json").is_file():
        return "hf"
    if kind in ("text", "unknown") and path.suffix.lower() in (".png", ".svg"):
        with path.open("rb") as f:
            head = f.read(SNIFF_BYTES)
        if head.startswith(b"\x89PNG") or b"<svg" in head:
            return "picture"
    return kind


def check_replaceable(out: str | os.PathLike, *, writes: str, force: bool, inputs=(), flag: str = "--out") -> None:
    """The one rule for what a command writes: never one of its own inputs (`inputs`: (flag, path) pairs), an
    existing output replaced only with --force, and --force replaces only what this command writes (`writes`,
    an output_kind): a checkpoint by a checkpoint, never the corpus or a graph."""
    out = Path(out)
    for name, path in inputs:
        if path is not None and same_path(out, path):
            raise MiniGPTError(f"{flag} {out} is also this command's {name}: writing it would destroy what the "
                               f"command reads; choose another {flag}")
    if not out.exists() and not out.is_symlink():
        return
    kind = output_kind(out)
    if kind != writes:
        raise MiniGPTError(f"{flag} {out} is {KINDS[kind]}; this writes {KINDS[writes]} and replaces only "
                           f"{KINDS[writes]} (--force too): choose another {flag}")
    if not force:
        raise MiniGPTError(f"{out} already holds {KINDS[writes]}; pass --force to replace it, or choose another "
                           f"{flag}")


def same_path(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name one file (through links and relative parts)."""
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False
