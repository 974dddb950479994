"""Service scenarios: kernel-dataplane-spec.md sections 4 and 5 (conntrack, kube-proxy) and item 40 (ip-masq).

Probes are raw frames; the pods' own kernels answer them (a SYN to a closed
port earns a RST, a datagram to one an ICMP port unreachable), and those
answers are what shows the reverse translation. Every scenario uses its own
source ports, since the kernel keeps conntrack entries between scenarios.
Ports a masquerade picks (kube-proxy and flannel use --random-fully) are
reported only as "kept" or not, never as values.
"""

from __future__ import annotations

import contextlib
import select
import subprocess
import sys
import time

from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror, TCPerror, UDPerror
from scapy.layers.l2 import ARP
from scapy.packet import Raw

from vswitch import lab as vlab

from ..core import scenario
from ..topologies import EMPTY_VIP, NODE_PORT, REMOTE_VIP, SOLO_VIP, STICKY_VIP, TARGET
from ._obs import icmp_error, role_ip

SEQ = 1000


# --- probes ------------------------------------------------------------------------------------------

def _syn(c, src: str, dst: str, sport: int, dport: int, flags: str = "S", seq: int = SEQ, ack: int = 0):
    return IP(src=c.ip(src), dst=dst, ttl=64) / TCP(sport=sport, dport=dport, flags=flags, seq=seq, ack=ack,
                                                    window=8192)


def _dgram(c, src: str, dst: str, sport: int, dport: int):
    return IP(src=c.ip(src), dst=dst, ttl=64) / UDP(sport=sport, dport=dport) / Raw(b"conformance")


def _node_mac(c, node: str) -> str:
    """node's underlay MAC as the external host resolved it."""
    return next(mac for mac, role in c.roles.items() if role == f"node:{node}")


def _tcp(frames: list, **match) -> list:
    """TCP frames (not quoted in an ICMP error) whose TCP fields equal ``match``."""
    return [f for f in frames if TCP in f and TCPerror not in f
            and all(getattr(f[TCP], k) == v for k, v in match.items())]


def _udp(frames: list, **match) -> list:
    return [f for f in frames if UDP in f and UDPerror not in f
            and all(getattr(f[UDP], k) == v for k, v in match.items())]


def _has(point: str, pick):
    """An ``until`` for probe(): stop once ``pick(frames seen at point)`` is non-empty."""
    from scapy.all import Ether

    def until(seen):
        return bool(pick([Ether(f) for d, f in seen[point] if d == "in"]))
    return until


def _seg(c, f, sport=None) -> dict:
    """A TCP or UDP frame in roles: addresses, ports (the source port only as 'kept' if ``sport`` is
    given: it may be a masquerade's random choice), TTL, TCP flags and whether it acknowledges SEQ."""
    ip = f[IP]
    l4 = f[TCP] if TCP in f else f[UDP]
    d = {"src": role_ip(c, ip.src), "dst": role_ip(c, ip.dst), "dport": l4.dport, "ttl": ip.ttl,
         "eth_src": c.role(f.src), "eth_dst": c.role(f.dst)}
    if sport is None:
        d["sport"] = l4.sport
    else:
        d["sport_kept"] = l4.sport == sport
    if TCP in f:
        d["flags"] = str(f[TCP].flags)
        d["acks_probe"] = bool(f[TCP].flags & 0x10) and f[TCP].ack == SEQ + 1
    return d


def _quoted_ports(f) -> dict:
    for layer in (UDPerror, TCPerror):
        if layer in f:
            return {"quoted_sport": f[layer].sport, "quoted_dport": f[layer].dport}
    return {}


def _error(c, frames: list) -> dict:
    """icmp_error() plus the quoted ports (None if no ICMP error arrived)."""
    e = icmp_error(c, frames)
    if e is not None:
        e.update(_quoted_ports(next(f for f in frames if ICMP in f and IPerror in f)))
    return e


