"""The playground page of `minigpt serve`, in a real browser: Playwright driving headless Chromium against a
real server on a free localhost port. Screenshots go to the test's temporary folder."""

import json
import math
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

pytest.importorskip("uvicorn", reason="minigpt serve needs the serve extra")
sync_api = pytest.importorskip("playwright.sync_api", reason="the page is tested with Playwright (the test extra)")

from serving import Server, generate_cli, running  # noqa: E402

pytestmark = pytest.mark.slow
CHROMIUM_NAMES = ("chromium", "chromium-browser")


def chromium_path() -> str:
    """Debian's chromium (Playwright's own browser download does not work everywhere); installed with apt-get
    when it is missing and this user may, so the README's test command sets up all the suite needs."""
    found = next(filter(None, map(shutil.which, CHROMIUM_NAMES)), None)
    if found is None and shutil.which("apt-get") and os.geteuid() == 0:
        install = ["apt-get", "install", "-y", "-q", "chromium"]
        if subprocess.run(install, capture_output=True, timeout=600).returncode != 0:  # no package lists yet
            subprocess.run(["apt-get", "update", "-q"], capture_output=True, timeout=600)
            subprocess.run(install, capture_output=True, timeout=600)
        found = next(filter(None, map(shutil.which, CHROMIUM_NAMES)), None)
    if found is None:
        pytest.skip("the browser tests need Chromium: apt-get install chromium")
    return found


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def checkpoint_server(tiny_checkpoint, free_port):
    with running(tiny_checkpoint, port=free_port(), clean=True) as server:
        yield server


@pytest.fixture
def page(browser, tmp_path):
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    yield page
    page.screenshot(path=str(tmp_path / "playground.png"), full_page=True)
    page.close()


def fill(page, **fields):
    for name, value in fields.items():
        page.fill(f"#{name}", str(value))


def generate(page, **fields):
    fill(page, **fields)
    page.click("#generate")
    page.wait_for_function("!document.querySelector('#generate').disabled", timeout=30_000)


def test_the_page_writes_what_minigpt_generate_writes_and_explains_a_character(checkpoint_server, tiny_checkpoint,
                                                                              page):
    missing = []
    page.on("response", lambda response: response.status >= 400 and missing.append(response.url))
    page.goto(f"http://127.0.0.1:{checkpoint_server.port}/")
    generate(page, prompt="the ", temperature=0.8, top_p=0.95, seed=3, max_tokens=40)
    assert not page.is_visible("#error")
    assert not missing, missing  # the page asks for nothing the server lacks (its icon included)
    printed = generate_cli(tiny_checkpoint, "--prompt", "the ", "--max-new-tokens", 40, "--temperature", 0.8,
                           "--top-p", 0.95, "--seed", 3)
    assert page.text_content("#text") + "\n" == printed

    # The page's alternatives are the API's top_logprobs for the same request, with the rest as "all others".
    _, body, _ = checkpoint_server.post({"model": "tiny", "prompt": "the ", "max_tokens": 40, "temperature": 0.8,
                                         "top_p": 0.95, "seed": 3, "logprobs": 5})
    api = body["choices"][0]["logprobs"]
    for index in (0, 7, 39):
        page.click(f'.char[data-index="{index}"]')
        shown = [float(p) for p in page.eval_on_selector_all("#alternatives tr", "rows => rows.map(r => "
                                                                                 "r.dataset.probability)")]
        expected = sorted(map(math.exp, api["top_logprobs"][index].values()), reverse=True)
        # To rounding: the two requests may find a token in different verify steps (logits equal to ~1e-7).
        assert shown[:-1] == pytest.approx(expected, abs=1e-6) and sum(shown[:-1]) <= 1 + 1e-9
        assert sum(shown) == pytest.approx(1)
        written = page.text_content("#alternatives tr.sampled td")
        assert written.startswith({" ": "␣", "\n": "↵"}.get(api["tokens"][index], api["tokens"][index]))
        greedy = max(api["top_logprobs"][index], key=api["top_logprobs"][index].get)
        verdict = page.text_content("#verdict")
        assert ("greedy decoding writes it too" in verdict) == (greedy == api["tokens"][index])
        # Attention: a row per layer and head over the characters read, each row a distribution.
        page.wait_for_selector("#attention tr.head")
        weights = "rows => rows.map(r => [...r.querySelectorAll('td[data-weight]')].map(c => Number(c.dataset.weight)))"
        rows = page.eval_on_selector_all("#attention tr.head", weights)
        assert len(rows) == 2 * 2 and all(len(row) == min(16, 4 + index) for row in rows)
        assert all(sum(row) == pytest.approx(1, abs=1e-4) for row in rows)


