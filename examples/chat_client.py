"""A multi-turn chat on SGLang's OpenAI-compatible API, streaming, with the time to first
token of every turn: the number CacheFlow exists to lower when an old conversation returns.

    python examples/chat_client.py --url http://127.0.0.1:30000 --turns 4

Each turn resends the whole conversation (as chat clients do), so from the second turn on
the server restores the earlier turns' KV from device, host memory or Redis, or recomputes
it. ``--pause`` waits between turns, long enough for other traffic to evict the context.
"""

from __future__ import annotations

import argparse
import time

from openai import OpenAI

QUESTIONS = [
    "Name three rivers in Europe and say in one sentence where each flows.",
    "Which of them is the longest? Answer in one sentence.",
    "Write two sentences about a city on that river.",
    "Summarise our conversation in one sentence.",
]


def turn(client: OpenAI, messages: list[dict[str, str]], max_tokens: int) -> tuple[str, float]:
    """Send the conversation; return the reply and the seconds to its first token."""
    start = time.perf_counter()
    first = None
    parts: list[str] = []
    stream = client.chat.completions.create(
        model="default", messages=messages, max_tokens=max_tokens, temperature=0.0, stream=True
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            if first is None:
                first = time.perf_counter() - start
            parts.append(chunk.choices[0].delta.content)
    return "".join(parts), first if first is not None else time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:30000")
    parser.add_argument("--turns", type=int, default=len(QUESTIONS))
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--pause", type=float, default=0.0, help="seconds between turns")
    args = parser.parse_args(argv)
    client = OpenAI(base_url=f"{args.url.rstrip('/')}/v1", api_key="none")
    messages: list[dict[str, str]] = []
    for i in range(args.turns):
        messages.append({"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]})
        reply, ttft = turn(client, messages, args.max_tokens)
        messages.append({"role": "assistant", "content": reply})
        print(f"turn {i + 1}: TTFT {ttft * 1e3:.0f} ms: {reply.strip()[:70]!r}", flush=True)
        time.sleep(args.pause)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
