"""Conntrack and Service NAT end to end through a Node with in-memory ports.

nat-prerouting / nat-postrouting / nat-bridge as kube-proxy (iptables mode)
and flannel's ip-masq make the kernel behave: kernel-dataplane-spec.md
sections 4 (conntrack) and 5 (kube-proxy), plus item 40 (ip-masq).
scapy-built frames go in, frames and tables come out.

Topology (one node "n1"):

    p1 (pod 10.244.1.2) --+
    p2 (pod 10.244.1.3) --+-- bridge -- router iface "pods" 10.244.1.1/24
    p3 (pod 10.244.1.4) --+                          |
                                   router iface "uplink" 192.168.1.11/24, port "up"
                                                     |
            gateway 192.168.1.12 (10.244.2.0/24, node n2, behind it), default gateway 192.168.1.1,
            an outside client 192.168.1.50 on the same segment
"""

from __future__ import annotations

import copy
import random
import struct
from collections import Counter

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Raw

from nat.manifests import ManifestError
from vswitch.config import ConfigError, parse
from vswitch.node import Node
from vswitch.packet import VNET_LEN

# --- topology ---------------------------------------------------------------------------------------------

CFG = {"name": "n1", "ports": [{"name": "p1", "type": "memory"}, {"name": "p2", "type": "memory"},
                               {"name": "p3", "type": "memory"}, {"name": "up", "type": "memory"}],
       "router": {"interfaces": [{"name": "pods", "address": "10.244.1.1/24"},
                                 {"name": "uplink", "port": "up", "address": "192.168.1.11/24"}],
                  "routes": ["10.244.2.0/24 via 192.168.1.12", "default via 192.168.1.1"]},
       "nat": {"clusterCIDR": "10.244.0.0/16"}}

P1, P2, P3 = "02:00:00:00:00:01", "02:00:00:00:00:02", "02:00:00:00:00:03"
POD1, POD2, POD3 = "10.244.1.2", "10.244.1.3", "10.244.1.4"
PODS = {"p1": (P1, POD1), "p2": (P2, POD2), "p3": (P3, POD3)}
PORT_OF = {POD1: "p1", POD2: "p2", POD3: "p3"}
REMOTE_EP = "10.244.2.5"  # a pod on node n2, behind 192.168.1.12
GW_MAC, GW = "02:00:00:00:01:12", "192.168.1.12"
DGW_MAC, DGW = "02:00:00:00:01:01", "192.168.1.1"
PEER_MAC, PEER = "02:00:00:00:01:50", "192.168.1.50"
RTR_PODS, RTR_UP = "10.244.1.1", "192.168.1.11"
BCAST = "ff:ff:ff:ff:ff:ff"
INTERNET = "8.8.8.8"
T0 = 1000.0

# Service addresses
VIP = "10.96.0.10"          # web: 3 endpoints (p2, p3, remote)
VIP_LOCAL = "10.96.0.11"    # one-local: endpoint p2 only
VIP_REMOTE = "10.96.0.12"   # one-remote: endpoint 10.244.2.5 only
VIP_DNS = "10.96.0.20"      # dns: UDP 53 + TCP 53 -> 5353 on 3 endpoints
VIP_DNS_LOCAL = "10.96.0.21"
VIP_DNS_REMOTE = "10.96.0.22"
VIP_EMPTY = "10.96.0.30"    # no endpoints
VIP_STICKY = "10.96.0.40"   # sessionAffinity ClientIP
VIP_EXT, EXT_IP = "10.96.0.60", "192.168.1.200"
VIP_ITP, VIP_ITP_NONE = "10.96.0.70", "10.96.0.71"
LB_IP = "203.0.113.10"
NP_LOCAL, NP_REMOTE, NP_ETP, NP_ETP_NONE, NP_LB = 30080, 30081, 30082, 30083, 30090


# --- manifests --------------------------------------------------------------------------------------------

def service(name, cluster_ip, ports, type_="ClusterIP", status=None, **spec) -> dict:
    d = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "default"},
         "spec": {"type": type_, "clusterIP": cluster_ip, "ports": ports, **spec}}
    if status is not None:
        d["status"] = status
    return d


def sport_(port, target, proto="TCP", name=None, node_port=None) -> dict:
    d = {"port": port, "targetPort": target, "protocol": proto}
    if name:
        d["name"] = name
    if node_port:
        d["nodePort"] = node_port
    return d


def endpoints(svc, eps, ports=(("", "TCP", 8080),), name=None) -> dict:
    """An EndpointSlice; eps: (ip, node) or (ip, node, {conditions})."""
    out = []
    for e in eps:
        d = {"addresses": [e[0]], "nodeName": e[1]}
        if len(e) > 2:
            d["conditions"] = e[2]
        out.append(d)
    ps = []
    for n, proto, p in ports:
        d = {"port": p, "protocol": proto}
        if n:
            d["name"] = n
        ps.append(d)
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name or f"{svc}-1", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": svc}},
            "addressType": "IPv4", "ports": ps, "endpoints": out}


def text(*objs) -> str:
    return yaml.safe_dump_all(list(objs), sort_keys=False)


THREE = [(POD2, "n1"), (POD3, "n1"), (REMOTE_EP, "n2")]
DNS_PORTS = (("dns", "UDP", 5353), ("dns-tcp", "TCP", 5353))


def standard_objects() -> list:
    return [
        service("web", VIP, [sport_(80, 8080)]), endpoints("web", THREE),
        service("one-local", VIP_LOCAL, [sport_(80, 8080)]), endpoints("one-local", [(POD2, "n1")]),
        service("one-remote", VIP_REMOTE, [sport_(80, 8080)]), endpoints("one-remote", [(REMOTE_EP, "n2")]),
        service("dns", VIP_DNS, [sport_(53, 5353, "UDP", "dns"), sport_(53, 5353, "TCP", "dns-tcp")]),
        endpoints("dns", THREE, DNS_PORTS),
        service("dns-local", VIP_DNS_LOCAL, [sport_(53, 5353, "UDP")]),
        endpoints("dns-local", [(POD2, "n1")], (("", "UDP", 5353),)),
        service("dns-remote", VIP_DNS_REMOTE, [sport_(53, 5353, "UDP")]),
        endpoints("dns-remote", [(REMOTE_EP, "n2")], (("", "UDP", 5353),)),
        service("empty", VIP_EMPTY, [sport_(80, 8080, "TCP", "http"), sport_(53, 5353, "UDP", "dns")]),
        service("sticky", VIP_STICKY, [sport_(80, 8080)], sessionAffinity="ClientIP"),
        endpoints("sticky", THREE),
        service("np-local", "10.96.0.50", [sport_(80, 8080, node_port=NP_LOCAL)], "NodePort"),
        endpoints("np-local", [(POD2, "n1")]),
        service("np-remote", "10.96.0.51", [sport_(80, 8080, node_port=NP_REMOTE)], "NodePort"),
        endpoints("np-remote", [(REMOTE_EP, "n2")]),
        service("np-etp", "10.96.0.52", [sport_(80, 8080, node_port=NP_ETP)], "NodePort",
                externalTrafficPolicy="Local"),
        endpoints("np-etp", [(POD3, "n1"), (REMOTE_EP, "n2")]),
        service("np-etp-none", "10.96.0.53", [sport_(80, 8080, node_port=NP_ETP_NONE)], "NodePort",
                externalTrafficPolicy="Local"),
        endpoints("np-etp-none", [(REMOTE_EP, "n2")]),
        service("ext", VIP_EXT, [sport_(80, 8080)], externalIPs=[EXT_IP]), endpoints("ext", THREE),
        service("itp", VIP_ITP, [sport_(80, 8080)], internalTrafficPolicy="Local"),
        endpoints("itp", [(POD3, "n1"), (REMOTE_EP, "n2")]),
        service("itp-none", VIP_ITP_NONE, [sport_(80, 8080)], internalTrafficPolicy="Local"),
        endpoints("itp-none", [(REMOTE_EP, "n2")]),
        service("lb", "10.96.0.80", [sport_(80, 8080, node_port=NP_LB)], "LoadBalancer",
                status={"loadBalancer": {"ingress": [{"ip": LB_IP}]}}),
        endpoints("lb", [(REMOTE_EP, "n2")]),
    ]


STANDARD = text(*standard_objects())


# --- rig --------------------------------------------------------------------------------------------------

class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def is_redirect(f: Ether) -> bool:
    return ICMP in f and f[ICMP].type == 5


class Rig:
    """A started node with Services applied, its clock, pods/hosts that already announced themselves."""

    def __init__(self, nat: dict | None = None, manifests: str | None = STANDARD, seed: int = 7,
                 flow_cache: int | None = None, clock: Clock | None = None) -> None:
        cfg = copy.deepcopy(CFG)
        if nat:
            cfg["nat"].update(nat)
        if flow_cache is not None:
            cfg["flow_cache"] = flow_cache
        self.clock = clock or Clock()
        self.n = Node(parse(cfg), clock=self.clock)
        self.n.router.neigh.rng = random.Random(seed)  # reachable_time is randomised
        # the schedulers draw from the Nat's generator (ServiceTable hands the same object to them)
        assert self.n.nat.services.rng is self.n.nat.rng
        self.n.nat.rng.seed(seed)
        self.n.start(None)
        self.rmac = self.n.router.ifaces["pods"].mac.hex(":")
        self.umac = self.n.router.ifaces["uplink"].mac.hex(":")
        for port, (mac, ip) in PODS.items():  # each pod asks for its gateway: learned on the bridge and the router
            self.inject(port, Ether(src=mac, dst=BCAST) / ARP(op=1, hwsrc=mac, psrc=ip, pdst=RTR_PODS))
        for mac, ip in ((GW_MAC, GW), (DGW_MAC, DGW), (PEER_MAC, PEER)):
            self.inject("up", Ether(src=mac, dst=BCAST) / ARP(op=1, hwsrc=mac, psrc=ip, pdst=RTR_UP))
        self.raw_all()
        if manifests:
            self.n.apply_manifests(manifests, "test.yaml")

    # --- in -----------------------------------------------------------------------------------------------
    def inject(self, port: str, frame, vnet: bytes | None = None) -> None:
        kw = {} if vnet is None else {"vnet": vnet}
        self.n.ports[port].inject(bytes(frame), ts=self.clock.t, **kw)

    def from_pod(self, port: str, ip_pkt, dst_mac: str | None = None, vnet: bytes | None = None) -> None:
        """A pod sends: to the router (its gateway) unless dst_mac names another pod (bridged)."""
        self.inject(port, Ether(src=PODS[port][0], dst=dst_mac or self.rmac) / ip_pkt, vnet)

    def from_up(self, ip_pkt, src_mac: str = GW_MAC) -> None:
        self.inject("up", Ether(src=src_mac, dst=self.umac) / ip_pkt)

    # --- out ----------------------------------------------------------------------------------------------
    def raw_all(self) -> dict:
        return {p: self.n.ports[p].take() for p in ("p1", "p2", "p3", "up")}

    def out(self) -> dict:
        """Frames each port sent since last time, ICMP redirects left out (the router sends them for
        traffic it routes back onto the pods' segment, as the kernel does; not the subject here)."""
        return {p: [e for e in (Ether(f) for f in fs) if not is_redirect(e)] for p, fs in self.raw_all().items()}

    def only(self, port: str) -> Ether:
        """Exactly one frame went out, on ``port``."""
        out = self.out()
        sent = {p: [f.summary() for f in fs] for p, fs in out.items() if fs}
        assert list(sent) == [port] and len(out[port]) == 1, sent
        return out[port][0]

    def nothing(self) -> None:
        out = self.out()
        assert not any(out.values()), {p: [f.summary() for f in fs] for p, fs in out.items() if fs}

    # --- tables -------------------------------------------------------------------------------------------
    def conns(self, **want) -> list:
        """conntrack rows whose orig side matches every given field (src, dst, sport, dport, proto)."""
        rows = self.n.show("conntrack")
        out = []
        for r in rows:
            if "proto" in want and r["proto"] != want["proto"]:
                continue
            if all(r["orig"].get(k) == v for k, v in want.items() if k != "proto"):
                out.append(r)
        return out

    def conn(self, **want) -> dict:
        rows = self.conns(**want)
        assert len(rows) == 1, rows
        return rows[0]

    def drops(self, stage: str, reason: str) -> int:
        return next(r["count"] for r in self.n.show("drops") if r["stage"] == stage and r["reason"] == reason)

    def invalid_drops(self) -> int:
        """Packets dropped as conntrack INVALID, wherever the pipeline drops them (KUBE-FORWARD's place)."""
        return sum(r["count"] for r in self.n.show("drops") if r["reason"] == "invalid"
                   and r["stage"] in ("nat-prerouting", "nat-postrouting", "nat-bridge"))

    def ct_stats(self) -> dict:
        return next(r for r in self.n.show("stats") if r["stage"] == "(conntrack)")


