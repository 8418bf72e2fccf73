"""Every engine agrees with recomputing the whole context, token for token."""

import numpy as np
import pytest
import torch

from minigpt import GPTConfig, MiniGPT, load_checkpoint
from minigpt.cli import main
from minigpt.rows import prefill
from minigpt.errors import MiniGPTError
from minigpt.generation import KVCacheEngine, RecomputeEngine, generate, generate_samples, stream

BLOCK = 16  # TINY_MODEL's block_size


@pytest.fixture(scope="module")
def trained(tiny_checkpoint):
    checkpoint = load_checkpoint(tiny_checkpoint)
    return checkpoint.model, checkpoint.tokenizer


def random_model(seed=0, block_size=12):
    torch.manual_seed(seed)
    model = MiniGPT(GPTConfig(vocab_size=13, block_size=block_size, embed_dim=24, num_heads=3, num_layers=2))
    with torch.no_grad():  # larger weights than the init, so logits are far from uniform
        for p in model.parameters():
            p.mul_(8.0)
    return model.eval()


@pytest.mark.parametrize("prompt_len", [1, 5, BLOCK - 1, BLOCK])
def test_greedy_with_cache_equals_recompute(trained, prompt_len):
    model, tokenizer = trained
    prompt = ("the quick brown fox jumps" * 2)[:prompt_len]
    cached = generate(model, tokenizer, prompt, BLOCK - prompt_len + 8, temperature=0)
    recomputed = generate(model, tokenizer, prompt, BLOCK - prompt_len + 8, temperature=0, kv_cache=False)
    assert cached == recomputed
    assert cached.startswith(prompt) and len(cached) == BLOCK + 8


def test_batched_rows_decode_independently_and_match_recompute():
    model = random_model()
    rows = np.random.default_rng(0).integers(0, 13, size=(3, 5))
    cached, reference = KVCacheEngine(model), RecomputeEngine(model)
    cached.start(3)
    reference.start(3)
    logits_c, logits_r = prefill(cached, rows), prefill(reference, rows)
    for position in range(5, 12):
        np.testing.assert_allclose(logits_c, logits_r, atol=1e-4, rtol=1e-4)
        next_ids = logits_r.argmax(-1)
        assert np.array_equal(logits_c.argmax(-1), next_ids)
        at = np.full(3, position)
        logits_c, logits_r = (cached.extend(next_ids[:, None], at)[:, 0],
                              reference.extend(next_ids[:, None], at)[:, 0])
    # each row is its own sequence: row 1 run alone gives row 1's logits
    alone_engine = RecomputeEngine(model)
    alone_engine.start(1)
    alone = prefill(alone_engine, reference.contexts[1][None])
    np.testing.assert_allclose(alone[0], logits_r[1], atol=1e-4, rtol=1e-4)


def test_sampled_batches_agree_across_engines_for_the_same_seed(trained):
    model, tokenizer = trained
    options = dict(num_samples=4, temperature=1.0, top_k=10, seed=3)
    cached = generate_samples(model, tokenizer, "a ", 40, **options)
    recomputed = generate_samples(model, tokenizer, "a ", 40, kv_cache=False, **options)
    assert cached == recomputed
    assert len(set(cached)) > 1  # the samples really are different draws
    assert all(len(text) == 42 for text in cached)


def expected_context_lengths(prompt_len, new_tokens, block):
    """The documented policy, spelled out: contexts grow to block, then restart at block // 2."""
    lengths, context = [], min(prompt_len, block)
    for _ in range(new_tokens):
        lengths.append(context)
        context = block // 2 if context == block else context + 1
    return lengths


def test_past_block_size_follows_the_documented_policy():
    block = 12
    model = random_model(seed=1, block_size=block)
    prompt = [1, 2, 3]
    tokens = list(prompt)
    with torch.no_grad():
        for context in expected_context_lengths(len(prompt), 3 * block, block):
            logits, _ = model(torch.tensor([tokens[-context:]]))
            tokens.append(int(logits[0, -1].argmax()))
    from minigpt.decoding import generate_rows
    from minigpt.sampling import Sampler

    for engine in (KVCacheEngine(model), RecomputeEngine(model)):
        produced = [int(ids[0]) for ids in generate_rows(engine, [prompt], 3 * block, Sampler(temperature=0))]
        assert produced == tokens[len(prompt):]


def test_long_prompt_is_read_through_its_last_block(trained):
    model, tokenizer = trained
    long_prompt = "the quick brown fox jumps over the lazy dog. " * 3
    continuation = generate(model, tokenizer, long_prompt, 20, temperature=0)[len(long_prompt):]
    assert continuation == generate(model, tokenizer, long_prompt[-BLOCK:], 20, temperature=0)[BLOCK:]


def test_stream_yields_what_generate_returns(trained):
    model, tokenizer = trained
    pieces = list(stream(model, tokenizer, "the ", 30, temperature=0.9, seed=5))
    assert len(pieces) == 30
    assert "the " + "".join(pieces) == generate(model, tokenizer, "the ", 30, temperature=0.9, seed=5)


def test_empty_prompt_starts_from_a_newline(trained):
    model, tokenizer = trained
    assert generate(model, tokenizer, "", 10, temperature=0) == \
        generate(model, tokenizer, "\n", 10, temperature=0)[1:]


@pytest.mark.parametrize("options", [{"num_samples": 0}, {"top_p": 1.01}, {"temperature": -0.5}])
def test_bad_arguments_raise_before_any_work(trained, options):
    model, tokenizer = trained
    with pytest.raises(MiniGPTError):
        stream(model, tokenizer, "a", 5, **options)


def test_cli_cache_and_no_cache_print_the_same_greedy_text(tiny_checkpoint, capsys):
    outputs = []
    for flag in ("--kv-cache", "--no-kv-cache"):
        assert main(["generate", "--checkpoint", str(tiny_checkpoint), "--prompt", "a small",
                     "--max_new_tokens", "40", "--temperature", "0", flag]) == 0
        out, err = capsys.readouterr()
        outputs.append(out)
        assert "tokens/s" in err
    assert outputs[0] == outputs[1]


def test_cli_num_samples_prints_each_sample(tiny_checkpoint, capsys):
    assert main(["generate", "--checkpoint", str(tiny_checkpoint), "--prompt", "the", "--num-samples", "3",
                 "--max-new-tokens", "20", "--seed", "0", "--top-p", "0.9"]) == 0
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if line.startswith("--- sample")] == \
        [f"--- sample {i} of 3 ---" for i in (1, 2, 3)]


@pytest.mark.parametrize("flags,fragment", [(["--num_samples", "0"], "num_samples"),
                                            (["--max_new_tokens", "-1"], "max_new_tokens"),
                                            (["--top_p", "-1"], "top_p")])
def test_cli_bad_arguments_exit_2(tiny_checkpoint, capsys, flags, fragment):
    assert main(["generate", "--checkpoint", str(tiny_checkpoint), *flags]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and fragment in err
