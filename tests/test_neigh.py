"""Unit tests for router.neigh.NeighTable (the ARP neighbour table).

Expected behaviour: kernel-dataplane-spec.md section 3 items 15-19 and the
router/neigh.py docstring (net/core/neighbour.c, net/ipv4/arp.c): INCOMPLETE
sends 3 broadcast requests 1 s apart then FAILS with host-unreachable for each
queued packet; REACHABLE lasts [base/2, 3*base/2); using STALE starts DELAY (5 s)
then PROBE (3 unicast requests 1 s apart) then FAILED; unsolicited replies are
ignored; gratuitous ARP overrides an existing entry. A fake clock drives time.
"""

from __future__ import annotations

import random

import pytest

from router.neigh import (DELAY, FAILED, INCOMPLETE, PERMANENT, PROBE, REACHABLE, STALE, NeighTable,
                          Neighbour, format_row)

DEV = "pods"
MAC_A = bytes.fromhex("020000000005")
MAC_B = bytes.fromhex("0200000000bb")


def ip(text: str) -> int:
    a, b, c, d = (int(x) for x in text.split("."))
    return (a << 24) | (b << 16) | (c << 8) | d


POD5 = ip("10.244.1.5")
POD9 = ip("10.244.1.9")


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clk() -> Clock:
    return Clock()


@pytest.fixture
def t(clk) -> NeighTable:
    return NeighTable(clk, rng=random.Random(7))


def reply(t: NeighTable, mac: bytes = MAC_A, sender: int = POD5, dev: str = DEV) -> list:
    return t.on_arp(dev, sender, mac, is_reply=True, is_gratuitous=False, for_us=True)


def request_for_us(t: NeighTable, mac: bytes = MAC_A, sender: int = POD5, dev: str = DEV) -> list:
    return t.on_arp(dev, sender, mac, is_reply=False, is_gratuitous=False, for_us=True)


def garp(t: NeighTable, mac: bytes, sender: int = POD5, *, is_reply: bool = False) -> list:
    return t.on_arp(DEV, sender, mac, is_reply=is_reply, is_gratuitous=True, for_us=False)


def make_reachable(t: NeighTable, clk: Clock) -> Neighbour:
    mac, acts = t.resolve(DEV, POD5, "first")
    assert mac is None and acts == [("request", DEV, POD5, None)]
    assert reply(t) == [("send", DEV, MAC_A, "first")]
    n = t.get(DEV, POD5)
    assert n.state == REACHABLE
    return n


def make_stale(t: NeighTable, clk: Clock) -> Neighbour:
    request_for_us(t)
    n = t.get(DEV, POD5)
    assert n.state == STALE and n.mac == MAC_A
    return n


# --- defaults ------------------------------------------------------------------

def test_defaults_match_kernel_arp_tbl():
    t = NeighTable()
    assert t.base_reachable == 30.0
    assert t.delay_first_probe == 5.0
    assert t.retrans == 1.0
    assert (t.mcast_solicit, t.ucast_solicit, t.mcast_reprobes) == (3, 3, 0)
    assert t.queue_len == 101
    assert t.gc_stale == 60.0
    assert t.locktime == 1.0
    assert t.max_entries == 1024


@pytest.mark.parametrize("kw", [{"mcast_solicit": 0}, {"queue_len": 0}, {"base_reachable": 0},
                                {"retrans": -1}, {"ucast_solicit": -1}, {"max_entries": 0}])
def test_bad_parameters_rejected(kw):
    with pytest.raises(ValueError):
        NeighTable(**kw)


# --- INCOMPLETE -> FAILED ------------------------------------------------------

def test_incomplete_three_broadcasts_one_second_apart_then_failed(t, clk):
    start = clk.t
    mac, acts = t.resolve(DEV, POD5, "p1")
    assert mac is None
    assert acts == [("request", DEV, POD5, None)]
    n = t.get(DEV, POD5)
    assert n.state == INCOMPLETE and n.mac is None and n.probes == 1
    # more packets while INCOMPLETE: queued, no extra request
    assert t.resolve(DEV, POD5, "p2") == (None, [])
    assert t.resolve(DEV, POD5, "p3") == (None, [])
    assert list(n.queue) == ["p1", "p2", "p3"]

    assert t.next_deadline() == start + 1.0
    clk.t = start + 0.999
    assert t.tick() == []
    clk.t = start + 1.0
    assert t.tick() == [("request", DEV, POD5, None)]
    assert t.next_deadline() == start + 2.0
    clk.t = start + 2.0
    assert t.tick() == [("request", DEV, POD5, None)]
    assert n.state == INCOMPLETE and n.probes == 3
    clk.t = start + 3.0
    assert t.tick() == [("unreachable", "p1"), ("unreachable", "p2"), ("unreachable", "p3")]
    assert n.state == FAILED
    assert len(n.queue) == 0
    assert t.requests_sent == 3
    assert t.failed == 1
    assert t.unreachable == 3
    # nothing more is sent for a FAILED entry
    clk.t = start + 10.0
    assert t.tick() == []
    assert t.requests_sent == 3


