"""Integration tests: the vswitch bridge as pods see it, in a netns lab.

Each test builds its own small lab (one node, a few pods) inside the
sandbox and tears it down. Run with:

    vswitch sandbox -- python -m pytest -q tests/test_lab_bridge.py

Frames are sent with scapy inside a pod's namespace and captured with
tcpdump in the others. "Did not arrive" is never proved by sleeping: a
sentinel frame that must arrive *after* the one under test (same ingress
port, one single-threaded daemon, one TAP queue per egress port, so order is
kept) closes each capture.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import os
import stat
import subprocess
import sys
import uuid

import pytest
import yaml

from labutil import Capture
from vswitch.lab.traffic import iperf3
from conftest import pexec
from vswitch import control
from vswitch import lab as vlab

pytestmark = pytest.mark.lab

ETHERTYPE = 0x88B5  # IEEE local experimental: no pod's stack reacts to it
POD_CIDR = "10.244.1.0/24"
VSWITCH = [sys.executable, "-m", "vswitch"]


def topology(name: str, pods, dataplane: str = "vswitch") -> dict:
    return {
        "name": name,
        "cluster": {"podCIDR": "10.244.0.0/16", "serviceCIDR": "10.96.0.0/12"},
        "nodes": [{"name": "node1", "address": "192.168.1.11/24", "podCIDR": POD_CIDR, "dataplane": dataplane}],
        "pods": [{"name": p, "node": "node1"} for p in pods],
    }


def cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(VSWITCH + list(args), capture_output=True, text=True, timeout=timeout)


def ping(src: str, dst_ip: str, count: int = 2) -> int:
    """Replies received by ``ping -c count -W 2`` from lab member src."""
    res = pexec(src, "ping", "-c", str(count), "-i", "0.2", "-W", "2", dst_ip, timeout=count * 3 + 5)
    for line in res.stdout.splitlines():
        if "received" in line:
            return int(line.split(",")[1].split()[0])
    return 0


def unique_mac() -> str:
    """A locally administered unicast MAC nobody in the lab has ever used."""
    return "02:" + ":".join(f"{b:02x}" for b in uuid.uuid4().bytes[:5])


def payload(tag: str) -> bytes:
    body = f"vswitch-test {tag} {uuid.uuid4().hex}".encode()
    return body.ljust(46, b".")  # at least the 46-byte Ethernet minimum


def send_frames(pod: str, frames) -> None:
    """sendp (src MAC, dst MAC, payload) frames, in order, out of the pod's eth0."""
    lines = ["from scapy.layers.l2 import Ether", "from scapy.packet import Raw",
             "from scapy.sendrecv import sendp",
             "sendp([" + ", ".join(f"Ether(src={s!r}, dst={d!r}, type={ETHERTYPE})/Raw(load={p!r})"
                                   for s, d, p in frames) + "], iface='eth0', verbose=False)"]
    res = pexec(pod, sys.executable, "-c", "\n".join(lines), timeout=30)
    assert res.returncode == 0, f"sendp in {pod} failed: {res.stderr[-800:]}"


@pytest.fixture
def captures():
    """Every Capture started through ``start`` is stopped at teardown."""
    started = []

    def start(*a, **kw) -> Capture:
        c = Capture(*a, **kw)
        started.append(c)
        return c

    yield start
    for c in started:
        c.stop()


def eth(frame: bytes):
    return frame[0:6].hex(":"), frame[6:12].hex(":"), int.from_bytes(frame[12:14], "big"), frame[14:]


def list_links() -> set:
    out = subprocess.run(["ip", "-j", "link", "show"], capture_output=True, text=True, check=True).stdout
    return {link["ifname"] for link in json.loads(out)}


# --- connectivity -------------------------------------------------------------------------------

def test_three_pods_ping_each_other(make_lab):
    st = make_lab(topology("ping3", ["pa", "pb", "pc"]))
    failed = []
    for a, b in itertools.permutations(st["pods"], 2):
        got = ping(a, st["pods"][b]["ip"])
        if got != 2:
            failed.append(f"{a} -> {b}: {got}/2")
    assert not failed, f"pings lost through the vswitch bridge: {failed}"


