import math

import numpy as np
import pytest

from minigpt import MiniGPTError, Sampler
from minigpt.decoding import Continuation
from minigpt.speculative import give_back, read_draws


def random_logits(seed, batch=4, vocab=30):
    return np.random.default_rng(seed).normal(size=(batch, vocab)) * 3


def drawing(sampler, rows):
    """logits -> each row's token, row i drawing from its own stream, as generation does."""
    streams = sampler.streams(rows)
    return lambda logits: sampler.pick(logits, None if sampler.greedy else np.array([s.random() for s in streams]))


@pytest.mark.parametrize("temperature", [5e-324, 1e-300, 9e-6])
def test_a_vanishing_temperature_is_greedy_not_nan(temperature):
    """Dividing logits by 5e-324 overflows to inf, and inf - inf is NaN: such temperatures sample greedily."""
    logits = np.random.default_rng(0).normal(size=(4, 30)) * 3
    with np.errstate(all="raise"):
        assert np.array_equal(drawing(Sampler(temperature=temperature, seed=1), len(logits))(logits), logits.argmax(-1))


def test_top_p_0_keeps_the_likeliest_token_alone():
    logits = np.random.default_rng(0).normal(size=(4, 30))
    assert np.array_equal(drawing(Sampler(temperature=1.5, top_p=0, seed=2), len(logits))(logits), logits.argmax(-1))


def test_temperature_zero_is_argmax():
    logits = random_logits(0)
    assert np.array_equal(drawing(Sampler(temperature=0), len(logits))(logits), logits.argmax(-1))


def test_same_seed_same_tokens_and_other_seed_differs():
    logits = random_logits(1, batch=64)
    first = drawing(Sampler(seed=7), len(logits))(logits)
    assert np.array_equal(first, drawing(Sampler(seed=7), len(logits))(logits))
    assert not np.array_equal(first, drawing(Sampler(seed=8), len(logits))(logits))


@pytest.mark.parametrize("seed", range(5))
def test_top_k_never_picks_a_filtered_token(seed):
    logits = random_logits(seed, batch=8)
    allowed = np.argsort(-logits, axis=-1)[:, :3]
    sampler = drawing(Sampler(temperature=2.0, top_k=3, seed=seed), len(logits))
    for _ in range(50):
        picked = sampler(logits)
        assert all(picked[row] in allowed[row] for row in range(len(picked)))


@pytest.mark.parametrize("seed", range(5))
def test_top_p_never_picks_outside_the_nucleus(seed):
    logits = random_logits(seed, batch=8)
    top_p = 0.6
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    sampler = drawing(Sampler(temperature=1.0, top_p=top_p, seed=seed), len(logits))
    for _ in range(50):
        picked = sampler(logits)
        for row, token in enumerate(picked):
            # a token is in the nucleus when the tokens likelier than it hold less than top_p
            assert probs[row][probs[row] > probs[row, token]].sum() < top_p


def reference_pick(row_logits, temperature, top_k, top_p, draw):
    """Inverse-CDF sampling written out plainly for one row: keep the top-k, then the smallest set of the
    likeliest holding top_p, renormalise, walk the vocabulary until the draw is covered. None: a boundary."""
    scaled = [value / temperature for value in row_logits]
    ranked = sorted(range(len(scaled)), key=lambda token: -scaled[token])[:top_k or len(scaled)]
    weights = {token: math.exp(scaled[token] - scaled[ranked[0]]) for token in ranked}
    total, kept, mass = sum(weights.values()), [], 0.0
    for token in ranked:
        if kept and top_p is not None and mass >= top_p:
            break
        kept.append(token)
        mass += weights[token] / total
    kept_total, cumulative = sum(weights[token] for token in kept), 0.0
    for token in sorted(kept):
        cumulative += weights[token] / kept_total
        if abs(cumulative - draw) < 1e-9:
            return None
        if cumulative > draw:
            return token
    return max(kept)


@pytest.mark.parametrize("top_k,top_p", [(None, None), (5, None), (None, 0.8), (12, 0.9)])
def test_every_row_of_a_batch_is_picked_as_written_out_by_hand(top_k, top_p):
    logits = random_logits(9, batch=6, vocab=40)
    draws = np.random.default_rng(10).random((50, 6))
    sampler = Sampler(temperature=0.7, top_k=top_k, top_p=top_p)
    for row_draws in draws:
        picked = sampler.pick(logits, row_draws)
        for row, (token, draw) in enumerate(zip(picked.tolist(), row_draws.tolist())):
            expected = reference_pick(logits[row].tolist(), 0.7, top_k, top_p, draw)
            assert expected in (None, token), f"row {row}, draw {draw}: picked {token}, expected {expected}"


def test_sampling_follows_the_distribution():
    logits = np.log(np.array([[0.7, 0.2, 0.1]]))
    sampler = drawing(Sampler(seed=0), 1)
    counts = np.bincount([sampler(logits)[0] for _ in range(4000)], minlength=3) / 4000
    assert np.allclose(counts, [0.7, 0.2, 0.1], atol=0.03)


@pytest.mark.parametrize("kwargs", [{"temperature": -1}, {"top_k": 0}, {"top_p": -0.1}, {"top_p": 1.5}])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(MiniGPTError):
        Sampler(**kwargs)


def test_draws_read_ahead_and_given_back_are_drawn_again():
    """Speculative sampling picks several positions with draws read ahead and gives back the unused ones."""
    streams, twins = Sampler(seed=4).streams(2), Sampler(seed=4).streams(2)
    ahead = read_draws([Continuation([1], Sampler(seed=4), stream, 5) for stream in streams], 5)
    assert ahead.tolist() == [[twin.random() for _ in range(5)] for twin in twins]
    give_back(streams[0], 3)
    give_back(streams[1], 0)
    assert streams[0].random() == ahead[0, 2] and streams[1].random() == twins[1].random()


@pytest.mark.parametrize("options", [dict(temperature=0.8), dict(temperature=1.3, top_k=7),
                                     dict(temperature=0.7, top_p=0.9), dict(temperature=1.0, top_k=20, top_p=0.5),
                                     dict(temperature=2.0, top_p=0.0), dict(temperature=0),
                                     dict(temperature=0.9, min_p=0.1), dict(temperature=1.2, top_p=0.8, min_p=0.3)])
@pytest.mark.parametrize("batch", [1, 5])
def test_the_fast_sampler_picks_what_the_plain_one_picks(options, batch):
    """The speed layer computes the plain sampler's numbers value for value: the same token for every draw,
    so a seed gives the same text whichever samples."""
    from minigpt.fast_sampling import FastSampler

    rng = np.random.default_rng(batch)
    plain, fast = Sampler(**options), FastSampler(**options)
    for _ in range(200):
        logits = (rng.normal(size=(batch, 40)) * rng.uniform(0.1, 6)).astype(np.float32)
        logits[:, rng.integers(0, 40, size=3)] = logits.max()  # ties, ranked as the plain sampler ranks them
        draws = rng.random(batch)
        assert plain.greedy or np.array_equal(plain.weights(logits), fast.weights(logits))
        assert fast.pick(logits, draws).tolist() == plain.pick(logits, draws).tolist()
