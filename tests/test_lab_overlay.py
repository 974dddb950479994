"""Integration tests: the VXLAN overlay (backend vxlan) in a mixed cluster, as pods and the wire see it.

One lab serves the whole module (building it takes seconds):

    node1 (vswitch, 192.168.1.11): a1, a2 (a2: the MTU test raises its eth0 to 1500)
    node2 (vswitch, 192.168.1.12): b1
    node3 (kernel flannel.1, 192.168.1.13): c1, c2 (c2: likewise, with its veth on cni0)
    ext   (192.168.1.100): an outside host on the underlay

vswitch nodes run the overlay's userspace VTEP (UDP sockets on 8472), node3
the kernel's flannel.1 exactly as flannel builds it: node3 is the reference,
and every probe that makes sense goes through both. Run with:

    vswitch sandbox -- python -m pytest -q tests/test_lab_overlay.py

The underlay capture is decoded with tshark (`-d udp.port==8472,vxlan`) when it
is installed and with scapy's rdpcap in any case. The last test removes node3
from node1's peers and puts it back; it runs last and restores what it removed.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import subprocess
import sys
import time

import pytest
import yaml

from conftest import _down_if_up, pexec
from labutil import Capture, stop_tcpdump
from vswitch import lab as vlab
from vswitch.lab.lab import UNDERLAY, vtep_mac
from vswitch.sandbox import in_sandbox

pytestmark = pytest.mark.lab

VSWITCH = [sys.executable, "-m", "vswitch"]
NODE = {"node1": "192.168.1.11", "node2": "192.168.1.12", "node3": "192.168.1.13"}
CIDR = {"node1": "10.244.1.0/24", "node2": "10.244.2.0/24", "node3": "10.244.3.0/24"}
GW1, GW3 = "10.244.1.1", "10.244.3.1"
EXT = "192.168.1.100"
VXLAN_PORT, VNI = 8472, 1
SPORT_RANGE = (32768, 60999)  # ip_local_port_range, what udp_flow_src_port spreads flows over
FROM = re.compile(r"^From (\S+) icmp_seq=\d+ (.+)$", re.M)

TOPOLOGY = {
    "name": "overlay",
    "cluster": {"podCIDR": "10.244.0.0/16", "backend": "vxlan"},
    "nodes": [{"name": n, "address": f"{NODE[n]}/24", "podCIDR": CIDR[n], "dataplane": dp}
              for n, dp in (("node1", "vswitch"), ("node2", "vswitch"), ("node3", "kernel"))],
    "pods": [{"name": "a1", "node": "node1"}, {"name": "a2", "node": "node1"}, {"name": "b1", "node": "node2"},
             {"name": "c1", "node": "node3"}, {"name": "c2", "node": "node3"}],
    "externals": [{"name": "ext", "address": f"{EXT}/24"}],
}


@pytest.fixture(scope="module")
def ovl(tmp_path_factory):
    """The module's lab: its state (pods' IPs, nodes) as vswitch.lab.up returns it."""
    if not in_sandbox():  # the lab marker should have skipped us already; never touch the host
        pytest.fail("lab fixture used outside a vswitch sandbox", pytrace=False)
    if vlab.state() is not None:  # a previous test leaked its lab
        _down_if_up()
    path = tmp_path_factory.mktemp("overlay") / "topology.yaml"
    path.write_text(yaml.safe_dump(TOPOLOGY, sort_keys=False))
    try:
        yield vlab.up(str(path), log=lambda *a: None)
    finally:
        _down_if_up()


# --- helpers ------------------------------------------------------------------------------------------

def cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(VSWITCH + list(args), capture_output=True, text=True, timeout=timeout)


def show(table: str, node: str) -> list:
    res = cli("show", table, "--node", node, "-o", "json")
    assert res.returncode == 0, f"show {table} --node {node}: {res.stderr}"
    return json.loads(res.stdout)


def vxlan_row(node: str) -> dict:
    rows = [r for r in show("stats", node) if r["stage"] == "(vxlan)"]
    assert len(rows) == 1, f"{node}: no single (vxlan) row in show stats: {[r['stage'] for r in rows]}"
    return rows[0]


def ping(src: str, dst: str, *opts: str, count: int = 1, wait: float = 2) -> subprocess.CompletedProcess:
    return pexec(src, "ping", "-n", "-c", str(count), "-i", "0.2", "-W", str(wait), *opts, dst,
                 timeout=count * (wait + 1) + 10)


def received(res: subprocess.CompletedProcess) -> int:
    m = re.search(r"(\d+) received", res.stdout)
    return int(m.group(1)) if m else 0


def ip_of(st: dict, pod: str) -> str:
    return st["pods"][pod]["ip"]


STARTED: list = []  # programs from start(): whatever a failed test left running is killed after it


@pytest.fixture(autouse=True)
def _reap_started():
    yield
    while STARTED:
        proc = STARTED.pop()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def start(member: str, code: str, *args: object) -> subprocess.Popen:
    """``python3 -c code args`` in a lab member, returned once it printed its first line ("ready")."""
    proc = subprocess.Popen(vlab.exec_argv(member, [sys.executable, "-u", "-c", code, *map(str, args)]),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    STARTED.append(proc)
    ready, _, _ = select.select([proc.stdout], [], [], 10)
    line = proc.stdout.readline() if ready else ""
    if line != "ready\n":
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"program in {member} did not start ({line!r}): {err[-600:]}")
    return proc


def finish(proc: subprocess.Popen, timeout: float = 30) -> dict:
    """The one JSON line a program from ``start`` prints last."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"{proc.args[3]}: no result after {timeout:g} s: {out[-300:]}{err[-600:]}") from None
    assert proc.returncode == 0, f"{proc.args[3]} exited {proc.returncode}: {err[-600:]}"
    return json.loads(out.strip().splitlines()[-1])


