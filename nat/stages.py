"""Conntrack and Service NAT as stages on netfilter's hooks (kube-proxy + flannel's ip-masq).

    ip4-input -> nat-prerouting -> ip4-route ...      conntrack, DNAT to an endpoint, un-SNAT of
                                                      replies, RELATED ICMP errors, INVALID marked
    ip4-forward -> nat-postrouting -> ip4-rewrite     FORWARD (INVALID and Services without endpoints
                                                      refused) and POSTROUTING: confirm new entries,
                                                      SNAT/masquerade, un-DNAT of replies
    nat-prerouting -> nat-bridged-dnat -> l2-forward  br_netfilter: DNATed onto the bridge it came
                                                      from, a frame is bridged, not routed
    l2-learn -> nat-bridge -> l2-forward              br_netfilter: frames bridged between pods are
                                                      tracked (INVALID dropped, replies un-DNATed)

Like the kernel, the destination is rewritten before routing and the source
after it; a new entry is only confirmed (inserted) at nat-postrouting, so a
packet that dies on the way (TTL, no route) leaves no entry behind.

Traffic for the node's own addresses that no Service claims is not tracked
here: the host stack behind the host port has its own conntrack.
"""

from __future__ import annotations

import ipaddress
import random
import struct
from typing import Optional

from router.fib import UNICAST
from router.ipv4 import (IP_DST, IP_SRC, PROTO_ICMP, PROTO_TCP, PROTO_UDP, ip_str, is_martian_src, is_multicast,
                         parse_ipv4, set_ip_checksum)
from router.neigh import SEND_NOW
from router.stages import DEST_UNREACH, PORT_UNREACH, RouterStage
from vswitch.packet import ETH_DST, VNET_LEN, mac_str
from vswitch.stage import FLOW_NOOP, Stage

from . import tcpstate as tcp
from .conntrack import ORIGINAL, REPLY, Conn, Conntrack, invert
from .rewrite import rewrite_quoted, set_addr, set_icmp_checksum, set_port
from .services import DROP, REJECT, ServiceTable, in_cidr

PORTS = struct.Struct("!HH")
ICMP_ERRORS = (3, 4, 5, 11, 12)  # quote the packet that caused them
ICMP_REDIRECT = 5
ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY = 8, 0
PORT_CLASSES = ((1, 511), (600, 1023), (1024, 65535))  # nf_nat_l4proto_unique_tuple
INVALID = ("invalid",)  # pkt.ct of a packet conntrack found INVALID
# pkt.ct of a new connection to a Service kube-proxy refuses in the filter table (REJECT without
# endpoints, DROP without a local one): decided at PREROUTING, done in FORWARD (nat-postrouting)
REJECTED, DROPPED = ("reject",), ("drop",)


def tracked(ct) -> bool:
    """pkt.ct holds (conn, direction, new), not one of the markers above."""
    return ct is not None and len(ct) == 3


