"""Integration tests: the Service behaviours tests/test_lab_nat.py does not cover.

Session affinity, externalTrafficPolicy Local, hairpin, endpoint removal under
live connections (kube-proxy's stale-UDP cleanup), RELATED ICMP errors from an
endpoint, and the conntrack table as `vswitch show conntrack` shows it.

One lab per dataplane serves the whole module (building one takes seconds):

    node1 (the dataplane under test): client, client2, loner, web1, web2, web3
    node2 (kernel, host-gw route):    remote1, an endpoint node1 reaches by routing
    ext:                              an outside host on the underlay

Every pod and the external run SERVER (TCP 8080: each line is answered with
"NAME PEER-ADDRESS"; UDP 9000: each datagram likewise, except those starting
with "quiet"); clients are driven through DRIVER, a long-lived process in the
client's namespace that keeps sockets open between commands. Run with:

    vswitch sandbox -- python -m pytest -q tests/test_lab_services.py

DATAPLANES lists the dataplanes node1 is built with; a kernel reference node
(kube-proxy's rules) can join it once the lab programs Services on kernel
nodes: everything dataplane-specific goes through the ``SvcLab`` object.
"""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
import time

import pytest
import yaml

from conftest import _down_if_up
from labutil import Capture
from nat.conntrack import DEFAULT_MAX
from vswitch import lab as vlab
from vswitch.lab.lab import LAB_DIR
from vswitch.sandbox import in_sandbox

pytestmark = pytest.mark.lab

DATAPLANES = ["vswitch"]
VSWITCH = [sys.executable, "-m", "vswitch"]
NODE1 = "192.168.1.11"
EXT = "192.168.1.100"
GATEWAY = "10.244.1.1"


def service(name: str, cluster_ip: str, selector: dict, ports: list, **spec) -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
            "spec": {"clusterIP": cluster_ip, "selector": selector, "ports": ports, **spec}}


def node_port(n: int) -> list:
    return [{"port": 80, "targetPort": 8080, "nodePort": n}]


TCP_ECHO = [{"port": 80, "targetPort": 8080}]
UDP_ECHO = [{"port": 90, "protocol": "UDP", "targetPort": 9000}]
DEAF = [{"name": "udp", "port": 53, "protocol": "UDP", "targetPort": 9999},  # nothing listens there
        {"name": "tcp", "port": 81, "targetPort": 8181}]
WEB, REMOTE, SOLO = {"app": "web"}, {"app": "remote"}, {"solo": "yes"}
SERVICES = [
    service("sticky", "10.96.0.20", WEB, TCP_ECHO, sessionAffinity="ClientIP"),
    service("np-local", "10.96.0.21", WEB, node_port(30081), type="NodePort", externalTrafficPolicy="Local"),
    service("np-cluster", "10.96.0.22", WEB, node_port(30082), type="NodePort"),
    service("remote-local", "10.96.0.23", REMOTE, node_port(30083), type="NodePort", externalTrafficPolicy="Local"),
    service("remote-cluster", "10.96.0.24", REMOTE, node_port(30084), type="NodePort"),
    service("solo", "10.96.0.25", SOLO, TCP_ECHO),
    service("churn", "10.96.0.30", {"churn": "yes"}, [{"name": "tcp", **TCP_ECHO[0]}, {"name": "udp", **UDP_ECHO[0]}]),
    service("deaf-local", "10.96.0.40", SOLO, DEAF),
    service("deaf-remote", "10.96.0.41", REMOTE, DEAF),
    service("udp-echo", "10.96.0.50", WEB, UDP_ECHO),
]

SERVER = r"""
import socket, sys, threading
name = sys.argv[1]
t = socket.socket(); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.bind(("0.0.0.0", 8080)); t.listen(128)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("0.0.0.0", 9000))
def serve(c, peer):
    with c, c.makefile("rb") as f:
        for _ in f:
            c.sendall(f"{name} {peer}\n".encode())
def accept():
    while True:
        c, (peer, _) = t.accept()
        threading.Thread(target=serve, args=(c, peer), daemon=True).start()
threading.Thread(target=accept, daemon=True).start()
print("ready", flush=True)
while True:
    data, addr = u.recvfrom(2048)
    if not data.startswith(b"quiet"):
        u.sendto(f"{name} {addr[0]}".encode(), addr)
"""

