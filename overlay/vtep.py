"""A VXLAN tunnel endpoint's state, as flannel keeps it for flannel.1.

For each remote node flannel installs three entries (pkg/backend/vxlan/vxlan_network.go):

    route      10.244.2.0/24 via 10.244.2.0 dev flannel.1 onlink
    neighbour  10.244.2.0 lladdr <remote VTEP MAC> PERMANENT      (ip neigh)
    fdb        <remote VTEP MAC> dst 192.168.1.12 self permanent   (bridge fdb)

The route and the neighbour live in the router (they are ordinary router
state); the FDB — which underlay address a VTEP MAC sits behind — lives here,
with the tunnel's counters. The VTEP owns the lease address (the pod CIDR's
network address as /32) on its router interface.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from dataclasses import dataclass
from typing import Dict, Optional

from vswitch.packet import mac_str

from .vxlan import encode_header

DEFAULT_VNI = 1
DEFAULT_PORT = 8472  # the Linux kernel's default; IANA's 4789 only if configured
OVERHEAD = 50  # outer Ethernet 14 + IPv4 20 + UDP 8 + VXLAN 8: the MTU flannel gives pods


@dataclass(frozen=True)
class Peer:
    name: str
    address: int  # the remote node's underlay address
    pod_cidr: ipaddress.IPv4Network
    vtep_mac: bytes

    @property
    def gateway(self) -> int:
        """The remote lease address: the pod CIDR's network address (flannel's onlink next hop)."""
        return int(self.pod_cidr.network_address)


# Drop reasons besides the header checks of overlay.vxlan.RX_DROPS and segmentation's SEGMENT_DROPS.
DROP_REASONS = (
    ("unknown-peer", "from an underlay address that is not a known peer (vswitch only, see docs)"),
    ("no-fdb", "no FDB entry for the inner destination MAC: dropped, never flooded"),
    ("not-ipv4", "inner frame is not IPv4 (flannel carries IPv4 only)"),
    ("send-error", "the UDP socket refused the datagram"),
)


class Vtep:
    def __init__(self, *, local: int, mac: bytes, vni: int = DEFAULT_VNI, port: int = DEFAULT_PORT,
                 iface: str = "flannel.1", accept_unknown_peers: bool = False) -> None:
        self.local = local
        self.mac = mac
        self.vni = vni
        self.port = port
        self.iface = iface
        self.accept_unknown_peers = accept_unknown_peers
        self.vnis = frozenset((vni,))
        self.header = encode_header(vni)
        self.peers: Dict[int, Peer] = {}  # underlay address -> peer
        self.sources: set = set()  # the peers' underlay addresses as sockets report them
        self.fdb: Dict[bytes, tuple] = {}  # remote VTEP MAC -> (underlay address, port): a sendmsg destination
        self.remotes: Dict[bytes, int] = {}  # remote VTEP MAC -> underlay address (vxlan-encap's FDB)
        self.tx_packets = self.tx_bytes = self.tx_calls = 0
        self.rx_packets = self.rx_bytes = 0
        self.drops: Counter = Counter()

    def drop(self, reason: str, n: int = 1) -> None:
        self.drops[reason] += n

    def remote_for(self, dst_mac: bytes) -> Optional[tuple]:
        return self.fdb.get(dst_mac)

    def known(self, addr: str) -> bool:
        """Is ``addr`` (a socket's source address string) a peer's underlay address?"""
        return self.accept_unknown_peers or addr in self.sources

    # --- peers (the router part is done by whoever owns the router: see overlay.wiring) --------
    def add_peer(self, peer: Peer) -> Optional[Peer]:
        """Record a peer and its FDB entry; returns the peer it replaces (same address), if any."""
        if peer.address == self.local:
            raise ValueError(f"peer {peer.name}: {ipaddress.IPv4Address(peer.address)} is this node's own address")
        for other in self.peers.values():
            if other.address != peer.address and other.pod_cidr.overlaps(peer.pod_cidr):
                raise ValueError(f"peer {peer.name}: podCIDR {peer.pod_cidr} overlaps peer {other.name}'s "
                                 f"{other.pod_cidr}")
            if other.address != peer.address and other.vtep_mac == peer.vtep_mac:
                raise ValueError(f"peer {peer.name}: VTEP MAC {mac_str(peer.vtep_mac)} is already peer "
                                 f"{other.name}'s")
        old = self.peers.pop(peer.address, None)
        if old is not None:
            self.fdb.pop(old.vtep_mac, None)
            self.remotes.pop(old.vtep_mac, None)
        self.peers[peer.address] = peer
        self.fdb[peer.vtep_mac] = (str(ipaddress.IPv4Address(peer.address)), self.port)
        self.remotes[peer.vtep_mac] = peer.address
        self.sources = {d[0] for d in self.fdb.values()}
        return old

    def remove_peer(self, key: str) -> Peer:
        """Remove a peer named by its name or underlay address."""
        for addr, p in self.peers.items():
            if key in (p.name, str(ipaddress.IPv4Address(addr))):
                del self.peers[addr]
                self.fdb.pop(p.vtep_mac, None)
                self.remotes.pop(p.vtep_mac, None)
                self.sources = {d[0] for d in self.fdb.values()}
                return p
        raise KeyError(f"no VXLAN peer {key!r} (peers: {', '.join(p.name for p in self.peers.values()) or 'none'})")

    # --- tables ---------------------------------------------------------------
    def rows(self) -> list:
        """`show vteps`: one row per remote VTEP, shaped like `bridge fdb show dev flannel.1`."""
        return [{"mac": mac_str(p.vtep_mac), "dst": str(ipaddress.IPv4Address(p.address)), "name": p.name,
                 "podCIDR": str(p.pod_cidr), "gateway": str(ipaddress.IPv4Address(p.gateway)),
                 "dev": self.iface, "vni": self.vni, "port": self.port, "state": "permanent"}
                for p in sorted(self.peers.values(), key=lambda p: p.address)]

    def counters(self) -> dict:
        return {"local": str(ipaddress.IPv4Address(self.local)), "mac": mac_str(self.mac), "vni": self.vni,
                "port": self.port, "tx_packets": self.tx_packets, "tx_bytes": self.tx_bytes,
                "tx_calls": self.tx_calls, "rx_packets": self.rx_packets, "rx_bytes": self.rx_bytes,
                "drops": dict(self.drops)}
