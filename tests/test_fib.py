"""Unit tests for router.fib (the IPv4 FIB).

Expected behaviour: kernel-dataplane-spec.md section 2, item 14 (longest prefix
wins; for the same prefix, the lowest metric) and item 9 (blackhole,
unreachable and prohibit routes are found by lookup like any other, the caller
turns them into a silent drop, ICMP 3/1 or 3/13); text forms follow iproute2's
`ip route add` / `ip route show`.
"""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.fib import BLACKHOLE, LOCAL, PROHIBIT, UNICAST, UNREACHABLE, Fib, Route


def ip(s: str) -> int:
    return int(ipaddress.IPv4Address(s))


def net(s: str) -> tuple:
    n = ipaddress.IPv4Network(s)
    return int(n.network_address), n.prefixlen


def R(cidr: str, dev: str = "eth0", **kw) -> Route:
    """A unicast device route for cidr (tests mostly care about prefix and metric)."""
    prefix, plen = net(cidr)
    return Route(prefix, plen, dev=dev, **kw)


def fib_of(*routes: Route) -> Fib:
    f = Fib()
    for r in routes:
        f.add(r)
    return f


# --- lookup ---------------------------------------------------------------

def test_empty_fib_finds_nothing():
    f = Fib()
    assert f.lookup(ip("10.0.0.1")) is None
    assert len(f) == 0 and f.routes() == [] and f.prefix_lengths() == []


def test_default_route_matches_everything():
    d = Route(0, 0, gateway=ip("192.168.1.1"), dev="uplink")
    f = fib_of(d)
    for a in ("0.0.0.0", "10.1.2.3", "192.168.1.1", "255.255.255.255"):
        assert f.lookup(ip(a)) is d


def test_host_route_matches_only_its_address():
    h = R("10.0.0.5/32", dev="p5")
    f = fib_of(h, R("10.0.0.0/24", dev="pods"))
    assert f.lookup(ip("10.0.0.5")) is h
    assert f.lookup(ip("10.0.0.4")).dev == "pods"
    assert f.lookup(ip("10.0.0.6")).dev == "pods"
    assert f.lookup(ip("10.0.1.5")) is None


def test_longest_prefix_wins_over_any_metric():
    routes = {c: R(c, dev=c) for c in ("0.0.0.0/0", "10.0.0.0/8", "10.1.0.0/16", "10.1.2.0/24", "10.1.2.3/32")}
    # shorter prefixes get the better metrics: they must still lose
    f = Fib()
    for i, r in enumerate(routes.values()):
        f.add(Route(r.prefix, r.plen, dev=r.dev, metric=100 - i * 10))
    assert f.lookup(ip("10.1.2.3")).dev == "10.1.2.3/32"
    assert f.lookup(ip("10.1.2.4")).dev == "10.1.2.0/24"
    assert f.lookup(ip("10.1.3.4")).dev == "10.1.0.0/16"
    assert f.lookup(ip("10.2.3.4")).dev == "10.0.0.0/8"
    assert f.lookup(ip("11.0.0.1")).dev == "0.0.0.0/0"
    assert f.prefix_lengths() == [32, 24, 16, 8, 0]


def test_deleting_the_longest_exposes_the_shorter():
    f = fib_of(R("10.0.0.0/8", dev="a"), R("10.1.0.0/16", dev="b"))
    assert f.lookup(ip("10.1.0.1")).dev == "b"
    f.delete(*net("10.1.0.0/16"))
    assert f.lookup(ip("10.1.0.1")).dev == "a"
    assert f.prefix_lengths() == [8]
    f.delete(*net("10.0.0.0/8"))
    assert f.lookup(ip("10.1.0.1")) is None and f.prefix_lengths() == []


def test_same_prefix_lowest_metric_wins_and_delete_exposes_next():
    f = fib_of(R("10.2.0.0/16", dev="m100", metric=100), R("10.2.0.0/16", dev="m10", metric=10),
               R("10.2.0.0/16", dev="m50", metric=50))
    dst = ip("10.2.3.4")
    assert f.lookup(dst).dev == "m10"
    assert f.delete(*net("10.2.0.0/16")).dev == "m10"           # metric None: the best one
    assert f.lookup(dst).dev == "m50"
    assert f.delete(*net("10.2.0.0/16"), metric=100).dev == "m100"  # a named one, not the best
    assert f.lookup(dst).dev == "m50"
    f.add(R("10.2.0.0/16", dev="m0", metric=0))
    assert f.lookup(dst).dev == "m0"
    assert len(f) == 2


