"""Scoring a text (`minigpt.scoring`): every engine gives each token the log-probability the model's own forward
pass gives it, read in consecutive block_size windows from the start."""

import numpy as np
import pytest
import torch

from tiny import TINY_TEXT
from minigpt.scoring import score, windows
from minigpt.serve.protocol import top_tokens


def reference_logprobs(model, ids):
    """Token i+1 scored by one forward pass over the window [16k, 16(k+1)) that holds position i."""
    block, out = model.config.block_size, []
    with torch.no_grad():
        for start in range(0, len(ids) - 1, block):
            window = torch.as_tensor(ids[start:min(start + block, len(ids) - 1)])[None]
            logprobs = torch.log_softmax(model(window)[0][0].double(), dim=-1)
            out += logprobs[torch.arange(window.shape[1]), torch.as_tensor(ids[start + 1:start + 1 + window.shape[1]])]
    return np.array(out)


@pytest.mark.parametrize("name", ["recompute", "kv-cache", "onnx"])
@pytest.mark.parametrize("length,rows", [(2, 1), (17, 1), (33, 3), (203, 4)])
def test_every_engine_scores_like_the_models_forward(make_engine, tiny_loaded, name, length, rows):
    ids = np.array(tiny_loaded.tokenizer.encode(TINY_TEXT[:length]))
    engine = make_engine(name)
    engine.start(rows + 1)
    tops, seen = [], []
    logprobs = score(engine, ids, first_row=1, rows=rows,
                     each_window=lambda start, window: (seen.append(start), tops.append(top_tokens(window, 3)[1])))
    np.testing.assert_allclose(logprobs, reference_logprobs(tiny_loaded.model, ids), rtol=1e-5, atol=1e-5)
    assert seen == [start for start, _ in windows(length, tiny_loaded.model.config.block_size)]
    top_logprobs = np.concatenate(tops)
    assert top_logprobs.shape == (length - 1, 3)
    assert (top_logprobs[:, 0] >= logprobs - 1e-9).all() and (np.diff(top_logprobs, axis=1) <= 0).all()


def test_windows_cover_every_token_after_the_first_once():
    for length in (1, 2, 16, 17, 100):
        spans = windows(length, 16)
        predicted = [i + 1 for start, end in spans for i in range(start, end)]
        assert predicted == list(range(1, length)) and all(end - start <= 16 for start, end in spans)
