"""The router's stages (IPv4 forwarding as net/ipv4 does it).

    l3-input -> arp-input                                   (ARP: reply, learn)
             -> ip4-input -> ip4-local  -> ip4-output       (echo reply; host port)
                          -> ip4-lookup -> ip4-forward -> ip4-rewrite -> l2-forward | port-tx
    any of them -> ip4-icmp-error -> ip4-output -> ip4-rewrite ...

An ICMP error replaces the packet that caused it and walks on, so a trace
shows the offending packet's last stage, the error built from it, and where
the error went. Locally generated frames that are not the traced packet
(ARP requests, queued packets released by a reply) go out through RouterIO.
"""

from __future__ import annotations

import struct

from vswitch.packet import (ETH_DST, ETH_P_8021AD, ETH_P_8021Q, ETH_P_ARP, ETH_P_IP, ETH_SRC, ETH_TYPE,
                            VNET_F_NEEDS_CSUM, VNET_HDR, VNET_LEN, ZERO_VNET, Packet, mac_str)
from vswitch.stage import FLOW_NOOP, Stage

from . import arp
from .fib import BLACKHOLE, PROHIBIT, UNREACHABLE
from .icmp import SUPPRESS_REASONS, build_error, echo_reply, should_send_error
from .ipv4 import (IP_DF, IP_FRAG, PARSE_REASONS, PROTO_ICMP, PROTO_TCP, PROTO_UDP, checksum, dec_ttl,
                   fragment, ip_str, is_lbcast, is_loopback, is_martian_dst, is_martian_src, is_multicast,
                   parse_ipv4, rr_option, set_ip_checksum)
from .neigh import SEND_NOW
from .router import Router

L3 = VNET_LEN + 14
ETH_IP_HDR = b"\0" * 12 + struct.pack("!H", ETH_P_IP)  # MACs filled by ip4-rewrite

# ICMP types/codes used here
TIME_EXCEEDED, DEST_UNREACH, REDIRECT = 11, 3, 5
NET_UNREACH, HOST_UNREACH, PORT_UNREACH, FRAG_NEEDED, ADMIN_PROHIBITED = 0, 1, 3, 4, 13
ICMP_NAMES = {(11, 0): "time exceeded in transit", (3, 0): "net unreachable", (3, 1): "host unreachable",
              (3, 3): "port unreachable", (3, 4): "fragmentation needed", (3, 13): "administratively prohibited",
              (5, 1): "redirect for host"}


def _own(pkt: Packet):
    """The packet's buffer, writable: a port's scratch view already is; plain bytes get copied."""
    if type(pkt.buf) is bytes:
        pkt.buf = bytearray(pkt.buf)
    return pkt.buf


def ip_packet(ip: bytes) -> bytearray:
    """A locally generated IPv4 packet as a frame buffer (MACs to be filled)."""
    return bytearray(ZERO_VNET + ETH_IP_HDR + ip)


class RouterIO:
    """Sends what the router generates outside the traced walk, and acts on neighbour decisions."""

    def __init__(self, router: Router) -> None:
        self.router = router
        self.graph = None
        self.queue_dropped = 0

    def bind(self, graph) -> None:
        self.graph = graph
        self.l2fwd = graph.stages["l2-forward"]
        self.icmp_error = graph.stages["ip4-icmp-error"]

    def emit(self, iface, buf, ts: float) -> None:
        if iface.output is not None:
            pkt = Packet(buf, None, ts)
            pkt.out_iface = iface
            self.graph.run(pkt, iface.output)
        elif iface.port is not None:
            iface.port.send(buf)
        else:
            self.graph.run(Packet(buf, iface, ts), self.l2fwd)

    def perform(self, actions: list, ts: float) -> None:
        r = self.router
        for act in actions:
            kind = act[0]
            if kind == "request":
                _, dev, target, dst_mac = act
                iface = r.ifaces[dev]
                src = self._solicit_source(dev, target) or iface.source_for(target) or 0
                self.emit(iface, bytearray(ZERO_VNET + arp.request(iface.mac, src, target, dst_mac)), ts)
            elif kind == "send":
                _, dev, mac, pkt = act
                iface = r.ifaces[dev]
                buf = pkt.buf
                buf[ETH_DST:ETH_DST + 6] = mac
                buf[ETH_SRC:ETH_SRC + 6] = iface.mac
                self.emit(iface, buf, ts)
            elif kind == "unreachable":
                pkt = act[1]
                pkt.icmp = (DEST_UNREACH, HOST_UNREACH, 0, False)
                pkt.trace = None
                self.graph.run(pkt, self.icmp_error)
            elif kind == "dropped":
                self.queue_dropped += 1

    def _solicit_source(self, dev: str, target: int):
        """arp_solicit: the newest queued packet's source when it is one of ours."""
        e = self.router.neigh.get(dev, target)
        if e is None or not e.queue:
            return None
        buf = e.queue[-1].buf
        src = int.from_bytes(buf[L3 + 12:L3 + 16], "big")
        return src if src in self.router.local else None

    def tick(self, ts: float) -> None:
        self.perform(self.router.neigh.tick(), ts)


