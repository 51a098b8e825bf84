"""What authenticating records costs: encode + verify throughput of a page's records with
xxh3-64 checksums and with keyed BLAKE3 MACs (``mac_key_env``), on this CPU.

    python -m sglang_cacheflow.bench.record_sums [--layout llama-8b] [--rounds 8]

The two are measured alternately (A-B-B-A rounds) so drift hits both alike; the figure is
the median over rounds of MB of page data per second, one thread.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from sglang_cacheflow.tiers.page import (
    BlockHeader,
    PageLayout,
    encode_block,
    mac_key_from_secret,
    split_blocks,
    verify_header,
    verify_layers,
)

MAC_KEY = mac_key_from_secret(b"benchmark secret of 32 bytes....")


def _round(layout: PageLayout, page: torch.Tensor, mac_key: bytes | None, pages: int) -> float:
    """MB/s of ``pages`` page round trips (encode every block, then verify it)."""
    blocks = split_blocks(layout.num_layers, max(1, (1 << 20) // layout.layer_bytes))
    start = time.perf_counter()
    for _ in range(pages):
        for b0, n in blocks:
            record = encode_block("key", layout, page, b0, n, mac_key)
            header = verify_header(record, "key", layout, b0, n, mac_key)
            verify_layers(header, memoryview(record)[BlockHeader.size_for(n) :], 0, n, mac_key)
    return pages * layout.page_bytes / (time.perf_counter() - start) / 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--layout", default="llama-8b", help="a named page shape (tiers.page.SHAPES)"
    )
    parser.add_argument("--page-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=8, help="rounds of each (A-B-B-A)")
    parser.add_argument("--pages", type=int, default=8, help="pages per round")
    args = parser.parse_args(argv)
    layout = PageLayout.from_shape_name(args.layout, args.page_tokens)
    page = torch.randn(layout.shape()).to(layout.dtype)
    rates: dict[str, list[float]] = {"xxh3": [], "blake3-mac": []}
    order = ["xxh3", "blake3-mac", "blake3-mac", "xxh3"] * (args.rounds // 2)
    _round(layout, page, None, 1)  # warm-up
    for name in order:
        rates[name].append(_round(layout, page, MAC_KEY if name != "xxh3" else None, args.pages))
    out = {
        "layout": layout.tag,
        "page_bytes": layout.page_bytes,
        **{f"{k}_MBps": round(statistics.median(v), 1) for k, v in rates.items()},
    }
    out["mac_over_checksum"] = round(out["xxh3_MBps"] / out["blake3-mac_MBps"], 2)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
