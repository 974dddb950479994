"""Integration tests: `vswitch trace`, `vswitch capture` and `vswitch replay` against running daemons.

One lab serves the module: two vswitch nodes over the VXLAN overlay,

    node1 (192.168.1.11): a1, a2        node2 (192.168.1.12): b1

so a trace can show bridging, routing and encapsulation, and a capture sees
every stage a real ping passes. Run with:

    vswitch sandbox -- python -m pytest -q tests/test_lab_inspect.py
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pytest
import yaml

from conftest import _down_if_up, pexec
from vswitch import lab as vlab
from vswitch.pcapng import read_packets
from vswitch.sandbox import in_sandbox

pytestmark = pytest.mark.lab

VSWITCH = [sys.executable, "-m", "vswitch"]
NODE2 = "192.168.1.12"
TOPOLOGY = {
    "name": "inspect",
    "cluster": {"podCIDR": "10.244.0.0/16", "backend": "vxlan"},
    "nodes": [{"name": "node1", "address": "192.168.1.11/24", "podCIDR": "10.244.1.0/24"},
              {"name": "node2", "address": f"{NODE2}/24", "podCIDR": "10.244.2.0/24"}],
    "pods": [{"name": "a1", "node": "node1"}, {"name": "a2", "node": "node1"}, {"name": "b1", "node": "node2"}],
}


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    if not in_sandbox():
        pytest.fail("lab fixture used outside a vswitch sandbox", pytrace=False)
    if vlab.state() is not None:
        _down_if_up()
    path = tmp_path_factory.mktemp("inspect") / "topology.yaml"
    path.write_text(yaml.safe_dump(TOPOLOGY, sort_keys=False))
    try:
        st = vlab.up(str(path), log=lambda *a: None)
        # every pod talks once, so the nodes have learned the pods' MACs and resolved their neighbours
        for src, dst in (("a1", "b1"), ("a2", "a1")):
            assert pexec(src, "ping", "-n", "-c", "1", "-W", "2", st["pods"][dst]["ip"], timeout=10).returncode == 0
        yield st
    finally:
        _down_if_up()


def cli(*args: str, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(VSWITCH + list(args), capture_output=True, text=True, timeout=timeout)
    if check:
        assert res.returncode == 0, f"vswitch {' '.join(args)}: {res.stderr}"
    return res


def fdb(node: str) -> dict:
    """(mac, port) -> age of the node's FDB entries."""
    return {(r["mac"], r["port"]): r["age"] or 0 for r in
            json.loads(cli("show", "fdb", "--node", node, "-o", "json").stdout)}


def stats(node: str) -> dict:
    return {r["stage"]: r["packets"] for r in json.loads(cli("show", "stats", "--node", node, "-o", "json").stdout)}


def test_trace_dry_run_to_a_remote_pod_shows_the_encapsulation_and_changes_nothing(lab):
    b1 = lab["pods"]["b1"]["ip"]
    fdb_before = fdb("node1")
    tx_before = stats("node1")["port-tx"]
    out = json.loads(cli("trace", "--in", "a1", "-o", "json",  # the pod's name picks node1 and port a1
                         f'IP(src="{lab["pods"]["a1"]["ip"]}", dst="{b1}")/ICMP()').stdout)
    # the pipeline datapath: encapsulated in the walk, then routed out of the uplink towards node2
    assert out["verdict"] == "would leave by uplink"
    stages = [s["stage"] for s in out["steps"]]
    assert stages[0] == "eth-input" and stages[-1] == "port-tx" and "ip4-lookup" in stages
    assert stages[stages.index("vxlan-encap") + 1] == "ip4-output"
    # the default source MAC is the one node1 learned on a1: the pod's own
    assert out["steps"][0]["record"]["src"] == lab["pods"]["a1"]["mac"]
    encap = out["steps"][stages.index("vxlan-encap")]["record"]
    assert (encap["dst"], encap["dport"], encap["vni"], encap["ttl"], encap["df"]) == (NODE2, 8472, 1, 64, False)
    assert 32768 <= encap["sport"] < 61000 and encap["segments"] == 1
    assert out["steps"][stages.index("ip4-output")]["record"]["dst"] == NODE2
    # dry run: nothing learned, nothing sent
    fdb_after = fdb("node1")
    assert fdb_after.keys() == fdb_before.keys()
    assert all(fdb_after[k] >= fdb_before[k] for k in fdb_before), "a dry run refreshed an FDB entry"
    assert stats("node1")["port-tx"] == tx_before + 1  # the traced walk is counted, the frame is not sent
    text = cli("trace", "--node", "node1", "--in", "a1", f'IP(dst="{b1}")/ICMP()').stdout
    assert "vxlan vni 1" in text and f"> {NODE2}:8472" in text and "verdict: would leave by uplink" in text