class RouterStage(Stage):
    def __init__(self, router: Router, io: RouterIO) -> None:
        super().__init__()
        self.router = router
        self.io = io

    def to_icmp(self, pkt, type_: int, code: int, arg: int = 0, route_error: bool = False):
        """Hand the packet to ip4-icmp-error; route errors (ip_error) pay a second rate bucket."""
        pkt.icmp = (type_, code, arg, route_error)
        return self.icmp


class L3Input(RouterStage):
    """Frames for the router: checks the MAC, splits ARP from IPv4."""

    name = "l3-input"
    next_names = ("arp-input", "ip4-input")
    drops = {"other-host": "unicast to another MAC (seen in promiscuous mode)",
             "not-ip": "neither IPv4 nor ARP (IPv6, tagged with a VLAN ID, other)"}

    def on_bind(self, graph) -> None:
        self.arp = graph.stages["arp-input"]
        self.ip = graph.stages["ip4-input"]

    def process(self, pkt):
        iface = pkt.iface
        if iface is None:
            iface = pkt.iface = pkt.in_port.iface
        buf = pkt.buf
        if not buf[ETH_DST] & 1 and buf[ETH_DST:ETH_DST + 6] != iface.mac:
            return self.drop(pkt, "other-host")
        etype = (buf[ETH_TYPE] << 8) | buf[ETH_TYPE + 1]
        if (etype == ETH_P_8021Q or etype == ETH_P_8021AD) and _vid0(buf):
            buf, etype = _strip_priority_tags(pkt)
        pkt.l3 = L3
        if etype == ETH_P_IP:
            return self.ip
        if etype == ETH_P_ARP:
            return self.arp
        pkt.note = etype
        return self.drop(pkt, "not-ip")

    def flow_step(self, pkt):
        return FLOW_NOOP if pkt.ip is not None or (pkt.drop_stage is None and pkt.ethertype == ETH_P_IP) else None

    def trace_record(self, pkt) -> dict:
        return {"iface": str(pkt.iface), "type": f"0x{pkt.ethertype:04x}"}

    def format_trace(self, rec: dict) -> str:
        return f"on router interface {rec['iface']}, ethertype {rec['type']}"


def _vid0(buf) -> bool:
    """An 802.1Q/802.1ad tag with VLAN ID 0 (a priority tag) follows the MACs."""
    return len(buf) >= ETH_TYPE + 6 and not (buf[ETH_TYPE + 2] & 0x0F or buf[ETH_TYPE + 3])


def _strip_priority_tags(pkt):
    """Remove VID 0 tags, as __netif_receive_skb_core does for a device with no VLAN 0 upper
    device (cni0): the tag is taken off (skb_vlan_untag), a VID 0 tag is simply cleared, and if
    another tag follows it is untagged in turn (check_vlan_id). The priority bits are ignored.
    A tag with a VLAN ID stays (PACKET_OTHERHOST: l3-input drops it as not-ip).
    The packet gets a new buffer (a flood shares the old one); the virtio-net header's offsets
    move back with the payload, as afpacket's restore_vlan moves them forward."""
    buf = bytearray(pkt.buf)
    n = 0
    while ((buf[ETH_TYPE] << 8) | buf[ETH_TYPE + 1]) in (ETH_P_8021Q, ETH_P_8021AD) and _vid0(buf):
        del buf[ETH_TYPE:ETH_TYPE + 4]
        n += 4
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = VNET_HDR.unpack_from(buf, 0)
    if flags & VNET_F_NEEDS_CSUM:
        csum_start -= n
    if hdr_len:
        hdr_len -= n
    VNET_HDR.pack_into(buf, 0, flags, gso_type, hdr_len, gso_size, csum_start, csum_offset)
    pkt.buf = buf
    return buf, (buf[ETH_TYPE] << 8) | buf[ETH_TYPE + 1]


