"""The user guide's Python API example, run as written against examples/services-node.yaml."""

from __future__ import annotations

import os

from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import ARP, Ether

from vswitch import SimNode

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")
WEB_MAC = "02:00:00:00:0b:03"


def test_user_guide_clusterip_example():
    node = SimNode.from_config(os.path.join(EXAMPLES, "services-node.yaml"))
    res = node.inject("p1", IP(src="10.244.1.2", dst="10.96.0.10") / TCP(sport=40312, dport=80, flags="S"))
    nat = res.stage("nat-prerouting")  # which endpoint, and why
    assert (nat["service"], nat["endpoint"], nat["why"]) == ("default/web:http", "10.244.1.3:8080",
                                                             "uniform random among 1")
    assert res.dropped is None and res.verdict.startswith("ended in nat-bridged-dnat")  # waits for ARP
    who_has = res.out("p2")[0]
    assert who_has[ARP].pdst == "10.244.1.3"
    reply = node.inject("p2", Ether(src=WEB_MAC, dst=who_has.src) /
                        ARP(op=2, hwsrc=WEB_MAC, psrc="10.244.1.3", pdst="10.244.1.1"))
    syn = reply.out("p2")[0]  # the queued SYN leaves once the endpoint answered
    # an endpoint on the client's bridge: bridged after DNAT (br_netfilter), so the TTL is kept
    assert (syn.dst, syn[IP].dst, syn[TCP].dport, syn[IP].ttl) == (WEB_MAC, "10.244.1.3", 8080, 64)
    assert node.show("conntrack")[0]["state"] == "SYN_SENT"
