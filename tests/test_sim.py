"""vswitch.sim (``from vswitch import SimNode``): the Python API as a test writer uses it.

Covered: building a SimNode from a dict, a YAML path and a NodeConfig; every configured port
(tap, afpacket) becoming an in-memory port without opening anything; bridged pod-to-pod
(flood, learn, unicast reply) and the scapy packets ``Result.out`` gives; routed ping to the
gateway; TTL 1 -> ICMP time exceeded after ARP; a ClusterIP Service (DNAT in the trace,
conntrack row, un-DNATed reply); ``commit=False`` (dry run: no state change, nothing sent);
``trace=False`` (the flow cache, byte-identical to the traced slow path); ``advance`` driving
ARP retries and host unreachable; scapy expression strings; unknown ports; the overlay (VXLAN
outer frame and the trace's ``encap`` record, ``inject_vxlan`` from known and unknown peers);
Result's helpers (dropped, str, to_dict), take() and the context manager.

Topology (node "n1"):

    p1 (pod 10.244.1.2) --+
    p2 (pod 10.244.1.3) --+-- bridge -- router iface "pods" 10.244.1.1/24
    p3 (pod 10.244.1.4) --+                          |
                                  router iface "uplink" 192.168.1.11/24, port "up"
                                                     |
                              gateway 192.168.1.12 (10.244.2.0/24 behind it)
"""

from __future__ import annotations

import json

import pytest
import yaml
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror
from scapy.layers.l2 import ARP, Ether
from scapy.layers.vxlan import VXLAN
from scapy.packet import Raw

from router.interface import stable_mac
from conftest import service_manifest
from vswitch import Emitted, Result, SimNode
from vswitch.config import parse

P1, P2, P3 = "02:00:00:00:00:01", "02:00:00:00:00:02", "02:00:00:00:00:03"
POD1, POD2, POD3 = "10.244.1.2", "10.244.1.3", "10.244.1.4"
PODS = {"p1": (P1, POD1), "p2": (P2, POD2), "p3": (P3, POD3)}
RTR_PODS, RTR_UP = "10.244.1.1", "192.168.1.11"
GW_MAC, GW = "02:00:00:00:01:12", "192.168.1.12"
REMOTE_EP = "10.244.2.5"
BCAST = "ff:ff:ff:ff:ff:ff"
VIP, VIP_DNS = "10.96.0.10", "10.96.0.20"


def config(nat: bool = True, **extra) -> dict:
    cfg = {"name": "n1",
           "ports": [{"name": "p1", "type": "tap"}, {"name": "p2", "type": "tap"}, {"name": "p3", "type": "tap"},
                     {"name": "up", "type": "afpacket", "interface": "eth1"}],
           "router": {"interfaces": [{"name": "pods", "address": "10.244.1.1/24"},
                                     {"name": "uplink", "port": "up", "address": "192.168.1.11/24"}],
                      "routes": ["10.244.2.0/24 via 192.168.1.12", "blackhole 10.9.0.0/16"]},
           **extra}
    if nat:
        cfg["nat"] = {"clusterCIDR": "10.244.0.0/16"}
    return cfg


# web: TCP 80 -> POD2:8080 (same bridge); dns: UDP 53 -> REMOTE_EP:5353 (behind the uplink)
SERVICES = (service_manifest("web", VIP, 80, 8080, "TCP", POD2) + "---\n" +
            service_manifest("dns", VIP_DNS, 53, 5353, "UDP", REMOTE_EP, node="n2"))


@pytest.fixture
def sim():
    with SimNode.from_config(config()) as s:
        s.node.apply_manifests(SERVICES)
        yield s


def rmac(s: SimNode, iface: str = "pods") -> str:
    return s.node.router.ifaces[iface].mac.hex(":")


def pod_arps(s: SimNode, port: str) -> None:
    """The pod asks for its gateway: the node learns the pod's MAC (FDB, neighbour STALE)."""
    mac, ip = PODS[port]
    s.inject(port, Ether(src=mac, dst=BCAST) / ARP(op=1, hwsrc=mac, psrc=ip, pdst=RTR_PODS))
    s.take()