def _errors(frames: list) -> list:
    return [f for f in frames if ICMP in f and IPerror in f]


# --- conntrack ---------------------------------------------------------------------------------------

def _ct(c, node: str, proto: str, src: str, sport: int, masked=()) -> list:
    """node's conntrack entries of ``proto`` whose original tuple is from ``src``:``sport``, in roles.
    ``masked``: (direction, field) pairs that hold a masquerade's random port, shown as 'kept' or not."""
    rows = [r for r in c.conntrack(node) if r["proto"] == proto and r["orig"].get("src") == c.ip(src)
            and r["orig"].get("sport") == sport]
    out = []
    for r in rows:
        row = {"state": r["state"], "flags": [f for f in r["flags"] if f in ("ASSURED", "UNREPLIED")]}
        for side in ("orig", "reply"):
            t = r[side]
            row[side] = {"src": role_ip(c, t.get("src")), "dst": role_ip(c, t.get("dst"))}
            for k in ("sport", "dport"):
                if (side, k) in masked:
                    row[side][f"{k}_kept"] = t.get(k) == sport
                else:
                    row[side][k] = t.get(k)
        out.append(row)
    return out


def _ct_until(c, node: str, proto: str, src: str, sport: int, state: str, timeout: float = 4.0, masked=()) -> list:
    """_ct() once the entry reached ``state`` (or as it is after ``timeout`` seconds)."""
    end = time.monotonic() + timeout
    while True:
        rows = _ct(c, node, proto, src, sport, masked)
        if any(r["state"] == state for r in rows) or time.monotonic() > end:
            return rows
        time.sleep(0.1)


# --- real sockets in pods ------------------------------------------------------------------------------

# Echo on TCP (each connection until EOF, then closed) and UDP; prints "ready" once bound.
ECHO = r"""
import socket, sys, threading
t = socket.socket(); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.bind(("0.0.0.0", int(sys.argv[1]))); t.listen(64)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("0.0.0.0", int(sys.argv[2])))
def serve(s):
    with s:
        while True:
            d = s.recv(4096)
            if not d:
                return
            s.sendall(d)
def accept():
    while True:
        threading.Thread(target=serve, args=(t.accept()[0],), daemon=True).start()
threading.Thread(target=accept, daemon=True).start()
print("ready", flush=True)
while True:
    d, a = u.recvfrom(4096)
    u.sendto(d, a)
"""

# Connects from a fixed port, exchanges one line, reports, closes when told (a line on stdin).
CLIENT = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[3]))); s.settimeout(5)
try:
    s.connect((sys.argv[1], int(sys.argv[2]))); s.sendall(b"hello\n")
    print("echo " + s.recv(100).decode().strip(), flush=True)
except OSError as e:
    print("error " + type(e).__name__, flush=True)
