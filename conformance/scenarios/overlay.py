"""Overlay scenarios: kernel-dataplane-spec.md section 6 (flannel.1) and the routing around it (section 2).

The tunnel is watched on the underlay bridge (every frame crossing br0). A
VXLAN datagram is described by ``_obs.vxlan_packets``: outer addresses as
node roles, the inner Ethernet addresses as ``vtep:NODE`` roles (each node's
own VTEP MAC, read from flannel.1 or `vswitch show stats`), the outer UDP
source port only as properties (in range, equal to another one), never as a
value: the kernel's flow hash is keyed per boot.

Datagrams "from node1" injected on the underlay (receive-side checks) carry
node1's address and a made-up outer source MAC, so the bridge learns nothing.
"""

from __future__ import annotations

from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from ..core import scenario
from ._obs import (icmp_error, inner_summary, ip_summary, probe_many, role_ip, role_mac, udp_to, vtep_roles,
                   vxlan_packets, watch_underlay)

VXLAN_PORT = 8472
FAKE_MAC = "02:00:00:00:0c:01"  # the outer source MAC of datagrams injected on the underlay


def _setup(c) -> None:
    watch_underlay(c)
    if not any(r.startswith("vtep:") for r in c.roles.values()):
        vtep_roles(c)


def _udp(c, src: str, dst: str, sport: int = 40000, dport: int = 9, size: int = 32, **ip):
    return IP(src=c.ip(src), dst=c.ip(dst), **ip) / UDP(sport=sport, dport=dport) / Raw(b"x" * size)


def _in(point: str, pred):
    """An ``until`` for probe(): some frame arriving at ``point`` satisfies ``pred`` (a scapy frame)."""
    def until(seen):
        for d, f in seen.get(point, []):
            if point != "underlay" and d == "out":
                continue
            try:
                if pred(Ether(f)):
                    return True
            except Exception:
                pass
        return False
    return until


def _udp_dport(dport: int, sport: int = None):
    def pred(f):
        return UDP in f and IP in f and f[UDP].dport == dport and (sport is None or f[UDP].sport == sport) \
            and f[IP].proto == 17 and not (f[UDP].dport == VXLAN_PORT)
    return pred


def _tunnelled(c, frames: list, match) -> list:
    """The VXLAN datagrams among ``frames`` whose inner frame satisfies ``match``: (outer, inner)."""
    return [(d, inner) for d, inner in vxlan_packets(c, frames) if match(inner)]


def _inner_udp(sport: int, dport: int = 9):
    return lambda inner: IP in inner and UDP in inner and inner[UDP].sport == sport and inner[UDP].dport == dport


def _no_sport(d: dict) -> dict:
    return {k: v for k, v in d.items() if k != "sport"}


def _one_way_headers(c, src: str, dst: str, sport: int) -> dict:
    """A UDP datagram ``src`` -> ``dst`` (pods on different nodes): the tunnel packet(s) on the underlay
    and what ``dst`` receives."""
    pkt = _udp(c, src, dst, sport=sport, ttl=64, size=48)
    seen = c.probe(src, pkt, watch=["underlay", dst], window=1.5, until=_in(dst, _udp_dport(9, sport)))
    tun = _tunnelled(c, seen["underlay"], _inner_udp(sport))
    got = [f for f in udp_to(seen[dst], 9) if f[UDP].sport == sport]
    return {"tunnel": [dict(_no_sport(d), inner=inner_summary(c, inner),
                            inner_payload_intact=bytes(inner[UDP].payload) == b"x" * 48) for d, inner in tun],
            "delivered": [dict(ip_summary(c, f), payload_intact=bytes(f[UDP].payload) == b"x" * 48) for f in got]}


@scenario("vxlan", spec="items 35, 37")
def vxlan_outer_headers(c):
    """A pod-to-pod UDP datagram each way: outer Ethernet/IP/UDP/VXLAN headers and inner frame, as roles."""
    _setup(c)
    return {"a1->b1": _one_way_headers(c, "a1", "b1", 41001), "b1->a1": _one_way_headers(c, "b1", "a1", 41002)}


