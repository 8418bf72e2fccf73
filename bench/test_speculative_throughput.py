"""Speculative decoding on trained weights: plain decoding, each draft, and CTranslate2, side by side.

    pytest bench/test_speculative_throughput.py

Drafts mean nothing on random weights, so the models are trained first, briefly,
on a corpus every machine has offline (the Python language reference that
ships with CPython, minigpt's own offline fallback; MINIGPT_BENCH_TEXT names
another text file), and the n-gram table `minigpt train` stores comes with
them. Trained checkpoints are kept in the cache folder between runs. With
timing disabled (`--benchmark-disable`, as CI runs) the models train for a
few steps and every equality below is still checked.

Each group decodes the same prompts from the corpus's validation split, each
to the end of the block (so CTranslate2, which cannot slide past it, does
the same work), one prompt at a time (batch 1) or all at once (batch 8), and
checks that every engine writes the same text: greedy text equal to plain
decoding's and CTranslate2's, sampled text equal to plain sampling's for the
seed. Ratios are to CTranslate2 fp32 (intra_threads=1, its best setting at
batch 1 here) or, where it cannot take part (sampling), to plain decoding.
"""

import functools
import os
import re
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from minigpt import Sampler
from minigpt.data import FALLBACK_SOURCE, load_corpus
from minigpt.decoding import generate_rows
from minigpt.draft_model import ModelDraft
from minigpt.drafts import ContextDraft
from minigpt.speculative import SpeculativeStep

CONFIGS = {"default": dict(), "held-out": dict(), "long": dict(block_size=1024),
           "large": dict(block_size=256, embed_dim=384, num_heads=6, num_layers=6),
           "draft": dict(block_size=256, embed_dim=64, num_heads=2, num_layers=1)}  # the large one's draft model
TRAINING = {"default": dict(steps=600, batch_size=32, learning_rate=2e-3),
            "held-out": dict(steps=800, batch_size=32, learning_rate=2e-3),
            "long": dict(steps=150, batch_size=8, learning_rate=2e-3),
            "large": dict(steps=250, batch_size=16, learning_rate=1e-3),
            "draft": dict(steps=400, batch_size=16, learning_rate=3e-3)}
PROMPT_CHARACTERS, PROMPTS = 16, 8
SAMPLING = dict(temperature=0.8, top_p=0.95, seed=7)


def timing(request) -> bool:
    return not request.config.getoption("benchmark_disable", False)


@pytest.fixture(scope="module")
def corpus_source():
    return os.environ.get("MINIGPT_BENCH_TEXT") or FALLBACK_SOURCE


@pytest.fixture(scope="module")
def held_out_source(corpus_source):
    """The corpus of the held-out group: MINIGPT_BENCH_HELD_OUT (a data folder, say WikiText-2's, or a file),
    else the bench's own; its model trains on the train split, its prompts come from the validation split."""
    return os.environ.get("MINIGPT_BENCH_HELD_OUT") or corpus_source


@pytest.fixture(scope="module")
def trained(request, corpus_source, held_out_source, tmp_path_factory):
    """config name -> (checkpoint path, onnx path, prompts as ids): trained once, kept in the cache folder."""
    from minigpt import load_checkpoint
    from minigpt.config import TrainConfig
    from minigpt.encoded import cache_dir
    from minigpt.export.onnx_export import export_onnx
    from minigpt.train import train

    made = {}

    def get(name):
        if name in made:
            return made[name]
        # Untimed (CI): a few small steps, enough for every equality below to mean something.
        settings = dict(TRAINING[name]) if timing(request) else dict(TRAINING[name], steps=4, batch_size=2)
        # "chosen": the n-gram table counts the finished model's own picks and likeliest characters, and chose its
        # context length on the validation split (a cached model from before would speculate as an older minigpt).
        source = held_out_source if name == "held-out" else corpus_source
        stem = f"{name}-{settings['steps']}-chosen-{Path(source).name}"
        folder = cache_dir() / "bench" if timing(request) else tmp_path_factory.mktemp(name)
        folder.mkdir(parents=True, exist_ok=True)
        checkpoint, graph = folder / f"{stem}.safetensors", folder / f"{stem}.onnx"
        corpus = load_corpus(source)
        config = TrainConfig(**settings, eval_interval=settings["steps"], eval_iters=2, warmup=20, device="cpu")
        if not checkpoint.exists():
            train(corpus, config, checkpoint, progress=False, force=True, **CONFIGS[name])
        elif int(load_checkpoint(checkpoint).metadata["step"]) < settings["steps"]:  # a run that was interrupted
            train(corpus, config, checkpoint, progress=False, force=True, resume=checkpoint)
        export_onnx(checkpoint, graph, verify=False, force=True)  # seconds: the graph is this minigpt's
        valid = corpus.split("valid")
        starts = np.linspace(0, len(valid) - PROMPT_CHARACTERS - 1, PROMPTS if timing(request) else 2).astype(int)
        prompts = [valid[start:start + PROMPT_CHARACTERS].astype(np.int64).tolist() for start in starts]
        made[name] = checkpoint, graph, prompts
        return made[name]

    return get


