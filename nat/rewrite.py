"""Address and port rewrites with checksum updates, as nf_nat_ipv4_manip_pkt does them.

Everything works in place on a frame buffer at fixed offsets (``l3`` is the
IPv4 header's offset). The IPv4 header checksum gets an RFC 1624 update.
The L4 checksum depends on how the frame came in:

- fully checksummed (virtio flags without NEEDS_CSUM): RFC 1624 updates for
  the address (pseudo-header) and port words, as ``inet_proto_csum_replace4``;
- partial (NEEDS_CSUM, a pod's offloaded super-frame): the field holds the
  pseudo-header sum the device will complete, so only an address change
  touches it (the same sum, not complemented) and a port change does not.

UDP with checksum 0 (none) stays 0; an update that lands on 0 is sent as
0xFFFF (RFC 768).
"""

from __future__ import annotations

from router.ipv4 import (IP_CSUM, IP_DST, IP_SRC, PROTO_ICMP, PROTO_TCP, PROTO_UDP, checksum, csum_update16,
                         csum_update32, set_ip_checksum)

VNET_NEEDS_CSUM = 1
L4_CSUM_OFFSET = {PROTO_TCP: 16, PROTO_UDP: 6}
ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY = 8, 0


def _fold(s: int) -> int:  # for partial (uncomplemented) sums; complemented ones use router.ipv4
    s = (s & 0xFFFF) + (s >> 16)
    return (s & 0xFFFF) + (s >> 16)


def _get16(buf, off: int) -> int:
    return (buf[off] << 8) | buf[off + 1]


def _put16(buf, off: int, v: int) -> None:
    buf[off] = v >> 8
    buf[off + 1] = v & 0xFF


def _get32(buf, off: int) -> int:
    return int.from_bytes(buf[off:off + 4], "big")


def _put32(buf, off: int, v: int) -> None:
    buf[off:off + 4] = v.to_bytes(4, "big")


def _partial_update(field: int, old: int, new: int, words: int) -> int:
    """A partial (pseudo-header) sum after a field of ``words`` 16-bit words changed."""
    s = field
    for i in range(words):
        shift = 16 * (words - 1 - i)
        s = _fold(s + (~(old >> shift) & 0xFFFF) + ((new >> shift) & 0xFFFF))
    return s


def _l4_update(buf, csum_off: int, proto: int, old: int, new: int, words: int, pseudo: bool, partial: bool) -> None:
    c = _get16(buf, csum_off)
    if proto == PROTO_UDP and c == 0 and not partial:
        return  # no checksum in use
    if partial:
        if pseudo:
            _put16(buf, csum_off, _partial_update(c, old, new, words))
        return
    if words == 2:
        c = csum_update32(c, old, new)
    else:
        c = csum_update16(c, old, new)
    if proto == PROTO_UDP and c == 0:
        c = 0xFFFF
    _put16(buf, csum_off, c)


def set_addr(buf, l3: int, which: int, new: int, partial: bool) -> int:
    """Set the source (``which`` = IP_SRC) or destination (IP_DST) address; returns the old one.

    Updates the IP header checksum and, for an unfragmented (first) TCP/UDP
    segment whose checksum field is present, the L4 checksum's pseudo-header part.
    """
    old = _get32(buf, l3 + which)
    if old == new:
        return old
    _put32(buf, l3 + which, new)
    _put16(buf, l3 + IP_CSUM, csum_update32(_get16(buf, l3 + IP_CSUM), old, new))
    proto = buf[l3 + 9]
    coff = L4_CSUM_OFFSET.get(proto)
    if coff is not None and not (_get16(buf, l3 + 6) & 0x1FFF):
        off = l3 + ((buf[l3] & 0x0F) << 2) + coff
        if off + 2 <= len(buf):
            _l4_update(buf, off, proto, old, new, 2, True, partial)
    return old


def set_port(buf, l3: int, src: bool, new: int, partial: bool) -> int:
    """Set the TCP/UDP source or destination port, or the ICMP echo id (``src`` ignored); returns the old value."""
    proto = buf[l3 + 9]
    l4 = l3 + ((buf[l3] & 0x0F) << 2)
    if proto == PROTO_ICMP:
        off, coff = l4 + 4, l4 + 2  # echo identifier; the ICMP checksum has no pseudo-header
    else:
        off, coff = l4 + (0 if src else 2), l4 + L4_CSUM_OFFSET[proto]
    old = _get16(buf, off)
    if old == new:
        return old
    _put16(buf, off, new)
    if coff + 2 <= len(buf):
        if proto == PROTO_ICMP:
            c = _get16(buf, coff)
            _put16(buf, coff, csum_update16(c, old, new))
        else:
            _l4_update(buf, coff, proto, old, new, 1, False, partial)
    return old


def set_icmp_checksum(buf, l4: int, end: int) -> None:
    """Recompute an ICMP message's checksum from scratch (after rewriting a quoted header)."""
    buf[l4 + 2] = buf[l4 + 3] = 0
    _put16(buf, l4 + 2, checksum(memoryview(buf)[l4:end]))


def rewrite_quoted(buf, inner: int, src: int, sport: int, dst: int, dport: int, end: int) -> None:
    """Rewrite the header an ICMP error quotes (at ``inner``, the error ending at ``end``): addresses,
    ports/echo id, its IP checksum, and its L4 checksum when the quote holds that field (as
    tcp_manip_pkt/udp_manip_pkt do: a 20-byte IP + 8-byte quote carries the UDP one, not the TCP one).
    """
    proto = buf[inner + 9]
    l4 = inner + ((buf[inner] & 0x0F) << 2)
    old_src, old_dst = _get32(buf, inner + IP_SRC), _get32(buf, inner + IP_DST)
    _put32(buf, inner + IP_SRC, src)
    _put32(buf, inner + IP_DST, dst)
    set_ip_checksum(buf, inner)
    if proto in (PROTO_TCP, PROTO_UDP) and l4 + 4 <= end:
        old_sport, old_dport = _get16(buf, l4), _get16(buf, l4 + 2)
        _put16(buf, l4, sport)
        _put16(buf, l4 + 2, dport)
        coff = l4 + L4_CSUM_OFFSET[proto]
        c = _get16(buf, coff) if coff + 2 <= end else None
        if c is not None and (c or proto == PROTO_TCP):  # a UDP checksum of 0 means none
            c = csum_update32(csum_update32(c, old_src, src), old_dst, dst)
            c = csum_update16(csum_update16(c, old_sport, sport), old_dport, dport)
            if proto == PROTO_UDP and c == 0:
                c = 0xFFFF
            _put16(buf, coff, c)
    elif proto == PROTO_ICMP and l4 + 6 <= end:
        old = _get16(buf, l4 + 4)  # the echo id, with the quoted ICMP checksum updated (icmp_manip_pkt)
        _put16(buf, l4 + 4, sport)
        c = _get16(buf, l4 + 2)
        _put16(buf, l4 + 2, csum_update16(c, old, sport))
