"""Unit tests for overlay.vxlan: RFC 7348 header, receive checks, source ports, ECN, outer headers.

Expected bytes are written out by hand or built with scapy (which dissects
UDP 8472 as VXLAN), never with the module under test.
"""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import ARP, Ether
from scapy.layers.vxlan import VXLAN
from scapy.packet import Raw

from overlay.vxlan import (FRAME_DROPS, RX_DROPS, SPORT_MAX, SPORT_MIN, VXLAN_OVERHEAD, VXLAN_PORT, IpIdents,
                           check_frame, check_payload, decode_header, ecn_encap, encap, encode_header, flow_hash,
                           inner_dsfield, port_from_hash, propagate_ce, source_port, vxlan_payload)
from router.ipv4 import ip_int

VTEP_A = bytes.fromhex("0a0000000a01")  # our VTEP MAC
VTEP_B = bytes.fromhex("0a0000000b01")  # the peer's
NODE_A, NODE_B = "192.168.1.10", "192.168.1.20"
UNDERLAY_A, UNDERLAY_B = "52:54:00:00:00:0a", "52:54:00:00:00:0b"
VNIS = frozenset({1})


def eth(**kw) -> Ether:
    # Always explicit addresses: a bare Ether() above IP makes scapy ARP for the destination.
    kw.setdefault("src", "02:00:00:00:00:01")
    kw.setdefault("dst", "02:00:00:00:00:02")
    return Ether(**kw)


def inner_tcp(src="10.244.1.2", dst="10.244.2.3", sport=40000, dport=80, tos=0, load=b"x" * 64,
              smac=VTEP_B, dmac=VTEP_A) -> bytes:
    return bytes(Ether(src=smac, dst=dmac) / IP(src=src, dst=dst, tos=tos) /
                 TCP(sport=sport, dport=dport, flags="A") / Raw(load))


def vx(inner: bytes, vni=1, flags=0x08, rsvd1=0, rsvd2=0) -> bytes:
    """A VXLAN payload written out by hand (not with encode_header)."""
    return struct.pack("!B3s3sB", flags, rsvd1.to_bytes(3, "big"), vni.to_bytes(3, "big"), rsvd2) + inner


def outer(payload: bytes, *, chksum=None, dport=VXLAN_PORT, tos=0) -> bytes:
    """An outer frame from the peer, built by scapy (UDP checksum computed unless given)."""
    return bytes(Ether(src=UNDERLAY_B, dst=UNDERLAY_A) / IP(src=NODE_B, dst=NODE_A, tos=tos) /
                 UDP(sport=50000, dport=dport, chksum=chksum) / Raw(payload))


# --- header ------------------------------------------------------------------

def test_header_layout_rfc7348():
    # |R|R|R|R|I|R|R|R| reserved 24 | VNI 24 | reserved 8 |
    assert encode_header(1) == bytes([0x08, 0, 0, 0, 0, 0, 1, 0])
    assert encode_header(0x123456) == bytes.fromhex("0800000012345600")
    assert encode_header(0) == bytes.fromhex("0800000000000000")
    assert encode_header(0xFFFFFF) == bytes.fromhex("08000000ffffff00")


@pytest.mark.parametrize("vni", [-1, 1 << 24, 1 << 30])
def test_header_rejects_vni_out_of_range(vni):
    with pytest.raises(ValueError):
        encode_header(vni)


@given(st.integers(0, (1 << 24) - 1))
def test_header_round_trip_and_scapy_agree(vni):
    hdr = encode_header(vni)
    assert decode_header(hdr) == (0x08, 0, vni, 0)
    assert hdr == bytes(VXLAN(vni=vni))  # scapy's default flags are Instance (0x08)
    parsed = VXLAN(hdr)
    assert parsed.vni == vni and int(parsed.flags) == 0x08
    assert parsed.reserved1 == 0 and parsed.reserved2 == 0


def test_decode_header_reports_reserved_fields_at_an_offset():
    buf = b"zz" + vx(b"", vni=0xABCDEF, flags=0x88, rsvd1=0x010203, rsvd2=0x7F)
    assert decode_header(buf, 2) == (0x88, 0x010203, 0xABCDEF, 0x7F)


def test_vxlan_payload_is_header_then_inner_frame():
    inner = inner_tcp()
    for data in (inner, memoryview(inner), bytearray(inner)):
        pl = vxlan_payload(data, 7)
        assert pl == vx(inner, vni=7)
        v = VXLAN(pl)
        assert v.vni == 7 and bytes(v.payload) == inner and v[Ether].src == "0a:00:00:00:0b:01"


