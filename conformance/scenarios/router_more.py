"""More router scenarios: kernel-dataplane-spec.md sections 2 and 3 (redirects, ARP failure, ICMP rate
limits, malformed headers and IP options, local delivery).

Not here: fragmentation of a non-DF packet, since every link of the hostgw topology has MTU 1500 and
nothing can send more than that; the vxlan topology has the MTU step (1500 underlay -> 1450 overlay),
see ``vxlan-fragments-non-df-at-overlay-mtu`` in overlay.py.
"""

from __future__ import annotations

import struct
import time

from scapy.layers.inet import ICMP, IP, UDP, IPerror
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Raw

from ..core import scenario
from ._obs import icmp_error, probe_many, role_ip, role_mac, udp_to, watch_underlay


def _udp(c, src: str, dst: str, sport: int, **ip):
    return IP(src=c.ip(src), dst=dst, **ip) / UDP(sport=sport, dport=9) / Raw(b"r" * 32)


def _icmp_in(point: str, type_: int, count: int = 1):
    """An ``until``: ``count`` ICMP messages of ``type_`` arrived at ``point``."""
    def until(seen):
        n = 0
        for d, f in seen.get(point, []):
            if d == "in" and len(f) > 35 and f[12:14] == b"\x08\x00" and f[23] == 1 \
                    and f[14 + (f[14] & 15) * 4] == type_:
                n += 1
        return n >= count
    return until


def _redirects(c, frames: list) -> list:
    out = []
    for f in frames:
        if ICMP in f and f[ICMP].type == 5:
            d = {"type": f[ICMP].type, "code": f[ICMP].code, "src": role_ip(c, f[IP].src), "ttl": f[IP].ttl,
                 "tos": f[IP].tos, "gateway": role_ip(c, f[ICMP].gw), "from_mac": c.role(f.src)}
            if IPerror in f:
                d.update(quoted_ttl=f[IPerror].ttl, quoted_src=role_ip(c, f[IPerror].src),
                         quoted_dst=role_ip(c, f[IPerror].dst), quote_len=len(bytes(f[ICMP].payload)))
            out.append(d)
    return out


def _via_node1(c, dst: str, sport: int, watch_at: str = None, packets: int = 2) -> dict:
    """ext sends node1 (its underlay MAC) ``packets`` UDP datagrams of one flow for ``dst``, whose next
    hop is on ext's own segment, 0.7 s apart (past the redirect backoff of 20 ms << n, n < 6): the redirects
    ext gets for each, what node1 forwards (at the underlay), what arrives."""
    out = {"redirects_per_packet": [], "redirect": None, "forwarded_by_node1": [], "delivered": 0}
    for i in range(packets):
        if i:
            time.sleep(0.7)
        pkt = Ether(src=c.mac("ext"), dst=role_mac(c, "node:node1")) / IP(src=c.ip("ext"), dst=dst, ttl=64) / \
            UDP(sport=sport, dport=9) / Raw(b"redirect-me")

        def done(s):
            return _icmp_in("ext", 5)(s) and any(d == "out" and b"redirect-me" in f and f[6:12] != pkt.src
                                                  for d, f in s["underlay"])
        watch = ["ext", "underlay"] + ([watch_at] if watch_at else [])
        seen = c.probe("ext", pkt, watch=watch, window=0.4, until=done)
        red = _redirects(c, seen["ext"])
        out["redirects_per_packet"].append(len(red))
        if red and out["redirect"] is None:
            out["redirect"] = red[0]
        # matched on destination, not on source: the source is masquerade's business (see
        # rt-underlay-to-remote-pod-masquerade), kept out of the redirect observation
        out["forwarded_by_node1"] += [{"ttl": f[IP].ttl, "eth_dst": c.role(f.dst), "dst": role_ip(c, f[IP].dst)}
                                      for f in udp_to(seen["underlay"], 9)
                                      if f[IP].dst == dst and c.role(f.src) == "node:node1"]
        if watch_at:
            out["delivered"] += len([f for f in udp_to(seen[watch_at], 9) if f[IP].dst == dst])
    if not watch_at:
        del out["delivered"]
    return out


@scenario("hostgw", spec="item 11")
def rt_redirect_same_interface(c):
    """ext -> node1 -> next hop on ext's own segment (node2's address; b1): forwarded, ICMP redirect 5/1 to ext."""
    # Per packet, since on a kernel node with a nat table the redirect is RELATED to the packet's conntrack
    # entry and nf_nat drops it while that entry is unconfirmed (a flow's first packet) or masqueraded.
    watch_underlay(c)
    out = {"to_node2_address": _via_node1(c, c.ip("node2"), 50100)}
    time.sleep(0.7)
    out["to_b1"] = _via_node1(c, c.ip("b1"), 50101, watch_at="b1")
    return out


