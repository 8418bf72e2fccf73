"""The seed's experiment: characters against a byte-level BPE at several vocabulary sizes, the default architecture
trained for the same wall-clock seconds, compared in validation bits per character.

    MINIGPT_BENCH_CORPORA=WIKITEXT_FOLDER:SHAKESPEARE.txt MINIGPT_BENCH_SECONDS=120 \
    MINIGPT_BENCH_OUT=runs pytest bench/test_subword_experiment.py -s
    minigpt plot --against seconds --metrics runs/*.metrics.jsonl --out subword.png

Each corpus is anything `minigpt train --data` reads (a folder of wiki.{train,valid,test}.tokens, a text file
whose last 10% is validation); by default the offline fallback corpus. A run's steps are the seconds over its
measured step time (the vocabulary sets the head's cost), so every run's cosine schedule ends on time; its
evaluations count in its seconds, its BPE's training does not (`tokenizer_s`). Then, for each: validation bits per
character and per byte over the whole split (`minigpt eval`'s figures), parameters (the embedding is
vocab_size x embed_dim), and greedy generation's characters a second (a subword step writes several). With
--benchmark-disable: two 3-second runs on the default corpus, their figures checked.
"""

import json
import os
import time
from pathlib import Path

import pytest
import torch

from minigpt import GPTConfig, MiniGPT, TrainConfig
from minigpt.data import load_corpus
from minigpt.generation import generate, split_bits
from minigpt.train import train
from minigpt.training import make_optimizer, sample_batch, training_step

TOKENIZERS = {"char": None, "bpe-256": 256, "bpe-512": 512, "bpe-1024": 1024, "bpe-2048": 2048}
LEARNING_RATE = 2e-3  # the quick start's
GENERATED_TOKENS = 400


def corpora() -> list[str]:
    given = os.environ.get("MINIGPT_BENCH_CORPORA")
    return given.split(os.pathsep) if given else [""]  # "": the default data (offline: the fallback corpus)


def step_seconds(vocab_size: int, config: TrainConfig) -> float:
    """One training step of the default architecture with this vocabulary, measured (after two warm-up steps)."""
    model = MiniGPT(GPTConfig(vocab_size=vocab_size)).train()
    device, ids = torch.device("cpu"), torch.randint(0, vocab_size, (50_000,), dtype=torch.int32).numpy()
    optimizer, generator = make_optimizer(model, config, device), torch.Generator().manual_seed(0)
    times = []
    for _ in range(12):
        start = time.perf_counter()
        x, y = sample_batch(ids, config.batch_size, model.config.block_size, generator, device)
        training_step(model, optimizer, x, y, config.grad_clip, device)
        times.append(time.perf_counter() - start)
    return sorted(times[2:])[len(times[2:]) // 2]


def experiment(data: str, name: str, seconds: float, out: Path) -> dict:
    corpus = load_corpus(data or None)
    started = time.perf_counter()
    kind, vocab = ("char", None) if TOKENIZERS[name] is None else ("bpe", TOKENIZERS[name])
    tokenizer_vocab = len(corpus.chars) if kind == "char" else vocab
    base = TrainConfig(learning_rate=LEARNING_RATE, device="cpu")
    steps = max(4, int(seconds / step_seconds(tokenizer_vocab, base)))
    config = TrainConfig(learning_rate=LEARNING_RATE, device="cpu", steps=steps, eval_interval=max(1, steps // 6),
                         warmup=min(base.warmup, steps // 4))
    label = f"{Path(data).stem or 'default'}-{name}"
    result = train(corpus, config, out / f"{label}.safetensors", progress=False, force=True, tokenizer=kind,
                   vocab_size=vocab)
    tokenizer_s = time.perf_counter() - started - result.wall_s
    bits = split_bits(result.model, result.tokenizer, corpus, "valid")
    start = time.perf_counter()
    text = generate(result.model, result.tokenizer, "", GENERATED_TOKENS, temperature=0)
    generate_s = time.perf_counter() - start
    return {"corpus": str(corpus.source), "tokenizer": name, "vocab_size": result.tokenizer.vocab_size,
            "parameters": result.model.num_parameters(), "steps": steps, "train_s": round(result.wall_s, 1),
            "tokenizer_s": round(tokenizer_s, 1), "val_bpc": bits.per("characters"), "val_bpb": bits.per("bytes"),
            "characters_per_token": bits.characters / bits.tokens,
            "generate_characters_per_s": len(text) / generate_s, "generate_tokens_per_s": GENERATED_TOKENS / generate_s}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TOKENIZERS))
@pytest.mark.parametrize("data", corpora())
def test_characters_against_subwords(benchmark, data, name, tmp_path):
    if not benchmark.enabled and name not in ("char", "bpe-512"):
        pytest.skip("a short check runs characters and one BPE; the experiment runs every vocabulary")
    seconds = float(os.environ.get("MINIGPT_BENCH_SECONDS", "90")) if benchmark.enabled else 3.0
    out = Path(os.environ.get("MINIGPT_BENCH_OUT", tmp_path))
    out.mkdir(parents=True, exist_ok=True)
    benchmark.group = f"subword experiment {Path(data).stem or 'default'}"
    figures = benchmark.pedantic(lambda: experiment(data, name, seconds, out), rounds=1, iterations=1)
    benchmark.extra_info.update(figures)
    with (out / "results.jsonl").open("a") as log:
        log.write(json.dumps(figures) + "\n")
    print(f"\n{figures}")
    assert 0 < figures["val_bpc"] < 8 and 0 < figures["val_bpb"] <= figures["val_bpc"] + 1e-9
    assert figures["parameters"] == MiniGPT(GPTConfig(vocab_size=figures["vocab_size"])).num_parameters()
    if TOKENIZERS[name] is None:
        assert figures["characters_per_token"] == 1
    elif TOKENIZERS[name] == 256:  # the bytes alone: a character is one token or more
        assert figures["characters_per_token"] <= 1
    else:  # merges were learnt: a token spells more than one character on average
        assert figures["characters_per_token"] > 1.2