# One JSON command per stdin line, one JSON answer per stdout line; errors are answers too.
DRIVER = r"""
import json, socket, sys
socks = {}
def line(s):
    buf = b""
    while not buf.endswith(b"\n"):
        d = s.recv(4096)
        if not d:
            raise ConnectionResetError("closed by the peer")
        buf += d
    return buf.decode().strip()
def run(cmd):
    op = cmd[0]
    if op == "tcp":
        _, key, host, port, timeout = cmd
        s = socks[key] = socket.create_connection((host, port), timeout=timeout)
        return {"local": s.getsockname()[1]}
    if op == "udp":
        _, key, host, port, timeout = cmd
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(timeout)
        s.connect((host, port)); socks[key] = s
        return {"local": s.getsockname()[1]}
    if op == "send":
        s = socks[cmd[1]]
        if s.type == socket.SOCK_DGRAM:
            s.send(cmd[2].encode())
            return {"reply": s.recv(4096).decode()}
        s.sendall(cmd[2].encode() + b"\n")
        return {"reply": line(s)}
    if op == "close":
        socks.pop(cmd[1]).close()
        return {}
    if op == "burst":  # n fresh TCP connections, one line each
        _, host, port, n = cmd
        out = []
        for _ in range(n):
            with socket.create_connection((host, port), timeout=5) as s:
                s.sendall(b"x\n"); out.append(line(s))
        return {"replies": out}
    raise ValueError(op)
for raw in sys.stdin:
    try:
        res = run(json.loads(raw))
    except socket.timeout:
        res = {"error": "timeout"}
    except ConnectionRefusedError:
        res = {"error": "refused"}
    except OSError as e:
        res = {"error": f"{type(e).__name__}: {e}"}
    print(json.dumps(res), flush=True)
"""


def topology(dataplane: str) -> dict:
    return {"name": "svc", "cluster": {"podCIDR": "10.244.0.0/16", "backend": "host-gw"},
            "nodes": [{"name": "node1", "address": f"{NODE1}/24", "podCIDR": "10.244.1.0/24",
                       "dataplane": dataplane},
                      {"name": "node2", "address": "192.168.1.12/24", "podCIDR": "10.244.2.0/24",
                       "dataplane": "kernel"}],
            "pods": [{"name": "client", "node": "node1", "ip": "10.244.1.10"},
                     {"name": "client2", "node": "node1", "ip": "10.244.1.11"},
                     {"name": "loner", "node": "node1", "ip": "10.244.1.12"},  # test_no_icmp_redirect_... only
                     {"name": "web1", "node": "node1", "ip": "10.244.1.21",
                      "labels": {"app": "web", "solo": "yes", "churn": "yes"}},
                     {"name": "web2", "node": "node1", "ip": "10.244.1.22", "labels": {"app": "web", "churn": "yes"}},
                     {"name": "web3", "node": "node1", "ip": "10.244.1.23", "labels": {"app": "web"}},
                     {"name": "remote1", "node": "node2", "ip": "10.244.2.21", "labels": {"app": "remote"}}],
            "externals": [{"name": "ext", "address": f"{EXT}/24"}],
            "manifests": ["services.yaml"]}


class Driver:
    """DRIVER running in a lab member; ``d("tcp", "a", host, port, 3)`` returns its JSON answer."""

    def __init__(self, member: str) -> None:
        self.member = member
        self.proc = subprocess.Popen(vlab.exec_argv(member, [sys.executable, "-u", "-c", DRIVER]),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)

    def __call__(self, *cmd, timeout: float = 60) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"driver in {self.member}: no answer to {cmd}: {self.proc.stderr.read()}")
        return json.loads(line)

    def ok(self, *cmd) -> dict:
        res = self(*cmd)
        assert "error" not in res, f"{self.member}: {cmd}: {res['error']}"
        return res

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for f in (self.proc.stdout, self.proc.stderr):
            f.close()


