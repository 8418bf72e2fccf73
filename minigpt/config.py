"""Model and training settings as dataclasses, validated when built."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from minigpt.errors import ConfigError


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass(frozen=True)
class GPTConfig:
    """Everything that fixes the model's architecture (and so its tensors' shapes)."""

    vocab_size: int
    block_size: int = 128
    embed_dim: int = 128
    num_heads: int = 4
    num_layers: int = 2
    mlp_ratio: int = 4
    dropout: float = 0.0

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
        try:
            fields = json.loads(text)
        except (TypeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"config is not valid JSON ({exc})") from None
        _require(isinstance(fields, dict), f"config must be a JSON object, got {type(fields).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        _require(not unknown, f"config has unknown fields {unknown}; expected only {sorted(known)}")
        try:
            return cls(**fields)
        except TypeError as exc:  # a required field is missing
            raise ConfigError(f"config is incomplete ({exc})") from None


@dataclass(frozen=True)
class TrainConfig:
    """How to train: optimisation, schedule, evaluation and where to run."""

    batch_size: int = 32
    learning_rate: float = 3e-4
    steps: int = 200
    eval_interval: int = 50
    eval_iters: int = 20
    warmup: int = 20
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 1337
    device: str = "auto"

    def __post_init__(self) -> None:
        for name in ("batch_size", "steps", "eval_interval", "eval_iters"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value > 0, f"{name} must be a positive integer, got {value!r}")
        _require(isinstance(self.warmup, int) and self.warmup >= 0,
                 f"warmup must be zero or a positive integer, got {self.warmup!r}")
        _require(self.learning_rate > 0, f"learning_rate must be positive, got {self.learning_rate!r}")
        _require(self.weight_decay >= 0, f"weight_decay must be zero or positive, got {self.weight_decay!r}")
        _require(self.grad_clip >= 0, f"grad_clip must be zero (off) or positive, got {self.grad_clip!r}")
        _require(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
                 f"device must be auto, cpu or cuda, got {self.device!r}")