def test_trace_commit_really_sends(lab):
    a1, a2 = lab["pods"]["a1"], lab["pods"]["a2"]
    proc = subprocess.Popen(vlab.exec_argv("a2", ["tcpdump", "-i", "eth0", "-n", "-c", "1", "-l",
                                                  "udp port 4242"]), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        time.sleep(1.0)  # tcpdump up (a missed datagram fails the test below, never passes it)
        out = cli("trace", "--in", "a1", "--commit",
                  f'Ether(dst="{a2["mac"]}")/IP(src="{a1["ip"]}", dst="{a2["ip"]}")/UDP(sport=4242, dport=4242)')
        assert "verdict: sent out a2" in out.stdout
        line, _ = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert f"{a1['ip']}.4242 > {a2['ip']}.4242: UDP" in line


def test_trace_rejects_bad_input_clearly(lab):
    res = cli("trace", "--node", "node1", "--in", "nosuch", "IP()/ICMP()", check=False)
    assert res.returncode == 1 and "no port named 'nosuch'" in res.stderr and "a1" in res.stderr
    res = cli("trace", "--node", "node1", "--in", "a1", "IP(dst=", check=False)
    assert res.returncode == 1 and "cannot build packet" in res.stderr


def test_capture_records_every_stage_of_a_real_ping_to_pcapng(lab, tmp_path):
    path = tmp_path / "ping.pcapng"
    b1 = lab["pods"]["b1"]["ip"]
    proc = subprocess.Popen(VSWITCH + ["capture", "--port", "a1", "-c", "2", "--duration", "20", "-w", str(path),
                                       "icmp"], stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.5)  # the session is open once the CLI printed its banner; this is ample
        assert pexec("a1", "ping", "-n", "-c", "1", "-W", "2", b1, timeout=10).returncode == 0
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    recs = list(read_packets(str(path)))
    ids = {o["packet_id"] for _, _, _, o in recs}
    assert len(ids) == 2, f"one echo request in, one reply out: {ids}"
    by_if = {}
    for ifname, _, frame, opts in recs:
        by_if.setdefault(ifname, []).append(opts)
    # the request enters on a1, is encapsulated and leaves by the uplink; the reply is decapsulated,
    # enters from flannel.1 and leaves on a1
    want = {"a1:eth-input", "a1:vxlan-encap", "uplink:port-tx", "flannel.1:l3-input", "a1:port-tx"}
    assert want <= set(by_if), " ".join(sorted(by_if))
    assert by_if["a1:eth-input"][0]["direction"] == "in" and by_if["a1:port-tx"][0]["direction"] == "out"
    assert b"vxlan vni 1" in by_if["a1:vxlan-encap"][0]["verdict"]  # the stage's decision
    request = [f for i, _, f, o in recs if i == "a1:eth-input"][0]
    reply_out = [f for i, _, f, o in recs if i == "a1:port-tx"][0]
    assert request[30:34] == bytes(map(int, b1.split("."))) and reply_out[26:30] == request[30:34]
    # scapy reads the same file: the same frames, and our stage names as its interface names
    from scapy.utils import PcapNgReader
    with PcapNgReader(str(path)) as r:
        theirs = list(r)
    assert [bytes(p) for p in theirs] == [f for _, _, f, _ in recs]
    if shutil.which("tshark"):
        res = subprocess.run(["tshark", "-r", str(path), "-T", "fields", "-e", "frame.interface_name"],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0 and "a1:eth-input" in res.stdout, res.stderr


def test_capture_scapy_prints_live_and_respects_stage_and_filter(lab):
    b1 = lab["pods"]["b1"]["ip"]
    proc = subprocess.Popen(VSWITCH + ["capture", "--node", "node1", "--stage", "eth-input", "-c", "1",
                                       "--duration", "20", "--scapy", "icmp", "and", "dst", "host", b1],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.5)
        pexec("a2", "ping", "-n", "-c", "1", "-W", "1", lab["pods"]["a1"]["ip"], timeout=10)  # filtered out
        pexec("a1", "ping", "-n", "-c", "1", "-W", "2", b1, timeout=10)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = out.strip().splitlines()
    assert len(lines) == 1, out
    assert "a1:eth-input <" in lines[0] and f"> {b1} echo-request" in lines[0]
    assert "1 packets, 1 stage records" in err


def test_replay_of_a_capture_through_the_nodes_own_config(lab, tmp_path):
    path = tmp_path / "ping.pcapng"
    b1 = lab["pods"]["b1"]["ip"]
    # six packets: three echo requests in on a1, three replies out on a1 (these enter from the tunnel
    # at l3-input, so the eth-input file holds only the requests)
    proc = subprocess.Popen(VSWITCH + ["capture", "--port", "a1", "--stage", "eth-input", "-c", "6",
                                       "--duration", "20", "-w", str(path), "icmp"], stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.5)
        pexec("a1", "ping", "-n", "-c", "3", "-i", "0.2", "-W", "2", b1, timeout=15)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # node1's config as the lab wrote it (TAP ports): replay makes them memory ports
    res = json.loads(cli("replay", str(path), "--config", lab["nodes"]["node1"]["config"], "-o", "json").stdout)
    assert [r["in"] for r in res] == ["a1"] * 3
    # encapsulated and routed to node2 over the uplink, where offline nobody answers the ARP for it
    assert all(f"next hop {NODE2} unresolved on uplink" in r["verdict"] for r in res), [r["verdict"] for r in res]
    # ...and through a config where node2 is gone from the peers, the same traffic has no route
    cfg = yaml.safe_load(open(lab["nodes"]["node1"]["config"]))
    cfg["overlay"]["peers"] = [p for p in cfg["overlay"]["peers"] if p["address"] != NODE2]
    alt = tmp_path / "node1-without-node2.yaml"
    alt.write_text(yaml.safe_dump(cfg))
    res = json.loads(cli("replay", str(path), "--config", str(alt), "-o", "json").stdout)
    assert all("uplink" not in r["verdict"] for r in res), [r["verdict"] for r in res]
