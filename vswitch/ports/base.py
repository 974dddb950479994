"""What every port has: a name, counters, a send, a batched receive."""

from __future__ import annotations

from time import monotonic
from typing import Callable, Optional

from ..packet import VNET_LEN

BATCH = 64  # frames drained per wake-up before yielding to the loop
RX_SIZE = VNET_LEN + 65536 + 64  # a 64 KB super-frame, its Ethernet/VLAN header and the vnet header
HEADROOM = 64  # free bytes in front of every frame read: see vswitch.packet.headroom

Deliver = Callable[["Port", bytes, float], None]


class Port:
    kind = "port"

    def __init__(self, name: str, *, hairpin: bool = False, mtu: int = 1500) -> None:
        self.name = name
        self.hairpin = hairpin
        self.mtu = mtu
        self.index = 0
        self.entry = None  # first stage for frames from this port (set by the node)
        self.iface = None  # the router interface that owns this port, if any (else a bridge port)
        self.rx_packets = self.rx_bytes = self.rx_drops = 0
        self.tx_packets = self.tx_bytes = self.tx_drops = 0
        self.offloads: tuple = ()
        self._deliver: Optional[Deliver] = None
        self._scratch = bytearray(HEADROOM + RX_SIZE)
        self._view = memoryview(self._scratch)[HEADROOM:]  # read frames here

    # --- lifecycle --------------------------------------------------------
    def open(self) -> None:
        """Create the OS resources (may raise OSError with a clear message)."""

    def start(self, loop, deliver: Deliver) -> None:
        self._deliver = deliver

    def close(self) -> None:
        self._deliver = None

    # --- data -------------------------------------------------------------
    def send(self, buf) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def tx_trace(self, buf) -> Optional[dict]:
        """What sending ``buf`` would add beyond the frame itself (an encapsulation), for traces."""
        return None

    def _drain(self, read) -> None:
        """Read up to BATCH frames with ``read()`` (raises BlockingIOError when empty).

        Frames are read into one scratch buffer per port and handed on as a
        memoryview of it: the pipeline runs each frame to completion (rewrite
        in place, write out) before the next read, so nothing is copied or
        allocated per frame. A stage that keeps a frame beyond that (the
        neighbour queue, a capture) copies it first.
        """
        deliver = self._deliver
        ts = monotonic()
        n = nbytes = 0
        try:
            while n < BATCH:
                buf = read()
                n += 1
                nbytes += len(buf)
                deliver(self, buf, ts)
        except (BlockingIOError, InterruptedError):
            pass
        finally:
            self.rx_packets += n
            self.rx_bytes += nbytes - n * VNET_LEN

    def info(self) -> dict:
        return {
            "name": self.name, "index": self.index, "type": self.kind, "mtu": self.mtu,
            "hairpin": self.hairpin, "offloads": list(self.offloads),
            "rx_packets": self.rx_packets, "rx_bytes": self.rx_bytes, "rx_drops": self.rx_drops,
            "tx_packets": self.tx_packets, "tx_bytes": self.tx_bytes, "tx_drops": self.tx_drops,
        }
