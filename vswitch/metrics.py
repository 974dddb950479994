"""Prometheus metrics for a running node (docs/metrics.md).

Nothing is counted for metrics' sake: ``NodeCollector`` reads the counters
the pipeline keeps anyway (ports, stages, conntrack, VTEP, flow cache) when a
scrape asks, so a packet costs nothing extra. The HTTP server is a few lines
on the node's own asyncio loop rather than prometheus_client's threaded one,
because a thread would read the tables while the loop mutates them.

The endpoint is off unless ``metrics.listen`` is set, and only listens on a
loopback address or a Unix socket (mode 0600): it reveals the node's
Services and traffic, and carries no authentication.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import stat
from typing import Iterator, Tuple

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST as CONTENT_TYPE

from . import __version__

MAX_REQUEST = 8192  # request line + headers; a scrape needs a few hundred bytes
READ_TIMEOUT = 5.0  # seconds for a client to send its request (and to take the reply)
MAX_CLIENTS = 16  # connections served at once; more are refused (a scraper needs one)
UNIX_PATH_MAX = 107  # sun_path is 108 bytes with its NUL


def _counter(name: str, doc: str, labels=(), rows=()) -> CounterMetricFamily:
    m = CounterMetricFamily(name, doc, labels=list(labels))
    for *lv, v in rows:
        m.add_metric(lv, v)
    return m


def _gauge(name: str, doc: str, labels=(), rows=()) -> GaugeMetricFamily:
    m = GaugeMetricFamily(name, doc, labels=list(labels))
    for *lv, v in rows:
        m.add_metric(lv, v)
    return m


def _vxlan_reasons() -> list:
    """Every reason the VTEP can count, so each has a series from the start."""
    from overlay.segment import SEGMENT_DROPS
    from overlay.vtep import DROP_REASONS
    from overlay.vxlan import RX_DROPS
    return [r for r, _ in (*RX_DROPS, *SEGMENT_DROPS, *DROP_REASONS)]


class NodeCollector:
    """A prometheus_client collector reading one Node's state at scrape time."""

    def __init__(self, node) -> None:
        self.node = node

    def collect(self) -> Iterator:
        node = self.node
        yield InfoMetricFamily("vswitch", "The node and the vswitch version", value={"node": node.name,
                                                                                      "version": __version__})
        ports = sorted(node.ports.values(), key=lambda p: p.index)
        for attr, what in (("rx_packets", "Frames received"), ("rx_bytes", "Bytes received"),
                           ("tx_packets", "Frames sent"), ("tx_bytes", "Bytes sent"),
                           ("rx_drops", "Frames dropped by the port on receive"),
                           ("tx_drops", "Frames the port failed to send")):
            yield _counter(f"vswitch_{attr}_total", f"{what}, per port", ["port"],
                           [(p.name, getattr(p, attr)) for p in ports])

        if node.flows is not None:
            node.flows.credit()  # packets taken by cached flows count at the stages they skipped
        stages = list(node.graph.stages.values())
        yield _counter("vswitch_stage_packets_total", "Packets that entered each pipeline stage", ["stage"],
                       [(s.name, s.packets) for s in stages])
        yield _counter("vswitch_drop_total", "Packets dropped, by deciding stage and reason (`vswitch show drops`)",
                       ["stage", "reason"], [(s.name, r, n) for s in stages for r, n in s.drop_counts.items()])

        fdb = node.bridge.fdb
        yield _gauge("vswitch_fdb_entries", "Bridge FDB entries (learned and static)", rows=[(len(fdb),)])
        yield _gauge("vswitch_fdb_max_learned", "Bound on learned FDB entries", rows=[(fdb.max_learned,)])
        yield _counter("vswitch_fdb_overflow_total", "Source MACs not learned because the FDB was full",
                       rows=[(fdb.overflow,)])
        yield _counter("vswitch_fdb_moves_total", "Learned MACs that moved to another port", rows=[(fdb.moves,)])
        yield _counter("vswitch_fdb_aged_total", "FDB entries removed by ageing", rows=[(fdb.aged,)])

        if node.flows is not None:
            c = node.flows.counters()
            yield _gauge("vswitch_flow_cache_entries", "Flows in the flow cache", rows=[(c["flows"],)])
            yield _gauge("vswitch_flow_cache_size", "Flow cache capacity", rows=[(c["size"],)])
            for k, what in (("hits", "Frames forwarded by a cached flow"),
                            ("misses", "Cacheable frames that took the slow path"),
                            ("inserts", "Flows recorded"), ("flushes", "Whole-cache flushes")):
                yield _counter(f"vswitch_flow_cache_{k}_total", what, rows=[(c[k],)])

        if node.nat is not None:
            yield from self._nat(node.nat)
        if node.overlay is not None:
            yield from self._vxlan(node.overlay.vtep)

    @staticmethod
    def _nat(nat) -> Iterator:
        c = nat.ct.counters()
        yield _gauge("vswitch_conntrack_entries", "Tracked connections", rows=[(c["entries"],)])
        yield _gauge("vswitch_conntrack_max", "Conntrack table bound (nat.conntrack.max)", rows=[(c["max"],)])
        for k, what in (("inserted", "Connections confirmed"),
                        ("dropped_full", "New connections refused because the table was full"),
                        ("clashes", "New connections refused because a tuple was already tracked"),
                        ("expired", "Connections removed by timeout"),
                        ("deleted", "Connections removed by a flush or an endpoint going away"),
                        ("invalid", "Packets conntrack classified INVALID")):
            yield _counter(f"vswitch_conntrack_{k}_total", what, rows=[(c[k],)])
        yield _counter("vswitch_conntrack_stale_udp_removed_total",
                       "UDP connections removed because their endpoint left a Service",
                       rows=[(nat.stale_udp_removed,)])
        ports = nat.services.ports
        yield _gauge("vswitch_service_ports", "Service ports proxied (a Service with two ports counts 2)",
                     rows=[(len(ports),)])
        rows = []
        for p in ports:
            svc, sp = p.svc, p.sp
            n = {"ready": 0, "serving-terminating": 0, "not-ready": 0}
            for b in p.backends:
                n["ready" if b.ready else "serving-terminating" if b.serving and b.terminating else "not-ready"] += 1
            port = f"{sp.port}/{sp.protocol}"  # unique within a Service, unlike the (optional) name
            rows += [(svc.namespace, svc.name, port, state, v) for state, v in n.items()]
        yield _gauge("vswitch_service_endpoints", "Endpoints of each Service port by state (kube-proxy uses the "
                     "ready ones, else the serving-terminating ones)",
                     ["namespace", "service", "port", "state"], rows)

    @staticmethod
    def _vxlan(vt) -> Iterator:
        yield _gauge("vswitch_vxlan_peers", "Remote VTEPs known", rows=[(len(vt.peers),)])
        for k, what in (("tx_packets", "Datagrams sent"), ("tx_bytes", "Inner bytes sent"),
                        ("tx_calls", "sendmsg calls or pipeline frames (one carries many datagrams with GSO)"),
                        ("rx_packets", "Datagrams received and accepted"), ("rx_bytes", "Inner bytes received")):
            yield _counter(f"vswitch_vxlan_{k}_total", what, rows=[(getattr(vt, k),)])
        reasons = _vxlan_reasons()
        reasons += sorted(r for r in vt.drops if r not in reasons)
        yield _counter("vswitch_vxlan_drop_total", "VXLAN datagrams or frames dropped, by reason", ["reason"],
                       [(r, vt.drops.get(r, 0)) for r in reasons])


