"""Thin wrappers over iproute2 for the few kernel objects vswitch touches.

iproute2 is on every machine vswitch runs on and prints the errors users
already know, so this calls ``ip`` rather than speaking netlink itself.
"""

from __future__ import annotations

import subprocess
from typing import Optional, Sequence


class NetnsError(RuntimeError):
    pass


def ip(*args: str, netns: Optional[str] = None, check: bool = True) -> str:
    cmd = ["ip"] + (["-n", netns] if netns else []) + list(args)
    res = subprocess.run(cmd, capture_output=True, text=True)
    if check and res.returncode != 0:
        raise NetnsError(f"`{' '.join(cmd)}` failed: {res.stderr.strip() or res.stdout.strip()}")
    return res.stdout


def run(cmd: Sequence[str], netns: Optional[str] = None, check: bool = True, **kw) -> subprocess.CompletedProcess:
    full = (["ip", "netns", "exec", netns] if netns else []) + list(cmd)
    res = subprocess.run(full, capture_output=True, text=True, **kw)
    if check and res.returncode != 0:
        raise NetnsError(f"`{' '.join(full)}` failed ({res.returncode}): {res.stderr.strip() or res.stdout.strip()}")
    return res


def link_exists(name: str, netns: Optional[str] = None) -> bool:
    return subprocess.run(["ip"] + (["-n", netns] if netns else []) + ["link", "show", "dev", name],
                          capture_output=True).returncode == 0


def move_link(name: str, netns: str, new_name: Optional[str] = None, mtu: Optional[int] = None,
              up: bool = True) -> str:
    """Move a link into a named netns, rename it there, set its MTU and bring it up."""
    ip("link", "set", "dev", name, "netns", netns)
    final = new_name or name
    if new_name and new_name != name:
        ip("link", "set", "dev", name, "name", new_name, netns=netns)
    if mtu:
        ip("link", "set", "dev", final, "mtu", str(mtu), netns=netns)
    if up:
        ip("link", "set", "dev", final, "up", netns=netns)
    return final
