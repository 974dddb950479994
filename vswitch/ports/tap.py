"""TAP ports with virtio-net headers and offloads (the pod side of cni0).

IFF_VNET_HDR makes every read/write carry a struct virtio_net_hdr, and
TUNSETOFFLOAD tells the kernel it may hand us checksum-partial and TSO/USO
super-frames (up to 64 KB) instead of 1500-byte segments: one read then moves
~40 segments, which is where the throughput comes from.
"""

from __future__ import annotations

import fcntl
import os
import struct

from ..netns import link_exists, move_link
from ..packet import GSO_UDP_TUNNEL, VNET_LEN
from .base import Port

IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, TUN_F_USO4, TUN_F_USO6 = 0x01, 0x02, 0x04, 0x08, 0x20, 0x40
TUN_F_UDP_TUNNEL_GSO, TUN_F_UDP_TUNNEL_GSO_CSUM = 0x80, 0x100
OFFLOAD_NAMES = {TUN_F_CSUM: "csum", TUN_F_TSO4: "tso4", TUN_F_TSO6: "tso6", TUN_F_TSO_ECN: "tso-ecn",
                 TUN_F_USO4: "uso4", TUN_F_USO6: "uso6", TUN_F_UDP_TUNNEL_GSO: "udp-tunnel-gso",
                 TUN_F_UDP_TUNNEL_GSO_CSUM: "udp-tunnel-gso-csum"}
TUNNEL_OFFLOAD = TUN_F_UDP_TUNNEL_GSO | TUN_F_UDP_TUNNEL_GSO_CSUM
# With tunnel GSO the header grows to struct virtio_net_hdr_v1_hash_tunnel (24 bytes): the 10 we
# keep in every buffer, num_buffers, the hash fields, then outer_th_offset and inner_nh_offset.
TUNNEL_HDR_LEN = 24
_TUNNEL_TAIL = struct.Struct("<10xHH")  # the 14 bytes after the classic header
_NO_TUNNEL_TAIL = bytes(TUNNEL_HDR_LEN - VNET_LEN)
# Tried in order: UDP tunnel GSO needs Linux 6.17+, USO 6.2+; plain checksum offload works everywhere.
OFFLOAD_CHOICES = (
    TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN | TUN_F_USO4 | TUN_F_USO6 | TUNNEL_OFFLOAD,
    TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN | TUN_F_USO4 | TUN_F_USO6,
    TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN,
    TUN_F_CSUM,
)


class TapPort(Port):
    kind = "tap"

    def __init__(self, name: str, *, ifname: str | None = None, netns: str | None = None,
                 netns_ifname: str | None = None, offload: bool = True, hairpin: bool = True,
                 mtu: int = 1500) -> None:
        super().__init__(name, hairpin=hairpin, mtu=mtu)
        self.ifname = ifname or name
        self.netns = netns
        self.netns_ifname = netns_ifname
        self.want_offload = offload
        self.dev = None
        self.fd = -1
        self._loop = None

    def open(self) -> None:
        import pytun  # imported here so in-process use never needs /dev/net/tun

        if link_exists(self.ifname):
            raise OSError(f"port {self.name}: an interface named {self.ifname!r} already exists")
        try:
            self.dev = pytun.TunTapDevice(name=self.ifname, flags=IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
        except pytun.Error as e:
            raise OSError(f"port {self.name}: cannot create TAP {self.ifname!r}: {e}") from None
        self.fd = self.dev.fileno()
        os.set_blocking(self.fd, False)
        self.offloads = ()
        self.tunnel = False
        if self.want_offload:
            for flags in OFFLOAD_CHOICES:
                if flags & TUNNEL_OFFLOAD and not self._set_header_len(TUNNEL_HDR_LEN):
                    continue
                try:
                    fcntl.ioctl(self.fd, TUNSETOFFLOAD, flags)
                except OSError:
                    if flags & TUNNEL_OFFLOAD:
                        self._set_header_len(VNET_LEN)
                    continue
                self.offloads = tuple(n for bit, n in OFFLOAD_NAMES.items() if flags & bit)
                self.tunnel = bool(flags & TUNNEL_OFFLOAD)
                break
        self.dev.mtu = self.mtu
        if self.netns:
            # The fd stays ours after the device moves: pod traffic keeps flowing to vswitch.
            move_link(self.ifname, self.netns, self.netns_ifname, self.mtu)
        else:
            self.dev.up()

    def _set_header_len(self, n: int) -> bool:
        try:
            fcntl.ioctl(self.fd, TUNSETVNETHDRSZ, struct.pack("i", n))
            return True
        except OSError:
            return False

    def start(self, loop, deliver) -> None:
        super().start(loop, deliver)
        self._loop = loop
        view, readv, fd = self._view, os.readv, self.fd
        if not self.tunnel:
            bufs = [view]
            loop.add_reader(self.fd, self._drain, lambda: view[:readv(fd, bufs)])
            return
        # The long header is read aside; its first 10 bytes become the buffer's own header (the
        # tunnel offsets it adds are recomputed from the frame when sending: see _tunnel_tail).
        hdr = bytearray(TUNNEL_HDR_LEN)
        bufs, extra = [hdr, view[VNET_LEN:]], TUNNEL_HDR_LEN - VNET_LEN

        def read():
            n = readv(fd, bufs)
            view[:VNET_LEN] = hdr[:VNET_LEN]
            return view[:n - extra]
        loop.add_reader(self.fd, self._drain, read)

    def send(self, buf) -> bool:
        try:
            if self.tunnel:
                os.writev(self.fd, (buf[:VNET_LEN], _tunnel_tail(buf), buf[VNET_LEN:]))
            else:
                os.write(self.fd, buf)
        except OSError:  # EAGAIN, or EIO while the link is down
            self.tx_drops += 1
            return False
        self.tx_packets += 1
        self.tx_bytes += len(buf) - VNET_LEN
        return True

    def close(self) -> None:
        if self._loop is not None and self.fd >= 0:
            self._loop.remove_reader(self.fd)
            self._loop = None
        if self.dev is not None:
            self.dev.close()  # a non-persistent TAP vanishes with its last fd
            self.dev = None
            self.fd = -1
        super().close()

    def info(self) -> dict:
        d = super().info()
        d.update(ifname=self.ifname, netns=self.netns, netns_ifname=self.netns_ifname)
        return d


def _tunnel_tail(buf) -> bytes:
    """The 14 bytes a tunnel-GSO header adds: where the outer UDP and the inner IP headers start.

    Only a frame whose gso_type carries VIRTIO_NET_HDR_GSO_UDP_TUNNEL_IPV4 needs them: an
    Ethernet/IPv4/UDP/VXLAN/Ethernet/IPv4 frame, as overlay's vxlan-encap builds it.
    """
    if not buf[1] & GSO_UDP_TUNNEL:
        return _NO_TUNNEL_TAIL
    outer_th = 14 + (buf[VNET_LEN + 14] & 0x0F) * 4
    return _TUNNEL_TAIL.pack(outer_th, outer_th + 8 + 8 + 14)
