"""The sampling controls that read the text so far: penalties, logit_bias and a pattern the text must match.

A layer over the learner's `Sampler`: `ControlledSampler` adjusts a row's
logits before the sampler's own arithmetic, in this order (docs/sampling.md
gives each definition and its reference):

1. repetition_penalty, over the prompt and the output: a token that occurs
   there has a positive logit divided by it, a negative one multiplied
   (HuggingFace's `RepetitionPenaltyLogitsProcessor`, vLLM's).
2. frequency_penalty and presence_penalty, over the output only: each
   token's logit less count × frequency_penalty, less presence_penalty if
   the count is above 0 (OpenAI's documented formula, as vLLM applies it).
3. logit_bias: added to the named tokens' logits (OpenAI's).
4. the pattern: tokens that cannot continue a match are masked out.

Then temperature, top-k, top-p, min-p and the row's draw, as ever. A row's
text so far is its sequence's tokens; a speculative verify adds the guesses
before each position (`ahead`), so each position is picked as plain decoding
would pick it once those guesses are the text.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import numpy as np

from minigpt.errors import ConfigError
from minigpt.fast_sampling import FastSampler
from minigpt.patterns import Pattern, compile_pattern
from minigpt.sampling import Sampler
from minigpt.settings import POSITIVE, Bounded, option

BIAS = Bounded(float, -100, 100)  # OpenAI's range for a logit_bias value


@dataclass
class ControlledSampler(FastSampler):
    """A sampler with the controls that read each row's text so far (see the module's docstring)."""

    repetition_penalty: float = option(1.0, "divide a positive logit (multiply a negative one) of each token in the "
                                       "prompt or output by this; 1 is off", Bounded(float, high=2, above=0))
    presence_penalty: float = option(0.0, "subtract this from the logit of each token the output has",
                                     Bounded(float, -2, 2))
    frequency_penalty: float = option(0.0, "subtract this times its count in the output from each token's logit",
                                      Bounded(float, -2, 2))
    vocab_size: int = option(0, "the model's vocabulary: a text's token counts are kept in arrays of this size",
                             POSITIVE)
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> a number added to its logit
    pattern: Pattern | None = None  # what the output must match (`minigpt.patterns`)
    _texts: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary, init=False, repr=False,
                                              compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        for token, bias in self.logit_bias.items():
            if not (Bounded(int, 0, self.vocab_size - 1).holds(token) and BIAS.holds(bias)):
                raise ConfigError(f"logit_bias maps token ids from 0 to {self.vocab_size - 1} (this model's "
                                  f"vocabulary) to {BIAS.what}; got {token!r}: {bias!r}", "logit_bias")
        self._bias_ids = np.array(list(self.logit_bias), dtype=np.int64)
        self._bias_values = np.array(list(self.logit_bias.values()), dtype=np.float32)
        self.reads_text = True

    def adjust(self, logits: np.ndarray, sequence, ahead=()) -> None:
        """Apply the controls to one row's (V,) logits, in place, for `sequence`'s text followed by the tokens
        `ahead`."""
        text = self._text(sequence)
        if len(ahead):
            text = text.copy()
            for token in ahead:
                text.add(token, self)
        if self.repetition_penalty != 1:
            repeated = logits[text.seen_ids]
            logits[text.seen_ids] = np.where(repeated < 0, repeated * self.repetition_penalty,
                                             repeated / self.repetition_penalty)
        logits += text.offset
        if self.pattern is not None:
            logits += self.pattern.mask(text.state)

    def finished(self, sequence) -> bool:
        """Whether the pattern allows nothing after the sequence's text: the text is complete."""
        return self.pattern is not None and self.pattern.complete(self._text(sequence).state)

    def _text(self, sequence) -> _Text:
        """What the controls know of a sequence's text, brought up to date with its tokens (which only grow)."""
        text = self._texts.get(sequence)
        if text is None:
            text = self._texts[sequence] = _Text.start(self, sequence.prompt)
        for token in sequence.tokens[text.read:]:
            text.add(token, self)
        return text


@dataclass
class _Text:
    """One sequence's text as the controls read it, kept up to date a token at a time."""

    offset: np.ndarray  # (V,) float32: what logit_bias and the frequency and presence penalties add to each logit
    counts: np.ndarray  # (V,) each token's count in the output
    seen: np.ndarray  # (V,) whether a token is in the prompt or the output
    seen_ids: np.ndarray  # the same as ids: the tokens the repetition penalty applies to
    state: int | None  # the pattern's state after the output (None: it left the pattern, or there is none)
    read: int = 0  # the output's tokens counted so far

    @classmethod
    def start(cls, sampler: ControlledSampler, prompt) -> _Text:
        offset = np.zeros(sampler.vocab_size, dtype=np.float32)
        offset[sampler._bias_ids] += sampler._bias_values
        seen = np.zeros(sampler.vocab_size, dtype=bool)
        seen[np.asarray(prompt, dtype=np.int64)] = True
        return cls(offset, np.zeros(sampler.vocab_size, dtype=np.int64), seen, np.flatnonzero(seen),
                   sampler.pattern.start if sampler.pattern is not None else None)

    def add(self, token: int, sampler: ControlledSampler) -> None:
        """Count one more token of the output."""
        self.offset[token] -= sampler.frequency_penalty + (0.0 if self.counts[token] else sampler.presence_penalty)
        self.counts[token] += 1
        if not self.seen[token]:
            self.seen[token] = True
            self.seen_ids = np.flatnonzero(self.seen)
        if sampler.pattern is not None:
            self.state = sampler.pattern.next(self.state, token)
        self.read += 1

    def copy(self) -> _Text:
        return _Text(self.offset.copy(), self.counts.copy(), self.seen.copy(), self.seen_ids, self.state, self.read)


def make_sampler(tokenizer, sampler_type: type[Sampler] = FastSampler, *, repetition_penalty: float = 1.0,
                 presence_penalty: float = 0.0, frequency_penalty: float = 0.0, logit_bias: dict | None = None,
                 regex: str | None = None, choices: list[str] | None = None, json_schema=None,
                 cache: dict | None = None, **sampling) -> Sampler:
    """The sampler these settings ask for: `sampler_type` with temperature, top_k, top_p, min_p and seed alone,
    or a `ControlledSampler` once a control that reads the text is on (a pattern from `regex`, `choices` or
    `json_schema`, at most one; `cache` keeps compiled patterns for the next call)."""
    pattern = compile_pattern(tokenizer, regex=regex, choices=choices, json_schema=json_schema, cache=cache)
    controls = {"repetition_penalty": repetition_penalty, "presence_penalty": presence_penalty,
                "frequency_penalty": frequency_penalty, "logit_bias": dict(logit_bias or {}), "pattern": pattern}
    if controls == {"repetition_penalty": 1, "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": {},
                    "pattern": None}:
        return sampler_type(**sampling)
    return ControlledSampler(**sampling, **controls, vocab_size=tokenizer.vocab_size)
