"""Text that must match a pattern: a regular expression as an automaton over the model's tokens.

outlines-core compiles the expression against the vocabulary (each token's
bytes) into a table: the tokens each state allows, and the state each one
leads to. The table is fixed once built, so a step's mask is a lookup, and a
speculative verify can walk a row's guesses through it without undoing
anything. With a character vocabulary a state's tokens are simply the
characters the expression allows next. bench/README.md ("Constrained
decoding") has the measurements that chose outlines-core over interegular
and llguidance.

A character model has no end-of-text token: a text ends when the pattern
allows nothing more (`complete`), or at the token limit, which may cut it
before the pattern is matched.
"""

from __future__ import annotations

import json
import re
import threading

import numpy as np

from minigpt.errors import ConfigError
from minigpt.subword import token_spellings

MAX_PATTERN_LENGTH = 4096  # characters of a regex, choices or schema: compiling takes time the request waits for
MAX_CACHED = 64  # compiled patterns a server keeps: clients tend to send the same few again and again
_CACHE_LOCK = threading.Lock()


class Pattern:
    """A compiled pattern: `start`, then `next(state, token)` for each token and `mask(state)` before each pick."""

    def __init__(self, regex: str, tokenizer, field: str = "regex"):
        from outlines_core import Index, Vocabulary

        self.regex, self.end = regex, tokenizer.vocab_size  # the end of text, to outlines-core: no token of ours
        spellings: dict[bytes, list[int]] = {}
        for token, spelling in enumerate(token_spellings(tokenizer)):
            spelling = spelling.encode() if isinstance(spelling, str) else spelling  # outlines-core reads bytes
            if spelling:
                spellings.setdefault(spelling, []).append(token)
        try:
            index = Index(regex, Vocabulary(self.end, spellings))
        except ValueError as exc:
            raise ConfigError(_why_not(regex, str(exc), field), field) from None
        self.start = index.get_initial_state()
        self._next: dict[int, dict[int, int]] = index.get_transitions()
        self._masks: dict[int, np.ndarray] = {}  # made as states are met

    def next(self, state: int | None, token: int) -> int | None:
        """The state after `token` (None once a token left the pattern: only a guess that will be refused can)."""
        return None if state is None else self._next.get(state, {}).get(token)

    def mask(self, state: int | None) -> np.ndarray:
        """(V,) float32: 0 for the tokens the pattern allows next, -inf for the rest. A complete text (or a state
        off the pattern) masks nothing: its row's picks from here on are not the text's."""
        mask = self._masks.get(state)
        if mask is None:
            mask = np.zeros(self.end, dtype=np.float32)
            allowed = [token for token in self._next.get(state, ()) if token != self.end]
            if allowed:
                mask[:] = -np.inf
                mask[allowed] = 0.0
            self._masks[state] = mask
        return mask

    def accepts(self, state: int | None) -> bool:
        """Whether the text so far matches the whole pattern."""
        return state is not None and self.end in self._next.get(state, ())

    def complete(self, state: int | None) -> bool:
        """Whether the text matches and nothing may follow."""
        return self.accepts(state) and len(self._next[state]) == 1


def compile_pattern(tokenizer, *, regex: str | None = None, choices: list[str] | None = None,
                    json_schema=None, cache: dict | None = None) -> Pattern | None:
    """The pattern one of `regex`, `choices` (the text is one of them) or `json_schema` (a dict or its JSON
    text: the text is a JSON document it accepts) asks for; None when none is given. `cache` (for one
    tokenizer) keeps the MAX_CACHED patterns compiled last."""
    given = [name for name, value in (("regex", regex), ("choices", choices), ("json_schema", json_schema))
             if value is not None]
    if not given:
        return None
    if len(given) > 1:
        raise ConfigError(f"give one pattern, not {' and '.join(given)}", given[1])
    if choices is not None:
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
            raise ConfigError("choices must be a non-empty list of non-empty strings", "choices")
        source, regex = "".join(choices), "|".join(re.escape(choice) for choice in choices)
    elif json_schema is not None:
        source = json_schema if isinstance(json_schema, str) else json.dumps(json_schema)
    elif not isinstance(regex, str) or not regex:
        raise ConfigError("regex must be a non-empty string", "regex")
    else:
        source = regex
    if len(source) > MAX_PATTERN_LENGTH:
        raise ConfigError(f"{given[0]} has {len(source):,} characters, more than the {MAX_PATTERN_LENGTH:,} "
                          "allowed; give a shorter one", given[0])
    key = (given[0], source if choices is None else tuple(choices))
    pattern = cache.get(key) if cache is not None else None
    if pattern is None:
        pattern = Pattern(_schema_regex(source) if json_schema is not None else regex, tokenizer, given[0])
    if cache is not None:
        with _CACHE_LOCK:  # a server compiles in worker threads
            cache.pop(key, None)  # the newest last: the oldest goes first
            cache[key] = pattern
            while len(cache) > MAX_CACHED:
                cache.pop(next(iter(cache)))
    return pattern


def _why_not(regex: str, error: str, field: str) -> str:
    if "incompatible with the regex" in error:
        return (f"{field} cannot be written with this model's tokens ({error.split('. ')[1]}); allow only "
                "characters the model has")
    try:
        re.compile(regex)  # Python's message for a malformed expression says where it goes wrong
    except re.error as exc:
        return f"{field} is not a valid regular expression ({exc}); check its syntax"
    return (f"{field} cannot be compiled to an automaton ({error}); lookarounds and backreferences are not "
            "regular: rewrite it without them")


def _schema_regex(schema: str) -> str:
    from outlines_core.json_schema import build_regex_from_schema

    try:
        if not isinstance(json.loads(schema), dict):
            raise ValueError("a schema is a JSON object")
        return build_regex_from_schema(schema)
    except (TypeError, ValueError) as exc:  # outlines-core's errors are ValueErrors too
        raise ConfigError(f"json_schema is not a JSON schema outlines-core can follow ({str(exc)[:200]})",
                          "json_schema") from None