@pytest.fixture
def rig() -> Rig:
    return Rig()


# --- packet helpers ---------------------------------------------------------------------------------------

def syn(src, dst, sport, dport, flags="S", payload=b"", **ip) -> IP:
    p = IP(src=src, dst=dst, **ip) / TCP(sport=sport, dport=dport, flags=flags, seq=1000, ack=0 if flags == "S"
                                         else 5000, window=64240)
    return p / Raw(payload) if payload else p


def dgram(src, dst, sport, dport, payload=b"query", **ip) -> IP:
    return IP(src=src, dst=dst, **ip) / UDP(sport=sport, dport=dport) / Raw(payload)


def checksums_ok(frame: Ether) -> bool:
    """IPv4 header and L4 (TCP/UDP/ICMP) checksums equal scapy's recomputation."""
    p = Ether(bytes(frame))
    want_ip = p[IP].chksum
    l4 = p[IP].payload
    checked = type(l4) in (TCP, UDP, ICMP)  # exactly: an ICMP error's quote parses as TCPerror/UDPerror
    want_l4 = l4.chksum if checked else None
    del p[IP].chksum
    if checked:
        del l4.chksum
    q = Ether(bytes(p))
    return q[IP].chksum == want_ip and (not checked or q[IP].payload.chksum == want_l4)


def ip_header_ok(ip_bytes: bytes) -> bool:
    p = IP(ip_bytes)
    stored = p.chksum
    p.chksum = None
    return IP(bytes(p)).chksum == stored


def quote(f: Ether) -> bytes:
    """The bytes an ICMP error quotes (after its 8-byte header)."""
    ip = bytes(f[IP])
    hl = (ip[0] & 0x0F) * 4
    return ip[hl + 8:]


def fold(s: int) -> int:
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def pseudo_sum(src: str, dst: str, proto: int, length: int) -> int:
    """The folded, uncomplemented pseudo-header sum: what a CHECKSUM_PARTIAL frame carries in its L4 field."""
    words = struct.unpack("!4H", bytes(map(int, src.split("."))) + bytes(map(int, dst.split("."))))
    return fold(sum(words) + proto + length)


def tcp_out(f: Ether) -> tuple:
    return f[IP].src, f[TCP].sport, f[IP].dst, f[TCP].dport


def udp_out(f: Ether) -> tuple:
    return f[IP].src, f[UDP].sport, f[IP].dst, f[UDP].dport


EP_PORT = {POD2: "p2", POD3: "p3", REMOTE_EP: "up"}
EP_MAC = {POD2: P2, POD3: P3, REMOTE_EP: GW_MAC}


# --- 1. ClusterIP TCP ----------------------------------------------------------------------------------------

def test_clusterip_syn_is_dnated_to_one_of_the_endpoints(rig):
    rig.from_pod("p1", syn(POD1, VIP, 40000, 80))
    row = rig.conn(dst=VIP, sport=40000)
    ep = row["endpoint"].split(":")[0]
    assert row["endpoint"] == f"{ep}:8080" and ep in EP_PORT
    f = rig.only(EP_PORT[ep])
    # DNAT: destination rewritten; pod-to-pod (endpoints are in the cluster CIDR): source untouched
    assert tcp_out(f) == (POD1, 40000, ep, 8080)
    if ep == REMOTE_EP:  # routed
        assert f.dst == GW_MAC and f.src == rig.umac and f[IP].ttl == 63
    else:  # br_netfilter: DNATed onto the bridge it came from, it is bridged: TTL and client MAC kept
        assert f.dst == EP_MAC[ep] and f.src == P1 and f[IP].ttl == 64
    assert f[TCP].flags == "S"
    assert checksums_ok(f)
    assert row["orig"] == {"src": POD1, "dst": VIP, "sport": 40000, "dport": 80}
    assert row["reply"] == {"src": ep, "dst": POD1, "sport": 8080, "dport": 40000}
    assert (row["service"], row["masquerade"]) == ("default/web", False)


@pytest.mark.parametrize("where", ["same-bridge", "remote-node"])
def test_clusterip_tcp_handshake_is_translated_both_ways(rig, where):
    vip, ep = (VIP_LOCAL, POD2) if where == "same-bridge" else (VIP_REMOTE, REMOTE_EP)
    rig.from_pod("p1", syn(POD1, vip, 40001, 80))
    f = rig.only(EP_PORT[ep])
    assert tcp_out(f) == (POD1, 40001, ep, 8080) and checksums_ok(f)
    row = rig.conn(dst=vip)
    assert (row["state"], row["flags"], row["timeout"]) == ("SYN_SENT", ["UNREPLIED"], 120)
    assert row["reply"] == {"src": ep, "dst": POD1, "sport": 8080, "dport": 40001}

    # the endpoint answers its client directly
    sa = syn(ep, POD1, 8080, 40001, flags="SA")
    if where == "same-bridge":
        rig.from_pod("p2", sa, dst_mac=P1)  # bridged pod to pod: nat-bridge (br_netfilter) un-DNATs it
    else:
        rig.from_up(sa)
    f = rig.only("p1")
    assert tcp_out(f) == (vip, 80, POD1, 40001), "the client must see the Service address"
    assert f[TCP].flags == "SA" and f.dst == P1 and checksums_ok(f)
    if where == "same-bridge":
        assert f.src == P2 and f[IP].ttl == 64  # bridged, not routed
    else:
        assert f.src == rig.rmac and f[IP].ttl == 63
    row = rig.conn(dst=vip)
    assert (row["state"], row["flags"], row["timeout"]) == ("SYN_RECV", [], 60)

    rig.from_pod("p1", syn(POD1, vip, 40001, 80, flags="A"))
    f = rig.only(EP_PORT[ep])
    assert tcp_out(f) == (POD1, 40001, ep, 8080) and f[TCP].flags == "A" and checksums_ok(f)
    row = rig.conn(dst=vip)
    assert (row["state"], row["flags"], row["timeout"]) == ("ESTABLISHED", ["ASSURED"], 86400)

    # data both ways keeps flowing through the same translation
    rig.from_pod("p1", syn(POD1, vip, 40001, 80, flags="PA", payload=b"GET / HTTP/1.1\r\n\r\n"))
    f = rig.only(EP_PORT[ep])
    assert tcp_out(f) == (POD1, 40001, ep, 8080) and bytes(f[TCP].payload) == b"GET / HTTP/1.1\r\n\r\n"
    assert checksums_ok(f)
    data = syn(ep, POD1, 8080, 40001, flags="PA", payload=b"HTTP/1.1 200 OK\r\n\r\n")
    rig.from_pod("p2", data, dst_mac=P1) if where == "same-bridge" else rig.from_up(data)
    f = rig.only("p1")
    assert tcp_out(f) == (vip, 80, POD1, 40001) and checksums_ok(f)
    row = rig.conn(dst=vip)
    assert row["packets"] == [3, 2] and len(rig.n.show("conntrack")) == 1


def test_dnat_onto_the_same_bridge_is_bridged_not_routed(rig):
    """br_nf_pre_routing_finish_bridge: no TTL check or decrement, the client's MAC kept; a remote
    endpoint is routed (and a TTL-1 packet to it expires)."""
    rig.from_pod("p1", syn(POD1, VIP_LOCAL, 40500, 80, ttl=1))
    f = rig.only("p2")
    assert (f.src, f.dst, f[IP].ttl) == (P1, P2, 1) and tcp_out(f) == (POD1, 40500, POD2, 8080) and checksums_ok(f)
    assert rig.drops("ip4-forward", "ttl-exceeded") == 0
    rig.from_pod("p1", syn(POD1, VIP_REMOTE, 40501, 80, ttl=1))
    f = rig.only("p1")
    assert (f[ICMP].type, f[ICMP].code, f[IP].src) == (11, 0, VIP_REMOTE)  # RELATED: translated back
    trace = rig.n.trace("p1", bytes(Ether(src=P1, dst=rig.rmac) / syn(POD1, VIP_LOCAL, 40502, 80)))
    stages = [s["stage"] for s in trace.trace]
    assert stages[stages.index("nat-prerouting"):] == ["nat-prerouting", "nat-bridged-dnat", "l2-forward", "port-tx"]
    assert "TTL and source MAC kept" in trace.trace[stages.index("nat-bridged-dnat")]["text"]


def test_bridged_dnat_to_an_unresolved_endpoint_waits_for_arp(rig):
    new_ep = "10.244.1.9"  # never heard of: the router must resolve it first, from the gateway address
    rig.n.apply_manifests(text(service("fresh", "10.96.0.90", [sport_(80, 8080)]),
                               endpoints("fresh", [(new_ep, "n1")])))
    rig.from_pod("p1", syn(POD1, "10.96.0.90", 40510, 80))
    out = rig.out()
    reqs = [f for fs in out.values() for f in fs if ARP in f]
    assert reqs and all(r[ARP].pdst == new_ep and r[ARP].psrc == RTR_PODS for r in reqs)
    assert not [f for fs in out.values() for f in fs if TCP in f]
    rig.inject("p3", Ether(src=P3, dst=rig.rmac) / ARP(op=2, hwsrc=P3, psrc=new_ep, hwdst=rig.rmac, pdst=RTR_PODS))
    f = rig.only("p3")
    assert f.dst == P3 and f[IP].ttl == 64 and tcp_out(f) == (POD1, 40510, new_ep, 8080) and checksums_ok(f)


# --- 2. endpoint spread and schedulers ----------------------------------------------------------------------

def chosen(rig, **want) -> list:
    """Endpoint IPs of the matching connections, by source port."""
    rows = sorted(rig.conns(**want), key=lambda r: r["orig"]["sport"])
    return [r["endpoint"].split(":")[0] for r in rows]


def test_random_scheduler_spreads_uniformly(rig):
    for i in range(300):
        rig.from_pod("p1", syn(POD1, VIP, 20000 + i, 80))
    out = rig.out()
    counts = Counter(chosen(rig, dst=VIP))
    assert sum(counts.values()) == 300
    assert set(counts) == {POD2, POD3, REMOTE_EP}
    # chi-square with 2 degrees of freedom, p = 0.001: 13.8; and each share well inside 60..140
    chi2 = sum((c - 100) ** 2 / 100 for c in counts.values())
    assert chi2 < 13.8 and all(60 <= c <= 140 for c in counts.values()), counts
    # and each SYN really went where its entry says
    assert {ip: len(out[EP_PORT[ip]]) for ip in counts} == dict(counts)
    assert all(f[IP].dst in (POD2, POD3, REMOTE_EP) and f[TCP].dport == 8080 for fs in out.values() for f in fs)


