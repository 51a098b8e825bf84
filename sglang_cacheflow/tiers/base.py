"""The tier interface: pages keyed by (namespace, page hash), whole or by layer range.

:class:`KVTier` is what the runtime, the planner's executors and the SGLang storage adapter
program against; :class:`~sglang_cacheflow.tiers.host.HostTier`,
:class:`~sglang_cacheflow.tiers.redis.RedisTier` and the emulation wrapper
:class:`~sglang_cacheflow.tiers.shaping.ShapedTier` implement it. Pages are host tensors of
the namespace's :class:`~sglang_cacheflow.tiers.page.PageLayout`. A read that cannot return
a whole, verified page (or layer range) returns a miss; tier methods never raise for a
missing, corrupt or unreachable page, only for bad arguments.
"""

from __future__ import annotations

import hashlib
import re
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import torch

from sglang_cacheflow.tiers.page import PageLayout

__all__ = ["KVTier", "LayerRange", "Namespace", "TierStats", "check_batch", "check_page_hash"]

LayerRange = tuple[int, int]
"""Half-open layer range ``(l0, l1)``; ``None`` in a signature means all layers."""

_MODEL_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


def check_page_hash(page_hash: str) -> str:
    """Page hashes go into keys as they are: no braces (Redis Cluster hash tags), colons or
    whitespace."""
    if not isinstance(page_hash, str) or not page_hash:
        raise ValueError(f"page hash must be a non-empty str, got {page_hash!r}")
    if any(c in page_hash for c in "{}: \t\r\n"):
        raise ValueError(
            f"page hash {page_hash!r} contains a brace, colon or whitespace; use a hex digest"
        )
    return page_hash


@dataclass(frozen=True)
class Namespace:
    """Whose pages these are: model identity, page layout (shape and dtype) and the
    parallel rank. Two namespaces that differ in any field never see each other's pages."""

    model: str
    layout: PageLayout
    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("Namespace.model must name the model (e.g. its path or repo id)")
        if not (0 <= self.tp_rank < self.tp_size):
            raise ValueError(f"tp_rank {self.tp_rank} is outside tp_size {self.tp_size}")
        if not (0 <= self.pp_rank < self.pp_size):
            raise ValueError(f"pp_rank {self.pp_rank} is outside pp_size {self.pp_size}")

    @property
    def prefix(self) -> str:
        """Key prefix, e.g. ``cf1:Llama-3.1-8B:L32-kv-t256-h8-d128-bf16:tp0of1``. A model name
        with characters a key does not take is cleaned and suffixed with a digest of the
        exact name (``cf1:meta-llama-Llama-3.1-8B-1f2e3d4c:...``)."""
        raw = self.model.strip("/")
        model = _MODEL_CHARS.sub("-", raw).strip("-") or "model"
        if model != raw:  # "org/m" and "org-m" must not share keys once cleaned alike
            model += "-" + hashlib.blake2b(self.model.encode(), digest_size=4).hexdigest()
        parts = ["cf1", model, self.layout.tag, f"tp{self.tp_rank}of{self.tp_size}"]
        if self.pp_size > 1:
            parts.append(f"pp{self.pp_rank}of{self.pp_size}")
        return ":".join(parts)


@dataclass
class TierStats:
    """Counters of one tier since it was created (thread-safe through :meth:`add`)."""

    puts: int = 0
    put_failures: int = 0
    put_bytes: int = 0
    gets: int = 0
    hits: int = 0
    misses: int = 0
    get_bytes: int = 0
    corrupt: int = 0
    errors: int = 0
    evictions: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                setattr(self, name, getattr(self, name) + delta)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "_lock"}


class KVTier(ABC):
    """A store of pages. Implementations are thread-safe.

    Single-page methods are conveniences over the batch forms, which are what restores
    use (one call per batch keeps a remote link busy).
    """

    name: str = "tier"

    # -- batch forms (the ones to implement) ---------------------------------------------
    @abstractmethod
    def batch_put(
        self, ns: Namespace, page_hashes: Sequence[str], pages: Sequence[torch.Tensor]
    ) -> list[bool]:
        """Store whole pages (tensors of ``ns.layout``). One success flag per page."""

    @abstractmethod
    def batch_get_into(
        self,
        ns: Namespace,
        page_hashes: Sequence[str],
        outs: Sequence[torch.Tensor],
        layers: LayerRange | None = None,
    ) -> list[bool]:
        """Read layers ``layers`` (all when None) of each page into ``outs[i]`` (shape
        ``ns.layout.shape(layers)``, any strides). ``False`` means a miss, and that
        ``outs[i]`` may hold garbage."""

    @abstractmethod
    def batch_exists(self, ns: Namespace, page_hashes: Sequence[str]) -> list[bool]:
        """Whether every part of each page is stored (it may still turn out corrupt)."""

    @abstractmethod
    def delete(self, ns: Namespace, page_hashes: Sequence[str]) -> int:
        """Remove pages; returns how many were present."""

    def batch_views(
        self, ns: Namespace, page_hashes: Sequence[str], layers: LayerRange | None = None
    ) -> list[torch.Tensor | None] | None:
        """The stored pages themselves (layers ``layers``), without a copy, ``None`` for a
        miss; the caller must not write them. Only tiers that keep pages in this process's
        memory can: the others return ``None`` for the whole call and are read with
        :meth:`batch_get_into`. A view stays valid while the caller holds it, even if the
        tier evicts its page meanwhile."""
        return None

    @property
    @abstractmethod
    def stats(self) -> TierStats: ...

    def close(self) -> None:
        """Release connections and threads; the tier is unusable afterwards."""
        return None

    # -- conveniences --------------------------------------------------------------------
    def batch_get(
        self, ns: Namespace, page_hashes: Sequence[str], layers: LayerRange | None = None
    ) -> list[torch.Tensor | None]:
        """Fresh tensors (layers ``layers`` of each page), ``None`` for a miss."""
        outs = [ns.layout.empty(layers) for _ in page_hashes]
        ok = self.batch_get_into(ns, page_hashes, outs, layers)
        return [o if hit else None for o, hit in zip(outs, ok, strict=True)]

    def put(self, ns: Namespace, page_hash: str, page: torch.Tensor) -> bool:
        return self.batch_put(ns, [page_hash], [page])[0]

    def get(
        self, ns: Namespace, page_hash: str, layers: LayerRange | None = None
    ) -> torch.Tensor | None:
        return self.batch_get(ns, [page_hash], layers)[0]

    def get_into(
        self, ns: Namespace, page_hash: str, out: torch.Tensor, layers: LayerRange | None = None
    ) -> bool:
        return self.batch_get_into(ns, [page_hash], [out], layers)[0]

    def exists(self, ns: Namespace, page_hash: str) -> bool:
        return self.batch_exists(ns, [page_hash])[0]

    def __enter__(self) -> KVTier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_batch(
    ns: Namespace,
    page_hashes: Sequence[str],
    tensors: Sequence[torch.Tensor],
    layers: LayerRange | None,
) -> tuple[int, int]:
    """Validate a batch call's arguments (shared by implementations)."""
    if len(page_hashes) != len(tensors):
        raise ValueError(f"{len(page_hashes)} page hashes but {len(tensors)} tensors")
    for h in page_hashes:
        check_page_hash(h)
    for t in tensors:
        ns.layout.check_page(t, layers)
    return ns.layout.check_layers(layers)
