"""The neighbour (ARP) table, as net/core/neighbour.c and net/ipv4/arp.c keep it.

Pure logic: no sockets, no scapy, no clock reads except through the injected
``clock``. Every method *decides* and returns a list of actions; the caller
(the router's ARP/output stages) performs them:

    ("request", dev, target_ip, dst_mac_or_None)  send an ARP request for target_ip
                                                  (None = broadcast; a MAC = unicast probe)
    ("send", dev, mac, item)                      a queued item can now go to mac (queue order)
    ("unreachable", item)                         resolution failed: ICMP 3/1 for item
    ("dropped", item)                             item discarded (queue overflow or table full)

Entries are keyed by (dev, ip); ``ip`` is an int (host order), ``dev`` a name.
Building the request/reply frames (kernel-dataplane-spec.md items 15 and 16,
including spa = source of the triggering packet, ``Neighbour.queue[-1]`` as
neigh_probe() uses the queue tail) and sending the ICMP errors (item 8) stay
with the caller.

States (include/net/neighbour.h): INCOMPLETE, REACHABLE, STALE, DELAY, PROBE,
FAILED, PERMANENT. "Valid" (NUD_VALID) = REACHABLE, STALE, DELAY, PROBE,
PERMANENT: only those have a MAC (``Neighbour.mac`` is None otherwise) and only
those show ``lladdr`` in ``ip neigh``.

Rules and where they come from
------------------------------
Defaults (arp.c arp_tbl): base_reachable_time 30 s, delay_first_probe_time 5 s,
retrans_time 1 s, mcast_solicit 3, ucast_solicit 3, app_solicit 0,
mcast_resolicit 0, gc_stale_time 60 s, locktime 1 s, gc_thresh3 1024.

Sending (neighbour.c neigh_event_send / __neigh_event_send), ``resolve``:
  - REACHABLE, PERMANENT, DELAY, PROBE: send now with the known MAC.
  - STALE: send now with the stale MAC *and* move to DELAY for
    delay_first_probe (the "neigh is delayed" branch).
  - no entry, or FAILED: (re)start resolution: INCOMPLETE, probes reset, a
    broadcast request at once (immediate_probe -> neigh_probe), retransmit timer
    retrans later, the packet queued. A new packet to a FAILED neighbour thus
    always restarts resolution, as in the kernel (FAILED is not "negative
    caching").
  - INCOMPLETE: queue the packet, no extra request. The queue is bounded; when
    full the OLDEST packet is dropped (__skb_dequeue of the head, stat
    unres_discards) and the new one appended at the tail.

Timers (neighbour.c neigh_timer_handler), ``tick``:
  - INCOMPLETE: a broadcast request every retrans; after mcast_solicit requests
    with no answer -> FAILED. (The kernel starts ``probes`` at ucast_solicit and
    stops at ucast+app+mcast, i.e. mcast_solicit broadcasts: arp_solicit only
    unicasts while probes < ucast_solicit.) So by default: requests at t=0, 1,
    2 s, FAILED at t=3 s.
  - FAILED (neigh_invalidate): every queued packet, head first, gets
    error_report -> arp_error_report -> ICMP host unreachable; the queue is
    emptied.
  - REACHABLE: still reachable while now < confirmed + reachable_time (the
    timer re-arms at confirmed + reachable_time, so confirmations extend it);
    then STALE. reachable_time = neigh_rand_reach_time(base): uniform in
    [base/2, 3*base/2).
  - DELAY: at the end of delay_first_probe, if the entry was confirmed during
    the delay (confirmed + delay_first_probe >= now) -> REACHABLE with no probe;
    otherwise -> PROBE with probes = 0.
  - PROBE: a request every retrans, unicast to the known MAC while probes <
    ucast_solicit, then mcast_reprobes broadcasts (default 0); after
    ucast_solicit + mcast_reprobes without an answer -> FAILED. By default:
    DELAY at t, unicast probes at t+5, t+6, t+7 s, FAILED at t+8 s.
  - Timer floors: retransmit timers are never shorter than 10 ms (HZ/100), and
    a timer handler never re-arms closer than 10 ms ahead, so one ``tick``
    always terminates.

ARP input (arp.c arp_process + neighbour.c neigh_event_ns / __neigh_update),
``on_arp``:
  - sender 0.0.0.0 (RFC 2131 DAD probe), multicast, 255.255.255.255, 0/8 or
    127/8: never enters the table (the DAD special case; martian sources fail
    ip_route_input_noref).
  - a request for one of our addresses (for_us): neigh_event_ns creates the
    sender's entry if missing and updates it to STALE with OVERRIDE. If it was
    valid with the same MAC its state is left alone (__neigh_update: "if entry
    was valid and address is not changed, do not change entry state, if new
    one is STALE"), so a REACHABLE/DELAY/PROBE entry keeps its state; a
    different MAC is replaced (STALE). The caller sends the reply.
  - anything else (replies, requests not for us, gratuitous ARP) only updates an
    EXISTING entry (arp_accept = 0: unsolicited ARP never creates one):
      new state REACHABLE for a reply, STALE for a request or a gratuitous ARP
      ("broadcast replies and request packets do not assert reachability");
      override = gratuitous or now > updated + locktime: a different MAC
      inside locktime of the last change is ignored (first reply wins);
      a same-MAC STALE update leaves a valid entry's state alone.
  - an update that makes an invalid entry (INCOMPLETE/FAILED) valid flushes its
    queue in order as ("send", ...) actions.
  - entering REACHABLE sets confirmed = now; a MAC change into a non-REACHABLE
    state sets confirmed = now - 2*base (unconfirmed).
  - PERMANENT entries are never changed by ARP (only by the admin calls).

Upper-layer confirmation (neigh_confirm / dst_confirm_neigh), ``confirm``:
only sets ``confirmed = now``; it changes no state by itself. Its effect is
through the timers: a REACHABLE entry's expiry is pushed out, and a DELAY
entry becomes REACHABLE without probing when its delay ends. (Confirming a
STALE entry leaves it STALE, as in the kernel.)

Admin (neigh_add / neigh_delete with NEIGH_UPDATE_F_ADMIN):
``add_permanent`` makes the entry PERMANENT (an INCOMPLETE entry's queue is
sent); ``delete`` and ``flush`` remove entries; an INCOMPLETE or PROBE entry's
queued packets get ("unreachable", item) as neigh_delete -> neigh_invalidate
does.

Garbage collection (neigh_periodic_work, neigh_forced_gc), ``tick``:
STALE and FAILED entries are removed once unused for gc_stale_time
(now >= max(used, updated) + gc_stale). Entries in timer states and PERMANENT
entries are never collected. At most ``max_entries`` non-permanent entries
(gc_thresh3): creating one more first runs a forced GC (FAILED entries, and
STALE entries not updated in the last 5 s, down to max_entries/2); if that
frees nothing the packet is ("dropped", ...) and ``table_overflow`` counted
("neighbor table overflow!"); a request for us then creates no entry.

Deliberate simplifications
--------------------------
  - Queue bound in packets (queue_len, default 101), not bytes: the kernel
    bounds unres_qlen_bytes (SK_WMEM_MAX = 212992); unres_qlen = 101 is that
    limit expressed in full-size Ethernet skbs, which is what sysctl shows.
  - reachable_time is drawn per entry each time it becomes REACHABLE; the
    kernel draws one value per device (neigh_parms) and re-draws every 300 s.
    Same distribution, [base/2, 3*base/2).
  - REACHABLE always expires to STALE. The kernel goes to DELAY instead if
    ``used`` is within delay_first_probe; its ``used`` is only refreshed on the
    slow output path (not for a CONNECTED entry's cached header), so in practice
    that is the idle case anyway, and the next packet moves STALE to DELAY.
  - The REACHABLE boundary is strict (stale at exactly confirmed +
    reachable_time); the kernel's time_before_eq keeps it one more >= 10 ms.
  - Whether a reply was broadcast is not passed in: a reply counts as unicast
    (REACHABLE) unless it is gratuitous (STALE).
  - GC: no gc_thresh1 (the kernel skips periodic GC below 128 entries, so small
    tables keep STALE entries forever), no 15 s GC period (exact deadlines
    instead), and FAILED entries also wait gc_stale_time (the kernel frees them
    on its next pass). No gc_thresh2 / 5-s-since-last-flush trigger.
  - ``probes`` counts the requests sent in the current INCOMPLETE or PROBE
    phase (the kernel's INCOMPLETE counter starts at ucast_solicit).
  - No app_solicit (arpd), proxy ARP, NOARP devices, or arp_accept=1.
"""

