"""tcpdump-style capture filters: compiled by the real libpcap, run by a classic-BPF interpreter.

`tcpdump -ddd -y EN10MB -- EXPR` prints the program libpcap would load (first line: the
instruction count, then "code jt jf k" per line), so every tcpdump expression works exactly as in
tcpdump. The program runs here on a bare Ethernet frame (no virtio-net header) with the kernel's
semantics: an out-of-bounds packet load or a division by zero ends the program with 0 (reject).

libpcap compiles for a dead EN10MB handle, so VLAN tests read the 802.1Q tag from the frame
bytes (a live Linux socket would use the kernel's ancillary SKF_AD_VLAN_* loads instead).
"""

from __future__ import annotations

import functools
import ipaddress
import shutil
import subprocess
from typing import Iterable, NamedTuple

M32 = 0xFFFFFFFF
MEMWORDS = 16

# instruction classes
LD, LDX, ST, STX, ALU, JMP, RET, MISC = range(8)
# ld/ldx sizes and modes
W, H, B = 0x00, 0x08, 0x10
IMM, ABS, IND, MEM, LEN, MSH = 0x00, 0x20, 0x40, 0x60, 0x80, 0xA0
# alu/jmp operations and sources
ADD, SUB, MUL, DIV, OR, AND, LSH, RSH, NEG, MOD, XOR = (0x00, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60,
                                                        0x70, 0x80, 0x90, 0xA0)
JA, JEQ, JGT, JGE, JSET = 0x00, 0x10, 0x20, 0x30, 0x40
K, X = 0x00, 0x08
RET_A = 0x10
TAX, TXA = 0x00, 0x80

_SIZES = {W: 4, H: 2, B: 1}
_ALU_OPS = {
    ADD: lambda a, b: (a + b) & M32, SUB: lambda a, b: (a - b) & M32,
    MUL: lambda a, b: (a * b) & M32, OR: lambda a, b: a | b, AND: lambda a, b: a & b,
    XOR: lambda a, b: a ^ b,
    LSH: lambda a, b: (a << b) & M32 if b < 32 else 0, RSH: lambda a, b: a >> b if b < 32 else 0,
}
_JMP_OPS = {JEQ: lambda a, b: a == b, JGT: lambda a, b: a > b, JGE: lambda a, b: a >= b,
            JSET: lambda a, b: a & b != 0}


class Insn(NamedTuple):
    code: int
    jt: int
    jf: int
    k: int


def _validate(insns: list[Insn]) -> None:
    """Reject what the kernel's checker would: bad opcodes, jumps out of the program, no final ret."""
    if not insns:
        raise ValueError("empty BPF program")
    n = len(insns)
    for pc, (code, jt, jf, k) in enumerate(insns):
        cls = code & 7
        if not (0 <= code <= 0xFFFF and 0 <= jt <= 255 and 0 <= jf <= 255 and 0 <= k <= M32):
            raise ValueError(f"BPF insn {pc}: field out of range")
        ok = True
        if cls in (LD, LDX):
            size, mode = code & 0x18, code & 0xE0
            if cls == LD:
                ok = (mode in (ABS, IND) and size in _SIZES) or code in (LD | IMM, LD | MEM, LD | W | LEN)
            else:
                ok = code in (LDX | W | IMM, LDX | W | MEM, LDX | W | LEN, LDX | B | MSH)
            if ok and mode == MEM and k >= MEMWORDS:
                raise ValueError(f"BPF insn {pc}: scratch memory index {k} out of range")
        elif cls in (ST, STX):
            ok = code == cls
            if k >= MEMWORDS:
                raise ValueError(f"BPF insn {pc}: scratch memory index {k} out of range")
        elif cls == ALU:
            op = code & 0xF0
            ok = (op == NEG and code == ALU | NEG) or (
                op in (*_ALU_OPS, DIV, MOD) and code & ~0xF8 == ALU)
        elif cls == JMP:
            op = code & 0xF0
            if code == JMP | JA:
                if pc + 1 + k >= n:
                    raise ValueError(f"BPF insn {pc}: jump out of the program")
            elif op in _JMP_OPS and code & ~0xF8 == JMP:
                if pc + 1 + max(jt, jf) >= n:
                    raise ValueError(f"BPF insn {pc}: jump out of the program")
            else:
                ok = False
        elif cls == RET:
            ok = code in (RET | K, RET | X, RET | RET_A)
        else:
            ok = code in (MISC | TAX, MISC | TXA)
        if not ok:
            raise ValueError(f"BPF insn {pc}: unsupported opcode 0x{code:02x}")
    if insns[-1].code & 7 != RET:
        raise ValueError("BPF program does not end with a ret")


