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

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import compare  # noqa: E402

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
    return compare(os.path.abspath(__file__), "router benchmark: pod -> pod across two nodes (host-gw, routed twice)", TOPOLOGY,
                   [("kernel (cni0 + ip_forward)", "ka", "kb"), ("vswitch (userspace router)", "va", "vb")], GOAL_TCP_RATIO, GOAL_PPS)


if __name__ == "__main__":
    sys.exit(main())
