#!/usr/bin/env python3
"""Where the slow requests of an open-loop run fall in time.

Usage: benches/stalls.py [--slow-ms 5] [--gap-ms 20] target/bench-load/logs-<time>/oha-*.sqlite

Reads oha's record of every request (what `KEEP_LOGS=1 benches/load.sh` keeps) and prints, per
file, the requests slower than --slow-ms grouped into windows: slow requests whose intended send
times are less than --gap-ms apart are one window. One window holding most of a round's slow
requests is a stall (the proxy or its machine stopped for a moment, and the requests queued
behind it); slow requests spread over the whole round are steady queueing.
"""

import argparse
import sqlite3
import sys


def windows(rows, slow_s, gap_s):
    """rows: (intended start, latency) sorted by start; yields (first, last, count, worst)."""
    current = None
    for start, latency in rows:
        if latency <= slow_s:
            continue
        if current and start - current[1] < gap_s:
            current = (current[0], start, current[2] + 1, max(current[3], latency))
        else:
            if current:
                yield current
            current = (start, start, 1, latency)
    if current:
        yield current


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slow-ms", type=float, default=5.0)
    parser.add_argument("--gap-ms", type=float, default=20.0)
    parser.add_argument("files", nargs="+")
    args = parser.parse_args()
    for path in args.files:
        db = sqlite3.connect(path)
        rows = db.execute(
            "SELECT COALESCE(start_latency_correction, start), duration FROM oha ORDER BY 1"
        ).fetchall()
        if not rows:
            print(f"{path}: no requests")
            continue
        t0 = rows[0][0]
        found = list(windows(rows, args.slow_ms / 1000, args.gap_ms / 1000))
        slow = sum(w[2] for w in found)
        print(f"{path}: {len(rows)} requests, {slow} over {args.slow_ms:g} ms in {len(found)} windows")
        for first, last, count, worst in sorted(found, key=lambda w: -w[2])[:5]:
            print(
                f"  at {first - t0:7.3f} s for {1000 * (last - first):7.1f} ms: "
                f"{count} slow, worst {1000 * worst:.1f} ms"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
