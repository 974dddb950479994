"""`vswitch demo`: bring up the built-in topology, show traffic crossing the bridge, tear down."""

from __future__ import annotations

import itertools
import shutil
from importlib import resources

import yaml

from .. import control, tables
from .lab import down, exec_in, socket_for, up
from .traffic import TrafficError, iperf3
from .topology import parse


def builtin(name: str = "demo"):
    text = resources.files("vswitch.lab").joinpath("topologies", f"{name}.yaml").read_text()
    return parse(yaml.safe_load(text))


def ping(src: str, dst_ip: str, count: int = 3) -> tuple:
    res = exec_in(src, ["ping", "-c", str(count), "-i", "0.2", "-W", "2", dst_ip])
    received = 0
    for line in res.stdout.splitlines():
        if "received" in line:
            received = int(line.split(",")[1].split()[0])
    rtt = next((ln.split("=")[1].split("/")[1] for ln in res.stdout.splitlines() if ln.startswith("rtt")), "-")
    return received, rtt


def demo() -> int:
    topo = builtin()
    print(f"== lab {topo.name}: {len(topo.nodes)} node, {len(topo.pods)} pods on its vswitch bridge")
    st = up(topo)
    ok = True
    try:
        pods = st["pods"]
        for name, p in pods.items():
            print(f"   pod {name:<7} {p['ip']:<12} {p['mac']}  on {p['node']}")
        print("== ping every pod from every other pod")
        for a, b in itertools.permutations(pods, 2):
            got, rtt = ping(a, pods[b]["ip"])
            ok &= got == 3
            print(f"   {a:>7} -> {b:<7} {got}/3 replies  avg rtt {rtt} ms")
        print("== iperf3 TCP client -> web-1 through the bridge (3 s, super-frames)")
        if shutil.which("iperf3") is None:
            print("   iperf3 is not installed (apt-get install iperf3)")
            ok = False
        else:
            try:
                r = iperf3("web-1", "client", pods["web-1"]["ip"], 3)
                gbps = r["end"]["sum_received"]["bits_per_second"] / 1e9
                print(f"   {gbps:.2f} Gbit/s received")
            except TrafficError as e:
                print(f"   {e}")
                ok = False
        sock = socket_for("node1")
        print("== vswitch show fdb --node node1")
        print(tables.render("fdb", control.request(sock, "show", table="fdb"), "node1"))
        print("== vswitch show ports --node node1")
        print(tables.render("ports", control.request(sock, "show", table="ports"), "node1"))
    finally:
        down()
        print("== lab down: namespaces, TAPs and the daemon are gone")
    print("demo " + ("passed" if ok else "FAILED"))
    return 0 if ok else 1
