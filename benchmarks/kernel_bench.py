"""Each C matmul alone, on the default model's own matrices: ms per call and the rate it reaches, for the file's
blocks (--quant gguf, the decode default) and their block-int8 conversion (--quant gguf-int8, the server's).

    .venv/bin/python benchmarks/kernel_bench.py [--model qwen2.5-coder-1.5b-instruct] [--rows 1 16]
        [--threads 1 2] [--layouts gguf gguf-x8 gguf-int8] [--reps 50] [--json]

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

# (GGUF tensor, what it is in a step): between them every type a Q4_K_M file holds (the 0.5B's gate is Q5_0,
# the 1.5B's Q4_K; down alternates Q6_K and Q4_K by layer; v and lm_head are Q8_0 or Q6_K). Each is labelled
# with the type the file has, and a (type, shape) already measured is skipped.
MATRICES = [("blk.0.ffn_gate.weight", "gate"),
            ("blk.0.attn_q.weight", "q"),
            ("blk.0.ffn_down.weight", "down"),
            ("blk.1.ffn_down.weight", "down"),
            ("blk.2.ffn_down.weight", "down"),
            ("blk.0.attn_v.weight", "v"),
            ("output.weight", "lm_head")]
CACHE_BYTES = 64 << 20  # more than the L3 of machines like this one (32 MB)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 16], help="activation rows (1 = decode)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--layouts", nargs="+", default=["gguf", "gguf-int8"], choices=["gguf", "gguf-x8", "gguf-int8"],
                    help="gguf: the file's rows; gguf-x8: interleaved by 8 rows (what a model load uses)")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--cpu-time", action="store_true",
                    help="time each call by this thread's CPU time, not the wall clock: with --threads 1 the kernel "
                         "runs on this thread, so other processes' load on a shared machine counts far less")
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
    rows, seen = [], set()
    for name, role in MATRICES:
        t = f.tensor_map.get(name)
        if t is None or (t.tensor_type, tuple(t.torch_shape)) in seen:
            continue
        seen.add((t.tensor_type, tuple(t.torch_shape)))
        packed = packed_from_gguf(t.data, t.tensor_type, t.torch_shape)
        if packed is None:
            continue
        O, K = packed.shape
        what = f"{role} ({t.tensor_type.name})"
        for layout in args.layouts:
            if layout == "gguf-x8":
                from qwen15.quant.native import can_interleave, interleave_x8

                if not can_interleave(packed):
                    continue  # a type without x8 kernels (or no x8 build): the gguf row is the same thing
                w = interleave_x8(packed)
            else:
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
                    clock = time.thread_time if args.cpu_time else time.perf_counter
                    times = []
                    for r in range(args.reps):
                        start = clock()
                        calls[r % len(calls)](x)
                        times.append(clock() - start)
                    ms = statistics.median(times) * 1e3
                    rows.append({"matrix": what, "layout": layout, "shape": f"{O}x{K}", "rows": M, "threads": threads,
                                 "ms": round(ms, 4), "gb_s": round(w.nbytes / ms / 1e6, 2),
                                 "gmac_s": round(M * O * K / ms / 1e6, 2)})
    isa = kernel_isa()
    isa = f"{isa['q8']}; Q4_K/Q6_K: {isa.get('kquant', isa['q8'])}"  # .get: older checkouts, for A/B runs
    cpu = cpu_isa()
    if args.json:
        print(json.dumps({"isa": isa, "cpu": cpu, "model": str(path), "rows": rows}))
        return
    clock = "thread CPU time" if args.cpu_time else "wall clock"
    print(f"{path.name}, q8 kernels ({isa}; CPU: {cpu}), median of {args.reps} calls each ({clock})")
    print("| matrix | layout | O x K | rows | threads | ms | GB/s of weights | GMAC/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['matrix']} | {r['layout']} | {r['shape']} | {r['rows']} | {r['threads']} | {r['ms']:.3f} "
              f"| {r['gb_s']:.1f} | {r['gmac_s']:.1f} |")


def cpu_isa() -> str:
    """The vector extensions this CPU has that the kernels can use (from /proc/cpuinfo; 'unknown' elsewhere)."""
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split(":")[1].split()
    except (OSError, StopIteration):
        return "unknown"
    names = {"avx2": "AVX2", "fma": "FMA", "f16c": "F16C", "avx512f": "AVX-512F", "avx512bw": "AVX-512BW",
             "avx512_vnni": "AVX-512 VNNI", "avx_vnni": "AVX-VNNI", "avx512_bf16": "AVX-512 BF16"}
    return " ".join(v for k, v in names.items() if k in flags) or "no AVX2"


def _copy(w):
    """The same weight in fresh memory (either layout: both are dataclasses of tensors)."""
    if isinstance(w, GGUFBlocks):
        return replace(w, raw=w.raw.clone(), mapped=False)
    return replace(w, q=w.q.clone(), scale=w.scale.clone(), offset=None if w.offset is None else w.offset.clone())


if __name__ == "__main__":
    main()
