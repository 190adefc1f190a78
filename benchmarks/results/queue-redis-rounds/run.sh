#!/bin/bash
# In-process queue against the Redis queue, one replica each, interleaved rounds.
set -e
cd "$(dirname "$0")/../../.."  # the repository root
export HF_HUB_OFFLINE=1 FLUX_QUEUE_CONCURRENCY=8 XDG_CACHE_HOME=/tmp/bench-cache
T=/tmp/bench-run; rm -rf $T; mkdir -p $T
redis-server --port 6392 --bind 127.0.0.1 --save "" --appendonly yes --appendfsync everysec --dir $T --daemonize no > $T/redis.log 2>&1 &
RP=$!
.venv/bin/bentoml serve service:FluxInpainting --host 127.0.0.1 --port 3101 > $T/memory.log 2>&1 &
MP=$!
FLUX_QUEUE_URL=redis://127.0.0.1:6392/0 .venv/bin/bentoml serve service:FluxInpainting --host 127.0.0.1 --port 3102 > $T/redis-serve.log 2>&1 &
SP=$!
trap 'kill $MP $SP; sleep 5; kill $RP' EXIT
for port in 3101 3102; do
  until curl -sf http://127.0.0.1:$port/readyz >/dev/null; do sleep 1; done
done
# BentoML's dispatcher trains on its first calls: warm both before measuring
for port in 3101 3102; do .venv/bin/python -m benchmarks load --url http://127.0.0.1:$port --concurrency 4 --duration 8 --sizes 64x64 --steps 2 --routes sync --out $T/warm-$port > /dev/null; done
.venv/bin/python -m benchmarks load --targets memory=http://127.0.0.1:3101,redis=http://127.0.0.1:3102 \
  --concurrency 1,4,8 --rounds 9 --duration 10 --sizes 64x64 --steps 2 --routes sync --out benchmarks/results/queue-redis-rounds
