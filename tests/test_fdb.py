"""Unit tests for vswitch.fdb.Fdb (the bridge forwarding database).

Expected behaviour comes from the Fdb module docstring and from
kernel-dataplane-spec.md section 1 (net/bridge/br_fdb.c): learning moves a MAC
to its ingress port, only frames *from* a MAC refresh it, entries age out after
300 s by default, static entries never age and are never moved.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vswitch.fdb import (DEFAULT_AGEING, DEFAULT_MAX_LEARNED, FULL, MOVE, NEW, REFRESH, STATIC, Fdb)


class P:
    """Minimal stand-in for a port: the FDB only needs identity and ``name``."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"P({self.name})"


P1, P2, P3 = P("p1"), P("p2"), P("p3")
A = bytes.fromhex("02000000000a")
B = bytes.fromhex("02000000000b")
C = bytes.fromhex("02000000000c")
S = bytes.fromhex("0200000000ff")


# --- construction ------------------------------------------------------------

def test_defaults_match_kernel():
    f = Fdb()
    # BR_DEFAULT_AGEING_TIME is 300 s; the docstring promises 8192 as the bound.
    assert DEFAULT_AGEING == 300.0
    assert f.ageing == 300.0
    assert f.max_learned == DEFAULT_MAX_LEARNED == 8192
    assert len(f) == 0 and f.learned == 0 and f.overflow == 0 and f.moves == 0 and f.aged == 0


@pytest.mark.parametrize("ageing", [0, -1, -0.5])
def test_rejects_non_positive_ageing(ageing):
    with pytest.raises(ValueError):
        Fdb(ageing=ageing)


@pytest.mark.parametrize("max_learned", [0, -3])
def test_rejects_max_learned_below_one(max_learned):
    with pytest.raises(ValueError):
        Fdb(max_learned=max_learned)


# --- learning ----------------------------------------------------------------

def test_learn_new_then_lookup():
    f = Fdb()
    assert f.lookup(A, 0.0) is None
    assert f.learn(A, P1, 10.0) == NEW
    assert f.lookup(A, 10.0) is P1
    assert f.lookup(B, 10.0) is None
    assert len(f) == 1 and f.learned == 1
    e = f.get(A)
    assert e.port is P1 and e.updated == 10.0 and not e.static


def test_refresh_same_port_extends_life():
    f = Fdb(ageing=100)
    f.learn(A, P1, 0.0)
    assert f.learn(A, P1, 90.0) == REFRESH
    assert f.get(A).updated == 90.0
    # 150 s after the first learn but only 60 s after the refresh: still alive.
    assert f.lookup(A, 150.0) is P1
    assert f.moves == 0 and f.learned == 1 and len(f) == 1


def test_mac_move_counts_and_rebinds():
    f = Fdb()
    f.learn(A, P1, 0.0)
    assert f.learn(A, P2, 1.0) == MOVE
    assert f.moves == 1
    assert f.lookup(A, 1.0) is P2
    assert f.learn(A, P3, 2.0) == MOVE
    assert f.learn(A, P3, 3.0) == REFRESH  # a refresh is not a move
    assert f.moves == 2
    assert f.lookup(A, 3.0) is P3
    assert len(f) == 1 and f.learned == 1  # a move does not create an entry


# --- ageing ------------------------------------------------------------------

def test_expired_entry_misses_immediately_and_is_reclaimed_by_expire():
    f = Fdb(ageing=300)
    f.learn(A, P1, 1000.0)
    f.learn(B, P2, 1200.0)
    assert f.lookup(A, 1299.0) is P1
    # A is past its ageing time: lookup misses at once, before any sweep...
    assert f.lookup(A, 1300.5) is None
    assert f.lookup(B, 1300.5) is P2
    # ...but the memory is only reclaimed by the periodic sweep.
    assert len(f) == 2
    assert f.expire(1300.5) == 1
    assert f.get(A) is None and f.get(B) is not None
    assert len(f) == 1 and f.learned == 1 and f.aged == 1
    # B expires later.
    assert f.expire(1400.0) == 0
    assert f.expire(1500.5) == 1
    assert len(f) == 0 and f.learned == 0 and f.aged == 2


def test_lookups_never_refresh():
    f = Fdb(ageing=300)
    f.learn(A, P1, 0.0)
    for t in (50.0, 100.0, 200.0, 299.0):
        assert f.lookup(A, t) is P1
    assert f.get(A).updated == 0.0
    assert f.lookup(A, 300.5) is None


def test_learning_an_expired_entry_elsewhere_is_not_a_move():
    """An aged-out entry is gone: re-learning it on another port is a fresh learn."""
    f = Fdb(ageing=10)
    f.learn(A, P1, 0.0)
    f.learn(A, P2, 20.0)  # expired, not yet swept
    assert f.moves == 0
    assert f.lookup(A, 20.0) is P2
    assert f.learned == 1 and len(f) == 1