class Nat:
    """The state the nat stages share: the conntrack table, the Services, the policy knobs."""

    def __init__(self, router, clock, *, node: str = "", cluster_cidr: Optional[str] = None,
                 masquerade: bool = True, scheduler: str = "random", max_entries: int = 131072,
                 profile: str = "kube-proxy", rng: Optional[random.Random] = None) -> None:
        self.router, self.clock = router, clock
        self.rng = rng or random.Random()
        self.ct = Conntrack(clock, max_entries)
        self.services = ServiceTable(node, scheduler, self.rng)
        self.cluster = ipaddress.IPv4Network(cluster_cidr) if cluster_cidr else None
        self.masquerade = masquerade
        if profile not in tcp.PROFILES:
            raise ValueError(f"unknown conntrack profile {profile!r} (profiles: {', '.join(tcp.PROFILES)})")
        self.profile = profile
        self.stale_udp_removed = 0

    def apply(self, manifests) -> int:
        return self._forget(self.services.apply(manifests.services, manifests.slices))

    def delete(self, manifests) -> int:
        return self._forget(self.services.delete(manifests.services, manifests.slices))

    def _forget(self, gone) -> int:
        """UDP entries towards endpoints that went away are removed (kube-proxy's stale-UDP cleanup),
        so the next datagram picks a live endpoint instead of vanishing into the old one."""
        n = 0
        for sp, lost in gone:
            n += self.ct.delete_where(lambda c: c.orig[0] == PROTO_UDP and c.service == sp.key
                                      and c.endpoint in lost)
        self.stale_udp_removed += n
        return n

    def tick(self, now: float) -> None:
        self.ct.expire(now)

    # --- per packet ---------------------------------------------------------
    def track(self, conn: Conn, d: int, flags: int, now: float, size: int) -> str:
        """Update an existing entry for one packet: "ok", "invalid" or "reopen" (tcpstate's caller protocol)."""
        proto = conn.orig[0]
        if proto == PROTO_TCP:
            new = tcp.next_state(conn.state, d, flags, simultaneous_open=conn.simopen)
            if new == tcp.INVALID:
                self.ct.invalid += 1
                return "invalid"
            if new != tcp.IGNORE:
                if tcp.reopens(conn.state, d, flags):
                    self.ct.remove(conn)
                    return "reopen"
                conn.assured |= tcp.assured(conn.state, new, d, conn.seen_reply)
                if tcp.refreshes(conn.state, flags, conn.seen_reply):
                    conn.refresh(now, tcp.timeout(new, self.profile, seen_reply=conn.seen_reply))
                conn.state = new
                conn.simopen |= new == tcp.SYN_SENT2
        elif proto == PROTO_UDP:
            seen = conn.seen_reply or d == REPLY
            t, assured = tcp.udp_timeout(conn.seen_reply, now - conn.created)
            conn.assured |= assured
            conn.refresh(now, t)
            conn.seen_reply = seen
        else:
            conn.refresh(now, tcp.ICMP_TIMEOUT)
        if d == REPLY:
            conn.seen_reply = True
        conn.packets[d] += 1
        conn.bytes[d] += size
        return "ok"

    def start(self, conn: Conn, flags: int, now: float, size: int) -> None:
        """A new entry's state, timeout and first packet."""
        proto = conn.orig[0]
        if proto == PROTO_TCP:
            conn.state = tcp.first_state(flags)
            conn.refresh(now, tcp.timeout(conn.state, self.profile, seen_reply=False))
        else:
            conn.refresh(now, tcp.UDP_TIMEOUT if proto == PROTO_UDP else tcp.ICMP_TIMEOUT)
        conn.packets[ORIGINAL] = 1
        conn.bytes[ORIGINAL] = size

    def local_pod(self, ip: int) -> bool:
        """In this node's pod CIDR (flannel's $POD_CIDR): the subnet of a router interface on the bridge (cni0)."""
        return any(i.port is None and i.on_link(ip) for i in self.router.ifaces.values())

    def ip_masq(self, src: int, dst: int) -> bool:
        """flannel --ip-masq (MasqRules, FLANNEL-POSTRTG), for a new connection kube-proxy did not mark:
        nothing to this node's pods; pods to the cluster as they are; pods to the outside (not multicast)
        and the outside to other nodes' pods (their replies must come back this way) masqueraded."""
        c = self.cluster
        if not self.masquerade or c is None or self.local_pod(dst):
            return False
        if in_cidr(src, c):
            return not (in_cidr(dst, c) and self.local_pod(src)) and not is_multicast(dst)
        return in_cidr(dst, c)

    def unique_reply(self, conn: Conn) -> bool:
        """nf_nat_alloc_null_binding: another connection already expects this reply, so the source port
        moves (nf_nat_l4proto_unique_tuple); False if no port is free."""
        r = conn.reply
        if r not in self.ct.table:
            return True
        port = self.masq_port(r[0], r[3], r[4], r[1], r[2])
        if port is None:
            return False
        conn.reply = (r[0], r[1], port, r[3], port) if r[0] == PROTO_ICMP else (r[0], r[1], r[2], r[3], port)
        return True

    def masq_port(self, proto: int, src: int, sport: int, dst: int, dport: int) -> Optional[int]:
        """The source port after masquerading to ``src``: the original if free, else a free one of its class."""
        table = self.ct.table

        def free(p: int) -> bool:  # the reply tuple this port would give (ICMP: the echo id both ways)
            return ((proto, dst, p, src, p) if proto == PROTO_ICMP else (proto, dst, dport, src, p)) not in table
        if free(sport):
            return sport
        lo, hi = (0, 65535) if proto == PROTO_ICMP else \
            next(((a, b) for a, b in PORT_CLASSES if a <= sport <= b), (1024, 65535))
        for _ in range(128):  # random probes, as nf_nat_l4proto_unique_tuple's bounded attempts
            p = self.rng.randint(lo, hi)
            if free(p):
                return p
        return None


def l4_tuple(buf, l3: int, h):
    """(tuple, flags or ICMP type) for a trackable packet; (None, 0) if untracked; (None, reason) if malformed."""
    if h.frag_off or h.mf:
        return None, 0  # fragments: the kernel reassembles first; vswitch leaves them untracked
    l4, proto = l3 + h.hlen, h.proto
    end = l3 + h.total_len
    if proto == PROTO_TCP:
        if end < l4 + 20:
            return None, "l4-truncated"
        sport, dport = PORTS.unpack_from(buf, l4)
        return (proto, h.src, sport, h.dst, dport), buf[l4 + 13]
    if proto == PROTO_UDP:
        if end < l4 + 8:
            return None, "l4-truncated"
        sport, dport = PORTS.unpack_from(buf, l4)
        return (proto, h.src, sport, h.dst, dport), 0
    if proto == PROTO_ICMP:
        if end < l4 + 8:
            return None, "l4-truncated"
        t = buf[l4]
        if t in (ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY):
            ident = (buf[l4 + 4] << 8) | buf[l4 + 5]
            return (proto, h.src, ident, h.dst, ident), t
        return None, 0
    return None, 0


def rewrite_addr(buf, l3: int, src: bool, ip: int, port: int) -> None:
    """Set the source or destination address and port (ICMP: the echo id), checksums updated."""
    partial = bool(buf[0] & 1)
    set_addr(buf, l3, IP_SRC if src else IP_DST, ip, partial)
    if buf[l3 + 9] in (PROTO_TCP, PROTO_UDP, PROTO_ICMP):
        set_port(buf, l3, src, port, partial)


def rewrite_dst(buf, l3: int, h, ip: int, port: int) -> None:
    rewrite_addr(buf, l3, False, ip, port)
    h.dst = ip


def rewrite_src(buf, l3: int, h, ip: int, port: int) -> None:
    rewrite_addr(buf, l3, True, ip, port)
    h.src = ip


