"""Integration tests: Services and masquerade on a node, as pods and outside hosts see them.

One node with a client pod and two `app: web` pods serving HTTP on 8080, a
Service 10.96.0.10:80 selecting them (the lab derives the EndpointSlice from
the pods' labels), a NodePort 30080, and an external host on the underlay.
Every test runs on a vswitch node and on a kernel node (kube-proxy's iptables
rules and flannel's ip-masq, vswitch/lab/kubeproxy.py): the kernel is the
reference, the same assertions hold on both. Run with:

    vswitch sandbox -- python -m pytest -q tests/test_lab_nat.py
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest

from conftest import pexec
from vswitch import lab as vlab

pytestmark = pytest.mark.lab

VSWITCH = [sys.executable, "-m", "vswitch"]
SERVICES = """
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: web-np}
spec:
  type: NodePort
  clusterIP: 10.96.0.11
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080, nodePort: 30080}]
---
apiVersion: v1
kind: Service
metadata: {name: empty}
spec:
  clusterIP: 10.96.0.12
  selector: {app: nothing}
  ports: [{port: 80, protocol: UDP}]
"""

# Serves GET /who with the pod's name and /peer with the address the connection came from.
SERVER = r"""
import http.server, sys
name = sys.argv[1]
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = (name if self.path == "/who" else self.client_address[0]).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("0.0.0.0", int(sys.argv[2])), H).serve_forever()
"""
FETCH = r"""
import sys, urllib.request
out = []
for _ in range(int(sys.argv[2])):
    out.append(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())
print("\n".join(out))
"""


def topology(tmp_path, dataplane: str) -> dict:
    (tmp_path / "services.yaml").write_text(SERVICES)
    return {"name": "nat", "cluster": {"podCIDR": "10.244.0.0/16", "backend": "host-gw"},
            "nodes": [{"name": "node1", "address": "192.168.1.11/24", "podCIDR": "10.244.1.0/24",
                       "dataplane": dataplane}],
            "pods": [{"name": "client", "node": "node1"},
                     {"name": "web1", "node": "node1", "labels": {"app": "web"}},
                     {"name": "web2", "node": "node1", "labels": {"app": "web"}}],
            "externals": [{"name": "ext", "address": "192.168.1.100/24"}],
            "manifests": ["services.yaml"]}


@pytest.fixture(params=["vswitch", "kernel"])
def dataplane(request) -> str:
    return request.param


@pytest.fixture
def nat_lab(make_lab, tmp_path, dataplane):
    st = make_lab(topology(tmp_path, dataplane))
    servers = []
    for name, port in (("web1", 8080), ("web2", 8080), ("ext", 8000)):
        argv = vlab.exec_argv(name, [sys.executable, "-c", SERVER, name, str(port)])
        servers.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    for name, port in (("web1", 8080), ("web2", 8080), ("ext", 8000)):
        deadline = time.monotonic() + 10
        while f":{port}" not in pexec(name, "ss", "-Hltn").stdout:
            assert time.monotonic() < deadline, f"server in {name} did not start"
            time.sleep(0.05)
    yield st
    for p in servers:
        p.terminate()
        p.wait(timeout=5)


def fetch(member: str, url: str, n: int = 1) -> list:
    r = pexec(member, sys.executable, "-c", FETCH, url, str(n), timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


def show(table: str) -> list:
    r = subprocess.run(VSWITCH + ["show", table, "--node", "node1", "-o", "json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def conntrack_rows(dataplane: str, dst: str) -> list:
    """node1's conntrack entries whose original destination is dst: `vswitch show conntrack`, or
    the kernel's table (`conntrack -L`) in the same shape (orig/reply src, dst, sport, dport)."""
    if dataplane == "vswitch":
        return [r for r in show("conntrack") if r["orig"]["dst"] == dst]
    res = pexec("node1", "conntrack", "-L", "-d", dst)
    assert res.returncode == 0, res.stderr
    rows = []
    for line in res.stdout.splitlines():
        fields = [(k, int(v) if k.endswith("port") else v)
                  for k, v in re.findall(r"\b(src|dst|sport|dport)=(\S+)", line)]
        rows.append({"proto": line.split()[0], "orig": dict(fields[:4]), "reply": dict(fields[4:8])})
    return rows


def test_clusterip_spreads_over_endpoints_and_replies_come_from_the_vip(nat_lab, dataplane):
    names = fetch("client", "http://10.96.0.10/who", 40)
    assert len(names) == 40  # every connection completed: the replies came back from 10.96.0.10:80
    assert set(names) == {"web1", "web2"}, names
    assert min(names.count("web1"), names.count("web2")) >= 5  # uniform choice: P(<5 of 40) ~ 1e-7
    # pod to pod: the endpoint sees the client's own address
    client_ip = nat_lab["pods"]["client"]["ip"].split("/")[0]
    assert fetch("client", "http://10.96.0.10/peer") == [client_ip]
    web = {nat_lab["pods"][p]["ip"] for p in ("web1", "web2")}
    rows = conntrack_rows(dataplane, "10.96.0.10")
    assert rows and all(r["reply"]["src"] in web and r["reply"]["sport"] == 8080 for r in rows), rows
    if dataplane == "vswitch":  # the kernel's table does not name the Service
        assert all(r["service"] == "default/web" for r in rows)


def test_nodeport_from_outside_is_masqueraded(nat_lab):
    peers = fetch("ext", "http://192.168.1.11:30080/peer", 4)
    assert peers == ["10.244.1.1"] * 4  # masqueraded to the gateway address on the pods' bridge
    assert set(fetch("ext", "http://192.168.1.11:30080/who", 20)) <= {"web1", "web2"}


def test_pod_to_outside_is_masqueraded_to_the_node_address(nat_lab):
    assert fetch("client", "http://192.168.1.100:8000/peer") == ["192.168.1.11"]


def test_service_without_endpoints_rejects_with_port_unreachable(nat_lab):
    probe = r"""
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3)
s.connect(("10.96.0.12", 80)); s.send(b"x")
try:
    s.recv(10); print("answered")
except ConnectionRefusedError:
    print("refused")
except socket.timeout:
    print("timeout")
"""
    r = pexec("client", sys.executable, "-c", probe)
    assert r.stdout.strip() == "refused", r.stdout + r.stderr


# `vswitch apply` is vswitch's own control path; a kernel node's rules are rendered once at `lab up`.
@pytest.mark.parametrize("dataplane", ["vswitch"])
def test_apply_rejects_a_bad_manifest_and_keeps_the_old_state(nat_lab, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(SERVICES.replace("port: 80, targetPort: 8080}]\n---", "port: 0, targetPort: 8080}]\n---", 1))
    r = subprocess.run(VSWITCH + ["apply", "-f", str(bad), "--node", "node1"], capture_output=True, text=True)
    assert r.returncode == 1 and "Service default/web" in r.stderr and "spec.ports[0].port" in r.stderr, r.stderr
    assert {s["service"] for s in show("services")} == {"default/web", "default/web-np", "default/empty"}
    assert set(fetch("client", "http://10.96.0.10/who", 4)) <= {"web1", "web2"}
