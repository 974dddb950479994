"""In-process capture sessions (vswitch.capture through Node.capture_start/read/stop), no daemon.

A SimNode's node is driven the way the daemon is (``inject(..., trace=False)``: frames arrive
on ports). Covered: what capture_start returns; the ports filter (packets that do not touch
the ports are not kept); floods recording each out port; records sharing the packet id across
stages, their direction, the stage's verdict text and the frame as it is AT that stage (DNAT,
TTL, MAC rewrite); drops; the count and duration bounds; established flows captured while a
session is open and back in the flow cache after capture_stop; bad stage/port/count/duration;
tcpdump filter expressions (vswitch.bpf); unknown session ids; the MAX_QUEUED bound (lost).
"""

from __future__ import annotations

import shutil

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Raw

from conftest import service_manifest
from vswitch import SimNode, capture

P1, P2, P3 = "02:00:00:00:00:01", "02:00:00:00:00:02", "02:00:00:00:00:03"
POD1, POD2, POD3 = "10.244.1.2", "10.244.1.3", "10.244.1.4"
PODS = {"p1": (P1, POD1), "p2": (P2, POD2), "p3": (P3, POD3)}
RTR_PODS, RTR_UP = "10.244.1.1", "192.168.1.11"
GW_MAC, GW = "02:00:00:00:01:12", "192.168.1.12"
REMOTE_EP, VIP_DNS = "10.244.2.5", "10.96.0.20"

CONFIG = {"name": "n1",
          "ports": [{"name": "p1"}, {"name": "p2"}, {"name": "p3"}, {"name": "up", "type": "afpacket"}],
          "router": {"interfaces": [{"name": "pods", "address": "10.244.1.1/24"},
                                    {"name": "uplink", "port": "up", "address": "192.168.1.11/24"}],
                     "routes": ["10.244.2.0/24 via 192.168.1.12", "blackhole 10.9.0.0/16"]},
          "nat": {"clusterCIDR": "10.244.0.0/16"}}

DNS = service_manifest("dns", VIP_DNS, 53, 5353, "UDP", REMOTE_EP, node="n2")

needs_tcpdump = pytest.mark.skipif(shutil.which("tcpdump") is None, reason="filter expressions need tcpdump")


def mac(sim: SimNode, iface: str) -> str:
    return sim.node.router.ifaces[iface].mac.hex(":")


@pytest.fixture
def sim():
    """Pods and the uplink gateway resolved (REACHABLE), every pod MAC learned, the dns Service."""
    with SimNode.from_config(CONFIG) as s:
        s.node.apply_manifests(DNS)
        for port, (m, ip) in PODS.items():
            s.inject(port, Ether(src=m, dst=mac(s, "pods")) / IP(src=ip, dst=RTR_PODS) / UDP(), trace=False)
            s.inject(port, Ether(src=m, dst=mac(s, "pods")) /
                     ARP(op=2, hwsrc=m, psrc=ip, hwdst=mac(s, "pods"), pdst=RTR_PODS), trace=False)
        s.inject("p1", Ether(src=P1, dst=mac(s, "pods")) / IP(src=POD1, dst="10.244.2.9") / UDP(), trace=False)
        s.inject("up", Ether(src=GW_MAC, dst=mac(s, "uplink")) /
                 ARP(op=2, hwsrc=GW_MAC, psrc=GW, hwdst=mac(s, "uplink"), pdst=RTR_UP), trace=False)
        assert {r["state"] for r in s.show("neigh")} == {"REACHABLE"} and len(s.show("neigh")) == 4
        s.take()
        yield s


def send(sim: SimNode, port: str, pkt):
    """A frame arriving on ``port`` as the daemon receives it (untraced: capture sessions see it)."""
    return sim.inject(port, pkt, trace=False)


def bridged(src: str = "p1", dst: str = "p2", dport: int = 7000) -> Ether:
    (smac, sip), (dmac, dip) = PODS[src], PODS[dst]
    return Ether(src=smac, dst=dmac) / IP(src=sip, dst=dip) / UDP(sport=6000, dport=dport) / Raw(b"data")


def dns_query(sim: SimNode, sport: int = 3333) -> Ether:
    return Ether(src=P1, dst=mac(sim, "pods")) / IP(src=POD1, dst=VIP_DNS) / UDP(sport=sport, dport=53) / Raw(b"q")


def read(sim: SimNode, cid: int) -> dict:
    return sim.node.capture_read(cid)


