"""Conntrack and Service NAT as stages on netfilter's hooks (kube-proxy + flannel's ip-masq).

    ip4-input -> nat-prerouting -> ip4-route ...      conntrack, DNAT to an endpoint, un-SNAT of
                                                      replies, RELATED ICMP errors, INVALID drops
    ip4-forward -> nat-postrouting -> ip4-rewrite     confirm new entries, SNAT/masquerade,
                                                      un-DNAT of replies
    l2-learn -> nat-bridge -> l2-forward              br_netfilter: replies bridged from an endpoint
                                                      to a client pod on the same node are un-DNATed

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

from router.ipv4 import (IP_DST, IP_SRC, PROTO_ICMP, PROTO_TCP, PROTO_UDP, ip_str, is_multicast, parse_ipv4,
                         set_ip_checksum)
from router.stages import DEST_UNREACH, PORT_UNREACH, RouterStage
from vswitch.packet import ETH_DST, VNET_LEN
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
    next_names = ("ip4-route", "ip4-icmp-error")
    drops = {"l4-truncated": "TCP/UDP/ICMP header cut short",
             "no-local-endpoint": "traffic policy Local and no endpoint on this node"}

    def on_bind(self, graph) -> None:
        self.route = graph.stages["ip4-route"]
        self.icmp = graph.stages["ip4-icmp-error"]

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
            rewrite_dst(buf, l3, h, *to)
        return self.route

    def _forwarded(self, pkt, h) -> bool:
        """Forwarded (KUBE-FORWARD's business), not to or from the host stack, which tracks its own."""
        return h.dst not in self.router.local and pkt.iface is not self.router.host

    def flow_step(self, pkt):
        n, ct = pkt.note, pkt.ct
        if not n or n[0] != "existing" or ct is None or pkt.ip.hlen != 20 or pkt.l3 != L3:
            return None  # new connections, errors, untracked: per-packet decisions
        conn, d, _ = ct
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
            if ep is REJECT:
                pkt.note = ("reject", t, sp.key, how, why)
                return self.to_icmp(pkt, DEST_UNREACH, PORT_UNREACH)
            if ep is DROP:
                pkt.note = ("drop", t, sp.key, how, why)
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
        if proto == PROTO_TCP:
            conn.state = tcp.first_state(flags)
            conn.refresh(now, tcp.timeout(conn.state, nat.profile, seen_reply=False))
        elif proto == PROTO_UDP:
            conn.refresh(now, tcp.UDP_TIMEOUT)
        else:
            conn.refresh(now, tcp.ICMP_TIMEOUT)
        conn.packets[ORIGINAL] = 1
        conn.bytes[ORIGINAL] = h.total_len
        pkt.ct = (conn, ORIGINAL, True)
        pkt.note = ("new", conn, how, why)
        if conn.dnat:
            rewrite_dst(buf, l3, h, conn.endpoint[0], conn.endpoint[1])
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
        translate_error(buf, l3, conn, d)
        h.src = int.from_bytes(buf[l3 + 12:l3 + 16], "big")
        h.dst = int.from_bytes(buf[l3 + 16:l3 + 20], "big")
        return self.route

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
            rec.update(tuple=_fmt(n[1]), service=n[2], matched=n[3], why=n[4])
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
            return f"Service {rec['service']} ({rec['matched']}) {rec['why']}"
        if kind == "drop":
            return f"Service {rec['service']} ({rec['matched']}): {rec['why']}: dropped"
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
        if ct is not None and ct is not INVALID:
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
    """Confirms new entries, masquerades (kube-proxy's mark, flannel's ip-masq), un-DNATs replies."""

    name = "nat-postrouting"
    next_names = ("ip4-rewrite",)
    drops = {"invalid": "conntrack INVALID, dropped as KUBE-FORWARD does: bad TCP flags for the state, "
                        "a reply or ICMP error without a connection",
             "conntrack-full": "conntrack table full: new connection refused",
             "conntrack-clash": "another connection took this reply tuple",
             "no-masq-port": "no free source port to masquerade to"}

    def on_bind(self, graph) -> None:
        self.rewrite = graph.stages["ip4-rewrite"]

    def process(self, pkt):
        ct = pkt.ct
        if ct is None:
            return self.rewrite
        if ct is INVALID:
            return self.drop(pkt, "invalid")
        conn, d, new = ct
        h, buf, l3 = pkt.ip, pkt.buf, pkt.l3
        nat = self.nat
        if new:
            dst = h.dst
            masq = conn.mark or (nat.masquerade and nat.cluster is not None and in_cidr(h.src, nat.cluster)
                                 and not in_cidr(dst, nat.cluster) and not is_multicast(dst))
            if masq:
                src = pkt.out_iface.source_for(pkt.nh or dst)
                port = nat.masq_port(conn.orig[0], src, conn.orig[2], conn.reply[1], conn.reply[2])
                if port is None:
                    return self.drop(pkt, "no-masq-port")
                r = conn.reply
                conn.reply = (r[0], r[1], port, src, port) if r[0] == PROTO_ICMP else (r[0], r[1], r[2], src, port)
                conn.masq = True
            elif conn.reply in self.ct.table:
                # another connection already expects this reply: a null binding moves our source
                # port instead (nf_nat_alloc_null_binding -> nf_nat_l4proto_unique_tuple)
                r = conn.reply
                port = nat.masq_port(r[0], r[3], r[4], r[1], r[2])
                if port is None:
                    return self.drop(pkt, "no-masq-port")
                conn.reply = (r[0], r[1], port, r[3], port) if r[0] == PROTO_ICMP else (r[0], r[1], r[2], r[3], port)
            pkt.note = ("confirm", conn)
            if not pkt.dry_run:
                err = self.ct.add(conn)
                if err:
                    return self.drop(pkt, f"conntrack-{err}")
        to = conn.src_rewrite(d)
        if to is not None:
            rewrite_src(buf, l3, h, *to)
            if not new:
                pkt.note = ("snat" if d == ORIGINAL else "undnat", conn)
        return self.rewrite

    def flow_step(self, pkt):
        ct = pkt.ct
        if ct is None or ct is INVALID:
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
        n = pkt.note
        if not n:
            return {"action": "none"}
        conn = n[1]
        return {"action": n[0], "orig": _fmt(conn.orig), "reply": _fmt(conn.reply), "masquerade": conn.masq}

    def format_trace(self, rec: dict) -> str:
        a = rec["action"]
        if a == "none":
            return "no source rewrite"
        if a == "confirm":
            return f"ct confirmed {rec['orig']} reply {rec['reply']}" + \
                (" (masqueraded)" if rec["masquerade"] else "")
        if a == "snat":
            return f"source rewritten as {rec['reply']} expects (masquerade)"
        return f"reply source restored to the Service address ({rec['orig']})"


class NatBridge(Stage):
    """br_netfilter's part: IPv4 frames bridged between pods pass conntrack, so an endpoint's
    reply to a client pod on the same node gets its source put back to the Service address."""

    name = "nat-bridge"
    next_names = ("l2-forward",)
    drops = {"invalid": "conntrack INVALID for a tracked connection (KUBE-FORWARD)"}

    def __init__(self, nat: Nat, bridge) -> None:
        super().__init__()
        self.nat, self.ct, self.bridge = nat, nat.ct, bridge

    def on_bind(self, graph) -> None:
        self.fwd = graph.stages["l2-forward"]

    def process(self, pkt):
        buf = pkt.buf
        pkt.note = None
        if bytes(buf[ETH_DST:ETH_DST + 6]) in self.bridge.local:
            pkt.note = "router"  # the router tracks it itself
            return self.fwd
        if not self.ct.count or buf[VNET_LEN + 12] != 0x08 or buf[VNET_LEN + 13] != 0x00:
            return self.fwd
        l3 = VNET_LEN + 14
        h = parse_ipv4(buf, l3)
        if h.reason:
            return self.fwd
        t, flags = l4_tuple(buf, l3, h)
        if t is None:
            if h.proto == PROTO_ICMP and not (h.frag_off or h.mf) and buf[l3 + h.hlen] in ICMP_ERRORS:
                found = related_conn(self.ct, buf, l3, h)
                if found is not None:  # an endpoint's error to a client pod: put the Service back
                    pkt.note = ("related",) + found
                    translate_error(buf, l3, *found)
            return self.fwd
        conn, d = self.ct.lookup(t)
        if conn is None or conn.expires <= pkt.ts:
            return self.fwd
        if not pkt.dry_run and self.nat.track(conn, d, flags, pkt.ts, h.total_len) == "invalid":
            return self.drop(pkt, "invalid")
        pkt.note = (conn, d)
        to = conn.src_rewrite(d)
        if to is not None:
            rewrite_src(buf, l3, h, *to)
        return self.fwd

    def flow_step(self, pkt):
        if pkt.note == "router":
            return FLOW_NOOP  # the key's destination MAC fixes this
        if pkt.note is None:
            return _no_conn_guard(self.ct)
        if pkt.note[0] == "related":
            return None  # errors are never cached
        conn, d = pkt.note
        to = conn.src_rewrite(d)
        return established_step(conn, d, src_rewriter(*to) if to else None)

    def trace_record(self, pkt) -> dict:
        if pkt.note == "router":
            return {"tracked": False, "router": True}
        if pkt.note is None:
            return {"tracked": False}
        related = pkt.note[0] == "related"
        conn, d = pkt.note[1:] if related else pkt.note
        return {"tracked": True, "related": related, "orig": _fmt(conn.orig), "reply": _fmt(conn.reply),
                "direction": "original" if d == ORIGINAL else "reply"}

    def format_trace(self, rec: dict) -> str:
        if rec.get("router"):
            return "to the router, which tracks it"
        if not rec["tracked"]:
            return "no conntrack entry: bridged as is"
        if rec.get("related"):
            return f"ct related ICMP error for {rec['orig']} ({rec['direction']}): translated back"
        return f"ct {rec['direction']} of {rec['orig']}: source restored to the Service address"


_ADDRS_PORTS = struct.Struct("!IIHH")
L3 = VNET_LEN + 14


def established_step(conn: Conn, d: int, rewrite=None):
    """Replay for a packet whose conntrack update is a plain refresh by a fixed timeout: TCP
    ESTABLISHED and ASSURED, an assured UDP stream, or a UDP flow still unreplied (its original
    direction); None otherwise (the state table decides per packet)."""
    proto = conn.orig[0]
    if conn.dead:
        return None
    if proto == PROTO_TCP:
        if conn.state != tcp.ESTABLISHED or not conn.assured or not conn.seen_reply:
            return None
    elif proto == PROTO_UDP:
        if not conn.seen_reply and d != ORIGINAL:
            return None  # the first reply changes the entry
    else:
        return None
    timeout, l4 = conn.timeout, L3 + 20  # flows are cached for 20-byte IP headers only
    packets, nbytes = conn.packets, conn.bytes
    is_tcp, replied = proto == PROTO_TCP, conn.seen_reply
    # a replied UDP flow becomes an assured stream once older than UDP_STREAM_AGE: until then it
    # keeps the short timeout, and the first packet after that goes through the slow path
    young, created, age = proto == PROTO_UDP and replied and not conn.assured, conn.created, tcp.UDP_STREAM_AGE

    def established(buf, ts):
        if conn.dead or conn.expires <= ts or conn.seen_reply != replied or young and ts - created > age:
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


def _no_conn_guard(ct):
    """A bridged flow conntrack did not claim stays cached while its packets still match no entry."""
    table, l3 = ct.table, VNET_LEN + 14

    def untracked(buf, ts):
        if not ct.count:
            return True
        proto = buf[l3 + 9]
        if buf[l3] != 0x45 or proto not in (PROTO_TCP, PROTO_UDP):
            return False  # let the slow path decide (ICMP, options)
        if (buf[l3 + 6] & 0x3F) or buf[l3 + 7]:
            return True  # a fragment: never tracked
        src, dst, sport, dport = _ADDRS_PORTS.unpack_from(buf, l3 + 12)
        return (proto, src, sport, dst, dport) not in table
    return untracked, None
