"""Every sampling control against an implementation written here from its reference's definition: the sampler's
greedy pick is the expected distribution's argmax, and seeded samples pass a chi-square test against it."""

import math

import numpy as np
import pytest
from scipy.stats import chisquare

from minigpt.controls import make_sampler
from minigpt.decoding import Continuation, pick
from minigpt.errors import ConfigError
from minigpt.tokenizer import CharTokenizer

TOKENIZER = CharTokenizer("abcdefgh")
V = TOKENIZER.vocab_size
PROMPT, OUTPUT = [0, 1, 1], [2, 2, 2, 3, 0]  # "abb", then "cccda"
DRAWS = 20_000


def softmax(x):
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x[np.isfinite(x)].max())
    return e / e.sum()


def repetition(logits, penalty):  # HuggingFace's RepetitionPenaltyLogitsProcessor, over prompt + output
    out = logits.astype(np.float64).copy()
    for token in set(PROMPT + OUTPUT):
        out[token] = out[token] * penalty if out[token] < 0 else out[token] / penalty
    return out


def frequency_presence(logits, frequency, presence):  # OpenAI's formula, over the output
    counts = np.bincount(OUTPUT, minlength=V)
    return logits - counts * frequency - (counts > 0) * presence


def bias(logits, biases):  # OpenAI's logit_bias: added
    out = logits.astype(np.float64).copy()
    for token, value in biases.items():
        out[token] += value
    return out


def min_p_filter(probs, min_p):  # llama.cpp / vLLM / HuggingFace: below min_p times the likeliest's probability
    kept = np.where(probs < min_p * probs.max(), 0.0, probs)
    return kept / kept.sum()


def only(logits, allowed):  # a pattern: the tokens it does not allow are impossible
    out = np.full(V, -np.inf)
    out[allowed] = logits[allowed]
    return out


LOGITS = np.array([1.5, -0.5, 2.0, 0.3, -1.2, 0.9, 1.1, -2.0], dtype=np.float32)
CASES = {  # settings -> the expected probabilities at temperature 1 (and the text "abb" + "cccda" so far)
    "min_p": ({"min_p": 0.3}, lambda x: min_p_filter(softmax(x), 0.3)),
    "repetition_penalty": ({"repetition_penalty": 1.8}, lambda x: softmax(repetition(x, 1.8))),
    "repetition_below_1": ({"repetition_penalty": 0.5}, lambda x: softmax(repetition(x, 0.5))),
    "frequency_presence": ({"frequency_penalty": 0.7, "presence_penalty": 0.4},
                           lambda x: softmax(frequency_presence(x, 0.7, 0.4))),
    "negative_penalties": ({"frequency_penalty": -0.5, "presence_penalty": -1.0},
                           lambda x: softmax(frequency_presence(x, -0.5, -1.0))),
    "logit_bias": ({"logit_bias": {2: -100, 4: 3.5}}, lambda x: softmax(bias(x, {2: -100, 4: 3.5}))),
    # "cccda" then the regex's next character: after "a" it allows b, e or h
    "regex": ({"regex": "cccda(b|e+|h)g"}, lambda x: softmax(only(x, [1, 4, 7]))),
    "choices": ({"choices": ["cccdaf", "cccdag", "abc"]}, lambda x: softmax(only(x, [5, 6]))),
    "everything": ({"repetition_penalty": 1.3, "frequency_penalty": 0.2, "presence_penalty": 0.1,
                    "logit_bias": {6: 2.0}, "regex": "cccda[a-g]", "min_p": 0.05, "top_k": 5},
                   lambda x: top_k(min_p_filter(softmax(only(bias(frequency_presence(repetition(x, 1.3), 0.2, 0.1),
                                                                  {6: 2.0}), range(7))), 0.05), 5)),
}


def top_k(probs, k):
    kept = np.where(probs >= np.sort(probs)[-k], probs, 0.0)
    return kept / kept.sum()


