"""GPU path (runs only where CUDA is present; CI has none): the compiled CUDA-graph decode step gives the
same tokens as eager decoding."""

import pytest
import torch

from qwen15.config import ModelConfig
from qwen15.engine.engine import LLM
from qwen15.model import build_model
from qwen15.tokenizer import Tokenizer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def tiny_llm(compile: bool, dtype=torch.float32) -> LLM:
    torch.manual_seed(0)
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": [chr(ord("a") + i) for i in range(26)],
            "tokenizer.ggml.merges": [], "tokenizer.ggml.token_type": [1] * 26}
    cfg = ModelConfig(vocab_size=26, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = build_model(cfg, device="cuda", dtype=dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    return LLM(model, Tokenizer.from_gguf_metadata(meta), compile=compile)


def test_compiled_decode_matches_eager():
    eager, compiled = tiny_llm(False), tiny_llm(True)
    for prompt in ([1, 2, 3, 4, 5], [7, 7, 9], list(range(20))):  # several requests reuse the static cache
        a = eager.generate(prompt, max_tokens=24, temperature=0.0, ignore_eos=True)
        b = compiled.generate(prompt, max_tokens=24, temperature=0.0, ignore_eos=True)
        assert a.token_ids == b.token_ids