def run_json(member: str, code: str, *args: object, timeout: float = 30) -> dict:
    res = pexec(member, sys.executable, "-c", code, *map(str, args), timeout=timeout)
    assert res.returncode == 0, f"program in {member} exited {res.returncode}: {res.stderr[-600:]}"
    return json.loads(res.stdout.strip().splitlines()[-1])


# --- pings -----------------------------------------------------------------------------------------

PAIRS = [("a1", "b1"), ("b1", "a1"),  # vswitch <-> vswitch
         ("a1", "c1"), ("c1", "a1"),  # vswitch <-> kernel
         ("b1", "c1"), ("c1", "b1")]


@pytest.mark.parametrize("src,dst", PAIRS, ids=[f"{s}-{d}" for s, d in PAIRS])
def test_ping_across_the_overlay(ovl, src, dst):
    res = ping(src, ip_of(ovl, dst), count=2)
    assert received(res) == 2, f"{src} -> {dst}: {res.stdout}{res.stderr}"
    # routed on the source node and on the destination node (flannel.1 is an L3 hop on both)
    assert re.findall(r"ttl=(\d+)", res.stdout) == ["62", "62"], res.stdout


# --- TCP and UDP, both ways -----------------------------------------------------------------------

TCP_SINK = r"""
import hashlib, json, socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(1)
s.settimeout(20)
print("ready", flush=True)
c, peer = s.accept()
c.settimeout(20)
h, n = hashlib.sha256(), 0
while True:
    d = c.recv(1 << 16)
    if not d:
        break
    h.update(d)
    n += len(d)
c.sendall(h.hexdigest().encode())
c.close()
print(json.dumps({"bytes": n, "sha256": h.hexdigest(), "peer": peer[0]}))
"""

TCP_SOURCE = r"""
import hashlib, json, os, socket, sys
data = os.urandom(int(sys.argv[3]))
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=20)
s.sendall(data)
s.shutdown(socket.SHUT_WR)
echo = b""
while True:
    d = s.recv(128)
    if not d:
        break
    echo += d
print(json.dumps({"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "echo": echo.decode()}))
"""

TCP_BYTES = 4 << 20


