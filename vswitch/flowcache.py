"""The flow cache: replays the stages' decisions for frames of an established flow.

Open vSwitch's idea, kept small. The first frame of a flow walks the stages
(the slow path, which is the truth) and each stage on its way says how to
replay its decision (``Stage.flow_step``): guards that must still hold
(TTL > 1, the neighbour still REACHABLE, the FDB unchanged, ...) and actions
(refresh the FDB entry, decrement the TTL, write the MACs, send). Later
frames with the same key run the guards and, if all pass, the actions,
without building a Packet or walking the graph; a failed guard sends the
frame down the slow path, which records the flow again if it can.

A flow exists only if every stage on the path gave a step, so drops, ICMP
errors, floods and traced/dry-run packets always take the slow path.

Stage packet counters stay exact: each flow counts its hits and credits
them to its stages when it is replaced or flushed, and ``credit()`` adds the
live flows' hits for a `show stats`.
"""

from __future__ import annotations

import struct
from socket import inet_ntoa
from typing import Dict, Optional

from .packet import mac_str

# The key of an IPv4 frame: Ethernet header (MACs + type), the IP protocol,
# the addresses, and for TCP/UDP the ports (a connection, for conntrack's
# sake). Everything else a decision reads is checked by the guards.
_KEY = struct.Struct("14s9xB2x8s4s")
KEY_OFFSET = 10  # the virtio-net header comes first
MIN_KEY_LEN = KEY_OFFSET + _KEY.size
DEFAULT_SIZE = 65536


def flow_key(port, buf):
    """The cache key of a frame, or None if it is not one the cache handles: not IPv4, or a TCP
    segment with SYN, FIN or RST (they change conntrack's state, so no flow could replay them,
    and recording one costs a short connection more than the cache could ever give back)."""
    if len(buf) < MIN_KEY_LEN or buf[22] != 0x08 or buf[23] != 0x00:
        return None
    eth, proto, addrs, ports = _KEY.unpack_from(buf, KEY_OFFSET)
    if proto == 6:
        flags = KEY_OFFSET + 27 + (buf[KEY_OFFSET + 14] & 0x0F) * 4  # byte 13 of the TCP header
        if flags >= len(buf) or buf[flags] & 0x07:
            return None
    elif proto != 17:
        ports = None  # ICMP's next bytes change per packet (checksum): not part of a flow
    return (port, eth, proto, addrs, ports)


class Flow:
    __slots__ = ("stages", "guards", "actions", "hits", "credited")

    def __init__(self, steps: list) -> None:
        self.stages = tuple(s for s, _, _ in steps)
        self.guards = tuple(g for _, g, _ in steps if g is not None)
        self.actions = tuple(a for _, _, a in steps if a is not None)
        self.hits = self.credited = 0

    def run(self, buf, ts: float) -> bool:
        for guard in self.guards:
            if not guard(buf, ts):
                return False
        for action in self.actions:
            action(buf, ts)
        self.hits += 1
        return True

    def credit(self) -> None:
        """Hand this flow's hits to its stages' packet counters."""
        n = self.hits - self.credited
        for st in self.stages:
            st.packets += n
        self.credited = self.hits


class FlowCache:
    def __init__(self, size: int = DEFAULT_SIZE) -> None:
        self.size = size
        self.flows: Dict[tuple, Flow] = {}
        self.hits = self.misses = self.inserts = self.flushes = 0

    def lookup(self, key) -> Optional[Flow]:
        return self.flows.get(key)

    def insert(self, key, steps: list) -> None:
        flows = self.flows
        old = flows.get(key)
        if old is not None:
            old.credit()
        elif len(flows) >= self.size:  # full: start over rather than track recency per hit
            self.flush()
        flows[key] = Flow(steps)
        self.inserts += 1

    def flush(self) -> int:
        n = len(self.flows)
        for flow in self.flows.values():
            flow.credit()
        self.flows.clear()
        self.flushes += 1
        return n

    def credit(self) -> None:
        for flow in self.flows.values():
            flow.credit()

    def __len__(self) -> int:
        return len(self.flows)

    def counters(self) -> dict:
        return {"flows": len(self.flows), "size": self.size, "hits": self.hits, "misses": self.misses,
                "inserts": self.inserts, "flushes": self.flushes}

    def rows(self) -> list:
        """One row per cached flow (for `show flows`)."""
        out = []
        for (port, eth, proto, addrs, ports), flow in self.flows.items():
            row = {"in_port": port.name, "dst_mac": mac_str(eth[0:6]), "src_mac": mac_str(eth[6:12]), "proto": proto,
                   "src": inet_ntoa(addrs[0:4]), "dst": inet_ntoa(addrs[4:8]), "hits": flow.hits,
                   "stages": [s.name for s in flow.stages]}
            if ports is not None:
                row["sport"], row["dport"] = int.from_bytes(ports[:2], "big"), int.from_bytes(ports[2:], "big")
            out.append(row)
        out.sort(key=lambda r: (r["in_port"], r["src"], r["dst"]))
        return out
