"""The Python API: a whole node in-process, scapy packets in, scapy packets and the trace out.

    from scapy.all import Ether, IP, TCP
    from vswitch import SimNode

    node = SimNode.from_config("node.yaml")   # every port becomes an in-memory port
    res = node.inject("pod1", IP(src="10.244.1.5", dst="10.96.0.10") / TCP(dport=80))
    print(res)                                 # each stage's decision, then the verdict
    syn = res.out("pod2")[0]                   # what left port pod2, as a scapy Ether
    node.show("conntrack")                     # any table `vswitch show` prints, as rows

The node is the real one (vswitch.node.Node: the same stages, tables and
flow cache as the daemon); only the ports are memory ports, the VXLAN port
keeps its datagrams instead of calling sendmsg, and the clock is the
simulator's own, moved by ``advance`` so timers run deterministically.
"""

from __future__ import annotations

import json
from typing import Any, List, NamedTuple, Optional, Union

from .config import NodeConfig, load, parse
from .node import Node
from .packet import VNET_LEN, ZERO_VNET
from .ports import MemoryPort
from .trace import complete, render, summary, verdict

TICK = 0.1  # the daemon's timer period


class Emitted(NamedTuple):
    """One frame a port sent: its name and the bare Ethernet frame (outer frame for VXLAN)."""
    port: str
    frame: bytes

    @property
    def scapy(self):
        from scapy.all import Ether  # all layers, so IP/UDP/VXLAN... are dissected
        return Ether(self.frame)


class Result:
    """What one injected packet did: the trace (when traced) and every frame sent meanwhile."""

    def __init__(self, frame: bytes, port: str, steps: Optional[list], emitted: List[Emitted], pid: int = 0):
        self.frame, self.port, self.steps, self.emitted, self.id = frame, port, steps, emitted, pid

    def out(self, port: Optional[str] = None) -> list:
        """Emitted frames (on ``port``, or all) as scapy packets, in send order."""
        return [e.scapy for e in self.emitted if port is None or e.port == port]

    @property
    def ports(self) -> List[str]:
        return list(dict.fromkeys(e.port for e in self.emitted))

    @property
    def verdict(self) -> str:
        if self.steps is not None:
            return verdict(self.steps)
        return f"sent out {', '.join(self.ports)}" if self.emitted else "nothing sent"

    @property
    def dropped(self) -> Optional[tuple]:
        """(stage, reason) when the packet died in the pipeline without leaving by any port, else None."""
        if self.steps and self.steps[-1]["stage"] == "drop" and not any(
                s["stage"] == "port-tx" and s["record"].get("then") for s in self.steps):
            r = self.steps[-1]["record"]
            return r["stage"], r["reason"]
        return None

    def stage(self, name: str) -> Optional[dict]:
        """The trace record of stage ``name`` (the first time the packet passed it)."""
        return next((s["record"] for s in self.steps or () if s["stage"] == name), None)

    def to_dict(self) -> dict:
        return {"id": self.id, "in": self.port, "packet": summary(self.frame), "verdict": self.verdict,
                "steps": self.steps, "emitted": [{"port": e.port, "packet": summary(e.frame)} for e in self.emitted]}

    def __str__(self) -> str:
        text = render(self.steps, self.id, f"in {self.port}: {summary(self.frame)}") if self.steps is not None \
            else f"in {self.port}: {summary(self.frame)}\nverdict: {self.verdict}"
        return "\n".join([text] + [f"  -> {e.port}: {summary(e.frame)}" for e in self.emitted])

    def __repr__(self) -> str:
        return f"<Result in={self.port} {self.verdict!r} emitted={len(self.emitted)}>"


class SimPort(MemoryPort):
    def __init__(self, name: str, log: list, **kw) -> None:
        super().__init__(name, **kw)
        self._log = log

    def send(self, buf) -> bool:
        self._log.append(Emitted(self.name, bytes(buf[VNET_LEN:])))
        return super().send(buf)


