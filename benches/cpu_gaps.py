#!/usr/bin/env python3
"""Spins on one CPU for a while, reading the monotonic clock, and reports every gap between two
reads over a threshold: time this thread did not run. Run alone on the proxy's CPU (taskset), a
gap is the CPU taken from it: by another task or interrupt on that CPU, or by the hypervisor
(steal). Usage: cpu_gaps.py SECONDS [THRESHOLD_US]. Prints one JSON line."""
import json, sys, time

def steal(cpu):
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith(f"cpu{cpu} "):
                return int(line.split()[8])
    return 0

def main():
    seconds = float(sys.argv[1])
    threshold = int(float(sys.argv[2]) * 1000) if len(sys.argv) > 2 else 1_000_000
    import os
    cpu = sorted(os.sched_getaffinity(0))[0]
    hz = os.sysconf("SC_CLK_TCK")
    s0 = steal(cpu)
    clock = time.perf_counter_ns
    start = last = clock()
    end = start + int(seconds * 1e9)
    gaps = []
    while last < end:
        now = clock()
        if now - last > threshold:
            gaps.append(now - last)
        last = now
    s1 = steal(cpu)
    gaps_us = sorted(g // 1000 for g in gaps)
    print(json.dumps({
        "cpu": cpu, "seconds": seconds, "threshold_us": threshold // 1000,
        "gaps": len(gaps_us), "over_5ms": sum(g >= 5000 for g in gaps_us),
        "longest_us": gaps_us[-1] if gaps_us else 0,
        "total_gap_ms": round(sum(gaps_us) / 1000, 1),
        "steal_ms": round((s1 - s0) * 1000 / hz, 1),
        "longest_10_us": gaps_us[-10:][::-1],
    }))

main()
