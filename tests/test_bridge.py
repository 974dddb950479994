"""The L2 bridge end to end through a Node with in-memory ports.

Expected behaviour is kernel-dataplane-spec.md section 1 (Linux bridge):
learning, flooding, ageing, hairpin, link-local groups; plus the vswitch
docstrings for runts, super-frames, tracing and static entries.
"""

from __future__ import annotations

import struct

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Raw

from vswitch.bridge import Bridge
from vswitch.config import parse
from vswitch.fdb import Fdb
from vswitch.node import Node
from vswitch.packet import mac_bytes
from vswitch.stage import Stage

A = "02:00:00:00:00:0a"
B = "02:00:00:00:00:0b"
C = "02:00:00:00:00:0c"
S = "02:00:00:00:00:5e"
BCAST = "ff:ff:ff:ff:ff:ff"
T0 = 1000.0


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def make_node(n=4, hairpin=None, clock=None, **bridge) -> Node:
    ports = []
    for i in range(1, n + 1):
        p = {"name": f"p{i}", "type": "memory"}
        if hairpin is not None:
            p["hairpin"] = hairpin
        ports.append(p)
    doc = {"name": "test-node", "ports": ports}
    if bridge:
        doc["bridge"] = bridge
    node = Node(parse(doc), clock=clock or Clock())
    node.start(None)
    return node


def frame(src=A, dst=B, payload=b"hello", kind="udp") -> bytes:
    if kind == "arp":
        return bytes(Ether(src=src, dst=dst) / ARP(hwsrc=src, psrc="10.0.0.1", pdst="10.0.0.2"))
    return bytes(Ether(src=src, dst=dst) / IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1, dport=2) /
                 Raw(payload))


def take_all(node) -> dict:
    return {name: p.take() for name, p in node.ports.items()}


def drops(node) -> dict:
    return {(r["stage"], r["reason"]): r["count"] for r in node.show("drops")}


def stats(node) -> dict:
    return {r["stage"]: r for r in node.show("stats")}


def fdb_port(node, mac):
    e = node.bridge.fdb.get(mac_bytes(mac))
    return None if e is None else e.port.name


@pytest.fixture
def node():
    return make_node()


# --- learning and flooding (spec 1.1, 1.3, 1.4) -------------------------------

def test_unknown_unicast_floods_to_every_other_port(node):
    f = frame(A, B)
    node.port("p1").inject(f, ts=T0)
    out = take_all(node)
    assert out == {"p1": [], "p2": [f], "p3": [f], "p4": [f]}
    assert fdb_port(node, A) == "p1"


def test_reply_after_learning_goes_only_to_the_learned_port(node):
    fa, fb = frame(A, B), frame(B, A, b"reply")
    node.port("p1").inject(fa, ts=T0)
    take_all(node)
    node.port("p3").inject(fb, ts=T0 + 1)
    assert take_all(node) == {"p1": [fb], "p2": [], "p3": [], "p4": []}
    # and now both directions are known unicast
    node.port("p1").inject(fa, ts=T0 + 2)
    assert take_all(node) == {"p1": [], "p2": [], "p3": [fa], "p4": []}


def test_flood_never_goes_back_to_sender_even_with_hairpin(node):
    # memory ports default to hairpin on; flooding still skips the ingress port
    assert node.port("p2").hairpin is True
    f = frame(C, B)
    node.port("p2").inject(f, ts=T0)
    assert take_all(node) == {"p1": [f], "p2": [], "p3": [f], "p4": [f]}


@pytest.mark.parametrize("dst", [BCAST, "01:00:5e:00:00:fb", "33:33:00:00:00:01", "01:80:c2:00:00:10"])
def test_broadcast_and_multicast_flood(node, dst):
    # learn dst-less state first: B is known on p2, but group addresses are never looked up
    node.port("p2").inject(frame(B, A), ts=T0)
    take_all(node)
    f = frame(A, dst, kind="arp" if dst == BCAST else "udp")
    node.port("p1").inject(f, ts=T0 + 1)
    assert take_all(node) == {"p1": [], "p2": [f], "p3": [f], "p4": [f]}


def test_mac_move_follows_the_sender(node):
    node.port("p1").inject(frame(A, B), ts=T0)
    node.port("p2").inject(frame(A, B), ts=T0 + 1)  # A moved to p2
    assert fdb_port(node, A) == "p2"
    take_all(node)
    f = frame(C, A)
    node.port("p3").inject(f, ts=T0 + 2)
    assert take_all(node) == {"p1": [], "p2": [f], "p3": [], "p4": []}
    assert stats(node)["l2-learn"]["fdb_moves"] == 1


