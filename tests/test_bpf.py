"""vswitch.bpf: tcpdump expressions compiled by libpcap and run by the Python cBPF interpreter.

Each expression is checked against a hand-written expectation and, as an independent oracle,
against libpcap's own matcher (`tcpdump -r frames.pcap -w - EXPR`).
"""

from __future__ import annotations

import io
import shutil
import subprocess

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, Dot1Q, Ether
from scapy.packet import Raw
from scapy.utils import wrpcap

from vswitch import bpf
from vswitch.bpf import (ABS, ADD, ALU, AND, DIV, IMM, IND, JA, JEQ, JGE, JGT, JMP, JSET, LD, LDX,
                         LEN, LSH, MEM, MISC, MOD, MSH, MUL, NEG, OR, RET, RET_A, RSH, ST, STX, SUB,
                         TAX, TXA, XOR, B, Filter, H, K, W, X)
from vswitch.pcapng import read_packets

POD, OTHER = "02:00:00:00:00:01", "02:00:00:00:00:02"


def eth(src=POD, dst=OTHER):
    return Ether(src=src, dst=dst)


def ip(src="10.244.1.5", dst="10.0.0.1", **kw):
    return IP(src=src, dst=dst, **kw)


FRAMES = {
    "syn": eth() / ip() / TCP(sport=40000, dport=80, flags="S"),
    "ack": eth() / ip("10.0.0.1", "10.244.1.5") / TCP(sport=80, dport=40000, flags="A"),
    "dns": eth() / ip(dst="10.96.0.10") / UDP(sport=33333, dport=53) / Raw(b"q" * 20),
    "nodeport": eth() / ip("192.168.1.9", "10.244.2.7") / UDP(sport=5000, dport=30080),
    "echo": eth() / ip("10.0.0.1", "10.244.1.5") / ICMP(type=8),
    "reply": eth() / ip() / ICMP(type=0),
    "arp": eth(dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, hwsrc=POD, psrc="10.244.1.5", hwdst="00:00:00:00:00:00",
                                              pdst="10.244.1.1"),
    "vlan_tcp": eth() / Dot1Q(vlan=10) / ip() / TCP(dport=443),
    "vlan_udp": eth() / Dot1Q(vlan=10) / ip() / UDP(sport=5555, dport=53),
    "ttl1": eth() / ip(ttl=1) / UDP(sport=5555, dport=33434),
    "v6_tcp": eth() / IPv6(src="fd00::1", dst="fd00::2") / TCP(dport=80, flags="S"),
    "big": eth() / ip("10.244.7.7", "10.0.0.9") / TCP(dport=8080, flags="PA") / Raw(bytes(1200)),
    "aabb": eth(src="aa:bb:cc:dd:ee:ff") / ip("10.1.1.1", "10.1.1.2") / UDP(sport=5555, dport=9),
    "frag_first": eth() / ip(flags="MF", frag=0, proto=17) / Raw(bytes(16)),
    "frag_later": eth() / ip(frag=185, proto=17) / Raw(bytes(16)),
}
FRAMES = {k: bytes(v) for k, v in FRAMES.items()}
FRAMES["truncated_syn"] = FRAMES["syn"][:20]  # cut inside the IP header

EXPECT = {
    "tcp": {"syn", "ack", "v6_tcp", "big"},
    "udp port 53": {"dns"},
    "host 10.0.0.1": {"syn", "ack", "echo", "reply", "ttl1", "frag_first", "frag_later"},
    "src net 10.244.0.0/16 and dst port 80": {"syn"},
    "icmp[icmptype] == icmp-echo": {"echo"},
    "arp": {"arp"},
    "vlan and tcp": {"vlan_tcp"},
    "tcp[tcpflags] & tcp-syn != 0": {"syn"},  # v6 needs ip6 offsets: tcp[] is IPv4 only
    "ip[8] < 2": {"ttl1"},
    "not ip": {"arp", "vlan_tcp", "vlan_udp", "v6_tcp"},
    "len > 1000": {"big"},
    "ether host aa:bb:cc:dd:ee:ff": {"aabb"},
    "udp and portrange 30000-32767": {"nodeport"},
    "ip[6:2] & 0x1fff != 0": {"frag_later"},
    "ip and ip[6] & 0x20 != 0": {"frag_first"},  # MF bit
    "ip6 and tcp dst port 80": {"v6_tcp"},
    "ether broadcast": {"arp"},
    "": set(FRAMES),
}