def test_random_scheduler_uses_the_nat_rng():
    """Two nodes seeded alike choose alike; a different seed chooses differently."""
    def picks(seed):
        r = Rig(seed=seed)
        for i in range(30):
            r.from_pod("p1", syn(POD1, VIP, 20000 + i, 80))
        return chosen(r, dst=VIP)
    assert picks(11) == picks(11)
    assert picks(11) != picks(12)


def test_round_robin_rotates_exactly():
    rig = Rig(nat={"scheduler": "rr"})
    for i in range(9):
        rig.from_pod("p1", syn(POD1, VIP, 20000 + i, 80))
    assert chosen(rig, dst=VIP) == [POD2, POD3, REMOTE_EP] * 3
    out = rig.out()
    assert (len(out["p2"]), len(out["p3"]), len(out["up"])) == (3, 3, 3)


def test_source_hash_keeps_a_client_on_one_endpoint():
    rig = Rig(nat={"scheduler": "sh"})
    for i in range(20):
        rig.from_pod("p1", syn(POD1, VIP, 20000 + i, 80))
    assert len(set(chosen(rig, dst=VIP))) == 1
    # many clients (outside, through the externalIP): each sticks, and together they use every endpoint
    per_client = {}
    for c in range(60):
        client = f"198.51.100.{c + 1}"
        for k in range(3):
            rig.from_up(syn(client, EXT_IP, 30000 + k, 80))
        eps = set(chosen(rig, src=client))
        assert len(eps) == 1, (client, eps)
        per_client[client] = eps.pop()
    assert set(per_client.values()) == {POD2, POD3, REMOTE_EP}


def test_least_connection_prefers_the_least_loaded_endpoint():
    rig = Rig(nat={"scheduler": "lc"})
    for i in range(4):
        rig.from_pod("p1", syn(POD1, VIP, 20000 + i, 80))
    assert chosen(rig, dst=VIP) == [POD2, POD3, REMOTE_EP, POD2]
    # the connection to p3 goes away: p3 is now the least loaded, the others have 2 and 1
    assert rig.n.conntrack_flush(sport=20001) == 1
    rig.from_pod("p1", syn(POD1, VIP, 20010, 80))
    assert rig.conn(sport=20010)["endpoint"] == f"{POD3}:8080"
    rig.from_pod("p1", syn(POD1, VIP, 20011, 80))  # all at 1 except p2 (2): first of the least, p3
    assert rig.conn(sport=20011)["endpoint"] == f"{POD3}:8080"
    rig.from_pod("p1", syn(POD1, VIP, 20012, 80))
    assert rig.conn(sport=20012)["endpoint"] == f"{REMOTE_EP}:8080"
    # once every entry has timed out (SYN_SENT: 120 s), nothing is live and the first endpoint wins again
    rig.clock.t += 121
    rig.n.tick()
    assert rig.n.show("conntrack") == []
    rig.from_pod("p1", syn(POD1, VIP, 20013, 80))
    assert rig.conn(sport=20013)["endpoint"] == f"{POD2}:8080"


def test_maglev_is_consistent_and_disrupts_little_on_endpoint_removal():
    rig = Rig(nat={"scheduler": "mh"})
    clients = [f"198.51.100.{c}" for c in range(1, 201)]
    before = {}
    for c in clients:
        for k in range(2):
            rig.from_up(syn(c, EXT_IP, 30000 + k, 80))
        eps = set(chosen(rig, src=c))
        assert len(eps) == 1, (c, eps)
        before[c] = eps.pop()
    spread = Counter(before.values())
    assert set(spread) == {POD2, POD3, REMOTE_EP} and min(spread.values()) >= 30, spread
    # p3 leaves the Service
    rig.n.apply_manifests(text(endpoints("ext", [(POD2, "n1"), (REMOTE_EP, "n2")])))
    rig.n.conntrack_flush()
    after = {}
    for c in clients:
        rig.from_up(syn(c, EXT_IP, 31000, 80))
        after[c] = rig.conn(src=c, sport=31000)["endpoint"].split(":")[0]
    assert POD3 not in after.values()
    stayed = [c for c in clients if before[c] != POD3]
    moved = [c for c in stayed if after[c] != before[c]]
    # Maglev's promise is minimal disruption: clients of the remaining endpoints (almost all) stay put.
    # (Exact "only the removed endpoint's clients move" is not guaranteed by Maglev; allow a few percent.)
    assert len(moved) <= 0.05 * len(stayed), (len(moved), len(stayed))


# --- 3. no endpoints ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("proto", ["udp", "tcp"])
def test_service_without_endpoints_rejects_with_port_unreachable(rig, proto):
    pkt = dgram(POD1, VIP_EMPTY, 5555, 53) if proto == "udp" else syn(POD1, VIP_EMPTY, 5555, 80)
    sent = bytes(pkt)
    rig.from_pod("p1", pkt)
    f = rig.only("p1")
    assert f.dst == P1 and f.src == rig.rmac
    assert (f[IP].src, f[IP].dst, f[IP].proto) == (RTR_PODS, POD1, 1)
    assert (f[ICMP].type, f[ICMP].code) == (3, 3)
    assert checksums_ok(f)
    q = quote(f)
    assert len(q) >= 28
    inner = IP(q)
    # the quote is the client's packet as sent to the Service (never DNATed: there is no endpoint)
    assert (inner.src, inner.dst, inner.proto) == (POD1, VIP_EMPTY, 6 if proto == "tcp" else 17)
    assert q[20:28] == sent[20:28]  # ports (and the rest of the first 8 L4 bytes) untouched
    assert ip_header_ok(q[:20])
    assert rig.n.show("conntrack") == []


def test_service_without_endpoints_is_refused_in_forward_after_the_ttl_check(rig):
    """kube-proxy's REJECT (and the policy-Local DROP) sit in the filter table's FORWARD chain: ip_forward
    checks and decrements the TTL first."""
    rig.from_pod("p1", syn(POD1, VIP_EMPTY, 5556, 80, ttl=1))
    f = rig.only("p1")
    assert (f[ICMP].type, f[ICMP].code, IP(quote(f)).ttl) == (11, 0, 1)  # time exceeded, not port unreachable
    rig.clock.t += 2  # a fresh ICMP rate-limit token
    rig.from_pod("p1", syn(POD1, VIP_EMPTY, 5557, 80, ttl=64))
    f = rig.only("p1")
    assert (f[ICMP].type, f[ICMP].code, IP(quote(f)).ttl) == (3, 3, 63)  # the quote after the decrement
    rig.clock.t += 2
    rig.from_pod("p1", syn(POD1, VIP_ITP_NONE, 5558, 80, ttl=1))  # DROP, also in FORWARD
    assert (rig.only("p1")[ICMP].type, rig.drops("nat-postrouting", "no-local-endpoint")) == (11, 0)
    assert rig.n.show("conntrack") == []


def test_node_port_without_endpoints_is_refused_in_input_without_ttl_handling(rig):
    rig.n.apply_manifests(text(service("np-empty", "10.96.0.54", [sport_(80, 8080, node_port=30091)], "NodePort")))
    rig.from_up(syn(PEER, RTR_UP, 45100, 30091, ttl=1), src_mac=PEER_MAC)
    f = rig.only("up")
    assert (f[IP].dst, f[ICMP].type, f[ICMP].code, IP(quote(f)).ttl) == (PEER, 3, 3, 1)


# --- 4. session affinity ------------------------------------------------------------------------------------

def test_session_affinity_client_ip(rig):
    for i in range(30):
        rig.from_pod("p1", syn(POD1, VIP_STICKY, 20000 + i, 80))
    assert len(set(chosen(rig, dst=VIP_STICKY))) == 1
    # other clients (outside the cluster, straight to the ClusterIP): each sticks, together they spread
    per_client = {}
    for c in range(1, 31):
        client = f"198.51.100.{c}"
        for k in range(4):
            rig.from_up(syn(client, VIP_STICKY, 30000 + k, 80))
        eps = set(chosen(rig, src=client))
        assert len(eps) == 1, (client, eps)
        per_client[client] = eps.pop()
    assert len(set(per_client.values())) == 3


def test_session_affinity_survives_new_connections_after_old_ones_close(rig):
    rig.from_pod("p1", syn(POD1, VIP_STICKY, 20000, 80))
    first = rig.conn(dst=VIP_STICKY)["endpoint"]
    rig.n.conntrack_flush()
    rig.clock.t += 3600  # well inside the 10800 s default
    for i in range(10):
        rig.from_pod("p1", syn(POD1, VIP_STICKY, 21000 + i, 80))
    assert {r["endpoint"] for r in rig.conns(dst=VIP_STICKY)} == {first}


def test_session_affinity_survives_an_unrelated_apply(rig):
    clients = [f"198.51.100.{c}" for c in range(1, 13)]
    first = {}
    for c in clients:
        rig.from_up(syn(c, VIP_STICKY, 30000, 80))
        first[c] = rig.conn(src=c)["endpoint"]
    rig.n.apply_manifests(text(service("other", "10.96.1.1", [sport_(80, 8080)])))  # nothing to do with sticky
    for c in clients:
        rig.from_up(syn(c, VIP_STICKY, 30001, 80))
    assert {c: rig.conn(src=c, sport=30001)["endpoint"] for c in clients} == first


# --- 5. NodePort, externalIPs, LoadBalancer, traffic policies ------------------------------------------------

@pytest.mark.parametrize("where", ["local", "remote"])
def test_nodeport_from_outside_is_dnated_masqueraded_and_replies_translated(rig, where):
    node_port, ep = (NP_LOCAL, POD2) if where == "local" else (NP_REMOTE, REMOTE_EP)
    masq = RTR_PODS if where == "local" else RTR_UP
    rig.from_up(syn(PEER, RTR_UP, 45000, node_port), src_mac=PEER_MAC)
    f = rig.only(EP_PORT[ep])
    # policy Cluster: masqueraded to the egress interface's address, source port kept (free)
    assert tcp_out(f) == (masq, 45000, ep, 8080) and checksums_ok(f)
    row = rig.conn(src=PEER)
    assert row["masquerade"] is True
    assert row["reply"] == {"src": ep, "dst": masq, "sport": 8080, "dport": 45000}

    sa = syn(ep, masq, 8080, 45000, flags="SA")
    if where == "local":
        rig.from_pod("p2", sa)  # to its gateway: the masquerade address is the router's
    else:
        rig.from_up(sa)
    f = rig.only("up")
    assert tcp_out(f) == (RTR_UP, node_port, PEER, 45000)
    assert f.dst == PEER_MAC and f.src == rig.umac and f[TCP].flags == "SA" and checksums_ok(f)
    rig.from_up(syn(PEER, RTR_UP, 45000, node_port, flags="A"), src_mac=PEER_MAC)
    f = rig.only(EP_PORT[ep])
    assert tcp_out(f) == (masq, 45000, ep, 8080)
    assert rig.conn(src=PEER)["state"] == "ESTABLISHED"


def test_nodeport_on_every_node_address(rig):
    """The pods' gateway address is a node address too (KUBE-NODEPORTS matches --dst-type LOCAL)."""
    rig.from_pod("p1", syn(POD1, RTR_PODS, 45001, NP_REMOTE))
    f = rig.only("up")
    assert (f[IP].dst, f[TCP].dport) == (REMOTE_EP, 8080)
    # external policy Cluster: even a pod client is masqueraded (KUBE-EXT marks everything)
    assert f[IP].src == RTR_UP