@pytest.mark.parametrize("src,dst", PAIRS[:4], ids=[f"{s}-{d}" for s, d in PAIRS[:4]])
def test_tcp_bytes_arrive_intact(ovl, src, dst):
    sender_node = ovl["pods"][src]["node"]
    vswitch_sender = ovl["nodes"][sender_node]["dataplane"] == "vswitch"
    before = vxlan_row(sender_node)["tx_bytes"] if vswitch_sender else 0
    sink = start(dst, TCP_SINK, ip_of(ovl, dst), 7001)
    sent = run_json(src, TCP_SOURCE, ip_of(ovl, dst), 7001, TCP_BYTES)
    got = finish(sink)
    assert got["peer"] == ip_of(ovl, src), got  # pod to pod, no NAT on the way
    assert got["bytes"] == sent["bytes"] == TCP_BYTES, (got, sent)
    assert got["sha256"] == sent["sha256"], f"{src} -> {dst}: the {TCP_BYTES} bytes arrived changed"
    assert sent["echo"] == sent["sha256"], sent  # and the receiver's answer made it back
    if vswitch_sender:  # the stream really left through the sending node's VTEP
        tx = vxlan_row(sender_node)["tx_bytes"] - before
        assert tx >= TCP_BYTES, f"{sender_node}'s VTEP sent {tx} bytes for a {TCP_BYTES}-byte stream"


UDP_SINK = r"""
import json, select, socket, struct, sys
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.bind((sys.argv[1], int(sys.argv[2])))
want = int(sys.argv[3])
print("ready", flush=True)
good, bad, peers = set(), 0, set()
while len(good) < want:
    if not select.select([u], [], [], 3)[0]:
        break
    d, addr = u.recvfrom(65535)
    peers.add(addr[0])
    seq, size = struct.unpack_from("!II", d)
    if len(d) == size and d[8:] == bytes([seq % 251]) * (size - 8):
        good.add(seq)
    else:
        bad += 1
print(json.dumps({"good": sorted(good), "bad": bad, "peers": sorted(peers)}))
"""

UDP_SOURCE = r"""
import socket, struct, sys, time
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sizes = [int(x) for x in sys.argv[4].split(",")]
for seq in range(int(sys.argv[3])):
    size = sizes[seq % len(sizes)]
    u.sendto(struct.pack("!II", seq, size) + bytes([seq % 251]) * (size - 8), (sys.argv[1], int(sys.argv[2])))
    time.sleep(0.002)
"""

UDP_COUNT = 120
# 1422 + 28 = 1450: exactly the pods' MTU; 3000 leaves the pod as two IP fragments (inner fragments
# cross the tunnel as they are: no ports in them for the source-port hash)
UDP_SIZES = (32, 700, 1422, 3000)


@pytest.mark.parametrize("src,dst", PAIRS[:4], ids=[f"{s}-{d}" for s, d in PAIRS[:4]])
def test_udp_datagrams_arrive_intact(ovl, src, dst):
    sink = start(dst, UDP_SINK, ip_of(ovl, dst), 7002, UDP_COUNT)
    res = pexec(src, sys.executable, "-c", UDP_SOURCE, ip_of(ovl, dst), "7002", str(UDP_COUNT),
                ",".join(map(str, UDP_SIZES)))
    assert res.returncode == 0, res.stderr[-600:]
    got = finish(sink)
    assert got["peers"] == [ip_of(ovl, src)], got["peers"]
    assert got["bad"] == 0, f"{src} -> {dst}: {got['bad']} datagrams arrived changed"
    missing = sorted(set(range(UDP_COUNT)) - set(got["good"]))
    assert not missing, (f"{src} -> {dst}: {len(missing)} of {UDP_COUNT} datagrams lost (sizes "
                         f"{sorted({UDP_SIZES[s % len(UDP_SIZES)] for s in missing})})")


# --- MTU -------------------------------------------------------------------------------------------

def mtu(member: str, dev: str = "eth0") -> int:
    return int(pexec(member, "cat", f"/sys/class/net/{dev}/mtu").stdout)