def answer_arp(s: SimNode, port: str, mac: str, ip: str) -> Result:
    """``ip`` (behind ``port``) answers the router's ARP request: its neighbour entry is REACHABLE."""
    iface, mine = ("uplink", RTR_UP) if port == "up" else ("pods", RTR_PODS)
    return s.inject(port, Ether(src=mac, dst=rmac(s, iface)) /
                    ARP(op=2, hwsrc=mac, psrc=ip, hwdst=rmac(s, iface), pdst=mine))


def resolve_pods(s: SimNode) -> None:
    """Every pod and the uplink gateway REACHABLE, every pod MAC learned."""
    for port, (mac, ip) in PODS.items():
        s.inject(port, Ether(src=mac, dst=rmac(s)) / IP(src=ip, dst=RTR_PODS) / ICMP())  # ARPs for the pod
        answer_arp(s, port, mac, ip)
    s.inject("p1", Ether(src=P1, dst=rmac(s)) / IP(src=POD1, dst="10.244.2.200") / UDP())  # ARPs for the gw
    answer_arp(s, "up", GW_MAC, GW)
    s.take()
    states = {r["ip"]: r["state"] for r in s.show("neigh")}
    assert all(states[ip] == "REACHABLE" for ip in (POD1, POD2, POD3, GW)), states


def neigh_state(s: SimNode, ip: str):
    return next((r["state"] for r in s.show("neigh") if r["ip"] == ip), None)


def ct_rows(s: SimNode, service: str) -> list:
    return [r for r in s.show("conntrack") if r["service"] == service]


def stat(s: SimNode, stage: str) -> dict:
    return next(r for r in s.show("stats") if r["stage"] == stage)


def udp(src=POD1, dst=POD2, sport=4000, dport=5000, payload=b"hello", **ip):
    return IP(src=src, dst=dst, **ip) / UDP(sport=sport, dport=dport) / Raw(payload)


# --- building a node ------------------------------------------------------------------------------

def test_from_dict_yaml_path_and_nodeconfig_build_the_same_node(tmp_path):
    services = tmp_path / "services.yaml"
    services.write_text(SERVICES)
    doc = config()
    doc["nat"]["manifests"] = [str(services)]
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump(doc))
    sims = [SimNode.from_config(doc), SimNode.from_config(str(path)), SimNode.from_config(parse(doc)),
            SimNode(parse(doc))]
    for s in sims:
        assert s.name == "n1"
        assert [p["name"] for p in s.show("ports")] == ["p1", "p2", "p3", "up"]
        # the manifests listed in the config are loaded at start
        assert sorted(r["service"] for r in s.show("services")) == ["default/dns", "default/web"]
        assert rmac(s) == stable_mac("n1", "pods").hex(":")
    assert len({json.dumps(s.show("routes"), sort_keys=True) for s in sims}) == 1


def test_manifests_listed_in_a_yaml_config_are_loaded(tmp_path):
    services = tmp_path / "services.yaml"
    services.write_text(SERVICES)
    doc = config()
    doc["nat"]["manifests"] = [str(services)]
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump(doc))
    s = SimNode.from_config(str(path))
    resolve_pods(s)
    res = s.inject("p1", IP(src=POD1, dst=VIP) / TCP(sport=1234, dport=80, flags="S"))
    assert res.stage("nat-prerouting")["endpoint"] == f"{POD2}:8080"


def test_a_bad_config_raises_config_error():
    from vswitch.config import ConfigError
    doc = config()
    doc["ports"][0]["mtu"] = 10
    with pytest.raises(ConfigError, match=r"ports\[0\]\.mtu"):
        SimNode.from_config(doc)