@pytest.mark.parametrize("rtype", [BLACKHOLE, UNREACHABLE, PROHIBIT])
def test_reject_routes_are_returned_by_lookup(rtype):
    # More specific reject route inside a reachable /8: the reject route wins.
    f = fib_of(R("10.0.0.0/8", dev="uplink"), Route(*net("10.9.0.0/16"), type=rtype))
    assert f.lookup(ip("10.9.1.1")).type == rtype
    assert f.lookup(ip("10.8.1.1")).type == UNICAST


def test_local_route_is_returned_by_lookup():
    loc = Route(ip("10.244.1.1"), 32, type=LOCAL, dev="pods", prefsrc=ip("10.244.1.1"), proto="kernel")
    f = fib_of(R("10.244.1.0/24", dev="pods"), loc)
    assert f.lookup(ip("10.244.1.1")) is loc


# --- add / delete / replace / generation ----------------------------------

def test_duplicate_add_is_refused():
    f = fib_of(R("10.0.0.0/8", dev="a", metric=5))
    with pytest.raises(ValueError, match="exists"):
        f.add(R("10.0.0.0/8", dev="b", metric=5))
    # the type does not matter: the key is (prefix, plen, metric), as in the kernel
    with pytest.raises(ValueError, match="exists"):
        f.add(Route(*net("10.0.0.0/8"), type=BLACKHOLE, metric=5))
    f.add(R("10.0.0.0/8", dev="c", metric=6))  # another metric is another route
    assert len(f) == 2 and f.lookup(ip("10.0.0.1")).dev == "a"


def test_replace_swaps_the_route_with_the_same_key():
    f = fib_of(R("10.0.0.0/8", dev="a", metric=5), R("10.0.0.0/8", dev="z", metric=9))
    f.add(Route(*net("10.0.0.0/8"), type=BLACKHOLE, metric=5), replace=True)
    assert len(f) == 2
    assert f.lookup(ip("10.0.0.1")).type == BLACKHOLE
    assert [r.metric for r in f.routes()] == [5, 9]


def test_replace_of_an_absent_route_adds_it():
    f = Fib()
    f.add(R("10.0.0.0/8", dev="a"), replace=True)
    assert len(f) == 1 and f.lookup(ip("10.0.0.1")).dev == "a"


def test_delete_errors():
    f = fib_of(R("10.0.0.0/8", dev="a", metric=5))
    with pytest.raises(KeyError, match=r"no route 10\.1\.0\.0/16"):
        f.delete(*net("10.1.0.0/16"))
    with pytest.raises(KeyError, match=r"no route 10\.0\.0\.0/8 metric 6"):
        f.delete(*net("10.0.0.0/8"), metric=6)
    with pytest.raises(ValueError, match="host bits"):
        f.delete(ip("10.0.0.1"), 8)
    with pytest.raises(ValueError, match="prefix length"):
        f.delete(0, 33)
    assert len(f) == 1 and f.generation == 1
    f.delete(*net("10.0.0.0/8"))
    with pytest.raises(KeyError):
        f.delete(*net("10.0.0.0/8"))


def test_generation_counts_every_change_and_only_changes():
    f = Fib()
    assert f.generation == 0
    f.add(R("10.0.0.0/8"))
    f.add(R("10.0.0.0/8", metric=1))
    assert f.generation == 2
    f.add(R("10.0.0.0/8", dev="x"), replace=True)
    assert f.generation == 3
    with pytest.raises(ValueError):
        f.add(R("10.0.0.0/8"))
    with pytest.raises(KeyError):
        f.delete(*net("11.0.0.0/8"))
    assert f.generation == 3
    f.lookup(ip("10.0.0.1"))
    f.routes()
    assert f.generation == 3
    f.delete(*net("10.0.0.0/8"))
    assert f.generation == 4


