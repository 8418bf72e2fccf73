"""The checks every engine's `extend` makes, and generate's own: one message for each mistake, whichever engine
runs."""

from __future__ import annotations

import numpy as np

from minigpt.errors import MiniGPTError


def check_extend(ids: np.ndarray, start_pos: np.ndarray, first_row: int, batch_size: int,
                 block_size: int) -> int:
    """The checks every engine's `extend` makes; returns the end of the longest row after the call."""
    rows, length = ids.shape
    if not 0 <= first_row <= first_row + rows <= batch_size:
        raise MiniGPTError(f"rows {first_row}..{first_row + rows - 1} are outside the batch of {batch_size} "
                           "rows; call start() with a larger batch")
    if len(start_pos) != rows:
        raise MiniGPTError(f"{rows} rows of ids need {rows} start positions, got {len(start_pos)}")
    end = max(start_pos.tolist(), default=0) + length
    if end > block_size:
        raise MiniGPTError(f"positions up to {end} exceed block_size {block_size}; "
                           "keep the last block_size tokens")
    return end


def check_lengths(max_new_tokens: int, num_samples: int) -> None:
    if max_new_tokens < 0:
        raise MiniGPTError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if num_samples < 1:
        raise MiniGPTError(f"num_samples must be >= 1, got {num_samples}")
