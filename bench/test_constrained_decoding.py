"""Constrained decoding and the sampling controls: what a pattern costs to compile and to follow, with
outlines-core (ours) beside llguidance and interegular, and what the controls add to a decode step.

    pytest bench/test_constrained_decoding.py -s

The libraries: compile time, then the time to make one step's mask and move on by one token, walking a
matching text, on a 97-character vocabulary (printable ASCII and a newline) as a character model has. Each
library in turn, several rounds. The step cost: `generate_rows` on an engine that hands back stored logits
(bench/test_decode_loop.py's `FreeEngine`), so every microsecond is the loop's and the sampler's.
"""

import json
import time

import numpy as np
import pytest

from minigpt.controls import make_sampler
from minigpt.decoding import generate_rows
from minigpt.fast_sampling import FastSampler
from minigpt.patterns import Pattern
from minigpt.tokenizer import CharTokenizer

from test_decode_loop import FreeEngine

CHARS = [chr(c) for c in range(32, 127)] + ["\n"]
TOKENIZER = CharTokenizer(CHARS)
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer"}, "email": {"type": "string"}},
          "required": ["name", "age", "email"]}
PATTERNS = {  # name -> (regex, a text it matches)
    "email": (r"[a-z]+@[a-z]+\.(com|org)", "someone@example.org"),
    "choice": ("yes|no|maybe", "maybe"),
    "json": (None, json.dumps({"name": "Ada", "age": 36, "email": "ada@example.org"}, separators=(",", ":"))),
}
ROUNDS, STEP_TOKENS = 5, 2000


def regex_of(name):
    from outlines_core.json_schema import build_regex_from_schema

    regex, _ = PATTERNS[name]
    return regex if regex is not None else build_regex_from_schema(json.dumps(SCHEMA))


def outlines_core_walk(regex, text):
    started = time.perf_counter()
    pattern = Pattern(regex, TOKENIZER)
    compiled = time.perf_counter() - started
    started, state = time.perf_counter(), pattern.start
    for char in text:
        pattern.mask(state)
        state = pattern.next(state, TOKENIZER.id_of(char))
    assert pattern.accepts(state)
    return compiled, (time.perf_counter() - started) / len(text)


def llguidance_walk(regex, text):
    import llguidance
    import llguidance.hf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    spelt = bytes_to_unicode()  # llguidance reads a byte-level vocabulary: each character as GPT-2 spells it
    vocab = {spelt[ord(char)]: index for index, char in enumerate(CHARS)} | {"<end>": len(CHARS)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<end>"))
    tokenizer.pre_tokenizer, tokenizer.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    lltokenizer = llguidance.hf.from_tokenizer(PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<end>"))
    started = time.perf_counter()
    matcher = llguidance.LLMatcher(lltokenizer, llguidance.grammar_from("regex", regex))
    compiled = time.perf_counter() - started
    started = time.perf_counter()
    for char in text:
        matcher.compute_bitmask()
        assert matcher.consume_token(CHARS.index(char))
    return compiled, (time.perf_counter() - started) / len(text)


def interegular_walk(regex, text):
    import interegular

    started = time.perf_counter()
    fsm = interegular.parse_pattern(regex).to_fsm()
    compiled = time.perf_counter() - started
    started, state = time.perf_counter(), fsm.initial
    for char in text:
        moves = fsm.map[state]
        mask = np.full(len(CHARS), -np.inf, dtype=np.float32)
        mask[[index for index, c in enumerate(CHARS) if fsm.alphabet[c] in moves]] = 0.0
        state = moves[fsm.alphabet[char]]
    assert state in fsm.finals
    return compiled, (time.perf_counter() - started) / len(text)


LIBRARIES = {"outlines-core": outlines_core_walk, "llguidance": llguidance_walk, "interegular": interegular_walk}


@pytest.mark.parametrize("name", PATTERNS)
def test_pattern_libraries(benchmark, name):
    for library in ("llguidance", "interegular", "transformers"):
        pytest.importorskip(library, reason="the peers extra")
    regex, (_, text) = regex_of(name), PATTERNS[name]
    benchmark.group = f"pattern {name}"
    figures = {library: [] for library in LIBRARIES}

    def in_turn():
        for round_number in range(ROUNDS if benchmark.enabled else 1):
            for library, walk in list(LIBRARIES.items())[::-1 if round_number % 2 else 1]:
                figures[library].append(walk(regex, text))

    benchmark.pedantic(in_turn, rounds=1, iterations=1)
    for library, runs in figures.items():
        compiled, per_token = np.median(np.array(runs), axis=0)
        benchmark.extra_info[library] = {"compile ms": compiled * 1e3, "per token us": per_token * 1e6}
        print(f"\n{name:7} {library:14} compile {compiled * 1e3:8.2f} ms   mask + advance {per_token * 1e6:6.2f} µs")


CONTROLS = {
    "none": {},
    "penalties": dict(repetition_penalty=1.2, presence_penalty=0.5, frequency_penalty=0.5, logit_bias={5: -3.0}),
    "regex": dict(regex="[A-Z ]*"),
    "everything": dict(repetition_penalty=1.2, presence_penalty=0.5, frequency_penalty=0.5, regex="[A-Z ]*"),
}


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("sampling", ["greedy", "top-p"])
def test_step_cost_of_the_controls(benchmark, batch, sampling):
    settings = dict(temperature=0) if sampling == "greedy" else dict(temperature=0.8, top_p=0.95, seed=1)
    tokenizer = CharTokenizer([chr(c) for c in range(32, 97)])  # the 65 characters FreeEngine's logits cover
    benchmark.group = f"controls {sampling} batch {batch}"
    seconds = {name: [] for name in CONTROLS}

    def in_turn():
        for round_number in range(ROUNDS if benchmark.enabled else 1):
            for name, controls in list(CONTROLS.items())[::-1 if round_number % 2 else 1]:
                sampler = make_sampler(tokenizer, FastSampler, **settings, **controls)
                started = time.perf_counter()
                for _ in generate_rows(FreeEngine(block_size=4096), [[1, 2, 3]] * batch, STEP_TOKENS, sampler):
                    pass
                seconds[name].append(time.perf_counter() - started)

    benchmark.pedantic(in_turn, rounds=1, iterations=1)
    base = np.median(seconds["none"])
    for name, times in seconds.items():
        per_step = np.median(times) / STEP_TOKENS
        benchmark.extra_info[f"{name} us a step"] = per_step * 1e6
        print(f"\n{benchmark.group:26} {name:11} {per_step * 1e6:7.1f} µs a step ({np.median(times) / base:.2f}x)")
