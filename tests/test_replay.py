"""vswitch.replay and `vswitch replay`: a recorded capture through a node config, offline.

Covered: a small pcap conversation (ARP, ping to the gateway, a ClusterIP, a blackholed
packet) replayed with --in and its per-packet verdicts; the capture's timestamps driving the
simulator's clock (a UDP conntrack entry expired by a later frame; long silences capped at
MAX_GAP); pcapng interface names choosing the port without --in, and the error when they
do not; files written by `vswitch capture` (interfaces named PORT:STAGE, several records per
packet id) replayed once per packet, including a real capture taken from a SimNode; the CLI's
table, --trace and JSON output.
"""

from __future__ import annotations

import json

import pytest
import yaml
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Raw
from scapy.utils import wrpcap

from router.interface import stable_mac
from conftest import service_manifest
from vswitch import SimNode
from vswitch.cli import main
from vswitch.pcapng import PcapngWriter
from vswitch.replay import MAX_GAP, replay

P1, P2, GW_MAC = "02:00:00:00:00:01", "02:00:00:00:00:02", "02:00:00:00:01:12"
POD1, POD2, GW = "10.244.1.2", "10.244.1.3", "192.168.1.12"
RTR_PODS, RTR_UP = "10.244.1.1", "192.168.1.11"
BCAST = "ff:ff:ff:ff:ff:ff"
VIP = "10.96.0.20"
RMAC = stable_mac("n1", "pods").hex(":")
UMAC = stable_mac("n1", "uplink").hex(":")
T0 = 1_700_000_000.0


def write_config(tmp_path) -> str:
    services = tmp_path / "services.yaml"
    services.write_text(service_manifest("dns", VIP, 53, 5353, "UDP", POD2))
    cfg = {"name": "n1",
           "ports": [{"name": "p1", "type": "tap"}, {"name": "p2", "type": "tap"},
                     {"name": "up", "type": "afpacket"}],
           "router": {"interfaces": [{"name": "pods", "address": "10.244.1.1/24"},
                                     {"name": "uplink", "port": "up", "address": "192.168.1.11/24"}],
                      "routes": ["10.244.2.0/24 via 192.168.1.12", "blackhole 10.9.0.0/16"]},
           "nat": {"clusterCIDR": "10.244.0.0/16", "manifests": [str(services)]}}
    path = tmp_path / "n1.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.fixture
def config_path(tmp_path) -> str:
    return write_config(tmp_path)


def from_pod1(pkt) -> Ether:
    return Ether(src=P1, dst=RMAC) / pkt


def dns_query(sport: int = 3333) -> Ether:
    return from_pod1(IP(src=POD1, dst=VIP) / UDP(sport=sport, dport=53) / Raw(b"query"))


def conversation() -> list:
    """What pod 1 sent, at the times it sent it."""
    pkts = [
        Ether(src=P1, dst=BCAST) / ARP(op=1, hwsrc=P1, psrc=POD1, pdst=RTR_PODS),
        from_pod1(IP(src=POD1, dst=RTR_PODS) / ICMP(id=9, seq=1) / Raw(b"ping")),
        dns_query(),                                                   # new: DNAT to POD2
        dns_query(),                                                   # same flow, 1 s later
        from_pod1(IP(src=POD1, dst="10.9.0.1") / UDP(sport=1, dport=2)),  # blackhole
        dns_query(),                                                   # 200 s later: expired
    ]
    for p, t in zip(pkts, (0.0, 0.5, 1.0, 2.0, 2.5, 202.0)):
        p.time = T0 + t
    return pkts


@pytest.fixture
def pcap(tmp_path) -> str:
    path = str(tmp_path / "conv.pcap")
    wrpcap(path, conversation())
    return path


