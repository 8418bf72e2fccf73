"""Drafts for speculative decoding: cheap guesses at the next few characters, which the model then checks.

A draft only proposes; `minigpt.decoding` verifies every proposed token
against what the model itself picks, so a draft can make decoding faster or
(slightly) slower, never different. Two drafts need no second model:

- `NGramDraft`: the most frequent next character after each context of up to
  `order` characters in the training text, longest context first. Built from
  the encoded corpus at the end of `minigpt train` and stored in the
  checkpoint (and carried into an exported .onnx file), because the table
  belongs to the model it was made for: it must use the model's vocabulary
  and travel with it.
- `ContextDraft` (prompt lookup): find the last earlier place the row's own
  recent characters occurred, and propose what followed them there.

numpy only: the onnxruntime path stays torch-free.
"""

from __future__ import annotations

import base64
import json
import math

import numpy as np

from minigpt.errors import CheckpointError

DEFAULT_ORDER = 4  # context characters: ~2.5 accepted tokens a step on the default model at k = 4
MAX_TABLE_CHARACTERS = 5_000_000  # of training text read into the table: ~2 s of numpy, a few arrays of it
NGRAM_KEYS, NGRAM_NEXT, NGRAM_META = "draft.ngram.keys", "draft.ngram.next", "draft_ngram"


def _base(vocab_size: int) -> int:
    return vocab_size + 1  # digits 1..V: a shorter context never packs to a longer one's key


def max_order(vocab_size: int) -> int:
    """The longest context whose packed key, times the vocabulary (as the table is built), fits an int64."""
    return int((62 * math.log(2) - math.log(vocab_size)) / math.log(_base(vocab_size)))


class NGramDraft:
    """Next character by the longest matching context of the training text (see the module's docstring)."""

    name = "ngram"

    def __init__(self, keys: np.ndarray, next_ids: np.ndarray, order: int, vocab_size: int):
        self.order, self.vocab_size, self.base = order, vocab_size, _base(vocab_size)
        self.keys, self.next_ids = keys, next_ids
        self.table = dict(zip(keys.tolist(), next_ids.tolist()))

    @classmethod
    def build(cls, ids: np.ndarray, vocab_size: int, order: int = DEFAULT_ORDER) -> "NGramDraft":
        """The table of `ids` (a training split, its first MAX_TABLE_CHARACTERS), every context length from 1
        to `order`, one length at a time so memory stays a few arrays of the text's size."""
        order = min(order, max_order(vocab_size))
        ids = np.asarray(ids[:MAX_TABLE_CHARACTERS], dtype=np.int64)
        base, keys, nexts = _base(vocab_size), [], []
        key = np.zeros(max(0, len(ids) - 1), dtype=np.int64)
        for length in range(1, min(order, len(ids) - 1) + 1):
            # Contexts of this length ending just before each next character, newest character first:
            # the key of length L is the key of length L - 1 with one more base-(V+1) digit.
            key = key[1:] * base + ids[:len(ids) - length] + 1 if length > 1 else ids[:-1] + 1
            pair, counts = np.unique(key * vocab_size + ids[length:], return_counts=True)
            pair_keys = pair // vocab_size
            best = np.lexsort((-counts, pair_keys))  # by key, the most frequent next character first
            first = np.ones(len(best), dtype=bool)
            first[1:] = pair_keys[best][1:] != pair_keys[best][:-1]
            keys.append(pair_keys[best[first]])
            nexts.append((pair[best[first]] % vocab_size).astype(np.int32))
        if not keys:
            return cls(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int32), order, vocab_size)
        return cls(np.concatenate(keys), np.concatenate(nexts), order, vocab_size)

    def propose(self, history: np.ndarray, k: int) -> list[int]:
        """k guesses at the characters after `history` (its last `order` characters matter)."""
        table, base, guesses = self.table, self.base, []
        context = np.asarray(history[-self.order:]).tolist()
        length, key = len(context), 0
        for char in reversed(context):  # the newest character is the key's highest digit
            key = key * base + char + 1
        top = base ** (length - 1) if length else 0  # the value of that highest digit
        for _ in range(k):
            found, shorter = None, key
            while shorter:  # the longest context the text has is the answer; usually the whole one
                found = table.get(shorter)
                if found is not None:
                    break
                shorter //= base  # drop the oldest character
            if found is None:
                break
            guesses.append(found)
            if length < self.order:  # a short history grows by a digit; a full one drops its oldest character
                top, length = top * base if length else 1, length + 1
                key = (found + 1) * top + key
            else:
                key = (found + 1) * top + key // base
        return guesses

    # Storage: tensors in a checkpoint, base64 strings in an .onnx file's metadata.

    def tensors(self) -> dict[str, np.ndarray]:
        return {NGRAM_KEYS: self.keys.astype(np.int64), NGRAM_NEXT: self.next_ids.astype(np.int32)}

    def metadata(self) -> str:
        return json.dumps({"order": self.order, "vocab_size": self.vocab_size,
                           "keys": base64.b64encode(self.keys.astype("<i8").tobytes()).decode(),
                           "next": base64.b64encode(self.next_ids.astype("<i4").tobytes()).decode()})

    @classmethod
    def from_tensors(cls, tensors: dict, order: int, vocab_size: int) -> "NGramDraft":
        return cls(np.asarray(tensors[NGRAM_KEYS]), np.asarray(tensors[NGRAM_NEXT]), order, vocab_size)

    @classmethod
    def from_metadata(cls, text: str) -> "NGramDraft":
        try:
            fields = json.loads(text)
            keys = np.frombuffer(base64.b64decode(fields["keys"]), dtype="<i8")
            next_ids = np.frombuffer(base64.b64decode(fields["next"]), dtype="<i4")
            return cls(keys, next_ids, int(fields["order"]), int(fields["vocab_size"]))
        except (ValueError, KeyError, TypeError):
            raise CheckpointError("the model's n-gram draft table is damaged; export it again, or use "
                                  "--draft context") from None


