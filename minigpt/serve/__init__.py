"""`minigpt serve`: an OpenAI-compatible completions server with continuous batching, in three rooms.

- `protocol`: request bodies in, response shapes out (pure functions).
- `scheduler`: one thread that owns the engine: admission, one step, delivery.
- `http`: the Starlette routes and uvicorn, with the graceful shutdown.

`stop_strings` matches stop strings a character at a time; `metrics` counts.
"""

from minigpt.serve.http import create_app, serve

__all__ = ["create_app", "serve"]
