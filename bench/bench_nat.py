#!/usr/bin/env python3
"""Service benchmark (nat/): ClusterIP traffic on vswitch nodes vs kube-proxy's iptables rules.

    python3 bench/bench_nat.py [--quick] [--seconds S] [--json results.json]

One lab, four nodes, backend host-gw: `v1` and `v2` run vswitch, `k1` and
`k2` the kernel dataplane with the rules kube-proxy's iptables mode programs
(vswitch/lab/kubeproxy.py). The server pod sits on node 1 of its pair, the
client pod on node 2, and the client always connects to a ClusterIP: node 2
DNATs the first packet to the endpoint and routes it to node 1. Every node
holds every Service; each Service has one endpoint (the pair's server pod).

1. single-stream iperf3 TCP through the ClusterIP, vswitch vs kernel;
2. new TCP connections/s through the ClusterIP (CLIENTS parallel loops of
   connect, wait for the server's FIN, close with a RST; the server accepts
   and closes), and the same straight to the endpoint pod (no Service);
3. with 10, 1,000 and 10,000 Services (grown in the running lab: `vswitch
   apply` on the vswitch nodes, a fresh iptables-restore on the kernel ones,
   both timed): connect() latency (median, p99) and connections/s of one
   sequential loop to the Service that sorts last, i.e. the last rule of
   KUBE-SERVICES, the worst case of iptables' linear scan;
4. in-process, no lab: bytes per conntrack entry (tracemalloc) after N SYNs
   to a ClusterIP through a node's pipeline.

v1's and v2's daemons run on CPUs of their own (their config's cpus:, as
userspace datapaths are deployed; the floor's relays likewise); --no-pin
leaves them wherever the kernel puts them.

Runs are sequential, so the two dataplanes never share the CPUs at the same
time; every loop is bounded in time and in count. --quick: short runs,
10 and 1,000 Services, 10,000 conntrack entries.
"""

from __future__ import annotations

import argparse
import gc
import ipaddress
import json
import os
import statistics
import struct
import sys
import tempfile
import time
import tracemalloc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import floor  # noqa: E402
from common import (checked_args, ensure_sandbox, percentile, pinned_cpus, run_args, py_json, py_start,  # noqa: E402
                    py_stop, ratio, save, table, tcp_gbps_to, with_cpus)
from vswitch.netns import run  # noqa: E402

CLUSTER_CIDR = "10.244.0.0/16"
V_SERVER, V_CLIENT, K_SERVER, K_CLIENT = "vs", "vc", "ks", "kc"
V_SERVER_IP, K_SERVER_IP = "10.244.1.10", "10.244.11.10"
V_VIP, K_VIP = "10.96.0.10", "10.96.0.11"  # the measured Services; fillers from 10.96.1.0 on
CONN_PORT, IPERF_PORT, SERVER_PORT = 80, 5201, 8080
TOPOLOGY = {
    "name": "bench-nat",
    "cluster": {"podCIDR": CLUSTER_CIDR, "backend": "host-gw"},
    "nodes": [
        {"name": "v1", "address": "192.168.1.11/24", "podCIDR": "10.244.1.0/24", "dataplane": "vswitch"},
        {"name": "v2", "address": "192.168.1.12/24", "podCIDR": "10.244.2.0/24", "dataplane": "vswitch"},
        {"name": "k1", "address": "192.168.1.21/24", "podCIDR": "10.244.11.0/24", "dataplane": "kernel"},
        {"name": "k2", "address": "192.168.1.22/24", "podCIDR": "10.244.12.0/24", "dataplane": "kernel"},
    ],
    "pods": [{"name": V_SERVER, "node": "v1", "ip": V_SERVER_IP}, {"name": V_CLIENT, "node": "v2"},
             {"name": K_SERVER, "node": "k1", "ip": K_SERVER_IP}, {"name": K_CLIENT, "node": "k2"}],
}
# (dataplane, row label, server pod, client pod, ClusterIP, nodes), kernel first as in bench/common.compare
PAIRS = [("kernel", "kernel (kube-proxy iptables)", K_SERVER, K_CLIENT, K_VIP, ("k1", "k2")),
         ("vswitch", "vswitch (nat/)", V_SERVER, V_CLIENT, V_VIP, ("v1", "v2"))]