def start(sim: SimNode, **kw) -> int:
    return sim.node.capture_start(**kw)["id"]


def flow_hits(sim: SimNode) -> int:
    return next(r for r in sim.show("stats") if r["stage"] == "(flow-cache)")["packets"]


# --- starting ------------------------------------------------------------------------------------------

def test_start_answers_the_session_in_graph_order(sim):
    res = sim.node.capture_start(stages=["port-tx", "eth-input", "nat-prerouting"], ports=["p2", "p1"])
    order = list(sim.node.graph.stages)
    assert sorted(res["stages"]) == ["eth-input", "nat-prerouting", "port-tx"]
    assert res["stages"] == sorted(res["stages"], key=order.index)
    assert res["ports"] == ["p1", "p2"]
    assert res["id"] in sim.node.captures
    every = sim.node.capture_start()
    assert every["stages"] == list(sim.node.graph.stages) and every["ports"] == []
    assert every["id"] != res["id"]


@pytest.mark.parametrize("kw, exc, words", [
    (dict(stages=["eth-input", "no-such-stage"]), ValueError, ["no stage 'no-such-stage'", "eth-input", "port-tx"]),
    (dict(ports=["p1", "p9"]), KeyError, ["no port named 'p9'", "p1, p2, p3, up"]),
    (dict(count=0), ValueError, ["count must be in"]),
    (dict(duration=0), ValueError, ["duration must be in"]),
    (dict(duration=capture.MAX_DURATION + 1), ValueError, ["duration must be in"]),
])
def test_bad_arguments_raise_a_helpful_error_and_open_nothing(sim, kw, exc, words):
    with pytest.raises(exc) as e:
        sim.node.capture_start(**kw)
    msg = e.value.args[0]
    for w in words:
        assert w in msg
    assert sim.node.captures == {}


def test_read_of_an_unknown_session_raises_key_error(sim):
    with pytest.raises(KeyError, match="no capture session 99999"):
        read(sim, 99999)
    assert sim.node.capture_stop(99999) == {"stopped": False}


def test_stop_ends_the_session(sim):
    cid = start(sim)
    assert sim.node.capture_stop(cid) == {"stopped": True}
    send(sim, "p1", bridged())
    with pytest.raises(KeyError):
        read(sim, cid)


# --- what is recorded ---------------------------------------------------------------------------------------

def test_packets_not_touching_the_ports_are_not_recorded(sim):
    cid = start(sim, ports=["p3"], stages=["eth-input", "port-tx"])
    send(sim, "p1", bridged("p1", "p2"))  # p1 -> p2: p3 not involved
    send(sim, "p2", bridged("p2", "p1"))
    res = read(sim, cid)
    assert res["records"] == [] and res["packets"] == 0
    send(sim, "p1", bridged("p1", "p3"))  # leaves by p3
    send(sim, "p3", bridged("p3", "p2"))  # enters on p3
    res = read(sim, cid)
    assert res["packets"] == 2
    assert [(r["stage"], r["port"], r["dir"]) for r in res["records"]] == [
        ("eth-input", "p1", "in"), ("port-tx", "p3", "out"),
        ("eth-input", "p3", "in"), ("port-tx", "p2", "out")]


def test_a_flood_records_each_out_port(sim):
    cid = start(sim, stages=["port-tx"])
    unknown = Ether(src=P1, dst="02:00:00:00:00:99") / IP(src=POD1, dst="10.244.1.99") / UDP()
    res = send(sim, "p1", unknown)
    assert sorted(res.ports) == ["p2", "p3"]
    recs = read(sim, cid)["records"]
    assert sorted(r["port"] for r in recs) == ["p2", "p3"]
    assert {r["dir"] for r in recs} == {"out"} and len({r["id"] for r in recs}) == 1
    assert all(r["frame"] == bytes(unknown) for r in recs)


