"""`qwen15 plan`: memory arithmetic checked against tensors actually allocated."""

import json
import subprocess
import sys

import pytest
import torch

from qwen15.config import ModelConfig
from qwen15.engine.kv_cache import KVCache
from qwen15.errors import ConfigError
from qwen15.model import build_model
from qwen15.plan import make_plan


def test_kv_bytes_per_token_equal_an_allocated_cache(tmp_path):
    config = ModelConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=8, num_key_value_heads=2)
    config_dir = tmp_path / "m"
    config_dir.mkdir()
    (config_dir / "config.json").write_text(json.dumps(config.to_dict()))
    plan = make_plan(str(config_dir), context=100, batch=2, device="cpu")
    cache = KVCache(config, max_len=100, batch_size=2, dtype=torch.float32)
    assert plan.kv_cache_bytes == cache.k.nbytes + cache.v.nbytes


def test_weights_bytes_equal_a_built_model_in_that_dtype(tmp_path):
    config = ModelConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True)
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    model = build_model(config, dtype=torch.bfloat16)
    actual = sum(p.numel() * p.element_size() for p in model.parameters())
    assert make_plan(str(tmp_path), quant="bf16").weights_bytes == actual


def test_gqa_shrinks_the_kv_cache_by_the_group_size():
    p32 = make_plan("qwen1.5-32b", quant="bf16", context=32768, gpu_mem_gb=80)
    p72 = make_plan("qwen1.5-72b", quant="bf16", context=32768, gpu_mem_gb=80)
    p110 = make_plan("qwen1.5-110b", quant="bf16", context=32768, gpu_mem_gb=80)
    # 110B and 72B share layers and head_dim; 110B keeps 8 of 64 kv heads.
    assert p72.kv_cache_bytes == 8 * p110.kv_cache_bytes
    assert p32.kv_bytes_per_token == 2 * 64 * 8 * 128 * 2
    assert p32.devices_needed == 1 and p110.devices_needed == 3
    assert make_plan("qwen1.5-110b", quant="int4", context=8192, gpu_mem_gb=80).devices_needed == 1


def test_errors():
    with pytest.raises(ConfigError, match="unknown quant 'int3'"):
        make_plan("qwen1.5-7b", quant="int3")
    with pytest.raises(ConfigError, match="batch must be >= 1"):
        make_plan("qwen1.5-7b", batch=0)
    with pytest.raises(ConfigError, match="unknown preset"):
        make_plan("qwen1.5-9b")
    with pytest.raises(ConfigError, match="file not found"):
        make_plan("/nonexistent/model.gguf")


def test_cli_json():
    out = subprocess.run([sys.executable, "-m", "qwen15.cli", "plan", "--model", "qwen1.5-32b", "--quant", "int4",
                          "--context", "4096", "--gpu-mem", "24", "--json"], capture_output=True, text=True, check=True)
    row = json.loads(out.stdout.strip().splitlines()[-1])
    assert row["devices_needed"] == 1 and row["quant"] == "int4"
    assert row["total_bytes"] == row["weights_bytes"] + row["kv_cache_bytes"] + row["activation_bytes"] + row[
        "overhead_bytes"]


@pytest.mark.real_model
def test_plan_agrees_with_the_peak_rss_bench_measures(real_gguf_path):
    """The issue's check: for the 0.5B file, plan's total is within 15% of `qwen15 bench`'s peak RSS."""
    prompt, gen = 128, 16
    out = subprocess.run([sys.executable, "-m", "qwen15.cli", "bench", "--model", str(real_gguf_path),
                          "--prompt-tokens", str(prompt), "--gen-tokens", str(gen), "--json"],
                         capture_output=True, text=True, check=True)
    rss = json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mb"] * 2 ** 20
    plan = make_plan(str(real_gguf_path), context=prompt + gen + 1)
    assert abs(plan.total_bytes - rss) / rss < 0.15, (plan.total_bytes / 2 ** 20, rss / 2 ** 20)