def render(node) -> bytes:
    """The node's metrics in the Prometheus text format."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(node))
    return generate_latest(registry)


# --- the endpoint ---------------------------------------------------------------------------------

def parse_listen(text) -> Tuple:
    """``HOST:PORT`` on loopback -> ("tcp", host, port); ``unix:/abs/path`` -> ("unix", path)."""
    if not isinstance(text, str) or not text:
        raise ValueError(f"must be HOST:PORT on loopback or unix:/absolute/path, got {text!r}")
    if text.startswith("unix:"):
        path = text[5:]
        if not path.startswith("/"):
            raise ValueError(f"unix socket path must be absolute, got {path!r}")
        if len(path.encode()) > UNIX_PATH_MAX:
            raise ValueError(f"unix socket path must be at most {UNIX_PATH_MAX} bytes, got {len(path.encode())}")
        return ("unix", path)
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"must be HOST:PORT (e.g. 127.0.0.1:9469) or unix:/absolute/path, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host == "localhost":
        host = "127.0.0.1"  # not resolved: a hosts file must not move the endpoint off loopback
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        raise ValueError(f"host must be a loopback address (127.0.0.1, ::1, localhost), got {host!r}") from None
    if not loopback:
        raise ValueError(f"host {host} is not a loopback address: the endpoint has no authentication, "
                         "so it listens on 127.0.0.0/8, ::1 or a Unix socket only")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"port must be an integer from 1 to 65535, got {port!r}")
    return ("tcp", host, int(port))


def _unix_socket(path: str) -> socket.socket:
    """A listening socket at ``path`` with mode 0600, replacing a stale socket file (never another file)."""
    os.makedirs(os.path.dirname(path) or "/", exist_ok=True)
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise ValueError(f"{path} exists and is not a socket")
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, 0o600)  # before listen(): nobody can connect in between
        sock.listen(16)
    except BaseException:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def _reply(status: str, body: bytes, ctype: str = "text/plain; charset=utf-8", head: bool = False) -> bytes:
    hdr = (f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
           "Connection: close\r\n\r\n").encode()
    return hdr if head else hdr + body


async def _read_head(reader: asyncio.StreamReader) -> bytes:
    head = b""
    while True:
        line = await reader.readline()  # ValueError past the reader's limit (MAX_REQUEST)
        head += line
        if len(head) > MAX_REQUEST:
            raise ValueError("request too large")
        if not line or line in (b"\r\n", b"\n"):
            return head


async def serve_metrics(node, listen: str) -> asyncio.AbstractServer:
    """Serve ``GET /metrics`` for ``node`` on ``listen`` (see parse_listen), on the running loop."""
    where = parse_listen(listen)
    clients = 0

    def answer(head: bytes) -> bytes:
        parts = head.split(b"\r\n", 1)[0].split(b"\n", 1)[0].split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            return _reply("400 Bad Request", b"bad request\n")
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if method not in (b"GET", b"HEAD"):
            return _reply("405 Method Not Allowed", b"only GET\n")
        if target == b"/metrics":
            return _reply("200 OK", render(node), CONTENT_TYPE, method == b"HEAD")
        if target == b"/":
            return _reply("200 OK", f"vswitch node {node.name}: metrics at /metrics\n".encode(),
                          head=method == b"HEAD")
        return _reply("404 Not Found", b"not found: try /metrics\n", head=method == b"HEAD")

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal clients
        clients += 1
        try:
            if clients > MAX_CLIENTS:
                out = _reply("503 Service Unavailable", b"too many connections\n")
            else:
                try:
                    out = answer(await asyncio.wait_for(_read_head(reader), READ_TIMEOUT))
                except ValueError:
                    out = _reply("400 Bad Request", b"request too large\n")
            writer.write(out)
            await asyncio.wait_for(writer.drain(), READ_TIMEOUT)
        except (asyncio.TimeoutError, ConnectionError):
            writer.transport.abort()  # a slow or vanished client: drop what it has not read
        finally:
            clients -= 1
            writer.close()

    if where[0] == "unix":
        return await asyncio.start_unix_server(client, sock=_unix_socket(where[1]), limit=MAX_REQUEST)
    return await asyncio.start_server(client, where[1], where[2], limit=MAX_REQUEST)


def stop_metrics(server: asyncio.AbstractServer, listen: str) -> None:
    """Close the server and remove its socket file, if it has one."""
    server.close()
    where = parse_listen(listen)
    if where[0] == "unix":
        try:
            os.unlink(where[1])
        except FileNotFoundError:
            pass
