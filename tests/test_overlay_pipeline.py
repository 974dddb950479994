"""The in-pipeline VXLAN datapath (overlay/stages.py), in-process: two nodes joined by a wire.

Each node's uplink is a memory port whose ``tunnel`` attribute models a TAP
opened with UDP-tunnel GSO (True) or without it (False); ``Pair.pump``
carries every frame an uplink sends, virtio-net header included, into the
other node's uplink. Pods are memory ports too. Checksums are checked with
scapy or with the small one's-complement helpers below, never with the code
under test.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import List, NamedTuple

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import ARP, Ether
from scapy.layers.vxlan import VXLAN

from router.interface import stable_mac
from vswitch.config import ConfigError, parse
from vswitch.node import Node
from vswitch.packet import (GSO_NONE, GSO_TCPV4, GSO_UDP_TUNNEL, VNET_F_NEEDS_CSUM, VNET_F_UDP_TUNNEL_CSUM, VNET_HDR,
                            VNET_LEN, ZERO_VNET, VnetHdr, mac_bytes)
from vswitch.ports import MemoryPort
from vswitch.ports.tap import TUNNEL_HDR_LEN, _tunnel_tail
from vswitch.sim import SimNode

NODES = {"a": ("192.168.1.1", "10.244.1.0/24", "10.244.1.1/24"),
         "b": ("192.168.1.2", "10.244.2.0/24", "10.244.2.1/24")}
POD_MAC = {"a": "02:00:00:00:0a:05", "b": "02:00:00:00:0b:05"}
POD_IP = {"a": "10.244.1.5", "b": "10.244.2.5"}
STRANGER = "192.168.1.9"  # on the underlay subnet, not a peer
MSS = 1398
OUTER = 50  # outer Ethernet + IPv4 + UDP + VXLAN
VXLAN_PORT = 8472
CE, ECT0, NOT_ECT = 3, 2, 0


# --- checksums, computed here ---------------------------------------------------

def ip_int(text: str) -> int:
    return int(ipaddress.IPv4Address(text))


def ones_sum(data: bytes, init: int = 0) -> int:
    """Folded 16-bit one's-complement sum of ``data`` (odd length padded with a zero byte)."""
    if len(data) % 2:
        data += b"\0"
    s = init + sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def pseudo(src: str, dst: str, proto: int, length: int) -> int:
    """Unfolded IPv4 pseudo-header sum."""
    s, d = ip_int(src), ip_int(dst)
    return (s >> 16) + (s & 0xFFFF) + (d >> 16) + (d & 0xFFFF) + proto + length


def ip_header_ok(frame: bytes, l3: int = 14) -> bool:
    return ones_sum(frame[l3:l3 + (frame[l3] & 0x0F) * 4]) == 0xFFFF


def complete_by_hand(frame: bytearray, start: int, offset: int) -> None:
    """Fill a pending (NEEDS_CSUM) checksum: the complement of the sum from ``start`` to the end."""
    frame[start + offset:start + offset + 2] = ((~ones_sum(bytes(frame[start:]))) & 0xFFFF).to_bytes(2, "big")


def scapy_checksums(pkt, *layers) -> list:
    """``(carried, recomputed by scapy)`` for the checksum of each of ``layers``, given as
    ``(class, nb)`` in scapy's getlayer numbering: ``(IP, 1)`` the outer IP, ``(IP, 2)`` the inner."""
    out = []
    for cls, nb in layers:
        again = pkt.copy()
        del again.getlayer(cls, nb).chksum
        out.append((pkt.getlayer(cls, nb).chksum, Ether(bytes(again)).getlayer(cls, nb).chksum))
    return out


# --- two nodes on a wire ----------------------------------------------------------

def vtep_mac(name: str) -> bytes:
    return stable_mac(name, "flannel.1")


HOST_ADDR = "169.254.1.1"


def config(name: str, *, flow_cache: int = 0, local: str | None = None, host: bool = False, **overlay) -> dict:
    """Node ``name``: pods behind the bridge, an uplink tap owning the underlay address, the overlay
    (``local`` defaults to the uplink's address); ``host`` adds a host interface on its own tap."""
    addr, cidr, gw = NODES[name]
    peers = [{"name": o, "address": NODES[o][0], "podCIDR": NODES[o][1], "vtepMAC": vtep_mac(o).hex(":")}
             for o in NODES if o != name]
    ports = [{"name": "uplink", "type": "tap"}]
    ifaces = [{"name": "pods", "address": gw, "mtu": 1450},
              {"name": "uplink", "port": "uplink", "address": addr + "/24"}]
    if host:
        ports.append({"name": "host", "type": "tap"})
        ifaces.append({"name": "host", "port": "host", "host": True, "address": HOST_ADDR + "/32"})
    return {"name": name, "flow_cache": flow_cache, "ports": ports, "router": {"interfaces": ifaces},
            "overlay": {"local": local or addr, "podCIDR": cidr, "mac": vtep_mac(name).hex(":"), "peers": peers,
                        **overlay}}