from __future__ import annotations

import heapq
import random
import time
from collections import deque
from typing import Callable, Dict, List, Optional, Tuple

INCOMPLETE, REACHABLE, STALE, DELAY, PROBE, FAILED, PERMANENT = (
    "INCOMPLETE", "REACHABLE", "STALE", "DELAY", "PROBE", "FAILED", "PERMANENT")
STATES = (INCOMPLETE, REACHABLE, STALE, DELAY, PROBE, FAILED, PERMANENT)

VALID = frozenset((REACHABLE, STALE, DELAY, PROBE, PERMANENT))  # NUD_VALID
SEND_NOW = frozenset((REACHABLE, PERMANENT, DELAY, PROBE))  # NUD_CONNECTED | DELAY | PROBE
_GC_STATES = frozenset((STALE, FAILED))  # not NUD_IN_TIMER, not PERMANENT

MIN_TIMER = 0.01  # HZ/100
LOCKTIME = 1.0
GC_STALE = 60.0
MAX_ENTRIES = 1024  # gc_thresh3
FORCED_GC_FRESH = 5.0  # neigh_forced_gc keeps entries updated in the last 5 s

Action = tuple


class Neighbour:
    __slots__ = ("ip", "dev", "mac", "state", "updated", "confirmed", "used", "probes",
                 "queue", "next_timer", "reachable_time", "version")

    def __init__(self, dev: str, ip: int, now: float, base_reachable: float) -> None:
        self.ip = ip
        self.dev = dev
        self.mac: Optional[bytes] = None
        self.state = INCOMPLETE
        self.updated = now
        self.used = now
        self.confirmed = now - 2 * base_reachable  # ___neigh_create: not confirmed
        self.probes = 0
        self.queue: deque = deque()
        self.next_timer: Optional[float] = None
        self.reachable_time = base_reachable
        self.version = 0  # matches the heap item of the armed timer

    def __repr__(self) -> str:
        mac = self.mac.hex(":") if self.mac else None
        return f"Neighbour({ip_str(self.ip)} dev {self.dev} {mac} {self.state})"


