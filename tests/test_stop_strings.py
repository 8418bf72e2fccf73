"""The stop-string matcher against its definition, spelled out the slow way."""

from hypothesis import given, strategies as st

from minigpt.serve.stop_strings import StopMatcher

ALPHABET = "ab\n"  # few characters: overlapping and repeating stop strings are the hard cases


def naive(text: str, stops: list[str]) -> tuple[int | None, int]:
    """Where the first stop string ends in text (None if none), and how many trailing characters of the text
    (cut there) may begin a stop string."""
    for end in range(1, len(text) + 1):
        if any(text[:end].endswith(stop) for stop in stops):
            return end, 0
    held = max((k for stop in stops for k in range(1, len(stop)) if text.endswith(stop[:k])), default=0)
    return None, held


@given(st.text(ALPHABET, max_size=40), st.lists(st.text(ALPHABET, min_size=1, max_size=6), min_size=1, max_size=4))
def test_the_matcher_finds_the_first_stop_and_holds_back_exactly_a_possible_start(text, stops):
    matcher = StopMatcher(stops)
    found_at = None
    for i, char in enumerate(text):
        if matcher.feed(char) is not None:
            found_at = i + 1
            break
    expected_end, expected_held = naive(text, stops)
    assert found_at == expected_end
    if found_at is None:
        assert matcher.held_back == expected_held


def test_the_stop_string_returned_is_the_one_that_ended_the_text():
    matcher = StopMatcher(["xyz", "yz!"])
    assert [matcher.feed(c) for c in "axyz"] == [None, None, None, "xyz"]


def test_long_stop_strings_are_matched_a_character_at_a_time():
    """Four stop strings of 250,000 characters (the request that once stalled the server): each character
    costs a step per stop string, not one per prefix of it."""
    stops = ["a" * 249_999 + c for c in "bcde"]
    matcher = StopMatcher(stops)
    for _ in range(20_000):
        assert matcher.feed("a") is None
    assert matcher.held_back == 20_000
    assert matcher.feed("d") is None and matcher.held_back == 0
