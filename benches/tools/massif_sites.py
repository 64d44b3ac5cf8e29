#!/usr/bin/env python3
"""Heap bytes by the relay's allocation site in one detailed massif snapshot (the first frame
in the relay's own source under each allocation), divided by DIVISOR (the phones).
usage: massif_sites.py MASSIF_OUT SNAPSHOT [DIVISOR]
(massif sees only the system allocator: run the bench with PABAL_BENCH_ALLOCATOR=glibc)"""
import re, sys
path, want = sys.argv[1], int(sys.argv[2])
div = float(sys.argv[3]) if len(sys.argv) > 3 else 1.0
lines = open(path).read().split("\n")
i = lines.index(f"snapshot={want}")
while not lines[i].startswith("heap_tree="): i += 1
i += 1
node = re.compile(r"^(\s*)n(\d+): (\d+) (.*)$")
# The bench's own allocator wrapper (`benches/benches/common/alloc.rs`, its frames named
# `alloc.rs` without std's `library/` path) and its `#[global_allocator]` line are the
# allocator, not a site: the site is the first relay frame below them.
BENCH_ALLOCATOR = {"alloc.rs", "benches/benches/common/alloc.rs", "idle_connections.rs"}
def ours(desc):
    m = re.search(r"\(([^():]+):\d+\)$", desc)
    if not m: return False
    f = m.group(1)
    if f in BENCH_ALLOCATOR: return False
    return "/" not in f or f.startswith("relay/") or "/relay/src" in f
sites = {}
def walk(i, attributed):
    m = node.match(lines[i]); kids, b, desc = int(m.group(2)), int(m.group(3)), m.group(4)
    j = i + 1
    here = attributed
    if here is None and ours(desc):
        here = re.sub(r"^0x[0-9A-F]+: ", "", desc)
        sites[here] = sites.get(here, 0) + b
    if kids == 0 and here is None:
        k = "unattributed: " + re.sub(r"^0x[0-9A-F]+: ", "", desc)
        sites[k] = sites.get(k, 0) + b
    for _ in range(kids):
        j = walk(j, here)
    return j
walk(i, None)
tot = 0
for k, v in sorted(sites.items(), key=lambda kv: -kv[1]):
    if "unattributed" in k and "total" not in k:
        pass
    print(f"{v/div:10.1f}  {k}")
