"""User-facing errors.

Everything a user can get wrong (a bad flag value, a missing file, a prompt
with characters the model never saw) raises a `MiniGPTError` whose message is
one line naming the problem and the fix. The CLI prints that line and exits
with code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class MiniGPTError(ValueError):
    """Bad input that the user can fix; the message says how."""


class ConfigError(MiniGPTError):
    """A model, training or sampling setting that cannot work; `field` names the setting when one is at fault."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class DataError(MiniGPTError):
    """Training or evaluation text that cannot be used."""


class CheckpointError(MiniGPTError):
    """A checkpoint that is missing, corrupt or does not match its config."""


class UnknownCharactersError(MiniGPTError):
    """Text holding characters outside the tokenizer's vocabulary."""
