"""Controls and patterns on every engine: the same text plain and speculative, alone and in a batch, and a
constrained text always matches its pattern (or ran out of tokens first)."""

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minigpt.drafts import ContextDraft
from minigpt.speculative import SpeculativeStep
from minigpt.text import join_samples, stream_characters

PROMPT = "the "
CONTROLS = {
    "greedy": dict(temperature=0, repetition_penalty=1.4, frequency_penalty=0.3, presence_penalty=0.2,
                   logit_bias={3: 2.0}, regex=r"[a-z]+ ([a-z]+ )?(fox|dog|model)\."),
    "sampled": dict(temperature=0.9, seed=5, min_p=0.05, top_k=12, repetition_penalty=1.2,
                    frequency_penalty=0.5, logit_bias={5: -100}),
    "sampled_pattern": dict(temperature=1.1, seed=8, top_p=0.95, presence_penalty=0.6,
                            choices=["quick brown fox", "lazy dog", "small model", "spell one"]),
}


def texts(engine, tokenizer, new_tokens, samples=1, step=None, **controls):
    steps = stream_characters(engine, tokenizer, PROMPT, new_tokens, num_samples=samples, step=step, **controls)
    return [text[len(PROMPT):] for text in join_samples(PROMPT, steps, samples)]


@pytest.mark.parametrize("engine_name", ["recompute", "kv-cache", "onnx"])
@pytest.mark.parametrize("case", CONTROLS)
def test_every_engine_step_and_batch_gives_the_same_text(make_engine, tiny_loaded, engine_name, case):
    tokenizer, controls = tiny_loaded.tokenizer, CONTROLS[case]
    reference = texts(make_engine("kv-cache"), tokenizer, 40, 3, **controls)
    for draft in (tiny_loaded.ngram_draft(), ContextDraft()):
        assert texts(make_engine(engine_name), tokenizer, 40, 3, SpeculativeStep(draft, 6), **controls) == reference
        alone = texts(make_engine(engine_name), tokenizer, 40, 1, SpeculativeStep(draft, 6), **controls)
        assert alone == reference[:1]  # sample 0 draws from stream 0 of the seed, alone or not
    assert texts(make_engine(engine_name), tokenizer, 40, 3, **controls) == reference
    if "regex" in controls or "choices" in controls:
        pattern = controls.get("regex") or "|".join(controls["choices"])
        assert all(re.fullmatch(pattern, text) for text in reference), reference


ATOMS = st.sampled_from(["a", "e", "o", "t", "h", " ", r"\.", "[a-e]", "[ot]", "[^ ]", "(the|fox)", "[a-z]"])
QUANTIFIERS = st.sampled_from(["", "", "?", "+", "*", "{1,3}", "{2}"])
PIECES = st.tuples(ATOMS, QUANTIFIERS).map("".join)
BRANCHES = st.lists(PIECES, min_size=1, max_size=4).map("".join)
PATTERNS = st.lists(BRANCHES, min_size=1, max_size=2).map("|".join)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pattern=PATTERNS, temperature=st.sampled_from([0, 1.0]), seed=st.integers(0, 99))
def test_a_constrained_text_matches_its_pattern_on_every_step_and_batch(make_engine, tiny_loaded, pattern,
                                                                        temperature, seed):
    tokenizer, limit = tiny_loaded.tokenizer, 24
    controls = dict(regex=pattern, temperature=temperature, seed=seed)
    plain = texts(make_engine("kv-cache"), tokenizer, limit, 3, **controls)
    for text in plain:  # a text that ended before the limit matches; one that does not match ran out of tokens
        assert len(text) <= limit and (re.fullmatch(pattern, text) or len(text) == limit), (pattern, text)
    speculative = SpeculativeStep(tiny_loaded.ngram_draft(), 6)
    assert texts(make_engine("onnx"), tokenizer, limit, 3, speculative, **controls) == plain
    assert texts(make_engine("kv-cache"), tokenizer, limit, 1, SpeculativeStep(ContextDraft(), 6),
                 **controls) == plain[:1]
    assert texts(make_engine("recompute"), tokenizer, limit, 1, **controls) == plain[:1]