@pytest.mark.parametrize("src", ["01:00:5e:00:00:01", BCAST, "03:00:00:00:00:01", "00:00:00:00:00:00"])
def test_multicast_or_zero_source_is_dropped(node, src):
    before = drops(node)[("l2-learn", "bad-src-mac")]
    node.port("p1").inject(frame(src, BCAST), ts=T0)
    node.port("p1").inject(frame(src, B), ts=T0)
    assert take_all(node) == {"p1": [], "p2": [], "p3": [], "p4": []}
    assert drops(node)[("l2-learn", "bad-src-mac")] == before + 2
    assert node.bridge.fdb.get(mac_bytes(src)) is None
    assert len(node.bridge.fdb) == 0


# --- same port / hairpin (spec 1.4, 1.5) -------------------------------------

def test_same_port_destination_dropped_without_hairpin():
    node = make_node(hairpin=False)
    node.port("p1").inject(frame(A, BCAST), ts=T0)
    take_all(node)
    node.port("p1").inject(frame(B, A), ts=T0 + 1)  # B sits behind p1 too
    assert take_all(node) == {"p1": [], "p2": [], "p3": [], "p4": []}
    assert drops(node)[("l2-forward", "same-port")] == 1
    assert fdb_port(node, B) == "p1"  # still learned


def test_same_port_destination_hairpinned_back():
    node = make_node(hairpin=True)
    node.port("p1").inject(frame(A, BCAST), ts=T0)
    take_all(node)
    f = frame(B, A)
    node.port("p1").inject(f, ts=T0 + 1)
    assert take_all(node) == {"p1": [f], "p2": [], "p3": [], "p4": []}
    assert drops(node)[("l2-forward", "same-port")] == 0


def test_hairpin_is_per_egress_port():
    node = Node(parse({"name": "n", "ports": [{"name": "pod", "type": "memory", "hairpin": True},
                                               {"name": "up", "type": "memory", "hairpin": False}]}),
                clock=Clock())
    node.start(None)
    node.port("up").inject(frame(A, BCAST), ts=T0)
    node.port("pod").inject(frame(C, BCAST), ts=T0)
    take_all(node)
    node.port("up").inject(frame(B, A), ts=T0 + 1)
    node.port("pod").inject(frame(B, C), ts=T0 + 2)  # B moved to pod, hairpin there
    out = take_all(node)
    assert out["up"] == [] and out["pod"] == [frame(B, C)]


# --- IEEE link-local groups (spec 1.6) ---------------------------------------

def test_stp_group_forwarded_and_learned(node):
    f = frame(A, "01:80:c2:00:00:00")
    node.port("p1").inject(f, ts=T0)
    assert take_all(node) == {"p1": [], "p2": [f], "p3": [f], "p4": [f]}
    assert fdb_port(node, A) == "p1"


def test_pause_frame_dropped_without_learning(node):
    node.port("p1").inject(frame(A, "01:80:c2:00:00:01"), ts=T0)
    assert take_all(node) == {"p1": [], "p2": [], "p3": [], "p4": []}
    assert fdb_port(node, A) is None
    assert drops(node)[("l2-learn", "pause-frame")] == 1


@pytest.mark.parametrize("last", range(0x02, 0x10))
def test_other_link_local_groups_learned_not_forwarded(node, last):
    node.port("p2").inject(frame(A, f"01:80:c2:00:00:{last:02x}"), ts=T0)
    assert take_all(node) == {"p1": [], "p2": [], "p3": [], "p4": []}
    assert fdb_port(node, A) == "p2"
    assert drops(node)[("l2-learn", "link-local")] == 1
    # the learned entry is real: unicast to A now goes only to p2
    f = frame(B, A)
    node.port("p1").inject(f, ts=T0 + 1)
    assert take_all(node)["p2"] == [f]


def test_link_local_from_bad_source_is_bad_src(node):
    node.port("p1").inject(frame("01:00:00:00:00:01", "01:80:c2:00:00:0e"), ts=T0)
    assert drops(node)[("l2-learn", "bad-src-mac")] == 1
    assert drops(node)[("l2-learn", "link-local")] == 0
    assert len(node.bridge.fdb) == 0


def test_own_mac_never_learned_from_link_local_frame(node):
    own = mac_bytes(C)
    node.bridge.add_local(own, node.graph.stages["drop"])  # any stage: only the key matters to l2-learn
    node.port("p1").inject(frame(C, "01:80:c2:00:00:0e"), ts=T0)
    assert node.bridge.fdb.get(own) is None