@pytest.mark.parametrize("expr", list(EXPECT))
def test_battery(expr):
    f = bpf.compile(expr)
    got = {name for name, frame in FRAMES.items() if f.match(frame)}
    assert got == EXPECT[expr], expr


def test_matches_libpcap(tmp_path):
    """libpcap's own matcher (tcpdump reading a pcap) agrees with the interpreter on every case."""
    names = list(FRAMES)
    path = tmp_path / "frames.pcap"
    wrpcap(str(path), [Ether(FRAMES[n]) for n in names])
    for expr in EXPECT:
        res = subprocess.run([shutil.which("tcpdump"), "-r", str(path), "-w", "-", "--", expr],
                             capture_output=True, timeout=30)
        assert res.returncode == 0, res.stderr
        libpcap = [r.frame for r in read_packets(io.BytesIO(res.stdout))]
        f = bpf.compile(expr)
        assert libpcap == [FRAMES[n] for n in names if f.match(FRAMES[n])], expr


def test_truncated_frames_never_raise():
    f = bpf.compile("tcp[tcpflags] & tcp-syn != 0 or udp port 53 or (vlan and icmp)")
    frame = FRAMES["syn"]
    for cut in range(len(frame) + 1):  # the flags byte is frame[47]
        assert f.match(frame[:cut]) is (cut > 47), cut


def test_wirelen():
    f = bpf.compile("len > 1000")
    assert not f.match(FRAMES["syn"]) and f.match(FRAMES["syn"], wirelen=1500)


def test_bad_expression_has_tcpdump_message():
    with pytest.raises(ValueError, match="bad filter expression 'tcp port': .*syntax error"):
        bpf.compile("tcp port")
    with pytest.raises(ValueError, match="non-network bits set"):
        bpf.compile("net 10.244.1.0/16")
    with pytest.raises(ValueError, match="syntax error"):
        bpf.compile("-x")  # passed after "--": an expression, never a tcpdump option


def test_missing_tcpdump(monkeypatch):
    monkeypatch.setattr(bpf.shutil, "which", lambda _name: None)
    bpf.compile.cache_clear()
    try:
        with pytest.raises(ValueError, match="need tcpdump"):
            bpf.compile("tcp")
    finally:
        bpf.compile.cache_clear()


# ----------------------------------------------------------------- interpreter, opcode by opcode

PKT = bytes(range(1, 41))  # byte i is i + 1


def run(*prog, pkt=PKT, wirelen=None):
    return Filter(prog).run(pkt, wirelen)


def ret_a():
    return (RET | RET_A, 0, 0, 0)


def test_loads():
    assert run((LD | W | ABS, 0, 0, 2), ret_a()) == 0x03040506
    assert run((LD | H | ABS, 0, 0, 38), ret_a()) == 0x2728
    assert run((LD | B | ABS, 0, 0, 39), ret_a()) == 40
    assert run((LDX | W | IMM, 0, 0, 4), (LD | W | IND, 0, 0, 1), ret_a()) == 0x06070809
    assert run((LDX | W | IMM, 0, 0, 4), (LD | H | IND, 0, 0, 1), ret_a()) == 0x0607
    assert run((LDX | W | IMM, 0, 0, 4), (LD | B | IND, 0, 0, 1), ret_a()) == 6
    assert run((LD | W | LEN, 0, 0, 0), ret_a()) == 40
    assert run((LD | W | LEN, 0, 0, 0), ret_a(), wirelen=9000) == 9000
    assert run((LDX | W | LEN, 0, 0, 0), (MISC | TXA, 0, 0, 0), ret_a()) == 40
    assert run((LDX | B | MSH, 0, 0, 0x0E), (MISC | TXA, 0, 0, 0), ret_a()) == (15 & 0xF) * 4
    # scratch memory: ST/STX then LD/LDX MEM
    assert run((LD | IMM, 0, 0, 7), (ST, 0, 0, 3), (LDX | W | MEM, 0, 0, 3), (LD | IMM, 0, 0, 0),
               (MISC | TXA, 0, 0, 0), ret_a()) == 7
    assert run((LDX | W | IMM, 0, 0, 9), (STX, 0, 0, 15), (LD | MEM, 0, 0, 15), ret_a()) == 9


