"""Raw frames in and out of lab namespaces, from one process.

An AF_PACKET socket belongs to the network namespace it was created in, so
the runner opens one per observation point (a pod's eth0, a node's uplink,
the underlay bridge) by entering that namespace just for the ``socket()``
call (setns(2) on this thread, then back). Sending a frame from a pod is a
write on its socket; observing is reading every socket for a window. No
process per probe, no scapy in the loop: frames are bytes.
"""

from __future__ import annotations

import ctypes
import os
import select
import socket
import time
from typing import Dict, List, Tuple

CLONE_NEWNET = 0x40000000
ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def open_in(netns: str, ifname: str) -> socket.socket:
    """An AF_PACKET socket bound to ``ifname`` inside network namespace ``netns``."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    try:
        _setns(target)
        try:
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            s.bind((ifname, 0))
            s.setblocking(False)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        finally:
            _setns(own)
    finally:
        os.close(own)
        os.close(target)
    return s


class Points:
    """Named observation points (``pod:a1``, ``uplink:node1``...) that can send and be watched."""

    def __init__(self) -> None:
        self.socks: Dict[str, socket.socket] = {}

    def add(self, name: str, netns: str, ifname: str) -> None:
        self.socks[name] = open_in(netns, ifname)

    def drain(self) -> None:
        """Forget whatever arrived before the probe (ARP chatter, earlier scenarios)."""
        for s in self.socks.values():
            while True:
                try:
                    s.recv(65536)
                except BlockingIOError:
                    break

    def send(self, point: str, frame: bytes) -> None:
        self.socks[point].send(frame)

    def watch(self, window: float, until=None) -> Dict[str, List[Tuple[str, bytes]]]:
        """Frames seen at every point for ``window`` seconds (or until ``until(seen)`` is true):
        point -> [(direction 'in'|'out', frame)], 'out' being what the namespace itself sent."""
        seen: Dict[str, List[Tuple[str, bytes]]] = {p: [] for p in self.socks}
        by_fd = {s.fileno(): (p, s) for p, s in self.socks.items()}
        end = time.monotonic() + window
        while True:
            left = end - time.monotonic()
            if left <= 0:
                return seen
            ready, _, _ = select.select(list(by_fd), [], [], left)
            for fd in ready:
                point, s = by_fd[fd]
                while True:
                    try:
                        data, addr = s.recvfrom(65536)
                    except BlockingIOError:
                        break
                    seen[point].append(("out" if addr[2] == PACKET_OUTGOING else "in", data))
            if until is not None and until(seen):
                return seen

    def close(self) -> None:
        for s in self.socks.values():
            s.close()
        self.socks.clear()