class ContextDraft:
    """Prompt lookup: what followed the last earlier occurrence of the row's newest `match` characters."""

    name = "context"

    def __init__(self, match: int = 3):
        self.match = match

    def propose(self, history: np.ndarray, k: int) -> list[int]:
        tokens = np.asarray(history)
        for match in range(min(self.match, len(tokens) - 1), 0, -1):
            tail = tokens[-match:]
            # Start positions i < len - match whose next `match` tokens equal the tail.
            hits = np.ones(len(tokens) - match, dtype=bool)
            for j in range(match):
                hits &= tokens[j:len(tokens) - match + j] == tail[j]
            found = np.flatnonzero(hits)
            if len(found):
                start = found[-1] + match
                return tokens[start:start + k].tolist()
        return []


class ModelDraft:
    """A smaller model's own greedy guesses (gpt-fast's draft model), through any engine: it must share the
    model's vocabulary. Each row keeps its own cache of what the draft has read, so a step only feeds it the
    tokens that are new since the last (the accepted guesses and the model's own token)."""

    name = "model"

    def __init__(self, engine):
        self.engine, self.block = engine, engine.block_size
        self.read: list[np.ndarray] = []  # per row: the tokens in the draft's cache
        self.offsets: list[int] = []  # per row: where in the row's history the draft's window starts

    def propose_rows(self, histories: list[np.ndarray], k: int) -> list[list[int]]:
        """k guesses for each row of the batch, the draft's rows decoded together."""
        k = min(k, self.block // 2)
        if len(histories) != len(self.read):
            self.engine.start(len(histories))
            self.read, self.offsets = [np.zeros(0, dtype=np.int64)] * len(histories), [0] * len(histories)
        logits = np.stack([self._catch_up(row, np.asarray(history), k) for row, history in enumerate(histories)])
        lengths = np.array([len(read) for read in self.read])
        guesses = []
        for step in range(k):
            next_ids = np.argmax(logits, axis=-1)
            guesses.append(next_ids)
            if step + 1 < k:
                logits = self.engine.extend(next_ids[:, None], lengths + step)[:, 0]
        guessed = np.stack(guesses, axis=1)
        self.read = [np.concatenate([read, row_guesses[:-1]]) for read, row_guesses in zip(self.read, guessed)]
        return guessed.tolist()

    def _catch_up(self, row: int, history: np.ndarray, k: int) -> np.ndarray:
        """Feed row's cache what its history has that the cache lacks; return the next-token logits. Past the
        draft's block the window restarts from the newest half block (as `minigpt.decoding` does)."""
        offset = self.offsets[row]
        if offset >= len(history) or len(history) - offset + k - 1 > self.block:
            offset = max(0, len(history) - self.block // 2)
        window, read = history[offset:], self.read[row] if offset == self.offsets[row] else history[:0]
        same = min(len(read), len(window) - 1)
        differs = np.flatnonzero(read[:same] != window[:same])
        same = int(differs[0]) if len(differs) else same
        logits = self.engine.extend(window[None, same:], np.array([same]), first_row=row)[0, -1]
        self.read[row], self.offsets[row] = window, offset
        return logits
