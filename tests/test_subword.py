"""A byte-level BPE model beside the character one: trained with one flag, stored in its checkpoint, the same
text from every engine, scored in bits per character and per byte."""

import json
import math
import re

import numpy as np
import pytest
from safetensors import safe_open

from minigpt import load_checkpoint
from minigpt.cli import main
from minigpt.data import load_corpus
from minigpt.subword import BPETokenizer, encoded_split, train_bpe
from tiny import BPE_MODEL, UNICODE_TEXT

def test_every_string_round_trips(unicode_file):
    tokenizer = train_bpe(load_corpus(unicode_file), 300)
    assert tokenizer.vocab_size == 300
    for text in [UNICODE_TEXT, "Ωμέγα ∑ 🚀🚀 \t\r\n", "never seen: ẞ ﷽ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢", ""]:
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
        assert max(ids, default=0) < 300
    assert len(tokenizer.encode("the quick brown")) < len("the quick brown")  # merges were learnt


def test_a_character_cut_between_tokens_streams_once_whole(unicode_file):
    tokenizer = train_bpe(load_corpus(unicode_file), 256)  # bytes alone: an emoji is four tokens
    ids = tokenizer.encode("é😀x")
    piece = tokenizer.pieces()
    assert [piece(i) for i in ids] == ["", "é", "", "", "", "😀", "x"]
    piece = tokenizer.pieces()
    assert [piece(i) for i in ids[:3]] + [piece(None)] == ["", "é", "", "\ufffd"]  # a cut character is said at the end


def test_a_corpus_encodes_in_pieces_as_the_whole_text_does(unicode_file, monkeypatch):
    from minigpt import subword

    corpus = load_corpus(unicode_file)
    tokenizer = train_bpe(corpus, 300)
    whole = tokenizer.encode(corpus.text("train"))
    monkeypatch.setattr(subword, "PIECE_CHARACTERS", 37)
    assert encoded_split(tokenizer, corpus, "train").tolist() == whole


def test_the_token_cache_is_written_once_two_bytes_a_token(unicode_file):
    corpus = load_corpus(unicode_file)
    tokenizer = train_bpe(corpus, 300)
    first = encoded_split(tokenizer, corpus, "train")
    cached = sorted(corpus.cache_path.parent.glob(f"{corpus.cache_path.stem}.bpe-*.train.ids"))
    assert len(cached) == 1 and first.dtype == np.uint16 and cached[0].stat().st_size == 2 * len(first)
    written = cached[0].stat().st_mtime_ns
    again = encoded_split(tokenizer, load_corpus(unicode_file), "train")
    assert cached[0].stat().st_mtime_ns == written and np.array_equal(first, again)
    other = train_bpe(corpus, 290)  # another tokenizer: a cache of its own
    assert encoded_split(other, corpus, "train").tolist() == other.encode(corpus.text("train"))


def test_the_checkpoint_carries_its_tokenizer_json(bpe_checkpoint):
    with safe_open(bpe_checkpoint, framework="pt") as f:
        metadata = f.metadata()
    assert "vocab" not in metadata and json.loads(metadata["tokenizer"])["model"]["type"] == "BPE"
    loaded = load_checkpoint(bpe_checkpoint)
    assert isinstance(loaded.tokenizer, BPETokenizer) and loaded.model.config.vocab_size == 300
    assert loaded.tokenizer == BPETokenizer(metadata["tokenizer"])


def generated(capsys, *flags, count=40):
    assert main(["generate", "--prompt", "naïve 😀 the", "--max-new-tokens", str(count), *flags]) == 0
    return capsys.readouterr().out


def test_every_engine_gives_the_same_text(bpe_checkpoint, capsys):
    onnx = str(bpe_checkpoint.with_suffix(".onnx"))
    engines = [["--checkpoint", str(bpe_checkpoint)], ["--checkpoint", str(bpe_checkpoint), "--no-kv-cache"],
               ["--model", onnx]]
    for sampling in (["--temperature", "0"], ["--seed", "7"], ["--seed", "3", "--num-samples", "3"]):
        texts = {generated(capsys, *engine, *sampling, "--draft", draft)
                 for engine in engines for draft in ("none", "ngram", "context")}
        assert len(texts) == 1, (sampling, texts)
        assert next(iter(texts)).startswith("naïve 😀 the") or sampling[-1] == "3"