def raise_pod_mtu(st: dict, pod: str, value: int = 1500) -> None:
    """Set the pod's eth0 MTU; on a kernel node also its veth on cni0 (else the veth drops what
    exceeds its own MTU before the bridge sees it)."""
    assert pexec(pod, "ip", "link", "set", "eth0", "mtu", str(value)).returncode == 0
    node = st["pods"][pod]["node"]
    if st["nodes"][node]["dataplane"] == "kernel":
        peer = int(pexec(pod, "cat", "/sys/class/net/eth0/iflink").stdout)
        links = json.loads(pexec(node, "ip", "-j", "link", "show", "type", "veth").stdout)
        [host] = [link["ifname"] for link in links if link["ifindex"] == peer]
        assert pexec(node, "ip", "link", "set", host, "mtu", str(value)).returncode == 0
    assert mtu(pod) == value


def test_pods_get_mtu_1450(ovl):
    assert {p: mtu(p) for p in ovl["pods"]} == {p: 1450 for p in ovl["pods"]}
    assert mtu("node3", "flannel.1") == 1450


def test_df_packet_over_1450_gets_frag_needed_from_its_gateway(ovl):
    """vswitch and the kernel alike: a 1450-byte DF packet crosses, one byte more gets ICMP 3/4
    with next-hop MTU 1450 from the sending pod's own gateway."""
    for pod in ("a2", "c2"):
        raise_pod_mtu(ovl, pod)
    for src, dst, gw in (("a2", "b1", GW1), ("a2", "c1", GW1), ("c2", "a1", GW3)):
        res = ping(src, ip_of(ovl, dst), "-M", "do", "-s", "1422")  # 1422 + 28 = 1450
        assert received(res) == 1, f"{src} -> {dst}: a 1450-byte DF packet was not delivered: {res.stdout}"
        res = ping(src, ip_of(ovl, dst), "-M", "do", "-s", "1423")  # 1451
        assert received(res) == 0, res.stdout
        assert FROM.findall(res.stdout) == [(gw, "Frag needed and DF set (mtu = 1450)")], \
            f"{src} -> {dst}: {res.stdout}{res.stderr}"


# --- the wire: a capture on the underlay ------------------------------------------------------------

class UnderlayCapture:
    """tcpdump -w on the underlay bridge, confirmed listening before returning, bounded by count."""

    def __init__(self, path: str, bpf: str, count: int) -> None:
        self.path = path
        # --immediate-mode: packets reach tcpdump as they come, not when a ring block times out
        argv = ["tcpdump", "-i", "br0", "-n", "-U", "--immediate-mode", "-Z", "root", "-c", str(count), "-w", path,
                *bpf.split()]
        self.proc = subprocess.Popen(vlab.exec_argv(UNDERLAY, argv), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        err = b""
        deadline = time.monotonic() + 10
        while b"listening on" not in err:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stderr], [], [], left)[0]:
                self.stop()
                raise AssertionError(f"tcpdump on br0 not listening after 10 s: {err!r}")
            chunk = os.read(self.proc.stderr.fileno(), 4096)
            if not chunk:
                self.proc.wait(timeout=5)
                raise AssertionError(f"tcpdump on br0 exited ({self.proc.returncode}): {err!r}")
            err += chunk

    def stop(self) -> str:
        stop_tcpdump(self.proc)
        return self.path


TCP_ECHO_ONCE = r"""
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(1)
s.settimeout(10)
print("ready", flush=True)
c, _ = s.accept()
c.sendall(c.recv(100))
c.close()
print("{}")
"""

