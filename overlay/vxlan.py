"""VXLAN (RFC 7348) wire format and the kernel's choices around it, as pure functions.

Header: 8 bytes, ``flags(8) reserved(24) VNI(24) reserved(8)``, flags 0x08
(I, "VNI present"). Linux sends exactly that and its receive path
(``vxlan_rcv``, drivers/net/vxlan/vxlan_core.c, without the GBP/GPE/RCO
extensions flannel never enables) checks, in this order: 8 header bytes
present; I flag set; the VNI is one of ours; an inner Ethernet header
present; no other flag and no reserved bit set (stricter than RFC 7348,
which says ignore them); inner source MAC not our own VTEP MAC (a loop);
the inner IP header present; RFC 6040 ECN (outer CE over a not-ECT inner
packet is dropped). The UDP layer has already dropped a bad non-zero UDP
checksum (zero means "none" in IPv4 and is accepted). ``check_payload``
makes the VXLAN-level checks (what a UDP socket hands over),
``check_frame`` the whole outer frame including the UDP checksum.

Transmit, as ``vxlan_xmit_one`` with flannel's device settings (tos 0, ttl
0, df unset, UDP checksums on, no port range):

- outer TOS = the device's TOS (0) with the ECN field from the inner packet,
  CE sent as ECT(0) (``INET_ECN_encapsulate``, RFC 6040 normal mode);
- TTL 64 (``ip4_dst_hoplimit``: the ip_default_ttl sysctl), DF clear, IP ID
  from the per-destination counters of ``__ip_select_ident`` (``IpIdents``);
- UDP source port ``udp_flow_src_port``: a flow hash spread over
  ip_local_port_range [32768, 60999) as ``((hash * (max - min)) >> 32) + min``
  after ``hash ^= hash << 16``; destination 8472 (flannel, the Linux default;
  IANA's 4789 if configured).

Deliberate difference, the flow hash: the kernel's ``skb_get_hash`` is a
siphash of the flow keys under a random per-boot key (and, for a pod's own
TCP traffic, may be the socket's random ``sk_txhash`` carried along, which
TCP re-rolls after a timeout), so no two hosts and no two boots agree and it
cannot be reproduced. ``flow_hash`` keeps its properties instead: CRC-32 (C
speed, the same in every process and Python version), with a MurmurHash3
finalizer on top to spread nearby flows, of (proto, addresses, ports) of the
inner IPv4 packet, addresses and ports put in order first as
``__flow_hash_consistentify`` does, so both directions of a connection get
the same port, as with the kernel; no ports for fragments and for protocols
without ports (ICMP included); for a non-IPv4 inner frame the Ethernet
addresses and type (the kernel's ``use_eth`` fallback).
"""

from __future__ import annotations

import random
import struct
import zlib

from overlay.segment import pseudo_sum
from router.ipv4 import (IP_CSUM, IP_TOS, IPV4_HDR, PARSE_REASONS, PROTO_TCP, PROTO_UDP, checksum, csum_update16,
                         parse_ipv4, set_ip_checksum)
from vswitch.packet import ETH_HLEN, ETH_P_IP, ETH_P_IPV6

VXLAN_PORT = 8472  # Linux's default and flannel's; IANA assigned 4789
VXLAN_HLEN = 8
VXLAN_FLAG_I = 0x08
VXLAN_OVERHEAD = ETH_HLEN + 20 + 8 + VXLAN_HLEN  # 50: why flannel.1 has MTU 1450 on a 1500 underlay
VNI_MAX = (1 << 24) - 1
SPORT_MIN, SPORT_MAX = 32768, 60999  # ip_local_port_range; as udp_flow_src_port, max itself is never used
OUTER_TTL = 64  # net.ipv4.ip_default_ttl
TOS_INHERIT = 1  # the device's tos 1 means "inherit" (ip link ... tos inherit)

ECN_MASK = 0x03
ECN_NOT_ECT, ECN_ECT_1, ECN_ECT_0, ECN_CE = 0, 1, 2, 3

_HDR = struct.Struct("!II")
_ETH_IP = b"\x08\x00"
_UDP = struct.Struct("!HHHH")
_HASH_SPAN = ETH_HLEN + 60 + 4
_PORT_PROTOS = frozenset((PROTO_TCP, PROTO_UDP, 33, 132, 136))  # TCP UDP DCCP SCTP UDP-Lite: ports first

