"""Integration tests: the vswitch router (backend host-gw) as pods and nodes see it.

Each test builds a small two-node lab inside the sandbox: node1 always runs
vswitch (pod a1), node2 runs vswitch or the kernel dataplane (pod b1). The
kernel node is the reference: wherever it makes sense the same probe is sent
through both dataplanes and both answers are checked. Run with:

    vswitch sandbox -- python -m pytest -q tests/test_lab_router.py

Traffic only ever goes to addresses inside the lab's namespaces (192.168.1.77
and 172.16.5.5 are never answered: nothing in the lab has them).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest

from conftest import pexec
from labutil import Capture
from vswitch import lab as vlab
from vswitch.lab.traffic import iperf3, rx_packets

pytestmark = pytest.mark.lab

VSWITCH = [sys.executable, "-m", "vswitch"]
NODE1, NODE2 = "192.168.1.11", "192.168.1.12"
GW1, GW2 = "10.244.1.1", "10.244.2.1"
UNROUTED = "172.16.5.5"    # outside every route of the lab
SILENT = "192.168.1.77"    # on the underlay subnet, owned by nobody: ARP never answered
FROM = re.compile(r"^From (\S+) icmp_seq=\d+ (.+)$", re.M)


def topology(name: str, peer: str = "vswitch", underlay_mtu: int | None = None) -> dict:
    cluster = {"podCIDR": "10.244.0.0/16", "backend": "host-gw"}
    if underlay_mtu is not None:
        cluster["underlayMTU"] = underlay_mtu
    return {
        "name": name,
        "cluster": cluster,
        "nodes": [
            {"name": "node1", "address": f"{NODE1}/24", "podCIDR": "10.244.1.0/24", "dataplane": "vswitch",
             "mtu": 1500},
            {"name": "node2", "address": f"{NODE2}/24", "podCIDR": "10.244.2.0/24", "dataplane": peer,
             "mtu": 1500},
        ],
        "pods": [{"name": "a1", "node": "node1"}, {"name": "b1", "node": "node2"}],
    }


def cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(VSWITCH + list(args), capture_output=True, text=True, timeout=timeout)


def ping(src: str, dst: str, *opts: str, count: int = 1, wait: float = 2) -> subprocess.CompletedProcess:
    return pexec(src, "ping", "-n", "-c", str(count), "-i", "0.2", "-W", str(wait), *opts, dst,
                 timeout=count * (wait + 1) + 10)


def received(res: subprocess.CompletedProcess) -> int:
    m = re.search(r"(\d+) received", res.stdout)
    return int(m.group(1)) if m else 0


def icmp_errors(res: subprocess.CompletedProcess) -> list:
    """[(source, message)] of every `From X icmp_seq=N message` line ping printed."""
    return FROM.findall(res.stdout)


def gateway_ip(st: dict, pod: str) -> str:
    return st["nodes"][st["pods"][pod]["node"]]["gateway"].split("/")[0]


def udp_probe(src: str, dst: str, port: int = 9, timeout: float = 2) -> str:
    """One UDP datagram from a lab member to dst:port on a connected socket; what came back.

    "refused" = an ICMP port unreachable arrived (ECONNREFUSED), "unreachable" = a
    host/net unreachable, "timeout" = silence.
    """
    code = (
        "import errno, socket\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        f"s.settimeout({timeout})\n"
        f"s.connect(({dst!r}, {port}))\n"
        "s.send(b'vswitch-router-test')\n"
        "try:\n"
        "    s.recv(64); print('data')\n"
        "except ConnectionRefusedError: print('refused')\n"
        "except socket.timeout: print('timeout')\n"
        "except OSError as e: print('unreachable' if e.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH)"
        " else f'error {e.errno}')\n"
    )
    res = pexec(src, sys.executable, "-c", code, timeout=timeout + 15)
    assert res.returncode == 0, res.stderr[-600:]
    return res.stdout.strip()


# --- ICMP capture ---------------------------------------------------------------------------------

@pytest.fixture
def capture(tmp_path):
    started = []

    def start(member: str, bpf: str, count: int = 1) -> Capture:
        c = Capture(member, str(tmp_path / f"{member}-{len(started)}.pcap"), bpf, count)
        started.append(c)
        return c

    yield start
    for c in started:
        c.stop()


def ip4(b: bytes) -> str:
    return ".".join(str(x) for x in b)


def icmp_fields(frame: bytes) -> dict:
    """The outer IPv4/ICMP header of a captured ICMP error and the header it quotes."""
    assert len(frame) >= 14 + 20 + 8 + 20, f"short ICMP error frame: {frame.hex()}"
    assert frame[12:14] == b"\x08\x00", f"not IPv4: {frame[:14].hex()}"
    ip = frame[14:]
    ihl = (ip[0] & 0xF) * 4
    icmp = ip[ihl:]
    q = icmp[8:]
    return {"src": ip4(ip[12:16]), "dst": ip4(ip[16:20]), "tos": ip[1], "ttl": ip[8],
            "df": bool(ip[6] & 0x40), "length": (ip[2] << 8) | ip[3], "type": icmp[0], "code": icmp[1],
            "mtu": (icmp[6] << 8) | icmp[7], "quoted_src": ip4(q[12:16]), "quoted_dst": ip4(q[16:20]),
            "quoted_ttl": q[8], "quoted_proto": q[9]}


# --- connectivity across nodes ------------------------------------------------------------------

@pytest.mark.parametrize("peer", ["vswitch", "kernel"])
def test_cross_node_ping_both_directions(make_lab, peer):
    st = make_lab(topology(f"xping-{peer[0]}", peer))
    assert st["backend"] == "host-gw"
    for src, dst in (("a1", "b1"), ("b1", "a1")):
        res = ping(src, st["pods"][dst]["ip"], count=2)
        assert received(res) == 2, f"{src} -> {dst} ({peer} peer): {res.stdout}{res.stderr}"
        # two routers on the way (source node, destination node): routed, not bridged
        assert re.findall(r"ttl=(\d+)", res.stdout) == ["62", "62"], res.stdout


@pytest.mark.parametrize("peer", ["vswitch", "kernel"])
def test_cross_node_tcp_and_udp(make_lab, peer):
    st = make_lab(topology(f"xiperf-{peer[0]}", peer))
    a1, b1 = st["pods"]["a1"]["ip"], st["pods"]["b1"]["ip"]

    tcp = iperf3("b1", "a1", b1, 2)
    assert tcp["end"]["sum_received"]["bits_per_second"] > 0
    assert tcp["end"]["sum_received"]["bytes"] > 1_000_000, tcp["end"]["sum_received"]

    before = rx_packets("a1")
    udp = iperf3("a1", "b1", a1, 2, ["-u", "-b", "50M"])
    got = udp["end"]["sum_received"]
    sent = udp["end"]["sum_sent"]["packets"]
    assert sent > 1000, udp["end"]["sum_sent"]
    assert got["packets"] > 0 and got["packets"] - got["lost_packets"] > 0, got
    assert got["lost_percent"] < 5, f"UDP loss {got['lost_percent']:.1f}% ({peer} -> vswitch): {got}"
    # and the datagrams really crossed a1's eth0 (not some local shortcut)
    assert rx_packets("a1") - before >= got["packets"] - got["lost_packets"]


# --- ICMP errors from the gateway -----------------------------------------------------------------

def test_ttl_1_gets_time_exceeded_from_own_gateway(make_lab, capture):
    """Both dataplanes: ICMP 11/0 from the pod's own gateway, quoting TTL 1 as received."""
    st = make_lab(topology("ttl", "kernel"))
    caps = {p: capture(p, "icmp and icmp[0] = 11") for p in ("a1", "b1")}
    seen = {}
    for src, dst, gw in (("a1", "b1", GW1), ("b1", "a1", GW2)):
        res = ping(src, st["pods"][dst]["ip"], "-t", "1")
        assert received(res) == 0, res.stdout
        assert icmp_errors(res) == [(gw, "Time to live exceeded")], f"{src}: {res.stdout}"
        frames = caps[src].frames()
        assert len(frames) == 1, f"{src} captured {len(frames)} time-exceeded frames"
        f = icmp_fields(frames[0])
        assert (f["src"], f["dst"], f["type"], f["code"]) == (gw, st["pods"][src]["ip"], 11, 0), f
        assert (f["quoted_src"], f["quoted_dst"], f["quoted_ttl"]) == \
               (st["pods"][src]["ip"], st["pods"][dst]["ip"], 1), f
        seen[src] = f
    # the vswitch router's error looks like the kernel's (addresses aside)
    strip = ("src", "dst", "quoted_src", "quoted_dst")
    vsw = {k: v for k, v in seen["a1"].items() if k not in strip}
    ker = {k: v for k, v in seen["b1"].items() if k not in strip}
    assert vsw == ker, f"vswitch {vsw} != kernel {ker}"


