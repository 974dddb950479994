"""TAP ports with virtio-net headers and offloads (the pod side of cni0).

IFF_VNET_HDR makes every read/write carry a struct virtio_net_hdr, and
TUNSETOFFLOAD tells the kernel it may hand us checksum-partial and TSO/USO
super-frames (up to 64 KB) instead of 1500-byte segments: one read then moves
~40 segments, which is where the throughput comes from.
"""

from __future__ import annotations

import fcntl
import os

from ..netns import link_exists, move_link
from ..packet import VNET_LEN
from .base import Port

IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUNSETOFFLOAD = 0x400454D0
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, TUN_F_USO4, TUN_F_USO6 = 0x01, 0x02, 0x04, 0x08, 0x20, 0x40
OFFLOAD_NAMES = {TUN_F_CSUM: "csum", TUN_F_TSO4: "tso4", TUN_F_TSO6: "tso6", TUN_F_TSO_ECN: "tso-ecn",
                 TUN_F_USO4: "uso4", TUN_F_USO6: "uso6"}
# Tried in order: USO needs Linux 6.2+; plain checksum offload works everywhere.
OFFLOAD_CHOICES = (
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
        if self.want_offload:
            for flags in OFFLOAD_CHOICES:
                try:
                    fcntl.ioctl(self.fd, TUNSETOFFLOAD, flags)
                except OSError:
                    continue
                self.offloads = tuple(n for bit, n in OFFLOAD_NAMES.items() if flags & bit)
                break
        self.dev.mtu = self.mtu
        if self.netns:
            # The fd stays ours after the device moves: pod traffic keeps flowing to vswitch.
            move_link(self.ifname, self.netns, self.netns_ifname, self.mtu)
        else:
            self.dev.up()

    def start(self, loop, deliver) -> None:
        super().start(loop, deliver)
        self._loop = loop
        view, readv, fd, bufs = self._view, os.readv, self.fd, [self._scratch]
        loop.add_reader(self.fd, self._drain, lambda: view[:readv(fd, bufs)])

    def send(self, buf) -> bool:
        try:
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
