"""--enable-cacheflow's options: validation with errors that say what to change, and the
SGLang flags they imply on the plugin route."""

from __future__ import annotations

import json
import logging
from dataclasses import replace

import pytest

from sglang_cacheflow.planner import Capabilities
from sglang_cacheflow.sglang.capabilities import SGLANG
from sglang_cacheflow.sglang.config import (
    CPU_ARRIVAL_GAP_MS,
    STREAM_GROUPS,
    CacheFlowConfig,
    ConfigError,
    check_page_size,
    forcing_params,
    parse_config,
    request_force,
)
from sglang_cacheflow.sglang.flags import ENV_CONFIG, rewrite_argv


def test_defaults_and_round_trip() -> None:
    cfg = parse_config(None, None)
    assert cfg.policy == "cacheflow" and cfg.redis_url is None and cfg.calibrate
    full = parse_config(
        "load",
        json.dumps(
            {
                "redis_url": "redis://127.0.0.1:6379/0",
                "link": "10gbps+0.2ms",
                "redis": {"streams": 4},
                "chunk_tokens": 32,
                "prior": {"redis_GBps": 1.25},
            }
        ),
    )
    assert CacheFlowConfig.from_json(full.to_json()) == full
    assert full.prior["redis_GBps"] == 1.25
    extra = full.storage_extra_config()
    assert extra["module_path"] == "sglang_cacheflow.sglang.storage"
    assert extra["link"] == "10gbps+0.2ms" and extra["streams"] == 4
    assert extra["prefetch_threshold"] == 32


@pytest.mark.parametrize(
    ("policy", "config", "needle"),
    [
        ("fastest", None, "choose one of recompute, load, cake, cacheflow"),
        ("cake", '{"force_shape": "diagonal"}', "unknown shape 'diagonal'"),
        ("cacheflow", '{"force_shape": "token", "force_recompute": 2}', "within [0, 1]"),
        ("cacheflow", '{"split_wait_s": 0}', "split_wait_s must be > 0"),
        ("cacheflow", "{not json", "is not valid JSON"),
        ("cacheflow", "[1, 2]", "must be a JSON object"),
        ("cacheflow", '{"redis_uri": "redis://h:1"}', "unknown key(s) redis_uri; known keys"),
        ("cacheflow", '{"chunk_tokens": "64"}', "chunk_tokens must be int"),
        ("cacheflow", '{"chunk_tokens": true}', "chunk_tokens must be a number"),
        ("cacheflow", '{"chunk_tokens": 0}', "chunk_tokens must be >= 1"),
        ("cacheflow", '{"redis_url": "http://h:1"}', "must start with one of redis://"),
        ("cacheflow", '{"link": "10gbps"}', "set redis_url too"),
        ("cacheflow", '{"redis_url": "redis://h:1", "link": "fast"}', "cannot read link"),
        ("cacheflow", '{"redis_url": "redis://h:1", "redis": {"streams": 0}}', "streams"),
        ("cacheflow", '{"prior": {"gpu_tflops": 1}}', "unknown prior key 'gpu_tflops'"),
        ("cacheflow", '{"prior": {"redis_GBps": 0}}', "redis_GBps must be > 0"),
        ("cacheflow", '{"arrival_gap_ms": -1}', "arrival_gap_ms must be >= 0 (0: off)"),
        ("cacheflow", '{"arrival_gap_ms": "5"}', "arrival_gap_ms must be int or float or null"),
        ("cacheflow", '{"arrival_polls": 0}', "arrival_polls must be >= 1"),
        ("cacheflow", '{"stream_groups": 0}', "stream_groups must be >= 1 (1: not streamed)"),
        ("cacheflow", '{"stream_groups": 2.5}', "stream_groups must be int or null"),
        ("cacheflow", '{"stream_front_loads": 1}', "stream_front_loads must be bool"),
        ("cacheflow", '{"one_forward_layer_splits": 1}', "one_forward_layer_splits must be bool"),
        ("cacheflow", '{"one_forward_token_splits": "on"}', "one_forward_token_splits must be"),
        ("load", '{"stream_front_loads": true}', "--cacheflow-policy cacheflow, not 'load'"),
    ],
)
def test_bad_input_is_explained(policy: str, config: str | None, needle: str) -> None:
    with pytest.raises(ConfigError, match=None) as info:
        parse_config(policy, config)
    assert needle in str(info.value)


