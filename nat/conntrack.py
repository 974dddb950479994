"""The connection tracking table (nf_conntrack), as plain tuples and one dict.

A tuple is ``(proto, src, sport, dst, dport)`` with host-order ints; for ICMP
echo the identifier stands in both ports' place as the kernel's ICMP tuple
keys on it (``(1, src, id, dst, 0)``), so a request and its reply invert
into each other. Each connection is stored under its original tuple and its
reply tuple (what replies look like after NAT), so one lookup finds it and
the direction.

Expiry does not scan the table: a heap holds (deadline, seq, conn) and is
only popped at its head; an entry whose connection was refreshed since is
pushed again with the new deadline (lazy), so a packet costs no heap work.

The table is bounded (``max_entries``, kube-proxy's 131072 by default): a
new connection beyond it is refused and counted; established ones are
untouched, as nf_conntrack drops new packets when the table is full and
early_drop finds nothing unassured to evict (vswitch does not early-drop).
"""

from __future__ import annotations

import heapq
from typing import Callable, Dict, Iterable, List, Optional, Tuple

from router.ipv4 import PROTO_ICMP, PROTO_TCP, PROTO_UDP, ip_str

ORIGINAL, REPLY = 0, 1
PROTO_NAMES = {PROTO_TCP: "tcp", PROTO_UDP: "udp", PROTO_ICMP: "icmp"}
DEFAULT_MAX = 131072  # kube-proxy: max(32768 * CPUs, 131072) on a small node


def invert(t: tuple) -> tuple:
    return (t[0], t[3], t[4], t[1], t[2])


class Conn:
    """One tracked connection. ``orig``/``reply`` as in `conntrack -L`."""

    __slots__ = ("orig", "reply", "state", "expires", "timeout", "created", "seen_reply", "assured",
                 "service", "endpoint", "masq", "packets", "bytes", "dead", "simopen", "mark")

    def __init__(self, orig: tuple, reply: tuple, now: float) -> None:
        self.orig = orig
        self.reply = reply
        self.state: Optional[str] = None  # TCP state name; None for UDP/ICMP
        self.expires = now
        self.timeout = 0.0
        self.created = now
        self.seen_reply = False
        self.assured = False
        self.service: Optional[str] = None  # "ns/name:port" for Service traffic (show, stale-UDP cleanup)
        self.endpoint: Optional[tuple] = None  # (ip, port) chosen by DNAT
        self.masq = False
        self.packets = [0, 0]
        self.bytes = [0, 0]
        self.dead = False
        self.simopen = False  # went through SYN_SENT2 (tcpstate.next_state needs it)
        self.mark = False  # KUBE-MARK-MASQ: masquerade when confirmed

    @property
    def dnat(self) -> bool:
        return self.orig[3] != self.reply[1] or self.orig[4] != self.reply[2]

    @property
    def snat(self) -> bool:
        return self.orig[1] != self.reply[3] or self.orig[2] != self.reply[4]

    def target(self, direction: int) -> tuple:
        """What a packet of this direction must look like after NAT: the other direction inverted."""
        return invert(self.reply if direction == ORIGINAL else self.orig)

    def dst_rewrite(self, d: int):
        """(ip, port) a packet of direction ``d`` gets as destination before routing, or None."""
        if self.dnat if d == ORIGINAL else self.snat:
            t = self.target(d)
            return t[3], t[4]
        return None

    def src_rewrite(self, d: int):
        """(ip, port) a packet of direction ``d`` gets as source after routing, or None."""
        if self.snat if d == ORIGINAL else self.dnat:
            t = self.target(d)
            return t[1], t[2]
        return None

    def refresh(self, now: float, timeout: float) -> None:
        self.timeout = timeout
        self.expires = now + timeout

    def row(self, now: float) -> dict:
        def side(t):
            d = {"src": ip_str(t[1]), "dst": ip_str(t[3])}
            if t[0] == PROTO_ICMP:
                d["id"] = t[2]
            else:
                d["sport"], d["dport"] = t[2], t[4]
            return d
        flags = []
        if not self.seen_reply:
            flags.append("UNREPLIED")
        if self.assured:
            flags.append("ASSURED")
        return {"proto": PROTO_NAMES.get(self.orig[0], str(self.orig[0])), "state": self.state,
                "timeout": max(0, int(self.expires - now + 0.999)), "orig": side(self.orig),
                "reply": side(self.reply), "flags": flags, "service": self.service,
                "endpoint": None if self.endpoint is None else f"{ip_str(self.endpoint[0])}:{self.endpoint[1]}",
                "masquerade": self.masq, "packets": list(self.packets), "bytes": list(self.bytes)}


