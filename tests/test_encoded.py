"""Encode once, map always: the encoded-data cache, its invalidation, and HuggingFace datasets through it."""

import json
import os

import numpy as np
import pytest

from minigpt.cli import main
from minigpt.config import TrainConfig
from minigpt.data import VALID_FRACTION, load_corpus
from minigpt.encoded import encode_texts
from minigpt.errors import DataError
from minigpt.train import train

TEXT = "naïve café — the quick brown fox jumps over the lazy dog. 日本語も少し。\n" * 60


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def cache_files(cache):
    return sorted(p.name.rsplit(".", 1)[1] for p in cache.iterdir())


def in_memory(path):
    """The reference: the file's text encoded in memory, its last tenth the valid split."""
    text = path.read_text(encoding="utf-8")
    split_at = int(len(text) * (1 - VALID_FRACTION))
    return encode_texts(str(path), {"train": text[:split_at], "valid": text[split_at:]})


def same_ids(encoded, reference):
    assert encoded.chars == reference.chars
    for name in reference.splits:
        assert np.array_equal(encoded.split(name), reference.split(name)), name


def test_a_file_is_encoded_once_then_mapped(text_file, tmp_path):
    cache = tmp_path / "cache"
    first = load_corpus(text_file, cache)
    same_ids(first, in_memory(text_file))  # the same ids as encoding the text in memory
    assert cache_files(cache) == ["ids", "json"]
    ids_file = next(cache.glob("*.ids"))
    written = ids_file.stat().st_mtime_ns
    again = load_corpus(text_file, cache)
    assert isinstance(again.split("train").base, np.memmap) and ids_file.stat().st_mtime_ns == written
    assert again.split("train").dtype == np.uint8  # the vocabulary fits a byte
    same_ids(again, first)


def test_chunks_never_split_a_character(text_file, tmp_path, monkeypatch):
    import minigpt.encoded

    monkeypatch.setattr(minigpt.encoded, "CHUNK_BYTES", 7)  # multi-byte characters straddle chunk ends
    same_ids(load_corpus(text_file, tmp_path / "cache"), in_memory(text_file))


def test_a_changed_source_is_encoded_again(text_file, tmp_path):
    cache = tmp_path / "cache"
    load_corpus(text_file, cache)
    text_file.write_text(TEXT + "Zebras? Quartz!\n", encoding="utf-8")
    changed = load_corpus(text_file, cache)
    assert "Z" in changed.chars and "Q" in changed.chars
    same_ids(changed, in_memory(text_file))


@pytest.mark.parametrize("damage", ["truncated ids", "garbled header", "no header (killed mid-write)"])
def test_a_damaged_or_half_written_cache_is_rebuilt(text_file, tmp_path, damage):
    cache = tmp_path / "cache"
    load_corpus(text_file, cache)
    reference = in_memory(text_file)  # in memory: the damage below cannot reach it
    ids_file, header = next(cache.glob("*.ids")), next(cache.glob("*.json"))
    if damage == "truncated ids":
        ids_file.write_bytes(ids_file.read_bytes()[:100])
    elif damage == "garbled header":
        header.write_text(header.read_text()[:40])
    else:
        header.unlink()
    rebuilt = load_corpus(text_file, cache)
    same_ids(rebuilt, reference)
    assert json.loads(next(cache.glob("*.json")).read_text())["length"] == len(TEXT)


def test_training_from_the_cache_draws_what_training_from_memory_draws(text_file, tmp_path, tiny_model):
    config = TrainConfig(batch_size=8, learning_rate=3e-3, steps=12, eval_interval=6, eval_iters=2, warmup=2,
                         device="cpu")
    mapped = train(load_corpus(text_file, tmp_path / "cache"), config, tmp_path / "a.safetensors", progress=False,
                   **tiny_model)
    in_memory = train(load_corpus(text_file), config, tmp_path / "b.safetensors", progress=False, **tiny_model)
    assert [r["loss"] for r in mapped.history] == [r["loss"] for r in in_memory.history]


@pytest.mark.parametrize("content,fragment", [(None, "not found"), (b"", "is empty"),
                                              (b"ok \xff\xfe bad", "not UTF-8 text (bad byte at offset 3)")])
def test_bad_files(tmp_path, content, fragment):
    path = tmp_path / "data.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        load_corpus(path, tmp_path / "cache")


@pytest.fixture
def local_dataset(tmp_path):
    """A HuggingFace dataset written here with `datasets` (parquet, train and validation splits), as a hub
    dataset would be laid out; the hub itself is unreachable in tests."""
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "tiny-dataset"
    folder.mkdir()
    rows = [f"row {i}: the quick brown fox jumps over the lazy dog." for i in range(200)]
    datasets.Dataset.from_dict({"body": rows, "id": list(range(200))}).to_parquet(folder / "train.parquet")
    datasets.Dataset.from_dict({"body": rows[:40], "id": list(range(40))}).to_parquet(folder / "validation.parquet")
    return folder


def test_a_huggingface_dataset_trains_through_the_cache(local_dataset, tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    argv = ["train", "--data", f"hf:{local_dataset}", "--text-column", "body", "--out", str(out),
            "--block-size", "16", "--embed-dim", "32", "--num-heads", "2", "--num-layers", "1", "--steps", "3",
            "--eval-iters", "1", "--quiet", "--sample-tokens", "0", "--device", "cpu",
            "--cache-dir", str(tmp_path / "cache")]
    assert main(argv) == 0, capsys.readouterr().err
    from minigpt import load_checkpoint

    from minigpt.data import DataSource

    recorded = DataSource.recorded(load_checkpoint(out).metadata)  # eval and resume find the column again
    assert recorded == DataSource("hf", str(local_dataset), column="body")
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out), "--cache-dir", str(tmp_path / "cache")]) == 0
    assert "bits/char" in capsys.readouterr().out
    encoded = load_corpus(f"hf:{local_dataset}", tmp_path / "cache", "body")
    first_row = "row 0: the quick brown fox jumps over the lazy dog.\n"
    assert "".join(encoded.chars[i] for i in encoded.split("train")[:len(first_row)]) == first_row
    assert len(encoded.split("valid")) == sum(len(f"row {i}: the quick brown fox jumps over the lazy dog.\n")
                                              for i in range(40))


def test_bad_huggingface_sources(local_dataset, tmp_path, cli_error):
    flags = ["--out", str(tmp_path / "m.safetensors"), "--cache-dir", str(tmp_path / "cache")]
    cli_error(["train", "--data", f"hf:{local_dataset}", *flags], "has no column 'text'", "body", "--text-column")
    cli_error(["train", "--data", f"hf:{tmp_path / 'nowhere'}", *flags], "cannot load the dataset")
    cli_error(["train", "--data", "hf:", *flags], "needs a dataset name")
    assert not (tmp_path / "m.safetensors").exists() and os.environ["HF_DATASETS_OFFLINE"] == "1"