def test_kernel_dataplane_pods_ping_each_other(make_lab):
    """The reference dataplane (cni0 Linux bridge, veth pods) in the same kind of lab."""
    st = make_lab(topology("kern", ["ka", "kb", "kc"], dataplane="kernel"))
    assert st["nodes"]["node1"]["dataplane"] == "kernel"
    assert "cni0" in pexec("node1", "ip", "-o", "link", "show", "type", "bridge").stdout
    failed = []
    for a, b in itertools.permutations(st["pods"], 2):
        got = ping(a, st["pods"][b]["ip"])
        if got != 2:
            failed.append(f"{a} -> {b}: {got}/2")
    assert not failed, f"pings lost through the kernel bridge: {failed}"


# --- flooding and learning ------------------------------------------------------------------------

def test_unknown_unicast_floods_to_others_not_back_to_sender(make_lab, captures, tmp_path):
    st = make_lab(topology("flood", ["fa", "fb", "fc"]))
    mac = {p: st["pods"][p]["mac"] for p in st["pods"]}
    unknown = unique_mac()
    flt = f"ether proto {ETHERTYPE:#06x}"
    cap_b = captures("fb", str(tmp_path / "fb.pcap"), flt, 1)
    cap_c = captures("fc", str(tmp_path / "fc.pcap"), flt, 1)
    cap_a = captures("fa", str(tmp_path / "fa.pcap"), flt, 1, inbound_only=True)

    flooded = payload("flood")
    send_frames("fa", [(mac["fa"], unknown, flooded)])
    for pod, cap in (("fb", cap_b), ("fc", cap_c)):
        frames = cap.wait()
        assert len(frames) == 1
        assert eth(frames[0]) == (unknown, mac["fa"], ETHERTYPE, flooded), f"{pod} got {frames[0].hex()}"

    # Every flooded copy is written before the daemon reads another frame, so when B's
    # sentinel (to A's MAC, learned just now) reaches A, a copy to A would already be there.
    sentinel = payload("sentinel")
    send_frames("fb", [(mac["fb"], mac["fa"], sentinel)])
    frames = cap_a.wait()
    assert [eth(f)[3] for f in frames] == [sentinel], \
        "the sender received something before the sentinel: the flood went back to its ingress port"


def test_learned_unicast_reaches_only_its_port(make_lab, captures, tmp_path):
    st = make_lab(topology("ucast", ["ua", "ub", "uc"]))
    mac = {p: st["pods"][p]["mac"] for p in st["pods"]}
    assert ping("ua", st["pods"]["ub"]["ip"], count=1) == 1  # ARP + ICMP: both MACs learned

    res = cli("show", "fdb", "--node", "node1", "-o", "json")
    assert res.returncode == 0, res.stderr
    fdb = {r["mac"].lower(): r for r in json.loads(res.stdout)}
    for pod in ("ua", "ub"):
        assert mac[pod].lower() in fdb, f"{pod}'s MAC {mac[pod]} not learned: {res.stdout}"
        row = fdb[mac[pod].lower()]
        assert (row["port"], row["static"]) == (pod, False)

    flt = f"ether proto {ETHERTYPE:#06x}"
    cap_b = captures("ub", str(tmp_path / "ub.pcap"), flt, 1)
    cap_c = captures("uc", str(tmp_path / "uc.pcap"), flt, 1)
    unicast, sentinel = payload("unicast"), payload("bcast-sentinel")
    # In order from one port: if the unicast were flooded, C would see it before the broadcast.
    send_frames("ua", [(mac["ua"], mac["ub"], unicast), (mac["ua"], "ff:ff:ff:ff:ff:ff", sentinel)])
    got_b = cap_b.wait()
    assert eth(got_b[0]) == (mac["ub"], mac["ua"], ETHERTYPE, unicast)
    got_c = cap_c.wait()
    assert [eth(f)[3] for f in got_c] == [sentinel], "pod C saw unicast meant for B (flooded after learning)"


