"""The router's state: interfaces, FIB, neighbours, ICMP limits. The stages act on it."""

from __future__ import annotations

import time
from typing import Callable, Dict, Optional

from .fib import LOCAL, UNICAST, Fib, Route
from .icmp import RateLimiter
from .interface import Interface
from .ipv4 import ip_str
from .neigh import NeighTable

# ip_rt_send_redirect (net/ipv4/route.c): at most 9 redirects per source, the
# gap doubling from 20 ms; 20.48 s of silence resets the count.
REDIRECT_LOAD = 0.020
REDIRECT_NUMBER = 9
REDIRECT_SILENCE = REDIRECT_LOAD * (1 << (REDIRECT_NUMBER + 1))


class RedirectLimiter:
    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.peers: Dict[int, list] = {}  # src -> [n_redirects, last]
        self.limited = 0

    def allow(self, src: int) -> bool:
        now = self.clock()
        p = self.peers.setdefault(src, [0, now])
        if now - p[1] > REDIRECT_SILENCE:
            p[0] = 0
        if p[0] >= REDIRECT_NUMBER:
            p[1] = now
            self.limited += 1
            return False
        if p[0] == 0 or now - p[1] > REDIRECT_LOAD * (1 << p[0]):
            p[0] += 1
            p[1] = now
            return True
        self.limited += 1
        return False


class Router:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.ifaces: Dict[str, Interface] = {}
        self.local: Dict[int, Interface] = {}  # our addresses (the kernel's local table)
        self.broadcast: set = set()  # subnet broadcast addresses of our interfaces (never routed)
        self.fib = Fib()
        self.neigh = NeighTable(clock)
        self.icmp = RateLimiter(clock=clock)
        self.redirects = RedirectLimiter(clock)
        self.host: Optional[Interface] = None  # the node's own stack, behind an internal port
        self.udp_encap: Dict[int, object] = {}  # UDP port -> stage for datagrams to us (a tunnel's encap_rcv)
        self._ip_id = 0
        self._iface_changes = 0

    @property
    def generation(self) -> int:
        """Changes whenever a route or one of our addresses does (for cached decisions)."""
        return self.fib.generation + self._iface_changes

    def add_interface(self, iface: Interface, host: bool = False) -> None:
        if iface.name in self.ifaces:
            raise ValueError(f"router interface {iface.name!r} exists")
        self.ifaces[iface.name] = iface
        self._iface_changes += 1
        for a in iface.addrs:
            self.local[int(a.ip)] = iface
            net = a.network
            if net.prefixlen < 31:
                self.broadcast.add(int(net.broadcast_address))
            if net.prefixlen < 32:
                self.fib.add(Route(int(net.network_address), net.prefixlen, dev=iface.name, proto="kernel",
                                   prefsrc=int(a.ip)), replace=True)
        if host:
            self.host = iface

    def add_route(self, route: "Route | str", replace: bool = False) -> Route:
        """Add a route; a gateway must be on a connected subnet unless onlink (as `ip route add`)."""
        if isinstance(route, str):
            route = Fib.parse(route)
        if route.type in (UNICAST, LOCAL):
            if route.dev is not None and route.dev not in self.ifaces:
                raise ValueError(f"route {route.describe()}: no router interface {route.dev!r}")
            if route.gateway is not None and not route.onlink:
                via = self.connected(route.gateway)
                if via is None or (route.dev is not None and via.name != route.dev):
                    raise ValueError(f"route {route.describe()}: gateway {ip_str(route.gateway)} is not on a "
                                     f"connected subnet{' of ' + route.dev if route.dev else ''} (Nexthop has invalid gateway)")
                if route.dev is None:
                    route = Route(route.prefix, route.plen, route.type, route.gateway, via.name, route.metric,
                                  route.prefsrc, route.proto, route.onlink)
        self.fib.add(route, replace=replace)
        return route

    def connected(self, ip: int) -> Optional[Interface]:
        for iface in self.ifaces.values():
            if iface.on_link(ip):
                return iface
        return None

    def pref_src(self, route: Route, dst: int) -> Optional[int]:
        if route.prefsrc is not None:
            return route.prefsrc
        iface = self.ifaces.get(route.dev)
        return iface.source_for(route.gateway or dst) if iface else None

    def icmp_source(self, orig_src: int, orig_dst: int) -> Optional[int]:
        """__icmp_send: our own address if the packet was for us, else the route back's preferred source.

        The node's host stack shares the router's addresses, so an error about a packet it sent
        comes from the router's side of the host port (a source the host does not own, else
        its kernel would drop the error as a martian).
        """
        if orig_dst in self.local:
            return orig_dst
        if orig_src in self.local and self.host is not None:
            return self.host.source_for(orig_src)
        route = self.fib.lookup(orig_src)
        if route is None or route.type not in (UNICAST, LOCAL):
            return None
        return self.pref_src(route, orig_src)

    def next_ip_id(self) -> int:
        self._ip_id = (self._ip_id + 1) & 0xFFFF
        return self._ip_id

    # --- tables -------------------------------------------------------------
    def route_rows(self) -> list:
        return [r.to_dict() | {"text": r.describe()} for r in self.fib.routes()]

    def neigh_rows(self) -> list:
        return self.neigh.rows()
