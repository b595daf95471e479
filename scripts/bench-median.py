#!/usr/bin/env python3
"""Medians of several `inferq bench --json FILE` runs, as a Markdown table.

    scripts/bench-median.py run1.json run2.json run3.json

Each figure shows median [min-max] of its numbers across the runs.
"""
import json
import statistics
import sys

UNITS = {
    "jobs_per_s": ("jobs/s", 0), "achieved_per_s": ("req/s", 0), "seconds": ("s", 2),
    "p50_ms": ("ms p50", 1), "p95_ms": ("ms p95", 1), "p99_ms": ("ms p99", 1), "max_ms": ("ms max", 1),
    "error_rate": ("error rate", 4), "api_mib": ("MiB API", 0), "worker_mib": ("MiB worker", 0),
    "exactly_3": ("with exactly 3 attempts", 0), "lost": ("lost", 0), "more_than_3": ("ran more than 3 times", 0),
    "dropped": ("dropped", 0),
}
SHOWN = ["jobs_per_s", "achieved_per_s", "p50_ms", "p99_ms", "max_ms", "error_rate", "seconds",
         "dropped", "api_mib", "worker_mib", "exactly_3", "lost", "more_than_3"]


def fmt(values, digits):
    med = statistics.median(values)
    lo, hi = min(values), max(values)
    f = (lambda v: f"{v:,.{digits}f}")
    return f(med) if lo == hi else f"{f(med)} [{f(lo)}–{f(hi)}]"


def main(paths):
    runs = [json.load(open(p)) for p in paths]
    print(f"| workload | figure | median [range] of {len(runs)} runs |")
    print("| --- | --- | --- |")
    for i, row in enumerate(runs[0]):
        same = [r[i] for r in runs if i < len(r) and r[i]["figure"] == row["figure"]]
        parts = []
        for key in SHOWN:
            values = [r["numbers"][key] for r in same if key in r.get("numbers", {})]
            if key == "seconds" and "jobs_per_s" in row["numbers"]:
                continue
            if values:
                unit, digits = UNITS[key]
                parts.append(f"{fmt(values, digits)} {unit}")
        print(f"| {row['workload']} | {row['figure']} | {', '.join(parts)} |")


if __name__ == "__main__":
    main(sys.argv[1:])