def test_overhead_is_fifty_bytes():
    assert VXLAN_OVERHEAD == 50 and VXLAN_PORT == 8472


# --- receive checks ----------------------------------------------------------

def rx(payload, outer_tos=0):
    return check_payload(payload, vnis=VNIS, vtep_mac=VTEP_A, outer_tos=outer_tos)


def test_good_payload_accepted():
    assert rx(vx(inner_tcp())) is None
    assert rx(memoryview(vx(inner_tcp()))) is None
    arp = bytes(Ether(src=VTEP_B, dst="ff:ff:ff:ff:ff:ff") / ARP(pdst="10.244.1.0"))
    assert rx(vx(arp)) is None


@pytest.mark.parametrize("n", [0, 1, 7])
def test_short_header_dropped(n):
    assert rx(vx(inner_tcp())[:n]) == "vxlan-truncated"


def test_i_flag_required():
    assert rx(vx(inner_tcp(), flags=0x00)) == "vxlan-no-vni-flag"
    assert rx(vx(inner_tcp(), flags=0x80)) == "vxlan-no-vni-flag"  # other bits do not stand in for I


def test_unknown_vni_dropped():
    assert rx(vx(inner_tcp(), vni=2)) == "vxlan-unknown-vni"
    assert check_payload(vx(inner_tcp(), vni=2), vnis={1, 2}, vtep_mac=VTEP_A) is None


@pytest.mark.parametrize("flags", [0x08 | b for b in (0x01, 0x02, 0x04, 0x10, 0x20, 0x40, 0x80)])
def test_other_flag_bits_dropped(flags):
    assert rx(vx(inner_tcp(), flags=flags)) == "vxlan-reserved-bits"


@pytest.mark.parametrize("rsvd1, rsvd2", [(1, 0), (0x800000, 0), (0x000100, 0), (0, 1), (0, 0x80)])
def test_reserved_fields_dropped(rsvd1, rsvd2):
    assert rx(vx(inner_tcp(), rsvd1=rsvd1, rsvd2=rsvd2)) == "vxlan-reserved-bits"


def test_order_follows_vxlan_rcv():
    # The VNI lookup comes before the reserved-bits check, the inner Ethernet pull between them.
    assert rx(vx(inner_tcp(), vni=9, rsvd2=1)) == "vxlan-unknown-vni"
    assert rx(vx(b"\x00" * 10, rsvd2=1)) == "vxlan-inner-truncated"
    assert rx(vx(inner_tcp(smac=VTEP_A), rsvd1=4)) == "vxlan-reserved-bits"


def test_inner_source_mac_equal_to_own_vtep_mac_dropped():
    assert rx(vx(inner_tcp(smac=VTEP_A, dmac=VTEP_B))) == "vxlan-own-mac"
    assert rx(vx(inner_tcp(smac=VTEP_B, dmac=VTEP_A))) is None  # our MAC as destination is the normal case


def test_inner_headers_must_be_present():
    assert rx(vx(inner_tcp()[:13])) == "vxlan-inner-truncated"
    assert rx(vx(inner_tcp()[:14 + 19])) == "vxlan-inner-truncated"  # IPv4 header cut short
    ip6 = bytes(eth(src=VTEP_B, dst=VTEP_A, type=0x86DD)) + bytes(39)
    assert rx(vx(ip6)) == "vxlan-inner-truncated"
    assert rx(vx(ip6 + b"\x00")) is None
    assert rx(vx(inner_tcp()[:14 + 20])) is None  # the IP header is all vxlan_rcv pulls


@pytest.mark.parametrize("outer_ecn, inner_ecn, reason", [
    (3, 0, "vxlan-ecn-not-ect"),  # CE over not-ECT: the mark cannot be passed on
    (3, 1, None), (3, 2, None), (3, 3, None),
    (1, 0, None), (2, 0, None), (0, 0, None), (0, 3, None),
])
def test_ecn_decapsulation_rule(outer_ecn, inner_ecn, reason):
    assert rx(vx(inner_tcp(tos=0x20 | inner_ecn)), outer_tos=0x40 | outer_ecn) == reason


def test_ecn_rule_ignores_non_ip_inner_frames():
    arp = bytes(Ether(src=VTEP_B, dst="ff:ff:ff:ff:ff:ff") / ARP())
    assert rx(vx(arp), outer_tos=3) is None


