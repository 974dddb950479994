"""Node configuration: schema, validation, defaults.

Everything is checked before anything is created, so a bad config never
leaves a half-built node. Errors name the field by path
(``ports[1].mtu: must be an integer from 68 to 65535, got 'big'``).
See docs/config.md for the schema with examples.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List

import yaml

from .fdb import DEFAULT_AGEING, DEFAULT_MAX_LEARNED
from .flowcache import DEFAULT_SIZE as DEFAULT_FLOW_CACHE
from .packet import mac_bytes

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
IFNAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")  # IFNAMSIZ - 1, no '/' ':' or spaces
DEFAULT_SOCKET = "/run/vswitch/vswitch.sock"


class ConfigError(ValueError):
    """A config problem, with the dotted path of the offending field."""

    def __init__(self, path: str, problem: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(f"{path}: {problem}" if path else problem)


def _keys(d: Any, path: str, allowed: set, required: set = frozenset(), later: Dict[str, str] | None = None) -> dict:
    if not isinstance(d, dict):
        raise ConfigError(path, f"must be a mapping, got {type(d).__name__}")
    for k in d:
        if later and k in later:
            raise ConfigError(_join(path, k), f"not supported yet ({later[k]})")
        if k not in allowed:
            raise ConfigError(_join(path, str(k)), f"unknown key (allowed: {', '.join(sorted(allowed))})")
    for k in sorted(required):
        if k not in d:
            raise ConfigError(_join(path, k), "is required")
    return d


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _int(v: Any, path: str, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ConfigError(path, f"must be an integer from {lo} to {hi}, got {v!r}")
    return v


def _num(v: Any, path: str, lo: float, hi: float) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
        raise ConfigError(path, f"must be a number from {lo:g} to {hi:g}, got {v!r}")
    return float(v)


def _bool(v: Any, path: str) -> bool:
    if not isinstance(v, bool):
        raise ConfigError(path, f"must be true or false, got {v!r}")
    return v


def _name(v: Any, path: str, pattern=NAME_RE, what: str = "a name") -> str:
    if not isinstance(v, str) or not pattern.match(v):
        hint = "1-15 characters, letters, digits, '_', '.', '-'" if pattern is IFNAME_RE else \
            "letters, digits, '_', '.', '-', starting with a letter or digit, at most 63"
        raise ConfigError(path, f"must be {what} ({hint}), got {v!r}")
    return v


PORT_KEYS = {
    "tap": {"name", "type", "ifname", "netns", "netns_ifname", "mtu", "hairpin", "offload"},
    "afpacket": {"name", "type", "interface", "mtu", "hairpin"},
    "memory": {"name", "type", "mtu", "hairpin"},
}
# Pods sit behind TAPs and flannel's CNI config turns hairpin on for them;
# an uplink/trunk interface behaves like a plain bridge port.
HAIRPIN_DEFAULT = {"tap": True, "afpacket": False, "memory": True}


def port_spec(d: Any, path: str) -> dict:
    """Validate one port entry; returns constructor kwargs plus 'type'."""
    if not isinstance(d, dict):
        raise ConfigError(path, f"must be a mapping, got {type(d).__name__}")
    kind = d.get("type", "tap")
    if not isinstance(kind, str) or kind not in PORT_KEYS:
        raise ConfigError(_join(path, "type"), f"must be one of {', '.join(sorted(PORT_KEYS))}, got {kind!r}")
    _keys(d, path, PORT_KEYS[kind], {"name"})
    spec = {"type": kind, "name": _name(d["name"], _join(path, "name"), what="a port name")}
    spec["mtu"] = _int(d.get("mtu", 1500), _join(path, "mtu"), 68, 65535)
    spec["hairpin"] = _bool(d.get("hairpin", HAIRPIN_DEFAULT[kind]), _join(path, "hairpin"))
    if kind == "tap":
        default_if = spec["name"] if IFNAME_RE.match(spec["name"]) else None
        ifname = d.get("ifname", default_if)
        if ifname is None:
            raise ConfigError(_join(path, "ifname"), f"is required when the port name {spec['name']!r} "
                                                     "is not a valid interface name (15 characters at most)")
        spec["ifname"] = _name(ifname, _join(path, "ifname"), IFNAME_RE, "an interface name")
        if "netns" in d:
            spec["netns"] = _name(d["netns"], _join(path, "netns"), what="a network namespace name")
        if "netns_ifname" in d:
            if "netns" not in d:
                raise ConfigError(_join(path, "netns_ifname"), "needs netns (the namespace to rename it in)")
            spec["netns_ifname"] = _name(d["netns_ifname"], _join(path, "netns_ifname"), IFNAME_RE,
                                         "an interface name")
        spec["offload"] = _bool(d.get("offload", True), _join(path, "offload"))
    elif kind == "afpacket":
        spec["interface"] = _name(d.get("interface", spec["name"]), _join(path, "interface"), IFNAME_RE,
                                  "an interface name")
    return spec


@dataclass
class NodeConfig:
    name: str
    ageing: float = DEFAULT_AGEING
    max_learned: int = DEFAULT_MAX_LEARNED
    static: List[tuple] = field(default_factory=list)  # (mac bytes, port name)
    ports: List[dict] = field(default_factory=list)
    socket: str = DEFAULT_SOCKET
    log_level: str = "info"
    log_format: str = "text"  # or "json": one object per line (vswitch/logs.py)
    metrics_listen: str | None = None  # "127.0.0.1:9469" or "unix:/path"; None: no metrics endpoint
    router: dict | None = None  # {"interfaces": [...], "routes": [(path, text)]}
    flow_cache: int = DEFAULT_FLOW_CACHE  # flows kept; 0 turns the cache off
    nat: dict | None = None  # see _nat
    overlay: dict | None = None  # see _overlay
    cpus: List[int] = field(default_factory=list)  # CPUs the daemon runs on (sched_setaffinity); [] = any


LATER = {
    "services": "Services come as Kubernetes manifests: list files under nat.manifests or use `vswitch apply -f`",
    "vxlan": "the VXLAN tunnel endpoint is configured under overlay: (see docs/config.md)",
}
SCHEDULERS = ("random", "rr", "lc", "sh", "mh")


def parse(doc: Any) -> NodeConfig:
    """Validate a config mapping (already loaded from YAML) into a NodeConfig."""
    _keys(doc, "", {"name", "bridge", "ports", "control", "log", "router", "flow_cache", "nat", "overlay",
                "metrics", "cpus"},
          {"name"}, later=LATER)
    cfg = NodeConfig(name=_name(doc["name"], "name", what="a node name"))
    cfg.flow_cache = _int(doc.get("flow_cache", DEFAULT_FLOW_CACHE), "flow_cache", 0, 10_000_000)

    bridge = _keys(doc.get("bridge", {}) or {}, "bridge", {"ageing", "max_learned", "static"})
    cfg.ageing = _num(bridge.get("ageing", DEFAULT_AGEING), "bridge.ageing", 1, 1_000_000)
    cfg.max_learned = _int(bridge.get("max_learned", DEFAULT_MAX_LEARNED), "bridge.max_learned", 1, 10_000_000)

    ports = doc.get("ports", []) or []
    if not isinstance(ports, list):
        raise ConfigError("ports", f"must be a list, got {type(ports).__name__}")
    seen: Dict[str, str] = {}
    ifnames: Dict[str, str] = {}
    for i, p in enumerate(ports):
        spec = port_spec(p, f"ports[{i}]")
        if spec["name"] in seen:
            raise ConfigError(f"ports[{i}].name", f"duplicate port name {spec['name']!r} (also {seen[spec['name']]})")
        seen[spec["name"]] = f"ports[{i}]"
        dev = spec.get("ifname") or spec.get("interface")
        if dev and dev in ifnames:
            raise ConfigError(f"ports[{i}]", f"interface {dev!r} is already used by {ifnames[dev]}")
        if dev:
            ifnames[dev] = f"ports[{i}]"
        cfg.ports.append(spec)

    static = bridge.get("static", []) or []
    if not isinstance(static, list):
        raise ConfigError("bridge.static", "must be a list of {mac, port}")
    for i, s in enumerate(static):
        path = f"bridge.static[{i}]"
        _keys(s, path, {"mac", "port"}, {"mac", "port"})
        if not isinstance(s["mac"], str):  # YAML reads an unquoted 52:54:00:... as a base-60 number
            raise ConfigError(f"{path}.mac", f"write the MAC in quotes, e.g. \"02:00:00:00:00:01\" (got {s['mac']!r})")
        try:
            mac = mac_bytes(s["mac"])
        except ValueError:
            raise ConfigError(f"{path}.mac", f"not a MAC address: {s['mac']!r}") from None
        if mac[0] & 1:
            raise ConfigError(f"{path}.mac", "a static FDB entry must be a unicast MAC")
        if not isinstance(s["port"], str) or s["port"] not in seen:
            raise ConfigError(f"{path}.port", f"no port named {s['port']!r}")
        cfg.static.append((mac, s["port"]))

    if doc.get("router") is not None:
        cfg.router = _router(doc["router"], seen)
    if doc.get("nat") is not None:
        if cfg.router is None:
            raise ConfigError("nat", "needs a router: section (Services are translated on the routed path)")
        cfg.nat = _nat(doc["nat"])
    if doc.get("overlay") is not None:
        if cfg.router is None:
            raise ConfigError("overlay", "needs a router: section (the VTEP is a router interface)")
        cfg.overlay = _overlay(doc["overlay"], cfg.router, seen)

    control = _keys(doc.get("control", {}) or {}, "control", {"socket"})
    sock = control.get("socket", DEFAULT_SOCKET)
    if not isinstance(sock, str) or not sock.startswith("/") or len(sock.encode()) > 107:
        raise ConfigError("control.socket", f"must be an absolute path of at most 107 bytes, got {sock!r}")
    cfg.socket = sock

    log = _keys(doc.get("log", {}) or {}, "log", {"level", "format"})
    level = log.get("level", "info")
    if level not in ("debug", "info", "warning", "error"):
        raise ConfigError("log.level", f"must be one of debug, info, warning, error, got {level!r}")
    cfg.log_level = level
    fmt = log.get("format", "text")
    if fmt not in ("text", "json"):
        raise ConfigError("log.format", f"must be text or json, got {fmt!r}")
    cfg.log_format = fmt

    if doc.get("metrics") is not None:
        from .metrics import parse_listen
        metrics = _keys(doc["metrics"], "metrics", {"listen"}, {"listen"})
        try:
            parse_listen(metrics["listen"])
        except ValueError as e:
            raise ConfigError("metrics.listen", str(e)) from None
        cfg.metrics_listen = metrics["listen"]
    if doc.get("cpus") is not None:
        cfg.cpus = cpu_list(doc["cpus"], "cpus")
    return cfg


MAX_CPU = 4095


def cpu_list(v: Any, path: str) -> List[int]:
    """A non-empty list of distinct CPU numbers, e.g. [1] or [2, 3]."""
    if not isinstance(v, list) or not v:
        raise ConfigError(path, f"must be a non-empty list of CPU numbers, e.g. [1], got {v!r}")
    cpus = [_int(c, f"{path}[{i}]", 0, MAX_CPU) for i, c in enumerate(v)]
    if len(set(cpus)) != len(cpus):
        raise ConfigError(path, f"lists a CPU twice: {v!r}")
    return cpus


IFACE_KEYS = {"name", "address", "addresses", "mac", "mtu", "port", "host", "redirects"}


def _cidr(v: Any, path: str) -> str:
    try:
        return str(ipaddress.IPv4Network(v))
    except (ValueError, TypeError):
        raise ConfigError(path, f"must be an IPv4 prefix like 10.244.0.0/16, got {v!r}") from None


def _nat(doc: Any) -> dict:
    """nat: the node's kube-proxy and ip-masq (docs/config.md)."""
    _keys(doc, "nat", {"clusterCIDR", "masquerade", "scheduler", "conntrack", "manifests", "nodePortRange"})
    out = {"cluster_cidr": _cidr(doc["clusterCIDR"], "nat.clusterCIDR") if doc.get("clusterCIDR") else None,
           "masquerade": _bool(doc.get("masquerade", True), "nat.masquerade")}
    sched = doc.get("scheduler", "random")
    if sched not in SCHEDULERS:
        raise ConfigError("nat.scheduler", f"must be one of {', '.join(SCHEDULERS)}, got {sched!r}")
    out["scheduler"] = sched
    ct = _keys(doc.get("conntrack", {}) or {}, "nat.conntrack", {"max", "profile"})
    out["conntrack_max"] = _int(ct.get("max", 131072), "nat.conntrack.max", 1, 100_000_000)
    profile = ct.get("profile", "kube-proxy")
    if profile not in ("kube-proxy", "kernel"):
        raise ConfigError("nat.conntrack.profile", f"must be kube-proxy or kernel, got {profile!r}")
    out["profile"] = profile
    rng = doc.get("nodePortRange", "30000-32767")
    m = re.fullmatch(r"(\d+)-(\d+)", str(rng))
    if not m or not 1 <= int(m[1]) <= int(m[2]) <= 65535:
        raise ConfigError("nat.nodePortRange", f"must be like 30000-32767, got {rng!r}")
    out["node_port_range"] = (int(m[1]), int(m[2]))
    files = doc.get("manifests", []) or []
    if not isinstance(files, list) or not all(isinstance(f, str) and f for f in files):
        raise ConfigError("nat.manifests", "must be a list of file paths")
    out["manifests"] = files
    return out


