"""The VTEP's port: VXLAN over real UDP sockets on the asyncio loop (no kernel vxlan device).

Transmit: the router hands us an inner frame already addressed to a remote
VTEP MAC (flannel's permanent neighbour entry); the FDB gives the remote
node's underlay address. A TSO super-frame is cut into MSS-sized segments
first (overlay.segment), each gets its VXLAN header, and all of them leave in
one ``sendmsg`` with ``UDP_SEGMENT`` (UDP GSO: the kernel slices the buffer
into equal datagrams). The outer UDP source port is a hash of the inner flow,
as the kernel's vxlan does, so a flow keeps one source port: one socket per
source port in use, bound lazily (kept in a small LRU).

Receive: one socket bound to <node address>:8472 with ``UDP_GRO``, so one
``recvmsg`` can return many datagrams of a flow glued together; each is
checked as vxlan_rcv checks it and its inner frame goes to the router.
The kernel's UDP layer has already dropped datagrams with a bad checksum.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
from collections import OrderedDict
from time import monotonic

from vswitch.packet import VNET_LEN, ZERO_VNET
from vswitch.ports.base import Port

from . import gro, segment, vxlan
from .vtep import Vtep

SOL_UDP = 17
UDP_SEGMENT = 103
UDP_GRO = 104
MAX_UDP_PAYLOAD = 65507
MAX_GSO_SEGMENTS = 64  # UDP_MAX_SEGMENTS in older kernels (128 since 6.x): stay under both
TX_SOCKETS = 256  # source ports with an open socket
RX_ANC = socket.CMSG_SPACE(4) + socket.CMSG_SPACE(4)  # UDP_GRO's segment size, IP_TOS (IP_RECVTOS)
IP_MTU_DISCOVER, IP_PMTUDISC_DONT = 10, 0  # linux/in.h (Python does not export them)
SO_RCVBUFFORCE = 33  # past net.core.rmem_max; needs CAP_NET_ADMIN, else SO_RCVBUF (capped)
RX_BUFFER = 8 << 20


class VxlanPort(Port):
    kind = "vxlan"

    def __init__(self, name: str, vtep: Vtep, *, mtu: int = 1450, gso: bool = True, gro: bool = True) -> None:
        super().__init__(name, hairpin=False, mtu=mtu)
        self.vtep = vtep
        self.want_gso, self.want_gro = gso, gro
        self.gso = self.gro = False
        self.rx = None
        self.tx: "OrderedDict[int, socket.socket]" = OrderedDict()
        self._loop = None
        self._local = str(ipaddress.IPv4Address(vtep.local))
        self.socket_optional = False  # set for the pipeline datapath (overlay.stages)

    # --- lifecycle --------------------------------------------------------
    def open(self) -> None:
        try:
            self.rx = self._socket(self.vtep.port)
        except OSError:
            if not self.socket_optional:
                raise
            # The pipeline datapath needs no socket: the host stack may not hold the underlay address.
            self.offloads = ("pipeline",)
            return
        # A 64 KB GRO batch costs its truesize in the receive buffer: the default (~208 KB) holds
        # a handful, and an overflow loses whole batches (RcvbufErrors), i.e. TCP retransmits.
        for opt in (SO_RCVBUFFORCE, socket.SO_RCVBUF):
            try:
                self.rx.setsockopt(socket.SOL_SOCKET, opt, RX_BUFFER)
                break
            except OSError:
                continue
        # The outer TOS, for RFC 6040 on receive (vxlan_rcv's IP_ECN_decapsulate)
        self.rx.setsockopt(socket.IPPROTO_IP, socket.IP_RECVTOS, 1)
        if self.want_gro:
            try:
                self.rx.setsockopt(SOL_UDP, UDP_GRO, 1)
                self.gro = True
            except OSError:
                pass
        self.gso = self.want_gso and self._probe_gso()
        self.offloads = tuple(n for n, on in (("udp-gso", self.gso), ("udp-gro", self.gro),
                                              ("pipeline", self.socket_optional)) if on)

    def _socket(self, port: int) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            # Outer headers as vxlan builds them: DF clear, TTL 64 (the socket's UDP checksum stays on).
            s.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DONT)
            s.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, 64)
            s.bind((self._local, port))
        except OSError as e:
            s.close()
            raise OSError(e.errno, f"port {self.name}: cannot bind UDP {self._local}:{port}: {e.strerror}") from None
        s.setblocking(False)
        return s

    def _probe_gso(self) -> bool:
        try:
            self.rx.getsockopt(SOL_UDP, UDP_SEGMENT)
            return True
        except OSError:
            return False

    def start(self, loop, deliver) -> None:
        super().start(loop, deliver)
        self._loop = loop
        if loop is not None and self.rx is not None:
            loop.add_reader(self.rx.fileno(), self._on_readable)

    def close(self) -> None:
        if self._loop is not None and self.rx is not None:
            self._loop.remove_reader(self.rx.fileno())
        self._loop = None
        for s in self.tx.values():
            s.close()
        self.tx.clear()
        if self.rx is not None:
            self.rx.close()
            self.rx = None
        super().close()

    # --- transmit ---------------------------------------------------------
    def _tx_socket(self, sport: int) -> socket.socket:
        s = self.tx.get(sport)
        if s is not None:
            self.tx.move_to_end(sport)
            return s
        try:
            s = self._socket(sport)
        except OSError:  # the port is taken on this host: send from the VXLAN port itself
            return self.rx
        self.tx[sport] = s
        if len(self.tx) > TX_SOCKETS:
            self.tx.popitem(last=False)[1].close()
        return s

    def send(self, buf) -> bool:
        vt = self.vtep
        frame = memoryview(buf)[VNET_LEN:]
        dest = vt.remote_for(bytes(frame[:6]))
        if dest is None:
            return self._tx_drop("no-fdb")
        if frame[12:14] != b"\x08\x00":
            return self._tx_drop("not-ipv4")
        try:
            segs = segment.segment(buf)
        except segment.SegmentError as e:
            return self._tx_drop(e.reason)
        hdr = vt.header
        sport = vxlan.source_port(frame)
        tos = vxlan.ecn_encap(0, vxlan.inner_dsfield(frame))  # flannel's tos 0: only ECN is carried
        anc = [(socket.IPPROTO_IP, socket.IP_TOS, bytes([tos]))] if tos else []
        sock = self._tx_socket(sport)
        try:
            self._sendmsg(sock, hdr, segs, anc, dest)
        except OSError:
            return self._tx_drop("send-error")
        n, nbytes = len(segs), sum(len(s) for s in segs)
        self.tx_packets += n
        self.tx_bytes += nbytes
        vt.tx_packets += n
        vt.tx_bytes += nbytes
        return True

    def tx_trace(self, buf) -> dict:
        """What ``send`` does with ``buf``, as data for a trace (nothing is sent)."""
        frame = memoryview(buf)[VNET_LEN:]
        dest = self.vtep.remote_for(bytes(frame[:6]))
        if dest is None or frame[12:14] != b"\x08\x00":
            return {"drop": "no-fdb" if dest is None else "not-ipv4"}
        try:
            n = len(segment.segment(bytearray(buf)))
        except segment.SegmentError as e:
            return {"drop": e.reason}
        return {"vni": self.vtep.vni, "src": self._local, "dst": dest[0], "sport": vxlan.source_port(frame),
                "dport": dest[1], "ttl": vxlan.OUTER_TTL, "df": False,
                "tos": vxlan.ecn_encap(0, vxlan.inner_dsfield(frame)), "segments": n}

    def _sendmsg(self, sock, hdr: bytes, segs: list, anc: list, dest) -> None:
        vt = self.vtep
        if len(segs) == 1 or not self.gso:
            for seg in segs:
                sock.sendmsg([hdr, seg], anc, 0, dest)
                vt.tx_calls += 1
            return
        size = len(hdr) + len(segs[0])  # every segment but the last has this size
        per_call = min(MAX_GSO_SEGMENTS, MAX_UDP_PAYLOAD // size)
        for i in range(0, len(segs), per_call):
            chunk = segs[i:i + per_call]
            if len(chunk) == 1:
                sock.sendmsg([hdr, chunk[0]], anc, 0, dest)
            else:
                parts = []
                for seg in chunk:
                    parts += (hdr, seg)
                sock.sendmsg(parts, anc + [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", size))], 0, dest)
            vt.tx_calls += 1

    def _tx_drop(self, reason: str) -> bool:
        self.tx_drops += 1
        self.vtep.drop(reason)
        return False

    # --- receive ----------------------------------------------------------
    def _on_readable(self) -> None:
        """Drain the socket: each read may carry many GRO-merged datagrams of one sender."""
        # The datagram lands 2 bytes in: its 8-byte VXLAN header plus those 2 bytes are where
        # the inner frame's virtio-net header goes, so frames are handed on without a copy.
        view, rx = self._view, self.rx
        bufs = [view[2:]]
        ts = monotonic()
        for _ in range(64):
            try:
                n, anc, _flags, addr = rx.recvmsg_into(bufs, RX_ANC)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # an ICMP error queued on the socket (ECONNREFUSED...): not data
                if e.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
                    continue
                raise
            gso, tos = n, 0
            for level, kind, data in anc:
                if level == SOL_UDP and kind == UDP_GRO:
                    gso = int.from_bytes(data[:4], "little") or n
                elif level == socket.IPPROTO_IP and kind == socket.IP_TOS and data:
                    tos = data[0]
            self._receive(view, 2, n, gso, addr, ts, tos)

    def _receive(self, view, start: int, n: int, gso: int, addr, ts: float, tos: int = 0) -> None:
        vt = self.vtep
        count = -(-n // gso)
        if not vt.known(addr[0]):
            vt.drop("unknown-peer", count)
            self.rx_drops += count
            return
        off, end = start, start + n
        frames = []
        while off < end:
            size = min(gso, end - off)
            reason = vxlan.check_payload(view[off:off + size], vnis=vt.vnis, vtep_mac=vt.mac, outer_tos=tos)
            if reason is not None:
                vt.drop(reason)
                self.rx_drops += 1
            else:
                vxlan.propagate_ce(view, tos, off + vxlan.VXLAN_HLEN)
                frames.append((off + vxlan.VXLAN_HLEN, size - vxlan.VXLAN_HLEN))
            off += size
        nbytes = sum(ln for _, ln in frames)
        vt.rx_packets += len(frames)
        vt.rx_bytes += nbytes
        self.rx_packets += len(frames)
        self.rx_bytes += nbytes
        deliver = self._deliver
        if len(frames) == 1 or not self.gro:
            for inner, ln in frames:
                # the 10 bytes before the inner frame (its VXLAN header, the tail of the datagram
                # before, already handled) become its virtio-net header: no copy
                view[inner - VNET_LEN:inner] = ZERO_VNET
                deliver(self, view[inner - VNET_LEN:inner + ln], ts)
            return
        for buf in gro.coalesce([view[i:i + ln] for i, ln in frames]):  # a batch: merge TCP runs
            deliver(self, buf, ts)

    def info(self) -> dict:
        d = super().info()
        d.update(local=self._local, udp_port=self.vtep.port, vni=self.vtep.vni)
        return d

