"""AF_PACKET ports in a sandbox: an existing interface joins the bridge, 802.1Q tags survive."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from vswitch import control
from vswitch.netns import ip

pytestmark = pytest.mark.lab


@pytest.fixture
def afpacket_node(tmp_path):
    """netns `sw` runs vswitch with an AF_PACKET port on a veth whose peer is host `h1`'s eth0,
    and a TAP port that becomes pod `p1`'s eth0."""
    made = []
    for ns in ("sw", "h1", "p1"):
        ip("netns", "add", ns)
        made.append(ns)
        ip("link", "set", "lo", "up", netns=ns)
        subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
                        "net.ipv6.conf.default.disable_ipv6=1"], check=True)
    ip("link", "add", "eth1", "type", "veth", "peer", "name", "eth0", "netns", "h1", netns="sw")
    ip("link", "set", "eth1", "up", netns="sw")
    ip("link", "set", "eth0", "up", netns="h1")
    sock = str(tmp_path / "sw.sock")
    cfg = tmp_path / "sw.yaml"
    cfg.write_text(f"""
name: sw
ports:
  - {{name: eth1, type: afpacket}}
  - {{name: p1, type: tap, netns: p1, netns_ifname: eth0}}
control: {{socket: {sock}}}
""")
    log = open(tmp_path / "sw.log", "wb")
    proc = subprocess.Popen(["ip", "netns", "exec", "sw", sys.executable, "-m", "vswitch", "run", "--config", str(cfg)],
                            stdout=log, stderr=log)
    try:
        for _ in range(200):
            try:
                control.request(sock, "ping", timeout=1)
                break
            except control.ControlError:
                assert proc.poll() is None, (tmp_path / "sw.log").read_text()
                time.sleep(0.05)
        ip("addr", "add", "10.9.0.1/24", "dev", "eth0", netns="h1")
        ip("addr", "add", "10.9.0.2/24", "dev", "eth0", netns="p1")
        yield sock
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()
        for ns in made:
            ip("netns", "del", ns)


def ping(ns: str, dst: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", ns, "ping", "-c", "2", "-i", "0.2", "-W", "2", dst],
                          capture_output=True, text=True, timeout=20)


def test_afpacket_port_bridges_to_a_tap_pod(afpacket_node):
    res = ping("h1", "10.9.0.2")
    assert res.returncode == 0, res.stdout + res.stderr
    ports = {p["name"]: p for p in control.request(afpacket_node, "show", table="ports")}
    assert ports["eth1"]["type"] == "afpacket" and ports["eth1"]["rx_packets"] >= 2
    assert ports["p1"]["tx_packets"] >= 2
    fdb = {r["port"] for r in control.request(afpacket_node, "show", table="fdb")}
    assert fdb == {"eth1", "p1"}


SEND_TAGGED = """
from scapy.all import Ether, Dot1Q, IP, UDP, Raw, sendp
sendp(Ether(src="02:00:00:00:01:01", dst="ff:ff:ff:ff:ff:ff") / Dot1Q(vlan=100, prio=5)
      / IP(src="10.100.0.1", dst="10.100.0.2") / UDP(dport=9999) / Raw(b"vlan-probe"), iface="eth0", verbose=0)
"""


def test_vlan_tags_stripped_by_the_kernel_are_restored(afpacket_node):
    # The kernel moves the 802.1Q tag of a frame arriving on sw's eth1 into skb
    # metadata before AF_PACKET sees it; vswitch must put it back so the pod gets
    # the tagged frame (the lab kernel has no 8021q module, so scapy tags by hand
    # and tcpdump, which also reads PACKET_AUXDATA, shows the tag on the pod side).
    cap = subprocess.Popen(["ip", "netns", "exec", "p1", "tcpdump", "-i", "eth0", "-n", "-e", "-l", "-c", "1",
                            "vlan 100 and udp port 9999"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10
        line = ""
        while "listening" not in line and time.monotonic() < deadline:
            line = cap.stderr.readline()
        assert "listening" in line, line
        subprocess.run(["ip", "netns", "exec", "h1", sys.executable, "-c", SEND_TAGGED], check=True, timeout=30)
        out, _ = cap.communicate(timeout=10)
    finally:
        if cap.poll() is None:
            cap.kill()
            cap.wait()
    assert "vlan 100" in out and "p 5" in out, out
    ports = {p["name"]: p for p in control.request(afpacket_node, "show", table="ports")}
    assert ports["eth1"]["vlan_restored"] >= 1