sys.stdin.readline()
s.close()
print("closed", flush=True)
sys.stdin.readline()
"""


def _readline(p: subprocess.Popen, timeout: float = 10) -> str:
    ready, _, _ = select.select([p.stdout], [], [], timeout)
    return p.stdout.readline().strip() if ready else "<no answer>"


@contextlib.contextmanager
def _process(member: str, script: str, *args: str):
    p = subprocess.Popen(vlab.exec_argv(member, [sys.executable, "-u", "-c", script, *args]), stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        yield p
    finally:
        p.kill()
        p.wait(timeout=5)
        for f in (p.stdin, p.stdout):
            f.close()


@contextlib.contextmanager
def _echo(member: str):
    """An echo server in ``member`` on TCP 8080 and UDP 5353 (the Services' target ports)."""
    with _process(member, ECHO, str(TARGET), "5353") as p:
        if _readline(p) != "ready":
            raise RuntimeError(f"echo server in {member} did not start")
        yield p


@contextlib.contextmanager
def _drop_in(c, member: str, *rule: str):
    """An iptables filter rule in a pod's own namespace (the same pod kernel on both sides)."""
    r = c.exec(member, "iptables", "-w", "-I", *rule, "-j", "DROP")
    if r.returncode != 0:
        raise RuntimeError(f"iptables in {member}: {r.stderr.strip()}")
    try:
        yield
    finally:
        c.exec(member, "iptables", "-w", "-D", *rule, "-j", "DROP")


# --- ClusterIP -------------------------------------------------------------------------------------------

@scenario("hostgw", spec="items 26, 27, 28")
def svc_clusterip_tcp_local_endpoint(c):
    """A SYN to solo's VIP reaches a2 DNATed to :8080 from a1; a2's RST returns from VIP:80 and ends the entry."""
    sport = 41001
    seen = c.probe("a1", _syn(c, "a1", SOLO_VIP, sport, 80), watch=["a1", "a2"], window=3,
                   until=_has("a1", lambda fs: _tcp(fs, dport=sport)))
    return {"at_a2": [_seg(c, f) for f in _tcp(seen["a2"], sport=sport)],
            "back_at_a1": [_seg(c, f) for f in _tcp(seen["a1"], dport=sport)],
            "conntrack_node1": _ct(c, "node1", "tcp", "a1", sport)}


@scenario("hostgw", spec="items 26, 27, 28")
def svc_clusterip_tcp_remote_endpoint(c):
    """A SYN to remote's VIP is DNATed on node1 to b1:8080 on node2; b1's RST comes back from VIP:80."""
    sport = 41002
    seen = c.probe("a1", _syn(c, "a1", REMOTE_VIP, sport, 80), watch=["a1", "b1"], window=3,
                   until=_has("a1", lambda fs: _tcp(fs, dport=sport)))
    return {"at_b1": [_seg(c, f) for f in _tcp(seen["b1"], sport=sport)],
            "back_at_a1": [_seg(c, f) for f in _tcp(seen["a1"], dport=sport)],
            "conntrack_node1": _ct(c, "node1", "tcp", "a1", sport)}


@scenario("hostgw", spec="items 22, 26, 28")
def svc_clusterip_udp(c):
    """A datagram to solo's VIP:53 reaches a2:5353 from a1; the echo returns from VIP:53; conntrack sees both."""
    sport = 41003
    with _echo("a2"):
        seen = c.probe("a1", _dgram(c, "a1", SOLO_VIP, sport, 53), watch=["a1", "a2"], window=3,
                       until=_has("a1", lambda fs: _udp(fs, dport=sport)))
    return {"at_a2": [_seg(c, f) for f in _udp(seen["a2"], sport=sport)],
            "back_at_a1": [_seg(c, f) | {"payload": bytes(f[UDP].payload).decode(errors="replace")}
                           for f in _udp(seen["a1"], dport=sport)],
            "conntrack_node1": _ct(c, "node1", "udp", "a1", sport)}


@scenario("hostgw", spec="items 8, 31")
def svc_no_endpoints_rejects(c):
    """TCP and UDP to the endpoint-less VIP: ICMP port unreachable to the sender, nothing tracked."""
    out = {}
    for proto, sport, pkt in (("tcp", 41004, _syn(c, "a1", EMPTY_VIP, 41004, 80)),
                              ("udp", 41005, _dgram(c, "a1", EMPTY_VIP, 41005, 53))):
        seen = c.probe("a1", pkt, watch=["a1", "a2", "b1"], window=3, until=_has("a1", _errors))
        out[f"{proto}_error_at_a1"] = _error(c, seen["a1"])
        out[f"{proto}_delivered"] = len(_tcp(seen["a2"] + seen["b1"], sport=sport) +
                                        _udp(seen["a2"] + seen["b1"], sport=sport))
        out[f"{proto}_conntrack_node1"] = _ct(c, "node1", proto, "a1", sport)
        time.sleep(1.1)  # one ICMP rate-limit token (1/s per destination) back before the next error
    return out


@scenario("hostgw", spec="item 23")
def svc_related_icmp_translated_back(c):
    """An endpoint's port unreachable (nothing on 5353) reaches a1 from the VIP, quoting a1 -> VIP:53."""
    out = {}
    for where, vip, sport in (("local", SOLO_VIP, 41006), ("remote", REMOTE_VIP, 41007)):
        seen = c.probe("a1", _dgram(c, "a1", vip, sport, 53), watch=["a1"], window=3, until=_has("a1", _errors))
        out[f"{where}_error_at_a1"] = _error(c, seen["a1"])
        out[f"{where}_conntrack_node1"] = _ct(c, "node1", "udp", "a1", sport)
    return out


@scenario("hostgw", spec="items 7, 23, 26, 31")
def svc_ttl_1_to_clusterip(c):
    """TTL 1 to a VIP: expires when routed to an endpoint or a REJECT; DNATed onto the same bridge, it does not."""
    out = {}
    cases = (("remote_endpoint", "b1", SOLO_VIP, 41008), ("no_endpoint", "b1", EMPTY_VIP, 41009),
             ("same_bridge", "a1", SOLO_VIP, 41012))
    for name, src, vip, sport in cases:
        pkt = IP(src=c.ip(src), dst=vip, ttl=1) / TCP(sport=sport, dport=80, flags="S", seq=SEQ, window=8192)

        def done(s, src=src, p=sport):
            return _has(src, _errors)(s) or _has("a2", lambda fs: _tcp(fs, sport=p))(s)
        seen = c.probe(src, pkt, watch=[src, "a2"], window=2, until=done)
        out[f"{name}_error"] = _error(c, seen[src])
        out[f"{name}_at_a2"] = [_seg(c, f) for f in _tcp(seen["a2"], sport=sport)]
    return out


# --- conntrack states ------------------------------------------------------------------------------

@scenario("hostgw", spec="items 20, 21")
def svc_conntrack_syn_unanswered(c):
    """A SYN to a VIP that the endpoint drops: one entry, SYN_SENT and UNREPLIED, reply tuple from a2:8080."""
    sport = 41010
    with _drop_in(c, "a2", "INPUT", "-p", "tcp", "--sport", str(sport)):
        seen = c.probe("a1", _syn(c, "a1", SOLO_VIP, sport, 80), watch=["a2"], window=3,
                       until=_has("a2", lambda fs: _tcp(fs, sport=sport)))
        rows = _ct(c, "node1", "tcp", "a1", sport)
    return {"delivered": len(_tcp(seen["a2"], sport=sport)), "conntrack_node1": rows}


@scenario("hostgw", spec="items 20, 21, 22")
def svc_conntrack_tcp_lifecycle(c):
    """A real connection via solo's VIP: ESTABLISHED and ASSURED while open, TIME_WAIT after both FINs."""
    sport = 41011
    with _echo("a2"), _process("a1", CLIENT, SOLO_VIP, "80", str(sport)) as client:
        answer = _readline(client)
        open_rows = _ct_until(c, "node1", "tcp", "a1", sport, "ESTABLISHED")
        client.stdin.write("\n")
        client.stdin.flush()
        closed = _readline(client)
        closed_rows = _ct_until(c, "node1", "tcp", "a1", sport, "TIME_WAIT")
    return {"client": [answer, closed], "open": open_rows, "closed": closed_rows}


@scenario("hostgw", spec="items 21, 32")
def svc_invalid_tcp_dropped(c):
    """A SYN-ACK that opens nothing is INVALID: dropped in FORWARD (routed, via a VIP, bridged); a loose ACK passes."""
    cases = (("synack_routed", "b1", c.ip("b1"), 41070, "SA", None),
             ("ack_routed", "b1", c.ip("b1"), 41071, "A", None),
             ("synack_via_vip", "a2", SOLO_VIP, 41072, "SA", None),
             ("synack_bridged", "a2", c.ip("a2"), 41073, "SA", c.mac("a2")))
    out = {}
    for name, to, dst, sport, flags, mac in cases:
        seen = c.probe("a1", _syn(c, "a1", dst, sport, 9 if to == "b1" else 80, flags=flags, ack=5000),
                       watch=[to], window=1.5, dst_mac=mac, until=_has(to, lambda fs, p=sport: _tcp(fs, sport=p)))
        out[name] = [_seg(c, f) for f in _tcp(seen[to], sport=sport)]
    return out


# --- NodePort --------------------------------------------------------------------------------------

def _nodeport(c, node: str, sport: int) -> dict:
    """ext -> NODE:30080 (endpoint a2 on node1); ext has no socket for the SYN-ACK: its RST closes the entry."""
    with _echo("a2"):
        seen = c.probe("ext", _syn(c, "ext", c.ip(node), sport, NODE_PORT), watch=["ext", "a2"], window=3,
                       dst_mac=_node_mac(c, node), until=_has("ext", lambda fs: _tcp(fs, dport=sport)))
        rows = _ct_until(c, node, "tcp", "ext", sport, "CLOSE", masked={("reply", "dport")})
    return {"at_a2": [_seg(c, f, sport=sport) for f in _tcp(seen["a2"], dport=TARGET, flags="S")],
            "back_at_ext": [_seg(c, f) for f in _tcp(seen["ext"], dport=sport)],
            f"conntrack_{node}": rows}


@scenario("hostgw", spec="items 24, 26, 29")
def svc_nodeport_local_endpoint(c):
    """ext -> node1:30080: DNAT to a2:8080, masqueraded to node1's gateway address; SYN-ACK back from node1:30080."""
    return _nodeport(c, "node1", 41020)


@scenario("hostgw", spec="items 24, 26, 29")
def svc_nodeport_remote_endpoint(c):
    """ext -> node2:30080, endpoint a2 on node1: masqueraded to node2's address; SYN-ACK back via node2."""
    return _nodeport(c, "node2", 41021)


@scenario("hostgw", spec="item 28")
def svc_hairpin_masqueraded(c):
    """a2 -> solo's VIP comes back to a2 itself from the gateway address; its SYN-ACK returns to it from the VIP."""
    sport = 41030
    with _echo("a2"):
        seen = c.probe("a2", _syn(c, "a2", SOLO_VIP, sport, 80), watch=["a2"], window=3,
                       until=_has("a2", lambda fs: _tcp(fs, dport=sport)))
        rows = _ct_until(c, "node1", "tcp", "a2", sport, "CLOSE", masked={("reply", "dport")})
    return {"syn_at_a2": [_seg(c, f, sport=sport) for f in _tcp(seen["a2"], dport=TARGET, flags="S")],
            "reply_at_a2": [_seg(c, f) for f in _tcp(seen["a2"], dport=sport)],
            "conntrack_node1": rows}


# --- masquerade to the outside ------------------------------------------------------------------

@scenario("hostgw", spec="items 23, 24, 40")
def svc_pod_to_outside_masqueraded(c):
    """a1 -> ext leaves as node1's address; ext's port unreachable and echo reply are translated back to a1."""
    sport, ident = 41040, 41041
    seen = c.probe("a1", _dgram(c, "a1", c.ip("ext"), sport, 9), watch=["a1", "ext"], window=3,
                   until=_has("a1", _errors))
    ping = c.probe("a1", IP(src=c.ip("a1"), dst=c.ip("ext"), ttl=64) / ICMP(id=ident, seq=7) / Raw(b"out?"),
                   watch=["a1", "ext"], window=3,
                   until=_has("a1", lambda fs: [f for f in fs if ICMP in f and f[ICMP].type == 0]))
    return {"udp_at_ext": [_seg(c, f, sport=sport) for f in _udp(seen["ext"], dport=9)],
            "error_at_a1": _error(c, seen["a1"]),
            "echo_at_ext": [{"src": role_ip(c, f[IP].src), "ttl": f[IP].ttl, "id_kept": f[ICMP].id == ident,
                             "seq": f[ICMP].seq} for f in ping["ext"] if ICMP in f and f[ICMP].type == 8],
            "reply_at_a1": [{"src": role_ip(c, f[IP].src), "dst": role_ip(c, f[IP].dst), "ttl": f[IP].ttl,
                             "id": f[ICMP].id, "seq": f[ICMP].seq, "payload": bytes(f[ICMP].payload).decode()}
                            for f in ping["a1"] if ICMP in f and f[ICMP].type == 0]}


@scenario("hostgw", spec="item 24")
def svc_snat_port_clash(c):
    """a1 and a2 both from port 40000 to ext:9: the two masqueraded flows get distinct ports, each RST finds its pod."""
    ports, out = {}, {}
    for pod in ("a1", "a2"):
        seen = c.probe(pod, _syn(c, pod, c.ip("ext"), 40000, 9), watch=["ext", pod], window=3,
                       until=_has(pod, lambda fs: _tcp(fs, sport=9, dport=40000)))
        syns = _tcp(seen["ext"], dport=9, flags="S")
        ports[pod] = syns[0][TCP].sport if syns else None
        out[f"{pod}_at_ext"] = [_seg(c, f, sport=40000) for f in syns]
        out[f"{pod}_rst_back"] = [_seg(c, f) for f in _tcp(seen[pod], sport=9, dport=40000)]
    out["ports_differ"] = ports["a1"] != ports["a2"]
    return out


@scenario("hostgw", spec="item 40")
def svc_pod_to_pod_not_masqueraded(c):
    """Pod to pod, on the same node and across nodes, keeps the client's address and port."""
    out = {}
    for dst, sport in (("a2", 41050), ("b1", 41051)):
        seen = c.probe("a1", _dgram(c, "a1", c.ip(dst), sport, 9), watch=[dst], window=2,
                       until=_has(dst, lambda fs: _udp(fs, dport=9)))
        out[f"at_{dst}"] = [_seg(c, f) for f in _udp(seen[dst], dport=9)]
    return out


# --- affinity, ICMP to a VIP ---------------------------------------------------------------------

@scenario("hostgw", spec="item 30")
def svc_session_affinity_client_ip(c):
    """SYNs from a1 to sticky's VIP from ten source ports all land on one endpoint."""
    landed = []
    for sport in range(41060, 41070):
        seen = c.probe("a1", _syn(c, "a1", STICKY_VIP, sport, 80), watch=["a2", "b1"], window=3,
                       until=lambda s, p=sport: any(_has(ep, lambda fs: _tcp(fs, sport=p))(s) for ep in ("a2", "b1")))
        landed += [ep for ep in ("a2", "b1") if _tcp(seen[ep], sport=sport, dport=TARGET)]
    return {"delivered": len(landed), "distinct_endpoints": len(set(landed))}


@scenario("hostgw", spec="item 26")
def svc_icmp_echo_to_clusterip(c):
    """An echo request to a ClusterIP matches no Service rule: never DNATed to the endpoint, never answered."""
    seen = c.probe("a1", IP(src=c.ip("a1"), dst=SOLO_VIP, ttl=64) / ICMP(id=4242, seq=1) / Raw(b"vip?"),
                   watch=["a1", "a2", "underlay"], window=5, until=_has("a1", lambda fs: [f for f in fs if ICMP in f]))
    icmp_a1 = [f for f in seen["a1"] if ICMP in f]
    return {"echo_replies": len([f for f in icmp_a1 if f[ICMP].type == 0]),
            "error_at_a1": _error(c, seen["a1"]),
            "echo_at_a2": len([f for f in seen["a2"] if ICMP in f and f[ICMP].type == 8]),
            "arp_for_vip_on_underlay": bool([f for f in seen["underlay"] if ARP in f and f[ARP].pdst == SOLO_VIP]),
            "echo_on_underlay": len([f for f in seen["underlay"] if ICMP in f and f[ICMP].type == 8
                                     and f[IP].dst == SOLO_VIP])}
