"""The `vswitch` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

from . import control, tables
from .config import DEFAULT_SOCKET, ConfigError
from .node import TABLES
from .sandbox import SandboxError, enter, in_sandbox


def _socket(args) -> str:
    if getattr(args, "socket", None):
        return args.socket
    if getattr(args, "node", None):
        from .lab import socket_for
        return socket_for(args.node)
    return DEFAULT_SOCKET


def cmd_run(args) -> int:
    from .daemon import run
    return run(args.config)


def cmd_show(args) -> int:
    rows = control.request(_socket(args), "show", table=args.table)
    print(tables.render(args.table, rows, args.node or "vswitch", args.output))
    return 0


def cmd_fdb(args) -> int:
    sock = _socket(args)
    if args.action == "flush":
        res = control.request(sock, "fdb-flush", port=args.port)
        print(f"flushed {res['flushed']} dynamic entries")
    elif args.action == "add":
        control.request(sock, "fdb-add", mac=args.mac, port=args.port)
    else:
        control.request(sock, "fdb-del", mac=args.mac)
    return 0


def cmd_port(args) -> int:
    sock = _socket(args)
    if args.action == "add":
        spec = {"name": args.name, "type": args.type}
        for kv in args.opt:
            if "=" not in kv:
                raise ValueError(f"port option {kv!r} must be KEY=VALUE")
            k, v = kv.split("=", 1)
            spec[k] = int(v) if v.isdigit() else {"true": True, "false": False}.get(v, v)
        print(tables.render("ports", [control.request(sock, "port-add", spec=spec)], fmt=args.output))
    else:
        control.request(sock, "port-del", name=args.name)
    return 0


def cmd_apply(args) -> int:
    """`vswitch apply|delete -f FILE`: the file's text goes to the daemon, which validates it whole."""
    sock = _socket(args)
    if args.file == "-":
        text, source = sys.stdin.read(), "<stdin>"
    else:
        try:
            with open(args.file, encoding="utf-8") as f:
                text, source = f.read(), args.file
        except OSError as e:
            raise ValueError(f"cannot read {args.file}: {e.strerror}") from None
    res = control.request(sock, "apply", text=text, source=source, delete=args.command == "delete")
    verb = "deleted" if args.command == "delete" else "applied"
    line = f"{verb} {res['services']} Service(s), {res['endpointslices']} EndpointSlice(s)"
    if res["stale_udp_removed"]:
        line += f"; removed {res['stale_udp_removed']} UDP conntrack entries towards endpoints that went away"
    print(line)
    return 0


def cmd_conntrack(args) -> int:
    filters = {k: getattr(args, k) for k in ("proto", "src", "dst", "sport", "dport", "service")}
    res = control.request(_socket(args), "conntrack-flush", filters=filters)
    print(f"{res['deleted']} flow entries have been deleted.")  # conntrack -F's wording
    return 0


def cmd_peer(args) -> int:
    """`vswitch peer add|del`: remote VTEPs at run time (what flannel does when a node joins or leaves)."""
    sock = _socket(args)
    if args.action == "add":
        spec = {"name": args.name, "address": args.address, "podCIDR": args.pod_cidr, "vtepMAC": args.vtep_mac}
        print(f"peer {control.request(sock, 'peer-add', spec=spec)['peer']} added")
    else:
        print(f"peer {control.request(sock, 'peer-del', name=args.name)['peer']} removed")
    return 0


def cmd_trace(args) -> int:
    """`vswitch trace`: one packet through a node's real pipeline, each stage's decision printed."""
    from . import trace
    port, sock = args.inp, None
    if args.config is None:
        port, sock = _trace_target(args)
    if args.pcap:
        if args.packet:
            raise ValueError("give a PACKET or --pcap, not both")
        frame = trace.read_frame(args.pcap, args.frame)
    elif not args.packet:
        raise ValueError("no packet: give a scapy expression, hex, or --pcap FILE")
    if args.config is not None:  # offline: the config's node in-process (vswitch.sim)
        from .sim import SimNode
        sim = SimNode.from_config(args.config)
        res = sim.inject(port, frame if args.pcap else " ".join(args.packet), commit=args.commit)
        frame, steps, pid, node = res.frame, res.steps, res.id, sim.name
    else:
        if not args.pcap:
            frame = trace.parse_packet(" ".join(args.packet), control.request(sock, "trace-defaults", port=port))
        res = control.request(sock, "trace", port=port, frame=frame, commit=args.commit)
        steps, pid, node = res["steps"], res["id"], args.node or "vswitch"
    if args.output == "json":
        print(json.dumps({"node": node, "in": port, "packet": trace.summary(frame), "frame": frame.hex(),
                          "id": pid, "committed": args.commit, "verdict": trace.verdict(steps), "steps": steps},
                         indent=2, default=str))
    else:
        print(trace.render(steps, pid, f"in {port} on {node}: {trace.summary(frame)}"))
    return 0