class ArpInput(RouterStage):
    """Answers requests for our addresses and feeds the neighbour table (arp_process)."""

    name = "arp-input"
    drops = {"arp-short": "ARP packet truncated", "arp-not-ipv4": "ARP for another hardware/protocol",
             "arp-bad-op": "ARP opcode neither request nor reply",
             "arp-bad-target": "target address is multicast or loopback (arp_process ignores it)"}

    def process(self, pkt):
        a = arp.parse(pkt.buf)
        if isinstance(a, str):
            return self.drop(pkt, a)
        # arp_process drops these before anything else, the neighbour table untouched (loopback
        # unless route_localnet, which vswitch never sets: see docs/conformance.md)
        if is_multicast(a.tpa) or is_loopback(a.tpa):
            return self.drop(pkt, "arp-bad-target")
        iface = pkt.iface
        for_us = self._for_us(iface, a)
        answer = a.op == arp.OP_REQUEST and for_us
        pkt.note = (a, answer)
        if pkt.dry_run:
            return None
        if answer:
            self.io.emit(iface, bytearray(ZERO_VNET + arp.reply(iface.mac, a)), pkt.ts)
        actions = self.router.neigh.on_arp(iface.name, a.spa, a.sha, is_reply=a.op == arp.OP_REPLY,
                                           is_gratuitous=a.gratuitous, for_us=for_us)
        self.io.perform(actions, pkt.ts)
        return None

    def _for_us(self, iface, a) -> bool:
        """Would arp_process answer a request for ``a.tpa`` from ``a.spa`` (arp_ignore=0, arp_filter=0)?"""
        r = self.router
        owner = r.local.get(a.tpa)
        if owner is not None and owner is r.host and iface is not r.host:
            # the host port's addresses (169.254.1.1) only exist on vswitch's link to the node's
            # own stack; a kernel node has no such address, so nobody else is answered for them
            owner = None
        if a.spa == 0:  # a DAD probe (RFC 5227): answered for our own addresses only
            return owner is not None
        # ip_route_input_noref(tip, sip): the sender must pass ip_route_input_slow's source checks
        # (multicast, limited broadcast, 0/8, loopback) and fib_validate_source, which refuses a
        # sender that is one of our own addresses (accept_local=0). Not on the host port: the
        # node's own stack behind it shares our addresses and asks from them.
        if is_martian_src(a.spa) or (a.spa in r.local and iface is not r.host):
            return False
        # arp_ignore=0: any of our addresses is answered on any interface
        return owner is not None or (iface.proxy_arp and not iface.on_link(a.tpa) and a.spa != a.tpa)

    def trace_record(self, pkt) -> dict:
        if not isinstance(pkt.note, tuple):
            return {}
        a, answer = pkt.note
        return {"op": "request" if a.op == 1 else "reply", "sender": ip_str(a.spa), "sha": mac_str(a.sha),
                "target": ip_str(a.tpa), "answered": answer}

    def format_trace(self, rec: dict) -> str:
        if not rec:
            return "not an Ethernet/IPv4 ARP packet"
        line = f"ARP {rec['op']} who-has {rec['target']} tell {rec['sender']} ({rec['sha']})"
        return line + (": we own it, reply sent" if rec["answered"] else "")


class Ip4Input(RouterStage):
    """Header checks (ip_rcv_core), then the PREROUTING hook if one is wired (nat), then ip4-route."""

    name = "ip4-input"
    drops = dict(PARSE_REASONS)

    def __init__(self, router: Router, io: RouterIO, after: str = "ip4-route") -> None:
        super().__init__(router, io)
        self.next_names = (after,)

    def on_bind(self, graph) -> None:
        self.next = graph.stages[self.next_names[0]]

    def process(self, pkt):
        h = pkt.ip = parse_ipv4(pkt.buf, pkt.l3)
        if h.reason:
            return self.drop(pkt, h.reason)
        return self.next

    def flow_step(self, pkt):
        h = pkt.ip
        if pkt.drop_stage is not None or h.ihl != 5:
            return None  # IP options: per-packet work
        return _header_ok, None

    def trace_record(self, pkt) -> dict:
        h = pkt.ip
        if h is None or h.reason:
            return {"valid": False}
        return {"valid": True, "src": ip_str(h.src), "dst": ip_str(h.dst), "proto": h.proto, "ttl": h.ttl,
                "len": h.total_len, "df": h.df}

    def format_trace(self, rec: dict) -> str:
        if not rec["valid"]:
            return "invalid IPv4 header"
        line = f"{rec['src']} > {rec['dst']} proto {rec['proto']} ttl {rec['ttl']} len {rec['len']}"
        return line + (" DF" if rec["df"] else "")


class Ip4Route(RouterStage):
    """Martians, then local delivery or forwarding (ip_route_input_slow)."""

    name = "ip4-route"
    next_names = ("ip4-local", "ip4-lookup")
    drops = {
        "martian-source": "source is multicast, broadcast, 0/8 or 127/8",
        "martian-destination": "destination is 0/8 or 127/8",
        "not-forwarded": "broadcast/multicast (L2 or L3) is not routed",
    }

    def on_bind(self, graph) -> None:
        self.local = graph.stages["ip4-local"]
        self.lookup = graph.stages["ip4-lookup"]

    def process(self, pkt):
        h = pkt.ip  # a PREROUTING hook that rewrites addresses updates these too
        src, dst = h.src, h.dst
        if is_martian_src(src):
            return self.drop(pkt, "martian-source")
        if is_martian_dst(dst):
            return self.drop(pkt, "martian-destination")
        r = self.router
        if dst in r.local:
            pkt.note = "local"
            return self.local
        if pkt.buf[ETH_DST] & 1 or is_multicast(dst) or is_lbcast(dst) or dst in r.broadcast:
            return self.drop(pkt, "not-forwarded")
        pkt.note = "forward"
        return self.lookup

    def flow_step(self, pkt):
        if pkt.note == "forward":
            return FLOW_NOOP  # ip4-lookup guards the routes
        if pkt.note == "local" and self.router.udp_encap:  # ip4-local caches only tunnel traffic
            r, gen = self.router, self.router.generation

            def still_local(buf, ts):
                return r.generation == gen
            return still_local, None
        return None

    def trace_record(self, pkt) -> dict:
        return {"decision": pkt.note}

    def format_trace(self, rec: dict) -> str:
        return {"local": "for one of our addresses", "forward": "not ours: forward"}.get(rec["decision"],
                                                                                         "not routed")