@scenario("mixed", spec="items 35, 37")
def vxlan_mixed_outer_headers(c):
    """Mixed cluster: the same datagrams each way between node1 (vswitch) and node2 (kernel flannel.1)."""
    _setup(c)
    return {"a1->b1": _one_way_headers(c, "a1", "b1", 41003), "b1->a1": _one_way_headers(c, "b1", "a1", 41004)}


def _sport_of(c, src: str, pkt, match) -> int:
    seen = c.probe(src, pkt, watch=["underlay"], window=1.5,
                   until=lambda s: bool(_tunnelled(c, [Ether(f) for _, f in s["underlay"]], match)))
    tun = _tunnelled(c, seen["underlay"], match)
    return tun[0][0]["sport"] if tun else None


@scenario("vxlan", spec="item 37")
def vxlan_source_port_per_flow(c):
    """Outer UDP source port: in range, stable per flow and its reverse, distinct across flows and ICMP ids."""
    _setup(c)
    a1, b1 = c.ip("a1"), c.ip("b1")
    first = _sport_of(c, "a1", _udp(c, "a1", "b1", sport=42000), _inner_udp(42000))
    again = _sport_of(c, "a1", _udp(c, "a1", "b1", sport=42000, size=200), _inner_udp(42000))
    reverse = _sport_of(c, "b1", _udp(c, "b1", "a1", sport=9, dport=42000), _inner_udp(9, 42000))
    others = [_sport_of(c, "a1", _udp(c, "a1", "b1", sport=42000 + i), _inner_udp(42000 + i)) for i in range(1, 5)]

    def echo(ident):
        return lambda inner: IP in inner and ICMP in inner and inner[ICMP].type == 8 and inner[ICMP].id == ident
    icmp = [_sport_of(c, "a1", IP(src=a1, dst=b1) / ICMP(id=ident, seq=1) / Raw(b"p" * 16), echo(ident))
            for ident in (0x1111, 0x2222, 0x3333)]
    flows = [first] + others
    every = [p for p in [first, again, reverse] + others + icmp if p is not None]
    return {"seen": len(every), "all_in_range": all(32768 <= p <= 60999 for p in every),
            "same_flow_same_port": first is not None and first == again,
            "reverse_flow_same_port": first is not None and first == reverse,
            "distinct_ports_of_5_udp_flows": len({p for p in flows if p is not None}),
            "distinct_ports_of_3_echo_ids": len({p for p in icmp if p is not None})}


@scenario("vxlan", spec="item 37")
def vxlan_ecn_copied_to_outer(c):
    """Inner TOS -> outer TOS: ECN copied (CE sent as ECT(0)), DSCP not; the inner TOS arrives unchanged."""
    _setup(c)
    out = {}
    for i, tos in enumerate((0x00, 0x01, 0x02, 0x03, 0xB8, 0xBA)):
        sport = 43000 + i
        seen = c.probe("a1", _udp(c, "a1", "b1", sport=sport, tos=tos), watch=["underlay", "b1"], window=1.5,
                       until=_in("b1", _udp_dport(9, sport)))
        tun = _tunnelled(c, seen["underlay"], _inner_udp(sport))
        got = [f for f in udp_to(seen["b1"], 9) if f[UDP].sport == sport]
        out[f"inner_tos_{tos:#04x}"] = {"outer_tos": [d["tos"] for d, _ in tun],
                                        "tos_at_b1": [f[IP].tos for f in got]}
    return out


def _datagram(c, inner: bytes, *, src: str = None, tos: int = 0, flags: int = 0x08, vni: int = 1,
              reserved: bytes = b"\0\0\0", last: int = 0, csum: str = "good") -> Ether:
    """A VXLAN datagram to node2 from ``src`` (default node1's address), as a whole frame."""
    hdr = bytes([flags]) + reserved + vni.to_bytes(3, "big") + bytes([last])
    ip = IP(src=src or c.ip("node1"), dst=c.ip("node2"), tos=tos, ttl=64)
    udp = UDP(sport=50000, dport=VXLAN_PORT) / Raw(hdr + inner)
    if csum == "zero":
        udp.chksum = 0
    elif csum == "bad":
        good = UDP(bytes(ip / udp)[20:]).chksum  # as scapy computes it
        udp.chksum = good ^ 0x00FF
    return Ether(src=FAKE_MAC, dst=role_mac(c, "node:node2")) / ip / udp


