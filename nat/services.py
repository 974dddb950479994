"""The Service table: what kube-proxy programs, as constant-time maps.

Built from Service and EndpointSlice objects (nat/manifests.py). Three dicts,
like the nftables mode's ``service-ips`` / ``service-nodeports`` maps, so a
lookup costs the same with 10 or 10,000 Services:

- ``cluster``:  (ClusterIP, proto, port)                  -> ServicePort
- ``external``: (externalIP or LoadBalancer IP, proto, port) -> ServicePort
- ``nodeport``: (proto, nodePort)                          -> ServicePort, on every node address

A ServicePort picks an endpoint for a new connection (``choose``), applying,
in kube-proxy's order: traffic policy (Local: this node's endpoints only),
session affinity (ClientIP), then the scheduler. Endpoints are the ready
ones; when none is ready, the serving-and-terminating ones (kube-proxy's
fallback, KEP-1669).
"""

from __future__ import annotations

import ipaddress
import random
from typing import Dict, List, Optional, Sequence, Tuple

from router.ipv4 import PROTO_TCP, PROTO_UDP, ip_int, ip_str

from .schedulers import SCHEDULERS

PROTOS = {"TCP": PROTO_TCP, "UDP": PROTO_UDP}

# Outcomes of ServicePort.choose besides an endpoint.
REJECT = "reject"  # no endpoints at all: ICMP port unreachable (KUBE-SERVICES REJECT)
DROP = "drop"      # traffic policy Local and no local endpoint (KUBE-EXT / KUBE-SVL drop)


class Backend:
    __slots__ = ("ip", "port", "node", "ready", "serving", "terminating")

    def __init__(self, ip: int, port: int, node: Optional[str], ready: bool, serving: bool, terminating: bool):
        self.ip, self.port, self.node = ip, port, node
        self.ready, self.serving, self.terminating = ready, serving, terminating

    def __repr__(self) -> str:
        return f"{ip_str(self.ip)}:{self.port}"


class ServicePort:
    def __init__(self, svc, sp, backends: List[Backend], node: str, scheduler: str, rng: random.Random) -> None:
        self.svc, self.sp = svc, sp
        self.key = f"{svc.namespace}/{svc.name}" + (f":{sp.name}" if sp.name else "")
        self.proto = PROTOS[sp.protocol]
        self.backends = backends
        ready = [b for b in backends if b.ready]
        self.usable = ready or [b for b in backends if b.serving and b.terminating]  # KEP-1669 fallback
        # CategorizeEndpoints: the Local set falls back on its own, so a terminating local endpoint
        # still serves while a remote one is ready
        mine = [b for b in backends if b.node == node]
        self.local = [b for b in mine if b.ready] or [b for b in mine if b.serving and b.terminating]
        self.scheduler = SCHEDULERS[scheduler](rng)
        self.affinity: Dict[int, Tuple[Backend, float]] = {}  # client IP -> (backend, last used)
        self.affinity_timeout = svc.affinity_timeout if svc.session_affinity == "ClientIP" else 0

    def choose(self, client: int, external: bool, client_in_cluster: bool, now: float,
               conns) -> Tuple[object, str]:
        """An endpoint (Backend) for a new connection from ``client``, or REJECT/DROP; plus why."""
        svc = self.svc
        local_only = (svc.external_traffic_policy == "Local" and external and not client_in_cluster) or \
                     (svc.internal_traffic_policy == "Local" and not external)
        pool = self.local if local_only else self.usable
        if not self.usable:
            return REJECT, "no endpoints: ICMP port unreachable"
        if not pool:
            return DROP, "traffic policy Local and no endpoint on this node"
        if self.affinity_timeout:
            hit = self.affinity.get(client)
            if hit is not None and now - hit[1] <= self.affinity_timeout and hit[0] in pool:
                self.affinity[client] = (hit[0], now)
                return hit[0], f"session affinity ClientIP (timeout {self.affinity_timeout} s)"
        i, why = self.scheduler.pick([(b.ip, b.port) for b in pool], client,
                                     lambda ep: conns((ep[0], ep[1], self.proto)))
        b = pool[i]
        if self.affinity_timeout:
            self.affinity[client] = (b, now)
        if local_only:
            why += ", local endpoints only"
        return b, why

    def row(self) -> dict:
        svc = self.svc
        return {"service": self.key, "type": svc.type, "protocol": self.sp.protocol,
                "cluster_ip": f"{svc.cluster_ips[0]}:{self.sp.port}" if svc.cluster_ips else None,
                "node_port": self.sp.node_port, "external": [f"{ip}:{self.sp.port}" for ip in
                                                             (*svc.external_ips, *svc.lb_ips)],
                "endpoints": [{"endpoint": repr(b), "node": b.node, "ready": b.ready, "serving": b.serving,
                               "terminating": b.terminating} for b in self.backends],
                "scheduler": self.scheduler.name, "affinity": svc.session_affinity,
                "affinity_timeout": self.affinity_timeout or None,
                "external_traffic_policy": svc.external_traffic_policy,
                "internal_traffic_policy": svc.internal_traffic_policy}