def sequence(sampler, seed_stream=None):
    stream = sampler.streams(1)[0]
    return Continuation(list(PROMPT), sampler, stream, max_new_tokens=100, tokens=list(OUTPUT))


@pytest.mark.parametrize("case", CASES)
def test_greedy_pick_is_the_expected_argmax(case):
    settings, expected = CASES[case]
    sampler = make_sampler(TOKENIZER, temperature=0, **settings)
    assert sampler.reads_text == (set(settings) - {"min_p", "top_k"} != set())
    assert pick(LOGITS[None], [sequence(sampler)])[0] == np.argmax(expected(LOGITS))


@pytest.mark.parametrize("case", CASES)
def test_seeded_samples_follow_the_expected_distribution(case):
    settings, expected = CASES[case]
    probs = expected(LOGITS)
    sampler = make_sampler(TOKENIZER, temperature=1.0, seed=7, **settings)
    rows = [sequence(sampler)] * DRAWS  # one sequence's text, read afresh for each of many draws
    draws = np.random.default_rng(11).random(DRAWS)
    picked = pick(np.repeat(LOGITS[None], DRAWS, axis=0), rows, draws)
    counts = np.bincount(picked, minlength=V)
    assert (counts[probs == 0] == 0).all(), "a token the control rules out was sampled"
    kept = probs > 0
    assert chisquare(counts[kept], probs[kept] * DRAWS).pvalue > 1e-4, (counts, probs * DRAWS)


def test_the_penalties_read_guesses_ahead_as_text():
    """A verify's position j reads the row's text plus its first j guesses: exactly the text plain decoding
    would have there."""
    sampler = make_sampler(TOKENIZER, temperature=0, frequency_penalty=1.5, regex="cccda[a-h]*")
    ahead = [5, 5]
    longer = Continuation(list(PROMPT), sampler, None, 100, tokens=OUTPUT + ahead)
    guessed, written = LOGITS.copy(), LOGITS.copy()
    sampler.adjust(guessed, sequence(sampler), ahead)
    sampler.adjust(written, longer)
    assert np.array_equal(guessed, written)


def test_a_sampler_with_no_control_on_is_the_plain_one():
    sampler = make_sampler(TOKENIZER, temperature=0.5, min_p=0.1, repetition_penalty=1.0, logit_bias={})
    assert not sampler.reads_text and sampler.min_p == 0.1


@pytest.mark.parametrize("settings,fragment", [
    ({"min_p": 1.5}, "min_p must be a number from 0 to 1"),
    ({"min_p": math.nan}, "min_p must be a number from 0 to 1"),
    ({"repetition_penalty": 0}, "repetition_penalty must be a number above 0 and at most 2"),
    ({"repetition_penalty": math.inf}, "repetition_penalty must be a number above 0"),
    ({"presence_penalty": 2.5}, "presence_penalty must be a number from -2 to 2"),
    ({"frequency_penalty": math.nan}, "frequency_penalty must be a number from -2 to 2"),
    ({"logit_bias": {V: 1.0}}, "token ids from 0 to 7"),
    ({"logit_bias": {0: 101}}, "a number from -100 to 100"),
    ({"logit_bias": {0: math.nan}}, "a number from -100 to 100"),
    ({"regex": "a("}, "not a valid regular expression"),
    ({"regex": "a(?=b)"}, "lookarounds and backreferences"),
    ({"regex": "z+"}, "cannot be written with this model's tokens"),
    ({"choices": []}, "non-empty list"),
    ({"json_schema": "{not json"}, "not a JSON schema"),
    ({"regex": "a", "choices": ["b"]}, "give one pattern"),
    ({"regex": "a" * 5000}, "more than the 4,096 allowed"),
])
def test_bad_settings_are_one_clear_error(settings, fragment):
    with pytest.raises(ConfigError, match=None) as error:
        make_sampler(TOKENIZER, **settings)
    assert fragment in str(error.value) and "\n" not in str(error.value)
