"""Tensor parallelism on gloo (CPU): the sharded model against the same model in one process.

The real 0.5B (14 query / 2 kv heads, fp32) is loaded once; its TP copies are sharded from it in this
process (rank 0) with the followers spawned beside it, so each degree costs one spawn, not one load.
"""

import copy

import pytest
import torch

from qwen15.engine.engine import LLM, shard_model
from qwen15.engine.kv_cache import KVCache
from qwen15.parallel import tp as tp_plan

NEW_TOKENS = 32
PROMPTS = {
    "raw": "def fibonacci(n):",
    "english": [{"role": "user", "content": "Write a haiku about the sea."}],
    "chinese": [{"role": "user", "content": "用一句话介绍一下北京。"}],
}


@pytest.fixture(scope="module")
def single(real_gguf_path):
    llm = LLM.load(real_gguf_path, quant="none")
    expected = {name: llm.generate(p, max_tokens=NEW_TOKENS, temperature=0.0).token_ids for name, p in PROMPTS.items()}
    return llm, expected


def last_logits(llm: LLM, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        cache = KVCache(llm.config, len(ids))
        return llm.model(torch.tensor([ids]), cache=cache, start_pos=0, last_only=True)[0, -1]


@pytest.mark.real_model
@pytest.mark.parametrize("world", [2, 4])
def test_real_model_tp_matches_single_process(single, world):
    llm, expected = single
    net = shard_model(copy.deepcopy(llm.model), world, "cpu", torch.float32)
    tp = LLM(net, llm.tokenizer, name="tp")
    try:
        shard = tp_plan.plan(llm.config, world)[0]
        # rank 0's own shard: its heads and kv heads only (kv replicated when world exceeds the 2 kv heads)
        assert tp.config.num_key_value_heads == shard.kv_heads[1] - shard.kv_heads[0] == (1 if world >= 2 else 2)
        assert tp.config.num_attention_heads == {2: 7, 4: 3}[world]  # 7 heads per kv head: 3 + 4 at N = 4
        ids = llm.encode_prompt(PROMPTS["raw"])
        torch.testing.assert_close(last_logits(tp, ids), last_logits(llm, ids), rtol=0, atol=1e-4)
        for name, prompt in PROMPTS.items():
            got = tp.generate(prompt, max_tokens=NEW_TOKENS, temperature=0.0).token_ids
            assert len(got) == len(expected[name]) > 0
            assert got == expected[name], name
    finally:
        net.tp.close()
