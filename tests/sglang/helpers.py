"""Reading a CacheFlow server's restore metrics and comparing replies with a reference."""

from __future__ import annotations

from typing import Any

from sglang_cacheflow.testing.server import SGLangServer


def metrics(server: SGLangServer) -> dict[str, float]:
    """The ``sglang:cacheflow_*`` samples of ``/metrics``, by their full name with labels."""
    out: dict[str, float] = {}
    for line in str(server.request("GET", "/metrics")).splitlines():
        if line.startswith("sglang:cacheflow") and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def total(samples: dict[str, float], name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` that carry ``labels``."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return sum(v for k, v in samples.items() if k.startswith(name) and want in k)


def assert_same_replies(ref: list[dict[str, Any]], got: list[dict[str, Any]]) -> None:
    """Greedy ids identical, output logprobs within 1e-4 (fp32 models)."""
    assert len(ref) == len(got)
    for a, b in zip(ref, got, strict=True):
        assert a["output_ids"] == b["output_ids"]
        la = [t[0] for t in a["meta_info"]["output_token_logprobs"]]
        lb = [t[0] for t in b["meta_info"]["output_token_logprobs"]]
        assert max(abs(x - y) for x, y in zip(la, lb, strict=True)) < 1e-4
