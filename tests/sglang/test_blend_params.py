"""Chunk reuse's inputs on the SGLang side, without a server: the ``chunk_store`` keys of
``--cacheflow-config`` and where they run, a request's chunk list, and the RoPE fix-up
against SGLang's own rotary modules (keys rotated by a delta must equal the keys SGLang
computes at the moved positions)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from sglang_cacheflow.sglang.capabilities import SGLANG
from sglang_cacheflow.sglang.config import (
    REQUEST_PARAM,
    ConfigError,
    parse_config,
    request_blend_ratio,
    request_chunks,
    request_force,
)


def _chunks(flat: object) -> dict[str, object]:
    return {REQUEST_PARAM: {"chunks": flat}}


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"chunk_store": "disk"}, "chunk_store 'disk' is unknown"),
        ({"chunk_store": "redis"}, "set it"),
        ({"chunk_store": "host", "chunk_store_mb": 0}, "chunk_store_mb must be >= 1"),
        ({"blend_min_ratio": 1.5}, "blend_min_ratio must be in"),
        ({"force_blend_ratio": -0.1}, "force_blend_ratio must be in"),
    ],
)
def test_bad_chunk_store_keys_are_refused_at_start_up(config: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config("cacheflow", config)


def test_chunk_reuse_runs_on_the_cpu_engine_without_the_overlap_loop() -> None:
    cfg = parse_config("cacheflow", {"chunk_store": "host", "force_blend_ratio": 0})
    assert cfg.force_blend_ratio == 0.0 and isinstance(cfg.force_blend_ratio, float)
    assert cfg.for_device("cpu").chunk_store == "host"
    for device, overlap in (("cuda", False), ("cpu", True)):
        with pytest.raises(ConfigError, match="unset chunk_store on this device"):
            cfg.for_device(device, overlap)
    assert parse_config("cacheflow", {}).for_device("cuda").chunk_store is None


def test_a_request_chunk_list_reads_as_ranges() -> None:
    assert request_chunks(_chunks([2, 10, 10, 30]), 31) == [(2, 10), (10, 30)]
    assert request_chunks(None, 31) is None
    assert request_chunks({REQUEST_PARAM: {"force_shape": "token"}}, 31) is None
    both = {REQUEST_PARAM: {"chunks": [0, 4], "force_shape": "token", "force_recompute": 0.5}}
    assert request_chunks(both, 8) == [(0, 4)]
    assert request_force(both, SGLANG) == ("token", 0.5)
    assert request_force(_chunks([0, 4]), SGLANG) is None  # chunks alone force no shape


@pytest.mark.parametrize(
    ("flat", "message"),
    [
        ([3], "flat list of token offsets"),
        ([], "flat list of token offsets"),
        ([0, 4.0], "flat list of token offsets"),
        ([0, True], "flat list of token offsets"),
        ("0,4", "flat list of token offsets"),
        ([4, 4], r"range \[4, 4\) is empty"),
        ([0, 8, 6, 10], r"range \[6, 10\) is empty, overlaps"),
        ([8, 10, 0, 4], r"range \[0, 4\) is empty, overlaps the one before or is out of order"),
        ([0, 20], "leaves no query token in a prompt of 20 tokens"),
    ],
)
def test_a_malformed_chunk_list_says_what_to_change(flat: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        request_chunks(_chunks(flat), 20)


def test_unknown_request_keys_are_named() -> None:
    with pytest.raises(ConfigError, match="force_shape, force_recompute, chunks, blend_ratio"):
        request_chunks({REQUEST_PARAM: {"chunk": [0, 4]}}, 20)


def test_a_request_may_force_its_own_blend_ratio() -> None:
    assert request_blend_ratio({REQUEST_PARAM: {"chunks": [0, 4], "blend_ratio": 0}}) == 0.0
    assert request_blend_ratio(_chunks([0, 4])) is None
    for bad in (1.5, -0.1, "half", True):
        with pytest.raises(ConfigError, match="blend_ratio'\\] must be a number in"):
            request_blend_ratio({REQUEST_PARAM: {"blend_ratio": bad}})


_ROTATION_CHECK = """
import torch
from sglang.srt.layers.rotary_embedding.base import LinearScalingRotaryEmbedding, RotaryEmbedding
from sglang.srt.layers.rotary_embedding.rope_variant import Llama3RotaryEmbedding
from sglang.srt.layers.rotary_embedding.yarn import YaRNScalingRotaryEmbedding
from sglang_cacheflow.blend.rope import KeyRotator
from sglang_cacheflow.sglang.blend import _InvFreq

torch.manual_seed(0)
ropes = {
    "default": RotaryEmbedding(64, 64, 4096, 10000, True, torch.float32),
    "yarn": YaRNScalingRotaryEmbedding(64, 64, 4096, 10000, True, 4.0, torch.float32),
    "llama3": Llama3RotaryEmbedding(64, 64, 4096, 500000, True, torch.float32, 8.0, 1.0, 4.0, 512),
}
for name, rope in ropes.items():
    rotator = KeyRotator(_InvFreq(rope), object())
    pos = torch.arange(5, 40)
    q, k = torch.randn(35, 4 * 64), torch.randn(35, 2 * 64)
    for delta in (37, -5):
        _, at = rope.forward_native(pos, q.clone(), k.clone())
        _, moved = rope.forward_native(pos + delta, q.clone(), k.clone())
        got = rotator.rotate(at.view(35, 2, 64), delta)
        err = (got - moved.view(35, 2, 64)).abs().max().item()
        scale = moved.abs().max().item()
        assert err <= 1e-5 * scale, (name, delta, err, scale)
for refused in (
    LinearScalingRotaryEmbedding(64, 64, 4096, 10000, True, 2.0, torch.float32),
    RotaryEmbedding(64, 32, 4096, 10000, True, torch.float32),
    RotaryEmbedding(64, 64, 4096, 10000, False, torch.float32),
    None,
):
    try:
        _InvFreq(refused)
    except ValueError as e:
        print("refused:", e)
    else:
        raise SystemExit(f"{refused} accepted")
print("ok")
"""


@pytest.mark.sglang
def test_keys_moved_by_the_rope_fix_up_equal_sglangs_keys_at_the_new_positions() -> None:
    """Default, YaRN and Llama-3 rotary modules; linear scaling (positions divided, not
    frequencies), partial and interleaved rotations and no rotary module are refused."""
    env = {**os.environ, "SGLANG_USE_CPU_ENGINE": "1"}  # SGLang's rotary modules on CPU
    out = subprocess.run(
        [sys.executable, "-c", _ROTATION_CHECK], env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
    assert out.stdout.count("refused:") == 4
    assert "scales positions" in out.stdout and "neox style" in out.stdout
