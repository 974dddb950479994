"""The conformance suite: every scenario on an all-kernel and an all-vswitch cluster, compared.

The lab part runs the whole suite once per test session (one lab per
topology and side) and reports each scenario as its own test, so a
difference names its scenario. The self-test breaks vswitch on purpose (TTL
never decremented, injected into the lab's daemons through a sitecustomize
module) and checks the comparison notices. Unit tests cover the comparison,
the known-differences table and the conntrack parser without a lab.
"""

from __future__ import annotations

import json
import os

import pytest

from conformance.cluster import parse_conntrack_line
from conformance.core import compare, known_differences, load_scenarios, open_differences, run, select

SCENARIOS = sorted(load_scenarios())


# --- without a lab ---------------------------------------------------------------------------------------

def test_compare_verdicts():
    assert compare({"a": 1}, {"a": 1}) == ("pass", [])
    assert compare({"a": 1, "b": 2}, {"a": 1, "b": 3}) == ("differs", ["b"])
    assert compare({"a": 1, "b": 2}, {"a": 1, "b": 3}, {"b"}) == ("known-difference", ["b"])
    assert compare({"a": 1}, {"a": 1, "c": 0}) == ("differs", ["c"])  # a key only one side saw
    # an error on one side is never a known difference
    assert compare({"a": 1}, {"error": "boom"}, {"a", "error"})[0] == "differs"


def test_known_differences_come_from_the_doc_table(tmp_path):
    doc = tmp_path / "conformance.md"
    doc.write_text("# x\n\n| scenario | key | reason |\n|---|---|---|\n"
                   "| `arp-foo` | `replies` | because |\n| `arp-foo` | `x` | also |\nnot a row `a` `b`\n")
    assert known_differences(str(doc)) == {"arp-foo": {"replies", "x"}}
    # every scenario the real doc lists exists, and none is both deliberate and open
    for name in list(known_differences()) + list(open_differences()):
        assert name in load_scenarios(), f"docs/conformance.md lists unknown scenario {name}"
    assert not set(known_differences()) & set(open_differences())
    doc.write_text("## Known differences\n| `a-b` | `k` | r |\n## Open differences\n"
                   "| scenario | cause | next |\n|---|---|---|\n| `c-d` | the cause | fix it |\n## Other\n| `e-f` | x |\n")
    assert open_differences(str(doc)) == {"c-d": "the cause"}
    assert known_differences(str(doc)) == {"a-b": {"k"}}


def test_scenarios_are_many_documented_and_selectable():
    reg = load_scenarios()
    assert len(reg) >= 40, f"only {len(reg)} scenarios"
    assert all(s.doc and s.spec for s in reg.values()), [s.name for s in reg.values() if not (s.doc and s.spec)]
    assert [s.name for s in select(["ttl-exceeded-at-first-hop"])] == ["ttl-exceeded-at-first-hop"]
    assert {s.name for s in select(["ttl-exceeded-*"])} == {"ttl-exceeded-at-first-hop", "ttl-exceeded-at-second-hop"}


def test_conntrack_line_parses_into_the_vswitch_shape():
    line = ("tcp      6 117 SYN_SENT src=10.244.1.2 dst=10.96.0.10 sport=40000 dport=80 [UNREPLIED] "
            "src=10.244.1.3 dst=10.244.1.2 sport=8080 dport=40000 mark=0 use=1")
    assert parse_conntrack_line(line) == {
        "proto": "tcp", "state": "SYN_SENT", "flags": ["UNREPLIED"],
        "orig": {"src": "10.244.1.2", "dst": "10.96.0.10", "sport": 40000, "dport": 80},
        "reply": {"src": "10.244.1.3", "dst": "10.244.1.2", "sport": 8080, "dport": 40000}}
    udp = parse_conntrack_line("udp      17 29 src=10.244.1.2 dst=10.96.0.10 sport=1 dport=53 src=10.244.2.2 "
                               "dst=10.244.1.2 sport=5353 dport=1 [ASSURED] mark=0 use=1")
    assert udp["state"] is None and udp["flags"] == ["ASSURED"] and udp["reply"]["sport"] == 5353


def test_cli_lists_scenarios(capsys):
    from vswitch.cli import main
    assert main(["conformance", "--list", "-k", "ttl-exceeded"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and out[0].startswith("ttl-exceeded-at-first-hop")
    assert main(["conformance", "--list", "-k", "no-such-scenario"]) == 1


# --- the suite --------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def outcomes():
    from vswitch.sandbox import in_sandbox
    if not in_sandbox():
        pytest.fail("conformance labs used outside a vswitch sandbox", pytrace=False)
    return {o.scenario: o for o in run(select())}


OPEN = open_differences()


@pytest.mark.lab
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.xfail(reason=f"open difference: {OPEN[n]}"))
                                  if n in OPEN else n for n in SCENARIOS])
def test_scenario(outcomes, name):
    o = outcomes[name]
    assert o.verdict in ("pass", "known-difference"), (
        f"{name}: {o.verdict} on {o.differing}\n kernel:  {json.dumps(o.kernel, default=str)}\n"
        f" vswitch: {json.dumps(o.vswitch, default=str)}")
    assert "error" not in o.kernel, o.kernel  # a scenario must work on the reference


FAULT = '''
import os
if os.environ.get("VSWITCH_FAULT") == "no-ttl-decrement":  # conformance self-test only
    import router.ipv4 as _ipv4
    _ipv4.dec_ttl = lambda buf, off: buf[off + 8]
'''


@pytest.mark.lab
def test_self_test_a_broken_vswitch_is_reported(tmp_path, monkeypatch):
    """vswitch with TTLs never decremented: the TTL scenarios must come out `differs`."""
    from vswitch.sandbox import in_sandbox
    if not in_sandbox():
        pytest.fail("conformance labs used outside a vswitch sandbox", pytrace=False)
    (tmp_path / "sitecustomize.py").write_text(FAULT)
    monkeypatch.setenv("VSWITCH_FAULT", "no-ttl-decrement")
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    res = {o.scenario: o for o in run(select(["ttl-decremented-once-per-node", "ttl-exceeded-at-second-hop"]))}
    o = res["ttl-decremented-once-per-node"]
    assert o.verdict == "differs" and o.differing == ["at_b1"], o.to_dict()
    assert o.kernel["at_b1"][0]["ttl"] == 62 and o.vswitch["at_b1"][0]["ttl"] == 64
    assert res["ttl-exceeded-at-second-hop"].verdict == "differs"