def rewrite_src_pieces(pkt, h, ip: int, port: int) -> None:
    """rewrite_src for a packet ip4-forward already cut into fragments (the kernel fragments after
    POSTROUTING): every piece gets the address, the first also the port; the L4 checksum, there,
    covers the whole datagram and changes by the same delta."""
    l3, pieces = pkt.l3, []
    for p in pkt.buf:
        p = bytearray(p)
        partial = bool(p[0] & 1)
        set_addr(p, l3, IP_SRC, ip, partial)
        if not ((p[l3 + 6] & 0x1F) or p[l3 + 7]) and p[l3 + 9] in (PROTO_TCP, PROTO_UDP, PROTO_ICMP):
            set_port(p, l3, True, port, partial)
        pieces.append(p)
    pkt.buf = pieces
    h.src = ip


def _fmt(t: tuple) -> str:
    if t[0] == PROTO_ICMP:
        return f"icmp {ip_str(t[1])} > {ip_str(t[3])} id {t[2]}"
    name = "tcp" if t[0] == PROTO_TCP else "udp"
    return f"{name} {ip_str(t[1])}:{t[2]} > {ip_str(t[3])}:{t[4]}"


class NatStage(RouterStage):
    def __init__(self, nat: Nat, io) -> None:
        super().__init__(nat.router, io)
        self.nat = nat
        self.ct = nat.ct