def test_failed_entry_restarts_resolution_on_next_packet(t, clk):
    t.resolve(DEV, POD5, "p1")
    for _ in range(3):
        clk.t += 1.0
        t.tick()
    assert t.get(DEV, POD5).state == FAILED
    clk.t += 2.0
    mac, acts = t.resolve(DEV, POD5, "p2")
    assert mac is None
    assert acts == [("request", DEV, POD5, None)]
    n = t.get(DEV, POD5)
    assert n.state == INCOMPLETE and n.probes == 1 and list(n.queue) == ["p2"]
    assert t.next_deadline() == clk.t + 1.0
    # and it can now resolve normally
    assert reply(t) == [("send", DEV, MAC_A, "p2")]


def test_late_tick_advances_one_step(t, clk):
    # A timer run late behaves like the kernel's: one step, next retransmit from "now".
    t.resolve(DEV, POD5, "p1")
    clk.t += 10.0
    assert t.tick() == [("request", DEV, POD5, None)]
    assert t.next_deadline() == clk.t + 1.0


# --- INCOMPLETE -> REACHABLE ----------------------------------------------------

def test_reply_while_incomplete_sends_queue_in_order(t, clk):
    t.resolve(DEV, POD5, "a")
    t.resolve(DEV, POD5, "b")
    clk.t += 0.5
    t.resolve(DEV, POD5, "c")
    acts = reply(t)
    assert acts == [("send", DEV, MAC_A, "a"), ("send", DEV, MAC_A, "b"), ("send", DEV, MAC_A, "c")]
    n = t.get(DEV, POD5)
    assert n.state == REACHABLE and n.mac == MAC_A and len(n.queue) == 0
    assert n.confirmed == clk.t
    assert t.replies_seen == 1
    # no retransmissions after resolution
    clk.t += 1.0
    assert t.tick() == []
    assert t.requests_sent == 1
    # packets now go straight out
    assert t.resolve(DEV, POD5, "d") == (MAC_A, [])


def test_queue_bound_drops_oldest(t, clk):
    t.resolve(DEV, POD5, 0)
    for i in range(1, 101):
        assert t.resolve(DEV, POD5, i) == (None, [])
    n = t.get(DEV, POD5)
    assert len(n.queue) == 101
    assert t.resolve(DEV, POD5, 101) == (None, [("dropped", 0)])
    assert t.resolve(DEV, POD5, 102) == (None, [("dropped", 1)])
    assert len(n.queue) == 101
    assert t.queue_dropped == 2
    acts = reply(t)
    assert acts == [("send", DEV, MAC_A, i) for i in range(2, 103)]


def test_small_queue_bound(clk):
    t = NeighTable(clk, queue_len=2)
    t.resolve(DEV, POD5, "a")
    t.resolve(DEV, POD5, "b")
    assert t.resolve(DEV, POD5, "c") == (None, [("dropped", "a")])
    clk.t += 3.0
    for _ in range(3):
        t.tick()
        clk.t += 1.0
    assert t.get(DEV, POD5).state == FAILED


# --- REACHABLE -> STALE ----------------------------------------------------------

def test_reachable_expires_to_stale_within_15_to_45_s(t, clk):
    n = make_reachable(t, clk)
    confirmed = n.confirmed
    rt = n.reachable_time
    assert 15.0 <= rt < 45.0
    assert t.next_deadline() == confirmed + rt
    clk.t = confirmed + rt - 0.001
    assert t.tick() == []
    assert n.state == REACHABLE
    clk.t = confirmed + rt
    assert t.tick() == []  # going STALE sends nothing
    assert n.state == STALE
    assert n.mac == MAC_A
    assert t.requests_sent == 1


