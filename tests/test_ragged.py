"""Ragged batches: rows at different lengths, on every engine, give each row's own tokens."""

import numpy as np
import pytest

from minigpt.cli import main
from minigpt.decoding import generate_rows
from minigpt.rows import Rows, prefill
from minigpt.errors import MiniGPTError
from minigpt.generation import KVCacheEngine
from minigpt.sampling import Sampler

BLOCK = 16  # TINY_MODEL's block_size
# One token, a few, exactly a block, and longer than a block: rows fill up and restart at different steps.
PROMPT_LENGTHS = [1, 7, BLOCK, BLOCK + 7]
NEW_TOKENS = 2 * BLOCK + 3


def prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [list(rng.integers(0, 20, size=length)) for length in lengths]


def greedy(engine, rows, new_tokens=NEW_TOKENS):
    steps = list(generate_rows(engine, rows, new_tokens, Sampler(temperature=0)))
    return np.stack(steps, axis=1).tolist()  # (rows, new_tokens)


@pytest.mark.slow
@pytest.mark.parametrize("engine_name", ["recompute", "kv-cache", "kv-cache-triton", "onnx"])
def test_each_row_of_a_ragged_batch_equals_that_row_alone(make_engine, engine_name):
    # The interpreter is slow: fewer rows and steps for Triton, still crossing a restart.
    lengths, new_tokens = (PROMPT_LENGTHS, NEW_TOKENS) if engine_name != "kv-cache-triton" else ([3, BLOCK], 6)
    rows = prompts(lengths)
    engine = make_engine(engine_name)
    together = greedy(engine, rows, new_tokens)
    alone = [greedy(engine, [row], new_tokens)[0] for row in rows]
    assert together == alone
    reference = greedy(make_engine("recompute"), rows, new_tokens)
    assert together == reference  # and every engine gives the same tokens


@pytest.mark.parametrize("engine_name", ["kv-cache", "onnx"])
def test_a_row_joins_a_running_batch_and_rows_decode_as_a_prefix(make_engine, engine_name):
    """Two rows decode; a third is prefilled into row 2 mid-run; each row still gives its own tokens."""
    engine = make_engine(engine_name)
    first, joiner = prompts([5, 5], seed=1), prompts([9], seed=2)[0]
    expected_first = greedy(engine, first, 10)
    expected_joiner = greedy(engine, [joiner], 5)[0]

    engine.start(3)
    tokens = [[], [], []]
    lengths = np.array([5, 5])
    logits = prefill(engine, np.array(first))
    for _ in range(5):  # only rows 0 and 1 decode: row 2 is empty
        ids = logits.argmax(-1)
        for row, token in enumerate(ids):
            tokens[row].append(int(token))
        logits = engine.extend(ids[:, None], lengths)[:, 0]
        lengths += 1
    first_logits = logits.copy()
    joined = prefill(engine, np.array([joiner]), first_row=2)
    logits = np.concatenate([first_logits, joined])
    lengths = np.append(lengths, len(joiner))
    for _ in range(5):
        ids = logits.argmax(-1)
        for row, token in enumerate(ids):
            tokens[row].append(int(token))
        logits = engine.extend(ids[:, None], lengths)[:, 0]
        lengths += 1
    assert tokens[:2] == expected_first
    assert tokens[2] == expected_joiner


@pytest.mark.parametrize("engine_name", ["recompute", "kv-cache", "onnx"])
def test_prefill_outside_the_batch_or_past_the_block_is_a_clear_error(make_engine, engine_name):
    engine = make_engine(engine_name)
    engine.start(2)
    with pytest.raises(MiniGPTError, match="outside the batch"):
        prefill(engine, np.zeros((2, 3), dtype=np.int64), first_row=1)
    with pytest.raises(MiniGPTError, match="exceed block_size"):
        prefill(engine, np.zeros((1, BLOCK + 1), dtype=np.int64))
    with pytest.raises(MiniGPTError, match="exceed block_size"):
        engine.extend(np.zeros((1, 2), dtype=np.int64), np.array([BLOCK - 1]))


def test_an_empty_prompt_in_a_batch_is_a_clear_error(tiny_loaded):
    with pytest.raises(MiniGPTError, match="at least one token"):
        list(generate_rows(KVCacheEngine(tiny_loaded.model), [[1, 2], []], 3, Sampler(temperature=0)))