class Ip4Local(RouterStage):
    """Packets for our own addresses: echo replies here, the rest to the node's host stack."""

    name = "ip4-local"
    next_names = ("ip4-output", "ip4-rewrite", "ip4-icmp-error")
    drops = {"no-listener": "nothing listens here (TCP; the kernel would reset)",
             "bad-echo": "ICMP that is not a sound echo request"}

    def on_bind(self, graph) -> None:
        self.output = graph.stages["ip4-output"]
        self.rewrite = graph.stages["ip4-rewrite"]
        self.icmp = graph.stages["ip4-icmp-error"]

    def process(self, pkt):
        h = pkt.ip
        r = self.router
        host = r.host
        if h.proto == PROTO_ICMP:
            reply = echo_reply(memoryview(pkt.buf)[pkt.l3:], h.dst, ip_id=r.next_ip_id())
            if reply is not None:
                pkt.buf = ip_packet(reply)
                pkt.note = "echo-reply"
                return self.output
        if h.proto == PROTO_UDP and r.udp_encap and not h.is_fragment:  # a tunnel's port: encap_rcv
            l4 = pkt.l3 + h.hlen
            encap = r.udp_encap.get((pkt.buf[l4 + 2] << 8) | pkt.buf[l4 + 3])
            if encap is not None:
                pkt.note = "udp-encap"
                return encap
        if host is not None and pkt.iface is not host:
            pkt.out_iface, pkt.nh = host, h.dst
            pkt.note = "to-host"
            if h.proto == PROTO_UDP and pkt.buf[0] & 1 and not pkt.buf[1] & 0x7F:
                _finish_tunnelled_checksum(pkt.buf, pkt.l3 + h.hlen, pkt.l3 + h.total_len)
            return self.rewrite
        if h.proto == PROTO_UDP:
            pkt.note = "port-unreachable"
            return self.to_icmp(pkt, DEST_UNREACH, PORT_UNREACH)
        pkt.note = "no-listener"
        return self.drop(pkt, "bad-echo" if h.proto == PROTO_ICMP else "no-listener")

    def flow_step(self, pkt):
        return (_not_fragment, None) if pkt.note == "udp-encap" else None  # the rest is per-packet work

    def trace_record(self, pkt) -> dict:
        return {"action": pkt.note if isinstance(pkt.note, str) else None,
                "host": str(self.router.host) if self.router.host else None}

    def format_trace(self, rec: dict) -> str:
        return {"echo-reply": "ICMP echo request for us: answering",
                "udp-encap": "UDP to a tunnel port of ours: decapsulate",
                "to-host": f"for the node's host stack via {rec['host']}",
                "port-unreachable": "UDP to us and no host stack: port unreachable"}.get(rec["action"],
                                                                                        "nothing to deliver to")


class Ip4Lookup(RouterStage):
    """Longest-prefix match (fib_lookup); reject routes become ICMP errors (ip_error)."""

    name = "ip4-lookup"
    next_names = ("ip4-forward", "ip4-icmp-error")
    drops = {"blackhole": "blackhole route"}

    def on_bind(self, graph) -> None:
        self.forward = graph.stages["ip4-forward"]
        self.icmp = graph.stages["ip4-icmp-error"]

    def process(self, pkt):
        h = pkt.ip
        route = pkt.route = self.router.fib.lookup(h.dst)
        if route is None:
            return self.to_icmp(pkt, DEST_UNREACH, NET_UNREACH, route_error=True)
        t = route.type
        if t == BLACKHOLE:
            return self.drop(pkt, "blackhole")
        if t == UNREACHABLE:
            return self.to_icmp(pkt, DEST_UNREACH, HOST_UNREACH, route_error=True)
        if t == PROHIBIT:
            return self.to_icmp(pkt, DEST_UNREACH, ADMIN_PROHIBITED, route_error=True)
        pkt.out_iface = self.router.ifaces[route.dev]
        pkt.nh = route.gateway or h.dst
        return self.forward

    def flow_step(self, pkt):
        if pkt.out_iface is None or pkt.icmp is not None or pkt.drop_stage is not None:
            return None
        r, gen = self.router, self.router.generation

        def same_routes(buf, ts):  # routes and our addresses unchanged
            return r.generation == gen
        return same_routes, None

    def trace_record(self, pkt) -> dict:
        r = pkt.route
        if r is None:
            return {"route": None}
        return {"route": r.describe(), "type": r.type,
                "nexthop": ip_str(pkt.nh) if pkt.nh is not None and r.type == "unicast" else None}

    def format_trace(self, rec: dict) -> str:
        if rec["route"] is None:
            return "no route: net unreachable"
        line = f"route {rec['route']}"
        return line + (f" -> next hop {rec['nexthop']}" if rec.get("nexthop") else "")