def test_routes_are_listed_in_ip_route_order():
    texts = ["10.244.2.0/24 via 192.168.1.12 dev uplink metric 100", "default via 192.168.1.1 dev uplink",
             "10.0.0.0/8 dev a metric 7", "10.0.0.0/8 dev a metric 3", "10.0.0.0/16 dev b", "blackhole 9.0.0.0/8",
             "10.244.1.1 dev pods"]
    f = fib_of(*(Fib.parse(t) for t in texts))
    assert [r.describe() for r in f.routes()] == [
        "default via 192.168.1.1 dev uplink",
        "blackhole 9.0.0.0/8",
        "10.0.0.0/16 dev b scope link",       # same address: the longer prefix first (trie leaf order)
        "10.0.0.0/8 dev a scope link metric 3",
        "10.0.0.0/8 dev a scope link metric 7",
        "10.244.1.1 dev pods scope link",
        "10.244.2.0/24 via 192.168.1.12 dev uplink metric 100",
    ]


# --- Route ----------------------------------------------------------------

@pytest.mark.parametrize("kw, msg", [
    (dict(prefix=ip("10.0.0.1"), plen=8, dev="a"), "host bits"),
    (dict(prefix=0, plen=33, dev="a"), "prefix length"),
    (dict(prefix=1 << 32, plen=32, dev="a"), "not an IPv4 address"),
    (dict(prefix=0, plen=0, type="anycast", dev="a"), "route type"),
    (dict(prefix=0, plen=0), "needs a gateway or a dev"),
    (dict(prefix=0, plen=0, type=BLACKHOLE, dev="a"), "no gateway or dev"),
    (dict(prefix=0, plen=0, type=UNREACHABLE, gateway=1), "no gateway or dev"),
    (dict(prefix=0, plen=0, dev="a", onlink=True), "onlink"),
    (dict(prefix=0, plen=0, dev="a", metric=-1), "metric"),
    (dict(prefix=ip("10.0.0.1"), plen=32, type=LOCAL), "local"),
])
def test_route_refuses_what_the_kernel_refuses(kw, msg):
    with pytest.raises(ValueError, match=msg):
        Route(**kw)


def test_route_is_immutable_and_compares_by_value():
    r = R("10.0.0.0/8", metric=5)
    with pytest.raises(AttributeError):
        r.metric = 1
    assert r == R("10.0.0.0/8", metric=5) and hash(r) == hash(R("10.0.0.0/8", metric=5))
    assert r != R("10.0.0.0/8", metric=6)
    assert r.network == ipaddress.IPv4Network("10.0.0.0/8")


def test_describe_and_to_dict():
    r = Route(*net("10.244.2.0/24"), gateway=ip("192.168.1.12"), dev="uplink", metric=100, proto="static")
    assert r.describe() == "10.244.2.0/24 via 192.168.1.12 dev uplink proto static metric 100"
    assert r.to_dict() == {"dst": "10.244.2.0/24", "type": "unicast", "gateway": "192.168.1.12", "dev": "uplink",
                           "metric": 100, "prefsrc": None, "proto": "static", "scope": "global", "onlink": False}
    c = Route(*net("10.244.1.0/24"), dev="pods", prefsrc=ip("10.244.1.1"), proto="kernel")
    assert c.describe() == "10.244.1.0/24 dev pods proto kernel scope link src 10.244.1.1"
    assert c.to_dict()["scope"] == "link" and c.to_dict()["prefsrc"] == "10.244.1.1"
    assert Route(*net("10.0.0.0/8"), type=BLACKHOLE).describe() == "blackhole 10.0.0.0/8"
    assert Route(*net("10.1.0.0/16"), type=UNREACHABLE, metric=5).describe() == "unreachable 10.1.0.0/16 metric 5"
    assert Route(*net("10.8.0.0/16"), type=PROHIBIT).describe() == "prohibit 10.8.0.0/16"
    assert Route(0, 0, gateway=ip("192.168.1.1"), dev="uplink").describe() == "default via 192.168.1.1 dev uplink"
    assert Route(0, 0, type=UNREACHABLE).to_dict()["dst"] == "default"
    h = R("10.0.0.5/32", dev="p")
    assert h.describe() == "10.0.0.5 dev p scope link"   # `ip route` prints host routes bare
    assert h.to_dict()["dst"] == "10.0.0.5/32"
    loc = Route(ip("10.1.0.1"), 32, type=LOCAL, dev="pods", prefsrc=ip("10.1.0.1"), proto="kernel")
    assert loc.describe() == "local 10.1.0.1 dev pods proto kernel scope host src 10.1.0.1"
    assert loc.to_dict()["scope"] == "host"
    onl = R("10.0.0.0/8", gateway=1, onlink=True, metric=3)
    assert onl.describe() == "10.0.0.0/8 via 0.0.0.1 dev eth0 metric 3 onlink"


