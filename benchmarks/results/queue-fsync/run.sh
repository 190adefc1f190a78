#!/usr/bin/env bash
# Two redis-servers as the shipped manifest runs them (AOF on), one per appendfsync policy, on this
# machine's disk; benchmarks.queue against each, three rounds, alternating which goes first.
# OUT: the folder for the rounds (each a queue-overhead.json and .md).
set -euo pipefail
: "${OUT:?set OUT to a folder for the rounds}"
cd "$(dirname "$0")/../../.."   # the repository
work=$(mktemp -d)
declare -A port=([everysec]=6401 [always]=6402)
trap 'for p in "${port[@]}"; do redis-cli -p "$p" shutdown nosave >/dev/null 2>&1 || true; done; rm -rf "$work"' EXIT
for policy in everysec always; do
  mkdir -p "$work/$policy"
  redis-server --port ${port[$policy]} --bind 127.0.0.1 --dir "$work/$policy" --save "" --appendonly yes \
    --appendfsync $policy --daemonize yes --logfile "$work/$policy/redis.log"
done
sleep 1
for round in 1 2 3; do
  order=$([ $((round % 2)) = 1 ] && echo "everysec always" || echo "always everysec")
  for policy in $order; do
    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.queue --redis-url redis://127.0.0.1:${port[$policy]}/0 \
      --requests 400 --concurrency 1,4,8 --out "$OUT/$policy-$round" > /dev/null
  done
done