@scenario("hostgw", spec="item 40")
def rt_underlay_to_remote_pod_masquerade(c):
    """ext -> node1 -> b1: the source b1 sees (flannel's `! -s CLUSTER -d CLUSTER -j MASQUERADE`)."""
    pkt = Ether(src=c.mac("ext"), dst=role_mac(c, "node:node1")) / IP(src=c.ip("ext"), dst=c.ip("b1"), ttl=64) / \
        UDP(sport=50150, dport=9) / Raw(b"from-outside")
    seen = c.probe("ext", pkt, watch=["b1"], window=1.0,
                   until=lambda s: any(d == "in" and b"from-outside" in f for d, f in s["b1"]))
    got = [f for f in udp_to(seen["b1"], 9) if bytes(f[UDP].payload) == b"from-outside"]
    return {"at_b1": [{"src": role_ip(c, f[IP].src), "sport_kept": f[UDP].sport == 50150, "ttl": f[IP].ttl}
                      for f in got]}


@scenario("hostgw", spec="items 17, 18")
def rt_host_unreachable_after_arp_failure(c):
    """An unused address in node2's pod subnet: 3 ARP requests, then ICMP host unreachable (3/1) to the sender."""
    target = c.nodes["node2"]["podCIDR"].rsplit(".", 1)[0] + ".200"
    seen = c.probe("a1", _udp(c, "a1", target, 50200), watch=["a1", "b1"], window=6.0, until=_icmp_in("a1", 3))
    reqs = [f for f in seen["b1"] if ARP in f and f[ARP].op == 1 and f[ARP].pdst == target]
    return {"error_at_sender": icmp_error(c, seen["a1"]),
            "arp_requests_before_error": len(reqs),
            "arp_requests": sorted({(c.role(f.dst), c.role(f[ARP].hwsrc), role_ip(c, f[ARP].psrc), f[ARP].hwdst)
                                    for f in seen["b1"] if ARP in f and f[ARP].op == 1 and f[ARP].pdst == target})}


@scenario("hostgw", spec="items 9, 13")
def rt_icmp_error_rate_limit(c):
    """20 back-to-back TTL-1 packets from a fresh source address: how many time-exceeded errors come back."""
    extra = c.pods["a1"]["ip"].rsplit(".", 1)[0] + ".250"  # a source no other scenario sends errors to
    res = c.exec("a1", "ip", "addr", "add", f"{extra}/32", "dev", "eth0")
    if res.returncode != 0:
        raise RuntimeError(f"a1: ip addr add {extra}: {res.stderr}")
    try:
        frames = [c.frame("a1", IP(src=extra, dst=c.ip("b1"), ttl=1) / UDP(sport=50300 + i, dport=9) / Raw(b"t" * 16))
                  for i in range(20)]
        seen = probe_many(c, "a1", frames, watch=["a1", "b1"], window=2.0)
    finally:
        c.exec("a1", "ip", "addr", "del", f"{extra}/32", "dev", "eth0")
    errors = [f for f in seen["a1"] if ICMP in f and f[ICMP].type == 11 and f[IP].dst == extra]
    return {"time_exceeded": len(errors), "delivered": len(udp_to(seen["b1"], 9)),
            "quoted_sports": sorted(f[IPerror].payload.sport - 50300 for f in errors if IPerror in f)}


def _raw_ip(c, src: str, dst: str, sport: int, *, ihl: int = 5, options: bytes = b"", csum_fix: int = 0,
            total_delta: int = 0, version: int = 4) -> bytes:
    """An IPv4/UDP packet built by hand (so headers can be wrong), as a frame from ``src`` to its gateway."""
    payload = UDP(sport=sport, dport=9, len=8 + 24) / Raw(b"o" * 24)
    hlen = 20 + len(options)
    udp = bytes(IP(src=c.ip(src), dst=c.ip(dst)) / payload)[20:]  # UDP checksum over the pseudo-header
    total = hlen + len(udp) + total_delta
    hdr = bytearray(struct.pack("!BBHHHBBH4s4s", (version << 4) | ihl, 0, total, 0x4242, 0, 64, 17, 0,
                                bytes(map(int, c.ip(src).split("."))), bytes(map(int, c.ip(dst).split(".")))))
    hdr += options
    s = sum(struct.unpack(f"!{len(hdr) // 2}H", bytes(hdr)))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    struct.pack_into("!H", hdr, 10, (~s & 0xFFFF) ^ csum_fix)
    return bytes(Ether(src=c.mac(src), dst=c.gw_mac[src], type=0x0800)) + bytes(hdr) + udp


def _router_errors(c, frames: list) -> list:
    """ICMP errors from the routers (b1's own port unreachable, which may or may not arrive within the
    window, is not one)."""
    return [(f[ICMP].type, f[ICMP].code, role_ip(c, f[IP].src)) for f in frames
            if ICMP in f and f[IP].src != c.ip("b1")]