@pytest.mark.parametrize("prog", [
    [(LD | W | ABS, 0, 0, 37), ret_a()],  # 4 bytes at 37 of 40
    [(LD | H | ABS, 0, 0, 39), ret_a()],
    [(LD | B | ABS, 0, 0, 40), ret_a()],
    [(LD | B | ABS, 0, 0, 0xFFFFF000), ret_a()],  # Linux ancillary area: not a packet byte
    [(LDX | W | IMM, 0, 0, 0xFFFFFFFF), (LD | B | IND, 0, 0, 1), ret_a()],  # x + k does not wrap (libpcap)
    [(LDX | W | IMM, 0, 0, 30), (LD | W | IND, 0, 0, 8), ret_a()],
    [(LDX | B | MSH, 0, 0, 40), (MISC | TXA, 0, 0, 0), ret_a()],
])
def test_out_of_bounds_loads_reject(prog):
    assert run(*prog) == 0


ALU_CASES = [  # op, a, b, expected
    (ADD, 0xFFFFFFFF, 2, 1), (SUB, 1, 2, 0xFFFFFFFF), (MUL, 0x10000, 0x10001, 0x10000),
    (DIV, 100, 7, 14), (MOD, 100, 7, 2), (AND, 0b1100, 0b1010, 0b1000), (OR, 0b1100, 0b1010, 0b1110),
    (XOR, 0b1100, 0b1010, 0b0110), (LSH, 0x80000001, 1, 2), (RSH, 0x80000000, 31, 1), (LSH, 1, 32, 0),
    (DIV, 5, 0, None), (MOD, 5, 0, None),  # division by zero ends the program with 0
]


@pytest.mark.parametrize("op,a,b,expect", ALU_CASES)
@pytest.mark.parametrize("src", [K, X])
def test_alu(op, a, b, expect, src):
    prog = [(LD | IMM, 0, 0, a), (LDX | W | IMM, 0, 0, b), (ALU | op | src, 0, 0, b), ret_a()]
    assert run(*prog) == (0 if expect is None else expect)


def test_neg_tax_txa():
    assert run((LD | IMM, 0, 0, 5), (ALU | NEG, 0, 0, 0), ret_a()) == 0xFFFFFFFB
    assert run((LD | IMM, 0, 0, 6), (MISC | TAX, 0, 0, 0), (LD | IMM, 0, 0, 0), (MISC | TXA, 0, 0, 0),
               ret_a()) == 6


JMP_CASES = [(JEQ, 5, 5, True), (JEQ, 5, 6, False), (JGT, 6, 5, True), (JGT, 5, 5, False),
             (JGE, 5, 5, True), (JGE, 4, 5, False), (JSET, 0b0110, 0b0100, True),
             (JSET, 0b0110, 0b1001, False), (JGT, 0xFFFFFFFF, 1, True)]  # comparisons are unsigned


@pytest.mark.parametrize("op,a,b,taken", JMP_CASES)
@pytest.mark.parametrize("src", [K, X])
def test_jumps(op, a, b, taken, src):
    prog = [(LD | IMM, 0, 0, a), (LDX | W | IMM, 0, 0, b), (JMP | op | src, 2, 0, b),
            (RET | K, 0, 0, 11), (RET | K, 0, 0, 22), (RET | K, 0, 0, 33)]
    assert run(*prog) == (33 if taken else 11)


def test_ja_and_ret_variants():
    assert run((JMP | JA, 0, 0, 1), (RET | K, 0, 0, 1), (RET | K, 0, 0, 2)) == 2
    assert run((LDX | W | IMM, 0, 0, 77), (RET | X, 0, 0, 0)) == 77
    assert Filter([(RET | K, 0, 0, 0)]).match(PKT) is False


