#!/usr/bin/env python3
"""Router benchmark: pod-to-pod across nodes (host-gw), vswitch vs the kernel, in one run.

    python bench/bench_router.py [--seconds 5] [--json results.json]

Four nodes in one lab with backend host-gw: `v1` and `v2` run vswitch (TAP
pods, a userspace router each, uplink TAPs on the underlay bridge), `k1` and
`k2` the kernel dataplane (cni0 bridge, veth pods, ip_forward and host-gw
routes). One pod per node. Each pair gets a single-stream iperf3 TCP run and a
64-byte UDP flood (iperf3 -u -b 0 -l 18) from the pod on node 2 to the pod on
node 1; small-packet rate is the packets/s that reached the receiving pod's
eth0, i.e. routed twice (source node, destination node). Runs are sequential,
so the two dataplanes never share the CPUs at the same time.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ensure_sandbox, save, table, tcp_gbps, udp_small_pps  # noqa: E402

TOPOLOGY = {
    "name": "bench-router",
    "cluster": {"podCIDR": "10.244.0.0/16", "backend": "host-gw"},
    "nodes": [
        {"name": "v1", "address": "192.168.1.11/24", "podCIDR": "10.244.1.0/24", "dataplane": "vswitch"},
        {"name": "v2", "address": "192.168.1.12/24", "podCIDR": "10.244.2.0/24", "dataplane": "vswitch"},
        {"name": "k1", "address": "192.168.1.21/24", "podCIDR": "10.244.11.0/24", "dataplane": "kernel"},
        {"name": "k2", "address": "192.168.1.22/24", "podCIDR": "10.244.12.0/24", "dataplane": "kernel"},
    ],
    "pods": [{"name": "va", "node": "v1"}, {"name": "vb", "node": "v2"},
             {"name": "ka", "node": "k1"}, {"name": "kb", "node": "k2"}],
}
GOAL_TCP_RATIO = 0.5
GOAL_PPS = 50_000


def main() -> int:
    ensure_sandbox(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--seconds", type=float, default=5.0, help="length of each iperf3 run (default 5)")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()
    if not 0 < args.seconds <= 600:
        ap.error("--seconds must be in (0, 600]")

    from vswitch import lab
    from vswitch.lab.topology import parse

    st = lab.up(parse(TOPOLOGY), log=lambda *a: None)
    res = {}
    try:
        for label, srv, cli in (("kernel", "ka", "kb"), ("vswitch", "va", "vb")):
            ip = st["pods"][srv]["ip"]
            res[label] = {"tcp_gbps": tcp_gbps(srv, cli, ip, args.seconds),
                          **udp_small_pps(srv, cli, ip, args.seconds)}
    finally:
        lab.down()

    k, v = res["kernel"], res["vswitch"]
    tcp_ratio = v["tcp_gbps"] / k["tcp_gbps"] if k["tcp_gbps"] else 0.0
    pps_ratio = v["delivered_pps"] / k["delivered_pps"] if k["delivered_pps"] else 0.0
    print(f"router benchmark: pod -> pod across two nodes (host-gw, routed twice), {args.seconds:g} s per run, "
          f"CPUs: {os.cpu_count()}")
    print(table([
        ["dataplane", "TCP Gbit/s", "64B UDP pps delivered", "64B UDP pps offered"],
        ["kernel (cni0 + ip_forward)", f"{k['tcp_gbps']:.2f}", f"{k['delivered_pps']:,.0f}", f"{k['sent_pps']:,.0f}"],
        ["vswitch (userspace router)", f"{v['tcp_gbps']:.2f}", f"{v['delivered_pps']:,.0f}", f"{v['sent_pps']:,.0f}"],
        ["ratio vswitch/kernel", f"{tcp_ratio:.2f}x", f"{pps_ratio:.2f}x", ""],
        ["goal", f">= {GOAL_TCP_RATIO}x", f">= {GOAL_PPS:,} pps", ""],
        ["met", "yes" if tcp_ratio >= GOAL_TCP_RATIO else "NO",
         "yes" if v["delivered_pps"] >= GOAL_PPS else "NO", ""],
    ]))
    save(args.json, {"kernel": k, "vswitch": v, "tcp_ratio": tcp_ratio, "pps_ratio": pps_ratio,
                     "seconds": args.seconds, "goals": {"tcp_ratio": GOAL_TCP_RATIO, "pps": GOAL_PPS}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