class LocalSink(Stage):
    name = "local-sink"

    def __init__(self):
        super().__init__()
        self.got = []

    def process(self, pkt):
        self.got.append(bytes(pkt.frame))
        return None


def test_frame_to_own_mac_is_delivered_locally_not_forwarded(node):
    node.port("p2").inject(frame(C, BCAST), ts=T0)  # C learned on p2 first...
    take_all(node)
    sink = LocalSink()
    node.bridge.add_local(mac_bytes(C), sink)  # ...then it becomes the node's own MAC
    f = frame(A, C)
    node.port("p1").inject(f, ts=T0 + 1)
    assert sink.got == [f]
    assert take_all(node) == {"p1": [], "p2": [], "p3": [], "p4": []}


def test_own_mac_source_not_learned(node):
    own = mac_bytes(C)
    node.bridge.add_local(own, node.graph.stages["drop"])
    node.port("p1").inject(frame(C, B), ts=T0)
    assert node.bridge.fdb.get(own) is None


# --- ageing (spec 1.2) ---------------------------------------------------------

def test_entry_ages_out_and_destination_floods_again(node):
    node.port("p1").inject(frame(A, BCAST), ts=T0)
    take_all(node)
    f = frame(B, A)
    # Frames *to* A do not refresh it.
    node.port("p2").inject(f, ts=T0 + 100)
    node.port("p2").inject(f, ts=T0 + 299)
    assert take_all(node) == {"p1": [f, f], "p2": [], "p3": [], "p4": []}
    node.port("p2").inject(f, ts=T0 + 301)
    assert take_all(node) == {"p1": [f], "p2": [], "p3": [f], "p4": [f]}
    # expired entries are gone from show fdb, and the sweep reclaims them
    node.clock.t = T0 + 301
    assert A not in {r["mac"] for r in node.show("fdb")}
    assert node.expire() == 1
    assert node.bridge.fdb.get(mac_bytes(A)) is None


def test_frames_from_mac_refresh_it(node):
    node.port("p1").inject(frame(A, BCAST), ts=T0)
    node.port("p1").inject(frame(A, BCAST), ts=T0 + 250)
    take_all(node)
    f = frame(B, A)
    node.port("p2").inject(f, ts=T0 + 400)
    assert take_all(node)["p3"] == []


def test_bridge_keeps_the_fdb_it_is_given():
    fdb = Fdb(ageing=10, max_learned=5)
    assert Bridge(fdb).fdb is fdb


def test_node_fdb_uses_configured_limits():
    node = make_node(ageing=10, max_learned=5)
    assert (node.bridge.fdb.ageing, node.bridge.fdb.max_learned) == (10.0, 5)


def test_configured_ageing_time_is_used():
    node = make_node(ageing=10)
    node.port("p1").inject(frame(A, BCAST), ts=T0)
    take_all(node)
    f = frame(B, A)
    node.port("p2").inject(f, ts=T0 + 9)
    assert take_all(node)["p3"] == []
    node.port("p2").inject(f, ts=T0 + 11)
    assert take_all(node)["p3"] == [f]


def test_max_learned_overflow_still_forwards():
    node = make_node(max_learned=1)
    node.port("p1").inject(frame(A, BCAST), ts=T0)
    f = frame(B, BCAST)
    node.port("p2").inject(f, ts=T0)  # not learned: table full
    out = take_all(node)
    assert out["p3"] == [frame(A, BCAST), f]
    assert fdb_port(node, B) is None
    assert stats(node)["l2-learn"]["fdb_overflow"] == 1
    g = frame(C, B)
    node.port("p3").inject(g, ts=T0 + 1)  # B unknown -> flooded
    assert take_all(node) == {"p1": [g], "p2": [g], "p3": [], "p4": [g]}


def test_full_fdb_still_forwards_unlearned_sources(node):
    # Same as above without going through the config.
    node.bridge.fdb.max_learned = 1
    node.port("p1").inject(frame(A, BCAST), ts=T0)
    f = frame(B, BCAST)
    node.port("p2").inject(f, ts=T0)
    assert take_all(node) == {"p1": [f], "p2": [frame(A, BCAST)], "p3": [frame(A, BCAST), f],
                              "p4": [frame(A, BCAST), f]}
    assert fdb_port(node, B) is None and fdb_port(node, A) == "p1"
    assert stats(node)["l2-learn"]["fdb_overflow"] == 1
    # A is still refreshed / moved while the table is full
    node.port("p3").inject(frame(A, BCAST), ts=T0 + 1)
    assert fdb_port(node, A) == "p3"


