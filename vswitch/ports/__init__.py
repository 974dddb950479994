"""Ports: where frames enter and leave a node.

- ``tap``: a TAP device opened with IFF_VNET_HDR + TUNSETOFFLOAD (a pod's eth0).
- ``afpacket``: an existing interface through an AF_PACKET socket (containerlab's eth1..N).
- ``memory``: in-process, for tests and the Python API.
"""

from .base import Port
from .memory import MemoryPort

__all__ = ["Port", "MemoryPort", "port_kinds"]


def port_kinds() -> dict:
    from .afpacket import AfPacketPort
    from .tap import TapPort
    return {"tap": TapPort, "afpacket": AfPacketPort, "memory": MemoryPort}
