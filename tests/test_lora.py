"""LoRA adapters (qwen15.lora) against PEFT itself on transformers' Qwen2ForCausalLM, both directions."""

import json

import pytest
import torch
from gguf import GGMLQuantizationType as Q
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import Qwen2Config, Qwen2ForCausalLM

from qwen15 import lora
from qwen15.config import ModelConfig
from qwen15.model import build_model
from qwen15.quant.modules import QuantLinear, set_activations

TINY = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rope_theta=10000.0, rms_norm_eps=1e-6,
            tie_word_embeddings=False)
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def hf_base(seed=0):
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(**TINY))
    with torch.no_grad():  # larger than transformers' init, so every term shows in the logits
        for p in model.parameters():
            p.normal_(0.0, 0.3 if p.dim() > 1 else 0.5)
            if p.dim() == 1 and p.numel() == TINY["hidden_size"]:
                p.add_(1.0)
    return model.float().eval()


def ours_from(hf):
    return build_model(ModelConfig(model_type="qwen2", **TINY), dict(hf.state_dict()))


def peft_adapter(tmp_path, targets=ALL, rslora=False, r=4, alpha=8):
    """An adapter made by PEFT (random nonzero B), saved with save_pretrained; returns (dir, peft logits)."""
    hf = hf_base()
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, use_rslora=rslora,
                     task_type="CAUSAL_LM")
    pm = get_peft_model(hf, cfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n or "lora_A" in n:
                p.normal_(0.0, 0.2)
    pm.eval()
    ids = torch.randint(0, TINY["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = pm(ids).logits
        base = pm.get_base_model()
        with pm.disable_adapter():
            base_logits = pm(ids).logits
    out = tmp_path / "peft-adapter"
    pm.save_pretrained(out)
    return out, ids, expected, base_logits


@pytest.mark.parametrize("targets,rslora", [(ALL, False), (["q_proj", "v_proj", "down_proj"], True)],
                         ids=["all7", "qv_down_rslora"])
def test_peft_adapter_loads_with_equal_logits(tmp_path, targets, rslora):
    adapter, ids, expected, base_logits = peft_adapter(tmp_path, targets, rslora)
    assert (expected - base_logits).abs().max() > 0.1  # the adapter changes the logits noticeably
    ours = ours_from(hf_base())
    config = lora.load_adapter(ours, adapter)
    assert config["peft_type"] == "LORA"
    wrapped = {p.rsplit(".", 1)[-1] for p, _ in lora.lora_layers(ours)}
    assert wrapped == set(targets)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), expected, atol=1e-4, rtol=1e-4)
        with lora.disabled(ours):  # the switch gives the base back (DPO's reference)
            torch.testing.assert_close(ours(ids), base_logits, atol=1e-4, rtol=1e-4)
        # merged into plain weights: the same function
        merged = lora.merge_lora(ours)
        assert not lora.lora_layers(merged)
        torch.testing.assert_close(merged(ids), expected, atol=1e-4, rtol=1e-4)


def test_qwen15_adapter_loads_in_peft(tmp_path):
    hf = hf_base()
    ours = ours_from(hf)
    names = lora.apply_lora(ours, "q,k,v,o,gate,up,down", r=4, alpha=16, dropout=0.05)
    assert len(names) == 7 * TINY["num_hidden_layers"]
    trainable = [n for n, p in ours.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in lora.lora_parameters(ours))
    with torch.no_grad():
        for p in lora.lora_parameters(ours):
            p.normal_(0.0, 0.2)
    out = lora.save_adapter(ours, tmp_path / "ours", base_model_name_or_path="tiny-qwen2")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["r"] == 4
    assert config["target_modules"] == sorted(ALL) and config["lora_alpha"] == 16 and config["use_dora"] is False
    from safetensors.torch import load_file

    keys = load_file(str(out / "adapter_model.safetensors"))
    assert {lora.peft_key(k) for k in ours.state_dict() if ".lora_" in k} == set(keys)
    assert keys["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"].shape == (4, 64)
    assert keys["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"].shape == (64, 4)

    pm = PeftModel.from_pretrained(hf_base(), str(out)).eval()
    ids = torch.randint(0, TINY["vocab_size"], (2, 9))
    ours.eval()
    with torch.no_grad():
        expected = pm(ids).logits
        torch.testing.assert_close(ours(ids), expected, atol=1e-4, rtol=1e-4)
        assert (expected - hf_base()(ids).logits).abs().max() > 0.1


def test_lora_over_quantized_fused_base(tmp_path):
    """A Q8_0 GGUF base keeps q/k/v and gate/up fused QuantLinear; the adapter runs unmerged over them."""
    from gguf_fixtures import write_tiny_gguf

    from qwen15.weights.gguf import load_gguf

    adapter, ids, _, _ = peft_adapter(tmp_path, ["q_proj", "v_proj", "up_proj", "o_proj"])
    cfg = ModelConfig(model_type="qwen2", **TINY)
    stored = write_tiny_gguf(tmp_path / "base.gguf", cfg, ours_from(hf_base()).state_dict(), Q.Q8_0)
    config, state, _ = load_gguf(tmp_path / "base.gguf", keep_quantized="packed")
    model = build_model(config, state)
    set_activations(model, "f32")  # exact activations: the comparison is then float rounding only
    assert isinstance(model.model.layers[0].self_attn.qkv_proj, QuantLinear)
    lora.load_adapter(model, adapter)
    assert isinstance(model.model.layers[0].self_attn.qkv_proj, lora.LoraLinear)
    # The reference: PEFT over transformers holding the dequantized GGUF values.
    hf = Qwen2ForCausalLM(Qwen2Config(**TINY)).float().eval()
    hf.load_state_dict(stored, strict=False)
    pm = PeftModel.from_pretrained(hf, str(adapter)).eval()
    with torch.no_grad():
        expected = pm(ids).logits
        torch.testing.assert_close(model(ids), expected, atol=1e-3, rtol=1e-3)
        # the decode path (one token through the cache) must not take the C layers, which cannot add LoRA
        from qwen15.engine.kv_cache import KVCache

        cache = KVCache(config, 32)
        model(ids[:1, :10], cache, 0)
        last = model(ids[:1, 10:], cache, 10)
        torch.testing.assert_close(last[0, -1], expected[0, -1], atol=1e-3, rtol=1e-3)
        merged = lora.merge_lora(model)
        torch.testing.assert_close(merged(ids), expected, atol=1e-3, rtol=1e-3)


def test_per_row_adapters_and_bf16_base(tmp_path):
    adapter, ids, expected, base_logits = peft_adapter(tmp_path)
    ours = ours_from(hf_base())
    lora.load_adapter(ours, adapter, name="a")
    lora.load_adapter(ours, adapter, name="b", activate=False)
    assert lora.adapter_names(ours) == ["a", "b"]
    lora.set_adapter(ours, [None, "b"])
    with torch.no_grad():
        got = ours(ids)
    torch.testing.assert_close(got[0], base_logits[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[1], expected[1], atol=1e-4, rtol=1e-4)
    # a bf16 base keeps its adapter in float32
    half = ours_from(hf_base()).to(torch.bfloat16)
    lora.apply_lora(half, ["q_proj"], r=2, alpha=4)
    assert {p.dtype for p in lora.lora_parameters(half)} == {torch.float32}
    assert half(ids).dtype == torch.bfloat16


def _write(tmp_path, config=None, tensors=None):
    from safetensors.torch import save_file

    d = tmp_path / f"bad{len(list(tmp_path.glob('bad*')))}"
    d.mkdir()
    base = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "use_dora": False}
    (d / "adapter_config.json").write_text(json.dumps({**base, **(config or {})}))
    if tensors is not None:
        save_file(tensors, str(d / "adapter_model.safetensors"))
    return d


def test_bad_adapters_give_clear_errors(tmp_path):
    model = ours_from(hf_base())
    ok = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 64),
          "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(64, 4)}
    cases = [
        (tmp_path / "nowhere", "no such directory"),
        (_write(tmp_path, {"peft_type": "PREFIX_TUNING"}, ok), "peft_type is 'PREFIX_TUNING', expected 'LORA'"),
        (_write(tmp_path, {"use_dora": True}, ok), "DoRA adapters are not supported"),
        (_write(tmp_path, {}, {**ok, "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight":
                               torch.zeros(32, 4)}), "do not fit the model's [64, 64] weight"),
        (_write(tmp_path, {}, {k.replace("layers.0", "layers.7"): v for k, v in ok.items()}),
         "the model has no module 'model.layers.7.self_attn'"),
    ]
    for directory, message in cases:
        with pytest.raises(lora.AdapterError) as e:
            lora.load_adapter(model, directory)
        assert message in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(lora.AdapterError, match="adapter_model.safetensors is missing"):
        lora.load_adapter(model, _write(tmp_path))
    with pytest.raises(lora.AdapterError, match="unknown LoRA target 'qq'"):
        lora.apply_lora(model, "q,qq")
    assert not lora.lora_layers(model)  # nothing half-applied