def test_records_show_the_frame_at_each_stage(sim):
    stages = ["eth-input", "nat-prerouting", "ip4-forward", "ip4-rewrite", "port-tx"]
    cid = start(sim, stages=stages)
    q = dns_query(sim)
    res = send(sim, "p1", q)
    recs = read(sim, cid)["records"]
    assert [r["stage"] for r in recs] == stages
    assert len({r["id"] for r in recs}) == 1 and isinstance(recs[0]["ts"], int)
    assert [r["dir"] for r in recs] == ["in"] * 4 + ["out"]
    assert recs[0]["port"] == "p1" and recs[-1]["port"] == "up"
    f = {r["stage"]: Ether(r["frame"]) for r in recs}
    # as received
    assert recs[0]["frame"] == bytes(q)
    assert (f["eth-input"][IP].dst, f["eth-input"][IP].ttl, f["eth-input"].dst) == (VIP_DNS, 64, mac(sim, "pods"))
    # after DNAT: the endpoint, not yet routed
    assert (f["nat-prerouting"][IP].dst, f["nat-prerouting"][UDP].dport) == (REMOTE_EP, 5353)
    assert f["nat-prerouting"][IP].ttl == 64
    # forwarded: TTL decremented, MACs not yet rewritten
    assert f["ip4-forward"][IP].ttl == 63 and f["ip4-forward"].src == P1
    # rewritten for the next hop
    assert (f["ip4-rewrite"].src, f["ip4-rewrite"].dst) == (mac(sim, "uplink"), GW_MAC)
    # what left is what the port sent
    assert recs[-1]["frame"] == res.emitted[0].frame
    # verdicts are the stages' trace texts
    v = {r["stage"]: r["verdict"] for r in recs}
    assert v["eth-input"].startswith("in p1 len")
    assert v["nat-prerouting"].startswith("ct new udp") and "Service default/dns" in v["nat-prerouting"]
    assert "ttl now 63" in v["ip4-forward"]
    assert v["ip4-rewrite"] == f"next hop {GW} is {GW_MAC} on uplink"
    assert v["port-tx"].startswith("out up len")


def test_a_drop_is_recorded_at_the_drop_stage(sim):
    cid = start(sim, stages=["drop"])
    send(sim, "p1", Ether(src=P1, dst=mac(sim, "pods")) / IP(src=POD1, dst="10.9.0.1") / UDP())
    (rec,) = read(sim, cid)["records"]
    assert (rec["stage"], rec["port"], rec["dir"]) == ("drop", "p1", "in")
    assert rec["verdict"].startswith("dropped by ip4-lookup: blackhole")


def test_traced_and_untraced_decisions_agree(sim):
    """A capture runs the slow path traced: the records are the trace of the same packet."""
    send(sim, "p1", bridged())  # bridged frames are tracked: the first one makes the entry both others find
    cid = start(sim)
    send(sim, "p1", bridged())
    recs = read(sim, cid)["records"]
    traced = sim.inject("p1", bridged())
    assert [r["stage"] for r in recs] == [s["stage"] for s in traced.steps]
    assert [r["verdict"] for r in recs] == [s["text"] for s in traced.steps]


# --- bounds ----------------------------------------------------------------------------------------------------

def test_count_bound_ends_the_session(sim):
    cid = start(sim, count=2, stages=["eth-input"])
    for port in ("p1", "p2", "p3"):
        send(sim, port, bridged(port, "p1" if port != "p1" else "p2"))
    res = read(sim, cid)
    assert res["done"] is True and res["packets"] == 2
    assert [r["port"] for r in res["records"]] == ["p1", "p2"]  # the third packet was not taken
    assert cid not in sim.node.captures  # a done session is gone once read
    with pytest.raises(KeyError):
        read(sim, cid)


def test_duration_bound_ends_the_session(sim):
    cid = start(sim, duration=5.0)
    sim.advance(4.0)
    send(sim, "p1", bridged())
    res = read(sim, cid)
    assert res["done"] is False and res["packets"] == 1
    sim.advance(1.5)
    res = read(sim, cid)
    assert res["done"] is True and res["records"] == []
    assert cid not in sim.node.captures


def test_nothing_is_captured_after_the_deadline(sim):
    cid = start(sim, duration=5.0)
    sim.advance(6.0)
    send(sim, "p1", bridged())
    assert read(sim, cid)["packets"] == 0


def test_an_abandoned_session_is_forgotten_after_the_grace_period(sim):
    cid = start(sim, duration=1.0)
    sim.advance(1.0 + capture.GRACE - 1)
    assert cid in sim.node.captures
    sim.advance(2)
    assert cid not in sim.node.captures


def test_queue_overflow_counts_lost_records(sim, monkeypatch):
    monkeypatch.setattr(capture, "MAX_QUEUED", 3)
    cid = start(sim, stages=["eth-input", "l2-learn", "nat-bridge", "l2-forward", "port-tx"])
    send(sim, "p1", bridged())  # 5 records: 3 kept, 2 lost
    send(sim, "p1", bridged())  # 5 more, all lost
    res = read(sim, cid)
    assert [r["stage"] for r in res["records"]] == ["eth-input", "l2-learn", "nat-bridge"]
    assert res["lost"] == 7 and res["packets"] == 2
    send(sim, "p1", bridged())  # read drained the queue: room again
    res = read(sim, cid)
    assert len(res["records"]) == 3 and res["lost"] == 9


