"""Log-probabilities through `minigpt serve`: the model's own scores of what it writes and of an echoed prompt,
prompts as token ids, the tokenizer routes, and lm-eval scoring the model through the server."""

import json
import math

import numpy as np
import pytest

pytest.importorskip("openai", reason="the server is tested with the openai client (the test extra)")
pytest.importorskip("uvicorn", reason="minigpt serve needs the serve extra")

from tiny import LM_EVAL_TEXT, TINY_TEXT, eval_bits, run_lm_eval  # noqa: E402
from minigpt.serve.protocol import lm_eval_model_args  # noqa: E402
from serving import MODEL_ID, generate_cli, running  # noqa: E402

TEXT = TINY_TEXT[:203]  # 13 windows of the tiny model's 16-character block, the last one short


@pytest.fixture(scope="module")
def server(tiny_onnx, free_port):
    with running(tiny_onnx, port=free_port()) as server:
        yield server


def complete(server, **fields):
    status, body, _ = server.post({"model": MODEL_ID, **fields})
    assert status == 200, body
    return body


def eval_total(loaded, text) -> float:
    """`minigpt eval`'s total log-likelihood of a text."""
    return eval_bits(loaded, text) * -len(text) * math.log(2)


def test_echo_scores_a_text_as_minigpt_eval_does(server, tiny_loaded):
    prompt = "\n" + TEXT  # the newline eval reads a text after: echo's first token has no score
    body = complete(server, prompt=prompt, max_tokens=0, echo=True, logprobs=2)
    (choice,) = body["choices"]
    assert choice["text"] == prompt and choice["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": 0, "total_tokens": len(prompt)}
    scores = choice["logprobs"]
    assert scores["tokens"] == list(prompt) and scores["text_offset"] == list(range(len(prompt)))
    assert scores["token_logprobs"][0] is None and scores["top_logprobs"][0] is None
    assert sum(scores["token_logprobs"][1:]) == pytest.approx(eval_total(tiny_loaded, TEXT), rel=1e-5)
    for logprob, top in zip(scores["token_logprobs"][1:], scores["top_logprobs"][1:]):
        assert len(top) == 2 and logprob <= max(top.values()) + 1e-6 and max(top.values()) < 0


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.7, "top_k": 3, "seed": 5}])
def test_generated_tokens_carry_the_models_own_logprobs_whatever_the_sampling(server, sampling):
    """Within one block, scoring prompt + completion with echo must give the log-probabilities the completion
    came with: both are the model's log-softmax at temperature 1."""
    prompt = "the "
    choice = complete(server, prompt=prompt, max_tokens=11, logprobs=3, **sampling)["choices"][0]
    scores = choice["logprobs"]
    assert "".join(scores["tokens"]) == choice["text"] and len(choice["text"]) == 11
    assert scores["text_offset"] == list(range(len(prompt), len(prompt) + 11))
    for token, logprob, top in zip(scores["tokens"], scores["token_logprobs"], scores["top_logprobs"]):
        assert list(top.values()) == sorted(top.values(), reverse=True) and len(top) == 3
        if sampling["temperature"] == 0:
            assert top[token] == logprob == max(top.values())
    echoed = complete(server, prompt=prompt + choice["text"], max_tokens=0, echo=True, logprobs=3)["choices"][0]
    np.testing.assert_allclose(echoed["logprobs"]["token_logprobs"][len(prompt):], scores["token_logprobs"],
                               rtol=1e-5, atol=1e-5)


def test_streamed_logprobs_and_stop_strings(server):
    fields = dict(prompt="the quick", max_tokens=30, temperature=0, logprobs=1, echo=True)
    whole = complete(server, **fields)["choices"][0]
    assert whole["text"].startswith("the quick") and whole["logprobs"]["tokens"] == list(whole["text"])
    status, text, _ = server.request("POST", "/v1/completions", {"model": MODEL_ID, "stream": True, **fields})
    chunks = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
    pieces = [choice for chunk in chunks for choice in chunk["choices"]]
    assert "".join(p["text"] for p in pieces) == whole["text"]
    streamed = {key: sum((p["logprobs"][key] for p in pieces), []) for key in whole["logprobs"]}
    for key in ("tokens", "text_offset"):
        assert streamed[key] == whole["logprobs"][key], key
    # Numbers equal to rounding: a token verified among a draft's guesses is scored from an extend of several
    # tokens, whose logits equal a decode step's to ~1e-7.
    assert streamed["token_logprobs"] == pytest.approx(whole["logprobs"]["token_logprobs"], abs=1e-5)
    for ours, theirs in zip(streamed["top_logprobs"], whole["logprobs"]["top_logprobs"]):
        assert ours == theirs or ours == pytest.approx(theirs, abs=1e-5)
    stop = whole["text"][12:14]
    stopped = complete(server, **fields, stop=[stop])["choices"][0]
    assert stopped["finish_reason"] == "stop" and stop not in stopped["text"][9:]
    assert stopped["logprobs"]["tokens"] == list(stopped["text"])
    before_stop = whole["logprobs"]["token_logprobs"][:len(stopped["text"])]
    assert stopped["logprobs"]["token_logprobs"] == pytest.approx(before_stop, abs=1e-5)