def test_reachable_time_is_random_in_range():
    seen = set()
    for seed in range(200):
        t = NeighTable(Clock(), rng=random.Random(seed))
        t.resolve(DEV, POD5, "x")
        reply(t)
        rt = t.get(DEV, POD5).reachable_time
        assert 15.0 <= rt < 45.0
        seen.add(round(rt, 3))
    assert len(seen) > 150  # really random, not a constant
    assert min(seen) < 20 and max(seen) > 40  # spans the range


def test_seeded_rng_is_reproducible(clk):
    a = NeighTable(Clock(), rng=random.Random(42))
    b = NeighTable(Clock(), rng=random.Random(42))
    for t in (a, b):
        t.resolve(DEV, POD5, "x")
        reply(t)
    assert a.get(DEV, POD5).reachable_time == b.get(DEV, POD5).reachable_time


def test_confirm_extends_reachable(t, clk):
    n = make_reachable(t, clk)
    rt = n.reachable_time
    first = t.next_deadline()
    clk.t += 10.0
    t.confirm(DEV, POD5)
    assert n.confirmed == clk.t
    clk.t = first
    assert t.tick() == []
    assert n.state == REACHABLE  # re-checked, still within confirmed + reachable_time
    assert t.next_deadline() == pytest.approx(first + 10.0)
    clk.t = first + 10.0
    t.tick()
    assert n.state == STALE
    assert rt == n.reachable_time


def test_reply_with_same_mac_refreshes_reachable(t, clk):
    n = make_reachable(t, clk)
    first = t.next_deadline()
    clk.t += 5.0
    assert reply(t) == []
    assert n.state == REACHABLE and n.confirmed == clk.t
    clk.t = first
    t.tick()
    assert n.state == REACHABLE


# --- STALE -> DELAY -> PROBE -> FAILED ------------------------------------------

def test_stale_use_delay_probe_three_unicasts_then_failed(t, clk):
    n = make_stale(t, clk)
    start = clk.t + 7.0
    clk.t = start
    mac, acts = t.resolve(DEV, POD5, "x")
    assert (mac, acts) == (MAC_A, [])  # sent at once with the stale MAC
    assert n.state == DELAY
    assert t.next_deadline() == start + 5.0
    # still usable during DELAY, no new timer
    clk.t = start + 4.0
    assert t.resolve(DEV, POD5, "y") == (MAC_A, [])
    assert t.tick() == []
    assert n.state == DELAY
    clk.t = start + 5.0
    assert t.tick() == [("request", DEV, POD5, MAC_A)]
    assert n.state == PROBE and n.probes == 1
    assert t.resolve(DEV, POD5, "z") == (MAC_A, [])  # PROBE still sends
    clk.t = start + 6.0
    assert t.tick() == [("request", DEV, POD5, MAC_A)]
    clk.t = start + 7.0
    assert t.tick() == [("request", DEV, POD5, MAC_A)]
    assert n.state == PROBE and n.probes == 3
    clk.t = start + 8.0
    assert t.tick() == []  # nothing was queued while PROBE
    assert n.state == FAILED and n.mac is None
    assert t.requests_sent == 3
    assert t.failed == 1
    # the next packet restarts with a broadcast
    assert t.resolve(DEV, POD5, "w") == (None, [("request", DEV, POD5, None)])


def test_reply_during_probe_makes_reachable(t, clk):
    n = make_stale(t, clk)
    clk.t += 10.0
    t.resolve(DEV, POD5, "x")
    clk.t += 5.0
    assert t.tick() == [("request", DEV, POD5, MAC_A)]
    clk.t += 0.2
    assert reply(t) == []
    assert n.state == REACHABLE
    clk.t += 1.0
    assert t.tick() == []
    assert t.requests_sent == 1


def test_confirm_during_delay_reaches_reachable_without_probe(t, clk):
    n = make_stale(t, clk)
    clk.t += 7.0
    start = clk.t
    t.resolve(DEV, POD5, "x")
    assert n.state == DELAY
    clk.t = start + 2.0
    t.confirm(DEV, POD5)
    assert n.state == DELAY  # the kernel decides at the end of the delay
    clk.t = start + 5.0
    assert t.tick() == []
    assert n.state == REACHABLE
    assert t.requests_sent == 0
    assert t.next_deadline() == pytest.approx(start + 2.0 + n.reachable_time)


