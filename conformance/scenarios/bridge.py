"""Bridge scenarios: kernel-dataplane-spec.md section 1 (cni0).

node1's bridge has two pod ports (a1, a2) and the gateway (the node's own MAC), so a flood from
a1 reaches a2 just as a known unicast to a2 does. Whether a MAC is *learned* is therefore
observed through hairpin mode (item 5): a frame from a1 to a MAC learned on a1's port comes back
out of a1 only, while an unknown one is flooded to a2.

Most frames carry the IEEE local-experimental ethertype 0x88b5 and a marker, so neither side's
stack reacts to them and they can be counted wherever they show up.

The kernel also floods back out of the ingress port when that port is in hairpin mode
(br_forward.c should_deliver), so a pod hears its own broadcasts; vswitch never does
(docs/architecture.md, deliberate). Every scenario keeps the copies a flood sends back to its
sender under one key, ``flood_back_to_sender``, so that difference stays in one place and the
other keys still compare where the frame went.
"""

from __future__ import annotations

import socket
import struct

from scapy.layers.inet import ICMP, IP
from scapy.layers.l2 import LLC, STP, Dot1Q, Ether
from scapy.packet import Raw

from ..core import scenario
from ..netio import open_in

MARK = 0x88B5
WATCH = ("a1", "a2", "b1", "ext", "underlay")
BCAST = "ff:ff:ff:ff:ff:ff"
# Locally administered unicast MACs nobody owns (fixed test values, not generated devices).
STRANGER = "02:c0:4e:00:00:01"
LEARNED = "02:c0:4e:00:00:02"


def _marker(tag: str) -> bytes:
    return f"conformance:{tag}:".encode().ljust(46, b".")


def _l2(src: str, dst: str, tag: str, etype: int = MARK):
    return Ether(src=src, dst=dst, type=etype) / Raw(_marker(tag))


def _count(frames: list, tag: str) -> int:
    m = _marker(tag)[:len(f"conformance:{tag}:")]
    return sum(1 for f in frames if m in bytes(f))


def _send(c, member: str, frame, tag: str, expect: str = None, window: float = 1.0, settle: float = 0.3) -> dict:
    """Send ``frame`` from ``member``; per watched point, how many frames carrying ``tag`` arrived.

    Stops ``settle`` seconds after the marker reached ``expect`` (a point; by default any point),
    else after ``window``."""
    m = _marker(tag)[:len(f"conformance:{tag}:")]
    points = (expect,) if expect is not None else WATCH
    until = lambda seen: any(m in f for p in points for d, f in seen[p] if d == "in")  # noqa: E731
    seen = c.probe(member, frame, watch=WATCH, window=window, until=until)
    if settle and any(_count(seen[p], tag) for p in points):
        from scapy.all import Ether as _E
        more = c.points.watch(settle)
        for p in WATCH:
            seen[p] += [_E(f) for d, f in more[p] if d == "in"]
    return {p: _count(seen[p], tag) for p in WATCH}


def _split(counts: dict, sender: str) -> tuple:
    """(counts at the points other than ``sender``, count at ``sender``)."""
    return {p: n for p, n in counts.items() if p != sender}, counts[sender]


def _learn(c, pod: str, src: str = None) -> None:
    """A broadcast from ``pod`` (source ``src``, its own MAC by default): the bridge learns the
    source on the pod's port. Returns once the flood came out, so the bridge has done it."""
    _send(c, pod, _l2(src or c.mac(pod), BCAST, "learn"), "learn", settle=0.05)


def _echo(c, pod: str, dst_mac: str, ident: int, **tag):
    """An echo request from ``pod`` to its gateway address, in a frame to ``dst_mac``."""
    pkt = IP(src=c.ip(pod), dst=c.gateway(pod), ttl=64) / ICMP(id=ident, seq=1) / Raw(b"bridge-echo")
    eth = Ether(src=c.mac(pod), dst=dst_mac)
    if tag:
        return eth / Dot1Q(**tag) / pkt
    return eth / pkt


