"""Two in-process nodes joined by the VXLAN overlay over real UDP sockets.

The sockets live on loopback addresses of the sandbox's own network namespace
(127.0.0.1 and 127.0.0.2 play the two nodes' underlay addresses), so these
run only inside `vswitch sandbox`. Pods are memory ports; everything between
them is the real pipeline: router, flannel's route/neighbour/FDB entries, the
VTEP's segmentation and encapsulation, a kernel UDP socket each way.
"""

from __future__ import annotations

import asyncio
import struct
import subprocess

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.layers.vxlan import VXLAN
from scapy.packet import Raw

from router.interface import stable_mac
from vswitch.config import parse
from vswitch.node import Node
from vswitch.packet import VNET_HDR, VNET_LEN
from vswitch.ports import MemoryPort

pytestmark = pytest.mark.lab

NODES = {"a": ("127.0.0.1", "10.244.1.0/24", "10.244.1.1/24"), "b": ("127.0.0.2", "10.244.2.0/24", "10.244.2.1/24")}
POD_MAC = {"a": "02:00:00:00:0a:05", "b": "02:00:00:00:0b:05"}
POD_IP = {"a": "10.244.1.5", "b": "10.244.2.5"}


def vtep_mac(name: str) -> str:
    return stable_mac(name, "flannel.1").hex(":")


def config(name: str, **overlay) -> dict:
    local, cidr, gw = NODES[name]
    peers = [{"name": o, "address": NODES[o][0], "podCIDR": NODES[o][1], "vtepMAC": vtep_mac(o)}
             for o in NODES if o != name]
    return {"name": name, "flow_cache": 0,
            "router": {"interfaces": [{"name": "pods", "address": gw, "mtu": 1450}]},
            "overlay": {"local": local, "podCIDR": cidr, "mac": vtep_mac(name), "peers": peers, **overlay}}


class Pair:
    """Nodes a and b on one event loop, a memory pod port on each, pods' ARP entries known."""

    def __init__(self, a: dict | None = None, b: dict | None = None) -> None:
        self.loop = asyncio.new_event_loop()
        self.nodes, self.pods = {}, {}
        for name, extra in (("a", a or {}), ("b", b or {})):
            node = Node(parse(config(name, **extra)))
            node.start(self.loop)
            pod = node.attach(MemoryPort("pod"))
            node.router.neigh.add_permanent("pods", int.from_bytes(bytes(map(int, POD_IP[name].split("."))), "big"),
                                            bytes.fromhex(POD_MAC[name].replace(":", "")))
            self.nodes[name], self.pods[name] = node, pod

    def gw_mac(self, name: str) -> str:
        return self.nodes[name].router.ifaces["pods"].mac.hex(":")

    def send(self, name: str, pkt, vnet: bytes | None = None) -> None:
        frame = bytes(Ether(src=POD_MAC[name], dst=self.gw_mac(name)) / pkt)
        kw = {"vnet": vnet} if vnet is not None else {}
        self.pods[name].inject(frame, **kw)

    def run(self, until, timeout: float = 3.0) -> None:
        async def wait():
            deadline = self.loop.time() + timeout
            while not until() and self.loop.time() < deadline:
                await asyncio.sleep(0.01)
        self.loop.run_until_complete(wait())

    def received(self, name: str, n: int = 1, timeout: float = 3.0) -> list:
        self.run(lambda: len(self.pods[name].sent) >= n, timeout)
        return [Ether(f) for f in self.pods[name].take()]

    def close(self) -> None:
        for node in self.nodes.values():
            node.close()
        self.loop.close()


@pytest.fixture(scope="module", autouse=True)
def loopback_up():
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)


@pytest.fixture
def pair():
    p = Pair()
    yield p
    p.close()


def test_ping_crosses_the_tunnel_and_is_routed_on_both_sides(pair):
    pair.send("a", IP(src=POD_IP["a"], dst=POD_IP["b"], ttl=64) / ICMP(id=7, seq=1) / Raw(b"x" * 32))
    [f] = pair.received("b")
    assert (f[IP].src, f[IP].dst, f[IP].ttl) == (POD_IP["a"], POD_IP["b"], 62)  # routed by a and by b
    assert (f.src, f.dst) == (pair.gw_mac("b"), POD_MAC["b"])
    assert f[ICMP].id == 7 and bytes(f[Raw]) == b"x" * 32
    va, vb = pair.nodes["a"].overlay.vtep, pair.nodes["b"].overlay.vtep
    assert (va.tx_packets, vb.rx_packets) == (1, 1)