def test_tap_and_afpacket_ports_become_memory_ports_without_opening_anything(monkeypatch):
    from vswitch.ports.afpacket import AfPacketPort
    from vswitch.ports.tap import TapPort

    def refuse(self):
        raise AssertionError(f"{type(self).__name__} {self.name} opened by the simulator")
    monkeypatch.setattr(TapPort, "open", refuse)
    monkeypatch.setattr(AfPacketPort, "open", refuse)
    doc = config()
    doc["ports"][0].update(netns="pod-a", netns_ifname="eth0", ifname="tap-pod-a", mtu=9000, offload=True)
    s = SimNode.from_config(doc)
    rows = {r["name"]: r for r in s.show("ports")}
    assert {r["type"] for r in rows.values()} == {"memory"}
    assert rows["p1"]["mtu"] == 9000  # the spec's settings are kept
    assert rows["p2"]["hairpin"] is True and rows["up"]["hairpin"] is False  # tap / afpacket defaults


def test_close_and_context_manager_remove_every_port():
    with SimNode.from_config(config()) as s:
        assert len(s.show("ports")) == 4
    assert s.show("ports") == []


# --- bridging ---------------------------------------------------------------------------------------

def test_bridged_pod_to_pod_first_frame_floods_reply_is_unicast(sim):
    res = sim.inject("p1", Ether(src=P1, dst=P2) / udp(payload=b"ping"))
    assert res.ports == ["p2", "p3"]  # unknown destination: flooded to the other bridge ports only
    assert res.verdict == "sent out p2, p3"
    assert res.stage("l2-forward") == {"dst": P2, "decision": "flood-unknown", "ports": ["p2", "p3"]}
    (f,) = res.out("p2")
    assert (f.src, f.dst, f[IP].src, f[IP].dst, f[IP].ttl) == (P1, P2, POD1, POD2, 64)  # bridged: not routed
    assert (f[UDP].sport, f[UDP].dport, bytes(f[Raw])) == (4000, 5000, b"ping")
    assert [r["port"] for r in sim.show("fdb") if r["mac"] == P1] == ["p1"]

    rep = sim.inject("p2", Ether(src=P2, dst=P1) / udp(src=POD2, dst=POD1, sport=5000, dport=4000,
                                                     payload=b"pong"))
    assert rep.ports == ["p1"]  # learned: unicast
    (g,) = rep.out("p1")
    assert (g.src, g.dst, g[IP].src, g[UDP].dport, bytes(g[Raw])) == (P2, P1, POD2, 4000, b"pong")
    assert rep.out("p3") == []
    assert all(isinstance(e, Emitted) for e in rep.emitted)
    assert rep.emitted[0].port == "p1" and rep.emitted[0].frame == bytes(g)


def test_out_without_port_gives_everything_in_send_order(sim):
    res = sim.inject("p1", Ether(src=P1, dst=P2) / udp())
    assert [e.port for e in res.emitted] == ["p2", "p3"]
    assert [bytes(p) for p in res.out()] == [e.frame for e in res.emitted]


# --- routing -----------------------------------------------------------------------------------------

def test_routed_ping_to_the_gateway_gets_an_echo_reply(sim):
    pod_arps(sim, "p1")
    res = sim.inject("p1", IP(src=POD1, dst=RTR_PODS) / ICMP(id=77, seq=3) / Raw(b"abcdefgh"))
    assert res.frame[:6] == bytes.fromhex(rmac(sim).replace(":", ""))  # MACs filled in: to the gateway
    (f,) = res.out("p1")
    assert (f.src, f.dst) == (rmac(sim), P1)
    assert (f[IP].src, f[IP].dst, f[ICMP].type, f[ICMP].id, f[ICMP].seq) == (RTR_PODS, POD1, 0, 77, 3)
    assert bytes(f[ICMP].payload) == b"abcdefgh"
    assert res.ports == ["p1"] and res.stage("ip4-local") is not None


