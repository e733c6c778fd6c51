"""The tensor-parallel process group: who the ranks are, how rank 0 drives them, and how they end.

Rank 0 is the process the user started (the CLI, the server, or a Python program calling
`LLM.load(..., tp=N)`): it reads the checkpoint, samples, prints and serves. The other ranks are
followers: each holds its shard of the weights and its own KV cache, and runs whatever rank 0 sends over
the command channel (`send(fn, *args)` pickles a module-level function and its arguments; every follower
calls `fn(state, *args)`). Rank 0 then runs the same step itself, so the collectives inside it pair up.

Two groups: the compute group (gloo on the CPU, NCCL on CUDA) carries the all-reduces and has the
collective timeout (QWEN15_TP_TIMEOUT seconds, default 60); the command channel is a gloo group where
rank 0's sends have that timeout too, but a follower's receive has a long one: the follower of an idle
server or chat may wait hours for its next command.

Ranks come from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), or `start(N)` spawns
N - 1 followers on this machine. A spawned follower dies with rank 0 (PR_SET_PDEATHSIG) and ignores Ctrl-C
(rank 0 takes it and ends them); rank 0 watches its followers and, if one dies, prints one line and ends
all ranks. A collective that fails (a peer gone, or the timeout) raises RankFailed, a one-line error.
"""

from __future__ import annotations

import datetime
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ..errors import Qwen15Error

DEFAULT_TIMEOUT_S = 60.0
JOIN_TIMEOUT = datetime.timedelta(seconds=300)
IDLE_TIMEOUT = datetime.timedelta(days=30)  # the command channel: a follower waits as long as rank 0 idles


class RankFailed(Qwen15Error, RuntimeError):
    """A tensor-parallel rank died, or a collective did not complete within the timeout."""


