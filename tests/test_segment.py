"""Unit tests for overlay.segment: software TSO/USO of virtio-net super-frames.

Super-frames are built with scapy and carry a virtio-net header as a TAP
hands them over (NEEDS_CSUM, csum_start at the L4 header). Every segment is
checked against scapy: it recomputes the IP and L4 checksums, and the
sequence numbers, flags, IDs and payload must add up to the original.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import ARP, Dot1Q, Ether
from scapy.packet import Raw

from overlay.segment import SEGMENT_DROPS, SegmentError, complete_checksum, segment
from router.ipv4 import PARSE_REASONS
from vswitch.packet import GSO_ECN, GSO_NONE, GSO_TCPV4, GSO_TCPV6, GSO_UDP, GSO_UDP_L4, VNET_F_NEEDS_CSUM

SRC_MAC, DST_MAC = "02:00:00:00:01:02", "0a:00:00:00:0a:01"
SRC, DST = "10.244.1.2", "10.244.2.3"
MSS = 1398  # 1448 (a 1500 MTU's TCP MSS with timestamps) minus the 50 bytes of VXLAN
TS = [("NOP", None), ("NOP", None), ("Timestamp", (123456, 654321))]


def vnet(flags=VNET_F_NEEDS_CSUM, gso_type=GSO_TCPV4, hdr_len=0, gso_size=MSS, csum_start=34, csum_offset=16):
    return struct.pack("<BBHHHH", flags, gso_type, hdr_len, gso_size, csum_start, csum_offset)


def tcp_frame(payload: bytes, *, flags="A", seq=1000, ip_id=4242, df=True, options=TS, tos=0, vlan=None,
              partial=True) -> bytes:
    """An Ethernet/IPv4/TCP frame; with ``partial`` the TCP checksum field holds only the pseudo-header sum."""
    ip = IP(src=SRC, dst=DST, id=ip_id, flags="DF" if df else 0, tos=tos, ttl=63)
    l2 = Ether(src=SRC_MAC, dst=DST_MAC)
    if vlan is not None:
        l2 = l2 / Dot1Q(vlan=vlan)
    tcp = TCP(sport=40000, dport=5201, seq=seq, ack=777, flags=flags, window=502, options=options)
    frame = bytearray(bytes(l2 / ip / tcp / Raw(payload)))
    if partial:  # what a guest's TCP stack leaves for the device: ~pseudo-header folded, not complemented
        l4 = 14 + (4 if vlan is not None else 0) + 20
        tcp_len = len(frame) - l4
        s = (int.from_bytes(frame[l4 - 8:l4], "big") % 0xFFFF) + 6 + tcp_len
        s = (s & 0xFFFF) + (s >> 16)
        frame[l4 + 16:l4 + 18] = ((s & 0xFFFF) + (s >> 16)).to_bytes(2, "big")
    return bytes(frame)


def super_frame(payload: bytes, mss=MSS, gso_type=GSO_TCPV4, **kw) -> bytes:
    off = 18 if kw.get("vlan") is not None else 14
    return vnet(gso_type=gso_type, gso_size=mss, csum_start=off + 20) + tcp_frame(payload, **kw)


def checksums_ok(frame: bytes) -> None:
    """scapy recomputes the IP and L4 checksums: they must equal what the frame carries."""
    p = Ether(frame)
    ip = p[IP]
    l4 = p[TCP] if TCP in p else p[UDP]
    sent_ip, sent_l4 = ip.chksum, l4.chksum
    del ip.chksum, l4.chksum
    again = Ether(bytes(p))
    assert again[IP].chksum == sent_ip
    assert (again[TCP] if TCP in again else again[UDP]).chksum == sent_l4


def check_tcp_segments(segs, payload: bytes, mss: int, *, flags="A", seq=1000, ip_id=4242, fixed_id=False) -> None:
    orig = Ether(tcp_frame(payload, flags=flags, seq=seq, ip_id=ip_id))
    want_flags = int(orig[TCP].flags)
    n = max(1, -(-len(payload) // mss))
    assert len(segs) == n
    got = b""
    for i, s in enumerate(segs):
        checksums_ok(s)
        p = Ether(s)
        ip, tcp = p[IP], p[TCP]
        data = bytes(tcp.payload)
        assert len(data) == (mss if i < n - 1 else len(payload) - (n - 1) * mss)
        assert len(s) == 14 + ip.len  # no padding, lengths are the segment's own
        assert ip.id == (ip_id if fixed_id else (ip_id + i) & 0xFFFF)
        assert tcp.seq == (seq + len(got)) & 0xFFFFFFFF  # contiguous
        f = int(tcp.flags)
        fin_psh = want_flags & 0x09 if i == n - 1 else 0
        cwr = want_flags & 0x80 if i == 0 else 0
        assert f == (want_flags & ~0x89) | fin_psh | cwr
        # Everything else is the super-frame's.
        assert (p.src, p.dst, ip.src, ip.dst, ip.ttl, ip.tos, int(ip.flags)) == \
            (SRC_MAC, DST_MAC, SRC, DST, 63, orig[IP].tos, int(orig[IP].flags))
        assert (tcp.sport, tcp.dport, tcp.ack, tcp.window, tcp.options) == \
            (40000, 5201, 777, 502, orig[TCP].options)
        got += data
    assert got == payload  # reassembles to the original bytes


# --- TCP segmentation ----------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(data=st.data(), mss=st.integers(1, 1460),
       flags=st.sets(st.sampled_from("FSRPAUEC")).map(lambda s: "".join(sorted(s)) or "A"),
       seq=st.integers(0, 0xFFFFFFFF), ip_id=st.integers(0, 0xFFFF))
def test_tcp_super_frame_segments(data, mss, flags, seq, ip_id):
    # At most 40 segments keeps scapy's checking fast; up to the 64 KB IP limit.
    size = data.draw(st.integers(0, min(65535 - 52, mss * 40)), label="payload size")
    payload = data.draw(st.binary(min_size=size, max_size=size), label="payload")
    buf = super_frame(payload, mss=mss, flags=flags, seq=seq, ip_id=ip_id)
    check_tcp_segments(segment(buf), payload, mss, flags=flags, seq=seq, ip_id=ip_id)


def test_64k_super_frame_at_overlay_mss():
    payload = bytes(range(256)) * 255 + b"tail"  # 65284 bytes
    segs = segment(super_frame(payload, flags="PA"))
    assert len(segs) == 47
    assert all(len(s) == 14 + 20 + 32 + MSS for s in segs[:-1])  # 1464: a 1450-byte IP packet
    check_tcp_segments(segs, payload, MSS, flags="PA")


@pytest.mark.parametrize("k", [1, 2, 3, 10])
def test_payload_exact_multiple_of_mss(k):
    payload = bytes(i & 0xFF for i in range(k * MSS))
    segs = segment(super_frame(payload, flags="FPA"))
    assert [len(Ether(s)[TCP].payload) for s in segs] == [MSS] * k
    check_tcp_segments(segs, payload, MSS, flags="FPA")


@pytest.mark.parametrize("k", [1, 3])
def test_one_byte_over_a_multiple(k):
    payload = b"\xab" * (k * MSS + 1)
    segs = segment(super_frame(payload, flags="FPA"))
    assert [len(Ether(s)[TCP].payload) for s in segs] == [MSS] * k + [1]
    check_tcp_segments(segs, payload, MSS, flags="FPA")


@pytest.mark.parametrize("size", [0, 1, 100, MSS - 1, MSS])
def test_payload_within_one_mss_is_one_frame_with_its_flags(size):
    # virtio_net_hdr_to_skb does not even mark such an skb GSO: every field stays, CWR and FIN too.
    payload = b"\x5a" * size
    segs = segment(super_frame(payload, flags="FPAC"))
    assert len(segs) == 1
    p = Ether(segs[0])
    assert p[TCP].flags == "FPAC" and p[IP].id == 4242 and p[TCP].seq == 1000
    full = Ether(tcp_frame(payload, flags="FPAC", partial=False))
    assert segs[0] == bytes(full)  # byte for byte what a fully checksummed sender would have sent


def test_cwr_only_on_first_fin_psh_only_on_last():
    segs = segment(super_frame(b"z" * (3 * MSS), flags="FPAEC"))
    assert [str(Ether(s)[TCP].flags) for s in segs] == ["AEC", "AE", "FPAE"]


def test_ecn_gso_bit_segments_the_same_way():
    payload = b"e" * (2 * MSS + 5)
    plain = segment(super_frame(payload, flags="AC"))
    ecn = segment(super_frame(payload, flags="AC", gso_type=GSO_TCPV4 | GSO_ECN))
    assert plain == ecn


def test_ip_id_and_sequence_wrap():
    payload = b"w" * (4 * MSS)
    segs = segment(super_frame(payload, seq=0xFFFFFFFF - MSS, ip_id=0xFFFE))
    assert [Ether(s)[IP].id for s in segs] == [0xFFFE, 0xFFFF, 0, 1]
    assert [Ether(s)[TCP].seq for s in segs] == [0xFFFFFFFF - MSS, 0xFFFFFFFF, MSS - 1, 2 * MSS - 1]
    check_tcp_segments(segs, payload, MSS, seq=0xFFFFFFFF - MSS, ip_id=0xFFFE)


def test_fixed_id_keeps_the_id():
    payload = b"f" * (3 * MSS)
    segs = segment(super_frame(payload), fixed_id=True)
    check_tcp_segments(segs, payload, MSS, fixed_id=True)


def test_df_clear_and_no_options_work_too():
    payload = b"n" * (2 * 536 + 17)
    buf = vnet(gso_size=536) + tcp_frame(payload, df=False, options=[])
    segs = segment(buf)
    assert len(segs) == 3 and all(int(Ether(s)[IP].flags) == 0 for s in segs)
    assert all(Ether(s)[TCP].dataofs == 5 for s in segs)
    assert b"".join(bytes(Ether(s)[TCP].payload) for s in segs) == payload
    for s in segs:
        checksums_ok(s)


def test_checksum_field_content_is_not_trusted():
    # Some senders put a pseudo-header sum without the length there, some garbage: same result.
    payload = bytes(range(200)) * 20
    good = segment(super_frame(payload))
    junk = bytearray(super_frame(payload))
    junk[10 + 34 + 16:10 + 34 + 18] = b"\xde\xad"
    assert segment(bytes(junk)) == good


def test_vlan_tagged_super_frame_keeps_its_tag():
    payload = b"v" * (MSS + 10)
    segs = segment(super_frame(payload, vlan=7))
    assert len(segs) == 2
    for s in segs:
        p = Ether(s)
        assert p[Dot1Q].vlan == 7
        checksums_ok(s)
    assert b"".join(bytes(Ether(s)[TCP].payload) for s in segs) == payload


def test_ethernet_padding_after_the_ip_packet_is_left_out():
    payload = b"p" * (MSS + 3)
    buf = super_frame(payload) + b"\xee" * 6
    assert segment(buf) == segment(super_frame(payload))


def test_input_buffer_is_not_modified_and_may_be_a_memoryview():
    buf = bytearray(super_frame(b"m" * (2 * MSS)))
    before = bytes(buf)
    a = segment(buf)
    b = segment(memoryview(buf))
    assert a == b and bytes(buf) == before
    assert all(type(s) is bytes for s in a)


# --- UDP (GSO_UDP_L4) --------------------------------------------------------

def udp_super_frame(payload: bytes, gso_size: int, ip_id=9) -> bytes:
    frame = bytes(Ether(src=SRC_MAC, dst=DST_MAC) / IP(src=SRC, dst=DST, id=ip_id) /
                  UDP(sport=5353, dport=8080, chksum=0x1234) / Raw(payload))
    return vnet(gso_type=GSO_UDP_L4, gso_size=gso_size, csum_offset=6) + frame


@pytest.mark.parametrize("size, gso_size", [(5000, 1200), (2400, 1200), (100, 1200), (1201, 1200)])
def test_udp_l4_super_frame_segments(size, gso_size):
    payload = bytes(i * 7 & 0xFF for i in range(size))
    segs = segment(udp_super_frame(payload, gso_size))
    n = max(1, -(-size // gso_size))
    assert len(segs) == n
    got = b""
    for i, s in enumerate(segs):
        checksums_ok(s)
        p = Ether(s)
        data = bytes(p[UDP].payload)
        assert len(data) == min(gso_size, size - i * gso_size)
        assert p[UDP].len == 8 + len(data) and p[IP].len == 28 + len(data)
        assert p[IP].id == 9 + i and (p[UDP].sport, p[UDP].dport) == (5353, 8080)
        got += data
    assert got == payload


# --- plain frames ------------------------------------------------------------

def test_plain_frame_without_pending_checksum_comes_back_as_is():
    frame = tcp_frame(b"hello", partial=False) + b"\x00" * 3
    assert segment(vnet(flags=0, gso_type=GSO_NONE, gso_size=0) + frame) == [frame]


def test_plain_frame_with_partial_tcp_checksum_is_completed():
    frame = tcp_frame(b"hello world", flags="PA")
    out = segment(vnet(gso_type=GSO_NONE, gso_size=0) + frame)
    assert out == [bytes(Ether(tcp_frame(b"hello world", flags="PA", partial=False)))]
    checksums_ok(out[0])


def test_plain_frame_with_partial_udp_checksum_and_padding():
    # A 10-byte UDP datagram padded to the 60-byte Ethernet minimum with non-zero bytes.
    f = bytearray(bytes(Ether(src=SRC_MAC, dst=DST_MAC) / IP(src=SRC, dst=DST) / UDP(sport=1, dport=2) / Raw(b"hi")))
    s = (int.from_bytes(f[26:34], "big") % 0xFFFF) + 17 + 10
    f[40:42] = ((s & 0xFFFF) + (s >> 16)).to_bytes(2, "big")
    padded = bytes(f) + b"\xff" * (60 - len(f))
    out = segment(vnet(gso_type=GSO_NONE, gso_size=0, csum_offset=6) + padded)
    assert len(out[0]) == 60 and out[0][42:] == padded[42:]
    checksums_ok(out[0])


def test_complete_checksum_stores_zero_as_ffff():
    # Words summing to 0xFFFF: the one's complement is 0, sent as 0xFFFF (CSUM_MANGLED_0).
    frame = bytearray(b"\x00\x00\xff\xff")
    complete_checksum(frame, 0, 0)
    assert frame[:2] == b"\xff\xff"
    frame = bytearray(b"\x00\x00\x12\x34")
    complete_checksum(frame, 0, 0)
    assert frame[:2] == (0xFFFF - 0x1234).to_bytes(2, "big")


# --- what cannot be segmented -------------------------------------------------

REASONS = {r for r, _ in SEGMENT_DROPS} | {r for r, _ in PARSE_REASONS}


def reason(buf) -> str:
    with pytest.raises(SegmentError) as e:
        segment(buf)
    assert e.value.reason in REASONS and isinstance(e.value, ValueError)
    return e.value.reason


def test_unsupported_gso_types():
    assert reason(super_frame(b"x" * 3000, gso_type=GSO_TCPV6)) == "gso-unsupported"
    assert reason(super_frame(b"x" * 3000, gso_type=GSO_UDP)) == "gso-unsupported"  # UFO
    assert reason(super_frame(b"x" * 3000, gso_type=9)) == "gso-unsupported"


def test_malformed_super_frames():
    assert reason(super_frame(b"x" * 3000, mss=0)) == "gso-bad-size"
    assert reason(vnet() + bytes(Ether(src=SRC_MAC, dst=DST_MAC) / ARP())) == "gso-not-ipv4"
    assert reason(vnet() + b"\x00" * 10) == "gso-not-ipv4"
    udp = bytes(Ether(src=SRC_MAC, dst=DST_MAC) / IP(src=SRC, dst=DST) / UDP() / Raw(b"u" * 3000))
    assert reason(vnet() + udp) == "gso-bad-proto"
    assert reason(vnet(gso_type=GSO_UDP_L4) + tcp_frame(b"t" * 3000)) == "gso-bad-proto"
    cut = super_frame(b"x" * 3000)[:10 + 14 + 20 + 10]
    assert reason(cut) == "ip-truncated"
    bad_doff = bytearray(super_frame(b"x" * 3000))
    bad_doff[10 + 34 + 12] = 0x40  # data offset 4 words
    assert reason(bytes(bad_doff)) == "gso-bad-l4-header"
    long_doff = bytearray(vnet() + tcp_frame(b"", options=[]))
    long_doff[10 + 34 + 12] = 0xF0  # 60-byte header in a 20-byte segment
    assert reason(bytes(long_doff)) == "gso-bad-l4-header"
    bad = bytearray(vnet(gso_type=GSO_NONE, csum_start=34, csum_offset=200) + tcp_frame(b"x"))
    assert reason(bytes(bad)) == "csum-bad-offsets"
