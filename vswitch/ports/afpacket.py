"""AF_PACKET ports: attach to an interface that already exists (containerlab's ethN).

- PACKET_VNET_HDR: reads and writes carry the same virtio-net header as TAPs,
  so GRO'd super-frames and checksum-partial frames pass through intact.
- PACKET_AUXDATA: the kernel strips 802.1Q tags into skb metadata before a
  packet socket sees the frame; the tag comes back in a cmsg and is put back
  into the frame here so the pipeline sees what was on the wire.
- PACKET_IGNORE_OUTGOING: our own transmissions are not read back.
- Promiscuous membership: a bridge port must see frames for every MAC.
"""

from __future__ import annotations

import socket
import struct

from ..netns import link_exists
from ..packet import ETH_P_8021Q, VNET_F_NEEDS_CSUM, VNET_HDR, VNET_LEN
from .base import Port

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_ADD_MEMBERSHIP = 1
PACKET_MR_PROMISC = 1
PACKET_AUXDATA = 8
PACKET_VNET_HDR = 15
PACKET_IGNORE_OUTGOING = 23
TP_STATUS_VLAN_VALID = 0x10
TP_STATUS_VLAN_TPID_VALID = 0x40
AUXDATA = struct.Struct("=IIIHHHH")  # struct tpacket_auxdata
CMSG_SPACE = socket.CMSG_SPACE(AUXDATA.size)
VLAN_AT = VNET_LEN + 12  # the tag goes between the source MAC and the EtherType


def restore_vlan(buf: bytes, tci: int, tpid: int) -> bytes:
    """Re-insert a stripped 802.1Q tag and shift the vnet header's offsets past it."""
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = VNET_HDR.unpack_from(buf, 0)
    if flags & VNET_F_NEEDS_CSUM:
        csum_start += 4
    if hdr_len:
        hdr_len += 4
    return b"".join((VNET_HDR.pack(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset),
                     buf[VNET_LEN:VLAN_AT], struct.pack("!HH", tpid, tci), buf[VLAN_AT:]))


class AfPacketPort(Port):
    kind = "afpacket"

    def __init__(self, name: str, *, interface: str | None = None, hairpin: bool = False,
                 mtu: int = 1500) -> None:
        super().__init__(name, hairpin=hairpin, mtu=mtu)
        self.interface = interface or name
        self.sock = None
        self._loop = None
        self.truncated = 0
        self.vlan_restored = 0

    def open(self) -> None:
        if not link_exists(self.interface):
            raise OSError(f"port {self.name}: no interface named {self.interface!r} in this network namespace")
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        try:
            s.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
            s.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
            s.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
            s.bind((self.interface, ETH_P_ALL))
            ifindex = socket.if_nametoindex(self.interface)
            s.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP, struct.pack("iHH8s", ifindex, PACKET_MR_PROMISC, 0, b""))
            s.setblocking(False)
        except OSError as e:
            s.close()
            raise OSError(f"port {self.name}: cannot attach to {self.interface!r}: {e.strerror or e}") from None
        self.sock = s
        self.offloads = ("vnet-hdr",)

    def _read(self):
        n, anc, flags, _addr = self.sock.recvmsg_into([self._view], CMSG_SPACE)
        data = self._view[:n]
        if flags & socket.MSG_TRUNC:
            self.truncated += 1
        for level, kind, cdata in anc:
            if level == SOL_PACKET and kind == PACKET_AUXDATA and len(cdata) >= AUXDATA.size:
                status, _len, _snap, _mac, _net, tci, tpid = AUXDATA.unpack_from(cdata)
                if status & TP_STATUS_VLAN_VALID:
                    self.vlan_restored += 1
                    tpid = tpid if status & TP_STATUS_VLAN_TPID_VALID else ETH_P_8021Q
                    return restore_vlan(data, tci, tpid)
        return data

    def start(self, loop, deliver) -> None:
        super().start(loop, deliver)
        self._loop = loop
        loop.add_reader(self.sock.fileno(), self._drain, self._read)

    def send(self, buf) -> bool:
        try:
            self.sock.send(buf)
        except OSError:  # ENOBUFS/EAGAIN under load, ENETDOWN when the link is down
            self.tx_drops += 1
            return False
        self.tx_packets += 1
        self.tx_bytes += len(buf) - VNET_LEN
        return True

    def close(self) -> None:
        if self.sock is not None:
            if self._loop is not None:
                self._loop.remove_reader(self.sock.fileno())
                self._loop = None
            self.sock.close()
            self.sock = None
        super().close()

    def info(self) -> dict:
        d = super().info()
        d.update(interface=self.interface, vlan_restored=self.vlan_restored, truncated=self.truncated)
        return d