def test_every_reason_is_declared():
    declared = {r for r, _ in RX_DROPS} | {r for r, _ in FRAME_DROPS}
    assert len(declared) == len(RX_DROPS) + len(FRAME_DROPS)
    assert all(text for _, text in RX_DROPS + FRAME_DROPS)


def frx(frame):
    return check_frame(frame, vnis=VNIS, vtep_mac=VTEP_A)


def test_frame_with_valid_udp_checksum_accepted():
    f = outer(vx(inner_tcp()))
    assert Ether(f)[UDP].chksum != 0
    assert frx(f) is None


def test_frame_with_zero_udp_checksum_accepted():
    f = outer(vx(inner_tcp()), chksum=0)
    assert Ether(f)[UDP].chksum == 0
    assert frx(f) is None


def test_frame_with_bad_udp_checksum_dropped():
    good = Ether(outer(vx(inner_tcp())))[UDP].chksum
    bad = (good + 1) & 0xFFFF or 1
    assert frx(outer(vx(inner_tcp()), chksum=bad)) == "udp-bad-checksum"
    # A flipped payload bit under a correct-looking checksum is caught too.
    f = bytearray(outer(vx(inner_tcp())))
    f[-1] ^= 0x01
    assert frx(bytes(f)) == "udp-bad-checksum"


def test_frame_level_parse_drops():
    assert frx(outer(vx(inner_tcp()), dport=4789)) == "not-vxlan"
    assert frx(bytes(eth() / IP(src=NODE_B, dst=NODE_A) / TCP(dport=VXLAN_PORT))) == "not-vxlan"
    assert frx(bytes(eth() / ARP())) == "not-vxlan"
    f = bytearray(outer(vx(inner_tcp())))
    f[14 + 10] ^= 0xFF  # IP header checksum
    assert frx(bytes(f)) == "ip-bad-checksum"
    short = bytes(Ether(src=UNDERLAY_B, dst=UNDERLAY_A) / IP(src=NODE_B, dst=NODE_A) /
                  UDP(sport=50000, dport=VXLAN_PORT, len=200, chksum=0) / Raw(vx(inner_tcp())[:40]))
    assert frx(short) == "udp-bad-length"


def test_frame_checks_reach_the_vxlan_rules_and_outer_tos():
    assert frx(outer(vx(inner_tcp(), vni=5))) == "vxlan-unknown-vni"
    assert frx(outer(vx(inner_tcp(smac=VTEP_A)))) == "vxlan-own-mac"
    assert frx(outer(vx(inner_tcp(tos=0)), tos=3)) == "vxlan-ecn-not-ect"
    assert check_frame(outer(vx(inner_tcp()), dport=4789), vnis=VNIS, vtep_mac=VTEP_A, dport=4789) is None


# --- UDP source port ---------------------------------------------------------

def random_flow(rng: random.Random) -> tuple:
    return (f"10.244.{rng.randrange(256)}.{rng.randrange(1, 255)}",
            f"10.244.{rng.randrange(256)}.{rng.randrange(1, 255)}",
            rng.randrange(1024, 65536), rng.randrange(1, 65536))


def test_source_port_stable_for_a_flow():
    a = inner_tcp(load=b"first")
    b = inner_tcp(load=b"a later, longer segment of the same connection" * 10)
    assert source_port(a) == source_port(a) == source_port(b) == source_port(memoryview(b))
    # TTL, TOS, ID and TCP flags are not part of the flow.
    c = bytes(Ether(src=VTEP_B, dst=VTEP_A) / IP(src="10.244.1.2", dst="10.244.2.3", ttl=3, tos=0xB8, id=99) /
              TCP(sport=40000, dport=80, flags="FPA"))
    assert source_port(c) == source_port(a)


@given(st.ip_addresses(v=4), st.ip_addresses(v=4), st.integers(0, 65535), st.integers(0, 65535),
       st.sampled_from([TCP, UDP]))
def test_source_port_in_range(src, dst, sport, dport, l4):
    f = bytes(eth() / IP(src=str(src), dst=str(dst)) / l4(sport=sport, dport=dport))
    p = source_port(f)
    assert SPORT_MIN <= p < SPORT_MAX
    assert 32768 <= p <= 60999


def test_source_ports_spread_over_many_flows():
    rng = random.Random(8472)
    ports = [source_port(inner_tcp(*random_flow(rng))) for _ in range(1000)]
    assert len(set(ports)) >= 900
    # Both halves of the range are used (not stuck in a corner).
    assert min(ports) < 34000 and max(ports) > 59000


