"""The kernel's conntrack protocol state machines and timeouts, as pure functions.

TCP mirrors net/netfilter/nf_conntrack_proto_tcp.c (Linux 6.1): the
``tcp_conntracks[2][6][TCP_CONNTRACK_MAX]`` table, ``get_conntrack_index()``,
the flag check of ``tcp_error()``, ``tcp_new()`` and the parts of
``nf_conntrack_tcp_packet()`` that do not need sequence numbers.  UDP mirrors
``nf_conntrack_udp_packet()`` (nf_conntrack_proto_udp.c, 6.x).

vswitch does no window tracking (no ``tcp_in_window()``): every packet counts
as in-window, as with ``nf_conntrack_tcp_be_liberal=1``.  What that drops from
the kernel's behaviour is listed where it matters (``timeout``, ``reopens``).

Caller protocol, per packet of an existing TCP entry::

    new = next_state(e.state, direction, flags, simultaneous_open=e.simopen)
    if new == INVALID:            # verdict INVALID: entry untouched
        return INVALID
    if new != IGNORE:             # IGNORE: accepted, state and timer untouched
        if reopens(e.state, direction, flags):
            delete e
            return handle_new(packet)     # first_state(); sender is ORIGINAL
        e.assured |= assured(e.state, new, direction, e.seen_reply)
        if refreshes(e.state, flags, e.seen_reply):
            e.expires = now + timeout(new, profile, seen_reply=e.seen_reply)
        e.state = new
        e.simopen |= new == SYN_SENT2
    if direction == REPLY:
        e.seen_reply = True       # last, as nf_conntrack_in() does

``seen_reply`` is always "a REPLY packet was accepted *before* this one": the
kernel sets IPS_SEEN_REPLY in nf_conntrack_in() after the protocol handler.
"""

from __future__ import annotations

__all__ = [
    "NONE", "SYN_SENT", "SYN_RECV", "ESTABLISHED", "FIN_WAIT", "CLOSE_WAIT", "LAST_ACK", "TIME_WAIT", "CLOSE",
    "SYN_SENT2", "STATES", "INVALID", "IGNORE", "INDEXES",
    "FIN", "SYN", "RST", "PSH", "ACK", "URG", "ECE", "CWR", "ORIGINAL", "REPLY",
    "KERNEL_TIMEOUTS", "KUBE_PROXY_TIMEOUTS", "PROFILES",
    "UDP_TIMEOUT", "UDP_STREAM_TIMEOUT", "UDP_STREAM_AGE", "ICMP_TIMEOUT", "GENERIC_TIMEOUT",
    "valid_flags", "index", "first_state", "next_state", "reopens", "refreshes", "timeout", "assured",
    "udp_timeout",
]

# States, spelled as `conntrack -L` prints them (tcp_conntrack_names[]).
NONE, SYN_SENT, SYN_RECV, ESTABLISHED, FIN_WAIT, CLOSE_WAIT, LAST_ACK, TIME_WAIT, CLOSE, SYN_SENT2 = (
    "NONE", "SYN_SENT", "SYN_RECV", "ESTABLISHED", "FIN_WAIT", "CLOSE_WAIT", "LAST_ACK", "TIME_WAIT", "CLOSE",
    "SYN_SENT2")
# Column order of tcp_conntracks (enum tcp_conntrack).
STATES = (NONE, SYN_SENT, SYN_RECV, ESTABLISHED, FIN_WAIT, CLOSE_WAIT, LAST_ACK, TIME_WAIT, CLOSE, SYN_SENT2)
INVALID = "INVALID"  # sIV: a verdict, never a stored state
IGNORE = "IGNORE"    # sIG: accepted, state and timer unchanged

FIN, SYN, RST, PSH, ACK, URG, ECE, CWR = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80
ORIGINAL, REPLY = 0, 1

# tcp_timeouts[] (seconds).  UNACK/RETRANS are the shortened timers the kernel
# uses for unacknowledged data / retransmissions.
KERNEL_TIMEOUTS: dict[str, float] = {
    SYN_SENT: 120.0, SYN_RECV: 60.0, ESTABLISHED: 432000.0, FIN_WAIT: 120.0, CLOSE_WAIT: 60.0,
    LAST_ACK: 30.0, TIME_WAIT: 120.0, CLOSE: 10.0, SYN_SENT2: 120.0, "UNACK": 300.0, "RETRANS": 300.0,
}
# kube-proxy writes nf_conntrack_tcp_timeout_established / _close_wait from
# --conntrack-tcp-timeout-established (24h) / --conntrack-tcp-timeout-close-wait (1h).
KUBE_PROXY_TIMEOUTS: dict[str, float] = {**KERNEL_TIMEOUTS, ESTABLISHED: 86400.0, CLOSE_WAIT: 3600.0}
PROFILES = {"kernel": KERNEL_TIMEOUTS, "kube-proxy": KUBE_PROXY_TIMEOUTS}