def test_nodeport_with_masquerade_port_clash_takes_another_port(rig):
    # two outside clients use the same source port; both land on the one endpoint and masquerade to 10.244.1.1
    rig.from_up(syn(PEER, RTR_UP, 45000, NP_LOCAL), src_mac=PEER_MAC)
    rig.from_up(syn("198.51.100.7", RTR_UP, 45000, NP_LOCAL), src_mac=DGW_MAC)  # behind the default gateway
    out = rig.out()["p2"]
    assert len(out) == 2 and out[0][TCP].sport == 45000
    second = out[1][TCP].sport
    assert second != 45000 and 1024 <= second <= 65535 and out[1][IP].src == RTR_PODS
    # the reply to the second one reaches the second client
    rig.from_pod("p2", syn(POD2, RTR_PODS, 8080, second, flags="SA"))
    f = rig.only("up")
    assert tcp_out(f) == (RTR_UP, NP_LOCAL, "198.51.100.7", 45000) and f.dst == DGW_MAC and checksums_ok(f)


def test_external_traffic_policy_local_keeps_client_ip_and_local_endpoints(rig):
    for i in range(20):
        rig.from_up(syn(PEER, RTR_UP, 46000 + i, NP_ETP), src_mac=PEER_MAC)
    out = rig.out()
    assert len(out["p3"]) == 20 and not out["up"] and not out["p2"]
    for f in out["p3"]:
        assert f[IP].src == PEER and (f[IP].dst, f[TCP].dport) == (POD3, 8080) and checksums_ok(f)
    assert all(not r["masquerade"] for r in rig.conns(src=PEER))
    # the endpoint answers the client itself (via its gateway): un-DNATed to the node's address and port
    rig.from_pod("p3", syn(POD3, PEER, 8080, 46000, flags="SA"))
    f = rig.only("up")
    assert tcp_out(f) == (RTR_UP, NP_ETP, PEER, 46000) and checksums_ok(f)


def test_external_traffic_policy_local_without_local_endpoint_drops(rig):
    rig.from_up(syn(PEER, RTR_UP, 47000, NP_ETP_NONE), src_mac=PEER_MAC)
    rig.nothing()
    assert rig.drops("nat-prerouting", "no-local-endpoint") == 1
    assert rig.n.show("conntrack") == []
    # a pod client counts as internal: it gets every endpoint, even with policy Local
    rig.from_pod("p1", syn(POD1, RTR_UP, 47001, NP_ETP_NONE))
    f = rig.only("up")
    assert (f[IP].src, f[IP].dst) == (POD1, REMOTE_EP)


def test_internal_traffic_policy_local(rig):
    for i in range(10):
        rig.from_pod("p1", syn(POD1, VIP_ITP, 48000 + i, 80))
    assert set(chosen(rig, dst=VIP_ITP)) == {POD3}
    rig.out()
    rig.from_pod("p1", syn(POD1, VIP_ITP_NONE, 48100, 80))
    rig.nothing()
    # kube-proxy's DROP is in the filter table's FORWARD, after routing (nat-postrouting's place)
    assert rig.drops("nat-postrouting", "no-local-endpoint") == 1
    assert rig.drops("nat-prerouting", "no-local-endpoint") == 0


def test_external_ip_and_load_balancer_ip(rig):
    rig.from_up(syn(PEER, EXT_IP, 49000, 80), src_mac=PEER_MAC)
    out = [f for fs in rig.out().values() for f in fs]
    assert len(out) == 1 and (out[0][IP].dst, out[0][TCP].dport) in {(POD2, 8080), (POD3, 8080), (REMOTE_EP, 8080)}
    assert out[0][IP].src in (RTR_PODS, RTR_UP)  # policy Cluster: masqueraded
    rig.from_up(syn(PEER, LB_IP, 49001, 80), src_mac=PEER_MAC)
    f = rig.only("up")
    assert tcp_out(f) == (RTR_UP, 49001, REMOTE_EP, 8080)
    rig.from_up(syn(REMOTE_EP, RTR_UP, 8080, 49001, flags="SA"))
    f = rig.only("up")
    assert tcp_out(f) == (LB_IP, 80, PEER, 49001) and checksums_ok(f)


def test_clusterip_from_outside_the_cluster_is_masqueraded(rig):
    rig.from_up(syn(PEER, VIP_REMOTE, 49100, 80), src_mac=PEER_MAC)
    f = rig.only("up")
    assert tcp_out(f) == (RTR_UP, 49100, REMOTE_EP, 8080)
    rig.from_up(syn(REMOTE_EP, RTR_UP, 8080, 49100, flags="SA"))
    f = rig.only("up")
    assert tcp_out(f) == (VIP_REMOTE, 80, PEER, 49100) and checksums_ok(f)


# --- 6. hairpin ---------------------------------------------------------------------------------------------

def test_hairpin_pod_reaching_itself_through_its_service_is_masqueraded(rig):
    rig.from_pod("p2", syn(POD2, VIP_LOCAL, 50000, 80))
    f = rig.only("p2")
    # bridged back out its own (hairpin) port, as br_netfilter does: its own MAC both ways, TTL kept
    assert f.dst == P2 and f.src == P2 and f[IP].ttl == 64
    assert tcp_out(f) == (RTR_PODS, 50000, POD2, 8080) and checksums_ok(f)
    row = rig.conn(src=POD2)
    assert row["masquerade"] is True
    assert row["reply"] == {"src": POD2, "dst": RTR_PODS, "sport": 8080, "dport": 50000}
    # the pod answers the gateway address; un-SNATed onto the bridge, it is bridged back the same way
    rig.from_pod("p2", syn(POD2, RTR_PODS, 8080, 50000, flags="SA"))
    f = rig.only("p2")
    assert (f.dst, f.src, f[IP].ttl) == (P2, P2, 64)
    assert tcp_out(f) == (VIP_LOCAL, 80, POD2, 50000) and checksums_ok(f)
    rig.from_pod("p2", syn(POD2, VIP_LOCAL, 50000, 80, flags="A"))
    f = rig.only("p2")
    assert tcp_out(f) == (RTR_PODS, 50000, POD2, 8080)
    assert rig.conn(src=POD2)["state"] == "ESTABLISHED"


# --- 7. pod -> outside: ip-masq ------------------------------------------------------------------------------

@pytest.mark.parametrize("port,lo,hi", [(5353, 1024, 65535), (700, 600, 1023), (500, 1, 511)])
def test_pod_to_outside_is_masqueraded_keeping_the_port_when_free(rig, port, lo, hi):
    rig.from_pod("p1", dgram(POD1, INTERNET, port, 53, b"q1"))
    f = rig.only("up")
    assert f.dst == DGW_MAC and udp_out(f) == (RTR_UP, port, INTERNET, 53) and checksums_ok(f)
    # p2 uses the same source port to the same server: that reply tuple is taken, another port of the class
    rig.from_pod("p2", dgram(POD2, INTERNET, port, 53, b"q2"))
    g = rig.only("up")
    other = g[UDP].sport
    assert g[IP].src == RTR_UP and other != port and lo <= other <= hi and checksums_ok(g)
    assert rig.conn(src=POD2)["reply"] == {"src": INTERNET, "dst": RTR_UP, "sport": 53, "dport": other}
    # replies go back to the right pod with its own address and port
    rig.from_up(dgram(INTERNET, RTR_UP, 53, other, b"a2"), src_mac=DGW_MAC)
    f = rig.only("p2")
    assert udp_out(f) == (INTERNET, 53, POD2, port) and bytes(f[UDP].payload) == b"a2" and checksums_ok(f)
    rig.from_up(dgram(INTERNET, RTR_UP, 53, port, b"a1"), src_mac=DGW_MAC)
    f = rig.only("p1")
    assert udp_out(f) == (INTERNET, 53, POD1, port) and bytes(f[UDP].payload) == b"a1" and checksums_ok(f)


def test_pod_to_pod_is_never_masqueraded(rig):
    rig.from_pod("p1", dgram(POD1, REMOTE_EP, 5000, 6000))
    f = rig.only("up")
    assert udp_out(f) == (POD1, 5000, REMOTE_EP, 6000)
    assert rig.conn(src=POD1)["masquerade"] is False


def test_pod_to_node_network_is_masqueraded(rig):
    rig.from_pod("p1", syn(POD1, PEER, 5001, 22))
    f = rig.only("up")
    assert tcp_out(f) == (RTR_UP, 5001, PEER, 22) and f.dst == PEER_MAC and checksums_ok(f)


def test_outside_to_another_nodes_pod_is_masqueraded_but_not_to_our_own(rig):
    """flannel's `! -s CLUSTER -d CLUSTER -j MASQUERADE` (after `! -s CLUSTER -d POD_CIDR -j RETURN`):
    the remote pod's reply must come back through this node."""
    rig.from_up(dgram(PEER, REMOTE_EP, 5600, 9), src_mac=PEER_MAC)
    f = rig.only("up")
    assert f.dst == GW_MAC and udp_out(f) == (RTR_UP, 5600, REMOTE_EP, 9) and checksums_ok(f)
    assert rig.conn(src=PEER)["masquerade"] is True
    rig.from_up(dgram(REMOTE_EP, RTR_UP, 9, 5600))
    f = rig.only("up")
    assert f.dst == PEER_MAC and udp_out(f) == (REMOTE_EP, 9, PEER, 5600) and checksums_ok(f)
    rig.from_up(dgram(PEER, POD2, 5601, 9), src_mac=PEER_MAC)  # this node's pods see the client itself
    assert udp_out(rig.only("p2")) == (PEER, 5601, POD2, 9)
    assert Rig(nat={"masquerade": False}).n.nat.ip_masq(0xC0A80132, 0x0AF40205) is False


def test_masquerade_reaches_every_fragment_of_a_forwarded_packet(rig):
    """ip4-forward fragments before nat-postrouting (the kernel: after POSTROUTING): each piece gets the
    new source, the first one the port and the whole datagram's checksum update."""
    from scapy.layers.inet import defragment
    rig.n.router.ifaces["uplink"].mtu = 1000
    rig.from_up(dgram(PEER, REMOTE_EP, 5700, 9, b"f" * 1400), src_mac=PEER_MAC)
    frags = rig.out()["up"]
    assert len(frags) == 2 and all(f[IP].src == RTR_UP and ip_header_ok(bytes(f[IP])[:20]) for f in frags)
    (whole,) = defragment([f[IP] for f in frags])
    whole = IP(bytes(whole))
    assert udp_out(Ether() / whole) == (RTR_UP, 5700, REMOTE_EP, 9) and checksums_ok(Ether() / whole)


def test_masquerade_off_keeps_pod_source():
    rig = Rig(nat={"masquerade": False})
    rig.from_pod("p1", dgram(POD1, INTERNET, 5353, 53))
    assert udp_out(rig.only("up")) == (POD1, 5353, INTERNET, 53)


def test_masqueraded_ping_with_free_id_works(rig):
    rig.from_pod("p1", IP(src=POD1, dst=INTERNET) / ICMP(type=8, id=77, seq=1) / Raw(b"ping"))
    f = rig.only("up")
    assert (f[IP].src, f[ICMP].id) == (RTR_UP, 77) and checksums_ok(f)
    rig.from_up(IP(src=INTERNET, dst=RTR_UP) / ICMP(type=0, id=77, seq=1) / Raw(b"ping"), src_mac=DGW_MAC)
    f = rig.only("p1")
    assert (f[IP].src, f[IP].dst, f[ICMP].type, f[ICMP].id) == (INTERNET, POD1, 0, 77) and checksums_ok(f)


def test_masqueraded_ping_with_clashing_id_gets_its_reply(rig):
    rig.from_pod("p1", IP(src=POD1, dst=INTERNET) / ICMP(type=8, id=77, seq=1) / Raw(b"ping"))
    rig.only("up")
    rig.from_pod("p2", IP(src=POD2, dst=INTERNET) / ICMP(type=8, id=77, seq=1) / Raw(b"ping"))
    f = rig.only("up")
    new_id = f[ICMP].id
    assert f[IP].src == RTR_UP and new_id != 77 and checksums_ok(f)
    rig.from_up(IP(src=INTERNET, dst=RTR_UP) / ICMP(type=0, id=new_id, seq=1) / Raw(b"ping"), src_mac=DGW_MAC)
    f = rig.only("p2")
    assert (f[IP].src, f[IP].dst, f[ICMP].type, f[ICMP].id) == (INTERNET, POD2, 0, 77) and checksums_ok(f)


