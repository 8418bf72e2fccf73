"""How a setting says which values it takes: one object checks a dataclass field when it is built and types
its command-line flag, so a bad value is refused in the same words everywhere (`--help` reads them too)."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field

from minigpt.errors import ConfigError

MAX_SEED = 2**63 - 1  # what every random generator used here (torch, numpy) takes
# The most guesses a speculative step verifies by default (`minigpt.speculative`; what other settings measured
# is in bench/README.md, "Speculative decoding").
DRAFT_TOKENS = 32
MOST_DRAFT_TOKENS = 64  # what --draft-tokens accepts


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass(frozen=True)
class Bounded:
    """The numbers a setting takes: `kind` (int or float) from `low` to `high` (None: no bound), or above
    `above`. The same object checks a dataclass field when it is built and types its command-line flag, so a
    flag is refused as it is read, in the words `--help` uses."""

    kind: type
    low: float | None = None
    high: float | None = None
    above: float | None = None

    def holds(self, value) -> bool:
        return (isinstance(value, (int, float) if self.kind is float else int) and not isinstance(value, bool)
                and (not isinstance(value, float) or math.isfinite(value)) and (self.low is None or value >= self.low)
                and (self.high is None or value <= self.high) and (self.above is None or value > self.above))

    @property
    def what(self) -> str:
        number = "an integer" if self.kind is int else "a number"
        if self.above is not None:
            return f"{number} above {_shown(self.above)}" + (f" and at most {_shown(self.high)}" if self.high else "")
        if self.low is not None and self.high is not None:
            return f"{number} from {_shown(self.low)} to {_shown(self.high)}"
        return f"{number} of at least {_shown(self.low)}" if self.low is not None else f"{number}, finite"

    def check(self, value, name: str) -> None:
        if not self.holds(value):
            raise ConfigError(f"{name} must be {self.what}, got {value!r}", name)

    def __call__(self, text: str):
        """argparse's `type`: the value of a flag, or ArgumentTypeError in one line."""
        import argparse

        try:
            value = self.kind(text)
        except ValueError:
            value = text
        if not self.holds(value):
            raise argparse.ArgumentTypeError(f"must be {self.what}, got {text!r}")
        return value


def _shown(bound: float) -> str:
    return "2**63-1" if bound == MAX_SEED else f"{bound:g}"


POSITIVE = Bounded(int, low=1)
COUNT = Bounded(int, low=0)
SEED = Bounded(int, low=0, high=MAX_SEED)
VOCAB_SIZE = Bounded(int, low=256, high=65_536)  # a BPE's: the 256 bytes at least, two bytes a token at most


def option(default, help: str, bounds: Bounded | None = None, shown: str | None = None):
    """A field with the one text that explains it (`--help` and the reference's tables both read it), the
    numbers it takes, and how `--help` shows its default (`shown`, where None stands for a choice made later)."""
    return field(default=default, metadata={"help": help, "bounds": bounds, "shown": shown})


def check_bounds(settings) -> None:
    """Every field of a settings dataclass within its bounds."""
    for f in dataclasses.fields(settings):
        if f.metadata.get("bounds") is not None and not (f.default is None and getattr(settings, f.name) is None):
            f.metadata["bounds"].check(getattr(settings, f.name), f.name)


def check_seed(seed, name: str = "seed") -> None:
    SEED.check(seed, name)


class JsonFields:
    """A settings dataclass written as JSON of its fields (a checkpoint's metadata) and read back, checked."""

    json_name = "settings"  # how a message names it

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str):
        return from_json(cls, text, cls.json_name)


def from_json(cls, text: str, what: str):
    """Rebuild a dataclass from JSON of its fields; unknown or missing fields are a ConfigError."""
    try:
        fields = json.loads(text)
    except (TypeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{what} is not valid JSON ({exc})") from None
    require(isinstance(fields, dict), f"{what} must be a JSON object, got {type(fields).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    require(not unknown, f"{what} has unknown fields {unknown}; expected only {sorted(known)}")
    try:
        return cls(**fields)
    except TypeError as exc:  # a required field is missing
        raise ConfigError(f"{what} is incomplete ({exc})") from None
