"""ARP scenarios: kernel-dataplane-spec.md section 3 (the router's neighbour handling).

The node's side of ARP is observed from node1's pods: requests a pod sends and what comes back,
the requests the node broadcasts while it resolves an address, and where forwarded traffic goes
afterwards (which shows what the neighbour table holds, without reading it). Every scenario uses
its own never-owned addresses of node1's pod CIDR (10.244.1.210 and up), so the neighbour
entries one scenario leaves behind never meet another's. MACs that no device owns are fixed test
values, reported by name (``claimed``); every other MAC as its role.
"""

from __future__ import annotations

import threading

import scapy.all  # noqa: F401  (every layer loaded up front: dissecting never pauses a timed watch)
from scapy.layers.inet import ICMP, IP, UDP, IPerror, UDPerror
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Raw

from ..core import scenario
from ._obs import arp_summary, icmp_error, role_ip, watch_timed

BCAST = "ff:ff:ff:ff:ff:ff"
ZERO = "00:00:00:00:00:00"
CLAIMED = "02:c0:4a:00:00:01"  # a MAC no device has
CLAIMED2 = "02:c0:4a:00:00:02"
CLAIMED3 = "02:c0:4a:00:00:03"
NAMES = {CLAIMED: "claimed", CLAIMED2: "claimed2", CLAIMED3: "claimed3"}
UNOWNED = "10.244.1.{}"  # .210-.239: inside node1's pod CIDR, never given to a pod


def _arp(c, pod: str, op: int, pdst: str, psrc: str = None, hwsrc: str = None, hwdst: str = ZERO,
         eth_dst: str = BCAST, eth_src: str = None):
    """An ARP frame from ``pod``'s port: its own MAC and address unless told otherwise."""
    hwsrc = hwsrc or c.mac(pod)
    return Ether(src=eth_src or hwsrc, dst=eth_dst) / ARP(op=op, hwsrc=hwsrc, psrc=psrc or c.ip(pod),
                                                         hwdst=hwdst, pdst=pdst)


def _arps(frames: list, op: int = None, psrc: str = None, pdst: str = None) -> list:
    return [f for f in frames if ARP in f and (op is None or f[ARP].op == op)
            and (psrc is None or f[ARP].psrc == psrc) and (pdst is None or f[ARP].pdst == pdst)]


def _udp(c, src: str, dst: str, sport: int = 40000):
    return IP(src=c.ip(src), dst=dst, ttl=64) / UDP(sport=sport, dport=9) / Raw(b"arp-scenario")


def _udp_to(frames: list, dst: str, sport: int) -> list:
    return [f for f in frames if IP in f and UDP in f and UDPerror not in f and f[IP].dst == dst
            and f[UDP].sport == sport]


def _send_all(c, frames: list, window: float, stop=None) -> list:
    """Send (point, frame) pairs back to back (all built first), then collect events timed from
    the first send."""
    import time
    raw = [(point, c.frame(point, frame)) for point, frame in frames]
    c.points.drain()
    start = time.monotonic()
    for point, frame in raw:
        c.points.send(point, frame)
    return watch_timed(c, window, stop, start=start)


def _at(events: list, point: str) -> list:
    return [f for t, p, f in events if p == point]


def _replies(c, frames: list, psrc: str) -> list:
    return [arp_summary(c, f, NAMES) for f in _arps(frames, op=2, psrc=psrc)]


@scenario("hostgw", spec="item 16")
def arp_request_for_gateway_answered(c):
    """Who-has the gateway, broadcast or unicast: one reply from the node to the requester only,
    op 2, sha the gateway MAC, spa the gateway, tha/tpa the requester."""
    gw = c.gateway("a1")
    out = {}
    for name, eth_dst in (("broadcast", BCAST), ("unicast", c.gw_mac["a1"])):
        ev = _send_all(c, [("a1", _arp(c, "a1", 1, gw, eth_dst=eth_dst))], 1.5,
                       stop=lambda e: any(p == "a1" and _arps([f], op=2, psrc=gw) for t, p, f in e))
        ev += watch_timed(c, 0.3)
        out[name] = {"replies_at_a1": _replies(c, _at(ev, "a1"), gw),
                     "replies_at_a2": len(_arps(_at(ev, "a2"), op=2, psrc=gw)),
                     "request_seen_at_a2": len(_arps(_at(ev, "a2"), op=1, psrc=c.ip("a1"), pdst=gw))}
    return out