# --- 8. INVALID ---------------------------------------------------------------------------------------------

def test_syn_ack_without_connection_is_invalid_and_dropped(rig):
    rig.from_pod("p1", syn(POD1, VIP, 51000, 80, flags="SA"))
    rig.nothing()
    assert rig.invalid_drops() == 1
    assert rig.ct_stats()["invalid"] == 1
    assert rig.n.show("conntrack") == []
    # also for plain forwarded pod traffic (KUBE-FORWARD drops ctstate INVALID)
    rig.from_up(syn(REMOTE_EP, POD1, 8080, 51001, flags="SA"))
    rig.nothing()
    assert rig.invalid_drops() == 2


@pytest.mark.parametrize("flags", ["F", "R", "FA", "SF", ""])
def test_other_first_packets_are_invalid(rig, flags):
    rig.from_pod("p1", syn(POD1, VIP, 51002, 80, flags=flags))
    rig.nothing()
    assert rig.invalid_drops() == 1
    assert rig.n.show("conntrack") == []


def test_lone_ack_is_a_mid_stream_pickup(rig):
    rig.from_pod("p1", syn(POD1, VIP_REMOTE, 51003, 80, flags="A"))
    f = rig.only("up")
    assert tcp_out(f) == (POD1, 51003, REMOTE_EP, 8080) and checksums_ok(f)
    row = rig.conn(dst=VIP_REMOTE)
    # ESTABLISHED, capped at the unacknowledged timeout until a reply is seen
    assert (row["state"], row["timeout"], row["flags"]) == ("ESTABLISHED", 300, ["UNREPLIED"])
    rig.from_up(syn(REMOTE_EP, POD1, 8080, 51003, flags="A"))
    f = rig.only("p1")
    assert tcp_out(f) == (VIP_REMOTE, 80, POD1, 51003)
    rig.from_pod("p1", syn(POD1, VIP_REMOTE, 51003, 80, flags="A"))
    rig.only("up")
    row = rig.conn(dst=VIP_REMOTE)
    assert (row["state"], row["timeout"], row["flags"]) == ("ESTABLISHED", 86400, ["ASSURED"])


def test_invalid_packet_inside_a_connection_is_dropped_and_leaves_it_alone(rig):
    rig.from_pod("p1", syn(POD1, VIP_REMOTE, 51004, 80))
    rig.only("up")
    # a SYN-ACK from the client's side in SYN_SENT: sIV
    rig.from_pod("p1", syn(POD1, VIP_REMOTE, 51004, 80, flags="SA"))
    rig.nothing()
    assert rig.invalid_drops() == 1
    row = rig.conn(dst=VIP_REMOTE)
    assert (row["state"], row["packets"]) == ("SYN_SENT", [1, 0])


def test_icmp_error_without_connection_is_invalid_when_forwarded(rig):
    bogus = IP(src=POD1, dst="10.244.2.9") / UDP(sport=1, dport=2)
    rig.from_up(IP(src=REMOTE_EP, dst=POD1) / ICMP(type=3, code=3) / Raw(bytes(bogus)))
    rig.nothing()
    assert rig.invalid_drops() == 1


def test_bridged_syn_ack_without_connection_is_dropped(rig):
    """bridge-nf-call-iptables: pod-to-pod frames on one bridge pass conntrack and KUBE-FORWARD too."""
    rig.from_pod("p1", syn(POD1, POD3, 51100, 80, flags="SA"), dst_mac=P3)
    rig.nothing()
    assert rig.drops("nat-bridge", "invalid") == 1 and rig.ct_stats()["invalid"] == 1
    bogus = IP(src=POD3, dst=POD1) / UDP(sport=1, dport=2)
    rig.from_pod("p1", IP(src=POD1, dst=POD3) / ICMP(type=3, code=3) / Raw(bytes(bogus)), dst_mac=P3)
    rig.nothing()
    assert rig.drops("nat-bridge", "invalid") == 2
    assert rig.n.show("conntrack") == []


def test_bridged_connection_is_tracked_and_cached_once_established():
    rig = Rig(flow_cache=64)
    rig.from_pod("p1", syn(POD1, POD3, 51101, 80), dst_mac=P3)
    rig.only("p3")
    row = rig.conn(src=POD1, dst=POD3)
    assert (row["state"], row["flags"], row["service"]) == ("SYN_SENT", ["UNREPLIED"], None)
    rig.from_pod("p3", syn(POD3, POD1, 80, 51101, flags="SA"), dst_mac=P1)
    rig.from_pod("p1", syn(POD1, POD3, 51101, 80, flags="A"), dst_mac=P3)
    assert [len(fs) for fs in rig.out().values()] == [1, 0, 1, 0]
    assert (rig.conn(src=POD1)["state"], rig.conn(src=POD1)["flags"]) == ("ESTABLISHED", ["ASSURED"])
    for i in range(5):
        rig.from_pod("p1", syn(POD1, POD3, 51101, 80, flags="A", payload=b"data"), dst_mac=P3)
        f = rig.only("p3")
        assert (f.src, f[IP].ttl, bytes(f[TCP].payload)) == (P1, 64, b"data")
    assert rig.n.flows.hits == 4  # the third packet this way (the first data) recorded the flow, the rest replay it
    assert rig.conn(src=POD1)["packets"] == [7, 1]
    # a SYN-ACK in ESTABLISHED from the client's side is INVALID: the guard sends it to the slow path
    rig.from_pod("p1", syn(POD1, POD3, 51101, 80, flags="SA"), dst_mac=P3)
    rig.nothing()
    assert rig.drops("nat-bridge", "invalid") == 1


# --- 9. endpoint removal ------------------------------------------------------------------------------------

def test_removed_endpoint_loses_its_udp_entries_only(rig):
    for i in range(30):
        rig.from_pod("p1", dgram(POD1, VIP_DNS, 10000 + i, 53))
        rig.from_pod("p1", syn(POD1, VIP_DNS, 11000 + i, 53))
    rig.out()
    udp_before = {r["orig"]["sport"]: r["endpoint"] for r in rig.conns(proto="udp", dst=VIP_DNS)}
    tcp_before = {r["orig"]["sport"]: r["endpoint"] for r in rig.conns(proto="tcp", dst=VIP_DNS)}
    gone = [sp for sp, ep in udp_before.items() if ep == f"{POD3}:5353"]
    assert len(udp_before) == len(tcp_before) == 30 and gone
    assert any(ep == f"{POD3}:5353" for ep in tcp_before.values())

    res = rig.n.apply_manifests(text(endpoints("dns", [(POD2, "n1"), (REMOTE_EP, "n2")], DNS_PORTS)))
    assert res["stale_udp_removed"] == len(gone)
    udp_after = {r["orig"]["sport"]: r["endpoint"] for r in rig.conns(proto="udp", dst=VIP_DNS)}
    assert udp_after == {sp: ep for sp, ep in udp_before.items() if sp not in gone}
    # TCP entries, whichever endpoint, are left to close on their own (kube-proxy clears UDP only)
    assert {r["orig"]["sport"]: r["endpoint"] for r in rig.conns(proto="tcp", dst=VIP_DNS)} == tcp_before
    assert rig.ct_stats()["stale_udp_removed"] == len(gone)
    # the next datagram of a flow that was on p3 picks a remaining endpoint
    rig.from_pod("p1", dgram(POD1, VIP_DNS, gone[0], 53))
    ep = rig.conn(proto="udp", sport=gone[0])["endpoint"]
    assert ep in (f"{POD2}:5353", f"{REMOTE_EP}:5353")
    f = rig.only(EP_PORT[ep.split(":")[0]])
    assert udp_out(f) == (POD1, gone[0], ep.split(":")[0], 5353)


def test_deleting_a_service_removes_its_udp_entries(rig):
    rig.from_pod("p1", dgram(POD1, VIP_DNS_REMOTE, 12000, 53))
    rig.out()
    assert len(rig.conns(dst=VIP_DNS_REMOTE)) == 1
    res = rig.n.apply_manifests(text(service("dns-remote", VIP_DNS_REMOTE, [sport_(53, 5353, "UDP")])),
                                delete=True)
    assert res["stale_udp_removed"] == 1 and rig.conns(dst=VIP_DNS_REMOTE) == []


def test_not_ready_endpoints_are_skipped_and_terminating_ones_are_the_fallback(rig):
    cond_nr = {"ready": False, "serving": False, "terminating": False}
    cond_term = {"ready": False, "serving": True, "terminating": True}
    rig.n.apply_manifests(text(endpoints("web", [(POD2, "n1", cond_nr), (POD3, "n1"), (REMOTE_EP, "n2", cond_nr)])))
    for i in range(10):
        rig.from_pod("p1", syn(POD1, VIP, 52000 + i, 80))
    assert set(chosen(rig, dst=VIP)) == {POD3}
    rig.n.conntrack_flush()
    rig.n.apply_manifests(text(endpoints("web", [(POD2, "n1", cond_nr), (POD3, "n1", cond_term),
                                                 (REMOTE_EP, "n2", cond_term)])))
    for i in range(20):
        rig.from_pod("p1", syn(POD1, VIP, 52100 + i, 80))
    assert set(chosen(rig, dst=VIP)) == {POD3, REMOTE_EP}
    # not ready and not serving anywhere: no endpoint at all, so REJECT
    rig.n.conntrack_flush()
    rig.out()
    rig.n.apply_manifests(text(endpoints("web", [(POD2, "n1", cond_nr)])))
    rig.from_pod("p1", syn(POD1, VIP, 52200, 80))
    f = rig.only("p1")
    assert (f[ICMP].type, f[ICMP].code) == (3, 3)


# --- 10. RELATED ICMP errors ---------------------------------------------------------------------------------

def _port_unreach_from_endpoint(rig, where):
    vip, ep = (VIP_DNS_LOCAL, POD2) if where == "same-bridge" else (VIP_DNS_REMOTE, REMOTE_EP)
    sent = dgram(POD1, vip, 33000, 53, b"lookup example.org")
    orig_udp_csum = IP(bytes(sent))[UDP].chksum
    rig.from_pod("p1", sent)
    got = rig.only(EP_PORT[ep])
    assert udp_out(got) == (POD1, 33000, ep, 5353)
    err = IP(src=ep, dst=POD1) / ICMP(type=3, code=3) / Raw(bytes(got[IP]))
    if where == "same-bridge":
        rig.from_pod("p2", err, dst_mac=P1)
    else:
        rig.from_up(err)
    return vip, orig_udp_csum


def _check_translated_port_unreach(f, vip, orig_udp_csum):
    assert (f[IP].src, f[IP].dst) == (vip, POD1), "outer source must be the Service address"
    assert (f[ICMP].type, f[ICMP].code) == (3, 3)
    assert checksums_ok(f)  # outer IP and the ICMP checksum over the rewritten quote
    q = quote(f)
    inner = IP(q)
    assert (inner.src, inner.dst) == (POD1, vip)
    assert struct.unpack("!HH", q[20:24]) == (33000, 53)
    assert ip_header_ok(q[:20])
    assert struct.unpack("!H", q[26:28])[0] == orig_udp_csum  # the quoted UDP checksum as the client sent it


def test_icmp_error_from_remote_endpoint_is_translated_back(rig):
    vip, csum = _port_unreach_from_endpoint(rig, "remote-node")
    _check_translated_port_unreach(rig.only("p1"), vip, csum)


