"""Kubernetes Service and EndpointSlice manifests, as users write them.

Parses ``v1`` Services and ``discovery.k8s.io/v1`` EndpointSlices (also
inside a ``kind: List``) into frozen dataclasses, checking them the way the
API server would, plus the limits of vswitch (IPv4 only, no ClusterIP or
node port allocation, no SCTP). The first problem rejects the whole input,
named by object and field path::

    svc.yaml: document 2: Service default/web: spec.ports[0].port: must be an integer from 1 to 65535, got 0

Unknown fields are ignored (users paste ``kubectl get -o yaml`` output);
unknown values of the fields we read are errors.

``derive_slices`` plays the EndpointSlice controller: it turns pods matched
by a Service's selector into EndpointSlices.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, NoReturn, Optional, Tuple

import yaml

# libyaml's parser when PyYAML was built with it: ~10x faster on 10,000 Services
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

DEFAULT_NODE_PORT_RANGE = (30000, 32767)  # kube-apiserver --service-node-port-range
DEFAULT_AFFINITY_TIMEOUT = 10800  # seconds (3 hours), as the API server defaults it
SERVICE_NAME_LABEL = "kubernetes.io/service-name"

SERVICE_TYPES = ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName")
NODE_PORT_TYPES = ("NodePort", "LoadBalancer")
SUPPORTED = "(supported: Service, EndpointSlice)"

# Kubernetes name formats (k8s.io/apimachinery/pkg/util/validation).
DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
IANA_SVC_NAME = re.compile(r"^[-a-z0-9]+$")

DNS1035_HINT = "lowercase letters, digits and '-', starting with a letter, at most 63 characters"
DNS1123_HINT = "lowercase letters, digits and '-', at most 63 characters"
SUBDOMAIN_HINT = "lowercase letters, digits, '-' and '.', at most 253 characters"


class ManifestError(ValueError):
    """A manifest problem: which object, which field (dotted path), what is wrong.

    ``name`` is ``namespace/name``, or "?" when the object has no usable name;
    ``kind`` is "" for problems outside any object (bad YAML, unreadable file).
    ``document`` is the 1-based YAML document index and ``item`` the index in a
    ``kind: List``'s items, when known; the message shows them after ``source``.
    """

    def __init__(self, kind: str, name: str, field: str, problem: str, source: str = "",
                 document: Optional[int] = None, item: Optional[int] = None) -> None:
        self.kind, self.name, self.field, self.problem = kind, name, field, problem
        self.source, self.document, self.item = source, document, item
        super().__init__(self._render())

    def _render(self) -> str:
        parts = []
        if self.source:
            parts.append(self.source)
            if self.document is not None:
                parts.append(f"document {self.document}" + (f" items[{self.item}]" if self.item is not None else ""))
        if self.kind:
            parts.append(f"{self.kind} {self.name}")
        if self.field:
            parts.append(self.field)
        parts.append(self.problem)
        return ": ".join(parts)

    def at(self, source: str, document: int, item: Optional[int] = None) -> "ManifestError":
        """The same error, located in the input."""
        return ManifestError(self.kind, self.name, self.field, self.problem, source, document, item)


@dataclass(frozen=True)
class ServicePort:
    name: str  # "" when unnamed (only allowed for a single-port Service)
    protocol: str  # "TCP" or "UDP"
    port: int
    target_port: int | str  # a number, or a container port name (IANA_SVC_NAME)
    node_port: Optional[int] = None


@dataclass(frozen=True)
class Service:
    namespace: str
    name: str
    type: str = "ClusterIP"
    cluster_ips: Tuple[str, ...] = ()  # () when headless or ExternalName
    headless: bool = False
    ports: Tuple[ServicePort, ...] = ()
    # Sorted (key, value) pairs so the dataclass stays hashable; selector_dict() for a dict.
    selector: Tuple[Tuple[str, str], ...] = ()
    session_affinity: str = "None"  # or "ClientIP"
    affinity_timeout: int = DEFAULT_AFFINITY_TIMEOUT
    external_ips: Tuple[str, ...] = ()
    lb_ips: Tuple[str, ...] = ()  # status.loadBalancer.ingress[].ip (LoadBalancer type only)
    external_traffic_policy: str = "Cluster"
    internal_traffic_policy: str = "Cluster"
    external_name: Optional[str] = None  # set only for type ExternalName
    publish_not_ready: bool = False  # spec.publishNotReadyAddresses (used by derive_slices)

    @property
    def key(self) -> Tuple[str, str]:
        return (self.namespace, self.name)

    @property
    def cluster_ip(self) -> Optional[str]:
        return self.cluster_ips[0] if self.cluster_ips else None

    def selector_dict(self) -> Dict[str, str]:
        return dict(self.selector)


@dataclass(frozen=True)
class Endpoint:
    addresses: Tuple[str, ...]
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    node_name: Optional[str] = None


@dataclass(frozen=True)
class EndpointSlice:
    namespace: str
    name: str
    service: str  # metadata.labels["kubernetes.io/service-name"]
    ports: Tuple[Tuple[str, str, int], ...] = ()  # (name, protocol, port)
    endpoints: Tuple[Endpoint, ...] = ()

    @property
    def key(self) -> Tuple[str, str]:
        return (self.namespace, self.name)


@dataclass
class Manifests:
    services: List[Service] = field(default_factory=list)
    slices: List[EndpointSlice] = field(default_factory=list)


# --- loading -------------------------------------------------------------------


def load_file(path: str, *, node_port_range: Tuple[int, int] = DEFAULT_NODE_PORT_RANGE) -> Manifests:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ManifestError("", "?", "", f"cannot read manifests file {path}: {e.strerror}", source=path) from None
    except UnicodeDecodeError as e:
        raise ManifestError("", "?", "", f"not UTF-8 text ({e.reason} at byte {e.start})", source=path) from None
    return load_text(text, path, node_port_range=node_port_range)


def load_text(text: str, source: str = "", *,
              node_port_range: Tuple[int, int] = DEFAULT_NODE_PORT_RANGE) -> Manifests:
    try:
        # the loader is lazy: list() surfaces every syntax error here
        docs = list(yaml.load_all(text, Loader=SAFE_LOADER))
    except yaml.YAMLError as e:
        raise ManifestError("", "?", "", _yaml_problem(e), source=source) from None
    return parse_documents(docs, source, node_port_range=node_port_range)


def _yaml_problem(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    what = getattr(e, "problem", None) or str(e)
    if mark is None:
        return f"not valid YAML: {what}"
    return f"not valid YAML at line {mark.line + 1}, column {mark.column + 1}: {what}"


def parse_documents(docs: Iterable[Any], source: str = "", *,
                    node_port_range: Tuple[int, int] = DEFAULT_NODE_PORT_RANGE) -> Manifests:
    """Validate already-loaded YAML documents (None documents are skipped)."""
    _check_range(node_port_range)
    if isinstance(docs, (dict, str)):
        raise TypeError("parse_documents takes a list of documents (use load_text for YAML text)")
    out = Manifests()
    seen: Dict[tuple, str] = {}  # (kind, namespace, name) -> where it was first seen
    node_ports: Dict[tuple, str] = {}  # (nodePort, protocol) -> "Service ns/name spec.ports[i]"
    for n, doc in enumerate(docs, 1):
        if doc is None:
            continue
        try:
            items = _unpack(doc)
        except ManifestError as e:
            raise e.at(source, n) from None
        for i, raw in items:
            where = f"document {n}" + (f" items[{i}]" if i is not None else "")
            try:
                _add(out, raw, where, seen, node_ports, node_port_range)
            except ManifestError as e:
                raise e.at(source, n, i) from None
    return out


def _check_range(rng: Any) -> None:
    ok = isinstance(rng, tuple) and len(rng) == 2 and all(isinstance(p, int) and not isinstance(p, bool)
                                                          for p in rng)
    if not ok or not 1 <= rng[0] <= rng[1] <= 65535:
        raise ValueError(f"node_port_range must be (low, high) with 1 <= low <= high <= 65535, got {rng!r}")


def _unpack(doc: Any) -> List[Tuple[Optional[int], Any]]:
    """One document as (item index or None, object) pairs; a ``kind: List`` gives its items."""
    if not isinstance(doc, dict) or doc.get("kind") != "List":
        return [(None, doc)]
    w = _Where("List", "?")
    if doc.get("apiVersion") != "v1":
        w.fail("apiVersion", f"must be v1, got {doc.get('apiVersion')!r}")
    items = doc.get("items")
    if items is None:
        return []
    if not isinstance(items, list):
        w.fail("items", f"must be a list, got {type(items).__name__}")
    return list(enumerate(items))


def _add(out: Manifests, raw: Any, where: str, seen: Dict[tuple, str], node_ports: Dict[tuple, str],
         node_port_range: Tuple[int, int]) -> None:
    if not isinstance(raw, dict):
        raise ManifestError("", "?", "", f"must be a mapping (a Kubernetes object), got {type(raw).__name__}")
    kind = raw.get("kind")
    w = _Where(kind if isinstance(kind, str) and kind else "?", _ident(raw))
    if kind is None:
        w.fail("kind", f"is required {SUPPORTED}")
    if kind == "Service":
        obj: Any = _service(raw, w, node_port_range)
    elif kind == "EndpointSlice":
        obj = _slice(raw, w)
    else:
        w.fail("kind", f"unsupported kind {kind} {SUPPORTED}")
    key = (kind, obj.namespace, obj.name)
    if key in seen:  # the API server would refuse to create the second one
        w.fail("metadata.name", f"duplicate {kind} {obj.namespace}/{obj.name} (first in {seen[key]})")
    seen[key] = where
    if kind == "Service":
        _claim_node_ports(obj, w, node_ports)
        out.services.append(obj)
    else:
        out.slices.append(obj)


def _claim_node_ports(svc: Service, w: "_Where", used: Dict[tuple, str]) -> None:
    # A node port is one socket on every node: two Services cannot share it (same port, same protocol).
    for i, p in enumerate(svc.ports):
        if p.node_port is None:
            continue
        key = (p.node_port, p.protocol)
        if key in used:
            w.fail(f"spec.ports[{i}].nodePort", f"{p.node_port}/{p.protocol} is already used by {used[key]}")
        used[key] = f"Service {svc.namespace}/{svc.name} spec.ports[{i}]"


# --- shared checks -----------------------------------------------------------------


@dataclass(frozen=True)
class _Where:
    """The object being checked, so helpers can raise errors that name it."""

    kind: str
    name: str

    def fail(self, field: str, problem: str) -> NoReturn:
        raise ManifestError(self.kind, self.name, field, problem)


def _ident(raw: dict) -> str:
    """namespace/name for messages, from the raw object (before validation), or "?"."""
    meta = raw.get("metadata")
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str) or not meta["name"]:
        return "?"
    ns = meta.get("namespace")
    return f"{ns if isinstance(ns, str) and ns else 'default'}/{meta['name']}"


def _api_version(raw: dict, w: _Where, want: str) -> None:
    got = raw.get("apiVersion")
    if got != want:
        w.fail("apiVersion", f"must be {want}, got {got!r}")


def _metadata(raw: dict, w: _Where, pattern: re.Pattern, limit: int, hint: str) -> Tuple[str, str, dict]:
    meta = _mapping(raw.get("metadata"), w, "metadata")
    name = meta.get("name")
    if name is None or name == "":
        w.fail("metadata.name", "is required")
    _dns(name, w, "metadata.name", pattern, limit, hint)
    ns = meta.get("namespace")
    ns = "default" if ns is None or ns == "" else _dns(ns, w, "metadata.namespace", DNS1123_LABEL, 63, DNS1123_HINT)
    labels = _mapping(meta.get("labels"), w, "metadata.labels")
    return ns, name, labels


def _dns(v: Any, w: _Where, path: str, pattern: re.Pattern, limit: int, hint: str) -> str:
    if not isinstance(v, str) or len(v) > limit or not pattern.match(v):
        w.fail(path, f"must be a valid name ({hint}), got {v!r}")
    return v


def _mapping(v: Any, w: _Where, path: str) -> dict:
    if v is None:
        return {}
    if not isinstance(v, dict):
        w.fail(path, f"must be a mapping, got {type(v).__name__}")
    return v


def _list(v: Any, w: _Where, path: str) -> list:
    if v is None:
        return []
    if not isinstance(v, list):
        w.fail(path, f"must be a list, got {type(v).__name__}")
    return v


def _int(v: Any, w: _Where, path: str, lo: int, hi: int, what: str = "") -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        w.fail(path, f"must be an integer from {lo} to {hi}{what}, got {v!r}")
    return v


def _bool(v: Any, w: _Where, path: str, default: bool) -> bool:
    if v is None:
        return default
    if not isinstance(v, bool):
        w.fail(path, f"must be true or false, got {v!r}")
    return v


def _enum(v: Any, w: _Where, path: str, allowed: Tuple[str, ...], default: str) -> str:
    if v is None:
        return default
    if v not in allowed:
        w.fail(path, f"must be one of {', '.join(allowed)}, got {v!r}")
    return v


def _ipv4(v: Any, w: _Where, path: str) -> str:
    """A usable unicast IPv4 address, normalised ("10.0.0.1")."""
    try:
        if not isinstance(v, str):
            raise ValueError
        addr = ipaddress.ip_address(v)  # also refuses leading zeros ("010.0.0.1"), as Kubernetes now does
    except ValueError:
        w.fail(path, f"must be an IPv4 address, got {v!r}")
    if addr.version == 6:
        w.fail(path, f"IPv6 is not supported, got {v}")
    if addr.is_unspecified or addr.is_loopback or addr.is_link_local or addr.is_multicast:
        w.fail(path, f"must not be an unspecified, loopback, link-local or multicast address, got {v}")
    return str(addr)


def _ipv4_list(v: Any, w: _Where, path: str) -> Tuple[str, ...]:
    return tuple(_ipv4(a, w, f"{path}[{i}]") for i, a in enumerate(_list(v, w, path)))


def _protocol(v: Any, w: _Where, path: str) -> str:
    if v == "SCTP":
        w.fail(path, "SCTP is not supported")
    return _enum(v, w, path, ("TCP", "UDP"), "TCP")


def _port_name(v: Any, w: _Where, path: str) -> str:
    if v is None or v == "":
        return ""
    return _dns(v, w, path, DNS1123_LABEL, 63, DNS1123_HINT)


# --- Service -------------------------------------------------------------------------


def _service(raw: dict, w: _Where, node_port_range: Tuple[int, int]) -> Service:
    _api_version(raw, w, "v1")
    ns, name, _ = _metadata(raw, w, DNS1035_LABEL, 63, DNS1035_HINT)
    spec = _mapping(raw.get("spec"), w, "spec")
    stype = _enum(spec.get("type"), w, "spec.type", SERVICE_TYPES, "ClusterIP")
    external_name = _external_name(spec, w, stype)
    _ip_families(spec, w)
    cluster_ips, headless = _cluster_ips(spec, w, stype)
    ports = _service_ports(spec, w, stype, headless, node_port_range)
    affinity, timeout = _affinity(spec, w)
    external_ips = _ipv4_list(spec.get("externalIPs"), w, "spec.externalIPs")
    return Service(
        namespace=ns, name=name, type=stype, cluster_ips=cluster_ips, headless=headless, ports=ports,
        selector=_selector(spec.get("selector"), w), session_affinity=affinity, affinity_timeout=timeout,
        external_ips=external_ips, lb_ips=_lb_ips(raw.get("status"), w) if stype == "LoadBalancer" else (),
        external_traffic_policy=_external_policy(spec, w, stype, external_ips),
        internal_traffic_policy=_enum(spec.get("internalTrafficPolicy"), w, "spec.internalTrafficPolicy",
                                      ("Cluster", "Local"), "Cluster"),
        external_name=external_name,
        publish_not_ready=_bool(spec.get("publishNotReadyAddresses"), w, "spec.publishNotReadyAddresses", False),
    )


def _external_name(spec: dict, w: _Where, stype: str) -> Optional[str]:
    if stype != "ExternalName":
        return None  # the API server ignores externalName on other types
    v = spec.get("externalName")
    if v is None or v == "":
        w.fail("spec.externalName", "is required for type ExternalName")
    if not isinstance(v, str) or len(v.rstrip(".")) > 253 or not DNS1123_SUBDOMAIN.match(v.rstrip(".")):
        w.fail("spec.externalName", f"must be a DNS name ({SUBDOMAIN_HINT}), got {v!r}")
    return v


def _ip_families(spec: dict, w: _Where) -> None:
    for i, fam in enumerate(_list(spec.get("ipFamilies"), w, "spec.ipFamilies")):
        if fam == "IPv6":
            w.fail(f"spec.ipFamilies[{i}]", "IPv6 is not supported")
        _enum(fam, w, f"spec.ipFamilies[{i}]", ("IPv4", "IPv6"), "IPv4")
    policy = _enum(spec.get("ipFamilyPolicy"), w, "spec.ipFamilyPolicy",
                   ("SingleStack", "PreferDualStack", "RequireDualStack"), "SingleStack")
    if policy == "RequireDualStack":  # PreferDualStack falls back to IPv4 alone, this cannot
        w.fail("spec.ipFamilyPolicy", "IPv6 is not supported (RequireDualStack needs an IPv6 ClusterIP)")


def _cluster_ips(spec: dict, w: _Where, stype: str) -> Tuple[Tuple[str, ...], bool]:
    """(cluster_ips, headless). vswitch takes the ClusterIP as given: it has no allocator."""
    one = spec.get("clusterIP")
    one = None if one == "" else one
    many = _list(spec.get("clusterIPs"), w, "spec.clusterIPs")
    if stype == "ExternalName":
        if one is not None or many:
            w.fail("spec.clusterIP" if one is not None else "spec.clusterIPs",
                   "must not be set for type ExternalName")
        return (), False
    if one is not None and many and many[0] != one:
        w.fail("spec.clusterIPs[0]", f"must equal spec.clusterIP ({one}), got {many[0]!r}")
    first, path = (one, "spec.clusterIP") if one is not None else (many[0] if many else None, "spec.clusterIPs[0]")
    if first is None:
        w.fail("spec.clusterIP", "is required (vswitch does not allocate ClusterIPs)")
    if first == "None":
        if len(many) > 1:
            w.fail("spec.clusterIPs", "must be [None] alone for a headless Service")
        if stype in NODE_PORT_TYPES:
            w.fail(path, f"may not be None (headless) for type {stype}")
        return (), True
    ip = _ipv4(first, w, path)
    for j, extra in enumerate(many[1:], 1):
        _ipv4(extra, w, f"spec.clusterIPs[{j}]")  # an IPv6 second family says "IPv6 is not supported"
    if len(many) > 1:
        w.fail("spec.clusterIPs", f"must hold one IPv4 address, got {len(many)} addresses")
    return (ip,), False


def _service_ports(spec: dict, w: _Where, stype: str, headless: bool,
                   node_port_range: Tuple[int, int]) -> Tuple[ServicePort, ...]:
    raw = _list(spec.get("ports"), w, "spec.ports")
    if not raw and not headless and stype != "ExternalName":
        w.fail("spec.ports", "is required (at least one port; only headless and ExternalName Services may have none)")
    # LoadBalancers may opt out of node ports; the cloud LB then reaches pods directly.
    allocate = stype == "NodePort" or (stype == "LoadBalancer" and _bool(
        spec.get("allocateLoadBalancerNodePorts"), w, "spec.allocateLoadBalancerNodePorts", True))
    ports = tuple(_service_port(p, w, f"spec.ports[{i}]", stype, allocate, node_port_range)
                  for i, p in enumerate(raw))
    _unique_ports(ports, w)
    return ports


def _service_port(d: Any, w: _Where, path: str, stype: str, need_node_port: bool,
                  node_port_range: Tuple[int, int]) -> ServicePort:
    if not isinstance(d, dict):
        w.fail(path, f"must be a mapping, got {type(d).__name__}")
    port = _int(d.get("port"), w, f"{path}.port", 1, 65535)
    return ServicePort(
        name=_port_name(d.get("name"), w, f"{path}.name"),
        protocol=_protocol(d.get("protocol"), w, f"{path}.protocol"),
        port=port,
        target_port=_target_port(d.get("targetPort"), w, f"{path}.targetPort", port),
        node_port=_node_port(d.get("nodePort"), w, f"{path}.nodePort", stype, need_node_port, node_port_range),
    )


def _target_port(v: Any, w: _Where, path: str, port: int) -> int | str:
    if v is None:
        return port
    if isinstance(v, str):
        # IANA_SVC_NAME: a container port name; "8080" in quotes is a string, and not a valid name.
        ok = (len(v) <= 15 and IANA_SVC_NAME.match(v) and re.search("[a-z]", v)
              and "--" not in v and not v.startswith("-") and not v.endswith("-"))
        if not ok:
            w.fail(path, "must be a port number from 1 to 65535 or a container port name (lowercase "
                         f"letters, digits and '-', at least one letter, at most 15 characters), got {v!r}")
        return v
    return _int(v, w, path, 1, 65535)


def _node_port(v: Any, w: _Where, path: str, stype: str, required: bool,
               node_port_range: Tuple[int, int]) -> Optional[int]:
    if v is None:
        if required:
            w.fail(path, "is required (vswitch does not allocate node ports)")
        return None
    if stype not in NODE_PORT_TYPES:
        w.fail(path, f"may only be set for type NodePort or LoadBalancer, not {stype}")
    lo, hi = node_port_range
    return _int(v, w, path, lo, hi, " (the node port range)")


def _unique_ports(ports: Tuple[ServicePort, ...], w: _Where) -> None:
    names: Dict[str, int] = {}
    numbers: Dict[tuple, int] = {}
    for i, p in enumerate(ports):
        if len(ports) > 1 and not p.name:  # EndpointSlices match Service ports by name
            w.fail(f"spec.ports[{i}].name", "is required when the Service has more than one port")
        if p.name in names:
            w.fail(f"spec.ports[{i}].name", f"duplicate port name {p.name!r} (also spec.ports[{names[p.name]}])")
        names[p.name] = i
        if (p.port, p.protocol) in numbers:
            w.fail(f"spec.ports[{i}]", f"duplicate port {p.port}/{p.protocol} "
                                       f"(also spec.ports[{numbers[(p.port, p.protocol)]}])")
        numbers[(p.port, p.protocol)] = i


def _selector(v: Any, w: _Where) -> Tuple[Tuple[str, str], ...]:
    sel = _mapping(v, w, "spec.selector")
    for k, val in sel.items():
        path = f"spec.selector[{k}]"
        if not isinstance(k, str) or not _label_key_ok(k):
            w.fail(path, f"must be a label key like app or app.kubernetes.io/name, got {k!r}")
        if not isinstance(val, str):  # YAML turns unquoted true/1.0 into a bool/number
            w.fail(path, f"must be a string (quote it in YAML), got {val!r}")
        if len(val) > 63 or not (val == "" or LABEL_NAME.match(val)):
            w.fail(path, f"must be a label value (letters, digits, '-', '_', '.', at most 63), got {val!r}")
    return tuple(sorted(sel.items()))


def _label_key_ok(k: str) -> bool:
    prefix, _, name = k.rpartition("/")
    if prefix and (len(prefix) > 253 or not DNS1123_SUBDOMAIN.match(prefix)):
        return False
    return len(name) <= 63 and bool(LABEL_NAME.match(name))


def _affinity(spec: dict, w: _Where) -> Tuple[str, int]:
    affinity = _enum(spec.get("sessionAffinity"), w, "spec.sessionAffinity", ("None", "ClientIP"), "None")
    cfg = spec.get("sessionAffinityConfig")
    if cfg is None:
        return affinity, DEFAULT_AFFINITY_TIMEOUT
    if affinity == "None":  # as the API server: a timeout without affinity is a mistake
        w.fail("spec.sessionAffinityConfig", "must not be set when spec.sessionAffinity is None")
    client = _mapping(_mapping(cfg, w, "spec.sessionAffinityConfig").get("clientIP"), w,
                      "spec.sessionAffinityConfig.clientIP")
    timeout = client.get("timeoutSeconds")
    path = "spec.sessionAffinityConfig.clientIP.timeoutSeconds"
    return affinity, DEFAULT_AFFINITY_TIMEOUT if timeout is None else _int(timeout, w, path, 1, 86400)


def _external_policy(spec: dict, w: _Where, stype: str, external_ips: Tuple[str, ...]) -> str:
    # Only the current names: the pre-1.7 "OnlyLocal"/"Global" are errors like any unknown value.
    policy = _enum(spec.get("externalTrafficPolicy"), w, "spec.externalTrafficPolicy", ("Cluster", "Local"),
                   "Cluster")
    external = stype in NODE_PORT_TYPES or (stype == "ClusterIP" and bool(external_ips))
    # The API server refuses any value there; we let "Cluster" through since it changes nothing.
    if policy == "Local" and not external:
        w.fail("spec.externalTrafficPolicy", "Local is only allowed for externally-accessible Services "
                                             "(type NodePort or LoadBalancer, or with externalIPs)")
    return policy


def _lb_ips(status: Any, w: _Where) -> Tuple[str, ...]:
    lb = _mapping(_mapping(status, w, "status").get("loadBalancer"), w, "status.loadBalancer")
    ips = []
    for i, ing in enumerate(_list(lb.get("ingress"), w, "status.loadBalancer.ingress")):
        ing = _mapping(ing, w, f"status.loadBalancer.ingress[{i}]")
        if ing.get("ip") is not None:  # hostname-only entries (AWS ELB) carry no address for us
            ips.append(_ipv4(ing["ip"], w, f"status.loadBalancer.ingress[{i}].ip"))
    return tuple(ips)


# --- EndpointSlice -------------------------------------------------------------------------


def _slice(raw: dict, w: _Where) -> EndpointSlice:
    _api_version(raw, w, "discovery.k8s.io/v1")
    ns, name, labels = _metadata(raw, w, DNS1123_SUBDOMAIN, 253, SUBDOMAIN_HINT)
    path = f"metadata.labels[{SERVICE_NAME_LABEL}]"
    service = labels.get(SERVICE_NAME_LABEL)
    if service is None or service == "":
        w.fail(path, "is required (the name of the Service this slice belongs to)")
    _dns(service, w, path, DNS1035_LABEL, 63, DNS1035_HINT)
    kind = raw.get("addressType")
    if kind is None:
        w.fail("addressType", "is required (IPv4)")
    if kind != "IPv4":
        w.fail("addressType", f"addressType {kind} is not supported (only IPv4)")
    ports = _slice_ports(raw.get("ports"), w)
    endpoints = tuple(_endpoint(e, w, f"endpoints[{i}]")
                      for i, e in enumerate(_list(raw.get("endpoints"), w, "endpoints")))
    return EndpointSlice(namespace=ns, name=name, service=service, ports=ports, endpoints=endpoints)


def _slice_ports(v: Any, w: _Where) -> Tuple[Tuple[str, str, int], ...]:
    ports, names = [], {}
    for i, d in enumerate(_list(v, w, "ports")):
        path = f"ports[{i}]"
        if not isinstance(d, dict):
            w.fail(path, f"must be a mapping, got {type(d).__name__}")
        name = _port_name(d.get("name"), w, f"{path}.name")
        if name in names:
            w.fail(f"{path}.name", f"duplicate port name {name!r} (also ports[{names[name]}])")
        names[name] = i
        if d.get("port") is None:  # the API's "all ports": vswitch translates one port to one port
            w.fail(f"{path}.port", "is required (vswitch does not support a null port meaning all ports)")
        ports.append((name, _protocol(d.get("protocol"), w, f"{path}.protocol"),
                      _int(d["port"], w, f"{path}.port", 1, 65535)))
    return tuple(ports)


def _endpoint(d: Any, w: _Where, path: str) -> Endpoint:
    d = _mapping(d, w, path)
    addrs = d.get("addresses")
    if not isinstance(addrs, list) or not 1 <= len(addrs) <= 100:
        w.fail(f"{path}.addresses", f"must be a list of 1 to 100 IPv4 addresses, got {addrs!r}")
    cond = _mapping(d.get("conditions"), w, f"{path}.conditions")
    # The API: a missing ready means ready, a missing terminating means not terminating.
    ready = _bool(cond.get("ready"), w, f"{path}.conditions.ready", True)
    node = d.get("nodeName")
    if node is not None:
        _dns(node, w, f"{path}.nodeName", DNS1123_SUBDOMAIN, 253, SUBDOMAIN_HINT)
    return Endpoint(
        addresses=_ipv4_list(addrs, w, f"{path}.addresses"),
        ready=ready,
        serving=_bool(cond.get("serving"), w, f"{path}.conditions.serving", True),  # nil = serving, as kube-proxy reads it
        terminating=_bool(cond.get("terminating"), w, f"{path}.conditions.terminating", False),
        node_name=node,
    )


# --- derived slices (the EndpointSlice controller) ------------------------------------------


def derive_slices(services: List[Service], pods: List[dict]) -> List[EndpointSlice]:
    """EndpointSlices for Services with a selector, from the pods it matches.

    pods: {"name", "namespace" (default "default"), "labels", "ip", "node",
    "ready" (default True), "ports": {name: number}}. Each Service gets a slice
    named <svc>-derived (empty if no pod matches). Pods are left out when they
    have no IP or lack a named targetPort. Pods whose named ports resolve to
    different numbers cannot share a slice: as the controller does, each
    distinct port set gets its own slice (<svc>-derived-2, -3, ... in order).
    """
    checked = sorted((_pod(p) for p in pods), key=lambda p: (p["namespace"], p["name"]))
    out: List[EndpointSlice] = []
    for svc in services:
        if svc.type != "ExternalName" and svc.selector:
            out.extend(_slices_for(svc, checked))
    return out


def _pod(p: Any) -> dict:
    if not isinstance(p, dict) or not isinstance(p.get("name"), str) or not p["name"]:
        raise ManifestError("Pod", "?", "name", f"every pod needs a name, got {p!r}")
    ns = p.get("namespace") or "default"
    w = _Where("Pod", f"{ns}/{p['name']}")
    ip = p.get("ip")
    ports = _mapping(p.get("ports"), w, "ports")
    for k, v in ports.items():
        _int(v, w, f"ports[{k}]", 1, 65535)
    return {"name": p["name"], "namespace": ns, "labels": _mapping(p.get("labels"), w, "labels"),
            "ip": _ipv4(ip, w, "ip") if ip else None, "node": p.get("node") or None,
            "ready": _bool(p.get("ready"), w, "ready", True), "ports": ports}


def _slices_for(svc: Service, pods: List[dict]) -> List[EndpointSlice]:
    groups: Dict[tuple, List[Endpoint]] = {}  # port set -> endpoints, first pod's group first
    for pod in pods:
        if pod["namespace"] != svc.namespace or pod["ip"] is None or not _selects(svc, pod):
            continue
        ports = _resolve_ports(svc, pod)
        if ports is not None:
            groups.setdefault(ports, []).append(_pod_endpoint(svc, pod))
    if not groups:  # like the controller's placeholder slice: the Service exists, no endpoints
        return [EndpointSlice(svc.namespace, f"{svc.name}-derived", svc.name)]
    return [EndpointSlice(svc.namespace, f"{svc.name}-derived" + (f"-{i + 1}" if i else ""), svc.name,
                          ports, tuple(eps)) for i, (ports, eps) in enumerate(groups.items())]


def _selects(svc: Service, pod: dict) -> bool:
    labels = pod["labels"]
    return all(labels.get(k) == v for k, v in svc.selector)


def _resolve_ports(svc: Service, pod: dict) -> Optional[Tuple[Tuple[str, str, int], ...]]:
    """The slice ports for this pod, or None if a named targetPort is missing on it."""
    out = []
    for p in svc.ports:
        number = p.target_port if isinstance(p.target_port, int) else pod["ports"].get(p.target_port)
        if number is None:
            return None
        out.append((p.name, p.protocol, number))
    return tuple(out)


def _pod_endpoint(svc: Service, pod: dict) -> Endpoint:
    # As the controller: serving is the pod's readiness; publishNotReadyAddresses forces ready.
    serving = pod["ready"]
    return Endpoint(addresses=(pod["ip"],), ready=serving or svc.publish_not_ready, serving=serving,
                    terminating=False, node_name=pod["node"])
