"""Scenarios, the runner that executes each on both dataplanes, and the comparison.

A scenario is a function ``(Cluster) -> dict`` registered with ``@scenario``:
it injects packets or traffic and returns what it observed, in roles and
plain values. The runner builds each scenario's topology twice, all-kernel
and all-vswitch (or, for ``mixed`` scenarios, all-kernel against a cluster
with one vswitch node), runs every scenario of that topology in both, and
compares the two observations key by key:

- ``pass``: equal;
- ``known-difference``: every differing key is listed for that scenario in
  docs/conformance.md (the only way a difference may pass);
- ``differs``: anything else, including a scenario that raised on one side.
"""

from __future__ import annotations

import fnmatch
import os
import re
import tempfile
import traceback
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import yaml

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "conformance.md")


@dataclass
class Scenario:
    name: str
    topology: str
    fn: Callable
    spec: str = ""  # where kernel-dataplane-spec.md describes the behaviour
    doc: str = ""


REGISTRY: Dict[str, Scenario] = {}


def scenario(topology: str, spec: str = ""):
    """Register ``fn`` as a scenario named after it (underscores become dashes)."""
    def wrap(fn):
        name = fn.__name__.replace("_", "-")
        if name in REGISTRY:
            raise ValueError(f"duplicate scenario {name}")
        REGISTRY[name] = Scenario(name, topology, fn, spec, (fn.__doc__ or "").strip().splitlines()[0]
                                  if fn.__doc__ else "")
        return fn
    return wrap


def load_scenarios() -> Dict[str, Scenario]:
    from . import scenarios  # noqa: F401  (registers them)
    return REGISTRY


def select(patterns: Optional[List[str]] = None) -> List[Scenario]:
    found = list(load_scenarios().values())
    if not patterns:
        return found
    return [s for s in found if any(fnmatch.fnmatch(s.name, p if any(c in p for c in "*?[") else f"*{p}*")
                                    for p in patterns)]


# --- known differences (docs/conformance.md) ------------------------------------------------------------

_ROW = re.compile(r"^\|\s*`([\w-]+)`\s*\|\s*`([^`]+)`\s*\|")


def known_differences(path: str = DOC) -> Dict[str, set]:
    """scenario -> keys allowed to differ, from the table rows ``| `scenario` | `key` | reason |``."""
    out: Dict[str, set] = {}
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                m = _ROW.match(line)
                if m:
                    out.setdefault(m.group(1), set()).add(m.group(2))
    except FileNotFoundError:
        pass
    return out


_OPEN = re.compile(r"^\|\s*`([\w-]+)`\s*\|\s*[^`|]")


def open_differences(path: str = DOC) -> Dict[str, str]:
    """scenario -> cause, from the "Open differences" table: differences that are not deliberate
    and not fixed yet. They stay `differs`; the test suite expects them to fail until fixed."""
    out: Dict[str, str] = {}
    section = False
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.startswith("## "):
                    section = line.strip() == "## Open differences"
                elif section and _OPEN.match(line):
                    cells = [c.strip() for c in line.strip().strip("|").split("|")]
                    out[cells[0].strip("`")] = cells[1]
    except FileNotFoundError:
        pass
    return out


def compare(kernel: dict, vswitch: dict, allowed: set = frozenset()) -> tuple:
    """(verdict, differing keys)."""
    keys = sorted(set(kernel) | set(vswitch))
    diff = [k for k in keys if kernel.get(k, "<missing>") != vswitch.get(k, "<missing>")]
    if not diff:
        return "pass", []
    if "error" not in diff and all(k in allowed for k in diff):
        return "known-difference", diff
    return "differs", diff


# --- running ----------------------------------------------------------------------------------------

@dataclass
class Outcome:
    scenario: str
    verdict: str
    kernel: dict
    vswitch: dict
    differing: List[str] = field(default_factory=list)
    spec: str = ""

    def to_dict(self) -> dict:
        return {"scenario": self.scenario, "verdict": self.verdict, "kernel": self.kernel, "vswitch": self.vswitch,
                "differing": self.differing, "spec": self.spec}


def _observe(sc: Scenario, cluster) -> dict:
    try:
        obs = sc.fn(cluster)
        if not isinstance(obs, dict):
            raise TypeError(f"scenario returned {type(obs).__name__}, not a dict")
        return obs
    except Exception as e:  # a scenario that breaks on one side is a difference, not a crash
        return {"error": f"{type(e).__name__}: {e}", "where": traceback.format_exc(limit=3).splitlines()[-3:]}


def run(selected: List[Scenario], log=lambda *a: None, sides=("kernel", "vswitch")) -> List[Outcome]:
    """Run ``selected`` scenarios on both sides, one lab per (topology, side)."""
    from vswitch import lab as vlab

    from .cluster import Cluster
    from .topologies import build

    obs: Dict[str, Dict[str, dict]] = {s.name: {} for s in selected}
    by_topo: Dict[str, List[Scenario]] = {}
    for s in selected:
        by_topo.setdefault(s.topology, []).append(s)
    with tempfile.TemporaryDirectory(prefix="vswitch-conformance-") as tmp:
        for topo_name, scs in by_topo.items():
            for side in sides:
                topo = build(topo_name, side, tmp)
                path = os.path.join(tmp, f"{topo_name}-{side}.yaml")
                with open(path, "w") as f:
                    yaml.safe_dump(topo, f, sort_keys=False)
                log(f"{topo_name}: building the {side} cluster")
                st = vlab.up(path, log=lambda *a: None)
                cluster = None
                try:
                    cluster = Cluster(st)
                    for s in scs:
                        log(f"  {s.name} ({side})")
                        obs[s.name][side] = _observe(s, cluster)
                finally:
                    if cluster is not None:
                        cluster.points.close()
                    vlab.down()
    known = known_differences()
    out = []
    for s in selected:
        k, v = obs[s.name].get(sides[0], {}), obs[s.name].get(sides[1], {})
        verdict, diff = compare(k, v, known.get(s.name, set()))
        out.append(Outcome(s.name, verdict, k, v, diff, s.spec))
    return out


def report(outcomes: List[Outcome]) -> str:
    """The table: scenario, kernel observation, vswitch observation, verdict (differing keys only
    are spelled out; equal observations are summarised)."""
    lines = [f"{'SCENARIO':<34} {'VERDICT':<17} KERNEL | VSWITCH"]
    for o in outcomes:
        if o.differing:
            k = ", ".join(f"{d}={o.kernel.get(d, '<missing>')}" for d in o.differing)
            v = ", ".join(f"{d}={o.vswitch.get(d, '<missing>')}" for d in o.differing)
        else:
            k = v = ", ".join(f"{key}={val}" for key, val in sorted(o.kernel.items()))
            k = v = k if len(k) < 70 else k[:67] + "..."
        lines.append(f"{o.scenario:<34} {o.verdict:<17} {k} | {v}")
    counts = {v: sum(1 for o in outcomes if o.verdict == v) for v in ("pass", "known-difference", "differs")}
    lines.append(f"{len(outcomes)} scenarios: {counts['pass']} pass, {counts['known-difference']} known-difference, "
                 f"{counts['differs']} differs")
    return "\n".join(lines)
