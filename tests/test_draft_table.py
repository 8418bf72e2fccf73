"""The n-gram table a training run saves: how long a context it reads and how sure its guesses must be."""

import numpy as np
import pytest

from minigpt import Sampler
from minigpt.draft_table import CONFIDENCES, ORDERS, WRITTEN_TOKEN_COST, choose_settings, speculation_cost
from minigpt.drafts import NGramDraft
from minigpt.export.onnx_engine import OnnxEngine
from minigpt.settings import DRAFT_TOKENS


def test_a_shortened_table_guesses_as_one_built_with_that_context_length():
    text = np.random.default_rng(0).integers(0, 5, 3_000)
    long, short = NGramDraft.build(text, vocab_size=5, order=5), NGramDraft.build(text, vocab_size=5, order=2)
    shortened = long.shortened(2, 0.45)
    assert shortened.settings() == {"order": 2, "confident": 0.45}
    assert shortened.table == short.table and len(shortened.keys) < len(long.keys)
    short.confident, sampler, draws = 0.45, Sampler(temperature=0.8, top_p=0.95), np.full(8, 0.3)
    for start in range(0, 300, 7):
        history = text[start:start + 9]
        assert shortened.propose(history, 8) == short.propose(history, 8)
        assert shortened.propose(history, 8, draws, sampler) == short.propose(history, 8, draws, sampler)


def test_speculation_cost_counts_the_steps_and_the_tokens_they_write():
    text = [0, 1, 2] * 10
    right = NGramDraft.build(np.array(text), vocab_size=3, order=2)  # every guess sure and right
    # One step: the pending text[3] and DRAFT_TOKENS guesses, of which the 26 the text still has are kept.
    assert speculation_cost(right, [text], 3) == pytest.approx(1 + WRITTEN_TOKEN_COST * (1 + DRAFT_TOKENS))
    wrong = NGramDraft.build(np.array([0, 2, 1] * 10), vocab_size=3, order=2)  # every first guess wrong
    guesses = len(wrong.propose(np.array(text[:4]), DRAFT_TOKENS))
    # A step for each of positions 3 .. 28, each keeping nothing.
    assert speculation_cost(wrong, [text], 3) == pytest.approx(26 * (1 + WRITTEN_TOKEN_COST * (1 + guesses)))


def test_a_trained_table_chose_its_settings_and_keeps_them_in_the_checkpoint_and_the_graph(tiny_loaded, tiny_onnx):
    table = tiny_loaded.ngram_draft()
    assert table.order in ORDERS and table.confident in CONFIDENCES
    assert OnnxEngine(tiny_onnx).ngram_draft().settings() == table.settings()


def test_a_validation_split_too_short_to_prompt_from_leaves_the_table_as_it_is(tiny_loaded):
    table = tiny_loaded.ngram_draft()
    assert choose_settings(table, tiny_loaded.model, np.array([1, 2], dtype=np.int64)) is table


def test_a_table_of_shorter_contexts_than_the_tried_lengths_still_chooses(tiny_loaded):
    """A large vocabulary packs fewer characters of context into a key (`max_order`): the table chooses among
    the lengths it holds."""
    from minigpt.data import load_corpus

    corpus = load_corpus(tiny_loaded.metadata["data"])
    table = NGramDraft.build(corpus.split("train"), tiny_loaded.tokenizer.vocab_size, order=min(ORDERS) - 1)
    chosen = choose_settings(table, tiny_loaded.model, corpus.split("valid"))
    assert chosen.order == table.order and chosen.confident in CONFIDENCES