def test_eval_reports_bits_per_character_and_byte_as_summed_token_losses(bpe_checkpoint, unicode_file, capsys):
    import torch

    assert main(["eval", "--checkpoint", str(bpe_checkpoint), "--data", str(unicode_file)]) == 0
    line = capsys.readouterr().out
    numbers = re.search(r"([\d.]+) bits/char, ([\d.]+) bits/byte over ([\d,]+) characters \(([\d,]+) bytes", line)
    bpc, bpb, characters, size = (float(n.replace(",", "")) for n in numbers.groups())
    text = load_corpus(unicode_file).text("valid")
    assert (characters, size) == (len(text), len(text.encode()))
    loaded = load_checkpoint(bpe_checkpoint)
    ids = [loaded.tokenizer.id_of("\n")] + loaded.tokenizer.encode(text)
    block, nats = loaded.model.config.block_size, 0.0
    with torch.no_grad():  # consecutive windows of a block, each token scored once from those before it
        for start in range(0, len(ids) - 1, block):
            window = torch.tensor(ids[start:start + block + 1])
            logits, _ = loaded.model(window[None, :-1])
            nats -= torch.log_softmax(logits[0].double(), -1).gather(1, window[1:, None]).sum().item()
    assert bpc == pytest.approx(nats / math.log(2) / len(text), abs=1e-3)
    assert bpb == pytest.approx(nats / math.log(2) / len(text.encode()), abs=1e-3)


def test_training_says_characters_and_tokens(unicode_file, tmp_path, capsys):
    assert main(["train", "--data", str(unicode_file), "--tokenizer", "bpe", "--vocab-size", "280", "--steps", "2",
                 "--eval-interval", "2", "--sample-tokens", "20", "--quiet", "--out", str(tmp_path / "m.safetensors"),
                 *BPE_MODEL]) == 0
    out, err = capsys.readouterr()
    train_text = load_corpus(unicode_file).text("train")
    assert f"{len(train_text):,} training characters in " in err and " BPE tokens from " in err
    assert "sample (20 tokens" in err and out.strip()


def test_bad_tokenizer_flags(unicode_file, bpe_checkpoint, tiny_checkpoint, tmp_path, cli_error):
    not_json, other_json = tmp_path / "bad.json", tmp_path / "wordlevel.json"
    not_json.write_text("not json")
    other_json.write_text(json.dumps({"model": {"type": "WordLevel", "vocab": {"a": 0}, "unk_token": "a"}}))
    out = tmp_path / "out.safetensors"
    train = ["train", "--data", str(unicode_file), "--steps", "2", "--out", str(out), "--quiet", *BPE_MODEL]
    cli_error([*train, "--tokenizer", "bpe", "--vocab-size", "100"], "--vocab-size", "256")
    cli_error([*train, "--tokenizer", "bpe", "--vocab-size", "60000"], "makes only", "--vocab-size")
    cli_error([*train, "--vocab-size", "300"], "--tokenizer bpe")
    cli_error([*train, "--tokenizer", "char", "--vocab-size", "300"], "--tokenizer bpe")
    cli_error([*train, "--tokenizer", "sentencepiece"], "char, bpe or a tokenizer.json")
    cli_error([*train, "--tokenizer", str(not_json)], "not a tokenizer.json")
    cli_error([*train, "--tokenizer", str(not_json), "--vocab-size", "300"], "already has its vocabulary")
    cli_error([*train, "--tokenizer", str(other_json)], "byte-level BPE")
    cli_error([*train, "--init-from", str(bpe_checkpoint)], "bpe model", "--tokenizer bpe")
    cli_error([*train, "--init-from", str(tiny_checkpoint), "--tokenizer", "bpe"], "char model", "--tokenizer char")
    cli_error(["train", "--resume", str(bpe_checkpoint), "--tokenizer", "char"], "keeps", "drop --tokenizer")
    assert not out.exists() and not list(tmp_path.glob("out*"))


