"""ICMP errors and echo replies the router sends, and the kernel's ICMP rate limits.

Builders return a complete IPv4 packet (no Ethernet header): the caller
routes it and puts it in a frame. Behaviour follows net/ipv4/icmp.c
(``__icmp_send``, ``icmp_reply``) as summarised in
../shared/reference/kernel-dataplane-spec.md items 7-13; nothing here imports
scapy.

The path for an error is: ``should_send_error`` (may one be sent at all?),
``RateLimiter.allow`` (is one due?), ``build_error``.
"""

from __future__ import annotations

import struct
import time
from collections import OrderedDict
from typing import Callable, Optional

from router.ipv4 import (IP_CSUM, IP_OFFSET, IPV4_HDR, IPV4_HLEN, PROTO_ICMP, checksum, is_lbcast, is_multicast,
                         is_zeronet)

ICMP_HDR = struct.Struct("!BBHI")  # type, code, checksum, rest of header
ICMP_HLEN = ICMP_HDR.size  # 8

# Types and codes (include/uapi/linux/icmp.h).
ECHO_REPLY = 0
DEST_UNREACH = 3
SOURCE_QUENCH = 4
REDIRECT = 5
ECHO = 8
TIME_EXCEEDED = 11
PARAMETER_PROBLEM = 12
NR_ICMP_TYPES = 18

NET_UNREACH = 0
HOST_UNREACH = 1
FRAG_NEEDED = 4
PKT_FILTERED = 13  # 'prohibit' routes
REDIR_HOST = 1
EXC_TTL = 0

# Types the kernel treats as errors (icmp_pointers[].error in net/ipv4/icmp.c): an error is never sent
# in answer to one of these, nor to any type above NR_ICMP_TYPES ("assume any unknown ICMP type is an
# error"). Besides 3, 4, 5, 11 and 12 this includes the unassigned 1, 2, 6, 7 and router
# advertisement/solicitation (9, 10).
ERROR_TYPES = frozenset({1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12})

# RFC 1812 4.3.2.3: the whole error datagram stays within 576 bytes.
MAX_ERROR_LEN = 576
MAX_QUOTE = MAX_ERROR_LEN - IPV4_HLEN - ICMP_HLEN  # 548

ERROR_TTL = 64  # ip_default_ttl
TOS_TOS_MASK = 0x1E  # IPTOS_TOS_MASK
TOS_PREC_INTERNETCONTROL = 0xC0

# should_send_error reasons as (reason, human text).
SUPPRESS_REASONS = (
    ("l2-multicast", "no ICMP error for a link-layer broadcast or multicast frame"),
    ("dst-multicast", "no ICMP error for a packet to a broadcast or multicast address"),
    ("non-first-fragment", "no ICMP error for a fragment other than the first"),
    ("src-unanswerable", "no ICMP error to a 0.0.0.0/8, broadcast or multicast source"),
    ("icmp-error", "no ICMP error about an ICMP error"),
    ("truncated", "original too short to answer"),
)


def _finish(out: bytearray) -> bytearray:
    """Fill in the ICMP checksum (from byte 20) and the IP header checksum of ``out``."""
    mv = memoryview(out)
    c = checksum(mv[IPV4_HLEN:])
    out[IPV4_HLEN + 2] = c >> 8
    out[IPV4_HLEN + 3] = c & 0xFF
    c = checksum(mv[:IPV4_HLEN])
    out[IP_CSUM] = c >> 8
    out[IP_CSUM + 1] = c & 0xFF
    return out


def build_error(orig_ip, type_: int, code: int, src: int, *, mtu: int = 0, gateway: int = 0,
                ip_id: int = 0, pointer: int = 0) -> bytes:
    """An IPv4 packet carrying ICMP ``type_``/``code`` about ``orig_ip`` (the offending IP packet).

    As __icmp_send: TOS = (original TOS & 0x1E) | 0xC0, TTL 64, DF clear, no
    IP options; source ``src`` (the caller picks it: the preferred source of
    the route back), destination the original's source. The quote is the
    original packet from its IP header on, as received (bytes past its total
    length are dropped), cut so that the whole datagram is at most 576 bytes.
    The 4 bytes after the ICMP checksum carry the next-hop MTU in bytes 6-7
    for 3/4, the gateway for type 5, the pointer in byte 4 for type 12, else
    zeros.
    """
    orig = memoryview(orig_ip)
    n = len(orig)
    if n >= 4:
        tot = (orig[2] << 8) | orig[3]
        if IPV4_HLEN <= tot < n:
            n = tot
    qlen = min(n, MAX_QUOTE)
    tos = ((orig[1] & TOS_TOS_MASK) if len(orig) > 1 else 0) | TOS_PREC_INTERNETCONTROL
    dst = int.from_bytes(orig[12:16], "big") if len(orig) >= 16 else 0
    if type_ == DEST_UNREACH and code == FRAG_NEEDED:
        rest = mtu & 0xFFFF
    elif type_ == REDIRECT:
        rest = gateway & 0xFFFFFFFF
    elif type_ == PARAMETER_PROBLEM:
        rest = (pointer & 0xFF) << 24
    else:
        rest = 0
    total = IPV4_HLEN + ICMP_HLEN + qlen
    out = bytearray(total)
    IPV4_HDR.pack_into(out, 0, 0x45, tos, total, ip_id & 0xFFFF, 0, ERROR_TTL, PROTO_ICMP, 0, src, dst)
    ICMP_HDR.pack_into(out, IPV4_HLEN, type_, code, 0, rest)
    out[IPV4_HLEN + ICMP_HLEN:] = orig[:qlen]
    return bytes(_finish(out))