class Wired(NamedTuple):
    """One frame that crossed the wire: sender, its virtio-net header, the bare frame."""
    src: str
    vnet: VnetHdr
    frame: bytes


class Pair:
    """Nodes a and b, pipeline datapath, uplinks joined by ``pump``. Each pod's neighbour and FDB
    entries are static, and so (unless ``arp``) is each node's underlay neighbour: nothing but the
    test's own traffic crosses and nothing is flooded."""

    def __init__(self, *, tunnel: bool = True, flow_cache: int = 0, arp: bool = False) -> None:
        self.nodes, self.pods, self.uplinks = {}, {}, {}
        self.tunnel = tunnel
        for name in NODES:
            node = Node(parse(config(name, flow_cache=flow_cache)))
            node.start(None, make_port=self._uplink)
            assert node.overlay.pipeline and node.overlay.encap is not None
            self.nodes[name], self.uplinks[name] = node, node.ports["uplink"]
            self.pods[name] = node.attach(MemoryPort("pod"))
            node.router.neigh.add_permanent("pods", ip_int(POD_IP[name]), mac_bytes(POD_MAC[name]))
            node.fdb_add(POD_MAC[name], "pod")  # as if learned: frames to the pod are not floods
        for name, other in (("a", "b"), ("b", "a")):
            if not arp:
                self.nodes[name].router.neigh.add_permanent("uplink", ip_int(NODES[other][0]), self.uplink_mac(other))

    def _uplink(self, spec: dict) -> MemoryPort:
        """The configured tap port as a memory port, with or without UDP-tunnel GSO."""
        port = MemoryPort(spec["name"])
        port.tunnel = self.tunnel
        return port

    def uplink_mac(self, name: str) -> bytes:
        return self.nodes[name].router.ifaces["uplink"].mac

    def gw_mac(self, name: str) -> str:
        return self.nodes[name].router.ifaces["pods"].mac.hex(":")

    def pod_frame(self, name: str, ip_pkt) -> bytearray:
        return bytearray(bytes(Ether(src=POD_MAC[name], dst=self.gw_mac(name)) / ip_pkt))

    def send(self, name: str, frame, vnet: bytes = ZERO_VNET) -> List[Wired]:
        """Pod ``name`` sends ``frame`` (bytes, or a scapy IP packet); returns what crossed the wire."""
        if not isinstance(frame, (bytes, bytearray)):
            frame = self.pod_frame(name, frame)
        self.pods[name].inject(bytes(frame), vnet=vnet)
        return self.pump()

    def pump(self) -> List[Wired]:
        crossed = []
        moved = True
        while moved:
            moved = False
            for x, y in (("a", "b"), ("b", "a")):
                sent, self.uplinks[x].sent = self.uplinks[x].sent, []
                for buf in sent:
                    moved = True
                    crossed.append(Wired(x, VnetHdr(*VNET_HDR.unpack_from(buf, 0)), buf[VNET_LEN:]))
                    self.uplinks[y].inject(buf[VNET_LEN:], vnet=buf[:VNET_LEN])
        return crossed

    def delivered(self, name: str) -> List[Wired]:
        """What pod ``name`` received since the last call."""
        sent, self.pods[name].sent = self.pods[name].sent, []
        return [Wired(name, VnetHdr(*VNET_HDR.unpack_from(b, 0)), b[VNET_LEN:]) for b in sent]

    def inject_outer(self, name: str, frame: bytes, vnet: bytes = ZERO_VNET) -> None:
        """An outer frame straight into node ``name``'s uplink (as if from the wire)."""
        self.uplinks[name].inject(frame, vnet=vnet)


@pytest.fixture
def pair() -> Pair:
    return Pair()


# --- what pods send -----------------------------------------------------------------

def tcp(payload: bytes = b"", *, seq: int = 1000, flags: str = "PA", sport: int = 40000, tos: int = 0):
    return (IP(src=POD_IP["a"], dst=POD_IP["b"], ttl=64, flags="DF", tos=tos, id=777)
            / TCP(sport=sport, dport=80, seq=seq, ack=1, flags=flags, window=502) / payload)


def with_partial_csum(pair: Pair, ip_pkt, gso: int = GSO_NONE) -> tuple:
    """Pod a's frame and virtio-net header as its kernel hands them to the TAP: the TCP checksum field
    holds the folded, uncomplemented pseudo-header sum (NEEDS_CSUM, csum_start at TCP); with
    ``gso`` GSO_TCPV4 a TSO super-frame cut at MSS."""
    frame = pair.pod_frame("a", ip_pkt)
    tcp_len = len(frame) - 34
    frame[50:52] = ones_sum(b"", pseudo(POD_IP["a"], POD_IP["b"], 6, tcp_len)).to_bytes(2, "big")
    hdr_end = 34 + (frame[34 + 12] >> 4) * 4
    vnet = VNET_HDR.pack(VNET_F_NEEDS_CSUM, gso, hdr_end if gso else 0, MSS if gso else 0, 34, 16)
    return bytes(frame), vnet


