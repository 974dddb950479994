"""`vswitch lab`: a cluster of nodes and pods made of network namespaces.

Layout (all inside the caller's sandbox, see vswitch/sandbox.py):

    netns "underlay": Linux bridge br0 = the nodes' shared L2 segment
    netns <node>:     eth0 (veth to br0) with the node address;
                      dataplane vswitch: a `vswitch run` daemon whose TAPs are the pods' eth0
                      dataplane kernel:  Linux bridge cni0 (gateway address) + veth pods, hairpin on
    netns <pod>:      eth0 with an address from its node's podCIDR, default route via the gateway
    netns <external>: eth0 on the underlay, outside the cluster

State lives in /run/vswitch/lab/state.json so that separate `lab exec`,
`lab status`, `show --node` and `lab down` calls find the running lab.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from typing import List, Optional

import yaml

from .. import control
from ..netns import NetnsError, ip, run
from ..sandbox import STATE_DIR, require
from .topology import Topology, load

LAB_DIR = os.path.join(STATE_DIR, "lab")
STATE = os.path.join(LAB_DIR, "state.json")
UNDERLAY = "underlay"
READY_TIMEOUT = 15.0


class LabError(RuntimeError):
    pass


def state() -> Optional[dict]:
    try:
        with open(STATE) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def _save(st: dict) -> None:
    os.makedirs(LAB_DIR, exist_ok=True)
    tmp = STATE + ".tmp"
    with open(tmp, "w") as f:
        json.dump(st, f, indent=2)
    os.replace(tmp, STATE)


def socket_for(node: str) -> str:
    st = state()
    if st is None:
        raise LabError("no lab is up (start one with `vswitch lab up TOPOLOGY.yaml`)")
    if node not in st["nodes"]:
        raise LabError(f"lab {st['name']} has no node {node!r} (nodes: {', '.join(st['nodes'])})")
    info = st["nodes"][node]
    if info["dataplane"] != "vswitch":
        raise LabError(f"node {node} runs the kernel dataplane: inspect it with "
                       f"`vswitch lab exec {node} -- bridge fdb show` or `ip ...`")
    return info["socket"]


def _sysctl(netns: str, *settings: str) -> None:
    run(["sysctl", "-qw", *settings], netns=netns)


def _add_netns(st: dict, name: str) -> None:
    ip("netns", "add", name)
    st["netns"].append(name)
    _save(st)
    ip("link", "set", "lo", "up", netns=name)
    # IPv4 only: no IPv6 autoconf, DAD or MLD chatter flooding through the bridges.
    _sysctl(name, "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1")


def _link_mac(netns: str, dev: str) -> str:
    return json.loads(ip("-j", "link", "show", "dev", dev, netns=netns))[0]["address"]


def up(topo: Topology | str, log=print) -> dict:
    require("lab up")
    if isinstance(topo, str):
        topo = load(topo)
    if state() is not None:
        raise LabError(f"lab {state()['name']} is already up: `vswitch lab down` first")
    st = {"name": topo.name, "netns": [], "nodes": {}, "pods": {}, "externals": {},
          "backend": topo.backend, "pod_cidr": str(topo.pod_cidr), "service_cidr": str(topo.service_cidr)}
    _save(st)
    try:
        _build(topo, st, log)
    except BaseException:
        teardown(st)
        raise
    return st


HOST_NET = ("169.254.1.1/30", "169.254.1.2/30")  # router side / kernel side of a vswitch node's host port


def _build(topo: Topology, st: dict, log) -> None:
    _add_netns(st, UNDERLAY)
    ip("link", "add", "br0", "type", "bridge", netns=UNDERLAY)
    ip("link", "set", "br0", "up", netns=UNDERLAY)
    uports = {}
    for i, n in enumerate(topo.nodes):
        _add_netns(st, n.name)
        uports[n.name] = f"u{i}"
        if n.dataplane == "kernel":
            _underlay_veth(uports[n.name], n.name, str(n.address), topo.underlay_mtu)
    for i, e in enumerate(topo.externals):
        _add_netns(st, e.name)
        _underlay_veth(f"x{i}", e.name, str(e.address), topo.underlay_mtu)
        st["externals"][e.name] = {"address": str(e.address), "mac": _link_mac(e.name, "eth0")}
    for pod in topo.pods:
        _add_netns(st, pod.name)
    services_file = _write_services(topo)
    for node in topo.nodes:
        pods = [p for p in topo.pods if p.node == node.name]
        routes = [f"{o.pod_cidr} via {o.address.ip}" for o in topo.nodes
                  if o is not node and topo.backend == "host-gw"]
        # the Service CIDR route every lab node has (see _program_services)
        service_route = f"{topo.service_cidr} dev {{dev}} src {node.address.ip}"
        info = {"dataplane": node.dataplane, "address": str(node.address), "podCIDR": str(node.pod_cidr),
                "gateway": str(node.gateway), "pid": None, "socket": None}
        st["nodes"][node.name] = info
        peers = [o for o in topo.nodes if o is not node] if topo.backend == "vxlan" else []
        if node.dataplane == "vswitch":
            overlay = _vswitch_overlay(node, peers, topo.underlay_mtu) if topo.backend == "vxlan" else None
            _start_vswitch(node, pods, info, st, uports[node.name], topo.underlay_mtu,
                           routes + [service_route.format(dev="uplink")],
                           {"clusterCIDR": str(topo.pod_cidr), "manifests": [services_file]}, overlay)
            ip("link", "set", uports[node.name], "master", "br0", "up", netns=UNDERLAY)
            _configure_host_port(node)
        else:
            _build_kernel_node(node, pods, routes)
            if topo.backend == "vxlan":
                _kernel_vxlan(node, peers, topo.underlay_mtu)
            _program_services(node, services_file, str(topo.pod_cidr), service_route.format(dev="eth0"))
        for pod in pods:
            _configure_pod(pod, node, st)
        _save(st)
        log(f"node {node.name} ({node.dataplane}) up with {len(pods)} pods")


def _underlay_veth(uport: str, netns: str, addr: str, mtu: int) -> None:
    ip("link", "add", uport, "mtu", str(mtu), "type", "veth", "peer", "name", "eth0", "mtu", str(mtu),
       "netns", netns, netns=UNDERLAY)
    ip("link", "set", uport, "master", "br0", "up", netns=UNDERLAY)
    ip("addr", "add", addr, "dev", "eth0", netns=netns)
    ip("link", "set", "eth0", "up", netns=netns)


def _tap_name(pod: str, i: int) -> str:
    name = f"tap-{pod}"  # prefixed so a pod called eth0 or lo cannot clash in the node namespace
    return name if len(name) <= 15 else f"tap{i}"


def _write_services(topo) -> str:
    """The topology's manifests plus the EndpointSlices derived from its pods, as the endpoints
    controller would write them: what every vswitch node's kube-proxy part loads."""
    from nat.manifests import derive_slices
    path = os.path.join(LAB_DIR, "services.yaml")
    services = [s for _, _, m in topo.manifests for s in m.services]
    pods = [{"name": p.name, "namespace": p.namespace, "labels": p.labels, "ip": str(p.ip.ip), "node": p.node}
            for p in topo.pods]
    docs = [slice_manifest(s) for s in derive_slices(services, pods)]
    with open(path, "w") as f:
        for _, text, _ in topo.manifests:
            f.write(text.rstrip("\n") + "\n---\n")
        yaml.safe_dump_all(docs, f, sort_keys=False)
    return path