# nf_conntrack_udp_timeout(_stream), nf_ct_icmp_timeout, nf_ct_generic_timeout.
UDP_TIMEOUT, UDP_STREAM_TIMEOUT, ICMP_TIMEOUT, GENERIC_TIMEOUT = 30.0, 120.0, 30.0, 600.0
UDP_STREAM_AGE = 2.0  # ct->proto.udp.stream_ts = creation + 2*HZ

# enum tcp_bit_set, in table row order.
INDEXES = ("SYN", "SYNACK", "FIN", "ACK", "RST", "NONE")

sNO, sSS, sSR, sES, sFW, sCW, sLA, sTW, sCL, sS2, sIV, sIG = (*STATES, INVALID, IGNORE)

# tcp_conntracks[dir][index][state]; columns are STATES.
_TABLE: tuple[dict[str, tuple[str, ...]], dict[str, tuple[str, ...]]] = (
    {  # ORIGINAL
        #          sNO  sSS  sSR  sES  sFW  sCW  sLA  sTW  sCL  sS2
        "SYN":    (sSS, sSS, sIG, sIG, sIG, sIG, sIG, sSS, sSS, sS2),
        "SYNACK": (sIV, sIV, sSR, sIV, sIV, sIV, sIV, sIV, sIV, sSR),
        "FIN":    (sIV, sIV, sFW, sFW, sLA, sLA, sLA, sTW, sCL, sIV),
        "ACK":    (sES, sIV, sES, sES, sCW, sCW, sTW, sTW, sCL, sIV),
        "RST":    (sIV, sCL, sCL, sCL, sCL, sCL, sCL, sCL, sCL, sCL),
        "NONE":   (sIV,) * 10,
    },
    {  # REPLY
        #          sNO  sSS  sSR  sES  sFW  sCW  sLA  sTW  sCL  sS2
        "SYN":    (sIV, sS2, sIV, sIV, sIV, sIV, sIV, sSS, sIV, sS2),
        "SYNACK": (sIV, sSR, sIG, sIG, sIG, sIG, sIG, sIG, sIG, sSR),
        "FIN":    (sIV, sIV, sFW, sFW, sLA, sLA, sLA, sTW, sCL, sIV),
        "ACK":    (sIV, sIG, sSR, sES, sCW, sCW, sTW, sTW, sCL, sIG),
        "RST":    (sIV, sCL, sCL, sCL, sCL, sCL, sCL, sCL, sCL, sCL),
        "NONE":   (sIV,) * 10,
    },
)
_COL = {s: i for i, s in enumerate(STATES)}

# tcp_valid_flags[]: combinations of FIN/SYN/RST/ACK/URG that tcp_error() lets
# through (PSH, ECE and CWR are masked off first).
_VALID_FLAGS = frozenset({SYN, SYN | URG, SYN | ACK, RST, RST | ACK, FIN | ACK, FIN | ACK | URG, ACK, ACK | URG})


def valid_flags(flags: int) -> bool:
    """tcp_error()'s flag check: False for combinations the kernel marks INVALID
    in any state (bare FIN, SYN+FIN, SYN+RST, no flags, ...)."""
    return (flags & (FIN | SYN | RST | ACK | URG)) in _VALID_FLAGS


def index(flags: int) -> str:
    """get_conntrack_index(): RST first, then SYN (+ACK), FIN, ACK."""
    if flags & RST:
        return "RST"
    if flags & SYN:
        return "SYNACK" if flags & ACK else "SYN"
    if flags & FIN:
        return "FIN"
    if flags & ACK:
        return "ACK"
    return "NONE"


def _check(state: str, direction: int) -> None:
    if state not in _COL:
        raise ValueError(f"not a TCP conntrack state: {state!r}")
    if direction not in (ORIGINAL, REPLY):
        raise ValueError(f"direction must be ORIGINAL or REPLY, not {direction!r}")


def first_state(flags: int, *, loose: bool = True) -> str:
    """State for the packet that creates a connection (tcp_new()).

    tcp_conntracks[ORIGINAL][index][NONE]: a SYN gives SYN_SENT; a plain ACK is a
    mid-stream pickup giving ESTABLISHED, allowed only with
    nf_conntrack_tcp_loose=1 (the default, ``loose``).  SYN-ACK, FIN, RST, no
    flags, and any combination tcp_error() rejects give INVALID (no entry).
    """
    if not valid_flags(flags):
        return INVALID
    new = _TABLE[ORIGINAL][index(flags)][_COL[NONE]]
    if new == ESTABLISHED and not loose:
        return INVALID
    return new