def should_send_error(orig_ip, l2_dst_is_multicast: bool, *, dst_is_broadcast: bool = False) -> Optional[str]:
    """None if an ICMP error about ``orig_ip`` may be sent, else the reason (``SUPPRESS_REASONS``).

    The checks of __icmp_send, in its order: the frame was not addressed to
    us alone (``l2_dst_is_multicast``: Ethernet broadcast or multicast, i.e.
    pkt_type != PACKET_HOST); the packet went to a broadcast or multicast
    address (224/4 and 255.255.255.255 are seen here, a subnet broadcast
    needs the route: pass ``dst_is_broadcast``); it is a fragment other than
    the first; its source cannot be answered (0/8, multicast, broadcast: the
    route lookup back fails); it is itself an ICMP error (``ERROR_TYPES``) or
    too short to tell.
    """
    if l2_dst_is_multicast:
        return "l2-multicast"
    orig = memoryview(orig_ip)
    if len(orig) < IPV4_HLEN:
        return "truncated"
    dst = int.from_bytes(orig[16:20], "big")
    if dst_is_broadcast or is_multicast(dst) or is_lbcast(dst):
        return "dst-multicast"
    if ((orig[6] << 8) | orig[7]) & IP_OFFSET:
        return "non-first-fragment"
    src = int.from_bytes(orig[12:16], "big")
    if is_zeronet(src) or is_multicast(src) or is_lbcast(src):
        return "src-unanswerable"
    if orig[9] == PROTO_ICMP:
        hlen = (orig[0] & 0x0F) << 2
        if len(orig) <= hlen:
            return "truncated"
        t = orig[hlen]
        if t > NR_ICMP_TYPES or t in ERROR_TYPES:
            return "icmp-error"
    return None


def echo_reply(orig_ip, src: int, *, ip_id: int = 0) -> Optional[bytes]:
    """The IPv4 packet answering the echo request ``orig_ip``, or None if it is not a sound one.

    As icmp_echo/icmp_reply: type 0 code 0, same identifier, sequence and
    data; destination the request's source, source ``src``; the request's
    TOS kept (replies are not errors); TTL 64; DF clear; no IP options.
    None when ``orig_ip`` is not an ICMP echo request with a valid ICMP
    checksum (icmp_rcv drops those) or is a fragment (reassemble first).
    The reply is as long as the request: the caller fragments it if needed.
    """
    orig = memoryview(orig_ip)
    if len(orig) < IPV4_HLEN:
        return None
    hlen = (orig[0] & 0x0F) << 2
    tot = (orig[2] << 8) | orig[3]
    if hlen < IPV4_HLEN or tot > len(orig) or tot < hlen + ICMP_HLEN or orig[9] != PROTO_ICMP:
        return None
    if ((orig[6] << 8) | orig[7]) & (0x2000 | IP_OFFSET):
        return None
    icmp = orig[hlen:tot]
    if icmp[0] != ECHO or icmp[1] != 0 or checksum(icmp) != 0:
        return None
    total = IPV4_HLEN + len(icmp)
    out = bytearray(total)
    IPV4_HDR.pack_into(out, 0, 0x45, orig[1], total, ip_id & 0xFFFF, 0, ERROR_TTL, PROTO_ICMP, 0, src,
                       int.from_bytes(orig[12:16], "big"))
    out[IPV4_HLEN:] = icmp
    out[IPV4_HLEN] = ECHO_REPLY
    out[IPV4_HLEN + 2] = out[IPV4_HLEN + 3] = 0
    return bytes(_finish(out))


# --- rate limiting -----------------------------------------------------------

XRLIM_BURST_FACTOR = 6  # net/ipv4/inetpeer.c


