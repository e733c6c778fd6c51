"""Each C matmul alone, on the default model's own matrices: ms per call and the rate it reaches, for the file's
blocks (--quant gguf, the decode default) and their block-int8 conversion (--quant gguf-int8, the server's).

    .venv/bin/python benchmarks/kernel_bench.py [--rows 1 16] [--threads 1 2] [--reps 50] [--json]

A decode step or a serving step is ~100 of these calls and a few loops between them, so a kernel change
shows here first, without the noise of a whole model (this machine's run-to-run spread is ~10 %). To
compare two versions, run the script from each checkout (PYTHONPATH=<checkout>/src) one after the other,
a few times. The weights rotate through copies that together exceed the last-level cache, so each call
reads its matrix from memory, as in a real step. With 2 threads a call includes waking the second
thread; the C layers of a real step keep one team spinning, so their matmuls do not pay that.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace

import torch

from qwen15.quant.blocks import GGUFBlocks

# (GGUF tensor of layer 0 or 1, what it is in a step): every type a Q4_K_M file holds
MATRICES = [("blk.0.ffn_gate.weight", "gate (Q5_0, as gate_up's half)"),
            ("blk.0.ffn_down.weight", "down (Q6_K)"),
            ("blk.1.ffn_down.weight", "down (Q4_K)"),
            ("blk.0.attn_v.weight", "v (Q8_0)"),
            ("output.weight", "lm_head (Q8_0)")]
CACHE_BYTES = 64 << 20  # more than the L3 of machines like this one (32 MB)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 16], help="activation rows (1 = decode)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from qwen15.quant.blocks import packed_from_gguf, to_blockint8
    from qwen15.quant.native import KernelCall, kernel_isa, load_library
    from qwen15.weights.gguf import open_gguf
    from qwen15.weights.resolve import resolve_model

    lib = load_library()
    if lib is None:
        raise SystemExit("kernel_bench: the C kernel library could not be built (is gcc installed?)")
    path = resolve_model(args.model)
    if path.suffix.lower() != ".gguf":
        raise SystemExit(f"kernel_bench: --model must resolve to a .gguf file, got {path}")
    f = open_gguf(path)
    rows = []
    for name, what in MATRICES:
        t = f.tensor_map.get(name)
        if t is None:
            continue
        packed = packed_from_gguf(t.data, t.tensor_type, t.torch_shape)
        if packed is None:
            continue
        O, K = packed.shape
        for layout in ("gguf", "gguf-int8"):
            w = packed if layout == "gguf" else to_blockint8(packed)
            # copies of the weight (fresh memory) so that consecutive calls read from DRAM, not the cache
            copies = [w] + [_copy(w) for _ in range(max(0, CACHE_BYTES // max(w.nbytes, 1)))]
            calls = [KernelCall(c, "q8", lib) for c in copies]
            for M in args.rows:
                x = torch.randn(M, K)
                for threads in args.threads:
                    torch.set_num_threads(threads)
                    for c in calls[:2]:
                        c(x)  # warm up (and the first-touch of the output)
                    times = []
                    for r in range(args.reps):
                        start = time.perf_counter()
                        calls[r % len(calls)](x)
                        times.append(time.perf_counter() - start)
                    ms = statistics.median(times) * 1e3
                    rows.append({"matrix": what, "layout": layout, "shape": f"{O}x{K}", "rows": M, "threads": threads,
                                 "ms": round(ms, 4), "gb_s": round(w.nbytes / ms / 1e6, 2),
                                 "gmac_s": round(M * O * K / ms / 1e6, 2)})
    isa = kernel_isa()["q8"]
    if args.json:
        print(json.dumps({"isa": isa, "model": str(path), "rows": rows}))
        return
    print(f"{path.name}, q8 kernels ({isa}), median of {args.reps} calls each")
    print("| matrix | layout | O x K | rows | threads | ms | GB/s of weights | GMAC/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['matrix']} | {r['layout']} | {r['shape']} | {r['rows']} | {r['threads']} | {r['ms']:.3f} "
              f"| {r['gb_s']:.1f} | {r['gmac_s']:.1f} |")


def _copy(w):
    """The same weight in fresh memory (either layout: both are dataclasses of tensors)."""
    if isinstance(w, GGUFBlocks):
        return replace(w, raw=w.raw.clone(), mapped=False)
    return replace(w, q=w.q.clone(), scale=w.scale.clone(), offset=None if w.offset is None else w.offset.clone())


if __name__ == "__main__":
    main()