def slice_manifest(sl) -> dict:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": sl.name, "namespace": sl.namespace,
                         "labels": {"kubernetes.io/service-name": sl.service}},
            "addressType": "IPv4",
            "ports": [{"name": n, "protocol": proto, "port": port} for n, proto, port in sl.ports],
            "endpoints": [{"addresses": list(e.addresses), "nodeName": e.node_name,
                           "conditions": {"ready": e.ready, "serving": e.serving, "terminating": e.terminating}}
                          for e in sl.endpoints]}


def vtep_mac(node_name: str) -> str:
    """Every lab node's flannel.1 MAC, known up front (flannel publishes it in the node's annotations)."""
    from router.interface import stable_mac
    return stable_mac(node_name, "flannel.1").hex(":")


def _vswitch_overlay(node, peers, underlay_mtu: int) -> dict:
    return {"local": str(node.address.ip), "podCIDR": str(node.pod_cidr), "mac": vtep_mac(node.name),
            "mtu": underlay_mtu - 50,
            "peers": [{"name": o.name, "address": str(o.address.ip), "podCIDR": str(o.pod_cidr),
                       "vtepMAC": vtep_mac(o.name)} for o in peers]}


def _kernel_vxlan(node, peers, underlay_mtu: int) -> None:
    """flannel.1 exactly as flannel's vxlan backend sets it up, with its three entries per peer."""
    n, dev = node.name, "flannel.1"
    ip("link", "add", dev, "address", vtep_mac(n), "mtu", str(underlay_mtu - 50), "type", "vxlan", "id", "1",
       "local", str(node.address.ip), "dev", "eth0", "dstport", "8472", "nolearning", netns=n)
    ip("addr", "add", f"{node.pod_cidr.network_address}/32", "dev", dev, netns=n)
    ip("link", "set", dev, "up", netns=n)
    for o in peers:
        gw = str(o.pod_cidr.network_address)
        ip("route", "add", str(o.pod_cidr), "via", gw, "dev", dev, "onlink", netns=n)
        ip("neigh", "add", gw, "lladdr", vtep_mac(o.name), "dev", dev, "nud", "permanent", netns=n)
        run(["bridge", "fdb", "append", vtep_mac(o.name), "dev", dev, "dst", str(o.address.ip), "self",
             "permanent"], netns=n)


