"""The flow cache gives exactly what the slow path gives.

Two nodes with the same config, one with the flow cache off (the truth) and
one with it on, get the same frames at the same times; after every frame
the frames each port sent must be identical byte for byte, and at the end
every counter and table too. Hypothesis draws the event sequences: routed
and bridged frames, TTL 1, bad checksums, frames over the MTU, super-frames,
neighbour and FDB changes, MAC moves, route changes, time passing.
"""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import ARP, Ether

from vswitch.config import parse
from vswitch.flowcache import flow_key
from vswitch.node import Node
from vswitch.packet import ZERO_VNET

POD_A, POD_B, GW, GW2 = "02:00:00:00:00:0a", "02:00:00:00:00:0b", "02:00:00:00:01:12", "02:00:00:00:01:99"
A_IP, B_IP, GW_IP, REMOTE = "10.244.1.5", "10.244.1.6", "192.168.1.12", "10.244.2.7"


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def make_node(flow_cache: int, clock: Clock) -> Node:
    """Pods a and b and an idle port c on the bridge (so a flood differs from a unicast), an uplink."""
    cfg = parse({"name": "n1", "flow_cache": flow_cache, "bridge": {"ageing": 60},
                 "ports": [{"name": "a", "type": "memory"}, {"name": "b", "type": "memory"},
                           {"name": "c", "type": "memory"}, {"name": "up", "type": "memory"}],
                 "router": {"interfaces": [{"name": "pods", "address": "10.244.1.1/24"},
                                           {"name": "uplink", "port": "up", "address": "192.168.1.11/24",
                                            "mtu": 1400}],
                            "routes": ["10.244.2.0/24 via 192.168.1.12"]},
                 "nat": {"clusterCIDR": "10.244.0.0/16"}})
    node = Node(cfg, clock=clock)
    node.router.neigh.rng = random.Random(7)  # reachable_time is randomised: the same draws on both
    node.nat.rng.seed(7)  # endpoint choice and masquerade ports too
    node.start(None)
    node.apply_manifests(SERVICE)
    return node


SERVICE = """
apiVersion: v1
kind: Service
metadata: {name: web}
spec: {clusterIP: 10.96.0.10, ports: [{port: 80, targetPort: 8080, protocol: TCP, name: t},
                                      {port: 53, targetPort: 5353, protocol: UDP, name: u}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: t, port: 8080, protocol: TCP}, {name: u, port: 5353, protocol: UDP}]
endpoints: [{addresses: [10.244.1.6]}, {addresses: [10.244.2.7]}]
"""


def gso_vnet(gso_size: int) -> bytes:
    # flags NEEDS_CSUM, gso TCPV4, hdr_len, gso_size, csum_start, csum_offset
    return struct.pack("<BBHHHH", 1, 1, 54, gso_size, 34, 16)


class Pair:
    def __init__(self) -> None:
        self.clock = Clock()
        self.slow = make_node(0, self.clock)
        self.fast = make_node(64, self.clock)
        self.rmac = self.slow.router.ifaces["pods"].mac.hex(":")
        self.umac = self.slow.router.ifaces["uplink"].mac.hex(":")
        assert self.rmac == self.fast.router.ifaces["pods"].mac.hex(":")

    def inject(self, port: str, frame, vnet: bytes = ZERO_VNET) -> None:
        data = bytes(frame)
        for node in (self.slow, self.fast):
            node.ports[port].inject(data, ts=self.clock.t, vnet=vnet)
        for name in self.slow.ports:
            got_slow, got_fast = self.slow.ports[name].take(), self.fast.ports[name].take()
            assert got_fast == got_slow, f"port {name} differs after {Ether(data).summary()}"

    def both(self, fn) -> None:
        fn(self.slow)
        fn(self.fast)

    def advance(self, seconds: float, sweep: bool = True) -> None:
        """Time passes; sweep=False: the FDB sweep (every second in the daemon) has not run yet."""
        self.clock.t += seconds
        for node in (self.slow, self.fast):
            node.tick()
            if sweep:
                node.expire()
        for name in self.slow.ports:
            assert self.fast.ports[name].take() == self.slow.ports[name].take(), f"port {name} differs on tick"

    def tables(self, node: Node) -> dict:
        stats = [r for r in node.show("stats") if r["stage"] != "(flow-cache)"]
        ports = [{k: v for k, v in r.items()} for r in node.show("ports")]
        return {"stats": stats, "drops": node.show("drops"), "ports": ports, "fdb": node.show("fdb"),
                "neigh": node.show("neigh"), "routes": node.show("routes"), "conntrack": node.show("conntrack")}

    def check_tables(self) -> None:
        assert self.tables(self.fast) == self.tables(self.slow)


# --- events ------------------------------------------------------------------