def test_ttl_1_gets_time_exceeded_after_the_sender_answers_arp(sim):
    res = sim.inject("p1", Ether(src=P1, dst=rmac(sim)) / udp(dst=REMOTE_EP, ttl=1))
    assert res.stage("ip4-forward")["icmp"] == [11, 0]
    # the error is queued: the router does not know the pod yet and asks for it
    assert {e.port for e in res.emitted} == {"p1", "p2", "p3"}
    for f in res.out():
        assert f.dst == BCAST and (f[ARP].op, f[ARP].pdst, f[ARP].psrc) == (1, POD1, RTR_PODS)
    assert neigh_state(sim, POD1) == "INCOMPLETE"

    after = answer_arp(sim, "p1", P1, POD1)
    (err,) = after.out("p1")
    assert (err.src, err.dst) == (rmac(sim), P1)
    assert (err[IP].src, err[IP].dst, err[ICMP].type, err[ICMP].code) == (RTR_PODS, POD1, 11, 0)
    assert err[IPerror].dst == REMOTE_EP and err[IPerror].ttl == 1
    assert after.out("up") == []


def test_blackhole_is_a_drop_with_stage_and_reason(sim):
    pod_arps(sim, "p1")
    res = sim.inject("p1", udp(dst="10.9.1.1"))
    assert res.dropped == ("ip4-lookup", "blackhole")
    assert res.verdict == "dropped by ip4-lookup: blackhole"
    assert res.emitted == []


# --- Services --------------------------------------------------------------------------------------------

def test_cluster_ip_is_dnatted_tracked_and_the_reply_un_dnatted(sim):
    resolve_pods(sim)
    res = sim.inject("p1", IP(src=POD1, dst=VIP) / TCP(sport=40000, dport=80, flags="S", seq=100))
    nat = res.stage("nat-prerouting")
    assert (nat["ct"], nat["service"], nat["endpoint"]) == ("new", "default/web", f"{POD2}:8080")
    assert res.stage("nat-bridged-dnat")["mac"] == P2  # an endpoint on the same bridge: bridged, not routed
    (syn,) = res.out("p2")
    assert (syn.src, syn.dst) == (P1, P2)
    assert (syn[IP].src, syn[IP].dst, syn[IP].ttl) == (POD1, POD2, 64)
    assert (syn[TCP].sport, syn[TCP].dport, syn[TCP].flags, syn[TCP].seq) == (40000, 8080, "S", 100)

    (row,) = ct_rows(sim, "default/web")
    assert row["proto"] == "tcp" and row["service"] == "default/web"
    assert row["orig"] == {"src": POD1, "dst": VIP, "sport": 40000, "dport": 80}
    assert row["reply"] == {"src": POD2, "dst": POD1, "sport": 8080, "dport": 40000}

    rep = sim.inject("p2", IP(src=POD2, dst=POD1) / TCP(sport=8080, dport=40000, flags="SA", ack=101))
    (sa,) = rep.out("p1")
    assert (sa[IP].src, sa[IP].dst, sa[TCP].sport, sa[TCP].dport, sa[TCP].flags) == (VIP, POD1, 80, 40000, "SA")
    assert "UNREPLIED" not in ct_rows(sim, "default/web")[0]["flags"]


def test_commit_false_is_a_dry_run(sim):
    resolve_pods(sim)
    fdb, ct, sent, ports = sim.show("fdb"), sim.show("conntrack"), len(sim.emitted), sim.show("ports")
    new_mac = "02:00:00:00:00:99"  # never seen: would be learned
    res = sim.inject("p1", Ether(src=new_mac, dst=rmac(sim)) /
                     IP(src=POD1, dst=VIP) / TCP(sport=40001, dport=80, flags="S"), commit=False)
    assert res.emitted == [] and len(sim.emitted) == sent
    assert sim.show("fdb") == fdb and sim.show("conntrack") == ct
    assert ct_rows(sim, "default/web") == []
    assert [p["tx_packets"] for p in sim.show("ports")] == [p["tx_packets"] for p in ports]
    assert res.stage("l2-learn")["fdb"] == "would-learn"
    assert res.stage("nat-prerouting")["endpoint"] == f"{POD2}:8080"  # the decision is still shown
    last = res.steps[-1]
    assert last["stage"] == "port-tx" and last["record"]["dry_run"] is True
    assert last["record"]["ports"] == ["p2"]
    assert res.verdict == "would leave by p2"
    # and the same packet committed does change things
    real = sim.inject("p1", Ether(src=new_mac, dst=rmac(sim)) /
                      IP(src=POD1, dst=VIP) / TCP(sport=40001, dport=80, flags="S"))
    assert real.ports == ["p2"] and len(ct_rows(sim, "default/web")) == 1
    assert any(r["mac"] == new_mac for r in sim.show("fdb"))


