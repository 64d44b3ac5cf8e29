#!/usr/bin/env bash
# How often the phones' reader threads sleep and are woken per delivery under each server
# of the phone-shape bench (the raw-send baseline, the relay on epoll, on io_uring), at one
# fixed rate: the sum of the voluntary context switches of the phones process's reader
# threads, polled every 0.1 s until it exits (each measurement starts a phones process of
# its own). The readers start once every phone is connected; idle, each wakes every 20 ms.
#
#   benches/scripts/phone_wakeups.sh              # 20,000 deliveries/s for 3 s
#   RATE=10000 SECS=5 benches/scripts/phone_wakeups.sh
#
set -euo pipefail
cd "$(dirname "$0")/../.."
RATE=${RATE:-20000}
SECS=${SECS:-3}
cargo bench -p pabal-benches --bench phone_shape --no-run 2>/dev/null
bin=$(ls -t target/release/deps/phone_shape-* | grep -v '\.d$' | head -1)
seen=$(mktemp -d)
trap 'rm -rf "$seen"' EXIT
PABAL_PHONE_ROUNDS=1 PABAL_PHONE_RATE=$RATE PABAL_PHONE_CPU_RATE=0 PABAL_BENCH_SECS=$SECS \
  "$bin" --bench > "$seen/bench.log" 2>&1 &
bench=$!
mkdir "$seen/threads"
while kill -0 "$bench" 2>/dev/null; do
  for pid in $(pgrep -f -- "--phones-child" || true); do
    parent=$(ps -o ppid= -p "$pid" 2>/dev/null | tr -d ' ' || true)
    [ -n "$parent" ] || continue # it exited between pgrep and ps
    server=$(tr '\0' ' ' < "/proc/$parent/cmdline" 2>/dev/null | grep -o -- '--relay-max [a-z_]*' | cut -d' ' -f2 || true)
    for task in /proc/"$pid"/task/*; do
      # The reader threads only: the main thread (tid = pid) connects and handshakes the
      # phones (a relay's phones say HELLO and bind a room, the baseline's do not) and runs
      # the publishers.
      [ "${task##*/}" = "$pid" ] && continue
      n=$(awk '/^voluntary_ctxt_switches/ { print $2 }' "$task/status" 2>/dev/null || true)
      [ -n "$n" ] && echo "$pid ${server:-baseline} $n" > "$seen/threads/$pid.${task##*/}"
    done
  done
  sleep 0.1
done
cat "$seen/bench.log"
deliveries=$((RATE * SECS))
echo "== the phones' reader threads' voluntary context switches at $RATE deliveries/s for $SECS s ($deliveries deliveries)"
cat "$seen"/threads/* | awk -v d="$deliveries" '{ s[$2] += $3 } END { for (k in s) printf "%-9s %8d  %.2f per delivery\n", k, s[k], s[k] / d }'
