"""What a server accepts beyond the API's own rules: each limit is a flag of `minigpt serve`, defined here once."""

from __future__ import annotations

from dataclasses import dataclass

from minigpt.settings import POSITIVE, Bounded, check_bounds, option


@dataclass(frozen=True)
class Limits:
    max_batch: int = option(32, "rows decoded together; requests beyond them wait in the queue", POSITIVE)
    max_queue: int = option(256, "requests that may wait for rows; one more gets 429", POSITIVE)
    max_tokens: int = option(4096, "the largest max_tokens a request may ask for", POSITIVE)
    max_connections: int = option(512, "connections open at once; one more is answered 503 and closed", POSITIVE)
    read_timeout: float = option(10.0, "how long a request's headers, and then its body, may take to arrive "
                                       "(seconds); slower ones get 408", Bounded(float, high=3600, above=0))

    def __post_init__(self) -> None:
        check_bounds(self)