def test_reply_comes_back(pair):
    pair.send("a", IP(src=POD_IP["a"], dst=POD_IP["b"]) / ICMP(id=9))
    pair.received("b")
    pair.send("b", IP(src=POD_IP["b"], dst=POD_IP["a"]) / ICMP(type=0, id=9))
    [f] = pair.received("a")
    assert f[ICMP].type == 0 and f[IP].src == POD_IP["b"]


PAYLOAD = bytes(range(256)) * 40  # 10240 bytes: 7 segments of 1398 and a short one


def send_super_frame(pair) -> None:
    """What a pod's TSO write looks like: partial checksum (pseudo-header sum), gso_size = MSS."""
    from overlay.segment import pseudo_field
    from router.ipv4 import ip_int
    pkt = IP(src=POD_IP["a"], dst=POD_IP["b"], flags="DF", id=100) / \
        TCP(sport=40000, dport=5201, seq=1000, flags="PA") / Raw(PAYLOAD)
    raw = bytearray(bytes(Ether(src=POD_MAC["a"], dst=pair.gw_mac("a")) / pkt))
    l4 = 14 + 20
    struct.pack_into("!H", raw, l4 + 16, pseudo_field(ip_int(POD_IP["a"]), ip_int(POD_IP["b"]), 6, len(raw) - l4))
    pair.pods["a"].inject(bytes(raw), vnet=VNET_HDR.pack(1, 1, 54, 1398, l4, 16))


def test_super_frame_is_segmented_on_the_wire_and_merged_again_for_the_pod(pair):
    send_super_frame(pair)
    pair.run(lambda: pair.pods["b"].sent)
    [buf] = pair.pods["b"].sent
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = VNET_HDR.unpack_from(buf)
    assert (flags, gso_type, gso_size, csum_start, csum_offset) == (1, 1, 1398, 34, 16)  # GRO: one TSO write
    f = Ether(buf[VNET_LEN:])
    assert bytes(f[Raw]) == PAYLOAD and f[TCP].seq == 1000 and f[TCP].flags == "PA" and f[IP].ttl == 62
    va, vb = pair.nodes["a"].overlay.vtep, pair.nodes["b"].overlay.vtep
    assert va.tx_packets == 8 and va.tx_calls == 1  # eight datagrams, one UDP GSO sendmsg
    assert vb.rx_packets == 8


def test_without_gro_the_pod_gets_valid_segments():
    p = Pair(b={"gro": False})
    try:
        send_super_frame(p)
        segs = p.received("b", n=8)
        assert len(segs) == 8 and all(len(s[Raw]) <= 1398 for s in segs)
        assert b"".join(bytes(s[Raw]) for s in sorted(segs, key=lambda s: s[TCP].seq)) == PAYLOAD
        for s in segs:  # every segment's checksums verify
            tcp = s[TCP].copy()
            del tcp.chksum
            assert TCP(bytes(IP(src=s[IP].src, dst=s[IP].dst) / tcp)[20:]).chksum == s[TCP].chksum
    finally:
        p.close()


def test_no_fdb_entry_drops_with_a_reason(pair):
    a = pair.nodes["a"]
    a.peer_del("b")
    assert a.overlay.rows() == [] and not any(r["dst"] == "10.244.2.0/24" for r in a.show("routes"))
    pair.send("a", IP(src=POD_IP["a"], dst=POD_IP["b"]) / ICMP())
    [err] = pair.received("a")  # no route now: net unreachable from the gateway
    assert err[ICMP].type == 3 and err[ICMP].code == 0
    a.peer_add({"name": "b", "address": NODES["b"][0], "podCIDR": NODES["b"][1], "vtepMAC": vtep_mac("b")})
    pair.send("a", IP(src=POD_IP["a"], dst=POD_IP["b"]) / ICMP())
    assert len(pair.received("b")) == 1
    # the FDB forgets b's MAC while route and neighbour stay: transmit finds no FDB entry
    a.overlay.vtep.fdb.clear()
    pair.send("a", IP(src=POD_IP["a"], dst=POD_IP["b"]) / ICMP())
    pair.run(lambda: False, 0.2)
    assert a.overlay.vtep.drops["no-fdb"] == 1 and pair.pods["b"].take() == []