def test_replay_gives_the_right_verdict_per_packet(config_path, pcap):
    with SimNode.from_config(config_path) as sim:
        res = replay(pcap, sim, "p1")
    assert [r.number for r in res] == [1, 2, 3, 4, 5, 6]
    assert all(r.port == "p1" for r in res)
    arp, ping, q1, q2, bh, q3 = res
    # ARP: flooded to the other pod, answered by the router
    assert arp.verdict == "sent out p2"
    (reply,) = [p for p in arp.out("p1") if ARP in p]
    assert (reply[ARP].op, reply[ARP].hwsrc, reply[ARP].psrc) == (2, RMAC, RTR_PODS)
    # the ping is answered (the router learned the pod from its ARP request)
    assert ping.verdict == "sent out p1"
    (echo,) = ping.out("p1")
    assert (echo[ICMP].type, echo[ICMP].id, echo[IP].src) == (0, 9, RTR_PODS)
    # the ClusterIP: DNAT to the endpoint, which the router then has to resolve
    nat = q1.stage("nat-prerouting")
    assert (nat["ct"], nat["service"], nat["endpoint"]) == ("new", "default/dns", f"{POD2}:5353")
    # an endpoint on the client's bridge: bridged after DNAT (br_netfilter), once resolved
    assert q1.verdict.startswith("ended in nat-bridged-dnat: bridged, not routed (br_netfilter DNAT onto pods): "
                                 "10.244.1.3 unresolved")
    assert any(ARP in p and p[ARP].pdst == POD2 for p in q1.out())
    assert q2.stage("nat-prerouting")["ct"] == "existing"
    assert bh.dropped == ("ip4-lookup", "blackhole") and bh.verdict == "dropped by ip4-lookup: blackhole"
    assert [r.dropped is not None for r in res] == [False, False, False, False, True, False]


def test_capture_timestamps_drive_the_clock(config_path, pcap):
    with SimNode.from_config(config_path) as sim:
        start = sim.now
        res = replay(pcap, sim, "p1")
        assert sim.now == pytest.approx(start + 202.0)
    assert [r.ts for r in res] == pytest.approx([T0 + t for t in (0.0, 0.5, 1.0, 2.0, 2.5, 202.0)])
    q1, q2, q3 = res[2], res[3], res[5]
    assert q1.stage("nat-prerouting")["ct"] == "new"
    assert q2.stage("nat-prerouting")["ct"] == "existing"  # 1 s later: the same entry
    assert q3.stage("nat-prerouting")["ct"] == "new"  # 200 s later the unreplied UDP entry is gone


def test_without_time_gaps_the_entry_would_still_exist(config_path, tmp_path):
    pkts = conversation()
    pkts[-1].time = pkts[-2].time + 1  # the same packets, no silence
    path = str(tmp_path / "fast.pcap")
    wrpcap(path, pkts)
    with SimNode.from_config(config_path) as sim:
        res = replay(path, sim, "p1")
    assert res[5].stage("nat-prerouting")["ct"] == "existing"


def test_long_silences_are_capped(config_path, tmp_path):
    pkts = [dns_query(), dns_query()]
    pkts[0].time, pkts[1].time = T0, T0 + 10 * 86400  # ten days apart
    path = str(tmp_path / "gap.pcap")
    wrpcap(path, pkts)
    with SimNode.from_config(config_path) as sim:
        start = sim.now
        replay(path, sim, "p1")
        assert sim.now == pytest.approx(start + MAX_GAP)


def test_timestamps_going_back_do_not_move_the_clock(config_path, tmp_path):
    pkts = [dns_query(), dns_query(), dns_query()]
    for p, t in zip(pkts, (100.0, 50.0, 101.0)):
        p.time = T0 + t
    path = str(tmp_path / "back.pcap")
    wrpcap(path, pkts)
    with SimNode.from_config(config_path) as sim:
        start = sim.now
        res = replay(path, sim, "p1")
        assert sim.now == pytest.approx(start + 1.0)
    assert [r.stage("nat-prerouting")["ct"] for r in res] == ["new", "existing", "existing"]


# --- which port: interface names ---------------------------------------------------------------------------

def write_pcapng(path: str, records: list) -> None:
    """records: (interface name, ts seconds, frame, write_packet kwargs)."""
    with open(path, "wb") as f, PcapngWriter(f) as w:
        ids: dict = {}
        for name, ts, frame, kw in records:
            if name not in ids:
                ids[name] = w.add_interface(name)
            w.write_packet(ids[name], int(ts * 1e9), bytes(frame), **kw)


