"""Router interfaces: a MAC, IPv4 addresses, an MTU, and where frames leave.

An interface either sits on the node bridge (``port is None``: the address the
kernel would put on cni0; its frames leave through the bridge, and the
interface itself is the ``in_port`` of what the router puts there), or owns a
port of its own (the uplink, the node's internal host port).
"""

from __future__ import annotations

import hashlib
import ipaddress
from typing import List, Optional


def stable_mac(*parts: str) -> bytes:
    """A locally administered unicast MAC derived from names (stable across restarts)."""
    h = hashlib.sha256("/".join(parts).encode()).digest()
    return bytes([0x02]) + h[:5]


class Interface:
    hairpin = False  # as the in_port of frames the router puts on the bridge

    def __init__(self, name: str, mac: bytes, addrs: List[ipaddress.IPv4Interface], mtu: int = 1500,
                 port=None, proxy_arp: bool = False, send_redirects: bool = True) -> None:
        self.name = name
        self.mac = mac
        self.addrs = list(addrs)
        self.mtu = mtu
        self.port = port
        self.proxy_arp = proxy_arp
        self.send_redirects = send_redirects
        self.output = None  # a stage that sends instead of a port (a tunnel device: vxlan-encap)
        self._nets = [(int(a.network.network_address), int(a.netmask), int(a.ip)) for a in self.addrs]

    @property
    def kind(self) -> str:
        return "bridge" if self.port is None else "port"

    def owns(self, ip: int) -> bool:
        return any(a == ip for _, _, a in self._nets)

    def on_link(self, ip: int) -> bool:
        """Is ``ip`` inside one of this interface's connected subnets?"""
        return any(ip & mask == net for net, mask, _ in self._nets)

    def source_for(self, ip: int) -> Optional[int]:
        """inet_select_addr: the address on the subnet of ``ip``, else the primary one."""
        for net, mask, a in self._nets:
            if ip & mask == net:
                return a
        return self._nets[0][2] if self._nets else None

    def info(self) -> dict:
        return {"name": self.name, "mac": self.mac.hex(":"), "addresses": [str(a) for a in self.addrs],
                "mtu": self.mtu, "kind": self.kind, "port": self.port.name if self.port else None,
                "proxy_arp": self.proxy_arp}

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"<Interface {self.name} {self.mac.hex(':')} {', '.join(map(str, self.addrs))}>"
