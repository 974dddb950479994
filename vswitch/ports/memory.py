"""An in-process port: frames in by ``inject``, frames out into ``sent``."""

from __future__ import annotations

from time import monotonic

from ..packet import VNET_LEN, ZERO_VNET
from .base import Port


class MemoryPort(Port):
    kind = "memory"

    def __init__(self, name: str, **kw) -> None:
        super().__init__(name, **kw)
        self.sent: list = []  # buffers with their virtio-net header, in send order

    def send(self, buf) -> bool:
        self.sent.append(bytes(buf))
        self.tx_packets += 1
        self.tx_bytes += len(buf) - VNET_LEN
        return True

    def inject(self, frame: bytes, ts: float | None = None, vnet: bytes = ZERO_VNET) -> None:
        """Deliver one bare Ethernet frame as if it had been read from the wire: as the real ports
        do, into the port's receive buffer (with its headroom), handed on as a view of it."""
        self.rx_packets += 1
        self.rx_bytes += len(frame)
        n = VNET_LEN + len(frame)
        self._view[:VNET_LEN] = vnet
        self._view[VNET_LEN:n] = frame
        self._deliver(self, self._view[:n], monotonic() if ts is None else ts)

    def take(self) -> list:
        """Bare frames sent since the last take (virtio-net header stripped)."""
        out, self.sent = [f[VNET_LEN:] for f in self.sent], []
        return out
