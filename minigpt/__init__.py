"""minigpt: a character-level GPT to learn from, and to see how inference is made fast.

The names below load on first use, so `import minigpt` (and the CLI's
`--help`) does not pay for importing torch.
"""

from importlib import import_module

from minigpt.errors import MiniGPTError

__version__ = "0.1.0"

_LAZY = {
    "GPTConfig": "minigpt.config",
    "TrainConfig": "minigpt.config",
    "CharTokenizer": "minigpt.tokenizer",
    "MiniGPT": "minigpt.model",
    "Sampler": "minigpt.sampling",
    "load_corpus": "minigpt.data",
    "save_checkpoint": "minigpt.checkpoint",
    "load_checkpoint": "minigpt.checkpoint",
    "generate": "minigpt.generation",
    "stream": "minigpt.generation",
    "generate_samples": "minigpt.generation",
}

# Modules reachable as attributes after a plain `import minigpt` (minigpt.train.train(...)), loaded on first use.
_SUBMODULES = ("checkpoint", "config", "data", "decoding", "generation", "model", "sampling", "tokenizer",
               "train", "kernels", "export")

__all__ = ["MiniGPTError", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
    elif name in _SUBMODULES:
        value = import_module(f"minigpt.{name}")
    else:
        raise AttributeError(f"module 'minigpt' has no attribute {name!r}")
    globals()[name] = value
    return value
