"""Where one decode step's time goes: the block-int8 matmul kernels, attention, and the rest (Python,
norms, RoPE, the KV cache), for the default model at a given context length.

    .venv/bin/python benchmarks/decode_profile.py --threads 2 --context 600 [--batch B] [--torch-layers] [--json]

Prints the mean step time, the share of each part, and the bandwidth the matmuls reach (bytes of
compact weights read per step / their time), to compare with the machine's memory bandwidth. By default
a step of one sequence runs all layers in one C call (quant/native_layers.py), which has no parts to
time from Python: --torch-layers profiles the PyTorch layers instead.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--context", type=int, default=600, help="tokens already in the cache")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1, help="rows decoded together (a serving batch)")
    ap.add_argument("--quant", default="gguf")
    ap.add_argument("--torch-layers", action="store_true", help="profile the PyTorch layers, not the C ones")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.torch_layers:
        import os

        os.environ["QWEN15_NATIVE_LAYERS"] = "0"
    torch.set_num_threads(args.threads)

    import qwen15.quant.modules as modules
    import qwen15.quant.native as native
    from qwen15 import LLM
    from qwen15.engine.kv_cache import KVCache

    llm = LLM.load(args.model, quant=args.quant)
    model = llm.model
    B = args.batch
    cache = KVCache(llm.config, args.context + args.steps + 1, batch_size=B)
    spent = {"matmul": 0.0, "attention": 0.0}
    weight_bytes = 0

    def timed(fn, key):
        def wrapper(*a, **k):
            t = time.perf_counter()
            out = fn(*a, **k)
            spent[key] += time.perf_counter() - t
            return out
        return wrapper

    with torch.inference_mode():
        ids = torch.randint(1000, 20000, (B, args.context))
        for s in range(0, args.context, 512):
            model(ids[:, s:s + 512], cache=cache, start_pos=s, last_only=True)
        modules.matmul = timed(modules.matmul, "matmul")
        native.KernelCall.__call__ = timed(native.KernelCall.__call__, "matmul")
        F.scaled_dot_product_attention = timed(F.scaled_dot_product_attention, "attention")
        for m in model.modules():
            if isinstance(m, modules.QuantLinear):
                weight_bytes += m.nbytes  # as held: the file's blocks or block int8
        if model.lm_head is None and isinstance(model.model.embed_tokens, modules.QuantEmbedding):
            weight_bytes += model.model.embed_tokens.nbytes  # the tied head reads the whole table
        for k in spent:
            spent[k] = 0.0
        start = time.perf_counter()
        for i in range(args.steps):
            model(torch.full((B, 1), 1000 + i), cache=cache, start_pos=args.context + i, last_only=True)
        step = (time.perf_counter() - start) / args.steps
    parts = {k: v / args.steps for k, v in spent.items()}
    parts["other"] = step - sum(parts.values())
    native_layers = bool(model._native)
    row = {"native_layers": native_layers, "threads": args.threads, "context": args.context, "quant": args.quant,
           "batch": B,
           "step_ms": round(step * 1e3, 2), "tok_s": round(B / step, 1),
           **{f"{k}_ms": round(v * 1e3, 2) for k, v in parts.items()},
           "matmul_weight_mb": round(weight_bytes / 2 ** 20, 1),
           "matmul_gb_s": round(weight_bytes / parts["matmul"] / 1e9, 1) if parts["matmul"] else None}
    if args.json:
        print(json.dumps(row))
        return
    print(f"decode step {row['step_ms']} ms ({row['tok_s']} tok/s), batch {B}, {args.threads} threads, "
          f"{args.context} cached" + (", all layers in one C call (--torch-layers for a split)" if native_layers else ""))
    for k, v in parts.items():
        print(f"  {k:10s} {v * 1e3:7.2f} ms  {100 * v / step:5.1f}%")
    print(f"  matmuls read {row['matmul_weight_mb']} MB of compact weights a step: {row['matmul_gb_s']} GB/s")


if __name__ == "__main__":
    main()
