"""The bridge forwarding database (MAC -> port), as net/bridge/br_fdb.c keeps it.

- Learning: a frame *from* a MAC creates or refreshes its entry and moves it
  to the ingress port (br_fdb_update). Lookups never refresh.
- Ageing: an entry not refreshed for ``ageing`` seconds (``updated + ageing <= now``,
  has_expired() in br_fdb.c) (300 by default,
  BR_DEFAULT_AGEING_TIME) is gone: lookups treat it as missing at once, and
  ``expire`` reclaims the memory on a periodic sweep, as br_fdb_cleanup does.
- Bound: at most ``max_learned`` learned entries (the kernel's
  fdb_max_learned; 0 there means unlimited, here it defaults to 8192) so a
  MAC-flooding sender cannot grow memory; frames from further MACs are still
  forwarded, just not learned, and counted in ``overflow``.
- Static entries never age and are never moved by learning (the kernel's
  ``static sticky``): they pin a MAC to a port.

Time is passed in by the caller (monotonic seconds), so tests drive ageing
with an injected clock and the fast path reads the clock once per batch.
"""

from __future__ import annotations

from typing import Dict, Optional

from .packet import mac_str

DEFAULT_AGEING = 300.0
DEFAULT_MAX_LEARNED = 8192


class FdbEntry:
    __slots__ = ("mac", "port", "updated", "static")

    def __init__(self, mac: bytes, port, updated: float, static: bool = False) -> None:
        self.mac = mac
        self.port = port
        self.updated = updated
        self.static = static


# Outcomes of Fdb.learn (also what the l2-learn trace prints).
NEW, REFRESH, MOVE, STATIC, FULL = "new", "refresh", "move", "static", "full"


class Fdb:
    def __init__(self, ageing: float = DEFAULT_AGEING, max_learned: int = DEFAULT_MAX_LEARNED) -> None:
        if ageing <= 0:
            raise ValueError("fdb ageing must be > 0 seconds")
        if max_learned < 1:
            raise ValueError("fdb max_learned must be >= 1")
        self.ageing = float(ageing)
        self.max_learned = int(max_learned)
        self.table: Dict[bytes, FdbEntry] = {}
        self.learned = 0  # dynamic entries present
        self.overflow = 0
        self.moves = 0
        self.aged = 0
        self.generation = 0  # bumped whenever a MAC appears, moves or goes (flow cache guard)

    # --- fast path ----------------------------------------------------------
    def learn(self, mac: bytes, port, now: float) -> str:
        e = self.table.get(mac)
        if e is not None:
            if e.static:
                return STATIC
            if now - e.updated >= self.ageing:  # expired but not yet swept: a new learn
                e.port, e.updated = port, now
                self.generation += 1
                return NEW
            if e.port is port:
                e.updated = now
                return REFRESH
            e.port, e.updated = port, now
            self.moves += 1
            self.generation += 1
            return MOVE
        if self.learned >= self.max_learned:
            self.overflow += 1
            return FULL
        self.table[mac] = FdbEntry(mac, port, now)
        self.learned += 1
        self.generation += 1
        return NEW

    def lookup(self, mac: bytes, now: float):
        e = self.table.get(mac)
        if e is None:
            return None
        if not e.static and now - e.updated >= self.ageing:
            return None
        return e.port

    # --- control ------------------------------------------------------------
    def expire(self, now: float) -> int:
        """Remove dynamic entries older than the ageing time; returns how many."""
        dead = [m for m, e in self.table.items() if not e.static and now - e.updated >= self.ageing]
        for m in dead:
            del self.table[m]
        self.learned -= len(dead)
        self.aged += len(dead)
        if dead:
            self.generation += 1
        return len(dead)

    def add_static(self, mac: bytes, port) -> None:
        old = self.table.get(mac)
        if old is not None and not old.static:
            self.learned -= 1
        self.table[mac] = FdbEntry(mac, port, 0.0, static=True)
        self.generation += 1

    def delete(self, mac: bytes) -> bool:
        e = self.table.pop(mac, None)
        if e is None:
            return False
        if not e.static:
            self.learned -= 1
        self.generation += 1
        return True

    def flush(self, port=None, include_static: bool = False) -> int:
        """Remove dynamic entries (of one port if given); static ones only if asked."""
        dead = [m for m, e in self.table.items()
                if (port is None or e.port is port) and (include_static or not e.static)]
        for m in dead:
            self.delete(m)
        return len(dead)

    def get(self, mac: bytes) -> Optional[FdbEntry]:
        return self.table.get(mac)

    def __len__(self) -> int:
        return len(self.table)

    def rows(self, now: float) -> list:
        """Live entries as dicts, ordered by port then MAC (for `show fdb`)."""
        out = []
        for e in self.table.values():
            age = None if e.static else now - e.updated
            if age is not None and age >= self.ageing:
                continue
            out.append({"mac": mac_str(e.mac), "port": e.port.name, "static": e.static,
                        "age": None if age is None else round(age, 1)})
        out.sort(key=lambda r: (r["port"], r["mac"]))
        return out