class SvcLab:
    """The running lab and how to look into node1's dataplane."""

    def __init__(self, st: dict, dataplane: str, tmp) -> None:
        self.st, self.dataplane, self.tmp = st, dataplane, tmp

    def ip(self, pod: str) -> str:
        return self.st["pods"][pod]["ip"].split("/")[0]

    def vswitch(self, *args: str) -> str:
        r = subprocess.run(VSWITCH + list(args) + ["--node", "node1"], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        return r.stdout

    def show(self, table: str) -> list:
        return json.loads(self.vswitch("show", table, "-o", "json"))

    def conntrack(self, **match) -> list:
        """Rows of node1's conntrack whose original tuple has every given field (src, sport, dst, ...)."""
        return [r for r in self.show("conntrack") if all(r["orig"].get(k) == v for k, v in match.items())]

    def drops(self, stage: str, reason: str) -> int:
        return sum(r["count"] for r in self.show("drops") if r["stage"] == stage and r["reason"] == reason)

    def apply(self, docs: list) -> str:
        path = self.tmp / f"apply-{time.monotonic_ns()}.yaml"
        path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
        return self.vswitch("apply", "-f", str(path))

    def derived_slice(self, service: str) -> dict:
        """The EndpointSlice the lab derived for ``service`` (as node1 loaded it at start)."""
        with open(os.path.join(LAB_DIR, "services.yaml")) as f:
            for doc in yaml.safe_load_all(f):
                if doc and doc["kind"] == "EndpointSlice" and \
                        doc["metadata"]["labels"]["kubernetes.io/service-name"] == service:
                    return doc
        raise AssertionError(f"no EndpointSlice for {service}")


@pytest.fixture(scope="module", params=DATAPLANES)
def svc_lab(request, tmp_path_factory):
    """One lab for the module (per dataplane), every member running SERVER."""
    if not in_sandbox():  # the lab marker should have skipped us already; never touch the host
        pytest.fail("lab fixture used outside a vswitch sandbox", pytrace=False)
    if vlab.state() is not None:  # a previous test leaked its lab
        _down_if_up()
    tmp = tmp_path_factory.mktemp(f"services-{request.param}")
    (tmp / "services.yaml").write_text(yaml.safe_dump_all(SERVICES, sort_keys=False))
    path = tmp / "topology.yaml"
    path.write_text(yaml.safe_dump(topology(request.param), sort_keys=False))
    servers = []
    try:
        st = vlab.up(str(path), log=lambda *a: None)
        for name in (*st["pods"], "ext"):
            if not name.startswith("client") and name != "loner":
                servers.append(subprocess.Popen(vlab.exec_argv(name, [sys.executable, "-u", "-c", SERVER, name]),
                                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        for p in servers:
            ready, _, _ = select.select([p.stdout], [], [], 10)
            if not ready or p.stdout.readline() != "ready\n":
                p.kill()
                p.wait()
                raise AssertionError(f"server in {p.args[3]} did not start: {p.stderr.read()}")
        yield SvcLab(st, request.param, tmp)
    finally:
        for p in servers:
            p.terminate()
            p.wait(timeout=5)
            p.stdout.close()
            p.stderr.close()
        _down_if_up()


@pytest.fixture
def driver():
    """Factory: ``d = driver("client")``; every driver is stopped after the test."""
    made = []

    def make(member: str) -> Driver:
        made.append(Driver(member))
        return made[-1]
    yield make
    for d in made:
        d.close()


def names_and_peers(replies: list) -> tuple:
    pairs = [r.split() for r in replies]
    return [p[0] for p in pairs], [p[1] for p in pairs]


# --- 1. sessionAffinity: ClientIP -------------------------------------------------------------


def test_session_affinity_pins_each_client_to_one_endpoint(svc_lab, driver):
    row = next(r for r in svc_lab.show("services") if r["service"] == "default/sticky")
    assert row["affinity"] == "ClientIP" and row["affinity_timeout"] == 10800, row
    assert len(row["endpoints"]) == 3
    pinned = {}
    for client in ("client", "client2"):
        names, peers = names_and_peers(driver(client).ok("burst", "10.96.0.20", 80, 20)["replies"])
        assert len(names) == 20
        # without affinity 20 picks out of 3 endpoints all agree with probability 3**-19
        assert len(set(names)) == 1, f"{client} was spread over {sorted(set(names))}: {names}"
        assert set(names) <= {"web1", "web2", "web3"}
        assert set(peers) == {svc_lab.ip(client)}  # pod to pod: no masquerade
        pinned[client] = names[0]
    rows = svc_lab.conntrack(dst="10.96.0.20")
    assert {(r["orig"]["src"], r["endpoint"]) for r in rows} == \
        {(svc_lab.ip(c), f"{svc_lab.ip(p)}:8080") for c, p in pinned.items()}


# --- 2. externalTrafficPolicy ------------------------------------------------------------------


def test_nodeport_policy_local_keeps_the_client_address_cluster_masquerades(svc_lab, driver):
    ext = driver("ext")
    names, peers = names_and_peers(ext.ok("burst", NODE1, 30081, 6)["replies"])
    assert set(names) <= {"web1", "web2", "web3"}
    assert peers == [EXT] * 6, peers  # Local: the endpoint sees the external host itself
    names, peers = names_and_peers(ext.ok("burst", NODE1, 30082, 6)["replies"])
    assert set(names) <= {"web1", "web2", "web3"}
    assert peers == [GATEWAY] * 6, peers  # Cluster: masqueraded to the node's address on the pods' side


def test_nodeport_policy_local_without_a_local_endpoint_drops(svc_lab, driver):
    ext = driver("ext")
    # the endpoint on node2 is reachable: the policy Cluster NodePort of the same pods answers
    # (masqueraded to node1's underlay address, routed to node2 over host-gw)
    assert ext.ok("burst", NODE1, 30084, 2)["replies"] == ["remote1 " + NODE1] * 2
    before = svc_lab.drops("nat-prerouting", "no-local-endpoint")
    res = ext("tcp", "np", NODE1, 30083, 2)
    assert res.get("error") == "timeout", res  # dropped, not refused (kube-proxy's KUBE-EXT drop)
    assert svc_lab.drops("nat-prerouting", "no-local-endpoint") > before
    assert not svc_lab.conntrack(dst=NODE1, dport=30083)
    # policy Local is for external traffic only: a pod still reaches the endpoint through the ClusterIP
    assert driver("client").ok("burst", "10.96.0.23", 80, 1)["replies"] == ["remote1 " + svc_lab.ip("client")]


# --- 3. hairpin --------------------------------------------------------------------------------


def test_hairpin_pod_reaches_itself_through_its_service_masqueraded(svc_lab, driver):
    replies = driver("web1").ok("burst", "10.96.0.25", 80, 3)["replies"]
    assert replies == [f"web1 {GATEWAY}"] * 3, replies  # as kube-proxy: masqueraded, not its own address
    rows = svc_lab.conntrack(src=svc_lab.ip("web1"), dst="10.96.0.25")
    assert rows and all(r["masquerade"] and r["reply"]["dst"] == GATEWAY for r in rows), rows


# --- 4. endpoint removal under live connections ------------------------------------------------


def test_endpoint_removal_keeps_live_tcp_and_moves_stale_udp(svc_lab, driver):
    d = driver("client")
    vip = "10.96.0.30"
    d.ok("tcp", "long", vip, 80, 5)
    stay = d.ok("send", "long", "hello")["reply"].split()[0]
    gone = {"web1": "web2", "web2": "web1"}[stay]
    # connected UDP sockets until one is pinned (by conntrack) to the endpoint that will go
    udp = {}
    for i in range(40):
        port = d.ok("udp", f"u{i}", vip, 90, 3)["local"]
        udp[f"u{i}"] = (port, d.ok("send", f"u{i}", "ping")["reply"].split()[0])
        if udp[f"u{i}"][1] == gone:
            break
    doomed = [k for k, (_, ep) in udp.items() if ep == gone]
    kept = [k for k, (_, ep) in udp.items() if ep == stay]
    assert len(doomed) == 1, udp
    doomed_port = udp[doomed[0]][0]
    before = [r for r in svc_lab.conntrack(dst=vip, sport=doomed_port) if r["proto"] == "udp"]
    assert [r["endpoint"] for r in before] == [f"{svc_lab.ip(gone)}:9000"], before

    full = svc_lab.derived_slice("churn")
    assert len(full["endpoints"]) == 2, full
    cut = dict(full, endpoints=[e for e in full["endpoints"] if e["addresses"] != [svc_lab.ip(gone)]])
    try:
        out = svc_lab.apply([cut])
        m = re.search(r"removed (\d+) UDP conntrack entries", out)
        assert m and int(m.group(1)) == 1, out
        after = [r for r in svc_lab.conntrack(dst=vip, sport=doomed_port) if r["proto"] == "udp"]
        assert after == [], after  # the stale UDP entry is gone ...
        for k in kept:  # ... the ones towards the endpoint that stays are not
            assert [r["endpoint"] for r in svc_lab.conntrack(dst=vip, sport=udp[k][0])] == \
                [f"{svc_lab.ip(stay)}:9000"]
        # the long-lived TCP connection to the endpoint that stays keeps working
        assert d.ok("send", "long", "again")["reply"].split()[0] == stay
        # the next datagram of the stale "connection" picks a live endpoint instead of vanishing
        assert d("send", doomed[0], "ping") == {"reply": f"{stay} {svc_lab.ip('client')}"}
        # new connections never reach the removed endpoint
        names, _ = names_and_peers(d.ok("burst", vip, 80, 10)["replies"])
        assert set(names) == {stay}, names
        for i in range(5):
            d.ok("udp", f"new{i}", vip, 90, 3)
            assert d.ok("send", f"new{i}", "ping")["reply"].split()[0] == stay
    finally:
        svc_lab.apply([full])


# --- 5. RELATED ICMP from an endpoint ----------------------------------------------------------


@pytest.mark.parametrize("vip,where", [("10.96.0.40", "local"), ("10.96.0.41", "remote")])
def test_port_unreachable_from_the_endpoint_is_translated_back(svc_lab, driver, tmp_path, vip, where):
    d = driver("client")
    cap = Capture("client", str(tmp_path / "icmp.pcap"), "icmp[icmptype] == icmp-unreach", 1, inbound_only=True)
    try:
        sport = d.ok("udp", "u", vip, 53, 3)["local"]
        res = d("send", "u", "anyone?")
        frames = cap.wait()
    finally:
        cap.stop()
    assert frames, "no ICMP error reached the client"
    ip = frames[0][14:]
    ihl = (ip[0] & 0x0F) * 4
    icmp = ip[ihl:]
    quoted = icmp[8:]
    qihl = (quoted[0] & 0x0F) * 4
    got = {"src": _ip(ip[12:16]), "type": icmp[0], "code": icmp[1], "quoted_src": _ip(quoted[12:16]),
           "quoted_dst": _ip(quoted[16:20]), "quoted_sport": int.from_bytes(quoted[qihl:qihl + 2], "big"),
           "quoted_dport": int.from_bytes(quoted[qihl + 2:qihl + 4], "big")}
    assert got == {"src": vip, "type": 3, "code": 3, "quoted_src": svc_lab.ip("client"), "quoted_dst": vip,
                   "quoted_sport": sport, "quoted_dport": 53}, got
    assert res == {"error": "refused"}, res  # the socket recognised the error as its own
    # TCP: the endpoint's RST comes back from the Service address
    assert d("tcp", "t", vip, 81, 3) == {"error": "refused"}


def _ip(b: bytes) -> str:
    return ".".join(str(x) for x in b)


def test_no_icmp_redirect_for_a_service_connection_to_a_pod_on_the_same_bridge(svc_lab, driver, tmp_path):
    # in == out interface (the pods' bridge) and the next hop on-link: a plain forward would earn a
    # redirect, but this one was DNATed: a kube-proxy node sends none. `loner` talks only here, so
    # the router's per-source redirect limiter has never been used for it.
    cap = Capture("loner", str(tmp_path / "redirect.pcap"), "icmp[icmptype] == icmp-redirect", 1, inbound_only=True)
    try:
        replies = driver("loner").ok("burst", "10.96.0.25", 80, 1)["replies"]
        frames = cap.frames(timeout=1)
    finally:
        cap.stop()
    assert replies == [f"web1 {svc_lab.ip('loner')}"]
    assert frames == [], [f"redirect from {_ip(f[26:30])} for {_ip(f[14 + 20 + 8 + 16:14 + 20 + 8 + 20])} "
                          f"via {_ip(f[14 + 24:14 + 28])}" for f in frames]


# --- 6. conntrack states and limits as `vswitch show conntrack` shows them ----------------------


def test_conntrack_rows_show_tcp_state_and_udp_replied_vs_unreplied(svc_lab, driver):
    d = driver("client")
    me = svc_lab.ip("client")
    tcp_port = d.ok("tcp", "t", "10.96.0.22", 80, 5)["local"]
    d.ok("send", "t", "x")
    [row] = svc_lab.conntrack(src=me, sport=tcp_port, dst="10.96.0.22")
    assert row["proto"] == "tcp" and row["state"] == "ESTABLISHED", row
    assert row["flags"] == ["ASSURED"], row
    assert 86000 < row["timeout"] <= 86400, row  # kube-proxy's --conntrack-tcp-timeout-established
    assert row["packets"][0] >= 3 and row["packets"][1] >= 2, row  # SYN, ACK, data / SYN-ACK, data

    d.ok("close", "t")  # FIN from us, FIN from the server (end of its loop), our last ACK
    deadline = time.monotonic() + 5
    while True:
        [row] = svc_lab.conntrack(src=me, sport=tcp_port, dst="10.96.0.22")
        if row["state"] == "TIME_WAIT" or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert row["state"] == "TIME_WAIT" and row["timeout"] <= 120, row

    quiet = d.ok("udp", "q", "10.96.0.50", 90, 1)["local"]
    assert d("send", "q", "quiet please") == {"error": "timeout"}
    talk = d.ok("udp", "r", "10.96.0.50", 90, 3)["local"]
    d.ok("send", "r", "x")
    [unreplied] = svc_lab.conntrack(src=me, sport=quiet, dst="10.96.0.50")
    [replied] = svc_lab.conntrack(src=me, sport=talk, dst="10.96.0.50")
    assert unreplied["state"] is None and unreplied["flags"] == ["UNREPLIED"], unreplied
    assert unreplied["timeout"] <= 30, unreplied
    assert replied["flags"] == [] and replied["timeout"] <= 30, replied  # replied, not a stream yet
    time.sleep(2.2)  # a replied flow still active more than 2 s after creation is a stream
    d.ok("send", "r", "x")
    [stream] = svc_lab.conntrack(src=me, sport=talk, dst="10.96.0.50")
    assert stream["flags"] == ["ASSURED"] and 115 < stream["timeout"] <= 120, stream
    [unreplied] = svc_lab.conntrack(src=me, sport=quiet, dst="10.96.0.50")
    assert unreplied["flags"] == ["UNREPLIED"] and unreplied["timeout"] <= 28, unreplied  # still counting down

    stats = next(r for r in svc_lab.show("stats") if r["stage"] == "(conntrack)")
    assert stats["max"] == DEFAULT_MAX, stats
    assert stats["entries"] >= len(svc_lab.show("conntrack")) >= 3, stats
