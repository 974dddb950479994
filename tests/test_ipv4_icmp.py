"""Unit tests for router.ipv4 and router.icmp (scapy is the independent reference).

Kernel behaviour asserted here was checked against Linux 6.18 with two
network namespaces (a host and a forwarding router): error TOS values, 6
back-to-back time-exceeded then one per second, only 2 back-to-back
net-unreachable errors and none at a steady 1 packet/s (ip_error and
icmp_send share the peer's tokens), frag-needed unlimited, no error about an
ICMP type 9 or an unknown type 40.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, UDP, IPOption_NOP, IPOption_Router_Alert, IPOption_RR, defragment
from scapy.layers.l2 import Ether
from scapy.packet import Raw
from scapy.utils import checksum as scapy_checksum

from router import icmp, ipv4
from router.icmp import RateLimiter, build_error, echo_reply, should_send_error
from router.ipv4 import (checksum, csum_update16, csum_update32, dec_ttl, fragment, ip_int, ip_str, is_martian_dst,
                         is_martian_src, parse_ipv4)
from vswitch.packet import ETH_HLEN, VNET_LEN, ZERO_VNET

OFF_IP = VNET_LEN + ETH_HLEN
H1, H2, RTR = "10.0.1.2", "10.0.2.2", "10.0.1.1"


def ip_bytes(**kw) -> bytes:
    payload = kw.pop("payload", b"")
    return bytes(IP(src=kw.pop("src", H1), dst=kw.pop("dst", H2), **kw) / UDP(sport=1234, dport=9) / Raw(payload))


def frame(ip: bytes) -> bytearray:
    return bytearray(ZERO_VNET + bytes(Ether(src="02:00:00:00:00:0a", dst="02:00:00:00:00:0b", type=0x0800) / Raw(ip)))


def words(hdr: bytes, i: int) -> int:
    return (hdr[i] << 8) | hdr[i + 1]


headers = st.builds(
    lambda tos, tl, ident, frag, ttl, proto, src, dst: bytearray(
        struct.pack("!BBHHHBBHII", 0x45, tos, tl, ident, frag, ttl, proto, 0, src, dst)),
    st.integers(0, 255), st.integers(20, 0xFFFF), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF),
    st.integers(1, 255), st.integers(0, 255), st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFFFFFF))


def scapy_ip_checksum(hdr: bytes) -> int:
    """The header checksum scapy computes for ``hdr`` (its own checksum field ignored)."""
    p = IP(hdr)
    p.chksum = None
    return IP(bytes(p)).chksum


def with_csum(hdr: bytearray) -> bytearray:
    hdr[10:12] = b"\0\0"
    hdr[10:12] = checksum(hdr).to_bytes(2, "big")
    return hdr


# --- checksum ----------------------------------------------------------------

@given(st.binary(max_size=3000))
def test_checksum_matches_scapy(data):
    assert checksum(data) == scapy_checksum(data)
    assert checksum(memoryview(bytearray(data))) == scapy_checksum(data)


def test_checksum_known_values():
    # RFC 1071 section 3 example words: 0001 f203 f4f5 f6f7 sum to 0xddf2.
    assert checksum(bytes.fromhex("0001f203f4f5f6f7")) == 0xFFFF - 0xDDF2
    assert checksum(b"") == 0xFFFF and checksum(bytes(20)) == 0xFFFF  # as scapy: nothing to add
    assert checksum(b"\xff\xff") == 0x0000  # a non-zero sum congruent to 0 folds to 0xFFFF
    assert checksum(b"\x12") == checksum(b"\x12\x00")


@given(headers)
def test_checksum_of_a_checksummed_header_is_zero(hdr):
    with_csum(hdr)
    assert checksum(hdr) == 0
    assert ipv4.ip_header_ok(hdr, 0)
    assert words(hdr, 10) == scapy_ip_checksum(bytes(hdr))


# --- RFC 1624 incremental updates ----------------------------------------------

@given(headers, st.sampled_from([0, 2, 4, 6, 8, 12, 14, 16, 18]), st.integers(0, 0xFFFF))
def test_csum_update16_equals_full_recompute(hdr, pos, new):
    with_csum(hdr)
    old = words(hdr, pos)
    updated = csum_update16(words(hdr, 10), old, new)
    hdr[pos:pos + 2] = new.to_bytes(2, "big")
    assert updated == words(with_csum(hdr), 10)


@given(headers, st.sampled_from([12, 16]), st.integers(0, 0xFFFFFFFF))
def test_csum_update32_equals_full_recompute(hdr, pos, new):
    with_csum(hdr)
    old = int.from_bytes(hdr[pos:pos + 4], "big")
    updated = csum_update32(words(hdr, 10), old, new)
    hdr[pos:pos + 4] = new.to_bytes(4, "big")
    assert updated == words(with_csum(hdr), 10)


@given(headers, st.data())
def test_dec_ttl_equals_full_recompute(hdr, data):
    with_csum(hdr)
    ttl = hdr[8]
    steps = data.draw(st.integers(1, ttl))
    for i in range(steps):
        assert dec_ttl(hdr, 0) == ttl - i - 1
    assert hdr[8] == ttl - steps
    assert checksum(hdr) == 0
    expect = bytes(hdr)
    assert bytes(with_csum(bytearray(hdr))) == expect
    assert scapy_ip_checksum(expect) == words(hdr, 10)


def _header_with_checksum(target: int, *, ttl: int = 64, ident: int = 0) -> bytearray:
    """A header whose checksum is ``target`` (found by varying the low word of dst)."""
    for low in range(0x10000):
        hdr = with_csum(bytearray(struct.pack("!BBHHHBBHII", 0x45, 0, 84, ident, 0, ttl, 17, 0,
                                              0x0A000102, 0x0A020000 | low)))
        if words(hdr, 10) == target:
            return hdr
    raise AssertionError("unreachable")


def test_rfc1624_corner_case_gives_0000_not_ffff():
    # RFC 1624 section 4: HC = 0xDD2F, m = 0x5555, m' = 0x3285; eqn. 3 gives 0x0000 like a recompute,
    # eqn. 2 (HC + m - m') would give 0xFFFF.
    assert csum_update16(0xDD2F, 0x5555, 0x3285) == 0x0000
    hdr = _header_with_checksum(0xDD2F, ident=0x5555)
    hdr[4:6] = b"\x32\x85"
    assert words(with_csum(hdr), 10) == 0x0000


@pytest.mark.parametrize("before, after", [(0xFEFF, 0x0000), (0xFF00, 0x0001), (0xFFFE, 0x00FF), (0x1234, 0x1334)])
def test_dec_ttl_checksum_wraps_like_ip_decrease_ttl(before, after):
    hdr = _header_with_checksum(before)
    dec_ttl(hdr, 0)
    assert words(hdr, 10) == after
    assert checksum(hdr) == 0


def test_dec_ttl_at_an_offset_in_a_frame_and_ttl_zero():
    buf = frame(ip_bytes(ttl=5, payload=b"abc"))
    assert dec_ttl(buf, OFF_IP) == 4
    p = Ether(bytes(buf[VNET_LEN:]))
    assert p[IP].ttl == 4 and ipv4.ip_header_ok(buf, OFF_IP)
    zero = with_csum(bytearray(struct.pack("!BBHHHBBHII", 0x45, 0, 20, 0, 0, 0, 17, 0, 1, 2)))
    assert dec_ttl(zero, 0) == 0 and zero[8] == 0 and checksum(zero) == 0


# --- parse_ipv4 ----------------------------------------------------------------

def test_parse_valid_packet_in_a_frame_with_padding():
    raw = ip_bytes(tos=0xB8, id=0x1234, ttl=7, flags="DF", payload=b"hello")
    buf = frame(raw) + bytes(12)  # Ethernet padding after the packet
    h = parse_ipv4(buf, OFF_IP)
    ref = IP(raw)
    assert h.reason is None and h.ok
    assert (h.ihl, h.hlen, h.tos, h.total_len, h.id, h.ttl, h.proto) == (5, 20, 0xB8, ref.len, 0x1234, 7, 17)
    assert (h.df, h.mf, h.frag_off, h.is_fragment) == (True, False, 0, False)
    assert (ip_str(h.src), ip_str(h.dst)) == (H1, H2)
    assert h.payload_off == OFF_IP + 20 and h.end == OFF_IP + ref.len
    assert "DF" in repr(h)


def test_parse_fragment_fields_and_options():
    raw = bytes(IP(src=H1, dst=H2, flags="MF", frag=100, options=[IPOption_Router_Alert()]) / Raw(b"x" * 16))
    h = parse_ipv4(raw)
    assert h.ok and h.ihl == 6 and h.hlen == 24 and h.mf and not h.df and h.frag_off == 100 and h.is_fragment


def _fix(b: bytearray) -> bytearray:
    hlen = min((b[0] & 0xF) * 4, len(b))
    b[10:12] = b"\0\0"
    b[10:12] = checksum(b[:hlen]).to_bytes(2, "big")
    return b


@pytest.mark.parametrize("mutate, reason", [
    (lambda b: b[:19], "ip-truncated"),
    (lambda b: _fix(bytearray([0x65]) + b[1:]), "ip-bad-version"),
    (lambda b: _fix(bytearray([0x44]) + b[1:]), "ip-bad-ihl"),
    (lambda b: _fix(bytearray([0x4F]) + b[1:])[:40], "ip-truncated"),  # 60-byte header, 40 bytes present
    (lambda b: b[:10] + bytes([b[10] ^ 0xFF]) + b[11:], "ip-bad-checksum"),
    (lambda b: _fix(b[:2] + b"\x00\x13" + b[4:]), "ip-bad-length"),  # total length 19 < 20
    (lambda b: _fix(b[:2] + (len(b) + 1).to_bytes(2, "big") + b[4:]), "ip-truncated"),
])
def test_parse_reasons(mutate, reason):
    good = bytearray(ip_bytes(payload=b"0123456789"))
    assert parse_ipv4(good).ok
    h = parse_ipv4(mutate(bytearray(good)))
    assert h.reason == reason and not h.ok
    assert reason in {r for r, _ in ipv4.PARSE_REASONS}
    assert "invalid" in repr(h)


def test_parse_skip_checksum():
    b = bytearray(ip_bytes())
    b[10] ^= 0xFF
    assert parse_ipv4(b, check_csum=False).ok
    assert parse_ipv4(b"", 0).reason == "ip-truncated"


# --- addresses -----------------------------------------------------------------

def test_ip_str_ip_int():
    assert ip_int("10.0.0.1") == 0x0A000001 and ip_str(0x0A000001) == "10.0.0.1"
    assert ip_str(ip_int("255.255.255.255")) == "255.255.255.255"
    for bad in ("1.2.3", "256.0.0.1", "1", "a.b.c.d", "", "1.2.3.4.5"):
        with pytest.raises(ValueError):
            ip_int(bad)


@pytest.mark.parametrize("addr, src_martian, dst_martian", [
    ("0.0.0.0", True, True), ("0.1.2.3", True, True), ("127.0.0.1", True, True), ("127.255.0.9", True, True),
    ("224.0.0.1", True, False), ("239.255.255.255", True, False), ("255.255.255.255", True, False),
    ("10.0.0.1", False, False), ("1.0.0.0", False, False), ("126.255.255.255", False, False),
    ("128.0.0.0", False, False), ("240.0.0.1", False, False), ("223.255.255.255", False, False),
])
def test_martians(addr, src_martian, dst_martian):
    a = ip_int(addr)
    assert is_martian_src(a) is src_martian
    assert is_martian_dst(a) is dst_martian


def test_martians_route_localnet():
    lo = ip_int("127.0.0.1")
    assert not is_martian_src(lo, route_localnet=True) and not is_martian_dst(lo, route_localnet=True)
    assert is_martian_src(ip_int("0.0.0.0"), route_localnet=True)


# --- fragment ------------------------------------------------------------------

def _check_fragments(frags, orig_ip: bytes, mtu: int, prefix: bytes):
    orig = IP(orig_ip)
    pieces = []
    for i, f in enumerate(frags):
        assert f[:OFF_IP] == prefix
        ip = f[OFF_IP:]
        p = IP(ip)
        assert len(ip) == p.len <= mtu
        assert not p.flags.DF
        assert p.id == orig.id and p.src == orig.src and p.dst == orig.dst and p.proto == orig.proto
        assert checksum(ip[:p.ihl * 4]) == 0
        again = IP(ip)
        del again.chksum
        assert IP(bytes(again)).chksum == p.chksum  # scapy recomputes the same checksum
        body = ip[p.ihl * 4:]
        if i < len(frags) - 1:
            assert len(body) % 8 == 0
        pieces.append((p.frag * 8, bool(p.flags.MF), body))
    pieces.sort(key=lambda t: t[0])
    data, pos = b"", pieces[0][0]
    for off, _, body in pieces:
        assert off == pos  # contiguous, no overlap
        data += body
        pos += len(body)
    assert data == orig_ip[orig.ihl * 4:orig.len]
    return pieces


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 4000), st.integers(68, 1500), st.booleans())
def test_fragment_reassembles(size, mtu, with_options):
    opts = [IPOption_RR(routers=["0.0.0.0"] * 2), IPOption_NOP(), IPOption_Router_Alert()] if with_options else []
    data = (bytes(range(256)) * 16)[:size]
    orig_ip = bytes(IP(src=H1, dst=H2, id=4242, ttl=9, options=opts) / UDP(sport=1, dport=2) / Raw(data))
    buf = frame(orig_ip)
    frags = fragment(buf, OFF_IP, mtu)
    prefix = bytes(buf[:OFF_IP])
    if len(orig_ip) <= mtu:
        assert frags == [bytes(buf)]
        return
    pieces = _check_fragments(frags, orig_ip, mtu, prefix)
    assert [mf for _, mf, _ in pieces] == [True] * (len(pieces) - 1) + [False]
    whole = defragment([IP(f[OFF_IP:]) for f in frags])
    assert len(whole) == 1 and bytes(whole[0][IP].payload) == orig_ip[IP(orig_ip).ihl * 4:]


def test_fragment_options_first_keeps_all_later_keep_only_copied():
    opts = [IPOption_RR(routers=["0.0.0.0"] * 2), IPOption_Router_Alert()]  # RR: not copied; RA: copied
    orig_ip = bytes(IP(src=H1, dst=H2, options=opts) / Raw(b"z" * 300))
    hlen = IP(orig_ip).ihl * 4
    frags = fragment(frame(orig_ip), OFF_IP, 200)
    assert len(frags) == 2
    first, later = frags[0][OFF_IP:], frags[1][OFF_IP:]
    assert first[20:hlen] == orig_ip[20:hlen]
    assert IP(later).ihl * 4 == hlen  # same header length (ip_options_fragment)
    rr_len = orig_ip[21]
    assert later[20:20 + rr_len] == b"\x01" * rr_len  # RR became NOOPs
    assert later[20 + rr_len:20 + rr_len + 4] == orig_ip[20 + rr_len:20 + rr_len + 4]  # router alert kept


def test_fragment_of_a_fragment_keeps_offset_and_mf():
    orig_ip = bytes(IP(src=H1, dst=H2, id=7, flags="MF", frag=100) / Raw(b"q" * 1000))
    frags = fragment(frame(orig_ip), OFF_IP, 500)
    ps = [IP(f[OFF_IP:]) for f in frags]
    assert [p.frag for p in ps] == [100, 100 + 480 // 8, 100 + 960 // 8]
    assert all(p.flags.MF for p in ps)


def test_fragment_refuses_df_bad_header_and_tiny_mtu():
    with pytest.raises(ValueError, match="DF"):
        fragment(frame(ip_bytes(flags="DF", payload=b"x" * 1000)), OFF_IP, 576)
    bad = frame(ip_bytes(payload=b"x" * 1000))
    bad[OFF_IP + 10] ^= 1
    with pytest.raises(ValueError, match="checksum"):
        fragment(bad, OFF_IP, 576)
    with pytest.raises(ValueError, match="MTU"):
        fragment(frame(ip_bytes(payload=b"x" * 100)), OFF_IP, 27)
    # a DF packet that fits is returned as is (trimmed of link padding)
    small = frame(ip_bytes(flags="DF", payload=b"x"))
    assert fragment(small + bytes(10), OFF_IP, 1500) == [bytes(small)]


# --- build_error ---------------------------------------------------------------

def _check_error(raw: bytes, orig: bytes, type_, code, src=RTR):
    p = IP(raw)
    assert p.version == 4 and p.ihl == 5 and p.ttl == 64 and p.flags == 0 and p.frag == 0 and p.proto == 1
    assert p.src == src and p.dst == IP(orig).src
    assert p.len == len(raw) <= 576
    assert p[ICMP].type == type_ and p[ICMP].code == code
    assert scapy_checksum(raw[:20]) == 0 and scapy_checksum(raw[20:]) == 0
    rebuilt = IP(raw)
    rebuilt.chksum = None
    rebuilt[ICMP].chksum = None
    rebuilt = IP(bytes(rebuilt))
    assert (rebuilt.chksum, rebuilt[ICMP].chksum) == (p.chksum, p[ICMP].chksum)
    quote = raw[28:]
    assert quote == orig[:len(quote)]
    return p


def test_time_exceeded_quote_is_cut_at_576_bytes():
    orig = ip_bytes(ttl=1, tos=0xFF, payload=b"x" * 1400)
    raw = build_error(orig, 11, 0, ip_int(RTR), ip_id=99)
    p = _check_error(raw, orig, 11, 0)
    assert len(raw) == 576 and len(raw) - 28 == 548
    assert p.tos == 0xDE and p.id == 99
    assert raw[28] == 0x45 and raw[28 + 8] == 1  # quoted header shows TTL as received


@given(st.integers(0, 2000), st.integers(0, 255))
def test_error_datagram_never_exceeds_576(size, tos):
    orig = ip_bytes(tos=tos, payload=b"p" * size)
    raw = build_error(orig, 3, 1, ip_int(RTR))
    p = _check_error(raw, orig, 3, 1)
    assert len(raw) == min(576, 28 + len(orig))
    assert p.tos == (tos & 0x1E) | 0xC0


@pytest.mark.parametrize("orig_tos, tos", [(0x00, 0xC0), (0x03, 0xC2), (0xE1, 0xC0), (0x1C, 0xDC), (0xFF, 0xDE)])
def test_error_tos_as_observed_on_linux(orig_tos, tos):
    assert IP(build_error(ip_bytes(tos=orig_tos), 11, 0, 1)).tos == tos


def test_small_original_is_quoted_whole_without_link_padding():
    orig = ip_bytes(payload=b"abc")
    raw = build_error(orig + b"\0" * 20, 3, 3, ip_int(RTR))
    _check_error(raw, orig, 3, 3)
    assert raw[28:] == orig and len(raw) == 28 + len(orig)


def test_frag_needed_carries_next_hop_mtu():
    orig = ip_bytes(flags="DF", payload=b"x" * 1400)
    raw = build_error(orig, 3, 4, ip_int(RTR), mtu=1400)
    p = _check_error(raw, orig, 3, 4)
    assert p[ICMP].nexthopmtu == 1400 and raw[24:26] == b"\0\0" and raw[26:28] == (1400).to_bytes(2, "big")


def test_redirect_carries_gateway_and_param_problem_pointer():
    orig = ip_bytes()
    p = _check_error(build_error(orig, 5, 1, ip_int(RTR), gateway=ip_int("10.0.1.254")), orig, 5, 1)
    assert p[ICMP].gw == "10.0.1.254"
    p = _check_error(build_error(orig, 12, 0, ip_int(RTR), pointer=20), orig, 12, 0)
    assert p[ICMP].ptr == 20
    raw = build_error(orig, 3, 0, ip_int(RTR), mtu=1400, gateway=5)  # ignored for 3/0
    assert raw[24:28] == b"\0\0\0\0"


# --- should_send_error ---------------------------------------------------------

def _icmp_orig(type_, code=0, **kw) -> bytes:
    return bytes(IP(src=H1, dst=H2, **kw) / ICMP(type=type_, code=code) / Raw(b"\0" * 8))


@pytest.mark.parametrize("orig, l2, kw, reason", [
    (ip_bytes(), True, {}, "l2-multicast"),
    (ip_bytes(dst="224.0.0.5"), False, {}, "dst-multicast"),
    (ip_bytes(dst="255.255.255.255"), False, {}, "dst-multicast"),
    (ip_bytes(dst="10.0.2.255"), False, {"dst_is_broadcast": True}, "dst-multicast"),
    (bytes(IP(src=H1, dst=H2, frag=10) / Raw(b"y" * 40)), False, {}, "non-first-fragment"),
    (ip_bytes(src="0.0.0.0"), False, {}, "src-unanswerable"),
    (ip_bytes(src="0.1.2.3"), False, {}, "src-unanswerable"),
    (ip_bytes(src="225.1.1.1"), False, {}, "src-unanswerable"),
    (ip_bytes(src="255.255.255.255"), False, {}, "src-unanswerable"),
    (_icmp_orig(3, 1), False, {}, "icmp-error"),
    (_icmp_orig(4), False, {}, "icmp-error"),
    (_icmp_orig(5, 1), False, {}, "icmp-error"),
    (_icmp_orig(11), False, {}, "icmp-error"),
    (_icmp_orig(12), False, {}, "icmp-error"),
    (_icmp_orig(9), False, {}, "icmp-error"),  # icmp_pointers[9].error = 1; Linux 6.18 sends nothing
    (_icmp_orig(40), False, {}, "icmp-error"),  # above NR_ICMP_TYPES: "assume ... an error"
    (bytes(IP(src=H1, dst=H2, proto=1)), False, {}, "truncated"),
    (b"\x45\x00", False, {}, "truncated"),
])
def test_should_send_error_reasons(orig, l2, kw, reason):
    assert should_send_error(orig, l2, **kw) == reason
    assert reason in {r for r, _ in icmp.SUPPRESS_REASONS}


@pytest.mark.parametrize("orig", [
    ip_bytes(), _icmp_orig(8), _icmp_orig(0), _icmp_orig(13), _icmp_orig(14),
    bytes(IP(src=H1, dst=H2, flags="MF") / Raw(b"y" * 40)),  # the first fragment is answered
])
def test_should_send_error_allows(orig):
    assert should_send_error(orig, False) is None


# --- RateLimiter ---------------------------------------------------------------

class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


A, B = ip_int("10.0.1.2"), ip_int("10.0.1.3")


def test_six_back_to_back_then_one_per_second():
    clk = Clock()
    rl = RateLimiter(clock=clk)
    assert [rl.allow(A, 11, 0) for _ in range(10)] == [True] * 6 + [False] * 4
    assert rl.limited == 4 and rl.limited_host == 4
    clk.t += 0.5
    assert not rl.allow(A, 11, 0)
    clk.t += 0.5
    assert rl.allow(A, 11, 0) and not rl.allow(A, 11, 0)
    # a steady 4 packets/s gets one error per second
    got = []
    for _ in range(16):
        clk.t += 0.25
        got.append(rl.allow(A, 3, 1))
    assert sum(got) == 4
    clk.t += 60
    assert sum(rl.allow(A, 12, 0) for _ in range(10)) == 6  # idle refills the burst, no more


def test_unlimited_types_and_frag_needed():
    rl = RateLimiter(clock=Clock())
    assert all(rl.allow(A, 3, 4) for _ in range(100))  # PMTU discovery is never limited
    assert all(rl.allow(A, 0, 0) for _ in range(100))  # echo replies
    assert all(rl.allow(A, 5, 1) for _ in range(100))  # redirects: not in 0x1818 (they have their own backoff)
    assert all(rl.allow(A, 8, 0) for _ in range(100))
    assert rl.limited == 0
    assert [rl.is_limited_type(t, 0) for t in (3, 4, 11, 12)] == [True] * 4
    assert not rl.is_limited_type(3, 4) and not rl.is_limited_type(40, 0)


def test_destinations_are_independent():
    rl = RateLimiter(clock=Clock())
    assert sum(rl.allow(A, 11, 0) for _ in range(10)) == 6
    assert sum(rl.allow(B, 11, 0) for _ in range(10)) == 6
    assert sum(rl.allow(A, 3, 0) for _ in range(10)) == 0  # the bucket is per destination, not per type


def test_route_error_shares_the_peer_bucket_like_ip_error():
    clk = Clock()
    rl = RateLimiter(clock=clk)

    def no_route():
        return rl.allow_route_error(A) and rl.allow(A, 3, 0)

    assert [no_route() for _ in range(10)] == [True, True] + [False] * 8  # as observed on Linux 6.18
    got = []
    for _ in range(6):  # a steady 1 packet/s: ip_error takes each second's token, icmp_send finds none
        clk.t += 1.05
        got.append(no_route())
    assert got == [False] * 6
    for _ in range(3):  # one per 2 s gets through every time
        clk.t += 2.05
        assert no_route()
    assert rl.limited_route > 0 and rl.limited_host > 0


def test_global_limit():
    clk = Clock()
    rl = RateLimiter(clock=clk)
    got = [rl.allow(0x0B000000 + i, 11, 0) for i in range(100)]
    assert got == [True] * 50 + [False] * 50 and rl.limited_global == 50
    clk.t += 0.010
    assert not rl.allow(0x0C000000, 11, 0)  # refills at most every 20 ms
    clk.t += 0.010
    assert sum(rl.allow(0x0D000000 + i, 11, 0) for i in range(100)) == 20  # 1000/s * 20 ms
    assert rl.allow(A, 3, 4) and rl.allow(A, 0, 0)  # exempt types ignore the global bucket too
    clk.t += 5
    assert sum(rl.allow(0x0E000000 + i, 11, 0) for i in range(100)) == 50  # capped at the burst


def test_peer_table_is_bounded_lru():
    clk = Clock()
    rl = RateLimiter(clock=clk, max_peers=4)
    for i in range(4):
        assert sum(rl.allow(i + 1, 11, 0) for _ in range(7)) == 6
    assert rl.allow(1, 11, 0) is False  # touch peer 1: now the most recent
    assert rl.allow(99, 11, 0)  # a fifth peer evicts the least recent, peer 2
    assert len(rl.peers) == 4 and 2 not in rl.peers and 1 in rl.peers
    assert rl.allow(2, 11, 0)  # back with a full bucket
    assert rl.stats()["peers"] == 4


# --- echo_reply ----------------------------------------------------------------

def test_echo_reply_fields():
    req = bytes(IP(src=H1, dst=RTR, tos=0xB8, ttl=3, flags="DF", id=5)
                / ICMP(type=8, id=0x77, seq=9) / Raw(b"hello" * 50))
    raw = echo_reply(req, ip_int(RTR), ip_id=321)
    p = IP(raw)
    assert (p.src, p.dst, p.ttl, p.tos, p.flags, p.id, p.proto, p.ihl) == (RTR, H1, 64, 0xB8, 0, 321, 1, 5)
    assert (p[ICMP].type, p[ICMP].code, p[ICMP].id, p[ICMP].seq) == (0, 0, 0x77, 9)
    assert bytes(p[ICMP].payload) == b"hello" * 50
    assert p.len == len(raw) == len(req)
    assert scapy_checksum(raw[:20]) == 0 and scapy_checksum(raw[20:]) == 0
    again = IP(raw)
    again.chksum = None
    again[ICMP].chksum = None
    assert bytes(IP(bytes(again))) == raw


def test_echo_reply_drops_options_and_padding():
    req = bytes(IP(src=H1, dst=RTR, options=[IPOption_Router_Alert()]) / ICMP(type=8, id=1, seq=2) / Raw(b"abc"))
    raw = echo_reply(req + bytes(9), ip_int(RTR))
    p = IP(raw)
    assert p.ihl == 5 and bytes(p[ICMP].payload) == b"abc" and p.len == len(raw) == len(req) - 4


@pytest.mark.parametrize("req", [
    bytes(IP(src=H1, dst=RTR) / ICMP(type=8, chksum=0x1234) / Raw(b"x")),  # bad ICMP checksum
    bytes(IP(src=H1, dst=RTR) / ICMP(type=0) / Raw(b"x")),  # not a request
    bytes(IP(src=H1, dst=RTR) / ICMP(type=8, code=1) / Raw(b"x")),
    bytes(IP(src=H1, dst=RTR) / UDP()),
    bytes(IP(src=H1, dst=RTR, flags="MF") / ICMP(type=8) / Raw(b"x" * 16)),  # a fragment
    bytes(IP(src=H1, dst=RTR) / ICMP(type=8))[:24],  # truncated
    b"\x45",
])
def test_echo_reply_refuses(req):
    assert echo_reply(req, ip_int(RTR)) is None


# --- record route (ip_options_compile's IPOPT_RR checks) --------------------------------------------

def _hdr(opts: bytes) -> bytes:
    assert len(opts) % 4 == 0
    return bytes([0x45 + len(opts) // 4]) + bytes(19) + opts


@pytest.mark.parametrize("opts,at", [
    (bytes([7, 11, 4]) + bytes(8) + b"\0", 20),            # two free slots
    (bytes([1, 7, 7, 4]) + bytes(4), 21),                  # after a NOP, one free slot
    (bytes([7, 11, 8]) + bytes(8) + b"\0", 20),            # the second slot is free
    (bytes([7, 11, 12]) + bytes(8) + b"\0", None),         # full: forwarded as it is
    (bytes([7, 10, 8]) + bytes(7) + b"\0\0", None),        # a partial slot (the kernel: ICMP 12)
    (bytes([7, 11, 3]) + bytes(8) + b"\0", None),          # pointer below 4 (ICMP 12)
    (bytes([0, 7, 11, 4]) + bytes(8), None),               # after the end of the list
    (bytes([0x94, 4, 0, 0]), None),                        # router alert only
])
def test_rr_option(opts, at):
    assert ipv4.rr_option(_hdr(opts), 0, 20 + len(opts)) == at
