"""The L2 learning bridge (the node's cni0), as stages.

    eth-input -> l2-learn -> l2-forward -> port-tx
                                 \\-> <local stage> (frames to a MAC the node owns, e.g. the router)

Behaviour follows the Linux bridge (net/bridge/br_input.c, br_forward.c,
br_fdb.c); see docs/architecture.md for where vswitch deliberately differs.
"""

from __future__ import annotations

from typing import Dict, List

from .fdb import FULL, MOVE, NEW, REFRESH, STATIC, Fdb
from .packet import ETH_DST, ETH_SRC, mac_str
from .stage import FLOW_NOOP, Stage

LINK_LOCAL_PREFIX = b"\x01\x80\xc2\x00\x00"


class Bridge:
    """Ports, FDB and the local MACs of one bridge; the stages share it."""

    def __init__(self, fdb: Fdb | None = None) -> None:
        self.fdb = fdb if fdb is not None else Fdb()
        self.ports: list = []
        # MACs the node owns (the router's interface on this bridge) -> (stage, tag):
        # unicast to them leaves the bridge for that stage, with pkt.iface = tag, and
        # broadcast/multicast is flooded *and* handed to it (the kernel delivers
        # such frames to the bridge device too).
        self.local: Dict[bytes, tuple] = {}
        self.listener: tuple | None = None
        self._flood: Dict[object, List] = {}

    def add_local(self, mac: bytes, stage: Stage, tag=None) -> None:
        self.local[mac] = (stage, tag)
        if self.listener is None:
            self.listener = (stage, tag)

    def add_port(self, port) -> None:
        if port in self.ports:
            return
        self.ports.append(port)
        self._flood.clear()

    def remove_port(self, port) -> None:
        if port in self.ports:
            self.ports.remove(port)
            self.fdb.flush(port, include_static=True)
            self._flood.clear()

    def flood_ports(self, in_port) -> List:
        """Every bridge port but the ingress one (cached until ports change)."""
        ports = self._flood.get(in_port)
        if ports is None:
            ports = self._flood[in_port] = [p for p in self.ports if p is not in_port]
        return ports


class L2Learn(Stage):
    """Checks the source MAC, learns it, and holds back link-local control frames."""

    name = "l2-learn"
    next_names = ("l2-forward",)
    drops = {
        "bad-src-mac": "source MAC is multicast or all-zero",
        "pause-frame": "802.3x pause frame (01:80:c2:00:00:01)",
        "link-local": "IEEE link-local group address not in group_fwd_mask",
    }

    def __init__(self, bridge: Bridge, after: str = "l2-forward") -> None:
        super().__init__()
        self.bridge = bridge
        self.fdb = bridge.fdb
        self.next_names = (after,)  # a hook stage (nat-bridge, br_netfilter's place) may sit before l2-forward

    def on_bind(self, graph) -> None:
        self.fwd = graph.stages[self.next_names[0]]

    def process(self, pkt):
        buf = pkt.buf
        if buf[ETH_SRC] & 1:
            return self.drop(pkt, "bad-src-mac")
        src = bytes(buf[ETH_SRC:ETH_SRC + 6])
        if src == b"\0\0\0\0\0\0":
            return self.drop(pkt, "bad-src-mac")
        # br_handle_frame on IEEE link-local groups 01:80:c2:00:00:0X: pause (:01)
        # dies unlearned; :00 (STP) is forwarded because STP is off; the others
        # are learned but not forwarded (group_fwd_mask 0).
        link_local = buf[ETH_DST] == 0x01 and buf[ETH_DST:ETH_DST + 5] == LINK_LOCAL_PREFIX \
            and buf[ETH_DST + 5] < 0x10
        if link_local and buf[ETH_DST + 5] == 0x01:
            return self.drop(pkt, "pause-frame")
        if src in self.bridge.local:
            pkt.note = "own-mac"  # never learned (br_fdb_update only warns), still forwarded
        elif pkt.dry_run:
            e = self.fdb.get(src)
            pkt.note = ("would-learn" if e is None else
                        "static" if e.static else "would-refresh" if e.port is pkt.in_port else "would-move")
        else:
            pkt.note = self.fdb.learn(src, pkt.in_port, pkt.ts)
        if link_local and buf[ETH_DST + 5] != 0x00:
            return self.drop(pkt, "link-local")
        return self.fwd

    def flow_step(self, pkt):
        note = pkt.note
        if pkt.drop_stage is not None:
            return None
        if note == "own-mac" or note == STATIC:
            return FLOW_NOOP
        if note not in (NEW, REFRESH, MOVE):
            return None  # FULL counts an overflow per frame
        fdb, entry, gen = self.fdb, self.fdb.get(bytes(pkt.buf[ETH_SRC:ETH_SRC + 6])), self.fdb.generation

        def same_fdb(buf, ts):
            return fdb.generation == gen

        def refresh(buf, ts):  # what learn() does for a known MAC on its own port
            entry.updated = ts
        return same_fdb, refresh

    def trace_record(self, pkt) -> dict:
        fdb = pkt.note if pkt.note is not None else "not learned"
        rec = {"src": mac_str(pkt.src), "port": pkt.in_port.name, "fdb": fdb}
        if pkt.note == FULL:
            rec["why"] = f"FDB holds max_learned={self.fdb.max_learned} entries"
        return rec

    def format_trace(self, rec: dict) -> str:
        line = f"src {rec['src']} on {rec['port']}: {rec['fdb']}"
        return line + (f" ({rec['why']})" if "why" in rec else "")

    def stats(self) -> dict:
        d = super().stats()
        d.update(fdb_entries=len(self.fdb), fdb_overflow=self.fdb.overflow, fdb_moves=self.fdb.moves)
        return d


