"""A random LoRA adapter (r 8, nonzero B) on the real 0.5B, saved by qwen15: input for the adapter CLI measurements
(benchmarks/results/lora.md). Usage: python benchmarks/make_random_adapter.py [OUT_DIR]"""
import sys

import torch
from qwen15.engine.engine import LLM
from qwen15 import lora
llm = LLM.load("qwen2.5-coder-0.5b-instruct", quant="none")
lora.apply_lora(llm.model, "q,k,v,o,gate,up,down", r=8, alpha=16)
g = torch.Generator().manual_seed(0)
with torch.no_grad():
    for p in lora.lora_parameters(llm.model):
        p.copy_(torch.randn(p.shape, generator=g) * 0.02)
lora.save_adapter(llm.model, sys.argv[1] if len(sys.argv) > 1 else "random-adapter", "qwen2.5-coder-0.5b-instruct")
print("saved")
