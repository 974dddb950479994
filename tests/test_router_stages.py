"""The router's stages end to end through a Node with in-memory ports.

Click/PyTCP style: scapy-built frames go in, exact frames and counters come
out. The expected behaviour is kernel-dataplane-spec.md sections 2 (IPv4
forwarding) and 3 (ARP); the kernel is the reference.

Topology (one node):

    p1 (pod 10.244.1.2) --+
                          +-- bridge -- router iface "pods" 10.244.1.1/24
    p2 (pod 10.244.1.3) --+                          |
                                         router iface "uplink" 192.168.1.11/24, mtu 1400, port "up"
                                                     |
                                         gateway 192.168.1.12 (10.244.2.0/24 behind it)
"""

from __future__ import annotations

import struct

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_NOP, IPOption_RR, defragment
from scapy.layers.l2 import ARP, Dot1Q, Ether
from scapy.packet import Raw

from vswitch.config import ConfigError, parse
from vswitch.node import Node
from router.stages import _strip_priority_tags
from vswitch.packet import VNET_HDR, VNET_LEN, Packet

P1, P2 = "02:00:00:00:00:01", "02:00:00:00:00:02"
POD1, POD2 = "10.244.1.2", "10.244.1.3"
GW_MAC, GW = "02:00:00:00:01:12", "192.168.1.12"
PEER_MAC, PEER = "02:00:00:00:01:50", "192.168.1.50"
BCAST = "ff:ff:ff:ff:ff:ff"
RTR_PODS, RTR_UP = "10.244.1.1", "192.168.1.11"
REMOTE = "10.244.2.5"
T0 = 100.0

ROUTES = ["10.244.2.0/24 via 192.168.1.12", "blackhole 10.9.0.0/16", "unreachable 10.8.0.0/16",
          "prohibit 10.7.0.0/16"]


def config(routes=None, interfaces=None) -> dict:
    return {"name": "n1",
            "ports": [{"name": "p1", "type": "memory"}, {"name": "p2", "type": "memory"},
                      {"name": "up", "type": "memory"}],
            "router": {"interfaces": interfaces or [
                {"name": "pods", "address": "10.244.1.1/24"},
                {"name": "uplink", "port": "up", "address": "192.168.1.11/24", "mtu": 1400}],
                "routes": ROUTES if routes is None else routes}}


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class Rig:
    """A started node, its clock and shorthands for frames in and out."""

    def __init__(self, cfg: dict | None = None) -> None:
        self.clock = Clock()
        self.n = Node(parse(cfg or config()), clock=self.clock)
        self.n.start(None)
        self.rmac = self.n.router.ifaces["pods"].mac.hex(":")
        self.umac = self.n.router.ifaces["uplink"].mac.hex(":")

    # --- in ---------------------------------------------------------------
    def inject(self, port: str, frame, vnet=None) -> None:
        kw = {} if vnet is None else {"vnet": vnet}
        self.n.ports[port].inject(bytes(frame), ts=self.clock.t, **kw)

    def from_pod(self, ip_pkt, src_mac=P1, port="p1", dst_mac=None) -> None:
        self.inject(port, Ether(src=src_mac, dst=dst_mac or self.rmac) / ip_pkt)

    def from_up(self, ip_pkt, src_mac=PEER_MAC, dst_mac=None) -> None:
        self.inject("up", Ether(src=src_mac, dst=dst_mac or self.umac) / ip_pkt)

    # --- out --------------------------------------------------------------
    def take(self, port: str) -> list:
        return [Ether(f) for f in self.n.ports[port].take()]

    def take_raw(self, port: str) -> list:
        return self.n.ports[port].take()

    def take_all(self) -> dict:
        return {p: self.n.ports[p].take() for p in ("p1", "p2", "up")}

    # --- neighbours ---------------------------------------------------------
    def pod_arps(self, mac=P1, ip=POD1, port="p1") -> None:
        """The pod asks for its gateway: the router learns it (STALE) and answers."""
        self.inject(port, Ether(src=mac, dst=BCAST) / ARP(op=1, hwsrc=mac, psrc=ip, pdst=RTR_PODS))
        self.take_all()

    def gw_arps(self, mac=GW_MAC, ip=GW) -> None:
        """A host on the uplink asks for the router: the router learns it (STALE) and answers."""
        self.inject("up", Ether(src=mac, dst=BCAST) / ARP(op=1, hwsrc=mac, psrc=ip, pdst=RTR_UP))
        self.take_all()

    def neigh(self, ip: str):
        rows = [r for r in self.n.show("neigh") if r["ip"] == ip]
        return rows[0] if rows else None

    def drops(self, stage: str, reason: str) -> int:
        return next(r["count"] for r in self.n.show("drops") if r["stage"] == stage and r["reason"] == reason)

    def packets(self, stage: str) -> int:
        return next(r["packets"] for r in self.n.show("stats") if r["stage"] == stage)


@pytest.fixture
def rig() -> Rig:
    return Rig()


