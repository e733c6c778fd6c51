"""Where speculative decoding's time goes: the 0.5B drafting for the 1.5B (both Q4_K_M), on this machine.

    .venv/bin/python benchmarks/speculative_bench.py [--threads 2] [--gen-tokens 128] [--draft-tokens 1 2 3 4]

Measures, medians of repeated calls at ~300 cached tokens: one target decode step, one draft decode step,
and one target verification forward of k + 1 rows (the last token and k proposals, computed as k + 1
decode steps would be); then greedy generation of a code prompt alone and with the draft proposing k tokens,
checking that the output is the same, with the acceptance rate. From those parts a step of k proposals
costs k draft steps + one verification of k + 1 rows, and yields (accepted + 1) tokens: the table shows
why the speed-up is what it is. Writes results/speculative.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
TARGET, DRAFT = "qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct"
PROMPT = [{"role": "user", "content": "Write a Python function that parses an ISO 8601 date string into a datetime, "
                                      "with a docstring and three doctests."}]


def step_ms(llm, rows: int, reps: int, context: int = 300) -> float:
    """Median ms of a forward of `rows` new tokens over `context` cached ones (rows > 1: as verification)."""
    from qwen15.engine.kv_cache import KVCache
    from qwen15.model import rows_as_decode_steps

    cache = KVCache(llm.config, context + rows + 8, dtype=llm.dtype, device=llm.device)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        llm.model(torch.randint(100, 5000, (1, context), generator=g), cache=cache, start_pos=0, last_only=True)
        x = torch.randint(100, 5000, (1, rows), generator=g)
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            with rows_as_decode_steps(llm.model):
                llm.model(x, cache=cache, start_pos=context, last_only=rows == 1)
            times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--draft-tokens", type=int, nargs="+", default=[1, 2, 3, 4])
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--out", default=str(HERE / "results" / "speculative.md"))
    args = ap.parse_args()

    from qwen15 import LLM
    from qwen15.quant.native import kernel_isa

    torch.set_num_threads(args.threads)
    target, draft = LLM.load(TARGET, threads=args.threads), LLM.load(DRAFT, threads=args.threads)
    t1, d1 = step_ms(target, 1, args.reps), step_ms(draft, 1, args.reps)
    verify = {k: step_ms(target, k + 1, args.reps) for k in args.draft_tokens}
    print(f"[speculative] target step {t1:.1f} ms, draft step {d1:.1f} ms, verify {verify}", flush=True)

    def run(k: int | None) -> tuple[list[int], float, float | None]:
        target.draft = None
        if k:
            target.attach_draft(draft, k)
        r = target.generate(PROMPT, max_tokens=args.gen_tokens, temperature=0)
        rate = r.acceptance_rate if k else None
        return r.token_ids, len(r.token_ids) / r.decode_s, rate

    alone_ids, alone_tps, _ = run(None)
    rows = []
    for k in args.draft_tokens:
        ids, tps, rate = run(k)
        predicted = (rate * k + 1) / (k * d1 + verify[k]) * 1e3  # tokens a step / ms a step
        rows.append((k, rate, verify[k], predicted, tps, ids == alone_ids))
        print(f"[speculative] k={k}: {tps:.1f} tok/s, acceptance {rate:.2f}, same output {ids == alone_ids}", flush=True)
    target.draft = None

    isa = kernel_isa()
    lines = [f"# Speculative decoding: {DRAFT} drafting for {TARGET} (Q4_K_M, {args.threads} threads, kernels "
             f"{isa['kquant']})", "",
             f"Command: `python benchmarks/speculative_bench.py --threads {args.threads} --gen-tokens {args.gen_tokens}`", "",
             f"- target decode step: {t1:.1f} ms ({1e3 / t1:.1f} tok/s); draft decode step: {d1:.1f} ms "
             f"({d1 / t1:.2f} of the target's)",
             f"- greedy generation alone: {alone_tps:.1f} tok/s", "",
             "| draft tokens k | acceptance | verify k+1 rows ms (x one step) | predicted tok/s | measured tok/s | "
             "speed-up | same output |", "|---|---|---|---|---|---|---|"]
    for k, rate, v, pred, tps, same in rows:
        lines.append(f"| {k} | {rate:.2f} | {v:.1f} ({v / t1:.2f}x) | {pred:.1f} | {tps:.1f} | {tps / alone_tps:.2f}x | {same} |")
    lines += ["", "predicted = (acceptance x k + 1) / (k x draft step + verify): the tokens a step yields over its cost."]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