def _echo_result(c, seen: dict, pod: str, ident: int) -> tuple:
    """(replies the pod got and copies of the request the other points saw, copies back at the pod)."""
    replies = [f for f in seen[pod] if ICMP in f and f[ICMP].type == 0 and f[ICMP].id == ident]
    copies = {p: sum(1 for f in fs if ICMP in f and f[ICMP].type == 8 and f[ICMP].id == ident)
              for p, fs in seen.items()}
    others, back = _split(copies, pod)
    return {"replies": [{"eth_src": c.role(f.src), "eth_dst": c.role(f.dst), "vlan": Dot1Q in f}
                        for f in replies], "request_copies": others}, back


def _echo_probe(c, pod: str, frame, ident: int, window: float = 2.0) -> tuple:
    """Send an echo-request frame and collect until the reply arrived (plus a short settle)."""
    from scapy.all import Ether as _E
    seen = c.probe(pod, frame, watch=WATCH, window=window, until=_echo_until(pod, ident))
    more = c.points.watch(0.3)
    for p in WATCH:
        seen[p] += [_E(f) for d, f in more[p] if d == "in"]
    return _echo_result(c, seen, pod, ident)


def _echo_until(pod: str, ident: int):
    def until(seen):
        from scapy.all import Ether as _E
        for d, f in seen[pod]:
            if d == "in":
                e = _E(f)
                if ICMP in e and e[ICMP].type == 0 and e[ICMP].id == ident:
                    return True
        return False
    return until


@scenario("hostgw", spec="item 3")
def bridge_known_unicast_to_its_port(c):
    """A frame from a1 to a2's learned MAC reaches a2 only, unchanged."""
    _learn(c, "a2")
    frame = _l2(c.mac("a1"), c.mac("a2"), "known")
    seen = c.probe("a1", frame, watch=WATCH, window=1.0,
                   until=lambda s: any(b"conformance:known:" in f for d, f in s["a2"] if d == "in"))
    got = [f for f in seen["a2"] if b"conformance:known:" in bytes(f)]
    return {"seen": {p: _count(seen[p], "known") for p in WATCH},
            "intact": [bytes(f) == bytes(frame) for f in got]}


@scenario("hostgw", spec="items 3, 4")
def bridge_unknown_unicast_floods_not_local(c):
    """Unicast to an unknown MAC is flooded to the node's other pod, not to the local stack (an
    echo request to the gateway address inside it gets no reply)."""
    echo, echo_back = _echo_probe(c, "a1", _echo(c, "a1", STRANGER, 4101), 4101, window=1.0)
    flood, flood_back = _split(_send(c, "a1", _l2(c.mac("a1"), STRANGER, "unknown"), "unknown"), "a1")
    return {"echo": echo, "marker_seen": flood, "flood_back_to_sender": {"echo": echo_back, "marker": flood_back}}


@scenario("hostgw", spec="item 3")
def bridge_broadcast_floods_and_delivers_locally(c):
    """Broadcast and multicast frames are flooded to the other pod; broadcast is also handed to
    the node: an echo request to the gateway address in a broadcast frame is answered."""
    echo, echo_back = _echo_probe(c, "a1", _echo(c, "a1", BCAST, 4102), 4102)
    bcast, bcast_back = _split(_send(c, "a1", _l2(c.mac("a1"), BCAST, "bcast"), "bcast"), "a1")
    mcast, mcast_back = _split(_send(c, "a1", _l2(c.mac("a1"), "01:00:5e:00:00:fb", "mcast"), "mcast"), "a1")
    return {"echo": echo, "broadcast_seen": bcast, "multicast_seen": mcast,
            "flood_back_to_sender": {"echo": echo_back, "broadcast": bcast_back, "multicast": mcast_back}}


@scenario("hostgw", spec="items 3, 4")
def bridge_gateway_mac_not_flooded(c):
    """A frame for the gateway's MAC goes to the node only: answered, never seen by the other pod."""
    echo, echo_back = _echo_probe(c, "a1", _echo(c, "a1", c.gw_mac["a1"], 4103), 4103)
    marker = _send(c, "a1", _l2(c.mac("a1"), c.gw_mac["a1"], "gwmac"), "gwmac")
    return {"echo": echo, "echo_back_at_sender": echo_back, "marker_seen": marker}


