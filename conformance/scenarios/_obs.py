"""Small helpers scenarios share to turn scapy frames into comparable observations."""

from __future__ import annotations

from typing import Optional


def icmp_error(c, frames: list) -> Optional[dict]:
    """The first ICMP error among ``frames``, described in roles and values (None if there is none)."""
    from scapy.layers.inet import ICMP, IP, IPerror
    for f in frames:
        if IP in f and ICMP in f and f[ICMP].type in (3, 4, 5, 11, 12):
            ip, icmp = f[IP], f[ICMP]
            quote = bytes(icmp.payload)
            d = {"type": icmp.type, "code": icmp.code, "src": role_ip(c, ip.src), "ttl": ip.ttl, "tos": ip.tos,
                 "len": ip.len, "quote_len": len(quote), "from_mac": c.role(f.src)}
            if icmp.type == 3 and icmp.code == 4:
                d["mtu"] = icmp.nexthopmtu
            if IPerror in f:
                q = f[IPerror]
                d.update(quoted_ttl=q.ttl, quoted_src=role_ip(c, q.src), quoted_dst=role_ip(c, q.dst))
            return d
    return None


def role_ip(c, addr: str) -> str:
    """An address as the role that owns it (pod, gw:NODE, node:NODE, ext), else itself."""
    for name, p in c.pods.items():
        if p["ip"] == addr:
            return name
    for name, n in c.nodes.items():
        if n["gateway"].split("/")[0] == addr:
            return f"gw:{name}"
        if n["address"].split("/")[0] == addr:
            return f"node:{name}"
    for name, e in c.externals.items():
        if e["address"].split("/")[0] == addr:
            return name
    return addr


def ip_summary(c, f) -> dict:
    """Addresses (as roles), TTL, protocol and ports of an IPv4 frame."""
    from scapy.layers.inet import IP, TCP, UDP
    ip = f[IP]
    d = {"src": role_ip(c, ip.src), "dst": role_ip(c, ip.dst), "ttl": ip.ttl, "proto": ip.proto,
         "eth_src": c.role(f.src), "eth_dst": c.role(f.dst)}
    for l4 in (TCP, UDP):
        if l4 in f:
            d.update(sport=f[l4].sport, dport=f[l4].dport)
    return d


def udp_to(frames: list, dport: int) -> list:
    """The frames carrying UDP to ``dport`` (what a probe sent), ignoring ARP and other chatter."""
    from scapy.layers.inet import UDP, UDPerror
    return [f for f in frames if UDP in f and UDPerror not in f and f[UDP].dport == dport]


# --- overlay and underlay helpers (appended for overlay.py / router_more.py) -----------------------------

def watch_underlay(c) -> None:
    """Make the ``underlay`` point see every frame crossing br0, not only what br0 floods or takes
    itself: PACKET_MR_PROMISC on its socket (dropped with the socket; idempotent)."""
    import struct
    if getattr(c, "_underlay_promisc", False):
        return
    ifindex = int(c.exec("underlay", "cat", "/sys/class/net/br0/ifindex").stdout)
    mreq = struct.pack("iHH8s", ifindex, 1, 0, b"")  # packet_mreq: PACKET_MR_PROMISC
    c.points.socks["underlay"].setsockopt(263, 1, mreq)  # SOL_PACKET, PACKET_ADD_MEMBERSHIP
    c._underlay_promisc = True


def role_mac(c, role: str) -> str:
    """The MAC that has role ``role`` (``node:node2``, ``gw:node1``, a pod, ``ext``)."""
    for mac, r in c.roles.items():
        if r == role:
            return mac
    raise KeyError(f"no MAC has role {role}")


def vtep_roles(c) -> dict:
    """Every node's own VTEP MAC as a role ``vtep:NODE`` (added to ``c.roles`` too): flannel.1's
    address on a kernel node, the (vxlan) row of `vswitch show stats` on a vswitch node."""
    import json
    import subprocess
    out = {}
    for node in c.nodes:
        if c.dataplane(node) == "vswitch":
            from ..cluster import VSWITCH
            res = subprocess.run(VSWITCH + ["show", "stats", "--node", node, "-o", "json"], capture_output=True,
                                 text=True, timeout=30)
            rows = [r for r in json.loads(res.stdout or "[]") if r.get("stage") == "(vxlan)"]
            mac = rows[0]["mac"].lower() if rows else None
        else:
            res = c.exec(node, "ip", "-j", "link", "show", "flannel.1")
            mac = json.loads(res.stdout)[0]["address"].lower() if res.returncode == 0 else None
        if mac:
            out[mac] = f"vtep:{node}"
            c.roles[mac] = f"vtep:{node}"
    return out


