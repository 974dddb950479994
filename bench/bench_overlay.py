#!/usr/bin/env python3
"""Overlay benchmark: pod to pod across nodes over VXLAN (flannel's backend), vswitch vs the kernel.

    python3 bench/bench_overlay.py [--quick] [--seconds S] [--json results.json]

One lab with backend vxlan (every node holds every other as a peer) and six
nodes, one pod each:

    k1, k2  kernel: cni0 + veth pods, flannel.1 (the kernel's vxlan device, as flannel builds it)
    v1, v2  vswitch with its defaults: the pipeline datapath (vxlan-encap/vxlan-decap stages on
            the uplink; TCP super-frames cross the tunnel whole, as UDP-tunnel GSO frames)
            Each pair's two daemons run on CPUs of their own (their config's cpus:, as userspace
            datapaths are deployed); --no-pin leaves them wherever the kernel puts them.
    n1, n2  vswitch with `datapath: socket`: the VTEP's own UDP sockets in the node's host
            stack (software segmentation, UDP GSO on send, UDP GRO and TCP merging on receive)

Each row is one client pod -> server pod path across the tunnel: a single-stream
iperf3 TCP run and the 64-byte UDP rate (a flood, then paced runs around what
it delivered; see bench/common.udp_small_pps), counted at the receiving pod's
eth0, i.e. encapsulated on one node, decapsulated on the other, routed on
both. Ratios are against kernel -> kernel; the goal row's TCP ratio is the
median of --rounds interleaved kernel/vswitch runs (this VM drifts by +-20%
over minutes). For rows whose sending node runs vswitch, "segments/frame" is
how many wire packets each frame the VTEP sent carried (tunnel super-frames,
or datagrams per sendmsg on the socket datapath). Runs are sequential, so two
paths never share the CPUs at the same time; the idle nodes' daemons stay
asleep. Each round also runs the same TCP stream through two bare Python TAP
relays where the two vswitch nodes sit (bench/floor.py, no VXLAN): what a
Python TAP dataplane with no work at all reaches here. --quick: 2-second runs.

The lab has no topology key for the overlay's datapath: this script wraps the
lab's overlay-section builder (vswitch.lab.lab._vswitch_overlay) for n1 and n2
and checks through `show ports` which datapath each VTEP came up with.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import floor  # noqa: E402
from common import (checked_args, ensure_sandbox, pinned_cpus, ratio, run_args, save, table, tcp_gbps,  # noqa: E402
                    udp_small_pps, with_cpus)

TOPOLOGY = {
    "name": "bench-overlay",
    "cluster": {"podCIDR": "10.244.0.0/16", "backend": "vxlan"},
    "nodes": [
        {"name": "k1", "address": "192.168.1.21/24", "podCIDR": "10.244.11.0/24", "dataplane": "kernel"},
        {"name": "k2", "address": "192.168.1.22/24", "podCIDR": "10.244.12.0/24", "dataplane": "kernel"},
        {"name": "v1", "address": "192.168.1.11/24", "podCIDR": "10.244.1.0/24", "dataplane": "vswitch"},
        {"name": "v2", "address": "192.168.1.12/24", "podCIDR": "10.244.2.0/24", "dataplane": "vswitch"},
        {"name": "n1", "address": "192.168.1.31/24", "podCIDR": "10.244.21.0/24", "dataplane": "vswitch"},
        {"name": "n2", "address": "192.168.1.32/24", "podCIDR": "10.244.22.0/24", "dataplane": "vswitch"},
    ],
    "pods": [{"name": "ka", "node": "k1"}, {"name": "kb", "node": "k2"},
             {"name": "va", "node": "v1"}, {"name": "vb", "node": "v2"},
             {"name": "na", "node": "n1"}, {"name": "nb", "node": "n2"}],
}
SOCKET = {"n1": {"datapath": "socket"}, "n2": {"datapath": "socket"}}
# (key, row label, server pod, client pod); the first row is the reference of every ratio
PATHS = [
    ("k-k", "kernel -> kernel (flannel.1)", "ka", "kb"),
    ("v-v", "vswitch -> vswitch", "va", "vb"),
    ("k-v", "kernel -> vswitch", "va", "kb"),
    ("v-k", "vswitch -> kernel", "ka", "vb"),
    ("v-v-socket", "vswitch -> vswitch, socket datapath", "na", "nb"),
]
GOAL_TCP_RATIO = 0.5  # vswitch -> vswitch TCP vs kernel -> kernel


def with_overlay_options(options: dict) -> None:
    """Make the lab give the named vswitch nodes extra `overlay:` keys (datapath)."""
    from vswitch.lab import lab as labmod
    build = labmod._vswitch_overlay

    def overlay(node, peers, underlay_mtu):
        spec = build(node, peers, underlay_mtu)
        spec.update(options.get(node.name, {}))
        return spec

    labmod._vswitch_overlay = overlay


def vtep_port(node: str) -> dict:
    from vswitch import control
    from vswitch.lab import socket_for
    [port] = [p for p in control.request(socket_for(node), "show", table="ports") if p["type"] == "vxlan"]
    return port


def vtep_counters(node: str) -> dict:
    from vswitch import control
    from vswitch.lab import socket_for
    [row] = [r for r in control.request(socket_for(node), "show", table="stats") if r["stage"] == "(vxlan)"]
    return row


def measure(st: dict, server: str, client: str, seconds: float) -> dict:
    ip = st["pods"][server]["ip"]
    sender = st["pods"][client]["node"]
    vsw = st["nodes"][sender]["dataplane"] == "vswitch"
    before = vtep_counters(sender) if vsw else None
    tcp = tcp_gbps(server, client, ip, seconds)
    batch = None
    if vsw:
        after = vtep_counters(sender)
        frames = after["tx_calls"] - before["tx_calls"]
        batch = (after["tx_packets"] - before["tx_packets"]) / frames if frames else 0.0
    return {"tcp_gbps": tcp, "tx_segments_per_frame": batch, **udp_small_pps(server, client, ip, seconds)}


def main() -> int:
    ensure_sandbox(os.path.abspath(__file__))
    title = "overlay benchmark: pod -> pod across two nodes over VXLAN (UDP 8472, VNI 1)"
    ap = argparse.ArgumentParser(description=title)
    run_args(ap)
    ap.add_argument("--rounds", type=int, default=3,
                    help="interleaved kernel/vswitch TCP runs for the goal ratio (default 3)")
    ap.add_argument("--no-pin", action="store_true",
                    help="leave the vswitch daemons unpinned (default: each pair's two on CPUs of their own)")
    args = checked_args(ap)
    if not 1 <= args.rounds <= 20:
        ap.error("--rounds must be in [1, 20]")

    from vswitch import lab
    from vswitch.lab.topology import parse

    with_overlay_options(SOCKET)
    pins = {} if args.no_pin else pinned_cpus(("v1", "v2"), ("n1", "n2"))
    st = lab.up(parse(with_cpus(TOPOLOGY, pins)), log=lambda *a: None)
    res = {}
    try:
        offloads = {n: vtep_port(n)["offloads"] for n in ("v1", "v2", "n1", "n2")}
        for n in ("v1", "v2", "n1", "n2"):
            if ("pipeline" in offloads[n]) != (n not in SOCKET):
                raise SystemExit(f"node {n} came up with the wrong datapath (offloads {offloads[n]})")
        for key, _, srv, cli in PATHS:
            res[key] = measure(st, srv, cli, args.seconds)
        rounds = {"k-k": [res["k-k"]["tcp_gbps"]], "v-v": [res["v-v"]["tcp_gbps"]], "floor": []}
        with floor.relays(cpus=(pins["v1"], pins["v2"]) if pins else None):
            for i in range(args.rounds):
                if i:
                    for key, _, srv, cli in PATHS[:2]:
                        rounds[key].append(tcp_gbps(srv, cli, st["pods"][srv]["ip"], args.seconds))
                rounds["floor"].append(floor.tcp_gbps(args.seconds))
    finally:
        lab.down()

    ref = res[PATHS[0][0]]
    round_ratios = [v / k if k else 0.0 for k, v in zip(rounds["k-k"], rounds["v-v"])]
    goal_ratio = statistics.median(round_ratios)
    floor_ratio = statistics.median(f / k if k else 0.0 for k, f in zip(rounds["k-k"], rounds["floor"]))
    print(f"{title}, {args.seconds:g} s per run{' (--quick)' if args.quick else ''}, CPUs: {os.cpu_count()}")
    print("VTEP offloads: " + ", ".join(f"{n} {'+'.join(o) or 'none'}" for n, o in offloads.items()))
    print("daemon CPUs: " + (", ".join(f"{n} {c}" for n, c in pins.items()) or "not pinned"))
    rows = [["path", "TCP Gbit/s", "TCP ratio", "64B pps delivered (best)", "pps ratio", "64B pps <1% loss",
             "64B pps (flood)", "segments/frame (TCP)"]]
    for key, label, _, _ in PATHS:
        r = res[key]
        r["tcp_ratio"] = ratio(r["tcp_gbps"], ref["tcp_gbps"])
        r["pps_ratio"] = ratio(r["delivered_pps"], ref["delivered_pps"])
        batch = r["tx_segments_per_frame"]
        rows.append([label, f"{r['tcp_gbps']:.2f}", f"{r['tcp_ratio']:.2f}x", f"{r['delivered_pps']:,.0f}",
                     f"{r['pps_ratio']:.2f}x", f"{r['lossless_pps']:,.0f}", f"{r['flood_pps']:,.0f}",
                     "-" if batch is None else f"{batch:.1f}"])
    met = goal_ratio >= GOAL_TCP_RATIO
    rows += [["TCP rounds k-k / v-v", " ".join(f"{x:.2f}" for x in rounds["k-k"]),
              " ".join(f"{x:.2f}" for x in rounds["v-v"]), "", "", "", "", ""],
             ["median round ratio", "", f"{goal_ratio:.2f}x", "", "", "", "", ""],
             ["floor: 2 bare Python TAP relays", " ".join(f"{x:.2f}" for x in rounds["floor"]),
              f"{floor_ratio:.2f}x", "", "", "", "", ""],
             ["goal (vswitch -> vswitch)", "", f">= {GOAL_TCP_RATIO}x", "", "", "", "", ""],
             ["met", "", "yes" if met else "NO", "", "", "", "", ""]]
    print(table(rows))
    print("ratios: against kernel -> kernel; numbers vary from run to run (2 CPUs shared with everything else)")
    print("floor: TCP through two relays that only read and write each frame (bench/floor.py) where the two\n"
          "vswitch nodes sit, without VXLAN: a bound on any Python TAP dataplane here (median round ratio)")
    save(args.json, {"paths": {k: {"label": label, "server": s, "client": c, **res[k]} for k, label, s, c in PATHS},
                     "offloads": offloads, "seconds": args.seconds, "quick": args.quick,
                     "tcp_rounds": rounds, "tcp_round_ratios": round_ratios, "tcp_ratio": goal_ratio,
                     "floor_tcp_ratio": floor_ratio, "daemon_cpus": pins,
                     "goals": {"tcp_ratio": GOAL_TCP_RATIO}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