def pattern(n: int) -> bytes:
    return bytes(i * 7 % 251 for i in range(n))


def outer_fields(frame: bytes) -> dict:
    """The outer headers of a wire frame, read at their fixed offsets."""
    ver_ihl, tos, tot, ident, frag, ttl, proto, _c, src, dst = struct.unpack_from("!BBHHHBBH4s4s", frame, 14)
    sport, dport, ulen, ucsum, vx_flags, vni = struct.unpack_from("!HHHHII", frame, 34)
    return {"ihl": ver_ihl, "tos": tos, "tot": tot, "id": ident, "frag": frag, "ttl": ttl, "proto": proto,
            "src": str(ipaddress.IPv4Address(src)), "dst": str(ipaddress.IPv4Address(dst)), "sport": sport,
            "dport": dport, "ulen": ulen, "ucsum": ucsum, "vx_flags": vx_flags >> 24, "vni": vni >> 8}


def assert_outer_headers(pair: Pair, frame: bytes) -> dict:
    """What every frame a → b carries outside, as vxlan_xmit_one builds it with flannel's settings."""
    o = outer_fields(frame)
    assert frame[:6] == pair.uplink_mac("b") and frame[6:12] == pair.uplink_mac("a")
    assert frame[12:14] == b"\x08\x00"
    assert (o["ihl"], o["ttl"], o["proto"]) == (0x45, 64, 17)
    assert o["frag"] == 0  # DF clear, not a fragment
    assert ip_header_ok(frame)
    assert (o["src"], o["dst"]) == (NODES["a"][0], NODES["b"][0])
    assert o["tot"] == len(frame) - 14 and o["ulen"] == len(frame) - 34
    assert o["dport"] == VXLAN_PORT and 32768 <= o["sport"] < 60999
    assert (o["vx_flags"], o["vni"]) == (0x08, 1)
    assert frame[50:56] == vtep_mac("b") and frame[56:62] == vtep_mac("a")  # inner MACs: flannel.1's
    return o


# --- 1. a TSO super-frame crosses whole --------------------------------------------------

def test_tso_super_frame_crosses_as_one_tunnel_gso_frame(pair):
    data = pattern(5000)
    frame, vnet = with_partial_csum(pair, tcp(data, seq=1000), GSO_TCPV4)
    wire = pair.send("a", frame, vnet)

    assert len(wire) == 1 and wire[0].src == "a"
    w = wire[0]
    assert w.vnet.flags == VNET_F_NEEDS_CSUM | VNET_F_UDP_TUNNEL_CSUM == 9
    assert w.vnet.gso_type == GSO_TCPV4 | GSO_UDP_TUNNEL
    assert w.vnet.gso_size == MSS
    assert (w.vnet.csum_start, w.vnet.csum_offset) == (OUTER + 34, 16)
    assert w.vnet.hdr_len == OUTER + 34 + 20  # the headers up to the inner TCP payload
    o = assert_outer_headers(pair, w.frame)
    # udp_set_csum for a GSO packet leaves ~csum_tcpudp_magic: the folded pseudo-header sum (with the
    # super-frame's whole UDP length), not complemented; each segment's sum is completed on the wire
    assert o["ucsum"] == ones_sum(b"", pseudo(NODES["a"][0], NODES["b"][0], 17, len(w.frame) - 34))
    inner = Ether(w.frame[OUTER:])
    assert inner[IP].ttl == 63 and ip_header_ok(w.frame, OUTER + 14)
    assert bytes(inner[TCP]) == frame[34:]  # untouched, the pending checksum included

    got = pair.delivered("b")
    assert len(got) == 1
    d = got[0]
    assert d.vnet.flags == VNET_F_NEEDS_CSUM
    assert (d.vnet.gso_type, d.vnet.gso_size, d.vnet.csum_start, d.vnet.csum_offset) == (GSO_TCPV4, MSS, 34, 16)
    p = Ether(d.frame)
    assert (p.src, p.dst) == (pair.gw_mac("b"), POD_MAC["b"])
    assert p[IP].ttl == 62 and ip_header_ok(d.frame)
    assert p[TCP].seq == 1000 and bytes(p[TCP].payload) == data
    assert d.frame[34:] == frame[34:]

    # the same flow again: the same source port; the outer IP ID moved on by the segment count
    frame2, vnet2 = with_partial_csum(pair, tcp(data, seq=6000), GSO_TCPV4)
    w2 = pair.send("a", frame2, vnet2)[0]
    o2 = outer_fields(w2.frame)
    assert o2["sport"] == o["sport"]
    assert o2["id"] == (o["id"] + 4) & 0xFFFF  # ceil(5000 / 1398) segments
    assert Ether(pair.delivered("b")[0].frame)[TCP].seq == 6000
    assert pair.nodes["a"].overlay.vtep.tx_packets == pair.nodes["b"].overlay.vtep.rx_packets == 8
    # and the connection's other direction leaves b with that same port (the flow hash is symmetric)
    (back,) = pair.send("b", IP(src=POD_IP["b"], dst=POD_IP["a"]) / TCP(sport=80, dport=40000, flags="A"))
    assert back.src == "b" and outer_fields(back.frame)["sport"] == o["sport"]
    assert len(pair.delivered("a")) == 1