def test_unknown_peer_is_dropped_and_counted():
    p = Pair(b={"peers": []})  # b knows no peers: a's tunnel packets are from a stranger
    try:
        p.send("a", IP(src=POD_IP["a"], dst=POD_IP["b"]) / ICMP())
        vb = p.nodes["b"].overlay.vtep
        p.run(lambda: vb.drops["unknown-peer"] > 0)
        assert vb.drops["unknown-peer"] == 1 and p.pods["b"].take() == []
    finally:
        p.close()


def test_frag_needed_at_the_tunnel_mtu(pair):
    pair.send("a", IP(src=POD_IP["a"], dst=POD_IP["b"], flags="DF") / UDP(sport=1, dport=2) / Raw(b"x" * 1472))
    [err] = pair.received("a")
    assert (err[ICMP].type, err[ICMP].code, err[ICMP].nexthopmtu) == (3, 4, 1450)


def test_wire_format_is_standard_vxlan(pair):
    """What leaves the socket, caught by a raw listener on loopback, decodes as VXLAN VNI 1 port 8472."""
    import socket
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
    s.bind(("lo", 0))
    s.settimeout(2)
    try:
        pair.send("a", IP(src=POD_IP["a"], dst=POD_IP["b"], tos=0x02) / UDP(sport=5000, dport=53) / Raw(b"q"))
        pair.received("b")
        while True:
            f = Ether(s.recv(70000))
            if UDP in f and f[UDP].dport == 8472:
                break
    finally:
        s.close()
    assert f[IP].flags.DF == 0 and f[IP].ttl == 64 and f[IP].tos & 3 == 2  # ECN copied
    assert 32768 <= f[UDP].sport <= 60999 and f[UDP].chksum != 0
    assert f[VXLAN].vni == 1 and f[VXLAN].flags == 0x08
    inner = f[VXLAN].payload
    assert inner.src == vtep_mac("a") and inner.dst == vtep_mac("b") and inner[IP].dst == POD_IP["b"]


def _datagram_with_outer_tos(pair, tos: int, inner_tos: int) -> None:
    """A VXLAN datagram from node a's address (a raw UDP socket, not its VTEP) with outer TOS ``tos``."""
    import socket
    inner = bytes(Ether(src=vtep_mac("a"), dst=vtep_mac("b")) /
                  IP(src=POD_IP["a"], dst=POD_IP["b"], tos=inner_tos) / UDP(sport=1, dport=2) / Raw(b"ecn"))
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.bind((NODES["a"][0], 0))
        s.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, tos)
        s.sendto(bytes(VXLAN(vni=1, flags=0x08)) + inner, (NODES["b"][0], 8472))
    finally:
        s.close()


def test_outer_ce_is_copied_into_an_ect_inner_packet(pair):
    """RFC 6040 on the socket datapath: the outer TOS arrives by IP_RECVTOS."""
    _datagram_with_outer_tos(pair, tos=0x03, inner_tos=0x02)  # CE over ECT(0)
    [got] = pair.received("b")
    assert got[IP].tos & 3 == 3
    fixed = IP(bytes(got[IP]))
    del fixed.chksum
    assert IP(bytes(fixed)).chksum == got[IP].chksum  # the header checksum was updated with the TOS


def test_outer_ce_over_a_not_ect_inner_packet_is_dropped(pair):
    _datagram_with_outer_tos(pair, tos=0x03, inner_tos=0x00)
    vb = pair.nodes["b"].overlay.vtep
    pair.run(lambda: vb.drops["vxlan-ecn-not-ect"] > 0)
    assert vb.drops["vxlan-ecn-not-ect"] == 1 and pair.pods["b"].take() == []
