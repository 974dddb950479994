"""Human renderings of the node's tables, in the shapes users know."""

from __future__ import annotations

import json
from typing import Callable, Dict, List, Sequence


def columns(rows: List[dict], cols: Sequence[tuple]) -> str:
    """Left-aligned columns; ``cols`` is (header, key or callable)."""
    cells = [[h for h, _ in cols]]
    for r in rows:
        cells.append([str(k(r) if callable(k) else r.get(k, "")) for _, k in cols])
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in cells)


def fdb(rows: List[dict], node: str = "vswitch") -> str:
    """Like `bridge fdb show`: one entry a line."""
    out = []
    for r in rows:
        state = "static" if r["static"] else f"ageing {r['age']:.1f}s"
        out.append(f"{r['mac']} dev {r['port']} master {node} {state}")
    return "\n".join(out) if out else "(FDB empty)"


def ports(rows: List[dict], node: str = "") -> str:
    return columns(rows, [
        ("IDX", "index"), ("PORT", "name"), ("TYPE", "type"),
        ("DEVICE", lambda r: r.get("ifname") or r.get("interface") or "-"),
        ("NETNS", lambda r: r.get("netns") or "-"), ("MTU", "mtu"),
        ("HAIRPIN", lambda r: "on" if r["hairpin"] else "off"),
        ("OFFLOADS", lambda r: ",".join(r["offloads"]) or "-"),
        ("RX-PKTS", "rx_packets"), ("RX-BYTES", "rx_bytes"), ("RX-DROP", "rx_drops"),
        ("TX-PKTS", "tx_packets"), ("TX-BYTES", "tx_bytes"), ("TX-DROP", "tx_drops"),
    ])


def stats(rows: List[dict], node: str = "") -> str:
    return columns(rows, [
        ("STAGE", "stage"), ("PACKETS", "packets"),
        ("DROPS", lambda r: sum(r["drops"].values())),
        ("DETAIL", lambda r: " ".join(f"{k}={v}" for k, v in r.items()
                                      if k not in ("stage", "packets", "drops")) or "-"),
    ])


def drops(rows: List[dict], node: str = "") -> str:
    return columns(rows, [("STAGE", "stage"), ("REASON", "reason"), ("COUNT", "count"), ("MEANING", "text")])


def flows(rows: List[dict], node: str = "") -> str:
    """Like `ovs-appctl dpctl/dump-flows`: the key, hits, and the stages the flow replays."""
    out = [f"in_port({r['in_port']}),eth(src={r['src_mac']},dst={r['dst_mac']}),"
           f"ipv4(src={r['src']},dst={r['dst']}) packets:{r['hits']} stages:{','.join(r['stages'])}" for r in rows]
    return "\n".join(out) or "(no cached flows)"


def routes(rows: List[dict], node: str = "") -> str:
    """Like `ip route`: the rows carry the line already."""
    return "\n".join(r["text"] for r in rows) or "(no routes)"


def neigh(rows: List[dict], node: str = "") -> str:
    """Like `ip neigh`: 10.244.1.5 dev pods lladdr 02:..:05 REACHABLE."""
    out = []
    for r in rows:
        line = f"{r['ip']} dev {r['dev']}"
        if r.get("lladdr"):
            line += f" lladdr {r['lladdr']}"
        out.append(f"{line} {r['state']}" + (f" ({r['queued']} queued)" if r.get("queued") else ""))
    return "\n".join(out) or "(no neighbours)"


def interfaces(rows: List[dict], node: str = "") -> str:
    return columns(rows, [("IFACE", "name"), ("KIND", "kind"), ("PORT", lambda r: r["port"] or "(bridge)"),
                          ("MAC", "mac"), ("MTU", "mtu"), ("ADDRESSES", lambda r: " ".join(r["addresses"]))])


RENDER: Dict[str, Callable[..., str]] = {"fdb": fdb, "ports": ports, "stats": stats, "drops": drops,
                                         "flows": flows, "routes": routes, "neigh": neigh, "interfaces": interfaces}


def render(table: str, rows, node: str = "vswitch", fmt: str = "table") -> str:
    if fmt == "json":
        return json.dumps(rows, indent=2, sort_keys=True)
    return RENDER[table](rows, node)