def test_stop_frees_the_row_and_bad_input_is_shown_inline(checkpoint_server, page, wait_for):
    page.goto(f"http://127.0.0.1:{checkpoint_server.port}/")
    fill(page, prompt="the ", max_tokens=4000, temperature=1)
    page.click("#generate")
    page.wait_for_selector('.char[data-index="20"]')
    assert checkpoint_server.metric("minigpt_rows_in_use") == 1
    page.click("#stop")
    assert wait_for(lambda: checkpoint_server.metric("minigpt_rows_in_use") == 0, timeout=10)
    page.wait_for_function("!document.querySelector('#generate').disabled")
    assert "server:" in page.text_content("#live")

    generate(page, prompt="THE ")
    assert page.is_visible("#error") and "never saw" in page.text_content("#error")


def test_the_pages_controls_change_what_it_streams(checkpoint_server, tiny_checkpoint, page):
    """Min-p, the penalties and a pattern go into the request: the page writes what `minigpt generate` writes
    with the same flags, and each changes the text it streams."""
    page.goto(f"http://127.0.0.1:{checkpoint_server.port}/")
    generate(page, prompt="the ", temperature=0, max_tokens=30)
    greedy = page.text_content("#text")
    page.click("details.more summary")
    generate(page, repetition_penalty=1.8, presence_penalty=0.5, frequency_penalty=0.5)
    penalised = page.text_content("#text")
    assert penalised != greedy and penalised + "\n" == generate_cli(
        tiny_checkpoint, "--prompt", "the ", "--max-new-tokens", 30, "--temperature", 0, "--repetition-penalty",
        1.8, "--presence-penalty", 0.5, "--frequency-penalty", 0.5)
    generate(page, guided_regex="[a-z]+ (fox|dog)\\.")
    constrained = page.text_content("#text")
    assert re.fullmatch(r"the [a-z]+ (fox|dog)\.", constrained) and not page.is_visible("#error")
    generate(page, guided_regex="", repetition_penalty=1, presence_penalty=0, frequency_penalty=0, temperature=1,
             seed=2, min_p=0.5)
    assert page.text_content("#text") + "\n" == generate_cli(tiny_checkpoint, "--prompt", "the ", "--max-new-tokens",
                                                             30, "--seed", 2, "--min-p", 0.5)
    generate(page, guided_regex="(")
    assert page.is_visible("#error") and "not a valid regular expression" in page.text_content("#error")


def test_with_an_onnx_model_the_attention_view_says_why_it_is_absent(tiny_onnx, free_port, browser, tmp_path):
    server = Server(tiny_onnx, port=free_port())
    try:
        page = browser.new_page()
        page.goto(f"http://127.0.0.1:{server.port}/")
        generate(page, prompt="the ", max_tokens=5, temperature=1.5, seed=5)  # this seed writes "it\n\n."
        assert page.get_attribute('.char[data-index="2"]', "class") == "char newline"
        page.click('.char[data-index="2"]')  # a newline has a mark of its own to be clicked on
        assert page.text_content("#chosen") == "↵"
        page.wait_for_function("document.querySelector('#attention-note').textContent.length > 0")
        assert "need the PyTorch engine" in page.text_content("#attention-note")
        assert page.eval_on_selector_all("#alternatives tr", "rows => rows.length") == 6
        page.screenshot(path=str(tmp_path / "onnx.png"))
    finally:
        assert server.stop()[0] == 0


def test_the_api_key_protects_the_pages_calls(tiny_onnx, free_port, browser):
    server = Server(tiny_onnx, "--api-key", "s3cret", port=free_port())
    try:
        page = browser.new_page()
        page.goto(f"http://127.0.0.1:{server.port}/")
        page.wait_for_selector("#key-row:not([hidden])")
        assert "API key is required" in page.text_content("#error")
        fill(page, api_key="s3cret")
        generate(page, prompt="the ", max_tokens=5, temperature=0)
        assert not page.is_visible("#error") and len(page.text_content("#text")) == 4 + 5
    finally:
        assert server.stop()[0] == 0


