#!/usr/bin/env python3
"""Where a bench process's resident set grew, mapping by mapping.

Reads two copies of /proc/PID/smaps (`PABAL_BENCH_SMAPS=PREFIX` makes a memory bench save
`PREFIX.PID.before` and `PREFIX.PID.after` around its measurement) and prints the RSS growth
per mapping, largest first, with each mapping's size and name, and the totals by kind:
the allocator's arenas (anonymous mappings of 64 MiB or more: mimalloc reserves its arenas
in large blocks), other anonymous memory (thread stacks, rings), io_uring's rings, files.

    benches/tools/smaps_diff.py PREFIX.PID.before PREFIX.PID.after [CONNECTIONS]

With CONNECTIONS the growths are also given per connection, in bytes.
"""

import sys


def parse(path):
    """{(start, end, name): {field: kB}} for every mapping in an smaps file."""
    maps = {}
    current = None
    with open(path) as f:
        for line in f:
            head = line.split()
            if not head:
                continue
            if "-" in head[0] and not head[0].endswith(":"):
                start, end = (int(x, 16) for x in head[0].split("-"))
                name = " ".join(head[5:]) if len(head) > 5 else ""
                current = (start, end, name)
                maps[current] = {}
            elif current is not None and head[0].endswith(":") and len(head) >= 2:
                try:
                    maps[current][head[0][:-1]] = int(head[1])
                except ValueError:
                    pass
    return maps


def kind(start, end, name):
    size = end - start
    if "io_uring" in name:
        return "io_uring rings"
    if name in ("", "[heap]", "[anon]") and size >= 64 << 20:
        return "allocator arenas (>= 64 MiB anonymous)"
    if name == "[stack]":
        return "main stack"
    if name == "" or name.startswith("[anon"):
        return "other anonymous (stacks, small mappings)"
    if name == "[heap]":
        return "brk heap"
    return "files and the rest"


def by_start(maps):
    """Mappings keyed by start address (a mapping that grew keeps its start)."""
    return {start: (end, name, fields) for (start, end, name), fields in maps.items()}


def main():
    before, after = by_start(parse(sys.argv[1])), by_start(parse(sys.argv[2]))
    conns = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    rows = []
    for start, (end, name, fields) in after.items():
        old = before.get(start, (0, "", {}))[2]
        grew = fields.get("Rss", 0) - old.get("Rss", 0)
        if grew:
            rows.append((grew, start, end, name, fields))
    for start, (end, name, fields) in before.items():
        if start not in after and fields.get("Rss", 0):
            rows.append((-fields["Rss"], start, end, name + " (unmapped)", {}))
    rows.sort(key=lambda r: -abs(r[0]))
    totals = {}
    print(f"{'RSS +KiB':>9} {'size KiB':>10} {'Rss':>8} {'Anon':>8} {'Priv_D':>8}  mapping")
    for grew, start, end, name, fields in rows:
        k = kind(start, end, name)
        totals[k] = totals.get(k, 0) + grew
        if abs(grew) >= 8:
            print(
                f"{grew:>9} {(end - start) >> 10:>10} {fields.get('Rss', 0):>8} "
                f"{fields.get('Anonymous', 0):>8} {fields.get('Private_Dirty', 0):>8}  "
                f"{start:x}-{end:x} {name}"
            )
    print()
    total = sum(totals.values())
    for k, v in sorted(totals.items(), key=lambda kv: -kv[1]):
        per = f"  {v * 1024 / conns:8.1f} B per connection" if conns else ""
        print(f"{v:>9} KiB  {k}{per}")
    per = f"  {total * 1024 / conns:8.1f} B per connection" if conns else ""
    print(f"{total:>9} KiB  total{per}")


if __name__ == "__main__":
    main()
