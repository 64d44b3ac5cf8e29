#!/usr/bin/env bash
# The engine's added latency (issue 13: at most 1 ms p99 at half of max rate) with Redis on a
# core of its own: the relay alone against one node on Redis, rooms-12x1 (12 rooms of one
# publisher and one subscriber: no fan-out to queue behind), at 1,000 msg/s and at half of
# one node's saturated rate, both backends, ROUNDS rounds alternating the two rates; then
# the medians the README's table needs.
#
#   benches/scripts/cluster_latency.sh
#   ROUNDS=5 SECS=3 benches/scripts/cluster_latency.sh
#   REDIS_CPUS= RELAY_CPUS= benches/scripts/cluster_latency.sh   # unpinned, as before
#   LOAD_CPUS=1 benches/scripts/cluster_latency.sh   # the relay node alone on core 0,
#                                                    # Redis and the load on core 1
#   ENGINE_THREAD=1 benches/scripts/cluster_latency.sh   # each worker's engine on a thread
#                                                        # of its own (cluster.engine_thread)
#   LOAD_IDLE=1 benches/scripts/cluster_latency.sh   # the load generator under SCHED_IDLE:
#                                                    # it takes only what Redis and the
#                                                    # relay leave of their cores
#
# Defaults: REDIS_CPUS=1 (redis-server alone on core 1), RELAY_CPUS=0 (the relay nodes and
# the load generator on core 0), LOAD_CPUS unset (the load generator's threads stay with
# the relay nodes; set: on those CPUs, each thread pinned, PABAL_BENCH_LOAD_CPUS),
# APPENDFSYNC=everysec, SECS=3 per phase, ROUNDS=3, PAUSE_SECS=5. Each run
# prints its placement (as the kernel reports it) and the load average, and the script prints
# the machine's own pauses (benches/benches/machine_pauses.rs) before and after; quote them
# with the figures. Output: the bench's own rows and stage lines, then one summary line per backend
# and rate.
set -euo pipefail
cd "$(dirname "$0")/../.."

ROUNDS=${ROUNDS:-3}
SECS=${SECS:-3}
REDIS_CPUS=${REDIS_CPUS-1}
RELAY_CPUS=${RELAY_CPUS-0}
LOAD_CPUS=${LOAD_CPUS-}
LOAD_IDLE=${LOAD_IDLE:-0}
APPENDFSYNC=${APPENDFSYNC:-everysec}
ENGINE_THREAD=${ENGINE_THREAD:-0}
SHAPE=${SHAPE:-rooms-12x1}

# PABAL_BENCH_BIN_DIR: run the bench executables there (benches/scripts/device_prepare.sh
# puts them in .device/bin) instead of building them with cargo.
bench() {
  local name=$1
  shift
  if [ -n "${PABAL_BENCH_BIN_DIR:-}" ]; then
    "$PABAL_BENCH_BIN_DIR/$name" --bench "$@"
  else
    cargo bench -q -p pabal-benches --bench "$name" -- "$@"
  fi
}
if [ -z "${PABAL_BENCH_BIN_DIR:-}" ]; then
  cargo bench -p pabal-benches --bench relay_cluster --no-run
  cargo bench -p pabal-benches --bench machine_pauses --no-run
fi
out=$(mktemp)
trap 'rm -f "$out"' EXIT

# The machine's own pauses (a thread spinning alone on each CPU), before and after the run:
# the floor under every p99 below.
pauses() { PABAL_BENCH_SECS=${PAUSE_SECS:-5} bench machine_pauses; }
echo "== the machine's pauses before the run"
pauses

for round in $(seq 1 "$ROUNDS"); do
  for rate in 1000 half; do
    echo "== round $round of $ROUNDS, rate $rate, load average $(cut -d' ' -f1-3 /proc/loadavg)"
    (
      export PABAL_BENCH_SECS="$SECS" PABAL_BENCH_SHAPE="$SHAPE" PABAL_BENCH_NODES=1,0 \
        PABAL_BENCH_APPENDFSYNC="$APPENDFSYNC" \
        PABAL_BENCH_REDIS_CPUS="$REDIS_CPUS" PABAL_BENCH_RELAY_CPUS="$RELAY_CPUS" \
        PABAL_BENCH_LOAD_CPUS="$LOAD_CPUS" PABAL_BENCH_ENGINE_THREAD="$ENGINE_THREAD" \
        PABAL_BENCH_LOAD_IDLE="$LOAD_IDLE"
      if [ "$rate" = 1000 ]; then export PABAL_BENCH_RATE=1000; fi
      bench relay_cluster fanout
    ) | tee -a "$out"
  done
done

echo "== the machine's pauses after the run"
pauses

# The median of the numbers on stdin.
median() { sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) print "-"; else if (NR % 2) print v[(NR + 1) / 2]; else printf "%g\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
# The values of field $1 in the `added` lines of backend $2 and pace $3, one per line.
field() { grep '^added ' "$out" | grep " backend=$2 " | grep " pace=$3 " | tr ' ' '\n' | sed -n "s/^$1=//p"; }

echo
echo "== summary: $SHAPE, one node on Redis against the relay alone, appendfsync $APPENDFSYNC," \
  "REDIS_CPUS=${REDIS_CPUS:-unset} RELAY_CPUS=${RELAY_CPUS:-unset} LOAD_CPUS=${LOAD_CPUS:-unset} LOAD_IDLE=$LOAD_IDLE ENGINE_THREAD=$ENGINE_THREAD, $ROUNDS rounds, medians (each round's added p99 and load)"
printf '%-9s %-12s %9s %20s %20s %12s  %s\n' backend pace 'msg/s' 'alone p50 / p99 ms' \
  '1 node p50 / p99 ms' 'added p99' 'per round: added p99 (load)'
for backend in epoll io_uring; do
  for pace in fixed half-of-max; do
    [ -n "$(field rate "$backend" "$pace")" ] || continue
    rounds=$(paste -d' ' <(field added_p99 "$backend" "$pace") <(field load "$backend" "$pace") |
      awk '{ printf "%s%s (%s)", (NR > 1 ? " / " : ""), $1, $2 }')
    printf '%-9s %-12s %9s %20s %20s %12s  %s\n' "$backend" "$pace" \
      "$(field rate "$backend" "$pace" | median)" \
      "$(field alone_p50 "$backend" "$pace" | median) / $(field alone_p99 "$backend" "$pace" | median)" \
      "$(field p50 "$backend" "$pace" | median) / $(field p99 "$backend" "$pace" | median)" \
      "$(field added_p99 "$backend" "$pace" | tr -d + | median)" "$rounds"
  done
done