class Ip4Forward(RouterStage):
    """ip_forward: TTL, MTU (frag-needed or fragment), redirects, TTL decrement; then POSTROUTING if wired."""

    name = "ip4-forward"
    drops = {"ttl-exceeded": "TTL <= 1 (time exceeded sent)",
             "frag-needed": "longer than the egress MTU with DF (frag-needed sent)",
             "gso-over-mtu": "offloaded super-frame without DF whose segments exceed the MTU",
             "redirect-new-conn": "redirect about a connection's first packet not sent (the packet is still "
                                  "forwarded; nf_nat_icmp_reply_translation drops it: NAT not set up yet)"}

    def __init__(self, router: Router, io: RouterIO, after: str = "ip4-rewrite") -> None:
        super().__init__(router, io)
        self.next_names = (after, "ip4-icmp-error")

    def on_bind(self, graph) -> None:
        self.rewrite = graph.stages[self.next_names[0]]
        self.icmp = graph.stages["ip4-icmp-error"]

    def _local_out(self, pkt) -> bool:
        """Sent by the node's own host stack from one of our addresses: locally originated on a
        kernel node (ip_output, not ip_forward), so its TTL is neither checked nor decremented."""
        r = self.router
        return pkt.iface is r.host and r.host is not None and pkt.ip.src in r.local

    def process(self, pkt):
        h = pkt.ip
        local = self._local_out(pkt)
        if h.ttl <= 1 and not local:
            self.drop_counts["ttl-exceeded"] += 1
            return self.to_icmp(pkt, TIME_EXCEEDED, 0)
        out = pkt.out_iface
        mtu = out.mtu
        buf = pkt.buf
        frags = None
        if buf[1] & 0x7F:  # a GSO super-frame: what matters is the size of each segment
            if _segment_len(buf, pkt.l3, h.hlen, h.proto) > mtu:
                if h.df:
                    self.drop_counts["frag-needed"] += 1
                    return self.to_icmp(pkt, DEST_UNREACH, FRAG_NEEDED, mtu)
                return self.drop(pkt, "gso-over-mtu")
        elif h.total_len > mtu:
            if h.df:
                self.drop_counts["frag-needed"] += 1
                return self.to_icmp(pkt, DEST_UNREACH, FRAG_NEEDED, mtu)
            frags = True
        buf = _own(pkt)
        if not pkt.dry_run and not local:
            dec_ttl(buf, pkt.l3)
        if out is pkt.iface and out.send_redirects and out.on_link(h.src) and \
                (pkt.nh == h.dst or out.on_link(pkt.nh)) and not pkt.dry_run and \
                self.router.redirects.allow(h.src):
            self._redirect(pkt)
        if h.ihl > 5 and not local and not pkt.dry_run and pkt.route is not None:  # ip_forward_finish
            _record_route(buf, pkt.l3, h.hlen, self.router.pref_src(pkt.route, h.dst))
        if frags:
            pkt.buf = fragment(buf, pkt.l3, mtu)  # a list: ip4-rewrite sends every piece
        pkt.note = ("fragmented" if frags else "forwarded", h.ttl if local else h.ttl - 1)
        return self.rewrite

    def flow_step(self, pkt):
        note, h, out = pkt.note, pkt.ip, pkt.out_iface
        if not isinstance(note, tuple) or note[0] != "forwarded":
            return None
        if out is pkt.iface and out.send_redirects and out.on_link(h.src) and (pkt.nh == h.dst or out.on_link(pkt.nh)):
            return None  # a redirect may be due: the limiter decides per packet
        mtu = out.mtu
        local = self._local_out(pkt)

        def forwardable(buf, ts):  # what process() checks, for a 20-byte header
            if buf[L3 + 8] <= 1 and not local:
                return False
            if buf[1] & 0x7F:
                return _segment_len(buf, L3, 20, buf[L3 + 9]) <= mtu
            return ((buf[L3 + 2] << 8) | buf[L3 + 3]) <= mtu
        return forwardable, (None if local else _dec_ttl)

    def _redirect(self, pkt) -> None:
        ct = pkt.ct
        if type(ct) is tuple and len(ct) == 3 and ct[2]:
            # The packet's conntrack entry is new, unconfirmed (nat-prerouting's (conn, dir, new)).
            # The kernel attaches it to the redirect as RELATED (icmp_glue_bits -> nf_ct_attach),
            # and the nat table's OUTPUT hook (nf_nat_ipv4_local_fn -> nf_nat_icmp_reply_translation)
            # drops a redirect whose entry lacks IPS_NAT_DONE_MASK: SRC_NAT_DONE only comes at
            # POSTROUTING, after ip_forward sent it. So a flow's first packet never gets a redirect
            # on a node with a nat table, while ip_rt_send_redirect has already counted it.
            self.drop_counts["redirect-new-conn"] += 1
            return
        copy = Packet(bytearray(pkt.buf), pkt.in_port, pkt.ts)
        copy.l3, copy.iface, copy.ct = pkt.l3, pkt.iface, pkt.ct  # a NAT hook drops it for NATed flows
        copy.icmp = (REDIRECT, 1, pkt.nh, False)
        self.io.graph.run(copy, self.icmp)

    def trace_record(self, pkt) -> dict:
        if isinstance(pkt.note, tuple):
            return {"action": pkt.note[0], "ttl": pkt.note[1], "egress": str(pkt.out_iface),
                    "mtu": pkt.out_iface.mtu}
        return {"action": "icmp", "icmp": list(pkt.icmp[:2]) if pkt.icmp else []}

    def format_trace(self, rec: dict) -> str:
        if rec["action"] == "icmp":
            t, c = rec["icmp"]
            return f"cannot forward: {ICMP_NAMES.get((t, c), f'icmp {t}/{c}')}"
        return f"{rec['action']} out {rec['egress']} (mtu {rec['mtu']}), ttl now {rec['ttl']}"


