"""The overlay on a node: the VTEP, its router interface and port, and flannel's per-peer entries."""

from __future__ import annotations

import ipaddress

from router.fib import Route
from router.interface import Interface, stable_mac

from .port import VxlanPort
from .vtep import Peer, Vtep


class Overlay:
    def __init__(self, router, io, node_name: str, spec: dict) -> None:
        """``spec`` is a validated config.overlay section; the interface is added to ``router``
        (``io`` is its RouterIO, which performs what a neighbour change releases)."""
        self.router, self.io = router, io
        lease = ipaddress.IPv4Interface(f"{spec['pod_cidr'].network_address}/32")
        mac = spec["mac"] or stable_mac(node_name, spec["interface"])
        self.vtep = Vtep(local=int(spec["local"]), mac=mac, vni=spec["vni"], port=spec["port"],
                         iface=spec["interface"], accept_unknown_peers=spec["accept_unknown_peers"])
        # flannel.1 holds the lease address as /32 and sends no redirects (its peers are not on-link)
        self.iface = Interface(spec["interface"], mac, [lease], spec["mtu"], send_redirects=False)
        router.add_interface(self.iface)
        self.port = VxlanPort(spec["interface"], self.vtep, mtu=spec["mtu"], gso=spec["gso"], gro=spec["gro"])
        for p in spec["peers"]:
            self.add_peer(p)
        self.encap = self.decap = None
        self.pipeline = spec["pipeline"]

    def add_stages(self, graph) -> None:
        """With the pipeline datapath, flannel.1 sends through vxlan-encap and UDP to our tunnel
        port goes to vxlan-decap (overlay.stages); the socket datapath needs no stage."""
        if not self.pipeline:
            return
        from .stages import VxlanDecap, VxlanEncap
        self.encap = graph.add(VxlanEncap(self.vtep, self.port, self.router))
        self.decap = graph.add(VxlanDecap(self.vtep, self.port))
        self.iface.output = self.encap
        self.router.udp_encap[self.vtep.port] = self.decap
        self.port.socket_optional = True

    def replace_port(self, port) -> None:
        """Use ``port`` as flannel.1's port (the simulator's in-memory one) before the node starts."""
        port.socket_optional = self.port.socket_optional
        self.port = port
        for stage in (self.encap, self.decap):
            if stage is not None:
                stage.port = port

    def add_peer(self, p: dict) -> Peer:
        """flannel's three entries for a remote node: FDB, permanent neighbour, onlink route."""
        peer = Peer(p["name"], int(p["address"]), p["pod_cidr"], p["mac"])
        own = ipaddress.IPv4Network(f"{self.iface.addrs[0].ip}/32")
        if peer.pod_cidr.overlaps(own):
            raise ValueError(f"peer {peer.name}: podCIDR {peer.pod_cidr} holds this node's own lease {own}")
        old = self.vtep.add_peer(peer)
        if old is not None:
            self._forget(old)
        dev = self.iface.name
        self.router.add_route(Route(int(peer.pod_cidr.network_address), peer.pod_cidr.prefixlen,
                                    gateway=peer.gateway, dev=dev, onlink=True, proto="flannel"), replace=True)
        self.io.perform(self.router.neigh.add_permanent(dev, peer.gateway, peer.vtep_mac), self.router.clock())
        return peer

    def remove_peer(self, key: str) -> Peer:
        peer = self.vtep.remove_peer(key)
        self._forget(peer)
        return peer

    def _forget(self, peer: Peer) -> None:
        fib, net = self.router.fib, peer.pod_cidr
        for r in fib.routes():
            if (r.prefix, r.plen, r.dev, r.gateway) == (int(net.network_address), net.prefixlen, self.iface.name,
                                                        peer.gateway):
                fib.delete(r.prefix, r.plen, r.metric)
        self.io.perform(self.router.neigh.delete(self.iface.name, peer.gateway), self.router.clock())

    def rows(self) -> list:
        return self.vtep.rows()