def _router(doc: Any, ports: Dict[str, str]) -> dict:
    """router: {interfaces: [...], routes: [...]}; route texts are parsed when the node is built."""
    _keys(doc, "router", {"interfaces", "routes"}, {"interfaces"})
    ifaces, names, used_ports = [], set(), {}
    raw = doc["interfaces"]
    if not isinstance(raw, list) or not raw:
        raise ConfigError("router.interfaces", "must be a non-empty list")
    for i, d in enumerate(raw):
        path = f"router.interfaces[{i}]"
        _keys(d, path, IFACE_KEYS, {"name"})
        name = _name(d["name"], _join(path, "name"), what="an interface name")
        if name in names:
            raise ConfigError(_join(path, "name"), f"duplicate router interface {name!r}")
        names.add(name)
        addrs = d.get("addresses", [d["address"]] if "address" in d else [])
        if not isinstance(addrs, list) or not addrs:
            raise ConfigError(path, "needs address (or addresses: a list)")
        parsed = []
        for j, a in enumerate(addrs):
            try:
                if not isinstance(a, str) or "/" not in a:
                    raise ValueError("needs a prefix length")
                parsed.append(ipaddress.IPv4Interface(a))
            except ValueError as e:
                raise ConfigError(f"{path}.address{'es[%d]' % j if 'addresses' in d else ''}",
                                  f"must be an IPv4 address with prefix length like 10.244.1.1/24, got {a!r} ({e})") from None
        spec = {"name": name, "addresses": parsed, "mtu": _int(d.get("mtu", 1500), _join(path, "mtu"), 68, 65535),
                "host": _bool(d.get("host", False), _join(path, "host")),
                "redirects": _bool(d.get("redirects", True), _join(path, "redirects")), "port": None, "mac": None}
        if "mac" in d:
            if not isinstance(d["mac"], str):
                raise ConfigError(_join(path, "mac"), f"write the MAC in quotes (got {d['mac']!r})")
            try:
                spec["mac"] = mac_bytes(d["mac"])
            except ValueError:
                raise ConfigError(_join(path, "mac"), f"not a MAC address: {d['mac']!r}") from None
            if spec["mac"][0] & 1:
                raise ConfigError(_join(path, "mac"), "must be a unicast MAC")
        if "port" in d:
            port = d["port"]
            if not isinstance(port, str) or port not in ports:
                raise ConfigError(_join(path, "port"), f"no port named {port!r} in ports")
            if port in used_ports:
                raise ConfigError(_join(path, "port"), f"port {port!r} already belongs to {used_ports[port]}")
            used_ports[port] = path
            spec["port"] = port
        elif spec["host"]:
            raise ConfigError(_join(path, "host"), "the host interface needs its own port (an internal tap)")
        ifaces.append(spec)
    if sum(1 for s in ifaces if s["port"] is None) > 1:
        raise ConfigError("router.interfaces", "at most one interface can sit on the bridge (no port)")
    if sum(1 for s in ifaces if s["host"]) > 1:
        raise ConfigError("router.interfaces", "at most one interface can be the host's")
    routes = doc.get("routes", []) or []
    if not isinstance(routes, list) or not all(isinstance(r, str) for r in routes):
        raise ConfigError("router.routes", "must be a list of `ip route`-style strings")
    return {"interfaces": ifaces, "routes": [(f"router.routes[{i}]", r) for i, r in enumerate(routes)]}