@scenario("hostgw", spec="items 7, 8")
def rt_malformed_ip_dropped(c):
    """Broken IPv4 headers towards b1 (checksum, IHL, total length, version) are dropped silently."""
    cases = {"control": {}, "bad_checksum": {"csum_fix": 0x0101}, "ihl_4": {"ihl": 4},
             "total_length_past_frame": {"total_delta": 40}, "total_length_below_header": {"total_delta": -40},
             "version_5": {"version": 5}}
    out = {}
    for i, (name, kw) in enumerate(cases.items()):
        sport = 50400 + i
        seen = probe_many(c, "a1", [_raw_ip(c, "a1", "b1", sport, **kw)], watch=["a1", "b1"], window=0.8,
                          until=lambda s, sp=sport: any(d == "in" and len(f) > 37 and f[34:36] == sp.to_bytes(2, "big")
                                                        for d, f in s["b1"]))
        out[name] = {"delivered": len([f for f in udp_to(seen["b1"], 9) if f[UDP].sport == sport]),
                     "errors": _router_errors(c, seen["a1"])}
    return out


@scenario("hostgw", spec="item 7")
def rt_ip_options_forwarded(c):
    """IP options towards b1 (NOPs; record route with two slots): forwarded, options as b1 receives them."""
    cases = {"nop_padding": bytes([1, 1, 1, 0]),
             # record route: type 7, length 11, pointer 4, two empty slots, then EOL
             "record_route": bytes([7, 11, 4]) + bytes(8) + bytes([0])}
    out = {}
    for i, (name, opts) in enumerate(cases.items()):
        sport = 50500 + i
        seen = probe_many(c, "a1", [_raw_ip(c, "a1", "b1", sport, ihl=5 + len(opts) // 4, options=opts)],
                          watch=["a1", "b1"], window=1.0,
                          until=lambda s: any(d == "in" and len(f) > 34 and f[23] == 17 for d, f in s["b1"]))
        got = [f for f in seen["b1"] if IP in f and f[IP].proto == 17 and f[IP].src == c.ip("a1")]
        rows = []
        for f in got:
            raw = bytes(f[IP])[20:f[IP].ihl * 4]
            row = {"ttl": f[IP].ttl, "ihl": f[IP].ihl, "options_len": len(raw)}
            if raw[:1] == b"\x07":
                ptr = raw[2]
                row["rr_pointer"] = ptr
                row["rr_recorded"] = [role_ip(c, ".".join(str(b) for b in raw[j:j + 4]))
                                      for j in range(3, min(ptr - 1, raw[1]), 4)]
            else:
                row["options_hex"] = raw.hex()
            try:
                row["udp_intact"] = bytes(f[UDP].payload) == b"o" * 24
            except Exception:
                row["udp_intact"] = False
            rows.append(row)
        out[name] = {"at_b1": rows, "errors": _router_errors(c, seen["a1"])}
    return out


def _echo(c, src: str, dst: str, ident: int, ttl: int = 64, dst_mac: str = None) -> dict:
    pkt = IP(src=c.ip(src), dst=dst, ttl=ttl) / ICMP(id=ident, seq=1) / Raw(b"local")
    seen = c.probe(src, pkt, watch=[src], window=1.0, dst_mac=dst_mac,
                   until=lambda s: any(d == "in" and len(f) > 38 and f[12:14] == b"\x08\x00" and f[23] == 1
                                       for d, f in s[src]))
    return {"replies": [{"src": role_ip(c, f[IP].src), "ttl": f[IP].ttl, "id_ok": f[ICMP].id == ident,
                         "payload": bytes(f[ICMP].payload).decode(errors="replace")}
                        for f in seen[src] if ICMP in f and f[ICMP].type == 0],
            # only errors about this echo: a late port unreachable from an earlier probe's target
            # (b1's, say) can still be on its way when this probe starts watching
            "errors": [icmp_error(c, [f]) for f in seen[src] if ICMP in f and f[ICMP].type != 0
                       and IPerror in f and f[IPerror].proto == 1 and f[IPerror].dst == dst]}


@scenario("hostgw", spec="item 9")
def rt_echo_to_node_addresses(c):
    """Echo requests from a1 to node1's and node2's underlay addresses, and from ext to node1's."""
    return {"a1->node1": _echo(c, "a1", c.ip("node1"), 0x5101),
            "a1->node2": _echo(c, "a1", c.ip("node2"), 0x5102),
            "ext->node1": _echo(c, "ext", c.ip("node1"), 0x5103, dst_mac=role_mac(c, "node:node1"))}


@scenario("hostgw", spec="items 7, 9")
def rt_ttl1_to_local_address(c):
    """TTL 1 to the node's own addresses is delivered locally (echo answered, closed UDP port unreachable)."""
    out = {"echo_gateway": _echo(c, "a1", c.gateway("a1"), 0x5201, ttl=1),
           "echo_node_address": _echo(c, "a1", c.ip("node1"), 0x5202, ttl=1),
           "echo_other_node_gateway": _echo(c, "a1", c.gateway("b1"), 0x5203, ttl=1)}
    seen = c.probe("a1", _udp(c, "a1", c.gateway("a1"), 50600, ttl=1), watch=["a1"], window=1.0,
                   until=_icmp_in("a1", 3))
    out["udp_gateway_closed_port"] = icmp_error(c, seen["a1"])
    return out
