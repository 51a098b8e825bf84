"""A prompt's reused chunk KV read from the store layer by layer, beside its forward.

What to read of a stored chunk (:func:`offline_load`: the whole of it where it sits as it
was computed, else its pages after the ``k`` best tokens, which are recomputed) and the
thread that reads it (:class:`Loader`): layer range by layer range, one tier call for all of
a prompt's chunks, each chunk's keys moved by its position delta, the result handed to the
engine's ``place`` (the runtime's KV tensor, SGLang's KV pool). The forward waits for each
layer (:meth:`Loader.wait`) before its attention reads it; a failed read wakes it with
:class:`LoadFailed`, so that a lost page never reaches attention unnoticed.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from sglang_cacheflow.blend.rope import KeyRotator
from sglang_cacheflow.blend.store import ChunkStore, StoredChunk

__all__ = ["Load", "LoadFailed", "Loader", "Place", "offline_load", "recomputed_tokens"]


@dataclass
class Load:
    """One chunk's part of the loads: which stored pages, where their tokens go."""

    chunk: StoredChunk
    first_page: int
    keep: torch.Tensor  # indices (in stored order, from first_page's first token) to place
    positions: torch.Tensor  # where each kept token goes in the prompt
    delta: int  # RoPE fix-up: new position - stored position


class LoadFailed(RuntimeError):
    pass


Place = Callable[[int, int, Load, torch.Tensor, torch.Tensor], None]
"""``place(l0, l1, load, keys, values)``: put layers ``[l0, l1)`` of ``load``'s kept tokens
(``(layers, kept, kv_heads, head_dim)`` each, keys already moved) where the engine keeps KV."""


def recomputed_tokens(tokens: int, ratio: float, page_tokens: int) -> int:
    """How many of a reused chunk's ``tokens`` are recomputed at ``ratio``: rounded up to
    whole pages, so that the rest is a page range (every selection recomputes that many)."""
    k = math.ceil(ratio * tokens - 1e-9)
    return min(page_tokens * math.ceil(k / page_tokens), tokens)


def offline_load(
    stored: StoredChunk, offset: int, exact: bool, ratio: float, page_tokens: int
) -> tuple[torch.Tensor, Load]:
    """``(recomputed positions, load)`` of a chunk placed at ``offset`` under the offline
    choice: an ``exact`` chunk (where it was computed, after what it was computed after) is
    loaded whole; any other has its best tokens recomputed and their pages left unread."""
    n = stored.tokens
    if exact:
        return torch.empty(0, dtype=torch.int64), Load(
            stored, 0, torch.arange(n), offset + stored.order, 0
        )
    k = recomputed_tokens(n, ratio, page_tokens)
    keep = torch.arange(k, n) - (k // page_tokens) * page_tokens
    load = Load(stored, k // page_tokens, keep, offset + stored.order[k:], offset - stored.start)
    return offset + stored.order[:k], load


@dataclass
class Loader:
    """Reads ``loads`` layer range by layer range on a thread; the forward waits per layer."""

    store: ChunkStore
    loads: list[Load]
    rotator: KeyRotator
    num_layers: int
    place: Place
    first_layer: int = 0
    layers_per_read: int = 1
    ready: list[threading.Event] = field(default_factory=list)
    failed: bool = False
    loaded_bytes: int = 0
    waited_s: float = 0.0

    def __post_init__(self) -> None:
        self.ready = [threading.Event() for _ in range(self.num_layers)]
        for layer in range(self.first_layer):
            self.ready[layer].set()
        self.thread = threading.Thread(target=self._run, name="chunk-loader", daemon=True)

    def start(self) -> Loader:
        self.thread.start()
        return self

    def _run(self) -> None:
        try:
            loads = [x for x in self.loads if x.keep.numel() and self._pages(x) > 0]
            for l0 in range(self.first_layer, self.num_layers, self.layers_per_read):
                l1 = min(l0 + self.layers_per_read, self.num_layers)
                if loads and not self._read(loads, l0, l1):
                    self.failed = True
                    return
                for layer in range(l0, l1):
                    self.ready[layer].set()
        except Exception:
            self.failed = True
            raise
        finally:
            for event in self.ready:  # a failure wakes the forward, which then checks
                event.set()

    def _pages(self, load: Load) -> int:
        return load.chunk.pages(self.store.page_tokens) - load.first_page

    def _read(self, loads: list[Load], l0: int, l1: int) -> bool:
        """Layers ``[l0, l1)`` of every load: one tier call, then each chunk's tokens placed
        with their keys moved by the chunk's delta."""
        layout = self.store.layout
        counts = [self._pages(x) for x in loads]
        outs = [layout.empty((l0, l1)) for _ in range(sum(counts))]
        parts = [(x.chunk, x.first_page) for x in loads]
        if not all(self.store.read(parts, (l0, l1), outs)):
            return False
        self.loaded_bytes += len(outs) * (l1 - l0) * layout.layer_bytes
        at = 0
        for load, count in zip(loads, counts, strict=True):
            pages, at = outs[at : at + count], at + count
            data = torch.cat(pages, dim=2)[:, :, load.keep]  # (layers, 2, kept, heads, dim)
            keys = data[:, 0]
            if load.delta:
                keys = self.rotator.rotate(keys, load.delta)
            self.place(l0, l1, load, keys, data[:, 1])
        return True

    def wait(self, layer: int) -> None:
        t = time.perf_counter()
        self.ready[layer].wait()
        self.waited_s += time.perf_counter() - t
        if self.failed:
            raise LoadFailed(f"a chunk page could not be read for layer {layer}")