class Conntrack:
    def __init__(self, clock: Callable[[], float], max_entries: int = DEFAULT_MAX) -> None:
        if max_entries < 1:
            raise ValueError("conntrack max_entries must be >= 1")
        self.clock = clock
        self.max_entries = max_entries
        self.table: Dict[tuple, Tuple[Conn, int]] = {}
        self._heap: List[tuple] = []
        self._seq = 0
        self.count = 0
        self.endpoint_conns: Dict[tuple, int] = {}  # (ip, port, proto) -> live connections (lc scheduler)
        # counters, as `conntrack -S` names them where they exist
        self.inserted = self.dropped_full = self.clashes = self.expired = self.deleted = 0
        self.invalid = 0

    def __len__(self) -> int:
        return self.count

    def lookup(self, t: tuple) -> Tuple[Optional[Conn], int]:
        hit = self.table.get(t)
        if hit is None:
            return None, ORIGINAL
        return hit

    def add(self, conn: Conn) -> Optional[str]:
        """Confirm a new connection; returns None, or why it was refused ("full", "clash")."""
        if self.count >= self.max_entries:
            self.dropped_full += 1
            return "full"
        if conn.orig in self.table or conn.reply in self.table:
            self.clashes += 1
            return "clash"
        self.table[conn.orig] = (conn, ORIGINAL)
        self.table[conn.reply] = (conn, REPLY)
        self.count += 1
        self.inserted += 1
        if conn.endpoint is not None:
            k = (conn.endpoint[0], conn.endpoint[1], conn.orig[0])
            self.endpoint_conns[k] = self.endpoint_conns.get(k, 0) + 1
        self._seq += 1
        heapq.heappush(self._heap, (conn.expires, self._seq, conn))
        return None

    def remove(self, conn: Conn) -> None:
        if conn.dead:
            return
        conn.dead = True
        self.table.pop(conn.orig, None)
        self.table.pop(conn.reply, None)
        self.count -= 1
        if conn.endpoint is not None:
            k = (conn.endpoint[0], conn.endpoint[1], conn.orig[0])
            n = self.endpoint_conns.get(k, 0) - 1
            if n > 0:
                self.endpoint_conns[k] = n
            else:
                self.endpoint_conns.pop(k, None)

    def expire(self, now: Optional[float] = None) -> int:
        """Remove connections whose timeout has run out; returns how many."""
        now = self.clock() if now is None else now
        heap, n = self._heap, 0
        while heap and heap[0][0] <= now:
            _, _, conn = heapq.heappop(heap)
            if conn.dead:
                continue
            if conn.expires > now:  # refreshed since it was pushed
                self._seq += 1
                heapq.heappush(heap, (conn.expires, self._seq, conn))
                continue
            self.remove(conn)
            self.expired += 1
            n += 1
        if len(heap) > 2 * self.count + 64:  # dead entries pile up after mass deletes
            self._heap = [e for e in heap if not e[2].dead]
            heapq.heapify(self._heap)
        return n

    def delete_where(self, pred: Callable[[Conn], bool]) -> int:
        dead = [c for c, d in self.table.values() if d == ORIGINAL and pred(c)]
        for c in dead:
            self.remove(c)
        self.deleted += len(dead)
        return len(dead)

    def conns(self) -> Iterable[Conn]:
        return (c for c, d in self.table.values() if d == ORIGINAL)

    def rows(self, now: Optional[float] = None) -> list:
        now = self.clock() if now is None else now
        rows = [c.row(now) for c in self.conns() if c.expires > now]
        rows.sort(key=lambda r: (r["proto"], r["orig"]["src"], r["orig"]["dst"], r["orig"].get("sport", 0)))
        return rows

    def counters(self) -> dict:
        return {"entries": self.count, "max": self.max_entries, "inserted": self.inserted,
                "dropped_full": self.dropped_full, "clashes": self.clashes, "expired": self.expired,
                "deleted": self.deleted, "invalid": self.invalid}
