"""Model and training settings as dataclasses, validated when built."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field

from minigpt.devices import check_device_name
from minigpt.errors import ConfigError

MAX_SEED = 2**63 - 1  # what every random generator used here (torch, numpy) takes
# The most guesses a speculative step verifies by default: the n-gram table's greedy guesses stop sooner
# where it is unsure, and other guesses follow a schedule from a few (`minigpt.speculative`). Trained default
# model, batch 1, in turn: 32 against 12 1.09x (1.40x the large model's); sampled text alike.
DRAFT_TOKENS = 32
MOST_DRAFT_TOKENS = 64  # what --draft-tokens accepts


def _require(condition: bool, message: str) -> None:
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
                and math.isfinite(value) and (self.low is None or value >= self.low)
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


def option(default, help: str, bounds: Bounded | None = None):
    """A field with the one text that explains it (`--help` and the README's tables both read it) and the
    numbers it takes."""
    return field(default=default, metadata={"help": help, "bounds": bounds})


def check_bounds(settings) -> None:
    """Every field of a settings dataclass within its bounds."""
    for f in dataclasses.fields(settings):
        if f.metadata.get("bounds") is not None:
            f.metadata["bounds"].check(getattr(settings, f.name), f.name)


def check_seed(seed, name: str = "seed") -> None:
    SEED.check(seed, name)


def _from_json(cls, text: str, what: str):
    """Rebuild a dataclass from JSON of its fields; unknown or missing fields are a ConfigError."""
    try:
        fields = json.loads(text)
    except (TypeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{what} is not valid JSON ({exc})") from None
    _require(isinstance(fields, dict), f"{what} must be a JSON object, got {type(fields).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    _require(not unknown, f"{what} has unknown fields {unknown}; expected only {sorted(known)}")
    try:
        return cls(**fields)
    except TypeError as exc:  # a required field is missing
        raise ConfigError(f"{what} is incomplete ({exc})") from None


@dataclass(frozen=True)
class GPTConfig:
    """Everything that fixes the model's architecture (and so its tensors' shapes)."""

    vocab_size: int  # decided by the corpus, never a flag
    block_size: int = option(128, "context length in characters", POSITIVE)
    embed_dim: int = option(128, "width of the residual stream", POSITIVE)
    num_heads: int = option(4, "attention heads (must divide embed_dim)", POSITIVE)
    num_layers: int = option(2, "transformer blocks", POSITIVE)
    mlp_ratio: int = option(4, "MLP hidden width / embed_dim", POSITIVE)
    dropout: float = option(0.0, "dropout on embeddings and residual branches", Bounded(float, 0, 0.99))

    def __post_init__(self) -> None:
        POSITIVE.check(self.vocab_size, "vocab_size")
        check_bounds(self)
        _require(self.embed_dim % self.num_heads == 0,
                 f"embed_dim ({self.embed_dim}) must be divisible by num_heads ({self.num_heads}); "
                 f"pick num_heads from the divisors of {self.embed_dim}")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def parameters(self) -> int:
        """How many numbers the model holds (the head is tied to the token embedding): known before a byte of
        it is allocated."""
        width, hidden = self.embed_dim, self.mlp_ratio * self.embed_dim
        block = 4 * width + (3 * width * width + 3 * width) + (width * width + width) + 2 * width * hidden \
            + hidden + width  # two LayerNorms, attention in and out, the MLP
        return (self.vocab_size + self.block_size) * width + self.num_layers * block + 2 * width

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "GPTConfig":
        """Rebuild a config from `to_json` output; unknown or missing fields are a ConfigError."""
        return _from_json(cls, text, "config")


@dataclass(frozen=True)
class TrainConfig:
    """How to train: optimisation, schedule, evaluation and where to run."""

    batch_size: int = option(32, "sequences per step", POSITIVE)
    learning_rate: float = option(3e-4, "peak learning rate (AdamW)", Bounded(float, above=0))
    steps: int = option(200, "optimizer steps in all (with --resume: the total to reach)", POSITIVE)
    eval_interval: int = option(50, "evaluate (and save) every this many steps", POSITIVE)
    eval_iters: int = option(20, "batches per evaluation", POSITIVE)
    warmup: int = option(20, "linear warm-up steps, then cosine decay to a tenth of the peak", COUNT)
    weight_decay: float = option(0.1, "on weight matrices and embeddings only", Bounded(float, 0))
    grad_clip: float = option(1.0, "clip the gradient norm (0 turns it off)", Bounded(float, 0))
    seed: int = option(1337, "same seed, same run on CPU", SEED)
    device: str = option("auto", "auto, cpu or cuda (bf16 autocast on CUDA)")

    def __post_init__(self) -> None:
        check_bounds(self)
        check_device_name(self.device)

    @classmethod
    def from_json(cls, text: str) -> "TrainConfig":
        """The settings a checkpoint was trained with (its `train_config` metadata)."""
        return _from_json(cls, text, "train_config")