def cmd_replay(args) -> int:
    """`vswitch replay FILE --config NODE.yaml`: per-packet verdicts of a recorded capture, offline."""
    from .replay import replay
    from .sim import SimNode
    from .trace import render, summary
    with SimNode.from_config(args.config) as sim:
        results = replay(args.file, sim, args.inp)
        if args.output == "json":
            print(json.dumps([{"frame": r.number, "ts": r.ts, **r.to_dict()} for r in results], indent=2,
                             default=str))
            return 0
        for r in results:
            if args.trace:
                print(f"frame {r.number}:")
                print(render(r.steps, None, f"in {r.port}: {summary(r.frame)}"))
                print()
            else:
                print(f"{r.number:>5}  {r.port:<10} {summary(r.frame):<60}  {r.verdict}")
        dropped = sum(1 for r in results if r.dropped)
        print(f"{len(results)} packets replayed through {sim.name}: {dropped} dropped, "
              f"{len(results) - dropped} not dropped")
    return 0


def cmd_capture(args) -> int:
    """`vswitch capture`: a running node's packets at each stage, to pcapng or printed with scapy."""
    import time
    from .bpf import five_tuple
    sock = _socket_for_port(args, args.port[0] if args.port else None)
    parts = [" ".join(args.expr)] if args.expr else []
    tuple_args = {k: getattr(args, k) for k in ("proto", "src", "dst", "sport", "dport", "host")}
    if any(v is not None for v in tuple_args.values()):
        parts.append(five_tuple(**tuple_args))
    expr = " and ".join(f"({p})" for p in parts) if len(parts) > 1 else (parts[0] if parts else None)
    start = control.request(sock, "capture-start", stages=args.stage or [], ports=args.port or [], expr=expr,
                            count=args.count, duration=args.duration)
    cid, out, n_rec, pids = start["id"], None, 0, set()
    print(f"capturing on {args.node or sock}: ports {', '.join(start['ports']) or 'all'}, "
          f"stages {', '.join(start['stages'])}{f', filter {expr!r}' if expr else ''}; "
          f"up to {args.count} packets or {args.duration:g} s", file=sys.stderr)
    if args.write:
        from .pcapng import PcapngWriter
        out = PcapngWriter(sys.stdout.buffer if args.write == "-" else open(args.write, "wb"))
    ifaces: dict = {}
    lost = 0
    try:
        deadline = time.monotonic() + args.duration + 5.0
        while True:
            res = control.request(sock, "capture-read", id=cid)
            lost = res["lost"]
            for rec in res["records"]:
                n_rec += 1
                pids.add(rec["id"])
                if out is not None:
                    key = (rec["port"], rec["stage"])
                    if key not in ifaces:
                        ifaces[key] = out.add_interface(f"{rec['port']}:{rec['stage']}",
                                                        f"vswitch node {args.node or sock}, port {rec['port']}, "
                                                        f"stage {rec['stage']}")
                    out.write_packet(ifaces[key], rec["ts"], rec["frame"], direction=rec["dir"], packet_id=rec["id"],
                                     verdict=rec["verdict"])  # also written as the packet's comment
                else:
                    _print_record(rec, args.verbose)
            if out is not None:
                out.flush()
            if res["done"] or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    except KeyboardInterrupt:
        pass
    finally:
        try:
            control.request(sock, "capture-stop", id=cid)
        except control.ControlError:
            pass
        if out is not None and args.write != "-":
            out.close()
    where = f" to {args.write}" if args.write and args.write != "-" else ""
    print(f"{len(pids)} packets, {n_rec} stage records{where}" + (f"; {lost} records lost (reader too slow)"
                                                                 if lost else ""), file=sys.stderr)
    return 0


def _print_record(rec: dict, verbose: bool) -> None:
    from scapy.all import Ether  # all layers, so IP/UDP/VXLAN... are dissected
    pkt = Ether(rec["frame"])
    arrow = "<" if rec["dir"] == "in" else ">"
    print(f"#{rec['id']} {rec['port']}:{rec['stage']} {arrow} {pkt.summary()}  | {rec['verdict']}", flush=True)
    if verbose:
        pkt.show()