class SimNode:
    def __init__(self, cfg: NodeConfig, start: float = 1000.0) -> None:
        self.now = start
        self.emitted: List[Emitted] = []  # everything any port sent, in order
        self.node = Node(cfg, clock=lambda: self.now)
        if self.node.overlay is not None:
            from overlay.memport import MemoryVxlanPort
            ov = self.node.overlay
            ov.replace_port(MemoryVxlanPort(ov.port.name, ov.vtep, mtu=ov.port.mtu))
            ov.port.on_send = lambda port, outer: self.emitted.append(Emitted(port.name, outer))
        self.node.start(None, make_port=lambda spec: SimPort(spec["name"], self.emitted, hairpin=spec["hairpin"],
                                                             mtu=spec["mtu"]))

    @classmethod
    def from_config(cls, source: Union[str, dict, NodeConfig], **kw) -> "SimNode":
        """A config file path, a config mapping (as the YAML would load) or a NodeConfig."""
        if isinstance(source, NodeConfig):
            return cls(source, **kw)
        return cls(parse(source) if isinstance(source, dict) else load(source), **kw)

    @property
    def name(self) -> str:
        return self.node.name

    # --- packets ---------------------------------------------------------------
    def frame(self, port: str, pkt: Any) -> bytes:
        """``pkt`` (scapy packet, bytes, or a scapy expression string) as a complete Ethernet frame,
        unset MACs filled as `vswitch trace` fills them."""
        if isinstance(pkt, (bytes, bytearray)):
            return bytes(pkt)
        if isinstance(pkt, str):
            from .trace import parse_packet
            return parse_packet(pkt, self.node.default_macs(port))
        return complete(pkt.copy(), self.node.default_macs(port))

    def inject(self, port: str, pkt: Any, *, trace: bool = True, commit: bool = True,
               vnet: bytes = ZERO_VNET) -> Result:
        """Run one packet in at ``port``. ``trace=False`` takes the daemon's own path (flow cache
        included) and records no steps; ``commit=False`` is `vswitch trace`'s dry run: no state
        changes and nothing sent."""
        frame = self.frame(port, pkt)
        mark = len(self.emitted)
        if trace:
            p = self.node.trace(port, frame, dry_run=not commit, vnet=vnet)
            return Result(frame, port, p.trace, self.emitted[mark:], p.id)
        if not commit:
            raise ValueError("an untraced packet always commits (use trace=True with commit=False)")
        self.node.port(port).inject(frame, self.now, vnet)
        return Result(frame, port, None, self.emitted[mark:])

    def inject_vxlan(self, src: str, payload: Any) -> Result:
        """A VXLAN datagram's UDP payload (scapy ``VXLAN()/Ether()/...`` or bytes) received from
        underlay address ``src``: the VTEP's receive checks, then the pipeline (untraced)."""
        if self.node.overlay is None:
            raise KeyError(f"node {self.name} has no overlay")
        data = bytes(payload)
        mark = len(self.emitted)
        self.node.overlay.port.inject_datagram(src, data, self.now)
        return Result(data[8:], self.node.overlay.port.name, None, self.emitted[mark:])  # the inner frame

    def take(self) -> List[Emitted]:
        """Every frame sent since the last take (including ARP/ICMP the node generated on its own)."""
        out, self.emitted[:] = list(self.emitted), []
        return out

    # --- time and tables ----------------------------------------------------------
    def advance(self, seconds: float) -> List[Emitted]:
        """Move the clock, running the daemon's timers (ARP retries, neighbour states, expiry)
        every 0.1 s on the way; returns the frames those timers sent."""
        if seconds < 0:
            raise ValueError("time only moves forward")
        mark = len(self.emitted)
        end = self.now + seconds
        step = max(TICK, seconds / 10_000)  # long jumps tick coarser: timers are seconds apart anyway
        while self.now + step <= end:
            self.now += step
            self.node.tick()
        self.now = end
        self.node.tick()
        self.node.expire()
        return self.emitted[mark:]

    def show(self, table: str) -> list:
        return self.node.show(table)

    def show_json(self, table: str) -> str:
        return json.dumps(self.show(table), indent=2, default=str)

    def close(self) -> None:
        self.node.close()

    def __enter__(self) -> "SimNode":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
