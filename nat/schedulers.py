"""Endpoint schedulers: how a new connection picks one of a Service's endpoints.

``random`` is what kube-proxy's iptables mode (``statistic --probability
1/(n-i)`` per rule, uniform overall) and nftables mode (``numgen random mod
N``) give. ``rr``, ``lc``, ``sh`` and ``mh`` are IPVS's round robin, least
connections, source hashing and Maglev hashing (ip_vs_rr.c, ip_vs_lc.c,
ip_vs_sh.c, ip_vs_mh.c), all with equal weights.

Each returns (index, why): ``why`` is a short phrase for traces.
"""

from __future__ import annotations

import random
import zlib
from typing import Callable, Dict, List, Sequence, Tuple

SH_BUCKETS = 256  # IP_VS_SH_TAB_SIZE
MH_TABLE = 251  # IP_VS_MH_TAB_SIZE default (a prime)


def _hash32(x: int, salt: int = 0) -> int:
    return zlib.crc32(x.to_bytes(4, "big"), salt) & 0xFFFFFFFF


class Random:
    name = "random"

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def pick(self, endpoints: Sequence, client: int, conns: Callable) -> Tuple[int, str]:
        n = len(endpoints)
        return self.rng.randrange(n), f"uniform random among {n}"


class RoundRobin:
    name = "rr"

    def __init__(self, rng: random.Random) -> None:
        self.next = 0

    def pick(self, endpoints: Sequence, client: int, conns: Callable) -> Tuple[int, str]:
        i = self.next % len(endpoints)
        self.next = i + 1
        return i, f"round robin, position {i}"


class LeastConn:
    name = "lc"

    def __init__(self, rng: random.Random) -> None:
        pass

    def pick(self, endpoints: Sequence, client: int, conns: Callable) -> Tuple[int, str]:
        counts = [conns(ep) for ep in endpoints]
        i = counts.index(min(counts))  # first of the least loaded, as ip_vs_lc walks the list
        return i, f"least connections ({counts[i]} of {counts})"


class SourceHash:
    name = "sh"

    def __init__(self, rng: random.Random) -> None:
        pass

    def pick(self, endpoints: Sequence, client: int, conns: Callable) -> Tuple[int, str]:
        bucket = _hash32(client) % SH_BUCKETS
        i = bucket % len(endpoints)  # buckets are dealt to endpoints in turn
        return i, f"source hash bucket {bucket}"


class Maglev:
    """Maglev hashing (Eisenbud et al., NSDI 2016): a lookup table that moves few clients when endpoints change."""

    name = "mh"

    def __init__(self, rng: random.Random) -> None:
        self._table: List[int] = []
        self._for: tuple = ()

    def _populate(self, endpoints: Sequence) -> List[int]:
        n, m = len(endpoints), MH_TABLE
        prefs = []
        for ep in endpoints:
            key = str(ep).encode()
            offset = zlib.crc32(key, 1) % m
            skip = zlib.crc32(key, 2) % (m - 1) + 1
            prefs.append((offset, skip))
        table, nxt, filled = [-1] * m, [0] * n, 0
        while True:
            for i, (offset, skip) in enumerate(prefs):
                while True:
                    c = (offset + nxt[i] * skip) % m
                    nxt[i] += 1
                    if table[c] < 0:
                        break
                table[c] = i
                filled += 1
                if filled == m:
                    return table

    def pick(self, endpoints: Sequence, client: int, conns: Callable) -> Tuple[int, str]:
        key = tuple(endpoints)
        if key != self._for:
            self._table, self._for = self._populate(endpoints), key
        slot = _hash32(client) % MH_TABLE
        return self._table[slot], f"maglev slot {slot}"


SCHEDULERS: Dict[str, type] = {c.name: c for c in (Random, RoundRobin, LeastConn, SourceHash, Maglev)}
