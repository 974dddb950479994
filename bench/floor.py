"""The floor under any Python TAP dataplane: two bare relays where a lab's two vswitch nodes sit.

    client netns --TAP-- relay 1 --TAP-- br0 (netns floor-u) --TAP-- relay 2 --TAP-- server netns

Each relay is a few lines of Python on uvloop that reads a frame from one of
its TAPs and writes it to the other, nothing else: no parsing, no tables, no
rewrite. The TAPs are opened as vswitch opens its own (virtio-net header,
checksum and TSO offloads), and a relay drains up to 64 frames per wake-up
as vswitch's ports do. What the relays cost per packet (the TAP read and
write, the process wake-up) is what every packet through a vswitch node pays
before its pipeline does any work, so a rate measured here bounds what a
vswitch node pair in the same place can reach.

Client and server share one subnet (the relays do not route), so the path has
the lab's hops but none of its decisions. Used by bench_nat.py (connection
rate) and bench_overlay.py (TCP; the relays carry the pods' frames without
any VXLAN header, so the bound is looser there); everything lives in
namespaces created here and deleted on exit.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time

from vswitch.netns import ip

CLIENT, UNDERLAY, SERVER = "floor-c", "floor-u", "floor-s"
CLIENT_IP, SERVER_IP = "10.99.0.1", "10.99.0.2"

RELAY = r"""
import asyncio, fcntl, os, struct, subprocess, sys
import uvloop
def tap(name, netns):
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, 0x400454CA, struct.pack("16sH", name.encode(), 0x0002 | 0x1000 | 0x4000))  # TAP, NO_PI, VNET_HDR
    fcntl.ioctl(fd, 0x400454D0, 0x01 | 0x02 | 0x04 | 0x08)  # TUNSETOFFLOAD: csum, tso4, tso6, tso-ecn
    subprocess.run(["ip", "link", "set", name, "netns", netns], check=True)
    subprocess.run(["ip", "-n", netns, "link", "set", name, "up"], check=True)
    return fd
a, b = tap(sys.argv[1], sys.argv[2]), tap(sys.argv[3], sys.argv[4])
view = memoryview(bytearray(70000))
def relay(src, dst):
    def drain():
        try:
            for _ in range(64):
                os.write(dst, view[:os.readv(src, [view])])
        except BlockingIOError:
            pass
    return drain
async def main():
    loop = asyncio.get_running_loop()
    loop.add_reader(a, relay(a, b))
    loop.add_reader(b, relay(b, a))
    print("ready", flush=True)
    await asyncio.sleep(3600)
uvloop.run(main())
"""


def start(argv: list, netns: str = "") -> subprocess.Popen:
    """Start ``argv`` (in ``netns``) and wait for its first line, which must be "ready"."""
    argv = (["ip", "netns", "exec", netns] if netns else []) + list(argv)
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if proc.stdout.readline().strip() != "ready":
        proc.kill()
        raise RuntimeError(f"floor: {argv[-1]!r} did not start: {proc.stderr.read()[-400:]}")
    return proc


@contextlib.contextmanager
def relays(cpus=None):
    """The relay path up; yields (client netns, server netns, server address). All removed on exit.
    ``cpus``: (relay 1's CPU, relay 2's CPU), pinned as the benchmark pins the daemons they stand for."""
    procs: list = []
    made: list = []
    try:
        for ns in (CLIENT, UNDERLAY, SERVER):
            ip("netns", "add", ns)
            made.append(ns)
            ip("link", "set", "lo", "up", netns=ns)
        ip("link", "add", "br0", "type", "bridge", netns=UNDERLAY)
        ip("link", "set", "br0", "up", netns=UNDERLAY)
        for i, (ns, addr) in enumerate(((CLIENT, CLIENT_IP), (SERVER, SERVER_IP)), 1):
            # the pod end is made as "fpodN" (names are per namespace only once it has moved)
            procs.append(start([sys.executable, "-c", RELAY, f"fpod{i}", ns, f"fup{i}", UNDERLAY]))
            if cpus:
                os.sched_setaffinity(procs[-1].pid, {cpus[i - 1]})
            ip("link", "set", f"fpod{i}", "name", "eth0", netns=ns)
            ip("addr", "add", f"{addr}/24", "dev", "eth0", netns=ns)
            ip("link", "set", f"fup{i}", "master", "br0", netns=UNDERLAY)
        deadline = time.monotonic() + 5  # the first ping also fills both neighbour caches
        while subprocess.run(["ip", "netns", "exec", CLIENT, "ping", "-c", "1", "-W", "1", SERVER_IP],
                             capture_output=True).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError("floor: the relays do not carry a ping")
        yield CLIENT, SERVER, SERVER_IP
    finally:
        for p in procs:
            p.kill()
            p.wait()
        for ns in made:
            ip("netns", "del", ns, check=False)


def tcp_gbps(seconds: float) -> float:
    """Single-stream iperf3 TCP from the floor's client to its server (inside ``relays()``)."""
    srv = subprocess.Popen(["ip", "netns", "exec", SERVER, "iperf3", "-s", "-1", "-B", SERVER_IP],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 5
        while ":5201" not in subprocess.run(["ip", "netns", "exec", SERVER, "ss", "-Hltn"],
                                            capture_output=True, text=True).stdout:
            if srv.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("floor: the iperf3 server did not start")
            time.sleep(0.05)
        res = subprocess.run(["ip", "netns", "exec", CLIENT, "iperf3", "-J", "-c", SERVER_IP, "-t", str(seconds)],
                             capture_output=True, text=True, timeout=seconds + 30)
        return json.loads(res.stdout)["end"]["sum_received"]["bits_per_second"] / 1e9
    finally:
        srv.kill()
        srv.wait()