class Filter:
    """A validated classic-BPF program; ``match(frame)`` is true when it returns non-zero."""

    def __init__(self, insns: Iterable[tuple[int, int, int, int]], expr: str | None = None):
        self.insns = [Insn(*i) for i in insns]
        _validate(self.insns)
        self.expr = expr

    def __repr__(self) -> str:
        return f"Filter({self.expr!r}, {len(self.insns)} insns)"

    def __call__(self, frame: bytes, wirelen: int | None = None) -> bool:
        return self.match(frame, wirelen)

    def match(self, frame: bytes, wirelen: int | None = None) -> bool:
        return self.run(frame, wirelen) != 0

    def run(self, pkt: bytes, wirelen: int | None = None) -> int:
        """The program's return value (the snap length to keep; 0 = reject).

        ``wirelen`` is the packet's length on the wire (``len``), when ``pkt`` was cut short.
        """
        insns, plen = self.insns, len(pkt)
        wlen = plen if wirelen is None else wirelen
        a = x = pc = 0
        mem = [0] * MEMWORDS
        while True:
            code, jt, jf, k = insns[pc]
            pc += 1
            cls = code & 7
            if cls == LD or cls == LDX:
                mode = code & 0xE0
                if mode == ABS or mode == IND:
                    off = k if mode == ABS else x + k  # no 32-bit wrap, as in libpcap
                    size = _SIZES[code & 0x18]
                    if off + size > plen:
                        return 0
                    a = int.from_bytes(pkt[off:off + size], "big")
                elif mode == MSH:
                    if k >= plen:
                        return 0
                    x = (pkt[k] & 0xF) << 2
                else:
                    v = k if mode == IMM else mem[k] if mode == MEM else wlen
                    if cls == LD:
                        a = v
                    else:
                        x = v
            elif cls == JMP:
                op = code & 0xF0
                if op == JA:
                    pc += k
                else:
                    pc += jt if _JMP_OPS[op](a, x if code & X else k) else jf
            elif cls == ALU:
                op = code & 0xF0
                b = x if code & X else k
                if op == NEG:
                    a = -a & M32
                elif op == DIV or op == MOD:
                    if b == 0:
                        return 0
                    a = a // b if op == DIV else a % b
                else:
                    a = _ALU_OPS[op](a, b)
            elif cls == RET:
                return k if code == RET | K else a if code == RET | RET_A else x
            elif cls == ST:
                mem[k] = a
            elif cls == STX:
                mem[k] = x
            else:
                if code == MISC | TAX:
                    x = a
                else:
                    a = x


