import pytest

from minigpt import CharTokenizer, MiniGPTError
from minigpt.errors import UnknownCharactersError
from minigpt.subword import tokenizer_from_metadata


def test_round_trip_keeps_every_character():
    text = "Hello, wörld!\n\ttabs and ünïcödé ✓"
    tokenizer = CharTokenizer.from_text(text)
    ids = tokenizer.encode(text)
    assert len(ids) == len(text)
    assert tokenizer.decode(ids) == text


def test_vocabulary_is_sorted_union_of_all_texts():
    tokenizer = CharTokenizer.from_text("cab", "dc")
    assert tokenizer.chars == ["a", "b", "c", "d"]
    assert tokenizer.encode("dab") == [3, 0, 1]


def test_unknown_characters_are_listed_in_one_line():
    tokenizer = CharTokenizer.from_text("abc")
    with pytest.raises(UnknownCharactersError) as err:
        tokenizer.encode("abxyzx")
    message = str(err.value)
    assert "'x'" in message and "'y'" in message and "'z'" in message and "\n" not in message
    assert "3 character(s)" in message


def test_json_round_trip():
    tokenizer = CharTokenizer.from_text("zyx\n\"'\\ é")
    assert tokenizer_from_metadata(tokenizer.metadata(), "a checkpoint") == tokenizer


@pytest.mark.parametrize("bad", ["not json", "[1, 2]", '"aab"', '""'])
def test_bad_vocab_json_is_a_clear_error(bad):
    with pytest.raises(MiniGPTError, match="a checkpoint has bad metadata: "):
        tokenizer_from_metadata({"vocab": bad}, "a checkpoint")