def collective_timeout_s() -> float:
    value = os.environ.get("QWEN15_TP_TIMEOUT", str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1
    if seconds <= 0:
        raise RankFailed(f"QWEN15_TP_TIMEOUT={value!r}: expected a number of seconds > 0")
    return seconds


def torchrun_world() -> int:
    """WORLD_SIZE when this process was started by torchrun (or anything setting its variables), else 1."""
    if "RANK" in os.environ and "MASTER_ADDR" in os.environ:
        return int(os.environ.get("WORLD_SIZE", "1"))
    return 1


def is_torchrun_follower() -> bool:
    return torchrun_world() > 1 and int(os.environ["RANK"]) != 0


class TPGroup:
    """This process's place in the group: rank, world size, the compute group and the command channel."""

    def __init__(self, rank: int, world: int, device: torch.device, processes: list | None = None):
        self.rank, self.world, self.device = rank, world, device
        # The default group was joined with a long timeout (ranks start slowly); the all-reduces get their own.
        self.group = dist.new_group(backend=_backend(), timeout=_timeout())
        # Rank 0's sends time out like any collective (gloo's send waits for the receiver); a follower's
        # wait for its next command does not (each rank keeps its own timeout for a group).
        self.control = dist.new_group(backend="gloo", timeout=_timeout() if rank == 0 else IDLE_TIMEOUT)
        self.processes = processes or []  # the followers this process spawned (rank 0 of `--tp N` only)
        self.closing = False
        self.previous_threads = 0
        self._report_lock = threading.Lock()
        if self.processes:
            threading.Thread(target=self._watch, name="qwen15-tp-watchdog", daemon=True).start()

    # ---- collectives, their failures one-line errors -------------------------------------------------
    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        try:
            dist.all_reduce(t, group=self.group)
        except RuntimeError as e:
            raise self.failure(e) from None
        return t

    def send(self, fn, *args) -> None:
        """Rank 0: have every follower call fn(state, *args) (fn must be a module-level function)."""
        try:
            dist.broadcast_object_list([(fn, args)], src=0, group=self.control)
        except RuntimeError as e:
            raise self.failure(e) from None

    def receive(self):
        box = [None]
        try:
            dist.broadcast_object_list(box, src=0, group=self.control)
        except RuntimeError as e:
            raise self.failure(e) from None
        return box[0]

    def send_tensor(self, t: torch.Tensor, dst: int) -> None:
        try:
            dist.send(t.contiguous(), dst, group=self.control)
        except RuntimeError as e:
            raise self.failure(e) from None

    def recv_tensor(self, t: torch.Tensor) -> torch.Tensor:
        try:
            dist.recv(t, 0, group=self.control)
        except RuntimeError as e:
            raise self.failure(e) from None
        return t

    def failure(self, e: BaseException) -> RankFailed:
        """The error for a failed collective; where rank 0 spawned the ranks, the watchdog says which died."""
        if self.processes and not self.closing:
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline and all(p.poll() is None for p in self.processes):
                time.sleep(0.05)
            time.sleep(0.5)  # the watchdog reports and ends the process
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        first = re.sub(r"^\[[^\]]*\] ", "", first)  # gloo's source location
        return RankFailed(f"tensor parallelism: a collective failed on rank {self.rank} ({first}): a rank died or "
                          f"did not answer within {collective_timeout_s():g}s; stopped all {self.world} ranks")

    def _watch(self) -> None:
        """Wait for any spawned follower to exit; outside close(), that ends the whole group."""
        first = []
        done = threading.Event()

        def wait(rank: int, p) -> None:
            p.wait()
            first.append((rank, p.returncode))
            done.set()

        for r, p in enumerate(self.processes, start=1):
            threading.Thread(target=wait, args=(r, p), daemon=True).start()
        done.wait()
        if self.closing:
            return
        rank, code = first[0]
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        self.report(f"tensor-parallel rank {rank} died ({how}): stopped all {self.world} ranks")
        self.kill()
        os._exit(1)

    def report(self, message: str) -> None:
        """Print one line for the whole group (once, whichever thread gets here first)."""
        if self._report_lock.acquire(blocking=False):
            try:
                sys.stdout.flush()
            except Exception:
                pass
            print(f"\nqwen15: error: {message}", file=sys.stderr, flush=True)

    # ---- ending ---------------------------------------------------------------------------------
    def kill(self) -> None:
        self.closing = True
        for p in self.processes:
            if p.poll() is None:
                p.kill()
        for p in self.processes:
            p.wait()

    def close(self, clean: bool = True) -> None:
        """Rank 0: tell the followers to stop (clean) or kill them (after a failure or Ctrl-C)."""
        global _current
        if self.closing:
            return
        self.closing = True
        if self.rank == 0 and clean:
            try:
                self.send(None)
            except RankFailed:
                clean = False
        if clean:
            for p in self.processes:
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    break
        self.kill()
        try:
            dist.destroy_process_group()
        except Exception:  # after a failure the group may be half torn down already
            pass
        if _current is self:
            _current = None
        if self.previous_threads:
            torch.set_num_threads(self.previous_threads)  # a program that goes on single-process gets its cores back


_current: TPGroup | None = None


def current() -> TPGroup | None:
    return _current


def _backend() -> str:
    # The same on every rank, whatever device rank 0 picks later: NCCL only ever starts for CUDA tensors.
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


def _timeout() -> datetime.timedelta:
    return datetime.timedelta(seconds=collective_timeout_s())


def rank_device(device: str | torch.device, rank: int) -> torch.device:
    """This rank's device: cuda means cuda:LOCAL_RANK (one GPU per rank)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        local = int(os.environ.get("LOCAL_RANK", rank))
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    return device


def start(world: int, device: str | torch.device = "cpu", threads: int | None = None) -> TPGroup:
    """Rank 0's group of `world` ranks: joined from torchrun's environment, or spawned on this machine."""
    global _current
    if _current is not None:
        if _current.world != world:
            raise RankFailed(f"a tensor-parallel group of {_current.world} ranks is running; asked for {world}")
        return _current
    _timeout()  # a bad QWEN15_TP_TIMEOUT fails before any process starts
    launched = torchrun_world()
    if launched > 1:
        if launched != world:
            raise RankFailed(f"--tp {world} but torchrun started {launched} ranks: expected --tp {launched} "
                             f"(or leave --tp out)")
        if int(os.environ["RANK"]) != 0:
            raise RankFailed("only rank 0 loads the model; the other ranks follow it")
        dev = rank_device(device, 0)
        dist.init_process_group(_backend(), rank=0, world_size=world, timeout=JOIN_TIMEOUT)
        _current = TPGroup(0, world, dev)
        return _current
    previous_threads = torch.get_num_threads()
    if torch.device(device).type == "cpu":
        threads = threads or max(1, (os.cpu_count() or 1) // world)  # the ranks share this machine's cores
        torch.set_num_threads(threads)
    # Joining waits for the followers to start (importing torch takes seconds on a busy machine), longer
    # than a collective may take.
    store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, timeout=JOIN_TIMEOUT, wait_for_workers=False)
    # Plain subprocesses, not multiprocessing: a program without a __main__ guard must not be re-run.
    package_root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)}
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        env.pop(name, None)
    processes = []
    for r in range(1, world):
        code = (f"from qwen15.parallel.group import _spawned_follower; "
                f"_spawned_follower({r}, {world}, {store.port}, {str(device)!r}, {threads!r}, {collective_timeout_s()!r})")
        processes.append(subprocess.Popen([sys.executable, "-c", code], env=env, stdin=subprocess.DEVNULL))
    dev = rank_device(device, 0)
    try:
        dist.init_process_group(_backend(), store=store, rank=0, world_size=world, timeout=JOIN_TIMEOUT)
    except RuntimeError as e:
        for p in processes:
            p.kill()
            p.wait()
        raise RankFailed(f"the {world - 1} tensor-parallel followers did not join: {e}") from None
    _current = TPGroup(0, world, dev, processes)
    _current.previous_threads = previous_threads
    return _current


# ---- followers ------------------------------------------------------------------------------------

class FollowerState:
    """What a follower keeps between commands: its group, its model shard, its caches."""

    def __init__(self, group: TPGroup):
        self.group = group
        self.model = None
        self.caches: dict = {}


def follow(group: TPGroup) -> None:
    """Run rank 0's commands until it says stop."""
    state = FollowerState(group)
    with torch.inference_mode():
        while True:
            command = group.receive()
            if command is None or command[0] is None:
                return
            fn, args = command
            fn(state, *args)


def _quiet() -> None:
    """Followers print nothing: their stdout goes nowhere, and Ctrl-C is rank 0's to handle."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    sys.stdout = open(os.devnull, "w")


def _die_with_parent() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _run_follower(group: TPGroup) -> int:
    try:
        follow(group)
    except RankFailed:
        return 1  # rank 0 went away: it, or its launcher, tells the user
    try:
        dist.destroy_process_group()
    except Exception:
        pass
    return 0


def _spawned_follower(rank: int, world: int, port: int, device: str, threads: int | None, timeout_s: float) -> None:
    _die_with_parent()
    _quiet()
    os.environ["QWEN15_TP_TIMEOUT"] = str(timeout_s)
    if threads:
        torch.set_num_threads(threads)
    store = dist.TCPStore("127.0.0.1", port, world, is_master=False, timeout=JOIN_TIMEOUT)
    dev = rank_device(device, rank)
    dist.init_process_group(_backend(), store=store, rank=rank, world_size=world, timeout=JOIN_TIMEOUT)
    sys.exit(_run_follower(TPGroup(rank, world, dev)))


def follow_from_env() -> int:
    """A torchrun rank other than 0: join the group and follow rank 0."""
    _quiet()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group(_backend(), rank=rank, world_size=world, timeout=JOIN_TIMEOUT)
    return _run_follower(TPGroup(rank, world, torch.device("cpu")))  # the load command names the device