def test_unrouted_destination_gets_net_unreachable(make_lab):
    make_lab(topology("netunr", "kernel"))
    for src, gw in (("a1", GW1), ("b1", GW2)):
        res = ping(src, UNROUTED)
        assert received(res) == 0
        assert icmp_errors(res) == [(gw, "Destination Net Unreachable")], f"{src}: {res.stdout}{res.stderr}"


def test_df_packet_over_underlay_mtu_gets_frag_needed(make_lab):
    st = make_lab(topology("pmtu", "kernel", underlay_mtu=1400))
    assert pexec("a1", "cat", "/sys/class/net/eth0/mtu").stdout.strip() == "1500"
    for src, dst, gw in (("a1", "b1", GW1), ("b1", "a1", GW2)):
        ip = st["pods"][dst]["ip"]
        # 1372 + 28 = 1400 bytes: exactly the underlay MTU, passes
        res = ping(src, ip, "-M", "do", "-s", "1372")
        assert received(res) == 1, f"{src}: a 1400-byte DF packet was not delivered: {res.stdout}"
        # 1472 + 28 = 1500 bytes: one too many for the underlay
        res = ping(src, ip, "-M", "do", "-s", "1472")
        assert received(res) == 0
        assert icmp_errors(res) == [(gw, "Frag needed and DF set (mtu = 1400)")], f"{src}: {res.stdout}"