def test_attention_is_the_models_own_for_the_last_position_of_the_last_block(checkpoint_server, tiny_loaded):
    import torch

    from minigpt.attention_maps import attention_maps

    text = "the quick brown fox jumps"  # 25 characters: the model reads the last 16
    _, body, _ = checkpoint_server.request("POST", "/v1/attention", {"model": "tiny", "prompt": text})
    body = json.loads(body)
    ids = tiny_loaded.tokenizer.encode(text)[-16:]
    with torch.no_grad():
        maps = attention_maps(tiny_loaded.model, torch.tensor([ids]))[:, 0, :, -1].numpy()
    assert body["tokens"] == list(text[-16:])
    np.testing.assert_allclose(np.array(body["weights"]), maps, atol=1e-6)
    status, text, _ = checkpoint_server.request("POST", "/v1/attention", {"model": "tiny", "prompt": ["a", "b"]})
    assert status == 400 and "give one prompt" in json.loads(text)["error"]["message"]


def test_the_page_is_served_offline_from_the_package(checkpoint_server):
    status, html, response = checkpoint_server.get("/")
    assert status == 200 and response.getheader("content-type").startswith("text/html")
    assert "http" not in html.replace("http-equiv", "")  # nothing fetched from another host
    for name, kind in (("/playground.js", "text/javascript"), ("/playground.css", "text/css")):
        status, text, response = checkpoint_server.get(name)
        assert status == 200 and response.getheader("content-type").startswith(kind) and "http://" not in text
    js = checkpoint_server.get("/playground.js")[1]
    assert len(js.splitlines()) < 400
    status, icon, response = checkpoint_server.get("/favicon.svg")  # the page's icon: no 404 on every load
    assert status == 200 and response.getheader("content-type") == "image/svg+xml" and "<svg" in icon
    assert 'rel="icon" href="/favicon.svg"' in html
    _, text, _ = checkpoint_server.request("POST", "/v1/attention", {"model": "tiny", "prompt": "THE"})
    assert "never saw" in json.loads(text)["error"]["message"]


def test_a_subword_model_shows_each_tokens_odds(bpe_checkpoint, free_port, browser, tmp_path):
    """A BPE token writes several characters, or none while a character's bytes arrive: the page shows one
    piece a token that writes text, with the odds the API gives that token."""
    prompt, sampling = "naïve 😀 the", {"temperature": 1.0, "seed": 3}
    server = Server(bpe_checkpoint, port=free_port())
    try:
        page = browser.new_page()
        page.goto(f"http://127.0.0.1:{server.port}/")
        generate(page, prompt=prompt, max_tokens=40, **sampling)
        printed = generate_cli(bpe_checkpoint, "--prompt", prompt, "--max-new-tokens", 40, "--temperature", 1.0,
                               "--seed", 3)
        assert page.text_content("#text") + "\n" == printed
        _, body, _ = server.post({"model": "bpe", "prompt": prompt, "max_tokens": 40, "logprobs": 5, **sampling})
        api = body["choices"][0]["logprobs"]
        pieces = page.eval_on_selector_all(".char", "spans => spans.map(s => [Number(s.dataset.index), s.textContent])")
        offsets = api["text_offset"] + [len(prompt) + len(body["choices"][0]["text"])]
        text = prompt + body["choices"][0]["text"]
        assert pieces == [[i, text[offsets[i]:offsets[i + 1]]] for i in range(40) if offsets[i + 1] > offsets[i]]
        # A token of several characters, among its five likeliest (the page marks it in its table).
        index = next(i for i, piece in pieces if len(piece) > 1 and api["tokens"][i] in api["top_logprobs"][i])
        page.click(f'.char[data-index="{index}"]')
        shown = page.eval_on_selector_all("#alternatives tr", "rows => rows.map(r => Number(r.dataset.probability))")
        expected = sorted(map(math.exp, api["top_logprobs"][index].values()), reverse=True)
        assert shown[:-1] == pytest.approx(expected, abs=1e-6)
        sampled = page.text_content("#alternatives tr.sampled td")
        assert sampled == api["tokens"][index].replace(" ", "␣") + " (written)"
        page.screenshot(path=str(tmp_path / "bpe.png"))
    finally:
        assert server.stop()[0] == 0