def test_prompts_as_token_ids_read_as_their_text(server, tiny_loaded):
    encode = tiny_loaded.tokenizer.encode
    as_text = complete(server, prompt=["the ", "a small"], max_tokens=12, temperature=0)["choices"]
    as_ids = complete(server, prompt=[encode("the "), encode("a small")], max_tokens=12, temperature=0)["choices"]
    assert [c["text"] for c in as_ids] == [c["text"] for c in as_text]
    one = complete(server, prompt=encode("the "), max_tokens=12, temperature=0, echo=True)["choices"]
    assert [c["text"] for c in one] == ["the " + as_text[0]["text"]]


def test_max_tokens_0_without_echo_is_an_empty_completion(server):
    choice = complete(server, prompt="the ", max_tokens=0, logprobs=1)["choices"][0]
    assert choice["text"] == "" and choice["finish_reason"] == "length"
    assert choice["logprobs"] == {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}


def test_tokenizer_and_model_routes(server, tiny_loaded):
    tokenizer = tiny_loaded.tokenizer
    status, text, _ = server.request("POST", "/tokenize", {"prompt": "the fox"})
    assert status == 200 and json.loads(text)["tokens"] == tokenizer.encode("the fox")
    status, text, _ = server.request("POST", "/detokenize", {"tokens": tokenizer.encode("the fox")})
    assert status == 200 and json.loads(text) == {"prompt": "the fox"}
    status, text, _ = server.request("POST", "/tokenize", {"prompt": "THE"})
    assert status == 400 and "never saw" in json.loads(text)["error"]["message"]
    status, text, _ = server.request("POST", "/detokenize", {"tokens": [10**9]})
    assert status == 400 and json.loads(text)["error"]["param"] == "tokens"
    info = json.loads(server.get("/tokenizer_info")[1])
    assert info["vocab_size"] == len(tokenizer.chars) and info["eos_token"] is None
    (card,) = json.loads(server.get("/v1/models")[1])["data"]
    assert card["id"] == MODEL_ID and card["max_model_len"] == tiny_loaded.model.config.block_size
    assert json.loads(server.get(f"/v1/models/{MODEL_ID}")[1]) == card
    status, text, _ = server.get("/v1/models/gpt-4")
    assert status == 404 and json.loads(text)["error"]["code"] == "model_not_found"


def test_lm_eval_scores_the_model_through_the_server(server, tiny_loaded, tiny_onnx, tmp_path):
    """lm-eval's own `local-completions` model with the arguments `minigpt serve` prints: bits per byte as
    `minigpt eval` counts bits per character, and greedy generations as `minigpt generate` writes them. The
    text's length is a multiple of the block, so lm-eval's last window is a whole block too and the two agree
    to rounding (otherwise its last window is cut differently: measured within 0.002 bits on real text)."""
    prompts = ["the quick", "a small "]
    args = lm_eval_model_args(MODEL_ID, f"http://127.0.0.1:{server.port}/v1", tiny_loaded.tokenizer, 16)
    bits, generated = run_lm_eval(tmp_path, "local-completions", args, LM_EVAL_TEXT, prompts)
    assert bits == pytest.approx(eval_bits(tiny_loaded, LM_EVAL_TEXT), abs=1e-5)
    for prompt in prompts:
        printed = generate_cli(tiny_onnx, "--prompt", prompt, "--max-new-tokens", 30, "--temperature", 0)
        assert generated[prompt] == printed[len(prompt):].split("\n")[0]
