"""Checks of values (device, threads, context, port) that must fail before a model is loaded: a load takes
seconds to minutes, and an error after it (or a traceback from deep in torch) wastes them."""

from __future__ import annotations

import errno
import os
import re
import socket

from .errors import GenerationError


def check_device(device: str) -> None:
    """cpu, cuda or cuda:N, and cuda only where torch can use it (torch is imported only for cuda)."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?", str(device)):
        raise GenerationError(f"unknown device {device!r}: expected cpu or cuda (cuda:N for one GPU)")
    if device == "cpu":
        return
    import torch

    if not torch.cuda.is_available():
        why = "this torch is built without CUDA" if torch.version.cuda is None else "no GPU is visible"
        raise GenerationError(f"--device {device}: {why}; use --device cpu")


def check_positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise GenerationError(f"{name} must be >= 1, got {value}")


def check_port_free(host: str, port: int) -> None:
    """Fail with the holder's pid and command line when host:port is taken (bound as uvicorn binds it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                holder = port_holder(port)
                by = f" by {holder}" if holder else ""
                raise GenerationError(f"port {port} on {host} is already in use{by}: stop it or choose "
                                      f"another --port") from None
            raise GenerationError(f"cannot listen on {host}:{port}: {e.strerror}") from None


def port_holder(port: int) -> str | None:
    """'pid N (command line)' of a process listening on port, from /proc (Linux); None if not visible."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    cols = line.split()
                    # local_address is HEXIP:HEXPORT; state 0A is LISTEN; column 9 is the socket's inode
                    if int(cols[1].rsplit(":", 1)[1], 16) == port and cols[3] == "0A":
                        inodes.add(cols[9])
        except (OSError, StopIteration, IndexError, ValueError):
            continue
    if not inodes:
        return None
    targets = {f"socket:[{i}]" for i in inodes}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue  # another user's process: not ours to see
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") in targets:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
                    return f"pid {pid} ({cmd})" if cmd else f"pid {pid}"
            except OSError:
                continue
    return None