@pytest.fixture(scope="module")
def engines(trained, tmp_path_factory):
    """(engine name, config name) -> a callable(prompts, new_tokens, sampler) -> (rows, new_tokens) ids."""
    from minigpt.export.onnx_engine import OnnxEngine

    made = {}

    def make(engine_name, config_name):
        key = engine_name, config_name
        if key in made:
            return made[key]
        checkpoint, graph, _ = trained(config_name)
        if engine_name.startswith("ct2"):
            pytest.importorskip("ctranslate2", reason="peer baseline: pip install ctranslate2 transformers")
            from gpt2_peers import CTranslate2Peer

            from minigpt.export.hf_export import export_hf

            hf_dir = tmp_path_factory.mktemp(config_name) / "hf"
            export_hf(checkpoint, hf_dir, verify=False)
            peer = CTranslate2Peer(hf_dir, "float32" if engine_name == "ct2-fp32" else "int8")
            made[key] = lambda prompts, count, sampler: peer.greedy(prompts, count)
            return made[key]
        engine = OnnxEngine(graph)
        draft = {"onnx-ngram": engine.ngram_draft, "onnx-context": ContextDraft,
                 "onnx-draft": lambda: ModelDraft(OnnxEngine(trained("draft")[1]))}.get(engine_name, lambda: None)()

        step = SpeculativeStep(draft) if draft is not None else None  # kept from call to call, as a server keeps it

        def run(prompts, count, sampler):
            return np.stack(list(generate_rows(engine, prompts, count, sampler, step)), axis=1)

        made[key] = run
        return made[key]

    return make


def decode(engine, prompts, count, sampler, batch):
    """Every prompt's continuation, `batch` prompts at a time."""
    return np.concatenate([engine(prompts[i:i + batch], count, sampler) for i in range(0, len(prompts), batch)])


@pytest.fixture(scope="module")
def plain(trained, engines):
    """(config name, sampling options) -> plain decoding's ids for the config's prompts, made once."""
    made = {}

    def get(config_name, options, batch=1):
        key = config_name, tuple(sorted(options.items()))
        if key not in made:
            _, _, prompts = trained(config_name)
            made[key] = decode(engines("onnx-plain", config_name), prompts, new_tokens(config_name),
                               Sampler(**options), batch)
        return made[key]

    return get


def new_tokens(config_name: str) -> int:
    """To the end of the block: 112 for the default model, 1,008 for block 1024, 240 for the large one."""
    return CONFIGS[config_name].get("block_size", 128) - PROMPT_CHARACTERS


ENGINES = ["onnx-plain", "onnx-ngram", "onnx-context", "ct2-fp32", "ct2-int8"]
GREEDY = [(config, batch, engine) for config, batch in [("default", 1), ("default", 8), ("long", 1), ("large", 1)]
          for engine in ENGINES + (["onnx-draft"] if config == "large" else [])]


