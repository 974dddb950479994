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
