"""What continuous batching buys: `minigpt serve` under 1, 8 and 32 concurrent streaming clients.

The default model (random weights, exported to ONNX) is served by `minigpt
serve` in its own process, as a user runs it. The load is always the same 64
streaming requests of 200 tokens, split among 1, 8 or 32 clients that each
send their share back to back: one client is the load served one request at
a time, 32 clients is what continuous batching makes of it. For each:
aggregate tokens/s, and p50/p95 time to first token and inter-token latency
as the clients see them (in `extra_info` and the summary). A second benchmark sends 1,000 requests one after another and
records the server's resident memory before and after.
"""

import asyncio
import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from minigpt.config import GPTConfig
from minigpt.model import MiniGPT

pytest.importorskip("uvicorn", reason="minigpt serve needs the serve extra: pip install 'minigpt[serve]'")

NEW_TOKENS = 200
REQUESTS = 64
CLIENTS = [1, 8, 32]
PROMPTS = ["THE ", "A ", "IN ", "IT "]  # the vocabulary is chr(32) .. chr(96): capitals


@pytest.fixture(scope="module")
def served_model(tmp_path_factory):
    """The default config with random weights and a vocabulary of 65 printable characters, exported to ONNX."""
    import torch

    from minigpt.checkpoint import save_checkpoint
    from minigpt.export.onnx_export import export_onnx
    from minigpt.tokenizer import CharTokenizer

    torch.manual_seed(0)
    model = MiniGPT(GPTConfig(vocab_size=65)).eval()
    folder = tmp_path_factory.mktemp("serve")
    save_checkpoint(folder / "model.safetensors", model, CharTokenizer(map(chr, range(32, 97))))
    export_onnx(folder / "model.safetensors", folder / "model.onnx", verify=False)
    return folder / "model.onnx"


@contextlib.contextmanager
def serving(model, *flags):
    """`minigpt serve` in its own process on a free localhost port; yields the port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "minigpt", "serve", "--model", str(model), "--port", str(port),
                                *flags], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not _healthy(port):
            assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
            time.sleep(0.1)
        yield port, process.pid
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=60)


def _healthy(port) -> bool:
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        connection.request("GET", "/health")
        return connection.getresponse().status == 200
    except OSError:
        return False


async def stream_once(port, body) -> tuple[list[float], str]:
    """Send one streaming request; return the arrival time of each token's chunk (the send time first) and
    the text."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    payload = json.dumps({"model": "model", "stream": True, **body}).encode()
    times = [time.perf_counter()]
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(payload), payload))
    status = await reader.readline()
    assert b" 200 " in status, status + await reader.read()
    # Whole events in whatever arrived: an event carries one or more characters (a speculative step hands out
    # every guess a row accepted at once), each of which arrived then.
    pending, text = b"", ""
    while data := await reader.read(1 << 16):
        now = time.perf_counter()
        *events, pending = (pending + data).split(b"\n\n")
        for event in events:
            start = event.find(b"data: {")
            if start >= 0:
                piece = json.loads(event[start + 6:])["choices"][0]["text"]
                times += [now] * len(piece)
                text += piece
    writer.close()
    assert len(times) == 1 + body.get("max_tokens", NEW_TOKENS), "a truncated stream"
    return times, text


def run_load(port, requests_per_client: list[list[dict]]) -> dict:
    """Each client sends its requests back to back; all clients start together. One asyncio loop plays every
    client, so no client waits on another for a thread's turn and the times are when the bytes arrived."""
    async def client(requests):
        return [await stream_once(port, body) for body in requests]

    async def all_clients():
        return await asyncio.gather(*(client(requests) for requests in requests_per_client))

    start = time.perf_counter()
    answers = asyncio.run(all_clients())
    wall = time.perf_counter() - start
    timings = [times for client_answers in answers for times, _ in client_answers]
    texts = {(body["prompt"], body["seed"], body.get("logprobs")): text  # what each request got, by request
             for requests, client_answers in zip(requests_per_client, answers)
             for body, (_, text) in zip(requests, client_answers)}
    first_token = [times[1] - times[0] for times in timings]
    between = np.concatenate([np.diff(times[1:]) for times in timings])
    return {"tokens_per_s": sum(len(times) - 1 for times in timings) / wall, "wall_s": wall,
            "ttft_p50_ms": 1e3 * float(np.percentile(first_token, 50)),
            "ttft_p95_ms": 1e3 * float(np.percentile(first_token, 95)),
            "itl_p50_ms": 1e3 * float(np.percentile(between, 50)),
            "itl_p95_ms": 1e3 * float(np.percentile(between, 95)), "texts": texts}


