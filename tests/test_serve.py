"""`minigpt serve` as its users meet it: a real server on a free localhost port, the official `openai` client,
raw HTTP for what a client library hides, and the signals an operator sends."""

import concurrent.futures
import contextlib
import http.client
import json
import re
import signal
import socket
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

openai = pytest.importorskip("openai", reason="the server is tested with the openai client (the test extra)")
pytest.importorskip("uvicorn", reason="minigpt serve needs the serve extra")

from minigpt.cli import main  # noqa: E402

from serving import MODEL_ID, Server, generate_cli, in_process, running  # noqa: E402


@pytest.fixture(scope="module")
def onnx_model(tiny_onnx):
    return tiny_onnx


@pytest.fixture(scope="module")
def server(onnx_model, free_port):
    with running(onnx_model, "--max-batch", "40", port=free_port()) as server:
        yield server


def test_a_completion_is_the_text_minigpt_generate_prints(server, onnx_model):
    completion = server.client().completions.create(model=MODEL_ID, prompt="the ", max_tokens=40, temperature=0.8,
                                                    top_p=0.9, seed=11)
    (choice,) = completion.choices
    assert choice.finish_reason == "length" and len(choice.text) == 40
    assert completion.usage.prompt_tokens == 4 and completion.usage.completion_tokens == 40
    assert completion.usage.total_tokens == 44
    cli = generate_cli(onnx_model, "--prompt", "the ", "--max-new-tokens", 40, "--temperature", 0.8, "--top-p", 0.9,
                       "--seed", 11)
    assert cli == "the " + choice.text + "\n"


def test_n_samples_and_several_prompts(server, onnx_model):
    client = server.client()
    completion = client.completions.create(model=MODEL_ID, prompt="a ", max_tokens=20, n=3, seed=5,
                                           extra_body={"top_k": 5})  # an extension, as vLLM's
    texts = [choice.text for choice in sorted(completion.choices, key=lambda c: c.index)]
    assert [c.index for c in completion.choices] == [0, 1, 2] and len(set(texts)) > 1
    cli = generate_cli(onnx_model, "--prompt", "a ", "--max-new-tokens", 20, "--num-samples", 3, "--seed", 5,
                       "--top-k", 5)
    assert re.split(r"--- sample \d of 3 ---\n", cli)[1:] == [f"a {text}\n" for text in texts]
    again = client.completions.create(model=MODEL_ID, prompt="a ", max_tokens=20, n=3, seed=5,
                                      extra_body={"top_k": 5})
    assert [c.text for c in sorted(again.choices, key=lambda c: c.index)] == texts  # seed: same text

    both = client.completions.create(model=MODEL_ID, prompt=["the ", "a "], max_tokens=10, n=2, temperature=0)
    assert sorted(c.index for c in both.choices) == [0, 1, 2, 3]
    assert both.usage.prompt_tokens == 6 and both.usage.completion_tokens == 40


def test_streaming_gives_the_same_text_in_pieces(server):
    client = server.client()
    whole = client.completions.create(model=MODEL_ID, prompt="the ", max_tokens=50, seed=3, n=2)
    pieces, finished = {0: "", 1: ""}, {}
    for chunk in client.completions.create(model=MODEL_ID, prompt="the ", max_tokens=50, seed=3, n=2, stream=True,
                                           stream_options={"include_usage": True}):
        for choice in chunk.choices:
            pieces[choice.index] += choice.text
            if choice.finish_reason:
                finished[choice.index] = choice.finish_reason
        usage = chunk.usage
    assert pieces == {c.index: c.text for c in whole.choices} and finished == {0: "length", 1: "length"}
    assert usage.completion_tokens == 100


