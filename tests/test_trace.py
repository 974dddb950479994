"""vswitch.trace and the offline `vswitch trace --config` command.

Covered: parse_packet (hex with and without separators, scapy expressions with and without
Ether, MAC defaults from Node.default_macs, ARP requests, bad expressions and short hex as
ValueError, no builtins in the expression's namespace); complete(); read_frame; verdict and
render for a drop, a forward and a dry run; the CLI offline (human and JSON output, --pcap
--frame, --commit, and the errors that exit 1).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import yaml
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Raw
from scapy.utils import wrpcap

from router.interface import stable_mac
from vswitch import SimNode
from vswitch.cli import main
from vswitch.trace import FALLBACK_SRC, complete, parse_packet, read_frame, render, summary, verdict

P1, P2 = "02:00:00:00:00:01", "02:00:00:00:00:02"
POD1, POD2 = "10.244.1.2", "10.244.1.3"
BCAST = "ff:ff:ff:ff:ff:ff"
GW_MAC = stable_mac("n1", "pods").hex(":")  # the "pods" router interface of node n1
UP_MAC = stable_mac("n1", "uplink").hex(":")

CONFIG = {"name": "n1",
          "ports": [{"name": "p1", "type": "tap"}, {"name": "p2", "type": "tap"},
                    {"name": "up", "type": "afpacket"}],
          "router": {"interfaces": [{"name": "pods", "address": "10.244.1.1/24"},
                                    {"name": "uplink", "port": "up", "address": "192.168.1.11/24"}],
                     "routes": ["10.244.2.0/24 via 192.168.1.12", "blackhole 10.9.0.0/16"]},
          "nat": {"clusterCIDR": "10.244.0.0/16"}}

FRAME = Ether(src=P1, dst=P2) / IP(src=POD1, dst=POD2) / UDP(sport=1, dport=2) / Raw(b"x")


@pytest.fixture
def sim():
    with SimNode.from_config(CONFIG) as s:
        yield s


@pytest.fixture
def config_path(tmp_path):
    path = tmp_path / "n1.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    return str(path)


# --- parse_packet: hex ------------------------------------------------------------------------------

@pytest.mark.parametrize("sep", ["", ":", " ", "\n"])
def test_hex_with_and_without_separators(sep):
    raw = bytes(FRAME)
    text = sep.join(f"{b:02x}" for b in raw)
    assert parse_packet(text) == raw
    assert parse_packet(text.upper()) == raw
    assert parse_packet(f"  {text}\n") == raw


def test_hex_is_used_as_is_whatever_the_defaults():
    raw = bytes(FRAME)
    assert parse_packet(raw.hex(), {"dst": GW_MAC, "src": "02:00:00:00:00:77"}) == raw


@pytest.mark.parametrize("text", ["ff:ff:ff:ff:ff:ff", "0a" * 13, "ab cd"])
def test_short_hex_is_refused(text):
    with pytest.raises(ValueError, match="14 bytes"):
        parse_packet(text)


def test_hex_of_decimal_digits_only_is_still_hex():
    raw = bytes(Ether(dst="00:11:22:33:44:55", src="02:00:00:00:00:01", type=0x0800))
    assert raw.hex().isdigit()
    assert parse_packet(raw.hex()) == raw


@pytest.mark.parametrize("text", ["", "   ", "\n"])
def test_empty_input_is_refused(text):
    with pytest.raises(ValueError, match="no packet"):
        parse_packet(text)


# --- parse_packet: scapy expressions -----------------------------------------------------------------

def test_expression_with_ether_keeps_its_macs():
    frame = parse_packet(f'Ether(src="{P2}", dst="{P1}")/IP(src="{POD2}", dst="{POD1}")/ICMP()',
                         {"dst": GW_MAC, "src": "02:00:00:00:00:77"})
    f = Ether(frame)
    assert (f.src, f.dst, f[IP].src, f[IP].dst, f[ICMP].type) == (P2, P1, POD2, POD1, 8)


def test_expression_without_ether_gets_the_default_macs():
    f = Ether(parse_packet(f'IP(src="{POD1}", dst="10.96.0.10")/UDP(dport=53)', {"dst": GW_MAC, "src": P1}))
    assert (f.src, f.dst, f.type) == (P1, GW_MAC, 0x0800)
    assert (f[IP].dst, f[UDP].dport) == ("10.96.0.10", 53)


def test_partial_ether_only_fills_what_is_unset():
    f = Ether(parse_packet(f'Ether(src="{P2}")/IP(src="{POD1}", dst="{POD2}")', {"dst": GW_MAC, "src": P1}))
    assert (f.src, f.dst) == (P2, GW_MAC)
    g = Ether(parse_packet(f'Ether(dst="{P2}")/IP(src="{POD1}", dst="{POD2}")', {"dst": GW_MAC, "src": P1}))
    assert (g.src, g.dst) == (P1, P2)


def test_no_learned_mac_falls_back_to_a_local_one_and_no_gateway_to_broadcast():
    assert FALLBACK_SRC == "02:00:00:00:00:01"
    f = Ether(parse_packet(f'IP(src="{POD1}", dst="{POD2}")', {"dst": GW_MAC, "src": None}))
    assert (f.src, f.dst) == (FALLBACK_SRC, GW_MAC)
    g = Ether(parse_packet(f'IP(src="{POD1}", dst="{POD2}")'))
    assert (g.src, g.dst) == (FALLBACK_SRC, BCAST)


def test_arp_request_is_broadcast_with_hwsrc_filled():
    f = Ether(parse_packet(f'ARP(psrc="{POD1}", pdst="10.244.1.1")', {"dst": GW_MAC, "src": P1}))
    assert f.dst == BCAST and f.src == P1
    assert (f[ARP].op, f[ARP].hwsrc, f[ARP].psrc, f[ARP].pdst) == (1, P1, POD1, "10.244.1.1")


def test_arp_reply_goes_to_the_gateway_and_keeps_a_given_hwsrc():
    f = Ether(parse_packet(f'ARP(op=2, hwsrc="{P2}", psrc="{POD1}", pdst="10.244.1.1")',
                           {"dst": GW_MAC, "src": P1}))
    assert (f.dst, f.src, f[ARP].hwsrc) == (GW_MAC, P1, P2)


def test_complete_accepts_packets_and_refuses_anything_else():
    f = Ether(complete(IP(src=POD1, dst=POD2) / ICMP(), {"dst": GW_MAC, "src": P1}))
    assert (f.src, f.dst, f[IP].dst) == (P1, GW_MAC, POD2)
    with pytest.raises(ValueError, match="expected a scapy packet, got bytes"):
        complete(b"\x00" * 20, {})


@pytest.mark.parametrize("text, problem", [
    ('IP(dst="10.0.0.1"', "SyntaxError"),
    ("Bogus()/IP()", "NameError: name 'Bogus'"),
    ('IP()/ICMP(type="nonsense")', "KeyError"),
    ("6 * 7", "expected a scapy packet, got int"),
    ('"just a string"', "expected a scapy packet, got str"),
    ("IP", "expected a scapy packet"),
    ("IP(ttl=300)", "ttl"),
])
def test_bad_expressions_raise_value_error_naming_the_problem(text, problem):
    with pytest.raises(ValueError) as e:
        parse_packet(text, {"dst": GW_MAC, "src": P1})
    assert problem in str(e.value)


@pytest.mark.parametrize("text", [
    "__import__('os').getcwd()",
    "open('/etc/hostname').read()",
    "eval('1')",
    "Raw(str(1))",
    "getattr(IP, 'name')",
])
def test_builtins_are_not_reachable(text):
    with pytest.raises(ValueError, match="NameError"):
        parse_packet(text)


@pytest.mark.parametrize("text", [
    "Ether()/Raw(builtins.open('/etc/hostname').read())",
    "Ether()/Raw(os.getcwd())",
])
def test_no_module_gives_builtins_back(text):
    with pytest.raises(ValueError):
        parse_packet(text)


def macs(d: dict) -> tuple:
    return d["dst"], d["src"]


def test_sim_defaults_are_the_gateway_and_the_mac_learned_on_the_port(sim):
    assert macs(sim.node.default_macs("p1")) == (GW_MAC, None)
    assert macs(sim.node.default_macs("up")) == (UP_MAC, None)  # a routed port: its own interface
    sim.inject("p1", Ether(src="02:00:00:00:00:42", dst=BCAST) / ARP(hwsrc="02:00:00:00:00:42", psrc=POD1, pdst=POD2))
    assert macs(sim.node.default_macs("p1")) == (GW_MAC, "02:00:00:00:00:42")
    assert sim.node.default_macs("p2")["src"] is None
    f = Ether(sim.frame("p1", f'IP(src="{POD1}", dst="10.244.1.1")/ICMP()'))
    assert (f.src, f.dst) == ("02:00:00:00:00:42", GW_MAC)


def test_sim_default_ip_source_is_the_address_seen_behind_the_learned_mac(sim):
    sim.inject("p1", Ether(src=P1, dst=BCAST) / ARP(op=1, hwsrc=P1, psrc=POD1, pdst="10.244.1.1"))
    assert sim.node.default_macs("p1")["ip"] == POD1
    f = Ether(sim.frame("p1", 'IP(dst="10.244.1.1")/ICMP()'))
    assert (f.src, f.dst, f[IP].src) == (P1, GW_MAC, POD1)
    a = Ether(sim.frame("p1", 'ARP(pdst="10.244.1.1")'))
    assert (a[ARP].psrc, a[ARP].hwsrc) == (POD1, P1)
    g = Ether(sim.frame("p1", 'IP(src="10.244.1.77", dst="10.244.1.1")'))
    assert g[IP].src == "10.244.1.77"  # a given source is kept


def test_bridge_only_node_defaults_to_broadcast():
    with SimNode.from_config({"name": "b", "ports": [{"name": "a"}, {"name": "b"}]}) as s:
        assert macs(s.node.default_macs("a")) == (None, None)
        f = Ether(s.frame("a", f'IP(src="{POD1}", dst="{POD2}")'))
        assert (f.src, f.dst) == (FALLBACK_SRC, BCAST)


# --- verdict / render ----------------------------------------------------------------------------------

def test_verdict_and_render_of_a_drop(sim):
    res = sim.inject("p1", f'IP(src="{POD1}", dst="10.9.0.1")/ICMP()')
    assert verdict(res.steps) == "dropped by ip4-lookup: blackhole"
    text = render(res.steps, 7, "in p1: a packet")
    lines = text.splitlines()
    assert lines[0] == "packet 7: in p1: a packet"
    assert lines[-1] == "verdict: dropped by ip4-lookup: blackhole"
    body = lines[1:-1]
    assert len(body) == len(res.steps)
    for i, (line, step) in enumerate(zip(body, res.steps), 1):
        assert line.split()[0] == str(i) and line.split()[1] == step["stage"] and line.endswith(step["text"])
    assert body[-1].split()[1] == "drop" and "blackhole" in body[-1]


def test_verdict_of_a_forward_and_of_a_dry_run(sim):
    dry = sim.inject("p1", bytes(FRAME), commit=False)
    assert verdict(dry.steps) == "would leave by p2"
    assert "(dry run: not sent)" in render(dry.steps)
    committed = sim.inject("p1", bytes(FRAME))
    assert verdict(committed.steps) == "sent out p2"
    assert "dry run" not in render(committed.steps)


def test_verdict_of_a_flooded_broadcast_names_the_ports_it_left_by(sim):
    res = sim.inject("p1", bytes(Ether(src=P1, dst=BCAST) / IP(src=POD1, dst="10.244.1.255") / UDP(dport=67)))
    assert res.ports == ["p2"]  # it did leave by p2
    assert "p2" in verdict(res.steps)


def test_verdict_of_synthetic_steps():
    assert verdict([]) == "not processed"
    tx = {"stage": "port-tx", "next": None, "record": {"ports": ["a", "b"], "len": 60}, "text": "out a, b"}
    tx2 = {"stage": "port-tx", "next": None, "record": {"ports": ["b", "c"], "len": 60}, "text": "out b, c"}
    assert verdict([tx, tx2]) == "sent out a, b, c"  # in order, each once
    local = {"stage": "ip4-local", "next": None, "record": {}, "text": "for us"}
    assert verdict([local]) == "ended in ip4-local: for us"
    drop = {"stage": "drop", "next": None, "record": {"stage": "l2-forward", "reason": "no-port"}, "text": "x"}
    assert verdict([tx, drop]) == "dropped by l2-forward: no-port"


def test_render_without_header_or_id():
    step = {"stage": "eth-input", "next": None, "record": {}, "text": "hello"}
    assert render([step]) == "  1  eth-input  hello\nverdict: ended in eth-input: hello"
    assert render([step], None, "sum").splitlines()[0] == "packet: sum"


def test_summary_never_fails():
    assert summary(bytes(FRAME)) == FRAME.summary()
    assert summary(b"\x01\x02") == "2 bytes"  # scapy cannot dissect it: still a summary


# --- read_frame ----------------------------------------------------------------------------------------

def frames3():
    return [Ether(src=P1, dst=P2) / IP(src=POD1, dst=POD2, id=i) / UDP(dport=1000 + i) for i in (1, 2, 3)]


def test_read_frame_counts_from_one(tmp_path):
    path = str(tmp_path / "c.pcap")
    pkts = frames3()
    wrpcap(path, pkts)
    assert [read_frame(path, i) for i in (1, 2, 3)] == [bytes(p) for p in pkts]
    assert read_frame(path) == bytes(pkts[0])
    with pytest.raises(ValueError, match="fewer than 4"):
        read_frame(path, 4)
    with pytest.raises(ValueError, match="start at 1"):
        read_frame(path, 0)


# --- the CLI, offline ----------------------------------------------------------------------------------

def run_cli(capsys, *argv) -> tuple:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_trace_human_output(config_path, capsys):
    rc, out, err = run_cli(capsys, "trace", "--config", config_path, "--in", "p1",
                           f'IP(src="{POD1}", dst="10.9.0.1")/ICMP()')
    assert rc == 0, err
    lines = out.splitlines()
    assert re.match(r"packet \d+: in p1 on n1: Ether / IP / ICMP 10.244.1.2 > 10.9.0.1", lines[0])
    numbered = [line.split() for line in lines[1:-1]]
    assert [int(n[0]) for n in numbered] == list(range(1, len(numbered) + 1))
    assert numbered[0][1] == "eth-input" and numbered[-1][1] == "drop"
    assert lines[-1] == "verdict: dropped by ip4-lookup: blackhole"


def test_cli_trace_json_output(config_path, capsys):
    rc, out, err = run_cli(capsys, "trace", "--config", config_path, "--in", "p2", "-o", "json",
                           f'IP(src="{POD2}", dst="{POD1}")/UDP(dport=9)')
    assert rc == 0, err
    doc = json.loads(out)
    assert {"node", "in", "packet", "id", "verdict", "steps"} <= set(doc)
    assert (doc["node"], doc["in"], doc["committed"]) == ("n1", "p2", False)
    assert "UDP" in doc["packet"] and doc["id"] >= 1
    f = Ether(bytes.fromhex(doc["frame"]))
    assert (f.dst, f.src, f[IP].dst) == (GW_MAC, FALLBACK_SRC, POD1)  # nothing learned on p2 offline
    assert doc["steps"] and all(set(s) >= {"stage", "next", "record", "text"} for s in doc["steps"])
    assert [s["stage"] for s in doc["steps"]][:2] == ["eth-input", "l2-learn"]
    for a, b in zip(doc["steps"], doc["steps"][1:]):
        assert a["next"] == b["stage"]  # each step names the one after it
    assert doc["verdict"].startswith("ended in ip4-rewrite")  # the pod is not resolved: ARP (dry run)
    assert "dry run" in doc["verdict"]


def test_cli_trace_commit_really_sends(config_path, capsys):
    args = ["trace", "--config", config_path, "--in", "p1", "-o", "json", bytes(FRAME).hex()]
    rc, out, _ = run_cli(capsys, *args)
    assert rc == 0 and json.loads(out)["verdict"] == "would leave by p2"
    rc, out, _ = run_cli(capsys, *args, "--commit")
    doc = json.loads(out)
    assert rc == 0 and doc["verdict"] == "sent out p2" and doc["committed"] is True


def test_cli_trace_expression_in_several_words(config_path, capsys):
    rc, out, _ = run_cli(capsys, "trace", "--config", config_path, "--in", "p1", "-o", "json",
                         f'IP(src="{POD1}",', f'dst="{POD2}")/UDP()')
    assert rc == 0 and Ether(bytes.fromhex(json.loads(out)["frame"]))[IP].dst == POD2


@pytest.mark.parametrize("kind", ["pcap", "pcapng"])
def test_cli_trace_pcap_frame_picks_the_right_frame(tmp_path, config_path, capsys, kind):
    pkts = frames3()
    path = str(tmp_path / f"c.{kind}")
    if kind == "pcap":
        wrpcap(path, pkts)
    else:
        from vswitch.pcapng import PcapngWriter
        with open(path, "wb") as f, PcapngWriter(f) as w:
            i = w.add_interface("p1")
            for n, p in enumerate(pkts):
                w.write_packet(i, 10**18 + n, bytes(p))
    for n in (1, 2, 3):
        rc, out, err = run_cli(capsys, "trace", "--config", config_path, "--in", "p1", "--pcap", path,
                               "--frame", str(n), "-o", "json")
        assert rc == 0, err
        doc = json.loads(out)
        assert doc["frame"] == bytes(pkts[n - 1]).hex()
        assert doc["steps"][0]["record"]["len"] == len(pkts[n - 1])
    rc, out, _ = run_cli(capsys, "trace", "--config", config_path, "--in", "p1", "--pcap", path)
    assert rc == 0 and "verdict: would leave by p2" in out  # frame 1 by default


@pytest.mark.parametrize("argv, message", [
    (["--in", "p9", "IP()"], "no port named 'p9' (ports: p1, p2, up)"),
    (["--in", "p1"], "no packet: give a scapy expression, hex, or --pcap FILE"),
    (["--in", "p1", "--pcap", "PCAP", "IP()"], "give a PACKET or --pcap, not both"),
    (["--in", "p1", "IP(dst="], "cannot build packet"),
    (["--in", "p1", "ab:cd"], "at least an Ethernet header"),
    (["--in", "p1", "--pcap", "PCAP", "--frame", "9"], "fewer than 9 frames"),
])
def test_cli_trace_errors_exit_1_with_a_message(tmp_path, config_path, capsys, argv, message):
    pcap = str(tmp_path / "one.pcap")
    wrpcap(pcap, frames3()[:1])
    rc, out, err = run_cli(capsys, "trace", "--config", config_path, *[pcap if a == "PCAP" else a for a in argv])
    assert rc == 1 and out == ""
    assert err.startswith("vswitch: ") and message in err
    assert "Traceback" not in err


def test_cli_trace_bad_config_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**CONFIG, "ports": [{"name": "p1", "mtu": 1}]}))
    rc, _, err = run_cli(capsys, "trace", "--config", str(bad), "--in", "p1", "IP()")
    assert rc == 2 and "ports[0].mtu" in err


def test_cli_trace_missing_pcap_is_a_clean_error(tmp_path, config_path, capsys):
    rc, _, err = run_cli(capsys, "trace", "--config", config_path, "--in", "p1", "--pcap",
                         str(tmp_path / "missing.pcap"))
    assert rc == 1 and "missing.pcap" in err


def test_cli_trace_pcap_summary_in_a_fresh_process(tmp_path, config_path):
    path = str(tmp_path / "c.pcap")
    wrpcap(path, frames3()[:1])
    res = subprocess.run([sys.executable, "-m", "vswitch", "trace", "--config", config_path, "--in", "p1",
                          "--pcap", path, "-o", "json"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "IP / UDP" in json.loads(res.stdout)["packet"]
