"""Software GRO for decapsulated TCP segments (what the kernel's tcp_gro_receive does).

One UDP_GRO read hands the VTEP a batch of datagrams from one sender, nearly
always consecutive MSS-sized segments of one TCP flow. Written to the pod's
TAP one by one they cost a system call each; merged back into a TSO
super-frame (virtio-net header: GSO_TCPV4, NEEDS_CSUM) they cost one, and the
pod's TCP stack acks once per super-frame, as it would behind a kernel vxlan
device with GRO on.

Merged like tcp_gro_receive merges: same addresses, ports, TOS, TTL, ACK
number and TCP options (timestamps included); sequence numbers contiguous;
only ACK (and PSH, which ends the run) set; every segment but the last exactly
the first one's size. Anything else is handed on as it came.
"""

from __future__ import annotations

import struct

from router.ipv4 import set_ip_checksum
from vswitch.packet import VNET_HDR, VNET_LEN, ZERO_VNET

from .segment import pseudo_field

ETH_IP = b"\x08\x00"
TCP_ACK, TCP_PSH = 0x10, 0x08
GSO_TCPV4, NEEDS_CSUM = 1, 1
MAX_IP_LEN = 65535
_SEQ = struct.Struct("!I")


def _tcp_segment(f):
    """(key, seq, payload offset, payload length, flags) of a mergeable segment, else None."""
    if len(f) < 54 or f[12:14] != ETH_IP or f[14] != 0x45 or f[23] != 6 or f[20] & 0x3F or f[21]:
        return None  # not IPv4/TCP without options, or a fragment
    tot = (f[16] << 8) | f[17]
    thl = (f[46] >> 4) << 2
    off = 14 + 20 + thl
    end = 14 + tot
    flags = f[47]
    if thl < 20 or end > len(f) or end <= off or flags & ~(TCP_ACK | TCP_PSH) or not flags & TCP_ACK:
        return None
    # addresses, ports, TOS, TTL, ack number, window-less header tail (options) must all match
    key = (bytes(f[0:12]), f[15], f[22], bytes(f[26:38]), bytes(f[42:46]), bytes(f[54:off]))
    return key, _SEQ.unpack_from(f, 38)[0], off, end - off, flags


def coalesce(frames: list) -> list:
    """Inner Ethernet frames in, buffers ([virtio-net header][frame]) out, runs merged."""
    out = []
    i, n = 0, len(frames)
    while i < n:
        f = frames[i]
        info = _tcp_segment(f)
        j = i + 1
        if info is not None:
            key, seq, off, mss, flags = info
            total = off - 14 + mss
            nxt = seq + mss
            while j < n and not flags & TCP_PSH:
                g = _tcp_segment(frames[j])
                if g is None or g[0] != key or g[1] != nxt & 0xFFFFFFFF or g[3] > mss or \
                        total + g[3] > MAX_IP_LEN:
                    break
                total += g[3]
                nxt += g[3]
                flags = g[4]
                j += 1
                if g[3] < mss:
                    break
        if j - i == 1:
            out.append(ZERO_VNET + bytes(f))
        else:
            out.append(_merge(frames[i:j], off, mss, total, flags))
        i = j
    return out


def _merge(run: list, off: int, mss: int, ip_len: int, flags: int) -> bytearray:
    first, last = run[0], run[-1]
    parts = [VNET_HDR.pack(NEEDS_CSUM, GSO_TCPV4, off, mss, 34, 16), first[:off]]
    parts += [f[off:off + mss] for f in run[:-1]]
    parts.append(last[off:14 + ((last[16] << 8) | last[17])])  # its payload, not any padding
    buf = bytearray(b"".join(parts))
    l3 = VNET_LEN + 14
    buf[l3 + 2:l3 + 4] = ip_len.to_bytes(2, "big")
    set_ip_checksum(buf, l3)
    buf[l3 + 33] = flags
    # NEEDS_CSUM: the field holds the pseudo-header sum the receiving stack completes
    src, dst = (int.from_bytes(buf[l3 + o:l3 + o + 4], "big") for o in (12, 16))
    buf[l3 + 36:l3 + 38] = pseudo_field(src, dst, 6, ip_len - 20).to_bytes(2, "big")
    return buf
