"""Traffic between lab members: iperf3 runs and interface counters (demo, bench, tests)."""

from __future__ import annotations

import json
import subprocess
import time
from typing import Sequence

from .lab import exec_argv, exec_in


class TrafficError(RuntimeError):
    pass


def _listening(server: str, port: int = 5201) -> bool:
    res = exec_in(server, ["ss", "-Hltn", f"sport = :{port}"])
    return res.returncode == 0 and bool(res.stdout.strip())


def iperf3(server: str, client: str, server_ip: str, seconds: float = 3, args: Sequence[str] = ()) -> dict:
    """One iperf3 run from ``client`` to a one-shot server in ``server``; the client's JSON report.

    iperf3 -J exits 0 even when it could not connect, so the report's "error" is what counts.
    """
    srv = subprocess.Popen(exec_argv(server, ["iperf3", "-s", "-1", "-B", server_ip]),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 5
        while not _listening(server) and time.monotonic() < deadline:
            if srv.poll() is not None:
                raise TrafficError(f"iperf3 server in {server} exited with {srv.returncode}")
            time.sleep(0.05)
        res = exec_in(client, ["iperf3", "-J", "-c", server_ip, "-t", str(seconds), *args], timeout=seconds + 30)
        try:
            out = json.loads(res.stdout)
        except ValueError:
            out = {"error": (res.stdout + res.stderr)[-400:] or f"exit {res.returncode}"}
        if "error" in out:
            raise TrafficError(f"iperf3 {client} -> {server_ip}: {out['error']}")
        return out
    finally:
        try:
            srv.wait(timeout=10)
        except subprocess.TimeoutExpired:
            srv.kill()
            srv.wait()


def rx_packets(netns: str, dev: str = "eth0") -> int:
    return int(exec_in(netns, ["cat", f"/sys/class/net/{dev}/statistics/rx_packets"]).stdout)