@pytest.mark.parametrize("config_name,batch,engine_name", GREEDY)
def test_speculative_greedy(benchmark, record_throughput, trained, engines, plain, engine_name, config_name, batch):
    benchmark.group = f"speculative {config_name} batch {batch}"
    _, _, prompts = trained(config_name)
    count = new_tokens(config_name)
    engine = engines(engine_name, config_name)
    rounds = 5 if config_name == "default" else 2
    ids = benchmark.pedantic(decode, args=(engine, prompts, count, Sampler(temperature=0), batch), rounds=rounds,
                             warmup_rounds=1)
    if not engine_name.endswith("int8"):  # int8 weights round differently: their text may differ
        expected = plain(config_name, dict(temperature=0))  # rows are independent: any batch, the same text
        assert (ids == expected).all(), f"{int((ids == expected).sum())}/{expected.size} tokens equal plain decoding"
    record_throughput(benchmark, engine_name, len(prompts) * count)


CEILING_GUESSES = (0, 4, 8, 16)


@pytest.mark.parametrize("config_name", ["default", "large"])
def test_speculation_ceiling(benchmark, record_throughput, request, trained, engines, config_name):
    """The most speculation could reach on this host: the graph's own rate when each call writes k + 1 tokens
    (a row's next token and k guesses, every one of them right), no draft and no loop around it, beside
    CTranslate2 decoding the same number of tokens; in turn. A target above the best of these columns is out
    of reach of any draft."""
    from minigpt.export.onnx_engine import OnnxEngine

    benchmark.group = f"speculation ceiling {config_name} batch 1"
    _, graph, prompts = trained(config_name)
    count, engine = new_tokens(config_name), OnnxEngine(graph)  # one row: what it starts with

    def calls(guesses: int) -> int:
        """Every prompt's `count` tokens, k + 1 a call from the prompt's end to the block's, as decoding goes;
        returns how many logits came back."""
        tokens, written = np.zeros((1, guesses + 1), dtype=np.int64), 0
        for prompt in prompts:
            engine.extend(np.array([prompt]), np.zeros(1, dtype=np.int64))
            for start in range(PROMPT_CHARACTERS, PROMPT_CHARACTERS + count, guesses + 1):
                width = min(guesses + 1, PROMPT_CHARACTERS + count - start)
                written += engine.extend(tokens[:, :width], np.array([start])).shape[1]
        return written

    ct2 = engines("ct2-fp32", config_name)
    runs = {"ct2-fp32": functools.partial(decode, ct2, prompts, count, Sampler(temperature=0), 1)}
    runs |= {f"graph k={guesses}": functools.partial(calls, guesses) for guesses in CEILING_GUESSES}
    results = alternating(benchmark, record_throughput, request, runs, len(prompts) * count, rounds=4)
    assert np.shape(results["ct2-fp32"]) == (len(prompts), count)  # every column decoded the same amount
    assert all(results[f"graph k={guesses}"] == len(prompts) * count for guesses in CEILING_GUESSES)


def alternating(benchmark, record_throughput, request, runs: dict, amount: int, rounds: int = 8) -> dict:
    """Run each of `runs` (name -> callable) in turn, `rounds` times over, inside one benchmark, the order
    reversed every other round (A B, B A, ...: neither is always first); record each one's median round as
    its rate, so that a slow spell of this shared host hits every one of them alike. Returns each run's last
    result."""
    rounds = rounds if timing(request) else 1
    seconds, results = {name: [] for name in runs}, {}

    def in_turn():
        for round_number in range(rounds):
            for name, run in list(runs.items())[::-1 if round_number % 2 else 1]:
                started = time.perf_counter()
                results[name] = run()
                seconds[name].append(time.perf_counter() - started)

    benchmark.pedantic(in_turn, rounds=1, iterations=1)
    for name, times in seconds.items():
        median = float(np.median(times))
        timed = SimpleNamespace(group=benchmark.group, stats={"median": median}, extra_info={})
        record_throughput(timed if benchmark.stats else benchmark, name, amount)
        benchmark.extra_info[f"{name} tokens/s"] = amount / median
    return results