class NatPrerouting(NatStage):
    """Conntrack lookup; a new connection to a Service gets its endpoint (DNAT); replies get un-SNATed."""

    name = "nat-prerouting"
    next_names = ("ip4-route", "ip4-icmp-error", "nat-bridged-dnat")
    drops = {"l4-truncated": "TCP/UDP/ICMP header cut short",
             "no-local-endpoint": "traffic policy Local and no endpoint on this node"}

    def on_bind(self, graph) -> None:
        self.route = graph.stages["ip4-route"]
        self.icmp = graph.stages["ip4-icmp-error"]
        self.bridged = graph.stages["nat-bridged-dnat"]

    def process(self, pkt):
        h, buf, l3 = pkt.ip, pkt.buf, pkt.l3
        t, flags = l4_tuple(buf, l3, h)
        if t is None:
            if isinstance(flags, str):
                return self.drop(pkt, flags)
            if h.proto == PROTO_ICMP and not (h.frag_off or h.mf) and buf[l3 + h.hlen] in ICMP_ERRORS:
                return self._related(pkt, h, buf, l3)
            pkt.note = ("untracked",)
            return self.route
        nat, now = self.nat, pkt.ts
        conn, d = self.ct.lookup(t)
        if conn is not None and conn.expires <= now:  # timed out, not yet swept
            self.ct.remove(conn)
            conn = None
        if conn is not None:
            if pkt.dry_run:
                pkt.note = ("existing", conn, d)
            else:
                verdict = nat.track(conn, d, flags, now, h.total_len)
                if verdict == "invalid" and self._forwarded(pkt, h):
                    pkt.note = ("invalid", t, conn.state)
                    return self._invalid(pkt)
                if verdict == "reopen":
                    conn = None
                else:
                    pkt.note = ("existing", conn, d)
        if conn is None:
            return self._new(pkt, h, buf, l3, t, flags, now)
        pkt.ct = (conn, d, False)
        to = conn.dst_rewrite(d)
        if to is not None:
            dst = h.dst
            rewrite_dst(buf, l3, h, *to)
            return self._bridge_or_route(pkt, h, dst)
        return self.route

    def _bridge_or_route(self, pkt, h, dst0: int):
        """br_nf_pre_routing_finish: a frame that came over the bridge and whose destination address
        PREROUTING changed is bridged, not routed, when the new destination is reached over that same
        bridge (br_nf_pre_routing_finish_bridge: TTL kept, the sender's MAC kept)."""
        iface, r = pkt.iface, self.router
        if h.dst == dst0 or iface.port is not None or pkt.buf[ETH_DST] & 1 or is_martian_src(h.src) \
                or h.dst in r.local:
            return self.route
        route = r.fib.lookup(h.dst)
        if route is None or route.type != UNICAST or route.dev != iface.name:
            return self.route
        pkt.route, pkt.out_iface, pkt.nh = route, iface, route.gateway or h.dst
        return self.bridged

    def _forwarded(self, pkt, h) -> bool:
        """Forwarded (KUBE-FORWARD's business), not to or from the host stack, which tracks its own."""
        return h.dst not in self.router.local and pkt.iface is not self.router.host

    def flow_step(self, pkt):
        n, ct = pkt.note, pkt.ct
        if n and n[0] == "untracked" and pkt.ip.hlen == 20 and not pkt.ip.is_fragment:
            # fixed by the key: Service changes flush the cache, ip4-route guards our addresses (only the
            # tunnel's traffic to us gets that far: ip4-local caches nothing else, nat-postrouting no untracked)
            return FLOW_NOOP
        if not n or n[0] != "existing" or ct is None or pkt.ip.hlen != 20 or pkt.l3 != L3:
            return None  # new connections, errors, untracked: per-packet decisions
        conn, d, _ = ct
        if not replayable(conn, d):
            return None
        to = conn.dst_rewrite(d)
        return established_step(conn, d, dst_rewriter(*to) if to else None)

    def _new(self, pkt, h, buf, l3, t, flags, now):
        nat, proto = self.nat, t[0]
        local = h.dst in self.router.local
        sp, how = nat.services.match(h.dst, proto, t[4], local) if proto != PROTO_ICMP else (None, "")
        if sp is None and (local or pkt.iface is self.router.host):
            pkt.note = ("untracked",)  # to or from the host stack, which tracks it itself
            return self.route
        if proto == PROTO_TCP:
            state = tcp.first_state(flags)
            if state == tcp.INVALID:
                self.ct.invalid += 1
                pkt.note = ("invalid", t, None)
                return self._invalid(pkt)
        elif proto == PROTO_ICMP and flags != ICMP_ECHO_REQUEST:
            self.ct.invalid += 1
            pkt.note = ("invalid", t, None)
            return self._invalid(pkt)
        conn = Conn(t, invert(t), now)
        why = None
        if sp is not None:
            client_in = in_cidr(h.src, nat.cluster)
            external = how != "clusterIP"
            ep, why = sp.choose(h.src, external, client_in, now, lambda k: self.ct.endpoint_conns.get(k, 0)) \
                if not pkt.dry_run else self._peek(sp, h, external, client_in, now)
            if ep is REJECT or ep is DROP:
                # kube-proxy refuses these in the filter table: INPUT for our own addresses (nothing
                # between here and there), FORWARD for the rest, after the TTL check and decrement
                pkt.note = ("reject" if ep is REJECT else "drop", t, sp.key, how, why, not local)
                if not local:
                    pkt.ct = REJECTED if ep is REJECT else DROPPED
                    return self.route
                if ep is REJECT:
                    return self.to_icmp(pkt, DEST_UNREACH, PORT_UNREACH)
                return self.drop(pkt, "no-local-endpoint")
            conn.service, conn.endpoint = sp.key, (ep.ip, ep.port)
            conn.reply = (proto, ep.ip, ep.port, h.src, t[2])
            # KUBE-MARK-MASQ: from outside the cluster CIDR (KUBE-SVC), external with policy Cluster
            # (KUBE-EXT), or a pod reaching itself (KUBE-SEP hairpin)
            if how == "clusterIP":
                conn.mark = nat.cluster is not None and not client_in
            else:  # policy Local keeps the client address (a pod client counts as internal)
                conn.mark = sp.svc.external_traffic_policy == "Cluster"
            conn.mark |= ep.ip == h.src
        nat.start(conn, flags, now, h.total_len)
        pkt.ct = (conn, ORIGINAL, True)
        pkt.note = ("new", conn, how, why)
        if conn.dnat:
            dst = h.dst
            rewrite_dst(buf, l3, h, conn.endpoint[0], conn.endpoint[1])
            return self._bridge_or_route(pkt, h, dst)
        return self.route

    def _peek(self, sp, h, external, client_in, now):
        """What choose() would answer, without moving a scheduler or affinity (dry run)."""
        saved = (sp.affinity.copy(), getattr(sp.scheduler, "next", None), self.nat.rng.getstate())
        try:
            return sp.choose(h.src, external, client_in, now, lambda k: self.ct.endpoint_conns.get(k, 0))
        finally:
            sp.affinity = saved[0]
            if saved[1] is not None:
                sp.scheduler.next = saved[1]
            self.nat.rng.setstate(saved[2])

    def _related(self, pkt, h, buf, l3):
        """An ICMP error: find the connection it quotes; translate quote and outer addresses back."""
        found = related_conn(self.ct, buf, l3, h)
        if found is None:
            return self._unrelated(pkt, h)
        conn, d = found
        pkt.note = ("related", conn, d)
        dst = h.dst
        translate_error(buf, l3, conn, d)
        h.src = int.from_bytes(buf[l3 + 12:l3 + 16], "big")
        h.dst = int.from_bytes(buf[l3 + 16:l3 + 20], "big")
        return self._bridge_or_route(pkt, h, dst)

    def _invalid(self, pkt):
        """INVALID goes on to routing: KUBE-FORWARD drops it after the route lookup and TTL check
        (nat-postrouting), so an unroutable or expiring packet still gets its ICMP error first."""
        pkt.ct = INVALID
        return self.route

    def _unrelated(self, pkt, h):
        if self._forwarded(pkt, h):
            self.ct.invalid += 1
            pkt.note = ("invalid", None, None)
            return self._invalid(pkt)
        pkt.note = ("untracked",)
        return self.route

    def trace_record(self, pkt) -> dict:
        n = pkt.note
        if not n:
            return {}
        kind = n[0]
        rec = {"ct": kind}
        if kind in ("new", "existing", "related"):
            conn = n[1]
            rec.update(orig=_fmt(conn.orig), reply=_fmt(conn.reply), state=conn.state)
            if kind == "existing" or kind == "related":
                rec["direction"] = "original" if n[2] == ORIGINAL else "reply"
            if kind == "new" and conn.service:
                rec.update(service=conn.service, matched=n[2], endpoint=f"{ip_str(conn.endpoint[0])}:"
                           f"{conn.endpoint[1]}", why=n[3], masquerade_mark=conn.mark)
        elif kind in ("reject", "drop"):
            rec.update(tuple=_fmt(n[1]), service=n[2], matched=n[3], why=n[4], chain="FORWARD" if n[5] else "INPUT")
        elif kind == "invalid" and n[1] is not None:
            rec.update(tuple=_fmt(n[1]), state=n[2])
        return rec

    def format_trace(self, rec: dict) -> str:
        kind = rec.get("ct")
        if kind == "untracked":
            return "untracked (not a tracked protocol, a fragment, or for the host stack)"
        if kind == "new":
            line = f"ct new {rec['orig']}"
            if "service" in rec:
                line += (f": Service {rec['service']} ({rec['matched']}) -> endpoint {rec['endpoint']}, "
                         f"{rec['why']}" + ("; marked for masquerade" if rec["masquerade_mark"] else ""))
            return line
        if kind == "existing":
            return f"ct established ({rec['direction']}) {rec['orig']} reply {rec['reply']}" + \
                (f" state {rec['state']}" if rec.get("state") else "")
        if kind == "related":
            return f"ct related ICMP error for {rec['orig']} ({rec['direction']}): translated back"
        if kind == "reject":
            return f"Service {rec['service']} ({rec['matched']}) {rec['why']} (in {rec['chain']})"
        if kind == "drop":
            return f"Service {rec['service']} ({rec['matched']}): {rec['why']}: dropped (in {rec['chain']})"
        if kind == "invalid":
            return f"ct INVALID {rec.get('tuple', 'ICMP error without a connection')}" + \
                (f" in state {rec['state']}" if rec.get("state") else "")
        return ""


