"""Model and training settings as dataclasses, validated when built."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from minigpt.devices import check_device_name
from minigpt.errors import ConfigError

MAX_SEED = 2**63 - 1  # what every random generator used here (torch, numpy) takes


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def option(default, help: str):
    """A field with the one text that explains it: `--help` and the README's tables both read it."""
    return field(default=default, metadata={"help": help})


def check_seed(seed, name: str = "seed") -> None:
    if not (isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed <= MAX_SEED):
        raise ConfigError(f"{name} must be an integer from 0 to 2**63-1, got {seed!r}", name)


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
    block_size: int = option(128, "context length in characters")
    embed_dim: int = option(128, "width of the residual stream")
    num_heads: int = option(4, "attention heads (must divide embed_dim)")
    num_layers: int = option(2, "transformer blocks")
    mlp_ratio: int = option(4, "MLP hidden width / embed_dim")
    dropout: float = option(0.0, "dropout on embeddings and residual branches")

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "embed_dim", "num_heads", "num_layers", "mlp_ratio"):
            value = getattr(self, name)
            _require(isinstance(value, int) and not isinstance(value, bool) and value > 0,
                     f"{name} must be a positive integer, got {value!r}")
        _require(self.embed_dim % self.num_heads == 0,
                 f"embed_dim ({self.embed_dim}) must be divisible by num_heads ({self.num_heads}); "
                 f"pick num_heads from the divisors of {self.embed_dim}")
        _require(isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0,
                 f"dropout must be in [0, 1), got {self.dropout!r}")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "GPTConfig":
        """Rebuild a config from `to_json` output; unknown or missing fields are a ConfigError."""
        return _from_json(cls, text, "config")


@dataclass(frozen=True)
class TrainConfig:
    """How to train: optimisation, schedule, evaluation and where to run."""

    batch_size: int = option(32, "sequences per step")
    learning_rate: float = option(3e-4, "peak learning rate (AdamW)")
    steps: int = option(200, "optimizer steps in all (with --resume: the total to reach)")
    eval_interval: int = option(50, "evaluate (and save) every this many steps")
    eval_iters: int = option(20, "batches per evaluation")
    warmup: int = option(20, "linear warm-up steps, then cosine decay to a tenth of the peak")
    weight_decay: float = option(0.1, "on weight matrices and embeddings only")
    grad_clip: float = option(1.0, "clip the gradient norm (0 turns it off)")
    seed: int = option(1337, "same seed, same run on CPU")
    device: str = option("auto", "auto, cpu or cuda (bf16 autocast on CUDA)")

    def __post_init__(self) -> None:
        for name in ("batch_size", "steps", "eval_interval", "eval_iters"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value > 0, f"{name} must be a positive integer, got {value!r}")
        _require(isinstance(self.warmup, int) and self.warmup >= 0,
                 f"warmup must be zero or a positive integer, got {self.warmup!r}")
        _require(self.learning_rate > 0, f"learning_rate must be positive, got {self.learning_rate!r}")
        _require(self.weight_decay >= 0, f"weight_decay must be zero or positive, got {self.weight_decay!r}")
        _require(self.grad_clip >= 0, f"grad_clip must be zero (off) or positive, got {self.grad_clip!r}")
        check_seed(self.seed)
        check_device_name(self.device)

    @classmethod
    def from_json(cls, text: str) -> "TrainConfig":
        """The settings a checkpoint was trained with (its `train_config` metadata)."""
        return _from_json(cls, text, "train_config")
