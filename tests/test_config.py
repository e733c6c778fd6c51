"""Presets and config parsing: parameter counts agree with the published figures (SPEC section 1)."""

import json
import subprocess
import sys

import pytest
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

from qwen15.config import PRESETS, ModelConfig, get_preset
from qwen15.errors import ConfigError

# Published totals (SPEC section 1: leaderboard and release-post figures), in billions.
PUBLISHED_B = {
    "qwen1.5-0.5b": 0.464, "qwen1.5-1.8b": 1.837, "qwen1.5-4b": 3.950, "qwen1.5-7b": 7.721,
    "qwen1.5-14b": 14.167, "qwen1.5-32b": 32.512, "qwen1.5-72b": 72.288, "qwen1.5-110b": 111.21,
    "qwen1.5-moe-a2.7b": 14.316,
}


@pytest.mark.parametrize("name", list(PUBLISHED_B))
def test_preset_parameter_count_matches_published(name):
    assert PRESETS[name].num_parameters() / 1e9 == pytest.approx(PUBLISHED_B[name], rel=1e-3)


def test_moe_active_parameters_match_release_post():
    assert PRESETS["qwen1.5-moe-a2.7b"].num_parameters(active=True) / 1e9 == pytest.approx(2.689, rel=1e-3)


def test_gqa_presets():
    assert PRESETS["qwen1.5-32b"].kv_groups == 5
    assert PRESETS["qwen1.5-110b"].kv_groups == 8
    assert PRESETS["qwen1.5-4b"].rope_theta == 5e6


@pytest.mark.parametrize("moe", [False, True])
def test_parameter_count_equals_transformers_model(moe):
    """Counting from shapes agrees with an instantiated transformers model of the same config."""
    kwargs = dict(vocab_size=500, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=not moe)
    if moe:
        kwargs.update(num_experts=5, num_experts_per_tok=2, moe_intermediate_size=24,
                      shared_expert_intermediate_size=40, decoder_sparse_step=1, mlp_only_layers=[1])
        hf = Qwen2MoeForCausalLM(Qwen2MoeConfig(**kwargs))
    else:
        hf = Qwen2ForCausalLM(Qwen2Config(**kwargs))
    expected = sum(p.numel() for p in hf.parameters())
    ours = ModelConfig(model_type="qwen2_moe" if moe else "qwen2", **kwargs)
    assert ours.num_parameters() == expected


def test_from_hf_config_roundtrip(tmp_path):
    hf = Qwen2Config(vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, rope_theta=5e6, tie_word_embeddings=True)
    hf.save_pretrained(tmp_path)
    config = ModelConfig.from_hf_config(tmp_path)
    assert (config.hidden_size, config.num_key_value_heads, config.rope_theta, config.tie_word_embeddings) == (
        64, 2, 5e6, True)
    assert config.head_dim == 16


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="config.json not found"):
        ModelConfig.from_hf_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_hf_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError, match="unsupported model_type 'llama'"):
        ModelConfig.from_hf_config(tmp_path)
    with pytest.raises(ConfigError, match="unknown preset 'qwen1.5-3b'"):
        get_preset("qwen1.5-3b")
    assert get_preset("Qwen/Qwen1.5-32B-Chat").num_key_value_heads == 8


def test_presets_cli_json():
    out = subprocess.run([sys.executable, "-m", "qwen15.cli", "presets", "--json"], capture_output=True,
                         text=True, check=True).stdout
    rows = json.loads(out.strip().splitlines()[-1])
    by_name = {r["name"]: r for r in rows}
    assert set(by_name) == set(PUBLISHED_B)
    assert by_name["qwen1.5-110b"]["params"] == PRESETS["qwen1.5-110b"].num_parameters()


def test_presets_cli_table():
    out = subprocess.run([sys.executable, "-m", "qwen15.cli", "presets"], capture_output=True, text=True,
                         check=True).stdout
    assert "qwen1.5-32b" in out and "32.512B" in out and "40/8" in out
