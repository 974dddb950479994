"""`vswitch run`: one node's dataplane in the foreground."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

from . import control
from .config import ConfigError, NodeConfig, load
from .node import TABLES, Node

log = logging.getLogger("vswitch.daemon")
TICK = 0.1  # neighbour timers (ARP retransmits are 1 s apart)
EXPIRE_EVERY = 10  # ticks between FDB sweeps (lookups already ignore aged entries)


class Commands:
    """What the control socket serves; each method takes the request's arguments."""

    def __init__(self, node: Node) -> None:
        self.node = node

    async def __call__(self, req: dict):
        cmd = req.pop("cmd")
        fn = getattr(self, "cmd_" + cmd.replace("-", "_"), None)
        if fn is None:
            raise ValueError(f"unknown command {cmd!r}")
        return fn(**req)

    def cmd_ping(self):
        return {"node": self.node.name, "pid": os.getpid()}

    def cmd_show(self, table: str):
        if table not in TABLES:
            raise ValueError(f"unknown table {table!r} (tables: {', '.join(TABLES)})")
        return self.node.show(table)

    def cmd_fdb_flush(self, port: str | None = None):
        return {"flushed": self.node.fdb_flush(port)}

    def cmd_fdb_add(self, mac: str, port: str):
        self.node.fdb_add(mac, port)
        return {"added": mac}

    def cmd_fdb_del(self, mac: str):
        if not self.node.fdb_del(mac):
            raise ValueError(f"no FDB entry for {mac}")
        return {"deleted": mac}

    def cmd_port_add(self, spec: dict):
        try:
            return self.node.add_port(spec).info()
        except ConfigError as e:
            raise ValueError(str(e)) from None

    def cmd_port_del(self, name: str):
        self.node.remove_port(name)
        return {"deleted": name}

    def cmd_apply(self, text: str, source: str = "", delete: bool = False):
        from nat.manifests import ManifestError
        try:
            return self.node.apply_manifests(text, source, delete=delete)
        except ManifestError as e:
            raise ValueError(str(e)) from None

    def cmd_peer_add(self, spec: dict):
        from .config import ConfigError
        try:
            return self.node.peer_add(spec)
        except ConfigError as e:
            raise ValueError(str(e)) from None

    def cmd_peer_del(self, name: str):
        return self.node.peer_del(name)

    def cmd_conntrack_flush(self, filters: dict):
        return {"deleted": self.node.conntrack_flush(**filters)}

    def cmd_trace(self, port: str, frame: bytes, commit: bool = False):
        pkt = self.node.trace(port, frame, dry_run=not commit)
        return {"id": pkt.id, "steps": [dict(s) for s in pkt.trace]}

    def cmd_capture_start(self, stages=(), ports=(), expr=None, count: int = 100, duration: float = 10.0):
        return self.node.capture_start(stages, ports, expr, count, duration)

    def cmd_capture_read(self, id: int):
        return self.node.capture_read(id)

    def cmd_capture_stop(self, id: int):
        return self.node.capture_stop(id)

    def cmd_trace_defaults(self, port: str):
        return self.node.default_macs(port)


async def serve_node(cfg: NodeConfig, ready=None) -> None:
    loop = asyncio.get_running_loop()
    node = Node(cfg)
    node.start(loop)  # raises (after closing what it opened) on a bad port
    metrics = None
    if cfg.metrics_listen:
        from .metrics import serve_metrics, stop_metrics
        try:
            metrics = await serve_metrics(node, cfg.metrics_listen)
        except BaseException:
            node.close()
            raise
    server = await control.serve(cfg.socket, Commands(node))
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def timers():
        n = 0
        while True:
            await asyncio.sleep(TICK)
            node.tick()
            n += 1
            if n % EXPIRE_EVERY == 0:
                node.expire()

    sweeper = loop.create_task(timers())
    log.info("node %s up: %d ports, control socket %s", node.name, len(node.ports), cfg.socket)
    if metrics is not None:
        log.info("metrics on %s", cfg.metrics_listen, extra={"listen": cfg.metrics_listen})
    if ready is not None:
        ready(node)
    try:
        await stop.wait()
    finally:
        sweeper.cancel()
        if metrics is not None:
            stop_metrics(metrics, cfg.metrics_listen)
        server.close()
        try:
            os.unlink(cfg.socket)
        except FileNotFoundError:
            pass
        node.close()
        log.info("node %s stopped", node.name)


def event_loop_run(coro):
    """Run on uvloop when it is installed (it is a dependency), else plain asyncio."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.run(coro)
    return uvloop.run(coro)


def pin_cpus(cpus) -> None:
    """Run this process on ``cpus`` only (config ``cpus:``), as userspace datapaths pin their
    forwarding threads (OVS-DPDK's pmd-cpu-mask, VPP's corelist-workers): the daemon keeps its
    caches warm and does not migrate between the CPUs the pods' traffic also needs."""
    allowed = os.sched_getaffinity(0)
    missing = [c for c in cpus if c not in allowed]
    if missing:
        raise ConfigError("cpus", f"CPU {missing[0]} is not available to this process "
                                  f"(available: {', '.join(map(str, sorted(allowed)))})")
    os.sched_setaffinity(0, cpus)
    log.info("pinned to CPU %s", ", ".join(map(str, cpus)), extra={"cpus": list(cpus)})


def run(config_path: str) -> int:
    try:
        cfg = load(config_path)
    except ConfigError as e:
        print(f"vswitch: invalid config: {e}", file=sys.stderr)
        return 2
    from .logs import configure
    configure(cfg.log_level, cfg.log_format, cfg.name)
    try:
        if cfg.cpus:
            pin_cpus(cfg.cpus)
        event_loop_run(serve_node(cfg))
    except (ConfigError, OSError, ValueError) as e:
        print(f"vswitch: cannot start node {cfg.name}: {e}", file=sys.stderr)
        return 2
    return 0
