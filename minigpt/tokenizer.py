"""Character-level tokenizer: one token per distinct character of the corpus.

Character level keeps the whole pipeline visible: no merges, no special
tokens, and a vocabulary small enough to print.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

from minigpt.errors import MiniGPTError, UnknownCharactersError


class CharTokenizer:
    """Maps each character to its index in a sorted vocabulary."""

    kind = "char"

    def __init__(self, chars: Iterable[str]):
        self.chars: list[str] = sorted(set(chars))
        if not self.chars or any(len(c) != 1 for c in self.chars):
            raise MiniGPTError("a tokenizer vocabulary must be a non-empty set of single characters")
        self._index = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def from_text(cls, *texts: str) -> "CharTokenizer":
        """Vocabulary of every character in `texts` (pass all splits, so evaluation never meets a stranger)."""
        return cls(set().union(*map(set, texts)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def __contains__(self, char: str) -> bool:
        return char in self._index

    def id_of(self, char: str) -> int:
        return self._index[char]

    def encode(self, text: str) -> list[int]:
        try:
            return [self._index[c] for c in text]
        except KeyError:
            unknown = sorted(set(text) - self._index.keys())
            shown = ", ".join(repr(c) for c in unknown[:20]) + (" ..." if len(unknown) > 20 else "")
            raise UnknownCharactersError(f"text has {len(unknown)} character(s) the model never saw: {shown}; "
                                         "remove them or train on data that contains them") from None

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def pieces(self):  # each next id's text (None: the end); a subword tokenizer's may wait for more bytes
        return lambda index: "" if index is None else self.chars[index]

    def corpus_ids(self, corpus, name: str, block_size: int = 1):  # a split of a `minigpt.encoded.EncodedCorpus`
        return corpus.ids("".join(self.chars), name, block_size)

    def metadata(self) -> dict[str, str]:
        return {"vocab": self.to_json()}

    def to_json(self) -> str:
        return json.dumps("".join(self.chars), ensure_ascii=False)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CharTokenizer) and self.chars == other.chars

