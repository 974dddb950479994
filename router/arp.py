"""ARP frames (RFC 826 over Ethernet/IPv4): parse and build, no I/O.

Frames are built as the kernel's arp_create does: 42 bytes (Ethernet + ARP),
unpadded; the caller prepends the virtio-net header.
"""

from __future__ import annotations

import struct

from vswitch.packet import BROADCAST, ETH_P_ARP, VNET_LEN, ZERO_MAC

ARP = struct.Struct("!HHBBH6s4s6s4s")  # htype ptype hlen plen op sha spa tha tpa
ARP_OFF = VNET_LEN + 14
OP_REQUEST, OP_REPLY = 1, 2
_ETH = struct.Struct("!6s6sH")


class ArpPacket:
    __slots__ = ("op", "sha", "spa", "tha", "tpa")

    def __init__(self, op: int, sha: bytes, spa: int, tha: bytes, tpa: int) -> None:
        self.op, self.sha, self.spa, self.tha, self.tpa = op, sha, spa, tha, tpa

    @property
    def gratuitous(self) -> bool:
        return self.spa == self.tpa


def parse(buf) -> "ArpPacket | str":
    """The ARP packet in a frame, or a drop reason (a string) when it is not Ethernet/IPv4 ARP."""
    if len(buf) < ARP_OFF + ARP.size:
        return "arp-short"
    htype, ptype, hlen, plen, op, sha, spa, tha, tpa = ARP.unpack_from(buf, ARP_OFF)
    if htype != 1 or ptype != 0x0800 or hlen != 6 or plen != 4:
        return "arp-not-ipv4"
    if op not in (OP_REQUEST, OP_REPLY):
        return "arp-bad-op"
    return ArpPacket(op, sha, int.from_bytes(spa, "big"), tha, int.from_bytes(tpa, "big"))


def build(op: int, src_mac: bytes, dst_mac: bytes, sha: bytes, spa: int, tha: bytes, tpa: int) -> bytes:
    """A bare Ethernet frame carrying one ARP packet."""
    return _ETH.pack(dst_mac, src_mac, ETH_P_ARP) + ARP.pack(
        1, 0x0800, 6, 4, op, sha, spa.to_bytes(4, "big"), tha, tpa.to_bytes(4, "big"))


def request(mac: bytes, spa: int, tpa: int, dst_mac: bytes | None = None) -> bytes:
    """Who-has tpa: broadcast, or unicast to a known MAC when probing (PROBE state)."""
    return build(OP_REQUEST, mac, dst_mac or BROADCAST, mac, spa, ZERO_MAC, tpa)


def reply(mac: bytes, req: ArpPacket) -> bytes:
    """is-at for a request that asked for one of our addresses (arp_process: op 2, to the sha)."""
    return build(OP_REPLY, mac, req.sha, mac, req.tpa, req.sha, req.spa)