def ev_pod_to_remote(p: Pair, size: int, ttl: int, df: bool, port: str = "a", mac: str = POD_A) -> None:
    p.inject(port, Ether(src=mac, dst=p.rmac) / IP(src=A_IP, dst=REMOTE, ttl=ttl, flags="DF" if df else 0) /
             UDP(sport=1234, dport=80) / (b"x" * size))


def ev_remote_to_pod(p: Pair, size: int, ttl: int) -> None:
    p.inject("up", Ether(src=GW, dst=p.umac) / IP(src=REMOTE, dst=A_IP, ttl=ttl) / UDP(sport=80, dport=1234) /
             (b"y" * size))


def ev_bad_checksum(p: Pair) -> None:
    p.inject("a", Ether(src=POD_A, dst=p.rmac) / IP(src=A_IP, dst=REMOTE, chksum=0x1234) / UDP() / b"z")


def ev_bridged(p: Pair) -> None:
    p.inject("a", Ether(src=POD_A, dst=POD_B) / IP(src=A_IP, dst=B_IP) / UDP() / b"l2")


def ev_from_b(p: Pair) -> None:
    p.inject("b", Ether(src=POD_B, dst=p.rmac) / IP(src=B_IP, dst=REMOTE) / UDP() / b"b")


def ev_gso(p: Pair, gso_size: int) -> None:
    frame = Ether(src=POD_A, dst=p.rmac) / IP(src=A_IP, dst=REMOTE, flags="DF") / TCP(sport=5, dport=6, flags="A") \
        / (b"s" * 4000)
    p.inject("a", frame, vnet=gso_vnet(gso_size))


def ev_gw_arp(p: Pair, mac: str) -> None:
    p.inject("up", Ether(src=mac, dst="ff:ff:ff:ff:ff:ff") / ARP(op=2, hwsrc=mac, psrc=GW_IP, pdst=GW_IP))


def ev_gw_reply(p: Pair, mac: str) -> None:
    p.inject("up", Ether(src=mac, dst=p.umac) / ARP(op=2, hwsrc=mac, psrc=GW_IP, hwdst=p.umac,
                                                     pdst="192.168.1.11"))


def ev_pod_arp(p: Pair) -> None:
    p.inject("a", Ether(src=POD_A, dst="ff:ff:ff:ff:ff:ff") / ARP(hwsrc=POD_A, psrc=A_IP, pdst="10.244.1.1"))


def ev_move_a_to_b(p: Pair) -> None:
    ev_pod_to_remote(p, 20, 64, False, port="b", mac=POD_A)


def ev_route_change(p: Pair) -> None:
    def swap(node: Node) -> None:
        r = node.router
        if any(x.plen == 25 for x in r.fib.routes()):
            r.fib.delete(0x0AF40200, 25)
        else:
            r.add_route("10.244.2.0/25 via 192.168.1.12 metric 5")
    p.both(swap)


def ev_svc(p: Pair, flags: str, proto: str) -> None:
    l4 = TCP(sport=4000, dport=80, flags=flags) if proto == "tcp" else UDP(sport=4000, dport=53)
    p.inject("a", Ether(src=POD_A, dst=p.rmac) / IP(src=A_IP, dst="10.96.0.10") / l4 / b"q")


def ev_svc_reply(p: Pair, flags: str, proto: str, remote: bool) -> None:
    l4 = TCP(sport=8080, dport=4000, flags=flags) if proto == "tcp" else UDP(sport=5353, dport=4000)
    if remote:
        p.inject("up", Ether(src=GW, dst=p.umac) / IP(src=REMOTE, dst=A_IP) / l4 / b"r")
    else:
        p.inject("b", Ether(src=POD_B, dst=POD_A) / IP(src=B_IP, dst=A_IP) / l4 / b"r")


EVENTS = st.one_of(
    st.builds(lambda f, pr: ("svc", f, pr), st.sampled_from(["S", "A", "PA", "FA", "R"]), st.sampled_from(["tcp", "udp"])),
    st.builds(lambda f, pr, r: ("svcreply", f, pr, r), st.sampled_from(["SA", "A", "FA"]),
              st.sampled_from(["tcp", "udp"]), st.booleans()),
    st.builds(lambda size, ttl, df: ("remote", size, ttl, df), st.sampled_from([10, 1300, 1500]),
              st.sampled_from([1, 2, 64]), st.booleans()),
    st.builds(lambda size, ttl: ("back", size, ttl), st.sampled_from([10, 1500]), st.sampled_from([1, 64])),
    st.just(("badsum",)), st.just(("bridged",)), st.just(("from_b",)),
    st.builds(lambda g: ("gso", g), st.sampled_from([1000, 1448])),
    st.builds(lambda m: ("gwarp", m), st.sampled_from([GW, GW2])),
    st.builds(lambda m: ("gwreply", m), st.sampled_from([GW, GW2])),
    st.just(("podarp",)), st.just(("move",)), st.just(("route",)),
    st.builds(lambda s: ("wait", s), st.sampled_from([0.5, 3, 6, 31, 61])),
    st.builds(lambda s: ("lag", s), st.sampled_from([59.5, 61])),
)


