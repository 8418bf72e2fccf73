"""Speculative decoding changes nothing but the speed: k-token extends equal k decode steps on every engine,
and speculative text equals plain text for every engine and draft, greedy and sampled, across restarts."""

import functools
import random

import numpy as np
import pytest

from minigpt import load_checkpoint, save_checkpoint
from minigpt.cli import main
from minigpt.decoding import generate_rows
from minigpt.drafts import ContextDraft, NGramDraft, RowByRow
from minigpt.export.onnx_engine import OnnxEngine
from minigpt.rows import prefill
from minigpt.sampling import Sampler
from minigpt.speculative import SpeculativeStep as Speculator

BLOCK = 16  # the tiny model's block_size
PROMPT_LENGTHS = [1, 7, BLOCK, BLOCK + 7]  # rows fill up and restart at different steps
NEW_TOKENS = 2 * BLOCK + 3


class WrongDraft(RowByRow):
    """Guesses that are almost always wrong: verification must throw them all away."""

    name = "wrong"

    def propose(self, history, k, draws=None, sampler=None):
        return [(history[-1] + 7 + i) % 20 for i in range(k)]


class RightFor(WrongDraft):
    """Every guess right for a row whose text so far begins `right` (a prompt, then plain decoding's tokens), and
    wrong for any other; guesses that stop themselves, as the table's greedy ones (what a batch verifies)."""

    def __init__(self, right):
        self.right = right

    def stops_itself(self, sampler):
        return True

    def propose(self, history, k, draws=None, sampler=None):
        length = len(history)
        if list(history) == self.right[:length]:
            return self.right[length:length + k]
        return super().propose(history, k, draws, sampler)


def prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [list(rng.integers(0, 20, size=length)) for length in lengths]


def tokens(engine, rows, sampler, speculator=None, new_tokens=NEW_TOKENS):
    return np.stack(list(generate_rows(engine, rows, new_tokens, sampler, speculator)), axis=1).tolist()