def test_source_ports_spread_over_consecutive_client_ports():
    # The common case: one client opening connections from successive ephemeral ports.
    ports = [source_port(inner_tcp(sport=40000 + i)) for i in range(1000)]
    assert len(set(ports)) >= 900


def test_source_port_same_both_directions_like_the_kernel():
    # __flow_hash_consistentify: the kernel sorts addresses and ports before hashing.
    fwd = inner_tcp(src="10.244.1.2", dst="10.244.2.3", sport=40000, dport=80)
    rev = inner_tcp(src="10.244.2.3", dst="10.244.1.2", sport=80, dport=40000, smac=VTEP_A, dmac=VTEP_B)
    assert source_port(fwd) == source_port(rev)
    assert source_port(fwd) != source_port(inner_tcp(sport=40001))


def test_source_port_ignores_ports_of_fragments_and_portless_protocols():
    first = bytes(eth() / IP(src="10.0.0.1", dst="10.0.0.2", flags="MF", proto=17) / UDP(sport=1, dport=2))
    later = bytes(eth() / IP(src="10.0.0.1", dst="10.0.0.2", frag=185, proto=17) / Raw(b"\x00\x07\x00\x09"))
    assert source_port(first) == source_port(later)  # every fragment of one datagram takes the same path
    ping = [bytes(eth() / IP(src="10.0.0.1", dst="10.0.0.2") / ICMP(id=i)) for i in (1, 2)]
    assert source_port(ping[0]) == source_port(ping[1])


def test_source_port_of_non_ip_frames_hashes_ethernet_addresses():
    a1 = bytes(Ether(src="02:00:00:00:00:01", dst="ff:ff:ff:ff:ff:ff") / ARP(psrc="10.0.0.1"))
    a2 = bytes(Ether(src="02:00:00:00:00:01", dst="ff:ff:ff:ff:ff:ff") / ARP(psrc="10.0.0.9"))
    b = bytes(Ether(src="02:00:00:00:00:02", dst="ff:ff:ff:ff:ff:ff") / ARP(psrc="10.0.0.1"))
    assert source_port(a1) == source_port(a2) != source_port(b)
    assert flow_hash(b"\x00" * 14) != 0 and flow_hash(b"") != 0


@pytest.mark.parametrize("h, port", [
    # ((h ^ h << 16) mod 2**32) * 28231 >> 32, + 32768, computed by hand
    (0x00000000, 32768),
    (0x80000000, 32768 + 14115),
    (0x0000FFFF, 32768 + (0xFFFFFFFF * 28231 >> 32)),  # h ^ h << 16 = 0xFFFFFFFF: the top of the range
    (0xFFFFFFFF, 32768 + (0x0000FFFF * 28231 >> 32)),
    (0x00010000, 32768 + (0x00010000 * 28231 >> 32)),
])
def test_port_from_hash_is_udp_flow_src_port(h, port):
    assert port_from_hash(h) == port
    assert port_from_hash(0x0000FFFF) == 60998  # max (60999) itself is never produced


# --- ECN / TOS on encapsulation ----------------------------------------------

@pytest.mark.parametrize("inner, expect", [(0, 0), (1, 1), (2, 2), (3, 2)])
def test_ecn_encap_copies_ecn_and_sends_ce_as_ect0(inner, expect):
    assert ecn_encap(0, 0xB8 | inner) == expect  # device tos 0: the DSCP is not copied
    assert ecn_encap(0x10, inner) == 0x10 | expect  # a configured TOS keeps its DSCP
    assert ecn_encap(1, 0xB8 | inner) == 0xB8 | expect  # tos inherit


def test_inner_dsfield():
    assert inner_dsfield(inner_tcp(tos=0xB9)) == 0xB9
    v6 = bytes(eth(type=0x86DD)) + bytes([0x6A, 0xB0]) + bytes(38)  # traffic class 0xAB
    assert inner_dsfield(v6) == 0xAB
    assert inner_dsfield(bytes(eth() / ARP())) == 0
    assert inner_dsfield(b"\x00" * 10) == 0


@pytest.mark.parametrize("inner_ecn, outer_ecn, marked", [
    (1, 3, True), (2, 3, True), (3, 3, False), (0, 3, False), (2, 2, False), (1, 0, False)])