def cmd_conformance(args) -> int:
    """`vswitch conformance`: every scenario on an all-kernel and an all-vswitch cluster, compared."""
    from conformance.core import report, run, select
    chosen = select(args.k)
    if not chosen:
        raise ValueError(f"no scenario matches {' '.join(args.k)}")
    if args.list:
        for s in chosen:
            print(f"{s.name:<36} {s.topology:<7} {s.spec:<12} {s.doc}")
        return 0
    if not in_sandbox():
        argv = [sys.executable, "-m", "vswitch", "conformance", "-o", args.output]
        for k in args.k or ():
            argv += ["-k", k]
        return enter(argv)
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if args.output != "json" else (lambda *a: None)
    outcomes = run(chosen, log=log)
    if args.output == "json":
        print(json.dumps([{k: v for k, v in o.to_dict().items() if k in ("scenario", "verdict", "kernel",
                                                                          "vswitch", "differing")}
                          for o in outcomes], indent=2, default=str))
    else:
        print(report(outcomes))
    return 1 if any(o.verdict == "differs" for o in outcomes) else 0


def _trace_target(args) -> tuple:
    """(port, control socket) of `vswitch trace`."""
    return args.inp, _socket_for_port(args, args.inp)


def _socket_for_port(args, port: Optional[str]) -> str:
    """The control socket; in a lab without --node/--socket, a pod's name picks the node its eth0 is on."""
    if args.node is None and args.socket is None and port:
        from .lab import state
        pod = ((state() or {}).get("pods") or {}).get(port)
        if pod is not None:
            args.node = pod["node"]
    return _socket(args)


def cmd_lab(args) -> int:
    from . import lab
    if args.action == "up":
        lab.up(args.topology)
        st = lab.state()
        print(f"lab {st['name']} is up")
        _print_status(lab.status_rows(st))
    elif args.action == "down":
        print(f"lab {lab.down()} is down")
    elif args.action == "status":
        st = lab.state()
        if st is None:
            print("no lab is up")
            return 1
        rows = lab.status_rows(st)
        if args.output == "json":
            print(json.dumps(rows, indent=2))
        else:
            _print_status(rows)
    elif args.action == "exec":
        cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
        argv = lab.exec_argv(args.name, cmd)
        os.execvp(argv[0], argv)
    return 0


def _print_status(rows: dict) -> None:
    print(f"lab {rows['name']}")
    print(tables.columns(rows["nodes"], [("NODE", "name"), ("DATAPLANE", "dataplane"), ("ADDRESS", "address"),
                                          ("PODCIDR", "podCIDR"), ("PID", "pid"), ("STATE", "state")]))
    if rows["pods"]:
        print()
        print(tables.columns(rows["pods"], [("POD", "name"), ("NODE", "node"), ("IP", "ip"), ("MAC", "mac"),
                                             ("NAMESPACE", "namespace"), ("LABELS", "labels")]))
    if rows["externals"]:
        print()
        print(tables.columns(rows["externals"], [("EXTERNAL", "name"), ("ADDRESS", "address"), ("MAC", "mac")]))


def cmd_demo(args) -> int:
    if not in_sandbox():
        return enter([sys.executable, "-m", "vswitch", "demo"])
    from .lab.demo import demo
    return demo()


