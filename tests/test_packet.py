"""Unit tests for vswitch.packet and afpacket.restore_vlan.

The virtio-net header layout is struct virtio_net_hdr (include/uapi/linux/
virtio_net.h): u8 flags, u8 gso_type, le16 hdr_len, le16 gso_size,
le16 csum_start, le16 csum_offset.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import ARP, Dot1AD, Dot1Q, Ether
from scapy.packet import Raw

from vswitch.packet import (GSO_ECN, GSO_NONE, GSO_TCPV4, GSO_TCPV6, VNET_F_DATA_VALID, VNET_F_NEEDS_CSUM,
                            VNET_HDR, VNET_LEN, ZERO_VNET, Packet, VnetHdr, headroom, mac_bytes, mac_str)
from vswitch.ports.afpacket import restore_vlan

SRC = "02:00:00:00:00:0a"
DST = "02:00:00:00:00:0b"


def vnet(flags=0, gso_type=0, hdr_len=0, gso_size=0, csum_start=0, csum_offset=0) -> bytes:
    # Written out independently of VNET_HDR so a wrong format string would show.
    return struct.pack("<BBHHHH", flags, gso_type, hdr_len, gso_size, csum_start, csum_offset)


# --- header layout -----------------------------------------------------------

def test_vnet_header_is_ten_little_endian_bytes():
    assert VNET_LEN == 10 and ZERO_VNET == bytes(10)
    assert VNET_HDR.pack(1, 4, 0x0102, 0x0304, 0x0506, 0x0708) == bytes(
        [1, 4, 0x02, 0x01, 0x04, 0x03, 0x06, 0x05, 0x08, 0x07])


def test_constants_match_linux_uapi():
    assert (VNET_F_NEEDS_CSUM, VNET_F_DATA_VALID) == (1, 2)
    assert (GSO_NONE, GSO_TCPV4, GSO_TCPV6, GSO_ECN) == (0, 1, 4, 0x80)


# --- Packet ------------------------------------------------------------------

def test_from_frame_prepends_zero_vnet_header():
    frame = bytes(Ether(src=SRC, dst=DST) / IP(src="10.0.0.1", dst="10.0.0.2") / UDP() / Raw(b"x" * 20))
    pkt = Packet.from_frame(frame, in_port="p1", ts=12.5)
    assert bytes(pkt.buf) == bytes(10) + frame
    assert isinstance(pkt.buf, bytearray)
    assert bytes(pkt.frame) == frame
    assert len(pkt) == len(frame)
    assert pkt.in_port == "p1" and pkt.ts == 12.5
    assert pkt.src == mac_bytes(SRC)
    assert pkt.dst == mac_bytes(DST)
    assert pkt.ethertype == 0x0800
    assert not pkt.is_gso
    assert pkt.vnet == (0, 0, 0, 0, 0, 0)
    assert pkt.out_port is None and pkt.out_ports is None and pkt.drop_reason is None
    assert pkt.trace is None and pkt.dry_run is False


@pytest.mark.parametrize("layer, etype", [
    (ARP(), 0x0806),
    (Dot1Q(vlan=5) / IP(), 0x8100),
    (Dot1AD(vlan=5) / Dot1Q(vlan=6) / IP(), 0x88A8),
])
def test_ethertype(layer, etype):
    pkt = Packet.from_frame(bytes(Ether(src=SRC, dst="ff:ff:ff:ff:ff:ff") / layer))
    assert pkt.ethertype == etype
    assert pkt.dst == b"\xff" * 6


def test_from_frame_with_vnet_header_and_kwargs():
    hdr = vnet(VNET_F_NEEDS_CSUM, GSO_TCPV4, 54, 1448, 34, 16)
    frame = bytes(Ether(src=SRC, dst=DST) / IP() / TCP() / Raw(b"y" * 3000))
    trace = []
    pkt = Packet.from_frame(frame, vnet=hdr, trace=trace, dry_run=True)
    assert bytes(pkt.buf[:10]) == hdr
    assert len(pkt) == len(frame)
    assert pkt.is_gso
    assert pkt.trace is trace and pkt.dry_run is True


def test_packet_ids_are_lazy_unique_and_stable():
    a, b = Packet.from_frame(bytes(14)), Packet.from_frame(bytes(14))
    assert a.id == 0
    ia = a.ensure_id()
    assert ia != 0 and a.ensure_id() == ia and a.id == ia
    assert b.ensure_id() not in (0, ia)


def test_repr_mentions_macs_and_type():
    r = repr(Packet.from_frame(bytes(Ether(src=SRC, dst=DST, type=0x86DD))))
    assert SRC in r and DST in r and "0x86dd" in r


# --- VnetHdr -----------------------------------------------------------------

def test_vnet_decode_gso_frame():
    hdr = vnet(VNET_F_NEEDS_CSUM, GSO_TCPV4, 54, 1448, 34, 16)
    pkt = Packet.from_frame(bytes(60), vnet=hdr)
    v = pkt.vnet
    assert isinstance(v, VnetHdr)
    assert (v.flags, v.gso_type, v.hdr_len, v.gso_size, v.csum_start, v.csum_offset) == (1, 1, 54, 1448, 34, 16)
    assert v.pack() == hdr
    d = v.describe()
    for part in ("gso=tcpv4", "gso_size=1448", "hdr_len=54", "csum_start=34", "csum_offset=16"):
        assert part in d
    assert "data_valid" not in d and "ecn" not in d


def test_vnet_describe_variants():
    assert VnetHdr(0, 0, 0, 0, 0, 0).describe() == "plain"
    d = VnetHdr(0, GSO_TCPV6 | GSO_ECN, 74, 1428, 0, 0).describe()
    assert "gso=tcpv6+ecn" in d and "gso_size=1428" in d and "csum_start" not in d
    assert VnetHdr(VNET_F_DATA_VALID, 0, 0, 0, 0, 0).describe() == "data_valid"
    d = VnetHdr(VNET_F_NEEDS_CSUM, 0, 0, 0, 34, 6).describe()
    assert "csum_start=34" in d and "csum_offset=6" in d and "gso" not in d


def test_is_gso_ignores_ecn_bit_alone():
    assert not Packet.from_frame(bytes(14), vnet=vnet(gso_type=GSO_ECN)).is_gso
    assert Packet.from_frame(bytes(14), vnet=vnet(gso_type=GSO_TCPV4 | GSO_ECN)).is_gso


# --- MAC helpers -------------------------------------------------------------

@given(st.binary(min_size=6, max_size=6))
def test_mac_round_trip(mac):
    text = mac_str(mac)
    assert len(text) == 17 and text == text.lower()
    assert mac_bytes(text) == mac
    assert mac_bytes(text.upper()) == mac
    assert mac_bytes(text.replace(":", "-")) == mac


def test_mac_bytes_accepts_short_groups():
    assert mac_bytes("2:0:0:a:b:FF") == bytes([2, 0, 0, 10, 11, 255])
    assert mac_str(bytes([2, 0, 0, 10, 11, 255])) == "02:00:00:0a:0b:ff"


@pytest.mark.parametrize("text", [
    "", "aa:bb:cc:dd:ee", "aa:bb:cc:dd:ee:ff:00", "aa:bb:cc:dd:ee:fg", "aaa:bb:cc:dd:ee:ff",
    "aa::cc:dd:ee:ff", "aa:bb:cc:dd:ee:", "aabb.ccdd.eeff", "aabbccddeeff", "zz:zz:zz:zz:zz:zz",
])
def test_mac_bytes_rejects_garbage(text):
    with pytest.raises(ValueError):
        mac_bytes(text)


@pytest.mark.parametrize("text", ["+a:bb:cc:dd:ee:ff", " 1:2:3:4:5:6", "1:2:3:4:5: 6", "\u0661:2:3:4:5:6"])
def test_mac_bytes_rejects_non_hex_characters(text):
    with pytest.raises(ValueError):
        mac_bytes(text)


# --- afpacket.restore_vlan ---------------------------------------------------

def _untagged_and_tagged(payload_len=100):
    inner = IP(src="10.0.0.1", dst="10.0.0.2") / TCP(sport=1, dport=2) / Raw(b"z" * payload_len)
    untagged = bytes(Ether(src=SRC, dst=DST) / inner)
    tagged = bytes(Ether(src=SRC, dst=DST) / Dot1Q(prio=5, vlan=100) / inner)
    return untagged, tagged


def test_restore_vlan_inserts_tag_after_macs_plain():
    untagged, tagged = _untagged_and_tagged()
    tci = (5 << 13) | 100
    out = restore_vlan(ZERO_VNET + untagged, tci, 0x8100)
    assert out[:10] == ZERO_VNET  # nothing set, nothing shifted
    assert out[10:] == tagged
    assert len(out) == 10 + len(untagged) + 4
    # what the pipeline then sees
    pkt = Packet(bytearray(out))
    assert pkt.ethertype == 0x8100 and pkt.src == mac_bytes(SRC) and pkt.dst == mac_bytes(DST)


def test_restore_vlan_shifts_csum_start_and_hdr_len():
    untagged, _ = _untagged_and_tagged(3000)
    tagged = bytes(Ether(src=SRC, dst=DST) / Dot1Q(vlan=100) / IP(untagged[14:]))
    hdr = vnet(VNET_F_NEEDS_CSUM, GSO_TCPV4, 54, 1448, 34, 16)
    out = restore_vlan(hdr + untagged, 100, 0x8100)
    assert VnetHdr(*VNET_HDR.unpack_from(out)) == (VNET_F_NEEDS_CSUM, GSO_TCPV4, 58, 1448, 38, 16)
    # csum_start + csum_offset still points at the TCP checksum after the shift.
    assert out[10 + 38 + 16:10 + 38 + 16 + 2] == untagged[34 + 16:34 + 16 + 2]
    assert out[10:] == tagged


def test_restore_vlan_leaves_unset_fields_alone():
    untagged, _ = _untagged_and_tagged()
    # DATA_VALID only: csum_start is meaningless and hdr_len is 0 -> no shift.
    hdr = vnet(VNET_F_DATA_VALID, GSO_NONE, 0, 0, 7, 9)
    out = restore_vlan(hdr + untagged, 42, 0x8100)
    assert out[:10] == hdr
    # NEEDS_CSUM without GSO (hdr_len 0): only csum_start moves.
    hdr = vnet(VNET_F_NEEDS_CSUM, GSO_NONE, 0, 0, 34, 16)
    out = restore_vlan(hdr + untagged, 42, 0x8100)
    assert VnetHdr(*VNET_HDR.unpack_from(out)) == (VNET_F_NEEDS_CSUM, GSO_NONE, 0, 0, 38, 16)


def test_restore_vlan_8021ad_tpid():
    untagged, _ = _untagged_and_tagged()
    out = restore_vlan(ZERO_VNET + untagged, 0x0FFF, 0x88A8)
    assert out[10:22] == untagged[:12]
    assert out[22:26] == b"\x88\xa8\x0f\xff"
    assert out[26:] == untagged[12:]


# --- headroom ---------------------------------------------------------------------

def test_headroom_grows_a_view_in_place():
    base = bytearray(b"H" * 64 + b"frame")
    buf = memoryview(base)[64:]
    room = headroom(buf, 50)
    assert room is not None and len(room) == 50 + len(buf) and bytes(room[50:]) == b"frame"
    room[:50] = b"o" * 50
    assert base[14:64] == b"o" * 50 and base[:14] == b"H" * 14  # the bytes in front, nothing else
    # a view of a view still finds its place in the buffer
    assert bytes(headroom(memoryview(buf)[2:], 2)) == b"frame"
    assert bytes(headroom(buf, 64)[:64]) == b"H" * 14 + b"o" * 50


@pytest.mark.parametrize("make", [
    lambda: bytearray(100),                                  # no view: nothing in front
    lambda: bytes(100),                                      # immutable
    lambda: memoryview(bytearray(100))[49:],                 # 49 bytes in front, 50 asked
    lambda: memoryview(bytearray(100))[60:].toreadonly(),   # read-only view
    lambda: memoryview(bytes(100))[60:],                     # a view of bytes
    lambda: memoryview(bytearray(100))[100:],                # empty
])
def test_headroom_refuses_what_it_cannot_grow(make):
    assert headroom(make(), 50) is None


def test_ports_read_behind_their_headroom():
    from vswitch.ports.base import HEADROOM
    from vswitch.ports.memory import MemoryPort
    port, got = MemoryPort("p"), []
    port.start(None, lambda p, buf, ts: got.append(headroom(buf, HEADROOM)))
    port.inject(b"\x02" * 60)
    assert got[0] is not None and bytes(got[0][HEADROOM + VNET_LEN:]) == b"\x02" * 60