@functools.lru_cache(maxsize=64)
def compile(expr: str) -> Filter:  # noqa: A001 - mirrors pcap_compile / re.compile
    """Compile a tcpdump filter expression for Ethernet frames; ValueError on a bad one."""
    tcpdump = shutil.which("tcpdump")
    if tcpdump is None:
        raise ValueError("filter expressions need tcpdump (libpcap's compiler) on PATH: "
                         "install it with scripts/install.sh or `apt-get install tcpdump`")
    args = [tcpdump, "-ddd", "-y", "EN10MB", "--"] + ([expr] if expr.strip() else [])
    try:
        res = subprocess.run(args, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise ValueError(f"tcpdump took too long compiling {expr!r}") from None
    if res.returncode != 0:
        msg = res.stderr.strip().removeprefix("tcpdump: ") or f"tcpdump exited with {res.returncode}"
        raise ValueError(f"bad filter expression {expr!r}: {msg}")
    lines = res.stdout.split("\n")
    try:
        n = int(lines[0])
        insns = [tuple(int(v) for v in line.split()) for line in lines[1:n + 1]]
        if len(insns) != n or any(len(i) != 4 for i in insns):
            raise ValueError
    except ValueError:
        raise ValueError(f"unexpected tcpdump -ddd output for {expr!r}: {res.stdout[:200]!r}") from None
    return Filter(insns, expr)


_PROTOS = {"tcp", "udp", "sctp", "icmp", "icmp6"}
_PORT_PROTOS = {"tcp", "udp", "sctp"}


def _port(v: int | str, what: str) -> str:
    """'80' -> 'port 80'; '30000-32767' -> 'portrange 30000-32767' (without the direction)."""
    s = str(v).strip()
    parts = s.split("-")
    if len(parts) > 2 or not all(p.isdigit() and int(p) <= 65535 for p in parts):
        raise ValueError(f"bad {what}: {v!r} (a port 0-65535 or a range LOW-HIGH)")
    if len(parts) == 2:
        lo, hi = (int(p) for p in parts)
        if lo > hi:
            raise ValueError(f"bad {what}: {v!r} (range LOW-HIGH with LOW <= HIGH)")
        return f"portrange {lo}-{hi}"
    return f"port {int(s)}"


def _addr(v: str, what: str) -> str:
    """'10.0.0.1' -> 'host 10.0.0.1'; '10.244.0.0/16' -> 'net 10.244.0.0/16'."""
    s = str(v).strip()
    try:
        if "/" in s:
            return f"net {ipaddress.ip_network(s, strict=True)}"
        return f"host {ipaddress.ip_address(s)}"
    except ValueError as e:
        raise ValueError(f"bad {what}: {v!r} ({e})") from None


def five_tuple(proto: str | int | None = None, src: str | None = None, dst: str | None = None,
               sport: int | str | None = None, dport: int | str | None = None,
               host: str | None = None, port: int | str | None = None) -> str:
    """The tcpdump expression for a 5-tuple match; "" (everything) when nothing is given.

    Addresses may be IPv4/IPv6 hosts or CIDR networks; ports may be ranges "LOW-HIGH";
    ``host``/``port`` match either direction. proto is a name (tcp, udp, sctp, icmp, icmp6)
    or an IP protocol number.
    """
    terms = []
    pname = None
    if proto is not None:
        p = str(proto).strip().lower()
        if p in _PROTOS:
            pname = p
            terms.append(p)
        elif p.isdigit() and int(p) <= 255:
            pname = {6: "tcp", 17: "udp", 132: "sctp"}.get(int(p))
            terms.append(pname or f"proto {int(p)}")  # bare "proto N": ip or ip6
        else:
            raise ValueError(f"bad proto: {proto!r} (tcp, udp, sctp, icmp, icmp6 or 0-255)")
    for qual, v in (("src", src), ("dst", dst), ("", host)):
        if v is not None:
            terms.append(f"{qual} {_addr(v, qual or 'host')}".strip())
    ports = [(q, v) for q, v in (("src", sport), ("dst", dport), ("", port)) if v is not None]
    if ports and proto is not None and pname not in _PORT_PROTOS:
        raise ValueError(f"ports need proto tcp, udp or sctp, not {proto!r}")
    for qual, v in ports:
        terms.append(f"{qual} {_port(v, qual + 'port' if qual else 'port')}".strip())
    return " and ".join(terms)