def test_propagate_ce_on_decapsulation(inner_ecn, outer_ecn, marked):
    f = bytearray(inner_tcp(tos=0x20 | inner_ecn))
    before = bytes(f)
    assert propagate_ce(f, outer_ecn) is marked
    if not marked:
        assert bytes(f) == before
        return
    ip = Ether(bytes(f))[IP]
    assert ip.tos == 0x23
    stored = ip.chksum
    del ip.chksum
    assert IP(bytes(ip)).chksum == stored  # RFC 1624 update matches a full recomputation


# --- outer headers -----------------------------------------------------------

def build(inner, **kw):
    args = dict(src_mac=bytes.fromhex("52540000000a"), dst_mac=bytes.fromhex("52540000000b"),
                src_ip=ip_int(NODE_A), dst_ip=ip_int(NODE_B), vni=1)
    args.update(kw)
    return encap(inner, **args)


def test_encap_output_as_scapy_sees_it():
    inner = inner_tcp(tos=0xB8 | 3)
    f = build(inner, ip_id=0x1234)
    p = Ether(f)
    assert p.src == UNDERLAY_A and p.dst == UNDERLAY_B and p.type == 0x0800
    ip, udp = p[IP], p[UDP]
    assert (ip.src, ip.dst, ip.ttl, ip.proto, ip.id) == (NODE_A, NODE_B, 64, 17, 0x1234)
    assert int(ip.flags) == 0 and ip.frag == 0  # DF clear
    assert ip.tos == 0x02  # DSCP not copied; CE leaves as ECT(0)
    assert ip.len == len(f) - 14 == 20 + 8 + 8 + len(inner)
    assert udp.dport == 8472 and udp.sport == source_port(inner) and udp.len == 16 + len(inner)
    assert p[VXLAN].vni == 1 and int(p[VXLAN].flags) == 0x08
    assert bytes(p[VXLAN].payload) == inner
    # scapy recomputes both checksums when they are deleted: they must be what we sent.
    sent_ip, sent_udp = ip.chksum, udp.chksum
    del ip.chksum, udp.chksum
    again = Ether(bytes(p))
    assert again[IP].chksum == sent_ip and again[UDP].chksum == sent_udp
    # And our own receive side accepts it.
    assert check_frame(f, vnis=VNIS, vtep_mac=bytes.fromhex("0a0000000c01")) is None


def test_encap_options():
    inner = inner_tcp()
    p = Ether(build(inner, sport=33333, dport=4789, vni=0xABCDEF, tos_inner=0x01, ttl=9, ip_id=7))
    assert p[UDP].sport == 33333 and p[UDP].dport == 4789 and p[IP].ttl == 9 and p[IP].tos == 0x01
    assert VXLAN(bytes(p[UDP].payload)).vni == 0xABCDEF
    assert Ether(build(memoryview(inner), ip_id=7)) == Ether(build(inner, ip_id=7))


def test_encap_zero_udp_checksum_is_sent_as_ffff():
    # Pick two payload bytes that make the one's complement sum come out at 0 (RFC 768: send 0xFFFF).
    base = bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02", type=0x88B5)) + bytes(32)
    c0 = Ether(build(base, ip_id=1))[UDP].chksum
    tuned = base[:14] + c0.to_bytes(2, "big") + base[16:]
    p = Ether(build(tuned, ip_id=1))
    assert p[UDP].chksum == 0xFFFF
    del p[UDP].chksum
    assert Ether(bytes(p))[UDP].chksum == 0xFFFF  # scapy agrees


def test_encap_rejects_an_inner_frame_that_cannot_fit():
    with pytest.raises(ValueError):
        build(bytes(65535 - 36 + 1), ip_id=1)


def test_ip_idents_count_per_destination():
    ids = IpIdents(random.Random(1))
    a = [ids.reserve(1, 2) for _ in range(3)]
    assert a[1] == (a[0] + 1) & 0xFFFF and a[2] == (a[0] + 2) & 0xFFFF
    other = ids.reserve(1, 3)
    assert ids.reserve(1, 3) == (other + 1) & 0xFFFF
    assert ids.reserve(1, 2, segs=5) == (a[0] + 3) & 0xFFFF
    assert ids.reserve(1, 2) == (a[0] + 8) & 0xFFFF
    wrap = IpIdents()
    wrap._next[(1, 2, 17)] = 0xFFFF
    assert wrap.reserve(1, 2) == 0xFFFF and wrap.reserve(1, 2) == 0


def test_encap_takes_ids_from_the_counters():
    ids = IpIdents(random.Random(2))
    first = Ether(build(inner_tcp(), idents=ids))[IP].id
    assert Ether(build(inner_tcp(), idents=ids))[IP].id == (first + 1) & 0xFFFF
