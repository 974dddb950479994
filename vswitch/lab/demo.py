"""`vswitch demo`: bring up the built-in topology, show traffic crossing the bridge, tear down."""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import time
from importlib import resources

import yaml

from .. import control, tables
from .lab import down, exec_argv, exec_in, socket_for, up
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


def iperf3(server: str, client: str, server_ip: str, seconds: int = 3, extra=()) -> dict:
    """One iperf3 run between two lab members; returns the client's JSON summary."""
    srv = subprocess.Popen(exec_argv(server, ["iperf3", "-s", "-1", "-B", server_ip]),
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 5
        while True:
            res = exec_in(client, ["iperf3", "-J", "-c", server_ip, "-t", str(seconds), *extra],
                          timeout=seconds + 30)
            if res.returncode == 0 or time.monotonic() > deadline or "refused" not in res.stdout:
                break
            time.sleep(0.1)  # the server is not listening yet
        try:
            out = json.loads(res.stdout)
        except ValueError:
            out = {"error": res.stdout[-400:] + res.stderr[-400:]}
        if res.returncode != 0 or "error" in out:
            raise RuntimeError(f"iperf3 {client} -> {server} failed: {out.get('error')}")
        return out
    finally:
        try:
            srv.wait(timeout=5)
        except subprocess.TimeoutExpired:
            srv.kill()
            srv.wait()


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
                r = iperf3("web-1", "client", pods["web-1"]["ip"])
                gbps = r["end"]["sum_received"]["bits_per_second"] / 1e9
                print(f"   {gbps:.2f} Gbit/s received")
            except RuntimeError as e:
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