@pytest.mark.parametrize("gso", [GSO_TCPV4, GSO_NONE], ids=["super-frame", "single"])
def test_encap_in_the_headroom_sends_what_a_copy_sends(gso):
    """Ports hand frames on with headroom, and vxlan-encap writes the outer headers there; a frame
    without headroom (a bytearray of its own) is copied behind new headers: same bytes either way."""
    data = pattern(5000 if gso else 100)
    wires = []
    for room in (True, False):
        pair = Pair()
        frame, vnet = with_partial_csum(pair, tcp(data), gso)
        pod = pair.pods["a"]
        if room:
            pod.inject(bytes(frame), vnet=vnet)
        else:
            pair.nodes["a"].receive(pod, bytearray(vnet) + frame, 0.0)
        wires.append([(w.vnet, without_ip_id(w.frame)) for w in pair.pump()])  # IDs count on
        assert len(pair.delivered("b")) == 1
    assert len(wires[0]) == 1 and wires[0] == wires[1]
    inner = wires[0][0][1][OUTER:]
    assert Ether(inner)[TCP].payload.load == data  # the inner frame survived the headers written in front


# --- 2. a pending inner checksum stays pending -----------------------------------------

def test_pending_inner_checksum_moves_out_by_50_and_outer_checksum_holds(pair):
    frame, vnet = with_partial_csum(pair, tcp(flags="S", seq=42))
    w = pair.send("a", frame, vnet)
    assert len(w) == 1
    wv, wire = w[0].vnet, bytearray(w[0].frame)
    assert (wv.flags, wv.gso_type, wv.csum_start, wv.csum_offset) == (VNET_F_NEEDS_CSUM, GSO_NONE, OUTER + 34, 16)
    assert_outer_headers(pair, bytes(wire))

    complete_by_hand(wire, wv.csum_start, wv.csum_offset)
    p = Ether(bytes(wire))
    assert TCP in p and p[TCP].flags == "S"
    (udp_sent, udp_want), (tcp_sent, tcp_want) = scapy_checksums(p, (UDP, 1), (TCP, 1))
    assert udp_sent != 0 and udp_sent == udp_want
    assert tcp_sent == tcp_want

    got = pair.delivered("b")  # the wire carried it still pending: so does pod b's TAP
    assert len(got) == 1
    assert (got[0].vnet.flags, got[0].vnet.csum_start, got[0].vnet.csum_offset) == (VNET_F_NEEDS_CSUM, 34, 16)
    assert got[0].frame[34:] == frame[34:]


# --- 3. an uplink without tunnel offload ------------------------------------------------

