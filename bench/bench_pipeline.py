"""Per-frame cost of the pipeline in-process (no TAPs, no system calls).

One node with memory ports: a pod on the bridge, an uplink router port with
a neighbour behind it. Measures microseconds per frame for a bridged frame,
a routed frame down the slow path (flow cache off), and a routed frame that
hits the flow cache, in both directions. Prints a table and the ratios.

    python3 bench/bench_pipeline.py [--frames N]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scapy.layers.inet import IP, UDP  # noqa: E402
from scapy.layers.l2 import ARP, Ether  # noqa: E402

from vswitch.config import parse  # noqa: E402
from vswitch.node import Node  # noqa: E402
from vswitch.packet import ZERO_VNET  # noqa: E402

POD_A, POD_B, PEER = "02:00:00:00:00:0a", "02:00:00:00:00:0b", "02:00:00:00:01:12"


def build(flow_cache: int) -> Node:
    cfg = parse({"name": "bench", "flow_cache": flow_cache,
                 "ports": [{"name": "a", "type": "memory"}, {"name": "b", "type": "memory"},
                           {"name": "up", "type": "memory"}],
                 "router": {"interfaces": [{"name": "pods", "address": "10.244.1.1/24"},
                                           {"name": "uplink", "port": "up", "address": "192.168.1.11/24"}],
                            "routes": ["10.244.2.0/24 via 192.168.1.12"]}})
    node = Node(cfg)
    node.start(None)
    for p in node.ports.values():  # measure the pipeline, not MemoryPort's list appends
        p.send = lambda buf: True
    rmac = node.router.ifaces["pods"].mac.hex(":")
    umac = node.router.ifaces["uplink"].mac.hex(":")
    # teach the FDB both pods and resolve the gateway, as a running node would have
    node.ports["a"].inject(bytes(Ether(src=POD_A, dst="ff:ff:ff:ff:ff:ff") / ARP(hwsrc=POD_A, psrc="10.244.1.5", pdst="10.244.1.1")))
    node.ports["b"].inject(bytes(Ether(src=POD_B, dst="ff:ff:ff:ff:ff:ff") / ARP(hwsrc=POD_B, psrc="10.244.1.6", pdst="10.244.1.1")))
    node.ports["up"].inject(bytes(Ether(src=PEER, dst="ff:ff:ff:ff:ff:ff") /
                                  ARP(op=1, hwsrc=PEER, psrc="192.168.1.12", pdst="192.168.1.11")))
    node.router.neigh.on_arp("uplink", 0xC0A8010C, bytes.fromhex(PEER.replace(":", "")), is_reply=True,
                             is_gratuitous=False, for_us=False)
    node.frames = {
        "bridged a->b": ("a", Ether(src=POD_A, dst=POD_B) / IP(src="10.244.1.5", dst="10.244.1.6") / UDP() / (b"x" * 18)),
        "routed pod->uplink": ("a", Ether(src=POD_A, dst=rmac) / IP(src="10.244.1.5", dst="10.244.2.7") / UDP() / (b"x" * 18)),
        "routed uplink->pod": ("up", Ether(src=PEER, dst=umac) / IP(src="10.244.2.7", dst="10.244.1.5") / UDP() / (b"x" * 18)),
    }
    return node


def per_frame_us(node: Node, case: str, frames: int) -> float:
    port_name, frame = node.frames[case]
    port = node.ports[port_name]
    data = ZERO_VNET + bytes(frame)
    buf = bytearray(len(data))
    view = memoryview(buf)
    receive = node.receive
    ts = time.monotonic()
    t0 = time.perf_counter()
    for _ in range(frames):
        buf[:] = data  # a fresh frame each time, as a port read would give
        receive(port, view, ts)
    return (time.perf_counter() - t0) / frames * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=200_000)
    args = ap.parse_args()
    slow, fast = build(0), build(8192)
    rows = []
    for case in slow.frames:
        s = min(per_frame_us(slow, case, args.frames) for _ in range(3))
        f = min(per_frame_us(fast, case, args.frames) for _ in range(3))
        rows.append((case, s, f))
    hits = fast.flows.hits
    print(f"{'frame':<22}{'slow path us':>14}{'flow cache us':>15}{'speed-up':>10}")
    for case, s, f in rows:
        print(f"{case:<22}{s:>14.2f}{f:>15.2f}{s / f:>9.2f}x")
    print(f"(flow cache hits: {hits}; copying the frame into the buffer is included in both)")


if __name__ == "__main__":
    main()
