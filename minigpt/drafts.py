"""Drafts for speculative decoding: cheap guesses at the next few characters, which the model then checks.

A draft only proposes; `minigpt.decoding` verifies every proposed token
against what the model itself picks, so a draft can make decoding faster or
(slightly) slower, never different. Two drafts need no second model:

- `NGramDraft`: the next character after each context of up to `order`
  characters, longest context first, counted over the training text: not
  the text's own next character but the finished model's pick there (read
  through the text as in training), since a guess is right when it is what
  the model says. Built at the end of `minigpt train` and stored in the
  checkpoint (and carried into an exported .onnx file), because the table
  belongs to the model it was made for: it must use the model's vocabulary
  and travel with it. Greedy, it guesses the most frequent pick, and stops
  once its guesses are unlikely all to be right. Sampling, it guesses what
  the row will sample: the table keeps each context's few likeliest next
  characters with their summed probabilities, and the draft picks from those
  counts as the sampler picks from the model's probabilities (the same
  temperature, top-k and top-p, the same inverse CDF) with the very draw the
  row will use there. Where the counts resemble the model's probabilities the
  two picks agree far more often than the most frequent character alone is
  sampled (bench/README.md has the figures).
- `ContextDraft` (prompt lookup): find the last earlier place the row's own
  recent characters occurred, and propose what followed them there.

A smaller model is the third (`minigpt.draft_model.ModelDraft`).

Every draft answers for a batch of rows at once (`propose_rows`, the
`minigpt.speculative.Draft` protocol); the two table drafts answer a row at a
time (`RowByRow`), given the row's next k random draws and its sampler when
the row samples (None when greedy).

numpy only: the onnxruntime path stays torch-free.
"""

from __future__ import annotations

import base64
import bisect
import json
import math
from itertools import accumulate

import numpy as np

from minigpt.settings import MOST_DRAFT_TOKENS
from minigpt.errors import CheckpointError

# The table's sizes and thresholds; what each setting measured is in bench/README.md ("Speculative decoding").
DEFAULT_ORDER = 4  # context characters a guess reads
MAX_TABLE_CHARACTERS = 5_000_000  # of training text read into the table (its build's memory and time)
CANDIDATES = 8  # next characters kept per context with their counts
# Context characters a sampled guess reads: a longer context keeps only the model's greedy picks (its likeliest
# characters would make the table three times the size and sampled guesses no better: bench/README.md).
SAMPLED_ORDER = 4
# A sampling row's guesses use each context's distribution for its sampler's settings, made when first met
# (most contexts are never met in a run) and kept: for this many contexts, for a few settings at once.
MADE_DISTRIBUTIONS, RECENT_SETTINGS = 1 << 16, 4
# A greedy row's guesses go on while the chance that all are right (the product of how often the model picked
# each in its context) is at least this: a long guess past an unsure one is mostly a wider engine call for
# nothing. A sampling row's go on to k: with its draw known, a guess's probability says little of whether it
# is right. The default: a table made at the end of training picks its own (`minigpt.draft_table`).
CONFIDENT = 0.3
NGRAM_KEYS, NGRAM_NEXT, NGRAM_META = "draft.ngram.keys", "draft.ngram.next", "draft_ngram"
# Each context's candidates, most frequent first, and their counts: flat, `followers` of them per context.
# NGRAM_NEXT (the first candidate) stays, so that a table without them (an older checkpoint) still guesses.
NGRAM_FOLLOWERS, NGRAM_CANDIDATES, NGRAM_COUNTS = ("draft.ngram.followers", "draft.ngram.candidates",
                                                    "draft.ngram.counts")
# How often each context's greedy guess was the model's pick (float32): a table without it (older, or counting
# the text) takes its candidates' counts instead.
NGRAM_SURE = "draft.ngram.sure"
LIKELY_SCALE = 1000  # counts of probabilities are stored in thousandths of a pick


def _base(vocab_size: int) -> int:
    return vocab_size + 1  # digits 1..V: a shorter context never packs to a longer one's key


def max_order(vocab_size: int) -> int:
    """The longest context whose packed key, times the vocabulary (as the table is built), fits an int64."""
    return int((62 * math.log(2) - math.log(vocab_size)) / math.log(_base(vocab_size)))


class RowByRow:
    """A draft that guesses for one row at a time: `propose_rows` asks `propose` of each row."""

    name = "row"

    def stops_itself(self, sampler) -> bool:
        return False

    def propose(self, history: np.ndarray, k: int, draws=None, sampler=None) -> list[int]:
        raise NotImplementedError

    def propose_rows(self, histories: list[np.ndarray], limits: list[int], draws: np.ndarray | None,
                     samplers: list) -> list[list[int]]:
        return [self.propose(history, limit, None if draws is None else draws[row], sampler)
                for row, (history, limit, sampler) in enumerate(zip(histories, limits, samplers))]