def test_unanswered_arp_on_underlay_gets_host_unreachable_after_3s(make_lab):
    make_lab(topology("hostunr", "kernel"))
    procs = {}
    for src in ("a1", "b1"):  # both at once: each waits ~3 s for its ARP to fail
        procs[src] = (time.monotonic(), subprocess.Popen(
            vlab.exec_argv(src, ["ping", "-n", "-c", "1", "-W", "8", SILENT]),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    out = {}
    for src, (t0, p) in procs.items():
        try:
            stdout, _ = p.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()
            stdout, _ = p.communicate()
        out[src] = (time.monotonic() - t0, stdout)
    # both pings leave their node masqueraded (flannel's ip-masq: pod -> outside the cluster CIDR),
    # so each error comes back RELATED, from the node address the kernel picks
    for src, gw in (("a1", NODE1), ("b1", NODE2)):
        took, stdout = out[src]
        assert FROM.findall(stdout) == [(gw, "Destination Host Unreachable")], f"{src}: {stdout}"
        assert 2.5 <= took <= 5.0, f"{src}: host unreachable after {took:.1f} s (kernel: 3 ARP probes, 1 s apart)"
    rows = json.loads(cli("show", "neigh", "--node", "node1", "-o", "json").stdout)
    silent = [r for r in rows if r["ip"] == SILENT]
    assert [(r["dev"], r["state"], r["lladdr"]) for r in silent] == [("uplink", "FAILED", None)], silent


# --- the node's own host stack ---------------------------------------------------------------------

def test_host_stack_and_pods_reach_each_other(make_lab):
    st = make_lab(topology("hoststack", "vswitch"))
    a1 = st["pods"]["a1"]["ip"]
    res = ping("node1", a1, count=2)
    assert received(res) == 2, res.stdout + res.stderr
    res = ping("a1", NODE1, count=2)
    assert received(res) == 2, res.stdout + res.stderr
    tcp = iperf3("a1", "node1", a1, 1)  # server in the pod, client in node1's host stack
    assert tcp["end"]["sum_received"]["bits_per_second"] > 0
    # from the gateway address, as a kernel node's `PODCIDR dev cni0 src GATEWAY` route picks it
    assert tcp["start"]["connected"][0]["local_host"] == GW1, tcp["start"]["connected"]


def test_host_stack_sources_pod_traffic_from_the_gateway_like_a_kernel_node(make_lab):
    st = make_lab(topology("hostsrc", "kernel"))

    def src(node: str, pod: str) -> str:
        res = pexec(node, "ip", "-o", "route", "get", st["pods"][pod]["ip"])
        assert res.returncode == 0, res.stderr
        return res.stdout.split(" src ")[1].split()[0]
    assert src("node2", "b1") == GW2  # kernel reference
    assert src("node1", "a1") == GW1


def test_service_cidr_is_routed_to_the_underlay_like_a_kernel_node(make_lab):
    make_lab(topology("svcroute", "kernel"))
    res = cli("show", "routes", "--node", "node1")
    assert "10.96.0.0/12 dev uplink scope link src 192.168.1.11" in \
        [line.strip() for line in res.stdout.splitlines()], res.stdout
    # an address no Service has: routed to the underlay, unanswered ARP, host unreachable (kube-proxy's
    # node masquerades pod traffic leaving the cluster, so the error comes from the node address)
    assert icmp_errors(ping("b1", "10.96.0.99", wait=5)) == [(NODE2, "Destination Host Unreachable")]
    assert icmp_errors(ping("a1", "10.96.0.99", wait=5)) == [(NODE1, "Destination Host Unreachable")]


# --- show routes / neigh -----------------------------------------------------------------------------

def test_show_routes_and_neigh_after_cross_node_traffic(make_lab):
    st = make_lab(topology("tables", "vswitch"))
    res = cli("show", "routes", "--node", "node1")
    assert res.returncode == 0, res.stderr
    lines = [line.strip() for line in res.stdout.splitlines()]
    assert "10.244.2.0/24 via 192.168.1.12 dev uplink" in lines, res.stdout
    assert not any(line.startswith("10.244.1.0/24 via") for line in lines), res.stdout

    assert received(ping("a1", st["pods"]["b1"]["ip"])) == 1
    res = cli("show", "neigh", "--node", "node1", "-o", "json")
    assert res.returncode == 0, res.stderr
    rows = [r for r in json.loads(res.stdout) if r["ip"] == NODE2]
    assert [r["dev"] for r in rows] == ["uplink"], rows
    ifaces = json.loads(cli("show", "interfaces", "--node", "node2", "-o", "json").stdout)
    node2_mac = {i["name"]: i["mac"] for i in ifaces}["uplink"]
    assert rows[0]["lladdr"] and rows[0]["lladdr"].lower() == node2_mac.lower(), (rows, node2_mac)


# --- known bugs (kernel node as the reference) -----------------------------------------------------

def test_suppressed_icmp_error_is_counted_and_stats_work(make_lab):
    make_lab(topology("stats", "vswitch"))
    res = cli("show", "stats", "--node", "node1")
    assert res.returncode == 0, f"show stats failed: {res.stderr}"
    # An ICMP error to an unrouted address: the router must not answer it with another error,
    # and must count why (drop reason "icmp-error" of ip4-icmp-error).
    code = ("from scapy.all import IP, ICMP, UDP, send\n"
            f"send(IP(dst={UNROUTED!r})/ICMP(type=3, code=3)/IP(src={UNROUTED!r}, dst='10.244.1.2')"
            "/UDP(sport=1, dport=2), verbose=False)\n")
    assert pexec("a1", sys.executable, "-c", code).returncode == 0
    deadline = time.monotonic() + 3
    counts = {}
    while time.monotonic() < deadline:
        rows = json.loads(cli("show", "drops", "--node", "node1", "-o", "json").stdout)
        counts = {(r["stage"], str(r["reason"])): r["count"] for r in rows}
        if counts.get(("ip4-icmp-error", "icmp-error")):
            break
        time.sleep(0.1)
    assert counts.get(("ip4-icmp-error", "icmp-error")) == 1, {k: v for k, v in counts.items() if v}


def test_first_datagram_to_node_address_reaches_host_stack(make_lab):
    make_lab(topology("firsthost", "kernel"))
    # kernel reference: the node's stack answers a closed UDP port with port unreachable
    assert udp_probe("b1", NODE2) == "refused"
    # the very first packet for node1's host stack (nothing has talked to it yet)
    assert udp_probe("a1", NODE1) == "refused"


def test_host_stack_pings_its_pod_gateway(make_lab):
    make_lab(topology("hostgw", "kernel"))
    assert received(ping("node2", GW2)) == 1  # kernel reference: cni0's address
    res = ping("node1", GW1)
    assert received(res) == 1, res.stdout


def test_host_stack_learns_path_mtu_to_remote_pod(make_lab):
    st = make_lab(topology("hostpmtu", "kernel", underlay_mtu=1400))
    mtu_note = re.compile(r"mtu ?= ?1400")
    res = ping("node2", st["pods"]["a1"]["ip"], "-M", "do", "-s", "1472", count=2)
    assert mtu_note.search(res.stdout + res.stderr), res.stdout + res.stderr  # kernel: local error, mtu=1400
    res = ping("node1", st["pods"]["b1"]["ip"], "-M", "do", "-s", "1472", count=2)
    assert mtu_note.search(res.stdout + res.stderr), \
        f"node1's host stack never learned the 1400-byte path MTU: {res.stdout}{res.stderr}"


def test_closed_port_on_pod_gateway_is_refused(make_lab):
    make_lab(topology("gwport", "kernel"))
    assert received(ping("node1", "10.244.1.2")) == 1  # the host stack has talked to the router before
    assert udp_probe("b1", GW2) == "refused"  # kernel reference
    assert udp_probe("a1", GW1) == "refused"
