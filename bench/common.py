"""Shared pieces of the benchmarks: sandbox entry, iperf3 runs, result tables.

Every benchmark runs inside its own `vswitch sandbox` (re-executing itself
there when started outside), so its namespaces vanish when it ends. Traffic
only flows between the lab's own namespaces, and every load run is bounded
by iperf3's -t.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import List, Optional

from vswitch.lab.traffic import iperf3, rx_packets
from vswitch.sandbox import enter, in_sandbox

SMALL_PAYLOAD = 18  # 14 Ethernet + 20 IP + 8 UDP + 18 = 60 bytes on the wire (64 with the FCS)


def ensure_sandbox(script: str) -> None:
    """Re-run this script inside a fresh sandbox unless already in one."""
    if not in_sandbox():
        sys.exit(enter([sys.executable, script] + sys.argv[1:]))


def tcp_gbps(server: str, client: str, server_ip: str, seconds: float) -> float:
    """Single-stream TCP throughput received by the server, Gbit/s."""
    out = iperf3(server, client, server_ip, seconds)
    return out["end"]["sum_received"]["bits_per_second"] / 1e9


def udp_small_pps(server: str, client: str, server_ip: str, seconds: float) -> dict:
    """64-byte UDP frames as fast as iperf3 sends them; packets/s delivered to the server pod's eth0."""
    before = rx_packets(server)
    t0 = time.monotonic()
    out = iperf3(server, client, server_ip, seconds, ["-u", "-b", "0", "-l", str(SMALL_PAYLOAD)])
    elapsed = time.monotonic() - t0
    delivered = rx_packets(server) - before
    s = out["end"]["sum"]
    dur = s.get("seconds") or seconds
    return {"delivered_pps": delivered / dur, "sent_pps": s["packets"] / dur,
            "app_pps": (s["packets"] - s["lost_packets"]) / dur, "elapsed": elapsed}


def table(rows: List[List[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def save(path: Optional[str], result: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
        print(f"results written to {os.path.abspath(path)}")
