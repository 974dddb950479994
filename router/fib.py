"""IPv4 FIB: longest-prefix match, then lowest metric (kernel-dataplane-spec.md item 14).

One dict per prefix length, keyed by the masked network address, and a tuple of
the lengths in use, longest first. A lookup therefore costs at most one dict
probe per prefix length *in use* (33 at worst), however many routes there are;
a trie would be cheaper in C but in Python every node visit is interpreter work,
while a dict probe is one C call.

Reject routes (blackhole, unreachable, prohibit) are ordinary entries: lookup
returns them and the caller decides (item 9: silent drop, ICMP 3/1, ICMP 3/13).
A destination no route covers gives None (ICMP 3/0).

Addresses are plain ints (what the packet path already has), never
ipaddress objects, so the hot path allocates nothing. Standalone on purpose:
no scapy and nothing from vswitch.
"""

from __future__ import annotations

import ipaddress
import re
from bisect import insort
from typing import Dict, List, Optional, Tuple

UNICAST, BLACKHOLE, UNREACHABLE, PROHIBIT, LOCAL = "unicast", "blackhole", "unreachable", "prohibit", "local"
TYPES = (UNICAST, BLACKHOLE, UNREACHABLE, PROHIBIT, LOCAL)
REJECT_TYPES = (BLACKHOLE, UNREACHABLE, PROHIBIT)
# iproute2's default protocol for `ip route add`; `ip route show` hides it.
DEFAULT_PROTO = "boot"

_ALL = 0xFFFFFFFF
_MASKS = tuple((_ALL << (32 - p)) & _ALL for p in range(33))
_NAME = re.compile(r"[A-Za-z0-9_.:@-]+\Z")
_NUM = re.compile(r"[0-9]+\Z")  # str.isdigit() would let "²" through


def _dotted(addr: Optional[int]) -> Optional[str]:
    return None if addr is None else str(ipaddress.IPv4Address(addr))


def _check_net(prefix: int, plen: int) -> None:
    if not 0 <= plen <= 32:
        raise ValueError(f"bad prefix length {plen!r} (0..32)")
    if not 0 <= prefix <= _ALL:
        raise ValueError(f"bad prefix {prefix!r}: not an IPv4 address")
    if prefix & ~_MASKS[plen]:
        # the kernel refuses these too ("Invalid prefix for given prefix length")
        raise ValueError(f"bad prefix {_dotted(prefix)}/{plen}: host bits set")