class ServiceTable:
    def __init__(self, node: str = "", scheduler: str = "random", rng: Optional[random.Random] = None) -> None:
        if scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {scheduler!r} (schedulers: {', '.join(SCHEDULERS)})")
        self.node, self.scheduler = node, scheduler
        self.rng = rng or random.Random()
        self.services: Dict[tuple, object] = {}  # (ns, name) -> Service
        self.slices: Dict[tuple, object] = {}    # (ns, name) -> EndpointSlice
        self.cluster: Dict[tuple, ServicePort] = {}
        self.external: Dict[tuple, ServicePort] = {}
        self.nodeport: Dict[tuple, ServicePort] = {}
        self.ports: List[ServicePort] = []

    # --- updates ------------------------------------------------------------
    def apply(self, services: Sequence = (), slices: Sequence = ()) -> List[ServicePort]:
        """Add or replace objects, then rebuild; returns the ServicePorts that lost endpoints."""
        new_services, new_slices = dict(self.services), dict(self.slices)
        for s in services:
            new_services[s.key] = s
        for s in slices:
            new_slices[s.key] = s
        return self._replace(new_services, new_slices)

    def delete(self, services: Sequence = (), slices: Sequence = ()) -> List[ServicePort]:
        new_services, new_slices = dict(self.services), dict(self.slices)
        for s in services:
            new_services.pop(s.key, None)
        for s in slices:
            new_slices.pop(s.key, None)
        return self._replace(new_services, new_slices)

    def _replace(self, services: dict, slices: dict) -> List[ServicePort]:
        old = {p.key: p for p in self.ports}
        cluster, external, nodeport, ports = self._build(services, slices)
        gone = []
        for p in ports:
            before = old.get(p.key)
            if before is not None:
                p.scheduler = before.scheduler if before.scheduler.name == p.scheduler.name else p.scheduler
                live = {(b.ip, b.port): b for b in p.usable}  # Backends are rebuilt: match by address
                p.affinity = {c: (live[(v[0].ip, v[0].port)], v[1]) for c, v in before.affinity.items()
                              if (v[0].ip, v[0].port) in live}
                lost = {(b.ip, b.port) for b in before.usable} - {(b.ip, b.port) for b in p.usable}
                if lost:
                    gone.append((before, lost))
        for key, before in old.items():
            if key not in {p.key for p in ports} and before.usable:
                gone.append((before, {(b.ip, b.port) for b in before.usable}))
        self.services, self.slices = services, slices
        self.cluster, self.external, self.nodeport, self.ports = cluster, external, nodeport, ports
        return gone

    def _build(self, services: dict, slices: dict):
        by_service: Dict[tuple, list] = {}
        for sl in slices.values():
            by_service.setdefault((sl.namespace, sl.service), []).append(sl)
        cluster, external, nodeport, ports = {}, {}, {}, []
        for svc in sorted(services.values(), key=lambda s: s.key):
            if svc.type == "ExternalName" or svc.headless:
                continue  # no VIP: nothing to proxy (documented)
            for sp in svc.ports:
                backends = self._backends(sp, by_service.get(svc.key, []))
                p = ServicePort(svc, sp, backends, self.node, self.scheduler, self.rng)
                proto = p.proto
                ports.append(p)
                for vip in svc.cluster_ips:
                    cluster[(ip_int(vip), proto, sp.port)] = p
                for ip in (*svc.external_ips, *svc.lb_ips):
                    external[(ip_int(ip), proto, sp.port)] = p
                if sp.node_port and svc.type in ("NodePort", "LoadBalancer"):
                    nodeport[(proto, sp.node_port)] = p
        return cluster, external, nodeport, ports

    @staticmethod
    def _backends(sp, slices: list) -> List[Backend]:
        out, seen = [], set()
        for sl in sorted(slices, key=lambda s: s.name):
            port = next((p[2] for p in sl.ports if p[0] == sp.name and p[1] == sp.protocol), None)
            if port is None:
                continue
            for ep in sl.endpoints:
                for addr in ep.addresses:
                    k = (ip_int(addr), port)
                    if k in seen:
                        continue
                    seen.add(k)
                    out.append(Backend(k[0], port, ep.node_name, ep.ready, ep.serving, ep.terminating))
        return out

    # --- lookups (per new connection) ----------------------------------------
    def match(self, dst: int, proto: int, dport: int, local: bool) -> Tuple[Optional[ServicePort], str]:
        """The ServicePort a new connection to dst:dport is for, and how it matched."""
        p = self.cluster.get((dst, proto, dport))
        if p is not None:
            return p, "clusterIP"
        p = self.external.get((dst, proto, dport))
        if p is not None:
            return p, "externalIP"
        if local:
            p = self.nodeport.get((proto, dport))
            if p is not None:
                return p, "nodePort"
        return None, ""

    def rows(self) -> list:
        return [p.row() for p in self.ports]


def in_cidr(ip: int, cidr: Optional[ipaddress.IPv4Network]) -> bool:
    return cidr is not None and (ip & int(cidr.netmask)) == int(cidr.network_address)
