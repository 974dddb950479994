"""Shared pieces of the benchmarks: sandbox entry, iperf3 runs, result tables.

Every benchmark runs inside its own `vswitch sandbox` (re-executing itself
there when started outside), so its namespaces vanish when it ends. Traffic
only flows between the lab's own namespaces, and every load run is bounded
by iperf3's -t.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
from typing import List, Optional

from vswitch.lab.traffic import iperf3, rx_packets
from vswitch.sandbox import enter, in_sandbox

SMALL_PAYLOAD = 18  # 14 Ethernet + 20 IP + 8 UDP + 18 = 60 bytes on the wire (64 with the FCS)


def ensure_sandbox(script: str) -> None:
    """Re-run this script inside a fresh sandbox unless already in one."""
    if not in_sandbox():
        sys.exit(enter([sys.executable, script] + sys.argv[1:]))


def pinned_cpus(*pairs) -> dict:
    """Node name -> CPU: the two vswitch nodes of each pair on CPUs of their own (the first and the
    second CPU this process may use), as userspace datapaths are deployed (a node config's cpus:);
    {} with a single CPU. The benchmarks' --no-pin skips this."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return {}
    return {name: cpus[i] for pair in pairs for i, name in enumerate(pair)}


def with_cpus(topology: dict, pins: dict) -> dict:
    """``topology`` with each pinned node's cpus: set."""
    return dict(topology, nodes=[dict(n, cpus=[pins[n["name"]]]) if n["name"] in pins else n
                                 for n in topology["nodes"]])


def tcp_gbps(server: str, client: str, server_ip: str, seconds: float) -> float:
    """Single-stream TCP throughput received by the server, Gbit/s."""
    out = iperf3(server, client, server_ip, seconds)
    return out["end"]["sum_received"]["bits_per_second"] / 1e9


def udp_run(server: str, client: str, server_ip: str, seconds: float, rate_pps: float = 0) -> dict:
    """One run of 64-byte UDP frames, paced at ``rate_pps`` (0: as fast as iperf3 can send).

    Delivered = packets/s that reached the server pod's eth0 (what crossed the dataplane).
    """
    bits = int(rate_pps * SMALL_PAYLOAD * 8)  # iperf3 -b counts UDP payload bits
    before = rx_packets(server)
    out = iperf3(server, client, server_ip, seconds, ["-u", "-b", str(bits), "-l", str(SMALL_PAYLOAD)])
    delivered = rx_packets(server) - before
    s = out["end"]["sum"]
    dur = s.get("seconds") or seconds
    sent = s["packets"] / dur
    return {"rate_pps": rate_pps, "sent_pps": sent, "delivered_pps": delivered / dur,
            "loss": max(0.0, 1 - delivered / s["packets"]) if s["packets"] else 1.0}


def udp_small_pps(server: str, client: str, server_ip: str, seconds: float) -> dict:
    """Small-frame rate: a flood, then paced runs around what the flood delivered.

    On 2 CPUs an unpaced iperf3 sender takes a whole core from the dataplane it
    measures, so the flood alone understates a userspace switch. The paced runs
    (0.75x to 1.5x the flood's delivered rate) give the best delivered rate and
    the RFC 2544-style rate: the highest offered rate delivered with < 1% loss.
    """
    runs = [udp_run(server, client, server_ip, seconds)]
    flood = runs[0]["delivered_pps"]
    for f in (0.75, 1.0, 1.25, 1.5):
        runs.append(udp_run(server, client, server_ip, seconds, flood * f))
    best = max(runs, key=lambda r: r["delivered_pps"])
    clean = [r for r in runs[1:] if r["loss"] < 0.01]
    return {"delivered_pps": best["delivered_pps"], "sent_pps": runs[0]["sent_pps"],
            "flood_pps": flood, "lossless_pps": max((r["sent_pps"] for r in clean), default=0.0), "runs": runs}


def run_args(ap) -> None:
    """--quick / --seconds / --json, shared by the benches; parse with checked_args."""
    ap.add_argument("--quick", action="store_true", help="short (2-second) runs")
    ap.add_argument("--seconds", type=float, help="length of each run (default 5, --quick 2)")
    ap.add_argument("--json", help="also write the results to this file")


def checked_args(ap):
    args = ap.parse_args()
    if args.seconds is None:
        args.seconds = 2.0 if args.quick else 5.0
    if not 0 < args.seconds <= 600:
        ap.error("--seconds must be in (0, 600]")
    return args


def table(rows: List[List[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def save(path: Optional[str], result: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
        print(f"results written to {os.path.abspath(path)}")


def compare(script: str, title: str, topology: dict, pairs: list, goal_tcp_ratio: float, goal_pps: int) -> int:
    """The kernel-vs-vswitch run every dataplane benchmark does.

    ``pairs`` is ``[(row label, server pod, client pod)]`` with the kernel pair
    first and the vswitch pair second; both run in the same lab, one after the
    other, so they never share the CPUs at the same time.
    """
    import argparse

    ensure_sandbox(script)
    ap = argparse.ArgumentParser(description=title)
    ap.add_argument("--seconds", type=float, default=5.0, help="length of each iperf3 run (default 5)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="TCP runs per dataplane, interleaved kernel/vswitch; the ratio is the median (default 3)")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()
    if not 0 < args.seconds <= 600:
        ap.error("--seconds must be in (0, 600]")
    if not 1 <= args.rounds <= 20:
        ap.error("--rounds must be in [1, 20]")

    from vswitch import lab
    from vswitch.lab.topology import parse

    st = lab.up(parse(topology), log=lambda *a: None)
    res = [{"tcp_runs": []} for _ in pairs]
    try:
        # Interleaved rounds: this VM's throughput drifts by +-20% over minutes, so one
        # kernel run against one vswitch run minutes apart says little.
        for _ in range(args.rounds):
            for r, (_, srv, cli) in zip(res, pairs):
                r["tcp_runs"].append(tcp_gbps(srv, cli, st["pods"][srv]["ip"], args.seconds))
        for r, (_, srv, cli) in zip(res, pairs):
            r.update(udp_small_pps(srv, cli, st["pods"][srv]["ip"], args.seconds))
    finally:
        lab.down()

    k, v = res
    for r in res:
        r["tcp_gbps"] = statistics.median(r["tcp_runs"])
    round_ratios = [b / a if a else 0.0 for a, b in zip(k["tcp_runs"], v["tcp_runs"])]
    tcp_ratio = statistics.median(round_ratios)
    pps_ratio = v["delivered_pps"] / k["delivered_pps"] if k["delivered_pps"] else 0.0
    print(f"{title}, {args.seconds:g} s per run, {args.rounds} TCP rounds, CPUs: {os.cpu_count()}")
    rows = [["dataplane", "TCP Gbit/s (median)", "64B pps delivered (best)", "64B pps <1% loss", "64B pps (flood)"]]
    for (label, _, _), r in zip(pairs, res):
        rows.append([label, f"{r['tcp_gbps']:.2f}", f"{r['delivered_pps']:,.0f}", f"{r['lossless_pps']:,.0f}",
                     f"{r['flood_pps']:,.0f}"])
    rows += [
        ["ratio vswitch/kernel", f"{tcp_ratio:.2f}x", f"{pps_ratio:.2f}x", "", ""],
        ["per-round TCP ratios", " ".join(f"{x:.2f}" for x in round_ratios), "", "", ""],
        ["goal", f">= {goal_tcp_ratio}x", f">= {goal_pps:,} pps", "", ""],
        ["met", "yes" if tcp_ratio >= goal_tcp_ratio else "NO", "yes" if v["delivered_pps"] >= goal_pps else "NO",
         "", ""],
    ]
    print(table(rows))
    save(args.json, {"kernel": k, "vswitch": v, "tcp_ratio": tcp_ratio, "tcp_round_ratios": round_ratios,
                     "pps_ratio": pps_ratio,
                     "seconds": args.seconds, "goals": {"tcp_ratio": goal_tcp_ratio, "pps": goal_pps}})
    return 0


# --- helpers for benchmarks that drive their own programs in lab members ----------------------------

def tcp_gbps_to(server: str, client: str, server_ip: str, target: str, seconds: float) -> float:
    """Like tcp_gbps, but the client connects to ``target`` (a Service's ClusterIP, say) while the
    server still listens on ``server_ip``: iperf3 takes the last -c it is given."""
    out = iperf3(server, client, server_ip, seconds, ["-c", target])
    return out["end"]["sum_received"]["bits_per_second"] / 1e9


def py_start(member: str, code: str, *args: object, timeout: float = 10.0):
    """Start ``python3 -c code args`` in a lab member; returns the Popen once the program has
    printed its first line (its "ready"). Stop it with ``py_stop``."""
    import select
    import subprocess

    from vswitch.lab.lab import exec_argv
    proc = subprocess.Popen(exec_argv(member, [sys.executable, "-u", "-c", code, *map(str, args)]),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready or not proc.stdout.readline():
        py_stop(proc)
        raise RuntimeError(f"program in {member} did not start: {proc.stderr.read()[-400:]}")
    return proc


def py_stop(proc) -> None:
    """Stop a program py_start started (the kernel keeps processes alive in a deleted netns)."""
    import subprocess

    proc.kill()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def py_json(member: str, code: str, *args: object, timeout: float = 60.0) -> dict:
    """Run ``python3 -c code args`` in a lab member to completion; its stdout is one JSON object."""
    from vswitch.lab.lab import exec_in
    res = exec_in(member, [sys.executable, "-c", code, *map(str, args)], timeout=timeout)
    try:
        return json.loads(res.stdout)
    except ValueError:
        raise RuntimeError(f"program in {member} exited with {res.returncode}: "
                           f"{(res.stdout + res.stderr)[-400:]}") from None


def ratio(a: float, b: float) -> float:
    """a / b, 0 when b is 0 (a failed run shows as 0.00x rather than a traceback)."""
    return a / b if b else 0.0


def percentile(values: List[float], p: float) -> float:
    """The p-th percentile (0-100) by nearest rank; 0 for no values."""
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s), max(1, math.ceil(p / 100 * len(s)))) - 1]