@pytest.mark.parametrize("prompts", [[1, 2, 3], np.array([1, 2, 3]), [[[1, 2]]]])
def test_prompts_that_are_not_a_list_of_id_lists_are_a_clear_error(tiny_loaded, prompts):
    with pytest.raises(MiniGPTError, match=r"give one prompt as \[ids\]"):
        generate_rows(KVCacheEngine(tiny_loaded.model), prompts, 3, Sampler(temperature=0))


def test_cli_threads_flag(tiny_checkpoint, tiny_onnx, capsys):
    outputs = []
    for flags in (["--checkpoint", str(tiny_checkpoint), "--threads", "1"], ["--model", str(tiny_onnx)],
                  ["--model", str(tiny_onnx), "--threads", "2"]):
        assert main(["generate", *flags, "--prompt", "the", "--max-new-tokens", "20", "--temperature", "0"]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] == outputs[2]
    for model_flags in (["--checkpoint", str(tiny_checkpoint)], ["--model", str(tiny_onnx)]):
        assert main(["generate", *model_flags, "--threads", "0"]) == 2
        out, err = capsys.readouterr()
        assert out == "" and len(err.strip().splitlines()) == 1 and "threads" in err


def test_the_onnx_engine_picks_threads_by_its_weights_not_by_its_draft_table(tiny_onnx, monkeypatch):
    """A trained model's .onnx carries its n-gram draft table as metadata, often more bytes than its weights:
    one row of a model whose weights are small is still decoded on one thread, a batch on the free cores."""
    from minigpt import devices
    from minigpt.export.onnx_engine import OnnxEngine

    # Just above the file's size: small weights either way, yet the file alone is not under it.
    monkeypatch.setattr(devices, "SMALL_MODEL_BYTES", tiny_onnx.stat().st_size)
    engine = OnnxEngine(tiny_onnx)
    assert engine.session.get_session_options().intra_op_num_threads == 1
    assert len(engine.sessions) == 1  # the session opened to read the metadata was the one to keep
    engine.start(8)
    assert engine.session.get_session_options().intra_op_num_threads == devices.free_cores()
    monkeypatch.setattr(devices, "SMALL_MODEL_BYTES", 1)  # every model large: the free cores, one session
    engine = OnnxEngine(tiny_onnx)
    assert engine.session.get_session_options().intra_op_num_threads == devices.free_cores()
    assert len(engine.sessions) == 1


@pytest.mark.parametrize("engine_name", ["recompute", "kv-cache", "onnx"])
def test_sequences_joining_and_leaving_a_running_batch_each_decode_as_if_alone(make_engine, engine_name):
    """Continuous batching: sequences join between steps and leave whenever they are done (the last row moving
    into the gap), and each still gets exactly the greedy tokens it gets alone, across restarts past the block."""
    # (prompt length, step it joins, tokens it wants): joins mid-run, leaves early, outlives the others.
    plan = [(5, 0, 40), (BLOCK + 3, 0, 9), (1, 2, 25), (9, 7, 30), (3, 9, 5), (12, 20, 12)]
    sequences = prompts([length for length, _, _ in plan], seed=3)
    expected = [greedy(make_engine(engine_name), [prompt], wanted)[0]
                for prompt, (_, _, wanted) in zip(sequences, plan)]

    rows = Rows(make_engine(engine_name), capacity=4)  # rows.sequences[i]: the sequence in row i
    produced = [[] for _ in plan]
    logits = np.zeros((0, 0), dtype=np.float32)
    waiting = list(range(len(plan)))
    step = 0
    while waiting or rows.count:
        if rows.count:
            ids = logits.argmax(-1)
            for row, sequence in enumerate(rows.sequences):
                produced[sequence].append(int(ids[row]))
            done = [row for row, sequence in enumerate(rows.sequences) if len(produced[sequence]) == plan[sequence][2]]
            ids = rows.remove(done, carry=ids)  # the last rows move into the gaps, and their ids with them
            logits = rows.decode(ids)[:, 0].copy() if rows.count else logits[:0]
        joining = [s for s in waiting if plan[s][1] <= step][:rows.capacity - rows.count]
        for sequence in joining:
            new = rows.add([sequences[sequence]], [sequence])
            logits = np.concatenate([logits, new]) if len(logits) else new.copy()
            waiting.remove(sequence)
        step += 1
    assert produced == expected