@scenario("hostgw", spec="items 15, 16")
def arp_request_for_other_addresses(c):
    """Who-has addresses the node does not own (an unused pod address, a remote pod, the other
    node's gateway and address): the node never answers; a2's own address is answered by a2."""
    targets = {"unowned": UNOWNED.format(210), "a2": c.ip("a2"), "b1": c.ip("b1"),
               "gw:node2": c.nodes["node2"]["gateway"].split("/")[0], "node:node2": c.ip("node2")}
    ev = _send_all(c, [("a1", _arp(c, "a1", 1, t)) for t in targets.values()], 1.5)
    return {name: _replies(c, _at(ev, "a1"), t) for name, t in targets.items()}


@scenario("hostgw", spec="item 16")
def arp_request_for_node_addresses(c):
    """Who-has any address the node holds is answered on any interface (arp_ignore 0): from a pod
    for the node's underlay address, from ext on the underlay for the pod gateway address."""
    # 169.254.1.1/.2: the two ends of a vswitch lab node's host port (docs/lab.md); a kernel node
    # has no such addresses
    from_pod = {"a1_asks_node1_address": c.ip("node1"), "a1_asks_loopback": "127.0.0.1",
                "a1_asks_169.254.1.1": "169.254.1.1", "a1_asks_169.254.1.2": "169.254.1.2"}
    from_ext = {"ext_asks_gw_node1": c.gateway("a1"), "ext_asks_gw_node2": c.nodes["node2"]["gateway"].split("/")[0],
                "ext_asks_a1": c.ip("a1")}
    frames = [("a1", _arp(c, "a1", 1, t)) for t in from_pod.values()]
    frames += [("ext", _arp(c, "ext", 1, t, psrc=c.ip("ext"), hwsrc=c.mac("ext"))) for t in from_ext.values()]
    ev = _send_all(c, frames, 1.5)
    out = {name: _replies(c, _at(ev, "a1"), t) for name, t in from_pod.items()}
    out.update({name: _replies(c, _at(ev, "ext"), t) for name, t in from_ext.items()})
    return out


@scenario("hostgw", spec="item 16")
def arp_request_sender_checks(c):
    """Who-has the gateway from unusual senders: a DAD probe (sender 0.0.0.0) is answered with
    tpa 0.0.0.0; loopback, multicast, broadcast or the gateway's own address as sender are not
    answered (the kernel's route check of the sender fails)."""
    gw = c.gateway("a1")
    senders = {"dad_probe": "0.0.0.0", "loopback": "127.0.0.1", "multicast": "224.0.0.5",
               "limited_broadcast": "255.255.255.255", "gateway_itself": gw, "unowned": UNOWNED.format(211)}
    ev = _send_all(c, [("a1", _arp(c, "a1", 1, gw, psrc=s)) for s in senders.values()], 1.5)
    replies = _arps(_at(ev, "a1"), op=2, psrc=gw)
    return {name: [arp_summary(c, f, NAMES) for f in replies if f[ARP].pdst == s] for name, s in senders.items()}


@scenario("hostgw", spec="items 15, 17, 18")
def arp_resolution_fails_host_unreachable(c):
    """Traffic for an address nobody owns: 3 broadcast requests 1 s apart (sha/spa the gateway's),
    then, 3 s after the first packet, ICMP host unreachable for each of the 3 queued packets."""
    target = UNOWNED.format(220)

    def unreachable(f):
        return ICMP in f and f[ICMP].type == 3 and IPerror in f and f[IPerror].dst == target

    ev = _send_all(c, [("a1", _udp(c, "a1", target, sport=40220 + i)) for i in range(3)], 6.0,
                   stop=lambda e: sum(1 for t, p, f in e if p == "a1" and unreachable(f)) >= 3)
    ev += watch_timed(c, 0.5)
    requests = [(t, f) for t, p, f in ev if p == "a2" and _arps([f], op=1, pdst=target)]
    errors = [(t, f) for t, p, f in ev if p == "a1" and unreachable(f)]
    return {"requests": [arp_summary(c, f, NAMES) for t, f in requests],
            "request_times_s": [round(t) for t, f in requests],
            "unreachable": icmp_error(c, [f for t, f in errors]),
            "unreachable_quoted_sports": [f[UDPerror].sport - 40220 if UDPerror in f else None for t, f in errors],
            "unreachable_after_s": sorted({round(t) for t, f in errors}),
            "redirects": sum(1 for t, p, f in ev if p == "a1" and ICMP in f and f[ICMP].type == 5
                             and IPerror in f and f[IPerror].dst == target),
            "delivered_anywhere": sum(1 for t, p, f in ev if IP in f and UDP in f and UDPerror not in f
                                      and f[IP].dst == target)}