def test_stop_strings_end_the_text_before_them(server):
    client = server.client()
    greedy = client.completions.create(model=MODEL_ID, prompt="the qu", max_tokens=60, temperature=0).choices[0].text
    stop = greedy[20:23]
    cut = greedy.index(stop)
    stopped = client.completions.create(model=MODEL_ID, prompt="the qu", max_tokens=60, temperature=0,
                                        stop=[stop, "\x00never"])
    assert stopped.choices[0].text == greedy[:cut] and stopped.choices[0].finish_reason == "stop"
    assert stopped.usage.completion_tokens == cut + len(stop)
    streamed = "".join(chunk.choices[0].text for chunk in client.completions.create(
        model=MODEL_ID, prompt="the qu", max_tokens=60, temperature=0, stop=stop, stream=True) if chunk.choices)
    assert streamed == greedy[:cut]  # held-back text that began the stop string is never sent


BAD_REQUESTS = [
    ({"prompt": "THE"}, 400, "prompt", "character(s) the model never saw"),
    ({"prompt": 42}, 400, "prompt", "must be a string, a non-empty list of strings, a list of token ids"),
    ({"prompt": ["the", [1, 2]]}, 400, "prompt", "must be a string, a non-empty list of strings"),
    ({"prompt": [[1, 2], []]}, 400, "prompt", "at least one a prompt"),
    ({"prompt": [3, 10**6]}, 400, "prompt", "token ids must be from 0 to"),
    ({"prompt": [True]}, 400, "prompt", "must be a string, a non-empty list of strings"),
    ({"max_tokens": -1}, 400, "max_tokens", "from 0 to"),
    ({"max_tokens": 10**6}, 400, "max_tokens", "from 0 to"),
    ({"max_tokens": "ten"}, 400, "max_tokens", "must be an integer"),
    ({"max_tokens": True}, 400, "max_tokens", "must be an integer"),
    ({"temperature": -1}, 400, "temperature", "temperature must be a number of at least 0"),
    ({"temperature": "hot"}, 400, "temperature", "must be a number"),
    ({"temperature": 2.5}, 400, "temperature", "from 0 to 2"),
    ({"temperature": 10**400}, 400, "temperature", "from 0 to 2"),  # once an OverflowError that stopped the engine
    ({"top_p": 1.5}, 400, "top_p", "top_p must be a number from 0 to 1"),
    ({"top_p": -0.5}, 400, "top_p", "top_p must be a number from 0 to 1"),
    ({"seed": -1}, 400, "seed", "seed must be an integer from 0"),
    ({"n": 0}, 400, "n", "(this server's --max-batch)"),
    ({"n": 41}, 400, "n", "(this server's --max-batch)"),
    ({"stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "up to 4"),
    ({"stop": ["x" * 4097]}, 400, "stop", "1 to 4,096 characters"),
    ({"stop": [""]}, 400, "stop", "1 to 4,096 characters"),
    ({"stream": "yes"}, 400, "stream", "true or false"),
    ({"logprobs": 6}, 400, "logprobs", "from 0 to 5"),
    ({"logprobs": "all"}, 400, "logprobs", "must be an integer"),
    ({"echo": 1}, 400, "echo", "true or false"),
    ({"echo": True, "prompt": "a" * 9000}, 400, "prompt", "at most 8,192 tokens"),
    ({"suffix": "end"}, 400, "suffix", "not supported"),
    ({"model": "gpt-4"}, 404, "model", "does not exist"),
    ({"model": None}, 400, "model", "model is required"),
]


@pytest.mark.parametrize("fields,status,param,fragment", BAD_REQUESTS)
def test_bad_requests_name_the_field(server, fields, status, param, fragment):
    status_code, body, _ = server.post({"model": MODEL_ID, "prompt": "the ", **fields})
    assert status_code == status, body
    assert body["error"]["param"] == param and fragment in body["error"]["message"], body
    assert body["error"]["type"] == "invalid_request_error"


def test_unknown_characters_get_the_cli_message(server, tiny_checkpoint, capsys):
    _, body, _ = server.post({"model": MODEL_ID, "prompt": "Hello"})
    assert main(["generate", "--checkpoint", str(tiny_checkpoint), "--prompt", "Hello"]) == 2
    assert capsys.readouterr().err.strip() == f"minigpt generate: error: {body['error']['message']}"


def test_malformed_and_oversized_bodies(server):
    status, body, _ = server.post(b"{not json")
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body, _ = server.post({"model": MODEL_ID, "prompt": "a" * (2 << 20)})
    assert status == 400 and "byte limit" in body["error"]["message"]
    status, body, _ = server.post([1, 2])
    assert status == 400 and "JSON object" in body["error"]["message"]


def test_bodies_that_once_broke_the_server_get_400_and_it_keeps_serving(server):
    """An integer beyond float range as temperature (it raised OverflowError in the scheduler and every later
    request got 503), Infinity, an integer of 5,000 digits, arrays nested 100,000 deep: each a 400 in OpenAI's
    shape, and a greedy request afterwards still gets its text."""
    before = server.post({"model": MODEL_ID, "prompt": "the ", "max_tokens": 12, "temperature": 0})[1]
    for raw in (b'{"model": "tiny", "prompt": "the ", "max_tokens": 5, "temperature": 1' + b"0" * 309 + b"}",
                b'{"model": "tiny", "prompt": "the ", "max_tokens": 5, "temperature": Infinity}',
                b'{"model": "tiny", "prompt": "the ", "max_tokens": 5, "temperature": 1e400}',
                b'{"model": "tiny", "prompt": "the ", "max_tokens": 1' + b"0" * 5000 + b"}",
                b"[" * 100_000 + b"]" * 100_000):
        status, body, _ = server.post(raw)
        assert status == 400 and body["error"]["type"] == "invalid_request_error", body
        assert server.get("/health")[0] == 200
    after = server.post({"model": MODEL_ID, "prompt": "the ", "max_tokens": 12, "temperature": 0})[1]
    assert after["choices"][0]["text"] == before["choices"][0]["text"]
    tiny = server.post({"model": MODEL_ID, "prompt": "the ", "max_tokens": 12, "temperature": 5e-324})[1]
    assert tiny["choices"][0]["text"] == before["choices"][0]["text"]  # was a row of newlines: NaN probabilities


def test_unknown_routes_methods_and_chat_answer_in_openais_error_shape(server):
    for method, path, status, fragment in (("GET", "/v1/nothing", 404, "no route /v1/nothing"),
                                           ("GET", "/v1/completions", 405, "GET is not allowed"),
                                           ("POST", "/v1/chat/completions", 404, "is a completion model")):
        code, text, _ = server.request(method, path, {"model": MODEL_ID, "messages": []})
        assert code == status and fragment in json.loads(text)["error"]["message"], text
    with pytest.raises(openai.NotFoundError, match="completion model"):
        server.client().chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "hi"}])


