"""One forward of the C layers (quant/native_layers.py) over a long cache: a decode step of 1 row and a
verification-style forward of 16 consecutive rows, as the engine runs them, for the default model.

    .venv/bin/python benchmarks/c_layers_step.py [--context 3000] [--model M] [--threads 2]

Prints the median ms of 10 calls each (after 2 warm-ups). At thousands of cached tokens attention is a large
part of these steps; to compare two versions of layers.c, run this from each checkout in turn, a few times
(this machine's speed drifts by +-20% over minutes).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--context", type=int, default=3000)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from qwen15 import LLM
    from qwen15.engine.kv_cache import KVCache

    llm = LLM.load(args.model)
    model, ctx = llm.model, args.context
    cache = KVCache(llm.config, ctx + 16)
    ids = torch.randint(1000, 20000, (1, ctx + 16))
    out = {}
    with torch.inference_mode():
        for s in range(0, ctx, 512):
            model(ids[:, s:min(ctx, s + 512)], cache=cache, start_pos=s, last_only=True)
        for rows in (1, 16):
            times = []
            for _ in range(12):
                t = time.perf_counter()
                model(ids[:, ctx:ctx + rows], cache=cache, start_pos=ctx, last_only=True)
                times.append(time.perf_counter() - t)
            out[rows] = statistics.median(times[2:]) * 1e3
    assert model._native, "the C layers did not run (QWEN15_NATIVE_LAYERS=0, or no compiler)"
    print(f"{ctx} cached tokens, {args.threads} threads: 1 row {out[1]:.2f} ms, 16 rows {out[16]:.2f} ms")


if __name__ == "__main__":
    main()
