"""VXLAN inside the pipeline: the ``vxlan-encap`` and ``vxlan-decap`` stages.

This is how the kernel's own vxlan device works. It owns a UDP socket bound
to port 8472, but never reads it: ``vxlan_rcv`` is the socket's
``encap_rcv`` hook, called by the UDP layer for each datagram before any
queueing, and ``vxlan_xmit_one`` builds the outer UDP/IP headers itself
(``udp_tunnel_xmit_skb``) and hands the packet to IP output, routed like
any packet the node sends. vswitch does the same when its router owns the
underlay address (``overlay.datapath: auto`` picks it then, see
docs/config.md):

    ... ip4-rewrite -> vxlan-encap -> ip4-output -> ip4-rewrite -> port-tx (uplink)
    uplink -> ... ip4-local (UDP 8472) -> vxlan-decap -> l3-input (flannel.1) -> ...

so a tunnelled frame crosses no socket, no host port and no system call of
its own. A TCP super-frame from a pod is not cut into segments either: it
leaves as one frame whose virtio-net header says "TCPv4 inside a UDP tunnel"
(VIRTIO_NET_HDR_GSO_UDP_TUNNEL_IPV4, Linux 6.17+ TAPs), with flags and
offsets exactly as the kernel writes them when its flannel.1 hands such a
frame to a TAP; whoever needs wire-sized packets segments it (the far
kernel, or nobody when the far end is another vswitch or a kernel node
behind a veth, which both accept it whole). An egress that cannot take
tunnel GSO gets software-segmented frames (overlay.segment), as the socket
datapath sends them.

Both stages end the flow-cache flow they are on (``flow_boundary``): the
outer frame of an encapsulation, and the inner frame of a decapsulation,
walk the graph as packets of their own, and the inner frame gets its own
flow (keyed on the flannel.1 port and the inner headers).
"""

from __future__ import annotations

import struct

from router.ipv4 import IPV4_HDR, PROTO_UDP, checksum, ip_str
from vswitch.packet import (ETH_P_IP, GSO_NONE, GSO_TCPV4, GSO_UDP_L4, GSO_UDP_TUNNEL, VNET_F_DATA_VALID,
                            VNET_F_NEEDS_CSUM, VNET_F_UDP_TUNNEL_CSUM, VNET_HDR, VNET_LEN, Packet, headroom)
from vswitch.ports.base import RX_SIZE
from vswitch.stage import Stage

from . import segment, vxlan
from .vtep import DROP_REASONS, Vtep

L3 = VNET_LEN + 14
OUTER = 14 + 20 + 8 + vxlan.VXLAN_HLEN  # 50 bytes in front of the inner frame
_UDP_VX = struct.Struct("!HHHHII")
_ETH = bytes(12) + ETH_P_IP.to_bytes(2, "big")  # MACs: ip4-rewrite's job
_OUTER_TOS = tuple(vxlan.ecn_encap(0, ecn) for ecn in range(4))  # by the inner ECN field
_IP_WORDS = 0x4500 + (vxlan.OUTER_TTL << 8 | PROTO_UDP)  # the outer IP header's fixed words (tos added)


class EncapSource:
    """Where vxlan-encap's outer frames enter the graph when it sends them itself (a cached inner
    flow): through the node's receive, as if read from a port whose first stage is ip4-output, so
    that outer frames get flows of their own and captures see them (`show flows`: in_port
    vxlan-encap)."""

    kind = "encap"

    def __init__(self, entry) -> None:
        self.name, self.entry, self.index = "vxlan-encap", entry, 0


def _l4_headers_end(frame, gso: int, l4: int) -> int:
    """Offset just past the inner TCP/UDP header starting at ``l4``."""
    return l4 + (8 if gso == GSO_UDP_L4 else (frame[l4 + 12] >> 4) * 4)