# --- parse ----------------------------------------------------------------

@pytest.mark.parametrize("text, want", [
    ("10.244.2.0/24 via 192.168.1.12 dev uplink metric 100",
     dict(prefix=ip("10.244.2.0"), plen=24, type=UNICAST, gateway=ip("192.168.1.12"), dev="uplink", metric=100)),
    ("blackhole 10.0.0.0/8", dict(prefix=ip("10.0.0.0"), plen=8, type=BLACKHOLE, gateway=None, dev=None)),
    ("default via 1.2.3.4", dict(prefix=0, plen=0, type=UNICAST, gateway=ip("1.2.3.4"), dev=None, metric=0)),
    ("unreachable 10.9.0.0/16", dict(plen=16, type=UNREACHABLE)),
    ("prohibit 10.8.0.0/16", dict(prefix=ip("10.8.0.0"), type=PROHIBIT)),
    ("10.1.0.0/24 dev pods src 10.1.0.1", dict(dev="pods", prefsrc=ip("10.1.0.1"), gateway=None)),
    ("10.1.0.7 dev p7", dict(prefix=ip("10.1.0.7"), plen=32)),
    ("unicast 10.0.0.0/8 dev a proto host-gw priority 7 onlink via 1.1.1.1",
     dict(proto="host-gw", metric=7, onlink=True, gateway=ip("1.1.1.1"))),
    ("  unreachable   default  metric 5 ", dict(prefix=0, plen=0, type=UNREACHABLE, metric=5)),
    ("local 10.1.0.1 dev pods proto kernel scope host src 10.1.0.1", dict(type=LOCAL, plen=32)),
])
def test_parse_forms(text, want):
    r = Fib.parse(text)
    for field, value in want.items():
        assert getattr(r, field) == value, field


@pytest.mark.parametrize("text, token", [
    ("", "empty"),
    ("blackhole", "needs a prefix"),
    ("10.0.0.300/8 dev a", "10.0.0.300"),
    ("10.0.0.0/33 dev a", "10.0.0.0/33"),
    ("10.0.0.0/x dev a", "10.0.0.0/x"),
    ("10.0.0.1/8 dev a", "host bits"),
    ("fe80::/64 dev a", "fe80::"),
    ("10.0.0.0/8 dev a table main", "table"),
    ("10.0.0.0/8 dev a bogus", "bogus"),
    ("10.0.0.0/8 via", "'via' needs a value"),
    ("10.0.0.0/8 dev", "'dev' needs a value"),
    ("10.0.0.0/8 dev a metric", "'metric' needs a value"),
    ("10.0.0.0/8 dev a metric -1", "-1"),
    ("10.0.0.0/8 dev a metric ten", "ten"),
    ("10.0.0.0/8 via 1.2.3", "1.2.3"),
    ("10.0.0.0/8 dev a src 300.1.1.1", "300.1.1.1"),
    ("10.0.0.0/8 dev a dev b", "duplicate 'dev'"),
    ("10.0.0.0/8 dev a metric 1 priority 2", "duplicate 'priority'"),
    ("10.0.0.0/8 via 1.1.1.1 dev a scope link", "scope 'link'"),
    ("blackhole 10.0.0.0/8 dev a", "no gateway or dev"),
    ("10.0.0.0/8", "needs a gateway or a dev"),
])
def test_parse_rejects_garbage_naming_the_token(text, token):
    with pytest.raises(ValueError) as exc:
        Fib.parse(text)
    assert token in str(exc.value)


addrs = st.integers(0, 2**32 - 1)
names = st.sampled_from(["eth0", "uplink", "pods", "flannel.1", "veth-a_1"])