def next_state(state: str, direction: int, flags: int, *, simultaneous_open: bool = False) -> str:
    """New state after a packet: tcp_conntracks[direction][index][state].

    Returns a state, INVALID (sIV, or a flag combination tcp_error() rejects)
    or IGNORE (sIG).  On INVALID and IGNORE the caller keeps the old state and
    does not renew the timer (nf_conntrack_tcp_packet() returns before
    nf_ct_refresh_acct()).

    A SYN in TIME_WAIT/CLOSE yields SYN_SENT; check ``reopens()`` before
    storing it, since the kernel then replaces the entry with a new one.

    ``simultaneous_open``: the entry has been through SYN_SENT2 (the kernel's
    IP_CT_TCP_SIMULTANEOUS_OPEN flag).  Then a REPLY ACK in SYN_RECV gives
    ESTABLISHED instead of the table's SYN_RECV.

    Kernel special cases that need sequence numbers or per-packet history
    (last_index/last_dir/last_end) are not modelled: RST sequence validation,
    resync on a SYN-ACK answering an ignored SYN, and the RFC 5961
    challenge-ACK guard in LAST_ACK (we go to TIME_WAIT on that ACK).
    """
    _check(state, direction)
    if not valid_flags(flags):
        return INVALID
    idx = index(flags)
    new = _TABLE[direction][idx][_COL[state]]
    if new == SYN_RECV and simultaneous_open and direction == REPLY and idx == "ACK":
        return ESTABLISHED
    return new


def reopens(state: str, direction: int, flags: int) -> bool:
    """True when the packet closes this entry and opens a new connection.

    nf_conntrack_tcp_packet(): when the table gives SYN_SENT from TIME_WAIT or
    CLOSE (an ORIGINAL SYN in either; a REPLY SYN in TIME_WAIT), the kernel
    kills the conntrack and returns NF_REPEAT, so the SYN is looked up again
    and creates a fresh entry (fresh NAT/Service backend choice) whose
    ORIGINAL direction is the SYN's sender -- for a REPLY SYN the roles swap.
    The caller deletes the entry and handles the packet with ``first_state()``.

    The kernel reopens only if a FIN was seen (IP_CT_TCP_FLAG_CLOSE_INIT, always
    true on the way to TIME_WAIT) or the last packet was an RST from the SYN's
    direction; otherwise it ignores the SYN.  We keep no such history and
    always reopen: a CLOSE entry reset by the peer is recreated rather than
    resynced.
    """
    _check(state, direction)
    return (state in (TIME_WAIT, CLOSE) and valid_flags(flags)
            and _TABLE[direction][index(flags)][_COL[state]] == SYN_SENT)


def refreshes(old: str, flags: int, seen_reply: bool) -> bool:
    """Whether a packet accepted with a state change renews the entry's timer.

    nf_conntrack_tcp_packet(): a retransmitted SYN in SYN_SENT before any reply
    does not, so port reuse cannot keep an unanswered entry alive forever.
    (INVALID and IGNORE verdicts never renew; see ``next_state``.)
    """
    return seen_reply or not (old == SYN_SENT and valid_flags(flags) and index(flags) == "SYN")


def timeout(state: str, profile: str = "kube-proxy", *, seen_reply: bool = True) -> float:
    """Seconds an entry in ``state`` lives after the packet that put it there.

    The timeout selection of nf_conntrack_tcp_packet(), without the branches
    that need tcp_in_window()'s bookkeeping: the RETRANS timer (retrans counter
    >= nf_conntrack_tcp_max_retrans, or a zero window) and the UNACK timer for
    unacknowledged data are not applied, so an entry keeps its state's timeout
    until the state changes.  What does apply, before a reply was seen:

    - ESTABLISHED (a loose mid-stream pickup) is capped at UNACK (300 s);
    - CLOSE gives 0: an RST before any reply kills the entry at once
      (nf_ct_kill_acct(), "If only reply is a RST").
    """
    try:
        timeouts = PROFILES[profile]
    except KeyError:
        raise ValueError(f"unknown timeout profile {profile!r}; one of {sorted(PROFILES)}") from None
    if state == NONE or state not in _COL:
        raise ValueError(f"no timeout for {state!r}")
    t = timeouts[state]
    if not seen_reply:
        if state == CLOSE:
            return 0.0
        if state == ESTABLISHED:
            return min(t, timeouts["UNACK"])
    return t


def assured(old: str, new: str, direction: int, seen_reply: bool) -> bool:
    """Whether this transition sets IPS_ASSURED (sticky: OR it into the entry).

    nf_conntrack_tcp_packet(): once a reply has been seen, a packet taking
    SYN_RECV or ESTABLISHED to ESTABLISHED assures the entry -- the ACK that
    completes the handshake, or the second packet after a reply for a
    picked-up connection.  The kernel's rule does not look at ``direction``.
    """
    return seen_reply and old in (SYN_RECV, ESTABLISHED) and new == ESTABLISHED


def udp_timeout(seen_reply: bool, age: float) -> tuple[float, bool]:
    """(timeout, assured) after a UDP packet; nf_conntrack_udp_packet(), 6.x.

    ``seen_reply``: a REPLY packet was seen before this one.  ``age``: seconds
    since the entry was created.  Until a reply is seen: 30 s.  Once seen, the
    flow is a stream only while still active more than 2 s after creation
    (time_after(jiffies, stream_ts), strict): then 120 s and ASSURED; a
    younger replied flow stays at 30 s and is not assured yet (so a one-shot
    DNS exchange never becomes ASSURED).  ``assured`` is sticky: OR it in.
    """
    if seen_reply and age > UDP_STREAM_AGE:
        return UDP_STREAM_TIMEOUT, True
    return UDP_TIMEOUT, False