@scenario("hostgw", spec="item 19")
def arp_unsolicited_does_not_create_entry(c):
    """An unsolicited reply, a gratuitous request and a gratuitous reply for addresses the node has
    no entry for create none (arp_accept 0): traffic to them makes the node ARP, not use the MAC."""
    gw, gw_mac = c.gateway("a1"), c.gw_mac["a1"]
    cases = {
        "unsolicited_reply": (UNOWNED.format(221), lambda ip: _arp(c, "a1", 2, gw, psrc=ip, hwsrc=CLAIMED,
                                                                   hwdst=gw_mac, eth_dst=gw_mac)),
        "gratuitous_request": (UNOWNED.format(222), lambda ip: _arp(c, "a1", 1, ip, psrc=ip, hwsrc=CLAIMED)),
        "gratuitous_reply": (UNOWNED.format(223), lambda ip: _arp(c, "a1", 2, ip, psrc=ip, hwsrc=CLAIMED,
                                                                  hwdst=BCAST)),
    }
    _send_all(c, [("a1", make(ip)) for ip, make in cases.values()], 0.3)
    ev = _send_all(c, [("a1", _udp(c, "a1", ip, sport=40221 + i)) for i, (ip, _m) in enumerate(cases.values())],
                   1.5)
    out = {}
    for i, (name, (ip, _m)) in enumerate(cases.items()):
        out[name] = {"forwarded_eth_dst": sorted({NAMES.get(f.dst, c.role(f.dst)) for t, p, f in ev
                                                  for f in _udp_to([f], ip, 40221 + i)}),
                     "node_requests_at_a2": [arp_summary(c, f, NAMES) for f in _arps(_at(ev, "a2"), op=1, pdst=ip)
                                             ][:1]}
    return out


@scenario("hostgw", spec="items 16, 17")
def arp_request_for_us_creates_stale_entry(c):
    """A request for the gateway creates the requester's entry (STALE): traffic to the requester's
    address goes straight to its MAC, with no broadcast request first."""
    gw, target = c.gateway("a1"), UNOWNED.format(224)
    ev = _send_all(c, [("a1", _arp(c, "a1", 1, gw, psrc=target, hwsrc=CLAIMED))], 1.0,
                   stop=lambda e: any(_arps([f], op=2, pdst=target) for t, p, f in e))
    reply = [arp_summary(c, f, NAMES) for t, p, f in ev if p == "a1" for f in _arps([f], op=2, pdst=target)]
    ev = _send_all(c, [("a1", _udp(c, "a1", target, sport=40224))], 1.5,
                   stop=lambda e: any(p == "a1" and _udp_to([f], target, 40224) for t, p, f in e))
    ev += watch_timed(c, 0.3)
    return {"reply": reply,
            "forwarded": [{"at": p, "eth_src": c.role(f.src), "eth_dst": NAMES.get(f.dst, c.role(f.dst))}
                          for t, p, f in ev if p in ("a1", "a2") for f in _udp_to([f], target, 40224)],
            "broadcast_requests": len([f for t, p, f in ev if p == "a2" for f in _arps([f], op=1, pdst=target)
                                       if f.dst == BCAST])}


