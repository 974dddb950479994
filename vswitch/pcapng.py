"""pcapng writer and pcap/pcapng reader (stdlib only) for `vswitch capture` and `vswitch replay`.

Format: draft-ietf-opsawg-pcapng (blocks and options padded to 32 bits, the block length
repeated at the end) and draft-ietf-opsawg-pcap for classic pcap files.

One Interface Description Block per (port, stage) being captured; a packet seen at several
stages becomes several Enhanced Packet Blocks carrying the same epb_packetid, so Wireshark can
correlate them. A stage's verdict is written as epb_verdict of type 0 ("Hardware": free-form
octets, the only type not tied to a Linux TC/XDP return code). Wireshark shows that type as
hex bytes only, so the verdict is also mirrored into an opt_comment ("verdict: <text>"), which
every tool displays; read_packets() strips that mirror again.
"""

from __future__ import annotations

import os
import struct
from typing import BinaryIO, Iterator, NamedTuple

LINKTYPE_ETHERNET = 1

# Block types
SHB, IDB, OPB, SPB, EPB = 0x0A0D0D0A, 1, 2, 3, 6
BYTE_ORDER_MAGIC = 0x1A2B3C4D
# Option codes
OPT_ENDOFOPT, OPT_COMMENT = 0, 1
SHB_OS, SHB_USERAPPL = 3, 4
IF_NAME, IF_DESCRIPTION, IF_TSRESOL, IF_TSOFFSET = 2, 3, 9, 14
EPB_FLAGS, EPB_PACKETID, EPB_VERDICT = 2, 5, 7
VERDICT_HW, VERDICT_TC, VERDICT_XDP = 0, 1, 2

_DIR_FLAGS = {"in": 1, "out": 2}
_DIR_NAMES = {1: "in", 2: "out"}
VERDICT_COMMENT = "verdict: "
MAX_BLOCK = 64 << 20  # refuse absurd lengths before allocating (a corrupt length is the usual cause)


def _pad(n: int) -> int:
    return -n % 4


def _opt(code: int, value: bytes) -> bytes:
    return struct.pack("<HH", code, len(value)) + value + bytes(_pad(len(value)))


def _block(btype: int, body: bytes) -> bytes:
    total = 12 + len(body)
    return struct.pack("<II", btype, total) + body + struct.pack("<I", total)


def _options(opts: list[bytes]) -> bytes:
    return b"".join(opts) + _opt(OPT_ENDOFOPT, b"") if opts else b""