def _ipv4(v: Any, path: str) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(v)
    except (ValueError, TypeError):
        raise ConfigError(path, f"must be an IPv4 address like 192.168.1.11, got {v!r}") from None


def _mac(v: Any, path: str) -> bytes:
    if not isinstance(v, str):  # YAML reads an unquoted 52:54:00:... as a base-60 number
        raise ConfigError(path, f"write the MAC in quotes, e.g. \"02:00:00:00:00:01\" (got {v!r})")
    try:
        mac = mac_bytes(v)
    except ValueError:
        raise ConfigError(path, f"not a MAC address: {v!r}") from None
    if mac[0] & 1:
        raise ConfigError(path, "must be a unicast MAC")
    return mac


def peer_spec(d: Any, path: str) -> dict:
    """One remote VTEP: {name, address (its underlay IP), podCIDR, vtepMAC}."""
    _keys(d, path, {"name", "address", "podCIDR", "vtepMAC"}, {"address", "podCIDR", "vtepMAC"})
    addr = _ipv4(d["address"], _join(path, "address"))
    try:
        cidr = ipaddress.IPv4Network(d["podCIDR"])
    except (ValueError, TypeError):
        raise ConfigError(_join(path, "podCIDR"), f"must be an IPv4 prefix like 10.244.2.0/24, got "
                                                  f"{d['podCIDR']!r}") from None
    name = _name(d.get("name", str(addr)), _join(path, "name"), what="a peer name") if "name" in d else str(addr)
    return {"name": name, "address": addr, "pod_cidr": cidr, "mac": _mac(d["vtepMAC"], _join(path, "vtepMAC"))}