def related_conn(ct, buf, l3: int, h):
    """(conn, direction) of the connection an ICMP error quotes, or None (nf_conntrack_icmpv4_error)."""
    inner = l3 + h.hlen + 8
    end = l3 + h.total_len
    if end < inner + 20 or (buf[inner] >> 4) != 4:
        return None
    ihl = (buf[inner] & 0x0F) << 2
    proto = buf[inner + 9]
    isrc = int.from_bytes(buf[inner + 12:inner + 16], "big")
    idst = int.from_bytes(buf[inner + 16:inner + 20], "big")
    if proto in (PROTO_TCP, PROTO_UDP) and end >= inner + ihl + 4:
        sport, dport = PORTS.unpack_from(buf, inner + ihl)
    elif proto == PROTO_ICMP and end >= inner + ihl + 8 and buf[inner + ihl] == ICMP_ECHO_REQUEST:
        sport = dport = (buf[inner + ihl + 4] << 8) | buf[inner + ihl + 5]
    else:
        return None
    conn, d = ct.lookup(invert((proto, isrc, sport, idst, dport)))  # the error travels against the quote
    return None if conn is None else (conn, d)


def translate_error(buf, l3: int, conn: Conn, e: int) -> None:
    """nf_nat_icmp_reply_translation for an ICMP error travelling in direction ``e`` of ``conn``.

    The quoted header becomes the packet as its sender sent it; the outer
    addresses get the manips that apply in that direction (a source rewrite
    only if the connection's other side was translated, and so on), so an
    error from a router on the way keeps its own source address.
    """
    if not (conn.dnat or conn.snat):
        return
    l4 = l3 + ((buf[l3] & 0x0F) << 2)
    end = l3 + ((buf[l3 + 2] << 8) | buf[l3 + 3])
    q = conn.orig if e == REPLY else conn.reply  # what the quoted packet's sender saw
    rewrite_quoted(buf, l4 + 8, q[1], q[2], q[3], q[4], end)
    tgt = conn.target(e)
    src_manip = conn.dnat if e == REPLY else conn.snat
    dst_manip = conn.snat if e == REPLY else conn.dnat
    if src_manip:
        buf[l3 + 12:l3 + 16] = tgt[1].to_bytes(4, "big")
    if dst_manip:
        buf[l3 + 16:l3 + 20] = tgt[3].to_bytes(4, "big")
    set_ip_checksum(buf, l3)
    set_icmp_checksum(buf, l4, end)


class NatIcmpError(NatStage):
    """An ICMP error the router made about a tracked packet is RELATED to its connection (nf_ct_attach):
    translated back so the sender recognises its own packet (a masqueraded pod gets its error)."""

    name = "nat-icmp-error"
    next_names = ("ip4-output",)
    drops = {"redirect-nat": "ICMP redirect about a NATed connection (nf_nat_icmp_reply_translation drops it)"}

    def on_bind(self, graph) -> None:
        self.output = graph.stages["ip4-output"]

    def process(self, pkt):
        ct, pkt.ct = pkt.ct, None
        if tracked(ct):
            conn, d, _ = ct
            buf, l3 = pkt.buf, VNET_LEN + 14
            if buf[l3 + 20] == ICMP_REDIRECT and (conn.dnat or conn.snat):
                # the client would talk to the endpoint directly, past the translation
                return self.drop(pkt, "redirect-nat")
            e = REPLY if d == ORIGINAL else ORIGINAL
            quoted_src = bytes(buf[l3 + 20 + 8 + 12:l3 + 20 + 8 + 16])
            if e == REPLY and conn.masq and quoted_src == conn.reply[3].to_bytes(4, "big"):
                # about a packet already masqueraded (a failed neighbour, after SNAT): the kernel
                # routes the error to that local source and takes it as the error's source too
                buf[l3 + 12:l3 + 16] = quoted_src
            translate_error(buf, l3, conn, e)
            pkt.note = conn
        return self.output

    def trace_record(self, pkt) -> dict:
        return {"related": _fmt(pkt.note.orig)} if pkt.note is not None else {}

    def format_trace(self, rec: dict) -> str:
        return f"related to {rec['related']}: translated back" if rec else "not about a tracked packet"


