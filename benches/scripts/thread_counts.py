#!/usr/bin/env python3
"""Syscalls and context switches per thread in one phase of a bench, per message.

Record the whole machine (root; -k CLOCK_MONOTONIC so that the bench's phase marks line up):

    PABAL_BENCH_PHASE_MARKS=1 PABAL_BENCH_BACKEND=epoll PABAL_BENCH_SHAPE=rooms-12x1 \\
    PABAL_BENCH_NODES=1 PABAL_BENCH_RATE=12000 PABAL_BENCH_APPENDFSYNC=everysec \\
    PABAL_BENCH_REDIS_CPUS=1 PABAL_BENCH_RELAY_CPUS=0 \\
    perf record -a -k CLOCK_MONOTONIC -o /tmp/threads.data \\
      -e sched:sched_switch -e raw_syscalls:sys_enter \\
      -- target/release/deps/relay_cluster-HASH --bench fanout 2> /tmp/marks.txt
    perf script -i /tmp/threads.data -F comm,tid,time,event,trace --ns \\
      | benches/scripts/thread_counts.py --marks /tmp/marks.txt --phase paced --messages N

The first `phase paced start` / `end` pair in the marks file is the window (the first row
the bench runs). Prints, per thread name (numbers in names folded: every pabal-worker-N is
one line): syscalls, context switches out (voluntary: the thread slept; involuntary: it was
preempted while runnable), and each per message when `--messages` is given.
"""

import argparse
import re
import sys
from collections import Counter

LINE = re.compile(r"^\s*(.+?)\s+(\d+)\s+(?:\[\d+\]\s+)?(\d+\.\d+):\s+(\S+):\s*(.*)$")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--marks", required=True)
    ap.add_argument("--phase", default="paced")
    ap.add_argument("--messages", type=float, default=0.0)
    args = ap.parse_args()
    marks = {}
    for line in open(args.marks):
        m = re.match(r"phase (\w+) (\w+) monotonic_ns=(\d+)", line)
        if m:
            marks.setdefault((m.group(1), m.group(2)), int(m.group(3)) / 1e9)
    lo, hi = marks[(args.phase, "start")], marks[(args.phase, "end")]
    syscalls, voluntary, preempted = Counter(), Counter(), Counter()
    for line in sys.stdin:
        m = LINE.match(line)
        if not m:
            continue
        comm, t, ev, rest = m.group(1), float(m.group(3)), m.group(4), m.group(5)
        if not lo <= t <= hi:
            continue
        name = re.sub(r"\d+", "N", comm)
        if ev.endswith("sys_enter"):
            syscalls[name] += 1
        elif ev.endswith("sched_switch"):
            prev = re.search(r"prev_comm=(.*?) prev_pid=\d+ prev_prio=\d+ prev_state=(\S+)", rest)
            if prev:
                who = re.sub(r"\d+", "N", prev.group(1))
                if prev.group(2).startswith("R"):
                    preempted[who] += 1
                else:
                    voluntary[who] += 1
    print(f"{args.phase} phase, {hi - lo:.2f} s" + (f", {args.messages:.0f} messages" if args.messages else ""))
    print(f"{'thread':<22} {'syscalls':>9} {'sleeps':>8} {'preempted':>10}" + ("   per message: syscalls / sleeps / preempted" if args.messages else ""))
    names = sorted(set(syscalls) | set(voluntary) | set(preempted), key=lambda n: -(syscalls[n] + voluntary[n]))
    for n in names[:15]:
        per = ""
        if args.messages:
            k = args.messages
            per = f"   {syscalls[n] / k:.2f} / {voluntary[n] / k:.2f} / {preempted[n] / k:.2f}"
        print(f"{n:<22} {syscalls[n]:>9} {voluntary[n]:>8} {preempted[n]:>10}{per}")


if __name__ == "__main__":
    main()