def requests_for(clients: int, total: int = REQUESTS, **fields) -> list[list[dict]]:
    """The same `total` requests (prompt and seed fixed by the request's number), dealt to `clients`."""
    bodies = [{"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": NEW_TOKENS, "temperature": 0.8, "seed": i,
               **fields} for i in range(total)]
    return [bodies[c::clients] for c in range(clients)]


@pytest.mark.parametrize("clients", CLIENTS)
def test_serving_throughput_and_latency(benchmark, served_model, record_throughput, clients):
    """The same load from 1, 8 and 32 clients; the ratio to clients-1 is what batching buys."""
    load = f"clients-{clients}"
    benchmark.group = "serve default (onnx)"
    with serving(served_model, "--max-batch", str(max(CLIENTS))) as (port, _):
        warm_up = run_load(port, requests_for(clients, total=clients))  # sessions, bindings, connections
        result = benchmark.pedantic(run_load, args=(port, requests_for(clients)), rounds=1, iterations=1)
    texts = result.pop("texts")
    assert len(texts) == REQUESTS and all(len(text) == NEW_TOKENS for text in texts.values())
    assert all(texts[request] == text for request, text in warm_up["texts"].items())  # a seed's text, any load
    benchmark.extra_info.update(result)
    record_throughput(benchmark, load, REQUESTS * NEW_TOKENS)
    print(f"\n{load}: {result['tokens_per_s']:,.0f} tokens/s; time to first token p50 {result['ttft_p50_ms']:.1f} ms, "
          f"p95 {result['ttft_p95_ms']:.1f} ms; between tokens p50 {result['itl_p50_ms']:.2f} ms, "
          f"p95 {result['itl_p95_ms']:.2f} ms")


def test_logprobs_cost_at_32_clients(benchmark, served_model):
    """The load of 32 clients with `logprobs: 5` on every request against the same load without, alternating
    on one server (plain, logprobs, plain, logprobs); the ratio of the medians is in `extra_info`."""
    benchmark.group = "serve logprobs"
    with serving(served_model, "--max-batch", "32") as (port, _):
        run_load(port, requests_for(32, total=32, logprobs=5))  # warm-up
        rates, texts = {"plain": [], "logprobs": []}, {"plain": [], "logprobs": []}

        def alternate():
            for _ in range(2):
                for name, fields in (("plain", {}), ("logprobs", {"logprobs": 5})):
                    result = run_load(port, requests_for(32, **fields))
                    rates[name].append(result["tokens_per_s"])
                    texts[name].append(sorted(result["texts"].values()))

        benchmark.pedantic(alternate, rounds=1, iterations=1)
    assert texts["plain"][0] == texts["logprobs"][0] == texts["logprobs"][1]  # scores never change the text
    plain, scored = (float(np.median(rates[name])) for name in ("plain", "logprobs"))
    benchmark.extra_info.update(plain_tokens_per_s=plain, logprobs_tokens_per_s=scored, cost=plain / scored)
    print(f"\n32 clients: {plain:,.0f} tokens/s plain, {scored:,.0f} with logprobs 5: they cost {plain / scored:.2f}x")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="reads the server's CPU time from /proc")