class PcapngWriter:
    """Writes one little-endian pcapng section to ``fileobj`` (opened in binary mode).

    Each block goes out in one ``write`` call, so a reader on a pipe never sees half a block.
    close() flushes but leaves ``fileobj`` open (it belongs to the caller, as with zipfile).
    """

    def __init__(self, fileobj: BinaryIO, *, application: str = "vswitch", os_name: str | None = None):
        self._f = fileobj
        self._snaplens: list[int] = []
        self.closed = False
        opts = []
        if os_name:
            opts.append(_opt(SHB_OS, os_name.encode()))
        if application:
            opts.append(_opt(SHB_USERAPPL, application.encode()))
        # version 1.0, section length -1 (unknown: we stream)
        body = struct.pack("<IHHq", BYTE_ORDER_MAGIC, 1, 0, -1) + _options(opts)
        self._f.write(_block(SHB, body))

    def add_interface(self, name: str, description: str = "", linktype: int = LINKTYPE_ETHERNET,
                      snaplen: int = 262144) -> int:
        """Write an Interface Description Block (timestamps in ns); returns its interface id."""
        self._check_open()
        if not 0 <= snaplen < 1 << 32:
            raise ValueError(f"snaplen out of range: {snaplen}")
        opts = [_opt(IF_NAME, name.encode())]
        if description:
            opts.append(_opt(IF_DESCRIPTION, description.encode()))
        opts.append(_opt(IF_TSRESOL, bytes([9])))
        self._f.write(_block(IDB, struct.pack("<HHI", linktype, 0, snaplen) + _options(opts)))
        self._snaplens.append(snaplen)
        return len(self._snaplens) - 1

    def write_packet(self, if_id: int, ts_ns: int, frame: bytes, *, orig_len: int | None = None,
                     comment: str | None = None, direction: str | None = None,
                     packet_id: int | None = None, verdict: bytes | str | None = None) -> None:
        """Write an Enhanced Packet Block; a frame longer than the snaplen is cut, orig_len kept."""
        self._check_open()
        if not 0 <= if_id < len(self._snaplens):
            raise ValueError(f"unknown interface id {if_id}")
        if not 0 <= ts_ns < 1 << 64:
            raise ValueError(f"timestamp out of range: {ts_ns}")
        snaplen = self._snaplens[if_id]
        data = bytes(frame[:snaplen] if snaplen and len(frame) > snaplen else frame)
        orig_len = len(frame) if orig_len is None else orig_len
        if not len(data) <= orig_len < 1 << 32:
            raise ValueError(f"orig_len {orig_len} out of range (captured length {len(data)})")
        if packet_id is not None and not 0 <= packet_id < 1 << 64:
            raise ValueError(f"packet_id out of range: {packet_id}")
        opts = []
        if comment is not None:
            opts.append(_opt(OPT_COMMENT, comment.encode()))
        if verdict is not None:
            raw = verdict.encode() if isinstance(verdict, str) else bytes(verdict)
            opts.append(_opt(OPT_COMMENT, (VERDICT_COMMENT + raw.decode(errors="replace")).encode()))
        if direction is not None:
            if direction not in _DIR_FLAGS:
                raise ValueError(f"direction must be 'in' or 'out', not {direction!r}")
            opts.append(_opt(EPB_FLAGS, struct.pack("<I", _DIR_FLAGS[direction])))
        if packet_id is not None:
            opts.append(_opt(EPB_PACKETID, struct.pack("<Q", packet_id)))
        if verdict is not None:
            opts.append(_opt(EPB_VERDICT, bytes([VERDICT_HW]) + raw))
        body = struct.pack("<IIIII", if_id, ts_ns >> 32, ts_ns & 0xFFFFFFFF, len(data), orig_len)
        self._f.write(_block(EPB, body + data + bytes(_pad(len(data))) + _options(opts)))

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        if not self.closed:
            self.flush()
            self.closed = True

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError("write to a closed PcapngWriter")

    def __enter__(self) -> PcapngWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------------------- reader


class Record(NamedTuple):
    if_name: str | None  # None for classic pcap and unnamed interfaces
    ts_ns: int | None  # None for Simple Packet Blocks, which carry no timestamp
    frame: bytes
    options: dict  # comment, direction ("in"/"out"), packet_id, verdict, orig_len (if truncated)


_PCAP_MAGICS = {  # magic as read little-endian -> (byte order, ns per timestamp fraction unit)
    0xA1B2C3D4: ("<", 1000), 0xD4C3B2A1: (">", 1000),
    0xA1B23C4D: ("<", 1), 0x4D3CB2A1: (">", 1),
}


def read_packets(src: str | os.PathLike | BinaryIO) -> Iterator[Record]:
    """Records of a classic pcap or a pcapng file (Ethernet only), given a path or binary file.

    The file type is checked at once; corruption found later raises ValueError while iterating.
    """
    if isinstance(src, (str, os.PathLike)):
        name, f, own = os.fspath(src), open(src, "rb"), True
    else:
        name, f, own = str(getattr(src, "name", "<stream>")), src, False
    try:
        head = f.read(4)
        if len(head) < 4:
            raise ValueError(f"{name}: empty or truncated file (no pcap/pcapng header)")
        magic = struct.unpack("<I", head)[0]
        if magic == SHB:
            gen = _read_pcapng(f, name, head)
        elif magic in _PCAP_MAGICS:
            gen = _read_pcap(f, name, *_PCAP_MAGICS[magic])
        else:
            raise ValueError(f"{name}: not a pcap or pcapng file (magic 0x{magic:08x})")
    except BaseException:
        if own:
            f.close()
        raise
    return _closing(gen, f) if own else gen


