"""vswitch.pcapng: writer -> reader round trip, scapy and tshark as independent readers, classic
pcap input, and corrupt files (a clear ValueError, never a hang or another exception)."""

from __future__ import annotations

import io
import shutil
import struct
import subprocess
from decimal import Decimal

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw
from scapy.utils import PcapWriter, rdpcap, wrpcap

from vswitch.pcapng import PcapngWriter, read_packets

MACS = dict(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
TCP_FRAME = bytes(Ether(**MACS) / IP(src="10.244.1.5", dst="10.244.2.7") / TCP(sport=40000, dport=80))
BIG_FRAME = bytes(Ether(**MACS) / IP(src="10.244.1.5", dst="10.244.2.7") / UDP(dport=53) / Raw(bytes(300)))
T0 = 1_700_000_000_123_456_789

# (if index, ts_ns, frame, write kwargs)
PACKETS = [
    (0, T0, TCP_FRAME, dict(comment="first", direction="in", packet_id=7)),
    (1, T0 + 1_000, TCP_FRAME, dict(direction="out", packet_id=7, verdict="drop: fdb-miss")),
    (2, T0 + 2_001, BIG_FRAME, dict(direction="in", packet_id=2**64 - 1, verdict=b"forward",
                                   comment="héllo, ünïcode")),
    (0, T0 + 10**9, BIG_FRAME, {}),
]


def write_sample(f) -> None:
    w = PcapngWriter(f, os_name="Linux")
    assert w.add_interface("pod-a/eth-input", "port pod-a, stage eth-input") == 0
    assert w.add_interface("pod-a/l2-forward") == 1
    assert w.add_interface("uplink/port-tx", snaplen=64) == 2
    for if_id, ts, frame, kw in PACKETS:
        w.write_packet(if_id, ts, frame, **kw)
    w.close()


@pytest.fixture
def sample(tmp_path):
    path = tmp_path / "sample.pcapng"
    with open(path, "wb") as f:
        write_sample(f)
    return path


def test_round_trip(sample):
    recs = list(read_packets(sample))
    names = ["pod-a/eth-input", "pod-a/l2-forward", "uplink/port-tx", "pod-a/eth-input"]
    assert [r.if_name for r in recs] == names
    assert [r.ts_ns for r in recs] == [p[1] for p in PACKETS]
    assert recs[0].frame == recs[1].frame == TCP_FRAME and recs[3].frame == BIG_FRAME
    assert recs[2].frame == BIG_FRAME[:64]  # cut to the interface's snaplen
    assert recs[0].options == {"comment": "first", "direction": "in", "packet_id": 7}
    assert recs[1].options == {"direction": "out", "packet_id": 7, "verdict": b"drop: fdb-miss"}
    assert recs[2].options == {"direction": "in", "packet_id": 2**64 - 1, "verdict": b"forward",
                               "comment": "héllo, ünïcode", "orig_len": len(BIG_FRAME)}
    assert recs[3].options == {}
    # a file object works as well as a path, and blocks are 32-bit aligned
    data = sample.read_bytes()
    assert len(data) % 4 == 0
    assert list(read_packets(io.BytesIO(data))) == recs


def test_writer_rejects_bad_arguments():
    w = PcapngWriter(io.BytesIO())
    i = w.add_interface("p")
    for kw in (dict(direction="sideways"), dict(orig_len=3), dict(packet_id=2**64), dict(packet_id=-1)):
        with pytest.raises(ValueError):
            w.write_packet(i, 0, TCP_FRAME, **kw)
    with pytest.raises(ValueError):
        w.write_packet(5, 0, TCP_FRAME)
    with pytest.raises(ValueError):
        w.write_packet(i, -1, TCP_FRAME)
    w.close()
    with pytest.raises(ValueError):
        w.write_packet(i, 0, TCP_FRAME)


def test_scapy_reads_it(sample):
    pkts = rdpcap(str(sample))
    assert [bytes(p) for p in pkts] == [r.frame for r in read_packets(sample)]
    assert [Decimal(p.time) for p in pkts] == [Decimal(ts) / 10**9 for _, ts, _, _ in PACKETS]
    assert pkts[0].comment == b"first" and pkts[2].wirelen == len(BIG_FRAME)
    if hasattr(pkts[0], "sniffed_on"):  # scapy >= 2.6 maps if_name and the direction flags
        assert [p.sniffed_on for p in pkts][:3] == ["pod-a/eth-input", "pod-a/l2-forward", "uplink/port-tx"]
        assert [p.direction for p in pkts][:3] == [1, 2, 1]


def test_tshark_reads_it(sample):
    tshark = shutil.which("tshark")
    if tshark:  # optional locally and in CI: an independent check of the Wireshark view
        fields = ["frame.interface_name", "frame.interface_description", "frame.comment",
                  "frame.packet_flags_direction", "frame.packet_id", "frame.verdict.hw",
                  "frame.time_epoch", "frame.len", "frame.cap_len"]
        cmd = [tshark, "-n", "-r", str(sample), "-T", "fields", "-E", "aggregator=|"]
        for fld in fields:
            cmd += ["-e", fld]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        rows = [dict(zip(fields, line.split("\t"))) for line in res.stdout.splitlines()]
        assert len(rows) == len(PACKETS)
        assert [r["frame.interface_name"] for r in rows] == [
            "pod-a/eth-input", "pod-a/l2-forward", "uplink/port-tx", "pod-a/eth-input"]
        assert rows[0]["frame.interface_description"] == "port pod-a, stage eth-input"
        # the verdict is mirrored in a comment because tshark shows a "Hardware" verdict as hex
        assert [r["frame.comment"] for r in rows] == [
            "first", "verdict: drop: fdb-miss", "héllo, ünïcode|verdict: forward", ""]
        assert [int(r["frame.packet_flags_direction"] or "0", 0) for r in rows] == [1, 2, 1, 0]
        assert [r["frame.packet_id"] for r in rows] == ["7", "7", str(2**64 - 1), ""]
        hw = [bytes.fromhex(r["frame.verdict.hw"].replace(" ", "").replace(":", "")) for r in rows]
        assert hw == [b"", b"drop: fdb-miss", b"forward", b""]
        assert [Decimal(r["frame.time_epoch"]) for r in rows] == [Decimal(p[1]) / 10**9 for p in PACKETS]
        assert [(int(r["frame.len"]), int(r["frame.cap_len"])) for r in rows][2] == (len(BIG_FRAME), 64)


@pytest.mark.parametrize("nano", [False, True])
def test_reads_scapy_classic_pcap(tmp_path, nano):
    path = tmp_path / "c.pcap"
    pkts = [Ether(TCP_FRAME), Ether(BIG_FRAME)]
    pkts[0].time, pkts[1].time = Decimal("1700000000.123456"), Decimal("1700000001.000001")
    w = PcapWriter(str(path), nano=nano, snaplen=100)
    w.write(pkts)
    w.close()
    recs = list(read_packets(path))
    assert [r.frame for r in recs] == [TCP_FRAME, BIG_FRAME]
    assert [r.ts_ns for r in recs] == [1_700_000_000_123_456_000, 1_700_000_001_000_001_000]
    assert all(r.if_name is None and r.options == {} for r in recs)


def test_reads_big_endian_classic_pcap():
    hdr = struct.pack(">IHHiIII", 0xA1B23C4D, 2, 4, 0, 0, 65535, 1)  # nanosecond magic
    rec = struct.pack(">IIII", 5, 7, 20, len(TCP_FRAME)) + TCP_FRAME[:20]
    (r,) = read_packets(io.BytesIO(hdr + rec))
    assert (r.ts_ns, r.frame, r.options) == (5_000_000_007, TCP_FRAME[:20], {"orig_len": len(TCP_FRAME)})


def test_classic_pcap_non_ethernet_rejected(tmp_path):
    path = tmp_path / "raw.pcap"
    wrpcap(str(path), [IP(src="10.0.0.1", dst="10.0.0.2") / UDP()], linktype=101)
    with pytest.raises(ValueError, match="link type 101"):
        list(read_packets(path))


def _be_block(btype: int, body: bytes) -> bytes:
    body += bytes(-len(body) % 4)
    return struct.pack(">II", btype, len(body) + 12) + body + struct.pack(">I", len(body) + 12)


def _be_opt(code: int, val: bytes) -> bytes:
    return struct.pack(">HH", code, len(val)) + val + bytes(-len(val) % 4)


def test_reads_big_endian_pcapng_tsresol_spb_and_skips_unknown_blocks():
    shb = _be_block(0x0A0D0D0A, struct.pack(">IHHq", 0x1A2B3C4D, 1, 0, -1))
    idb = _be_block(1, struct.pack(">HHI", 1, 0, 0) + _be_opt(2, b"eth0") + _be_opt(9, bytes([0x8A]))
                    + _be_opt(0, b""))  # 2^-10 s units
    epb = _be_block(6, struct.pack(">IIIII", 0, 0, 3 * 1024 + 512, len(TCP_FRAME), len(TCP_FRAME)) + TCP_FRAME + bytes(2)
                    + _be_opt(2, struct.pack(">I", 2)) + _be_opt(5, struct.pack(">Q", 99)) + _be_opt(0, b""))
    unknown = _be_block(0x0BAD, b"ignored!")
    spb = _be_block(3, struct.pack(">I", len(BIG_FRAME)) + BIG_FRAME)
    idb_us = _be_block(1, struct.pack(">HHI", 1, 0, 0))  # default microseconds, no name
    epb_us = _be_block(6, struct.pack(">IIIII", 1, 0, 1_500_000, len(TCP_FRAME), len(TCP_FRAME)) + TCP_FRAME)
    recs = list(read_packets(io.BytesIO(shb + idb + epb + unknown + spb + idb_us + epb_us)))
    assert recs[0] == ("eth0", 3_500_000_000, TCP_FRAME, {"direction": "out", "packet_id": 99})
    assert recs[1] == ("eth0", None, BIG_FRAME, {})
    assert recs[2] == (None, 1_500_000_000, TCP_FRAME, {})


def test_second_section_resets_interfaces(sample):
    data = sample.read_bytes()
    assert len(list(read_packets(io.BytesIO(data + data)))) == 2 * len(PACKETS)
    shb_only = data[:struct.unpack_from("<I", data, 4)[0]]
    epb = data[-(struct.unpack_from("<I", data, len(data) - 4)[0]):]
    with pytest.raises(ValueError, match="undeclared interface 0"):
        list(read_packets(io.BytesIO(data + shb_only + epb)))


def test_truncated_at_every_offset(sample):
    data = sample.read_bytes()
    boundaries, off = set(), 0
    while off < len(data):
        boundaries.add(off)
        off += struct.unpack_from("<I", data, off + 4)[0]
    for cut in range(len(data)):
        f = io.BytesIO(data[:cut])
        if cut < 4:
            with pytest.raises(ValueError, match="empty or truncated"):
                read_packets(f)
            continue
        got = []
        if cut in boundaries:  # a clean cut between blocks reads as a shorter file
            got = list(read_packets(f))
        else:
            with pytest.raises(ValueError, match=r"<stream>: truncated (block|record) at offset \d+"):
                for r in read_packets(f):
                    got.append(r)
        assert len(got) <= len(PACKETS)


def test_corrupt_pcapng_clear_errors(sample):
    data = sample.read_bytes()
    shb_len = struct.unpack_from("<I", data, 4)[0]
    idb_off = shb_len

    def patched(off, fmt, val):
        b = bytearray(data)
        struct.pack_into(fmt, b, off, val)
        return io.BytesIO(bytes(b))

    cases = [
        (patched(idb_off + 4, "<I", 13), "bad block length 13"),
        (patched(idb_off + 4, "<I", 0xFFFFFFF0), "bad block length"),
        (patched(idb_off + 4, "<I", 8), "bad block length 8"),
        (patched(8, "<I", 0x12345678), "bad byte-order magic"),
        (patched(12, "<H", 2), "unsupported pcapng version 2"),
        (patched(idb_off + 8, "<H", 105), "link type 105"),  # IDB linktype -> 802.11
        (patched(idb_off + 8 + 8 + 2, "<H", 200), "option 2 overruns"),  # if_name length
        (io.BytesIO(b"GIF89a" + bytes(40)), "not a pcap or pcapng file"),
    ]
    # the block-length trailer of the IDB no longer matches its header
    idb_len = struct.unpack_from("<I", data, idb_off + 4)[0]
    cases.append((patched(idb_off + idb_len - 4, "<I", idb_len + 4), "block length mismatch"))
    for f, msg in cases:
        with pytest.raises(ValueError, match=msg):
            list(read_packets(f))


def test_corrupt_classic_pcap(tmp_path):
    path = tmp_path / "c.pcap"
    wrpcap(str(path), [Ether(TCP_FRAME)])
    data = path.read_bytes()
    with pytest.raises(ValueError, match="truncated record at offset 24"):
        list(read_packets(io.BytesIO(data[:-5])))
    with pytest.raises(ValueError, match="truncated record header at offset 24"):
        list(read_packets(io.BytesIO(data[:30])))
    with pytest.raises(ValueError, match="truncated pcap file header"):
        read_packets(io.BytesIO(data[:10]))
    bad = bytearray(data)
    struct.pack_into("<I", bad, 24 + 8, 0x7FFFFFFF)  # absurd caplen: refused, not allocated
    with pytest.raises(ValueError, match="bad captured length"):
        list(read_packets(io.BytesIO(bytes(bad))))
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        read_packets(tmp_path / "empty")