class NatPostrouting(NatStage):
    """FORWARD (KUBE-FORWARD's INVALID drop, kube-proxy's REJECT/DROP of Services without endpoints)
    and POSTROUTING: confirms new entries, masquerades (kube-proxy's mark, flannel's ip-masq),
    un-DNATs replies."""

    name = "nat-postrouting"
    next_names = ("ip4-rewrite", "ip4-icmp-error")
    drops = {"invalid": "conntrack INVALID, dropped as KUBE-FORWARD does: bad TCP flags for the state, "
                        "a reply or ICMP error without a connection",
             "no-local-endpoint": "traffic policy Local and no endpoint on this node",
             "conntrack-full": "conntrack table full: new connection refused",
             "conntrack-clash": "another connection took this reply tuple",
             "no-masq-port": "no free source port to masquerade to"}

    def on_bind(self, graph) -> None:
        self.next = graph.stages[self.next_names[0]]
        self.icmp = graph.stages["ip4-icmp-error"]

    def process(self, pkt):
        ct = pkt.ct
        if ct is None:
            return self.next
        if ct is INVALID:
            return self.drop(pkt, "invalid")
        if ct is REJECTED:  # the quote shows the TTL ip_forward already decremented
            pkt.note = ("reject",)
            if isinstance(pkt.buf, list):  # already fragmented: quote the first piece (its header says so)
                pkt.buf = bytearray(pkt.buf[0])
            return self.to_icmp(pkt, DEST_UNREACH, PORT_UNREACH)
        if ct is DROPPED:
            return self.drop(pkt, "no-local-endpoint")
        why = self.post(pkt, ct)
        return self.drop(pkt, why) if why else self.next

    def post(self, pkt, ct) -> Optional[str]:
        """POSTROUTING for a tracked packet: confirm a new entry (masquerading it first if due),
        rewrite the source as the entry says; a drop reason or None."""
        conn, d, new = ct
        h, buf, l3 = pkt.ip, pkt.buf, pkt.l3
        nat = self.nat
        if new:
            if conn.mark or nat.ip_masq(h.src, h.dst):
                src = pkt.out_iface.source_for(pkt.nh or h.dst)
                port = nat.masq_port(conn.orig[0], src, conn.orig[2], conn.reply[1], conn.reply[2])
                if port is None:
                    return "no-masq-port"
                r = conn.reply
                conn.reply = (r[0], r[1], port, src, port) if r[0] == PROTO_ICMP else (r[0], r[1], r[2], src, port)
                conn.masq = True
            elif not nat.unique_reply(conn):
                return "no-masq-port"
            pkt.note = ("confirm", conn)
            if not pkt.dry_run:
                err = self.ct.add(conn)
                if err:
                    return f"conntrack-{err}"
        to = conn.src_rewrite(d)
        if to is not None:
            if isinstance(buf, list):
                rewrite_src_pieces(pkt, h, *to)
            else:
                rewrite_src(buf, l3, h, *to)
            if not new:
                pkt.note = ("snat" if d == ORIGINAL else "undnat", conn)
        return None

    def flow_step(self, pkt):
        ct = pkt.ct
        if not tracked(ct):
            return None
        conn, d, new = ct
        if new:
            return None
        to = conn.src_rewrite(d)
        if to is None:
            return FLOW_NOOP
        rewrite = src_rewriter(*to)
        return None, lambda buf, ts: rewrite(buf)

    def trace_record(self, pkt) -> dict:
        return self._record(pkt.note)

    @staticmethod
    def _record(n) -> dict:
        if not n:
            return {"action": "none"}
        if n[0] == "reject":
            return {"action": "reject"}
        conn = n[1]
        return {"action": n[0], "orig": _fmt(conn.orig), "reply": _fmt(conn.reply), "masquerade": conn.masq}

    def format_trace(self, rec: dict) -> str:
        a = rec["action"]
        if a == "none":
            return "no source rewrite"
        if a == "reject":
            return "Service without endpoints: REJECT (FORWARD), ICMP port unreachable"
        if a == "confirm":
            return f"ct confirmed {rec['orig']} reply {rec['reply']}" + \
                (" (masqueraded)" if rec["masquerade"] else "")
        if a == "snat":
            return f"source rewritten as {rec['reply']} expects (masquerade)"
        return f"reply source restored to the Service address ({rec['orig']})"


