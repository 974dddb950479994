"""The VTEP's port without sockets, for the Python API, replay and tests.

Same transmit path as VxlanPort (FDB lookup, segmentation, source-port hash,
ECN) up to the system call; instead of ``sendmsg`` each datagram is wrapped
in the outer IPv4/UDP header the kernel would build (overlay.vxlan.encap) and
kept in ``sent``. ``inject_datagram`` feeds a received UDP payload through the
same receive checks as a real socket read.
"""

from __future__ import annotations

from time import monotonic

from vswitch.packet import ZERO_VNET
from vswitch.ports.base import Port

from . import vxlan
from .port import VxlanPort


class MemoryVxlanPort(VxlanPort):
    kind = "vxlan"

    def __init__(self, name: str, vtep, *, mtu: int = 1450, **_offloads) -> None:
        super().__init__(name, vtep, mtu=mtu, gso=False, gro=False)
        self.sent: list = []  # outer frames (Ethernet/IPv4/UDP/VXLAN/inner), in send order
        self.on_send = None  # called with each outer frame (the simulator's ordered log)

    def open(self) -> None:
        self.offloads = ()

    def start(self, loop, deliver) -> None:
        Port.start(self, loop, deliver)

    def close(self) -> None:
        Port.close(self)

    def _tx_socket(self, sport: int):
        return sport  # what _sendmsg gets as its "socket"

    def _sendmsg(self, sport, hdr: bytes, segs: list, anc: list, dest) -> None:
        vt = self.vtep
        tos = anc[0][2][0] if anc else 0
        dst = int.from_bytes(bytes(int(x) for x in dest[0].split(".")), "big")
        for seg in segs:
            outer = vxlan.encap(bytes(seg), src_mac=bytes(6), dst_mac=bytes(6), src_ip=vt.local, dst_ip=dst,
                                vni=vt.vni, sport=sport, dport=dest[1], tos_inner=tos)
            self.sent.append(outer)
            if self.on_send is not None:
                self.on_send(self, outer)
        vt.tx_calls += len(segs)

    def inject_datagram(self, src: str, payload: bytes, ts: float | None = None) -> None:
        """A UDP payload (VXLAN header + inner frame) received from underlay address ``src``."""
        view = memoryview(bytearray(ZERO_VNET[:2]) + bytearray(payload))
        self._receive(view, 2, len(payload), len(payload), (src, self.vtep.port),
                      monotonic() if ts is None else ts)