@pytest.mark.parametrize("prog,msg", [
    ([], "empty"),
    ([(0xFF, 0, 0, 0), (RET | K, 0, 0, 1)], "unsupported opcode"),
    ([(LD | H | IMM, 0, 0, 0), (RET | K, 0, 0, 1)], "unsupported opcode"),
    ([(JMP | JEQ | K, 1, 0, 0), (RET | K, 0, 0, 1)], "jump out"),
    ([(JMP | JA, 0, 0, 5), (RET | K, 0, 0, 1)], "jump out"),
    ([(LD | IMM, 0, 0, 1)], "does not end with a ret"),
    ([(ST, 0, 0, 16), (RET | K, 0, 0, 1)], "scratch memory"),
    ([(LD | MEM, 0, 0, 99), (RET | K, 0, 0, 1)], "scratch memory"),
])
def test_validation(prog, msg):
    with pytest.raises(ValueError, match=msg):
        Filter(prog)


def test_libpcap_programs_use_x_and_memory_paths():
    """Expressions whose libpcap code goes through X, scratch memory and IND loads."""
    ack = FRAMES["ack"]  # TCP header at 34; ip[0] = 0x45, ip[1] = 0
    for expr, want in [("ip[0] + ip[1] = 0x45", True), ("ip[0] > ip[1]", True), ("ip[0] - ip[1] = 1", False),
                       ("ip[0] * ip[1] = 0", True), ("ip[ip[0] & 0xf] = 1", True), ("ip[0] % 3 = 0", True),
                       ("ip[0] / ip[1] = 0", False), ("tcp[0:2] = 80", True), ("tcp[13] & 0x10 != 0", True),
                       ("ip[0] ^ 0x40 = 5", True), ("ip[0] >> 4 = 4 and ip[0] << 1 = 0x8a", True)]:
        assert bpf.compile(expr).match(ack) is want, expr


# ------------------------------------------------------------------------------------ five_tuple

def test_five_tuple_expressions():
    assert bpf.five_tuple() == ""
    assert bpf.five_tuple("TCP", "10.244.1.5", "10.0.0.0/8", 40000, "80") == \
        "tcp and src host 10.244.1.5 and dst net 10.0.0.0/8 and src port 40000 and dst port 80"
    assert bpf.five_tuple(17, port="30000-32767") == "udp and portrange 30000-32767"
    assert bpf.five_tuple(47, host="fd00::1") == "proto 47 and host fd00::1"
    assert bpf.five_tuple("icmp", host="10.0.0.1") == "icmp and host 10.0.0.1"


@pytest.mark.parametrize("kw,matches", [
    (dict(proto="tcp", src="10.244.1.5", dst="10.0.0.1", sport=40000, dport=80), {"syn"}),
    (dict(proto="tcp", port=80), {"syn", "ack", "v6_tcp"}),
    (dict(proto="udp", dport=53), {"dns"}),
    (dict(proto="icmp", host="10.0.0.1"), {"echo", "reply"}),
    (dict(src="10.244.0.0/16", proto="udp"), {"dns", "ttl1", "frag_first", "frag_later"}),
    (dict(proto="udp", dport="30000-32767"), {"nodeport"}),
    (dict(dst="fd00::2"), {"v6_tcp"}),
    (dict(proto="tcp", src="10.244.1.5", dport=443), set()),  # only under a VLAN tag
])
def test_five_tuple_matches(kw, matches):
    f = bpf.compile(bpf.five_tuple(**kw))
    assert {n for n, fr in FRAMES.items() if f.match(fr)} == matches


@pytest.mark.parametrize("kw", [
    dict(proto="foo"), dict(proto=256), dict(proto="tcp; rm"), dict(src="10.0.0.300"),
    dict(dst="10.244.1.0/16"), dict(host="example.com"), dict(sport=70000), dict(dport="http"),
    dict(port="90-80"), dict(port="1-2-3"), dict(port=-1), dict(proto="icmp", dport=80),
    dict(proto=47, port=1),
])
def test_five_tuple_rejects(kw):
    with pytest.raises(ValueError):
        bpf.five_tuple(**kw)
