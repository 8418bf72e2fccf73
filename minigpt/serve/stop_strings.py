"""Stop strings over text that grows a character at a time.

A request's text may be handed out only up to where a stop string could
still begin: "Hello, wor" with the stop "world" holds back "wor". For each
stop string the matcher keeps one number, how many of its first characters
the text now ends with, and advances it per character with the stop
string's failure table (Knuth–Morris–Pratt): O(1) per character and stop
string (amortised), however long the stop strings are, instead of trying
every prefix of every stop string at every step.
"""

from __future__ import annotations


def failure_table(pattern: str) -> list[int]:
    """table[i]: the length of the longest proper prefix of pattern[:i + 1] that is also its suffix."""
    table, matched = [0] * len(pattern), 0
    for i in range(1, len(pattern)):
        while matched and pattern[i] != pattern[matched]:
            matched = table[matched - 1]
        if pattern[i] == pattern[matched]:
            matched += 1
        table[i] = matched
    return table


class StopMatcher:
    """Feed characters; learn when a stop string ends the text and how much of the text is safe to show."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.tables = [failure_table(stop) for stop in stops]
        self.matched = [0] * len(stops)  # per stop string: how many of its first characters the text ends with

    def feed(self, char: str) -> str | None:
        """Advance by one character of text; return the stop string that now ends the text, if one does."""
        for i, (stop, table) in enumerate(zip(self.stops, self.tables)):
            matched = self.matched[i]
            if matched == len(stop):  # a whole match: continue from its longest border
                matched = table[matched - 1]
            while matched and char != stop[matched]:
                matched = table[matched - 1]
            if char == stop[matched]:
                matched += 1
            self.matched[i] = matched
            if matched == len(stop):
                return stop
        return None

    @property
    def held_back(self) -> int:
        """How many of the text's last characters may be the start of a stop string."""
        return max(self.matched, default=0)
