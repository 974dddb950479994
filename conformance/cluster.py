"""What a scenario sees of a running lab: pods, roles, probes and tables, the same for both dataplanes.

Scenarios describe what they observe in *roles* (``a1``, ``gw:node1``,
``node:node2``, ``ext``) rather than in MACs or generated addresses, so an
all-kernel run and an all-vswitch run can be compared field by field.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from typing import Dict, Iterable, List, Optional

from vswitch import lab as vlab
from vswitch.lab.lab import UNDERLAY

from .netio import Points

VSWITCH = [sys.executable, "-m", "vswitch"]


class Cluster:
    def __init__(self, st: dict) -> None:
        self.st = st
        self.pods = st["pods"]
        self.nodes = st["nodes"]
        self.externals = st["externals"]
        self.points = Points()
        for name in self.pods:
            self.points.add(name, name, "eth0")
        for name in self.externals:
            self.points.add(name, name, "eth0")
        self.points.add("underlay", UNDERLAY, "br0")
        self.gw_mac: Dict[str, str] = {}
        self.roles: Dict[str, str] = {}
        for name, p in self.pods.items():
            self.roles[p["mac"]] = name
            gw = self.gateway(name)
            self.gw_mac[name] = self._resolve(name, gw)
            self.roles.setdefault(self.gw_mac[name], f"gw:{p['node']}")
        for name, e in self.externals.items():
            self.roles[e["mac"]] = name
        ext = next(iter(self.externals), None)
        if ext is not None:  # the nodes' underlay MACs, as an outside host learns them
            for node, info in self.nodes.items():
                mac = self._resolve(ext, info["address"].split("/")[0])
                if mac:
                    self.roles.setdefault(mac, f"node:{node}")

    # --- lab members -----------------------------------------------------------------
    def ip(self, member: str) -> str:
        if member in self.pods:
            return self.pods[member]["ip"]
        if member in self.externals:
            return self.externals[member]["address"].split("/")[0]
        return self.nodes[member]["address"].split("/")[0]

    def mac(self, member: str) -> str:
        return (self.pods.get(member) or self.externals[member])["mac"]

    def node_of(self, pod: str) -> str:
        return self.pods[pod]["node"]

    def gateway(self, pod: str) -> str:
        return self.nodes[self.node_of(pod)]["gateway"].split("/")[0]

    def dataplane(self, node: str) -> str:
        return self.nodes[node]["dataplane"]

    def exec(self, member: str, *cmd: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return vlab.exec_in(member, list(cmd), timeout=timeout)

    def _resolve(self, member: str, addr: str) -> Optional[str]:
        """The MAC ``member``'s kernel resolved for ``addr`` (after one ping to it)."""
        self.exec(member, "ping", "-n", "-c", "1", "-W", "1", addr, timeout=10)
        out = self.exec(member, "ip", "neigh", "show", addr).stdout
        m = re.search(r"lladdr (\S+)", out)
        return m.group(1) if m else None

    def role(self, mac: str) -> str:
        return self.roles.get(mac, "broadcast" if mac == "ff:ff:ff:ff:ff:ff" else
                              "multicast" if int(mac[:2], 16) & 1 else "other")

    # --- probes ------------------------------------------------------------------------
    def frame(self, member: str, pkt, dst_mac: Optional[str] = None) -> bytes:
        """``pkt`` (scapy, from the IP layer up, or a whole Ether) as a frame sent by ``member``:
        source MAC its own, destination its gateway's unless given."""
        from scapy.layers.l2 import Ether
        if isinstance(pkt, Ether):
            return bytes(pkt)
        dst = dst_mac or (self.gw_mac[member] if member in self.pods else None)
        if dst is None:
            raise ValueError(f"{member}: give the destination MAC")
        return bytes(Ether(src=self.mac(member), dst=dst) / pkt)

    def probe(self, member: str, pkt, watch: Iterable[str], window: float = 1.0, dst_mac: Optional[str] = None,
              until=None) -> Dict[str, list]:
        """Send ``pkt`` from ``member`` and return, per watched point, the scapy frames that
        arrived there (what the member itself sent is left out)."""
        from scapy.all import Ether  # every layer, so frames dissect fully
        frame = self.frame(member, pkt, dst_mac)
        self.points.drain()
        self.points.send(member, frame)
        seen = self.points.watch(window, until=until)
        out = {}
        for point in watch:
            out[point] = [Ether(f) for d, f in seen[point] if not (point == member and d == "out")
                          and not (point != "underlay" and d == "out")]
        return out

    # --- tables --------------------------------------------------------------------------
    def conntrack(self, node: str) -> List[dict]:
        """Conntrack entries as ``{proto, state, orig: {src,dst,sport,dport}, reply: {...}, flags}``:
        `conntrack -L` on a kernel node, `vswitch show conntrack -o json` on a vswitch node."""
        if self.dataplane(node) == "vswitch":
            res = subprocess.run(VSWITCH + ["show", "conntrack", "--node", node, "-o", "json"], capture_output=True,
                                 text=True, timeout=30)
            rows = json.loads(res.stdout or "[]")
            return [{"proto": r["proto"], "state": r.get("state"), "orig": r["orig"], "reply": r["reply"],
                     "flags": sorted(r.get("flags", []))} for r in rows]
        out = self.exec(node, "conntrack", "-L").stdout
        return [parse_conntrack_line(line) for line in out.splitlines() if line.strip()]


_KV = re.compile(r"(\w+)=(\S+)")


def parse_conntrack_line(line: str) -> dict:
    """One `conntrack -L` line as the shape vswitch's table has."""
    words = line.split()
    proto = words[0]
    state = words[3] if proto == "tcp" else None
    tuples, cur, flags = [], {}, []
    for w in words:
        m = _KV.fullmatch(w)
        if m:
            k, v = m.groups()
            if k == "src" and cur.get("src") is not None:
                tuples.append(cur)
                cur = {}
            if k in ("src", "dst"):
                cur[k] = v
            elif k in ("sport", "dport", "id", "type", "code"):
                cur[k] = int(v)
        elif w.startswith("[") and w.endswith("]"):
            flags.append(w.strip("[]"))
    tuples.append(cur)
    orig, reply = (tuples + [{}, {}])[:2]
    return {"proto": proto, "state": state, "orig": orig, "reply": reply, "flags": sorted(flags)}