def test_speculative_sampling(benchmark, record_throughput, request, trained, engines, plain):
    """Temperature 0.8, top-p 0.95, one seed: the same text as plain sampling, faster; the three in turn."""
    benchmark.group = "speculative sampled default batch 1"
    _, _, prompts = trained("default")
    count = new_tokens("default")
    runs = {name: functools.partial(decode, engines(name, "default"), prompts, count, Sampler(**SAMPLING), 1)
            for name in ("onnx-plain", "onnx-ngram", "onnx-context")}
    for name, ids in alternating(benchmark, record_throughput, request, runs, len(prompts) * count).items():
        assert (ids == plain("default", SAMPLING)).all(), name


def test_speculative_on_random_weights(benchmark, record_throughput, request, trained, tmp_path_factory):
    """No draft is any good for an untrained model: speculation must cost (almost) nothing there, and still
    change nothing. Plain and speculative decoding in turn."""
    import torch

    from minigpt import MiniGPT, load_checkpoint, save_checkpoint
    from minigpt.export.onnx_engine import OnnxEngine
    from minigpt.export.onnx_export import export_onnx

    benchmark.group = "speculative random weights default batch 1"
    checkpoint, _, prompts = trained("default")
    folder = tmp_path_factory.mktemp("random")
    loaded = load_checkpoint(checkpoint)
    torch.manual_seed(0)
    save_checkpoint(folder / "random.safetensors", MiniGPT(loaded.model.config), loaded.tokenizer,
                    draft=loaded.ngram_draft())
    export_onnx(folder / "random.safetensors", folder / "random.onnx", verify=False)
    engine = OnnxEngine(folder / "random.onnx")
    step, count = SpeculativeStep(engine.ngram_draft()), new_tokens("default")  # kept, as in `engines`

    def run(speculate):
        return np.concatenate([np.stack(list(generate_rows(engine, [prompt], count, Sampler(temperature=0),
                                                           step if speculate else None)), axis=1)
                               for prompt in prompts])

    runs = {"onnx-plain": functools.partial(run, False), "onnx-ngram": functools.partial(run, True)}
    results = alternating(benchmark, record_throughput, request, runs, len(prompts) * count, rounds=12)
    assert (results["onnx-plain"] == results["onnx-ngram"]).all()


@pytest.mark.parametrize("clients", [1, 32])
def test_speculative_serving(benchmark, record_throughput, request, trained, clients):
    """`minigpt serve` on the trained default model (.onnx, its n-gram table inside) with `--draft auto` and
    with `--draft none`, both running, the same load sent to each in turn: prompts from the validation
    split, temperature 0.8, 200 tokens a request, from 1 client (one row) and from 32 (a batch, where each
    guess costs a column of 32 rows: guessing must pay there or give way to plain steps, no slower)."""
    from test_serve_throughput import run_load, serving

    from minigpt.export.onnx_engine import OnnxEngine

    benchmark.group = f"speculative serving default {clients} clients"
    _, graph, prompts = trained("default")
    decode_text = OnnxEngine(graph).tokenizer.decode
    count, tokens = ((16 if clients == 1 else 64), 200) if timing(request) else (clients, 20)
    bodies = [{"model": graph.stem, "prompt": decode_text(prompts[i % len(prompts)]), "max_tokens": tokens,
               "temperature": 0.8, "seed": i} for i in range(count)]
    load = [bodies[c::clients] for c in range(clients)]
    with serving(graph, "--draft", "none") as (plain_port, _), serving(graph, "--draft", "auto") as (draft_port, _):
        run_load(plain_port, load[:1]), run_load(draft_port, load[:1])  # warm-up: sessions and bindings
        runs = {"draft none": functools.partial(run_load, plain_port, load),
                "draft auto": functools.partial(run_load, draft_port, load)}
        results = alternating(benchmark, record_throughput, request, runs, count * tokens, rounds=8)
    assert results["draft auto"]["texts"] == results["draft none"]["texts"]  # the draft changes only the speed
    assert len(results["draft auto"]["texts"]) == count
    print(f"\n{clients} clients: " + ", ".join(f"{name} {result['tokens_per_s']:,.0f} tokens/s (last round)"
                                            for name, result in results.items()))