def test_two_sessions_each_get_their_records(sim):
    a = start(sim, stages=["eth-input"], ports=["p2"])
    b = start(sim, stages=["port-tx"])
    send(sim, "p1", bridged("p1", "p2"))
    send(sim, "p1", bridged("p1", "p3"))
    ra, rb = read(sim, a), read(sim, b)
    assert [r["port"] for r in ra["records"]] == ["p1"] and ra["packets"] == 1
    assert [r["port"] for r in rb["records"]] == ["p2", "p3"] and rb["packets"] == 2


# --- the flow cache ----------------------------------------------------------------------------------------------

def test_cached_flow_is_captured_while_a_session_is_open_and_cached_again_after(sim):
    q = dns_query(sim)
    for _ in range(3):
        send(sim, "p1", q)
    assert any(r["dst"] == VIP_DNS for r in sim.show("flows"))
    hits = flow_hits(sim)
    send(sim, "p1", q)
    assert flow_hits(sim) == hits + 1  # the flow is cached
    hits += 1

    cid = start(sim, stages=["nat-prerouting", "port-tx"])
    outs = [send(sim, "p1", q) for _ in range(3)]
    assert flow_hits(sim) == hits  # the slow path took them
    assert all(o.emitted and o.emitted[0].port == "up" for o in outs)
    recs = read(sim, cid)["records"]
    assert len(recs) == 6 and len({r["id"] for r in recs}) == 3
    assert all("ct established" in r["verdict"] for r in recs if r["stage"] == "nat-prerouting")

    sim.node.capture_stop(cid)
    for _ in range(2):
        send(sim, "p1", q)
    assert flow_hits(sim) == hits + 2  # back in the cache
    cached = send(sim, "p1", q)
    assert cached.emitted == outs[0].emitted  # and the cache sends what the captured slow path sent


def test_a_done_session_no_longer_bypasses_the_cache(sim):
    q = dns_query(sim)
    for _ in range(2):
        send(sim, "p1", q)
    hits = flow_hits(sim)
    cid = start(sim, count=1)
    send(sim, "p1", q)  # captured: the session is now done
    send(sim, "p1", q)
    assert flow_hits(sim) == hits + 1
    assert read(sim, cid)["packets"] == 1


# --- filter expressions ------------------------------------------------------------------------------------------

@needs_tcpdump
def test_filter_expression_keeps_only_matching_packets(sim):
    cid = start(sim, expr="udp dst port 53", stages=["eth-input"])
    send(sim, "p1", bridged(dport=7000))
    send(sim, "p1", dns_query(sim, sport=4000))
    send(sim, "p2", bridged("p2", "p1", dport=53))
    send(sim, "p1", Ether(src=P1, dst=mac(sim, "pods")) / IP(src=POD1, dst=VIP_DNS) / TCP(dport=53))
    res = read(sim, cid)
    assert res["packets"] == 2
    assert [(r["port"], Ether(r["frame"])[UDP].dport) for r in res["records"]] == [("p1", 53), ("p2", 53)]


@needs_tcpdump
def test_filter_sees_the_frame_as_received_not_after_dnat(sim):
    cid = start(sim, expr=f"dst host {VIP_DNS}", stages=["port-tx"])
    send(sim, "p1", dns_query(sim))
    (rec,) = read(sim, cid)["records"]
    assert Ether(rec["frame"])[IP].dst == REMOTE_EP  # matched on the VIP, recorded after DNAT


@needs_tcpdump
def test_filter_and_ports_both_apply(sim):
    cid = start(sim, expr="udp", ports=["p3"], stages=["eth-input"])
    send(sim, "p1", bridged("p1", "p2"))
    send(sim, "p1", bridged("p1", "p3"))
    send(sim, "p3", Ether(src=P3, dst=P1) / IP(src=POD3, dst=POD1) / TCP())
    res = read(sim, cid)
    assert res["packets"] == 1 and [r["port"] for r in res["records"]] == ["p1"]


@needs_tcpdump
def test_bad_filter_expression_is_refused(sim):
    with pytest.raises(ValueError, match="bad filter expression"):
        sim.node.capture_start(expr="udp port banana")
    assert sim.node.captures == {}
