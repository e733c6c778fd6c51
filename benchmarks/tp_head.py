"""The lm_head under tensor parallelism on the CPU: replicated (rank 0 alone computes the logits) against
split by vocabulary (each rank computes its slice, gathered to rank 0), at the real 0.5B's shape.

    python benchmarks/tp_head.py [--world 2] [--reps 50]

Each rank runs on its own core(s); the time is rank 0's, per decode step (one row), median of reps.
"""

import argparse
import datetime
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

VOCAB, HIDDEN = 151936, 896  # Qwen2.5-Coder-0.5B (tied: the embedding table is the head)


def rank_main(rank: int, world: int, port: int, reps: int, out) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    g = torch.Generator().manual_seed(0)
    full = torch.randn(VOCAB, HIDDEN, generator=g) * 0.02
    lo, hi = rank * VOCAB // world, (rank + 1) * VOCAB // world
    part = full[lo:hi].clone()
    h = torch.randn(1, HIDDEN, generator=g)
    sizes = [(r + 1) * VOCAB // world - r * VOCAB // world for r in range(world)]

    def replicated():
        if rank == 0:
            torch.nn.functional.linear(h, full)
        dist.barrier()  # the followers wait for rank 0's logits before the next step

    def split():
        local = torch.nn.functional.linear(h, part)[0]
        bufs = [torch.empty(n) for n in sizes] if rank == 0 else None
        dist.gather(local, bufs, dst=0)
        if rank == 0:
            torch.cat(bufs)

    results = {}
    for name, fn in (("replicated", replicated), ("split", split)) * 2:  # twice: the second round is kept
        for _ in range(5):
            fn()
        times = []
        for _ in range(reps):
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        results[name] = statistics.median(times) * 1e3
    if rank == 0:
        out.put(results)
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--reps", type=int, default=50)
    args = ap.parse_args()
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=rank_main, args=(r, args.world, port, args.reps, out)) for r in range(args.world)]
    for p in procs:
        p.start()
    res = out.get()
    for p in procs:
        p.join()
    print(f"world {args.world}: head per step, replicated (rank 0 alone) {res['replicated']:.2f} ms, "
          f"split by vocabulary + gather {res['split']:.2f} ms")


if __name__ == "__main__":
    main()