class NGramDraft(RowByRow):
    """Next character by the longest matching context of the training text (see the module's docstring)."""

    name = "ngram"

    def __init__(self, keys: np.ndarray, next_ids: np.ndarray, order: int, vocab_size: int,
                 followers: np.ndarray | None = None, candidates: np.ndarray | None = None,
                 counts: np.ndarray | None = None, sure: np.ndarray | None = None, confident: float = CONFIDENT):
        """A table without candidates (one written before they were stored) has each context's one next
        character, counted once; one without `sure` takes each context's first candidate's share of its
        counts as how sure its greedy guess is. Greedy guesses go on while all are at least `confident`
        likely to be right."""
        self.order, self.vocab_size, self.base, self.confident = order, vocab_size, _base(vocab_size), confident
        self.keys, self.next_ids = keys, next_ids
        if candidates is None:
            followers = counts = np.ones(len(keys), dtype=np.int32)
            candidates = next_ids
        self.followers, self.candidates, self.counts = followers, candidates, counts
        self.table = dict(zip(keys.tolist(), range(len(keys))))  # context key -> its index
        self._next = next_ids.tolist()
        ends = np.cumsum(followers)
        starts = ends - followers
        self._starts, self._ends = starts.tolist(), ends.tolist()
        sure = _first_shares(counts, starts) if sure is None else sure
        self.sure, self._sure = sure, sure.tolist()  # how sure each context's greedy guess is
        self._candidates, self._counts = candidates.tolist(), counts.tolist()
        self._distributions: dict[tuple, dict[int, tuple[list[int], list[float]]]] = {}  # by sampler settings
        self._chains: dict[int, list[int]] = {}  # a context's key -> its greedy guesses, as many as any k

    @classmethod
    def build(cls, ids: np.ndarray, vocab_size: int, order: int = DEFAULT_ORDER, picks: np.ndarray | None = None,
              likely: tuple[np.ndarray, np.ndarray] | None = None) -> "NGramDraft":
        """The table of `ids` (a training split, its first MAX_TABLE_CHARACTERS), every context length from 1
        to `order`, one length at a time so memory stays a few arrays of the text's size.

        After the context that ends at ids[j - 1], a greedy guess counts picks[j] (by default ids[j], the
        text's own next character; `minigpt train` passes the model's own pick) and a sampled guess picks
        from likely = (characters, probabilities), each (len(ids), C): the characters the model finds
        likeliest at j with their probabilities (by default picks[j], counted once)."""
        order = min(order, max_order(vocab_size))
        ids = np.asarray(ids[:MAX_TABLE_CHARACTERS], dtype=np.int64)
        picks = ids if picks is None else np.asarray(picks[:len(ids)], dtype=np.int64)
        base, greedy, sampled = _base(vocab_size), [], []
        key = np.zeros(max(0, len(ids) - 1), dtype=np.int64)
        for length in range(1, min(order, len(ids) - 1) + 1):
            # Contexts of this length ending just before each next character, newest character first:
            # the key of length L is the key of length L - 1 with one more base-(V+1) digit.
            key = key[1:] * base + ids[:len(ids) - length] + 1 if length > 1 else ids[:-1] + 1
            greedy.append(_followers_of(key, picks[length:], vocab_size))
            if likely is not None and length <= SAMPLED_ORDER:
                characters, chances = (array[length:len(ids)] for array in likely)
                sampled.append(_followers_of(np.repeat(key, characters.shape[1]), characters.reshape(-1),
                                             vocab_size, chances.reshape(-1)))
            elif likely is not None:
                sampled.append(greedy[-1])
        if not greedy:
            empty = np.zeros(0, dtype=np.int32)
            return cls(np.zeros(0, dtype=np.int64), empty, order, vocab_size, empty, empty, empty)
        keys, followers, candidates, counts = (np.concatenate(column) for column in zip(*greedy))
        starts = np.cumsum(followers) - followers
        next_ids, sure = candidates[starts], _first_shares(counts, starts)
        if sampled:  # the same contexts (every position counts its pick among its likeliest characters)
            sampled_keys, followers, candidates, counts = (np.concatenate(column) for column in zip(*sampled))
            assert (sampled_keys == keys).all()
        return cls(keys, next_ids, order, vocab_size, followers, candidates, counts, sure)

    def shortened(self, order: int, confident: float) -> "NGramDraft":
        """The same counts for contexts of up to `order` characters, greedy guesses going on while `confident`."""
        kept = self.keys < self.base ** min(order, self.order)  # a key of L characters is below base ** L
        candidates = np.repeat(kept, self.followers)
        return NGramDraft(self.keys[kept], self.next_ids[kept], min(order, self.order), self.vocab_size,
                          self.followers[kept], self.candidates[candidates], self.counts[candidates],
                          self.sure[kept], confident)

    def settings(self) -> dict:
        """What a checkpoint stores beside the table's tensors."""
        return {"order": self.order, "confident": self.confident}

    @staticmethod
    def stops_itself(sampler) -> bool:
        """Whether a row sampling with `sampler` gets guesses that stop where they become unlikely all to be
        right (greedy rows do: the speculator then lets them run to its most, not to its schedule's k)."""
        return sampler.greedy

    def propose(self, history: np.ndarray, k: int, draws=None, sampler=None) -> list[int]:
        """Up to k guesses at the characters after `history` (its last `order` characters matter); with the
        row's next k draws and its sampler, each guess is what that draw picks from the context's counts. The
        guesses stop early once they are unlikely all to be right (see `confident`)."""
        greedy = draws is None or sampler.greedy
        reads = self.order if greedy else min(self.order, SAMPLED_ORDER)
        context = np.asarray(history[-reads:]).tolist()
        key = 0
        for char in reversed(context):  # the newest character is the key's highest digit
            key = key * self.base + char + 1
        if greedy:  # a context's greedy guesses never change: made once, kept
            if key not in self._chains:
                if len(self._chains) >= MADE_DISTRIBUTIONS:  # a long-running server meets ever more contexts
                    self._chains.clear()
                self._chains[key] = self._guesses(key, len(context), MOST_DRAFT_TOKENS, None, reads)
            return self._chains[key][:k]
        pick = self._picker(sampler)
        return self._guesses(key, len(context), k, lambda found, step: pick(found, draws[step]), reads)

    def _guesses(self, key: int, length: int, k: int, pick, reads: int) -> list[int]:
        """Up to k guesses after the context packed in `key` (`length` characters, up to `reads`): each
        context's most frequent candidate, or pick(context index, guess number) -> a candidate."""
        table, base, guesses, sure = self.table, self.base, [], 1.0
        top = base ** (length - 1) if length else 0  # the value of the key's highest digit
        for step in range(k):
            found, shorter = None, key
            while shorter:  # the longest context the text has is the answer; usually the whole one
                found = table.get(shorter)
                if found is not None:
                    break
                shorter //= base  # drop the oldest character
            if found is None:
                break
            if pick is None:  # greedy: on while the guesses are likely all right
                found, sure = self._next[found], sure * self._sure[found]
                if guesses and sure < self.confident:
                    break
            else:  # sampled: with the row's draw known, a guess's probability says little of whether it is right
                found = pick(found, step)
            guesses.append(found)
            if length < reads:  # a short history grows by a digit; a full one drops its oldest character
                top, length = top * base if length else 1, length + 1
                key = (found + 1) * top + key
            else:
                key = (found + 1) * top + key // base
        return guesses

    def _picker(self, sampler):
        """pick(context index, draw): the candidate that draw picks from the context's counts, taken as
        probabilities and filtered as `sampler` filters the model's (`minigpt.sampling`)."""
        settings = sampler.temperature, sampler.top_k, sampler.top_p, sampler.min_p
        if settings not in self._distributions and len(self._distributions) >= RECENT_SETTINGS:
            self._distributions.pop(next(iter(self._distributions)))  # a server's requests may differ in each
        made = self._distributions.setdefault(settings, {})

        def pick(index: int, draw: float) -> int:
            if index not in made:
                if len(made) >= MADE_DISTRIBUTIONS:  # a long-running server meets ever more contexts
                    made.clear()
                made[index] = self._distribution(index, *settings)
            ids, cumulative = made[index]
            return ids[min(bisect.bisect_left(cumulative, draw), len(ids) - 1)]

        return pick

    def _distribution(self, index: int, temperature: float, top_k, top_p, min_p) -> tuple[list[int], list[float]]:
        """A context's kept candidates in vocabulary order (the order the sampler's inverse CDF walks) and
        their cumulative probabilities: counts ** (1 / temperature), then top-k, top-p and min-p as the sampler."""
        start, end = self._starts[index], self._ends[index]
        if end - start == 1:  # most long contexts: one next character, picked by every draw
            return self._candidates[start:end], [1.0]
        counts, ids = self._counts[start:end][:top_k], self._candidates[start:end][:top_k]
        weights = [(count / counts[0]) ** (1 / temperature) for count in counts]  # most frequent first
        if top_p is not None and top_p < 1:
            mass = top_p * sum(weights)
            above = list(accumulate(weights, initial=0.0))
            weights = weights[:max(1, sum(1 for before in above[:-1] if before < mass))]
        if min_p:  # the most frequent weighs 1
            weights = [weight for weight in weights if weight >= min_p]
        ranked = sorted(zip(ids, weights))
        total = sum(weights)
        return [token for token, _ in ranked], [share / total for share in accumulate(w for _, w in ranked)]

    # Storage: tensors in a checkpoint, base64 strings in an .onnx file's metadata.

    def tensors(self) -> dict[str, np.ndarray]:
        return {NGRAM_KEYS: self.keys.astype("<i8"), NGRAM_NEXT: self.next_ids.astype("<i4"),
                NGRAM_FOLLOWERS: self.followers.astype("<i4"), NGRAM_CANDIDATES: self.candidates.astype("<i4"),
                NGRAM_COUNTS: self.counts.astype("<i4"), NGRAM_SURE: self.sure.astype("<f4")}

    def metadata(self) -> str:
        fields = {_field(name): base64.b64encode(array.tobytes()).decode() for name, array in self.tensors().items()}
        return json.dumps({**self.settings(), "vocab_size": self.vocab_size, **fields})

    @classmethod
    def from_tensors(cls, tensors: dict, settings: dict, vocab_size: int) -> "NGramDraft":
        """A table from its tensors and its `settings()` (a table stored before it chose `confident` has none)."""
        optional = [np.asarray(tensors[name]) if name in tensors else None
                    for name in (NGRAM_FOLLOWERS, NGRAM_CANDIDATES, NGRAM_COUNTS, NGRAM_SURE)]
        return cls(np.asarray(tensors[NGRAM_KEYS]), np.asarray(tensors[NGRAM_NEXT]), int(settings["order"]),
                   vocab_size, *optional, float(settings.get("confident", CONFIDENT)))

    @classmethod
    def from_metadata(cls, text: str) -> "NGramDraft":
        try:
            fields = json.loads(text)
            dtypes = {NGRAM_KEYS: "<i8", NGRAM_SURE: "<f4"}
            arrays = {name: np.frombuffer(base64.b64decode(fields[_field(name)]), dtype=dtypes.get(name, "<i4"))
                      for name in (NGRAM_KEYS, NGRAM_NEXT, NGRAM_FOLLOWERS, NGRAM_CANDIDATES, NGRAM_COUNTS,
                                   NGRAM_SURE) if _field(name) in fields}
            return cls.from_tensors(arrays, fields, int(fields["vocab_size"]))
        except (ValueError, KeyError, TypeError):
            raise CheckpointError("the model's n-gram draft table is damaged; export it again, or use "
                                  "--draft context") from None