def run_event(p: Pair, ev: tuple) -> None:
    kind = ev[0]
    if kind == "svc":
        ev_svc(p, ev[1], ev[2])
    elif kind == "svcreply":
        ev_svc_reply(p, ev[1], ev[2], ev[3])
    elif kind == "remote":
        ev_pod_to_remote(p, ev[1], ev[2], ev[3])
    elif kind == "back":
        ev_remote_to_pod(p, ev[1], ev[2])
    elif kind == "badsum":
        ev_bad_checksum(p)
    elif kind == "bridged":
        ev_bridged(p)
    elif kind == "from_b":
        ev_from_b(p)
    elif kind == "gso":
        ev_gso(p, ev[1])
    elif kind == "gwarp":
        ev_gw_arp(p, ev[1])
    elif kind == "gwreply":
        ev_gw_reply(p, ev[1])
    elif kind == "podarp":
        ev_pod_arp(p)
    elif kind == "move":
        ev_move_a_to_b(p)
    elif kind == "route":
        ev_route_change(p)
    elif kind == "wait":
        p.advance(ev[1])
    elif kind == "lag":
        p.advance(ev[1], sweep=False)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(EVENTS, min_size=1, max_size=40))
def test_cache_matches_slow_path(events):
    p = Pair()
    # a warm start: the gateway resolved, both pods learned, flows cached
    ev_pod_to_remote(p, 10, 64, False)
    ev_gw_reply(p, GW)
    ev_pod_arp(p)
    ev_from_b(p)
    ev_bridged(p)
    for ev in events:
        for _ in range(2):  # the second frame of each kind is the one a cached flow may take
            run_event(p, ev)
    p.check_tables()


def test_established_flows_hit_the_cache():
    p = Pair()
    ev_pod_to_remote(p, 10, 64, False)
    ev_gw_reply(p, GW)
    ev_pod_arp(p)
    ev_from_b(p)  # learns pod b, so a -> b is a unicast, not a flood
    ev_bridged(p)  # bridged frames are tracked too (br_netfilter): a new entry is never cached
    ev_pod_to_remote(p, 10, 64, False)
    ev_remote_to_pod(p, 10, 64)  # the UDP conntrack entry has seen its reply ...
    p.advance(3)  # ... and lived 2 s: an assured stream, which the cache may replay
    for _ in range(10):
        ev_pod_to_remote(p, 10, 64, False)
        ev_remote_to_pod(p, 10, 64)
        ev_bridged(p)
    flows = p.fast.flows
    assert flows.hits >= 27  # all but the first frame of each of the three flows
    rows = p.fast.show("flows")
    assert {r["in_port"] for r in rows} == {"a", "up"}  # b sent one frame: a new connection is never cached
    routed = next(r for r in rows if r["in_port"] == "up")
    assert routed["stages"] == ["l3-input", "ip4-input", "nat-prerouting", "ip4-route", "ip4-lookup", "ip4-forward",
                                "nat-postrouting", "ip4-rewrite", "l2-forward", "port-tx"]
    p.check_tables()  # hits are credited to every stage they skipped


def test_guard_failure_takes_the_slow_path():
    """A cached flow still gets time-exceeded for TTL 1 and frag-needed for a big DF packet."""
    p = Pair()
    ev_pod_to_remote(p, 10, 64, False)
    ev_gw_reply(p, GW)
    ev_pod_arp(p)
    ev_pod_to_remote(p, 10, 64, False)
    ev_pod_to_remote(p, 10, 64, False)
    assert p.fast.flows.hits == 1
    for node in (p.slow, p.fast):
        node.ports["a"].sent.clear()
    ev_pod_to_remote(p, 10, 1, False)
    ev_pod_to_remote(p, 1500, 64, True)
    drops = {(r["stage"], r["reason"]): r["count"] for r in p.fast.show("drops")}
    assert drops[("ip4-forward", "ttl-exceeded")] == 1
    assert drops[("ip4-forward", "frag-needed")] == 1
    p.check_tables()


def test_neighbour_going_stale_is_not_replayed():
    """After reachable_time the entry is STALE: the next frame must take the slow path (STALE -> DELAY)."""
    p = Pair()
    ev_pod_to_remote(p, 10, 64, False)
    ev_gw_reply(p, GW)
    ev_pod_to_remote(p, 10, 64, False)
    ev_pod_to_remote(p, 10, 64, False)
    hits = p.fast.flows.hits
    p.advance(61)
    ev_pod_to_remote(p, 10, 64, False)
    assert p.fast.flows.hits == hits
    assert [r["state"] for r in p.fast.show("neigh") if r["ip"] == GW_IP] == ["DELAY"]
    p.check_tables()


