"""`minigpt serve` with a byte-level BPE model: the text `minigpt generate` gives, logprobs that name whole tokens
and count offsets in characters, stop strings that end inside a token, and the model's own token ids."""

import json
import re

import pytest

openai = pytest.importorskip("openai", reason="the server is tested with the openai client (the test extra)")
pytest.importorskip("uvicorn", reason="minigpt serve needs the serve extra")

from minigpt import load_checkpoint  # noqa: E402

from serving import generate_cli, running  # noqa: E402

PROMPT = "naïve 😀 the"
MODEL_ID = "bpe"  # the file's name


@pytest.fixture(scope="module")
def bpe_onnx(bpe_checkpoint):
    return bpe_checkpoint.with_suffix(".onnx")


@pytest.fixture(scope="module")
def server(bpe_onnx, free_port):
    with running(bpe_onnx, "--draft", "auto", port=free_port()) as server:
        yield server


@pytest.fixture(scope="module")
def tokenizer(bpe_checkpoint):
    return load_checkpoint(bpe_checkpoint).tokenizer


def token_bytes(name: str) -> bytes:
    """A logprobs token back to its bytes (OpenAI writes a token that is no whole character as bytes:\\xNN)."""
    if name.startswith("bytes:"):
        return bytes(int(pair, 16) for pair in re.findall(r"\\x([0-9a-f]{2})", name))
    return name.encode("utf-8")


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 0.9, "seed": 4}])
def test_the_text_is_minigpt_generates_streamed_or_not(server, bpe_onnx, sampling):
    client = server.client()
    whole = client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=40, n=2, **sampling)
    texts = [choice.text for choice in sorted(whole.choices, key=lambda c: c.index)]
    flags = ["--temperature", 0] if sampling["temperature"] == 0 else ["--temperature", 0.9, "--seed", 4]
    cli = generate_cli(bpe_onnx, "--prompt", PROMPT, "--max-new-tokens", 40, "--num-samples", 2, *flags)
    assert re.split(r"--- sample \d of 2 ---\n", cli)[1:] == [f"{PROMPT}{text}\n" for text in texts]
    streamed = ["", ""]
    for chunk in client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=40, n=2, stream=True,
                                           **sampling):
        for choice in chunk.choices:
            streamed[choice.index] += choice.text
    assert streamed == texts and whole.usage.completion_tokens == 80


def test_logprobs_name_tokens_and_offsets_count_characters(server, tokenizer):
    body = server.post({"model": MODEL_ID, "prompt": PROMPT, "max_tokens": 60, "temperature": 0, "logprobs": 3,
                        "echo": True})[1]
    choice = body["choices"][0]
    scores, text = choice["logprobs"], choice["text"]
    spelt = [token_bytes(name) for name in scores["tokens"]]
    assert b"".join(spelt).decode("utf-8") == text and text.startswith(PROMPT)
    assert len(spelt) == len(tokenizer.encode(PROMPT)) + 60
    # A token's offset: the characters that the tokens before it complete.
    expected = [len(b"".join(spelt[:i]).decode("utf-8", errors="ignore")) for i in range(len(spelt))]
    assert scores["text_offset"] == expected
    assert any(name.startswith("bytes:") for name in scores["tokens"]), "the prompt's emoji is split in bytes"
    for name, top in zip(scores["tokens"][1:], scores["top_logprobs"][1:]):
        assert len(top) == 3 and all(token_bytes(other) for other in top)
    streamed = []
    body = {"model": MODEL_ID, "prompt": PROMPT, "max_tokens": 60, "temperature": 0, "logprobs": 3, "stream": True}
    for event in server.request("POST", "/v1/completions", body)[1].split("\n\n"):
        if event.startswith("data: {"):
            streamed += [json.loads(event[6:])["choices"][0]]
    names = [name for chunk in streamed for name in chunk["logprobs"]["tokens"]]
    assert names == scores["tokens"][len(tokenizer.encode(PROMPT)):]
    for chunk in streamed:  # each chunk's text is its tokens' text: a chunk ends where a token does
        assert b"".join(map(token_bytes, chunk["logprobs"]["tokens"])).decode("utf-8") == chunk["text"]


def test_a_stop_string_that_ends_inside_a_token_stops_at_its_first_character(server, tokenizer):
    sampling = {"temperature": 1.0, "seed": 3}  # same seed, same text: a stop string only cuts it short
    full = server.post({"model": MODEL_ID, "prompt": PROMPT, "max_tokens": 60, "logprobs": 0, **sampling})[1]
    text = full["choices"][0]["text"]
    starts = {offset - len(PROMPT) for offset in full["choices"][0]["logprobs"]["text_offset"]}
    # A stop string beginning and ending inside tokens, so it spans a token boundary unaligned.
    begin = next(i for i in range(1, len(text) - 3) if i not in starts and i + 1 in starts and i + 3 not in starts)
    stop = text[begin:begin + 3]
    cut = text.index(stop)
    for stream in (False, True):
        if stream:
            chunks = list(server.client().completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=60,
                                                             stop=[stop], stream=True, **sampling))
            got, reason = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
        else:
            choice = server.client().completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=60, stop=[stop],
                                                        **sampling).choices[0]
            got, reason = choice.text, choice.finish_reason
        assert (got, reason) == (text[:cut], "stop"), (stop, stream)


def test_token_ids_are_the_models_own(server, tokenizer):
    status, text, _ = server.request("POST", "/tokenize", {"prompt": PROMPT})
    assert status == 200 and json.loads(text)["tokens"] == tokenizer.encode(PROMPT)
    status, text, _ = server.request("POST", "/detokenize", {"tokens": tokenizer.encode(PROMPT)})
    assert status == 200 and json.loads(text)["prompt"] == PROMPT
    by_text = server.post({"model": MODEL_ID, "prompt": PROMPT, "max_tokens": 20, "temperature": 0})[1]
    by_ids = server.post({"model": MODEL_ID, "prompt": tokenizer.encode(PROMPT), "max_tokens": 20,
                          "temperature": 0})[1]
    assert by_ids["choices"][0]["text"] == by_text["choices"][0]["text"]
    assert by_ids["usage"]["prompt_tokens"] == len(tokenizer.encode(PROMPT))
    status, body, _ = server.post({"model": MODEL_ID, "prompt": [0, tokenizer.vocab_size], "max_tokens": 1})
    assert status == 400 and f"from 0 to {tokenizer.vocab_size - 1}" in body["error"]["message"]
    info = json.loads(server.get("/tokenizer_info")[1])
    assert info["vocab_size"] == tokenizer.vocab_size == 300