def test_pcapng_interface_names_are_the_ports(config_path, tmp_path):
    path = str(tmp_path / "named.pcapng")
    gw_asks = Ether(src=GW_MAC, dst=BCAST) / ARP(op=1, hwsrc=GW_MAC, psrc=GW, pdst=RTR_UP)
    pod_asks = Ether(src=P1, dst=BCAST) / ARP(op=1, hwsrc=P1, psrc=POD1, pdst=RTR_PODS)
    write_pcapng(path, [("up", T0, gw_asks, {}), ("p1", T0 + 1, pod_asks, {})])
    with SimNode.from_config(config_path) as sim:
        up, p1 = replay(path, sim)
        assert {r["ip"] for r in sim.show("neigh")} == {GW, POD1}
    assert (up.port, p1.port) == ("up", "p1")
    (r1,) = up.out("up")
    assert (r1.dst, r1[ARP].op, r1[ARP].hwsrc, r1[ARP].psrc) == (GW_MAC, 2, UMAC, RTR_UP)
    (r2,) = [p for p in p1.out("p1")]
    assert (r2.dst, r2[ARP].hwsrc, r2[ARP].psrc) == (P1, RMAC, RTR_PODS)


def test_in_overrides_the_interface_names(config_path, tmp_path):
    path = str(tmp_path / "named.pcapng")
    write_pcapng(path, [("up", T0, dns_query(), {}), ("nonsense", T0 + 1, dns_query(4444), {})])
    with SimNode.from_config(config_path) as sim:
        res = replay(path, sim, "p1")
    assert [r.port for r in res] == ["p1", "p1"]


def test_unknown_interface_name_without_in_is_refused(config_path, tmp_path):
    path = str(tmp_path / "eth0.pcapng")
    write_pcapng(path, [("p1", T0, dns_query(), {}), ("eth0", T0 + 1, dns_query(), {})])
    with SimNode.from_config(config_path) as sim:
        with pytest.raises(ValueError) as e:
            replay(path, sim)
    msg = str(e.value)
    assert "--in" in msg and "'eth0'" in msg and "frame 2" in msg and "p1, p2, up" in msg


def test_classic_pcap_without_in_is_refused(config_path, pcap):
    with SimNode.from_config(config_path) as sim:
        with pytest.raises(ValueError, match="--in"):
            replay(pcap, sim)


def test_unknown_in_port_is_a_key_error(config_path, pcap):
    with SimNode.from_config(config_path) as sim:
        with pytest.raises(KeyError, match="no port named 'p9'"):
            replay(pcap, sim, "p9")


def test_simple_packet_blocks_have_no_time_and_leave_the_clock_alone(config_path, tmp_path):
    """A Simple Packet Block carries no timestamp (read_packets gives ts None)."""
    import struct
    path = str(tmp_path / "spb.pcapng")
    write_pcapng(path, [("p1", T0, dns_query(), {})])
    frame = bytes(dns_query())
    body = struct.pack("<I", len(frame)) + frame + bytes(-len(frame) % 4)
    with open(path, "ab") as f:  # SPB (type 3) for interface 0
        f.write(struct.pack("<II", 3, 12 + len(body)) + body + struct.pack("<I", 12 + len(body)))
    with SimNode.from_config(config_path) as sim:
        start = sim.now
        res = replay(path, sim)
        assert sim.now == start
    assert [r.ts for r in res] == [pytest.approx(T0), None]
    assert [r.stage("nat-prerouting")["ct"] for r in res] == ["new", "existing"]


# --- files written by `vswitch capture` ----------------------------------------------------------------------

def capture_records(frame: Ether, pid: int, ts: float, stages=("eth-input", "l2-forward", "port-tx")) -> list:
    """One packet as `vswitch capture -w` writes it: a record per PORT:STAGE, one packet id."""
    out = []
    for st in stages:
        port, d = ("p2", "out") if st == "port-tx" else ("p1", "in")
        out.append((f"{port}:{st}", ts, frame, dict(packet_id=pid, direction=d, verdict=f"{st}: ok")))
    return out


def test_capture_file_is_replayed_once_per_packet(config_path, tmp_path):
    a = Ether(src=P1, dst=P2) / IP(src=POD1, dst=POD2) / UDP(dport=1) / Raw(b"a")
    b = Ether(src=P1, dst=P2) / IP(src=POD1, dst=POD2) / UDP(dport=2) / Raw(b"b")
    path = str(tmp_path / "cap.pcapng")
    write_pcapng(path, capture_records(a, 41, T0) + capture_records(b, 42, T0 + 1))
    with SimNode.from_config(config_path) as sim:
        res = replay(path, sim)
    assert len(res) == 2
    assert [r.number for r in res] == [1, 4]  # frame numbers in the file, first record of each id
    assert [r.port for r in res] == ["p1", "p1"]  # PORT of PORT:STAGE
    assert [r.frame for r in res] == [bytes(a), bytes(b)]
    assert [r.verdict for r in res] == ["sent out p2", "sent out p2"]


