"""safetensors loading against tiny random transformers models saved with save_pretrained.

The reference is the transformers model's own state_dict (transformers 5 keeps routed experts fused as
`gate_up_proj` [E, 2*Im, H] in memory, gate rows first; on disk save_pretrained writes them per expert)."""

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

from qwen15.config import ModelConfig
from qwen15.errors import WeightsError
from qwen15.weights.names import expected_shapes
from qwen15.weights.safetensors import load_safetensors

BASE = dict(vocab_size=80, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=24)


def hf_model(moe=False, dtype=torch.float32, **kw):
    kwargs = {**BASE, **(MOE if moe else {}), **kw}
    model = (Qwen2MoeForCausalLM(Qwen2MoeConfig(**kwargs)) if moe else Qwen2ForCausalLM(Qwen2Config(**kwargs)))
    with torch.no_grad():  # transformers' init leaves biases zero and norms one: randomise everything
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    return model.to(dtype).eval()


def reference(model, config: ModelConfig) -> dict[str, torch.Tensor]:
    """The transformers state dict under our names (independent of the loader's mapping code)."""
    out = {}
    for name, t in model.state_dict().items():
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix = name[: -len("gate_up_proj")]
            Im = config.moe_intermediate_size
            out[prefix + "gate_proj"], out[prefix + "up_proj"] = t[:, :Im], t[:, Im:]
        elif name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        else:
            out[name] = t
    return out


def save(model, path, **kw):
    model.save_pretrained(path, **kw)
    return ModelConfig.from_hf_config(path)


def assert_same(state, ref, config, dtype=torch.float32):
    assert set(state) == set(ref) == set(expected_shapes(config))
    for name, t in ref.items():
        assert state[name].dtype == dtype, name
        assert state[name].shape == t.shape, name
        assert torch.equal(state[name], t.to(dtype)), name