GOAL_TCP_RATIO = 0.5
GOAL_CONN_RATIO = 0.5
GOAL_FLAT = 1.1       # vswitch: most Services / fewest, latency and time per connection
GOAL_ENTRY_BYTES = 1024
CLIENTS = 2           # parallel connect loops in the connection-rate run (2 CPUs)

SERVICE = """apiVersion: v1
kind: Service
metadata: {{name: {name}}}
spec:
  clusterIP: {ip}
  ports: [{ports}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: {name}-1, labels: {{kubernetes.io/service-name: {name}}}}}
addressType: IPv4
ports: [{slice_ports}]
endpoints: [{{addresses: [{endpoint}], nodeName: {node}}}]
"""


def service_yaml(name: str, ip: str, endpoint: str, node: str, ports) -> str:
    """One Service without selector and its EndpointSlice; ports: [(name, port, targetPort)]."""
    return SERVICE.format(
        name=name, ip=ip, endpoint=endpoint, node=node,
        ports=", ".join(f"{{name: {n}, port: {p}, targetPort: {t}}}" for n, p, t in ports),
        slice_ports=", ".join(f"{{name: {n}, port: {t}, protocol: TCP}}" for n, _, t in ports))


def fillers(start: int, stop: int) -> list:
    """Filler Services number start to stop - 1, their endpoints alternately each pair's server pod."""
    fill = ipaddress.IPv4Address("10.96.1.0")
    return [service_yaml(f"fill-{i:05d}", str(fill + i), *((V_SERVER_IP, "v1") if i % 2 else (K_SERVER_IP, "k1")),
                         [("conn", CONN_PORT, SERVER_PORT)]) for i in range(start, stop)]


def manifests(n: int) -> str:
    """n Services, one endpoint each: n - 2 fillers, then the two measured ones. Those sort last,
    and kube-proxy's KUBE-SERVICES (like nat/'s table) follows the sorted order, so the kernel's
    measured port is the last ClusterIP rule."""
    docs = fillers(0, n - 2)
    ports = [("iperf", IPERF_PORT, IPERF_PORT), ("conn", CONN_PORT, SERVER_PORT)]
    docs.append(service_yaml("zy-vswitch", V_VIP, V_SERVER_IP, "v1", ports))
    docs.append(service_yaml("zz-kernel", K_VIP, K_SERVER_IP, "k1", ports))
    return "---\n".join(docs)


# --- programs run in the pods -------------------------------------------------------------------------

# Accepts and closes at once (the server sends the first FIN, as an HTTP/1.0 server does).
ACCEPTOR = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(4096)
print("ready", flush=True)
while True:
    s.accept()[0].close()
"""

# argv: host port seconds max-connections workers. Each worker loops: connect (timed), wait for
# the server's FIN, close with a RST (SO_LINGER 0), until the time or its share of the count runs
# out. The RST leaves no TIME_WAIT socket on either side, so a later run reusing a client port
# cannot meet an old socket. One JSON line: connect() latencies in us, failures, and
# connections/s summed over the workers.
CONNECTOR = r"""
import json, os, socket, struct, sys, time
ABORT = struct.pack("ii", 1, 0)
host, port, seconds, limit, workers = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
def loop():
    lat, failed, clock = [], 0, time.perf_counter
    start = clock(); end = start + seconds
    while len(lat) + failed < limit // workers and clock() < end:
        s = socket.socket(); s.settimeout(3); s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, ABORT)
        t0 = clock()
        try:
            s.connect((host, port)); lat.append(round((clock() - t0) * 1e6)); s.recv(1)
        except OSError:
            failed += 1
        finally:
            s.close()
    return {"lat": lat, "failed": failed, "rate": len(lat) / (clock() - start)}
pipes = []
for _ in range(workers):
    r, w = os.pipe()
    if os.fork() == 0:
        os.close(r)
        with os.fdopen(w, "w") as f:
            json.dump(loop(), f)
        os._exit(0)
    os.close(w); pipes.append(r)
res = []
for r in pipes:
    with os.fdopen(r) as f:
        res.append(json.load(f))
    os.wait()
