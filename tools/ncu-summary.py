#!/usr/bin/env python3
"""Sum an ncu `--csv --page raw` report (metric gpu__time_duration.sum) by
kernel and grid, in segments that each end with an argmax_rows launch (so a
bench run splits into its prefills and decode steps).
Usage: ncu-summary.py REPORT.csv [TOP]"""
import collections
import csv
import sys

top = int(sys.argv[2]) if len(sys.argv) > 2 else 12
rows = [l for l in open(sys.argv[1]) if l.startswith('"')]
segs = [[]]
for r in csv.DictReader(rows):
    v = r.get("gpu__time_duration.sum", "").replace(",", "")
    try:
        t = float(v) / 1e3  # ns -> us
    except ValueError:
        continue  # the units row
    name = r["Kernel Name"].split("(")[0][:44]
    segs[-1].append((name, r.get("Grid Size", "?"), r.get("Block Size", "?"), t))
    if name.startswith("argmax_rows"):
        segs.append([])
for i, s in enumerate(x for x in segs if x):
    agg = collections.defaultdict(lambda: [0, 0.0])
    for n, g, b, t in s:
        agg[(n, g, b)][0] += 1
        agg[(n, g, b)][1] += t
    print(f"--- segment {i}: {len(s)} kernels, {sum(t for *_, t in s):.0f} us")
    for (n, g, b), (c, t) in sorted(agg.items(), key=lambda kv: -kv[1][1])[:top]:
        print(f"  {n:<44} {g:>14} {b:>12} {c:>5} {t:>9.1f} {t / c:>8.2f}")
