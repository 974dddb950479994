"""The Prometheus endpoint, its collector and the JSON log format (vswitch/metrics.py, vswitch/logs.py).

Nodes are built in-process with memory ports; the endpoint is served on a
Unix socket under tmp_path and on a free loopback TCP port.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
import signal
import socket
import stat
from datetime import datetime

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import ARP, Ether

from vswitch import logs, metrics
from vswitch.config import ConfigError, parse
from vswitch.metrics import CONTENT_TYPE, parse_listen, render, serve_metrics
from vswitch.node import Node

A, B = "02:00:00:00:00:0a", "02:00:00:00:00:0b"


def samples(node) -> dict:
    """{(sample name, frozenset of label items): value} from the rendered text."""
    out = {}
    for fam in text_string_to_metric_families(render(node).decode()):
        for s in fam.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in out, f"duplicate series {key}"
            out[key] = s.value
    return out


def val(sm: dict, name: str, **labels) -> float:
    return sm[(name, frozenset(labels.items()))]


def bridge_node(**extra) -> Node:
    node = Node(parse({"name": "n1", "ports": [{"name": "p1", "type": "memory"}, {"name": "p2", "type": "memory"}],
                       **extra}))
    node.start(None)
    return node


def udp(src=A, dst=B, payload=b"x" * 20) -> bytes:
    return bytes(Ether(src=src, dst=dst) / IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1, dport=2) / payload)


# --- the collector ---------------------------------------------------------------------------------

def test_port_and_stage_counters_equal_the_nodes():
    node = bridge_node()
    node.ports["p2"].inject(udp(B, A))  # B learned on p2 (flooded to p1)
    for _ in range(3):
        node.ports["p1"].inject(udp())
    sm = samples(node)
    assert val(sm, "vswitch_rx_packets_total", port="p1") == 3
    assert val(sm, "vswitch_rx_packets_total", port="p2") == 1
    assert val(sm, "vswitch_tx_packets_total", port="p2") == 3
    for p in node.ports.values():
        for attr in ("rx_packets", "rx_bytes", "tx_packets", "tx_bytes", "rx_drops", "tx_drops"):
            assert val(sm, f"vswitch_{attr}_total", port=p.name) == getattr(p, attr), (p.name, attr)
    # frames 2 and 3 took the cached flow; they still count at every stage they skipped
    assert val(sm, "vswitch_flow_cache_hits_total") == node.flows.hits >= 1
    assert val(sm, "vswitch_flow_cache_entries") == len(node.flows) >= 1
    assert val(sm, "vswitch_stage_packets_total", stage="eth-input") == 4
    assert val(sm, "vswitch_stage_packets_total", stage="port-tx") == 4
    assert {r["stage"]: r["packets"] for r in node.stats() if not r["stage"].startswith("(")} == \
        {dict(k)["stage"]: v for (n, k), v in sm.items() if n == "vswitch_stage_packets_total"}
    assert val(sm, "vswitch_fdb_entries") == len(node.bridge.fdb) == 2
    assert val(sm, "vswitch_info", node="n1", version=metrics.__version__) == 1


def test_drops_by_stage_and_reason_include_zero_series():
    node = bridge_node()
    node.ports["p1"].inject(b"\x02" * 10)  # a runt
    sm = samples(node)
    assert val(sm, "vswitch_drop_total", stage="eth-input", reason="runt") == 1
    assert val(sm, "vswitch_drop_total", stage="l2-learn", reason="bad-src-mac") == 0
    declared = {(r["stage"], r["reason"]): r["count"] for r in node.show("drops")}
    got = {(dict(k)["stage"], dict(k)["reason"]): v for (n, k), v in sm.items() if n == "vswitch_drop_total"}
    assert got == declared and len(got) > 3
    assert val(sm, "vswitch_stage_packets_total", stage="drop") == 1


def test_flow_cache_metrics_absent_when_off():
    sm = samples(bridge_node(flow_cache=0))
    assert not [n for n, _ in sm if n.startswith("vswitch_flow_cache")]
    assert not [n for n, _ in sm if n.startswith(("vswitch_conntrack", "vswitch_vxlan", "vswitch_service"))]


POD1, POD2, POD3 = ("p1", "02:00:00:00:00:01", "10.244.1.2"), ("p2", "02:00:00:00:00:02", "10.244.1.3"), \
    ("p3", "02:00:00:00:00:03", "10.244.1.4")
VIP = "10.96.0.10"


def manifests() -> str:
    def svc(name, ip, ports):
        return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "default"},
                "spec": {"clusterIP": ip, "ports": ports}}

    def eps(name, ports, endpoints):
        return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": f"{name}-1", "namespace": "default",
                             "labels": {"kubernetes.io/service-name": name}},
                "addressType": "IPv4", "ports": ports, "endpoints": endpoints}
    web = [{"addresses": [POD2[2]], "nodeName": "n1"},
           {"addresses": [POD3[2]], "nodeName": "n1"},
           {"addresses": ["10.244.2.5"], "nodeName": "n2",
            "conditions": {"ready": False, "serving": True, "terminating": True}},
           {"addresses": ["10.244.2.6"], "nodeName": "n2", "conditions": {"ready": False, "serving": False}}]
    return yaml.safe_dump_all([
        svc("web", VIP, [{"port": 80, "targetPort": 8080, "protocol": "TCP"}]),
        eps("web", [{"port": 8080, "protocol": "TCP"}], web),
        svc("dns", "10.96.0.20", [{"name": "dns", "port": 53, "targetPort": 5353, "protocol": "UDP"},
                                  {"name": "dns-tcp", "port": 53, "targetPort": 5353, "protocol": "TCP"}]),
        eps("dns", [{"name": "dns", "port": 5353, "protocol": "UDP"},
                    {"name": "dns-tcp", "port": 5353, "protocol": "TCP"}], [{"addresses": [POD2[2]]}]),
    ])


def nat_node(ct_max: int = 131072) -> Node:
    node = Node(parse({"name": "n1", "ports": [{"name": p[0], "type": "memory"} for p in (POD1, POD2, POD3)],
                       "router": {"interfaces": [{"name": "pods", "address": "10.244.1.1/24"}]},
                       "nat": {"clusterCIDR": "10.244.0.0/16", "conntrack": {"max": ct_max}}}))
    node.start(None)
    for port, mac, ip in (POD1, POD2, POD3):  # each pod resolves its gateway: known to bridge and router
        node.ports[port].inject(bytes(Ether(src=mac, dst="ff:ff:ff:ff:ff:ff") /
                                      ARP(op=1, hwsrc=mac, psrc=ip, pdst="10.244.1.1")))
    node.apply_manifests(manifests(), "test.yaml")
    return node


def syn(node, sport: int) -> None:
    gw = node.router.ifaces["pods"].mac.hex(":")
    node.ports["p1"].inject(bytes(Ether(src=POD1[1], dst=gw) / IP(src=POD1[2], dst=VIP) /
                                  TCP(sport=sport, dport=80, flags="S")))


def test_conntrack_and_service_endpoint_gauges():
    node = nat_node()
    syn(node, 40000)
    syn(node, 40001)
    sm = samples(node)
    ct = node.nat.ct.counters()
    assert val(sm, "vswitch_conntrack_entries") == ct["entries"] == 2
    assert val(sm, "vswitch_conntrack_inserted_total") == 2
    assert val(sm, "vswitch_conntrack_max") == 131072
    assert val(sm, "vswitch_conntrack_dropped_full_total") == 0
    web = {"namespace": "default", "service": "web", "port": "80/TCP"}
    assert val(sm, "vswitch_service_endpoints", **web, state="ready") == 2
    assert val(sm, "vswitch_service_endpoints", **web, state="serving-terminating") == 1
    assert val(sm, "vswitch_service_endpoints", **web, state="not-ready") == 1
    dns = {"namespace": "default", "service": "dns", "state": "ready"}
    assert val(sm, "vswitch_service_endpoints", **dns, port="53/UDP") == 1
    assert val(sm, "vswitch_service_endpoints", **dns, port="53/TCP") == 1
    assert val(sm, "vswitch_service_ports") == 3


def test_conntrack_full_is_counted_and_dropped():
    node = nat_node(ct_max=1)
    syn(node, 40000)
    syn(node, 40001)  # refused: the table holds one
    sm = samples(node)
    assert val(sm, "vswitch_conntrack_entries") == 1
    assert val(sm, "vswitch_conntrack_max") == 1
    assert val(sm, "vswitch_conntrack_dropped_full_total") == 1
    # the endpoint is on the client's bridge: confirmed (and refused) where bridged DNAT is done
    assert val(sm, "vswitch_drop_total", stage="nat-bridged-dnat", reason="conntrack-full") == 1


def test_vxlan_counters_and_drop_reasons():
    # built, not started: no UDP socket is opened
    node = Node(parse({"name": "a", "router": {"interfaces": [{"name": "pods", "address": "10.244.1.1/24"}]},
                       "overlay": {"local": "192.0.2.1", "podCIDR": "10.244.1.0/24",
                                   "peers": [{"name": "b", "address": "192.0.2.2", "podCIDR": "10.244.2.0/24",
                                              "vtepMAC": "02:00:00:00:0b:01"}]}}))
    vt = node.overlay.vtep
    vt.drop("unknown-peer", 2)
    vt.drop("vxlan-unknown-vni")
    vt.rx_packets, vt.tx_calls = 5, 7
    sm = samples(node)
    assert val(sm, "vswitch_vxlan_drop_total", reason="unknown-peer") == 2
    assert val(sm, "vswitch_vxlan_drop_total", reason="vxlan-unknown-vni") == 1
    assert val(sm, "vswitch_vxlan_drop_total", reason="no-fdb") == 0  # declared, never counted yet
    assert val(sm, "vswitch_vxlan_rx_packets_total") == 5
    assert val(sm, "vswitch_vxlan_tx_calls_total") == 7
    assert val(sm, "vswitch_vxlan_peers") == 1


# --- the endpoint ----------------------------------------------------------------------------------

async def http(open_conn, request: bytes) -> tuple:
    reader, writer = await open_conn()
    writer.write(request)
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_unix_endpoint(tmp_path):
    node = bridge_node()
    node.ports["p1"].inject(udp())
    path = str(tmp_path / "n1.metrics")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)  # left behind by a dead daemon
    stale.close()
    server = await serve_metrics(node, f"unix:{path}")
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600

        def conn():
            return asyncio.open_unix_connection(path)
        status, headers, body = await http(conn, b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n")
        assert status == 200 and headers["Content-Type"] == CONTENT_TYPE
        assert int(headers["Content-Length"]) == len(body)
        fams = {f.name: f for f in text_string_to_metric_families(body.decode())}
        rx = {s.labels["port"]: s.value for s in fams["vswitch_rx_packets"].samples}
        assert rx == {"p1": 1, "p2": 0}
        status, _, body = await http(conn, b"GET / HTTP/1.0\r\n\r\n")
        assert status == 200 and b"/metrics" in body
        assert (await http(conn, b"GET /nope HTTP/1.0\r\n\r\n"))[0] == 404
        assert (await http(conn, b"hello\r\n\r\n"))[0] == 400
        assert (await http(conn, b"GET /metrics HTTP/1.0\r\nX: " + b"a" * 9000 + b"\r\n\r\n"))[0] == 400
    finally:
        metrics.stop_metrics(server, f"unix:{path}")
    assert not os.path.exists(path)


async def test_unix_endpoint_never_replaces_a_regular_file(tmp_path):
    path = tmp_path / "data"
    path.write_text("keep me")
    with pytest.raises(ValueError, match="not a socket"):
        await serve_metrics(bridge_node(), f"unix:{path}")
    assert path.read_text() == "keep me"


async def test_tcp_endpoint_on_loopback():
    node = bridge_node()
    port = free_port()
    server = await serve_metrics(node, f"127.0.0.1:{port}")
    try:
        def conn():
            return asyncio.open_connection("127.0.0.1", port)
        status, headers, body = await http(conn, b"GET /metrics?x=1 HTTP/1.0\r\n\r\n")
        assert status == 200 and headers["Content-Type"] == CONTENT_TYPE and b"vswitch_info{" in body
        status, headers, body = await http(conn, b"HEAD /metrics HTTP/1.0\r\n\r\n")
        assert status == 200 and body == b"" and int(headers["Content-Length"]) > 0
        assert (await http(conn, b"POST /metrics HTTP/1.0\r\n\r\n"))[0] == 405
        assert (await http(conn, b"GET /metrics/x HTTP/1.0\r\n\r\n"))[0] == 404
    finally:
        server.close()
        await server.wait_closed()


async def test_slow_client_is_cut_off(monkeypatch):
    monkeypatch.setattr(metrics, "READ_TIMEOUT", 0.2)
    port = free_port()
    server = await serve_metrics(bridge_node(), f"127.0.0.1:{port}")
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /metrics HTTP/1.0\r\n")  # never finishes its headers
        assert await asyncio.wait_for(reader.read(), 3) == b""  # closed, nothing answered
        writer.close()
    finally:
        server.close()


@pytest.mark.parametrize("text, want", [
    ("127.0.0.1:9469", ("tcp", "127.0.0.1", 9469)),
    ("127.3.0.1:80", ("tcp", "127.3.0.1", 80)),
    ("[::1]:9469", ("tcp", "::1", 9469)),
    ("localhost:9469", ("tcp", "127.0.0.1", 9469)),
    ("unix:/run/vswitch/n1.metrics", ("unix", "/run/vswitch/n1.metrics")),
])
def test_parse_listen_accepts(text, want):
    assert parse_listen(text) == want


@pytest.mark.parametrize("text, words", [
    ("0.0.0.0:9100", "not a loopback"),
    ("10.0.0.1:1", "not a loopback"),
    ("[::]:9100", "not a loopback"),
    ("example.com:80", "loopback"),
    ("unix:relative", "absolute"),
    ("unix:/" + "x" * 107, "107 bytes"),
    ("127.0.0.1:0", "1 to 65535"),
    ("127.0.0.1:65536", "1 to 65535"),
    ("127.0.0.1:http", "1 to 65535"),
    ("127.0.0.1", "HOST:PORT"),
    ("", "HOST:PORT"),
    (9469, "HOST:PORT"),
])
def test_parse_listen_rejects(text, words):
    with pytest.raises(ValueError, match=words):
        parse_listen(text)


def test_config_metrics_and_log_format():
    cfg = parse({"name": "n1", "metrics": {"listen": "unix:/run/vswitch/n1.metrics"}, "log": {"format": "json"}})
    assert cfg.metrics_listen == "unix:/run/vswitch/n1.metrics" and cfg.log_format == "json"
    cfg = parse({"name": "n1"})
    assert cfg.metrics_listen is None and cfg.log_format == "text"
    with pytest.raises(ConfigError) as ei:
        parse({"name": "n1", "metrics": {"listen": "0.0.0.0:9469"}})
    assert ei.value.path == "metrics.listen" and "loopback" in str(ei.value)


async def test_daemon_serves_metrics_and_cleans_up(tmp_path):
    from vswitch.config import parse as parse_cfg
    from vswitch.daemon import serve_node
    sock, mpath = str(tmp_path / "ctl.sock"), str(tmp_path / "m.sock")
    cfg = parse_cfg({"name": "n1", "ports": [{"name": "p1", "type": "memory"}], "control": {"socket": sock},
                     "metrics": {"listen": f"unix:{mpath}"}})
    up = asyncio.Event()
    task = asyncio.ensure_future(serve_node(cfg, ready=lambda node: up.set()))
    await asyncio.wait_for(up.wait(), 5)
    try:
        status, _, body = await http(lambda: asyncio.open_unix_connection(mpath), b"GET /metrics HTTP/1.0\r\n\r\n")
        assert status == 200 and b'vswitch_rx_packets_total{port="p1"} 0.0' in body
    finally:
        os.kill(os.getpid(), signal.SIGTERM)  # serve_node's own handler stops it
        await asyncio.wait_for(task, 5)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    assert not os.path.exists(mpath) and not os.path.exists(sock)


# --- JSON logs -------------------------------------------------------------------------------------

def test_json_log_lines():
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(logs.JsonLogFormatter("n1"))
    lg = logging.getLogger("vswitch.test-json")
    lg.addHandler(handler)
    lg.setLevel(logging.INFO)
    lg.propagate = False
    try:
        lg.info("port %s attached", "p1", extra={"port": "p1", "index": 3})
        lg.warning("two\nlines")
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            lg.exception("failed")
    finally:
        lg.removeHandler(handler)
    lines = buf.getvalue().splitlines()
    assert len(lines) == 3
    recs = [json.loads(line) for line in lines]
    first = recs[0]
    assert {k: first[k] for k in ("level", "logger", "node", "msg", "port", "index")} == \
        {"level": "info", "logger": "vswitch.test-json", "node": "n1", "msg": "port p1 attached",
         "port": "p1", "index": 3}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["ts"])
    assert datetime.fromisoformat(first["ts"].replace("Z", "+00:00")).utcoffset().total_seconds() == 0
    assert recs[1]["msg"] == "two\nlines" and recs[1]["level"] == "warning"
    assert "RuntimeError: boom" in recs[2]["exc"] and "args" not in first and "levelno" not in first


def test_configure_picks_the_formatter():
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logs.configure("debug", "json", "n1")
        assert isinstance(root.handlers[0].formatter, logs.JsonLogFormatter) and root.level == logging.DEBUG
        logs.configure("info", "text", "n1")
        assert not isinstance(root.handlers[0].formatter, logs.JsonLogFormatter)
        assert "node=n1" in root.handlers[0].formatter._fmt
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