def test_icmp_error_from_same_bridge_endpoint_is_translated_back(rig):
    vip, csum = _port_unreach_from_endpoint(rig, "same-bridge")
    _check_translated_port_unreach(rig.only("p1"), vip, csum)


def test_icmp_error_for_masqueraded_flow_from_the_server_is_translated(rig):
    sent = dgram(POD1, INTERNET, 34000, 53)
    rig.from_pod("p1", sent)
    got = rig.only("up")
    rig.from_up(IP(src=INTERNET, dst=RTR_UP) / ICMP(type=3, code=3) / Raw(bytes(got[IP])), src_mac=DGW_MAC)
    f = rig.only("p1")
    assert (f[IP].src, f[IP].dst) == (INTERNET, POD1) and checksums_ok(f)
    q = quote(f)
    assert (IP(q).src, IP(q).dst, struct.unpack("!HH", q[20:24])) == (POD1, INTERNET, (34000, 53))
    assert ip_header_ok(q[:20])


def test_icmp_error_from_an_intermediate_router_keeps_its_source(rig):
    rig.from_pod("p1", dgram(POD1, INTERNET, 34001, 33434, ttl=2))
    got = rig.only("up")
    assert got[IP].src == RTR_UP
    rig.from_up(IP(src=DGW, dst=RTR_UP) / ICMP(type=11, code=0) / Raw(bytes(got[IP])[:28]), src_mac=DGW_MAC)
    f = rig.only("p1")
    q = quote(f)
    assert (IP(q).src, struct.unpack("!H", q[20:22])[0]) == (POD1, 34001)  # quote un-masqueraded
    assert (f[IP].src, f[IP].dst) == (DGW, POD1), "traceroute must see the hop that answered"


def test_router_generated_icmp_error_about_a_dnated_packet_is_translated(rig):
    rig.from_pod("p1", syn(POD1, VIP_REMOTE, 35000, 80))
    rig.only("up")
    rig.from_up(syn(REMOTE_EP, POD1, 8080, 35000, flags="SA"))
    rig.only("p1")
    rig.from_pod("p1", syn(POD1, VIP_REMOTE, 35000, 80, flags="A"))
    rig.only("up")
    rig.from_pod("p1", syn(POD1, VIP_REMOTE, 35000, 80, flags="PA", payload=b"x", ttl=1))
    f = rig.only("p1")
    assert (f[ICMP].type, f[ICMP].code) == (11, 0) and checksums_ok(f)
    q = quote(f)
    assert (IP(q).src, IP(q).dst, struct.unpack("!HH", q[20:24])) == (POD1, VIP_REMOTE, (35000, 80))


def test_router_icmp_error_about_a_new_dnated_packet_quotes_the_service(rig):
    """ip_forward's TTL check comes after DNAT: the error is RELATED to the (unconfirmed) connection
    (icmp_glue_bits -> nf_ct_attach) and translated back; the dead packet leaves no entry."""
    rig.from_pod("p1", syn(POD1, VIP_REMOTE, 47000, 80, ttl=1))
    f = rig.only("p1")
    assert (f[ICMP].type, f[ICMP].code, f[IP].dst) == (11, 0, POD1) and checksums_ok(f)
    q = quote(f)
    assert (IP(q).src, IP(q).dst, struct.unpack("!HH", q[20:24])) == (POD1, VIP_REMOTE, (47000, 80))
    assert ip_header_ok(q[:20])
    assert rig.n.show("conntrack") == []


def test_router_icmp_error_about_an_established_masqueraded_flow_comes_from_the_gateway(rig):
    rig.from_pod("p1", dgram(POD1, INTERNET, 47002, 53, ttl=1))  # first packet: not yet masqueraded
    f = rig.only("p1")
    assert (f[ICMP].type, f[IP].src) == (11, RTR_PODS)
    rig.from_pod("p1", dgram(POD1, INTERNET, 47001, 53))
    rig.from_up(dgram(INTERNET, RTR_UP, 53, 47001), src_mac=DGW_MAC)
    rig.out()
    rig.from_pod("p1", dgram(POD1, INTERNET, 47001, 53, ttl=1))
    f = rig.only("p1")
    q = quote(f)
    assert (IP(q).src, IP(q).dst, struct.unpack("!HH", q[20:24])) == (POD1, INTERNET, (47001, 53))
    assert checksums_ok(f)
    assert (f[ICMP].type, f[IP].src, f[IP].dst) == (11, RTR_PODS, POD1), "the same hop, the same address"


# --- 11. table limit ----------------------------------------------------------------------------------------

def test_full_table_refuses_new_connections_and_keeps_established_ones():
    rig = Rig(nat={"conntrack": {"max": 2}})
    for sp in (36000, 36001):
        rig.from_pod("p1", syn(POD1, VIP_REMOTE, sp, 80))
        rig.only("up")
    rig.from_pod("p1", syn(POD1, VIP_REMOTE, 36002, 80))
    rig.nothing()
    assert rig.drops("nat-postrouting", "conntrack-full") == 1
    st = rig.ct_stats()
    assert (st["dropped_full"], st["entries"], st["max"]) == (1, 2, 2)
    assert sorted(r["orig"]["sport"] for r in rig.n.show("conntrack")) == [36000, 36001]
    # the first two keep working both ways
    for sp in (36000, 36001):
        rig.from_up(syn(REMOTE_EP, POD1, 8080, sp, flags="SA"))
        assert tcp_out(rig.only("p1")) == (VIP_REMOTE, 80, POD1, sp)
        rig.from_pod("p1", syn(POD1, VIP_REMOTE, sp, 80, flags="A"))
        assert tcp_out(rig.only("up")) == (POD1, sp, REMOTE_EP, 8080)
    # a masqueraded flow is a new connection too
    rig.from_pod("p1", dgram(POD1, INTERNET, 36003, 53))
    rig.nothing()
    assert rig.ct_stats()["dropped_full"] == 2
    # once one goes, there is room again
    assert rig.n.conntrack_flush(sport=36000) == 1
    rig.from_pod("p1", syn(POD1, VIP_REMOTE, 36002, 80))
    assert tcp_out(rig.only("up")) == (POD1, 36002, REMOTE_EP, 8080)


# --- 12. partial checksums (offloaded super-frames) --------------------------------------------------------

GSO_VNET = struct.pack("<BBHHHH", 1, 1, 54, 1448, 34, 16)  # NEEDS_CSUM, TCPV4, hdr_len, gso_size, csum_start/off


def _partial_frame(src, dst, sport, dport, size=4000):
    ip = IP(src=src, dst=dst, flags="DF") / TCP(sport=sport, dport=dport, flags="PA", seq=1, ack=1) / (b"s" * size)
    ip = IP(bytes(ip))  # lengths and header checksum filled in
    raw = bytearray(bytes(ip))
    tcp_len = len(raw) - 20
    raw[36:38] = struct.pack("!H", pseudo_sum(src, dst, 6, tcp_len))  # what the pod's stack leaves for the NIC
    return bytes(raw), tcp_len


def _sent_with_vnet(rig, port):
    bufs = rig.n.ports[port].sent
    rig.n.ports[port].sent = []
    return [b for b in bufs if not is_redirect(Ether(b[VNET_LEN:]))]


@pytest.mark.parametrize("where", ["same-bridge", "remote-node"])
def test_partial_checksum_frame_gets_the_pseudo_header_sum_for_the_new_addresses(rig, where):
    vip, ep = (VIP_LOCAL, POD2) if where == "same-bridge" else (VIP_REMOTE, REMOTE_EP)
    rig.from_pod("p1", syn(POD1, vip, 37000, 80))
    sa = syn(ep, POD1, 8080, 37000, flags="SA")
    rig.from_pod("p2", sa, dst_mac=P1) if where == "same-bridge" else rig.from_up(sa)
    rig.from_pod("p1", syn(POD1, vip, 37000, 80, flags="A"))
    rig.out()
    assert rig.conn(dst=vip)["state"] == "ESTABLISHED"
    raw, tcp_len = _partial_frame(POD1, vip, 37000, 80)
    rig.inject("p1", Ether(src=P1, dst=rig.rmac, type=0x0800) / Raw(raw), vnet=GSO_VNET)
    (buf,) = _sent_with_vnet(rig, EP_PORT[ep])
    assert buf[:VNET_LEN] == GSO_VNET  # the offload request travels on
    ip = bytes(buf[VNET_LEN + 14:])
    assert ip[12:16] == bytes(map(int, POD1.split("."))) and ip[16:20] == bytes(map(int, ep.split(".")))
    assert struct.unpack("!HH", ip[20:24]) == (37000, 8080)
    assert ip_header_ok(ip[:20])
    assert struct.unpack("!H", ip[36:38])[0] == pseudo_sum(POD1, ep, 6, tcp_len)
    assert ip[40:] == raw[40:]


def test_partial_checksum_frame_masqueraded_with_a_new_port(rig):
    # p2 takes 192.168.1.11:38000 -> 8.8.8.8:443 first, so p1's flow from port 38000 must move
    rig.from_pod("p2", syn(POD2, INTERNET, 38000, 443))
    rig.out()
    raw, tcp_len = _partial_frame(POD1, INTERNET, 38000, 443)  # a lone ACK+data: picked up mid-stream
    rig.inject("p1", Ether(src=P1, dst=rig.rmac, type=0x0800) / Raw(raw), vnet=GSO_VNET)
    (buf,) = _sent_with_vnet(rig, "up")
    ip = bytes(buf[VNET_LEN + 14:])
    sport = struct.unpack("!H", ip[20:22])[0]
    assert ip[12:16] == bytes([192, 168, 1, 11]) and sport != 38000 and 1024 <= sport <= 65535
    assert ip_header_ok(ip[:20])
    # the port is not in the pseudo-header: the field is the pseudo-header sum for the new addresses only
    assert struct.unpack("!H", ip[36:38])[0] == pseudo_sum(RTR_UP, INTERNET, 6, tcp_len)


def test_full_checksum_udp_zero_checksum_stays_zero(rig):
    pkt = IP(bytes(dgram(POD1, VIP_DNS_REMOTE, 39000, 53)))
    raw = bytearray(bytes(pkt))
    raw[26:28] = b"\0\0"  # UDP without checksum
    rig.inject("p1", Ether(src=P1, dst=rig.rmac, type=0x0800) / Raw(bytes(raw)))
    f = rig.only("up")
    assert udp_out(f) == (POD1, 39000, REMOTE_EP, 5353) and f[UDP].chksum == 0


# --- 13. config and manifest errors ---------------------------------------------------------------------------

def test_invalid_manifest_raises_and_leaves_services_in_force(rig):
    before = rig.n.show("services")
    bad = text(service("newsvc", "10.96.2.2", [sport_(80, 8080)]),
               service("web", VIP, [{"port": 0, "targetPort": 8080}]))
    with pytest.raises(ManifestError) as e:
        rig.n.apply_manifests(bad, "bad.yaml")
    assert "spec.ports[0].port" in str(e.value) and "bad.yaml" in str(e.value)
    assert rig.n.show("services") == before
    assert not any(r["service"] == "default/newsvc" for r in rig.n.show("services"))
    with pytest.raises(ManifestError):
        rig.n.apply_manifests("kind: [unclosed")
    assert rig.n.show("services") == before
    rig.from_pod("p1", syn(POD1, VIP_REMOTE, 40500, 80))
    assert tcp_out(rig.only("up")) == (POD1, 40500, REMOTE_EP, 8080)