class RateLimiter:
    """The kernel's ICMP output rate limits, per destination and global.

    All times are integer milliseconds (the kernel's jiffies at HZ=1000),
    read from ``clock`` (seconds, monotonic; inject a fake one in tests).

    ``allow(dst, type_, code)`` is __icmp_send's pair of checks for types in
    ``ratemask`` (default 0x1818: 3, 4, 11, 12) except 3/4 (PMTU discovery is
    never limited); every other type is always allowed:

    1. global (icmp_global_allow): passes while credit > 0; an empty bucket
       refills at ``msgs_per_sec`` up to ``msgs_burst``, at most once per
       20 ms. A message sent consumes one credit (the kernel consumes 0-2 at
       random, one on average).
    2. per destination (inet_peer_xrlim_allow): a token bucket of
       milliseconds, capped at XRLIM_BURST_FACTOR * ``ratelimit_ms``, each
       message costing ``ratelimit_ms``. A new peer starts as if idle for
       60 s, hence full: 6 back-to-back errors, then one per second.

    ``allow_route_error(src)`` is the extra bucket ip_error (net/ipv4/route.c)
    applies before it even calls icmp_send for a packet hitting an
    unreachable/prohibit route or no route (burst ``error_burst_ms`` 5 s,
    cost ``error_cost_ms`` 1 s). It works on the *same* per-peer tokens as
    the per-destination bucket (inet_peer rate_tokens/rate_last, "these ICMPs
    are twice limited"), so a route error costs two seconds of tokens: a
    stage sending 3/0, 3/1 or 3/13 for a missing route calls
    ``allow_route_error(src) and allow(src, 3, code)``, which lets two errors
    through back to back and then at most one per two seconds.

    Peers are kept in an LRU of at most ``max_peers``; an evicted peer comes
    back with a full bucket, as an expired inet_peer does. The global bucket
    still bounds the total.
    """

    __slots__ = ("ratelimit_ms", "ratemask", "msgs_per_sec", "msgs_burst", "error_cost_ms", "error_burst_ms",
                 "max_peers", "clock", "peers", "credit", "stamp",
                 "limited", "limited_global", "limited_host", "limited_route")

    def __init__(self, *, ratelimit_ms: int = 1000, ratemask: int = 0x1818, msgs_per_sec: int = 1000,
                 msgs_burst: int = 50, error_cost_ms: int = 1000, error_burst_ms: int = 5000,
                 max_peers: int = 4096, clock: Callable[[], float] = time.monotonic):
        self.ratelimit_ms = ratelimit_ms
        self.ratemask = ratemask
        self.msgs_per_sec = msgs_per_sec
        self.msgs_burst = msgs_burst
        self.error_cost_ms = error_cost_ms
        self.error_burst_ms = error_burst_ms
        self.max_peers = max_peers
        self.clock = clock
        self.peers: "OrderedDict[int, list]" = OrderedDict()  # addr -> [tokens_ms, last_ms]
        self.credit = 0
        self.stamp = None  # last global refill, ms; None = never (a full second's worth is due)
        self.limited = 0  # every refusal
        self.limited_global = 0  # ICMP_MIB_RATELIMITGLOBAL
        self.limited_host = 0  # ICMP_MIB_RATELIMITHOST
        self.limited_route = 0  # ip_error's bucket

    def _now(self) -> int:
        return int(self.clock() * 1000)

    def _peer(self, addr: int, now: int) -> list:
        p = self.peers.get(addr)
        if p is None:
            p = self.peers[addr] = [0, now - 60_000]  # inet_getpeer: rate_last = jiffies - 60*HZ
            if len(self.peers) > self.max_peers:
                self.peers.popitem(last=False)
        else:
            self.peers.move_to_end(addr)
        return p

    def is_limited_type(self, type_: int, code: int) -> bool:
        """icmpv4_mask_allow, negated: does this type/code go through the limits at all?"""
        if type_ > NR_ICMP_TYPES:
            return False
        if type_ == DEST_UNREACH and code == FRAG_NEEDED:
            return False
        return bool((1 << type_) & self.ratemask)

    def _global_allow(self, now: int) -> bool:
        if self.credit > 0:
            return True
        delta = 1000 if self.stamp is None else min(now - self.stamp, 1000)
        if delta < 20:  # HZ / 50
            return False
        incr = self.msgs_per_sec * delta // 1000
        if not incr:
            return False
        self.stamp = now
        self.credit = min(self.credit + incr, self.msgs_burst)
        return True

    def allow(self, dst: int, type_: int, code: int) -> bool:
        """May an ICMP ``type_``/``code`` go to ``dst`` now? Consumes the tokens if so."""
        if not self.is_limited_type(type_, code):
            return True
        now = self._now()
        if not self._global_allow(now):
            self.limited += 1
            self.limited_global += 1
            return False
        p = self._peer(dst, now)
        token = p[0] + now - p[1]
        p[1] = now
        cap = XRLIM_BURST_FACTOR * self.ratelimit_ms
        if token > cap:
            token = cap
        if token >= self.ratelimit_ms:
            p[0] = token - self.ratelimit_ms
            self.credit -= 1  # icmp_global_consume
            return True
        p[0] = token
        self.limited += 1
        self.limited_host += 1
        return False

    def allow_route_error(self, src: int) -> bool:
        """ip_error's own check before a route error (3/0, 3/1, 3/13) to ``src``; shares ``allow``'s tokens."""
        now = self._now()
        p = self._peer(src, now)
        token = p[0] + now - p[1]
        if token > self.error_burst_ms:
            token = self.error_burst_ms
        p[1] = now
        if token >= self.error_cost_ms:
            p[0] = token - self.error_cost_ms
            return True
        p[0] = token
        self.limited += 1
        self.limited_route += 1
        return False

    def stats(self) -> dict:
        return {"limited": self.limited, "limited_global": self.limited_global,
                "limited_host": self.limited_host, "limited_route": self.limited_route,
                "peers": len(self.peers), "global_credit": self.credit}