class L2Forward(Stage):
    """Chooses the egress: learned port, flood, or a local stage (router)."""

    name = "l2-forward"
    next_names = ("port-tx",)
    drops = {
        "same-port": "destination learned on the ingress port (hairpin off)",
        "flood-empty": "flooded, but the bridge has no other port",
    }

    def __init__(self, bridge: Bridge) -> None:
        super().__init__()
        self.bridge = bridge
        self.fdb = bridge.fdb

    def on_bind(self, graph) -> None:
        self.tx = graph.stages["port-tx"]

    def process(self, pkt):
        buf = pkt.buf
        dst = bytes(buf[ETH_DST:ETH_DST + 6])
        if buf[ETH_DST] & 1:  # broadcast / multicast: flood (no querier, no snooping)
            return self._flood(pkt, "flood-bcast" if dst == b"\xff" * 6 else "flood-mcast")
        local = self.bridge.local.get(dst)
        if local is not None:
            pkt.note = "local"
            pkt.iface = local[1]
            return local[0]
        port = self.fdb.lookup(dst, pkt.ts)
        if port is None:
            return self._flood(pkt, "flood-unknown")
        if port is pkt.in_port and not port.hairpin:
            pkt.note = "same-port"
            return self.drop(pkt, "same-port")
        pkt.note = "hit"
        pkt.out_port = port
        return self.tx

    def flow_step(self, pkt):
        if pkt.note == "local":
            return FLOW_NOOP
        if pkt.note != "hit":
            return None  # floods and drops are decided per frame
        fdb = self.fdb
        entry, gen, ageing = fdb.get(bytes(pkt.buf[ETH_DST:ETH_DST + 6])), fdb.generation, fdb.ageing

        def still_learned(buf, ts):  # lookup() would still return the same port
            return fdb.generation == gen and (entry.static or ts - entry.updated < ageing)
        return still_learned, None

    def _flood(self, pkt, why: str):
        ports = self.bridge.flood_ports(pkt.in_port)
        pkt.note = why
        listener = self.bridge.listener if why != "flood-unknown" else None
        if listener is not None and pkt.in_port is not listener[1]:
            pkt.iface = listener[1]
            if not ports:
                return listener[0]
            pkt.then = listener[0]
        elif not ports:
            return self.drop(pkt, "flood-empty")
        pkt.out_ports = ports
        return self.tx

    def trace_record(self, pkt) -> dict:
        rec = {"dst": mac_str(pkt.dst), "decision": pkt.note}
        if pkt.then is not None or pkt.note == "local":
            rec["local"] = str(pkt.iface)
        if pkt.note == "hit":
            rec["port"] = pkt.out_port.name
        elif pkt.note and pkt.note.startswith("flood"):
            rec["ports"] = [p.name for p in pkt.out_ports or ()]
        elif pkt.note == "same-port":
            rec["port"] = pkt.in_port.name
        return rec

    def format_trace(self, rec: dict) -> str:
        d = rec["decision"]
        if d == "hit":
            return f"dst {rec['dst']}: FDB hit -> {rec['port']}"
        if d == "local":
            return f"dst {rec['dst']}: node's own MAC -> {rec['local']}"
        if d == "same-port":
            return f"dst {rec['dst']}: learned on ingress port {rec['port']} and hairpin is off"
        kind = {"flood-bcast": "broadcast", "flood-mcast": "multicast", "flood-unknown": "FDB miss"}.get(d, d)
        also = f" and {rec['local']}" if "local" in rec else ""
        return f"dst {rec['dst']}: {kind}, flood -> {', '.join(rec.get('ports', [])) or '(none)'}{also}"
