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
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