@pytest.mark.parametrize("engine_name", ["recompute", "kv-cache", "kv-cache-triton", "onnx"])
def test_an_extend_of_k_tokens_equals_k_decode_steps_in_ragged_rows_and_rolls_back(make_engine, engine_name):
    rows, k = prompts([3, 7, 5]), 4
    new = np.random.default_rng(1).integers(0, 20, size=(3, k))

    def prefilled():
        engine = make_engine(engine_name)
        engine.start(3)
        for row, prompt in enumerate(rows):  # each row at its own length
            prefill(engine, np.array([prompt]), first_row=row)
        return engine, np.array([len(prompt) for prompt in rows])

    engine, lengths = prefilled()
    together = engine.extend(new, lengths).copy()
    stepwise, step_engine = [], prefilled()[0]
    for j in range(k):
        stepwise.append(step_engine.extend(new[:, j:j + 1], lengths + j)[:, 0].copy())
    np.testing.assert_allclose(together, np.stack(stepwise, axis=1), atol=2e-5, rtol=1e-5)
    # Roll every row back to 2 of the 4 new tokens and write two others: as if the first two were all.
    other = (new[:, 2:] + 1) % 20
    rolled = engine.extend(other, lengths + 2).copy()
    fresh = prefilled()[0]
    fresh.extend(new[:, :2], lengths)
    np.testing.assert_allclose(rolled, fresh.extend(other, lengths + 2), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("engine_name", ["recompute", "kv-cache", "onnx"])
@pytest.mark.parametrize("draft_name", ["ngram", "context", "wrong"])
def test_speculative_greedy_tokens_equal_plain_decoding(make_engine, tiny_loaded, engine_name, draft_name):
    draft = {"ngram": tiny_loaded.ngram_draft(), "context": ContextDraft(), "wrong": WrongDraft()}[draft_name]
    rows = prompts(PROMPT_LENGTHS)
    plain = tokens(make_engine(engine_name), rows, Sampler(temperature=0))
    speculator = Speculator(draft, max_tokens=4)
    assert tokens(make_engine(engine_name), rows, Sampler(temperature=0), speculator) == plain
    # One row at a time too: a batch decodes plainly where its guesses do not stop themselves (context, wrong).
    alone = [tokens(make_engine(engine_name), [row], Sampler(temperature=0), Speculator(draft, 4))[0] for row in rows]
    assert alone == plain
    assert speculator.steps < NEW_TOKENS or draft_name == "wrong"


@pytest.mark.parametrize("engine_name", ["kv-cache", "onnx"])
@pytest.mark.parametrize("options", [dict(temperature=0.8, top_p=0.95, seed=3), dict(temperature=1.3, top_k=5,
                                                                                    seed=11)])
def test_speculative_sampling_equals_plain_sampling_for_a_seed(make_engine, tiny_loaded, engine_name, options):
    rows = prompts([4, 4, 9], seed=2)
    plain = tokens(make_engine(engine_name), rows, Sampler(**options))
    for draft in (tiny_loaded.ngram_draft(), ContextDraft(), WrongDraft()):
        assert tokens(make_engine(engine_name), rows, Sampler(**options), Speculator(draft, 6)) == plain
        for row in rows:  # alone, each row draws from stream 0 of the seed
            alone = tokens(make_engine(engine_name), [row], Sampler(**options), Speculator(draft, 6))[0]
            assert alone == tokens(make_engine(engine_name), [row], Sampler(**options))[0]


@pytest.mark.parametrize("engine_name", ["kv-cache", "onnx"])
def test_a_draft_model_changes_nothing_but_the_speed(make_engine, engine_name):
    """A draft model (here the tiny model itself on another engine, so its guesses are nearly always right,
    and a second one with other weights) through ragged rows that restart past the block."""
    from minigpt.draft_model import ModelDraft

    rows = prompts(PROMPT_LENGTHS)
    for options in (dict(temperature=0), dict(temperature=0.8, top_p=0.95, seed=3)):
        plain = tokens(make_engine(engine_name), rows, Sampler(**options))
        speculator = Speculator(ModelDraft(make_engine("recompute")), max_tokens=4)
        assert tokens(make_engine(engine_name), rows, Sampler(**options), speculator) == plain
        for row in rows[:2]:
            alone = Speculator(ModelDraft(make_engine("kv-cache")), max_tokens=4)
            assert tokens(make_engine(engine_name), [row], Sampler(**options), alone)[0] == \
                tokens(make_engine(engine_name), [row], Sampler(**options))[0]
    # The model as its own draft guesses the model's own greedy text (the cache caught up a token or a few at a
    # time, and restarted from a fresh history).
    prompt = rows[1]
    text = tokens(make_engine(engine_name), [prompt], Sampler(temperature=0), new_tokens=8)[0]
    draft = ModelDraft(make_engine("kv-cache"))
    for done in (1, 2, 4, 1):
        assert draft.propose_rows([np.array(prompt + text[:done])], [4]) == [text[done:done + 4]]


def verify_steps(schedule, steps, kept, seconds):
    """Run `steps` made-up verify steps, each keeping `kept(k)` of its k guesses in `seconds(k)`; return the ks."""
    ks = []
    for _ in range(steps):
        k, _ = schedule.choose_k()
        assert k >= 1
        ks.append(k)
        schedule.settle([[1] * k], [kept(k)], seconds(k))
    return ks


def timed_schedule(most):
    """A schedule past its yardstick: two plain steps of 100 us."""
    from minigpt.speculative import Schedule

    schedule = Schedule(most)
    assert schedule.choose_k() == schedule.choose_k() == (0, 1)  # plain steps first, for the yardstick
    schedule.record(0, 100e-6)
    assert schedule.choose_k() == (0, 1)  # the first may have built a binding: one more
    schedule.record(0, 100e-6)
    return schedule


def test_k_grows_while_every_guess_is_kept_shrinks_after_a_miss_and_stays_within_its_bounds():
    """Step times as measured on the default model: a plain step ~100 us, verifying k guesses ~130 + 10k us."""
    most = 12
    schedule = timed_schedule(most)
    step_time = dict(seconds=lambda k: 130e-6 + 10e-6 * k)
    kept_all = verify_steps(schedule, 8, kept=lambda k: k, **step_time)
    assert all(later > earlier for earlier, later in zip(kept_all, kept_all[1:]) if earlier < most)  # grows
    assert kept_all[-1] == most and max(kept_all) == most  # up to the most, never past it
    missed = verify_steps(schedule, 4, kept=lambda k: 0, **step_time)
    assert all(later < earlier for earlier, later in zip(missed, missed[1:]))  # shrinks after each miss
    for _ in range(2 * most):  # and never below one guess
        schedule.settle([[1] * schedule.k], [0], 1e-6)
    assert schedule.k == 1


def test_a_draft_that_does_not_pay_gives_way_to_plain_stretches_and_is_tried_again_less_often():
    from minigpt.speculative import PLAIN_STRETCH

    schedule = timed_schedule(8)
    stretches, gaps = 0, []  # plain stretches before each probe (a probe guesses one token at a time)
    while len(gaps) < 3:
        k, plain = schedule.choose_k()
        if k == 0:
            assert plain == PLAIN_STRETCH
            stretches += 1
            continue
        if stretches:
            assert k == 1
            gaps.append(stretches)
            stretches = 0
        schedule.settle([[1] * k], [0], 130e-6)  # one token for 1.3 plain steps' time
    assert gaps[0] >= 1 and gaps[1] > gaps[0] and gaps[2] > gaps[1]
    # A probe whose guesses are kept (two tokens for 1.3 plain steps' time) goes on guessing, k growing.
    while schedule.choose_k() != (1, 1):
        pass
    schedule.settle([[1]], [1], 130e-6)
    ks = verify_steps(schedule, 6, kept=lambda k: k, seconds=lambda k: 130e-6)
    assert ks == sorted(ks) and ks[-1] == 8 and ks[0] < 8


def test_guesses_that_stop_themselves_may_run_to_the_most_a_step_verifies(make_engine):
    """A draft that stops where it is unsure (the n-gram table's greedy guesses) is asked for up to max_tokens
    guesses for a row alone, not the schedule's k; guesses with no stop of their own (sampled ones), and every
    guess in a batch (each row pays for the longest), start at FIRST_GUESSES; in a batch, guesses with no stop of
    their own are not asked for at all. The text is the same either way."""
    from minigpt.speculative import FIRST_GUESSES

    class Asked(WrongDraft):
        def __init__(self):
            self.asked = []

        def stops_itself(self, sampler):
            return sampler.greedy

        def propose(self, history, k, draws=None, sampler=None):
            self.asked.append(k)
            return super().propose(history, k, draws, sampler)

    greedy, sampled = dict(temperature=0), dict(temperature=0.8, seed=1)
    for options, rows, first_asked in ((greedy, [1], [FIRST_GUESSES + 3]), (sampled, [1], [FIRST_GUESSES]),
                                       (greedy, [1, 3], [FIRST_GUESSES] * 2), (sampled, [1, 3], [])):
        draft = Asked()
        guessed = tokens(make_engine("onnx"), prompts(rows), Sampler(**options),
                         Speculator(draft, FIRST_GUESSES + 3), new_tokens=8)
        assert draft.asked[:len(rows)] == first_asked
        assert guessed == tokens(make_engine("onnx"), prompts(rows), Sampler(**options), new_tokens=8)


@pytest.mark.parametrize("engine_name", ["kv-cache", "onnx"])
def test_a_row_that_has_all_its_tokens_leaves_the_batch(make_engine, engine_name):
    """A row whose guesses are all right finds its tokens long before a row whose guesses are all wrong; it
    leaves the batch then, rather than decoding on to the end of the block and restarting there for tokens
    nobody asked for. The text is plain decoding's."""
    rows, new = prompts([1, 2, 2]), BLOCK - 3  # no row needs more than the block: no restart is needed
    plain = tokens(make_engine(engine_name), rows, Sampler(temperature=0), new_tokens=new)
    first_row_right = functools.partial(RightFor, rows[0] + plain[0])
    engine = make_engine(engine_name)
    calls = []
    extend = engine.extend

    def recorded(ids, start_pos, first_row=0, last_only=False):
        calls.append((len(ids), np.asarray(start_pos).tolist()))
        return extend(ids, start_pos, first_row, last_only)

    engine.extend = recorded
    assert tokens(engine, rows, Sampler(temperature=0), Speculator(first_row_right(), 4), new) == plain
    prefills = [count for count, starts in calls if 0 in starts]
    assert prefills == [1, 2]  # the prompts (by length) and never a restart
    assert calls[-1][0] < len(rows)  # the last steps ran without the row that was done
    calls.clear()  # one new token each: the prefill's, and no step after it
    assert tokens(engine, rows, Sampler(temperature=0), Speculator(first_row_right(), 4), 1) == \
        [row[:1] for row in plain]
    assert all(0 in starts for _, starts in calls)


def test_a_stream_by_step_hands_out_each_steps_positions_together(make_engine):
    """by_step yields what a step found as one piece (a (rows, n) array of ids, a list of n positions' texts), so
    that a stream is written once a step; together they are the stream a position at a time."""
    from minigpt.text import stream_characters

    engine, greedy = make_engine("onnx"), Sampler(temperature=0)
    prompt, new = "the ", BLOCK - 5
    ids = engine.tokenizer.encode(prompt)
    plain = tokens(engine, [ids], greedy, new_tokens=new)
    draft = RightFor(ids + plain[0])
    blocks = list(generate_rows(engine, [ids], new, greedy, Speculator(draft, 4), by_step=True))
    assert np.concatenate(blocks, axis=1).tolist() == plain
    assert max(block.shape[1] for block in blocks) == 5  # four right guesses and the model's own pick
    texts = list(stream_characters(engine, engine.tokenizer, prompt, new, step=Speculator(draft, 4), by_step=True,
                                   temperature=0))
    assert [len(found) for found in texts] == [block.shape[1] for block in blocks]
    assert [position for found in texts for position in found] == \
        list(stream_characters(engine, engine.tokenizer, prompt, new, temperature=0))


def test_a_draft_with_nothing_to_guess_decodes_plainly(make_engine):
    """Asking costs time too: a draft that has nothing to say is judged as one that does not pay, and is asked
    again only now and then."""
    class Silent(RowByRow):
        name = "silent"
        asked = 0

        def propose(self, history, k, draws=None, sampler=None):
            self.asked += 1
            return []

    draft = Silent()
    speculator = Speculator(draft, max_tokens=8)
    rows = prompts([5])
    assert tokens(make_engine("onnx"), rows, Sampler(temperature=0), speculator, 60) == \
        tokens(make_engine("onnx"), rows, Sampler(temperature=0), new_tokens=60)
    assert speculator.steps == 0 and speculator.plain_steps == 59  # every step after the first a plain one
    assert draft.asked < 10


def test_the_ngram_table_predicts_its_own_text():
    text = np.array([0, 1, 2, 3] * 50 + [0, 1, 2, 4], dtype=np.uint8)
    draft = NGramDraft.build(text, vocab_size=5, order=3)
    assert draft.propose([3, 0, 1], 4) == [2, 3, 0, 1]  # "0 1" is followed by 2 far more often than by 4
    assert draft.propose([4], 2) == []  # 4 is never followed by anything: no guess
    again = NGramDraft.from_metadata(draft.metadata())
    assert again.table == draft.table and again.order == 3


def test_model_picks_are_the_models_own_greedy_next_characters_window_by_window(tiny_loaded):
    import torch

    from minigpt.draft_table import model_picks

    model = tiny_loaded.model
    text = np.random.default_rng(3).integers(0, 20, size=3 * BLOCK + 5)
    picks, likely, chances = model_picks(model, text, torch.device("cpu"))
    assert len(picks) == len(likely) == len(chances) == 3 * BLOCK + 1 and picks[0] == text[0]  # whole windows
    for window in range(3):
        read = torch.from_numpy(text[window * BLOCK:(window + 1) * BLOCK])[None]
        with torch.no_grad():
            probabilities = torch.softmax(model(read)[0][0], dim=-1).numpy()
        said = slice(window * BLOCK + 1, (window + 1) * BLOCK + 1)
        assert (picks[said] == probabilities.argmax(-1)).all()
        np.testing.assert_allclose(chances[said], np.take_along_axis(probabilities, likely[said], 1), rtol=1e-5)
        assert (np.diff(chances[said], axis=1) <= 0).all()  # likeliest first
    short_picks, short_likely, short_chances = model_picks(model, text[:BLOCK], torch.device("cpu"))
    assert (short_picks == text[:BLOCK]).all() and (short_likely[:, 0] == text[:BLOCK]).all()  # too short: the
    assert (short_chances[:, 0] == 1).all() and model.training is False                         # text, certain


def test_a_finished_run_stores_the_table_of_its_models_picks_which_guesses_the_model_better(tiny_loaded,
                                                                                          make_engine):
    """The stored table counts the model's own picks: it guesses the model's greedy text further than the
    same table counting the text's characters."""
    from minigpt.data import load_corpus

    train_ids = load_corpus(tiny_loaded.metadata["data"]).split("train")
    stored = tiny_loaded.ngram_draft()
    of_text = NGramDraft.build(train_ids, tiny_loaded.tokenizer.vocab_size, stored.order)
    of_text.confident = stored.confident
    assert stored.table.keys() <= of_text.table.keys() and stored.next_ids.tolist() != of_text.next_ids.tolist()
    rows = [train_ids[start:start + 5].tolist() for start in range(0, 400, 40)]
    text = [row + out for row, out in zip(rows, tokens(make_engine("kv-cache"), rows, Sampler(temperature=0)))]

    def guessed(draft):  # tokens a verify step would emit, every step of every row
        emitted = []
        for row in text:
            at = 4
            while at < len(row) - 1:
                guesses = draft.propose(np.array(row[:at + 1]), 8)
                kept = next((i for i, (g, t) in enumerate(zip(guesses, row[at + 1:])) if g != t), len(guesses))
                emitted.append(1 + kept)
                at += 1 + kept
        return np.mean(emitted)

    assert guessed(stored) > guessed(of_text) + 0.2, (guessed(stored), guessed(of_text))


def test_the_ngram_table_stops_guessing_once_its_guesses_are_unlikely_all_to_be_right():
    from minigpt.drafts import CONFIDENT

    text = np.array(([0, 1, 2] * 3 + [0, 1, 3] * 2) * 20, dtype=np.uint8)  # "0 1" is followed by 2 3 times in 5
    draft = NGramDraft.build(text, vocab_size=4, order=2)
    assert 0.6 ** 3 < CONFIDENT <= 0.6 ** 2
    assert draft.propose([0], 8) == [1, 2, 0, 1, 2, 0, 1]  # a third "2" would make it 0.6 ** 3 likely
    assert draft.propose([2], 8) == [0, 1, 2, 0, 1, 2, 0, 1]  # two "2"s in 8 guesses (0.36): all 8


def test_a_trained_checkpoint_carries_its_table_into_the_onnx_export(tiny_loaded, tiny_onnx):
    ngram = tiny_loaded.ngram_draft()
    assert ngram is not None and len(ngram.table) > 20
    assert OnnxEngine(tiny_onnx).ngram_draft().table == ngram.table


def test_generate_warms_up_for_its_step_and_reports_only_the_printed_texts_steps(tiny_onnx, capsys):
    """generate warms up on the same prompt first: the warm-up takes the yardstick's plain steps for the run's
    step, which then guesses from its first step on, and the report counts only the printed text's steps."""
    from minigpt.speculative import TIMED_PLAIN_STEPS

    new = TIMED_PLAIN_STEPS + 1  # a fresh step would find these by the prefill and the yardstick's plain steps
    assert main(["generate", "--model", str(tiny_onnx), "--prompt", "the ", "--max-new-tokens", str(new),
                 "--draft", "ngram", "--temperature", "0"]) == 0
    err = capsys.readouterr().err
    assert f"{new} new tokens" in err and "a verify step" in err, err


def test_generate_prints_the_same_text_with_every_draft(tiny_checkpoint, tiny_onnx, tmp_path, capsys, cli_error):
    outputs = []
    for model in (["--checkpoint", str(tiny_checkpoint)], ["--model", str(tiny_onnx)]):
        for draft in ("none", "auto", "ngram", "context"):
            argv = ["generate", *model, "--prompt", "the ", "--max-new-tokens", "60", "--draft", draft]
            for sampling in (["--temperature", "0"], ["--temperature", "0.9", "--top-p", "0.9", "--seed", "5"]):
                assert main(argv + sampling) == 0
                out, err = capsys.readouterr()
                outputs.append((tuple(sampling), out))
                assert ("tokens per step" in err) == (draft != "none"), err
    by_sampling = {}
    for sampling, out in outputs:
        by_sampling.setdefault(sampling, set()).add(out)
    assert all(len(texts) == 1 for texts in by_sampling.values()), by_sampling
    # A checkpoint saved without a table (as before minigpt stored one) speculates from the context instead.
    old = tmp_path / "old.safetensors"
    save_checkpoint(old, load_checkpoint(tiny_checkpoint).model, load_checkpoint(tiny_checkpoint).tokenizer)
    assert main(["generate", "--checkpoint", str(old), "--prompt", "the ", "--temperature", "0"]) == 0
    assert "context draft" in capsys.readouterr().err
    cli_error(["generate", "--checkpoint", str(old), "--draft", "ngram"], "no n-gram draft table", "--draft context")
    cli_error(["generate", "--checkpoint", str(old), "--draft-tokens", "0"],
              "--draft-tokens: must be an integer from 1 to 64")


def test_generate_with_a_draft_model_file(tiny_checkpoint, tiny_onnx, tmp_path, capsys, cli_error, tiny_text_file):
    from minigpt.config import TrainConfig
    from minigpt.data import load_corpus
    from minigpt.train import train

    small = tmp_path / "small.safetensors"  # one layer, trained on the same text: the same characters
    train(load_corpus(tiny_text_file), TrainConfig(batch_size=8, steps=10, eval_interval=10, eval_iters=1,
                                                   warmup=2, device="cpu"),
          small, progress=False, block_size=16, embed_dim=16, num_heads=2, num_layers=1)
    for model in (["--checkpoint", str(tiny_checkpoint)], ["--model", str(tiny_onnx)]):
        texts = []
        for draft in ("none", str(small)):
            assert main(["generate", *model, "--prompt", "the ", "--max-new-tokens", "40", "--temperature", "0",
                         "--draft", draft]) == 0
            out, err = capsys.readouterr()
            texts.append(out)
        assert texts[0] == texts[1] and "model draft" in err, err
    other = tmp_path / "other.txt"
    other.write_text("0123456789 " * 200, encoding="utf-8")
    stranger = tmp_path / "stranger.safetensors"
    train(load_corpus(other), TrainConfig(batch_size=4, steps=2, eval_interval=2, eval_iters=1, warmup=1,
                                          device="cpu"), stranger, progress=False, block_size=16, embed_dim=16,
          num_heads=2, num_layers=1)
    capsys.readouterr()
    cli_error(["generate", "--checkpoint", str(tiny_checkpoint), "--draft", str(stranger)],
              "other tokens than the model", "--draft ngram")
    cli_error(["generate", "--checkpoint", str(tiny_checkpoint), "--draft", "small"],
              "--draft", ".safetensors or .onnx file")
    cli_error(["generate", "--checkpoint", str(tiny_checkpoint), "--draft", str(tmp_path / "missing.onnx")],
              "missing.onnx")


def test_sampling_the_ngram_table_guesses_what_the_row_will_sample():
    """With the row's next draws, a guess is what the row's sampler picks from the context's counts (taken as
    probabilities, with the sampler's temperature, top-k and top-p, by the same inverse CDF); greedy, the most
    frequent next character."""
    text = np.array([0, 1, 2] * 6 + [0, 1, 3] * 4 + [1, 4, 0, 1, 5], dtype=np.uint8)
    draft = NGramDraft.build(text, vocab_size=6, order=2)
    after = [4, 0, 1]  # "0 1" is followed by 2 six times, by 3 four times, by 5 once

    def guess(draw, **options):
        return draft.propose(after, 1, np.array([draw]), Sampler(**options))[0]

    assert draft.propose(after, 1) == [2] == draft.propose(after, 1, np.array([0.99]), Sampler(temperature=0))
    assert [guess(draw) for draw in (0.5, 0.6, 0.95)] == [2, 3, 5]  # 6/11, 10/11 of the mass: vocabulary order
    assert guess(0.6, temperature=0.5) == 2  # colder: 2 holds 36/53 of the mass
    assert guess(0.95, top_p=0.6) == 3 and guess(0.95, top_k=1) == 2  # filtered as the sampler filters
    counts = np.array([0, 0, 6, 4, 0, 1], dtype=np.float64)
    rng = np.random.default_rng(0)
    for options in (dict(temperature=1.0), dict(temperature=0.7, top_p=0.9), dict(temperature=1.6, top_k=2)):
        sampler = Sampler(**options)
        for draw in rng.random(50):
            expected = int(sampler.pick(np.log(np.maximum(counts, 1e-30))[None], np.array([draw]))[0])
            assert guess(draw, **options) == expected, (options, draw)
    # A table stored before counts were (its most frequent next characters alone) guesses those, sampling too.
    old = NGramDraft.from_tensors({"draft.ngram.keys": draft.keys, "draft.ngram.next": draft.next_ids}, {"order": 2}, 6)
    assert old.propose(after, 1, np.array([0.95]), Sampler()) == [2]
    again = NGramDraft.from_metadata(draft.metadata())
    assert [again.propose(after, 1, np.array([draw]), Sampler()) for draw in (0.5, 0.6, 0.95)] == [[2], [3], [5]]


def test_a_draft_model_guesses_what_a_sampling_row_will_sample(make_engine):
    """The model as its own draft, sampling: it picks from (the same) logits with the row's own draws, so
    nearly every guess is kept, at a temperature where its greedy guess would often be wrong."""
    from minigpt.draft_model import ModelDraft

    rows = prompts([6])
    options = dict(temperature=1.0, seed=4)
    speculator = Speculator(ModelDraft(make_engine("recompute")), max_tokens=4)
    assert tokens(make_engine("kv-cache"), rows, Sampler(**options), speculator) == \
        tokens(make_engine("kv-cache"), rows, Sampler(**options))
    assert speculator.tokens / speculator.steps > 4, speculator.report()  # of 5 at most; its greedy guesses: ~1.3


def test_the_ngram_tables_sampling_distributions_stay_few(monkeypatch):
    """A long-running server meets ever more contexts and sampler settings: what the table keeps for them is
    bounded."""
    import minigpt.drafts

    monkeypatch.setattr(minigpt.drafts, "MADE_DISTRIBUTIONS", 3)
    monkeypatch.setattr(minigpt.drafts, "RECENT_SETTINGS", 2)
    rng = np.random.default_rng(0)
    draft = NGramDraft.build(rng.integers(0, 6, size=3000), vocab_size=6, order=3)
    for temperature in (0.5, 0.7, 0.9):
        for start in range(40):
            draft.propose(rng.integers(0, 6, size=5), 3, rng.random(3), Sampler(temperature=temperature))
    assert len(draft._distributions) == 2 and all(len(made) <= 3 for made in draft._distributions.values())


def test_the_end_of_a_run_reads_a_share_of_what_it_trained_on(tmp_path, monkeypatch):
    """The finished model reads part of the text for its draft table: a short experiment's end stays short."""
    import minigpt.draft_table as draft_table
    from minigpt.config import TrainConfig
    from minigpt.data import load_corpus
    from minigpt.train import train

    read, model_picks = [], draft_table.model_picks
    monkeypatch.setattr(draft_table, "model_picks", lambda model, ids, device: read.append(len(ids)) or
                        model_picks(model, ids, device))
    text = tmp_path / "text.txt"
    text.write_text("".join(random.Random(0).choice("abcdefgh \n") for _ in range(60_000)), encoding="utf-8")
    for steps in (1, 40):
        train(load_corpus(text), TrainConfig(batch_size=16, steps=steps, eval_interval=steps, eval_iters=1, warmup=1,
                                             device="cpu"), tmp_path / f"{steps}.safetensors", progress=False,
              block_size=64, embed_dim=16, num_heads=2, num_layers=1)
    tokens_per_step = 16 * 64
    assert read == [draft_table.MIN_DISTILLED, 40 * tokens_per_step // draft_table.DISTILLED_SHARE]
    assert read[0] < read[1] <= draft_table.DISTILLED_CHARACTERS