def one_line(e) -> str:
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize("tied", [False, True])
def test_dense_single_file(tmp_path, tied):
    model = hf_model(tie_word_embeddings=tied)
    config = save(model, tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    state = load_safetensors(tmp_path, config)
    assert_same(state, reference(model, config), config)
    assert ("lm_head.weight" in state) == (not tied)


def test_dense_sharded(tmp_path):
    model = hf_model(num_hidden_layers=3)
    config = save(model, tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert not (tmp_path / "model.safetensors").exists()
    assert_same(load_safetensors(tmp_path, config), reference(model, config), config)


def test_tied_checkpoint_that_still_holds_lm_head(tmp_path):
    model = hf_model(tie_word_embeddings=True)
    config = save(model, tmp_path)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    save_file(sd, str(tmp_path / "model.safetensors"))
    state = load_safetensors(tmp_path, config)
    assert "lm_head.weight" not in state
    assert_same(state, reference(model, config), config)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bf16_checkpoint(tmp_path, dtype):
    model = hf_model(dtype=torch.bfloat16)
    config = save(model, tmp_path)
    assert_same(load_safetensors(tmp_path, config, dtype=dtype), reference(model, config), config, dtype)


def test_moe_per_expert_layout_from_save_pretrained(tmp_path):
    model = hf_model(moe=True)
    config = save(model, tmp_path)
    assert config.is_moe
    from safetensors import safe_open
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.mlp.experts.3.gate_proj.weight" in keys  # the released layout
    state = load_safetensors(tmp_path, config)
    assert state["model.layers.0.mlp.experts.gate_proj"].shape == (4, 16, 32)
    assert state["model.layers.0.mlp.experts.down_proj"].shape == (4, 32, 16)
    assert_same(state, reference(model, config), config)


def test_moe_sharded(tmp_path):
    model = hf_model(moe=True, num_hidden_layers=3, mlp_only_layers=[1])
    config = save(model, tmp_path, max_shard_size="10KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert config.mlp_only_layers == [1]
    assert_same(load_safetensors(tmp_path, config), reference(model, config), config)


def test_moe_fused_layout(tmp_path):
    """transformers 5's in-memory names (experts.gate_up_proj) written as they are."""
    model = hf_model(moe=True)
    config = save(model, tmp_path)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in sd
    (tmp_path / "model.safetensors").unlink()
    save_file(sd, str(tmp_path / "model.safetensors"))
    assert_same(load_safetensors(tmp_path, config), reference(model, config), config)


def test_moe_our_stacked_layout(tmp_path):
    model = hf_model(moe=True)
    config = save(model, tmp_path)
    ref = reference(model, config)
    save_file({k: v.contiguous() for k, v in ref.items()}, str(tmp_path / "model.safetensors"))
    assert_same(load_safetensors(tmp_path, config), ref, config)


def test_single_file_path(tmp_path):
    model = hf_model()
    config = save(model, tmp_path)
    assert_same(load_safetensors(tmp_path / "model.safetensors", config), reference(model, config), config)


# ---- bad input --------------------------------------------------------------------------------------

def test_no_safetensors(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(WeightsError) as e:
        load_safetensors(tmp_path, ModelConfig(**{**BASE}))
    assert one_line(e) == (f"{tmp_path}: no safetensors weights: expected model.safetensors or "
                           "model.safetensors.index.json")


def test_missing_directory(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        load_safetensors(tmp_path / "nope", ModelConfig(**BASE))


def test_index_names_missing_shard(tmp_path):
    model = hf_model(num_hidden_layers=3)
    config = save(model, tmp_path, max_shard_size="20KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(WeightsError) as e:
        load_safetensors(tmp_path, config)
    msg = one_line(e)
    assert msg == (f"{tmp_path / 'model.safetensors.index.json'}: names shard '{shard.name}', "
                   f"which is missing from {tmp_path}")


def test_bad_index(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(WeightsError, match=r"model.safetensors.index.json: not valid JSON"):
        load_safetensors(tmp_path, ModelConfig(**BASE))
    (tmp_path / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(WeightsError, match=r"no 'weight_map'"):
        load_safetensors(tmp_path, ModelConfig(**BASE))


@pytest.mark.parametrize("content", [b"", b"\x00" * 3, b"GGUF garbage that is not safetensors" * 4,
                                     (10**9).to_bytes(8, "little") + b"{}"])
def test_corrupt_header(tmp_path, content):
    (tmp_path / "model.safetensors").write_bytes(content)
    with pytest.raises(WeightsError) as e:
        load_safetensors(tmp_path, ModelConfig(**BASE))
    assert one_line(e).startswith(f"{tmp_path / 'model.safetensors'}: not a safetensors file or corrupt header")


def test_truncated_file(tmp_path):
    model = hf_model()
    config = save(model, tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) - 1000])
    with pytest.raises(WeightsError) as e:
        load_safetensors(tmp_path, config)
    assert one_line(e).startswith(f"{tmp_path / 'model.safetensors'}: truncated: the header describes more "
                                  f"tensor data than the file's {len(data) - 1000} bytes")


def test_missing_tensor(tmp_path):
    model = hf_model()
    config = save(model, tmp_path)
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if k != "model.layers.1.self_attn.q_proj.bias"}
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(WeightsError) as e:
        load_safetensors(tmp_path, config)
    assert one_line(e) == f"{tmp_path}: missing tensor 'model.layers.1.self_attn.q_proj.bias'"


def test_untied_config_without_lm_head(tmp_path):
    model = hf_model(tie_word_embeddings=True)
    config = save(model, tmp_path)
    config.tie_word_embeddings = False
    with pytest.raises(WeightsError, match=r"missing tensor 'lm_head.weight'"):
        load_safetensors(tmp_path, config)


def test_missing_expert(tmp_path):
    model = hf_model(moe=True)
    config = save(model, tmp_path)
    from safetensors import safe_open
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys() if k != "model.layers.1.mlp.experts.3.up_proj.weight"}
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(WeightsError) as e:
        load_safetensors(tmp_path, config)
    assert one_line(e) == f"{tmp_path}: missing tensor 'model.layers.1.mlp.experts.3.up_proj.weight'"


def test_shape_mismatch(tmp_path):
    model = hf_model()
    config = save(model, tmp_path)
    config.intermediate_size = 64
    with pytest.raises(WeightsError) as e:
        load_safetensors(tmp_path, config)
    assert one_line(e) == (f"{tmp_path / 'model.safetensors'}: tensor 'model.layers.0.mlp.gate_proj.weight' "
                           "has shape (48, 32) but the config implies (64, 32)")


def test_shape_mismatch_in_expert(tmp_path):
    model = hf_model(moe=True)
    config = save(model, tmp_path)
    config.moe_intermediate_size = 8
    with pytest.raises(WeightsError, match=r"tensor 'model.layers.0.mlp.experts.0.gate_proj.weight' has shape "
                                           r"\(16, 32\) but the config implies \(8, 32\)"):
        load_safetensors(tmp_path, config)


def test_integer_tensor_rejected(tmp_path):
    model = hf_model()
    config = save(model, tmp_path)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    sd["model.norm.weight"] = torch.ones(32, dtype=torch.int32)
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(WeightsError, match=r"tensor 'model.norm.weight' has dtype torch.int32: expected floating point"):
        load_safetensors(tmp_path, config)