def _field(tensor_name: str) -> str:
    """An array's name in the .onnx metadata: its tensor name's last part ("draft.ngram.keys" -> "keys")."""
    return tensor_name.rsplit(".", 1)[1]


def _first_shares(counts: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Each context's first (most frequent) candidate's share of its kept counts (float32), contexts starting
    at `starts` in the flat `counts`: how sure a greedy guess of it is."""
    if not len(starts):
        return np.zeros(0, dtype=np.float32)
    return (counts[starts] / np.maximum(np.add.reduceat(counts, starts), 1)).astype(np.float32)


def _followers_of(keys: np.ndarray, next_ids: np.ndarray, vocab_size: int,
                  weights: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
    """For each distinct context key: its key, how many candidates it keeps (up to CANDIDATES), and those
    candidates with their counts, most frequent first (ties: the lower id first, as the sampler ranks). With
    `weights`, each (key, next id) counts its weight (a probability; stored in thousandths, at least one)."""
    pair, inverse = np.unique(keys * vocab_size + next_ids, return_inverse=True)
    counts = np.bincount(inverse.reshape(-1), weights)
    if weights is not None:
        counts = np.maximum(1, np.rint(counts * LIKELY_SCALE))
    pair_keys = pair // vocab_size
    ranked = np.lexsort((-counts, pair_keys))  # by key, the most frequent next character first
    ranked_keys = pair_keys[ranked]
    first = np.ones(len(ranked), dtype=bool)
    first[1:] = ranked_keys[1:] != ranked_keys[:-1]
    starts = np.flatnonzero(first)
    rank = np.arange(len(ranked)) - np.repeat(starts, np.diff(np.append(starts, len(ranked))))
    kept = ranked[rank < CANDIDATES]
    followers = np.minimum(np.diff(np.append(starts, len(ranked))), CANDIDATES).astype(np.int32)
    return (ranked_keys[starts], followers, (pair[kept] % vocab_size).astype(np.int32),
            counts[kept].astype(np.int32))


class ContextDraft(RowByRow):
    """Prompt lookup: what followed the last earlier occurrence of the row's newest `match` characters."""

    name = "context"

    def __init__(self, match: int = 3):
        self.match = match

    def propose(self, history: np.ndarray, k: int, draws=None, sampler=None) -> list[int]:
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