HELD_OUT_PROMPT, HELD_OUT_NEW, HELD_OUT_PROMPTS, CLI_PROMPTS = 40, 88, 24, 8


def test_speculative_held_out(benchmark, record_throughput, request, trained, engines, held_out_source):
    """Text the model never saw: a default model trained 800 steps on one corpus's train split, 40-character
    prompts from its validation split, 88 new tokens each (within the block), greedy, batch 1: onnxruntime plain,
    onnxruntime with the n-gram table and CTranslate2 fp32 in turn (each over every prompt, warm, as a user's one
    process would run; the order reversed every other round); then `minigpt generate` for the first few
    prompts, one process each, its reported rate against the warm engine's on the same prompt right after."""
    import subprocess
    import sys

    benchmark.group = "speculative held-out default batch 1"
    checkpoint, graph, _ = trained("held-out")
    valid = load_corpus(held_out_source).split("valid")
    starts = np.linspace(0, len(valid) - HELD_OUT_PROMPT - 1, HELD_OUT_PROMPTS if timing(request) else 2)
    prompts = [valid[start:start + HELD_OUT_PROMPT].astype(np.int64).tolist() for start in starts.astype(int)]
    greedy = Sampler(temperature=0)
    runs = {name: functools.partial(decode, engines(name, "held-out"), prompts, HELD_OUT_NEW, greedy, 1)
            for name in ("onnx-plain", "onnx-ngram", "ct2-fp32")}
    seconds, texts = {name: [] for name in runs}, {}

    def in_turn():
        for round_number in range(5 if timing(request) else 1):
            for name, run in list(runs.items())[::-1 if round_number % 2 else 1]:
                started = time.perf_counter()
                texts[name] = run()
                seconds[name].append(time.perf_counter() - started)

    benchmark.pedantic(in_turn, rounds=1, iterations=1)
    assert (texts["onnx-ngram"] == texts["onnx-plain"]).all() and (texts["ct2-fp32"] == texts["onnx-plain"]).all()
    amount = len(prompts) * HELD_OUT_NEW
    for name, times in seconds.items():
        timed = SimpleNamespace(group=benchmark.group, stats={"median": float(np.median(times))}, extra_info={})
        record_throughput(timed if benchmark.stats else benchmark, name, amount)
    ratios = [ct2 / ngram for ngram, ct2 in zip(seconds["onnx-ngram"], seconds["ct2-fp32"])]
    benchmark.extra_info["onnx-ngram / ct2-fp32, per round"] = ratios

    from minigpt.export.onnx_engine import OnnxEngine

    decode_text, against_warm = OnnxEngine(graph).tokenizer.decode, []
    for number, prompt in enumerate(prompts[:CLI_PROMPTS]):  # each prompt through the CLI, then warm: in turn
        result = subprocess.run([sys.executable, "-m", "minigpt", "generate", "--model", str(graph), "--prompt",
                                 decode_text(prompt), "--max-new-tokens", str(HELD_OUT_NEW), "--temperature", "0"],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert result.stdout == decode_text(prompt + texts["onnx-plain"][number].tolist()) + "\n"
        reported = float(re.search(r"\(([\d,]+) tokens/s", result.stderr).group(1).replace(",", ""))
        warm = []
        for _ in range(3):
            started = time.perf_counter()
            runs["onnx-ngram"].func(runs["onnx-ngram"].args[0], [prompt], HELD_OUT_NEW, greedy, 1)
            warm.append(HELD_OUT_NEW / (time.perf_counter() - started))
        against_warm.append(reported / float(np.median(warm)))
    benchmark.extra_info["minigpt generate / warm, per prompt"] = against_warm
    print(f"\nheld-out: onnx + n-gram {np.median(ratios):.2f}x CT2 fp32 (rounds {min(ratios):.2f}-{max(ratios):.2f}); "
          f"minigpt generate reports {np.median(against_warm):.2f} of the warm rate on the same prompt "
          f"({', '.join(f'{ratio:.2f}' for ratio in against_warm)})")
