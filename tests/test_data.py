import time

import pytest

from minigpt.data import FALLBACK_SOURCE, DataSource, load_corpus
from minigpt.errors import DataError


def test_single_file_keeps_last_tenth_for_validation(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("a" * 90 + "b" * 10, encoding="utf-8")
    corpus = load_corpus(path)
    assert corpus.text("train") == "a" * 90 and corpus.text("valid") == "b" * 10 and "test" not in corpus.splits
    with pytest.raises(DataError, match="no test split"):
        corpus.split("test")


@pytest.mark.parametrize("pattern", ["wiki.{}.raw", "wiki.{}.tokens", "{}.txt"])
def test_folder_of_split_files(tmp_path, pattern):
    for split in ("train", "valid", "test"):
        (tmp_path / pattern.format(split)).write_text(f"{split} text\n", encoding="utf-8")
    corpus = load_corpus(tmp_path)
    assert [corpus.text(split) for split in ("train", "valid", "test")] == ["train text\n", "valid text\n",
                                                                           "test text\n"]


def test_folder_without_split_files_names_what_it_expects(tmp_path):
    (tmp_path / "notes.md").write_text("hi")
    with pytest.raises(DataError, match=r"no \.txt files.*wiki.{train,valid,test}.raw"):
        load_corpus(tmp_path)


def test_a_folder_of_text_files_is_one_text_whose_end_validates(tmp_path):
    """Without split files, a folder's .txt files in name order are one text, each file on lines of its own,
    and its last tenth is the valid split, as of a single file; other files are left alone."""
    (tmp_path / "b.txt").write_text("second\n" * 40, encoding="utf-8")
    (tmp_path / "a.txt").write_text("first", encoding="utf-8")
    (tmp_path / "notes.md").write_text("not read", encoding="utf-8")
    corpus = load_corpus(tmp_path)
    text = "first\n" + "second\n" * 40
    cut = len(text) - round(len(text) * 0.1)
    assert (corpus.text("train"), corpus.text("valid")) == (text[:cut], text[cut:])
    (tmp_path / "a.txt").write_text("FIRST", encoding="utf-8")  # a changed file is read again
    assert load_corpus(tmp_path).text("train").startswith("FIRST\nsecond")


@pytest.mark.parametrize("content,match", [(b"", "is empty"), (b"ok \xff\xfe bad", "not UTF-8.*offset 3")])
def test_bad_files_are_clear_errors(tmp_path, content, match):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(DataError, match=match):
        load_corpus(path)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_corpus(tmp_path / "absent.txt")


def test_a_pipe_is_refused_in_one_line(tmp_path):
    import os

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(DataError, match="not a regular file"):
        load_corpus(fifo)


@pytest.mark.parametrize("spec,source", [
    ("input.txt", DataSource("path", "input.txt")),
    ("hf:wikitext:wikitext-2-raw-v1", DataSource("hf", "wikitext", "wikitext-2-raw-v1")),
    ("hf:some/dataset", DataSource("hf", "some/dataset")),
    ("hf:some/dataset#body", DataSource("hf", "some/dataset", column="body")),  # as older checkpoints wrote it
    ("wikitext/wikitext-2-raw-v1", DataSource("hf", "wikitext", "wikitext-2-raw-v1")),  # likewise
    (FALLBACK_SOURCE, DataSource("fallback", FALLBACK_SOURCE)),
])
def test_data_sources_parse_and_survive_a_checkpoint(spec, source):
    assert DataSource.parse(spec) == source
    assert DataSource.recorded({"data": spec}) == source  # a checkpoint from before data_source
    assert DataSource.recorded({"data": str(source), "data_source": source.to_json()}) == source


def test_offline_fallback_is_used_at_once_and_said(capsys):
    start = time.perf_counter()
    corpus = load_corpus(None)  # the tests run with the hub forced offline
    assert time.perf_counter() - start < 15  # no network retry loop
    assert str(corpus.source) == FALLBACK_SOURCE
    assert len(corpus.split("train")) > 100_000 and len(corpus.split("valid")) and len(corpus.split("test"))
    assert "offline fallback corpus" in capsys.readouterr().err


def test_data_shorter_than_block_size_is_refused(tmp_path):
    from minigpt.config import TrainConfig
    from minigpt.train import train

    path = tmp_path / "short.txt"
    path.write_text("x" * 200, encoding="utf-8")  # valid split: 20 characters
    with pytest.raises(DataError, match="valid split has 20 characters.*block_size 32"):
        train(load_corpus(path), TrainConfig(steps=1), tmp_path / "m.safetensors", progress=False, block_size=32)