def test_confirm_before_delay_does_not_count(t, clk):
    n = make_stale(t, clk)
    clk.t += 7.0
    t.confirm(DEV, POD5)  # STALE stays STALE
    assert n.state == STALE
    clk.t += 6.0  # confirmation is now older than the delay window will be
    t.resolve(DEV, POD5, "x")
    clk.t += 5.0
    assert t.tick() == [("request", DEV, POD5, MAC_A)]
    assert n.state == PROBE


def test_mcast_reprobes_after_unicast_probes(clk):
    t = NeighTable(clk, ucast_solicit=1, mcast_reprobes=1)
    make_stale(t, clk)
    t.resolve(DEV, POD5, "x")
    clk.t += 5.0
    assert t.tick() == [("request", DEV, POD5, MAC_A)]
    clk.t += 1.0
    assert t.tick() == [("request", DEV, POD5, None)]
    clk.t += 1.0
    assert t.tick() == []
    assert t.get(DEV, POD5).state == FAILED


# --- ARP input -------------------------------------------------------------------

def test_unsolicited_reply_ignored(t, clk):
    assert t.on_arp(DEV, POD5, MAC_A, is_reply=True, is_gratuitous=False, for_us=False) == []
    assert reply(t) == []  # even addressed to us
    assert t.get(DEV, POD5) is None
    assert len(t) == 0
    assert t.arp_ignored == 2
    assert t.replies_seen == 2
    assert t.next_deadline() is None


def test_gratuitous_without_entry_ignored(t, clk):
    assert garp(t, MAC_B) == []
    assert garp(t, MAC_B, is_reply=True) == []
    assert t.get(DEV, POD5) is None


def test_gratuitous_arp_overrides_existing_mac(t, clk):
    n = make_reachable(t, clk)
    clk.t += 0.1  # inside locktime: a gratuitous ARP overrides anyway
    assert garp(t, MAC_B) == []
    assert n.mac == MAC_B
    assert n.state == STALE
    assert t.resolve(DEV, POD5, "x") == (MAC_B, [])
    # a gratuitous reply too
    clk.t += 0.1
    garp(t, MAC_A, is_reply=True)
    assert n.mac == MAC_A and n.state == STALE


def test_gratuitous_same_mac_keeps_reachable(t, clk):
    n = make_reachable(t, clk)
    clk.t += 2.0
    garp(t, MAC_A)
    assert n.state == REACHABLE


def test_different_reply_inside_locktime_ignored(t, clk):
    n = make_reachable(t, clk)
    clk.t += 0.5
    assert reply(t, MAC_B) == []
    assert n.mac == MAC_A  # first reply wins
    clk.t += 0.6  # now more than locktime after the last change
    reply(t, MAC_B)
    assert n.mac == MAC_B and n.state == REACHABLE


def test_request_for_us_creates_stale_entry(t, clk):
    acts = request_for_us(t, MAC_B, POD9)
    assert acts == []
    n = t.get(DEV, POD9)
    assert n is not None
    assert n.state == STALE and n.mac == MAC_B
    assert n.confirmed < clk.t - 5.0  # not a confirmation of reachability
    assert t.requests_sent == 0


def test_request_for_us_keeps_reachable_with_same_mac(t, clk):
    n = make_reachable(t, clk)
    clk.t += 3.0
    request_for_us(t, MAC_A)
    assert n.state == REACHABLE
    # a different MAC overrides (neigh_event_ns always overrides): STALE
    clk.t += 0.1
    request_for_us(t, MAC_B)
    assert n.state == STALE and n.mac == MAC_B


def test_request_for_us_resolves_incomplete_and_flushes(t, clk):
    t.resolve(DEV, POD5, "a")
    t.resolve(DEV, POD5, "b")
    assert request_for_us(t) == [("send", DEV, MAC_A, "a"), ("send", DEV, MAC_A, "b")]
    n = t.get(DEV, POD5)
    assert n.state == STALE
    clk.t += 1.0
    assert t.tick() == []  # the retransmit timer is gone


def test_request_not_for_us(t, clk):
    # unknown sender: nothing created
    assert t.on_arp(DEV, POD9, MAC_B, is_reply=False, is_gratuitous=False, for_us=False) == []
    assert t.get(DEV, POD9) is None
    # known sender with a new MAC after locktime: updated, STALE
    n = make_reachable(t, clk)
    clk.t += 2.0
    t.on_arp(DEV, POD5, MAC_B, is_reply=False, is_gratuitous=False, for_us=False)
    assert n.state == STALE and n.mac == MAC_B