# Receive drops as (reason, human text), in vxlan_rcv's order; a stage lists them in its ``drops``.
RX_DROPS = (
    ("vxlan-truncated", "fewer than 8 bytes of VXLAN header"),
    ("vxlan-no-vni-flag", "VXLAN I flag (VNI present) not set"),
    ("vxlan-unknown-vni", "VNI is not one of this VTEP's"),
    ("vxlan-inner-truncated", "inner Ethernet or IP header incomplete"),
    ("vxlan-reserved-bits", "VXLAN flag or reserved bit set that no extension in use defines"),
    ("vxlan-own-mac", "inner source MAC is this VTEP's own MAC (a loop)"),
    ("vxlan-ecn-not-ect", "outer ECN CE over an inner packet that is not ECN-capable (RFC 6040)"),
)
# What check_frame adds in front (the IP and UDP layers' own drops).
FRAME_DROPS = PARSE_REASONS + (
    ("not-vxlan", "not UDP to the VXLAN port"),
    ("udp-bad-length", "UDP length below 8 or beyond the IP payload"),
    ("udp-bad-checksum", "non-zero UDP checksum does not verify"),
)


# --- header ------------------------------------------------------------------

def encode_header(vni: int) -> bytes:
    """The 8-byte VXLAN header for ``vni``: flags 0x08, reserved bits zero."""
    if not 0 <= vni <= VNI_MAX:
        raise ValueError(f"VNI must be 0..{VNI_MAX}, got {vni!r}")
    return _HDR.pack(VXLAN_FLAG_I << 24, vni << 8)


def decode_header(buf, off: int = 0) -> tuple:
    """``(flags, reserved24, vni, reserved8)`` of the header at ``off`` (8 bytes must be there)."""
    w0, w1 = _HDR.unpack_from(buf, off)
    return w0 >> 24, w0 & 0xFFFFFF, w1 >> 8, w1 & 0xFF


def vxlan_payload(inner_frame, vni: int) -> bytes:
    """What a UDP socket sends: the VXLAN header and the inner Ethernet frame."""
    return b"".join((encode_header(vni), inner_frame))


# --- ECN (RFC 6040) ----------------------------------------------------------

def inner_dsfield(frame, off: int = 0) -> int:
    """TOS / traffic class of the IPv4 or IPv6 packet in the Ethernet frame at ``off``; 0 otherwise."""
    if len(frame) < off + ETH_HLEN + 2:
        return 0
    etype = (frame[off + 12] << 8) | frame[off + 13]
    if etype == ETH_P_IP:
        return frame[off + ETH_HLEN + 1]
    if etype == ETH_P_IPV6:
        return ((frame[off + ETH_HLEN] & 0x0F) << 4) | (frame[off + ETH_HLEN + 1] >> 4)
    return 0


def ecn_encap(tos: int, inner: int) -> int:
    """Outer TOS from the configured ``tos`` and the inner dsfield (INET_ECN_encapsulate).

    The ECN field is copied, except CE, which leaves as ECT(0): a congestion
    mark is not re-signalled on the outer header (RFC 6040 normal mode).
    ``tos`` TOS_INHERIT takes the inner DSCP too (``tos inherit``).
    """
    if tos == TOS_INHERIT:
        tos = inner
    ecn = inner & ECN_MASK
    return (tos & ~ECN_MASK & 0xFF) | (ECN_ECT_0 if ecn == ECN_CE else ecn)


def sets_ce(frame, outer_tos: int, off: int = 0) -> bool:
    """Would ``propagate_ce`` mark this inner IPv4 packet CE (outer CE over an inner ECT one)?"""
    if outer_tos & ECN_MASK != ECN_CE or len(frame) < off + ETH_HLEN + 20:
        return False
    if (frame[off + 12] << 8) | frame[off + 13] != ETH_P_IP:
        return False
    return frame[off + ETH_HLEN + IP_TOS] & ECN_MASK in (ECN_ECT_0, ECN_ECT_1)


def propagate_ce(frame: bytearray, outer_tos: int, off: int = 0) -> bool:
    """Decapsulation: mark the inner IPv4 packet CE if the outer one was (IP_ECN_set_ce).

    Only when the inner packet is ECN-capable (a not-ECT one under an outer
    CE is dropped by ``check_payload`` instead). Updates the header checksum
    (RFC 1624). Returns whether it changed the frame.
    """
    if not sets_ce(frame, outer_tos, off):
        return False
    l3 = off + ETH_HLEN
    old = frame[l3 + IP_TOS]
    word = frame[l3] << 8  # the TOS is the low byte of the header's first 16-bit word
    c = (frame[l3 + IP_CSUM] << 8) | frame[l3 + IP_CSUM + 1]
    c = csum_update16(c, word | old, word | old | ECN_CE)
    frame[l3 + IP_TOS] = old | ECN_CE
    frame[l3 + IP_CSUM] = c >> 8
    frame[l3 + IP_CSUM + 1] = c & 0xFF
    return True