def test_commit_false_needing_arp_sends_no_request_and_creates_no_neighbour(sim):
    res = sim.inject("p1", Ether(src=P1, dst=rmac(sim)) / udp(dst=REMOTE_EP), commit=False)
    assert res.emitted == [] and sim.emitted == []
    assert sim.show("neigh") == [] and sim.show("fdb") == []
    assert "dry run" in res.verdict and res.verdict.startswith("ended in ip4-rewrite")


def test_untraced_commit_false_is_refused(sim):
    with pytest.raises(ValueError, match="commit"):
        sim.inject("p1", Ether(src=P1, dst=P2) / udp(), trace=False, commit=False)


# --- the flow cache ----------------------------------------------------------------------------------

def test_untraced_packets_take_the_flow_cache_and_match_the_traced_path(sim):
    resolve_pods(sim)
    q = IP(src=POD1, dst=VIP_DNS) / UDP(sport=1111, dport=53) / Raw(b"query")
    traced = sim.inject("p1", q)  # the slow path, the truth (it creates the conntrack entry)
    (f,) = traced.out("up")
    assert (f.dst, f[IP].dst, f[UDP].dport, f[IP].ttl) == (GW_MAC, REMOTE_EP, 5353, 63)
    before = stat(sim, "(flow-cache)")
    assert sim.show("flows") == []  # traced packets never create flows
    for i in range(4):
        res = sim.inject("p1", q, trace=False)
        assert res.steps is None and res.verdict == "sent out up"
        assert res.emitted == traced.emitted, f"untraced packet {i} differs from the traced one"
    after = stat(sim, "(flow-cache)")
    assert after["misses"] - before["misses"] == 1 and after["inserts"] - before["inserts"] == 1
    assert after["packets"] - before["packets"] == 3  # hits
    (flow,) = [r for r in sim.show("flows") if r["dst"] == VIP_DNS]
    assert (flow["in_port"], flow["src"], flow["sport"], flow["dport"]) == ("p1", POD1, 1111, 53)
    assert flow["hits"] == 3
    assert ct_rows(sim, "default/dns")[0]["packets"][0] == 5  # cached packets still count in conntrack


def test_flow_cache_bridged_flow_matches_the_slow_path(sim):
    a = Ether(src=P1, dst=P2) / udp()
    b = Ether(src=P2, dst=P1) / udp(src=POD2, dst=POD1, sport=5000, dport=4000)
    sim.inject("p1", a, trace=False)
    sim.inject("p2", b, trace=False)  # both MACs learned now: unicast, cacheable
    traced = sim.inject("p1", a)
    cached = [sim.inject("p1", a, trace=False) for _ in range(3)]
    assert all(c.emitted == traced.emitted for c in cached) and traced.ports == ["p2"]
    assert any(r["in_port"] == "p1" and r["dst_mac"] == P2 and r["hits"] >= 2 for r in sim.show("flows"))


# --- time -------------------------------------------------------------------------------------------------