def cmd_sandbox(args) -> int:
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if in_sandbox():
        raise SandboxError("already inside a vswitch sandbox")
    return enter(cmd)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vswitch", description="A Kubernetes node dataplane in userspace Python.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def target(sp):
        g = sp.add_mutually_exclusive_group()
        g.add_argument("--node", help="a lab node's name (its daemon's control socket)")
        g.add_argument("--socket", help=f"control socket path (default {DEFAULT_SOCKET})")

    sp = sub.add_parser("run", help="run one node's dataplane in the foreground")
    sp.add_argument("--config", "-c", required=True, help="node config (YAML, see docs/config.md)")
    sp.set_defaults(fn=cmd_run)

    sp = sub.add_parser("show", help="print a table of a running node")
    sp.add_argument("table", choices=TABLES)
    sp.add_argument("-o", "--output", choices=("table", "json"), default="table")
    target(sp)
    sp.set_defaults(fn=cmd_show)

    sp = sub.add_parser("fdb", help="change the FDB of a running node")
    fsub = sp.add_subparsers(dest="action", required=True)
    f = fsub.add_parser("flush", help="remove learned entries")
    f.add_argument("--port", help="only entries learned on this port")
    target(f)
    f = fsub.add_parser("add", help="add a static entry")
    f.add_argument("mac")
    f.add_argument("port")
    target(f)
    f = fsub.add_parser("del", help="delete an entry")
    f.add_argument("mac")
    target(f)
    sp.set_defaults(fn=cmd_fdb)

    sp = sub.add_parser("port", help="add or remove ports of a running node")
    psub = sp.add_subparsers(dest="action", required=True)
    f = psub.add_parser("add", help="attach a port: vswitch port add NAME --type tap netns=pod1 netns_ifname=eth0")
    f.add_argument("name")
    f.add_argument("--type", default="tap", choices=("tap", "afpacket"))
    f.add_argument("opt", nargs="*", help="KEY=VALUE port settings (docs/config.md)")
    f.add_argument("-o", "--output", choices=("table", "json"), default="table")
    target(f)
    f = psub.add_parser("del", help="detach and close a port")
    f.add_argument("name")
    target(f)
    sp.set_defaults(fn=cmd_port)

    for verb, what in (("apply", "add or replace"), ("delete", "remove")):
        sp = sub.add_parser(verb, help=f"{what} Services/EndpointSlices on a running node (all or nothing)")
        sp.add_argument("-f", "--filename", dest="file", required=True, help="YAML manifests ('-' for stdin)")
        target(sp)
        sp.set_defaults(fn=cmd_apply)

    sp = sub.add_parser("conntrack", help="conntrack entries of a running node")
    csub = sp.add_subparsers(dest="action", required=True)
    f = csub.add_parser("flush", help="delete entries (all, or those matching every filter given)")
    f.add_argument("-p", "--proto", choices=("tcp", "udp", "icmp"))
    f.add_argument("-s", "--src", help="original source address")
    f.add_argument("-d", "--dst", help="original destination address (a ClusterIP, say)")
    f.add_argument("--sport", type=int)
    f.add_argument("--dport", type=int)
    f.add_argument("--service", help="namespace/name[:port] of a Service")
    target(f)
    sp.set_defaults(fn=cmd_conntrack)

    sp = sub.add_parser("peer", help="add or remove remote VXLAN peers (VTEPs) of a running node")
    psub = sp.add_subparsers(dest="action", required=True)
    f = psub.add_parser("add", help="vswitch peer add NAME --address NODE_IP --pod-cidr CIDR --vtep-mac MAC")
    f.add_argument("name")
    f.add_argument("--address", required=True, help="the peer node's underlay address")
    f.add_argument("--pod-cidr", required=True, help="the peer node's pod CIDR")
    f.add_argument("--vtep-mac", required=True, help="the peer's VTEP MAC (its flannel.1 address)")
    target(f)
    f = psub.add_parser("del", help="remove a peer by name or underlay address")
    f.add_argument("name")
    target(f)
    sp.set_defaults(fn=cmd_peer)

    sp = sub.add_parser("trace", help="trace one packet through a node's pipeline (dry run unless --commit)",
                        description="Runs PACKET through the node's real pipeline as if it arrived on port --in "
                                    "and prints every stage's decision. PACKET is a scapy expression "
                                    "(Ether()/IP(src='10.244.1.5',dst='10.96.0.10')/TCP(dport=80); an Ether() "
                                    "is added when missing; an unset destination MAC is the gateway's, an unset "
                                    "source MAC one learned on the port and an unset IPv4 source the address "
                                    "the node has seen behind it), hex bytes, or --pcap FILE [--frame N].")
    sp.add_argument("packet", nargs="*", help="scapy expression or hex")
    sp.add_argument("--in", dest="inp", required=True, metavar="PORT",
                    help="ingress port (in a lab: a pod's name, which also picks its node)")
    sp.add_argument("--pcap", help="take the packet from this pcap/pcapng file")
    sp.add_argument("--frame", type=int, default=1, help="frame number in --pcap (from 1, as Wireshark counts)")
    sp.add_argument("--commit", action="store_true",
                    help="really process it: learn, create conntrack entries, send (default: dry run)")
    sp.add_argument("--config", help="trace offline through this node config (no daemon needed)")
    sp.add_argument("-o", "--output", choices=("table", "json"), default="table")
    target(sp)
    sp.set_defaults(fn=cmd_trace)

    sp = sub.add_parser("capture", help="capture a running node's packets at every stage (pcapng or scapy)",
                        description="Captures packets that pass the filter (tcpdump syntax, on the frame as "
                                    "received) and enter or leave one of --port, at every --stage they pass. "
                                    "Stops after --count packets or --duration seconds, whichever comes first.")
    sp.add_argument("expr", nargs="*", help="tcpdump-style filter, e.g. tcp port 80 and host 10.244.1.5")
    sp.add_argument("-w", "--write", metavar="FILE", help="write pcapng (one interface per port:stage; '-' = stdout)")
    sp.add_argument("--scapy", action="store_true", help="print each record's scapy summary (the default without -w)")
    sp.add_argument("-v", "--verbose", action="store_true", help="with --scapy: scapy's show() of every record")
    sp.add_argument("--port", action="append", help="only packets entering or leaving this port (repeatable)")
    sp.add_argument("--stage", action="append", help="only records at this stage (repeatable; default all)")
    sp.add_argument("-c", "--count", type=int, default=100, help="stop after this many packets (default 100)")
    sp.add_argument("--duration", type=float, default=10.0, help="stop after this many seconds (default 10)")
    for flag in ("proto", "src", "dst", "host"):
        sp.add_argument(f"--{flag}", help=f"5-tuple filter: {flag}")
    sp.add_argument("--sport", type=int, help="5-tuple filter: source port")
    sp.add_argument("--dport", type=int, help="5-tuple filter: destination port")
    target(sp)
    sp.set_defaults(fn=cmd_capture)

    sp = sub.add_parser("conformance", help="run scenarios on the kernel dataplane and on vswitch, and compare",
                        description="Builds each scenario's cluster twice in a sandbox (all-kernel, all-vswitch), "
                                    "runs the scenarios on both and compares what they observed. Verdicts: pass, "
                                    "known-difference (listed in docs/conformance.md), differs (exit status 1).")
    sp.add_argument("-k", action="append", metavar="PATTERN",
                    help="only scenarios whose name contains PATTERN (or matches it as a glob); repeatable")
    sp.add_argument("--list", action="store_true", help="list the scenarios instead of running them")
    sp.add_argument("-o", "--output", choices=("table", "json"), default="table")
    sp.set_defaults(fn=cmd_conformance)

    sp = sub.add_parser("replay", help="run a recorded pcap/pcapng through a node config offline: per-packet verdicts")
    sp.add_argument("file", help="pcap or pcapng file")
    sp.add_argument("--config", "-c", required=True, help="node config (YAML); ports become in-memory ports")
    sp.add_argument("--in", dest="inp", metavar="PORT",
                    help="ingress port for every frame (default: the capture's interface name)")
    sp.add_argument("--trace", action="store_true", help="print every packet's full trace")
    sp.add_argument("-o", "--output", choices=("table", "json"), default="table")
    sp.set_defaults(fn=cmd_replay)

    sp = sub.add_parser("lab", help="clusters of nodes and pods in network namespaces")
    lsub = sp.add_subparsers(dest="action", required=True)
    f = lsub.add_parser("up", help="build a lab from a topology file")
    f.add_argument("topology")
    lsub.add_parser("down", help="tear the lab down")
    f = lsub.add_parser("status", help="nodes, pods and externals of the lab")
    f.add_argument("-o", "--output", choices=("table", "json"), default="table")
    f = lsub.add_parser("exec", help="run a command in a node, pod or external: lab exec NAME -- CMD...")
    f.add_argument("name")
    f.add_argument("cmd", nargs=argparse.REMAINDER)
    sp.set_defaults(fn=cmd_lab)

    sp = sub.add_parser("demo", help="bring up a built-in topology, ping, iperf3, show the FDB, tear down")
    sp.set_defaults(fn=cmd_demo)

    sp = sub.add_parser("sandbox", help="a shell (or -- CMD) in private namespaces that vanish on exit")
    sp.add_argument("cmd", nargs=argparse.REMAINDER)
    sp.set_defaults(fn=cmd_sandbox)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    p = parser()
    # argparse gives a nargs="*" positional nothing once a flag comes first, so
    # `port add NAME --node N netns=x` leaves KEY=VALUE settings over: take them here.
    args, extra = p.parse_known_args(argv)
    if extra:
        if args.command == "port" and args.action == "add" and all("=" in e and not e.startswith("-") for e in extra):
            args.opt += extra
        else:
            p.error(f"unrecognized arguments: {' '.join(extra)}")
    from .lab.lab import LabError
    from .netns import NetnsError
    try:
        return args.fn(args) or 0
    except ConfigError as e:
        print(f"vswitch: invalid {'topology' if args.command == 'lab' else 'config'}: {e}", file=sys.stderr)
        return 2
    except (control.ControlError, LabError, SandboxError, NetnsError, ValueError) as e:
        print(f"vswitch: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a file named on the command line that cannot be read
        print(f"vswitch: {e.filename + ': ' if e.filename else ''}{e.strerror or e}", file=sys.stderr)
        return 1
    except KeyError as e:  # "no port named ...": the message is the whole story
        print(f"vswitch: {e.args[0] if e.args else e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
