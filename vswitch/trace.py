"""Packets for `vswitch trace`, and trace steps rendered for people.

A packet is given as a scapy expression (``Ether()/IP(dst="10.96.0.10")/TCP(dport=80)``),
as hex, or as one frame of a pcap/pcapng file. Missing fields are filled as
scapy fills them (lengths, checksums); MACs the expression leaves unset are
the node's sensible defaults (``Node.default_macs``), never scapy's own
guess, which would ARP from the machine's namespace.

scapy is imported here and only here on the inspection side: it never runs in
the forwarding path.
"""

from __future__ import annotations

import re
from typing import Optional

HEX_RE = re.compile(r"^[0-9A-Fa-f:\s]+$")
FALLBACK_SRC = "02:00:00:00:00:01"  # a locally administered MAC when nothing was learned on the port


def _scapy_names() -> dict:
    """scapy's layer classes and nothing else: scapy.all also re-exports modules (os, builtins...)
    and functions that send packets, none of which an expression should reach."""
    import scapy.all as sa
    from scapy.packet import Packet as ScapyPacket
    return {k: v for k, v in vars(sa).items()
            if not k.startswith("_") and isinstance(v, type) and issubclass(v, ScapyPacket)}


def parse_packet(text: str, defaults: Optional[dict] = None) -> bytes:
    """A bare Ethernet frame from hex or a scapy expression (evaluated with scapy's names only)."""
    text = text.strip()
    if not text:
        raise ValueError("no packet given")
    if HEX_RE.match(text) and len(re.sub(r"[:\s]", "", text)) % 2 == 0:  # no expression looks like this
        frame = bytes.fromhex(re.sub(r"[:\s]", "", text))
        if len(frame) < 14:
            raise ValueError(f"a hex frame needs at least an Ethernet header (14 bytes), got {len(frame)}")
        return frame
    try:
        pkt = eval(text, {"__builtins__": {}}, _scapy_names())  # noqa: S307 - the user's own CLI input
    except Exception as e:  # scapy raises anything from a typo
        raise ValueError(f"cannot build packet {text!r}: {type(e).__name__}: {e}") from None
    return complete(pkt, defaults or {})


def complete(pkt, defaults: dict) -> bytes:
    """Put an Ethernet header on ``pkt`` if it has none, fill unset MACs (and the IPv4 source, when
    the node knows the address behind the source MAC) from ``defaults``, build."""
    from scapy.layers.inet import IP
    from scapy.layers.l2 import ARP, Ether
    from scapy.packet import Packet as ScapyPacket

    if not isinstance(pkt, ScapyPacket):
        raise ValueError(f"expected a scapy packet, got {type(pkt).__name__}")
    if not isinstance(pkt, Ether):
        pkt = Ether() / pkt
    src = defaults.get("src") or FALLBACK_SRC
    if "src" not in pkt.fields:
        pkt.src = src
    arp = pkt.getlayer(ARP)
    if "dst" not in pkt.fields:
        pkt.dst = "ff:ff:ff:ff:ff:ff" if (arp is not None and arp.op == 1) or not defaults.get("dst") \
            else defaults["dst"]
    if arp is not None and "hwsrc" not in arp.fields:
        arp.hwsrc = pkt.src
    ip = pkt.getlayer(IP)
    if defaults.get("ip"):  # else scapy's choice from the machine's routes (often 0.0.0.0: a martian)
        if ip is not None and "src" not in ip.fields:
            ip.src = defaults["ip"]
        if arp is not None and "psrc" not in arp.fields:
            arp.psrc = defaults["ip"]
    return bytes(pkt)


def read_frame(path: str, index: int = 1) -> bytes:
    """Frame number ``index`` (1-based, as Wireshark counts) of a pcap or pcapng file."""
    from .pcapng import read_packets
    if index < 1:
        raise ValueError(f"frame numbers start at 1, got {index}")
    for i, (_if, _ts, frame, _opts) in enumerate(read_packets(path), 1):
        if i == index:
            return frame
    raise ValueError(f"{path} has fewer than {index} frames")


# --- reading a trace --------------------------------------------------------------

def verdict(steps: list) -> str:
    """What happened to the packet in one phrase: the drop, or where it left."""
    if not steps:
        return "not processed"
    outs, last = [], steps[-1]
    for s in steps:
        if s["stage"] == "port-tx":
            outs += s["record"].get("ports", [])
    dropped = None
    if last["stage"] == "drop":
        r = last["record"]
        dropped = f"dropped by {r['stage']}: {r['reason']}"
        # only a flood goes on after port-tx (to the router's copy): then the copies did leave
        if not any(s["stage"] == "port-tx" and s["record"].get("then") for s in steps):
            return dropped
    if outs:
        dry = any(s["record"].get("dry_run") for s in steps if s["stage"] == "port-tx")
        sent = ("would leave by " if dry else "sent out ") + ", ".join(dict.fromkeys(outs))
        # a flood the router also hears: the copies left, the router's own copy may still die
        return sent + (f"; the router's copy {dropped}" if dropped else "")
    return f"ended in {last['stage']}: {last['text']}"


def render(steps: list, packet_id: Optional[int] = None, summary: Optional[str] = None) -> str:
    """The human trace: one numbered line per stage, like VPP's `show trace`."""
    lines = []
    if summary:
        lines.append(f"packet{f' {packet_id}' if packet_id else ''}: {summary}")
    width = max((len(s["stage"]) for s in steps), default=0)
    for i, s in enumerate(steps, 1):
        lines.append(f"{i:>3}  {s['stage']:<{width}}  {s['text']}")
    lines.append(f"verdict: {verdict(steps)}")
    return "\n".join(lines)


def summary(frame: bytes) -> str:
    """scapy's one-line summary of a bare Ethernet frame (for headers of traces and replays)."""
    from scapy.all import Ether  # all layers, so IP/UDP/VXLAN... are dissected
    try:
        return Ether(frame).summary()
    except Exception:  # a frame scapy cannot dissect is still worth tracing
        return f"{len(frame)} bytes"