def test_lora_dropout_mask_is_a_seeded_hash_with_the_same_mask_in_backward():
    """LoRA dropout (the C kernels' hashed mask): keeps 1 - p of the inputs, scaled by 1 / (1 - p), the
    same mask for the same torch seed and a new one for the next call, and backward applies exactly
    forward's mask; in eval mode it is the identity."""
    from qwen15.quant.native import load_library

    if load_library() is None:
        pytest.skip("no C compiler: nn.Dropout's own mask is used")
    d = lora.LoraDropout(0.1).train()
    x = torch.randn(300, 700, requires_grad=True)
    torch.manual_seed(3)
    y = d(x)
    kept = y != 0
    n = kept.numel()
    assert abs(float(kept.float().mean()) - 0.9) < 4 * (0.9 * 0.1 / n) ** 0.5  # within 4 sigma of 0.9
    assert torch.equal(y[kept], x.detach()[kept] * torch.tensor(1 / 0.9))
    torch.manual_seed(3)
    assert torch.equal(d(x), y)
    assert not torch.equal(d(x), y)
    g = torch.randn_like(x)
    y.backward(g)
    assert torch.equal(x.grad, torch.where(kept, g * torch.tensor(1 / 0.9), torch.zeros(())))
    assert d.eval()(x) is x


def test_lora_training_with_dropout_is_the_same_with_gradient_checkpointing():
    """Checkpointing recomputes each layer in backward; the dropout masks must come back the same, or the
    gradients would be those of a different forward."""
    from qwen15.train.forward import enable_grad_checkpointing

    ids = torch.randint(0, TINY["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(4))
    grads = []
    for ckpt in (False, True):
        model = ours_from(hf_base())
        lora.apply_lora(model, ALL, r=4, alpha=8, dropout=0.2)
        for p in lora.lora_parameters(model):  # nonzero B, so every adapter's path carries gradient
            torch.nn.init.normal_(p, 0.0, 0.2)
        if ckpt:
            enable_grad_checkpointing(model)
        model.train()
        torch.manual_seed(5)
        model(ids).float().square().mean().backward()
        grads.append([p.grad.clone() for p in lora.lora_parameters(model)])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