def test_advance_runs_arp_retries_then_host_unreachable():
    s = SimNode.from_config(config(nat=False))
    pod_arps(s, "p1")
    t0 = s.now
    res = s.inject("p1", udp(dst="192.168.1.99", ttl=10))
    (req,) = res.out("up")
    assert req[ARP].pdst == "192.168.1.99" and req.dst == BCAST
    seen = []
    for _ in range(35):
        seen += [(round(s.now - t0, 1), e) for e in s.advance(0.1)]
    arps = [(t, e) for t, e in seen if e.port == "up"]
    assert [t for t, _ in arps] == [1.0, 2.0]  # the kernel's 3 probes a second apart (1 at send time)
    assert all(e.scapy[ARP].pdst == "192.168.1.99" for _, e in arps)
    (when, err), = [(t, e) for t, e in seen if e.port == "p1"]
    assert when == 3.0
    f = err.scapy
    assert (f.dst, f[IP].src, f[IP].dst, f[ICMP].type, f[ICMP].code) == (P1, RTR_PODS, POD1, 3, 1)
    assert f[IPerror].dst == "192.168.1.99"
    assert neigh_state(s, "192.168.1.99") == "FAILED"
    assert s.now == pytest.approx(t0 + 3.5)


def test_advance_returns_only_what_the_timers_sent_and_refuses_going_back(sim):
    pod_arps(sim, "p1")
    sim.inject("p1", udp(dst="192.168.1.99"))
    assert sim.advance(0.5) == []
    assert len(sim.advance(0.6)) == 1
    with pytest.raises(ValueError):
        sim.advance(-1)


def test_take_returns_and_clears_everything_sent(sim):
    sim.inject("p1", Ether(src=P1, dst=P2) / udp())
    got = sim.take()
    assert [e.port for e in got] == ["p2", "p3"]
    assert sim.take() == [] and sim.emitted == []


# --- packets as text, errors ---------------------------------------------------------------------------

def test_inject_a_scapy_expression_string(sim):
    pod_arps(sim, "p1")
    res = sim.inject("p1", f'IP(src="{POD1}", dst="{RTR_PODS}")/ICMP(id=42)')
    f = Ether(res.frame)
    assert (f.src, f.dst) == (P1, rmac(sim))  # learned MAC as source, the gateway as destination
    (rep,) = res.out("p1")
    assert rep[ICMP].type == 0 and rep[ICMP].id == 42


def test_inject_raw_bytes_is_used_as_is(sim):
    frame = bytes(Ether(src=P3, dst=P2) / udp(src=POD3))
    res = sim.inject("p3", frame)
    assert res.frame == frame and res.out("p2")[0].src == P3


@pytest.mark.parametrize("trace", [True, False])
def test_unknown_port_raises_key_error_listing_the_ports(sim, trace):
    with pytest.raises(KeyError) as e:
        sim.inject("nope", Ether(src=P1, dst=P2) / udp(), trace=trace)
    msg = e.value.args[0]
    assert "nope" in msg and "p1, p2, p3, up" in msg


def test_result_text_and_dict(sim):
    res = sim.inject("p1", Ether(src=P1, dst=P2) / udp())
    text = str(res)
    assert text.splitlines()[0].startswith(f"packet {res.id}: in p1: ")
    assert "  1  eth-input" in text and "verdict: sent out p2, p3" in text
    assert "  -> p2: " in text and "  -> p3: " in text
    d = json.loads(json.dumps(res.to_dict(), default=str))
    assert d["in"] == "p1" and d["verdict"] == "sent out p2, p3"
    assert [e["port"] for e in d["emitted"]] == ["p2", "p3"]
    assert [s["stage"] for s in d["steps"]][0] == "eth-input"
    assert "sent out p2, p3" in repr(res)


# --- overlay ------------------------------------------------------------------------------------------------

PEER_VTEP_MAC = "02:00:00:00:0f:02"


def overlay_config() -> dict:
    return {"name": "a", "ports": [{"name": "p1", "type": "tap"}],
            "router": {"interfaces": [{"name": "pods", "address": "10.244.1.1/24", "mtu": 1450}]},
            "overlay": {"local": "192.168.1.11", "podCIDR": "10.244.1.0/24",
                        "peers": [{"name": "b", "address": "192.168.1.12", "podCIDR": "10.244.2.0/24",
                                   "vtepMAC": PEER_VTEP_MAC}]}}


@pytest.fixture
def osim():
    with SimNode.from_config(overlay_config()) as s:
        pod_arps(s, "p1")
        yield s