def _record_route(buf, l3: int, hlen: int, addr) -> None:
    """ip_forward_options for record route: the option's next free slot gets the address this
    router sends from on the egress route (ip_rt_get_source: its preferred source), the pointer
    moves on by 4 (ip_options_compile) and the header checksum is redone (ip_send_check).
    A full option stays as it is; a malformed one too (the kernel would answer ICMP 12)."""
    o = rr_option(buf, l3, hlen)
    if o is None or addr is None:
        return
    ptr = buf[o + 2]  # 1-based, from the option's first byte
    buf[o + ptr - 1:o + ptr + 3] = addr.to_bytes(4, "big")
    buf[o + 2] = ptr + 4
    set_ip_checksum(buf, l3)


def _finish_tunnelled_checksum(buf, l4: int, end: int) -> None:
    """A UDP tunnel packet (VXLAN from a kernel node) whose *inner* checksum is still pending.

    The sender's kernel leaves the inner TCP/UDP checksum to the NIC (its
    outer UDP checksum already counts it as done: local checksum offload),
    and the virtio-net header says where. A host socket gets the payload
    without that header, so the field must be filled before the host
    sees it, as skb_checksum_help would; then the outer checksum holds.
    """
    start = VNET_LEN + int.from_bytes(buf[6:8], "little")
    field = start + int.from_bytes(buf[8:10], "little")
    if start < l4 + 8 or field + 2 > end:
        return  # the pending checksum is the outer UDP one: the host stack completes it itself
    buf[field:field + 2] = checksum(memoryview(buf)[start:end]).to_bytes(2, "big")
    buf[0] = 2  # VIRTIO_NET_HDR_F_DATA_VALID: nothing pending any more


def _segment_len(buf, l3: int, hlen: int, proto: int) -> int:
    """The IP length of each segment of a GSO super-frame (headers + gso_size)."""
    off = l3 + hlen
    if proto == PROTO_TCP and len(buf) > off + 12:
        l4 = (buf[off + 12] >> 4) * 4
    elif proto == PROTO_UDP:
        l4 = 8
    else:
        l4 = 0
    return hlen + l4 + (buf[4] | (buf[5] << 8))


def _header_ok(buf, ts) -> bool:
    """parse_ipv4 finds no fault in a 20-byte header at L3 (flow cache guard).

    The checksum verifies when the header's words sum to 0xFFFF in one's
    complement, i.e. the header read as one integer is 0 mod 0xFFFF (see
    ipv4.checksum); the only other such header, all zeros, fails 0x45.
    """
    hdr = buf[L3:L3 + 20]
    if hdr[0] != 0x45:
        return False
    total = (hdr[2] << 8) | hdr[3]
    return 20 <= total <= len(buf) - L3 and int.from_bytes(hdr, "big") % 0xFFFF == 0


def _not_fragment(buf, ts) -> bool:
    """MF clear and offset 0 (flow cache guard): a fragment's "ports" are payload bytes."""
    return not buf[L3 + 6] & 0x3F and not buf[L3 + 7]


def _dec_ttl(buf, ts) -> None:
    dec_ttl(buf, L3)


