"""Router scenarios: kernel-dataplane-spec.md section 2 (forwarding, ICMP errors, ARP on the router)."""

from __future__ import annotations

from scapy.layers.inet import ICMP, IP, UDP
from scapy.packet import Raw

from ..core import scenario
from ._obs import icmp_error, ip_summary, udp_to


def _udp(c, src: str, dst: str, **ip) -> object:
    return IP(src=c.ip(src), dst=dst, **ip) / UDP(sport=40000, dport=9) / Raw(b"x" * 32)


@scenario("hostgw", spec="items 7, 8")
def ttl_exceeded_at_first_hop(c):
    """TTL 1 towards another node's pod: time exceeded from the gateway, quoting the packet as received."""
    seen = c.probe("a1", _udp(c, "a1", c.ip("b1"), ttl=1), watch=["a1", "b1"])
    return {"error_at_sender": icmp_error(c, seen["a1"]), "delivered": len(udp_to(seen["b1"], 9))}


@scenario("hostgw", spec="items 7, 8")
def ttl_exceeded_at_second_hop(c):
    """TTL 2: the first node forwards (TTL 1), the second node sends time exceeded."""
    seen = c.probe("a1", _udp(c, "a1", c.ip("b1"), ttl=2), watch=["a1", "b1"])
    return {"error_at_sender": icmp_error(c, seen["a1"]), "delivered": len(udp_to(seen["b1"], 9))}


@scenario("hostgw", spec="item 7")
def ttl_decremented_once_per_node(c):
    """A pod-to-pod packet across nodes arrives with TTL decremented twice, MACs rewritten."""
    seen = c.probe("a1", _udp(c, "a1", c.ip("b1"), ttl=64), watch=["b1"])
    return {"at_b1": [ip_summary(c, f) for f in udp_to(seen["b1"], 9)]}


@scenario("hostgw", spec="item 8")
def net_unreachable(c):
    """No route to the destination: ICMP net unreachable from the gateway."""
    seen = c.probe("a1", _udp(c, "a1", "172.16.5.5"), watch=["a1"])
    return {"error_at_sender": icmp_error(c, seen["a1"])}


@scenario("hostgw", spec="item 9")
def echo_reply_from_gateway(c):
    """An echo request to the gateway address is answered by the node, id/seq/payload echoed."""
    seen = c.probe("a1", IP(src=c.ip("a1"), dst=c.gateway("a1"), ttl=64) / ICMP(id=77, seq=3) / Raw(b"ping!"),
                   watch=["a1"])
    replies = [f for f in seen["a1"] if ICMP in f and f[ICMP].type == 0]
    return {"replies": [{"src": ip_summary(c, f)["src"], "ttl": f[IP].ttl, "id": f[ICMP].id, "seq": f[ICMP].seq,
                         "payload": bytes(f[ICMP].payload).hex()} for f in replies]}


@scenario("hostgw", spec="item 10")
def martian_source_dropped(c):
    """A packet with a loopback source is dropped, not forwarded."""
    seen = c.probe("a1", IP(src="127.0.0.1", dst=c.ip("b1")) / UDP(sport=1, dport=9), watch=["a1", "b1"])
    return {"delivered": len(udp_to(seen["b1"], 9)), "errors": len([f for f in seen["a1"] if ICMP in f])}