def _closing(gen: Iterator[Record], f: BinaryIO) -> Iterator[Record]:
    with f:
        yield from gen


def _read_exact(f: BinaryIO, n: int, name: str, offset: int, what: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise ValueError(f"{name}: truncated {what} at offset {offset}")
    return data


def _read_pcap(f: BinaryIO, name: str, bo: str, ns_per_unit: int) -> Iterator[Record]:
    """Checks the file header now; the returned generator reads the records."""
    hdr = _read_exact(f, 20, name, 4, "pcap file header")
    major, _minor, _zone, _sigfigs, _snaplen, network = struct.unpack(bo + "HHiIII", hdr)
    if major != 2:
        raise ValueError(f"{name}: unsupported pcap version {major}")
    linktype = network & 0x03FFFFFF  # the top bits may carry FCS information
    if linktype != LINKTYPE_ETHERNET:
        raise ValueError(f"{name}: link type {linktype} is not supported (only Ethernet, 1)")
    return _pcap_records(f, name, bo, ns_per_unit)


def _pcap_records(f: BinaryIO, name: str, bo: str, ns_per_unit: int) -> Iterator[Record]:
    rec = struct.Struct(bo + "IIII")
    offset = 24
    while True:
        head = f.read(16)
        if not head:
            return
        if len(head) < 16:
            raise ValueError(f"{name}: truncated record header at offset {offset}")
        sec, frac, caplen, origlen = rec.unpack(head)
        if caplen > MAX_BLOCK:
            raise ValueError(f"{name}: bad captured length {caplen} at offset {offset}")
        frame = _read_exact(f, caplen, name, offset, "record")
        opts = {"orig_len": origlen} if origlen > caplen else {}
        yield Record(None, sec * 1_000_000_000 + frac * ns_per_unit, frame, opts)
        offset += 16 + caplen


def _parse_options(body: bytes, pos: int, bo: str, name: str, offset: int) -> list[tuple[int, bytes]]:
    out = []
    while pos + 4 <= len(body):
        code, length = struct.unpack_from(bo + "HH", body, pos)
        if code == OPT_ENDOFOPT:
            break
        end = pos + 4 + length
        if end > len(body):
            raise ValueError(f"{name}: option {code} overruns its block at offset {offset}")
        out.append((code, body[pos + 4:end]))
        pos = end + _pad(length)
    return out


def _tsresol_ns(v: int) -> tuple[int, int]:
    """if_tsresol -> (numerator, denominator) turning timestamp units into ns."""
    if v & 0x80:
        return 1_000_000_000, 1 << (v & 0x7F)
    return (10 ** (9 - v), 1) if v <= 9 else (1, 10 ** (v - 9))


def _epb_options(opts: list[tuple[int, bytes]], bo: str) -> dict:
    out: dict = {}
    comments = []
    for code, val in opts:
        if code == OPT_COMMENT:
            comments.append(val.decode("utf-8", "replace"))
        elif code == EPB_FLAGS and len(val) == 4:
            d = _DIR_NAMES.get(struct.unpack(bo + "I", val)[0] & 3)
            if d:
                out["direction"] = d
        elif code == EPB_PACKETID and len(val) == 8:
            out["packet_id"] = struct.unpack(bo + "Q", val)[0]
        elif code == EPB_VERDICT and val and "verdict" not in out:
            if val[0] in (VERDICT_TC, VERDICT_XDP) and len(val) == 9:
                out["verdict"] = struct.unpack(bo + "q", val[1:])[0]
            else:
                out["verdict"] = val[1:]
    if "verdict" in out and isinstance(out["verdict"], bytes):  # drop the writer's mirror
        mirror = VERDICT_COMMENT + out["verdict"].decode("utf-8", "replace")
        if mirror in comments:
            comments.remove(mirror)
    if comments:
        out["comment"] = "\n".join(comments)
    return out


def _read_pcapng(f: BinaryIO, name: str, first: bytes) -> Iterator[Record]:
    offset, bo = 0, "<"
    ifaces: list[tuple[str | None, int, int, int, int, int]] = []  # name, linktype, snaplen, num, den, tsoffset
    pending = first
    while True:
        head = pending + f.read(8 - len(pending))
        pending = b""
        if not head:
            return
        if len(head) < 8:
            raise ValueError(f"{name}: truncated block at offset {offset}")
        if struct.unpack("<I", head[:4])[0] == SHB:  # its own magic fixes the byte order
            m = _read_exact(f, 4, name, offset, "block")
            if m == struct.pack("<I", BYTE_ORDER_MAGIC):
                bo = "<"
            elif m == struct.pack(">I", BYTE_ORDER_MAGIC):
                bo = ">"
            else:
                raise ValueError(f"{name}: bad byte-order magic in section header at offset {offset}")
            head += m
        btype, total = struct.unpack(bo + "II", head[:8])
        if total < 12 or total % 4 or total > MAX_BLOCK or (btype == SHB and total < 28):
            raise ValueError(f"{name}: bad block length {total} at offset {offset}")
        rest = _read_exact(f, total - len(head), name, offset, "block")
        block = head + rest
        if struct.unpack_from(bo + "I", block, total - 4)[0] != total:
            raise ValueError(f"{name}: block length mismatch at offset {offset}")
        body = block[8:total - 4]
        if btype == SHB:
            major = struct.unpack_from(bo + "H", body, 4)[0]
            if major != 1:
                raise ValueError(f"{name}: unsupported pcapng version {major} at offset {offset}")
            ifaces = []  # a new section starts its own interface list
        elif btype == IDB:
            if len(body) < 8:
                raise ValueError(f"{name}: short interface description block at offset {offset}")
            linktype, _, snaplen = struct.unpack_from(bo + "HHI", body)
            ifname, num, den, tsoff = None, 1000, 1, 0  # default resolution: microseconds
            for code, val in _parse_options(body, 8, bo, name, offset):
                if code == IF_NAME:
                    ifname = val.decode("utf-8", "replace").rstrip("\0")
                elif code == IF_TSRESOL and len(val) >= 1:
                    num, den = _tsresol_ns(val[0])
                elif code == IF_TSOFFSET and len(val) == 8:
                    tsoff = struct.unpack(bo + "q", val)[0]
            ifaces.append((ifname, linktype, snaplen, num, den, tsoff))
        elif btype in (EPB, OPB, SPB):
            if btype == SPB:
                if_id, fixed = 0, 4
            else:
                fixed = 20
                if len(body) < fixed:
                    raise ValueError(f"{name}: short packet block at offset {offset}")
                if btype == EPB:
                    if_id, ts_hi, ts_lo, caplen, origlen = struct.unpack_from(bo + "IIIII", body)
                else:  # obsolete Packet Block: 16-bit interface id and drop count
                    if_id, _drops, ts_hi, ts_lo, caplen, origlen = struct.unpack_from(bo + "HHIIII", body)
            if if_id >= len(ifaces):
                raise ValueError(f"{name}: packet for undeclared interface {if_id} at offset {offset}")
            ifname, linktype, snaplen, num, den, tsoff = ifaces[if_id]
            if linktype != LINKTYPE_ETHERNET:
                raise ValueError(f"{name}: interface {if_id} has link type {linktype}, "
                                 "only Ethernet (1) is supported")
            if btype == SPB:
                if len(body) < 4:
                    raise ValueError(f"{name}: short simple packet block at offset {offset}")
                origlen = struct.unpack_from(bo + "I", body)[0]
                caplen = min(origlen, len(body) - 4, snaplen or origlen)
                ts, opts = None, {}
            else:
                ts = tsoff * 1_000_000_000 + (((ts_hi << 32) | ts_lo) * num) // den
            if fixed + caplen > len(body):
                raise ValueError(f"{name}: packet data overruns its block at offset {offset}")
            frame = body[fixed:fixed + caplen]
            if btype != SPB:
                opts = _epb_options(_parse_options(body, fixed + caplen + _pad(caplen), bo, name, offset), bo)
            if origlen > caplen:
                opts["orig_len"] = origlen
            yield Record(ifname, ts, frame, opts)
        # other block types (name resolution, statistics, custom, ...) are skipped
        offset += total