def test_the_playground_costs_the_server_what_an_sse_client_does(benchmark, served_model):
    """The server's CPU time per token while the playground page (headless Chromium) streams 2,000 tokens,
    against an SSE client sending the same request (`logprobs: 5`), alternating twice; in `extra_info`."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="the page is driven with Playwright")
    chromium = next(filter(None, map(shutil.which, ("chromium", "chromium-browser"))), None)
    if chromium is None:
        pytest.skip("needs Chromium: apt-get install chromium")
    tokens, body = 2000, {"prompt": "THE ", "max_tokens": 2000, "temperature": 0.8, "seed": 1, "logprobs": 5}
    costs = {"page": [], "sse client": []}
    with serving(served_model) as (port, pid), sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(f"http://127.0.0.1:{port}/")

        def through_page():
            for name, value in (("prompt", "THE "), ("max_tokens", tokens), ("temperature", 0.8), ("seed", 1)):
                page.fill(f"#{name}", str(value))
            page.click("#generate")
            page.wait_for_function("!document.querySelector('#generate').disabled", timeout=120_000)
            assert page.eval_on_selector_all(".char", "chars => chars.length") == tokens

        def through_client():  # plain blocking HTTP: Playwright's event loop runs on this thread
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            connection.request("POST", "/v1/completions", json.dumps({"model": "model", "stream": True, **body}),
                               {"Content-Type": "application/json"})
            events = [json.loads(line[6:]) for line in connection.getresponse().read().decode().splitlines()
                      if line.startswith("data: {")]  # a step that keeps a draft's guesses sends them together
            assert sum(len(event["choices"][0]["logprobs"]["tokens"]) for event in events) == tokens

        def alternate():
            for _ in range(2):
                for name, run in (("page", through_page), ("sse client", through_client)):
                    before = cpu_seconds(pid)
                    run()
                    costs[name].append((cpu_seconds(pid) - before) / tokens)

        through_client()  # warm-up
        benchmark.pedantic(alternate, rounds=1, iterations=1)
        browser.close()
    page_cost, client_cost = (1e6 * float(np.median(costs[name])) for name in ("page", "sse client"))
    benchmark.extra_info.update(page_us_per_token=page_cost, client_us_per_token=client_cost)
    print(f"\nserver CPU per token: {page_cost:.0f} µs through the page, {client_cost:.0f} µs for an SSE client "
          f"({page_cost / client_cost:.2f}x)")


def resident_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads resident memory from /proc")
def test_memory_over_1000_sequential_requests(benchmark, served_model):
    """RSS of the server after 50 warm-up requests and after 1,000 more (in `extra_info`)."""
    benchmark.group = "serve memory"
    body = json.dumps({"model": "model", "prompt": "THE ", "max_tokens": 20, "seed": 1}).encode()

    def send(port, count):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        for _ in range(count):
            connection.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            assert response.status == 200 and len(json.loads(response.read())["choices"][0]["text"]) == 20

    with serving(served_model) as (port, pid):
        send(port, 50)
        before = resident_mb(pid)
        benchmark.pedantic(send, args=(port, 1000), rounds=1, iterations=1)
        after = resident_mb(pid)
    benchmark.extra_info.update(rss_before_mb=before, rss_after_mb=after)
    print(f"\nserver RSS: {before:.1f} MB after 50 requests, {after:.1f} MB after 1,000 more")


SOAK_REQUESTS, SOAK_CLIENTS, SOAK_SAMPLE = 15_000, 20, 500  # a sample is a whole number of rounds of clients


def soak_body(number: int) -> dict:
    """Request `number` of the soak: a prompt of its own length, and by turn streamed, with logprobs, echoed
    and scored, two choices, a stop string, sampled or greedy; every tenth streamed one is abandoned."""
    prompt = "".join(chr(65 + (number * 7 + i) % 26) for i in range(1 + number % 60))
    kinds = [{"stream": True}, {"logprobs": 3}, {"echo": True, "logprobs": 1, "max_tokens": 0}, {"n": 2},
             {"stop": ["E"]}, {"temperature": 0}]
    return {"model": "model", "prompt": prompt, "max_tokens": 16, "temperature": 0.8, "seed": number,
            **kinds[number % len(kinds)]}


async def soak_request(port, number: int) -> bool:
    """Send request `number`; True when it was answered whole (or abandoned on purpose after its first bytes)."""
    body = soak_body(number)
    payload = json.dumps(body).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(payload), payload))
    status = await reader.readline()
    if body.get("stream") and number % 60 == 0:  # a client that leaves mid-response
        writer.close()
        return b" 200 " in status
    answer = await reader.read()
    writer.close()
    return b" 200 " in status and (b"data: [DONE]" in answer if body.get("stream") else b'"choices"' in answer)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads resident memory from /proc")
def test_memory_levels_off_under_a_mixed_soak(benchmark, served_model):
    """SOAK_REQUESTS mixed requests (`soak_body`), SOAK_CLIENTS at a time: the server's RSS every SOAK_SAMPLE
    requests (`extra_info`); what it grows by over the second half is what a leak would show."""
    benchmark.group = "serve memory"
    samples = []
    total = SOAK_REQUESTS if benchmark.enabled else 2 * SOAK_SAMPLE  # a short soak checks the answers alone

    async def soak(port, pid):
        done, answered = 0, 0
        for first in range(0, total, SOAK_SAMPLE):
            for batch in range(first, first + SOAK_SAMPLE, SOAK_CLIENTS):
                results = await asyncio.gather(*(soak_request(port, n) for n in range(batch, batch + SOAK_CLIENTS)))
                answered += sum(results)
                done += len(results)
            samples.append((done, resident_mb(pid)))
        return answered

    with serving(served_model, "--max-batch", str(SOAK_CLIENTS)) as (port, pid):
        answered = benchmark.pedantic(lambda: asyncio.run(soak(port, pid)), rounds=1, iterations=1)
        assert _healthy(port)
    assert answered == total
    growth = samples[-1][1] - samples[len(samples) // 2 - 1][1]
    benchmark.extra_info.update(rss_mb=[round(rss, 1) for _, rss in samples], second_half_growth_mb=growth)
    print("\nserver RSS (MB) every", SOAK_SAMPLE, "requests:", " ".join(f"{rss:.1f}" for _, rss in samples))
    if benchmark.enabled:
        assert growth < 4, f"RSS grew {growth:.1f} MB over the second half of the soak"