def _start_vswitch(node, pods, info: dict, st: dict, uport: str, underlay_mtu: int, routes: list,
                   nat: dict, overlay: Optional[dict] = None) -> None:
    """Config and daemon of a vswitch node.

    Its uplink is a TAP the daemon moves into the underlay namespace (so the
    node's kernel never sees underlay frames and cannot answer for the node
    address the router owns); its host stack sits behind the internal TAP
    `vsw0`, which holds the node address as /32 (see docs/lab.md).
    """
    sock = os.path.join(LAB_DIR, f"{node.name}.sock")
    cfg_path = os.path.join(LAB_DIR, f"{node.name}.yaml")
    log_path = os.path.join(LAB_DIR, f"{node.name}.log")
    ports = [{"name": p.name, "type": "tap", "ifname": _tap_name(p.name, i), "netns": p.name,
              "netns_ifname": "eth0", "mtu": node.mtu} for i, p in enumerate(pods)]
    ports.append({"name": "uplink", "type": "tap", "ifname": "uplink", "netns": UNDERLAY, "netns_ifname": uport,
                  "mtu": underlay_mtu, "hairpin": False})
    ports.append({"name": "host", "type": "tap", "ifname": "vsw0", "mtu": underlay_mtu, "hairpin": False})
    cfg = {
        "name": node.name,
        "ports": ports,
        "router": {
            "interfaces": [
                {"name": "pods", "address": str(node.gateway), "mtu": node.mtu},
                {"name": "uplink", "port": "uplink", "address": str(node.address), "mtu": underlay_mtu},
                {"name": "host", "port": "host", "address": HOST_NET[0], "host": True, "mtu": underlay_mtu},
            ],
            "routes": routes,
        },
        "nat": nat,
        "control": {"socket": sock},
    }
    if node.cpus:
        cfg["cpus"] = node.cpus
    if overlay is not None:
        cfg["overlay"] = overlay
        # the VTEP binds the node address before the host port holding it exists
        _sysctl(node.name, "net.ipv4.ip_nonlocal_bind=1")
    with open(cfg_path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen(["ip", "netns", "exec", node.name, sys.executable, "-m", "vswitch", "run",
                                 "--config", cfg_path], stdout=logf, stderr=logf, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    info.update(pid=proc.pid, socket=sock, config=cfg_path, log=log_path)
    _save(st)
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        if proc.poll() is not None:
            raise LabError(f"vswitch daemon for {node.name} exited with {proc.returncode}:\n{_tail(log_path)}")
        try:
            control.request(sock, "ping", timeout=1.0)
            return
        except control.ControlError:
            if time.monotonic() > deadline:
                raise LabError(f"vswitch daemon for {node.name} not ready after {READY_TIMEOUT:g} s:\n{_tail(log_path)}")
            time.sleep(0.05)


def _configure_host_port(node) -> None:
    n = node.name
    ip("addr", "add", HOST_NET[1], "dev", "vsw0", netns=n)
    # The host owns every router address, as the kernel owns cni0's and eth0's on a kernel node.
    ip("addr", "add", f"{node.address.ip}/32", "dev", "vsw0", netns=n)
    ip("addr", "add", f"{node.gateway.ip}/32", "dev", "vsw0", netns=n)
    ip("route", "add", "default", "via", HOST_NET[0].split("/")[0], "dev", "vsw0", "src", str(node.address.ip),
       netns=n)
    # A kernel node reaches its pods through cni0's connected route, `PODCIDR dev cni0 src GATEWAY`,
    # so its own packets to pods (and the ARP requests they trigger) come from the gateway address.
    ip("route", "add", str(node.pod_cidr), "via", HOST_NET[0].split("/")[0], "dev", "vsw0",
       "src", str(node.gateway.ip), netns=n)


def _build_kernel_node(node, pods, routes: list) -> None:
    """A node as flannel's CNI config builds it: cni0 bridge, veth pods with hairpin on."""
    n = node.name
    ip("link", "add", "cni0", "mtu", str(node.mtu), "type", "bridge", netns=n)
    ip("addr", "add", str(node.gateway), "dev", "cni0", netns=n)
    ip("link", "set", "cni0", "up", netns=n)
    _sysctl(n, "net.ipv4.ip_forward=1")
    for i, pod in enumerate(pods):
        host = f"veth{i}"
        ip("link", "add", host, "mtu", str(node.mtu), "type", "veth", "peer", "name", "eth0", "mtu", str(node.mtu),
           "netns", pod.name, netns=n)
        ip("link", "set", host, "master", "cni0", netns=n)
        ip("link", "set", host, "type", "bridge_slave", "hairpin", "on", netns=n)
        ip("link", "set", host, "up", netns=n)
        ip("link", "set", "eth0", "up", netns=pod.name)
    for r in routes:  # host-gw: other nodes' pod CIDRs via their node addresses
        ip("route", "add", *r.split(), netns=n)


# kube-proxy's conntrack defaults (--conntrack-tcp-timeout-established 24h, -close-wait 1h), as
# vswitch's "kube-proxy" conntrack profile has them; nf_conntrack_max is global, left alone.
KUBE_PROXY_CONNTRACK = ("net.netfilter.nf_conntrack_tcp_timeout_established=86400",
                        "net.netfilter.nf_conntrack_tcp_timeout_close_wait=3600")


def _program_services(node, services_file: str, cluster_cidr: str, service_route: str) -> None:
    """What kube-proxy (iptables mode) and flannel's ip-masq program on a kernel node."""
    from nat.manifests import load_file

    from .kubeproxy import render
    n = node.name
    if shutil.which("iptables-restore") is None:
        raise LabError(f"kernel node {n} needs iptables-restore for its Service rules: install the iptables "
                       "package (scripts/install.sh does)")
    # Replies from an endpoint to a client pod on the same bridge must meet conntrack to be
    # un-DNATed: kube-proxy needs bridged traffic to go through iptables.
    if run(["sysctl", "-n", "net.bridge.bridge-nf-call-iptables"], netns=n, check=False).returncode != 0:
        raise LabError(f"kernel node {n} needs the br_netfilter module (net.bridge.bridge-nf-call-iptables "
                       "is missing): load it on the machine with `modprobe br_netfilter`")
    # route_localnet: kube-proxy's default localhost NodePorts.
    _sysctl(n, "net.bridge.bridge-nf-call-iptables=1", "net.ipv4.conf.all.route_localnet=1")
    m = load_file(services_file)
    rules = render(m.services, m.slices, node_name=n, node_ips=None, cluster_cidr=cluster_cidr,
                   pod_cidr=str(node.pod_cidr))
    run(["iptables-restore"], netns=n, input=rules)
    _sysctl(n, *KUBE_PROXY_CONNTRACK)  # the sysctls exist once conntrack is in use in the namespace
    # A real node reaches the Service CIDR through its default route, so unanswered ClusterIP ports
    # get to FORWARD (REJECT) and the host's own connections get a route before OUTPUT's DNAT. The
    # lab underlay has no gateway: route only the Service CIDR, so other unrouted traffic still
    # gets net unreachable. vswitch nodes get the same route in their router (_build).
    ip("route", "add", *service_route.split(), netns=n)


def _configure_pod(pod, node, st: dict) -> None:
    ip("addr", "add", str(pod.ip), "dev", "eth0", netns=pod.name)
    ip("route", "add", "default", "via", str(node.gateway.ip), "dev", "eth0", "onlink", netns=pod.name)
    st["pods"][pod.name] = {"node": node.name, "ip": str(pod.ip.ip), "mac": _link_mac(pod.name, "eth0"),
                            "namespace": pod.namespace, "labels": pod.labels}


def _tail(path: str, n: int = 15) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return "(no log)"


def _stop_pid(pid: int) -> None:
    """Stop a daemon this lab started, checking the pid still is that daemon."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"vswitch" not in f.read():
                return
        os.kill(pid, signal.SIGTERM)
    except (FileNotFoundError, ProcessLookupError):
        return
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        try:  # reap it if it is our child (lab up in the same process, e.g. tests)
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def teardown(st: dict) -> None:
    for info in st["nodes"].values():
        if info.get("pid"):
            _stop_pid(info["pid"])
    for ns in reversed(st["netns"]):
        try:
            ip("netns", "del", ns)
        except NetnsError:
            pass
    for f in os.listdir(LAB_DIR) if os.path.isdir(LAB_DIR) else ():
        if f != "state.json" and not f.endswith(".log"):
            try:
                os.unlink(os.path.join(LAB_DIR, f))
            except OSError:
                pass
    try:
        os.unlink(STATE)
    except FileNotFoundError:
        pass


def down() -> str:
    st = state()
    if st is None:
        raise LabError("no lab is up")
    teardown(st)
    return st["name"]


def members(st: dict) -> List[str]:
    return list(st["nodes"]) + list(st["pods"]) + list(st["externals"])


def exec_argv(name: str, cmd: List[str]) -> List[str]:
    st = state()
    if st is None:
        raise LabError("no lab is up (start one with `vswitch lab up TOPOLOGY.yaml`)")
    if name not in members(st) and name != UNDERLAY:
        raise LabError(f"lab {st['name']} has no node, pod or external named {name!r} "
                       f"(have: {', '.join(members(st))})")
    if not cmd:
        cmd = [os.environ.get("SHELL", "/bin/sh")]
    return ["ip", "netns", "exec", name] + cmd


def exec_in(name: str, cmd: List[str], **kw) -> subprocess.CompletedProcess:
    """Run a command in a lab member and capture its output (for tests, demo, bench)."""
    return subprocess.run(exec_argv(name, cmd), capture_output=True, text=True, **kw)


def status_rows(st: dict) -> dict:
    nodes = []
    for name, info in st["nodes"].items():
        alive = "-"
        if info.get("pid"):
            alive = "running" if os.path.exists(f"/proc/{info['pid']}") else "dead"
        nodes.append({"name": name, "dataplane": info["dataplane"], "address": info["address"],
                      "podCIDR": info["podCIDR"], "pid": info.get("pid") or "-", "state": alive})
    pods = [{"name": n, **{k: v for k, v in p.items() if k != "labels"},
             "labels": ",".join(f"{k}={v}" for k, v in p["labels"].items()) or "-"} for n, p in st["pods"].items()]
    ext = [{"name": n, **e} for n, e in st["externals"].items()]
    return {"name": st["name"], "nodes": nodes, "pods": pods, "externals": ext}

