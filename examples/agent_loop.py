"""An agent loop on SGLang's OpenAI-compatible API: the model is asked a question, a tool
answers part of it, and the agent returns to its context with the tool's output appended,
step after step. Each step resends the whole context, so every step after the first restores
the context's KV (or recomputes it): the time to first token of each step is printed.

    python examples/agent_loop.py --url http://127.0.0.1:30000 --steps 3

The tool is a small calculator, called by the loop itself (no model function calling is
needed, so any chat model works): what matters here is the shape of the traffic.
"""

from __future__ import annotations

import argparse
import ast
import operator
import time

from openai import OpenAI

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def calculator(expression: str) -> int:
    """Evaluate +, - and * over integers (the agent's tool)."""

    def ev(node: ast.AST) -> int:
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        raise ValueError(f"unsupported expression {expression!r}")

    return ev(ast.parse(expression, mode="eval").body)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:30000")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    client = OpenAI(base_url=f"{args.url.rstrip('/')}/v1", api_key="none")
    messages = [
        {"role": "system", "content": "You are a careful assistant who uses tool results."},
        {"role": "user", "content": "A shop sells 12 boxes of 24 pencils. Plan the count."},
    ]
    for step in range(args.steps):
        start = time.perf_counter()
        stream = client.chat.completions.create(
            model="default", messages=messages, max_tokens=args.max_tokens,
            temperature=0.0, stream=True,
        )  # fmt: skip
        ttft, parts = None, []
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                ttft = ttft if ttft is not None else time.perf_counter() - start
                parts.append(chunk.choices[0].delta.content)
        messages.append({"role": "assistant", "content": "".join(parts)})
        expression = f"12 * 24 + {step}"  # the tool call this step makes
        result = calculator(expression)
        messages.append({"role": "user", "content": f"Tool result: {expression} = {result}."})
        seconds = ttft if ttft is not None else time.perf_counter() - start
        print(f"step {step + 1}: TTFT {seconds * 1e3:.0f} ms, tool {expression} = {result}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
