"""`qwen15 bench`: load time, prefill and decode throughput, and peak memory of one model on this machine.

Timed the way llama.cpp's llama-bench and SPEC section 7 time it: a prompt of exactly P tokens, then G
greedy tokens with eos ignored; load counts until the model is ready to generate.
"""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import asdict, dataclass

# A fixed English/code text that the prompt is cut from (repeated as needed), so runs are comparable.
_FILLER = (
    "The Qwen1.5 family spans dense models from 0.5B to 110B parameters and a mixture-of-experts model. "
    "def quicksort(items):\n    if len(items) <= 1:\n        return items\n    pivot = items[0]\n"
    "    return quicksort([x for x in items[1:] if x < pivot]) + [pivot] + "
    "quicksort([x for x in items[1:] if x >= pivot])\n"
)


@dataclass
class BenchResult:
    model: str
    threads: int
    prompt_tokens: int
    gen_tokens: int
    load_s: float
    prefill_tok_s: float
    decode_tok_s: float
    peak_rss_mb: float
    draft: str | None = None
    acceptance_rate: float | None = None


def peak_rss_mb() -> float:
    # Linux: VmHWM, the peak of this process image. ru_maxrss survives fork + exec, so a bench started
    # from a large parent (a test runner holding a model) would report the parent's size.
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1 << 20) if sys.platform == "darwin" else rss / 1024


def prompt_ids(tokenizer, n: int) -> list[int]:
    ids = tokenizer.encode(_FILLER)
    reps = n // len(ids) + 1
    return (ids * reps)[:n]


def run_bench(model: str | None, prompt_tokens: int = 512, gen_tokens: int = 128, threads: int | None = None,
              device: str = "cpu", draft: str | None = None, draft_tokens: int = 4,
              quant: str = "gguf") -> BenchResult:
    import torch

    from .engine import LLM
    from .sampling import SamplingParams

    start = time.perf_counter()
    llm = LLM.load(model, device=device, threads=threads, context_length=prompt_tokens + gen_tokens + 1,
                   quant=quant)
    if draft:
        llm.attach_draft(LLM.load(draft, device=device, context_length=prompt_tokens + gen_tokens + 1,
                                  quant=quant),
                         tokens=draft_tokens)
    load_s = time.perf_counter() - start
    ids = prompt_ids(llm.tokenizer, prompt_tokens)
    params = SamplingParams(temperature=0.0, max_tokens=gen_tokens, ignore_eos=True)
    llm.generate(ids[:16], params=SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))  # warm-up
    result = llm.generate(ids, params=params)
    return BenchResult(
        model=llm.name, threads=torch.get_num_threads(), prompt_tokens=len(ids), gen_tokens=len(result.token_ids),
        load_s=round(load_s, 3),
        prefill_tok_s=round(len(ids) / result.prefill_s, 2) if result.prefill_s else 0.0,
        decode_tok_s=round(result.decode_tok_s, 2), peak_rss_mb=round(peak_rss_mb(), 1),
        draft=draft, acceptance_rate=round(result.acceptance_rate, 4) if result.drafted else None)


def as_dict(result: BenchResult) -> dict:
    return asdict(result)