# --- throughput: super-frames -----------------------------------------------------------------------

def test_iperf3_tcp_passes_as_super_frames(make_lab):
    st = make_lab(topology("iperf", ["srv", "cli"]))
    out = iperf3("srv", "cli", st["pods"]["srv"]["ip"], 2)  # raises on iperf3's JSON error
    assert out["end"]["sum_received"]["bits_per_second"] > 0

    ports = {p["name"]: p for p in control.request(vlab.socket_for("node1"), "show", table="ports")}
    rx = ports["cli"]
    assert rx["rx_packets"] > 0
    avg = rx["rx_bytes"] / rx["rx_packets"]
    assert avg > 3000, (f"client port averaged {avg:.0f} bytes per received frame: TCP crossed as MTU-sized "
                        f"frames, not super-frames (offloads {rx['offloads']})")


# --- configuration errors -----------------------------------------------------------------------

@pytest.mark.parametrize("bad, field", [
    ({"mtu": "big"}, "ports[1].mtu"),
    ({"type": "veth"}, "ports[1].type"),
])
def test_invalid_node_config_rejected_before_creating_anything(tmp_path, bad, field):
    sock = str(tmp_path / "bad.sock")
    cfg = {"name": "badnode",
           "ports": [{"name": "vtgood0", "type": "tap"},  # valid: a lazy check would create it first
                     dict({"name": "vtbad1", "type": "tap"}, **bad)],
           "control": {"socket": sock}}
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump(cfg))
    before = list_links()
    res = cli("run", "--config", str(path), timeout=20)
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert field in res.stderr, res.stderr
    assert "invalid config" in res.stderr
    after = list_links()
    assert after == before, f"a rejected config created interfaces: {after - before}"
    assert not os.path.exists(sock)


def test_node_cpus_pin_its_daemon(make_lab):
    """A topology node's cpus: reach its daemon's config, which pins itself at start."""
    cpu = max(os.sched_getaffinity(0))
    topo = topology("pinned", ["pa"])
    topo["nodes"][0]["cpus"] = [cpu]
    st = make_lab(topo)
    assert os.sched_getaffinity(st["nodes"]["node1"]["pid"]) == {cpu}
    assert ping("pa", str(ipaddress.ip_network(POD_CIDR).network_address + 1)) == 2  # and it forwards


@pytest.mark.parametrize("node, words", [
    ({"dataplane": "kernel", "cpus": [0]}, "only a vswitch node"),
    ({"cpus": "0-1"}, "non-empty list"),
])
def test_bad_node_cpus_name_the_field(node, words):
    from vswitch.config import ConfigError
    from vswitch.lab.topology import parse
    topo = topology("badcpus", ["pa"])
    topo["nodes"][0].update(node)
    with pytest.raises(ConfigError) as ei:
        parse(topo)
    assert ei.value.path == "nodes[0].cpus" and words in str(ei.value)


def test_a_cpu_the_machine_lacks_stops_the_daemon_before_it_creates_anything(tmp_path):
    missing = max(os.sched_getaffinity(0)) + 1
    cfg = {"name": "pinned", "ports": [{"name": "vtpin0", "type": "tap"}], "cpus": [missing],
           "control": {"socket": str(tmp_path / "pin.sock")}}
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump(cfg))
    before = list_links()
    res = cli("run", "--config", str(path), timeout=20)
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert f"cpus: CPU {missing} is not available to this process" in res.stderr, res.stderr
    assert list_links() == before


def test_invalid_topology_rejected_and_leaves_no_lab(tmp_path):
    topo = topology("badlab", ["ok1"])
    topo["pods"].append({"name": "lost", "node": "node9"})
    path = tmp_path / "bad-lab.yaml"
    path.write_text(yaml.safe_dump(topo))
    assert vlab.state() is None
    res = cli("lab", "up", str(path))
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    assert "pods[1].node" in res.stderr and "node9" in res.stderr, res.stderr
    assert vlab.state() is None
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert netns.strip() == "", f"namespaces left behind: {netns}"


