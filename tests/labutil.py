"""Shared helpers of the lab tests: tcpdump captures confirmed listening, pcap reading."""

from __future__ import annotations

import os
import select
import signal
import struct
import subprocess
import time

from vswitch import lab as vlab


def read_pcap(path: str) -> list:
    """Frames (bytes) of a classic pcap file as tcpdump -w writes it."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 24:
        return []
    magic = data[:4]
    if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1"):
        end = "<"
    elif magic in (b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d"):
        end = ">"
    else:
        raise AssertionError(f"{path} is not a pcap file")
    rec = struct.Struct(end + "IIII")
    frames, off = [], 24
    while off + rec.size <= len(data):
        _, _, incl, _ = rec.unpack_from(data, off)
        off += rec.size
        frames.append(data[off:off + incl])
        off += incl
    return frames


class Capture:
    """tcpdump on a pod's eth0, started and confirmed listening before returning."""

    def __init__(self, pod: str, path: str, bpf: str, count: int, inbound_only: bool = False) -> None:
        self.pod, self.path = pod, path
        argv = ["tcpdump", "-i", "eth0", "-n", "-e", "-U", "-Z", "root", "-c", str(count), "-w", path]
        if inbound_only:
            argv += ["-Q", "in"]
        argv += bpf.split()
        # `ip netns exec` execs tcpdump, so proc.pid is tcpdump's own pid.
        self.proc = subprocess.Popen(vlab.exec_argv(pod, argv), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        self.stderr = b""
        deadline = time.monotonic() + 10
        while b"listening on" not in self.stderr:
            left = deadline - time.monotonic()
            if left <= 0:
                self.stop()
                raise AssertionError(f"tcpdump in {pod} not listening after 10 s: {self.stderr!r}")
            ready, _, _ = select.select([self.proc.stderr], [], [], left)
            if ready:
                chunk = os.read(self.proc.stderr.fileno(), 4096)
                if not chunk:
                    self.proc.wait(timeout=5)
                    raise AssertionError(f"tcpdump in {pod} exited ({self.proc.returncode}): {self.stderr!r}")
                self.stderr += chunk

    def wait(self, timeout: float = 5) -> list:
        """Wait for tcpdump to capture its count of frames; return them."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            got = self.stop()
            raise AssertionError(f"tcpdump in {self.pod} captured only {len(got)} frame(s) in {timeout:g} s: "
                                 f"{[f.hex() for f in got]}") from None
        self.proc.stderr.close()
        return read_pcap(self.path)

    def stop(self) -> list:
        stop_tcpdump(self.proc)
        return read_pcap(self.path) if os.path.exists(self.path) else []

    def frames(self, timeout: float = 5) -> list:
        """Whatever was captured once ``count`` frames arrived or ``timeout`` passed."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        return self.stop()


def stop_tcpdump(proc) -> None:
    """SIGINT (tcpdump flushes and closes its file), then wait; kill if it hangs."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stderr and not proc.stderr.closed:
        proc.stderr.close()