def test_shorter_ageing_time_on_the_fdb(node):
    node.bridge.fdb.ageing = 10.0
    node.port("p1").inject(frame(A, BCAST), ts=T0)
    take_all(node)
    f = frame(B, A)
    node.port("p2").inject(f, ts=T0 + 9.5)
    assert take_all(node)["p3"] == []
    node.port("p2").inject(f, ts=T0 + 10.5)
    assert take_all(node)["p3"] == [f]


# --- malformed frames ---------------------------------------------------------

@pytest.mark.parametrize("size", [0, 1, 13])
def test_runt_dropped(node, size):
    node.port("p1").inject(frame(A, B)[:size], ts=T0)
    assert take_all(node) == {"p1": [], "p2": [], "p3": [], "p4": []}
    assert drops(node)[("eth-input", "runt")] == 1
    st = stats(node)
    assert st["eth-input"]["packets"] == 1 and st["l2-learn"]["packets"] == 0


def test_bare_ethernet_header_is_not_a_runt(node):
    f = frame(A, B)[:14]
    node.port("p1").inject(f, ts=T0)
    assert take_all(node)["p2"] == [f]
    assert drops(node)[("eth-input", "runt")] == 0


# --- offloads: super-frames pass through untouched ---------------------------

def test_gso_super_frame_passes_byte_identical_with_vnet_header(node):
    vnet = struct.pack("<BBHHHH", 1, 1, 54, 1448, 34, 16)  # NEEDS_CSUM, TCPV4, hdr_len, mss, csum
    big = bytes(Ether(src=A, dst=B) / IP(src="10.0.0.1", dst="10.0.0.2") /
                TCP(sport=40000, dport=80, flags="A") / Raw(bytes(range(256)) * 240))
    assert len(big) > 60000
    node.port("p2").inject(frame(B, BCAST), ts=T0)  # learn B on p2
    for p in node.ports.values():
        p.sent.clear()
    node.port("p1").inject(big, ts=T0 + 1, vnet=vnet)
    assert node.port("p2").sent == [vnet + big]
    assert all(node.port(n).sent == [] for n in ("p1", "p3", "p4"))
    assert node.port("p2").tx_bytes == len(big)
    # and flooded copies are identical too
    to_unknown = mac_bytes(C) + big[6:]
    node.port("p1").inject(to_unknown, ts=T0 + 2, vnet=vnet)
    flooded = vnet + to_unknown
    assert [node.port(n).sent[-1] for n in ("p2", "p3", "p4")] == [flooded] * 3


# --- trace -------------------------------------------------------------------

def test_trace_dry_run_changes_nothing_and_records_each_stage():
    clock = Clock()
    node = make_node(clock=clock)
    node.port("p1").inject(frame(A, BCAST), ts=clock.t)
    take_all(node)
    fdb_before = node.show("fdb")
    # B is unknown (would be learned), A is known on p1 (hit)
    pkt = node.trace("p2", frame(B, A), dry_run=True)
    names = [s["stage"] for s in pkt.trace]
    assert names == ["eth-input", "l2-learn", "l2-forward", "port-tx"]
    assert [s["next"] for s in pkt.trace] == ["l2-learn", "l2-forward", "port-tx", None]
    assert all(isinstance(s["text"], str) and s["text"] for s in pkt.trace)
    rec = {s["stage"]: s["record"] for s in pkt.trace}
    assert rec["eth-input"]["port"] == "p2"
    assert rec["l2-learn"]["fdb"] == "would-learn"
    assert rec["l2-forward"]["decision"] == "hit" and rec["l2-forward"]["port"] == "p1"
    assert rec["port-tx"]["ports"] == ["p1"] and rec["port-tx"]["dry_run"] is True
    assert node.show("fdb") == fdb_before
    assert fdb_port(node, B) is None
    assert all(p.sent == [] for p in node.ports.values())
    assert pkt.id != 0


def test_trace_dry_run_does_not_move_or_refresh():
    clock = Clock()
    node = make_node(clock=clock)
    node.port("p1").inject(frame(A, BCAST), ts=clock.t)
    take_all(node)
    clock.t += 100
    pkt = node.trace("p3", frame(A, B), dry_run=True)  # would move A to p3, and flood
    rec = {s["stage"]: s["record"] for s in pkt.trace}
    assert rec["l2-learn"]["fdb"] == "would-move"
    assert rec["l2-forward"]["decision"] == "flood-unknown"
    assert sorted(rec["l2-forward"]["ports"]) == ["p1", "p2", "p4"]
    e = node.bridge.fdb.get(mac_bytes(A))
    assert e.port.name == "p1" and e.updated == T0
    assert node.bridge.fdb.moves == 0
    assert all(p.sent == [] for p in node.ports.values())


