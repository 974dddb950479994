"""A node: its ports, its stage graph and its tables, wired together.

This is the one place that knows which stages exist and how they connect;
the core modules (packet, stage, ports, bridge) know nothing about it.
"""

from __future__ import annotations

import logging
from time import monotonic
from typing import Callable, Dict, Optional

from .bridge import Bridge, L2Forward, L2Learn
from .config import ConfigError, NodeConfig, port_spec
from .ethernet import EthInput
from .fdb import Fdb
from .flowcache import FlowCache, flow_key
from .output import PortTx
from .packet import VNET_LEN, Packet, mac_bytes, mac_str
from .ports import Port, port_kinds
from .stage import Graph

log = logging.getLogger("vswitch.node")


class Node:
    def __init__(self, cfg: NodeConfig, clock: Callable[[], float] = monotonic) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.clock = clock
        self.bridge = Bridge(Fdb(cfg.ageing, cfg.max_learned))
        self.graph = Graph()
        learn = L2Learn(self.bridge, after="nat-bridge" if cfg.nat else "l2-forward")
        for stage in (EthInput(), learn, L2Forward(self.bridge), PortTx()):
            self.graph.add(stage)
        self.router = self.router_io = self.nat = self.overlay = None
        self.router_ports: Dict[str, object] = {}  # port name -> router interface owning it
        if cfg.router is not None:
            self._build_router(cfg.router)
        if cfg.nat is not None:
            self._build_nat(cfg.nat)
        if cfg.overlay is not None:
            self._build_overlay(cfg.overlay)
        self.graph.build("eth-input")
        if self.router_io is not None:
            self.router_io.bind(self.graph)
        if self.overlay is not None and self.overlay.decap is not None:
            self.overlay.decap.deliver = self.overlay.encap.deliver = self.receive
        self.flows = FlowCache(cfg.flow_cache) if cfg.flow_cache else None
        self.ports: Dict[str, Port] = {}
        self.captures: Dict[int, object] = {}  # open capture sessions (vswitch.capture)
        self.graph.observers.append(_snapshot)
        self.loop = None
        self._next_index = 1

    def _build_router(self, rcfg: dict) -> None:
        """Interfaces and routes from the config; raises ConfigError before any port exists."""
        from router.interface import Interface, stable_mac
        from router.router import Router
        from router.stages import add_router_stages

        self.router = Router(self.clock)
        hooks = {"prerouting": "nat-prerouting", "postrouting": "nat-postrouting",
                 "icmp_out": "nat-icmp-error"} if self.cfg.nat else {}
        self.router_io = add_router_stages(self.graph, self.router, **hooks)
        for spec in rcfg["interfaces"]:
            iface = Interface(spec["name"], spec["mac"] or stable_mac(self.name, spec["name"]), spec["addresses"],
                              spec["mtu"], proxy_arp=spec["host"], send_redirects=spec["redirects"])
            self.router.add_interface(iface, host=spec["host"])
            if spec["port"] is None:
                self.bridge.add_local(iface.mac, self.graph.stages["l3-input"], iface)
            else:
                self.router_ports[spec["port"]] = iface
        for path, text in rcfg["routes"]:
            try:
                self.router.add_route(text)
            except ValueError as e:
                raise ConfigError(path, str(e)) from None

    def _build_nat(self, ncfg: dict) -> None:
        """Conntrack, Services and their stages; manifests listed in the config are loaded here."""
        from nat.manifests import ManifestError, load_file
        from nat.stages import Nat, NatBridge, NatBridgedDnat, NatIcmpError, NatPostrouting, NatPrerouting

        self.nat = Nat(self.router, self.clock, node=self.name, cluster_cidr=ncfg["cluster_cidr"],
                       masquerade=ncfg["masquerade"], scheduler=ncfg["scheduler"],
                       max_entries=ncfg["conntrack_max"], profile=ncfg["profile"])
        self.node_port_range = ncfg["node_port_range"]
        for stage in (NatPrerouting(self.nat, self.router_io), NatPostrouting(self.nat, self.router_io),
                      NatIcmpError(self.nat, self.router_io), NatBridge(self.nat, self.bridge),
                      NatBridgedDnat(self.nat, self.router_io)):
            self.graph.add(stage)
        for i, path in enumerate(ncfg["manifests"]):
            try:
                self.nat.apply(load_file(path, node_port_range=self.node_port_range))
            except ManifestError as e:
                raise ConfigError(f"nat.manifests[{i}]", str(e)) from None

    def _build_overlay(self, ocfg: dict) -> None:
        """The VTEP: a router interface whose port is a pair of UDP sockets, and flannel's peer entries."""
        from overlay.overlay import Overlay
        try:
            self.overlay = Overlay(self.router, self.router_io, self.name, ocfg)
        except ValueError as e:
            raise ConfigError("overlay", str(e)) from None
        self.router_ports[self.overlay.port.name] = self.overlay.iface
        self.overlay.add_stages(self.graph)

    def _need_overlay(self):
        if self.overlay is None:
            raise KeyError(f"node {self.name} has no overlay (no `overlay:` in its config)")
        return self.overlay

    def peer_add(self, spec: dict) -> dict:
        """Add (or replace) a remote VTEP at run time; spec as a config overlay.peers entry."""
        from .config import peer_spec
        ov = self._need_overlay()
        peer = ov.add_peer(peer_spec(spec, "peer"))
        self.flush_flows()
        return {"peer": peer.name}

    def peer_del(self, key: str) -> dict:
        peer = self._need_overlay().remove_peer(key)
        self.flush_flows()
        return {"peer": peer.name}

    # --- Services -------------------------------------------------------------
    def _need_nat(self):
        if self.nat is None:
            raise KeyError(f"node {self.name} has no nat (no `nat:` in its config)")
        return self.nat

    def apply_manifests(self, text: str, source: str = "", delete: bool = False) -> dict:
        """`vswitch apply|delete -f`: all objects or none (a bad one raises ManifestError, nothing changes)."""
        from nat.manifests import load_text
        nat = self._need_nat()
        m = load_text(text, source, node_port_range=self.node_port_range)
        if not delete:
            self._check_node_ports(m)
        removed = nat.delete(m) if delete else nat.apply(m)
        self.flush_flows()
        return {"services": len(m.services), "endpointslices": len(m.slices), "stale_udp_removed": removed}

    def _check_node_ports(self, m) -> None:
        """A nodePort already taken by another Service is refused, as the API server does."""
        from nat.manifests import ManifestError
        taken = {(p.protocol, p.node_port): s.key for s in self.nat.services.services.values()
                 for p in s.ports if p.node_port}
        for s in m.services:
            for i, p in enumerate(s.ports):
                owner = taken.get((p.protocol, p.node_port))
                if p.node_port and owner is not None and owner != s.key:
                    raise ManifestError("Service", f"{s.namespace}/{s.name}", f"spec.ports[{i}].nodePort",
                                        f"{p.node_port}/{p.protocol} is already used by Service "
                                        f"{owner[0]}/{owner[1]}")

    def conntrack_flush(self, **filters) -> int:
        """Delete entries matching every given filter (proto, src, dst, sport, dport, service)."""
        from router.ipv4 import ip_int
        nat = self._need_nat()
        protos = {"tcp": 6, "udp": 17, "icmp": 1}
        want = {}
        for k, v in filters.items():
            if v is None:
                continue
            if k == "proto":
                if v not in protos:
                    raise ValueError(f"proto must be tcp, udp or icmp, got {v!r}")
                want[0] = protos[v]
            elif k in ("src", "dst"):
                want[1 if k == "src" else 3] = ip_int(v)
            elif k in ("sport", "dport"):
                want[2 if k == "sport" else 4] = int(v)
            elif k != "service":
                raise ValueError(f"unknown conntrack filter {k!r}")
        svc = filters.get("service")
        n = nat.ct.delete_where(lambda c: all(c.orig[i] == v for i, v in want.items())
                                and (svc is None or c.service == svc))
        self.flush_flows()
        return n

    # --- ports --------------------------------------------------------------
    def add_port(self, spec: dict, path: str = "port", make: Optional[Callable[[dict], Port]] = None) -> Port:
        """Create, open and attach a port from a config entry (validated here too).

        ``make`` builds the port from the validated spec instead of its type
        (the simulator turns every port into a memory port this way)."""
        spec = port_spec(dict(spec), path)
        if spec["name"] in self.ports:
            raise ValueError(f"{path}.name: a port named {spec['name']!r} already exists")
        if make is None:
            kwargs = {k: v for k, v in spec.items() if k not in ("type", "name")}
            port = port_kinds()[spec["type"]](spec["name"], **kwargs)
        else:
            port = make(spec)
        port.open()
        self.attach(port)
        return port

    def attach(self, port: Port) -> Port:
        """Attach an already-open port to the bridge and start receiving from it."""
        port.index = self._next_index
        self._next_index += 1
        self.ports[port.name] = port
        iface = self.router_ports.get(port.name)
        if iface is not None:  # a routed port (uplink, host): frames go straight to the router
            iface.port, port.iface = port, iface
            port.entry = self.graph.stages["l3-input"]
        else:
            port.entry = self.graph.entry
            self.bridge.add_port(port)
        port.start(self.loop, self.receive)
        self.flush_flows()
        log.info("port %s (%s) attached as index %d", port.name, port.kind, port.index)
        return port

    def remove_port(self, name: str) -> None:
        port = self.ports.pop(name, None)
        if port is None:
            raise KeyError(f"no port named {name!r}")
        if port.iface is not None:
            port.iface.port = None
            port.iface = None
        else:
            self.bridge.remove_port(port)
        self.flush_flows()
        port.close()
        log.info("port %s removed", name)

    def port(self, name: str) -> Port:
        try:
            return self.ports[name]
        except KeyError:
            raise KeyError(f"no port named {name!r} (ports: {', '.join(self.ports) or 'none'})") from None

    def start(self, loop, make_port: Optional[Callable[[dict], Port]] = None) -> None:
        """Open every configured port; on any failure close the ones opened and re-raise."""
        self.loop = loop
        try:
            for i, spec in enumerate(self.cfg.ports):
                self.add_port(spec, f"ports[{i}]", make_port)
            for mac, pname in self.cfg.static:
                self.bridge.fdb.add_static(mac, self.ports[pname])
            if self.overlay is not None:
                self.overlay.port.open()
                self.attach(self.overlay.port)
        except Exception:
            self.close()
            raise

    def close(self) -> None:
        for name in list(self.ports):
            self.remove_port(name)

    # --- packets ------------------------------------------------------------
    def receive(self, port: Port, buf, ts: float) -> None:
        if self.captures and self._receive_captured(port, buf, ts):
            return
        flows = self.flows
        key = flow_key(port, buf) if flows is not None else None
        if key is None:
            self.graph.run(Packet(buf, port, ts), port.entry)
            return
        flow = flows.flows.get(key)
        if flow is not None and flow.run(buf, ts):
            flows.hits += 1
            return
        flows.misses += 1
        if type(buf) is bytes:  # cached actions rewrite in place
            buf = bytearray(buf)
        steps = self.graph.run_recorded(Packet(buf, port, ts), port.entry)
        if steps is not None:
            flows.insert(key, steps)

    def _receive_captured(self, port: Port, buf, ts: float) -> bool:
        """The slow path, traced, for a frame some capture session wants (flow cache bypassed)."""
        frame = bytes(buf[VNET_LEN:])
        wanted = [c for c in self.captures.values() if c.wants(frame, ts)]
        if not wanted:
            return False
        pkt = Packet(bytearray(buf), port, ts, trace=[])
        pkt.ensure_id()
        pkt.snaps = []
        self.graph.run(pkt, port.entry)
        for cap in wanted:
            cap.offer(pkt, pkt.snaps)
        return True

    # --- capture sessions -----------------------------------------------------
    def capture_start(self, stages=(), ports=(), expr: Optional[str] = None, count: int = 100,
                      duration: float = 10.0) -> dict:
        from .capture import Capture
        for s in stages:
            if s not in self.graph.stages:
                raise ValueError(f"no stage {s!r} (stages: {', '.join(self.graph.stages)})")
        for p in ports:
            self.port(p)
        cap = Capture(stages=stages or self.graph.stages, ports=ports, expr=expr, count=count,
                      duration=duration, now=self.clock())
        self.captures[cap.id] = cap
        return {"id": cap.id, "stages": sorted(cap.stages, key=list(self.graph.stages).index),
                "ports": sorted(cap.ports)}

    def capture_read(self, cid: int) -> dict:
        cap = self.captures.get(cid)
        if cap is None:
            raise KeyError(f"no capture session {cid} (it ended, or was never started)")
        res = cap.read(self.clock())
        if res["done"]:
            del self.captures[cid]
        return res

    def capture_stop(self, cid: int) -> dict:
        cap = self.captures.pop(cid, None)
        return {"stopped": cap is not None}

    def flush_flows(self) -> int:
        return self.flows.flush() if self.flows is not None else 0

    def trace(self, port_name: str, frame: bytes, dry_run: bool = True, vnet: Optional[bytes] = None) -> Packet:
        """Run one bare frame through the pipeline with tracing on; returns the packet."""
        port = self.port(port_name)
        kw = {} if vnet is None else {"vnet": vnet}
        pkt = Packet.from_frame(frame, port, self.clock(), trace=[], dry_run=dry_run, **kw)
        pkt.ensure_id()
        self.graph.run(pkt, port.entry)
        return pkt

    def default_macs(self, port_name: str) -> dict:
        """What a traced frame gets when it names none: the gateway's MAC as destination (the router
        interface on this port, else the one on the bridge), a MAC learned on the port as source."""
        port = self.port(port_name)
        dst = port.iface.mac if port.iface is not None else next(
            (mac for mac in self.bridge.local), None)
        src = next((r["mac"] for r in self.bridge.fdb.rows(self.clock())
                    if r["port"] == port_name and not r["static"]), None)
        # and as source address, the one the router has seen behind that MAC
        ip = next((r["ip"] for r in self.router.neigh_rows() if r["lladdr"] == src), None) \
            if src and self.router is not None else None
        return {"dst": mac_str(dst) if dst else None, "src": src, "ip": ip}

    # --- tables ---------------------------------------------------------------
    def expire(self) -> int:
        return self.bridge.fdb.expire(self.clock())

    def tick(self) -> None:
        """Drive timers (ARP retransmits, neighbour state changes)."""
        now = self.clock()
        if self.router_io is not None:
            self.router_io.tick(now)
        if self.nat is not None:
            self.nat.tick(now)
        for cid in [c.id for c in self.captures.values() if c.stale(now)]:
            del self.captures[cid]  # its client went away without reading to the end

    def show(self, table: str) -> list:
        now = self.clock()
        if table == "ports":
            return [p.info() for p in sorted(self.ports.values(), key=lambda p: p.index)]
        if table == "fdb":
            return self.bridge.fdb.rows(now)
        if table == "stats":
            return self.stats()
        if table == "flows":
            return self.flows.rows() if self.flows is not None else []
        if table == "drops":
            return self.graph.drop_table()
        if table == "vteps":
            return self._need_overlay().rows()
        if table in ("services", "conntrack"):
            nat = self._need_nat()
            return nat.services.rows() if table == "services" else nat.ct.rows(now)
        if table in ("routes", "neigh", "interfaces"):
            if self.router is None:
                raise KeyError(f"node {self.name} has no router (no `router:` in its config)")
            if table == "routes":
                return self.router.route_rows()
            if table == "neigh":
                return self.router.neigh_rows()
            return [i.info() for i in self.router.ifaces.values()]
        raise KeyError(f"unknown table {table!r} (tables: {', '.join(TABLES)})")

    def stats(self) -> list:
        """Per-stage counters; packets that took a cached flow count at every stage they skipped."""
        if self.flows is not None:
            self.flows.credit()
        rows = []
        for st in self.graph.stages.values():
            row = {"stage": st.name}
            row.update(st.stats())
            rows.append(row)
        if self.flows is not None:
            c = self.flows.counters()
            rows.append({"stage": "(flow-cache)", "packets": c.pop("hits"), "drops": {}, **c})
        if self.overlay is not None:
            c = self.overlay.vtep.counters()
            rows.append({"stage": "(vxlan)", "packets": c.pop("rx_packets"), "drops": c.pop("drops"), **c})
        if self.nat is not None:
            c = self.nat.ct.counters()
            rows.append({"stage": "(conntrack)", "packets": c.pop("inserted"), "drops": {}, **c,
                         "stale_udp_removed": self.nat.stale_udp_removed})
        return rows

    def fdb_flush(self, port: Optional[str] = None) -> int:
        return self.bridge.fdb.flush(self.port(port) if port else None)

    def fdb_add(self, mac: str, port: str) -> None:
        m = mac_bytes(mac)
        if m[0] & 1:
            raise ValueError(f"{mac}: a static FDB entry must be a unicast MAC")
        self.bridge.fdb.add_static(m, self.port(port))

    def fdb_del(self, mac: str) -> bool:
        return self.bridge.fdb.delete(mac_bytes(mac))


def _snapshot(stage, pkt) -> None:
    if pkt.snaps is not None:
        port = pkt.in_port  # a routed frame re-enters the bridge from the router's interface
        pkt.snaps.append((bytes(pkt.buf[VNET_LEN:]), port.name if port is not None else "?"))


TABLES = ("ports", "fdb", "stats", "drops", "flows", "routes", "neigh", "interfaces", "services", "conntrack", "vteps")
