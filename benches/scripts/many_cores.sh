#!/usr/bin/env bash
# Many cores (issue 17, item 5): the phone's shape at 1, 2, 4, 8 and 16 workers, a reconnect
# storm at each, and the raw-send baseline at one core, on one large machine (>= 20 cores:
# the relay's workers on cores 0..W-1, the phones' reader threads on the cores after them).
#
#   benches/scripts/many_cores.sh            # all of it, both backends
#   WORKERS=1,2 benches/scripts/many_cores.sh  # what a 2-core machine can run
#
# Each process needs a descriptor per phone: raise the limit (ulimit -n) above the phone
# count plus 1,000 before running. Output: one line per measurement, on stdout.
set -euo pipefail
cd "$(dirname "$0")/../.."

WORKERS=${WORKERS:-1,2,4,8,16}
SHAPES=${SHAPES:-100x100}
READERS=${READERS:-4}
ROUNDS=${ROUNDS:-3}
SECS=${SECS:-2}

ulimit -n "$(ulimit -Hn)" || true
cargo bench -p pabal-benches --bench phone_shape --no-run

echo "== phone shape, one worker, beside the raw-send baseline (medians of $ROUNDS rounds)"
PABAL_PHONE_MODE=shape PABAL_PHONE_SHAPES=$SHAPES PABAL_PHONE_ROUNDS=$ROUNDS \
  PABAL_PHONE_READERS=$READERS PABAL_BENCH_SECS=$SECS \
  cargo bench -p pabal-benches --bench phone_shape

echo "== worker scaling: max deliveries/s with p99 <= 50 ms and zero loss, workers $WORKERS"
PABAL_PHONE_MODE=workers PABAL_WORKERS=$WORKERS PABAL_PHONE_SHAPES=$SHAPES \
  PABAL_PHONE_READERS=$READERS PABAL_BENCH_SECS=$SECS \
  cargo bench -p pabal-benches --bench phone_shape

echo "== reconnect storm: sessions/s (connect, HELLO, join, hang up), workers $WORKERS"
PABAL_PHONE_MODE=storm PABAL_WORKERS=$WORKERS PABAL_STORM_THREADS=${STORM_THREADS:-16} \
  PABAL_BENCH_SECS=5 \
  cargo bench -p pabal-benches --bench phone_shape

echo "== idle connections: relay RSS per phone at the descriptor limit"
PABAL_IDLE_CONNS=${IDLE_CONNS:-$(( $(ulimit -n) - 2000 ))} \
  cargo bench -p pabal-benches --bench idle_connections