def ip_str(ip: int) -> str:
    return f"{(ip >> 24) & 255}.{(ip >> 16) & 255}.{(ip >> 8) & 255}.{ip & 255}"


def _martian_sender(ip: int) -> bool:
    first = ip >> 24
    return first == 0 or first == 127 or 224 <= first <= 239 or ip == 0xFFFFFFFF


def format_row(row: dict) -> str:
    """One ``ip neigh`` line: '10.244.1.5 dev pods lladdr 02:00:00:00:00:05 REACHABLE'."""
    out = f"{row['ip']} dev {row['dev']}"
    if row.get("lladdr"):
        out += f" lladdr {row['lladdr']}"
    return f"{out} {row['state']}"


class NeighTable:
    def __init__(self, clock: Callable[[], float] = time.monotonic, *, base_reachable: float = 30.0,
                 delay_first_probe: float = 5.0, retrans: float = 1.0, mcast_solicit: int = 3,
                 ucast_solicit: int = 3, queue_len: int = 101, rng: Optional[random.Random] = None,
                 gc_stale: float = GC_STALE, locktime: float = LOCKTIME, mcast_reprobes: int = 0,
                 max_entries: int = MAX_ENTRIES) -> None:
        if base_reachable <= 0 or delay_first_probe < 0 or retrans < 0 or gc_stale < 0 or locktime < 0:
            raise ValueError("neighbour timers must be >= 0 (base_reachable > 0)")
        if mcast_solicit < 1:
            raise ValueError("mcast_solicit must be >= 1 (nothing could ever resolve)")
        if ucast_solicit < 0 or mcast_reprobes < 0:
            raise ValueError("ucast_solicit and mcast_reprobes must be >= 0")
        if queue_len < 1:
            raise ValueError("queue_len must be >= 1")
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self.clock = clock
        self.base_reachable = float(base_reachable)
        self.delay_first_probe = float(delay_first_probe)
        self.retrans = max(float(retrans), MIN_TIMER)
        self.mcast_solicit = int(mcast_solicit)
        self.ucast_solicit = int(ucast_solicit)
        self.mcast_reprobes = int(mcast_reprobes)
        self.queue_len = int(queue_len)
        self.gc_stale = float(gc_stale)
        self.locktime = float(locktime)
        self.max_entries = int(max_entries)
        self.rng = rng if rng is not None else random.Random()
        self.table: Dict[Tuple[str, int], Neighbour] = {}
        self._heap: List[Tuple[float, int, str, int]] = []  # (deadline, ip, dev, version)
        self._seq = 0
        self._dynamic = 0  # non-permanent entries (the kernel's gc_entries)
        self._forced_gc_idle_at: Optional[float] = None  # last forced GC that freed nothing
        # counters
        self.requests_sent = 0
        self.replies_seen = 0
        self.failed = 0  # resolutions that ended FAILED (res_failed)
        self.queue_dropped = 0  # unres_discards
        self.unreachable = 0  # queued items handed back as ("unreachable", item)
        self.table_overflow = 0  # table_fulls
        self.gc_removed = 0
        self.arp_ignored = 0  # ARP about a sender we hold no entry for (arp_accept 0)

    # --- helpers --------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.table)

    def get(self, dev: str, ip: int) -> Optional[Neighbour]:
        return self.table.get((dev, ip))

    def counters(self) -> dict:
        return {k: getattr(self, k) for k in (
            "requests_sent", "replies_seen", "failed", "queue_dropped", "unreachable",
            "table_overflow", "gc_removed", "arp_ignored")}

    def _arm(self, n: Neighbour, when: Optional[float]) -> None:
        """(Re)arm or cancel n's single timer; older heap items become stale by version."""
        self._seq += 1
        n.version = self._seq
        n.next_timer = when
        if when is not None:
            heapq.heappush(self._heap, (when, n.ip, n.dev, self._seq))
            if len(self._heap) > 4 * len(self.table) + 64:
                self._compact()

    def _compact(self) -> None:
        self._heap = [(n.next_timer, n.ip, n.dev, n.version) for n in self.table.values()
                      if n.next_timer is not None]
        heapq.heapify(self._heap)

    def _arm_gc(self, n: Neighbour) -> None:
        self._arm(n, max(n.used, n.updated) + self.gc_stale)

    def _request(self, n: Neighbour, dst: Optional[bytes]) -> Action:
        n.probes += 1
        self.requests_sent += 1
        return ("request", n.dev, n.ip, dst)

    def _enter_reachable(self, n: Neighbour, now: float) -> None:
        n.state = REACHABLE
        n.reachable_time = self.base_reachable / 2 + self.rng.random() * self.base_reachable
        self._arm(n, n.confirmed + n.reachable_time)

    def _fail(self, n: Neighbour, now: float, out: list) -> None:
        """neigh_invalidate: FAILED, queued packets reported unreachable head first."""
        n.state = FAILED
        n.mac = None
        n.updated = now
        self.failed += 1
        self._drain_unreachable(n, out)
        self._arm_gc(n)

    def _drain_unreachable(self, n: Neighbour, out: list) -> None:
        q = n.queue
        while q:
            out.append(("unreachable", q.popleft()))
            self.unreachable += 1

    def _start_resolution(self, n: Neighbour, now: float) -> Action:
        n.state = INCOMPLETE
        n.mac = None
        n.probes = 0
        n.updated = now
        self._arm(n, now + self.retrans)
        return self._request(n, None)

    def _remove(self, n: Neighbour) -> None:
        del self.table[(n.dev, n.ip)]
        if n.state != PERMANENT:
            self._dynamic -= 1
        n.next_timer = None
        n.version = -1

    def _create(self, dev: str, ip: int, now: float) -> Optional[Neighbour]:
        if self._dynamic >= self.max_entries and not self._forced_gc(now):
            self.table_overflow += 1
            return None
        n = Neighbour(dev, ip, now, self.base_reachable)
        self.table[(dev, ip)] = n
        self._dynamic += 1
        return n

    def _forced_gc(self, now: float) -> int:
        """neigh_forced_gc: drop FAILED entries and STALE ones not updated for 5 s."""
        if self._forced_gc_idle_at is not None and now - self._forced_gc_idle_at < 1.0:
            return 0  # nothing was collectable a moment ago: do not rescan on every packet
        max_clean = self._dynamic - self.max_entries // 2
        shrunk = 0
        for n in list(self.table.values()):
            if n.state == FAILED or (n.state == STALE and now - n.updated > FORCED_GC_FRESH):
                self._remove(n)
                shrunk += 1
                if shrunk >= max_clean:
                    break
        self.gc_removed += shrunk
        self._forced_gc_idle_at = None if shrunk else now
        return shrunk

    # --- output path ----------------------------------------------------------
    def resolve(self, dev: str, ip: int, item) -> Tuple[Optional[bytes], list]:
        """A packet (``item``, opaque) wants to go to ``ip`` out of ``dev``.

        Returns (mac, actions): mac not None means send ``item`` to it now (the
        table keeps no reference to it); None means the table took the item
        (queued, or handed back in ``actions`` as dropped).
        """
        n = self.table.get((dev, ip))
        now = self.clock()
        if n is not None:
            n.used = now
            state = n.state
            if state in SEND_NOW:
                return n.mac, []
            if state == STALE:
                n.state = DELAY
                n.updated = now
                self._arm(n, now + self.delay_first_probe)
                return n.mac, []
            actions: list = []
            if state == FAILED:
                actions.append(self._start_resolution(n, now))
                n.queue.append(item)
                return None, actions
            # INCOMPLETE
            q = n.queue
            if len(q) >= self.queue_len:
                actions.append(("dropped", q.popleft()))
                self.queue_dropped += 1
            q.append(item)
            return None, actions
        n = self._create(dev, ip, now)
        if n is None:
            return None, [("dropped", item)]
        action = self._start_resolution(n, now)
        n.queue.append(item)
        return None, [action]

    def confirm(self, dev: str, ip: int) -> None:
        """Upper-layer reachability confirmation (neigh_confirm): confirmed = now."""
        n = self.table.get((dev, ip))
        if n is not None and n.state != PERMANENT:
            n.confirmed = self.clock()

    # --- ARP input ------------------------------------------------------------
    def on_arp(self, dev: str, sender_ip: int, sender_mac: bytes, *, is_reply: bool,
               is_gratuitous: bool, for_us: bool) -> list:
        """An ARP packet from (sender_ip, sender_mac) arrived on ``dev``.

        ``for_us``: a request whose target is one of our addresses;
        ``is_gratuitous``: sender ip == target ip.
        """
        if is_reply:
            self.replies_seen += 1
        if _martian_sender(sender_ip) or len(sender_mac) != 6:
            return []
        sender_mac = bytes(sender_mac)
        now = self.clock()
        n = self.table.get((dev, sender_ip))
        if for_us and not is_reply and not is_gratuitous:
            # arp_process -> neigh_event_ns(): create, then STALE with OVERRIDE.
            if n is None:
                n = self._create(dev, sender_ip, now)
                if n is None:
                    return []
            return self._update(n, sender_mac, STALE, True, now)
        if n is None:
            self.arp_ignored += 1  # arp_accept = 0: unsolicited ARP creates nothing
            return []
        override = is_gratuitous or now > n.updated + self.locktime
        new = REACHABLE if is_reply and not is_gratuitous else STALE
        return self._update(n, sender_mac, new, override, now)

    def _update(self, n: Neighbour, mac: bytes, new: str, override: bool, now: float) -> list:
        """__neigh_update() for a supplied lladdr and new in {REACHABLE, STALE}, not ADMIN."""
        old = n.state
        if old == PERMANENT:
            return []
        was_valid = old in VALID
        mac_changed = not (was_valid and n.mac == mac)
        if new == REACHABLE:
            n.confirmed = now
        if was_valid:
            if mac_changed and not override:
                return []  # inside locktime: the first answer wins
            if not mac_changed and new == STALE:
                new = old  # same MAC: a STALE hint never downgrades a valid entry
        if new != old or mac_changed:
            n.updated = now
        if mac_changed:
            n.mac = mac
            if new != REACHABLE:
                n.confirmed = now - 2 * self.base_reachable
        if new == old:
            return []
        if new == REACHABLE:
            self._enter_reachable(n, now)
        else:  # STALE: no state timer, only garbage collection
            n.state = STALE
            self._arm_gc(n)
        if was_valid:
            return []
        out = []
        q = n.queue
        while q:
            out.append(("send", n.dev, n.mac, q.popleft()))
        return out

    # --- timers ---------------------------------------------------------------
    def next_deadline(self) -> Optional[float]:
        """Earliest armed timer (a REACHABLE deadline may turn out to be a re-check)."""
        heap = self._heap
        table = self.table
        while heap:
            deadline, ip, dev, version = heap[0]
            n = table.get((dev, ip))
            if n is not None and n.version == version:
                return deadline
            heapq.heappop(heap)
        return None

    def tick(self) -> list:
        """Run every timer due at clock(); returns the actions, in deadline order."""
        now = self.clock()
        heap = self._heap
        table = self.table
        out: list = []
        while heap and heap[0][0] <= now:
            deadline, ip, dev, version = heapq.heappop(heap)
            n = table.get((dev, ip))
            if n is None or n.version != version:
                continue  # cancelled or re-armed since
            n.next_timer = None
            self._expire(n, now, out)
            if n.next_timer is not None and n.next_timer <= now and (dev, ip) in table:
                self._arm(n, now + MIN_TIMER)  # neigh_timer_handler: next >= now + HZ/100
        return out

    def _expire(self, n: Neighbour, now: float, out: list) -> None:
        state = n.state
        if state == REACHABLE:
            until = n.confirmed + n.reachable_time
            if now < until:
                self._arm(n, until)  # confirmed since the timer was set
            else:
                n.state = STALE
                n.updated = now
                self._arm_gc(n)
            return
        if state == DELAY:
            if now <= n.confirmed + self.delay_first_probe:
                n.updated = now
                self._enter_reachable(n, now)
                return
            n.state = PROBE
            n.updated = now
            n.probes = 0
            state = PROBE
        if state == INCOMPLETE or state == PROBE:
            limit = self.mcast_solicit if state == INCOMPLETE else self.ucast_solicit + self.mcast_reprobes
            if n.probes >= limit:
                self._fail(n, now, out)
                return
            self._arm(n, now + self.retrans)
            unicast = state == PROBE and n.probes < self.ucast_solicit
            out.append(self._request(n, n.mac if unicast else None))
            return
        if state in _GC_STATES:
            due = max(n.used, n.updated) + self.gc_stale
            if now >= due:
                self._remove(n)
                self.gc_removed += 1
            else:
                self._arm(n, due)

    # --- admin ----------------------------------------------------------------
    def add_permanent(self, dev: str, ip: int, mac: bytes) -> list:
        """`ip neigh replace IP lladdr MAC dev DEV nud permanent`; returns queued sends."""
        mac = bytes(mac)
        if len(mac) != 6:
            raise ValueError(f"MAC must be 6 bytes, got {len(mac)}")
        if not 0 <= ip <= 0xFFFFFFFF:
            raise ValueError(f"not an IPv4 address: {ip!r}")
        now = self.clock()
        n = self.table.get((dev, ip))
        if n is None:
            n = Neighbour(dev, ip, now, self.base_reachable)
            self.table[(dev, ip)] = n
        elif n.state != PERMANENT:
            self._dynamic -= 1
        was_valid = n.state in VALID
        n.state = PERMANENT
        n.mac = mac
        n.updated = now
        n.confirmed = now
        n.probes = 0
        self._arm(n, None)
        out = []
        if not was_valid:
            while n.queue:
                out.append(("send", dev, mac, n.queue.popleft()))
        return out

    def delete(self, dev: str, ip: int) -> list:
        """`ip neigh del`: remove the entry; an INCOMPLETE/PROBE entry's queue is unreachable."""
        n = self.table.get((dev, ip))
        if n is None:
            return []
        out: list = []
        if n.state in (INCOMPLETE, PROBE):
            self._drain_unreachable(n, out)
        self._remove(n)
        return out

    def flush(self, dev: Optional[str] = None, *, permanent: bool = False) -> list:
        """`ip neigh flush [dev DEV]`: delete matching entries, PERMANENT ones only if asked."""
        out: list = []
        for key, n in list(self.table.items()):
            if dev is not None and key[0] != dev:
                continue
            if n.state == PERMANENT and not permanent:
                continue
            out.extend(self.delete(*key))
        return out

    # --- show -----------------------------------------------------------------
    def rows(self) -> List[dict]:
        now = self.clock()
        out = []
        for (dev, ip) in sorted(self.table):
            n = self.table[(dev, ip)]
            out.append({
                "ip": ip_str(ip),
                "dev": dev,
                "lladdr": n.mac.hex(":") if n.mac is not None and n.state in VALID else None,
                "state": n.state,
                "probes": n.probes,
                "queued": len(n.queue),
                "age": now - n.updated,
            })
        return out

    format_row = staticmethod(format_row)
