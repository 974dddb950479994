"""Live capture sessions: every stage a packet passes, as records for pcapng.

While a session is open the node runs every received frame traced (the
flow cache is bypassed, so established flows are seen too) and snapshots
the frame after each stage. A session keeps the packets that pass its
tcpdump-style filter (on the frame as received) and touch one of its ports
(in or out), and queues one record per stage it asked for, on the port the
packet is on there (the ingress port, the egress ports at port-tx). Sessions
are bounded in packets, time and queued records, and end by themselves; the
client drains them with ``read``.
"""

from __future__ import annotations

import time
from itertools import count
from typing import Iterable, Optional

MAX_COUNT = 1_000_000
MAX_DURATION = 3600.0
MAX_QUEUED = 50_000  # records held for a client that reads too slowly; beyond: counted as lost
GRACE = 30.0  # a finished session nobody reads is forgotten after this long

_ids = count(1)


class Capture:
    def __init__(self, *, stages: Iterable[str], ports: Iterable[str] = (), expr: Optional[str] = None,
                 count: int = 100, duration: float = 10.0, now: float = 0.0) -> None:
        if not 1 <= count <= MAX_COUNT:
            raise ValueError(f"count must be in [1, {MAX_COUNT}], got {count}")
        if not 0 < duration <= MAX_DURATION:
            raise ValueError(f"duration must be in (0, {MAX_DURATION:g}] seconds, got {duration}")
        self.id = next(_ids)
        self.stages = frozenset(stages)
        self.ports = frozenset(ports)
        self.expr = expr or ""
        self.filter = None
        if expr:
            from .bpf import compile as compile_filter
            self.filter = compile_filter(expr)
        self.count, self.deadline = count, now + duration
        self.packets = self.lost = 0
        self.records: list = []
        self.done = False
        # pipeline timestamps are monotonic; files want wall-clock time
        self.wall_offset = time.time() - time.monotonic()

    def wants(self, frame, now: float) -> bool:
        if now >= self.deadline:
            self.done = True
        return not self.done and (self.filter is None or self.filter.match(frame))

    def offer(self, pkt, snaps: list) -> None:
        """Keep ``pkt`` (traced; ``snaps[i]`` is (its frame, the port it is on) after step i) if it
        touches our ports."""
        steps = pkt.trace
        if self.ports:
            seen = {snaps[0][1]} if snaps else set()
            for s in steps:
                if s["stage"] == "port-tx":
                    seen.update(s["record"].get("ports", ()))
            if not seen & self.ports:
                return
        ts = int((pkt.ts + self.wall_offset) * 1e9)
        for step, (frame, in_name) in zip(steps, snaps):
            stage = step["stage"]
            if stage not in self.stages:
                continue
            if stage == "port-tx":
                outs, direction = step["record"].get("ports", ()), "out"
            else:
                outs, direction = (in_name,), "in"
            for port in outs:
                if len(self.records) >= MAX_QUEUED:
                    self.lost += 1
                    continue
                self.records.append({"id": pkt.id, "ts": ts, "stage": stage, "port": port, "dir": direction,
                                     "verdict": step["text"], "frame": frame})
        self.packets += 1
        if self.packets >= self.count:
            self.done = True

    def read(self, now: float) -> dict:
        if now >= self.deadline:
            self.done = True
        out, self.records = self.records, []
        return {"records": out, "done": self.done and not self.records, "packets": self.packets, "lost": self.lost}

    def stale(self, now: float) -> bool:
        return now >= self.deadline + GRACE