def test_trace_of_a_drop_ends_in_drop_stage():
    node = make_node()
    pkt = node.trace("p1", frame("01:00:5e:00:00:01", B), dry_run=True)
    assert [s["stage"] for s in pkt.trace] == ["eth-input", "l2-learn", "drop"]
    assert pkt.trace[-1]["record"]["stage"] == "l2-learn"
    assert pkt.trace[-1]["record"]["reason"] == "bad-src-mac"
    assert pkt.drop_reason == "bad-src-mac"
    runt = node.trace("p1", b"\x00" * 5, dry_run=True)
    assert [s["stage"] for s in runt.trace] == ["eth-input", "drop"]
    assert runt.trace[-1]["record"]["reason"] == "runt"


def test_trace_dry_run_link_local_does_not_learn():
    node = make_node()
    pkt = node.trace("p1", frame(A, "01:80:c2:00:00:0e"), dry_run=True)
    assert [s["stage"] for s in pkt.trace] == ["eth-input", "l2-learn", "drop"]
    assert len(node.bridge.fdb) == 0


def test_trace_without_dry_run_really_forwards():
    node = make_node()
    f = frame(A, B)
    pkt = node.trace("p1", f, dry_run=False)
    assert [s["stage"] for s in pkt.trace] == ["eth-input", "l2-learn", "l2-forward", "port-tx"]
    assert take_all(node) == {"p1": [], "p2": [f], "p3": [f], "p4": [f]}
    assert fdb_port(node, A) == "p1"


# --- static entries from the config ------------------------------------------

def test_static_entry_pins_mac():
    node = make_node(static=[{"mac": S, "port": "p1"}])
    assert node.show("fdb") == [{"mac": S, "port": "p1", "static": True, "age": None}]
    # S shows up on p2: it is not moved
    node.port("p2").inject(frame(S, BCAST), ts=T0)
    take_all(node)
    assert fdb_port(node, S) == "p1"
    f = frame(A, S)
    node.port("p3").inject(f, ts=T0 + 1)
    assert take_all(node) == {"p1": [f], "p2": [], "p3": [], "p4": []}
    # and it never ages
    node.port("p3").inject(f, ts=T0 + 10 ** 6)
    assert take_all(node)["p1"] == [f]
    assert node.bridge.fdb.moves == 0


# --- counters -----------------------------------------------------------------

def test_stage_counters_increase(node):
    before = stats(node)
    for i in range(3):
        node.port("p1").inject(frame(A, B), ts=T0 + i)
    node.port("p1").inject(frame("00:00:00:00:00:00", B), ts=T0 + 4)
    after = stats(node)
    assert after["eth-input"]["packets"] - before["eth-input"]["packets"] == 4
    assert after["l2-learn"]["packets"] - before["l2-learn"]["packets"] == 4
    assert after["l2-forward"]["packets"] - before["l2-forward"]["packets"] == 3
    assert after["port-tx"]["packets"] - before["port-tx"]["packets"] == 3
    assert after["drop"]["packets"] - before["drop"]["packets"] == 1
    assert after["l2-learn"]["drops"]["bad-src-mac"] == 1
    assert after["l2-learn"]["fdb_entries"] == 1
    assert node.port("p1").rx_packets == 4 and node.port("p2").tx_packets == 3


def test_drop_table_lists_declared_reasons_with_text(node):
    rows = node.show("drops")
    keys = {(r["stage"], r["reason"]) for r in rows}
    assert {("eth-input", "runt"), ("l2-learn", "bad-src-mac"), ("l2-learn", "pause-frame"),
            ("l2-learn", "link-local"), ("l2-forward", "same-port"), ("port-tx", "tx-error")} <= keys
    assert all(r["count"] == 0 and r["text"] for r in rows)


def test_single_port_flood_is_dropped():
    node = make_node(n=1)
    node.port("p1").inject(frame(A, BCAST), ts=T0)
    assert node.port("p1").sent == []
    assert drops(node)[("l2-forward", "flood-empty")] == 1


def test_removed_port_is_flushed_and_no_longer_flooded(node):
    node.port("p4").inject(frame(A, BCAST), ts=T0)
    take_all(node)
    node.remove_port("p4")
    assert fdb_port(node, A) is None
    f = frame(B, A)
    node.port("p1").inject(f, ts=T0 + 1)
    assert take_all(node) == {"p1": [], "p2": [f], "p3": [f]}