TCP_HELLO = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
s.sendall(b"hello over vxlan")
assert s.recv(100) == b"hello over vxlan"
s.close()
print("{}")
"""


@pytest.fixture(scope="module")
def underlay_pcap(ovl, tmp_path_factory):
    """A capture of tunnel traffic on br0: ICMP encapsulated by each of the three nodes, TCP by
    node1 (vswitch) and node3 (kernel). Returns the pcap's path."""
    cap = UnderlayCapture(str(tmp_path_factory.mktemp("underlay") / "vxlan.pcap"), f"udp port {VXLAN_PORT}", 200)
    try:
        for src, dst in (("a1", "b1"), ("a1", "c1"), ("c1", "b1")):  # the replies come from the other node
            assert received(ping(src, ip_of(ovl, dst))) == 1, f"{src} -> {dst}"
        for src, dst in (("a1", "c1"), ("c1", "b1")):
            srv = start(dst, TCP_ECHO_ONCE, ip_of(ovl, dst), 7003)
            run_json(src, TCP_HELLO, ip_of(ovl, dst), 7003)
            finish(srv)
        time.sleep(0.3)
    finally:
        path = cap.stop()
    return path


def tshark_records(path: str) -> list:
    fields = ["eth.src", "eth.dst", "ip.src", "ip.dst", "ip.ttl", "ip.flags.df", "ip.proto", "udp.srcport",
              "udp.dstport", "vxlan.vni", "vxlan.flags", "frame.protocols"]
    argv = ["tshark", "-r", path, "-d", f"udp.port=={VXLAN_PORT},vxlan", "-T", "fields", "-E", "occurrence=a",
            "-E", "aggregator=|", "-E", "separator=\t"]
    for f in fields:
        argv += ["-e", f]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr[-600:]
    out = []
    for line in res.stdout.splitlines():
        v = dict(zip(fields, (c.split("|") for c in line.split("\t"))))
        protos = v["frame.protocols"][0].split(":")
        # a field that occurs in the outer and the inner header is listed outer first
        out.append({"outer_src": v["ip.src"][0], "outer_dst": v["ip.dst"][0], "ttl": int(v["ip.ttl"][0]),
                    "df": v["ip.flags.df"][0] in ("1", "True"), "sport": int(v["udp.srcport"][0]),
                    "dport": int(v["udp.dstport"][0]), "vni": int(v["vxlan.vni"][0]) if v["vxlan.vni"][0] else None,
                    # Wireshark's vxlan.flags is 16 bits (GBP's too): the flags byte is the high one
                    "vxlan_flags": int(v["vxlan.flags"][0], 0) >> 8 if v["vxlan.flags"][0] else None,
                    "inner_src": v["ip.src"][-1] if len(v["ip.src"]) > 1 else None,
                    "inner_dst": v["ip.dst"][-1] if len(v["ip.dst"]) > 1 else None,
                    "inner_ttl": int(v["ip.ttl"][-1]) if len(v["ip.ttl"]) > 1 else None,
                    "inner_proto": protos[protos.index("vxlan") + 4] if "vxlan" in protos[:-4] else None,
                    "inner_eth": (v["eth.src"][-1], v["eth.dst"][-1]) if len(v["eth.src"]) > 1 else None})
    return out


def scapy_records(path: str) -> list:
    from scapy.layers.inet import ICMP, IP, TCP, UDP
    from scapy.layers.l2 import Ether
    from scapy.layers.vxlan import VXLAN
    from scapy.packet import bind_layers
    from scapy.utils import rdpcap
    bind_layers(UDP, VXLAN, dport=VXLAN_PORT)  # scapy binds 8472 already; say so anyway
    out = []
    for p in rdpcap(path):
        ip, udp = p[IP], p[UDP]
        vx = p[VXLAN] if VXLAN in p else None
        inner = vx.payload if vx is not None else None
        iip = inner[IP] if inner is not None and IP in inner else None
        proto = None
        if iip is not None:
            proto = "icmp" if ICMP in iip else "tcp" if TCP in iip else iip.sprintf("%proto%")
        out.append({"outer_src": ip.src, "outer_dst": ip.dst, "ttl": ip.ttl, "df": bool(ip.flags.DF),
                    "sport": udp.sport, "dport": udp.dport, "vni": vx.vni if vx is not None else None,
                    "vxlan_flags": int(vx.flags) if vx is not None else None,
                    "inner_src": iip.src if iip is not None else None,
                    "inner_dst": iip.dst if iip is not None else None,
                    "inner_ttl": iip.ttl if iip is not None else None, "inner_proto": proto,
                    "inner_eth": (inner[Ether].src, inner[Ether].dst) if inner is not None and Ether in inner
                    else None})
    return out