print(json.dumps({"lat": [x for r in res for x in r["lat"]], "failed": sum(r["failed"] for r in res),
                  "rate": sum(r["rate"] for r in res)}))
"""


# --- lab side -----------------------------------------------------------------------------------------

def connect_run(client: str, ip: str, seconds: float, limit: int, workers: int = 1, port: int = CONN_PORT,
                netns: bool = False) -> dict:
    """The CONNECTOR in lab member ``client`` (or, with ``netns``, in the namespace of that name)."""
    args = (ip, port, seconds, limit, workers)
    if netns:
        res = run([sys.executable, "-c", CONNECTOR, *map(str, args)], netns=client, timeout=seconds + 60)
        out = json.loads(res.stdout)
    else:
        out = py_json(client, CONNECTOR, *args, timeout=seconds + 60)
    lat = out["lat"]
    return {"rate": out["rate"], "connections": len(lat), "failed": out["failed"],
            "median_us": statistics.median(lat) if lat else 0.0, "p99_us": percentile(lat, 99)}


def flush_conntrack(dataplane: str, nodes) -> None:
    """Each measurement starts from empty conntrack tables."""
    from vswitch import control
    from vswitch.lab import lab
    for n in nodes:
        if dataplane == "vswitch":
            control.request(lab.socket_for(n), "conntrack_flush", filters={})
        else:
            lab.exec_in(n, ["conntrack", "-F"])


def load_services(st: dict, text: str, removed: str = "") -> dict:
    """Every node to hold the Services of ``text``; seconds each dataplane took, slowest of its nodes.

    vswitch: `vswitch apply -f` through the control socket (YAML parse, validation, new maps);
    when ``removed`` is given, `vswitch delete -f` of those objects instead.
    kernel: what kube-proxy's iptables mode would program (rendered as `lab up` does, not timed),
    loaded with iptables-restore (timed: the kernel's part of a kube-proxy sync).
    """
    from nat.manifests import load_text
    from vswitch import control
    from vswitch.lab import lab
    from vswitch.lab.kubeproxy import render
    m = load_text(text, "bench")
    took = {"vswitch": 0.0, "kernel": 0.0}
    for name, info in st["nodes"].items():
        if info["dataplane"] == "vswitch":
            t0 = time.perf_counter()
            control.request(lab.socket_for(name), "apply", timeout=600, text=removed or text, source="bench",
                            delete=bool(removed))
        else:
            rules = render(m.services, m.slices, node_name=name, cluster_cidr=st["pod_cidr"],
                           pod_cidr=info["podCIDR"])
            t0 = time.perf_counter()
            run(["iptables-restore"], netns=name, input=rules)
        took[info["dataplane"]] = max(took[info["dataplane"]], time.perf_counter() - t0)
    return took


def floor_run(args) -> dict:
    """The same connection loop through two bare Python TAP relays (bench/floor.py): the rate a
    vswitch node pair could reach if its pipeline cost nothing."""
    pins = args.pins
    with floor.relays(cpus=(pins["v1"], pins["v2"]) if pins else None) as (client, server, server_ip):
        acceptor = floor.start([sys.executable, "-u", "-c", ACCEPTOR, server_ip, str(SERVER_PORT)], server)
        try:
            connect_run(client, server_ip, 1, 50, port=SERVER_PORT, netns=True)
            return connect_run(client, server_ip, args.seconds, args.max_conns, CLIENTS, SERVER_PORT, netns=True)
        finally:
            acceptor.kill()
            acceptor.wait()


def lab_runs(args, counts) -> dict:
    from vswitch import lab
    from vswitch.lab.topology import parse

    out = {"tcp": [], "conns": [], "scale": []}
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "services.yaml"), "w") as f:
            f.write(manifests(counts[0]))
        st = lab.up(parse(dict(with_cpus(TOPOLOGY, args.pins), manifests=["services.yaml"]), tmp), log=lambda *a: None)
    servers = []
    try:
        for _, _, srv, _, _, _ in PAIRS:
            servers.append(py_start(srv, ACCEPTOR, st["pods"][srv]["ip"], SERVER_PORT))
        for _, _, srv, cli, vip, _ in PAIRS:
            out["tcp"].append(tcp_gbps_to(srv, cli, st["pods"][srv]["ip"], vip, args.seconds))
        for dp, _, srv, cli, vip, nodes in PAIRS:
            runs = {}
            for how, ip, port in (("service", vip, CONN_PORT), ("direct", st["pods"][srv]["ip"], SERVER_PORT)):
                flush_conntrack(dp, nodes)
                connect_run(cli, ip, 1, 50, port=port)  # warm-up: ARP, FDB, flow cache
                runs[how] = connect_run(cli, ip, args.seconds, args.max_conns, CLIENTS, port)
            out["conns"].append(runs)
        out["floor"] = floor_run(args)
        # back to the fewest at the end: how far the figures move with the Services unchanged
        for i, n in enumerate((*counts, counts[0])):
            before = counts[i - 1] if i else n
            took = load_services(st, manifests(n), "---\n".join(fillers(n - 2, before - 2)) if n < before else "")
            row = {"services": n, "again": i == len(counts), "load_s": took}
            for dp, _, _, cli, vip, nodes in PAIRS:
                flush_conntrack(dp, nodes)
                connect_run(cli, vip, 1, 50)
                row[dp] = connect_run(cli, vip, args.seconds, args.max_conns)
            out["scale"].append(row)
    finally:
        for p in servers:
            py_stop(p)
        lab.down()
    return out


# --- in process: memory per conntrack entry -------------------------------------------------------------

POD_MAC, GW_MAC = "02:00:00:00:00:0a", "02:00:00:00:01:12"
MEM_VIP, MEM_ENDPOINT = "10.96.0.10", "10.244.2.5"  # the endpoint lives behind the uplink (host-gw)


def csum_update(c: int, old: int, new: int) -> int:
    """RFC 1624 eqn. 3: checksum c after a 16-bit word changes from old to new."""
    s = (~c & 0xFFFF) + (~old & 0xFFFF) + new
    s = (s & 0xFFFF) + (s >> 16)
    return ~((s & 0xFFFF) + (s >> 16)) & 0xFFFF


def conntrack_bytes(entries: int) -> dict:
    """Bytes of Python heap per tracked connection: ``entries`` SYNs from pod clients to a ClusterIP,
    each a new connection, through a node's whole pipeline (DNAT to an endpoint on another node,
    routed out of the uplink). Counted by tracemalloc: the Conn, its tuples, both keys in the
    lookup dict and the expiry heap's item, and whatever else a new connection leaves behind."""
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import ARP, Ether

    from vswitch.config import parse
    from vswitch.node import Node
    from vswitch.packet import ZERO_VNET

    now = 1000.0
    node = Node(parse({
        "name": "n1", "ports": [{"name": "pod", "type": "memory"}, {"name": "up", "type": "memory"}],
        "router": {"interfaces": [{"name": "pods", "address": "10.244.1.1/24"},
                                  {"name": "uplink", "port": "up", "address": "192.168.1.11/24"}],
                   "routes": ["10.244.2.0/24 via 192.168.1.12"]},
        "nat": {"clusterCIDR": CLUSTER_CIDR, "conntrack": {"max": entries + 10_000}}}), clock=lambda: now)
    node.start(None)
    for p in node.ports.values():  # frames sent are not the subject
        p.send = lambda buf: True
    node.apply_manifests(service_yaml("web", MEM_VIP, MEM_ENDPOINT, "n2", [("http", 80, 8080)]), "bench")
    node.ports["up"].inject(bytes(Ether(src=GW_MAC, dst="ff:ff:ff:ff:ff:ff") /
                                  ARP(op=1, hwsrc=GW_MAC, psrc="192.168.1.12", pdst="192.168.1.11")), ts=now)
    node.router.neigh.on_arp("uplink", int(ipaddress.IPv4Address("192.168.1.12")), bytes.fromhex(GW_MAC.replace(":", "")),
                             is_reply=True, is_gratuitous=False, for_us=False)
    rmac = node.router.ifaces["pods"].mac.hex(":")
    port, receive = node.ports["pod"], node.receive
    per_client = 64000  # source ports 1024-65023 of each client address
    l4 = len(ZERO_VNET) + 14 + 20  # the TCP header in the buffer

    def syns(first: int, n: int) -> None:
        for c in range(first // per_client, (first + n - 1) // per_client + 1):
            frame = bytearray(ZERO_VNET + bytes(Ether(src=POD_MAC, dst=rmac) / IP(
                src=str(ipaddress.IPv4Address("10.244.1.2") + c), dst=MEM_VIP) /
                TCP(sport=1024, dport=80, flags="S", seq=1000, window=64240)))
            base = struct.unpack_from("!H", frame, l4 + 16)[0]
            lo, hi = max(first, c * per_client) - c * per_client, min(first + n, (c + 1) * per_client) - c * per_client
            for i in range(lo, hi):
                buf = bytearray(frame)
                struct.pack_into("!HH", buf, l4, 1024 + i, CONN_PORT)
                struct.pack_into("!H", buf, l4 + 16, csum_update(base, 1024, 1024 + i))
                receive(port, memoryview(buf), now)

    warm = 1000  # lazily built state (first flows, neighbour use) stays out of the count
    syns(0, warm)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    t0 = time.perf_counter()
    syns(warm, entries)
    took = time.perf_counter() - t0
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    ct = node.nat.ct
    if len(ct) != warm + entries:
        raise RuntimeError(f"expected {warm + entries} conntrack entries, the node holds {len(ct)}")
    return {"entries": entries, "bytes_per_entry": (after - before) / entries,
            "dict_bytes_per_entry": sys.getsizeof(ct.table) / len(ct),
            "heap_list_bytes_per_entry": sys.getsizeof(ct._heap) / len(ct),
            "syns_per_s_traced": entries / took}


# --- report ---------------------------------------------------------------------------------------------

def yes(ok: bool) -> str:
    return "yes" if ok else "NO"


def report(args, res: dict) -> None:
    print(f"Service (nat) benchmark, {args.seconds:g} s per run, CPUs: {os.cpu_count()}"
          f"{' (--quick)' if args.quick else ''}")
    if res.get("conns"):
        print("daemon CPUs: " + (", ".join(f"{n} {c}" for n, c in args.pins.items()) or "not pinned"))
    if res.get("tcp"):
        k, v = res["tcp"]
        print("\n1. single-stream TCP through a ClusterIP (client node DNATs, routes to the endpoint's node)")
        print(table([["dataplane", "TCP Gbit/s"], [PAIRS[0][1], f"{k:.2f}"], [PAIRS[1][1], f"{v:.2f}"],
                     ["ratio vswitch/kernel", f"{ratio(v, k):.2f}x"], ["goal", f">= {GOAL_TCP_RATIO}x"],
                     ["met", yes(ratio(v, k) >= GOAL_TCP_RATIO)]]))
    if res.get("conns"):
        k, v = res["conns"]
        r = ratio(v["service"]["rate"], k["service"]["rate"])
        print(f"\n2. new TCP connections/s through a ClusterIP ({CLIENTS} parallel connect/close loops; "
              "the same straight to the endpoint pod for comparison)")
        rows = [["dataplane", "ClusterIP conn/s", "connections", "failed", "connect median us", "p99 us",
                 "pod IP conn/s", "connect median us"]]
        for (_, label, *_), x in zip(PAIRS, (k, v)):
            s, d = x["service"], x["direct"]
            rows.append([label, f"{s['rate']:,.0f}", f"{s['connections']:,}", str(s["failed"]),
                         f"{s['median_us']:,.0f}", f"{s['p99_us']:,.0f}", f"{d['rate']:,.0f}", f"{d['median_us']:,.0f}"])
        rd = ratio(v["direct"]["rate"], k["direct"]["rate"])
        rows += [["ratio vswitch/kernel", f"{r:.2f}x", "", "", "", "", f"{rd:.2f}x", ""],
                 ["goal", f">= {GOAL_CONN_RATIO}x"] + [""] * 6, ["met", yes(r >= GOAL_CONN_RATIO)] + [""] * 6]
        f = res.get("floor")
        if f:
            rows.append(["floor: 2 bare Python TAP relays", "", f"{f['connections']:,}", str(f["failed"]), "", "",
                         f"{f['rate']:,.0f}", f"{f['median_us']:,.0f}"])
        print(table(rows))
        if f:
            print(f"floor: the pod IP loop through two relays that only read and write each frame "
                  f"(bench/floor.py), where the two vswitch nodes sit: {ratio(f['rate'], k['service']['rate']):.2f}x "
                  f"the kernel's ClusterIP rate, {ratio(v['direct']['rate'], f['rate']):.2f}x of it reached "
                  f"by vswitch's pod IP loop")
    if res.get("scale"):
        scale = res["scale"]
        print("\n3. one connect/close loop to the Service that sorts last, by number of Services on every node")
        rows = [["Services", "kernel load s", "kernel median us", "p99 us", "conn/s",
                 "vswitch load s", "vswitch median us", "p99 us", "conn/s"]]
        for row in scale:
            k, v = row["kernel"], row["vswitch"]
            rows.append([f"{row['services']:,}" + (" again" if row["again"] else ""), f"{row['load_s']['kernel']:.2f}",
                         f"{k['median_us']:,.0f}", f"{k['p99_us']:,.0f}", f"{k['rate']:,.0f}",
                         f"{row['load_s']['vswitch']:.2f}", f"{v['median_us']:,.0f}", f"{v['p99_us']:,.0f}",
                         f"{v['rate']:,.0f}"])
        print(table(rows))
        # the most Services against the mean of the two runs with the fewest (before and after)
        lows, hi = [scale[0], scale[-1]], max(scale, key=lambda r: r["services"])

        def low(dp: str, key: str) -> float:
            return statistics.mean(r[dp][key] for r in lows)
        growth = {dp: (ratio(hi[dp]["median_us"], low(dp, "median_us")), ratio(low(dp, "rate"), hi[dp]["rate"]))
                  for dp in ("kernel", "vswitch")}
        n = f"{hi['services']:,}/{scale[0]['services']:,}"
        print(table([[f"growth {n} Services", "connect median", "time per connection (1/rate)"],
                     *[[dp, f"{g[0]:.2f}x", f"{g[1]:.2f}x"] for dp, g in growth.items()],
                     ["goal (vswitch)", f"<= {GOAL_FLAT}x", f"<= {GOAL_FLAT}x"],
                     ["met", yes(growth["vswitch"][0] <= GOAL_FLAT), yes(growth["vswitch"][1] <= GOAL_FLAT)]]))
        res["growth"] = growth
    if res.get("memory"):
        m = res["memory"]
        print(f"\n4. memory per conntrack entry (in-process, {m['entries']:,} SYNs to a ClusterIP through the pipeline)")
        print(table([["bytes/entry (tracemalloc)", "of which lookup dict", "of which heap list", "goal", "met"],
                     [f"{m['bytes_per_entry']:,.0f}", f"{m['dict_bytes_per_entry']:,.0f}",
                      f"{m['heap_list_bytes_per_entry']:,.0f}", f"<= {GOAL_ENTRY_BYTES:,}",
                      yes(m["bytes_per_entry"] <= GOAL_ENTRY_BYTES)]]))


PARTS = ("lab", "memory")


def main() -> int:
    ensure_sandbox(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description="Service (nat/) benchmark: vswitch vs kube-proxy's iptables rules")
    run_args(ap)  # --quick: 10 and 1,000 Services, 10,000 entries
    ap.add_argument("--only", choices=PARTS, help="run only the lab part (1-3) or only the memory part (4)")
    ap.add_argument("--no-pin", action="store_true",
                    help="leave the vswitch daemons unpinned (default: v1 and v2 on CPUs of their own)")
    args = checked_args(ap)
    args.pins = {} if args.no_pin else pinned_cpus(("v1", "v2"))
    counts = (10, 1000) if args.quick else (10, 1000, 10000)
    args.max_conns = 20_000 if args.quick else 200_000
    res: dict = {"seconds": args.seconds, "quick": args.quick}
    if args.only in (None, "lab"):
        res.update(lab_runs(args, counts))
    if args.only in (None, "memory"):
        res["memory"] = conntrack_bytes(10_000 if args.quick else 100_000)
    report(args, res)
    save(args.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