def udp(dst=REMOTE, src=POD1, size=None, payload=b"payload", **ip) -> IP:
    if size is not None:
        payload = bytes(range(256)) * (size // 256 + 1)
        payload = payload[:size - 28]
    return IP(src=src, dst=dst, **ip) / UDP(sport=4000, dport=5000) / Raw(payload)


def csum_ok(ip_bytes: bytes) -> bool:
    """The IPv4 header checksum of ``ip_bytes`` equals scapy's recomputation."""
    p = IP(ip_bytes)
    stored = p.chksum
    p.chksum = None
    return IP(bytes(p)).chksum == stored


def icmp_parts(frame: Ether):
    """(outer IP header bytes, ICMP header bytes, quote bytes) of an ICMP error frame."""
    ip = bytes(frame[IP])
    hl = (ip[0] & 0x0F) * 4
    return ip[:hl], ip[hl:hl + 8], ip[hl + 8:]


def only(frames: list, n: int = 1) -> list:
    assert len(frames) == n, [f.summary() for f in frames]
    return frames


# --- ARP -------------------------------------------------------------------------------------------------

def test_arp_request_for_router_is_answered_flooded_and_learned(rig):
    req = Ether(src=P1, dst=BCAST) / ARP(op=1, hwsrc=P1, psrc=POD1, hwdst="00:00:00:00:00:00", pdst=RTR_PODS)
    rig.inject("p1", req)
    out = rig.take_all()
    # the reply: spec item 16, field by field, and byte-exact against a scapy-built reply
    (reply,) = out["p1"]
    want = Ether(src=rig.rmac, dst=P1) / ARP(op=2, hwsrc=rig.rmac, psrc=RTR_PODS, hwdst=P1, pdst=POD1)
    assert reply == bytes(want)
    a = Ether(reply)[ARP]
    assert (a.hwtype, a.ptype, a.hwlen, a.plen, a.op) == (1, 0x0800, 6, 4, 2)
    assert (a.hwsrc, a.psrc, a.hwdst, a.pdst) == (rig.rmac, RTR_PODS, P1, POD1)
    # the broadcast is also flooded, unchanged, to the other pod (and the uplink is not a bridge port)
    assert out["p2"] == [bytes(req)]
    assert out["up"] == []
    row = rig.neigh(POD1)
    assert (row["dev"], row["lladdr"], row["state"]) == ("pods", P1, "STALE")


def test_arp_request_for_someone_else_is_flooded_not_answered_not_learned(rig):
    req = Ether(src=P1, dst=BCAST) / ARP(op=1, hwsrc=P1, psrc=POD1, pdst=POD2)
    rig.inject("p1", req)
    out = rig.take_all()
    assert out == {"p1": [], "p2": [bytes(req)], "up": []}
    assert rig.n.show("neigh") == []


def test_arp_request_on_uplink_is_answered_there(rig):
    rig.inject("up", Ether(src=GW_MAC, dst=BCAST) / ARP(op=1, hwsrc=GW_MAC, psrc=GW, pdst=RTR_UP))
    (reply,) = rig.take_raw("up")
    assert reply == bytes(Ether(src=rig.umac, dst=GW_MAC) /
                          ARP(op=2, hwsrc=rig.umac, psrc=RTR_UP, hwdst=GW_MAC, pdst=GW))
    assert rig.take_raw("p1") == rig.take_raw("p2") == []
    assert rig.neigh(GW)["state"] == "STALE"


def test_arp_request_for_other_local_address_is_answered(rig):
    rig.inject("p1", Ether(src=P1, dst=BCAST) / ARP(op=1, hwsrc=P1, psrc=POD1, pdst=RTR_UP))
    (reply,) = rig.take_raw("p1")
    assert reply == bytes(Ether(src=rig.rmac, dst=P1) /
                          ARP(op=2, hwsrc=rig.rmac, psrc=RTR_UP, hwdst=P1, pdst=POD1))


def test_unsolicited_arp_reply_creates_no_entry(rig):
    rig.inject("up", Ether(src=GW_MAC, dst=rig.umac) / ARP(op=2, hwsrc=GW_MAC, psrc=GW, hwdst=rig.umac,
                                                          pdst=RTR_UP))
    rig.inject("p1", Ether(src=P1, dst=BCAST) / ARP(op=2, hwsrc=P1, psrc=POD1, hwdst=BCAST, pdst=RTR_PODS))
    assert rig.n.show("neigh") == []
    assert rig.n.router.neigh.arp_ignored == 2
    assert rig.take_raw("up") == []  # a reply is never answered


def test_gratuitous_arp_updates_existing_entry_mac(rig):
    rig.pod_arps()
    assert rig.neigh(POD1)["lladdr"] == P1
    new = "02:00:00:00:00:99"
    rig.clock.t += 0.1  # inside locktime: only a gratuitous ARP may override
    rig.inject("p1", Ether(src=new, dst=BCAST) / ARP(op=1, hwsrc=new, psrc=POD1, hwdst="00:00:00:00:00:00",
                                                    pdst=POD1))
    row = rig.neigh(POD1)
    assert (row["lladdr"], row["state"]) == (new, "STALE")
    # and it is used: an echo reply to the pod now goes to the new MAC
    rig.take_all()
    rig.from_pod(IP(src=POD1, dst=RTR_PODS) / ICMP(type=8, id=1, seq=1), src_mac=new)
    (f,) = only(rig.take("p1"))
    assert f.dst == new


def test_gratuitous_arp_for_unknown_sender_creates_nothing(rig):
    rig.inject("p1", Ether(src=P1, dst=BCAST) / ARP(op=1, hwsrc=P1, psrc=POD1, pdst=POD1))
    assert rig.n.show("neigh") == []
    assert rig.take_raw("p1") == []  # not for us: no reply


def test_non_gratuitous_reply_inside_locktime_does_not_override(rig):
    rig.pod_arps()
    rig.clock.t += 0.5
    rig.inject("p1", Ether(src=P2, dst=rig.rmac) / ARP(op=2, hwsrc=P2, psrc=POD1, hwdst=rig.rmac, pdst=RTR_PODS))
    assert rig.neigh(POD1)["lladdr"] == P1


# --- echo --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("target", [RTR_PODS, RTR_UP])
def test_echo_request_gets_reply_from_pinged_address(rig, target):
    rig.pod_arps()
    data = bytes(range(56))
    rig.from_pod(IP(src=POD1, dst=target, ttl=7, tos=0x10) / ICMP(type=8, id=0x1234, seq=7) / Raw(data))
    assert rig.take_raw("up") == [] and rig.take_raw("p2") == []
    (f,) = only(rig.take("p1"))
    assert (f.src, f.dst, f.type) == (rig.rmac, P1, 0x0800)
    ip = f[IP]
    assert (ip.src, ip.dst, ip.ttl, ip.proto, ip.flags.DF, ip.tos) == (target, POD1, 64, 1, 0, 0x10)
    assert csum_ok(bytes(ip))
    ic = ip[ICMP]
    assert (ic.type, ic.code, ic.id, ic.seq, bytes(ic.payload)) == (0, 0, 0x1234, 7, data)
    c = ic.chksum
    ic.chksum = None
    assert ICMP(bytes(ic)).chksum == c


def test_echo_reply_to_unresolved_pod_resolves_it_first(rig):
    rig.from_pod(IP(src=POD1, dst=RTR_PODS) / ICMP(type=8, id=9, seq=1) / Raw(b"abc"))
    # nothing known about the pod yet: the router asks on the bridge (broadcast, flooded to both pods)
    out = rig.take_all()
    assert out["up"] == []
    for port in ("p1", "p2"):
        (f,) = out[port]
        a = Ether(f)[ARP]
        assert (Ether(f).dst, a.op, a.hwsrc, a.psrc, a.pdst) == (BCAST, 1, rig.rmac, RTR_PODS, POD1)
    rig.inject("p1", Ether(src=P1, dst=rig.rmac) / ARP(op=2, hwsrc=P1, psrc=POD1, hwdst=rig.rmac, pdst=RTR_PODS))
    (f,) = only(rig.take("p1"))
    assert (f.dst, f[ICMP].type, f[ICMP].id, bytes(f[ICMP].payload)) == (P1, 0, 9, b"abc")
    assert rig.take_raw("p2") == []
    assert rig.neigh(POD1)["state"] == "REACHABLE"


def test_arp_request_spa_is_local_source_of_triggering_packet(rig):
    # the echo reply from 192.168.1.11 waits for the pod's MAC; the kernel asks with spa 192.168.1.11
    rig.from_pod(IP(src=POD1, dst=RTR_UP) / ICMP(type=8, id=9, seq=1))
    (f,) = only(rig.take("p1"))
    assert f[ARP].psrc == RTR_UP


def test_echo_request_with_df_from_uplink_is_answered(rig):
    rig.gw_arps()
    rig.from_up(IP(src=REMOTE, dst=RTR_PODS, flags="DF") / ICMP(type=8, id=5, seq=6) / Raw(b"pmtu"),
                src_mac=GW_MAC)
    (f,) = only(rig.take("up"))
    assert (f.dst, f.src) == (GW_MAC, rig.umac)  # back through the route to 10.244.2.0/24
    assert (f[IP].src, f[IP].dst, f[IP].flags.DF) == (RTR_PODS, REMOTE, 0)
    assert (f[ICMP].type, f[ICMP].id, f[ICMP].seq, bytes(f[ICMP].payload)) == (0, 5, 6, b"pmtu")


def test_echo_request_with_bad_icmp_checksum_is_dropped(rig):
    rig.pod_arps()
    pkt = IP(bytes(IP(src=POD1, dst=RTR_PODS) / ICMP(type=8, id=1, seq=1, chksum=0x1234) / Raw(b"x")))
    rig.from_pod(pkt)
    assert rig.take_all() == {"p1": [], "p2": [], "up": []}
    assert rig.drops("ip4-local", "bad-echo") == 1


# --- forwarding ----------------------------------------------------------------------------------------------

def test_forward_resolves_next_hop_queues_and_releases_in_order(rig):
    payloads = [b"first-%d" % i * 5 for i in range(4)]
    sent = [udp(payload=p, ttl=20 + i, id=100 + i) for i, p in enumerate(payloads)]
    for p in sent:
        rig.from_pod(p)
    # one broadcast who-has for the gateway on the uplink, nothing else yet
    (req,) = rig.take_raw("up")
    assert req == bytes(Ether(src=rig.umac, dst=BCAST) /
                        ARP(op=1, hwsrc=rig.umac, psrc=RTR_UP, hwdst="00:00:00:00:00:00", pdst=GW))
    assert rig.take_raw("p1") == rig.take_raw("p2") == []
    row = rig.neigh(GW)
    assert (row["dev"], row["state"], row["queued"]) == ("uplink", "INCOMPLETE", 4)

    rig.inject("up", Ether(src=GW_MAC, dst=rig.umac) / ARP(op=2, hwsrc=GW_MAC, psrc=GW, hwdst=rig.umac,
                                                          pdst=RTR_UP))
    out = rig.take_raw("up")
    assert len(out) == 4
    for raw, orig in zip(out, sent):
        f = Ether(raw)
        assert (f.dst, f.src, f.type) == (GW_MAC, rig.umac, 0x0800)
        want = IP(bytes(orig))
        ip = f[IP]
        assert ip.id == want.id  # order preserved
        assert ip.ttl == want.ttl - 1
        assert csum_ok(bytes(ip))
        # everything but TTL and checksum is as sent
        got, exp = bytearray(bytes(ip)), bytearray(bytes(want))
        got[8] = exp[8] = got[10] = exp[10] = got[11] = exp[11] = 0
        assert got == exp
    assert rig.neigh(GW)["state"] == "REACHABLE"
    # a later packet goes straight out
    rig.from_pod(udp(payload=b"later"))
    (f,) = only(rig.take("up"))
    assert bytes(f[Raw]) == b"later" and f.dst == GW_MAC


def test_forward_to_pod_from_uplink_goes_over_bridge(rig):
    rig.pod_arps(P2, POD2, "p2")
    rig.from_up(udp(dst=POD2, src="10.244.2.5", ttl=9), src_mac=GW_MAC)
    assert rig.take_raw("p1") == [] and rig.take_raw("up") == []
    (f,) = only(rig.take("p2"))
    assert (f.src, f.dst, f[IP].ttl, f[IP].dst) == (rig.rmac, P2, 8, POD2)
    assert csum_ok(bytes(f[IP]))


def test_ttl_1_gets_time_exceeded(rig):
    rig.pod_arps()
    orig = udp(size=1400, ttl=1, tos=0xB5, id=4242)
    assert len(orig) == 1400
    rig.from_pod(orig)
    assert rig.take_raw("up") == [] and rig.take_raw("p2") == []
    (f,) = only(rig.take("p1"))
    assert (f.src, f.dst) == (rig.rmac, P1)
    hdr, ic, quote = icmp_parts(f)
    ip = f[IP]
    assert (ip.src, ip.dst, ip.proto, ip.ttl) == (RTR_PODS, POD1, 1, 64)
    assert ip.tos == (0xB5 & 0x1E) | 0xC0
    assert ip.flags.DF == 0 and ip.frag == 0
    assert ic[0:2] == bytes([11, 0]) and ic[4:8] == bytes(4)
    assert ip.len == len(bytes(ip)) == 576
    # the quote: the original as received (TTL 1, checksum untouched) cut to fit 576 bytes
    assert quote == bytes(orig)[:548]
    assert quote[8] == 1
    assert csum_ok(hdr + ic + quote)
    assert rig.drops("ip4-forward", "ttl-exceeded") == 1


def test_ttl_0_gets_time_exceeded_too(rig):
    rig.pod_arps()
    rig.from_pod(udp(ttl=0))
    (f,) = only(rig.take("p1"))
    assert (f[ICMP].type, f[ICMP].code) == (11, 0)
    assert rig.take_raw("up") == []


def test_time_exceeded_for_off_link_sender_uses_route_back_source(rig):
    rig.gw_arps()
    orig = udp(src="10.244.2.7", dst=POD1, ttl=1)
    rig.from_up(orig, src_mac=GW_MAC)
    assert rig.take_raw("p1") == [] and rig.take_raw("p2") == []
    (f,) = only(rig.take("up"))
    # the route back is 10.244.2.0/24 via 192.168.1.12 dev uplink: source 192.168.1.11, to the gateway's MAC
    assert (f.dst, f.src) == (GW_MAC, rig.umac)
    assert (f[IP].src, f[IP].dst, f[ICMP].type, f[ICMP].code) == (RTR_UP, "10.244.2.7", 11, 0)


def test_small_original_is_quoted_whole_without_link_padding(rig):
    rig.pod_arps()
    orig = udp(ttl=1, payload=b"")  # 28 bytes: the frame carries 18 bytes of Ethernet padding
    rig.inject("p1", Ether(src=P1, dst=rig.rmac, type=0x0800) / Raw(bytes(orig) + b"\xee" * 18))
    (f,) = only(rig.take("p1"))
    _, _, quote = icmp_parts(f)
    assert quote == bytes(orig)
    assert f[IP].len == 20 + 8 + 28


@pytest.mark.parametrize("dst,code", [("172.16.0.1", 0), ("10.8.1.1", 1), ("10.7.1.1", 13)])
def test_route_errors(rig, dst, code):
    rig.pod_arps()
    orig = udp(dst=dst, tos=0x04)
    rig.from_pod(orig)
    assert rig.take_raw("up") == [] and rig.take_raw("p2") == []
    (f,) = only(rig.take("p1"))
    _, ic, quote = icmp_parts(f)
    assert (f[IP].src, f[IP].dst, f[IP].ttl, f[IP].tos) == (RTR_PODS, POD1, 64, 0xC4)
    assert ic[0:2] == bytes([3, code])
    assert quote == bytes(orig)
    assert rig.packets("ip4-icmp-error") == 1


def test_blackhole_is_silent_and_counted(rig):
    rig.pod_arps()
    before = rig.packets("ip4-icmp-error")
    rig.from_pod(udp(dst="10.9.3.4"))
    assert rig.take_all() == {"p1": [], "p2": [], "up": []}
    assert rig.drops("ip4-lookup", "blackhole") == 1
    assert rig.packets("ip4-icmp-error") == before


def test_df_packet_over_uplink_mtu_gets_frag_needed(rig):
    rig.pod_arps()
    rig.gw_arps()
    orig = udp(size=1500, flags="DF")
    rig.from_pod(orig)
    assert rig.take_raw("up") == []
    (f,) = only(rig.take("p1"))
    _, ic, quote = icmp_parts(f)
    assert (f[IP].src, f[IP].dst) == (RTR_PODS, POD1)
    assert ic[0:2] == bytes([3, 4])
    assert ic[4:6] == b"\0\0" and struct.unpack("!H", ic[6:8])[0] == 1400
    assert quote == bytes(orig)[:548]
    assert rig.drops("ip4-forward", "frag-needed") == 1


def test_df_packet_exactly_mtu_is_forwarded(rig):
    rig.gw_arps()
    orig = udp(size=1400, flags="DF")
    rig.from_pod(orig)
    (f,) = only(rig.take("up"))
    assert len(f[IP]) == 1400 and bytes(f[Raw]) == bytes(orig[Raw])
    assert rig.take_raw("p1") == []


def gso_frame(rig, payload_len: int, df: bool = True, ttl: int = 30) -> bytes:
    ip = IP(src=POD1, dst=REMOTE, ttl=ttl, flags="DF" if df else 0, id=77)
    return bytes(Ether(src=P1, dst=rig.rmac) / ip / TCP(sport=40000, dport=5201, flags="A", seq=1) /
                 Raw(bytes(payload_len)))


def test_gso_superframe_with_segments_over_mtu_gets_frag_needed(rig):
    rig.pod_arps()
    rig.gw_arps()
    vnet = struct.pack("<BBHHHH", 1, 1, 66, 1448, 34, 16)
    rig.inject("p1", gso_frame(rig, 1448 * 4), vnet=vnet)
    assert rig.take_raw("up") == []
    (f,) = only(rig.take("p1"))
    _, ic, _ = icmp_parts(f)
    assert ic[0:2] == bytes([3, 4]) and struct.unpack("!H", ic[6:8])[0] == 1400
    assert f[IP].len <= 576
    assert rig.drops("ip4-forward", "frag-needed") == 1


def test_gso_superframe_with_segments_within_mtu_is_forwarded_whole(rig):
    rig.gw_arps()
    vnet = struct.pack("<BBHHHH", 1, 1, 66, 1200, 34, 16)
    frame = gso_frame(rig, 1200 * 5)
    rig.inject("p1", frame, vnet=vnet)
    (buf,) = rig.n.ports["up"].sent
    assert buf[:VNET_LEN] == vnet
    f = Ether(buf[VNET_LEN:])
    assert (f.dst, f.src) == (GW_MAC, rig.umac)
    assert f[IP].ttl == 29 and csum_ok(bytes(f[IP]))
    assert len(f) == len(frame)  # the 6 KB super-frame leaves as one buffer
    assert bytes(f[IP].payload) == bytes(Ether(frame)[IP].payload)
    assert rig.take_raw("p1") == []


def test_non_df_packet_is_fragmented_and_reassembles(rig):
    rig.gw_arps()
    orig = udp(size=3000, id=0x4321, ttl=40)
    rig.from_pod(orig)
    out = rig.take("up")
    assert len(out) == 3
    for f in out:
        assert (f.dst, f.src) == (GW_MAC, rig.umac)
        assert f[IP].len <= 1400 and len(bytes(f[IP])) == f[IP].len
        assert f[IP].id == 0x4321 and f[IP].ttl == 39
        assert csum_ok(bytes(f[IP]))
    ips = sorted((f[IP] for f in out), key=lambda p: p.frag)
    assert [p.frag * 8 for p in ips] == [0, 1376, 2752]
    assert [p.flags.MF for p in ips] == [1, 1, 0]
    whole = b"".join(bytes(p.payload) for p in ips)
    assert whole == bytes(orig[UDP])
    (pkt,) = defragment([IP(bytes(p)) for p in ips])
    assert bytes(pkt[UDP].payload) == bytes(orig[Raw])
    assert rig.drops("ip4-forward", "frag-needed") == 0


def test_fragments_leave_in_offset_order(rig):
    rig.gw_arps()
    rig.from_pod(udp(size=3000))
    assert [f[IP].frag for f in rig.take("up")] == [0, 172, 344]


def test_fragments_to_unresolved_next_hop_are_all_queued(rig):
    orig = udp(size=3000)
    rig.from_pod(orig)
    assert len(rig.take_raw("up")) == 1  # the ARP request
    rig.inject("up", Ether(src=GW_MAC, dst=rig.umac) / ARP(op=2, hwsrc=GW_MAC, psrc=GW, hwdst=rig.umac,
                                                          pdst=RTR_UP))
    out = rig.take("up")
    assert len(out) == 3
    (pkt,) = defragment([f[IP] for f in out])
    assert bytes(pkt[UDP].payload) == bytes(orig[Raw])


# --- neighbour failure ------------------------------------------------------------------------------------------

def test_unanswered_on_link_host_gets_host_unreachable(rig):
    rig.pod_arps()
    orig = udp(dst="192.168.1.99", ttl=10)
    rig.from_pod(orig)
    reqs = []
    for step in range(4):
        out = rig.take("up")
        reqs.extend((rig.clock.t, f) for f in out)
        if step < 3:
            assert rig.take_raw("p1") == []
        rig.clock.t += 1.0
        rig.n.tick()
    assert [t for t, _ in reqs] == [T0, T0 + 1, T0 + 2]
    for _, f in reqs:
        assert f.dst == BCAST
        assert (f[ARP].op, f[ARP].hwsrc, f[ARP].psrc, f[ARP].pdst) == (1, rig.umac, RTR_UP, "192.168.1.99")
    assert rig.neigh("192.168.1.99")["state"] == "FAILED"
    (f,) = only(rig.take("p1"))
    _, ic, quote = icmp_parts(f)
    assert (f.dst, f[IP].src, f[IP].dst, f[IP].ttl) == (P1, RTR_PODS, POD1, 64)
    assert ic[0:2] == bytes([3, 1])
    # the quote is the packet as it was queued: already forwarded, so TTL 9 with a valid checksum
    assert quote[8] == 9 and csum_ok(quote[:20])
    assert quote[20:] == bytes(orig)[20:]
    assert rig.take_raw("up") == []


def test_host_unreachable_for_every_queued_packet_in_order(rig):
    rig.pod_arps()
    rig.pod_arps(P2, POD2, "p2")
    rig.from_pod(udp(dst="192.168.1.99", id=1))
    rig.from_pod(udp(dst="192.168.1.99", src=POD2, id=2), src_mac=P2, port="p2")
    rig.from_pod(udp(dst="192.168.1.99", id=3))
    for _ in range(3):
        rig.clock.t += 1.0
        rig.n.tick()
    assert [IP(icmp_parts(f)[2]).id for f in rig.take("p1")] == [1, 3]
    assert [IP(icmp_parts(f)[2]).id for f in rig.take("p2")] == [2]
    # a new packet restarts resolution (FAILED is not negative caching)
    rig.take_all()
    rig.from_pod(udp(dst="192.168.1.99", id=4))
    (req,) = rig.take("up")
    assert req[ARP].pdst == "192.168.1.99"
    assert rig.neigh("192.168.1.99")["state"] == "INCOMPLETE"


def test_resolution_queue_drops_oldest_when_full(rig):
    for i in range(103):
        rig.from_pod(udp(id=i))
    assert len(rig.take_raw("up")) == 1  # a single ARP request
    assert rig.neigh(GW)["queued"] == 101
    rig.inject("up", Ether(src=GW_MAC, dst=rig.umac) / ARP(op=2, hwsrc=GW_MAC, psrc=GW, hwdst=rig.umac,
                                                          pdst=RTR_UP))
    assert [f[IP].id for f in rig.take("up")] == list(range(2, 103))
    assert rig.n.router.neigh.queue_dropped == 2


def test_redirect_to_on_link_sender(rig):
    rig.gw_arps()
    orig = udp(src=PEER, dst=REMOTE, ttl=10, payload=b"via-me")
    rig.from_up(orig)
    # the packet goes on to the gateway (resolved), the redirect waits for the peer's MAC
    out = rig.take("up")
    fwd = [f for f in out if IP in f]
    arps = [f for f in out if ARP in f]
    assert len(fwd) == 1 and len(arps) == 1
    assert (fwd[0].dst, fwd[0][IP].ttl, bytes(fwd[0][Raw])) == (GW_MAC, 9, b"via-me")
    assert (arps[0].dst, arps[0][ARP].pdst, arps[0][ARP].psrc) == (BCAST, PEER, RTR_UP)
    rig.inject("up", Ether(src=PEER_MAC, dst=rig.umac) / ARP(op=2, hwsrc=PEER_MAC, psrc=PEER, hwdst=rig.umac,
                                                            pdst=RTR_UP))
    (f,) = only(rig.take("up"))
    _, ic, quote = icmp_parts(f)
    assert (f.dst, f.src) == (PEER_MAC, rig.umac)
    assert (f[IP].src, f[IP].dst, f[IP].ttl) == (RTR_UP, PEER, 64)
    assert ic[0:2] == bytes([5, 1])
    assert ic[4:8] == bytes([192, 168, 1, 12])
    assert IP(quote).dst == REMOTE and IP(quote).src == PEER
    assert rig.take_raw("p1") == rig.take_raw("p2") == []


def test_redirects_back_off_per_source(rig):
    rig.gw_arps()
    rig.inject("up", Ether(src=PEER_MAC, dst=BCAST) / ARP(op=1, hwsrc=PEER_MAC, psrc=PEER, pdst=RTR_UP))
    rig.take_all()

    def redirects():
        return [f for f in rig.take("up") if ICMP in f and f[IP].dst == PEER and f[ICMP].type == 5]

    rig.from_up(udp(src=PEER, id=1))
    rig.from_up(udp(src=PEER, id=2))
    assert len(redirects()) == 1  # the second one is inside the 20 ms << 1 gap
    rig.clock.t += 0.039
    rig.from_up(udp(src=PEER, id=3))
    assert redirects() == []
    rig.clock.t += 0.002  # 41 ms after the first: due again
    rig.from_up(udp(src=PEER, id=4))
    assert len(redirects()) == 1


def test_no_redirect_between_different_interfaces(rig):
    rig.gw_arps()
    rig.pod_arps()
    rig.from_pod(udp())
    (f,) = only(rig.take("up"))
    assert IP in f
    assert rig.take_raw("p1") == []


# --- martians and other drops ------------------------------------------------------------------------------------

@pytest.mark.parametrize("src,dst,reason", [
    ("127.0.0.1", REMOTE, "martian-source"),
    ("0.0.0.1", REMOTE, "martian-source"),
    ("224.0.0.1", REMOTE, "martian-source"),
    ("255.255.255.255", REMOTE, "martian-source"),
    (POD1, "0.1.2.3", "martian-destination"),
    (POD1, "127.0.0.1", "martian-destination"),
])
def test_martians_dropped_silently(rig, src, dst, reason):
    rig.pod_arps()
    rig.gw_arps()
    rig.from_pod(udp(src=src, dst=dst, ttl=1))  # TTL 1: a forwarded one would provoke an error
    assert rig.take_all() == {"p1": [], "p2": [], "up": []}
    assert rig.drops("ip4-route", reason) == 1
    assert rig.packets("ip4-lookup") == 0 and rig.packets("ip4-icmp-error") == 0


def test_other_host_unicast_on_uplink_dropped(rig):
    rig.gw_arps()
    rig.from_up(udp(src=PEER), dst_mac="02:00:00:00:07:07")
    assert rig.take_all() == {"p1": [], "p2": [], "up": []}
    assert rig.drops("l3-input", "other-host") == 1
    assert rig.packets("ip4-input") == 0


def test_non_ip_on_uplink_dropped(rig):
    rig.inject("up", Ether(src=PEER_MAC, dst=rig.umac, type=0x86DD) / Raw(bytes(40)))
    assert rig.take_raw("up") == []
    assert rig.drops("l3-input", "not-ip") == 1


def test_bad_ip_checksum_dropped(rig):
    rig.pod_arps()
    rig.gw_arps()
    rig.from_pod(IP(bytes(udp(chksum=0xBEEF))))
    assert rig.take_all() == {"p1": [], "p2": [], "up": []}
    assert rig.drops("ip4-input", "ip-bad-checksum") == 1


# --- ICMP rate limits ------------------------------------------------------------------------------------------

def test_time_exceeded_rate_limited_per_source(rig):
    rig.pod_arps()
    for i in range(10):
        rig.from_pod(udp(ttl=1, id=i))
    errs = rig.take("p1")
    assert len(errs) == 6
    assert all((f[ICMP].type, f[ICMP].code) == (11, 0) for f in errs)
    assert [IP(icmp_parts(f)[2]).id for f in errs] == list(range(6))  # the first six were answered
    assert rig.drops("ip4-icmp-error", "rate-limited") == 4
    rig.clock.t += 1.0
    rig.from_pod(udp(ttl=1, id=10))
    rig.from_pod(udp(ttl=1, id=11))
    errs = rig.take("p1")
    assert len(errs) == 1 and IP(icmp_parts(errs[0])[2]).id == 10
    # another source has its own bucket
    rig.pod_arps(P2, POD2, "p2")
    rig.from_pod(udp(src=POD2, ttl=1), src_mac=P2, port="p2")
    assert len(rig.take("p2")) == 1


def test_frag_needed_not_rate_limited(rig):
    rig.pod_arps()
    rig.gw_arps()
    for i in range(10):
        rig.from_pod(udp(size=1500, flags="DF", id=i))
    errs = rig.take("p1")
    assert len(errs) == 10
    assert all((f[ICMP].type, f[ICMP].code) == (3, 4) for f in errs)
    assert rig.drops("ip4-icmp-error", "rate-limited") == 0
    assert rig.take_raw("up") == []


# --- no error about errors, nor for broadcasts -------------------------------------------------------------------

@pytest.mark.parametrize("icmp_type,code", [(11, 0), (3, 1), (5, 1), (12, 0)])
def test_no_icmp_error_about_icmp_error(rig, icmp_type, code):
    rig.pod_arps()
    inner = bytes(udp(dst=POD1, src="10.244.2.9"))
    rig.from_pod(IP(src=POD1, dst=REMOTE, ttl=1) / ICMP(type=icmp_type, code=code) / Raw(inner))
    assert rig.take_all() == {"p1": [], "p2": [], "up": []}
    assert rig.drops("ip4-icmp-error", "icmp-error") == 1


def test_icmp_query_does_get_an_error(rig):
    rig.pod_arps()
    rig.from_pod(IP(src=POD1, dst=REMOTE, ttl=1) / ICMP(type=8, id=1, seq=1))
    (f,) = only(rig.take("p1"))
    assert (f[ICMP].type, f[ICMP].code) == (11, 0)
    assert IP(icmp_parts(f)[2]).proto == 1


def test_l2_broadcast_is_not_routed_so_no_error(rig):
    rig.pod_arps()
    # a frame the router got as an L2 broadcast is not forwarded at all, so no time exceeded
    rig.from_pod(udp(ttl=1), dst_mac=BCAST)
    out = rig.take_all()
    assert out["p1"] == [] and out["up"] == []
    assert len(out["p2"]) == 1  # the bridge still floods it
    assert rig.drops("ip4-route", "not-forwarded") == 1
    assert rig.packets("ip4-icmp-error") == 0


def test_udp_to_router_without_listener_gets_port_unreachable(rig):
    rig.pod_arps()
    orig = udp(dst=RTR_PODS)
    rig.from_pod(orig)
    (f,) = only(rig.take("p1"))
    assert (f[ICMP].type, f[ICMP].code, f[IP].src, f[IP].dst) == (3, 3, RTR_PODS, POD1)
    assert icmp_parts(f)[2] == bytes(orig)


def test_no_port_unreachable_for_l2_broadcast(rig):
    rig.pod_arps()
    rig.from_pod(udp(dst=RTR_PODS), dst_mac=BCAST)
    out = rig.take_all()
    assert out["p1"] == [] and out["up"] == []
    assert rig.drops("ip4-icmp-error", "l2-multicast") == 1


def test_no_icmp_error_for_non_first_fragment(rig):
    rig.pod_arps()
    rig.from_pod(IP(src=POD1, dst=REMOTE, ttl=1, frag=185, flags="MF") / Raw(bytes(64)))
    assert rig.take_all() == {"p1": [], "p2": [], "up": []}
    assert rig.drops("ip4-icmp-error", "non-first-fragment") == 1


def test_first_fragment_does_get_an_error(rig):
    rig.pod_arps()
    rig.from_pod(IP(src=POD1, dst=REMOTE, ttl=1, frag=0, flags="MF", proto=17) / Raw(bytes(64)))
    (f,) = only(rig.take("p1"))
    assert (f[ICMP].type, f[ICMP].code) == (11, 0)


@pytest.mark.parametrize("ttl", [1, 64])
def test_subnet_broadcast_is_not_forwarded_nor_answered_with_errors(rig, ttl):
    rig.pod_arps()
    rig.from_pod(udp(dst="10.244.1.255", ttl=ttl))
    assert rig.take_all() == {"p1": [], "p2": [], "up": []}
    assert rig.neigh("10.244.1.255") is None


# --- dry run ------------------------------------------------------------------------------------------------------

FORWARD_PATH = ["eth-input", "l2-learn", "l2-forward", "l3-input", "ip4-input", "ip4-route", "ip4-lookup", "ip4-forward",
                "ip4-rewrite", "port-tx"]


def test_trace_dry_run_before_resolution(rig):
    frame = bytes(Ether(src=P1, dst=rig.rmac) / udp(ttl=5))
    pkt = rig.n.trace("p1", frame)
    stages = [s["stage"] for s in pkt.trace]
    assert stages == FORWARD_PATH[:-1]
    last = pkt.trace[-1]
    assert last["next"] is None
    assert last["record"]["state"] == "would-resolve" and last["record"]["nexthop"] == GW
    assert "would" in last["text"]
    assert rig.n.show("neigh") == []
    assert rig.n.show("fdb") == []  # nor learned the pod's MAC
    assert rig.take_all() == {"p1": [], "p2": [], "up": []}
    assert frame == bytes(Ether(src=P1, dst=rig.rmac) / udp(ttl=5))


def test_trace_dry_run_after_resolution(rig):
    rig.gw_arps()
    rig.from_pod(udp())
    rig.take_all()
    before = rig.n.show("neigh")
    pkt = rig.n.trace("p1", bytes(Ether(src=P1, dst=rig.rmac) / udp(ttl=5)))
    assert [s["stage"] for s in pkt.trace] == FORWARD_PATH
    rw = next(s for s in pkt.trace if s["stage"] == "ip4-rewrite")
    assert rw["record"]["state"] == "resolved" and rw["record"]["mac"] == GW_MAC
    tx = pkt.trace[-1]
    assert tx["record"]["ports"] == ["up"] and tx["record"].get("dry_run") is True and tx["next"] is None
    assert rig.take_all() == {"p1": [], "p2": [], "up": []}
    assert rig.n.show("neigh") == before


def test_trace_of_ttl_exceeded_shows_error_path(rig):
    rig.pod_arps()
    pkt = rig.n.trace("p1", bytes(Ether(src=P1, dst=rig.rmac) / udp(ttl=1)))
    stages = [s["stage"] for s in pkt.trace]
    assert stages[:8] == FORWARD_PATH[:8]
    assert stages[8:] == ["ip4-icmp-error", "ip4-output", "ip4-rewrite", "l2-forward", "port-tx"]
    err = pkt.trace[8]["record"]
    assert (err["type"], err["code"], err["src"], err["dst"]) == (11, 0, RTR_PODS, POD1)
    assert rig.take_all() == {"p1": [], "p2": [], "up": []}
    # a dry run does not spend rate-limit tokens: six real errors still go out
    for i in range(6):
        rig.from_pod(udp(ttl=1, id=i))
    assert len(rig.take("p1")) == 6


# --- config ---------------------------------------------------------------------------------------------------------

def test_route_gateway_off_link_rejected():
    with pytest.raises(ConfigError) as ei:
        Node(parse(config(routes=["10.244.2.0/24 via 192.168.1.12", "10.3.0.0/16 via 172.16.0.1"])))
    assert ei.value.path == "router.routes[1]"
    assert "172.16.0.1" in str(ei.value)


def test_route_unknown_dev_rejected():
    with pytest.raises(ConfigError) as ei:
        Node(parse(config(routes=["10.3.0.0/16 dev nosuch"])))
    assert ei.value.path == "router.routes[0]"
    assert "nosuch" in str(ei.value)


def test_route_gateway_on_other_dev_rejected():
    with pytest.raises(ConfigError) as ei:
        Node(parse(config(routes=["blackhole 10.9.0.0/16", "10.3.0.0/16 via 192.168.1.12 dev pods"])))
    assert ei.value.path == "router.routes[1]"


def test_two_bridge_interfaces_rejected():
    with pytest.raises(ConfigError) as ei:
        parse(config(interfaces=[{"name": "a", "address": "10.244.1.1/24"},
                                 {"name": "b", "address": "10.245.1.1/24"}]))
    assert ei.value.path == "router.interfaces"


def test_valid_config_builds_routes():
    n = Node(parse(config()), clock=Clock())
    texts = {r["text"] for r in n.show("routes")}
    assert "10.244.2.0/24 via 192.168.1.12 dev uplink" in texts  # dev filled in from the gateway's subnet
    assert "blackhole 10.9.0.0/16" in texts
    assert "10.244.1.0/24 dev pods proto kernel scope link src 10.244.1.1" in texts


# --- priority tags (VID 0) at l3-input ------------------------------------------------------------------

def test_priority_tagged_echo_to_gateway_is_answered_untagged(rig):
    rig.pod_arps()
    rig.inject("p1", Ether(src=P1, dst=rig.rmac) / Dot1Q(vlan=0, prio=5) / IP(src=POD1, dst=RTR_PODS) /
               ICMP(type=8, id=7, seq=1) / Raw(b"prio"))
    (f,) = only(rig.take("p1"))
    # __netif_receive_skb_core clears a VID 0 tag on cni0; the reply is an ordinary untagged frame
    assert Dot1Q not in f and f.type == 0x0800
    assert (f.src, f.dst, f[IP].src, f[IP].dst, f[ICMP].type, f[ICMP].id) == (rig.rmac, P1, RTR_PODS, POD1, 0, 7)
    assert bytes(f[ICMP].payload) == b"prio"


def test_priority_tagged_arp_broadcast_is_answered_and_flooded_unchanged(rig):
    req = Ether(src=P1, dst=BCAST) / Dot1Q(vlan=0) / ARP(op=1, hwsrc=P1, psrc=POD1, pdst=RTR_PODS)
    rig.inject("p1", req)
    out = rig.take_all()
    assert out["p2"] == [bytes(req)]  # the bridge floods the tag as it came; only the router's copy loses it
    (reply,) = out["p1"]
    assert reply == bytes(Ether(src=rig.rmac, dst=P1) / ARP(op=2, hwsrc=rig.rmac, psrc=RTR_PODS, hwdst=P1,
                                                           pdst=POD1))


@pytest.mark.parametrize("tags", [[10], [0, 10], [5]])
def test_frames_tagged_with_a_vlan_id_are_not_for_the_router(rig, tags):
    rig.pod_arps()
    frame = Ether(src=P1, dst=rig.rmac)
    for vid in tags:
        frame = frame / Dot1Q(vlan=vid)
    rig.inject("p1", frame / IP(src=POD1, dst=RTR_PODS) / ICMP(type=8, id=8, seq=1))
    assert rig.take_all() == {"p1": [], "p2": [], "up": []}
    assert rig.drops("l3-input", "not-ip") == 1


def test_two_priority_tags_are_both_stripped(rig):
    rig.pod_arps()
    rig.inject("p1", Ether(src=P1, dst=rig.rmac) / Dot1Q(vlan=0, type=0x8100) / Dot1Q(vlan=0) /
               IP(src=POD1, dst=RTR_PODS) / ICMP(type=8, id=9, seq=1))
    (f,) = only(rig.take("p1"))
    assert f[ICMP].type == 0 and f[ICMP].id == 9


def test_stripping_a_priority_tag_moves_the_vnet_offsets_back():
    frame = bytes(Ether(src=P1, dst=P2) / Dot1Q(vlan=0) / IP(src=POD1, dst=POD2) / UDP(sport=1, dport=2))
    # NEEDS_CSUM: csum_start at the UDP header (14 + 4 + 20), the checksum field 6 bytes in
    pkt = Packet(bytearray(VNET_HDR.pack(1, 0, 46, 0, 38, 6) + frame))
    buf, etype = _strip_priority_tags(pkt)
    assert etype == 0x0800 and pkt.buf is buf
    assert VNET_HDR.unpack_from(buf, 0) == (1, 0, 42, 0, 34, 6)
    assert bytes(buf[VNET_LEN:]) == frame[:12] + frame[16:]


# --- arp_process: which requests are answered -------------------------------------------------------------

@pytest.mark.parametrize("sender", ["127.0.0.1", "224.0.0.5", "255.255.255.255", "0.1.2.3", RTR_PODS, RTR_UP])
def test_arp_request_from_martian_or_own_sender_is_not_answered(rig, sender):
    rig.inject("p1", Ether(src=P1, dst=BCAST) / ARP(op=1, hwsrc=P1, psrc=sender, pdst=RTR_PODS))
    assert rig.take_raw("p1") == []
    assert rig.n.show("neigh") == []  # and the sender is not learned either (no neigh_event_ns)


def test_arp_dad_probe_is_answered_to_zero_and_learns_nothing(rig):
    rig.inject("p1", Ether(src=P1, dst=BCAST) / ARP(op=1, hwsrc=P1, psrc="0.0.0.0", pdst=RTR_PODS))
    (reply,) = rig.take_raw("p1")
    assert reply == bytes(Ether(src=rig.rmac, dst=P1) / ARP(op=2, hwsrc=rig.rmac, psrc=RTR_PODS, hwdst=P1,
                                                           pdst="0.0.0.0"))
    assert rig.n.show("neigh") == []


def test_arp_request_from_unused_on_link_sender_is_answered(rig):
    rig.inject("p1", Ether(src=P1, dst=BCAST) / ARP(op=1, hwsrc=P1, psrc="10.244.1.77", pdst=RTR_PODS))
    (reply,) = rig.take_raw("p1")
    assert Ether(reply)[ARP].pdst == "10.244.1.77"


@pytest.mark.parametrize("target", ["127.0.0.1", "127.1.2.3", "224.0.0.1"])
def test_arp_request_for_loopback_or_multicast_target_is_ignored(rig, target):
    rig.inject("p1", Ether(src=P1, dst=BCAST) / ARP(op=1, hwsrc=P1, psrc=POD1, pdst=target))
    assert rig.take_raw("p1") == []
    assert rig.drops("arp-input", "arp-bad-target") == 1


def host_rig() -> Rig:
    cfg = config()
    cfg["ports"].append({"name": "h", "type": "memory"})
    cfg["router"]["interfaces"] = [
        {"name": "pods", "address": "10.244.1.1/24"},
        {"name": "uplink", "port": "up", "address": "192.168.1.11/24", "mtu": 1400},
        {"name": "host", "port": "h", "address": "169.254.1.1/30", "host": True}]
    return Rig(cfg)


def test_host_port_address_is_answered_only_on_the_host_port():
    rig = host_rig()
    hmac = rig.n.router.ifaces["host"].mac.hex(":")
    rig.inject("p1", Ether(src=P1, dst=BCAST) / ARP(op=1, hwsrc=P1, psrc=POD1, pdst="169.254.1.1"))
    assert rig.take_raw("p1") == []  # a kernel node has no such address: pods never learn it
    rig.inject("up", Ether(src=GW_MAC, dst=BCAST) / ARP(op=1, hwsrc=GW_MAC, psrc=GW, pdst="169.254.1.1"))
    assert rig.take_raw("up") == []
    host = "02:00:00:00:09:09"
    rig.inject("h", Ether(src=host, dst=BCAST) / ARP(op=1, hwsrc=host, psrc="169.254.1.2", pdst="169.254.1.1"))
    (reply,) = rig.n.ports["h"].take()
    assert Ether(reply)[ARP].psrc == "169.254.1.1" and Ether(reply).src == hmac
    # the node's stack shares the router's addresses and asks from them (its own packets' source)
    rig.inject("h", Ether(src=host, dst=BCAST) / ARP(op=1, hwsrc=host, psrc=RTR_PODS, pdst="169.254.1.1"))
    (reply,) = rig.n.ports["h"].take()
    assert Ether(reply)[ARP].pdst == RTR_PODS
    # the node's other addresses are still answered on any interface (arp_ignore 0)
    rig.inject("p1", Ether(src=P1, dst=BCAST) / ARP(op=1, hwsrc=P1, psrc=POD1, pdst=RTR_UP))
    assert only(rig.take("p1"))[0][ARP].psrc == RTR_UP


# --- redirects on a node with a nat table -----------------------------------------------------------------

def test_no_redirect_for_a_connections_first_packet_with_nat():
    cfg = config(routes=["10.50.0.0/16 via 192.168.1.12"])
    cfg["nat"] = {"clusterCIDR": "10.244.0.0/16"}
    rig = Rig(cfg)
    rig.gw_arps()
    rig.inject("up", Ether(src=PEER_MAC, dst=BCAST) / ARP(op=1, hwsrc=PEER_MAC, psrc=PEER, pdst=RTR_UP))
    rig.take_all()

    def send(sport):
        rig.from_up(IP(src=PEER, dst="10.50.0.5") / UDP(sport=sport, dport=9) / Raw(b"r"))
        out = rig.take("up")
        assert [f[IP].dst for f in out if UDP in f and ICMP not in f] == ["10.50.0.5"]  # always forwarded
        return [f for f in out if ICMP in f and f[ICMP].type == 5]

    # the first packet creates the entry: nf_nat_icmp_reply_translation drops its redirect ...
    assert send(4001) == []
    assert rig.drops("ip4-forward", "redirect-new-conn") == 1
    # ... after ip_rt_send_redirect counted it: 10 ms later the backoff (20 ms << 1) still holds
    rig.clock.t += 0.010
    assert send(4001) == []
    rig.clock.t += 0.040
    (r,) = send(4001)  # an established entry without NAT: the redirect goes out
    assert (r[IP].dst, r[ICMP].code, r[ICMP].gw) == (PEER, 1, GW)
    rig.clock.t += 0.5
    assert send(4002) == []  # another flow's first packet: none again
    assert rig.drops("ip4-forward", "redirect-new-conn") == 2


# --- record route (ip_forward_options) -----------------------------------------------------------------

def rr_opts(pointer=4, slots=2, nop=False):
    opts = [IPOption_RR(pointer=pointer, routers=["0.0.0.0"] * slots)]
    return [IPOption_NOP()] + opts if nop else opts


@pytest.mark.parametrize("nop", [False, True])
def test_record_route_gets_the_egress_address(rig, nop):
    rig.pod_arps()
    rig.gw_arps()
    rig.from_pod(IP(src=POD1, dst=REMOTE, ttl=9, options=rr_opts(nop=nop)) / UDP(sport=1, dport=2) / Raw(b"rr"))
    (f,) = only(rig.take("up"))
    rr = [o for o in f[IP].options if o.option == 7][0]
    assert (rr.pointer, rr.routers) == (8, [RTR_UP, "0.0.0.0"])  # the uplink route's source, next slot
    assert f[IP].ttl == 8 and csum_ok(bytes(f[IP])) and bytes(f[Raw]) == b"rr"
    # the other way, onto the bridge, one slot already used: the pods interface's address goes next
    back = [IPOption_RR(pointer=8, routers=[GW, "0.0.0.0"])]
    rig.from_up(IP(src=REMOTE, dst=POD1, options=back) / UDP(sport=2, dport=1), src_mac=GW_MAC)
    (g,) = only(rig.take("p1"))
    rr = [o for o in g[IP].options if o.option == 7][0]
    assert (rr.pointer, rr.routers) == (12, [GW, RTR_PODS]) and csum_ok(bytes(g[IP]))


def test_full_record_route_is_forwarded_unchanged(rig):
    rig.pod_arps()
    rig.gw_arps()
    sent = IP(src=POD1, dst=REMOTE, ttl=9, options=rr_opts(pointer=8, slots=1)) / UDP(sport=1, dport=2)
    rig.from_pod(sent)
    (f,) = only(rig.take("up"))
    assert bytes(f[IP])[20:28] == bytes(sent)[20:28] and csum_ok(bytes(f[IP]))
