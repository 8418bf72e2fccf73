"""Model and training settings as dataclasses, validated when built."""

from __future__ import annotations

from dataclasses import dataclass

from minigpt.devices import check_device_name
from minigpt.settings import COUNT, POSITIVE, SEED, Bounded, JsonFields, check_bounds, option, require


@dataclass(frozen=True)
class GPTConfig(JsonFields):
    """Everything that fixes the model's architecture (and so its tensors' shapes)."""

    json_name = "config"
    vocab_size: int  # decided by the corpus, never a flag
    block_size: int = option(128, "context length in tokens (a character model's are characters)", POSITIVE)
    embed_dim: int = option(128, "width of the residual stream", POSITIVE)
    num_heads: int = option(4, "attention heads (must divide embed_dim)", POSITIVE)
    num_layers: int = option(2, "transformer blocks", POSITIVE)
    mlp_ratio: int = option(4, "MLP hidden width / embed_dim", POSITIVE)
    dropout: float = option(0.0, "dropout on embeddings and residual branches", Bounded(float, 0, 0.99))

    def __post_init__(self) -> None:
        POSITIVE.check(self.vocab_size, "vocab_size")
        check_bounds(self)
        require(self.embed_dim % self.num_heads == 0,
                 f"embed_dim ({self.embed_dim}) must be divisible by num_heads ({self.num_heads}); "
                 f"pick num_heads from the divisors of {self.embed_dim}")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads


@dataclass(frozen=True)
class TrainConfig(JsonFields):
    """How to train: optimisation, schedule, evaluation and where to run."""

    json_name = "train_config"
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
    # Sums split over other thread counts round differently: a run resumes on as many threads as it ran on.
    threads: int | None = option(None, "CPU threads (cores other work keeps busy are left to it); recorded, so "
                                 "--resume uses as many", POSITIVE, shown="the free cores")

    def __post_init__(self) -> None:
        check_bounds(self)
        check_device_name(self.device)