# --- lab CLI and control socket -----------------------------------------------------------------

def test_lab_status_lists_pods_in_node_podcidr_and_exec_unknown_fails(make_lab):
    st = make_lab(topology("status", ["sa", "sb"]))
    res = cli("lab", "status", "-o", "json")
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)
    assert rows["name"] == "status"
    node = {n["name"]: n for n in rows["nodes"]}["node1"]
    assert (node["dataplane"], node["podCIDR"], node["state"]) == ("vswitch", POD_CIDR, "running")
    pods = {p["name"]: p for p in rows["pods"]}
    assert set(pods) == {"sa", "sb"}
    cidr = ipaddress.ip_network(POD_CIDR)
    gateway = cidr.network_address + 1
    ips = set()
    for name, p in pods.items():
        ip = ipaddress.ip_address(p["ip"])
        assert ip in cidr and ip != gateway, f"{name}: {ip} not a pod address of {cidr}"
        assert p["node"] == "node1"
        assert p["mac"] == st["pods"][name]["mac"]
        # and the pod really has it
        assert f"inet {ip}/24" in pexec(name, "ip", "-4", "addr", "show", "dev", "eth0").stdout
        ips.add(ip)
    assert len(ips) == 2

    res = cli("lab", "exec", "nosuchpod", "--", "true")
    assert res.returncode != 0
    assert "nosuchpod" in res.stderr and "sa" in res.stderr, res.stderr


def test_control_socket_is_mode_0600(make_lab):
    st = make_lab(topology("sockmode", ["ma"]))
    path = st["nodes"]["node1"]["socket"]
    mode = os.stat(path).st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600, oct(stat.S_IMODE(mode))
    assert control.request(path, "ping")["node"] == "node1"


# --- ports at runtime -----------------------------------------------------------------------------

def test_port_added_at_runtime_pings_pod_and_is_removed(make_lab):
    st = make_lab(topology("hotplug", ["ha"]))
    ns, addr = "late", "10.244.1.200"
    assert addr not in {p["ip"] for p in st["pods"].values()}
    subprocess.run(["ip", "netns", "add", ns], check=True)  # inside the sandbox (lab marker)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        res = cli("port", "add", ns, f"netns={ns}", "netns_ifname=eth0", "--node", "node1", "-o", "json")
        assert res.returncode == 0, res.stderr
        added = json.loads(res.stdout)[0]
        assert (added["name"], added["netns"], added["netns_ifname"]) == (ns, ns, "eth0")
        subprocess.run(["ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0"], check=True)
        got = subprocess.run(["ip", "netns", "exec", ns, "ping", "-c", "2", "-i", "0.2", "-W", "2",
                              st["pods"]["ha"]["ip"]], capture_output=True, text=True, timeout=15)
        assert got.returncode == 0 and " 2 received" in got.stdout, got.stdout + got.stderr
        sock = vlab.socket_for("node1")
        assert ns in {p["name"] for p in control.request(sock, "show", table="ports")}

        res = cli("port", "del", ns, "--node", "node1")
        assert res.returncode == 0, res.stderr
        assert ns not in {p["name"] for p in control.request(sock, "show", table="ports")}
        assert all(r["port"] != ns for r in control.request(sock, "show", table="fdb"))
        gone = subprocess.run(["ip", "-n", ns, "link", "show", "dev", "eth0"], capture_output=True)
        assert gone.returncode != 0, "the TAP outlived its port"
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_port_add_takes_settings_after_flags(make_lab):
    make_lab(topology("hotplug2", ["hb"]))
    ns = "late2"
    subprocess.run(["ip", "netns", "add", ns], check=True)  # inside the sandbox (lab marker)
    try:
        res = cli("port", "add", ns, "--node", "node1", f"netns={ns}", "netns_ifname=eth0")
        assert res.returncode == 0, res.stderr
        rows = control.request(vlab.socket_for("node1"), "show", table="ports")
        assert {p["name"]: p["netns"] for p in rows}.get(ns) == ns
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