def test_expired_entry_relearned_on_same_port_is_alive_again():
    f = Fdb(ageing=10)
    f.learn(A, P1, 0.0)
    assert f.lookup(A, 20.0) is None
    f.learn(A, P1, 20.0)
    assert f.lookup(A, 25.0) is P1
    assert f.expire(25.0) == 0


def test_entry_is_expired_exactly_at_the_ageing_time():
    f = Fdb(ageing=300)
    f.learn(A, P1, 1000.0)
    assert f.lookup(A, 1299.999) is P1
    assert f.lookup(A, 1300.0) is None
    assert f.expire(1300.0) == 1


# --- the max_learned bound ---------------------------------------------------

def test_max_learned_bound_counts_overflow_and_keeps_existing_working():
    f = Fdb(ageing=300, max_learned=2)
    assert f.learn(A, P1, 0.0) == NEW
    assert f.learn(B, P2, 0.0) == NEW
    assert f.learn(C, P3, 1.0) == FULL
    assert f.overflow == 1
    assert f.lookup(C, 1.0) is None and f.get(C) is None
    assert len(f) == 2 and f.learned == 2
    assert f.learn(C, P3, 2.0) == FULL
    assert f.overflow == 2
    # While full, known MACs still refresh and move.
    assert f.learn(A, P1, 100.0) == REFRESH
    assert f.get(A).updated == 100.0
    assert f.learn(B, P1, 101.0) == MOVE
    assert f.lookup(B, 101.0) is P1
    assert f.moves == 1
    assert f.overflow == 2  # refresh/move are not overflow


def test_room_frees_after_delete_and_expire():
    f = Fdb(ageing=10, max_learned=2)
    f.learn(A, P1, 0.0)
    f.learn(B, P1, 5.0)
    assert f.learn(C, P1, 6.0) == FULL
    assert f.delete(A)
    assert f.learn(C, P1, 6.0) == NEW
    assert f.learned == 2
    # B ages out; once swept there is room again.
    assert f.expire(15.5) == 1  # B (10.5 s old) goes, C (9.5 s old) stays
    assert f.learned == 1
    assert f.learn(A, P2, 15.5) == NEW


def test_static_entries_do_not_count_against_max_learned():
    f = Fdb(max_learned=1)
    f.add_static(S, P1)
    f.add_static(C, P2)
    assert f.learn(A, P1, 0.0) == NEW
    assert f.learned == 1 and len(f) == 3
    assert f.learn(B, P1, 0.0) == FULL


def test_add_static_over_learned_entry_frees_a_learned_slot():
    f = Fdb(max_learned=1)
    f.learn(A, P1, 0.0)
    f.add_static(A, P2)
    assert f.learned == 0
    assert f.get(A).static and f.lookup(A, 0.0) is P2
    assert f.learn(B, P1, 0.0) == NEW


# --- static entries ----------------------------------------------------------

def test_static_never_ages():
    f = Fdb(ageing=300)
    f.add_static(S, P1)
    assert f.lookup(S, 1e9) is P1
    assert f.expire(1e9) == 0
    assert f.get(S) is not None and f.aged == 0


def test_static_not_moved_or_refreshed_by_learn():
    f = Fdb()
    f.add_static(S, P1)
    assert f.learn(S, P2, 5.0) == STATIC
    assert f.lookup(S, 5.0) is P1
    assert f.moves == 0 and f.learned == 0
    assert f.learn(S, P1, 6.0) == STATIC
    assert f.get(S).static


def test_flush_leaves_static_unless_asked():
    f = Fdb()
    f.add_static(S, P1)
    f.learn(A, P1, 0.0)
    f.learn(B, P2, 0.0)
    assert f.flush() == 2
    assert f.get(A) is None and f.get(B) is None
    assert f.get(S) is not None
    assert f.learned == 0 and len(f) == 1
    assert f.flush(include_static=True) == 1
    assert len(f) == 0


def test_flush_per_port():
    f = Fdb(max_learned=3)
    f.add_static(S, P1)
    f.learn(A, P1, 0.0)
    f.learn(B, P2, 0.0)
    f.learn(C, P1, 0.0)
    assert f.flush(P1) == 2
    assert f.get(A) is None and f.get(C) is None
    assert f.lookup(B, 0.0) is P2 and f.lookup(S, 0.0) is P1
    assert f.learned == 1
    # The learned count stayed consistent: two slots are free again.
    assert f.learn(A, P3, 1.0) == NEW
    assert f.learn(C, P3, 1.0) == NEW
    assert f.learn(bytes.fromhex("02000000000d"), P3, 1.0) == FULL
    assert f.flush(P1, include_static=True) == 1
    assert f.get(S) is None