def test_martian_and_dad_senders_ignored(t, clk):
    for sender in (0, ip("127.0.0.1"), ip("224.0.0.1"), ip("255.255.255.255"), ip("0.1.2.3")):
        assert request_for_us(t, MAC_A, sender) == []
        assert t.get(DEV, sender) is None
    assert len(t) == 0


def test_entries_are_per_device(t, clk):
    t.resolve("pods", POD5, "a")
    assert reply(t, MAC_A, POD5, "eth1") == []  # other device: no entry there
    assert t.get("eth1", POD5) is None
    assert t.get("pods", POD5).state == INCOMPLETE
    request_for_us(t, MAC_B, POD5, "eth1")
    assert t.get("eth1", POD5).mac == MAC_B
    assert t.get("pods", POD5).mac is None


# --- PERMANENT -----------------------------------------------------------------

def test_permanent_untouched(t, clk):
    assert t.add_permanent(DEV, POD5, MAC_A) == []
    n = t.get(DEV, POD5)
    assert n.state == PERMANENT
    assert t.next_deadline() is None
    clk.t += 5.0
    reply(t, MAC_B)
    garp(t, MAC_B)
    request_for_us(t, MAC_B)
    t.confirm(DEV, POD5)
    assert n.state == PERMANENT and n.mac == MAC_A
    assert t.resolve(DEV, POD5, "x") == (MAC_A, [])
    clk.t += 1000.0
    assert t.tick() == []
    assert t.get(DEV, POD5) is n  # never garbage-collected
    assert t.flush() == []
    assert t.get(DEV, POD5) is n  # flush keeps permanent entries by default
    t.flush(permanent=True)
    assert t.get(DEV, POD5) is None


def test_add_permanent_sends_queue_of_incomplete(t, clk):
    t.resolve(DEV, POD5, "a")
    t.resolve(DEV, POD5, "b")
    assert t.add_permanent(DEV, POD5, MAC_B) == [("send", DEV, MAC_B, "a"), ("send", DEV, MAC_B, "b")]
    assert t.next_deadline() is None
    clk.t += 5.0
    assert t.tick() == []
    with pytest.raises(ValueError):
        t.add_permanent(DEV, POD9, b"\x01\x02")


# --- delete / flush ----------------------------------------------------------------

def test_delete_incomplete_reports_queue_unreachable(t, clk):
    t.resolve(DEV, POD5, "a")
    t.resolve(DEV, POD5, "b")
    assert t.delete(DEV, POD5) == [("unreachable", "a"), ("unreachable", "b")]
    assert t.get(DEV, POD5) is None
    assert t.next_deadline() is None
    clk.t += 1.0
    assert t.tick() == []  # the stale timer does nothing
    assert t.delete(DEV, POD5) == []


def test_flush_by_device(t, clk):
    t.resolve("pods", POD5, "a")
    t.resolve("eth1", POD9, "b")
    assert t.flush("pods") == [("unreachable", "a")]
    assert t.get("pods", POD5) is None
    assert t.get("eth1", POD9) is not None


# --- timers / GC --------------------------------------------------------------------

def test_next_deadline_tracks_earliest_and_is_lazy(t, clk):
    assert t.next_deadline() is None
    start = clk.t
    t.resolve(DEV, POD5, "a")  # retransmit at +1
    clk.t = start + 0.5
    t.resolve(DEV, POD9, "b")  # retransmit at +1.5
    assert t.next_deadline() == start + 1.0
    reply(t)  # POD5 REACHABLE: its retransmit timer is cancelled
    assert t.next_deadline() == start + 1.5
    t.delete(DEV, POD9)
    n = t.get(DEV, POD5)
    assert t.next_deadline() == n.confirmed + n.reachable_time
    assert n.next_timer == t.next_deadline()


def test_heap_does_not_grow_without_bound(t, clk):
    n = make_stale(t, clk)
    for _ in range(2000):
        clk.t += 0.001
        t.resolve(DEV, POD5, "x")  # STALE -> DELAY (arms)
        clk.t += 0.001
        garp(t, MAC_B if n.mac == MAC_A else MAC_A)  # -> STALE (re-arms GC)
    assert len(t._heap) <= 4 * len(t) + 64 + 1