class Ip4Output(RouterStage):
    """Route a packet the router itself generated (echo reply, ICMP error)."""

    name = "ip4-output"
    next_names = ("ip4-rewrite",)
    drops = {"no-route": "no usable route back for a locally generated packet"}

    def on_bind(self, graph) -> None:
        self.rewrite = graph.stages["ip4-rewrite"]

    def process(self, pkt):
        pkt.l3 = L3
        buf = pkt.buf
        dst = int.from_bytes(buf[L3 + 16:L3 + 20], "big")
        r = self.router
        if dst in r.local:  # for the node itself (e.g. an error about the host's own packet)
            if r.host is None:
                return self.drop(pkt, "no-route")
            pkt.route, pkt.out_iface, pkt.nh = None, r.host, dst
            return self.rewrite
        route = pkt.route = r.fib.lookup(dst)
        if route is None or route.dev is None:
            return self.drop(pkt, "no-route")
        out = pkt.out_iface = r.ifaces[route.dev]
        pkt.nh = route.gateway or dst
        tot = (buf[L3 + 2] << 8) | buf[L3 + 3]
        if tot > out.mtu and not (buf[L3 + IP_FRAG] << 8) & IP_DF and not buf[1] & 0x7F:  # GSO: segmented later
            pkt.buf = fragment(buf, L3, out.mtu)
        return self.rewrite

    def flow_step(self, pkt):
        if pkt.route is None or pkt.drop_stage is not None or isinstance(pkt.buf, list):
            return None  # to the host port, or fragmented: per-packet work
        r, gen, out = self.router, self.router.generation, pkt.out_iface

        def same_route_no_fragments(buf, ts):  # as process: only a DF-clear, non-GSO packet over the MTU is cut
            return r.generation == gen and (((buf[L3 + 2] << 8) | buf[L3 + 3]) <= out.mtu
                                            or buf[L3 + IP_FRAG] & 0x40 or buf[1] & 0x7F)
        return same_route_no_fragments, None

    def trace_record(self, pkt) -> dict:
        buf = pkt.buf if not isinstance(pkt.buf, list) else pkt.buf[0]
        return {"src": ip_str(int.from_bytes(buf[L3 + 12:L3 + 16], "big")),
                "dst": ip_str(int.from_bytes(buf[L3 + 16:L3 + 20], "big")),
                "route": pkt.route.describe() if pkt.route else None,
                "iface": str(pkt.out_iface) if pkt.out_iface else None}

    def format_trace(self, rec: dict) -> str:
        via = f"route {rec['route']}" if rec["route"] else f"the host port {rec['iface']}"
        return f"local {rec['src']} > {rec['dst']} via {via}"


class Ip4Rewrite(RouterStage):
    """Next-hop MAC from the neighbour table, MAC rewrite, then out (neigh_output)."""

    name = "ip4-rewrite"
    next_names = ("port-tx", "l2-forward")
    drops = {}

    def on_bind(self, graph) -> None:
        self.tx = graph.stages["port-tx"]
        self.l2fwd = graph.stages["l2-forward"]

    def process(self, pkt):
        iface, nh = pkt.out_iface, pkt.nh
        neigh = self.router.neigh
        if isinstance(pkt.buf, list):
            return self._fragments(pkt, iface, nh)
        if pkt.dry_run:
            e = neigh.get(iface.name, nh)
            mac = e.mac if e is not None else None
            if mac is None:
                pkt.note = ("would-resolve", ip_str(nh))
                return None
        else:
            mac, actions = neigh.resolve(iface.name, nh, pkt)
            if mac is None:  # queued: it outlives the port's scratch buffer, so it gets its own copy
                pkt.buf = bytearray(pkt.buf)
            if actions:
                self.io.perform(actions, pkt.ts)
            if mac is None:
                pkt.note = ("queued", ip_str(nh))
                return None
        buf = _own(pkt)
        buf[ETH_DST:ETH_DST + 6] = mac
        buf[ETH_SRC:ETH_SRC + 6] = iface.mac
        pkt.note = ("resolved", ip_str(nh), mac)
        if iface.output is not None:  # a tunnel interface: its encapsulation stage sends
            return iface.output
        if iface.port is not None:
            pkt.out_port = iface.port
            return self.tx
        pkt.in_port = iface  # onto the bridge, as if from the router's own bridge port
        return self.l2fwd

    def flow_step(self, pkt):
        note, iface = pkt.note, pkt.out_iface
        if not isinstance(note, tuple) or note[0] != "resolved":
            return None
        n, mac, macs = self.router.neigh.get(iface.name, pkt.nh), note[2], note[2] + iface.mac

        def still_resolved(buf, ts):  # resolve() would hand out the same MAC without a state change
            return n.state in SEND_NOW and n.mac == mac and n.version >= 0

        def rewrite(buf, ts):
            n.used = ts
            buf[ETH_DST:ETH_DST + 12] = macs
        return still_resolved, rewrite

    def _fragments(self, pkt, iface, nh):
        """Each fragment resolves (or queues) on its own, in offset order, as ip_do_fragment sends them."""
        pieces = pkt.buf
        pkt.buf = bytearray(pieces[0])
        pkt.note = ("fragments", ip_str(nh), len(pieces))
        if pkt.dry_run:
            return None
        neigh = self.router.neigh
        for piece in pieces:
            frag = Packet(bytearray(piece), pkt.in_port, pkt.ts)
            frag.l3 = pkt.l3
            mac, actions = neigh.resolve(iface.name, nh, frag)
            if actions:
                self.io.perform(actions, pkt.ts)
            if mac is not None:
                self.io.perform([("send", iface.name, mac, frag)], pkt.ts)
        return None

    def trace_record(self, pkt) -> dict:
        n = pkt.note
        if not isinstance(n, tuple):
            return {}
        if n[0] == "fragments":
            return {"state": "fragments", "nexthop": n[1], "count": n[2], "iface": str(pkt.out_iface)}
        rec = {"state": n[0], "nexthop": n[1], "iface": str(pkt.out_iface)}
        if n[0] == "resolved":
            rec["mac"] = mac_str(n[2])
        return rec

    def format_trace(self, rec: dict) -> str:
        if rec.get("state") == "resolved":
            return f"next hop {rec['nexthop']} is {rec['mac']} on {rec['iface']}"
        if rec.get("state") == "queued":
            return f"next hop {rec['nexthop']} unresolved on {rec['iface']}: queued, ARP request sent"
        if rec.get("state") == "fragments":
            return f"{rec['count']} fragments to next hop {rec['nexthop']} on {rec['iface']}"
        if rec.get("state") == "would-resolve":
            return f"next hop {rec['nexthop']} unresolved on {rec['iface']}: would queue and ARP (dry run)"
        return ""


