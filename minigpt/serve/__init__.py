"""`minigpt serve`: an OpenAI-compatible completions server with continuous batching, in three rooms.

- `protocol`: request bodies in, response shapes out (pure functions).
- `scheduler`: one thread that owns the engine: admission, one step, delivery.
- `http`: the Starlette routes and uvicorn, with the graceful shutdown.

`stop_strings` matches stop strings a character at a time; `metrics` counts; `limits` is what a
server accepts (its flags).
"""

__all__ = ["create_app", "serve"]


def __getattr__(name: str):
    """create_app and serve, imported when first asked for: `minigpt.serve.limits` needs no web stack."""
    if name in __all__:
        from minigpt.serve import http

        return getattr(http, name)
    raise AttributeError(f"module 'minigpt.serve' has no attribute {name!r}")