def vxlan_packets(c, frames: list) -> list:
    """The VXLAN datagrams (UDP to 8472) among ``frames``, each as (outer description, inner Ether)."""
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether
    out = []
    for f in frames:
        if IP not in f or UDP not in f or f[UDP].dport != 8472:
            continue
        ip, udp = f[IP], f[UDP]
        raw = bytes(udp)[:udp.len] if udp.len else bytes(udp)
        hdr = raw[8:16]
        inner = Ether(raw[16:])
        d = {"eth_src": c.role(f.src), "eth_dst": c.role(f.dst), "src": role_ip(c, ip.src),
             "dst": role_ip(c, ip.dst), "ttl": ip.ttl, "tos": ip.tos, "df": bool(ip.flags.DF),
             "mf_or_offset": bool(ip.flags.MF) or ip.frag != 0, "ihl": ip.ihl, "ip_len": ip.len,
             "udp_dport": udp.dport, "sport": udp.sport, "sport_in_range": 32768 <= udp.sport <= 60999,
             "udp_len": udp.len, "udp_csum": _udp_csum_state(ip, udp, raw),
             "vxlan_flags": hdr[0], "vxlan_reserved": hdr[1:4].hex() + hdr[7:8].hex(),
             "vni": int.from_bytes(hdr[4:7], "big"), "inner_eth_src": c.role(inner.src),
             "inner_eth_dst": c.role(inner.dst), "inner_len": len(raw) - 16}
        out.append((d, inner))
    return out


def _udp_csum_state(ip, udp, raw: bytes) -> str:
    """'ok' (verifies, or holds the pseudo-header sum a checksum offload completes: what a veth or a
    vnet-header TAP carries on this machine), 'zero' (none) or 'bad'."""
    import struct
    from scapy.layers.inet import in4_chksum
    if udp.chksum == 0:
        return "zero"
    if in4_chksum(17, ip, raw) == 0:
        return "ok"
    s = sum(struct.unpack("!4H", bytes(map(int, ip.src.split("."))) + bytes(map(int, ip.dst.split("."))))) \
        + 17 + len(raw)
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return "ok" if udp.chksum in (s, 0xFFFF - s) else "bad"


def probe_many(c, member: str, frames: list, watch, window: float = 1.0, until=None) -> dict:
    """As ``c.probe`` for a burst: the whole frames (bytes) ``frames`` sent back to back from ``member``."""
    from scapy.all import Ether
    c.points.drain()
    for fr in frames:
        c.points.send(member, fr)
    seen = c.points.watch(window, until=until)
    return {p: [Ether(f) for d, f in seen[p] if not (p == member and d == "out")
                and not (p != "underlay" and d == "out")] for p in watch}


def inner_summary(c, inner) -> dict:
    """The inner frame of a VXLAN datagram: IP summary plus TOS, DF, fragment fields (no IDs)."""
    from scapy.layers.inet import IP
    if IP not in inner:
        return {"type": hex(inner.type)}
    d = ip_summary(c, inner)
    ip = inner[IP]
    d.update(tos=ip.tos, df=bool(ip.flags.DF), mf=bool(ip.flags.MF), frag_off=ip.frag * 8, len=ip.len)
    return d


def watch_timed(c, seconds: float, stop=None, start: Optional[float] = None) -> list:
    """Frames arriving at every point for up to ``seconds`` (or until ``stop(events)`` is true), as
    ``(t, point, frame)`` with ``t`` the seconds since ``start`` (a time.monotonic() value, by
    default the call) and ``frame`` dissected by scapy; what a namespace sent itself is left out,
    as Cluster.probe does."""
    import time

    from scapy.all import Ether
    start = time.monotonic() if start is None else start
    events: list = []
    while True:
        left = seconds - (time.monotonic() - start)
        if left <= 0:
            return events
        got = c.points.watch(left, until=lambda s: any(s.values()))
        t = round(time.monotonic() - start, 3)
        for point, frames in got.items():
            events.extend((t, point, Ether(f)) for d, f in frames if d != "out" or point == "underlay")
        if stop is not None and stop(events):
            return events


def arp_summary(c, f, names: Optional[dict] = None) -> dict:
    """An ARP frame's Ethernet and ARP fields as roles (``names`` maps test MACs to labels)."""
    from scapy.layers.l2 import ARP
    names = {k.lower(): v for k, v in (names or {}).items()}

    def mac(m: str) -> str:
        m = m.lower()
        return names.get(m) or ("zero" if m == "00:00:00:00:00:00" else c.role(m))
    a = f[ARP]
    return {"op": a.op, "eth_src": mac(f.src), "eth_dst": mac(f.dst), "hwsrc": mac(a.hwsrc),
            "psrc": role_ip(c, a.psrc), "hwdst": mac(a.hwdst), "pdst": role_ip(c, a.pdst),
            "hwtype": a.hwtype, "ptype": a.ptype, "len": len(bytes(f))}