def test_cake_runs_and_a_forced_shape_reaches_the_planner() -> None:
    cfg = parse_config("cake", '{"force_shape": "token", "force_recompute": 0.25}')
    assert cfg.policy == "cake" and cfg.force == ("token", 0.25)
    assert CacheFlowConfig.from_json(cfg.to_json()) == cfg
    assert parse_config(None, None).force is None


def test_a_request_forces_its_own_shape_through_its_custom_params() -> None:
    assert request_force(None, SGLANG) is None
    assert request_force({"thinking_budget": 8}, SGLANG) is None  # another feature's key
    own = {"cacheflow": {"force_shape": "layer", "force_recompute": 0.25}}
    assert request_force(own, SGLANG) == ("layer", 0.25)
    assert request_force({"cacheflow": {"force_shape": "token"}}, SGLANG) == ("token", 0.5)
    sent = forcing_params("load_front", 0.0)["custom_params"]
    assert request_force(sent, SGLANG) == ("load_front", 0.0)  # what the builder sends


@pytest.mark.parametrize(
    ("own", "needle"),
    [
        ({"force_shape": "diagonal"}, "unknown shape 'diagonal'"),
        ({"force_shape": "token", "force_recompute": 2}, "within [0, 1]"),
        ({"force_shape": "token", "force_recompute": "half"}, "must be a number"),
        ({"force_shape": "token", "policy": "load"}, "an object with any of force_shape"),
        ("token", "an object with any of force_shape"),
        ({"force_shape": "layer"}, "cannot run a layer split"),
    ],
)
def test_a_bad_request_param_is_explained(own: object, needle: str) -> None:
    tokens_only = Capabilities(token_split=True, layer_split=False, load_front=True)
    with pytest.raises(ConfigError) as info:
        request_force({"cacheflow": own}, tokens_only)
    assert needle in str(info.value) and "custom_params['cacheflow']" in str(info.value)


def test_chunk_must_be_page_aligned() -> None:
    check_page_size(parse_config(None, '{"chunk_tokens": 64}'), 16)
    with pytest.raises(ConfigError, match="multiple of --page-size 16"):
        check_page_size(parse_config(None, '{"chunk_tokens": 40}'), 16)


def test_one_token_pages_with_redis_are_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    redis = '{"redis_url": "redis://127.0.0.1:7000/0"}'
    with caplog.at_level(logging.WARNING, logger="sglang_cacheflow.sglang"):
        check_page_size(parse_config(None, redis), 16)
        check_page_size(parse_config(None, None), None)  # host tier only: nothing per token
        assert not caplog.records
        check_page_size(parse_config(None, redis), None)
    assert len(caplog.records) == 1 and "--page-size 16" in caplog.records[0].getMessage()


def test_rewrite_argv_implies_hicache_radix_backend_and_redis(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(ENV_CONFIG, raising=False)
    cfg = {"redis_url": "redis://127.0.0.1:7000/0", "chunk_tokens": 16, "link": "1gbps"}
    argv = [
        "launch_server", "--model-path", "m", "--page-size", "16", "--enable-cacheflow",
        "--cacheflow-policy=recompute", "--cacheflow-config", json.dumps(cfg),
    ]  # fmt: skip
    out = rewrite_argv(argv)
    assert out is not None and out.policy == "recompute"
    assert not any("cacheflow-" in a for a in argv if a.startswith("--"))
    assert "--enable-hierarchical-cache" in argv
    assert argv[argv.index("--radix-cache-backend") + 1] == "cacheflow"
    assert argv[argv.index("--hicache-storage-backend") + 1] == "dynamic"
    extra = json.loads(argv[argv.index("--hicache-storage-backend-extra-config") + 1])
    assert extra["class_name"] == "CacheFlowRedisStorage" and extra["link"] == "1gbps"
    assert argv[argv.index("--hicache-storage-prefetch-policy") + 1] == "wait_complete"
    import os

    assert CacheFlowConfig.from_json(os.environ[ENV_CONFIG]) == out
    # idempotent: nothing left to rewrite
    again = list(argv)
    assert rewrite_argv(again) is None and again == argv


def test_rewrite_argv_conflicts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_CONFIG, raising=False)
    url = '{"redis_url": "redis://h:1/0"}'
    cases = [
        (["--enable-cacheflow", "--disable-radix-cache"], "drop --disable-radix-cache"),
        (["--enable-cacheflow", "--radix-cache-backend", "x"], "drop --radix-cache-backend x"),
        (
            ["--enable-cacheflow", "--cacheflow-config", url, "--hicache-storage-backend", "file"],
            "drop --hicache-storage-backend file",
        ),
        (["--cacheflow-policy", "load"], "need --enable-cacheflow"),
        (["--enable-cacheflow", "--cacheflow-config"], "--cacheflow-config needs a value"),
        (["--enable-cacheflow", "--page-size", "16", "--cacheflow-config", '{"chunk_tokens": 8}'],
         "multiple of --page-size 16"),
    ]  # fmt: skip
    for argv, needle in cases:
        with pytest.raises(ConfigError) as info:
            rewrite_argv(["launch_server", *argv])
        assert needle in str(info.value), argv
    # a prefetch policy the user chose is kept
    argv = ["x", "--enable-cacheflow", "--cacheflow-config", url]
    argv += ["--hicache-storage-prefetch-policy", "timeout"]
    rewrite_argv(argv)
    assert argv.count("--hicache-storage-prefetch-policy") == 1