def _inner(c, sport: int, tos: int = 0, src_vtep: str = "vtep:node1", dst_vtep: str = "vtep:node2") -> bytes:
    src_mac = role_mac(c, src_vtep) if src_vtep.startswith("vtep:") else src_vtep
    dst_mac = role_mac(c, dst_vtep) if dst_vtep.startswith("vtep:") else dst_vtep
    return bytes(Ether(src=src_mac, dst=dst_mac) /
                 IP(src=c.ip("a1"), dst=c.ip("b1"), ttl=63, tos=tos) / UDP(sport=sport, dport=9) / Raw(b"v" * 24))


def _inject(c, frame: Ether, sport: int, window: float = 0.8) -> list:
    """Send ``frame`` from the underlay; the inner UDP datagrams (source port ``sport``) b1 received."""
    seen = c.probe("underlay", frame, watch=["b1"], window=window, until=_in("b1", _udp_dport(9, sport)))
    return [f for f in udp_to(seen["b1"], 9) if f[UDP].sport == sport]


@scenario("vxlan", spec="item 38")
def vxlan_receive_checks(c):
    """Datagrams from node1's address to node2: which malformed ones are dropped (count delivered to b1)."""
    _setup(c)
    cases = {
        "well_formed": {},
        "udp_checksum_zero": {"csum": "zero"},
        "udp_checksum_bad": {"csum": "bad"},
        "flags_without_i": {"flags": 0x00},
        "flags_i_and_other": {"flags": 0x0C},
        "reserved_after_flags_set": {"reserved": b"\0\0\x01"},
        "reserved_last_byte_set": {"last": 0x01},
        "unknown_vni_2": {"vni": 2},
        "inner_src_is_own_vtep": {"inner_src": "vtep:node2"},
        "inner_dst_not_vtep": {"inner_dst": "02:00:00:00:0c:02"},
        "inner_dst_broadcast": {"inner_dst": "ff:ff:ff:ff:ff:ff"},
    }
    out = {}
    for i, (name, kw) in enumerate(cases.items()):
        sport = 44000 + i
        inner = _inner(c, sport, src_vtep=kw.pop("inner_src", "vtep:node1"),
                       dst_vtep=kw.pop("inner_dst", "vtep:node2"))
        got = _inject(c, _datagram(c, inner, **kw), sport)
        out[name] = [{"ttl": f[IP].ttl, "src": role_ip(c, f[IP].src), "eth_src": c.role(f.src)} for f in got]
    return out


@scenario("vxlan", spec="item 38")
def vxlan_decap_ecn(c):
    """Outer ECN on receive (RFC 6040): CE marks an ECN-capable inner packet CE, drops a not-ECT one."""
    _setup(c)
    cases = [("outer_ce_inner_ect0", 0x03, 0x02), ("outer_ce_inner_ect1", 0x03, 0x01),
             ("outer_ce_inner_ce", 0x03, 0x03), ("outer_ce_inner_not_ect", 0x03, 0x00),
             ("outer_ect0_inner_not_ect", 0x02, 0x00), ("outer_dscp_inner_not_ect", 0xB8, 0x00)]
    out = {}
    for i, (name, outer, inner_tos) in enumerate(cases):
        sport = 45000 + i
        got = _inject(c, _datagram(c, _inner(c, sport, tos=inner_tos), tos=outer), sport)
        out[name] = [f[IP].tos for f in got]
    return out


@scenario("vxlan", spec="item 38")
def vxlan_from_unknown_source(c):
    """A well-formed datagram to node2 from an address that is no node (ext's): delivered or not."""
    _setup(c)
    sport = 46000
    got = _inject(c, _datagram(c, _inner(c, sport), src=c.ip("ext")), sport, window=1.0)
    control = _inject(c, _datagram(c, _inner(c, sport + 1)), sport + 1, window=1.0)
    return {"from_ext_delivered": len(got), "from_node1_delivered": len(control)}