def test_models_health_and_metrics(server):
    assert [m.id for m in server.client().models.list().data] == [MODEL_ID]
    assert json.loads(server.get("/health")[1]) == {"status": "ok"}
    before = server.metric("minigpt_generated_tokens_total")
    server.client().completions.create(model=MODEL_ID, prompt="a", max_tokens=7)
    assert server.request("POST", "/v1/completions", {"model": MODEL_ID, "prompt": "a", "max_tokens": -1})[0] == 400
    text = server.get("/metrics")[1]
    assert server.metric("minigpt_generated_tokens_total") == before + 7
    # Greedy, the n-gram table guesses far past 3 tokens: only what the request took is counted.
    before = [server.metric(name) for name in ("minigpt_generated_tokens_total", "minigpt_draft_accepted_tokens_total")]
    for prompt in ("the ", "and ", "a"):
        server.client().completions.create(model=MODEL_ID, prompt=prompt, max_tokens=3, temperature=0)
    generated, guessed = (server.metric(name) - was for name, was in zip(
        ("minigpt_generated_tokens_total", "minigpt_draft_accepted_tokens_total"), before))
    assert generated == 9 and guessed <= 6  # a request's first token is the model's own
    for name in ("minigpt_requests_total{status=\"200\"}", "minigpt_queue_depth", "minigpt_rows_in_use",
                 "minigpt_batch_rows_bucket", "minigpt_time_to_first_token_seconds_bucket",
                 "minigpt_inter_token_latency_seconds_bucket", "minigpt_requests_total{status=\"400\"}"):
        assert name in text, name


