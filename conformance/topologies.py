"""The clusters scenarios run in, built once per dataplane.

Every topology has the same members, so scenarios can name them:

    node1 (192.168.1.11, 10.244.1.0/24): a1 (app=client), a2 (app=solo, app2=web)
    node2 (192.168.1.12, 10.244.2.0/24): b1 (app=remote, app2=web)
    ext   (192.168.1.100): a host on the underlay, outside the cluster

and the same Services (SERVICES below). ``hostgw`` and ``vxlan`` differ in
backend; ``mixed`` is the vxlan cluster where, on the vswitch side, only
node1 runs vswitch and node2 stays a kernel flannel node.
"""

from __future__ import annotations

import os

import yaml

NODE1, NODE2, EXT = "192.168.1.11", "192.168.1.12", "192.168.1.100"
SOLO_VIP, REMOTE_VIP, EMPTY_VIP, NODEPORT_VIP, STICKY_VIP = (f"10.96.0.{i}" for i in (10, 11, 12, 13, 14))
NODE_PORT = 30080
TARGET = 8080


def _service(name: str, vip: str, selector: dict, **spec) -> dict:
    ports = [{"name": "http", "port": 80, "targetPort": TARGET, "protocol": "TCP"},
             {"name": "dns", "port": 53, "targetPort": 5353, "protocol": "UDP"}]
    if spec.get("type") == "NodePort":
        ports = [{"name": "http", "port": 80, "targetPort": TARGET, "protocol": "TCP", "nodePort": NODE_PORT}]
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "default"},
            "spec": {"clusterIP": vip, "selector": selector, "ports": ports, **spec}}


SERVICES = [
    _service("solo", SOLO_VIP, {"app": "solo"}),                     # one endpoint: a2, on node1
    _service("remote", REMOTE_VIP, {"app": "remote"}),               # one endpoint: b1, on node2
    _service("empty", EMPTY_VIP, {"app": "nobody"}),                 # no endpoints: REJECT
    _service("nodeport", NODEPORT_VIP, {"app": "solo"}, type="NodePort"),
    _service("sticky", STICKY_VIP, {"app2": "web"}, sessionAffinity="ClientIP"),  # a2 and b1
]

TOPOLOGIES = ("hostgw", "vxlan", "mixed")


def build(name: str, side: str, workdir: str) -> dict:
    """The lab topology ``name`` for ``side`` ('kernel' or 'vswitch')."""
    if name not in TOPOLOGIES:
        raise ValueError(f"unknown conformance topology {name!r} (have {', '.join(TOPOLOGIES)})")
    manifests = os.path.join(workdir, "services.yaml")
    with open(manifests, "w") as f:
        yaml.safe_dump_all(SERVICES, f, sort_keys=False)
    dp1 = dp2 = side
    if name == "mixed" and side == "vswitch":
        dp2 = "kernel"
    return {
        "name": f"conf-{name}",
        "cluster": {"podCIDR": "10.244.0.0/16", "backend": "host-gw" if name == "hostgw" else "vxlan"},
        "nodes": [{"name": "node1", "address": f"{NODE1}/24", "podCIDR": "10.244.1.0/24", "dataplane": dp1},
                  {"name": "node2", "address": f"{NODE2}/24", "podCIDR": "10.244.2.0/24", "dataplane": dp2}],
        "pods": [{"name": "a1", "node": "node1", "labels": {"app": "client"}},
                 {"name": "a2", "node": "node1", "labels": {"app": "solo", "app2": "web"}},
                 {"name": "b1", "node": "node2", "labels": {"app": "remote", "app2": "web"}}],
        "externals": [{"name": "ext", "address": f"{EXT}/24"}],
        "manifests": [manifests],
    }