class Route:
    """One route. Immutable: a Fib indexes it by (prefix, plen, metric)."""

    __slots__ = ("prefix", "plen", "type", "gateway", "dev", "metric", "prefsrc", "proto", "onlink")

    def __init__(self, prefix: int, plen: int, type: str = UNICAST, gateway: Optional[int] = None,
                 dev: Optional[str] = None, metric: int = 0, prefsrc: Optional[int] = None,
                 proto: str = DEFAULT_PROTO, onlink: bool = False) -> None:
        _check_net(prefix, plen)
        if type not in TYPES:
            raise ValueError(f"bad route type {type!r}")
        for what, addr in (("gateway", gateway), ("prefsrc", prefsrc)):
            if addr is not None and not 0 <= addr <= _ALL:
                raise ValueError(f"bad {what} {addr!r}: not an IPv4 address")
        if not 0 <= metric <= _ALL:
            raise ValueError(f"bad metric {metric!r} (0..4294967295)")
        # The same combinations the kernel refuses (fib_create_info, fib_check_nh).
        if type in REJECT_TYPES and (gateway is not None or dev is not None):
            raise ValueError(f"a {type} route takes no gateway or dev")
        if type == UNICAST and gateway is None and dev is None:
            raise ValueError("a unicast route needs a gateway or a dev")
        if type == LOCAL and (gateway is not None or dev is None):
            raise ValueError("a local route needs a dev and no gateway")
        if onlink and (gateway is None or dev is None):
            raise ValueError("onlink needs both a gateway and a dev")
        s = object.__setattr__
        s(self, "prefix", prefix)
        s(self, "plen", plen)
        s(self, "type", type)
        s(self, "gateway", gateway)
        s(self, "dev", dev)
        s(self, "metric", metric)
        s(self, "prefsrc", prefsrc)
        s(self, "proto", proto)
        s(self, "onlink", bool(onlink))

    def __setattr__(self, name, value):
        raise AttributeError("Route is immutable (a Fib indexes it); build a new one and add(replace=True)")

    def _key(self) -> tuple:
        return tuple(getattr(self, f) for f in self.__slots__)

    def __eq__(self, other):
        return self._key() == other._key() if isinstance(other, Route) else NotImplemented

    def __hash__(self):
        return hash(self._key())

    def __repr__(self) -> str:
        return f"Route({self.describe()!r})"

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network((self.prefix, self.plen))

    @property
    def scope(self) -> str:
        # What iproute2 picks when none is given: host for local, link for a
        # device route, global (universe) otherwise, reject routes included.
        if self.type == LOCAL:
            return "host"
        return "link" if self.type == UNICAST and self.gateway is None else "global"

    def _dst(self, bare_host: bool) -> str:
        if self.plen == 0:
            return "default"
        if self.plen == 32 and bare_host:  # `ip route` prints host routes without /32
            return _dotted(self.prefix)
        return f"{_dotted(self.prefix)}/{self.plen}"

    def describe(self) -> str:
        """The route as `ip route show` prints it (same words, same order)."""
        out = [] if self.type == UNICAST else [self.type]
        out.append(self._dst(True))
        if self.gateway is not None:
            out += ["via", _dotted(self.gateway)]
        if self.dev is not None:
            out += ["dev", self.dev]
        if self.proto != DEFAULT_PROTO:
            out += ["proto", self.proto]
        if self.scope != "global":
            out += ["scope", self.scope]
        if self.prefsrc is not None:
            out += ["src", _dotted(self.prefsrc)]
        if self.metric:
            out += ["metric", str(self.metric)]
        if self.onlink:
            out.append("onlink")
        return " ".join(out)

    def to_dict(self) -> dict:
        """Stable keys for the control socket and JSON; dst always has its /len (or is "default")."""
        return {"dst": self._dst(False), "type": self.type, "gateway": _dotted(self.gateway),
                "dev": self.dev, "metric": self.metric, "prefsrc": _dotted(self.prefsrc),
                "proto": self.proto, "scope": self.scope, "onlink": self.onlink}


def _parse_addr(tok: str, what: str) -> int:
    try:
        return int(ipaddress.IPv4Address(tok))
    except ValueError:
        raise ValueError(f"bad {what} {tok!r}: not an IPv4 address") from None


def _parse_prefix(tok: str) -> Tuple[int, int]:
    if tok == "default":
        return 0, 0
    addr, slash, plen = tok.partition("/")
    if slash and not (_NUM.match(plen) and int(plen) <= 32):
        raise ValueError(f"bad prefix {tok!r}: prefix length must be 0..32")
    prefix, plen = _parse_addr(addr, "prefix"), int(plen) if slash else 32
    if prefix & ~_MASKS[plen]:
        raise ValueError(f"bad prefix {tok!r}: host bits set")
    return prefix, plen


