"""Decode and prefill speed on a GPU, qwen15 against transformers, on the same (random) weights.

The 1.5B packaged GGUF cannot travel to a GPU machine without network, and throughput does not depend
on the weights' values: both engines get the same random bf16 weights of a model's config (default: the
Qwen2.5-Coder-1.5B shape). Writes a markdown table and a JSON file.

    python benchmarks/gpu_vs_transformers.py --tokenizer DIR --out results/
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

CONFIGS = {
    "qwen2.5-1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen1.5-0.5b": dict(vocab_size=151936, hidden_size=1024, intermediate_size=2816, num_hidden_layers=24,
                         num_attention_heads=16, num_key_value_heads=16, tie_word_embeddings=True),
    "qwen1.5-7b": dict(vocab_size=151936, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False),
}


def sync():
    torch.cuda.synchronize()


def bench_transformers(hf, prompt: list[int], gen: int) -> tuple[float, float]:
    ids = torch.tensor([prompt], device="cuda")
    mask = torch.ones_like(ids)
    with torch.no_grad():
        sync(); t = time.perf_counter()
        hf(ids, attention_mask=mask)  # prefill alone
        sync(); prefill = time.perf_counter() - t
        t = time.perf_counter()
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=gen, min_new_tokens=gen, do_sample=False,
                          pad_token_id=0)
        sync(); total = time.perf_counter() - t
    assert out.shape[1] - ids.shape[1] == gen
    return len(prompt) / prefill, (gen - 1) / max(total - prefill, 1e-9)


def bench_qwen15(llm, prompt: list[int], gen: int) -> tuple[float, float]:
    from qwen15.engine.sampling import SamplingParams

    result = llm.generate(prompt, params=SamplingParams(temperature=0.0, max_tokens=gen, ignore_eos=True))
    assert len(result.token_ids) == gen
    return len(prompt) / result.prefill_s, result.decode_tok_s


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="qwen2.5-1.5b", choices=list(CONFIGS))
    ap.add_argument("--tokenizer", required=True, help="directory with tokenizer.json")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()

    from transformers import Qwen2Config, Qwen2ForCausalLM

    from qwen15.config import ModelConfig
    from qwen15.engine.engine import LLM
    from qwen15.model import build_model
    from qwen15.tokenizer import Tokenizer

    torch.manual_seed(0)
    kwargs = CONFIGS[args.config]
    hf = Qwen2ForCausalLM(Qwen2Config(**kwargs)).to(device="cuda", dtype=torch.bfloat16).eval()
    config = ModelConfig(**kwargs)
    state = {k: v for k, v in hf.state_dict().items() if not (k == "lm_head.weight" and config.tie_word_embeddings)}
    ours = build_model(config, state, device="cuda", dtype=torch.bfloat16)
    tokenizer = Tokenizer.from_file(args.tokenizer)
    engines = {"qwen15 (eager)": LLM(ours, tokenizer, name=args.config, compile=False),
               "qwen15 (compiled decode, CUDA graph)": LLM(ours, tokenizer, name=args.config, compile=True)}
    prompt = torch.randint(0, 150000, (args.prompt_tokens,)).tolist()

    rows = {"transformers": [], **{name: [] for name in engines}}
    bench_transformers(hf, prompt[:32], 4)
    for llm in engines.values():  # warm-up (and compile) each
        bench_qwen15(llm, prompt[:32], 8)
        bench_qwen15(llm, prompt, 8)
    for _ in range(args.rounds):  # interleaved rounds, medians
        rows["transformers"].append(bench_transformers(hf, prompt, args.gen_tokens))
        for name, llm in engines.items():
            rows[name].append(bench_qwen15(llm, prompt, args.gen_tokens))
    summary = {name: {"prefill_tok_s": round(statistics.median(r[0] for r in rs), 1),
                      "decode_tok_s": round(statistics.median(r[1] for r in rs), 1)} for name, rs in rows.items()}
    gpu = torch.cuda.get_device_name()
    lines = [f"{args.config} shape, random bf16 weights, {gpu}, {args.prompt_tokens}-token prompt, "
             f"{args.gen_tokens} greedy tokens, batch 1, medians of {args.rounds}", "",
             "| system | prefill tok/s | decode tok/s |", "|---|---|---|"]
    lines += [f"| {n} | {s['prefill_tok_s']} | {s['decode_tok_s']} |" for n, s in summary.items()]
    print("\n".join(lines))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"gpu_{args.config}.md").write_text("\n".join(lines) + "\n")
    (out / f"gpu_{args.config}.json").write_text(json.dumps({"gpu": gpu, "torch": torch.__version__, **summary}))


if __name__ == "__main__":
    main()