@st.composite
def unicast_routes(draw) -> Route:
    plen = draw(st.integers(0, 32))
    prefix = draw(addrs) & ((0xFFFFFFFF << (32 - plen)) & 0xFFFFFFFF)
    gateway = draw(st.none() | addrs)
    dev = draw(names) if gateway is None else draw(st.none() | names)
    return Route(prefix, plen, UNICAST, gateway=gateway, dev=dev, metric=draw(st.integers(0, 2**32 - 1)),
                 prefsrc=draw(st.none() | addrs),
                 proto=draw(st.sampled_from(["boot", "static", "kernel", "host-gw", "vxlan"])),
                 onlink=gateway is not None and dev is not None and draw(st.booleans()))


@given(unicast_routes())
def test_describe_and_to_dict_round_trip_through_parse(r):
    back = Fib.parse(r.describe())
    assert back == r
    assert back.to_dict() == r.to_dict()
    d = r.to_dict()   # to_dict carries the same information as the text form
    text = " ".join([d["dst"]] + [f"{k} {v}" for k, v in (("via", d["gateway"]), ("dev", d["dev"]),
                     ("proto", d["proto"]), ("scope", d["scope"]), ("src", d["prefsrc"]),
                     ("metric", d["metric"])) if v is not None] + (["onlink"] if d["onlink"] else []))
    assert Fib.parse(text) == r


@pytest.mark.parametrize("rtype", [BLACKHOLE, UNREACHABLE, PROHIBIT])
def test_reject_routes_round_trip_through_parse(rtype):
    r = Route(*net("10.5.0.0/16"), type=rtype, metric=9)
    assert Fib.parse(r.describe()) == r


# --- property: the FIB agrees with a brute-force scan ----------------------

# Few base addresses, so routes overlap and nest, plus anything at all.
BASES = [ip(a) for a in ("10.0.0.0", "10.1.2.3", "10.1.255.255", "192.168.1.12", "0.0.0.0", "255.255.255.255")]
near = st.sampled_from(BASES) | addrs
plens = st.sampled_from([0, 32]) | st.integers(0, 32)
route_specs = st.tuples(near, plens, st.integers(0, 3), st.sampled_from([UNICAST, UNICAST, BLACKHOLE, UNREACHABLE]))


def brute_lookup(routes, dst):
    """Scan every route: longest prefix, then lowest metric."""
    best = None
    a = ipaddress.IPv4Address(dst)
    for r in routes:
        if a in r.network and (best is None or (r.plen, -r.metric) > (best.plen, -best.metric)):
            best = r
    return best


@settings(max_examples=300, deadline=None)
@given(st.lists(route_specs, max_size=40), st.lists(st.integers(0, 39), max_size=15),
       st.lists(near | st.sampled_from([b + 1 for b in BASES[:4]] + [b - 1 for b in BASES[:4]]), max_size=30))
def test_lookup_matches_brute_force(specs, deletions, dsts):
    fib, ref = Fib(), {}
    for addr, plen, metric, rtype in specs:
        prefix = addr & ((0xFFFFFFFF << (32 - plen)) & 0xFFFFFFFF)
        r = Route(prefix, plen, rtype, dev="d" if rtype == UNICAST else None, metric=metric)
        fib.add(r, replace=True)        # duplicate keys: the later one wins in both
        ref[(prefix, plen, metric)] = r
    for i in deletions:                 # delete some, by explicit metric or the best one
        keys = sorted(ref)
        if not keys:
            break
        prefix, plen, metric = keys[i % len(keys)]
        if i % 2:
            metric = min(m for (p, l, m) in ref if (p, l) == (prefix, plen))
            assert fib.delete(prefix, plen) is ref.pop((prefix, plen, metric))
        else:
            assert fib.delete(prefix, plen, metric) is ref.pop((prefix, plen, metric))
    routes = list(ref.values())
    assert len(fib) == len(routes)
    assert sorted(fib.routes(), key=lambda r: (r.prefix, r.plen, r.metric)) == \
        sorted(routes, key=lambda r: (r.prefix, r.plen, r.metric))
    assert fib.prefix_lengths() == sorted({r.plen for r in routes}, reverse=True)
    firsts = [r.prefix for r in routes]
    lasts = [r.prefix | (0xFFFFFFFF >> r.plen) for r in routes]   # each route's first and last address
    for dst in dsts + firsts + lasts:
        assert fib.lookup(dst) is brute_lookup(routes, dst), ipaddress.IPv4Address(dst)
