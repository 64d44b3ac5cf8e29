#!/usr/bin/env python3
"""Counts what an io_uring worker does per tick, from a perf trace of its ring.

Record (root; -k CLOCK_MONOTONIC so that the bench's phase marks line up):

    PABAL_BENCH_PHASE_MARKS=1 PABAL_BENCH_BACKEND=io_uring PABAL_BENCH_ACK=1 \\
    perf record -k CLOCK_MONOTONIC -o /tmp/ticks.data \\
      -e syscalls:sys_enter_io_uring_enter -e io_uring:io_uring_submit_req \\
      -e io_uring:io_uring_complete -e io_uring:io_uring_task_add \\
      -- target/release/deps/relay_fanout-HASH --bench rooms-100x100 2> /tmp/marks.txt
    perf script -i /tmp/ticks.data -F tid,time,event,trace --ns \\
      | benches/scripts/uring_ticks.py --marks /tmp/marks.txt --phase paced

A tick is the worker's `Backend::poll`: it starts at an enter that waits (min_complete >= 1)
and runs until the next one. Per tick it prints the distribution (min / median / p90 / max)
of: its length, its enters, the SQEs submitted (by opcode), the completions (receives,
sends, receives that ended their multishot, ENOBUFS), the connections sent to, and the
receives the kernel had queued (task_add) but not yet completed when the tick ended. Per
receive: how long the data waited between the kernel queuing the receive's task work
(the data arrived) and its completion, in microseconds and in tick boundaries crossed.
user_data decodes as the backend's (relay/src/io/uring.rs): bits 56..64 the op (2 RECV,
3 SEND), 0..32 the connection's slot.
"""

import argparse
import re
import sys
from collections import Counter, defaultdict

OP_RECV, OP_SEND = 2, 3
ENOBUFS = -105
CQE_F_MORE = 2

LINE = re.compile(r"^\s*(\d+)\s+(\d+\.\d+):\s+(\S+):\s+(.*)$")


def field(text, name):
    m = re.search(name + r"[: ]\s*(0x[0-9a-f]+|-?\d+|\S+?),?(\s|$)", text)
    return m.group(1) if m else None


def num(v):
    return int(v, 16) if v.startswith("0x") else int(v)


def dist(values):
    if not values:
        return "-"
    v = sorted(values)
    q = lambda p: v[min(len(v) - 1, int(p * len(v)))]
    fmt = (lambda x: f"{x:.0f}") if isinstance(v[0], float) else str
    return f"{fmt(v[0])} / {fmt(q(0.5))} / {fmt(q(0.9))} / {fmt(v[-1])} (n={len(v)})"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--marks", help="stderr of the bench with PABAL_BENCH_PHASE_MARKS=1")
    ap.add_argument("--phase", default="paced", help="saturated or paced")
    args = ap.parse_args()
    lo, hi = 0.0, float("inf")
    if args.marks:
        marks = {}
        for line in open(args.marks):
            m = re.match(r"phase (\w+) (\w+) monotonic_ns=(\d+)", line)
            if m:
                marks.setdefault((m.group(1), m.group(2)), int(m.group(3)) / 1e9)
        lo = marks[(args.phase, "start")]
        hi = marks[(args.phase, "end")]

    events = []
    enters_by_tid = Counter()
    rings_by_tid = defaultdict(Counter)
    for line in sys.stdin:
        m = LINE.match(line)
        if not m:
            continue
        tid, t, ev, rest = int(m.group(1)), float(m.group(2)), m.group(3), m.group(4)
        if ev.endswith("sys_enter_io_uring_enter"):
            enters_by_tid[tid] += 1
        ring = field(rest, "ring")
        if ev.endswith("io_uring_submit_req") and ring:
            rings_by_tid[tid][ring] += 1
        events.append((t, tid, ev.split(":")[-1], rest, ring))
    if not enters_by_tid:
        sys.exit("no io_uring_enter in the trace")
    worker = enters_by_tid.most_common(1)[0][0]
    ring = rings_by_tid[worker].most_common(1)[0][0]

    ticks = []  # each: dict of counters
    tick = None
    queued = {}  # user_data -> time its receive's task work was added
    waits_us, waits_ticks = [], []
    tick_no = 0
    for t, tid, ev, rest, r in events:
        inside = lo <= t <= hi
        if ev == "sys_enter_io_uring_enter":
            if tid != worker:
                continue
            if num(field(rest, "min_complete")) >= 1:
                if tick is not None:
                    tick["len_us"] = (t - tick["start"]) * 1e6
                    tick["left_queued"] = len(queued)
                    if tick["inside"]:
                        ticks.append(tick)
                tick_no += 1
                tick = {"start": t, "inside": inside, "enters": 0, "sqes": Counter(),
                        "recv": 0, "send": 0, "recv_ended": 0, "enobufs": 0,
                        "sent_to": Counter(), "recv_bytes": 0}
            if tick is not None:
                tick["enters"] += 1
            continue
        if r != ring:
            continue
        ud = num(field(rest, "user_data"))
        op = ud >> 56
        if ev == "io_uring_task_add":
            if op == OP_RECV and ud not in queued:
                queued[ud] = (t, tick_no)
            continue
        if tick is None:
            continue
        if ev == "io_uring_submit_req":
            tick["sqes"][field(rest, "opcode")] += 1
        elif ev == "io_uring_complete":
            res = num(field(rest, "result"))
            cflags = num(field(rest, "cflags"))
            if op == OP_RECV:
                tick["recv"] += 1
                tick["recv_bytes"] += max(res, 0)
                tick["enobufs"] += res == ENOBUFS
                tick["recv_ended"] += not (cflags & CQE_F_MORE)
                if ud in queued:
                    t0, n0 = queued.pop(ud)
                    if inside:
                        waits_us.append((t - t0) * 1e6)
                        waits_ticks.append(tick_no - n0)
            elif op == OP_SEND:
                tick["send"] += 1
                tick["sent_to"][ud & 0xFFFFFFFF] += 1

    print(f"worker tid {worker}, ring {ring}, phase {args.phase}: {len(ticks)} ticks")
    print("per tick, min / median / p90 / max:")
    rows = [
        ("length, us", [x["len_us"] for x in ticks]),
        ("io_uring_enter calls", [x["enters"] for x in ticks]),
        ("SQEs submitted", [sum(x["sqes"].values()) for x in ticks]),
        ("receive completions", [x["recv"] for x in ticks]),
        ("receive bytes", [x["recv_bytes"] for x in ticks]),
        ("multishot ended (re-arm)", [x["recv_ended"] for x in ticks]),
        ("ENOBUFS", [x["enobufs"] for x in ticks]),
        ("send completions", [x["send"] for x in ticks]),
        ("connections sent to", [len(x["sent_to"]) for x in ticks]),
        ("max sends to one connection", [max(x["sent_to"].values(), default=0) for x in ticks]),
        ("receives queued at tick end", [x["left_queued"] for x in ticks]),
    ]
    for name, values in rows:
        print(f"  {name:<30} {dist(values)}")
    ops = Counter()
    for x in ticks:
        ops.update(x["sqes"])
    print("  SQEs by opcode, whole phase:", dict(ops.most_common()))
    print("per receive, data queued -> completion:")
    print(f"  {'wait, us':<30} {dist(waits_us)}")
    print(f"  {'tick boundaries crossed':<30} {dist(waits_ticks)}")
    crossed = Counter(waits_ticks)
    print("  crossed 0 / 1 / 2 / 3+:", crossed[0], crossed[1], crossed[2],
          sum(v for k, v in crossed.items() if k >= 3))


if __name__ == "__main__":
    main()