DECODERS = {"tshark": tshark_records, "scapy": scapy_records}


@pytest.mark.parametrize("decoder", list(DECODERS))
def test_underlay_capture_decodes_as_vxlan(ovl, underlay_pcap, decoder):
    if decoder == "tshark" and shutil.which("tshark") is None:
        pytest.skip("tshark is not installed (the scapy decoder checks the same capture)")
    recs = DECODERS[decoder](underlay_pcap)
    node_of = {ip_of(ovl, p): info["node"] for p, info in ovl["pods"].items()}
    by_addr = {v: k for k, v in NODE.items()}
    assert recs, "nothing captured on br0"
    seen = set()
    for r in recs:
        sender = by_addr.get(r["outer_src"])
        assert sender is not None and by_addr.get(r["outer_dst"]) not in (None, sender), r
        assert (r["dport"], r["vni"], r["vxlan_flags"]) == (VXLAN_PORT, VNI, 0x08), r
        assert SPORT_RANGE[0] <= r["sport"] <= SPORT_RANGE[1], f"{sender}: source port {r['sport']}: {r}"
        assert not r["df"], f"{sender} sent a tunnel packet with DF set: {r}"
        assert r["inner_proto"] in ("icmp", "tcp"), r
        # the inner packet is pod to pod, between the pods of exactly these two nodes, routed once
        assert node_of.get(r["inner_src"]) == sender and node_of.get(r["inner_dst"]) == by_addr[r["outer_dst"]], r
        assert r["inner_ttl"] == 63, r
        # inner Ethernet: the sender's VTEP MAC to the receiver's (flannel's permanent neighbour)
        assert r["inner_eth"] == (vtep_mac(sender), vtep_mac(by_addr[r["outer_dst"]])), r
        # vxlan_xmit_one: ip4_dst_hoplimit, the default TTL (vswitch's VTEP sockets sit in the host
        # stack, whose packets the router must originate, not forward)
        assert r["ttl"] == 64, f"{sender} ({ovl['nodes'][sender]['dataplane']}): outer TTL {r['ttl']}: {r}"
        seen.add((sender, r["inner_proto"]))
    want = {("node1", "icmp"), ("node2", "icmp"), ("node3", "icmp"), ("node1", "tcp"), ("node2", "tcp"),
            ("node3", "tcp")}
    assert want <= seen, f"missing in the capture: {sorted(want - seen)}"


# --- tunnel packets from an unknown sender -------------------------------------------------------------

SEND_UDP = r"""
import socket, sys
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.bind((sys.argv[1], 0))
u.sendto(bytes.fromhex(sys.argv[2]), (sys.argv[3], int(sys.argv[4])))
print("{}")
"""


def tunnel_probe(st: dict, seq: int) -> bytes:
    """A well-formed VXLAN payload: node3's VTEP MAC to node1's, an echo request from a node3 pod
    address to a1 (explicit MACs: nothing here ever ARPs)."""
    from scapy.layers.inet import ICMP, IP
    from scapy.layers.l2 import Ether
    from scapy.packet import Raw
    inner = (Ether(src=vtep_mac("node3"), dst=vtep_mac("node1")) /
             IP(src="10.244.3.200", dst=ip_of(st, "a1"), ttl=64) / ICMP(type=8, id=0x5A5A, seq=seq) /
             Raw(b"vxlan-unknown-peer-probe"))
    return bytes.fromhex("0800000000000100") + bytes(inner)  # flags I, VNI 1


def unknown_peer_drops() -> int:
    return vxlan_row("node1")["drops"].get("unknown-peer", 0)


def wait_for(fn, want, timeout: float = 3.0):
    deadline = time.monotonic() + timeout
    while True:
        v = fn()
        if v == want or time.monotonic() > deadline:
            return v
        time.sleep(0.1)


