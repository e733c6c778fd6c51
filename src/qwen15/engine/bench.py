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
              quant: str = "gguf", tp: int | None = None, random_weights: bool = False) -> BenchResult:
    import torch

    from .engine import LLM
    from .sampling import SamplingParams

    if random_weights:
        return _bench_random(model, prompt_tokens, gen_tokens, threads, device, tp)
    start = time.perf_counter()
    llm = LLM.load(model, device=device, threads=threads, context_length=prompt_tokens + gen_tokens + 1,
                   quant=quant, tp=tp)
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


def random_model(preset: str, device: str, dtype):
    """A preset at its real shape with random weights (std 0.02), built in dtype on the device (no checkpoint)."""
    import torch
    from torch import nn

    from ..config import get_preset
    from ..model import Transformer

    config = get_preset(preset)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in bf16 directly: a 32B in float32 first would need twice the memory
    try:
        with torch.device(device):
            model = Transformer(config)
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                nn.init.normal_(p, std=0.02)
    return model.eval()


def _bench_random(preset: str | None, prompt_tokens: int, gen_tokens: int, threads: int | None, device: str,
                  tp: int | None) -> BenchResult:
    """Prefill and decode speed of a preset's real shape with random weights: token ids only, no tokenizer."""
    import torch

    from ..errors import GenerationError
    from ..parallel.group import torchrun_world
    from .engine import LLM, _Run, shard_model
    from .sampling import SamplingParams

    if preset is None:
        raise GenerationError("--random-weights needs --model PRESET (see `qwen15 presets`)")
    if threads:
        torch.set_num_threads(threads)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    world = tp or torchrun_world()
    start = time.perf_counter()
    net = random_model(preset, "cpu" if world > 1 else device, dtype)
    if world > 1:
        net = shard_model(net, world, device, dtype, threads)
    llm = LLM(net, None, context_length=prompt_tokens + gen_tokens + 1, name=f"{preset} (random weights)",
              compile=False if world > 1 else None)
    load_s = time.perf_counter() - start
    ids = torch.randint(0, net.config.vocab_size, (prompt_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    params = SamplingParams(temperature=0.0, max_tokens=gen_tokens, ignore_eos=True)
    for _ in llm._tokens(_Run(ids[:16]), SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)):
        pass  # warm-up
    run = _Run(ids)
    for _ in llm._tokens(run, params):
        pass
    steps = max(len(run.token_ids) - 1, 0)
    return BenchResult(
        model=llm.name, threads=torch.get_num_threads(), prompt_tokens=len(ids), gen_tokens=len(run.token_ids),
        load_s=round(load_s, 3), prefill_tok_s=round(len(ids) / run.prefill_s, 2) if run.prefill_s else 0.0,
        decode_tok_s=round(steps / run.decode_s, 2) if run.decode_s else 0.0, peak_rss_mb=round(peak_rss_mb(), 1))


def as_dict(result: BenchResult) -> dict:
    return asdict(result)
