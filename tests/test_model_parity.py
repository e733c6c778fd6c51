"""Logits parity with transformers' Qwen2ForCausalLM / Qwen2MoeForCausalLM on tiny random configs."""

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

from qwen15.config import ModelConfig
from qwen15.engine.kv_cache import KVCache
from qwen15.model import build_model

BASE = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=256, rope_theta=10000.0, rms_norm_eps=1e-6)
MOE = dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48)

CASES = {
    "mha_tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
    "gqa_untied": dict(num_key_value_heads=2, tie_word_embeddings=False),
    "mqa_theta5e6": dict(num_key_value_heads=1, tie_word_embeddings=False, rope_theta=5e6),
    "sliding_window": dict(num_key_value_heads=2, use_sliding_window=True, sliding_window=6, max_window_layers=1),
    "moe": dict(num_key_value_heads=4, tie_word_embeddings=False, **MOE),
    "moe_gqa_sparse_step": dict(num_key_value_heads=2, decoder_sparse_step=2, mlp_only_layers=[2],
                                norm_topk_prob=True, **MOE),
}


def hf_model(case: str):
    kwargs = {**BASE, **CASES[case]}
    if "num_experts" in kwargs:
        model = Qwen2MoeForCausalLM(Qwen2MoeConfig(**kwargs))
        model_type = "qwen2_moe"
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**kwargs))
        model_type = "qwen2"
    # Transformers' init is tiny (std 0.02, zero biases and unit norms): use larger values so that a
    # mistake in any term (bias, norm weight, rope, routing) shows up in the logits.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3 if p.dim() > 1 else 0.5)
            if p.dim() == 1 and p.numel() == kwargs["hidden_size"]:
                p.add_(1.0)
    return model.float().eval(), ModelConfig(model_type=model_type, **kwargs)


def to_ours(hf_state: dict, config: ModelConfig) -> dict:
    """transformers 5 keeps routed experts fused as gate_up_proj [E, 2I, H]; ours are separate."""
    out = {}
    for name, t in hf_state.items():
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix = name[: -len("gate_up_proj")]
            gate, up = t.chunk(2, dim=1)
            out[prefix + "gate_proj"], out[prefix + "up_proj"] = gate, up
        elif name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        else:
            out[name] = t
    return out


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=[(case, device) for device in DEVICES for case in CASES], ids=lambda p: "-".join(p))
def pair(request):
    case, device = request.param
    torch.manual_seed(0)
    hf, config = hf_model(case)
    ours = build_model(config, to_ours(hf.state_dict(), config), device=device)
    return hf.to(device), ours, config


def test_full_forward_matches_transformers(pair):
    hf, ours, config = pair
    ids = torch.randint(0, config.vocab_size, (2, 19), device=ours.output_weight.device)
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids)
    assert expected.abs().max() > 1.0  # the comparison is not between near-zero tensors
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("prefill_chunk", [11, 4])
def test_prefill_then_decode_with_cache_matches_full_forward(pair, prefill_chunk):
    hf, ours, config = pair
    device = ours.output_weight.device
    ids = torch.randint(0, config.vocab_size, (1, 23), device=device)
    prompt_len = 11
    with torch.no_grad():
        expected = hf(ids).logits
        cache = KVCache(config, max_len=32, device=device)
        got = []
        for start in range(0, prompt_len, prefill_chunk):  # chunked prefill
            end = min(start + prefill_chunk, prompt_len)
            got.append(ours(ids[:, start:end], cache=cache, start_pos=start))
        for pos in range(prompt_len, ids.shape[1]):  # then one token at a time
            got.append(ours(ids[:, pos:pos + 1], cache=cache, start_pos=pos))
    torch.testing.assert_close(torch.cat(got, dim=1), expected, atol=1e-4, rtol=1e-4)


def test_last_only_returns_next_token_logits(pair):
    hf, ours, config = pair
    ids = torch.randint(0, config.vocab_size, (1, 9), device=ours.output_weight.device)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, last_only=True), hf(ids).logits[:, -1:], atol=1e-4, rtol=1e-4)


def test_kv_cache_stores_only_kv_heads():
    config = ModelConfig(**{**BASE, "num_key_value_heads": 1})
    cache = KVCache(config, max_len=16)
    assert cache.k.shape == (3, 1, 1, 16, 16)
    assert KVCache.bytes_per_token(config) * config.kv_groups == KVCache.bytes_per_token(
        ModelConfig(**{**BASE, "num_key_value_heads": 4}))


def test_static_positions_match_eager_decode(pair):
    """Tensor start positions (the compiled-decode path: whole cache + mask) give the same logits."""
    hf, ours, config = pair
    device = ours.output_weight.device
    ids = torch.randint(0, config.vocab_size, (1, 14), device=device)
    with torch.no_grad():
        expected = hf(ids).logits
        cache = KVCache(config, max_len=20, device=device)
        got = [ours(ids[:, :6], cache=cache, start_pos=torch.tensor([0], device=device))]
        for pos in range(6, ids.shape[1]):
            got.append(ours(ids[:, pos:pos + 1], cache=cache, start_pos=torch.tensor([pos], device=device)))
    torch.testing.assert_close(torch.cat(got, dim=1), expected, atol=1e-4, rtol=1e-4)
