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

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import compare  # noqa: E402

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
    return compare(os.path.abspath(__file__), "bridge benchmark: pod -> pod on one node", TOPOLOGY,
                   [("kernel bridge (veth)", "k1", "k2"), ("vswitch (TAP, vnet hdr)", "v1", "v2")], GOAL_TCP_RATIO, GOAL_PPS)


if __name__ == "__main__":
    sys.exit(main())