def test_overlay_packet_to_a_remote_pod_leaves_as_vxlan(osim):
    from overlay.port import VxlanPort
    assert type(osim.node.overlay.port) is not VxlanPort  # no sockets in the simulator
    res = osim.inject("p1", udp(dst="10.244.2.5", payload=b"over"))
    assert res.ports == ["flannel.1"]
    (o,) = res.out("flannel.1")
    assert [type(layer).__name__ for layer in (o, o[IP], o[UDP], o[VXLAN], o[VXLAN].payload)] == \
        ["Ether", "IP", "UDP", "VXLAN", "Ether"]
    assert (o[IP].src, o[IP].dst, o[IP].ttl, int(o[IP].flags)) == ("192.168.1.11", "192.168.1.12", 64, 0)
    assert o[UDP].dport == 8472 and 32768 <= o[UDP].sport <= 60999
    assert o[VXLAN].vni == 1
    inner = o[VXLAN].payload
    assert (inner.dst, inner.src) == (PEER_VTEP_MAC, stable_mac("a", "flannel.1").hex(":"))
    assert (inner[IP].src, inner[IP].dst, inner[IP].ttl, bytes(inner[Raw])) == (POD1, "10.244.2.5", 63, b"over")

    tx = res.stage("port-tx")
    enc = tx["encap"]["flannel.1"]
    assert (enc["vni"], enc["src"], enc["dst"], enc["dport"], enc["ttl"], enc["df"]) == \
        (o[VXLAN].vni, o[IP].src, o[IP].dst, o[UDP].dport, o[IP].ttl, False)
    assert enc["sport"] == o[UDP].sport and enc["segments"] == 1
    assert "vxlan vni 1" in res.steps[-1]["text"]


def test_overlay_source_port_follows_the_inner_flow(osim):
    a = osim.inject("p1", udp(dst="10.244.2.5", sport=1000)).out("flannel.1")[0][UDP].sport
    b = osim.inject("p1", udp(dst="10.244.2.5", sport=1000)).out("flannel.1")[0][UDP].sport
    others = {osim.inject("p1", udp(dst="10.244.2.5", sport=1001 + i)).out("flannel.1")[0][UDP].sport
              for i in range(8)}
    assert a == b and len(others) > 1


def inbound(src_ip: str = "10.244.2.5", dst_ip: str = POD1, vtep_mac: str = PEER_VTEP_MAC):
    return VXLAN(vni=1, flags=8) / Ether(src=vtep_mac, dst=stable_mac("a", "flannel.1").hex(":")) / \
        IP(src=src_ip, dst=dst_ip) / UDP(sport=2000, dport=1000) / Raw(b"back")


def test_inject_vxlan_from_a_known_peer_delivers_the_inner_frame(osim):
    res = osim.inject_vxlan("192.168.1.12", inbound())
    (f,) = res.out("p1")
    assert (f.src, f.dst) == (rmac(osim), P1)
    assert (f[IP].src, f[IP].dst, f[IP].ttl, bytes(f[Raw])) == ("10.244.2.5", POD1, 63, b"back")
    assert stat(osim, "(vxlan)")["packets"] == 1


def test_inject_vxlan_from_an_unknown_address_is_dropped_and_counted(osim):
    vteps = osim.show("vteps")
    res = osim.inject_vxlan("192.168.1.99", inbound())
    assert res.emitted == []
    assert res.verdict == "nothing sent"
    row = stat(osim, "(vxlan)")
    assert row["drops"].get("unknown-peer") == 1 and row["packets"] == 0
    assert osim.show("vteps") == vteps  # nothing learned from the stranger
    assert [v["dst"] for v in vteps] == ["192.168.1.12"]


def test_inject_vxlan_without_overlay_raises(sim):
    with pytest.raises(KeyError, match="no overlay"):
        sim.inject_vxlan("192.168.1.12", inbound())


def test_inject_vxlan_result_text_shows_the_packet(osim):
    res = osim.inject_vxlan("192.168.1.12", inbound())
    header = str(res).splitlines()[0]
    assert "10.244.2.5" in header and POD1 in header
