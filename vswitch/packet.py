"""The packet buffer every stage works on.

A frame travels as one buffer that starts with the 10-byte virtio-net header
(struct virtio_net_hdr, include/uapi/linux/virtio_net.h) followed by the
Ethernet frame. TAP devices opened with IFF_VNET_HDR and AF_PACKET sockets
with PACKET_VNET_HDR read and write exactly this layout, so a super-frame (up
to 64 KB with gso_type/gso_size/csum_start/csum_offset) moves from port to
port without being copied or re-segmented. Stages touch headers with
``struct`` at fixed offsets; nothing here imports scapy.
"""

from __future__ import annotations

import re
import struct
from ctypes import addressof, c_char
from itertools import count

VNET_HDR = struct.Struct("<BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
VNET_LEN = VNET_HDR.size  # 10
ZERO_VNET = bytes(VNET_LEN)

# virtio_net_hdr.flags
VNET_F_NEEDS_CSUM = 1
VNET_F_DATA_VALID = 2
VNET_F_UDP_TUNNEL_CSUM = 8  # tunnel GSO: each segment's outer UDP checksum is to be computed too
# virtio_net_hdr.gso_type
GSO_NONE = 0
GSO_TCPV4 = 1
GSO_UDP = 3
GSO_TCPV6 = 4
GSO_UDP_L4 = 5
GSO_UDP_TUNNEL = 0x20  # VIRTIO_NET_HDR_GSO_UDP_TUNNEL_IPV4: an IPv4 UDP tunnel around the GSO type
GSO_ECN = 0x80
GSO_NAMES = {GSO_NONE: "none", GSO_TCPV4: "tcpv4", GSO_UDP: "udp", GSO_TCPV6: "tcpv6", GSO_UDP_L4: "udp_l4"}

# Offsets into the buffer (virtio-net header first).
ETH = VNET_LEN
ETH_DST = ETH
ETH_SRC = ETH + 6
ETH_TYPE = ETH + 12
ETH_HLEN = 14
MIN_FRAME = ETH_HLEN

ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
ETH_P_8021Q = 0x8100
ETH_P_8021AD = 0x88A8
ETH_P_IPV6 = 0x86DD

BROADCAST = b"\xff" * 6
ZERO_MAC = bytes(6)

_ids = count(1)
_HEX_BYTE = re.compile(r"[0-9A-Fa-f]{1,2}")


def mac_str(mac: bytes) -> str:
    return mac.hex(":")


def mac_bytes(text: str) -> bytes:
    """Parse 'aa:bb:cc:dd:ee:ff' (or '-' separated) into 6 bytes; ValueError if malformed."""
    parts = text.replace("-", ":").split(":")
    if len(parts) != 6 or not all(_HEX_BYTE.fullmatch(p) for p in parts):
        raise ValueError(f"not a MAC address: {text!r}")
    return bytes(int(p, 16) for p in parts)


def headroom(buf, n: int):
    """``buf`` grown by ``n`` bytes at the front, without a copy; None when there is no room.

    The skb headroom idea: ports read each frame HEADROOM bytes into their
    receive buffer, and by convention whatever lies in front of a frame's
    view is free (that room, or outer headers a decapsulation consumed), so
    an encapsulation writes its headers there instead of copying the frame.
    Only views of a bytearray qualify (never an mmap'ed ring).
    """
    if type(buf) is not memoryview or type(buf.obj) is not bytearray or buf.readonly or not len(buf):
        return None
    base = memoryview(buf.obj)
    off = addressof(c_char.from_buffer(buf)) - addressof(c_char.from_buffer(base))
    return base[off - n:off + len(buf)] if off >= n else None


class Packet:
    """One frame in flight plus the decisions stages made about it.

    ``buf`` holds the virtio-net header and the frame. Decision fields are
    plain attributes so that a stage records what it did in one store and the
    trace formatter reads it back only when tracing is on.
    """

    __slots__ = (
        "buf", "in_port", "ts", "id",
        "out_port", "out_ports", "then",
        "drop_stage", "drop_reason",
        "trace", "note", "dry_run", "snaps",
        # L3 decisions (router, nat, overlay stages fill these in)
        "l3", "ip", "iface", "route", "nh", "out_iface", "icmp",
        "ct",  # the conntrack entry and direction (nat stages)
    )

    def __init__(self, buf, in_port=None, ts: float = 0.0, trace=None, dry_run: bool = False):
        self.buf = buf
        self.in_port = in_port
        self.ts = ts
        self.id = 0  # assigned lazily (capture/trace) so the fast path stays cheap
        self.out_port = None
        self.out_ports = None
        self.then = None  # a stage to continue with after port-tx (a flood the router also hears)
        self.drop_stage = None
        self.drop_reason = None
        self.trace = trace
        self.note = None  # the last stage's decision, for its trace formatter
        self.dry_run = dry_run
        self.snaps = None  # the frame after each traced stage, while a capture wants them
        self.l3 = 0  # offset of the IP header in buf
        self.ip = self.iface = self.route = self.nh = self.out_iface = self.icmp = None
        self.ct = None

    @classmethod
    def from_frame(cls, frame: bytes, in_port=None, ts: float = 0.0, vnet: bytes = ZERO_VNET, **kw) -> "Packet":
        """Wrap a bare Ethernet frame (no virtio-net header), as tests and trace do."""
        return cls(bytearray(vnet) + bytearray(frame), in_port, ts, **kw)

    def ensure_id(self) -> int:
        if not self.id:
            self.id = next(_ids)
        return self.id

    # --- Ethernet -------------------------------------------------------
    @property
    def frame(self) -> memoryview:
        return memoryview(self.buf)[VNET_LEN:]

    @property
    def dst(self) -> bytes:
        return bytes(self.buf[ETH_DST:ETH_DST + 6])

    @property
    def src(self) -> bytes:
        return bytes(self.buf[ETH_SRC:ETH_SRC + 6])

    @property
    def ethertype(self) -> int:
        return (self.buf[ETH_TYPE] << 8) | self.buf[ETH_TYPE + 1]

    # --- virtio-net header ----------------------------------------------
    @property
    def vnet(self) -> "VnetHdr":
        return VnetHdr(*VNET_HDR.unpack_from(self.buf, 0))

    @property
    def is_gso(self) -> bool:
        return (self.buf[1] & 0x7F) != GSO_NONE

    def __len__(self) -> int:
        return len(self.buf) - VNET_LEN

    def __repr__(self) -> str:
        return f"<Packet {len(self)}B {mac_str(self.src)}->{mac_str(self.dst)} type=0x{self.ethertype:04x}>"


class VnetHdr(tuple):
    """Decoded virtio-net header (for traces and tests; stages read offsets directly)."""

    __slots__ = ()
    _fields = ("flags", "gso_type", "hdr_len", "gso_size", "csum_start", "csum_offset")

    def __new__(cls, flags, gso_type, hdr_len, gso_size, csum_start, csum_offset):
        return tuple.__new__(cls, (flags, gso_type, hdr_len, gso_size, csum_start, csum_offset))

    flags = property(lambda s: s[0])
    gso_type = property(lambda s: s[1])
    hdr_len = property(lambda s: s[2])
    gso_size = property(lambda s: s[3])
    csum_start = property(lambda s: s[4])
    csum_offset = property(lambda s: s[5])

    def pack(self) -> bytes:
        return VNET_HDR.pack(*self)

    def describe(self) -> str:
        if self[1] == GSO_NONE and not self[0]:
            return "plain"
        parts = []
        if self[1] != GSO_NONE:
            kind = GSO_NAMES.get(self[1] & 0x1F, str(self[1] & 0x1F))
            kind += "+udp-tunnel" if self[1] & GSO_UDP_TUNNEL else ""
            parts.append(f"gso={kind}{'+ecn' if self[1] & GSO_ECN else ''} gso_size={self[3]} hdr_len={self[2]}")
        if self[0] & VNET_F_NEEDS_CSUM:
            parts.append(f"csum_start={self[4]} csum_offset={self[5]}")
        if self[0] & VNET_F_DATA_VALID:
            parts.append("data_valid")
        return " ".join(parts)