class NatBridgedDnat(NatPostrouting):
    """br_netfilter's bridged DNAT (br_nf_pre_routing_finish_bridge): a packet nat-prerouting DNATed
    to an address on the bridge it came from is not routed. It keeps its TTL and its sender's MAC,
    gets the neighbour's MAC as destination (neigh_hh_bridge), passes FORWARD and POSTROUTING
    (confirm, masquerade, un-DNAT) and is bridged from its own ingress port, hairpin rules and all.
    Unlike the kernel, a frame queued for ARP leaves with the gateway's MAC as source."""

    name = "nat-bridged-dnat"
    next_names = ("l2-forward",)
    drops = {k: v for k, v in NatPostrouting.drops.items() if k.startswith(("conntrack", "no-masq"))}

    def process(self, pkt):
        ct = pkt.ct
        pkt.note = None
        why = self.post(pkt, ct) if tracked(ct) else None
        if why:
            return self.drop(pkt, why)
        post = pkt.note
        iface, nh = pkt.out_iface, pkt.nh
        neigh = self.router.neigh
        if pkt.dry_run:
            e = neigh.get(iface.name, nh)
            mac = e.mac if e is not None else None
        else:
            mac, actions = neigh.resolve(iface.name, nh, pkt)
            if mac is None:  # queued: it outlives the port's scratch buffer
                pkt.buf = bytearray(pkt.buf)
            if actions:
                self.io.perform(actions, pkt.ts)
        pkt.note = (post, ip_str(nh), mac)
        if mac is None:
            return None
        pkt.buf[ETH_DST:ETH_DST + 6] = mac
        return self.next

    def flow_step(self, pkt):
        post = NatPostrouting.flow_step(self, pkt)
        mac = pkt.note[2] if isinstance(pkt.note, tuple) else None
        if post is None or mac is None:
            return None
        r, gen = self.router, self.router.generation
        n = r.neigh.get(pkt.out_iface.name, pkt.nh)
        post_action = post[1]

        def same(buf, ts):  # routes unchanged; resolve() would hand out the same MAC without a state change
            return r.generation == gen and n.state in SEND_NOW and n.mac == mac and n.version >= 0

        def act(buf, ts):
            if post_action is not None:
                post_action(buf, ts)
            n.used = ts
            buf[ETH_DST:ETH_DST + 6] = mac
        return same, act

    def trace_record(self, pkt) -> dict:
        n = pkt.note
        if not isinstance(n, tuple) or len(n) != 3:
            return {}
        rec = self._record(n[0])
        rec.update(nexthop=n[1], mac=mac_str(n[2]) if n[2] else None, iface=str(pkt.out_iface))
        return rec

    def format_trace(self, rec: dict) -> str:
        if not rec:
            return ""
        line = f"bridged, not routed (br_netfilter DNAT onto {rec['iface']}): "
        if rec["mac"] is None:
            line += f"{rec['nexthop']} unresolved: queued for ARP"
        else:
            line += f"{rec['nexthop']} is {rec['mac']}, TTL and source MAC kept"
        return line + "; " + NatPostrouting.format_trace(self, rec)


class NatBridge(Stage):
    """br_netfilter's part (br_nf_pre_routing, bridge-nf-call-iptables=1): IPv4 frames bridged
    between pods pass conntrack as routed ones do. New connections get entries, INVALID is dropped
    (KUBE-FORWARD), and an endpoint's reply to a client pod on the same node gets its source put
    back to the Service address. Frames to the router's MAC are left to nat-prerouting; broadcast
    and multicast frames are not tracked."""

    name = "nat-bridge"
    next_names = ("l2-forward",)
    drops = {"invalid": "conntrack INVALID (KUBE-FORWARD): bad TCP flags for the state, a reply or ICMP "
                        "error without a connection",
             "l4-truncated": "TCP/UDP/ICMP header cut short (conntrack INVALID)",
             "conntrack-full": "conntrack table full: new connection refused",
             "no-masq-port": "no free source port for a clashing reply tuple"}

    def __init__(self, nat: Nat, bridge) -> None:
        super().__init__()
        self.nat, self.ct, self.bridge = nat, nat.ct, bridge

    def on_bind(self, graph) -> None:
        self.fwd = graph.stages["l2-forward"]

    def process(self, pkt):
        buf = pkt.buf
        pkt.note = None
        if buf[ETH_DST] & 1 or buf[VNET_LEN + 12] != 0x08 or buf[VNET_LEN + 13] != 0x00:
            return self.fwd
        if bytes(buf[ETH_DST:ETH_DST + 6]) in self.bridge.local:
            pkt.note = "router"  # the router tracks it itself
            return self.fwd
        h = parse_ipv4(buf, L3)
        if h.reason:
            pkt.note = "bad"
            return self.fwd
        t, flags = l4_tuple(buf, L3, h)
        if t is None:
            if isinstance(flags, str):
                self.ct.invalid += 1
                return self.drop(pkt, flags)
            if h.proto == PROTO_ICMP and not (h.frag_off or h.mf) and buf[L3 + h.hlen] in ICMP_ERRORS:
                found = related_conn(self.ct, buf, L3, h)
                if found is None:
                    self.ct.invalid += 1
                    return self.drop(pkt, "invalid")
                pkt.note = ("related",) + found  # e.g. an endpoint's error to a client pod: the Service back
                translate_error(buf, L3, *found)
                return self.fwd
            pkt.note = "untracked"
            return self.fwd
        nat, now = self.nat, pkt.ts
        conn, d = self.ct.lookup(t)
        if conn is not None and conn.expires <= now:  # timed out, not yet swept
            if not pkt.dry_run:
                self.ct.remove(conn)
            conn = None
        if conn is not None and not pkt.dry_run:
            verdict = nat.track(conn, d, flags, now, h.total_len)
            if verdict == "invalid":
                return self.drop(pkt, "invalid")
            if verdict == "reopen":
                conn = None
        if conn is None:
            return self._new(pkt, h, buf, t, flags, now)
        pkt.note = (conn, d)
        to = conn.dst_rewrite(d)  # a reply to a bridged connection whose source port had to move
        if to is not None:
            rewrite_dst(buf, L3, h, *to)
        to = conn.src_rewrite(d)
        if to is not None:
            rewrite_src(buf, L3, h, *to)
        return self.fwd

    def _new(self, pkt, h, buf, t, flags, now):
        """A new bridged connection, confirmed at once (no NAT rule applies between pods on one bridge)."""
        nat = self.nat
        if t[0] == PROTO_TCP and tcp.first_state(flags) == tcp.INVALID or \
                t[0] == PROTO_ICMP and flags != ICMP_ECHO_REQUEST:
            self.ct.invalid += 1
            return self.drop(pkt, "invalid")
        conn = Conn(t, invert(t), now)
        nat.start(conn, flags, now, h.total_len)
        pkt.note = ("new", conn)
        if pkt.dry_run:
            return self.fwd
        if not nat.unique_reply(conn):
            return self.drop(pkt, "no-masq-port")
        if self.ct.add(conn):  # a clash is impossible here: both tuples were just looked up
            return self.drop(pkt, "conntrack-full")
        to = conn.src_rewrite(ORIGINAL)
        if to is not None:
            rewrite_src(buf, L3, h, *to)
        return self.fwd

    def flow_step(self, pkt):
        n = pkt.note
        if n == "router":
            return FLOW_NOOP  # the key's destination MAC fixes this
        if n == "untracked":
            return _untracked_guard, None
        if not isinstance(n, tuple) or n[0] in ("related", "new") or pkt.buf[L3] != 0x45:
            return None  # errors, new connections and IP options are decided per packet
        conn, d = n
        if not replayable(conn, d):
            return None
        dst, src = conn.dst_rewrite(d), conn.src_rewrite(d)
        rewrite = src_rewriter(*src) if src else None
        if dst:
            rewrite = _both(dst_rewriter(*dst), rewrite)
        return established_step(conn, d, rewrite)

    def trace_record(self, pkt) -> dict:
        n = pkt.note
        if n == "router":
            return {"tracked": False, "router": True}
        if not isinstance(n, tuple):
            return {"tracked": False}
        kind = n[0] if isinstance(n[0], str) else "existing"
        conn, d = (n[1], ORIGINAL) if kind == "new" else n[1:] if kind == "related" else n
        return {"tracked": True, "ct": kind, "orig": _fmt(conn.orig), "reply": _fmt(conn.reply),
                "direction": "original" if d == ORIGINAL else "reply",
                "rewrite": bool(conn.src_rewrite(d) or conn.dst_rewrite(d))}

    def format_trace(self, rec: dict) -> str:
        if rec.get("router"):
            return "to the router, which tracks it"
        if not rec["tracked"]:
            return "not tracked (not IPv4, a flood, a fragment or another protocol): bridged as is"
        if rec["ct"] == "related":
            return f"ct related ICMP error for {rec['orig']} ({rec['direction']}): translated back"
        line = f"ct {'new' if rec['ct'] == 'new' else rec['direction']} {rec['orig']}"
        return line + (": addresses/ports rewritten as the entry says" if rec["rewrite"] else "")


