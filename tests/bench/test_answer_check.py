"""The demo's "answers = ref" column measures restores: 100% when they are right, less when
the restored KV is wrong.

Two ``sglang-cacheflow bench`` runs of the demo's setup (fp32, pools too small for the
chats, so earlier turns come back from host memory and Redis): policies ``recompute`` (the
reference: no reuse) and ``load`` (every hit loaded). In the second run the servers zero the
KV of every host -> device load (``SGLANG_CACHEFLOW_FAULT=zero-host-loads``, the project's
fault hook): the reference never loads, so its answers stand, and ``load``'s must differ.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from sglang_cacheflow.cli import main
from sglang_cacheflow.sglang.cpu.faults import FAULT_ENV, ZERO_HOST_LOADS

pytestmark = [pytest.mark.sglang, pytest.mark.redis, pytest.mark.slow]

ARGS = [  # the demo's setup (sglang_cacheflow/bench/sglang/demo.py), two policies
    "--workload", "sharegpt", "--policies", "recompute,load", "--dtype", "float32",
    "--sessions", "8", "--turns", "3", "--max-prompt-tokens", "1536", "--max-new-tokens", "8",
    "--concurrency", "8", "--max-total-tokens", "2048", "--hicache-ratio", "1",
    "--l3-gbps", "1",
]  # fmt: skip


def _bench(model: Path, redis_url: str, out: Path) -> dict[str, Any]:
    code = main(["bench", *ARGS, "--model", str(model), "--redis-url", redis_url,
                 "--out", str(out)])  # fmt: skip
    assert code == 0
    runs = json.loads((out / "bench.json").read_text())["runs"]
    return {r["policy"]: r["summary"] for r in runs}


def test_answers_match_only_when_restores_are_right(
    smollm2_path: Path, redis_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = _bench(smollm2_path, redis_server.url, tmp_path / "good")
    assert good["load"]["tokens_loaded"] > 0  # the check is only as good as what it restored
    # answers_match compares each policy with the first, recompute: load's must be all equal
    assert good["load"]["answers_match"] == 1.0
    monkeypatch.setenv(FAULT_ENV, ZERO_HOST_LOADS)
    bad = _bench(smollm2_path, redis_server.url, tmp_path / "bad")
    assert bad["load"]["tokens_loaded"] > 0
    assert bad["recompute"]["tokens_loaded"] == 0  # the reference loads nothing: it stands
    assert bad["load"]["answers_match"] < 1.0, bad["load"]
