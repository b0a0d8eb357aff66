"""The requests of a ``verl-r3 stress`` run: mixed lengths, shared prefixes, deterministic aborts.

``draw(n, seed)`` returns the same requests for the same arguments on every engine:

* prompts of byte tokens (ids 0-255, so no special token appears inside a prompt): a quarter
  start with a 64-token prefix and a quarter with a 40-token one (two and one full 32-token
  KV blocks: vLLM's and SGLang's prefix caches serve them once a request with that prefix
  has been computed), the rest stand alone; 2 to 100 tokens in all;
* output budgets of 1 to 24 tokens;
* every ``abort_every``-th request, from request 3 on (3, 11, 19, ...), is aborted after
  ``abort_after`` = 2 to 4 tokens have been streamed; its budget of 32 to 40 tokens leaves the
  engine room to stop it before it would end on its own.

``follow_up`` is the request sent once the concurrent wave is over: the prompt and tokens of
the first aborted request, continued for 8 tokens, so it reads what the aborted request left
in the prefix cache.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

__all__ = ["ABORT_FIRST", "FOLLOW_UP_TOKENS", "MAX_CONTEXT", "StressRequest", "draw", "follow_up"]

ABORT_FIRST = 3  # the first aborted request; then every abort_every-th
FOLLOW_UP_TOKENS = 8
MAX_CONTEXT = 100 + 40 + FOLLOW_UP_TOKENS  # the longest prompt + budget + the follow-up's tokens


@dataclass(frozen=True)
class StressRequest:
    index: int
    prompt_ids: list[int]
    max_tokens: int
    abort_after: int | None = None  # abort once this many tokens are streamed; None: let it finish

    def to_json(self) -> dict:
        return asdict(self)


def draw(n: int, seed: int = 0, abort_every: int = 8) -> list[StressRequest]:
    """``n`` requests as described in the module docstring."""
    if n < 1:
        raise ValueError(f"requests must be >= 1, got {n}")
    if abort_every < 1:
        raise ValueError(f"abort_every must be >= 1, got {abort_every}")
    rng = random.Random(seed)
    prefixes = ([rng.randrange(256) for _ in range(64)], [rng.randrange(256) for _ in range(40)])
    out = []
    for i in range(n):
        kind = i % 4
        if kind < 2:  # requests 0, 1, 4, 5, ...: a shared prefix and a short tail of their own
            prefix = prefixes[kind]
            prompt = prefix + [rng.randrange(256) for _ in range(rng.randint(1, 100 - len(prefix)))]
        else:
            prompt = [rng.randrange(256) for _ in range(rng.randint(2, 100))]
        if i >= ABORT_FIRST and (i - ABORT_FIRST) % abort_every == 0:
            out.append(StressRequest(i, prompt, rng.randint(32, 40), abort_after=rng.randint(2, 4)))
        else:
            out.append(StressRequest(i, prompt, rng.choice((1, 2, 3)) if i % 16 == 6 else rng.randint(4, 24)))
    return out


def follow_up(requests: list[StressRequest], token_ids: list[list[int]], aborted: list[bool]) -> StressRequest:
    """The follow-up request (see the module docstring); request 0's prompt when none was aborted."""
    first = next((i for i, a in enumerate(aborted) if a), None)
    if first is None:
        return StressRequest(len(requests), list(requests[0].prompt_ids), FOLLOW_UP_TOKENS)
    return StressRequest(len(requests), list(requests[first].prompt_ids) + list(token_ids[first]), FOLLOW_UP_TOKENS)