@scenario("hostgw", spec="item 19")
def arp_gratuitous_overrides_entry(c):
    """A gratuitous ARP for a pod the node has resolved replaces the MAC at once; a second one
    puts it back."""
    a2ip = c.ip("a2")

    def send_udp(sport):
        ev = _send_all(c, [("a1", _udp(c, "a1", a2ip, sport=sport))], 2.0,
                       stop=lambda e: any(p == "a2" and _udp_to([f], a2ip, sport) for t, p, f in e))
        return sorted({NAMES.get(f.dst, c.role(f.dst)) for t, p, f in ev if p == "a2"
                       for f in _udp_to([f], a2ip, sport)})

    def garp(mac):  # sent from a2's port; once its flood reaches a1 the node has it too
        _send_all(c, [("a2", _arp(c, "a2", 1, a2ip, psrc=a2ip, hwsrc=mac))], 1.0,
                  stop=lambda e: any(p == "a1" and f[ARP].hwsrc == mac for t, p, f in e
                                     for f in _arps([f], op=1, psrc=a2ip, pdst=a2ip)))
        watch_timed(c, 0.1)

    primed = send_udp(40230)  # the node resolves a2 (if it had not already)
    garp(CLAIMED2)
    after = send_udp(40231)
    garp(c.mac("a2"))
    restored = send_udp(40232)
    return {"before": primed, "after_gratuitous": after, "after_second_gratuitous": restored}


@scenario("hostgw", spec="item 15")
def arp_request_for_node_originated_traffic(c):
    """The node's own packet to an unresolved pod address: the request's spa is that packet's
    source (a local address), which is the gateway address on a kernel node."""
    target = UNOWNED.format(225)
    c.points.drain()
    th = threading.Thread(target=c.exec, args=("node1", "ping", "-n", "-c", "1", "-W", "2", target),
                          kwargs={"timeout": 10})
    th.start()
    ev = watch_timed(c, 3.0, stop=lambda e: any(p == "a2" and _arps([f], op=1, pdst=target) for t, p, f in e))
    th.join()
    requests = [arp_summary(c, f, NAMES) for t, p, f in ev if p == "a2" for f in _arps([f], op=1, pdst=target)]
    # and the source a pod sees on the node's own packets
    c.points.drain()
    th = threading.Thread(target=c.exec, args=("node1", "ping", "-n", "-c", "1", "-W", "2", c.ip("a2")),
                          kwargs={"timeout": 10})
    th.start()
    ev = watch_timed(c, 3.0, stop=lambda e: any(p == "a2" and ICMP in f and f[ICMP].type == 8 for t, p, f in e))
    th.join()
    echo_src = sorted({role_ip(c, f[IP].src) for t, p, f in ev if p == "a2" and ICMP in f and f[ICMP].type == 8})
    return {"request": requests[:1], "echo_source_at_a2": echo_src}


@scenario("hostgw", spec="item 18")
def arp_queue_while_resolving(c):
    """Packets sent while the node resolves their next hop wait in a bounded queue and leave in
    order, to the MAC of the reply; 120 back-to-back packets: how many survive, which were dropped."""
    gw, gw_mac, target, n = c.gateway("a1"), c.gw_mac["a1"], UNOWNED.format(226), 120
    # answer only after the second request (1 s in): by then the node has taken every packet in
    # (a reply racing the burst would let later packets bypass the queue)
    ev = _send_all(c, [("a1", _udp(c, "a1", target, sport=41000 + i)) for i in range(n)], 3.0,
                   stop=lambda e: sum(1 for t, p, f in e if p == "a2" and _arps([f], op=1, pdst=target)) >= 2)
    requested = len([f for t, p, f in ev if p == "a2" for f in _arps([f], op=1, pdst=target)])
    early = sum(1 for t, p, f in ev if _udp_to_any(f, target))
    # a2's port answers for the address, from a MAC only it uses (so the queue comes out at a2)
    reply = _arp(c, "a2", 2, gw, psrc=target, hwsrc=CLAIMED3, hwdst=gw_mac, eth_dst=gw_mac)
    ev = _send_all(c, [("a2", reply)], 3.0,
                   stop=lambda e: sum(1 for t, p, f in e if p == "a2" and _udp_to_any(f, target)) >= n)
    ev += watch_timed(c, 0.3)
    got = [f for t, p, f in ev if p == "a2" and _udp_to_any(f, target)]
    order = [f[UDP].sport - 41000 for f in got]
    return {"requests_before_reply": requested, "forwarded_before_reply": early,
            "delivered": len(order), "in_order": order == sorted(order),
            "dropped": sorted(set(range(n)) - set(order)),
            "eth": sorted({(c.role(f.src), NAMES.get(f.dst, c.role(f.dst))) for f in got}),
            "elsewhere": sum(1 for t, p, f in ev if p != "a2" and _udp_to_any(f, target))}


def _udp_to_any(f, dst: str) -> bool:
    return IP in f and UDP in f and UDPerror not in f and f[IP].dst == dst