# --- receive checks ----------------------------------------------------------

def check_payload(payload, *, vnis, vtep_mac: bytes, outer_tos: int = 0):
    """Drop reason (from RX_DROPS) for a UDP payload on the VXLAN port, or None to accept.

    ``vnis`` is any container of this VTEP's VNIs, ``vtep_mac`` its own MAC,
    ``outer_tos`` the outer IP TOS (IP_RECVTOS on a socket) for the ECN rule.
    """
    n = len(payload)
    if n < VXLAN_HLEN:
        return "vxlan-truncated"
    w0, w1 = _HDR.unpack_from(payload, 0)
    if not w0 >> 24 & VXLAN_FLAG_I:
        return "vxlan-no-vni-flag"
    if w1 >> 8 not in vnis:
        return "vxlan-unknown-vni"
    if n < VXLAN_HLEN + ETH_HLEN:
        return "vxlan-inner-truncated"
    if w0 != VXLAN_FLAG_I << 24 or w1 & 0xFF:
        return "vxlan-reserved-bits"
    if payload[VXLAN_HLEN + 6:VXLAN_HLEN + 12] == vtep_mac:
        return "vxlan-own-mac"
    etype = (payload[VXLAN_HLEN + 12] << 8) | payload[VXLAN_HLEN + 13]
    if etype == ETH_P_IP:
        need = 20
    elif etype == ETH_P_IPV6:
        need = 40
    else:
        return None  # ARP and the rest: no IP header to pull, no ECN field
    if n < VXLAN_HLEN + ETH_HLEN + need:
        return "vxlan-inner-truncated"
    if outer_tos & ECN_MASK == ECN_CE and inner_dsfield(payload, VXLAN_HLEN) & ECN_MASK == ECN_NOT_ECT:
        return "vxlan-ecn-not-ect"
    return None


def check_frame(frame, *, vnis, vtep_mac: bytes, dport: int = VXLAN_PORT, eth: int = 0):
    """Drop reason (FRAME_DROPS, RX_DROPS) for a whole outer Ethernet frame, or None to accept.

    The IPv4 header checks of ``parse_ipv4``; UDP to ``dport``; the UDP
    length; the UDP checksum unless it is 0; then ``check_payload``.
    """
    if len(frame) < eth + ETH_HLEN or frame[eth + 12:eth + 14] != _ETH_IP:
        return "not-vxlan"
    l3 = eth + ETH_HLEN
    h = parse_ipv4(frame, l3)
    if h.reason:
        return h.reason
    l4 = h.payload_off
    if h.proto != PROTO_UDP or h.is_fragment or h.end < l4 + 8:
        return "not-vxlan"
    _sport, dp, ulen, _csum = _UDP.unpack_from(frame, l4)
    if dp != dport:
        return "not-vxlan"
    reason = check_udp(frame, l4, h.end, h.src, h.dst)
    if reason is not None:
        return reason
    return check_payload(memoryview(frame)[l4 + 8:l4 + ulen], vnis=vnis, vtep_mac=vtep_mac, outer_tos=h.tos)


def check_udp(buf, l4: int, end: int, src: int, dst: int, verify: bool = True):
    """``udp-bad-length`` / ``udp-bad-checksum`` for the UDP header at ``l4`` of an IP packet ending
    at ``end``, or None. The checksum is skipped when it is 0, or when ``verify`` is False (the
    frame's virtio-net header vouches for it, as CHECKSUM_PARTIAL/UNNECESSARY do in __udp_lib_rcv)."""
    ulen = (buf[l4 + 4] << 8) | buf[l4 + 5]
    if ulen < 8 or l4 + ulen > end:
        return "udp-bad-length"
    if verify and (buf[l4 + 6] or buf[l4 + 7]) and \
            checksum(memoryview(buf)[l4:l4 + ulen], pseudo_sum(src, dst, PROTO_UDP, ulen)) != 0:
        return "udp-bad-checksum"
    return None


# --- UDP source port ---------------------------------------------------------