def _from_ext(c, dst_pod: str, size: int, df: bool, sport: int):
    """A UDP packet of ``size`` bytes (IP total length) from ext to a pod, sent to node1's underlay MAC."""
    return (Ether(src=c.mac("ext"), dst=role_mac(c, "node:node1")) /
            IP(src=c.ip("ext"), dst=c.ip(dst_pod), ttl=64, flags="DF" if df else 0) /
            UDP(sport=sport, dport=9) / Raw(b"m" * (size - 28)))


@scenario("vxlan", spec="items 10, 35")
def vxlan_frag_needed_at_overlay_mtu(c):
    """Overlay MTU 1450: 1450 DF bytes cross (1500 outer); 1451 DF from the underlay get 3/4 mtu 1450, unlimited."""
    _setup(c)
    seen = c.probe("a1", _udp(c, "a1", "b1", sport=47000, size=1450 - 28, flags="DF"), watch=["underlay", "b1"],
                   window=1.5, until=_in("b1", _udp_dport(9, 47000)))
    tun = _tunnelled(c, seen["underlay"], _inner_udp(47000))
    fit = {"outer_ip_len": [d["ip_len"] for d, _ in tun], "outer_df": [d["df"] for d, _ in tun],
           "delivered_len": [f[IP].len for f in udp_to(seen["b1"], 9) if f[UDP].sport == 47000]}
    seen = c.probe("ext", _from_ext(c, "b1", 1451, True, 47001), watch=["ext", "b1", "underlay"], window=1.0,
                   until=_in("ext", lambda f: ICMP in f and f[ICMP].type == 3))
    over = {"error_at_ext": icmp_error(c, seen["ext"]), "delivered": len(udp_to(seen["b1"], 9)),
            "tunnelled": len(_tunnelled(c, seen["underlay"], _inner_udp(47001)))}
    burst = [bytes(_from_ext(c, "b1", 1451, True, 47002)) for _ in range(10)]
    seen = probe_many(c, "ext", burst, watch=["ext"], window=1.5,
                      until=lambda s: sum(1 for d, f in s["ext"] if d == "in" and _is_frag_needed(f)) >= 10)
    over["errors_for_burst_of_10"] = sum(1 for f in seen["ext"] if ICMP in f and f[ICMP].type == 3
                                         and f[ICMP].code == 4)
    return {"fits": fit, "too_big": over}


def _is_frag_needed(raw: bytes) -> bool:
    # Ethernet, IPv4 (20-byte header from the node), ICMP type 3 code 4
    return len(raw) > 36 and raw[12:14] == b"\x08\x00" and raw[23] == 1 and raw[34] == 3 and raw[35] == 4


@scenario("vxlan", spec="items 10, 35")
def vxlan_fragments_non_df_at_overlay_mtu(c):
    """A 1500-byte non-DF packet from the underlay to a remote pod is fragmented for the overlay's 1450."""
    _setup(c)
    seen = c.probe("ext", _from_ext(c, "b1", 1500, False, 48000), watch=["ext", "b1", "underlay"], window=1.5,
                   until=lambda s: sum(1 for d, f in s["b1"] if d == "in" and f[-8:] == b"m" * 8) >= 2)

    def frag(f):  # by destination and payload: the source may be masqueraded (rt-underlay-to-remote-pod-...)
        return IP in f and f[IP].dst == c.ip("b1") and f[IP].proto == 17 and bytes(f[IP].payload)[-8:] == b"m" * 8

    def shape(d: dict) -> dict:
        return {k: v for k, v in d.items() if k not in ("src", "sport")}

    def cut(inner) -> dict:  # as node1 cut it. TTL and MACs are left to ``at_b1``: on the kernel side the
        # receiving node re-fragments in place (ip_do_fragment's frag_list path), rewriting the buffer the
        # underlay socket's clone still points at, so those bytes are not what crossed the wire
        d = inner_summary(c, inner)
        return {k: d[k] for k in ("dst", "proto", "df", "mf", "frag_off", "len")}

    tun = _tunnelled(c, seen["underlay"], frag)
    at_b1 = [f for f in seen["b1"] if frag(f)]
    return {"tunnel": [dict(outer_ip_len=d["ip_len"], outer_df=d["df"], inner=cut(inner))
                       for d, inner in sorted(tun, key=lambda t: t[1][IP].frag)],
            "at_b1": [shape(inner_summary(c, f)) for f in sorted(at_b1, key=lambda f: f[IP].frag)],
            "frag_needed_at_ext": len([f for f in seen["ext"] if ICMP in f and (f[ICMP].type, f[ICMP].code) == (3, 4)])}