class Fib:
    """The routing table. Not thread-safe; the dataplane is one asyncio loop."""

    def __init__(self) -> None:
        self._routes: Dict[Tuple[int, int], List[Route]] = {}   # (prefix, plen) -> routes by metric
        self._best: Dict[int, Dict[int, Route]] = {}            # plen -> {prefix: lowest-metric route}
        # What lookup walks: (mask, dict.get) per length in use, longest first.
        # Bound get methods spare an attribute lookup per probe; the dicts are
        # mutated in place, so the tuple only changes when a length appears or goes.
        self._levels: Tuple[Tuple[int, object], ...] = ()
        self._count = 0
        self.generation = 0  # bumped on every change so callers can cache lookups

    def __len__(self) -> int:
        return self._count

    def _relevel(self) -> None:
        self._levels = tuple((_MASKS[p], self._best[p].get) for p in sorted(self._best, reverse=True))

    def add(self, route: Route, replace: bool = False) -> None:
        """Install a route. Same (prefix, plen, metric) again is an error unless
        replace, which then swaps it (or just adds, like `ip route replace`)."""
        key = (route.prefix, route.plen)
        same = self._routes.setdefault(key, [])
        for i, old in enumerate(same):
            if old.metric == route.metric:
                if not replace:
                    raise ValueError(f"route {route.network} metric {route.metric} exists: {old.describe()}")
                same[i] = route
                break
        else:
            insort(same, route, key=lambda r: r.metric)
            self._count += 1
        level = self._best.get(route.plen)
        if level is None:
            level = self._best[route.plen] = {}
            level[route.prefix] = same[0]
            self._relevel()
        else:
            level[route.prefix] = same[0]
        self.generation += 1

    def delete(self, prefix: int, plen: int, metric: Optional[int] = None) -> Route:
        """Remove and return a route; metric None means the lowest-metric one
        (as `ip route del` without a metric removes the first match)."""
        _check_net(prefix, plen)
        same = self._routes.get((prefix, plen))
        idx = None
        if same:
            if metric is None:
                idx = 0
            else:
                idx = next((i for i, r in enumerate(same) if r.metric == metric), None)
        if idx is None:
            what = f"{_dotted(prefix)}/{plen}" + ("" if metric is None else f" metric {metric}")
            raise KeyError(f"no route {what}")
        route = same.pop(idx)
        self._count -= 1
        level = self._best[plen]
        if same:
            level[prefix] = same[0]
        else:
            del self._routes[(prefix, plen)]
            del level[prefix]
            if not level:
                del self._best[plen]
                self._relevel()
        self.generation += 1
        return route

    def lookup(self, dst: int) -> Optional[Route]:
        """Longest prefix, then lowest metric; None if nothing covers dst.
        dst must be a 32-bit int: this is the per-packet path, so it is not checked."""
        for mask, get in self._levels:
            r = get(dst & mask)
            if r is not None:
                return r
        return None

    def prefix_lengths(self) -> List[int]:
        """The prefix lengths in use, longest first (the order lookup probes them)."""
        return sorted(self._best, reverse=True)

    def routes(self) -> List[Route]:
        """All routes in `ip route show` order: the kernel walks its trie by
        address, and a trie leaf lists longer prefixes first, then lower metrics
        (fib_insert_alias). So: address, longest prefix, metric. The default
        route comes first unless some other route also starts at 0.0.0.0."""
        keys = sorted(self._routes, key=lambda k: (k[0], -k[1]))
        return [r for k in keys for r in self._routes[k]]

    _SINGLE = {"onlink"}
    _VALUED = {"via", "dev", "proto", "scope", "src", "metric", "priority", "preference"}

    @staticmethod
    def parse(text: str) -> Route:
        """Parse one route in `ip route` syntax:
        [TYPE] PREFIX|default [via GW] [dev DEV] [proto P] [scope S] [src ADDR]
        [metric|priority|preference N] [onlink]. A bare address is a /32."""
        toks = text.split()
        if not toks:
            raise ValueError("empty route")
        rtype = UNICAST
        if toks[0] in TYPES:
            rtype = toks.pop(0)
        if not toks:
            raise ValueError(f"{rtype!r} needs a prefix")
        prefix, plen = _parse_prefix(toks.pop(0))
        opts: Dict[str, str] = {}
        seen = set()
        while toks:
            word = toks.pop(0)
            name = "metric" if word in ("priority", "preference") else word
            if word not in Fib._VALUED and word not in Fib._SINGLE:
                raise ValueError(f"unknown keyword {word!r} in {text!r}")
            if name in seen:
                raise ValueError(f"duplicate {word!r} in {text!r}")
            seen.add(name)
            if word in Fib._SINGLE:
                opts[name] = ""
                continue
            if not toks:
                raise ValueError(f"{word!r} needs a value in {text!r}")
            opts[name] = toks.pop(0)
        metric = opts.get("metric", "0")
        if not _NUM.match(metric):
            raise ValueError(f"bad metric {metric!r}")
        for what in ("dev", "proto"):
            if what in opts and not _NAME.match(opts[what]):
                raise ValueError(f"bad {what} {opts[what]!r}")
        route = Route(prefix, plen, rtype,
                      gateway=_parse_addr(opts["via"], "gateway") if "via" in opts else None,
                      dev=opts.get("dev"), metric=int(metric),
                      prefsrc=_parse_addr(opts["src"], "src") if "src" in opts else None,
                      proto=opts.get("proto", DEFAULT_PROTO), onlink="onlink" in opts)
        # Route derives its scope; one that disagrees cannot be represented.
        if "scope" in opts and opts["scope"] != route.scope:
            raise ValueError(f"scope {opts['scope']!r} not supported for {route.describe()!r} "
                             f"(its scope is {route.scope!r})")
        return route
