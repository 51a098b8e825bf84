#!/usr/bin/env bash
# The one prepared run on a lent GPU machine (no network), from the project root:
#   sglang-cacheflow gpu-bundle            # here: builds .gpu-bundle (git-ignored)
#   then the device tool's run with command "bash sglang_cacheflow/gpu/run.sh",
#   carry [".gpu-bundle"], timeout_s 480 (stage limits: T_RUNTIME, T_EXACT, T_SGLANG).
# STAGES (default "runtime,exact,sglang") picks what runs; each stage has its own time
# limit (SIGINT at the limit, so that servers it started are stopped) and writes JSON to
# $OUT, with one log of everything in $OUT/run.log.
set -uo pipefail
OUT=${OUT:?set OUT to the folder that receives the results}
BUNDLE=${BUNDLE:-.gpu-bundle}
STAGES=${STAGES:-runtime,exact,sglang}
LOG="$OUT/run.log"
say() { echo "== $(date +%T) $*" | tee -a "$LOG"; }
has() { [[ ",$STAGES," == *",$1,"* ]]; }

say "install the bundle"
SITE=/tmp/cacheflow-site
mkdir -p "$SITE" && tar xJf "$BUNDLE/site.tar.xz" -C "$SITE" || { say "no $BUNDLE/site.tar.xz"; exit 1; }
export PYTHONPATH="$PWD:$SITE" PYTHONUNBUFFERED=1 PATH="$SITE/bin:$PATH"
export SGLANG_CACHEFLOW_CACHE=/tmp/cacheflow-models
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import sys, torch, sglang; print(sys.version.split()[0], 'torch', torch.__version__, 'sglang', sglang.__version__, torch.cuda.get_device_name())"
} >>"$LOG" 2>&1

if has runtime; then
  say "reference runtime: Llama-3.1-8B shape, bf16, host tier, links at 0.5x/1x/2x of the balance"
  timeout -s INT -k 20 "${T_RUNTIME:-150}" python3 -m sglang_cacheflow.bench.restore --shape llama-8b --dtype bfloat16 \
    --device cuda --contexts 8192,32768 --factors 0.5,1,2 --repeats 1 \
    --out "$OUT/restore-llama8b.json" --plot /tmp/restore.png >>"$LOG" 2>&1
  say "runtime exit $?"
fi
if has exact; then
  say "SGLang on the GPU: forced token and layer splits restored from Redis = no reuse"
  timeout -s INT -k 20 "${T_EXACT:-130}" python3 -m sglang_cacheflow.gpu.check --shapes "${EXACT_SHAPES:-token-split,layer-split}" --out "$OUT/exact.json" >>"$LOG" 2>&1
  say "exact exit $?"
fi
if has sglang; then
  say "sglang-bench on the GPU: policies at the balanced link (bf16)"
  timeout -s INT -k 20 "${T_SGLANG:-170}" python3 -m sglang_cacheflow.cli sglang-bench --device cuda --model gpu \
    --dtype bfloat16 --conversations 4 --prefix 4096 --repeats 1 --link-factors 1 \
    --order once --out "$OUT/sglang-bench.json" --log-dir /tmp/sglang-logs >>"$LOG" 2>&1
  say "sglang exit $?"
  tar czf "$OUT/sglang-logs.tgz" -C /tmp sglang-logs 2>/dev/null
fi
tail -40 "$LOG"