def test_arrival_gap_defaults_to_on_for_the_cpu_engine_only() -> None:
    auto = parse_config(None, None)
    assert auto.arrival_gap_ms is None
    assert auto.for_device("cpu").arrival_gap_ms == CPU_ARRIVAL_GAP_MS > 0
    assert auto.for_device("cuda").arrival_gap_ms == 0.0
    chosen = parse_config(None, '{"arrival_gap_ms": 2, "arrival_polls": 3}')
    assert chosen.for_device("cuda").arrival_gap_ms == chosen.for_device("cpu").arrival_gap_ms
    assert chosen.arrival_gap_ms == 2.0 and chosen.arrival_polls == 3
    assert CacheFlowConfig.from_json(chosen.to_json()) == chosen


def test_splits_stream_where_the_scheduler_runs_without_the_overlap_loop() -> None:
    auto = parse_config(None, None)
    assert auto.stream_groups is None
    assert auto.for_device("cpu").stream_groups == STREAM_GROUPS > 1  # no loop on the CPU engine
    assert auto.for_device("cuda").stream_groups == 1
    assert auto.for_device("cuda", overlap=False).stream_groups == STREAM_GROUPS
    assert auto.for_device("cpu", overlap=True).stream_groups == 1
    chosen = parse_config(None, '{"stream_groups": 3}')
    assert chosen.for_device("cpu").stream_groups == 3
    with pytest.raises(ConfigError, match="needs --disable-overlap-schedule"):
        chosen.for_device("cuda")  # a stream that fails must be cut back before the next batch
    assert parse_config(None, '{"stream_groups": 1}').for_device("cuda").stream_groups == 1
    # front loads stream into the extend as splits do: not where splits cannot
    front = parse_config(None, '{"stream_front_loads": true}')
    assert front.for_device("cpu").stream_front_loads
    for cfg, device in ((front, "cuda"), (replace(front, stream_groups=1), "cpu")):
        with pytest.raises(ConfigError, match=r"stream_front_loads .* needs streamed splits"):
            cfg.for_device(device)
    # a layer or token split in one forward: where splits stream, on the CPU engine only
    for name in ("one_forward_layer_splits", "one_forward_token_splits"):
        one = parse_config(None, f'{{"{name}": true}}')
        assert getattr(one.for_device("cpu"), name) is True
        with pytest.raises(ConfigError, match=rf"{name} .* needs streamed splits"):
            replace(one, stream_groups=1).for_device("cpu")
        with pytest.raises(ConfigError, match=rf"{name} .* on this device"):
            replace(one, stream_groups=6).for_device("cuda", overlap=False)
        off = parse_config(None, f'{{"{name}": false}}')
        assert getattr(off.for_device("cpu"), name) is False
        default = parse_config(None, None)  # on where it can run
        assert getattr(default.for_device("cpu"), name) is True
        assert getattr(default.for_device("cuda"), name) is False
        assert getattr(replace(default, stream_groups=1).for_device("cpu"), name) is False


@pytest.mark.parametrize(
    ("device", "overlap_off"), [(["--device", "cpu"], True), (["--device=cuda"], False)]
)
def test_cpu_engine_runs_without_the_overlap_loop(
    monkeypatch: pytest.MonkeyPatch, device: list[str], overlap_off: bool
) -> None:
    monkeypatch.delenv(ENV_CONFIG, raising=False)
    argv = ["launch_server", "--model-path", "m", *device, "--enable-cacheflow"]
    rewrite_argv(argv)
    assert ("--disable-overlap-schedule" in argv) is overlap_off
    again = list(argv)  # a flag the user gave already is not repeated
    again.append("--enable-cacheflow")
    rewrite_argv(again)
    assert again.count("--disable-overlap-schedule") == int(overlap_off)