def flow_hash(frame, off: int = 0) -> int:
    """A 32-bit non-zero hash of the inner flow of the Ethernet frame at ``off``, the same both ways.

    See the module docstring for why it is CRC-32 and not the kernel's hash.
    """
    b = bytes(frame[off:off + _HASH_SPAN])  # Ethernet + the longest IPv4 header + both ports
    if len(b) >= ETH_HLEN + 20 and b[12:14] == _ETH_IP:
        src = b[26:30]
        dst = b[30:34]
        key = b[23:24] + (src + dst if src <= dst else dst + src)  # protocol, then the sorted addresses
        l4 = ETH_HLEN + ((b[ETH_HLEN] & 0x0F) << 2)
        frag = (b[20] & 0x3F) | b[21]  # MF or a fragment offset: no ports (the kernel's IS_FRAGMENT)
        if b[23] in _PORT_PROTOS and not frag and len(b) >= l4 + 4:
            sp = b[l4:l4 + 2]
            dp = b[l4 + 2:l4 + 4]
            key += sp + dp if sp <= dp else dp + sp
        h = zlib.crc32(key)
    else:
        h = zlib.crc32(b[:ETH_HLEN])
    # CRC-32 is linear: flows a few bits apart (successive client ports) get related values that
    # udp_flow_src_port's top-bits mapping folds together (857 of 1000 successive ports distinct).
    # MurmurHash3's 32-bit finalizer (a bijection) spreads them: 988 (uniformly random ports: 983 expected).
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    h ^= h >> 16
    return h or 1  # the kernel never returns a zero flow hash either


def port_from_hash(h: int, lo: int = SPORT_MIN, hi: int = SPORT_MAX) -> int:
    """``udp_flow_src_port``'s mapping of a 32-bit hash into [lo, hi)."""
    h ^= (h << 16) & 0xFFFFFFFF  # "obfuscate" so that the low 16 bits count too
    return ((h * (hi - lo)) >> 32) + lo


def source_port(frame, off: int = 0, lo: int = SPORT_MIN, hi: int = SPORT_MAX) -> int:
    """The outer UDP source port for the inner Ethernet frame at ``off``."""
    return port_from_hash(flow_hash(frame, off), lo, hi)


# --- outer headers -----------------------------------------------------------

class IpIdents:
    """Outer IPv4 IDs for DF-clear packets, after ``ip_idents_reserve`` (net/ipv4/route.c).

    One counter per (source, destination, protocol), starting at a random
    value and advancing by one per packet (by ``segs`` for a GSO packet).
    The kernel hashes that triple into a fixed table of counters and also
    jumps a counter forward by a random amount when it was idle: not done
    here (IDs only need to differ between packets in flight to one peer).
    """

    __slots__ = ("_next", "_rng")

    def __init__(self, rng: random.Random | None = None):
        self._next = {}
        self._rng = rng or random.Random()

    def reserve(self, src: int, dst: int, proto: int = PROTO_UDP, segs: int = 1) -> int:
        key = (src, dst, proto)
        ident = self._next.get(key)
        if ident is None:
            ident = self._rng.getrandbits(16)
        self._next[key] = (ident + segs) & 0xFFFF
        return ident


IDENTS = IpIdents()


def encap(inner_frame, *, src_mac: bytes, dst_mac: bytes, src_ip: int, dst_ip: int, vni: int,
          sport: int | None = None, dport: int = VXLAN_PORT, tos_inner: int | None = None, tos: int = 0,
          ttl: int = OUTER_TTL, ip_id: int | None = None, idents: IpIdents = IDENTS) -> bytes:
    """A whole outer frame, Ethernet/IPv4/UDP/VXLAN around ``inner_frame``, as vxlan_xmit_one builds it.

    Addresses are host-order ints (router.ipv4 convention), MACs 6 bytes.
    ``sport`` None: ``source_port(inner_frame)``. ``tos_inner`` None: read
    from the inner frame. ``ip_id`` None: the next ID from ``idents``. DF is
    clear and the UDP checksum is computed (0 is sent as 0xFFFF).
    """
    if sport is None:
        sport = source_port(inner_frame)
    if tos_inner is None:
        tos_inner = inner_dsfield(inner_frame)
    ulen = 8 + VXLAN_HLEN + len(inner_frame)
    total = 20 + ulen
    if total > 0xFFFF:
        raise ValueError(f"inner frame of {len(inner_frame)} bytes does not fit one IPv4 packet")
    if ip_id is None:
        ip_id = idents.reserve(src_ip, dst_ip, PROTO_UDP)
    iphdr = bytearray(IPV4_HDR.pack(0x45, ecn_encap(tos, tos_inner), total, ip_id, 0, ttl, PROTO_UDP, 0,
                                    src_ip, dst_ip))
    set_ip_checksum(iphdr, 0)
    udp_vx = _UDP.pack(sport, dport, ulen, 0) + encode_header(vni)
    c = checksum(inner_frame, pseudo_sum(src_ip, dst_ip, PROTO_UDP, ulen) + int.from_bytes(udp_vx, "big"))
    udp_vx = _UDP.pack(sport, dport, ulen, c or 0xFFFF) + udp_vx[8:]
    return b"".join((dst_mac, src_mac, _ETH_IP, iphdr, udp_vx, inner_frame))