def test_stale_and_failed_garbage_collected_after_60s_unused(t, clk):
    make_stale(t, clk)  # POD5 STALE
    t.resolve(DEV, POD9, "q")
    for _ in range(3):
        clk.t += 1.0
        t.tick()
    assert t.get(DEV, POD9).state == FAILED
    failed_at = clk.t
    stale_since = t.get(DEV, POD5).updated
    clk.t = stale_since + 59.9
    t.tick()
    assert t.get(DEV, POD5) is not None
    clk.t = stale_since + 60.0
    t.tick()
    assert t.get(DEV, POD5) is None
    assert t.get(DEV, POD9) is not None
    clk.t = failed_at + 60.0
    t.tick()
    assert t.get(DEV, POD9) is None
    assert t.gc_removed == 2
    assert t.next_deadline() is None


def test_used_stale_entry_not_collected_on_old_deadline(t, clk):
    n = make_stale(t, clk)
    t0 = clk.t
    assert t.next_deadline() == t0 + 60.0  # GC due if left unused
    clk.t = t0 + 50.0
    t.resolve(DEV, POD5, "x")  # STALE -> DELAY
    clk.t = t0 + 52.0
    t.confirm(DEV, POD5)
    clk.t = t0 + 55.0
    assert t.tick() == []
    assert n.state == REACHABLE
    clk.t = t0 + 60.0
    assert t.tick() == []
    assert t.get(DEV, POD5) is n  # the old GC deadline is void
    stale_at = n.confirmed + n.reachable_time
    clk.t = stale_at
    t.tick()
    assert n.state == STALE
    clk.t = stale_at + 59.0
    t.tick()
    assert t.get(DEV, POD5) is n
    clk.t = stale_at + 60.0
    t.tick()
    assert t.get(DEV, POD5) is None


def test_table_full_drops_then_forced_gc_frees_failed(clk):
    t = NeighTable(clk, max_entries=2)
    t.resolve(DEV, ip("10.0.0.1"), "a")
    t.resolve(DEV, ip("10.0.0.2"), "b")
    assert t.resolve(DEV, ip("10.0.0.3"), "c") == (None, [("dropped", "c")])
    assert t.get(DEV, ip("10.0.0.3")) is None
    assert t.table_overflow == 1
    for _ in range(3):
        clk.t += 1.0
        t.tick()
    assert t.get(DEV, ip("10.0.0.1")).state == FAILED
    clk.t += 1.0
    mac, acts = t.resolve(DEV, ip("10.0.0.3"), "c")
    assert acts == [("request", DEV, ip("10.0.0.3"), None)]
    assert t.get(DEV, ip("10.0.0.3")).state == INCOMPLETE
    assert len(t) <= 2
    # permanent entries do not count against the limit
    t.add_permanent(DEV, ip("10.0.0.200"), MAC_A)
    t.add_permanent(DEV, ip("10.0.0.201"), MAC_B)
    assert len(t) <= 4


# --- show ------------------------------------------------------------------------

def test_rows_and_format_row(t, clk):
    make_reachable(t, clk)
    t.resolve(DEV, POD9, "q1")
    t.resolve(DEV, POD9, "q2")
    t.add_permanent("eth1", ip("172.18.0.1"), MAC_B)
    clk.t += 0.25
    rows = t.rows()
    by_ip = {r["ip"]: r for r in rows}
    assert by_ip["10.244.1.5"] == {"ip": "10.244.1.5", "dev": "pods", "lladdr": "02:00:00:00:00:05",
                                   "state": "REACHABLE", "probes": 1, "queued": 0, "age": 0.25}
    assert by_ip["10.244.1.9"]["lladdr"] is None
    assert by_ip["10.244.1.9"]["state"] == "INCOMPLETE"
    assert by_ip["10.244.1.9"]["queued"] == 2
    assert [r["dev"] for r in rows] == ["eth1", "pods", "pods"]  # sorted by (dev, ip)
    lines = [NeighTable.format_row(r) for r in rows]
    assert lines == [
        "172.18.0.1 dev eth1 lladdr 02:00:00:00:00:bb PERMANENT",
        "10.244.1.5 dev pods lladdr 02:00:00:00:00:05 REACHABLE",
        "10.244.1.9 dev pods INCOMPLETE",
    ]
    for _ in range(3):
        clk.t += 1.0
        t.tick()
    failed = [r for r in t.rows() if r["ip"] == "10.244.1.9"][0]
    assert format_row(failed) == "10.244.1.9 dev pods FAILED"
    assert failed["lladdr"] is None and failed["queued"] == 0