def test_a_real_capture_replays_to_the_same_verdicts(config_path, tmp_path):
    """Capture on one simulated node, write it as `vswitch capture -w` does, replay through another."""
    frames = [Ether(src=P1, dst=BCAST) / ARP(op=1, hwsrc=P1, psrc=POD1, pdst=RTR_PODS),
              from_pod1(IP(src=POD1, dst=RTR_PODS) / ICMP(id=3)),
              from_pod1(IP(src=POD1, dst="10.9.0.1") / UDP()),
              Ether(src=P1, dst=P2) / IP(src=POD1, dst=POD2) / UDP()]
    with SimNode.from_config(config_path) as live:
        cid = live.node.capture_start(stages=["eth-input", "l2-forward", "port-tx"], count=10)["id"]
        for f in frames:
            live.inject("p1", f, trace=False)  # the daemon's path: what a capture sees
        records = live.node.capture_read(cid)["records"]
    assert len({r["id"] for r in records}) == len(frames) < len(records)
    path = str(tmp_path / "live.pcapng")
    write_pcapng(path, [(f"{r['port']}:{r['stage']}", r["ts"] / 1e9, r["frame"],
                         dict(packet_id=r["id"], direction=r["dir"], verdict=r["verdict"])) for r in records])
    with SimNode.from_config(config_path) as ref:  # the verdicts a traced run gives on a fresh node
        expected = [ref.inject("p1", f).verdict for f in frames]
    with SimNode.from_config(config_path) as sim:
        res = replay(path, sim)
    assert [r.frame for r in res] == [bytes(f) for f in frames]
    assert [r.verdict for r in res] == expected
    assert expected[2] == "dropped by ip4-lookup: blackhole"


# --- the CLI -------------------------------------------------------------------------------------------------

def test_cli_replay_table(config_path, pcap, capsys):
    assert main(["replay", pcap, "--config", config_path, "--in", "p1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 7
    rows = [line.split() for line in lines[:6]]
    assert [int(r[0]) for r in rows] == [1, 2, 3, 4, 5, 6] and {r[1] for r in rows} == {"p1"}
    assert lines[4].endswith("dropped by ip4-lookup: blackhole")
    assert "10.9.0.1" in lines[4] and "ICMP" in lines[1]
    assert lines[0].endswith("sent out p2")
    assert lines[-1] == "6 packets replayed through n1: 1 dropped, 5 not dropped"


def test_cli_replay_trace(config_path, pcap, capsys):
    assert main(["replay", pcap, "-c", config_path, "--in", "p1", "--trace"]) == 0
    out = capsys.readouterr().out
    assert out.count("frame ") >= 6 and "frame 5:\n" in out
    assert "verdict: dropped by ip4-lookup: blackhole" in out
    assert "  1  eth-input" in out


def test_cli_replay_json(config_path, pcap, capsys):
    assert main(["replay", pcap, "--config", config_path, "--in", "p1", "-o", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [d["frame"] for d in doc] == [1, 2, 3, 4, 5, 6]
    for d in doc:
        assert {"frame", "ts", "id", "in", "packet", "verdict", "steps", "emitted"} <= set(d)
        assert d["in"] == "p1" and d["steps"][0]["stage"] == "eth-input"
    assert doc[4]["verdict"] == "dropped by ip4-lookup: blackhole"
    assert doc[1]["emitted"][0]["port"] == "p1" and "ICMP" in doc[1]["emitted"][0]["packet"]
    assert doc[5]["ts"] - doc[0]["ts"] == pytest.approx(202.0)


def test_cli_replay_errors_exit_1(config_path, pcap, capsys):
    assert main(["replay", pcap, "--config", config_path]) == 1
    assert "give --in PORT" in capsys.readouterr().err
    assert main(["replay", pcap, "--config", config_path, "--in", "nope"]) == 1
    assert "no port named 'nope'" in capsys.readouterr().err


def test_cli_replay_missing_file_is_a_clean_error(config_path, tmp_path, capsys):
    assert main(["replay", str(tmp_path / "missing.pcap"), "--config", config_path, "--in", "p1"]) == 1
    assert "missing.pcap" in capsys.readouterr().err