def test_tunnel_packet_from_unknown_peer_is_dropped_and_counted(ovl, tmp_path):
    before = unknown_peer_drops()
    rx_before = vxlan_row("node1")["packets"]
    cap = Capture("a1", str(tmp_path / "unknown.pcap"), "icmp and icmp[4:2] = 23130 and icmp[6:2] = 1", 1)
    run_json("ext", SEND_UDP, EXT, tunnel_probe(ovl, 1).hex(), NODE["node1"], VXLAN_PORT)
    assert wait_for(unknown_peer_drops, before + 1) == before + 1, "unknown-peer drop not counted on node1"
    assert cap.frames(timeout=1.0) == [], "the inner packet from an unknown peer reached a1"
    assert vxlan_row("node1")["packets"] == rx_before

    # control: the very same datagram from a known peer's address (node3's) is taken and delivered
    cap = Capture("a1", str(tmp_path / "known.pcap"), "icmp and icmp[4:2] = 23130 and icmp[6:2] = 2", 1)
    run_json("node3", SEND_UDP, NODE["node3"], tunnel_probe(ovl, 2).hex(), NODE["node1"], VXLAN_PORT)
    frames = cap.wait(timeout=5)
    assert len(frames) == 1 and b"vxlan-unknown-peer-probe" in frames[0]
    assert unknown_peer_drops() == before + 1


# --- VTEPs and peers at run time ------------------------------------------------------------------

def flannel_mac(node: str) -> str:
    return json.loads(pexec(node, "ip", "-j", "link", "show", "flannel.1").stdout)[0]["address"]


def has_route(node: str, cidr: str) -> bool:
    res = cli("show", "routes", "--node", node)
    assert res.returncode == 0, res.stderr
    return any(line.split()[:1] == [cidr] for line in res.stdout.splitlines())


def test_vteps_and_peer_del_add(ovl):
    rows = {r["name"]: r for r in show("vteps", "node1")}
    assert sorted(rows) == ["node2", "node3"], rows
    node3_mac = flannel_mac("node3")
    assert rows["node3"]["mac"].lower() == node3_mac.lower(), (rows["node3"], node3_mac)
    assert rows["node2"]["mac"].lower() == vxlan_row("node2")["mac"].lower(), rows["node2"]
    assert [(rows[n]["dst"], rows[n]["podCIDR"], rows[n]["vni"], rows[n]["port"]) for n in ("node2", "node3")] == \
        [(NODE[n], CIDR[n], VNI, VXLAN_PORT) for n in ("node2", "node3")]
    c1 = ip_of(ovl, "c1")
    assert received(ping("a1", c1)) == 1 and has_route("node1", CIDR["node3"])

    res = cli("peer", "del", "node3", "--node", "node1")
    assert res.returncode == 0, res.stderr
    try:
        assert not has_route("node1", CIDR["node3"]), "flannel route to node3 still there after peer del"
        assert sorted(r["name"] for r in show("vteps", "node1")) == ["node2"]
        res = ping("a1", c1)
        assert received(res) == 0
        assert FROM.findall(res.stdout) == [(GW1, "Destination Net Unreachable")], res.stdout + res.stderr
        # node3 still tunnels to node1, which no longer knows its address
        before = unknown_peer_drops()
        assert received(ping("c1", ip_of(ovl, "a1"), wait=1)) == 0
        assert unknown_peer_drops() > before
    finally:
        res = cli("peer", "add", "node3", "--address", NODE["node3"], "--pod-cidr", CIDR["node3"],
                  "--vtep-mac", node3_mac, "--node", "node1")
    assert res.returncode == 0, res.stderr
    assert has_route("node1", CIDR["node3"])
    assert {r["name"]: r["mac"].lower() for r in show("vteps", "node1")}["node3"] == node3_mac.lower()
    res = ping("a1", c1, count=2)
    assert received(res) == 2, res.stdout + res.stderr
    assert received(ping("c1", ip_of(ovl, "a1"))) == 1