def test_delete():
    f = Fdb()
    f.learn(A, P1, 0.0)
    f.add_static(S, P2)
    assert f.delete(A) is True
    assert f.delete(A) is False
    assert f.delete(B) is False
    assert f.delete(S) is True
    assert len(f) == 0 and f.learned == 0


# --- rows --------------------------------------------------------------------

def test_rows_sorted_with_ages_and_without_expired():
    f = Fdb(ageing=300)
    pa, pb = P("b-port"), P("a-port")
    f.learn(B, pa, 100.5)
    f.learn(A, pa, 150.0)
    f.learn(C, pb, 10.0)  # expired at t=400
    f.add_static(S, pb)
    rows = f.rows(400.0)
    assert rows == [
        {"mac": "02:00:00:00:00:ff", "port": "a-port", "static": True, "age": None},
        {"mac": "02:00:00:00:00:0a", "port": "b-port", "static": False, "age": 250.0},
        {"mac": "02:00:00:00:00:0b", "port": "b-port", "static": False, "age": 299.5},
    ]
    # rows() is read-only: the expired entry is still there for expire().
    assert f.get(C) is not None


def test_rows_rounds_age():
    f = Fdb()
    f.learn(A, P1, 1.0)
    assert f.rows(3.26) == [{"mac": "02:00:00:00:00:0a", "port": "p1", "static": False, "age": 2.3}]


# --- property test against a brute-force model -------------------------------

class ModelFdb:
    """Obviously-correct reference: a dict of mac -> (port, updated).

    An entry is gone once it has not been refreshed for ``ageing`` seconds;
    unswept gone entries still occupy a learned slot (as in the kernel, whose
    fdb_n_learned only drops on deletion).
    """

    def __init__(self, ageing, max_learned):
        self.ageing, self.max_learned = ageing, max_learned
        self.t = {}
        self.moves = self.overflow = self.aged = 0

    def alive(self, mac, now):
        return mac in self.t and now - self.t[mac][1] < self.ageing

    def learn(self, mac, port, now):
        if mac in self.t:
            old_port, _ = self.t[mac]
            was_alive = self.alive(mac, now)
            self.t[mac] = (port, now)
            if old_port is port:
                return {REFRESH} if was_alive else {REFRESH, NEW}
            if was_alive:
                self.moves += 1
                return {MOVE}
            return {NEW}
        if len(self.t) >= self.max_learned:
            self.overflow += 1
            return {FULL}
        self.t[mac] = (port, now)
        return {NEW}

    def lookup(self, mac, now):
        return self.t[mac][0] if self.alive(mac, now) else None

    def expire(self, now):
        dead = [m for m in self.t if not self.alive(m, now)]
        for m in dead:
            del self.t[m]
        self.aged += len(dead)
        return len(dead)


MACS = [bytes([2, 0, 0, 0, 0, i]) for i in range(5)]
PORTS = [P("x"), P("y"), P("z")]

ops = st.lists(
    st.one_of(
        st.tuples(st.just("learn"), st.integers(0, 4), st.integers(0, 2), st.integers(0, 6)),
        st.tuples(st.just("lookup"), st.integers(0, 4), st.just(0), st.integers(0, 6)),
        st.tuples(st.just("expire"), st.just(0), st.just(0), st.integers(0, 6)),
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(ops=ops, max_learned=st.integers(1, 6))
def test_fdb_matches_reference_model(ops, max_learned):
    # Clock advances in whole seconds and the ageing time is 10.5 s, so no
    # entry is ever exactly at the ageing boundary (that case has its own
    # test above).
    ageing = 10.5
    f, m = Fdb(ageing=ageing, max_learned=max_learned), ModelFdb(ageing, max_learned)
    now = 0.0
    for op, mi, pi, dt in ops:
        now += dt
        mac, port = MACS[mi], PORTS[pi]
        if op == "learn":
            got, want = f.learn(mac, port, now), m.learn(mac, port, now)
            assert got in want, (op, mac, port, now)
        elif op == "lookup":
            assert f.lookup(mac, now) is m.lookup(mac, now), (op, mac, now)
        else:
            assert f.expire(now) == m.expire(now)
        assert len(f) == len(m.t)
        assert f.learned == len(m.t)
        assert (f.moves, f.overflow, f.aged) == (m.moves, m.overflow, m.aged)
    for mac in MACS:
        assert f.lookup(mac, now) is m.lookup(mac, now)
    assert {r["mac"] for r in f.rows(now)} == {mac.hex(":") for mac in MACS if m.alive(mac, now)}