@scenario("vxlan", spec="items 7, 8, 37")
def vxlan_ttl_across_tunnel(c):
    """TTL 1 to a remote pod: time exceeded from node1, none tunnelled; TTL 2: tunnelled, time exceeded from node2."""
    _setup(c)
    out = {}
    for ttl, sport in ((1, 49001), (2, 49002)):
        seen = c.probe("a1", _udp(c, "a1", "b1", sport=sport, ttl=ttl), watch=["a1", "b1", "underlay"], window=1.5,
                       until=_in("a1", lambda f: ICMP in f and f[ICMP].type == 11))
        tun = _tunnelled(c, seen["underlay"], _inner_udp(sport))
        back = _tunnelled(c, seen["underlay"], lambda inner: IP in inner and ICMP in inner and inner[ICMP].type == 11)
        out[f"ttl_{ttl}"] = {"error_at_a1": icmp_error(c, seen["a1"]),
                             "tunnelled_inner_ttl": [inner[IP].ttl for _, inner in tun],
                             "error_tunnelled": [dict(src=d["src"], dst=d["dst"], inner=inner_summary(c, inner))
                                                 for d, inner in back],
                             "delivered": len(udp_to(seen["b1"], 9))}
    return out


def _echo(c, src: str, dst: str, ident: int) -> dict:
    pkt = IP(src=c.ip(src), dst=c.ip(dst), ttl=64) / ICMP(id=ident, seq=7) / Raw(b"mixed-echo")
    seen = c.probe(src, pkt, watch=[src, "underlay"], window=1.5,
                   until=_in(src, lambda f: ICMP in f and f[ICMP].type == 0 and f[ICMP].id == ident))
    replies = [f for f in seen[src] if ICMP in f and f[ICMP].type == 0 and f[ICMP].id == ident]
    tun = _tunnelled(c, seen["underlay"], lambda inner: ICMP in inner and inner[ICMP].id == ident)
    return {"replies": [dict(ip_summary(c, f), seq=f[ICMP].seq, payload=bytes(f[ICMP].payload).decode())
                        for f in replies],
            "tunnel": [dict(_no_sport(d), inner=inner_summary(c, inner), icmp_type=inner[ICMP].type)
                       for d, inner in tun]}


@scenario("mixed", spec="items 36, 37")
def vxlan_mixed_ping_both_ways(c):
    """Mixed cluster: echo a1 (vswitch node1) <-> b1 (kernel node2) each way, with the tunnel packets."""
    _setup(c)
    return {"a1->b1": _echo(c, "a1", "b1", 0x4101), "b1->a1": _echo(c, "b1", "a1", 0x4102)}


@scenario("mixed", spec="items 7, 37")
def vxlan_mixed_ttl_across_tunnel(c):
    """Mixed cluster: TTL 2 each way across the tunnel: time exceeded from the receiving node."""
    _setup(c)
    out = {}
    for src, dst, sport in (("a1", "b1", 49101), ("b1", "a1", 49102)):
        seen = c.probe(src, _udp(c, src, dst, sport=sport, ttl=2), watch=[src, dst], window=1.5,
                       until=_in(src, lambda f: ICMP in f and f[ICMP].type == 11))
        out[f"{src}->{dst}"] = {"error": icmp_error(c, seen[src]), "delivered": len(udp_to(seen[dst], 9))}
    return out
