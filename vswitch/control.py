"""The control socket: a Unix stream socket speaking length-prefixed msgpack.

Each message is a 4-byte big-endian length followed by one msgpack map.
Requests are ``{"cmd": NAME, ...args}``; replies are ``{"ok": true,
"result": ...}`` or ``{"ok": false, "error": "text"}``. The socket is
created mode 0600: whoever can talk to it can rewire the node.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from typing import Any, Awaitable, Callable, Dict

import msgpack

LEN = struct.Struct("!I")
MAX_MSG = 64 * 1024 * 1024


class ControlError(RuntimeError):
    """The daemon answered with an error, or could not be reached."""


def _pack(obj: Any) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return LEN.pack(len(body)) + body


async def _read_msg(reader: asyncio.StreamReader) -> Any:
    (n,) = LEN.unpack(await reader.readexactly(LEN.size))
    if n > MAX_MSG:
        raise ValueError(f"control message of {n} bytes is too large")
    return msgpack.unpackb(await reader.readexactly(n), raw=False)


Handler = Callable[[dict], Awaitable[Any]]


async def serve(path: str, handler: Handler) -> asyncio.AbstractServer:
    """Listen on ``path`` (replacing a stale socket file) with mode 0600."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    req = await _read_msg(reader)
                except asyncio.IncompleteReadError:
                    return
                try:
                    if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
                        raise ValueError("a request is a map with a 'cmd' string")
                    reply = {"ok": True, "result": await handler(req)}
                except (ValueError, KeyError, OSError, LookupError) as e:
                    reply = {"ok": False, "error": e.args[0] if isinstance(e, KeyError) and e.args else str(e)}
                writer.write(_pack(reply))
                await writer.drain()
        except (ConnectionError, ValueError):
            pass
        finally:
            writer.close()

    old = os.umask(0o177)
    try:
        server = await asyncio.start_unix_server(client, path=path)
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    return server


def request(path: str, cmd: str, timeout: float = 10.0, **args: Any) -> Any:
    """Send one request and return its result; raises ControlError on failure."""
    msg = dict(args, cmd=cmd)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(path)
            s.sendall(_pack(msg))
            hdr = _recv_exact(s, LEN.size)
            (n,) = LEN.unpack(hdr)
            reply = msgpack.unpackb(_recv_exact(s, n), raw=False)
    except FileNotFoundError:
        raise ControlError(f"no vswitch daemon at {path} (is it running? is this the right --node/--socket?)") from None
    except ConnectionRefusedError:
        raise ControlError(f"vswitch daemon at {path} is not accepting connections (stale socket?)") from None
    except PermissionError:
        raise ControlError(f"permission denied on {path} (the control socket is mode 0600: run as its owner)") from None
    except (socket.timeout, TimeoutError):
        raise ControlError(f"vswitch daemon at {path} did not answer within {timeout:g} s") from None
    if not reply.get("ok"):
        raise ControlError(reply.get("error", "unknown error"))
    return reply.get("result")


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ControlError("the daemon closed the control connection")
        buf += chunk
    return bytes(buf)


Commands = Dict[str, Callable[..., Any]]