def test_an_api_key_is_required_when_set(onnx_model, free_port):
    server = Server(onnx_model, env={"MINIGPT_API_KEY": "sesame"}, port=free_port())
    try:
        with pytest.raises(openai.AuthenticationError):
            server.client("wrong").completions.create(model=MODEL_ID, prompt="a", max_tokens=3)
        status, body, _ = server.post({"model": MODEL_ID, "prompt": "a"})
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
        assert server.get("/v1/models")[0] == 401
        assert len(server.client("sesame").completions.create(model=MODEL_ID, prompt="a", max_tokens=3)
                   .choices[0].text) == 3
    finally:
        assert server.stop()[0] == 0


def stream_lines(server, body):
    """A raw streaming request: the open connection and an iterator over its `data:` payloads."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    connection.request("POST", "/v1/completions", body=json.dumps({"model": MODEL_ID, "stream": True, **body}),
                       headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200

    def lines():
        for line in response:
            if line.startswith(b"data: "):
                yield line[6:].strip().decode()
    return connection, lines()


def test_a_full_queue_gets_429_and_a_client_that_leaves_frees_its_row(onnx_model, wait_for, free_port):
    server = Server(onnx_model, "--max-batch", "1", "--max-queue", "1", "--max-tokens", "1000000", port=free_port())
    try:
        first, events = stream_lines(server, {"prompt": "a", "max_tokens": 1_000_000})
        next(events)  # the first request holds the only row
        second = concurrent.futures.ThreadPoolExecutor(1).submit(
            server.post, {"model": MODEL_ID, "prompt": "b", "max_tokens": 3})
        assert wait_for(lambda: server.metric("minigpt_queue_depth") == 1, timeout=10)
        status, body, response = server.post({"model": MODEL_ID, "prompt": "c", "max_tokens": 3})
        assert status == 429 and response.getheader("Retry-After") == "1", body
        assert body["error"]["type"] == "rate_limit_error"

        first.sock.shutdown(socket.SHUT_RDWR)  # the client goes away mid-stream
        first.close()
        status, body, _ = second.result(timeout=30)  # its row went to the waiting request
        assert status == 200 and len(body["choices"][0]["text"]) == 3
        assert wait_for(lambda: server.metric("minigpt_rows_in_use") == 0, timeout=10)
        generated = server.metric("minigpt_generated_tokens_total")
        time.sleep(0.3)
        assert server.metric("minigpt_generated_tokens_total") == generated  # nothing decodes for nobody
    finally:
        assert server.stop()[0] == 0


def test_sigterm_lets_requests_in_flight_finish_then_exits_0(onnx_model, free_port):
    server = Server(onnx_model, "--shutdown-timeout", "30", port=free_port())
    connection, events = stream_lines(server, {"prompt": "a", "max_tokens": 3000})
    next(events)
    server.process.send_signal(signal.SIGTERM)
    payloads = list(events)
    assert payloads[-1] == "[DONE]"
    text = "".join(json.loads(p)["choices"][0]["text"] for p in payloads[:-1])
    assert len(text) == 3000 - 1  # every token but the first, read above
    while server.process.poll() is None:  # a supervisor repeating its stop, at every moment of the exit
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.005)
    code, err = server.stop()
    assert code == 0 and "Traceback" not in err, err
    with pytest.raises(OSError):
        server.get("/health")


def test_past_the_deadline_requests_are_cancelled_and_it_still_exits_0(onnx_model, free_port):
    server = Server(onnx_model, "--shutdown-timeout", "0.5", "--max-tokens", "10000000", port=free_port())
    connection, events = stream_lines(server, {"prompt": "a", "max_tokens": 10_000_000})
    next(events)
    started = time.monotonic()
    code, err = server.stop()
    assert code == 0 and "Traceback" not in err, err
    assert time.monotonic() - started < 20


@pytest.mark.slow
def test_32_concurrent_streams_each_equal_the_same_request_alone(server):
    requests = [{"prompt": ["the ", "a ", "one ", "\n"][i % 4], "max_tokens": 200, "temperature": 0.9,
                 "seed": 1000 + i, **({"extra_body": {"top_k": 8}} if i % 3 == 0 else {})} for i in range(32)]

    def stream(body):
        text, reason = "", None
        for chunk in server.client().completions.create(model=MODEL_ID, stream=True, **body):
            if chunk.choices:
                text += chunk.choices[0].text
                reason = chunk.choices[0].finish_reason or reason
        return text, reason

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        together = list(pool.map(stream, requests, timeout=240))
    assert all(reason == "length" and len(text) == 200 for text, reason in together)
    alone = [stream(body) for body in requests]
    assert together == alone


def test_speculation_in_the_server_changes_nothing_but_the_speed(tiny_checkpoint, free_port):
    """The torch engine verifies a whole batch's guesses in one extend: concurrent requests (greedy, sampled,
    top-k, with log-probabilities, stop strings, n = 2, past the block) get from a server that speculates what a
    server without a draft gives them, and the guesses were used."""
    requests = [{"prompt": ["the ", "a ", "one ", "\n"][i % 4], "max_tokens": 60 + 7 * i,
                 "temperature": [0, 0.8, 1.2][i % 3], "seed": 500 + i,
                 **({"top_p": 0.9} if i % 4 == 1 else {}), **({"top_k": 6} if i % 5 == 2 else {}),
                 **({"logprobs": 2} if i % 3 == 0 else {}), **({"stop": ["ee"]} if i % 6 == 4 else {}),
                 **({"n": 2} if i == 7 else {})} for i in range(12)]
    answers = {}
    for draft in ("auto", "none"):
        server = Server(tiny_checkpoint, "--draft", draft, port=free_port())
        try:
            with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
                bodies = list(pool.map(lambda body: server.post({"model": MODEL_ID, **body})[1], requests,
                                       timeout=240))
            answers[draft] = [[(choice["text"], choice["finish_reason"],
                                choice["logprobs"] and choice["logprobs"]["tokens"]) for choice in body["choices"]]
                              for body in bodies]
            logprobs = [[choice["logprobs"] and choice["logprobs"]["token_logprobs"] for choice in body["choices"]]
                        for body in bodies]
            answers[draft + " logprobs"] = logprobs
            accepted = server.metric("minigpt_draft_accepted_tokens_total")
        finally:
            code, err = server.stop()
        assert code == 0 and "Traceback" not in err, err
        assert (accepted > 0) == (draft == "auto")
    assert answers["auto"] == answers["none"]
    for ours, theirs in zip(sum(answers["auto logprobs"], []), sum(answers["none logprobs"], [])):
        assert ours == theirs or ours == pytest.approx(theirs, abs=1e-5)  # an extend's logits: a step's to ~1e-7


def test_bad_serve_flags_are_one_line_errors(onnx_model, cli_error, cli_without):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cli_error(["serve", "--model", str(onnx_model), "--port", str(port)], f"cannot listen on 127.0.0.1:{port}")
    cli_error(["serve", "--model", str(onnx_model), "--max-batch", "0"],
              "--max-batch: must be an integer of at least 1")
    cli_error(["serve", "--model", str(onnx_model), "--shutdown-timeout", "-1"], "--shutdown-timeout")
    cli_error(["serve", "--model", str(onnx_model), "--device", "cuda"], "the onnx engine runs on the CPU")
    result = cli_without("uvicorn", ["serve", "--model", str(onnx_model)])
    assert result.returncode == 2 and "pip install 'minigpt[serve]'" in result.stderr, result.stderr


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the failure, as logged
def test_an_engine_that_fails_ends_its_requests_with_500_and_later_ones_with_503(onnx_model, wait_for, free_port):
    """In process: the app around an engine whose decode breaks on its third step."""
    from minigpt.export.onnx_engine import OnnxEngine

    class Breaking(OnnxEngine):
        steps = 0

        def extend(self, ids, start_pos, first_row=0, last_only=False):
            Breaking.steps += 1
            if Breaking.steps == 4:  # the prefill, then the third decode step
                raise RuntimeError("a broken engine")
            return super().extend(ids, start_pos, first_row, last_only)

    with in_process(Breaking(onnx_model), free_port(), wait_for) as probe:
        status, body, _ = probe.post({"model": MODEL_ID, "prompt": "a", "max_tokens": 10})
        assert status == 500 and "the engine failed" in body["error"]["message"], body
        status, body, _ = probe.post({"model": MODEL_ID, "prompt": "a", "max_tokens": 10})
        assert status == 503 and body["error"]["code"] == "engine_stopped", body
        assert probe.get("/health")[0] == 503


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_request_whose_sampling_fails_fails_alone(onnx_model, wait_for, free_port, monkeypatch):
    """In process: sampling breaks for one request's parameters; it gets a 500, the others go on."""
    from minigpt.export.onnx_engine import OnnxEngine
    from minigpt.fast_sampling import FastSampler

    real = FastSampler.pick

    def fragile(self, logits, draws):
        if self.temperature == 1.25:
            raise FloatingPointError("a broken sampler")
        return real(self, logits, draws)

    monkeypatch.setattr(FastSampler, "pick", fragile)
    with in_process(OnnxEngine(onnx_model), free_port(), wait_for) as probe:
        status, body, _ = probe.post({"model": MODEL_ID, "prompt": "a", "max_tokens": 10, "temperature": 1.25})
        assert status == 500 and "sampling failed for this request" in body["error"]["message"], body
        status, body, _ = probe.post({"model": MODEL_ID, "prompt": "a", "max_tokens": 10, "temperature": 0})
        assert status == 200 and body["usage"]["completion_tokens"] == 10, body
        assert probe.get("/health")[0] == 200


