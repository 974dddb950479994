"""Unit tests for nat.tcpstate (the kernel's TCP/UDP conntrack state machine).

Expected values are the kernel's, from net/netfilter/nf_conntrack_proto_tcp.c
(Linux 6.1: tcp_conntracks[][][], get_conntrack_index(), tcp_valid_flags[],
tcp_new(), nf_conntrack_tcp_packet(), tcp_timeouts[]) and
nf_conntrack_proto_udp.c (nf_conntrack_udp_packet(), 6.x).  Table cells are
cited as [dir][index][state] with the kernel's short names.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nat.tcpstate import (
    ACK, CLOSE, CLOSE_WAIT, CWR, ECE, ESTABLISHED, FIN, FIN_WAIT, GENERIC_TIMEOUT, ICMP_TIMEOUT, IGNORE, INDEXES,
    INVALID, KERNEL_TIMEOUTS, KUBE_PROXY_TIMEOUTS, LAST_ACK, NONE, ORIGINAL, PROFILES, PSH, REPLY, RST, STATES, SYN,
    SYN_RECV, SYN_SENT, SYN_SENT2, TIME_WAIT, UDP_STREAM_TIMEOUT, UDP_TIMEOUT, URG, assured, first_state, index,
    next_state, refreshes, reopens, timeout, udp_timeout, valid_flags)

SYNACK, FINACK, RSTACK = SYN | ACK, FIN | ACK, RST | ACK


class Conn:
    """A conntrack entry driven exactly as the nat.tcpstate docstring tells callers to.

    Directions stay those of the first entry: after a REOPEN by a REPLY SYN the
    real caller would swap them; the state-machine properties do not care.
    """

    def __init__(self, flags: int, profile: str = "kube-proxy") -> None:
        self.profile = profile
        self.state = first_state(flags)
        self.seen_reply = self.assured = self.simopen = False
        self.timer = None if self.state == INVALID else timeout(self.state, profile, seen_reply=False)

    def packet(self, direction: int, flags: int) -> str:
        """Returns the verdict: the new state, INVALID, IGNORE or "REOPEN"."""
        new = next_state(self.state, direction, flags, simultaneous_open=self.simopen)
        if new == INVALID:
            return INVALID
        if new != IGNORE:
            if reopens(self.state, direction, flags):
                self.__init__(flags, self.profile)
                return "REOPEN"
            self.assured |= assured(self.state, new, direction, self.seen_reply)
            if refreshes(self.state, flags, self.seen_reply):
                self.timer = timeout(new, self.profile, seen_reply=self.seen_reply)
            self.state = new
            self.simopen |= new == SYN_SENT2
        if direction == REPLY:
            self.seen_reply = True
        return new


# --- the normal life of a connection ---------------------------------------------------------

def test_handshake_and_close_step_by_step():
    assert first_state(SYN) == SYN_SENT                            # [ORIG][syn][sNO] = sSS
    assert next_state(SYN_SENT, REPLY, SYNACK) == SYN_RECV         # [REPLY][synack][sSS] = sSR
    assert next_state(SYN_RECV, ORIGINAL, ACK) == ESTABLISHED      # [ORIG][ack][sSR] = sES
    assert assured(SYN_RECV, ESTABLISHED, ORIGINAL, seen_reply=True)
    assert next_state(ESTABLISHED, ORIGINAL, FINACK) == FIN_WAIT   # [ORIG][fin][sES] = sFW
    assert next_state(FIN_WAIT, REPLY, ACK) == CLOSE_WAIT          # [REPLY][ack][sFW] = sCW
    assert next_state(CLOSE_WAIT, REPLY, FINACK) == LAST_ACK       # [REPLY][fin][sCW] = sLA
    assert next_state(LAST_ACK, ORIGINAL, ACK) == TIME_WAIT        # [ORIG][ack][sLA] = sTW


@pytest.mark.parametrize("closer", [ORIGINAL, REPLY])
def test_handshake_and_close_either_side_closes(closer):
    other = REPLY - closer
    c = Conn(SYN)
    assert (c.state, c.timer, c.assured) == (SYN_SENT, 120, False)
    assert c.packet(REPLY, SYNACK) == SYN_RECV
    assert (c.timer, c.assured) == (60, False)
    assert c.packet(ORIGINAL, ACK) == ESTABLISHED
    assert (c.timer, c.assured) == (86400, True)                   # kube-proxy established
    assert c.packet(REPLY, ACK | PSH) == ESTABLISHED              # [REPLY][ack][sES] = sES
    assert c.packet(closer, FINACK) == FIN_WAIT                    # [*][fin][sES] = sFW
    assert c.timer == 120
    assert c.packet(other, ACK) == CLOSE_WAIT                      # [*][ack][sFW] = sCW
    assert c.timer == 3600                                         # kube-proxy close-wait
    assert c.packet(other, FINACK) == LAST_ACK                     # [*][fin][sCW] = sLA
    assert c.timer == 30
    assert c.packet(closer, ACK) == TIME_WAIT                      # [*][ack][sLA] = sTW
    assert c.timer == 120
    assert c.packet(closer, ACK) == TIME_WAIT                      # [*][ack][sTW] = sTW: retransmitted last ACK
    assert c.assured


def test_fin_and_ack_in_one_packet_each_way():
    # FIN+ACK from both sides with no separate ACKs: sFW -> sLA on the second FIN.
    assert next_state(FIN_WAIT, REPLY, FINACK) == LAST_ACK         # [REPLY][fin][sFW] = sLA
    assert next_state(LAST_ACK, ORIGINAL, FINACK) == LAST_ACK      # [ORIG][fin][sLA] = sLA: retransmitted FIN


# --- the special cases -------------------------------------------------------------------------

def test_simultaneous_open():
    c = Conn(SYN)
    assert c.packet(REPLY, SYN) == SYN_SENT2                       # [REPLY][syn][sSS] = sS2
    assert c.simopen
    assert c.packet(ORIGINAL, SYN) == SYN_SENT2                    # [ORIG][syn][sS2] = sS2: late retransmit
    assert c.packet(REPLY, ACK) == IGNORE                          # [REPLY][ack][sS2] = sIG
    assert c.packet(ORIGINAL, SYNACK) == SYN_RECV                  # [ORIG][synack][sS2] = sSR
    assert c.packet(REPLY, SYNACK) == IGNORE                       # [REPLY][synack][sSR] = sIG
    # The table says [REPLY][ack][sSR] = sSR; the IP_CT_TCP_SIMULTANEOUS_OPEN case makes it ESTABLISHED.
    assert c.packet(REPLY, ACK) == ESTABLISHED
    assert c.assured


def test_reply_ack_in_syn_recv_needs_simultaneous_open_flag():
    assert next_state(SYN_RECV, REPLY, ACK) == SYN_RECV
    assert next_state(SYN_RECV, REPLY, ACK, simultaneous_open=True) == ESTABLISHED
    assert next_state(SYN_RECV, ORIGINAL, ACK, simultaneous_open=True) == ESTABLISHED


@pytest.mark.parametrize("state", [SYN_SENT, SYN_RECV, ESTABLISHED, FIN_WAIT, CLOSE_WAIT, LAST_ACK, TIME_WAIT,
                                   CLOSE, SYN_SENT2])
@pytest.mark.parametrize("direction", [ORIGINAL, REPLY])
@pytest.mark.parametrize("flags", [RST, RSTACK])
def test_rst_closes_every_state(state, direction, flags):
    assert next_state(state, direction, flags) == CLOSE            # [*][rst][s != sNO] = sCL


def test_rst_timeouts_and_kill_before_reply():
    c = Conn(SYN)
    assert c.packet(REPLY, RSTACK) == CLOSE                        # port closed: the only reply is an RST
    assert c.timer == 0                                            # nf_ct_kill_acct(): gone at once
    c = Conn(SYN)
    c.packet(REPLY, SYNACK)
    c.packet(ORIGINAL, ACK)
    assert c.packet(REPLY, RST) == CLOSE
    assert c.timer == 10


def test_first_packet():
    assert first_state(SYN) == SYN_SENT
    assert first_state(SYN | URG) == SYN_SENT
    assert first_state(SYN | ECE | CWR) == SYN_SENT                # ECN setup SYN
    assert first_state(SYNACK) == INVALID                          # [ORIG][synack][sNO] = sIV
    assert first_state(FINACK) == INVALID                          # [ORIG][fin][sNO] = sIV
    assert first_state(RST) == INVALID                             # [ORIG][rst][sNO] = sIV
    assert first_state(RSTACK) == INVALID
    assert first_state(0) == INVALID                               # tcp_error(); [ORIG][none][sNO] = sIV
    assert first_state(FIN) == INVALID                             # tcp_error(): FIN without ACK
    assert first_state(SYN | FIN) == INVALID                       # tcp_error()


def test_mid_stream_pickup():
    assert first_state(ACK) == ESTABLISHED                         # [ORIG][ack][sNO] = sES, tcp_loose=1
    assert first_state(ACK | PSH) == ESTABLISHED
    assert first_state(ACK, loose=False) == INVALID                # nf_conntrack_tcp_loose=0
    c = Conn(ACK | PSH)
    assert c.timer == 300                                          # ESTABLISHED without SEEN_REPLY: capped at UNACK
    assert c.packet(REPLY, ACK) == ESTABLISHED
    assert (c.timer, c.assured) == (300, False)                    # SEEN_REPLY only set after this packet
    assert c.packet(ORIGINAL, ACK) == ESTABLISHED
    assert (c.timer, c.assured) == (86400, True)                   # "valid answer for a picked up connection"


def test_reopen_time_wait_with_new_syn():
    assert next_state(TIME_WAIT, ORIGINAL, SYN) == SYN_SENT        # [ORIG][syn][sTW] = sSS
    assert reopens(TIME_WAIT, ORIGINAL, SYN)
    c = Conn(SYN)
    for d, f in [(REPLY, SYNACK), (ORIGINAL, ACK), (ORIGINAL, FINACK), (REPLY, FINACK), (ORIGINAL, ACK)]:
        c.packet(d, f)
    assert c.state == TIME_WAIT
    assert c.packet(ORIGINAL, SYN) == "REOPEN"
    assert (c.state, c.seen_reply, c.assured, c.timer) == (SYN_SENT, False, False, 120)
    assert c.packet(REPLY, SYNACK) == SYN_RECV


def test_reopen_cases():
    assert next_state(TIME_WAIT, REPLY, SYN) == SYN_SENT           # [REPLY][syn][sTW] = sSS: roles switched
    assert reopens(TIME_WAIT, REPLY, SYN)
    assert next_state(CLOSE, ORIGINAL, SYN) == SYN_SENT            # [ORIG][syn][sCL] = sSS
    assert reopens(CLOSE, ORIGINAL, SYN)
    assert next_state(CLOSE, REPLY, SYN) == INVALID                # [REPLY][syn][sCL] = sIV
    assert not reopens(CLOSE, REPLY, SYN)
    assert not reopens(SYN_SENT, ORIGINAL, SYN)                    # a retransmission, same entry
    assert next_state(ESTABLISHED, ORIGINAL, SYN) == IGNORE        # [ORIG][syn][sES] = sIG
    assert not reopens(ESTABLISHED, ORIGINAL, SYN)
    assert not reopens(TIME_WAIT, ORIGINAL, ACK)
    assert not reopens(TIME_WAIT, ORIGINAL, SYNACK)
    assert not reopens(TIME_WAIT, ORIGINAL, SYN | FIN)             # tcp_error() rejects it first


# --- the table, cell by cell ---------------------------------------------------------------------

CELLS = [
    # (state, direction, index flags, kernel value)
    (NONE, ORIGINAL, SYN, SYN_SENT),          # [ORIG][syn][sNO] = sSS
    (SYN_SENT, ORIGINAL, SYN, SYN_SENT),      # [ORIG][syn][sSS] = sSS: retransmitted SYN
    (SYN_RECV, ORIGINAL, SYN, IGNORE),        # [ORIG][syn][sSR] = sIG
    (LAST_ACK, ORIGINAL, SYN, IGNORE),        # [ORIG][syn][sLA] = sIG
    (SYN_SENT, ORIGINAL, SYNACK, INVALID),    # [ORIG][synack][sSS] = sIV: client can't send SYN then SYN/ACK
    (SYN_RECV, ORIGINAL, SYNACK, SYN_RECV),   # [ORIG][synack][sSR] = sSR
    (ESTABLISHED, ORIGINAL, SYNACK, INVALID),  # [ORIG][synack][sES] = sIV
    (SYN_SENT, ORIGINAL, FINACK, INVALID),    # [ORIG][fin][sSS] = sIV: wait for the SYN/ACK first
    (SYN_RECV, ORIGINAL, FINACK, FIN_WAIT),   # [ORIG][fin][sSR] = sFW
    (TIME_WAIT, ORIGINAL, FINACK, TIME_WAIT),  # [ORIG][fin][sTW] = sTW
    (CLOSE, ORIGINAL, FINACK, CLOSE),         # [ORIG][fin][sCL] = sCL
    (SYN_SENT2, ORIGINAL, FINACK, INVALID),   # [ORIG][fin][sS2] = sIV
    (SYN_SENT, ORIGINAL, ACK, INVALID),       # [ORIG][ack][sSS] = sIV: no SYN/ACK seen yet
    (SYN_SENT2, ORIGINAL, ACK, INVALID),      # [ORIG][ack][sS2] = sIV
    (CLOSE, ORIGINAL, ACK, CLOSE),            # [ORIG][ack][sCL] = sCL
    (NONE, ORIGINAL, RST, INVALID),           # [ORIG][rst][sNO] = sIV
    (SYN_RECV, REPLY, SYN, INVALID),          # [REPLY][syn][sSR] = sIV
    (SYN_SENT2, REPLY, SYN, SYN_SENT2),       # [REPLY][syn][sS2] = sS2
    (NONE, REPLY, SYNACK, INVALID),           # [REPLY][synack][sNO] = sIV
    (SYN_SENT2, REPLY, SYNACK, SYN_RECV),     # [REPLY][synack][sS2] = sSR
    (ESTABLISHED, REPLY, SYNACK, IGNORE),     # [REPLY][synack][sES] = sIG: late retransmitted SYN/ACK
    (SYN_SENT, REPLY, FINACK, INVALID),       # [REPLY][fin][sSS] = sIV
    (LAST_ACK, REPLY, FINACK, LAST_ACK),      # [REPLY][fin][sLA] = sLA
    (SYN_SENT, REPLY, ACK, IGNORE),           # [REPLY][ack][sSS] = sIG: maybe a half-open connection
    (SYN_RECV, REPLY, ACK, SYN_RECV),         # [REPLY][ack][sSR] = sSR
    (NONE, REPLY, ACK, INVALID),              # [REPLY][ack][sNO] = sIV
    (TIME_WAIT, REPLY, ACK, TIME_WAIT),       # [REPLY][ack][sTW] = sTW
    (SYN_SENT, REPLY, RST, CLOSE),            # [REPLY][rst][sSS] = sCL
]


@pytest.mark.parametrize("state,direction,flags,expected", CELLS)
def test_table_cell(state, direction, flags, expected):
    assert next_state(state, direction, flags) == expected


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("direction", [ORIGINAL, REPLY])
def test_no_flags_row_is_all_invalid(state, direction):
    assert next_state(state, direction, 0) == INVALID              # [*][none][*] = sIV
    assert next_state(state, direction, PSH | URG) == INVALID


# --- flags --------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags,expected", [
    (SYN, "SYN"), (SYN | URG, "SYN"), (SYNACK, "SYNACK"), (SYNACK | FIN, "SYNACK"),
    (FIN, "FIN"), (FINACK, "FIN"), (ACK, "ACK"), (ACK | PSH, "ACK"),
    (RST, "RST"), (RSTACK, "RST"), (RST | SYN, "RST"), (RST | FIN | SYN | ACK, "RST"),
    (0, "NONE"), (PSH, "NONE"), (URG | ECE | CWR, "NONE"),
])
def test_index_precedence(flags, expected):
    assert index(flags) == expected                                # get_conntrack_index(): RST, SYN, FIN, ACK
    assert expected in INDEXES


def test_valid_flags_is_tcp_valid_flags():
    valid = {f for f in range(64) if valid_flags(f)}
    assert valid == {SYN, SYN | URG, SYNACK, RST, RSTACK, FINACK, FINACK | URG, ACK, ACK | URG,
                     # PSH is masked off before the lookup
                     SYN | PSH, SYN | URG | PSH, SYNACK | PSH, RST | PSH, RSTACK | PSH, FINACK | PSH,
                     FINACK | URG | PSH, ACK | PSH, ACK | URG | PSH}
    assert valid_flags(ACK | ECE | CWR)
    assert not valid_flags(SYNACK | URG)                           # not in tcp_valid_flags[]


def test_invalid_flag_combinations_are_invalid_in_every_state():
    # tcp_error() runs before the table: a bare FIN is never FIN_WAIT, a SYN+FIN never IGNOREd.
    assert next_state(ESTABLISHED, ORIGINAL, FIN) == INVALID
    assert next_state(ESTABLISHED, ORIGINAL, SYN | FIN) == INVALID
    assert next_state(ESTABLISHED, ORIGINAL, RST | SYN) == INVALID
    assert next_state(ESTABLISHED, ORIGINAL, FIN | PSH | URG) == INVALID   # "XMAS" scan


def test_bad_arguments_raise():
    with pytest.raises(ValueError):
        next_state("LISTEN", ORIGINAL, SYN)
    with pytest.raises(ValueError):
        next_state(ESTABLISHED, 2, ACK)
    with pytest.raises(ValueError):
        next_state(INVALID, ORIGINAL, ACK)


# --- timeouts ----------------------------------------------------------------------------------

def test_kernel_profile():
    assert KERNEL_TIMEOUTS == {                                    # tcp_timeouts[]
        SYN_SENT: 120, SYN_RECV: 60, ESTABLISHED: 5 * 86400, FIN_WAIT: 120, CLOSE_WAIT: 60, LAST_ACK: 30,
        TIME_WAIT: 120, CLOSE: 10, SYN_SENT2: 120, "UNACK": 300, "RETRANS": 300}


def test_kube_proxy_profile():
    assert KUBE_PROXY_TIMEOUTS == {**KERNEL_TIMEOUTS, ESTABLISHED: 24 * 3600, CLOSE_WAIT: 3600}
    assert PROFILES == {"kernel": KERNEL_TIMEOUTS, "kube-proxy": KUBE_PROXY_TIMEOUTS}


@pytest.mark.parametrize("profile", ["kernel", "kube-proxy"])
@pytest.mark.parametrize("state", [s for s in STATES if s != NONE])
def test_timeout_per_state(profile, state):
    assert timeout(state, profile) == PROFILES[profile][state]


def test_timeout_default_profile_and_before_reply():
    assert timeout(ESTABLISHED) == 86400
    assert timeout(ESTABLISHED, "kernel") == 432000
    assert timeout(ESTABLISHED, "kernel", seen_reply=False) == 300
    assert timeout(CLOSE_WAIT) == 3600
    assert timeout(CLOSE, seen_reply=False) == 0
    assert timeout(SYN_SENT, seen_reply=False) == 120
    assert timeout(SYN_RECV, seen_reply=False) == 60


def test_timeout_rejects_non_states():
    for bad in (NONE, INVALID, IGNORE, "UNACK", "LISTEN"):
        with pytest.raises(ValueError):
            timeout(bad)
    with pytest.raises(ValueError):
        timeout(ESTABLISHED, "iptables")


def test_syn_retransmit_before_reply_does_not_refresh():
    assert not refreshes(SYN_SENT, SYN, seen_reply=False)
    assert refreshes(SYN_SENT, RSTACK, seen_reply=False)
    assert refreshes(ESTABLISHED, ACK, seen_reply=False)
    assert refreshes(SYN_SENT, SYN, seen_reply=True)


def test_assured_rule():
    assert assured(SYN_RECV, ESTABLISHED, ORIGINAL, True)
    assert assured(ESTABLISHED, ESTABLISHED, REPLY, True)
    assert not assured(SYN_RECV, ESTABLISHED, ORIGINAL, False)     # needs IPS_SEEN_REPLY
    assert not assured(SYN_SENT, SYN_RECV, REPLY, True)
    assert not assured(ESTABLISHED, FIN_WAIT, ORIGINAL, True)
    assert not assured(SYN_SENT2, SYN_RECV, ORIGINAL, True)


# --- UDP, ICMP, generic ------------------------------------------------------------------------

def test_udp_timeouts():
    assert udp_timeout(seen_reply=False, age=0) == (30, False)
    assert udp_timeout(seen_reply=False, age=500) == (30, False)   # one-way flows never stream
    assert udp_timeout(seen_reply=True, age=0.5) == (30, False)    # replied but young: not a stream yet
    assert udp_timeout(seen_reply=True, age=2.0) == (30, False)    # time_after() is strict
    assert udp_timeout(seen_reply=True, age=2.5) == (120, True)
    assert (UDP_TIMEOUT, UDP_STREAM_TIMEOUT) == (30, 120)


def test_icmp_and_generic():
    assert ICMP_TIMEOUT == 30                                      # nf_ct_icmp_timeout
    assert GENERIC_TIMEOUT == 600                                  # nf_ct_generic_timeout


# --- properties -------------------------------------------------------------------------------

VERDICTS = {INVALID, IGNORE}


def test_every_cell_and_flag_byte_is_a_state_or_verdict():
    for state in STATES:
        for direction in (ORIGINAL, REPLY):
            for flags in range(256):
                assert next_state(state, direction, flags) in set(STATES) | VERDICTS


packets = st.lists(st.tuples(st.sampled_from([ORIGINAL, REPLY]), st.integers(0, 255)), max_size=40)


@settings(max_examples=400, deadline=None)
@given(first=st.integers(0, 255), pkts=packets, profile=st.sampled_from(sorted(PROFILES)))
def test_any_packet_sequence_stays_in_states(first, pkts, profile):
    c = Conn(first, profile)
    assert (c.state == INVALID) == (not valid_flags(first) or index(first) not in ("SYN", "ACK"))
    if c.state == INVALID:
        return
    for direction, flags in pkts:
        verdict = c.packet(direction, flags)
        assert verdict in set(STATES) | VERDICTS | {"REOPEN"}
        assert c.state in STATES and c.state != NONE
        assert c.timer is not None and c.timer >= 0
        assert timeout(c.state, profile, seen_reply=c.seen_reply) >= 0