def test_node_port_already_used_by_another_service_is_refused(rig):
    dup = text(service("np-dup", "10.96.3.3", [sport_(80, 8080, node_port=NP_LOCAL)], "NodePort"))
    with pytest.raises(ManifestError) as e:
        rig.n.apply_manifests(dup)
    assert str(NP_LOCAL) in str(e.value)
    assert not any(r["service"] == "default/np-dup" for r in rig.n.show("services"))
    # re-applying the owner with its own node port is fine
    rig.n.apply_manifests(text(service("np-local", "10.96.0.50", [sport_(80, 8080, node_port=NP_LOCAL)],
                                       "NodePort")))
    rig.from_up(syn(PEER, RTR_UP, 40600, NP_LOCAL), src_mac=PEER_MAC)
    assert tcp_out(rig.only("p2")) == (RTR_PODS, 40600, POD2, 8080)
    # two Services in one input claiming the same node port
    two = text(service("a", "10.96.4.1", [sport_(80, 8080, node_port=31000)], "NodePort"),
               service("b", "10.96.4.2", [sport_(80, 8080, node_port=31000)], "NodePort"))
    with pytest.raises(ManifestError):
        rig.n.apply_manifests(two)


def test_config_nat_needs_a_router_and_known_values():
    cfg = copy.deepcopy(CFG)
    del cfg["router"]
    with pytest.raises(ConfigError) as e:
        parse(cfg)
    assert "nat" in str(e.value)
    for bad in ({"scheduler": "wrr"}, {"scheduler": "RANDOM"}, {"clusterCIDR": "10.244.0.0/33"},
                {"conntrack": {"max": 0}}, {"conntrack": {"profile": "fast"}}, {"nodePortRange": "32767-30000"},
                {"bogus": 1}):
        cfg = copy.deepcopy(CFG)
        cfg["nat"].update(bad)
        with pytest.raises(ConfigError):
            parse(cfg)
    for good in ("random", "rr", "lc", "sh", "mh"):
        cfg = copy.deepcopy(CFG)
        cfg["nat"]["scheduler"] = good
        assert parse(cfg).nat["scheduler"] == good


def test_node_without_nat_has_no_services():
    cfg = copy.deepcopy(CFG)
    del cfg["nat"]
    n = Node(parse(cfg))
    with pytest.raises(KeyError):
        n.apply_manifests(STANDARD)
    with pytest.raises(KeyError):
        n.show("conntrack")


# --- 14. timeouts -------------------------------------------------------------------------------------------

def test_unreplied_udp_entry_expires_after_30_seconds(rig):
    rig.from_pod("p1", dgram(POD1, VIP_DNS_REMOTE, 41000, 53))
    rig.out()
    assert rig.conn(dst=VIP_DNS_REMOTE)["timeout"] == 30
    rig.clock.t += 29.5
    rig.n.tick()
    assert rig.conn(dst=VIP_DNS_REMOTE)["timeout"] == 1
    rig.clock.t += 0.5
    rig.n.tick()
    assert rig.conns(dst=VIP_DNS_REMOTE) == []
    assert rig.ct_stats()["expired"] == 1 and rig.ct_stats()["entries"] == 0


def test_udp_entry_is_refreshed_and_becomes_a_stream(rig):
    rig.from_pod("p1", dgram(POD1, VIP_DNS_REMOTE, 41001, 53))
    rig.clock.t += 20
    rig.from_pod("p1", dgram(POD1, VIP_DNS_REMOTE, 41001, 53))  # refreshed to 30 s from now
    rig.clock.t += 25
    rig.n.tick()
    assert rig.conn(dst=VIP_DNS_REMOTE)["timeout"] == 5
    rig.from_up(dgram(REMOTE_EP, POD1, 5353, 41001))  # the first reply: still 30 s, not yet assured
    row = rig.conn(dst=VIP_DNS_REMOTE)
    assert (row["timeout"], row["flags"]) == (30, [])
    rig.clock.t += 1
    rig.from_pod("p1", dgram(POD1, VIP_DNS_REMOTE, 41001, 53))  # replied and older than 2 s: a stream
    row = rig.conn(dst=VIP_DNS_REMOTE)
    assert (row["timeout"], row["flags"]) == (120, ["ASSURED"])


@pytest.mark.parametrize("profile,established", [(None, 86400), ("kernel", 432000)])
def test_tcp_timeouts_follow_the_state_and_profile(profile, established):
    rig = Rig(nat={"conntrack": {"profile": profile}} if profile else None)
    rig.from_pod("p1", syn(POD1, VIP_REMOTE, 42000, 80))
    assert rig.conn(dst=VIP_REMOTE)["timeout"] == 120
    rig.from_up(syn(REMOTE_EP, POD1, 8080, 42000, flags="SA"))
    assert rig.conn(dst=VIP_REMOTE)["timeout"] == 60
    rig.from_pod("p1", syn(POD1, VIP_REMOTE, 42000, 80, flags="A"))
    assert rig.conn(dst=VIP_REMOTE)["timeout"] == established
    rig.clock.t += established - 1
    rig.n.tick()
    assert rig.conn(dst=VIP_REMOTE)["state"] == "ESTABLISHED"
    rig.clock.t += 1
    rig.n.tick()
    assert rig.conns(dst=VIP_REMOTE) == []
    # FIN from the client: FIN_WAIT (120 s); an RST: CLOSE (10 s)
    rig.from_pod("p1", syn(POD1, VIP_REMOTE, 42001, 80, flags="S"))
    rig.from_up(syn(REMOTE_EP, POD1, 8080, 42001, flags="SA"))
    rig.from_pod("p1", syn(POD1, VIP_REMOTE, 42001, 80, flags="A"))
    rig.from_pod("p1", syn(POD1, VIP_REMOTE, 42001, 80, flags="FA"))
    assert (rig.conn(sport=42001)["state"], rig.conn(sport=42001)["timeout"]) == ("FIN_WAIT", 120)
    rig.from_up(syn(REMOTE_EP, POD1, 8080, 42001, flags="R"))
    assert (rig.conn(sport=42001)["state"], rig.conn(sport=42001)["timeout"]) == ("CLOSE", 10)


def test_expired_entry_is_not_used_even_before_the_sweep(rig):
    rig.from_pod("p1", dgram(POD1, VIP_DNS_REMOTE, 43000, 53))
    rig.out()
    rig.clock.t += 31  # no tick: the entry has timed out but is still in the table
    assert rig.conns(dst=VIP_DNS_REMOTE) == []  # rows never show expired entries
    # a late reply is not translated by the dead entry: it is a new, untranslated flow to the pod
    rig.from_up(dgram(REMOTE_EP, POD1, 5353, 43000))
    f = rig.only("p1")
    assert udp_out(f) == (REMOTE_EP, 5353, POD1, 43000)
    row = rig.conn(src=REMOTE_EP)
    assert row["service"] is None and row["orig"]["dport"] == 43000


def test_port_reuse_after_time_wait_reopens_the_connection(rig):
    sp = 42500
    rig.from_pod("p1", syn(POD1, VIP_REMOTE, sp, 80))
    rig.from_up(syn(REMOTE_EP, POD1, 8080, sp, flags="SA"))
    rig.from_pod("p1", syn(POD1, VIP_REMOTE, sp, 80, flags="A"))
    rig.from_pod("p1", syn(POD1, VIP_REMOTE, sp, 80, flags="FA"))
    rig.from_up(syn(REMOTE_EP, POD1, 8080, sp, flags="FA"))
    rig.from_pod("p1", syn(POD1, VIP_REMOTE, sp, 80, flags="A"))
    row = rig.conn(dst=VIP_REMOTE)
    assert (row["state"], row["timeout"]) == ("TIME_WAIT", 120)
    rig.out()
    rig.from_pod("p1", syn(POD1, VIP_REMOTE, sp, 80))  # a new SYN on the same tuple: a fresh connection
    assert tcp_out(rig.only("up")) == (POD1, sp, REMOTE_EP, 8080)
    row = rig.conn(dst=VIP_REMOTE)
    assert (row["state"], row["flags"], row["packets"]) == ("SYN_SENT", ["UNREPLIED"], [1, 0])


def test_session_affinity_expires_after_its_timeout(rig):
    rig.n.apply_manifests(text(
        service("brief", "10.96.0.41", [sport_(80, 8080)], sessionAffinity="ClientIP",
                sessionAffinityConfig={"clientIP": {"timeoutSeconds": 10}}),
        endpoints("brief", THREE)))
    clients = [f"198.51.100.{c}" for c in range(1, 16)]

    def picks(sport):
        out = {}
        for c in clients:
            rig.from_up(syn(c, "10.96.0.41", sport, 80))
            out[c] = rig.conn(src=c, sport=sport)["endpoint"]
        return out
    first = picks(30000)
    rig.clock.t += 9
    assert picks(30001) == first  # inside the timeout (and refreshed by use)
    rig.clock.t += 10.5
    assert picks(30002) != first  # expired: each client picks afresh (15 clients cannot all repeat by chance)


def test_icmp_error_quoting_a_whole_tcp_header_gets_its_checksum_translated(rig):
    sent = syn(POD1, VIP_REMOTE, 35500, 80)
    orig_csum = IP(bytes(sent))[TCP].chksum
    rig.from_pod("p1", sent)
    got = rig.only("up")
    rig.from_up(IP(src=REMOTE_EP, dst=POD1) / ICMP(type=3, code=1) / Raw(bytes(got[IP])))
    f = rig.only("p1")
    q = quote(f)
    assert (IP(q).dst, struct.unpack("!HH", q[20:24])) == (VIP_REMOTE, (35500, 80)) and checksums_ok(f)
    assert struct.unpack("!H", q[36:38])[0] == orig_csum


def test_reply_tuple_clash_remaps_the_source_port_instead_of_dropping(rig):
    # p1:46000 -> VIP_REMOTE:80 is DNATed to 10.244.2.5:8080, so its reply tuple is 10.244.2.5:8080 -> p1:46000
    rig.from_pod("p1", syn(POD1, VIP_REMOTE, 46000, 80))
    rig.only("up")
    # the same pod now connects to the endpoint directly from the same port: same reply tuple
    rig.from_pod("p1", syn(POD1, REMOTE_EP, 46000, 8080))
    f = rig.only("up")
    assert (f[IP].src, f[IP].dst, f[TCP].dport) == (POD1, REMOTE_EP, 8080)
    assert f[TCP].sport != 46000 and 1024 <= f[TCP].sport <= 65535


def test_bridged_reply_tuple_clash_remaps_the_source_port_both_ways(rig):
    # p1:46100 -> VIP_LOCAL:80 is DNATed to p2:8080: its reply tuple is p2:8080 -> p1:46100
    rig.from_pod("p1", syn(POD1, VIP_LOCAL, 46100, 80))
    rig.only("p2")
    # then straight to p2 over the bridge from the same port: the null binding moves the source port
    rig.from_pod("p1", syn(POD1, POD2, 46100, 8080), dst_mac=P2)
    f = rig.only("p2")
    moved = f[TCP].sport
    assert (f[IP].src, f[IP].dst, f.src) == (POD1, POD2, P1) and moved != 46100 and checksums_ok(f)
    rig.from_pod("p2", syn(POD2, POD1, 8080, moved, flags="SA"), dst_mac=P1)
    f = rig.only("p1")
    assert tcp_out(f) == (POD2, 8080, POD1, 46100) and checksums_ok(f)