def test_a_stopped_server_can_start_again_on_its_port_at_once(onnx_model, free_port):
    first = Server(onnx_model, port=free_port())
    # The server closes this connection first, so the port keeps it in TIME_WAIT after the server is gone.
    assert first.post({"model": MODEL_ID, "prompt": "a", "max_tokens": 3}, headers={"Connection": "close"})[0] == 200
    assert first.stop()[0] == 0
    again = Server(onnx_model, port=first.port)
    try:
        assert again.post({"model": MODEL_ID, "prompt": "a", "max_tokens": 3})[0] == 200
    finally:
        assert again.stop()[0] == 0


@pytest.fixture(scope="module")
def strict_server(onnx_model, free_port):
    """A server with a short read deadline and few connections, to be held to them."""
    with running(onnx_model, "--read-timeout", 1, "--max-connections", 24, port=free_port(), clean=True) as server:
        yield server


def open_connections(port, count, first_bytes=b""):
    sockets = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(first_bytes)
        sockets.append(sock)
    return sockets


def answer(sock) -> bytes:
    """What the server sends before it closes the connection."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_slow_and_silent_connections_are_cut_while_a_client_is_served(strict_server):
    greedy = {"model": MODEL_ID, "prompt": "the ", "max_tokens": 10, "temperature": 0}
    expected = strict_server.post(greedy)[1]["choices"][0]["text"]
    silent = open_connections(strict_server.port, 10)
    slow = open_connections(strict_server.port, 10, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-")
    started = time.monotonic()
    status, body, _ = strict_server.post(greedy)
    assert status == 200 and body["choices"][0]["text"] == expected and time.monotonic() - started < 1
    for sock in silent + slow:  # each answered 408 within the read timeout (and a little), then closed
        reply = answer(sock)
        assert reply.startswith(b"HTTP/1.1 408") and b"did not arrive within 1 s" in reply, reply
        sock.close()
    assert time.monotonic() - started < 5


def test_connections_past_the_cap_get_503_at_once(strict_server):
    held = open_connections(strict_server.port, 24)  # the cap
    try:
        extra = open_connections(strict_server.port, 3)
        for sock in extra:
            reply = answer(sock)
            assert reply.startswith(b"HTTP/1.1 503") and b"too_many_connections" in reply, reply
            sock.close()
    finally:
        for sock in held:
            sock.close()
    assert strict_server.healthy()


def test_a_head_over_the_limit_gets_431_and_a_stalled_body_408(strict_server):
    (sock,) = open_connections(strict_server.port, 1, b"GET /health HTTP/1.1\r\nX-Big: ")
    with contextlib.suppress(OSError):  # the server may close before the last of it is written
        for _ in range(64):
            sock.sendall(b"a" * 16384)
    reply = answer(sock)
    assert reply.startswith(b"HTTP/1.1 431") and b"65,536-byte limit" in reply, reply
    (sock,) = open_connections(strict_server.port, 1, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                                                      b"Content-Type: application/json\r\nContent-Length: 100\r\n"
                                                      b"\r\n{\"model\": ")
    reply = answer(sock)
    assert reply.startswith(b"HTTP/1.1 408") and b"the request body did not arrive within 1 s" in reply, reply


def test_a_client_that_leaves_mid_body_costs_one_log_line(onnx_model, free_port):
    server = Server(onnx_model, port=free_port())
    for _ in range(3):
        (sock,) = open_connections(server.port, 1, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                                                   b"Content-Length: 1000\r\n\r\n{\"model\": ")
        time.sleep(0.2)
        sock.close()
    time.sleep(0.5)
    assert server.healthy()
    code, err = server.stop()
    assert code == 0 and "Traceback" not in err, err
    assert err.count("went away while sending its request body") == 3, err


FIELDS = {"model": st.sampled_from([MODEL_ID, "other"]), "prompt": st.text(alphabet="the quick", max_size=40),
          "max_tokens": st.integers(-2, 70), "n": st.integers(-1, 10), "temperature": st.floats(-1, 3),
          "top_p": st.floats(-0.5, 1.5), "top_k": st.integers(-1, 80), "seed": st.integers(-5, 2**70),
          "stop": st.lists(st.text(max_size=5), max_size=6), "stream": st.booleans(), "echo": st.booleans(),
          "logprobs": st.integers(-1, 7), "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()})}
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                  max_size=4), max_leaves=12)


@st.composite
def request_bodies(draw):
    """Bodies near the API (each field plausible, or any JSON at all), and now and then not an object."""
    if draw(st.integers(0, 9)) == 0:
        return draw(JSON)
    names = draw(st.lists(st.sampled_from(sorted(FIELDS)), unique=True, max_size=len(FIELDS)))
    return {name: draw(FIELDS[name] | JSON if draw(st.integers(0, 4)) == 0 else FIELDS[name]) for name in names}


GREEDY = {"model": MODEL_ID, "prompt": "the ", "max_tokens": 8, "temperature": 0}


@pytest.fixture(scope="module")
def fuzzed_server(onnx_model, free_port):
    with running(onnx_model, "--max-tokens", 64, "--max-batch", 12, port=free_port(), clean=True) as server:
        server.greedy_text = server.post(GREEDY)[1]["choices"][0]["text"]
        yield server


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=request_bodies())
def test_no_request_body_breaks_the_server(fuzzed_server, body):
    """Whatever the body: never a 500, every error in OpenAI's shape, and afterwards /health is 200 and a fixed
    greedy request still gets its text."""
    status, text, _ = fuzzed_server.request("POST", "/v1/completions", json.dumps(body).encode())
    assert status in (200, 400, 404), (status, text)
    if status != 200:
        error = json.loads(text)["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    elif isinstance(body, dict) and body.get("stream") is True:
        assert text.endswith("data: [DONE]\n\n"), text[-200:]
    else:
        assert json.loads(text)["choices"]
    assert fuzzed_server.get("/health")[0] == 200
    assert fuzzed_server.post(GREEDY)[1]["choices"][0]["text"] == fuzzed_server.greedy_text