DATAPATHS = ("auto", "pipeline", "socket")


def _overlay(doc: Any, router: dict, ports: Dict[str, str]) -> dict:
    """overlay: a flannel-style VXLAN VTEP (docs/config.md)."""
    _keys(doc, "overlay", {"local", "podCIDR", "vni", "port", "mac", "mtu", "interface", "acceptUnknownPeers",
                           "peers", "gso", "gro", "datapath"}, {"local", "podCIDR"})
    datapath = doc.get("datapath", "auto")
    if datapath not in DATAPATHS:
        raise ConfigError("overlay.datapath", f"must be one of {', '.join(DATAPATHS)}, got {datapath!r}")
    out = {"local": _ipv4(doc["local"], "overlay.local"),
           "vni": _int(doc.get("vni", 1), "overlay.vni", 0, 0xFFFFFF),
           "port": _int(doc.get("port", 8472), "overlay.port", 1, 65535),
           "mtu": _int(doc.get("mtu", 1450), "overlay.mtu", 68, 65535),
           "accept_unknown_peers": _bool(doc.get("acceptUnknownPeers", False), "overlay.acceptUnknownPeers"),
           "gso": _bool(doc.get("gso", True), "overlay.gso"), "gro": _bool(doc.get("gro", True), "overlay.gro"),
           "mac": _mac(doc["mac"], "overlay.mac") if "mac" in doc else None, "datapath": datapath}
    local_owner = [i["name"] for i in router["interfaces"] if not i["host"] and i["port"] is not None
                   and any(a.ip == out["local"] for a in i["addresses"])]
    if datapath == "pipeline" and not local_owner:
        raise ConfigError("overlay.datapath", f"pipeline needs overlay.local ({out['local']}) on a router interface "
                                              f"with a port (the underlay), e.g. the uplink")
    out["pipeline"] = datapath == "pipeline" or (datapath == "auto" and bool(local_owner))
    try:
        out["pod_cidr"] = ipaddress.IPv4Network(doc["podCIDR"])
    except (ValueError, TypeError):
        raise ConfigError("overlay.podCIDR", f"must be this node's pod CIDR like 10.244.1.0/24, got "
                                             f"{doc['podCIDR']!r}") from None
    name = _name(doc.get("interface", "flannel.1"), "overlay.interface", what="an interface name")
    if name in {i["name"] for i in router["interfaces"]}:
        raise ConfigError("overlay.interface", f"{name!r} is already a router interface")
    if name in ports:
        raise ConfigError("overlay.interface", f"{name!r} is already a port name")
    out["interface"] = name
    peers = doc.get("peers", []) or []
    if not isinstance(peers, list):
        raise ConfigError("overlay.peers", "must be a list of {name, address, podCIDR, vtepMAC}")
    out["peers"] = [peer_spec(p, f"overlay.peers[{i}]") for i, p in enumerate(peers)]
    return out


def load_yaml(path: str, what: str = "config") -> Any:
    """One YAML document from a file; unreadable, invalid or empty files are ConfigErrors."""
    try:
        with open(path) as f:
            doc = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError("", f"cannot read {what} {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError("", f"{path} is not valid YAML: {e}") from None
    if doc is None:
        raise ConfigError("", f"{path} is empty")
    return doc


def load(path: str) -> NodeConfig:
    cfg = parse(load_yaml(path))
    if cfg.nat is not None:  # relative manifest paths are relative to the config file, not the cwd
        base = os.path.dirname(os.path.abspath(path))
        cfg.nat["manifests"] = [os.path.join(base, m) for m in cfg.nat["manifests"]]
    return cfg