def test_dry_run_trace_predicts_the_endpoint_without_side_effects():
    traced, plain = Rig(), Rig()
    frame = bytes(Ether(src=P1, dst=traced.rmac) / syn(POD1, VIP_STICKY, 20000, 80))
    for _ in range(3):
        pkt = traced.n.trace("p1", frame)
    rec = next(t["record"] for t in pkt.trace if t["stage"] == "nat-prerouting")
    assert (rec["ct"], rec["service"], rec["matched"]) == ("new", "default/sticky", "clusterIP")
    assert traced.n.show("conntrack") == [] and not any(traced.raw_all().values())
    # no scheduler draw, no affinity left behind: the traced node goes on exactly as an untraced twin
    for rig in (traced, plain):
        rig.from_pod("p1", syn(POD1, VIP_STICKY, 20000, 80))
        for i in range(20):
            rig.from_pod("p1", syn(POD1, VIP, 21000 + i, 80))
    assert traced.conn(sport=20000)["endpoint"] == rec["endpoint"] == plain.conn(sport=20000)["endpoint"]
    assert chosen(traced, dst=VIP) == chosen(plain, dst=VIP)


# --- the flow cache replays NAT exactly as the slow path decides --------------------------------------------

def _scen_frames(rig, scen, k):
    """(client port, client frame builder, server port, server frame builder) for connection k of a scenario."""
    r, u = rig.rmac, rig.umac
    L4 = {"tcp": lambda s, d, sp, dp, fl, pl: TCP(sport=sp, dport=dp, flags=fl, seq=1000, ack=5000) / Raw(pl),
          "udp": lambda s, d, sp, dp, fl, pl: UDP(sport=sp, dport=dp) / Raw(pl)}
    table = {
        "local": ("tcp", "p1", P1, r, POD1, VIP_LOCAL, 40000, 80, "p2", P2, P1, POD2, POD1, 8080),
        "remote": ("tcp", "p1", P1, r, POD1, VIP_REMOTE, 40100, 80, "up", GW_MAC, u, REMOTE_EP, POD1, 8080),
        "np": ("tcp", "up", PEER_MAC, u, PEER, RTR_UP, 45000, NP_LOCAL, "p2", P2, r, POD2, RTR_PODS, 8080),
        "masq": ("tcp", "p1", P1, r, POD1, PEER, 41000, 22, "up", PEER_MAC, u, PEER, RTR_UP, 22),
        "hairpin": ("tcp", "p2", P2, r, POD2, VIP_LOCAL, 50000, 80, "p2", P2, r, POD2, RTR_PODS, 8080),
        "dns-local": ("udp", "p1", P1, r, POD1, VIP_DNS_LOCAL, 42000, 53, "p2", P2, P1, POD2, POD1, 5353),
        "dns-remote": ("udp", "p1", P1, r, POD1, VIP_DNS_REMOTE, 42100, 53, "up", GW_MAC, u, REMOTE_EP, POD1, 5353),
        "udp-masq": ("udp", "p1", P1, r, POD1, INTERNET, 43000, 53, "up", DGW_MAC, u, INTERNET, RTR_UP, 53),
        "bridged": ("udp", "p1", P1, P3, POD1, POD3, 44000, 7, "p3", P3, P1, POD3, POD1, 7),
        "bridged-tcp": ("tcp", "p1", P1, P3, POD1, POD3, 44100, 9, "p3", P3, P1, POD3, POD1, 9),
    }
    proto, cport, cmac, cdst, csrc, cip, csp, cdp, sport_name, smac, sdst, ssrc, sip, ssp = table[scen]
    l4 = L4[proto]

    def client(flags="A", payload=b"c"):
        return cport, Ether(src=cmac, dst=cdst) / IP(src=csrc, dst=cip) / l4(csrc, cip, csp + k, cdp, flags, payload)

    def server(flags="A", payload=b"s"):
        return sport_name, Ether(src=smac, dst=sdst) / IP(src=ssrc, dst=sip) / l4(ssrc, sip, ssp, csp + k, flags,
                                                                                   payload)
    return client, server


TCP_SCEN = ["local", "remote", "np", "masq", "hairpin", "bridged-tcp"]
UDP_SCEN = ["dns-local", "dns-remote", "udp-masq", "bridged"]


class CachePair:
    """Two nodes alike but for the flow cache (off: the truth; on), fed the same frames at the same times."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.slow = Rig(flow_cache=0, clock=self.clock)
        self.fast = Rig(flow_cache=4096, clock=self.clock)
        assert self.slow.n.flows is None and self.fast.n.flows is not None

    def inject(self, which, make, vnet=None) -> None:
        """``make(rig)`` gives (port, frame); the MACs differ per node only if a router MAC is involved,
        and those are stable (derived from node and interface names), so both get the same bytes."""
        port, frame = make(self.slow)
        port2, frame2 = make(self.fast)
        assert port == port2 and bytes(frame) == bytes(frame2)
        for rig in (self.slow, self.fast):
            rig.inject(port, frame, vnet)
        self.compare(f"{which} {Ether(bytes(frame)).summary()}")

    def compare(self, what: str) -> None:
        for name in ("p1", "p2", "p3", "up"):
            a, b = self.slow.n.ports[name], self.fast.n.ports[name]
            assert b.sent == a.sent, f"port {name} differs after {what}"
            a.sent, b.sent = [], []

    def wait(self, seconds: float) -> None:
        self.clock.t += seconds
        for rig in (self.slow, self.fast):
            rig.n.tick()
            rig.n.expire()
        self.compare(f"wait {seconds}")

    def both(self, fn) -> None:
        fn(self.slow)
        fn(self.fast)
        self.compare("table change")

    def tables(self, rig) -> dict:
        n = rig.n
        stats = [r for r in n.show("stats") if r["stage"] != "(flow-cache)"]
        return {"conntrack": n.show("conntrack"), "stats": stats, "drops": n.show("drops"),
                "neigh": n.show("neigh"), "fdb": n.show("fdb"), "services": n.show("services")}

    def check_tables(self) -> None:
        assert self.tables(self.fast) == self.tables(self.slow)


def _run(pair: CachePair, ev: tuple) -> None:
    kind = ev[0]
    if kind in ("c", "s"):
        _, scen, k, flags, size = ev
        idx = 0 if kind == "c" else 1
        pair.inject(ev, lambda rig: _scen_frames(rig, scen, k)[idx](flags, b"x" * size))
    elif kind == "gso":
        _, scen, k = ev

        def make(rig):
            port, frame = _scen_frames(rig, scen, k)[0]("PA", b"")
            ip = frame[IP]
            raw, _ = _partial_frame(ip.src, ip.dst, ip[TCP].sport, ip[TCP].dport)
            return port, Ether(src=frame.src, dst=frame.dst, type=0x0800) / Raw(raw)
        pair.inject(ev, make, vnet=GSO_VNET)
    elif kind == "wait":
        pair.wait(ev[1])
    elif kind == "move":  # the local single-endpoint Services move between p2 and p3
        ep = ev[1]

        def apply(rig):
            rig.n.apply_manifests(text(endpoints("one-local", [(ep, "n1")]), endpoints("np-local", [(ep, "n1")]),
                                       endpoints("dns-local", [(ep, "n1")], (("", "UDP", 5353),))))
        pair.both(apply)
    elif kind == "flush":
        pair.both(lambda rig: rig.n.conntrack_flush(proto=ev[1]))
    elif kind == "announce":
        def announce(rig):
            for port, (mac, ip) in PODS.items():
                rig.inject(port, Ether(src=mac, dst=BCAST) / ARP(op=1, hwsrc=mac, psrc=ip, pdst=RTR_PODS))
            for mac, ip in ((GW_MAC, GW), (DGW_MAC, DGW), (PEER_MAC, PEER)):
                rig.inject("up", Ether(src=mac, dst=BCAST) / ARP(op=1, hwsrc=mac, psrc=ip, pdst=RTR_UP))
        pair.both(announce)


NAT_EVENTS = st.one_of(
    st.tuples(st.sampled_from(["c", "s"]), st.sampled_from(TCP_SCEN), st.integers(0, 1),
              st.sampled_from(["S", "SA", "A", "PA", "FA", "R"]), st.sampled_from([0, 40, 1200])),
    st.tuples(st.sampled_from(["c", "s"]), st.sampled_from(UDP_SCEN), st.integers(0, 1), st.just(""),
              st.sampled_from([1, 300])),
    st.tuples(st.just("gso"), st.sampled_from(["local", "remote", "masq"]), st.integers(0, 1)),
    st.tuples(st.just("wait"), st.sampled_from([0.5, 1.0, 1.5, 2.5, 31, 61, 125])),  # 2 s: UDP stream age
    st.tuples(st.just("move"), st.sampled_from([POD2, POD3])),
    st.tuples(st.just("flush"), st.sampled_from(["tcp", "udp"])),
    st.just(("announce",)),
)


def _established_everything(pair: CachePair) -> list:
    """Handshakes for every TCP scenario and replied UDP streams, so later packets can hit the cache."""
    evs = []
    for scen in TCP_SCEN:
        for k in (0, 1):
            evs += [("c", scen, k, "S", 0), ("s", scen, k, "SA", 0), ("c", scen, k, "A", 0),
                    ("c", scen, k, "PA", 40), ("s", scen, k, "PA", 40)]
    for scen in UDP_SCEN:
        for k in (0, 1):
            evs += [("c", scen, k, "", 1), ("s", scen, k, "", 1)]
    evs.append(("wait", 2.5))
    for scen in UDP_SCEN:
        for k in (0, 1):
            evs += [("c", scen, k, "", 1), ("s", scen, k, "", 1)]
    return evs


def test_flow_cache_replays_nat_like_the_slow_path():
    pair = CachePair()
    script = _established_everything(pair)
    for _ in range(3):  # steady traffic: the cached flows carry it
        for scen in TCP_SCEN:
            script += [("c", scen, 0, "PA", 1200), ("s", scen, 0, "A", 0), ("s", scen, 0, "PA", 1200)]
        for scen in UDP_SCEN:
            script += [("c", scen, 0, "", 300), ("s", scen, 0, "", 300)]
        script += [("gso", "local", 0), ("gso", "remote", 0), ("gso", "masq", 0)]
    script += [("move", POD3), ("c", "dns-local", 0, "", 1), ("c", "local", 0, "PA", 10),
               ("c", "local", 1, "FA", 0), ("s", "local", 1, "FA", 0), ("c", "local", 1, "A", 0),
               ("c", "local", 1, "PA", 5), ("wait", 61), ("c", "udp-masq", 0, "", 1), ("wait", 125),
               ("c", "dns-remote", 0, "", 1), ("flush", "tcp"), ("c", "remote", 0, "A", 1)]
    for ev in script:
        _run(pair, ev)
    pair.check_tables()
    hits = pair.fast.n.flows.hits
    assert hits > 40, f"the cache was hardly used ({hits} hits): the test would prove nothing"


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.booleans(), st.lists(NAT_EVENTS, min_size=1, max_size=40))
def test_flow_cache_replays_nat_like_the_slow_path_for_any_events(warm, events):
    pair = CachePair()
    for ev in (_established_everything(pair) if warm else []) + events:
        _run(pair, ev)
    pair.check_tables()


def test_local_endpoints_fall_back_to_terminating_on_their_own():
    """kube-proxy's CategorizeEndpoints: with no ready local endpoint, a serving+terminating local
    one is used for Local traffic even while a remote endpoint is ready (and only then)."""
    import random
    from types import SimpleNamespace
    from nat.services import Backend, ServicePort as SP
    svc = SimpleNamespace(namespace="default", name="web", session_affinity="None", affinity_timeout=0)
    sp = SimpleNamespace(name="", protocol="TCP")
    remote_ready = Backend(1, 80, "node2", True, True, False)
    local_term = Backend(2, 80, "node1", False, True, True)
    local_gone = Backend(3, 80, "node1", False, False, True)
    p = SP(svc, sp, [remote_ready, local_term, local_gone], "node1", "random", random.Random(1))
    assert p.usable == [remote_ready] and p.local == [local_term]
    local_ready = Backend(4, 80, "node1", True, True, False)
    p = SP(svc, sp, [remote_ready, local_term, local_ready], "node1", "random", random.Random(1))
    assert p.local == [local_ready]
