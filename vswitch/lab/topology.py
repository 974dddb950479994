"""Lab topology files: schema and validation (see docs/lab.md and examples/)."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional


from ..config import ConfigError, _int, _join, _keys, _name, cpu_list, load_yaml

RESERVED = {"underlay", "uplink", "host"}  # the underlay namespace; port names of every vswitch node
DATAPLANES = ("vswitch", "kernel")
BACKENDS = ("vxlan", "host-gw")
LATER: Dict[str, str] = {}
LABEL_MAX = 63


@dataclass
class NodeSpec:
    name: str
    address: ipaddress.IPv4Interface
    pod_cidr: ipaddress.IPv4Network
    dataplane: str = "vswitch"
    mtu: int = 1500
    cpus: List[int] = field(default_factory=list)  # the vswitch daemon's CPUs (its config's cpus:)

    @property
    def gateway(self) -> ipaddress.IPv4Interface:
        return ipaddress.IPv4Interface(f"{self.pod_cidr.network_address + 1}/{self.pod_cidr.prefixlen}")


@dataclass
class PodSpec:
    name: str
    node: str
    namespace: str = "default"
    labels: Dict[str, str] = field(default_factory=dict)
    ip: Optional[ipaddress.IPv4Interface] = None  # filled in by assign_addresses


@dataclass
class ExternalSpec:
    name: str
    address: ipaddress.IPv4Interface


@dataclass
class Topology:
    name: str
    pod_cidr: ipaddress.IPv4Network
    service_cidr: ipaddress.IPv4Network
    backend: Optional[str]
    underlay_mtu: int
    nodes: List[NodeSpec]
    pods: List[PodSpec]
    externals: List[ExternalSpec]
    manifests: List[tuple] = field(default_factory=list)  # (path, YAML text, nat.manifests.Manifests)

    def node(self, name: str) -> NodeSpec:
        return next(n for n in self.nodes if n.name == name)


def _net(v: Any, path: str) -> ipaddress.IPv4Network:
    try:
        return ipaddress.IPv4Network(str(v), strict=True)
    except ValueError as e:
        raise ConfigError(path, f"must be an IPv4 network like 10.244.0.0/16, got {v!r} ({e})") from None


def _iface(v: Any, path: str) -> ipaddress.IPv4Interface:
    if not isinstance(v, str) or "/" not in v:
        raise ConfigError(path, f"must be an IPv4 address with prefix length like 192.168.1.11/24, got {v!r}")
    try:
        return ipaddress.IPv4Interface(v)
    except ValueError as e:
        raise ConfigError(path, f"not an IPv4 address/prefix: {v!r} ({e})") from None


def _list(doc: dict, key: str) -> list:
    v = doc.get(key, []) or []
    if not isinstance(v, list):
        raise ConfigError(key, f"must be a list, got {type(v).__name__}")
    return v


def parse(doc: Any, base_dir: str = ".") -> Topology:
    _keys(doc, "", {"name", "cluster", "nodes", "pods", "externals", "manifests"}, {"name", "nodes"}, later=LATER)
    name = _name(doc["name"], "name", what="a lab name")
    cluster = _keys(doc.get("cluster", {}) or {}, "cluster", {"podCIDR", "serviceCIDR", "backend", "underlayMTU"})
    underlay_mtu = _int(cluster.get("underlayMTU", 1500), "cluster.underlayMTU", 576, 9000)
    pod_cidr = _net(cluster.get("podCIDR", "10.244.0.0/16"), "cluster.podCIDR")
    service_cidr = _net(cluster.get("serviceCIDR", "10.96.0.0/12"), "cluster.serviceCIDR")
    if pod_cidr.overlaps(service_cidr):
        raise ConfigError("cluster.serviceCIDR", f"{service_cidr} overlaps cluster.podCIDR {pod_cidr}")
    backend = cluster.get("backend")
    if backend is not None and backend not in BACKENDS:
        raise ConfigError("cluster.backend", f"must be one of {', '.join(BACKENDS)}, got {backend!r}")

    names: Dict[str, str] = {}

    def claim(n: str, path: str) -> str:
        n = _name(n, path, what="a name")
        if n in RESERVED:
            raise ConfigError(path, f"{n!r} is reserved by the lab")
        if n in names:
            raise ConfigError(path, f"name {n!r} is already used by {names[n]}")
        names[n] = path.rsplit(".", 1)[0]
        return n

    nodes: List[NodeSpec] = []
    underlay: Optional[ipaddress.IPv4Network] = None
    raw_nodes = _list(doc, "nodes")
    if not raw_nodes:
        raise ConfigError("nodes", "a lab needs at least one node")
    for i, n in enumerate(raw_nodes):
        path = f"nodes[{i}]"
        _keys(n, path, {"name", "address", "podCIDR", "dataplane", "mtu", "cpus"}, {"name", "address", "podCIDR"})
        spec = NodeSpec(
            name=claim(n["name"], _join(path, "name")),
            address=_iface(n["address"], _join(path, "address")),
            pod_cidr=_net(n["podCIDR"], _join(path, "podCIDR")),
            dataplane=n.get("dataplane", "vswitch"),
            # flannel's vxlan gives pods the underlay MTU minus the 50 bytes of encapsulation
            mtu=_int(n.get("mtu", underlay_mtu - 50 if backend == "vxlan" else 1500), _join(path, "mtu"), 576, 9000),
        )
        if spec.dataplane not in DATAPLANES:
            raise ConfigError(_join(path, "dataplane"), f"must be one of {', '.join(DATAPLANES)}, got {spec.dataplane!r}")
        if n.get("cpus") is not None:
            if spec.dataplane != "vswitch":
                raise ConfigError(_join(path, "cpus"), "only a vswitch node has a daemon to pin")
            spec.cpus = cpu_list(n["cpus"], _join(path, "cpus"))
        if not spec.pod_cidr.subnet_of(pod_cidr):
            raise ConfigError(_join(path, "podCIDR"), f"{spec.pod_cidr} is not inside cluster.podCIDR {pod_cidr}")
        if spec.pod_cidr.num_addresses < 4:
            raise ConfigError(_join(path, "podCIDR"), "needs room for a gateway and pods (/30 or larger)")
        for other in nodes:
            if other.pod_cidr.overlaps(spec.pod_cidr):
                raise ConfigError(_join(path, "podCIDR"), f"{spec.pod_cidr} overlaps node {other.name}'s {other.pod_cidr}")
        underlay = _check_underlay(spec.address, underlay, _join(path, "address"), [x.address for x in nodes])
        nodes.append(spec)

    externals: List[ExternalSpec] = []
    for i, e in enumerate(_list(doc, "externals")):
        path = f"externals[{i}]"
        _keys(e, path, {"name", "address"}, {"name", "address"})
        spec = ExternalSpec(claim(e["name"], _join(path, "name")), _iface(e["address"], _join(path, "address")))
        _check_underlay(spec.address, underlay, _join(path, "address"),
                        [x.address for x in nodes] + [x.address for x in externals])
        if spec.address.ip in pod_cidr or spec.address.ip in service_cidr:
            raise ConfigError(_join(path, "address"), "an external host must be outside the cluster's pod and service CIDRs")
        externals.append(spec)

    pods: List[PodSpec] = []
    by_node = {n.name: n for n in nodes}
    for i, p in enumerate(_list(doc, "pods")):
        path = f"pods[{i}]"
        _keys(p, path, {"name", "node", "namespace", "labels", "ip"}, {"name", "node"})
        spec = PodSpec(name=claim(p["name"], _join(path, "name")), node=p["node"])
        if spec.node not in by_node:
            raise ConfigError(_join(path, "node"), f"no node named {spec.node!r} (nodes: {', '.join(by_node)})")
        spec.namespace = _name(p.get("namespace", "default"), _join(path, "namespace"), what="a namespace name")
        labels = p.get("labels", {}) or {}
        if not isinstance(labels, dict) or not all(isinstance(k, str) and isinstance(v, str) and len(v) <= LABEL_MAX
                                                   for k, v in labels.items()):
            raise ConfigError(_join(path, "labels"), "must map label names to string values (quote numbers)")
        spec.labels = dict(labels)
        if "ip" in p:
            node = by_node[spec.node]
            ip = ipaddress.IPv4Address(_iface(f"{p['ip']}/{node.pod_cidr.prefixlen}", _join(path, "ip")).ip)
            if ip not in node.pod_cidr or ip in (node.pod_cidr.network_address, node.pod_cidr.broadcast_address,
                                                   node.gateway.ip):
                raise ConfigError(_join(path, "ip"), f"{ip} is not a usable pod address in {node.name}'s {node.pod_cidr}")
            if any(q.ip is not None and q.ip.ip == ip for q in pods):
                raise ConfigError(_join(path, "ip"), f"{ip} is already given to another pod")
            spec.ip = ipaddress.IPv4Interface(f"{ip}/{node.pod_cidr.prefixlen}")
        pods.append(spec)
    topo = Topology(name, pod_cidr, service_cidr, backend, underlay_mtu, nodes, pods, externals)
    assign_addresses(topo)
    topo.manifests = _manifests(doc.get("manifests", []) or [], base_dir, service_cidr)
    return topo


def _manifests(files: Any, base_dir: str, service_cidr) -> List[tuple]:
    """Service/EndpointSlice files (relative to the topology file), validated now, whole."""
    from nat.manifests import ManifestError, load_text
    if not isinstance(files, list) or not all(isinstance(f, str) and f for f in files):
        raise ConfigError("manifests", "must be a list of file paths")
    out = []
    for i, f in enumerate(files):
        path = f if os.path.isabs(f) else os.path.join(base_dir, f)
        try:
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
            m = load_text(text, path)
        except OSError as e:
            raise ConfigError(f"manifests[{i}]", f"cannot read {path}: {e.strerror}") from None
        except ManifestError as e:
            raise ConfigError(f"manifests[{i}]", str(e)) from None
        for svc in m.services:
            for vip in svc.cluster_ips:
                if ipaddress.IPv4Address(vip) not in service_cidr:
                    raise ConfigError(f"manifests[{i}]", f"Service {svc.namespace}/{svc.name}: spec.clusterIP: "
                                                         f"{vip} is not in cluster.serviceCIDR {service_cidr}")
        out.append((path, text, m))
    return out


def _check_underlay(addr, underlay, path, taken) -> ipaddress.IPv4Network:
    if underlay is not None and addr.network != underlay:
        raise ConfigError(path, f"{addr} is not on the underlay segment {underlay} of the first node")
    if addr.ip in (addr.network.network_address, addr.network.broadcast_address):
        raise ConfigError(path, f"{addr.ip} is the network or broadcast address of {addr.network}")
    if any(t.ip == addr.ip for t in taken):
        raise ConfigError(path, f"{addr.ip} is already used on the underlay")
    return addr.network


def assign_addresses(topo: Topology) -> None:
    """Give each pod without an ``ip`` the next free address of its node (after the gateway)."""
    for node in topo.nodes:
        used = {node.gateway.ip} | {p.ip.ip for p in topo.pods if p.node == node.name and p.ip is not None}
        free = (h for h in node.pod_cidr.hosts() if h not in used)
        for pod in topo.pods:
            if pod.node == node.name and pod.ip is None:
                ip = next(free, None)
                if ip is None:
                    raise ConfigError("pods", f"node {node.name}'s podCIDR {node.pod_cidr} has no free address left")
                pod.ip = ipaddress.IPv4Interface(f"{ip}/{node.pod_cidr.prefixlen}")


def load(path: str) -> Topology:
    return parse(load_yaml(path, "topology"), os.path.dirname(os.path.abspath(path)))