@scenario("hostgw", spec="item 1")
def bridge_bad_source_mac_dropped(c):
    """Frames with a multicast, broadcast or all-zero source MAC are dropped, not flooded."""
    out = {}
    for name, src in (("multicast", "01:00:5e:00:00:01"), ("broadcast", BCAST), ("zero", "00:00:00:00:00:00")):
        out[name] = _send(c, "a1", _l2(src, BCAST, f"badsrc-{name}"), f"badsrc-{name}")
    return out


@scenario("hostgw", spec="items 1, 4, 5")
def bridge_hairpin_and_learning(c):
    """A frame to a MAC learned on the sender's own port comes back out of it (hairpin on);
    a new source MAC is learned on its ingress port."""
    _learn(c, "a1")
    own = _send(c, "a1", _l2(c.mac("a1"), c.mac("a1"), "hairpin-own"), "hairpin-own")
    before, back = _split(_send(c, "a1", _l2(c.mac("a1"), LEARNED, "learn-before"), "learn-before"),
                          "a1")
    _learn(c, "a1", src=LEARNED)
    after = _send(c, "a1", _l2(c.mac("a1"), LEARNED, "learn-after"), "learn-after")
    return {"to_own_mac": own, "to_new_mac_before_learning": before, "to_new_mac_after_learning": after,
            "flood_back_to_sender": {"to_new_mac_before_learning": back}}


@scenario("hostgw", spec="item 1")
def bridge_fdb_move(c):
    """A MAC seen on another port moves there at once: a1's MAC sent from a2's port draws a1's
    traffic to a2 (hairpin) until a1 speaks again."""
    _learn(c, "a1")
    _learn(c, "a2")
    a1, a2 = c.mac("a1"), c.mac("a2")
    before = _send(c, "a2", _l2(a2, a1, "move-before"), "move-before")
    _learn(c, "a2", src=a1)  # a1's MAC now comes from a2's port
    moved = _send(c, "a2", _l2(a2, a1, "move-moved"), "move-moved")
    _learn(c, "a1")  # and back
    back = _send(c, "a2", _l2(a2, a1, "move-back"), "move-back")
    return {"before": before, "after_move": moved, "after_move_back": back}


@scenario("hostgw", spec="items 1, 6")
def bridge_link_local_groups(c):
    """IEEE 01:80:c2:00:00:0X: STP (:00) forwarded with STP off, pause (:01) dropped unlearned, the
    rest (LACP :02, 802.1X :03, LLDP :0e) not forwarded but their source learned."""
    _learn(c, "a1")
    out, back = {}, {}
    groups = (("00-stp", 0x00), ("01-pause", 0x01), ("02-slow", 0x02), ("03-eapol", 0x03), ("0e-lldp", 0x0E))
    for name, low in groups:
        src = f"02:c0:4e:00:01:{low:02x}"
        dst = f"01:80:c2:00:00:{low:02x}"
        tag = f"ll-{name}"
        if low == 0x00:  # a real BPDU: 802.3 length + LLC, the marker after it
            frame = Ether(src=src, dst=dst) / LLC() / STP() / Raw(_marker(tag))
        else:
            etype = {0x01: 0x8808, 0x02: 0x8809, 0x03: 0x888E, 0x0E: 0x88CC}[low]
            frame = _l2(src, dst, tag, etype)
        fwd, fwd_back = _split(_send(c, "a1", frame, tag), "a1")
        # was the source learned on a1's port? Then a frame from a1 to it hairpins back to a1 only;
        # else it is an unknown unicast, flooded to a2.
        probe, probe_back = _split(_send(c, "a1", _l2(c.mac("a1"), src, tag + "-learned"), tag + "-learned"), "a1")
        out[name] = {"forwarded": fwd, "to_its_source": probe}
        back[name] = {"forwarded": fwd_back, "to_its_source": probe_back}
    out["flood_back_to_sender"] = back
    return out


@scenario("hostgw", spec="item 1")
def bridge_own_mac_source_not_learned(c):
    """A frame with the gateway's MAC as source is still forwarded, but the MAC is not learned:
    the other pod still reaches the node."""
    gw = c.gw_mac["a1"]
    fwd = _send(c, "a1", _l2(gw, c.mac("a2"), "ownsrc"), "ownsrc")
    echo, echo_back = _echo_probe(c, "a2", _echo(c, "a2", gw, 4104), 4104)
    return {"forwarded": fwd, "echo_from_a2": echo, "echo_back_at_a2": echo_back}


