#!/usr/bin/env python3
"""Summarises the A/B runs in this directory: prints the Markdown table of
summary.md. Run from the repository root: python3 perf/results/2026-11-26-wal-ab/summary.py"""
import json, glob, os, statistics
here = os.path.dirname(os.path.abspath(__file__))
rows = []
for v in ("old", "wal"):
    for f in sorted(glob.glob(f"{here}/cmd-{v}-*.json"), key=lambda p: int(p.rsplit('-', 1)[1][:-5])):
        d = json.load(open(f))
        l = d["latency_us"]
        rows.append((v, int(f.rsplit('-', 1)[1][:-5]), l["p50"], l["p90"], l["p99"], l["p999"],
                     d["gateway"]["cpu_us_per_command"], d["machine"]["steal_cpu_s"], "%d/%d" % (d["exactly_once"]["exactly_once"], d["exactly_once"]["issued"])))
print("| gateway | run | p50 µs | p90 µs | p99 µs | p99.9 µs | gateway CPU µs/command | steal CPU-s | exactly once |")
print("|---|---|---|---|---|---|---|---|---|")
for r in sorted(rows, key=lambda r: (r[1], r[0])):
    print("| %s | %d | %d | %d | %d | %d | %.0f | %.2f | %s |" % r)
for v in ("old", "wal"):
    rs = [r for r in rows if r[0] == v]
    print(f"\n{v}: median p50 {statistics.median(r[2] for r in rs):.0f} µs, median p99 {statistics.median(r[4] for r in rs):.0f} µs, "
          f"median CPU {statistics.median(r[6] for r in rs):.0f} µs/command, runs with p99 < 2,000 µs: "
          f"{sum(r[4] < 2000 for r in rs)} of {len(rs)}; of those with steal < 0.3 CPU-s: "
          f"{sum(r[4] < 2000 for r in rs if r[7] < 0.3)} of {sum(r[7] < 0.3 for r in rs)}")
