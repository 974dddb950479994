"""Run commands inside a throw-away network sandbox.

``vswitch sandbox [-- CMD ...]`` re-executes under
``unshare --net --mount --pid --fork --mount-proc``, mounts fresh tmpfs on
/run/netns (where `ip netns` keeps namespaces) and /run/vswitch (lab state,
control sockets), then runs CMD (or a shell) as the child of a tiny init.
When that command ends, init exits, the kernel kills every process left in
the PID namespace, and every namespace, interface and mount disappears with
it. Nothing touches the machine's own network namespace.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from typing import List, Optional

STATE_DIR = "/run/vswitch"
MARKER = os.path.join(STATE_DIR, ".sandbox")
UNSHARE = ["unshare", "--net", "--mount", "--pid", "--fork", "--mount-proc", "--propagation", "private"]


class SandboxError(RuntimeError):
    pass


def _is_mountpoint_tmpfs(path: str) -> bool:
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                sep = fields.index("-")
                if fields[4] == path and fields[sep + 1] == "tmpfs":
                    return True
    except (OSError, ValueError):
        return False
    return False


def in_sandbox() -> bool:
    """True inside a `vswitch sandbox` (its marker lives on the sandbox's own tmpfs)."""
    return os.path.exists(MARKER) and _is_mountpoint_tmpfs(STATE_DIR)


def require(what: str) -> None:
    if not in_sandbox():
        raise SandboxError(
            f"{what} creates network namespaces and must run inside a sandbox so nothing leaks into "
            "the machine's own network namespace. Start one with `vswitch sandbox` (a shell whose "
            f"namespaces vanish when it exits) and run it there, or `vswitch sandbox -- vswitch {what}`.")


def reexec_argv(argv: List[str]) -> List[str]:
    return UNSHARE + [sys.executable, "-m", "vswitch.sandbox"] + argv


def enter(argv: List[str]) -> int:
    """Run argv inside a new sandbox and return its exit status (blocks)."""
    if os.geteuid() != 0:
        raise SandboxError("the sandbox needs root (network namespaces, TAP devices): run as root")
    if shutil.which("unshare") is None:
        raise SandboxError("`unshare` (util-linux) is not installed")
    return subprocess.call(reexec_argv(argv))


def _setup() -> None:
    for d in ("/run/netns", STATE_DIR):
        os.makedirs(d, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", d], check=True)
    with open(MARKER, "w") as f:
        f.write(f"{os.readlink('/proc/self/ns/net')}\n")
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)


def _init(argv: List[str]) -> int:
    """PID 1 of the sandbox: start argv, reap every orphan, exit with argv's status."""
    _setup()
    if not argv:
        shell = os.environ.get("SHELL", "/bin/bash")
        print("vswitch sandbox: a private network; everything here vanishes when this shell exits.",
              file=sys.stderr)
        argv = [shell]
    env = dict(os.environ, VSWITCH_SANDBOX="1")
    try:
        child = subprocess.Popen(argv, env=env)
    except FileNotFoundError:
        print(f"vswitch sandbox: command not found: {argv[0]}", file=sys.stderr)
        return 127
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda s, _f: child.send_signal(s))
    status: Optional[int] = None
    while status is None:
        try:
            pid, st = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        if pid == child.pid:
            status = os.waitstatus_to_exitcode(st)
    return 128 - status if status is not None and status < 0 else (status or 0)


if __name__ == "__main__":
    sys.exit(_init(sys.argv[1:]))
