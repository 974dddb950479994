"""`vswitch replay`: a recorded capture through a node config, offline, one verdict per packet.

"What would this new Service config do to yesterday's traffic": the config's
node is built in-process (vswitch.sim), every frame of the file enters the
port it was captured on and the simulator's clock follows the capture's
timestamps, so conntrack and neighbour timers see the same gaps.

Which port a frame enters: ``--in PORT`` for all, else the capture's
interface name when it is a port of the node. Files written by `vswitch
capture` name interfaces ``PORT:STAGE`` and hold each packet once per stage;
replay takes each packet id once, at its first stage.
"""

from __future__ import annotations

from typing import Iterator, Optional

from .pcapng import read_packets
from .sim import SimNode

MAX_GAP = 3600.0  # longer silences in a capture are replayed as one hour (timers only age so far)


def frames(path: str, ports: set, in_port: Optional[str]) -> Iterator[tuple]:
    """(number, ts seconds, port, frame) for each packet to replay."""
    seen_ids = set()
    for n, (ifname, ts_ns, frame, opts) in enumerate(read_packets(path), 1):
        pid = opts.get("packet_id")
        if pid is not None:
            if pid in seen_ids:
                continue
            seen_ids.add(pid)
        port = in_port
        if port is None:
            name = (ifname or "").split(":")[0]
            if name not in ports:
                raise ValueError(f"{path}: frame {n} was captured on {ifname or 'an unnamed interface'!r}, "
                                 f"which is not a port of this node ({', '.join(sorted(ports))}); "
                                 "give --in PORT")
            port = name
        yield n, None if ts_ns is None else ts_ns / 1e9, port, frame  # simple packet blocks have no time


def replay(path: str, sim: SimNode, in_port: Optional[str] = None, trace: bool = True) -> list:
    """Run the file through ``sim``; returns one Result per replayed packet, with ``.number``/``.ts`` set."""
    if in_port is not None:
        sim.node.port(in_port)
    results, last = [], None
    for n, ts, port, frame in frames(path, set(sim.node.ports), in_port):
        if ts is not None:
            if last is not None and ts > last:
                sim.advance(min(ts - last, MAX_GAP))
            last = ts if last is None else max(last, ts)
        res = sim.inject(port, frame, trace=trace)
        res.number, res.ts = n, ts
        results.append(res)
    return results
