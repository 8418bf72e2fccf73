"""A `minigpt serve` for tests: raw HTTP and the openai client against a localhost port, the server in a
subprocess or on a thread of the test's own process."""

import contextlib
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import time

import openai

MODEL_ID = "tiny"


class Client:
    """Raw HTTP and the openai client against a server on a localhost port."""

    def __init__(self, port):
        self.port = port

    def healthy(self) -> bool:
        try:
            return self.get("/health")[0] == 200
        except OSError:
            return False

    def request(self, method, path, body=None, headers=None):
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        connection.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        response = connection.getresponse()
        return response.status, response.read().decode(), response

    def get(self, path):
        return self.request("GET", path)

    def post(self, body, **kwargs):
        status, text, response = self.request("POST", "/v1/completions", body, **kwargs)
        return status, json.loads(text), response

    def client(self, api_key="none"):
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=api_key, max_retries=0)

    def metric(self, name) -> float:
        text = self.get("/metrics")[1]
        return float(re.search(rf"^{name} (\S+)$", text, flags=re.M).group(1))


class Server(Client):
    """`minigpt serve` in a subprocess, ready once /health answers."""

    def __init__(self, model, *flags, port, env=None):
        super().__init__(port)
        self.process = subprocess.Popen([sys.executable, "-m", "minigpt", "serve", "--model", str(model),
                                         "--port", str(self.port), *map(str, flags)],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        env={**os.environ, **(env or {})})
        deadline = time.monotonic() + 60
        while not self.healthy():
            assert self.process.poll() is None, self.process.communicate()[1]
            assert time.monotonic() < deadline, "the server never became healthy"
            time.sleep(0.1)

    def stop(self, timeout=60):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        out, err = self.process.communicate(timeout=timeout)
        return self.process.returncode, err


@contextlib.contextmanager
def running(model, *flags, port, clean=False):
    """A `Server` for a with-block (a module's fixture): once the block ends it must stop with exit code 0 and,
    when `clean`, no traceback on stderr."""
    server = Server(model, *flags, port=port)
    yield server
    code, err = server.stop()
    assert code == 0 and not (clean and "Traceback" in err), err


@contextlib.contextmanager
def in_process(engine, port, wait_for):
    """The app around `engine` served by uvicorn on a thread of this process (so a test can break the engine or
    the sampler); yields a Client once /health answers."""
    import threading

    import uvicorn

    from minigpt.serve import create_app

    server = uvicorn.Server(uvicorn.Config(create_app(engine, engine.tokenizer, model_id=MODEL_ID), port=port,
                                           log_level="critical", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        probe = Client(port)
        assert wait_for(probe.healthy, timeout=30)
        yield probe
    finally:
        server.should_exit = True
        thread.join(timeout=30)




def generate_cli(model, *flags):
    """What `minigpt generate --model MODEL FLAGS` prints."""
    result = subprocess.run([sys.executable, "-m", "minigpt", "generate", "--model", str(model), *map(str, flags)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout
