#!/usr/bin/env python3
"""FIB lookup benchmark: lookups/s with 10, 1,000 and 100,000 routes.

    python bench/bench_fib.py [--json results.json] [--seed 1]

Pure CPU: builds router.fib.Fib tables of random routes (prefix lengths 8..32
plus a default route) and times Fib.lookup over 200,000 random destinations,
best of 3 (time.perf_counter). No packets, no sandbox.

The design bounds lookup by the prefix lengths *in use*, not the route count,
so the ratio column should stay near (lengths probed) / (lengths probed at 10
routes) rather than grow with the table; "probes" is the mean number of
per-length dict probes a lookup made (uniform random destinations mostly fall
through to the /8s or the default, the worst case for longest-first probing).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from router.fib import Fib, Route  # noqa: E402

SIZES = (10, 1_000, 100_000)
LOOKUPS = 200_000
REPEATS = 3


def build(n: int, rng: random.Random) -> Fib:
    fib = Fib()
    fib.add(Route(0, 0, gateway=0xC0A80101, dev="uplink"))
    while len(fib) < n:
        plen = rng.randint(8, 32)
        prefix = rng.getrandbits(32) & ((0xFFFFFFFF << (32 - plen)) & 0xFFFFFFFF)
        fib.add(Route(prefix, plen, gateway=rng.getrandbits(32), dev="uplink", metric=rng.choice((0, 100))),
                replace=True)
    return fib


def timed(fib: Fib, dsts: list) -> float:
    """Best of REPEATS wall time for one pass of lookups over dsts."""
    lookup = fib.lookup
    best = float("inf")
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        for d in dsts:
            lookup(d)
        best = min(best, time.perf_counter() - t0)
    return best


def mean_probes(fib: Fib, dsts: list) -> float:
    order = {p: i + 1 for i, p in enumerate(fib.prefix_lengths())}
    total = 0
    for d in dsts:
        r = fib.lookup(d)
        total += order[r.plen] if r is not None else len(order)
    return total / len(dsts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    args = ap.parse_args()

    rng = random.Random(args.seed)
    dsts = [rng.getrandbits(32) for _ in range(LOOKUPS)]
    # Loop overhead (the for and the call of a no-op), shown so ns/lookup can be read net of it.
    noop = lambda d: None  # noqa: E731
    t0 = time.perf_counter()
    for d in dsts:
        noop(d)
    overhead_ns = (time.perf_counter() - t0) / LOOKUPS * 1e9

    rows = []
    for n in SIZES:
        t_build = time.perf_counter()
        fib = build(n, rng)
        t_build = time.perf_counter() - t_build
        secs = timed(fib, dsts)
        rows.append({"routes": len(fib), "prefix_lengths": len(fib.prefix_lengths()),
                     "lookups_per_s": LOOKUPS / secs, "ns_per_lookup": secs / LOOKUPS * 1e9,
                     "mean_probes": mean_probes(fib, dsts), "build_s": t_build})
    base = rows[0]["ns_per_lookup"]
    for r in rows:
        r["ratio_vs_10"] = r["ns_per_lookup"] / base

    print(f"FIB lookup, {LOOKUPS:,} random destinations, best of {REPEATS} "
          f"(Python {sys.version.split()[0]}; loop+call overhead {overhead_ns:.0f} ns)")
    head = (f"{'routes':>8}  {'lengths':>7}  {'probes':>6}  {'lookups/s':>11}  {'ns/lookup':>9}  {'ratio':>5}"
            f"  {'build s':>7}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['routes']:>8,}  {r['prefix_lengths']:>7}  {r['mean_probes']:>6.1f}  {r['lookups_per_s']:>11,.0f}  "
              f"{r['ns_per_lookup']:>9.0f}  {r['ratio_vs_10']:>5.2f}  {r['build_s']:>7.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"benchmark": "fib", "lookups": LOOKUPS, "repeats": REPEATS, "seed": args.seed,
                       "python": sys.version.split()[0], "overhead_ns": overhead_ns, "results": rows}, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