L3 = VNET_LEN + 14


def replayable(conn: Conn, d: int) -> bool:
    """Is the conntrack update for a packet of ``conn`` in direction ``d`` a plain refresh by a
    fixed timeout: TCP ESTABLISHED and ASSURED, an assured UDP stream, or a UDP flow still
    unreplied (its original direction)? Otherwise the state table decides per packet."""
    proto = conn.orig[0]
    if conn.dead:
        return False
    if proto == PROTO_TCP:
        # nor before its third packet this way: a connection that ends sooner is not worth a flow
        return conn.state == tcp.ESTABLISHED and conn.assured and conn.seen_reply and conn.packets[d] >= 3
    if proto == PROTO_UDP:
        return conn.seen_reply or d == ORIGINAL  # the first reply changes the entry
    return False


def established_step(conn: Conn, d: int, rewrite=None):
    """Replay (guard, action) for a packet whose conntrack update is a plain refresh (see
    replayable); None otherwise."""
    if not replayable(conn, d):
        return None
    proto = conn.orig[0]
    timeout, l4 = conn.timeout, L3 + 20  # flows are cached for 20-byte IP headers only
    packets, nbytes = conn.packets, conn.bytes
    is_tcp, replied = proto == PROTO_TCP, conn.seen_reply
    # a replied UDP flow becomes an assured stream once older than UDP_STREAM_AGE: until then it
    # keeps the short timeout, and the first packet after that goes through the slow path
    young, created, age = proto == PROTO_UDP and replied and not conn.assured, conn.created, tcp.UDP_STREAM_AGE

    def established(buf, ts):
        if buf[L3] != 0x45 or conn.dead or conn.expires <= ts or conn.seen_reply != replied or \
                young and ts - created > age:
            return False
        # ACK without SYN/FIN/RST keeps ESTABLISHED; anything else goes through the state table
        return not is_tcp or (buf[l4 + 13] & 0x17) == 0x10 and conn.state == tcp.ESTABLISHED

    def refresh(buf, ts):
        conn.expires = ts + timeout
        packets[d] += 1
        nbytes[d] += (buf[L3 + 2] << 8) | buf[L3 + 3]
        if rewrite is not None:
            rewrite(buf)
    return established, refresh


def dst_rewriter(ip: int, port: int):
    return lambda buf: rewrite_addr(buf, L3, False, ip, port)


def src_rewriter(ip: int, port: int):
    return lambda buf: rewrite_addr(buf, L3, True, ip, port)


def _both(first, second):
    return first if second is None else lambda buf: (first(buf), second(buf))


def _untracked_guard(buf, ts) -> bool:
    """A bridged flow conntrack does not track (another protocol, a fragment) stays so."""
    if buf[L3 + 9] not in (PROTO_TCP, PROTO_UDP, PROTO_ICMP):
        return True
    return bool((buf[L3 + 6] & 0x3F) or buf[L3 + 7])