class VxlanEncap(Stage):
    """flannel.1's transmit: FDB lookup, outer IPv4/UDP/VXLAN headers, then IP output."""

    name = "vxlan-encap"
    next_names = ("ip4-output",)
    flow_boundary = True
    drops = {r: t for r, t in DROP_REASONS if r in ("no-fdb", "not-ipv4")} | dict(segment.SEGMENT_DROPS)

    def __init__(self, vtep: Vtep, port, router) -> None:
        super().__init__()
        self.vtep, self.port, self.router = vtep, port, router
        self.tunnel_frames = self.software_frames = 0
        # The outer frame goes in the headroom in front of the inner one (vswitch.packet.headroom);
        # a super-frame without headroom is copied here instead: no allocation. Safe because the
        # outer walk ends before the next encapsulation, and whatever keeps a frame longer (the
        # neighbour queue, a capture) copies it first, as with a port's receive buffer.
        self._scratch = memoryview(bytearray(VNET_LEN + OUTER + RX_SIZE))

    def on_bind(self, graph) -> None:
        self.output = graph.stages["ip4-output"]
        self.source = EncapSource(self.output)
        self.deliver = None  # the node's receive (flow cache, captures); else a plain walk

    def process(self, pkt):
        out = self._encap(pkt.buf, pkt.dry_run)
        if type(out) is str:
            return self.drop(pkt, out)
        frames, pkt.note = out
        # Software segments leave in order: those before the last walk on their own, now; this
        # packet, which only goes on after we return, carries the last one.
        pkt.buf = frames[-1]
        pkt.route = pkt.out_iface = pkt.ip = pkt.ct = None
        if not pkt.dry_run:
            for earlier in frames[:-1]:
                self.graph.run(Packet(earlier, None, pkt.ts), self.output)
        return self.output

    def flow_step(self, pkt):
        if pkt.drop_stage is not None:
            return None
        counts, source = self.drop_counts, self.source
        deliver = self.deliver or (lambda src, frame, ts: self.graph.run(Packet(frame, None, ts), self.output))
        # What the flow fixes: the peer (the inner MAC is fixed by ip4-rewrite's guard), the source
        # port (the inner addresses and ports are the key's, unless a fragment hashes without ports)
        # and whether the route to the peer takes tunnel super-frames.
        dst, sport, mac = pkt.note[0], pkt.note[1], pkt.note[5]
        remotes, r, gen = self.vtep.remotes, self.router, self.router.generation
        known = (dst, sport, self._tunnel_gso_to(dst))

        def same_peer(buf, ts):
            return remotes.get(mac) == dst and r.generation == gen and not buf[L3 + 6] & 0x3F and not buf[L3 + 7]

        def encap_and_send(buf, ts):
            out = self._encap(buf, False, known)
            if type(out) is str:
                counts[out] += 1
                return
            for frame in out[0]:
                deliver(source, frame, ts)
        return same_peer, encap_and_send

    # --- the encapsulation ---------------------------------------------------
    def _encap(self, buf, dry_run: bool, known=None):
        """The outer frames for ``buf`` and a trace note, or a drop reason. ``known``: (peer, source
        port, tunnel GSO to the peer) as a cached flow fixed them."""
        vt = self.vtep
        if known is None:
            mac = bytes(buf[VNET_LEN:VNET_LEN + 6])
            dst = vt.remotes.get(mac)
            if dst is None:
                if not dry_run:
                    vt.drop("no-fdb")
                return "no-fdb"
            if buf[VNET_LEN + 12] != 0x08 or buf[VNET_LEN + 13] != 0x00:
                if not dry_run:
                    vt.drop("not-ipv4")
                return "not-ipv4"
            sport, gso_ok = vxlan.source_port(memoryview(buf)[VNET_LEN:]), None
        else:
            dst, sport, gso_ok = known
            mac = None
        frame = memoryview(buf)[VNET_LEN:]
        flags, gso_type, _, gso_size, csum_start, csum_offset = VNET_HDR.unpack_from(buf, 0)
        gso = gso_type & 0x1F
        tos = _OUTER_TOS[frame[14 + 1] & 3]  # flannel's tos 0: only ECN is carried
        src = vt.local
        room = None if dry_run else headroom(buf, OUTER)  # a dry run leaves the frame as it was
        if gso == GSO_NONE:
            frames = [self._plain(frame, flags, csum_start, csum_offset, src, dst, sport, tos, dry_run, room)]
            segs, how = 1, "none"
        elif (gso in (GSO_TCPV4, GSO_UDP_L4) and flags & VNET_F_NEEDS_CSUM and len(frame) + 36 <= 0xFFFF
              and (self._tunnel_gso_to(dst) if gso_ok is None else gso_ok)):
            end = _l4_headers_end(frame, gso, csum_start)
            segs = -(-(len(frame) - end) // gso_size) if gso_size else 1
            hdr = VNET_HDR.pack(VNET_F_NEEDS_CSUM | VNET_F_UDP_TUNNEL_CSUM, gso_type | GSO_UDP_TUNNEL, OUTER + end,
                                gso_size, OUTER + csum_start, csum_offset)
            frames = [self._frame(hdr, frame, src, dst, sport, tos, segs, "gso", dry_run, room, self._scratch)]
            how = "udp-tunnel"
        else:
            try:
                pieces = segment.segment(buf)
            except segment.SegmentError as e:
                return e.reason
            frames = [self._plain(p, 0, 0, 0, src, dst, sport, tos, dry_run) for p in pieces]
            segs, how = len(frames), "software"
        nbytes = (len(frames[0]) if len(frames) == 1 else sum(map(len, frames))) - len(frames) * (VNET_LEN + OUTER)
        if not dry_run:
            if how == "software":
                self.software_frames += 1
            elif how == "udp-tunnel":
                self.tunnel_frames += 1
            vt.tx_calls += len(frames)
            vt.tx_packets += segs
            vt.tx_bytes += nbytes
            self.port.tx_packets += segs
            self.port.tx_bytes += nbytes
        return frames, (dst, sport, tos, how, segs, mac)  # trace_record makes it readable, only when tracing

    def _tunnel_gso_to(self, dst: int) -> bool:
        """Does the underlay port towards ``dst`` take tunnel super-frames (TUN_F_UDP_TUNNEL_GSO)?"""
        r = self.router
        route = r.fib.lookup(dst)
        iface = r.ifaces.get(route.dev) if route is not None and route.dev else None
        return iface is not None and iface.port is not None and getattr(iface.port, "tunnel", False)

    def _plain(self, frame, flags: int, csum_start: int, csum_offset: int, src: int, dst: int, sport: int,
               tos: int, dry_run: bool, room=None):
        """One outer frame around one wire-sized inner frame.

        An inner checksum still pending stays pending (NEEDS_CSUM moves 50
        bytes on) and the outer UDP checksum is computed as if it were done:
        the kernel's local checksum offload (lco_csum), a sum over the headers
        only, since a completed checksum makes the inner L4 bytes sum to the
        complement of the pending field.
        """
        if flags & VNET_F_NEEDS_CSUM and not csum_start & 1:
            hdr = VNET_HDR.pack(VNET_F_NEEDS_CSUM, GSO_NONE, 0, 0, OUTER + csum_start, csum_offset)
            return self._frame(hdr, frame, src, dst, sport, tos, 1, (csum_start, csum_offset), dry_run, room)
        if flags & VNET_F_NEEDS_CSUM:  # an odd start breaks the word alignment lco_csum relies on
            frame, room = segment.segment(bytes(VNET_HDR.pack(flags, 0, 0, 0, csum_start, csum_offset)) + frame)[0], None
        return self._frame(bytes(VNET_LEN), frame, src, dst, sport, tos, 1, "full", dry_run, room)

    def _frame(self, vnet: bytes, frame, src: int, dst: int, sport: int, tos: int, segs: int, csum, dry_run: bool,
               room=None, into=None):
        """``vnet`` + outer Ethernet/IPv4/UDP/VXLAN + ``frame``: in ``room`` (``frame`` with the
        headroom in front of it: only the headers are written), else copied into ``into``, else
        into a new buffer. The outer UDP checksum: ``"gso"``, the pseudo-header sum (completed
        per segment, as udp_set_csum leaves it for GSO); a pair (csum_start, csum_offset) of a
        pending inner checksum: local checksum offload; ``"full"``."""
        vt = self.vtep
        n = len(frame)
        ulen = 8 + vxlan.VXLAN_HLEN + n
        ident = 0 if dry_run else vxlan.IDENTS.reserve(src, dst, PROTO_UDP, segs)
        size = VNET_LEN + OUTER + n
        out = room if room is not None else bytearray(size) if into is None else into[:size]
        out[:VNET_LEN] = vnet
        out[VNET_LEN:L3] = _ETH
        # The IP header checksum from the header's 16-bit words, summed here rather than read back
        # from the buffer; the sum of the addresses serves the UDP pseudo-header too.
        addrs = (src >> 16) + (src & 0xFFFF) + (dst >> 16) + (dst & 0xFFFF)
        h = _IP_WORDS + tos + 20 + ulen + ident + addrs
        h = (h & 0xFFFF) + (h >> 16)
        h = (h & 0xFFFF) + (h >> 16)
        IPV4_HDR.pack_into(out, L3, 0x45, tos, 20 + ulen, ident, 0, vxlan.OUTER_TTL, PROTO_UDP, ~h & 0xFFFF, src, dst)
        l4 = L3 + 20
        _UDP_VX.pack_into(out, l4, sport, vt.port, ulen, 0, vxlan.VXLAN_FLAG_I << 24, vt.vni << 8)
        if room is None:
            out[l4 + 16:] = frame
        pseudo = addrs + PROTO_UDP + ulen
        if csum == "gso":  # the folded pseudo-header sum, uncomplemented (segment.pseudo_field)
            c = (pseudo & 0xFFFF) + (pseudo >> 16)
            c = (c & 0xFFFF) + (c >> 16)
        elif csum == "full":
            c = checksum(memoryview(out)[l4:], pseudo) or 0xFFFF
        else:  # headers up to the inner checksum start, plus the complement of the pending field
            start, offset = csum
            pending = (frame[start + offset] << 8) | frame[start + offset + 1]
            c = checksum(memoryview(out)[l4:l4 + 16 + start], pseudo + (~pending & 0xFFFF)) or 0xFFFF
        out[l4 + 6] = c >> 8
        out[l4 + 7] = c & 0xFF
        return out

    # --- trace -----------------------------------------------------------------
    def trace_record(self, pkt) -> dict:
        if not isinstance(pkt.note, tuple):
            return {}
        dst, sport, tos, how, segs, _ = pkt.note
        vt = self.vtep
        return {"vni": vt.vni, "src": ip_str(vt.local), "dst": ip_str(dst), "sport": sport, "dport": vt.port,
                "ttl": vxlan.OUTER_TTL, "df": False, "tos": tos, "gso": how, "segments": segs}

    def format_trace(self, rec: dict) -> str:
        if not rec:
            return "not encapsulated"
        how = {"udp-tunnel": "one tunnel super-frame", "software": "segmented in software",
               "none": "one frame"}[rec["gso"]]
        return (f"vxlan vni {rec['vni']} {rec['src']}:{rec['sport']} > {rec['dst']}:{rec['dport']} ttl {rec['ttl']} "
                f"df {int(rec['df'])} tos 0x{rec['tos']:02x}, {rec['segments']} segment(s), {how}")


class VxlanDecap(Stage):
    """flannel.1's receive (vxlan_rcv as the UDP layer's encap_rcv): checks, then the inner frame
    enters the graph as if read from the flannel.1 port."""

    name = "vxlan-decap"
    flow_boundary = True
    drops = ({"unknown-peer": dict(DROP_REASONS)["unknown-peer"]} | dict(vxlan.RX_DROPS)
             | {r: t for r, t in vxlan.FRAME_DROPS if r.startswith("udp-")})

    def __init__(self, vtep: Vtep, port) -> None:
        super().__init__()
        self.vtep, self.port = vtep, port
        self.deliver = None  # the node's receive: a decapsulated frame's own flow-cache lookup

    def process(self, pkt):
        out = self._decap(pkt.buf, pkt.dry_run)
        if type(out) is str:
            return self.drop(pkt, out)
        inner, pkt.note = out
        pkt.buf, pkt.in_port, pkt.l3 = inner, self.port, 0
        pkt.iface = pkt.ip = pkt.route = pkt.nh = pkt.out_iface = pkt.ct = None
        return self.port.entry

    def flow_step(self, pkt):
        if pkt.drop_stage is not None:
            return None
        counts, port = self.drop_counts, self.port

        def decap_and_deliver(buf, ts):
            out = self._decap(buf, False)
            if type(out) is str:
                counts[out] += 1
            else:
                self.deliver(port, out[0], ts)
        return None, decap_and_deliver

    def _decap(self, buf, dry_run: bool):
        """The inner frame (a view of ``buf`` with its own virtio-net header) and a note, or a drop reason."""
        vt = self.vtep
        hlen = (buf[L3] & 0x0F) << 2
        tot = (buf[L3 + 2] << 8) | buf[L3 + 3]
        src = int.from_bytes(buf[L3 + 12:L3 + 16], "big")
        flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = VNET_HDR.unpack_from(buf, 0)
        segs = 1
        if gso_type & GSO_UDP_TUNNEL and gso_size:
            segs = -(-(len(buf) - VNET_LEN - hdr_len) // gso_size) if hdr_len else 1
        reason = None
        if not vt.accept_unknown_peers and src not in vt.peers:
            reason = "unknown-peer"
        l4 = L3 + hlen
        ulen = (buf[l4 + 4] << 8) | buf[l4 + 5]
        if reason is None:
            verify = not flags & (VNET_F_NEEDS_CSUM | VNET_F_DATA_VALID)
            dst = int.from_bytes(buf[L3 + 16:L3 + 20], "big") if verify else 0  # only the checksum needs it
            reason = vxlan.check_udp(buf, l4, L3 + tot, src, dst, verify=verify)
        outer_tos = buf[L3 + 1]
        if reason is None:
            reason = vxlan.check_payload(memoryview(buf)[l4 + 8:l4 + ulen], vnis=vt.vnis, vtep_mac=vt.mac,
                                         outer_tos=outer_tos)
        if reason is not None:
            if not dry_run:
                vt.drop(reason, segs)
                self.port.rx_drops += segs
            return reason
        inner = l4 + 16
        delta = inner - VNET_LEN  # the inner frame's offsets are this much smaller
        if flags & VNET_F_NEEDS_CSUM and csum_start >= delta + 14:
            iflags, istart = VNET_F_NEEDS_CSUM, csum_start - delta
        else:  # nothing pending inside (an outer checksum pending or none): the pod verifies
            iflags = istart = csum_offset = 0
        if gso_type & GSO_UDP_TUNNEL:
            itype, ihdr = gso_type & ~GSO_UDP_TUNNEL & ~0x40, max(hdr_len - delta, 0)
        else:
            itype = ihdr = gso_size = 0
        ce = outer_tos & 3 == vxlan.ECN_CE and (vxlan.sets_ce(buf, outer_tos, inner) if dry_run
                                                else vxlan.propagate_ce(buf, outer_tos, inner))
        vni = (buf[l4 + 12] << 16) | (buf[l4 + 13] << 8) | buf[l4 + 14]  # read before the header goes
        VNET_HDR.pack_into(buf, inner - VNET_LEN, iflags, itype, ihdr, gso_size, istart, csum_offset)
        end = l4 + ulen
        if not dry_run:
            n = end - inner
            vt.rx_packets += segs
            vt.rx_bytes += n
            self.port.rx_packets += segs
            self.port.rx_bytes += n
        return memoryview(buf)[inner - VNET_LEN:end], (src, vni, segs, ce, bool(itype))

    def trace_record(self, pkt) -> dict:
        if not isinstance(pkt.note, tuple):
            return {}
        src, vni, segs, ce, gso = pkt.note
        return {"src": ip_str(src), "vni": vni, "segments": segs, "ce": ce, "gso": gso}

    def format_trace(self, rec: dict) -> str:
        if not rec:
            return "not decapsulated"
        extra = ", outer CE copied inside" if rec["ce"] else ""
        return (f"vxlan vni {rec['vni']} from {rec['src']}: {rec['segments']} segment(s) in, "
                f"into {self.port.name}{extra}")
