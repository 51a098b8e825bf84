"""RAG-style prompts from ShareGPT for the chunk-reuse bench: documents cut from assistant
answers, shuffled between prompts, a question after them.

Each prompt is ``[preamble][document]...[question]`` through SmolLM2's chat template, every
part tokenized on its own so a document has the same tokens wherever it sits (what a chunk
store needs). The question is the user turn that one of the prompt's documents answered.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch

from sglang_cacheflow.bench.workloads import sharegpt_conversations

SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
INSTRUCTION = "Answer the question using the documents below.\n\n"


@dataclass(frozen=True)
class Document:
    ids: torch.Tensor
    question: str  # the user turn this text answered


def _encode(tokenizer: Any, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer.encode(text, add_special_tokens=False), dtype=torch.long)


def preamble_ids(tokenizer: Any) -> torch.Tensor:
    """``<|im_start|>system ... <|im_start|>user`` and the instruction: what every prompt
    starts with, computed once."""
    text = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{INSTRUCTION}"
    return _encode(tokenizer, text)


def question_ids(tokenizer: Any, question: str, max_chars: int = 300) -> torch.Tensor:
    """The question and the assistant's turn opening: what follows the documents."""
    q = " ".join(question.split())[:max_chars]
    return _encode(tokenizer, f"Question: {q}<|im_end|>\n<|im_start|>assistant\n")


def documents(tokenizer: Any, count: int, tokens: int, seed: int = 0) -> list[Document]:
    """``count`` documents of exactly ``tokens`` tokens (``Document:`` and an answer from
    ShareGPT, cut at ``tokens``), each with the question it answered."""
    out: list[Document] = []
    for texts in sharegpt_conversations(1, count * 8, seed):
        question, answer = texts[0], texts[1]
        ids = _encode(tokenizer, f"Document:\n{answer}")
        if len(ids) < tokens or len(question.split()) < 4:
            continue
        out.append(
            Document(torch.cat([ids[: tokens - 2], _encode(tokenizer, "\n\n")])[:tokens], question)
        )
        if len(out) == count:
            return out
    raise ValueError(
        f"ShareGPT has fewer than {count} answers of {tokens} tokens here; ask for shorter "
        "documents or fewer of them"
    )


@dataclass(frozen=True)
class RagSet:
    preamble: torch.Tensor
    pool: list[Document]
    prompts: list[tuple[list[int], torch.Tensor]]  # documents' indices in order, question ids
    probe: torch.Tensor  # a text in none of the prompts (the offline probe scorer's)


def rag_prompts(
    tokenizer: Any, prompts: int, per_prompt: int, doc_tokens: int, seed: int = 0
) -> RagSet:
    """``prompts`` prompts of ``per_prompt`` documents drawn from a shared pool (so the same
    document sits at different positions in different prompts)."""
    if per_prompt < 2:
        raise ValueError("a prompt needs at least 2 documents (one of them reused elsewhere)")
    pool_size = max(per_prompt + 1, (prompts * per_prompt + 1) // 2)
    *pool, probe = documents(tokenizer, pool_size + 1, doc_tokens, seed)
    rng = random.Random(seed)
    out = []
    for _ in range(prompts):
        picked = rng.sample(range(len(pool)), per_prompt)
        asked = pool[rng.choice(picked[1:])]  # a document that is not the exact prefix
        out.append((picked, question_ids(tokenizer, asked.question)))
    return RagSet(preamble_ids(tokenizer), pool, out, probe.ids[: max(16, doc_tokens // 4)])