# --- 802.1Q ---------------------------------------------------------------------------------------

SOL_PACKET, PACKET_AUXDATA = 263, 8
TP_STATUS_VLAN_VALID, TP_STATUS_VLAN_TPID_VALID = 0x10, 0x40
_AUX = struct.Struct("IIIHHHH")


class _VlanTap:
    """An extra AF_PACKET socket on a pod's eth0 that also reports the VLAN tag the receiving
    kernel moved out of the frame (PACKET_AUXDATA), as tcpdump shows it: the same for a veth
    (kernel node) and a TAP (vswitch node), both being receiving netdevs in the pod."""

    def __init__(self, pod: str) -> None:
        self.s = open_in(pod, "eth0")
        self.s.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
        self.drain()

    def drain(self) -> None:
        while True:
            try:
                self.s.recv(65536)
            except BlockingIOError:
                return

    def frames(self, tag: str) -> list:
        """(tpid, vid, pcp, inner ethertype) of every received frame carrying ``tag``."""
        m = _marker(tag)[:len(f"conformance:{tag}:")]
        out = []
        while True:
            try:
                data, anc, _flags, addr = self.s.recvmsg(65536, socket.CMSG_SPACE(_AUX.size))
            except BlockingIOError:
                return out
            if addr[2] == 4 or m not in data:  # PACKET_OUTGOING
                continue
            tpid = vid = pcp = None
            for level, typ, val in anc:
                if level == SOL_PACKET and typ == PACKET_AUXDATA and len(val) >= _AUX.size:
                    status, _l, _s, _m, _n, tci, tp = _AUX.unpack_from(val)
                    if status & TP_STATUS_VLAN_VALID:
                        vid, pcp = tci & 0xFFF, tci >> 13
                        tpid = hex(tp) if status & TP_STATUS_VLAN_TPID_VALID else "0x8100"
            etype = struct.unpack_from("!H", data, 12)[0]
            if tpid is None and etype in (0x8100, 0x88A8):  # tag still in the bytes
                tci = struct.unpack_from("!H", data, 14)[0]
                tpid, vid, pcp, etype = hex(etype), tci & 0xFFF, tci >> 13, struct.unpack_from("!H", data, 16)[0]
            out.append({"tpid": tpid, "vid": vid, "pcp": pcp, "type": hex(etype)})

    def close(self) -> None:
        self.s.close()


@scenario("hostgw", spec="item 3")
def bridge_vlan_tagged_forwarded(c):
    """802.1Q-tagged frames are bridged as they are (no VLAN filtering): known unicast and
    broadcast reach a2 with their tag."""
    _learn(c, "a2")
    tap = _VlanTap("a2")
    try:
        out, back = {}, {}
        for name, dst, tag in (("unicast", c.mac("a2"), dict(vlan=10, prio=3)),
                               ("broadcast", BCAST, dict(vlan=20, prio=0)),
                               ("priority_tagged", c.mac("a2"), dict(vlan=0, prio=5))):
            t = f"vlan-{name}"
            frame = Ether(src=c.mac("a1"), dst=dst) / Dot1Q(type=MARK, **tag) / Raw(_marker(t))
            seen, back[name] = _split(_send(c, "a1", frame, t), "a1")
            out[name] = {"seen": seen, "at_a2": tap.frames(t)}
        out["flood_back_to_sender"] = back
        return out
    finally:
        tap.close()


@scenario("hostgw", spec="item 3")
def bridge_vlan_tagged_to_gateway(c):
    """Tagged frames for the gateway's MAC: a priority tag (VID 0) is stripped and the echo request
    answered by the node's stack; VID 10 has no VLAN device on the node, so no answer."""
    out = {}
    for name, ident, tag in (("vid0", 4105, dict(vlan=0, prio=5)), ("vid10", 4106, dict(vlan=10))):
        out[name], out[name + "_back_at_sender"] = _echo_probe(c, "a1", _echo(c, "a1", c.gw_mac["a1"], ident, **tag),
                                                               ident, window=1.5)
    return out
