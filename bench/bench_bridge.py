#!/usr/bin/env python3
"""Bridge benchmark: pod-to-pod on one node, vswitch vs the Linux bridge, in one run.

    python bench/bench_bridge.py [--seconds 5] [--json results.json]

Two nodes in one lab: `nv` runs vswitch (TAP pods), `nk` the kernel dataplane
(cni0 bridge, veth pods, hairpin on). Each gets a single-stream iperf3 TCP
run and a 64-byte UDP flood (iperf3 -u -b 0 -l 18); small-frame rate is the
packets/s that reached the receiving pod's eth0. Runs are sequential, so the
two dataplanes never share the CPUs at the same time.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ensure_sandbox, save, table, tcp_gbps, udp_small_pps  # noqa: E402

TOPOLOGY = {
    "name": "bench-bridge",
    "nodes": [
        {"name": "nv", "address": "192.168.1.11/24", "podCIDR": "10.244.1.0/24", "dataplane": "vswitch"},
        {"name": "nk", "address": "192.168.1.12/24", "podCIDR": "10.244.2.0/24", "dataplane": "kernel"},
    ],
    "pods": [{"name": "v1", "node": "nv"}, {"name": "v2", "node": "nv"},
             {"name": "k1", "node": "nk"}, {"name": "k2", "node": "nk"}],
}
GOAL_TCP_RATIO = 0.6
GOAL_PPS = 60_000


def main() -> int:
    ensure_sandbox(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--seconds", type=float, default=5.0, help="length of each iperf3 run (default 5)")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()

    from vswitch import lab
    from vswitch.lab.topology import parse

    st = lab.up(parse(TOPOLOGY), log=lambda *a: None)
    res = {}
    try:
        for label, srv, cli in (("kernel", "k1", "k2"), ("vswitch", "v1", "v2")):
            ip = st["pods"][srv]["ip"]
            res[label] = {"tcp_gbps": tcp_gbps(srv, cli, ip, args.seconds),
                          **udp_small_pps(srv, cli, ip, args.seconds)}
    finally:
        lab.down()

    k, v = res["kernel"], res["vswitch"]
    tcp_ratio = v["tcp_gbps"] / k["tcp_gbps"]
    pps_ratio = v["delivered_pps"] / k["delivered_pps"]
    print(f"bridge benchmark: pod -> pod on one node, {args.seconds:g} s per run, CPUs: {os.cpu_count()}")
    print(table([
        ["dataplane", "TCP Gbit/s", "64B UDP pps delivered", "64B UDP pps offered"],
        ["kernel bridge (veth)", f"{k['tcp_gbps']:.2f}", f"{k['delivered_pps']:,.0f}", f"{k['sent_pps']:,.0f}"],
        ["vswitch (TAP, vnet hdr)", f"{v['tcp_gbps']:.2f}", f"{v['delivered_pps']:,.0f}", f"{v['sent_pps']:,.0f}"],
        ["ratio vswitch/kernel", f"{tcp_ratio:.2f}x", f"{pps_ratio:.2f}x", ""],
        ["goal", f">= {GOAL_TCP_RATIO}x", f">= {GOAL_PPS:,} pps", ""],
        ["met", "yes" if tcp_ratio >= GOAL_TCP_RATIO else "NO",
         "yes" if v["delivered_pps"] >= GOAL_PPS else "NO", ""],
    ]))
    save(args.json, {"kernel": k, "vswitch": v, "tcp_ratio": tcp_ratio, "pps_ratio": pps_ratio,
                     "seconds": args.seconds})
    return 0


if __name__ == "__main__":
    sys.exit(main())