def test_uplink_without_tunnel_offload_gets_software_segments():
    pair = Pair(tunnel=False)
    data = pattern(5000)
    n = -(-len(data) // MSS)
    frame, vnet = with_partial_csum(pair, tcp(data, seq=1000, flags="PA"), GSO_TCPV4)
    wire = pair.send("a", frame, vnet)

    assert len(wire) == n == 4
    sports, ids, joined = set(), [], b""
    for i, w in enumerate(wire):
        assert w.vnet == (0, 0, 0, 0, 0, 0)
        o = assert_outer_headers(pair, w.frame)
        assert len(w.frame) <= 1514
        sports.add(o["sport"])
        ids.append(o["id"])
        p = Ether(w.frame)
        for sent, want in scapy_checksums(p, (IP, 1), (UDP, 1), (IP, 2), (TCP, 1)):
            assert sent == want
        assert p[UDP].chksum != 0
        inner_tcp = p[TCP]
        assert inner_tcp.seq == 1000 + i * MSS
        assert ("P" in inner_tcp.flags) == (i == n - 1)  # PSH only on the last segment
        joined += bytes(inner_tcp.payload)
    assert joined == data
    assert len(sports) == 1
    assert ids == [(ids[0] + i) & 0xFFFF for i in range(n)]
    assert pair.nodes["a"].overlay.encap.software_frames == 1

    got = pair.delivered("b")
    assert len(got) == n
    assert all(g.vnet == (0, 0, 0, 0, 0, 0) for g in got)
    assert b"".join(bytes(Ether(g.frame)[TCP].payload) for g in got) == data
    assert all(Ether(g.frame)[IP].ttl == 62 and ip_header_ok(g.frame) for g in got)


@pytest.mark.parametrize("inner_tos, outer_tos", [
    (NOT_ECT, 0), (ECT0, ECT0), (1, 1), (CE, ECT0), (0xB8 | ECT0, ECT0),  # DSCP EF is not copied (tos 0)
])
def test_encap_carries_only_the_ecn_field_and_ce_as_ect0(pair, inner_tos, outer_tos):
    """INET_ECN_encapsulate with flannel's tos 0 (RFC 6040 normal mode); the inner packet is untouched."""
    (w,) = pair.send("a", tcp(b"x", tos=inner_tos))
    assert outer_fields(w.frame)["tos"] == outer_tos
    assert ip_header_ok(w.frame)
    assert Ether(pair.delivered("b")[0].frame)[IP].tos == inner_tos


@pytest.mark.parametrize("ident", [0, 0x7FFF, 0xFFFE, 0xFFFF])
def test_outer_ip_checksum_holds_for_any_id_length_and_tos(pair, ident):
    """vxlan-encap sums the outer IP header's checksum from its fields instead of reading the
    header back: it must verify for IDs up to the wrap, short and super-sized frames, any ECN."""
    from overlay import vxlan
    key = (ip_int(NODES["a"][0]), ip_int(NODES["b"][0]), 17)
    for size, gso, tos in ((1, GSO_NONE, CE), (1400, GSO_NONE, 1), (5000, GSO_TCPV4, ECT0), (60000, GSO_TCPV4, 0)):
        vxlan.IDENTS._next[key] = ident
        frame, vnet = with_partial_csum(pair, tcp(pattern(size), tos=tos), gso)
        (w,) = pair.send("a", frame, vnet)
        o = outer_fields(w.frame)
        assert o["id"] == ident and o["tos"] == (ECT0 if tos == CE else tos)
        assert ip_header_ok(w.frame), (size, tos)
        assert len(pair.delivered("b")) == 1


def test_inner_fragments_cross_one_outer_frame_each_in_order(pair):
    """A datagram over flannel.1's MTU without DF is fragmented first (ip4-forward), then each
    fragment is encapsulated on its own."""
    datagram = IP(src=POD_IP["a"], dst=POD_IP["b"], id=99) / UDP(sport=5000, dport=53) / pattern(3000)
    wire = pair.send("a", datagram)
    assert len(wire) == 3
    for w in wire:
        assert_outer_headers(pair, w.frame)
        assert len(w.frame) - OUTER - 14 <= 1450
    got = [Ether(g.frame)[IP] for g in pair.delivered("b")]
    assert [ip.frag * 8 for ip in got] == [0, 1424, 2848]
    assert [bool(ip.flags.MF) for ip in got] == [True, True, False]
    assert all(ip.id == 99 and ip.ttl == 62 for ip in got)
    assert b"".join(bytes(ip.payload) for ip in got) == bytes(datagram)[20:]


@pytest.mark.parametrize("tunnel", [True, False], ids=["tunnel-gso", "software-gso"])
def test_super_frame_waits_for_the_underlay_neighbour(tunnel):
    """The outer frames queue on the uplink's unresolved neighbour (ARP) and leave in order after the reply."""
    pair = Pair(tunnel=tunnel, arp=True)
    frame, vnet = with_partial_csum(pair, tcp(pattern(5000), seq=1000), GSO_TCPV4)
    wire = pair.send("a", frame, vnet)
    arps = [w for w in wire if w.frame[12:14] == b"\x08\x06"]
    outers = [w for w in wire if w.frame[12:14] == b"\x08\x00"]
    assert [w.src for w in arps] == ["a", "b"]  # request, reply
    assert len(outers) == (1 if tunnel else 4) and all(w.src == "a" for w in outers)
    got = pair.delivered("b")
    assert [Ether(g.frame)[TCP].seq for g in got] == ([1000] if tunnel else [1000 + i * MSS for i in range(4)])


# --- 4, 5. receive checks and ECN ------------------------------------------------------

def outer_from_a(pair: Pair, *, src: str = NODES["a"][0], vni: int = 1, inner_src: bytes | None = None,
                 udp_chksum: int | None = None, tos: int = 0, inner_tos: int = 0) -> bytes:
    """An outer frame for node b as node a would send it (ICMP echo inside), fields overridable."""
    inner = (Ether(src=(inner_src or vtep_mac("a")).hex(":"), dst=vtep_mac("b").hex(":"))
             / IP(src=POD_IP["a"], dst=POD_IP["b"], ttl=63, tos=inner_tos) / ICMP(id=7, seq=1) / b"ping")
    return bytes(Ether(src=pair.uplink_mac("a").hex(":"), dst=pair.uplink_mac("b").hex(":"))
                 / IP(src=src, dst=NODES["b"][0], tos=tos, ttl=64)
                 / UDP(sport=45000, dport=VXLAN_PORT, chksum=udp_chksum) / VXLAN(flags=0x08, vni=vni) / inner)


def with_bad_udp_checksum(pair: Pair) -> bytes:
    frame = bytearray(outer_from_a(pair))
    good = int.from_bytes(frame[40:42], "big")
    bad = good ^ 0x0100  # 256 away: never the same value in one's complement, never 0 here
    assert good and bad
    frame[40:42] = bad.to_bytes(2, "big")
    return bytes(frame)


DROP_CASES = {
    "unknown-peer": lambda pair: outer_from_a(pair, src=STRANGER),
    "udp-bad-checksum": with_bad_udp_checksum,
    "vxlan-unknown-vni": lambda pair: outer_from_a(pair, vni=2),
    "vxlan-own-mac": lambda pair: outer_from_a(pair, inner_src=vtep_mac("b")),
    "vxlan-ecn-not-ect": lambda pair: outer_from_a(pair, tos=CE, inner_tos=NOT_ECT),
}


@pytest.mark.parametrize("reason", list(DROP_CASES))
def test_decap_drops(pair, reason):
    node = pair.nodes["b"]
    decap, vtep = node.overlay.decap, node.overlay.vtep
    pair.inject_outer("b", DROP_CASES[reason](pair))  # vnet flags 0: the UDP checksum is ours to verify

    assert pair.delivered("b") == []
    assert decap.drop_counts[reason] == 1
    assert sum(decap.drop_counts.values()) == 1
    assert dict(vtep.drops) == {reason: 1}
    assert node.overlay.port.rx_drops == 1
    assert vtep.rx_packets == 0
    assert {(r["stage"], r["reason"]) for r in node.show("drops") if r["count"]} == {("vxlan-decap", reason)}


def test_decap_accepts_zero_udp_checksum(pair):
    pair.inject_outer("b", outer_from_a(pair, udp_chksum=0))
    got = pair.delivered("b")
    assert len(got) == 1
    p = Ether(got[0].frame)
    assert ICMP in p and bytes(p[ICMP].payload) == b"ping" and p[IP].ttl == 62
    vtep = pair.nodes["b"].overlay.vtep
    assert vtep.rx_packets == 1 and not vtep.drops


def test_decap_accepts_its_own_valid_checksum(pair):
    """The control for the drop cases: the same frame with scapy's checksum goes through."""
    pair.inject_outer("b", outer_from_a(pair))
    assert len(pair.delivered("b")) == 1
    assert not pair.nodes["b"].overlay.vtep.drops


@pytest.mark.parametrize("flow_cache", [0, 1024])
def test_outer_ce_is_copied_into_an_ect_inner_packet(flow_cache):
    pair = Pair(flow_cache=flow_cache)
    for _ in range(3):  # with the cache: slow path, outer flow hit, both flows hit
        pair.inject_outer("b", outer_from_a(pair, tos=CE, inner_tos=ECT0))
        got = pair.delivered("b")
        assert len(got) == 1
        p = Ether(got[0].frame)
        assert p[IP].tos == CE and p[IP].ttl == 62
        assert ip_header_ok(got[0].frame)
    if flow_cache:
        assert pair.nodes["b"].flows.hits == 3


def test_ce_is_not_set_on_an_ect_inner_packet_without_outer_ce(pair):
    pair.inject_outer("b", outer_from_a(pair, tos=ECT0, inner_tos=ECT0))
    p = Ether(pair.delivered("b")[0].frame)
    assert p[IP].tos == ECT0


# --- 6. flow cache ----------------------------------------------------------------------

def run_flow(pair: Pair, count: int) -> tuple:
    """``count`` super-frames of one TCP flow a → b; returns (wire frames, pod b's buffers)."""
    wire, got = [], []
    for i in range(count):
        frame, vnet = with_partial_csum(pair, tcp(pattern(3000), seq=1000 + i * 3000), GSO_TCPV4)
        wire += pair.send("a", frame, vnet)
        got += [(g.vnet, g.frame) for g in pair.delivered("b")]
    return wire, got


def without_ip_id(frame: bytes) -> bytes:
    """The outer IP ID (a per-process random start) and the header checksum that covers it, zeroed."""
    return frame[:18] + bytes(2) + frame[20:24] + bytes(2) + frame[26:]


def stage_packets(node: Node) -> dict:
    return {r["stage"]: r["packets"] for r in node.stats() if not r["stage"].startswith("(")}


@pytest.mark.parametrize("tunnel", [True, False], ids=["tunnel-gso", "software-gso"])
def test_flow_cache_hits_both_ends_and_changes_nothing(tunnel):
    count, segs = 5, (1 if tunnel else 3)  # 3000 bytes: one tunnel super-frame, or 3 segments at MSS 1398
    cached, plain = Pair(tunnel=tunnel, flow_cache=1024), Pair(tunnel=tunnel, flow_cache=0)
    wire_c, got_c = run_flow(cached, count)
    wire_p, got_p = run_flow(plain, count)

    assert len(got_c) == len(wire_c) == count * segs
    assert got_c == got_p
    assert [(w.vnet, without_ip_id(w.frame)) for w in wire_c] == [(w.vnet, without_ip_id(w.frame)) for w in wire_p]
    for name in NODES:  # cached hits are credited to every stage they skipped
        assert stage_packets(cached.nodes[name]) == stage_packets(plain.nodes[name])
        assert cached.nodes[name].overlay.vtep.counters() == plain.nodes[name].overlay.vtep.counters()

    a, b = cached.nodes["a"], cached.nodes["b"]
    # sender: the first frame walks (inner and outer in one walk, recorded up to vxlan-encap); every
    # later one takes the pod's flow, whose encap hands each outer frame to its own lookup: the
    # first a miss, recorded as a vxlan-encap flow from ip4-output on, the rest hits
    flows = {r["in_port"]: r for r in a.show("flows")}
    assert set(flows) == {"pod", "vxlan-encap"}
    assert flows["pod"]["stages"][-1] == "vxlan-encap" and flows["pod"]["hits"] == count - 1
    assert flows["vxlan-encap"]["stages"] == ["ip4-output", "ip4-rewrite", "port-tx"]
    assert flows["vxlan-encap"]["hits"] == (count - 1) * segs - 1
    assert a.flows.hits == (count - 1) + (count - 1) * segs - 1
    # receiver: the first outer frame walks (outer and inner in one walk, recorded up to vxlan-decap);
    # the second hits the outer flow, whose decap hands the inner frame to its own lookup: a miss,
    # recorded as a flannel.1 flow; from the third on both flows hit
    outer = count * segs
    flows = {r["in_port"]: r for r in b.show("flows")}
    assert set(flows) == {"uplink", "flannel.1"}
    assert flows["uplink"]["stages"][-1] == "vxlan-decap" and flows["uplink"]["hits"] == outer - 1
    assert flows["flannel.1"]["stages"][0] == "l3-input" and flows["flannel.1"]["hits"] == outer - 2
    assert b.flows.hits == (outer - 1) + (outer - 2)


def test_cached_outer_flow_still_fragments_when_the_uplink_mtu_shrinks():
    """The outer flow (ip4-output on) re-checks the MTU per frame: outer frames are DF clear, so
    once the uplink's MTU is below them they are fragmented, cache or not."""
    wires = []
    for cache in (1024, 0):
        pair = Pair(tunnel=False, flow_cache=cache)
        run_flow(pair, 3)
        pair.nodes["a"].router.ifaces["uplink"].mtu = 1400
        wire, _ = run_flow(pair, 1)
        wires.append([without_ip_id(w.frame) for w in wire if w.src == "a"])
    assert wires[0] == wires[1]
    assert len(wires[0]) == 5 and all(len(f) <= 14 + 1400 for f in wires[0])  # 2 full segments cut in 2, 1 small


def test_cached_encap_follows_a_changed_fdb_entry_and_hashes_fragments_as_the_slow_path():
    """A pod flow's encap keeps the peer and source port it recorded only while the FDB entry
    stands and the frame is no fragment (a fragment's hash has no ports)."""
    outs = []
    for cache in (1024, 0):
        pair = Pair(flow_cache=cache)
        a = pair.nodes["a"]
        udp = lambda **ip: IP(src=POD_IP["a"], dst=POD_IP["b"], **ip) / UDP(sport=5000, dport=53) / (b"q" * 40)
        wire = [pair.send("a", udp()) for _ in range(3)]  # recorded, then hit
        mac = next(m for m, ip in a.overlay.vtep.remotes.items() if ip == ip_int(NODES["b"][0]))
        # a first fragment with the flow's ports, DF clear and MF set, still small enough to pass
        wire.append(pair.send("a", udp(flags="MF", id=7)))
        a.overlay.vtep.remotes[mac] = ip_int("192.168.1.77")  # the peer's VTEP moved (no ARP for it)
        moved = [bytes(w.frame) for w in pair.send("a", udp())]  # an ARP request for the new address
        outs.append(([outer_fields(w[0].frame)["sport"] for w in wire], moved, a.flows.hits if cache else 0))
    (ports_c, moved_c, hits), (ports_p, moved_p, _) = outs
    assert ports_c == ports_p and ports_c[0] == ports_c[2] != ports_c[3]
    assert hits >= 2 and moved_c == moved_p and ARP in Ether(moved_c[0]) and Ether(moved_c[0])[ARP].pdst == "192.168.1.77"


# --- 7. trace ---------------------------------------------------------------------------

@pytest.mark.parametrize("commit", [True, False], ids=["commit", "dry-run"])
def test_trace_shows_encap_then_ip_output(commit):
    with SimNode.from_config(config("a")) as sim:
        node = sim.node
        assert node.overlay.pipeline
        node.router.neigh.add_permanent("uplink", ip_int(NODES["b"][0]), mac_bytes("02:00:00:00:0b:01"))
        node.attach(MemoryPort("pod"))
        ping = (Ether(src=POD_MAC["a"], dst=node.router.ifaces["pods"].mac.hex(":"))
                / IP(src=POD_IP["a"], dst=POD_IP["b"]) / ICMP() / b"hello")
        res = sim.inject("pod", ping, commit=commit)

    names = [s["stage"] for s in res.steps]
    i = names.index("vxlan-encap")
    assert names[i - 1] == "ip4-rewrite" and names[i + 1] == "ip4-output"
    assert names[-2:] == ["ip4-rewrite", "port-tx"]
    rec = res.stage("vxlan-encap")
    assert (rec["src"], rec["dst"], rec["dport"], rec["vni"]) == (NODES["a"][0], NODES["b"][0], VXLAN_PORT, 1)
    assert rec["ttl"] == 64 and rec["df"] is False
    assert 32768 <= rec["sport"] < 60999
    assert res.stage("ip4-output")["dst"] == NODES["b"][0]
    assert res.steps[i]["text"].startswith(f"vxlan vni 1 {NODES['a'][0]}:{rec['sport']} > {NODES['b'][0]}:8472")
    if commit:
        (out,) = res.out("uplink")
        assert VXLAN in out and out[UDP].sport == rec["sport"] and out[IP].dst == rec["dst"]
    else:
        assert res.emitted == []


def test_trace_shows_decap_then_the_inner_frame_on_flannel(pair):
    pkt = pair.nodes["b"].trace("uplink", outer_from_a(pair), dry_run=False)
    names = [s["stage"] for s in pkt.trace]
    i = names.index("vxlan-decap")
    assert names[i - 1] == "ip4-local" and names[i + 1] == "l3-input"
    assert pkt.trace[i + 1]["record"]["iface"] == "flannel.1"
    assert pkt.trace[i]["record"] == {"src": NODES["a"][0], "vni": 1, "segments": 1, "ce": False, "gso": False}
    assert names[-1] == "port-tx" and len(pair.delivered("b")) == 1


def test_dry_run_trace_of_a_super_frame_changes_no_counter(pair):
    a = pair.nodes["a"]
    encap, vtep = a.overlay.encap, a.overlay.vtep
    frame, vnet = with_partial_csum(pair, tcp(pattern(5000)), GSO_TCPV4)
    before = (vtep.counters(), encap.tunnel_frames, encap.software_frames, a.overlay.port.tx_packets)
    pkt = a.trace("pod", frame, dry_run=True, vnet=vnet)
    rec = next(s["record"] for s in pkt.trace if s["stage"] == "vxlan-encap")
    assert (rec["gso"], rec["segments"]) == ("udp-tunnel", 4)
    assert (vtep.counters(), encap.tunnel_frames, encap.software_frames, a.overlay.port.tx_packets) == before
    assert pair.pump() == []


# --- 8. the TAP's tunnel header tail ----------------------------------------------------

@pytest.mark.parametrize("ihl, offsets", [(5, (34, 64)), (6, (38, 68))])
def test_tunnel_tail_offsets(ihl, offsets):
    buf = bytearray(VNET_HDR.pack(9, GSO_TCPV4 | GSO_UDP_TUNNEL, 0, MSS, 84, 16)) + bytes(200)
    buf[VNET_LEN + 14] = 0x40 | ihl
    tail = _tunnel_tail(buf)
    assert len(tail) == TUNNEL_HDR_LEN - VNET_LEN == 14
    assert tail[:10] == bytes(10)  # num_buffers and the hash fields
    assert struct.unpack("<HH", tail[10:]) == offsets


def test_tunnel_tail_is_zero_for_other_frames():
    for gso in (GSO_NONE, GSO_TCPV4):
        buf = bytearray(VNET_HDR.pack(1, gso, 0, MSS, 34, 16)) + bytes(100)
        buf[VNET_LEN + 14] = 0x45
        assert _tunnel_tail(buf) == bytes(14)


# --- 9. config --------------------------------------------------------------------------

NOT_OURS = {"nowhere": "192.168.7.7", "bridge-interface": "10.244.1.1", "host-interface": HOST_ADDR}


@pytest.mark.parametrize("where", list(NOT_OURS))
def test_pipeline_needs_local_on_a_port_owning_interface(where):
    """Not on any interface, on the bridge's interface (no port), on the host interface (the node's own stack)."""
    with pytest.raises(ConfigError) as e:
        parse(config("a", local=NOT_OURS[where], host=True, datapath="pipeline"))
    assert e.value.path == "overlay.datapath" and str(e.value).startswith("overlay.datapath: ")


@pytest.mark.parametrize("local, datapath, pipeline", [
    (None, "auto", True),
    (None, "pipeline", True),
    (None, "socket", False),
] + [(addr, "auto", False) for addr in NOT_OURS.values()])
def test_datapath_choice(local, datapath, pipeline):
    node = Node(parse(config("a", local=local, host=True, datapath=datapath)))  # not started: no socket opens
    ov = node.overlay
    assert ov.pipeline is pipeline
    assert (ov.encap is not None, ov.decap is not None) == (pipeline, pipeline)
    assert ("vxlan-encap" in node.graph.stages) is pipeline
    assert ov.iface.output is ov.encap
    assert (VXLAN_PORT in node.router.udp_encap) is pipeline
    if pipeline:
        assert node.router.udp_encap[VXLAN_PORT] is ov.decap


def test_unknown_datapath_is_refused():
    with pytest.raises(ConfigError) as e:
        parse(config("a", datapath="kernel"))
    assert e.value.path == "overlay.datapath"