def test_a_tokenizer_file_trains_a_model_with_that_vocabulary(unicode_file, bpe_checkpoint, tmp_path):
    tokenizer_file = tmp_path / "tokenizer.json"
    tokenizer_file.write_text(load_checkpoint(bpe_checkpoint).tokenizer.to_json(), encoding="utf-8")
    out = tmp_path / "from-file.safetensors"
    assert main(["train", "--data", str(unicode_file), "--tokenizer", str(tokenizer_file), "--steps", "2",
                 "--sample-tokens", "0", "--quiet", "--out", str(out), *BPE_MODEL]) == 0
    assert load_checkpoint(out).tokenizer == load_checkpoint(bpe_checkpoint).tokenizer


def test_the_transformers_export_gives_minigpts_greedy_text_and_loads_back(bpe_checkpoint, tmp_path, capsys):
    """`export --hf` writes the tokenizer.json itself: transformers' generate and CTranslate2 continue a Unicode
    prompt as minigpt does, and the folder loads back into minigpt as the same model."""
    import torch
    import transformers

    out = tmp_path / "hf"
    assert main(["export", "--hf", "--checkpoint", str(bpe_checkpoint), "--out", str(out)]) == 0
    assert "same ids as minigpt" in capsys.readouterr().out
    prompt = "naïve 😀 the"
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    count = model.config.n_positions - ids.shape[1]  # GPT-2's positions end at the block
    ours = generated(capsys, "--checkpoint", str(bpe_checkpoint), "--temperature", "0", "--draft", "none",
                     count=count)
    with torch.inference_mode():
        new = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=count, min_new_tokens=count,
                             do_sample=False, pad_token_id=0)[0, ids.shape[1]:]
    assert prompt + tokenizer.decode(new) == ours.rstrip("\n")
    assert generated(capsys, "--checkpoint", str(out), "--temperature", "0", "--draft", "none", count=count) == ours
    ctranslate2 = bench_module("gpt2_peers").CTranslate2Peer(out)  # converted as ct2-transformers-converter does
    assert ctranslate2.greedy([ids[0].tolist()], count)[0].tolist() == new.tolist()



def test_lm_eval_hf_model_scores_the_export_in_bits_per_byte_as_minigpt_does(bpe_checkpoint, tmp_path):
    """lm-eval's `hf` model on the BPE export, begun after the newline token: its bits per byte are minigpt's
    own summed token log-probabilities over the same windows (whole blocks), over the text's UTF-8 bytes."""
    pytest.importorskip("lm_eval", reason="lm-eval is in the test extra")
    from minigpt.generation import evaluate_split
    from tiny import run_lm_eval

    loaded = load_checkpoint(bpe_checkpoint)
    assert main(["export", "--hf", "--checkpoint", str(bpe_checkpoint), "--out", str(tmp_path / "hf")]) == 0
    newline, block = loaded.tokenizer.id_of("\n"), loaded.model.config.block_size
    # Whole blocks of tokens (lm-eval's rolling windows are then ours) that spell whole characters.
    every = loaded.tokenizer.encode(UNICODE_TEXT[:600])
    blocks = next(n for n in range(len(every) // block, 0, -1)
                  if loaded.tokenizer.encode(loaded.tokenizer.decode(every[:n * block])) == every[:n * block])
    ids = np.array([newline] + every[:blocks * block])
    text = loaded.tokenizer.decode(every[:blocks * block])
    bits, _ = run_lm_eval(tmp_path, "hf", f"pretrained={tmp_path / 'hf'},prefix_token_id={newline}", text, [])
    ours = evaluate_split(loaded.model, ids) * (len(ids) - 1) / math.log(2) / len(text.encode("utf-8"))
    assert bits == pytest.approx(ours, abs=1e-5)


def bench_module(name: str):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
