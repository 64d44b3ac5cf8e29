#!/usr/bin/env bash
# Issue 13's two targets on a quiet machine of 16 or more cores (the lent device), from what
# benches/scripts/device_prepare.sh left in .device (carry it; no toolchain or Redis needed
# there): one Redis shard's calls/s through the publish script, with Redis on a core of its
# own; the engine's added p50/p99 at 1,000 msg/s and at half of max (cluster_latency.sh,
# Redis, the relay node and the load generator each on cores of their own); then the
# fan-out shapes with three nodes against one. Each stage has a time limit (STAGE_SECS),
# so one that hangs costs only its own figures.
#
#   benches/scripts/device_run.sh 2>&1 | tee "$OUT/device.log"
#
# CPUs: REDIS_CPUS (default 2-3: its main thread, and a core for what it forks and its
# background threads, as on a machine of its own; on one core an AOF rewrite's child takes
# turns with the main thread and every answer waits), RELAY_CPUS (4: the relay node's
# worker and engine),
# LOAD_CPUS (8-15: the load generator's threads, one each); the three-node rows run on
# FANOUT_CPUS (4-15). STAGES picks stages (default "capacity latency fanout workers", the
# new workers stage last so that a long one costs no earlier stage's figures):
# `workers` is the phone's shape at WORKERS workers (default 1,2,4,8: the relay's workers
# on cores 0..W-1, the phones' PHONE_READERS reader threads, default 8, on the cores after
# them), 1-second trials, about 150 s; `fixed` is the latency shape paced at FIXED_RATE
# msg/s (default 31,000, session 12's half of max) for ROUNDS rounds, to compare runs whose
# half of max differs. The device's 15 minutes hold one call of the default stages (about
# 540 s) and a start.
set -uo pipefail
cd "$(dirname "$0")/../.."

export PATH="$PWD/.device/redis:$PATH" PABAL_BENCH_BIN_DIR="$PWD/.device/bin"
REDIS_CPUS=${REDIS_CPUS:-2-3}
RELAY_CPUS=${RELAY_CPUS:-4}
LOAD_CPUS=${LOAD_CPUS:-8-15}
FANOUT_CPUS=${FANOUT_CPUS:-4-15}
STAGES=${STAGES:-capacity latency fanout workers}
# The `fixed` stage's rounds run in a child shell: it reads these from the environment.
export REDIS_CPUS RELAY_CPUS LOAD_CPUS ROUNDS="${ROUNDS:-3}" FIXED_RATE="${FIXED_RATE:-31000}"

echo "== machine: $(nproc) CPUs, kernel $(uname -r), load $(cut -d' ' -f1-3 /proc/loadavg), $(date -u +%FT%TZ)"
lscpu | grep -E '^(Model name|Thread|Core|Socket|NUMA node)' || true
lscpu -e=CPU,CORE,SOCKET,NODE 2>/dev/null | head -20 || true
redis-server --version && redis-cli --version
ulimit -n 200000 2>/dev/null || ulimit -n "$(ulimit -Hn)"
echo "descriptors: $(ulimit -n)"

run_stage() { # name seconds command...
  local name=$1 secs=$2
  shift 2
  echo
  echo "== stage $name (limit ${secs}s), $(date -u +%T), load $(cut -d' ' -f1-3 /proc/loadavg)"
  local t0=$SECONDS
  timeout --kill-after=5 "$secs" "$@"
  echo "== stage $name ended: exit $?, $((SECONDS - t0)) s"
}

for stage in $STAGES; do
  case $stage in
  capacity)
    run_stage capacity "${STAGE_SECS:-150}" env PABAL_BENCH_SECS=3 \
      PABAL_BENCH_REDIS_CPUS="$REDIS_CPUS" PABAL_BENCH_RELAY_CPUS="$FANOUT_CPUS" \
      "$PABAL_BENCH_BIN_DIR/relay_cluster" --bench capacity
    ;;
  latency)
    run_stage latency "${STAGE_SECS:-300}" env ROUNDS="${ROUNDS:-3}" SECS=3 PAUSE_SECS=3 \
      REDIS_CPUS="$REDIS_CPUS" RELAY_CPUS="$RELAY_CPUS" LOAD_CPUS="$LOAD_CPUS" \
      benches/scripts/cluster_latency.sh
    ;;
  fanout)
    run_stage fanout "${STAGE_SECS:-240}" env PABAL_BENCH_SECS=3 \
      PABAL_BENCH_REDIS_CPUS="$REDIS_CPUS" PABAL_BENCH_RELAY_CPUS="$FANOUT_CPUS" \
      "$PABAL_BENCH_BIN_DIR/relay_cluster" --bench fanout
    ;;
  workers)
    run_stage workers "${STAGE_SECS:-240}" env PABAL_PHONE_MODE=workers \
      PABAL_WORKERS="${WORKERS:-1,2,4,8}" PABAL_PHONE_SHAPES=100x100 \
      PABAL_PHONE_READERS="${PHONE_READERS:-8}" PABAL_BENCH_SECS=1 PABAL_PHONE_CPU_RATE=0 \
      "$PABAL_BENCH_BIN_DIR/phone_shape" --bench
    ;;
  fixed)
    fixed() {
      for round in $(seq 1 "$ROUNDS"); do
        echo "== round $round, $FIXED_RATE msg/s"
        env PABAL_BENCH_SECS=3 PABAL_BENCH_SHAPE=rooms-12x1 PABAL_BENCH_NODES=1,0 \
          PABAL_BENCH_APPENDFSYNC=everysec PABAL_BENCH_RATE="$FIXED_RATE" \
          PABAL_BENCH_REDIS_CPUS="$REDIS_CPUS" PABAL_BENCH_RELAY_CPUS="$RELAY_CPUS" \
          PABAL_BENCH_LOAD_CPUS="$LOAD_CPUS" "$PABAL_BENCH_BIN_DIR/relay_cluster" --bench fanout
      done
    }
    run_stage fixed "${STAGE_SECS:-150}" bash -c "$(declare -f fixed); fixed"
    ;;
  *) echo "unknown stage $stage" >&2 ;;
  esac
done
