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
    def l4(r):
        name = {6: "tcp", 17: "udp"}.get(r["proto"])
        return f",{name}(src={r['sport']},dst={r['dport']})" if "sport" in r else ""
    out = [f"in_port({r['in_port']}),eth(src={r['src_mac']},dst={r['dst_mac']}),"
           f"ipv4(src={r['src']},dst={r['dst']},proto={r['proto']}){l4(r)} packets:{r['hits']} "
           f"stages:{','.join(r['stages'])}" for r in rows]
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


def services(rows: List[dict], node: str = "") -> str:
    """Like `ipvsadm -Ln`: each virtual address, then its endpoints."""
    out = []
    for r in rows:
        addrs = [a for a in [r["cluster_ip"]] + r["external"] if a]
        if r["node_port"]:
            addrs.append(f"<node>:{r['node_port']}")
        aff = f" affinity ClientIP {r['affinity_timeout']}s" if r["affinity_timeout"] else ""
        pol = "" if r["external_traffic_policy"] == "Cluster" and r["internal_traffic_policy"] == "Cluster" else \
            f" etp {r['external_traffic_policy']} itp {r['internal_traffic_policy']}"
        out.append(f"{r['protocol']}  {' '.join(addrs) or '-'}  {r['service']} ({r['type']}) {r['scheduler']}{aff}{pol}")
        for e in r["endpoints"]:
            state = "ready" if e["ready"] else ("terminating" if e["terminating"] else "not ready")
            out.append(f"  -> {e['endpoint']:<22} {state}" + (f" node {e['node']}" if e["node"] else ""))
        if not r["endpoints"]:
            out.append("  (no endpoints: new connections get ICMP port unreachable)")
    return "\n".join(out) or "(no Services)"


def conntrack(rows: List[dict], node: str = "") -> str:
    """Like `conntrack -L`: proto, timeout, state, orig and reply tuples, flags."""
    def side(t):
        if "id" in t:
            return f"src={t['src']} dst={t['dst']} id={t['id']}"
        return f"src={t['src']} dst={t['dst']} sport={t['sport']} dport={t['dport']}"
    out = []
    for r in rows:
        num = {"tcp": 6, "udp": 17, "icmp": 1}.get(r["proto"], 0)
        parts = [f"{r['proto']:<8}{num} {r['timeout']}"]
        if r["state"]:
            parts.append(r["state"])
        parts.append(side(r["orig"]))
        if "UNREPLIED" in r["flags"]:
            parts.append("[UNREPLIED]")
        parts.append(side(r["reply"]))
        if "ASSURED" in r["flags"]:
            parts.append("[ASSURED]")
        if r["service"]:
            parts.append(f"service={r['service']}")
        out.append(" ".join(parts))
    return "\n".join(out) + f"\nconntrack: {len(rows)} flow entries." if out else "conntrack: 0 flow entries."


def vteps(rows: List[dict], node: str = "") -> str:
    """Like `bridge fdb show dev flannel.1`, then each peer's pod CIDR and onlink next hop."""
    out = [f"{r['mac']} dev {r['dev']} dst {r['dst']} self {r['state']}" for r in rows]
    out += [f"  {r['name']}: {r['podCIDR']} via {r['gateway']} dev {r['dev']} onlink (vni {r['vni']}, "
            f"udp {r['port']})" for r in rows]
    return "\n".join(out) or "(no VXLAN peers)"


RENDER: Dict[str, Callable[..., str]] = {
    "fdb": fdb, "ports": ports, "stats": stats, "drops": drops, "flows": flows, "services": services,
    "conntrack": conntrack, "routes": routes, "neigh": neigh, "interfaces": interfaces, "vteps": vteps}


def render(table: str, rows, node: str = "vswitch", fmt: str = "table") -> str:
    if fmt == "json":
        return json.dumps(rows, indent=2, sort_keys=True)
    return RENDER[table](rows, node)