def test_aged_fdb_entry_is_not_replayed_before_the_sweep():
    """Between ageing and the next sweep, lookup() already misses: the frame floods, as uncached."""
    p = Pair()
    ev_from_b(p)
    ev_bridged(p)  # creates the bridged flow's conntrack entry: not cached
    ev_bridged(p)
    ev_bridged(p)
    assert p.fast.flows.hits == 1
    p.advance(61, sweep=False)
    for node in (p.slow, p.fast):
        node.ports["c"].sent.clear()
    ev_bridged(p)  # Pair.inject compares every port: c must get the flood on both
    assert p.fast.flows.hits == 1
    p.check_tables()


def test_flow_cache_off_and_bad_size():
    from vswitch.config import ConfigError
    assert Node(parse({"name": "n", "flow_cache": 0})).flows is None
    with pytest.raises(ConfigError, match="flow_cache"):
        parse({"name": "n", "flow_cache": -1})


def test_service_tcp_connection_is_cached_only_while_established():
    """Handshake, cached ACKs, then a FIN must go through the state table (FIN_WAIT), as uncached."""
    p = Pair()
    ev_pod_arp(p)
    ev_from_b(p)
    ev_gw_reply(p, GW)
    ev_svc(p, "S", "tcp")
    remote = p.fast.show("conntrack")[-1]["reply"]["src"] == REMOTE
    ev_svc_reply(p, "SA", "tcp", remote)
    for _ in range(4):
        ev_svc(p, "A", "tcp")
        ev_svc_reply(p, "A", "tcp", remote)
    hits = p.fast.flows.hits
    assert hits >= 4
    ev_svc(p, "FA", "tcp")
    assert p.fast.flows.hits == hits
    states = [r["state"] for r in p.fast.show("conntrack") if r["orig"]["dst"] == "10.96.0.10"]
    assert states == ["FIN_WAIT"]
    p.check_tables()


@pytest.mark.parametrize("flags", ["S", "SA", "FA", "R", "RA"])
def test_tcp_syn_fin_rst_are_not_flow_keys(flags):
    frame = bytes(ZERO_VNET + bytes(Ether() / IP(src=A_IP, dst=B_IP) / TCP(sport=4000, dport=80, flags=flags)))
    assert flow_key("a", frame) is None
    ack = bytes(ZERO_VNET + bytes(Ether() / IP(src=A_IP, dst=B_IP) / TCP(sport=4000, dport=80, flags="A")))
    assert flow_key("a", ack) is not None
    assert flow_key("a", ack[:-20]) is None  # the TCP header cut before its flags


def test_short_service_connection_records_no_flow():
    """A connection that ends within its first two packets each way (connect, accept, close) is
    not worth a flow: nothing is recorded, and nothing changes for it."""
    p = Pair()
    ev_pod_arp(p)
    ev_from_b(p)
    ev_gw_reply(p, GW)
    inserts = p.fast.flows.inserts
    ev_svc(p, "S", "tcp")
    remote = p.fast.show("conntrack")[-1]["reply"]["src"] == REMOTE
    for mine, theirs in (("A", "SA"), ("A", "FA"), ("R", None)):
        if theirs:
            ev_svc_reply(p, theirs, "tcp", remote)
        ev_svc(p, mine, "tcp")
    assert p.fast.flows.inserts == inserts and p.fast.flows.hits == 0
    p.check_tables()  # (a longer connection is cached from its third packet: test_nat_stages)


def test_unreplied_udp_flow_is_not_replayed_after_its_reply():
    """An unreplied UDP flow is cached with the 30 s timeout; once the reply comes, the next
    datagram must refresh by the slow path's rule, not the cached 30 s."""
    p = Pair()
    ev_pod_arp(p)
    ev_from_b(p)
    ev_gw_reply(p, GW)
    for _ in range(3):
        ev_svc(p, "", "udp")
    assert p.fast.flows.hits >= 1
    remote = [r for r in p.fast.show("conntrack") if r["proto"] == "udp" and r["orig"]["dst"] == "10.96.0.10"][0]
    ev_svc_reply(p, "", "udp", remote["reply"]["src"] == REMOTE)
    p.advance(3)
    ev_svc(p, "", "udp")
    p.check_tables()  # timeouts included: 120 s assured stream on both
    row = [r for r in p.fast.show("conntrack") if r["proto"] == "udp" and r["orig"]["dst"] == "10.96.0.10"][0]
    assert row["timeout"] == 120 and "ASSURED" in row["flags"]