class Ip4IcmpError(RouterStage):
    """Turns the packet into the ICMP error about it (__icmp_send), then routes the error
    (through a hook stage first when one is wired: nat translates errors about NATed packets)."""

    name = "ip4-icmp-error"
    drops = {r: f"no ICMP error: {text}" for r, text in SUPPRESS_REASONS} | {
        "rate-limited": "ICMP error suppressed by the rate limit",
        "no-source": "no route back to the sender to pick a source address",
    }

    def __init__(self, router: Router, io: RouterIO, after: str = "ip4-output") -> None:
        super().__init__(router, io)
        self.next_names = (after,)

    def on_bind(self, graph) -> None:
        self.output = graph.stages[self.next_names[0]]

    def process(self, pkt):
        type_, code, arg, route_error = pkt.icmp
        buf = pkt.buf
        orig = memoryview(buf)[pkt.l3:]
        why = should_send_error(orig, bool(buf[ETH_DST] & 1))
        pkt.note = None
        if why:
            return self.drop(pkt, why)
        osrc = int.from_bytes(orig[12:16], "big")
        odst = int.from_bytes(orig[16:20], "big")
        r = self.router
        if not pkt.dry_run:
            if route_error and not r.icmp.allow_route_error(osrc):
                return self.drop(pkt, "rate-limited")
            if not r.icmp.allow(osrc, type_, code):
                return self.drop(pkt, "rate-limited")
        src = r.icmp_source(osrc, odst)
        if src is None:
            return self.drop(pkt, "no-source")
        err = build_error(orig, type_, code, src, mtu=arg if code == FRAG_NEEDED else 0,
                          gateway=arg if type_ == REDIRECT else 0, ip_id=r.next_ip_id())
        pkt.note = (type_, code, ip_str(src), ip_str(osrc), len(err))
        pkt.buf = ip_packet(err)
        pkt.route = None
        return self.output

    def trace_record(self, pkt) -> dict:
        if pkt.note is None:
            return {"sent": False, "icmp": list(pkt.icmp[:2])}
        t, c, src, dst, n = pkt.note
        return {"sent": True, "type": t, "code": c, "what": ICMP_NAMES.get((t, c), ""), "src": src, "dst": dst,
                "len": n}

    def format_trace(self, rec: dict) -> str:
        if not rec["sent"]:
            return f"ICMP {rec['icmp'][0]}/{rec['icmp'][1]} not sent"
        return f"ICMP {rec['type']}/{rec['code']} ({rec['what']}) {rec['src']} > {rec['dst']}, {rec['len']} bytes"


ROUTER_STAGES = (L3Input, ArpInput, Ip4Input, Ip4Route, Ip4Local, Ip4Lookup, Ip4Forward, Ip4Output, Ip4Rewrite, Ip4IcmpError)


def add_router_stages(graph, router: Router, prerouting: str = "ip4-route",
                      postrouting: str = "ip4-rewrite", icmp_out: str = "ip4-output") -> RouterIO:
    """Add the router's stages to a node graph (before Graph.build).

    ``prerouting``/``postrouting`` name the stages that take a packet after
    ip4-input and after ip4-forward (netfilter's hooks); a hook stage hands
    it on to ip4-route / ip4-rewrite itself.
    """
    io = RouterIO(router)
    for cls in ROUTER_STAGES:
        if cls is Ip4Input:
            graph.add(cls(router, io, after=prerouting))
        elif cls is Ip4Forward:
            graph.add(cls(router, io, after=postrouting))
        elif cls is Ip4IcmpError:
            graph.add(cls(router, io, after=icmp_out))
        else:
            graph.add(cls(router, io))
    return io
